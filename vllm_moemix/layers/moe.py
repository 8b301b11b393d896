"""vLLM fused-MoE method whose experts in one layer have different widths.

vLLM's stock loader maps `experts.{e}.w1.qweight` to the layer attribute `w13_qweight` and calls its
weight_loader with the global expert id. We register zero-size placeholders under those names whose loader
routes each expert's tensors into the per-width groups of an `ExpertsLayout` (layout.py), so 2-bit experts
occupy 2 bits in memory next to 8-bit ones. Placeholders are removed after loading.
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


class MoeMixMoEMethod(FusedMoEMethodBase):
    def __init__(self, moe_config, prefix: str, specs_by_global: dict[int, tuple[QuantSpec, QuantSpec]]):
        super().__init__(moe_config)
        self.prefix = prefix
        self.specs_by_global = specs_by_global  # global expert -> (w13 spec, w2 spec)
        self.kernel: ExpertsKernel | None = None

    def get_fused_moe_quant_config(self, layer):
        return None  # our kernels do not go through vLLM's modular-kernel framework

    def create_weights(
        self, layer, num_experts, hidden_size, intermediate_size_per_partition, params_dtype, **extra_weight_attrs
    ):
        if layer.activation != MoEActivation.SILU or not self.moe.is_act_and_mul:
            raise PlanError(f"{self.prefix}: moemix experts support gated SiLU MLPs, not {layer.activation}")
        if layer.apply_router_weight_on_input:
            raise PlanError(f"{self.prefix}: apply_router_weight_on_input is not supported by moemix")
        inter = intermediate_size_per_partition
        local_to_global = list(range(num_experts))
        if layer._expert_map is not None:
            for global_id, local_id in enumerate(layer._expert_map.tolist()):
                if local_id >= 0:
                    local_to_global[local_id] = global_id
        specs = [self.specs_by_global[g] for g in local_to_global]
        layout = ExpertsLayout.build([s[0] for s in specs], [s[1] for s in specs], hidden_size, inter)
        layout.register(layer, self.prefix)
        layer.moemix_local_to_global = local_to_global
        layer.moemix_loaded = Counter()

        loader = self._make_loader(layer, inter, hidden_size)
        for proj in PROJECTIONS:
            for suffix in SUFFIXES:
                placeholder = torch.nn.Parameter(torch.empty(0), requires_grad=False)
                layer.register_parameter(f"{proj}_{suffix}", placeholder)
                set_weight_attrs(placeholder, {"weight_loader": loader})
        self.experts_config = layout.kernel_config(params_dtype)

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
        for proj in PROJECTIONS:
            for suffix in SUFFIXES:
                delattr(layer, f"{proj}_{suffix}")
        del layer.moemix_loaded
        kernel_cls = choose_experts_kernel(self.experts_config, layer.w13_where.device)
        self.kernel = kernel_cls(self.experts_config)
        self.kernel.process_weights_after_loading(layer)
        layer.moemix_kernel = self.kernel.describe()

    def apply(self, layer, x, topk_weights, topk_ids, shared_experts, shared_experts_input):
        return self.kernel.apply(layer, x, topk_weights, ExpertsLayout.route(layer, topk_ids))
