"""The `moemix` quantization config vLLM instantiates from a checkpoint's config.json."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
from vllm.model_executor.layers.fused_moe import RoutedExperts
from vllm.model_executor.layers.fused_moe.unquantized_fused_moe_method import UnquantizedFusedMoEMethod
from vllm.model_executor.layers.linear import LinearBase, UnquantizedLinearMethod
from vllm.model_executor.layers.quantization import register_quantization_config
from vllm.model_executor.layers.quantization.base_config import QuantizationConfig, QuantizeMethodBase
from vllm.model_executor.models.utils import WeightsMapper

from vllm_moemix.checkpoint.format import QUANT_METHOD, SUFFIXES, read_quantization_config
from vllm_moemix.checkpoint.source import SafetensorsSource
from vllm_moemix.config.arch import architecture_for
from vllm_moemix.config.plan import Resolved, spec_to_value
from vllm_moemix.config.spec import PlanError, QuantSpec
from vllm_moemix.layers.linear import MoeMixLinearMethod
from vllm_moemix.layers.moe import MoeMixMoEMethod, stacked_tensor_name

VLLM_FUSED_LINEARS = {
    "qkv_proj": ["q_proj", "k_proj", "v_proj"],
    "gate_up_proj": ["gate_proj", "up_proj"],
    "fused_qkv_a_proj": ["q_a_proj", "kv_a_proj_with_mqa"],
}
"""vLLM's fused linears and their checkpoint shards, for the models that add one to `packed_modules_mapping` only
after the quantization config copied it (Qwen3-MoE adds `gate_up_proj` when it has dense `mlp_only_layers`)."""


@register_quantization_config(QUANT_METHOD)
class MoeMixConfig(QuantizationConfig):
    """Holds the resolved plan: checkpoint linear name -> QuantSpec (None = unquantized)."""

    def __init__(self, modules: Resolved):
        super().__init__()
        self.modules = modules
        self.stacked_experts = False  # set from the model config: its vLLM loader reads stacked experts only

    def __repr__(self) -> str:
        widths = sorted({s.bits for s in self.modules.values() if s is not None})
        return f"MoeMixConfig({len(self.modules)} linears, widths={widths})"

    @classmethod
    def get_name(cls) -> str:
        return QUANT_METHOD

    @classmethod
    def get_supported_act_dtypes(cls) -> list[torch.dtype]:
        return [torch.bfloat16, torch.float16, torch.float32]

    @classmethod
    def get_min_capability(cls) -> int:
        return 70

    @staticmethod
    def get_config_filenames() -> list[str]:
        return []  # everything is in config.json's quantization_config

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> MoeMixConfig:
        return cls(read_quantization_config(config))

    def maybe_update_config(self, model_name: str, hf_config=None, revision: str | None = None) -> None:
        """Called by vLLM while it builds the engine config, before any engine starts: check the shard files.

        A moemix checkpoint is safetensors only, with an index that stays inside its directory and shards
        whose headers read; refusing here names the problem instead of a worker dying mid-load.
        """
        model_dir = Path(model_name)
        if model_dir.is_dir():
            SafetensorsSource(model_dir)  # raises PlanError naming the file
        if hf_config is not None:
            self.stacked_experts = architecture_for(hf_config).stacked_experts is not None

    def apply_vllm_mapper(self, hf_to_vllm_mapper) -> None:
        """Rename planned modules as vLLM renames their tensors, mapped as `<module>.qweight` (what the checkpoint
        holds: suffix rules for float tensors, such as GPT-OSS's `.down_proj`, must not apply). A rule that stacks
        a shard into a fused module (Qwen3-MoE's `.q_proj` -> `.qkv_proj`) keeps the shard's own name: fused
        modules are resolved shard by shard through `packed_modules_mapping`."""
        renamed = {}
        for name, spec in self.modules.items():
            mapped = hf_to_vllm_mapper._map_name_with_shard(f"{name}.qweight")
            if mapped is None:
                continue
            module, shard = mapped[0].removesuffix(".qweight"), mapped[1]
            if shard is not None:
                module = f"{module.rpartition('.')[0]}.{name.rpartition('.')[2]}"
            renamed[module] = spec
        self.modules = renamed

    def get_checkpoint_weight_mapper(self) -> WeightsMapper:
        """Stacked-expert models: per-expert tensors go to the placeholders `MoeMixMoEMethod` registers."""
        if not self.stacked_experts:
            return super().get_checkpoint_weight_mapper()
        suffixes = "|".join(SUFFIXES)
        pattern = re.compile(rf"^(.*\.experts)\.(\d+)\.(\w+)\.({suffixes})$")
        renamed = stacked_tensor_name(r"\2", r"\3", r"\4")
        return super().get_checkpoint_weight_mapper() | WeightsMapper(
            orig_to_new_regex={pattern: rf"\1.routed_experts.{renamed}"}
        )

    def _linear_spec(self, prefix: str) -> QuantSpec | None:
        """Spec of a vLLM linear, which may fuse several checkpoint linears; None = unquantized."""
        parent, _, leaf = prefix.rpartition(".")
        shards = self.packed_modules_mapping.get(leaf) or VLLM_FUSED_LINEARS.get(leaf, [leaf])
        names = [f"{parent}.{s}" if parent else s for s in shards]
        planned = [n for n in names if n in self.modules]
        if not planned:
            return None  # not a planned linear (e.g. a router built with a quant config)
        specs = {self.modules[n] for n in planned}
        if len(planned) != len(names) or len(specs) != 1:
            detail = ", ".join(f"{n}={spec_to_value(self.modules.get(n))}" for n in names)
            raise PlanError(f"{prefix}: fused shards must share one spec, got {detail}")
        return specs.pop()

    def _expert_specs(self, layer: RoutedExperts, prefix: str) -> dict[int, tuple[QuantSpec, QuantSpec]] | None:
        """global expert -> (w13 spec, w2 spec); None if every expert is unquantized."""
        specs: dict[int, tuple[QuantSpec, QuantSpec]] = {}
        unquantized = 0
        for e in range(layer.global_num_experts):
            base = f"{prefix}.{e}"
            gate, up, down = (
                self.modules.get(f"{base}.{n}", "missing")
                for n in (layer.ckpt_gate_proj_name, layer.ckpt_up_proj_name, layer.ckpt_down_proj_name)
            )
            if "missing" in (gate, up, down):
                raise PlanError(f"{base}: the checkpoint's moemix plan has no entry for this expert")
            if gate != up:
                raise PlanError(f"{base}: gate and up projections are fused and must share a spec")
            if gate is None or down is None:
                unquantized += 1
                continue
            specs[e] = (gate, down)
        if unquantized == layer.global_num_experts:
            return None
        if unquantized:
            raise PlanError(f"{prefix}: experts must be all quantized or all unquantized")
        return specs

    def get_quant_method(self, layer: torch.nn.Module, prefix: str) -> QuantizeMethodBase | None:
        if isinstance(layer, LinearBase):
            spec = self._linear_spec(prefix)
            return MoeMixLinearMethod(spec, prefix) if spec is not None else UnquantizedLinearMethod()
        if isinstance(layer, RoutedExperts):
            specs = self._expert_specs(layer, prefix)
            if specs is None:
                return UnquantizedFusedMoEMethod(layer.moe_config)
            return MoeMixMoEMethod(layer.moe_config, prefix, specs, stacked=self.stacked_experts)
        return None
