"""Read a moemix checkpoint back: its plan, and float weights for reference models.

`dequantized_state_dict` turns every quantized linear back into `X.weight`
with exactly the math the kernels use, so a plain Hugging Face model loaded
from it is the numerical reference for the vLLM method (tests, quality evals).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from vllm_moemix.checkpoint.format import SUFFIXES, load_config, read_quantization_config
from vllm_moemix.checkpoint.source import INDEX, SafetensorsSource
from vllm_moemix.config.arch import architecture_for
from vllm_moemix.config.plan import Resolved
from vllm_moemix.config.spec import PlanError
from vllm_moemix.quant.tensors import dequantize_kn


def read_plan(ckpt_dir: str | Path) -> Resolved:
    config = load_config(ckpt_dir)
    if "quantization_config" not in config:
        raise PlanError(f"{ckpt_dir}: config.json has no quantization_config (not a moemix checkpoint)")
    return read_quantization_config(config["quantization_config"], f"{ckpt_dir}/config.json")


def dequantized_state_dict(ckpt_dir: str | Path, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """All tensors of the checkpoint, quantized linears replaced by their dequantized `.weight`."""
    resolved = read_plan(ckpt_dir)
    source = SafetensorsSource(ckpt_dir)
    quantized = {name: spec for name, spec in resolved.items() if spec is not None}
    state: dict[str, torch.Tensor] = {}
    for name in source.names():
        module, _, suffix = name.rpartition(".")
        if module in quantized and suffix in SUFFIXES:
            continue
        tensor = source.get(name)
        state[name] = tensor.to(dtype) if tensor.is_floating_point() else tensor
    for module, spec in quantized.items():
        try:
            qweight, scales = source.get(f"{module}.qweight"), source.get(f"{module}.scales")
            qzeros = None if spec.sym else source.get(f"{module}.qzeros")
        except KeyError as err:
            raise PlanError(f"{module}: tensor {err} is missing from the checkpoint") from None
        state[f"{module}.weight"] = dequantize_kn(qweight, scales, qzeros, spec.bits).t().contiguous().to(dtype)
    return _restack_experts(state, ckpt_dir)


def _restack_experts(state: dict[str, torch.Tensor], ckpt_dir: str | Path) -> dict[str, torch.Tensor]:
    """Architectures whose float checkpoints stack experts (GPT-OSS) get their 3-D tensors back, so transformers
    and vLLM load the dequantized model as they load the original."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(ckpt_dir)
    arch = architecture_for(config)
    stacked, mlp = arch.stacked_experts, arch.experts
    if stacked is None:
        return state
    for layer in range(config.num_hidden_layers):
        if not arch.is_moe_layer(config, layer):
            continue
        prefix = f"model.layers.{layer}.{mlp.prefix}"
        if f"{prefix}.{stacked.gate_up}" in state:
            continue  # unquantized experts were written stacked
        parts = {
            part: [state.pop(f"{prefix}.{e}.{name}.weight") for e in range(arch.num_experts(config))]
            for part, name in (("gate", mlp.gate), ("up", mlp.up), ("down", mlp.down))
        }
        state[f"{prefix}.{stacked.gate_up}"], state[f"{prefix}.{stacked.down}"] = stacked.stack(
            parts["gate"], parts["up"], parts["down"]
        )
    return state


def write_dequantized_checkpoint(ckpt_dir: str | Path, out_dir: str | Path, dtype: torch.dtype = torch.float32) -> Path:
    """A plain (unquantized) Hugging Face checkpoint with the dequantized weights.

    Any loader (transformers, vLLM without moemix) then gives the reference
    the moemix kernels must match.
    """
    ckpt_dir, out_dir = Path(ckpt_dir), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(dequantized_state_dict(ckpt_dir, dtype), str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    for item in ckpt_dir.iterdir():
        if item.is_file() and not item.name.endswith(".safetensors") and item.name not in ("config.json", INDEX):
            shutil.copy2(item, out_dir / item.name)
    config = load_config(ckpt_dir)
    config.pop("quantization_config", None)
    config["torch_dtype"] = str(dtype).removeprefix("torch.")
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out_dir
