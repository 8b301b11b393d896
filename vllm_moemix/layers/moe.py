"""vLLM fused-MoE method whose experts in one layer have different widths.

vLLM's stock loader maps `experts.{e}.w1.qweight` to the layer attribute
`w13_qweight` and calls its weight_loader with the global expert id. We
register zero-size placeholders under those names whose loader routes each
expert's tensors into per-width groups:

    w13 group i (one QuantSpec): qweight [E_i, H*bits/32, 2*I], scales/qzeros [E_i, H/g, 2*I]
    w2  group j (one QuantSpec): qweight [E_j, I*bits/32, H],   scales/qzeros [E_j, I/g, H]

`w13_where[e] = (group, slot)` locates local expert e (w2_where likewise), so
2-bit experts occupy 2 bits in memory next to 8-bit ones. Placeholders are
removed after loading.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import torch
from vllm.model_executor.layers.fused_moe import FusedMoEMethodBase
from vllm.model_executor.layers.fused_moe.activation import MoEActivation
from vllm.model_executor.utils import set_weight_attrs

from vllm_moemix import packing
from vllm_moemix.checkpoint.format import SUFFIXES, check_stored_tensor
from vllm_moemix.layers.kernels.base import ExpertsConfig, ExpertsKernel
from vllm_moemix.layers.kernels.select import choose_experts_kernel
from vllm_moemix.quant.tensors import SCALE_DTYPE
from vllm_moemix.spec import PlanError, QuantSpec

PROJECTIONS = ("w13", "w2")


@dataclass
class WidthGroups:
    """The experts of one projection (w13 or w2), grouped by QuantSpec."""

    proj: str
    specs: list[QuantSpec]
    members: list[list[int]]  # group -> local expert ids, in slot order
    where: dict[int, tuple[int, int]] = field(default_factory=dict)  # local expert -> (group, slot)

    @classmethod
    def build(cls, proj: str, specs_by_expert: list[QuantSpec]) -> WidthGroups:
        specs = sorted(set(specs_by_expert))
        members: list[list[int]] = [[] for _ in specs]
        where = {}
        for expert, spec in enumerate(specs_by_expert):
            g = specs.index(spec)
            where[expert] = (g, len(members[g]))
            members[g].append(expert)
        return cls(proj, specs, members, where)

    @property
    def bits(self) -> list[int]:
        return [s.bits for s in self.specs]

    def param_name(self, group: int, suffix: str) -> str:
        return f"{self.proj}_g{group}_{suffix}"

    def tensor_lists(self, layer: torch.nn.Module) -> tuple[list[torch.Tensor], ...]:
        return tuple([getattr(layer, self.param_name(g, s)) for g in range(len(self.specs))] for s in SUFFIXES)

    def where_tensor(self, num_experts: int) -> torch.Tensor:
        return torch.tensor([self.where[e] for e in range(num_experts)], dtype=torch.int64).reshape(num_experts, 2)


class MoeMixMoEMethod(FusedMoEMethodBase):
    def __init__(self, moe_config, prefix: str, specs_by_global: dict[int, tuple[QuantSpec, QuantSpec]]):
        super().__init__(moe_config)
        self.prefix = prefix
        self.specs_by_global = specs_by_global  # global expert -> (w13 spec, w2 spec)
        self.kernel: ExpertsKernel | None = None

    def get_fused_moe_quant_config(self, layer):
        return None  # our kernels do not go through vLLM's modular-kernel framework

    def create_weights(self, layer, num_experts, hidden_size, intermediate_size_per_partition, params_dtype,
                       **extra_weight_attrs):
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
        groups = {
            "w13": WidthGroups.build("w13", [s[0] for s in specs]),
            "w2": WidthGroups.build("w2", [s[1] for s in specs]),
        }
        shapes = {"w13": (hidden_size, 2 * inter), "w2": (inter, hidden_size)}  # (K, N)
        for proj, grp in groups.items():
            k, n = shapes[proj]
            for g, spec in enumerate(grp.specs):
                if k % spec.group_size:
                    raise PlanError(
                        f"{self.prefix}: {proj} input dimension per rank is {k}, which group_size "
                        f"{spec.group_size} does not divide; use a smaller group size or less tensor parallelism"
                    )
                e = len(grp.members[g])
                zeros_shape = (0,) if spec.sym else (e, k // spec.group_size, n)
                for suffix, shape, dtype in (
                    ("qweight", (e, packing.packed_rows(k, spec.bits), n), torch.int32),
                    ("scales", (e, k // spec.group_size, n), SCALE_DTYPE),
                    ("qzeros", zeros_shape, torch.uint8),
                ):
                    layer.register_parameter(
                        grp.param_name(g, suffix), torch.nn.Parameter(torch.zeros(shape, dtype=dtype), requires_grad=False)
                    )
        layer.moemix_groups = groups
        layer.register_buffer("w13_where", groups["w13"].where_tensor(num_experts), persistent=False)
        layer.register_buffer("w2_where", groups["w2"].where_tensor(num_experts), persistent=False)
        layer.register_buffer("moemix_no_map", torch.empty(0, dtype=torch.int32), persistent=False)
        layer.register_buffer("moemix_routed_tokens", torch.zeros(num_experts, dtype=torch.int64), persistent=False)
        layer.moemix_local_to_global = local_to_global
        layer.moemix_loaded = Counter()

        loader = self._make_loader(layer, inter, hidden_size)
        for proj in PROJECTIONS:
            for suffix in SUFFIXES:
                placeholder = torch.nn.Parameter(torch.empty(0), requires_grad=False)
                layer.register_parameter(f"{proj}_{suffix}", placeholder)
                set_weight_attrs(placeholder, {"weight_loader": loader})
        self.experts_config = ExpertsConfig(
            w13_specs=tuple(s[0] for s in specs), w2_specs=tuple(s[1] for s in specs),
            hidden_size=hidden_size, intermediate_size=inter, act_dtype=params_dtype,
        )

    def _make_loader(self, layer, inter: int, hidden: int):
        tp_rank = self.moe.tp_rank
        full = {"w13": (hidden, inter * self.moe.tp_size), "w2": (inter * self.moe.tp_size, hidden)}  # (K, N)

        def load(param, loaded_weight, weight_name, shard_id, expert_id, return_success=False):
            local = layer._map_global_expert_id_to_local_expert_id(expert_id)
            if local == -1:
                return False if return_success else None
            proj, suffix = weight_name.rsplit(".", 1)[-1].split("_", 1)
            grp = layer.moemix_groups[proj]
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
                grp = layer.moemix_groups[proj]
                spec = grp.specs[grp.where[local][0]]
                for shard in shards:
                    for suffix in SUFFIXES[:2] if spec.sym else SUFFIXES:
                        times = layer.moemix_loaded[(shard, suffix, local)]
                        if times != 1:
                            problems.append(f"local expert {local} {shard}.{suffix}"
                                            + ("" if times == 0 else f" (loaded {times} times)"))
        if problems:
            missing = [p for p in problems if "times)" not in p]
            kind = "is missing tensors" if len(missing) == len(problems) else "has missing or duplicate tensors"
            raise PlanError(f"{self.prefix}: moemix checkpoint {kind}: " + ", ".join(problems[:8])
                            + (f" and {len(problems) - 8} more" if len(problems) > 8 else ""))
        for proj in PROJECTIONS:
            for suffix in SUFFIXES:
                delattr(layer, f"{proj}_{suffix}")
        del layer.moemix_loaded
        kernel_cls = choose_experts_kernel(self.experts_config, layer.w13_where.device)
        self.kernel = kernel_cls(self.experts_config)
        self.kernel.process_weights_after_loading(layer)
        layer.moemix_kernel = self.kernel.describe()

    def apply(self, layer, x, topk_weights, topk_ids, shared_experts, shared_experts_input):
        return self.kernel.apply(layer, x, topk_weights, topk_ids)
