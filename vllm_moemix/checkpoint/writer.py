"""Quantize a Hugging Face safetensors MoE checkpoint into a moemix checkpoint.

All validation (architecture, plan, shapes, missing tensors, output directory)
happens before the first tensor is written; writing goes to a temporary
sibling directory renamed into place at the end, so a failure never leaves a
half-written checkpoint behind.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from tqdm import tqdm
from transformers import AutoConfig

from vllm_moemix.checkpoint.format import FORMAT_VERSION, QUANT_METHOD, is_checkpoint_dir
from vllm_moemix.checkpoint.source import INDEX, SafetensorsSource
from vllm_moemix.config.arch import LinearInfo, quantizable_linears
from vllm_moemix.config.footprint import Footprint, footprint
from vllm_moemix.config.plan import Plan, Resolved, resolved_to_config
from vllm_moemix.config.spec import PlanError
from vllm_moemix.quant.quantizers import Quantizer, RTNQuantizer

WEIGHT_FILES = ("*.safetensors", "*.bin", "*.pt", "*.pth", INDEX, "pytorch_model.bin.index.json")
DEFAULT_SHARD_BYTES = 1024**3
"""A shard is buffered in memory until written: this bounds what the output adds to quantization's peak."""


def _layer_order(names: list[str]) -> list[str]:
    """Non-layer tensors first, then decoder layers in numeric (not lexicographic) order."""

    def key(item: tuple[int, str]) -> tuple[int, int]:
        position, name = item
        parts = name.split(".")
        layer = int(parts[2]) if name.startswith("model.layers.") and parts[2].isdigit() else -1
        return layer, position

    return [name for _, name in sorted(enumerate(names), key=key)]


def inspect_source(model_dir: str | Path) -> tuple[Any, dict[str, LinearInfo], SafetensorsSource]:
    """Config, quantizable linears and tensor source; raises PlanError on any mismatch."""
    model_dir = Path(model_dir)
    if not (model_dir / "config.json").exists():
        raise PlanError(f"{model_dir}: no config.json (not a Hugging Face model directory)")
    config = AutoConfig.from_pretrained(model_dir)
    quantized = getattr(config, "quantization_config", None)
    if quantized and quantized.get("quant_method") == "mxfp4":
        raise PlanError(
            f"{model_dir}: experts are stored in MXFP4 (GPT-OSS's official release); moemix starts from bf16 "
            "weights. Dequantize once: AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, "
            "quantization_config=Mxfp4Config(dequantize=True)).save_pretrained(out) (transformers; needs RAM for "
            "the bf16 model: ~42 GB for gpt-oss-20b), or start from a published bf16 copy"
        )
    if quantized:
        raise PlanError(
            f"{model_dir}: already quantized ({config.quantization_config.get('quant_method')}); "
            "start from a float checkpoint"
        )
    linears = quantizable_linears(config)
    source = SafetensorsSource(model_dir).view_stacked_experts(config)
    for name, info in linears.items():
        key = f"{name}.weight"
        if key not in source:
            raise PlanError(f"{name}: tensor {key} is missing from the checkpoint")
        expected = (info.out_features, info.in_features)
        if source.shape(key) != expected:
            raise PlanError(
                f"{name}: weight shape {list(source.shape(key))} does not match the config ({list(expected)})"
            )
    return config, linears, source


class _ShardWriter:
    """Buffers tensors and writes numbered safetensors shards of bounded size."""

    def __init__(self, out_dir: Path, max_bytes: int):
        self.out_dir, self.max_bytes = out_dir, max_bytes
        self.buffer: dict[str, torch.Tensor] = {}
        self.buffered = 0
        self.shards: list[dict[str, torch.Tensor] | str] = []
        self.weight_map: dict[str, str] = {}
        self.total_bytes = 0

    @property
    def written(self) -> set[str]:
        """Names added so far (buffered or flushed)."""
        return set(self.buffer) | set(self.weight_map)

    def add(self, name: str, tensor: torch.Tensor) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        if self.buffer and self.buffered + nbytes > self.max_bytes:
            self.flush()
        self.buffer[name] = tensor.contiguous()
        self.buffered += nbytes
        self.total_bytes += nbytes

    def flush(self) -> None:
        if not self.buffer:
            return
        fname = f"model-{len(self.shards) + 1:05d}.safetensors"
        save_file(self.buffer, str(self.out_dir / fname), metadata={"format": "pt"})
        self.weight_map.update({k: fname for k in self.buffer})
        self.shards.append(fname)
        self.buffer, self.buffered = {}, 0

    def finish(self) -> None:
        self.flush()
        total = len(self.shards)
        renamed = {}
        for i, fname in enumerate(self.shards):
            final = f"model-{i + 1:05d}-of-{total:05d}.safetensors"
            os.rename(self.out_dir / fname, self.out_dir / final)
            renamed[fname] = final
        index = {
            "metadata": {"total_size": self.total_bytes},
            "weight_map": {k: renamed[v] for k, v in sorted(self.weight_map.items())},
        }
        (self.out_dir / INDEX).write_text(json.dumps(index, indent=2) + "\n")


def quantization_config(plan: Plan, resolved: Resolved, fp: Footprint, quantizer_name: str) -> dict[str, Any]:
    return {
        "quant_method": QUANT_METHOD,
        "format_version": FORMAT_VERSION,
        "quantizer": quantizer_name,
        "modules": resolved_to_config(resolved),
        "plan": plan.to_dict(),
        "summary": {
            "counts": "attention, routed-expert, shared-expert and dense-MLP linears",
            "avg_bits": round(fp.avg_bits, 4),
            "avg_payload_bits": round(fp.avg_payload_bits, 4),
            "quantized_bytes": fp.nbytes,
            "bf16_bytes": fp.bf16_bytes,
            "bytes_by_width": dict(fp.by_width),
            "bytes_by_role": dict(fp.by_role),
        },
    }


def check_output_dir(out_dir: Path) -> None:
    """A checkpoint is written only where nothing would be overwritten: a new or empty directory."""
    if is_checkpoint_dir(out_dir):
        raise PlanError(f"{out_dir} already holds a checkpoint; choose another output directory or remove it")
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise PlanError(f"{out_dir} exists and is not an empty directory; choose another output directory")


def quantize_checkpoint(
    model_dir: str | Path,
    plan: Plan,
    out_dir: str | Path,
    quantizer: Quantizer | None = None,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    progress: bool = True,
) -> Footprint:
    """Write a moemix checkpoint of `model_dir` quantized per `plan` to `out_dir` (RTN by default)."""
    quantizer = quantizer or RTNQuantizer()
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    check_output_dir(out_dir)
    _, linears, source = inspect_source(model_dir)
    resolved = plan.resolve(linears)
    fp = footprint(resolved, linears)
    config_json = json.loads((model_dir / "config.json").read_text())
    quantizer_name = getattr(quantizer, "name", type(quantizer).__name__)
    if hasattr(quantizer, "begin"):  # streaming quantizers plan their calibration pass from the whole plan
        quantizer.begin(resolved, linears)
    config_json["quantization_config"] = quantization_config(plan, resolved, fp, quantizer_name)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-", dir=out_dir.parent))
    try:
        writer = _ShardWriter(tmp, max_shard_bytes)
        for name in tqdm(_layer_order(source.names()), desc="quantize", unit="tensor", disable=not progress):
            module = name.removesuffix(".weight")
            spec = resolved.get(module) if name.endswith(".weight") else None
            stacked = source.stacked_base(name)
            if spec is None and stacked is not None:  # unquantized experts stay stacked, as their loader reads them
                if stacked not in writer.written:
                    writer.add(stacked, source.get(stacked))
                continue
            tensor = source.get(name)
            if spec is None:
                writer.add(name, tensor)
                continue
            qw = quantizer(module, tensor, spec)
            for key, value in qw.tensors(module).items():
                writer.add(key, value)
        writer.finish()
        for item in model_dir.iterdir():
            if item.is_file() and not any(item.match(p) for p in WEIGHT_FILES) and item.name != "config.json":
                shutil.copy2(item, tmp / item.name)
        (tmp / "config.json").write_text(json.dumps(config_json, indent=2) + "\n")
        if out_dir.exists():  # the empty directory checked above
            out_dir.rmdir()
        os.rename(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return fp
