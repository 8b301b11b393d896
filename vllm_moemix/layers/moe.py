"""vLLM fused-MoE method whose experts in one layer have different widths.

vLLM's stock loader maps `experts.{e}.w1.qweight` to the layer attribute `w13_qweight` and calls its
weight_loader with the global expert id. We register zero-size placeholders under those names whose loader
routes each expert's tensors into the per-width groups of an `ExpertsLayout` (layout.py), so 2-bit experts
occupy 2 bits in memory next to 8-bit ones. Placeholders are removed after loading.

Models whose vLLM loader reads only stacked 3-D expert tensors (GPT-OSS) never call that loader with our
per-expert names: for them (`stacked=True`) the config's checkpoint mapper renames each expert tensor to
`routed_experts.moemix_<e>_<proj>_<suffix>`, and we register one placeholder per local expert tensor under that
name. Their expert biases load through vLLM's own path (`w13_bias`, gate/up interleaved; `w2_bias`) and are
de-interleaved once after loading.
"""

from __future__ import annotations

from collections import Counter

import torch
from vllm.model_executor.layers.fused_moe import FusedMoEMethodBase
from vllm.model_executor.layers.fused_moe.activation import MoEActivation
from vllm.model_executor.utils import set_weight_attrs

from vllm_moemix.checkpoint.format import SUFFIXES, check_stored_tensor
from vllm_moemix.config.spec import PlanError, QuantSpec
from vllm_moemix.layers.kernels.base import ExpertsKernel
from vllm_moemix.layers.kernels.select import choose_experts_kernel
from vllm_moemix.layers.layout import PROJECTIONS, ExpertsLayout

ACTIVATIONS = {MoEActivation.SILU: "silu", MoEActivation.SWIGLUOAI: "swigluoai"}  # vLLM's -> the kernels' names


def stacked_tensor_name(expert: int | str, checkpoint_proj: str, suffix: str) -> str:
    """Where an expert tensor of a stacked-expert model is registered under its `RoutedExperts` module."""
    return f"moemix_{expert}_{checkpoint_proj}_{suffix}"


class MoeMixMoEMethod(FusedMoEMethodBase):
    def __init__(
        self,
        moe_config,
        prefix: str,
        specs_by_global: dict[int, tuple[QuantSpec, QuantSpec]],
        stacked: bool = False,
    ):
        super().__init__(moe_config)
        self.prefix = prefix
        self.specs_by_global = specs_by_global  # global expert -> (w13 spec, w2 spec)
        self.stacked = stacked
        self.kernel: ExpertsKernel | None = None

    def get_fused_moe_quant_config(self, layer):
        return None  # our kernels do not go through vLLM's modular-kernel framework

    def create_weights(
        self, layer, num_experts, hidden_size, intermediate_size_per_partition, params_dtype, **extra_weight_attrs
    ):
        activation = ACTIVATIONS.get(layer.activation)
        if activation is None or not self.moe.is_act_and_mul:
            supported = ", ".join(a.value for a in ACTIVATIONS)
            raise PlanError(f"{self.prefix}: moemix experts support gated {supported} MLPs, not {layer.activation}")
        has_bias = self.moe.has_bias
        if has_bias and not self.stacked:
            raise PlanError(f"{self.prefix}: moemix reads expert biases only from stacked-expert (GPT-OSS) checkpoints")
        if layer.apply_router_weight_on_input:
            raise PlanError(f"{self.prefix}: apply_router_weight_on_input is not supported by moemix")
        inter = intermediate_size_per_partition
        local_to_global = list(range(num_experts))
        if layer._expert_map is not None:
            for global_id, local_id in enumerate(layer._expert_map.tolist()):
                if local_id >= 0:
                    local_to_global[local_id] = global_id
        specs = [self.specs_by_global[g] for g in local_to_global]
        layout = ExpertsLayout.build(
            [s[0] for s in specs], [s[1] for s in specs], hidden_size, inter, activation=activation, has_bias=has_bias
        )
        layout.register(layer, self.prefix)
        layer.moemix_local_to_global = local_to_global
        layer.moemix_loaded = Counter()

        loader = self._make_loader(layer, inter, hidden_size)
        self.placeholders = self._stacked_placeholders(layer, loader) if self.stacked else self._stock_placeholders()
        for name, placeholder_loader in self.placeholders.items():
            placeholder = torch.nn.Parameter(torch.empty(0), requires_grad=False)
            layer.register_parameter(name, placeholder)
            set_weight_attrs(placeholder, {"weight_loader": placeholder_loader or loader})
        if has_bias:  # filled by the model's own loader; NaN until then, so a missing bias is noticed
            for name, shape in (("w13_bias", (num_experts, 2 * inter)), ("w2_bias", (num_experts, hidden_size))):
                layer.register_parameter(
                    name, torch.nn.Parameter(torch.full(shape, float("nan"), dtype=params_dtype), requires_grad=False)
                )
        self.experts_config = layout.kernel_config(params_dtype)

    @staticmethod
    def _stock_placeholders() -> dict[str, None]:
        """Where vLLM's expert mapping sends `experts.{e}.w1.qweight` & co (None: the shared loader)."""
        return {f"{proj}_{suffix}": None for proj in PROJECTIONS for suffix in SUFFIXES}

    @staticmethod
    def _stacked_placeholders(layer, loader) -> dict:
        """One placeholder per local expert tensor, whose loader knows which tensor it is."""
        shards = (
            (layer.ckpt_gate_proj_name, "w13", "w1"),
            (layer.ckpt_up_proj_name, "w13", "w3"),
            (layer.ckpt_down_proj_name, "w2", "w2"),
        )
        placeholders = {}
        for global_id in layer.moemix_local_to_global:
            for checkpoint_proj, proj, shard in shards:
                for suffix in SUFFIXES:

                    def load(param, loaded_weight, proj=proj, shard=shard, suffix=suffix, global_id=global_id):
                        return loader(param, loaded_weight, f"{proj}_{suffix}", shard, global_id)

                    placeholders[stacked_tensor_name(global_id, checkpoint_proj, suffix)] = load
        return placeholders

    def _make_loader(self, layer, inter: int, hidden: int):
        tp_rank = self.moe.tp_rank
        full = {"w13": (hidden, inter * self.moe.tp_size), "w2": (inter * self.moe.tp_size, hidden)}  # (K, N)

        def load(param, loaded_weight, weight_name, shard_id, expert_id, return_success=False):
            local = layer._map_global_expert_id_to_local_expert_id(expert_id)
            if local == -1:
                return False if return_success else None
            proj, suffix = weight_name.rsplit(".", 1)[-1].split("_", 1)
            grp = layer.moemix_layout.groups()[proj]
            g, slot = grp.where[local]
            spec = grp.specs[g]
            target = getattr(layer, grp.param_name(g, suffix))
            where = f"{self.prefix}.{expert_id}.{shard_id}"
            if target.numel() == 0:
                raise PlanError(f"{where}: checkpoint has zero points but the plan says symmetric")
            check_stored_tensor(where, suffix, loaded_weight, spec, *full[proj])  # before any narrow or copy
            target = target[slot]
            if proj == "w13":  # column parallel: this rank's slice of N, first half w1 (gate), second w3 (up)
                loaded = loaded_weight.narrow(1, tp_rank * inter, inter)
                half = 0 if shard_id == "w1" else 1
                target = target[:, half * inter : (half + 1) * inter]
            else:  # row parallel: this rank's slice of K (whole packed words: K per rank is a multiple of 32)
                rows = target.shape[0]
                loaded = loaded_weight.narrow(0, tp_rank * rows, rows)
            target.copy_(loaded)
            layer.moemix_loaded[(proj if proj == "w2" else shard_id, suffix, local)] += 1
            return True if return_success else None

        return load

    def process_weights_after_loading(self, layer) -> None:
        problems = []
        for local in range(layer.local_num_experts):
            for proj, shards in (("w13", ("w1", "w3")), ("w2", ("w2",))):
                spec = layer.moemix_layout.groups()[proj].spec_of(local)
                for shard in shards:
                    for suffix in SUFFIXES[:2] if spec.sym else SUFFIXES:
                        times = layer.moemix_loaded[(shard, suffix, local)]
                        if times != 1:
                            problems.append(
                                f"local expert {local} {shard}.{suffix}"
                                + ("" if times == 0 else f" (loaded {times} times)")
                            )
        if problems:
            missing = [p for p in problems if "times)" not in p]
            kind = "is missing tensors" if len(missing) == len(problems) else "has missing or duplicate tensors"
            raise PlanError(
                f"{self.prefix}: moemix checkpoint {kind}: "
                + ", ".join(problems[:8])
                + (f" and {len(problems) - 8} more" if len(problems) > 8 else "")
            )
        for name in self.placeholders:
            delattr(layer, name)
        del layer.moemix_loaded, self.placeholders
        if self.moe.has_bias:
            self._take_biases(layer)
        kernel_cls = choose_experts_kernel(self.experts_config, layer.w13_where.device)
        self.kernel = kernel_cls(self.experts_config)
        self.kernel.process_weights_after_loading(layer)
        layer.moemix_kernel = self.kernel.describe()

    def _take_biases(self, layer) -> None:
        """vLLM's loader filled `w13_bias` (gate/up interleaved, this rank's slice) and `w2_bias` (zero on
        tensor-parallel ranks > 0); the kernels read gate half then up half, float32."""
        w13, w2 = layer.w13_bias.data, layer.w2_bias.data
        if w13.isnan().any() or w2.isnan().any():
            missing = [n for n, t in (("w13_bias", w13), ("w2_bias", w2)) if t.isnan().any()]
            raise PlanError(f"{self.prefix}: moemix checkpoint is missing expert biases ({', '.join(missing)})")
        layer.moemix_w13_bias.copy_(torch.cat([w13[:, 0::2], w13[:, 1::2]], dim=1))
        layer.moemix_w2_bias.copy_(w2)
        del layer.w13_bias, layer.w2_bias

    def apply(self, layer, x, topk_weights, topk_ids, shared_experts, shared_experts_input):
        return self.kernel.apply(layer, x, topk_weights, topk_ids)
