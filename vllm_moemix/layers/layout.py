"""Where the packed weights of a fused-MoE layer's experts live, one place for the method, tests and benchmarks.

Experts of one projection are grouped by QuantSpec so 2-bit experts occupy 2 bits next to 8-bit ones:

    w13 group i (one QuantSpec): qweight [E_i, H*bits/32, 2*I], scales/qzeros [E_i, H/g, 2*I]
    w2  group j (one QuantSpec): qweight [E_j, I*bits/32, H],   scales/qzeros [E_j, I/g, H]

`w13_where[e] = (group, slot)` locates local expert e (w2_where likewise; an expert may sit in different
groups for w13 and w2). With biases (GPT-OSS), `moemix_w13_bias` [E, 2*I] (gate half, then up half) and
`moemix_w2_bias` [E, H], float32, are indexed by local expert id. The layout also routes: it maps the
router's global expert ids to this rank's local ones once and counts the routed tokens per expert (the
serving-time usage profile), so kernels only compute.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from vllm_moemix.checkpoint.format import SUFFIXES
from vllm_moemix.config.spec import QuantSpec
from vllm_moemix.layers.kernels.base import EXPERT_ACTIVATIONS, ExpertsConfig
from vllm_moemix.quant import packing
from vllm_moemix.quant.tensors import SCALE_DTYPE

PROJECTIONS = ("w13", "w2")
TP_HINT = " on this rank; use a smaller group size or less tensor parallelism"


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

    @property
    def group_sizes(self) -> list[int]:
        return [s.group_size for s in self.specs]

    def spec_of(self, expert: int) -> QuantSpec:
        return self.specs[self.where[expert][0]]

    def param_name(self, group: int, suffix: str) -> str:
        return f"{self.proj}_g{group}_{suffix}"

    def tensor_lists(self, layer: torch.nn.Module) -> tuple[list[torch.Tensor], ...]:
        return tuple([getattr(layer, self.param_name(g, s)) for g in range(len(self.specs))] for s in SUFFIXES)

    def where_tensor(self) -> torch.Tensor:
        num_experts = len(self.where)
        return torch.tensor([self.where[e] for e in range(num_experts)], dtype=torch.int64).reshape(num_experts, 2)


@dataclass
class ExpertsLayout:
    """The local experts of one fused-MoE layer on this rank: (K, N) per projection and the width groups."""

    w13: WidthGroups
    w2: WidthGroups
    hidden_size: int
    intermediate_size: int  # per partition
    activation: str = "silu"  # one of kernels.base.EXPERT_ACTIVATIONS
    has_bias: bool = False

    @classmethod
    def build(
        cls,
        w13_specs: list[QuantSpec],
        w2_specs: list[QuantSpec],
        hidden_size: int,
        intermediate_size: int,
        activation: str = "silu",
        has_bias: bool = False,
    ) -> ExpertsLayout:
        if activation not in EXPERT_ACTIVATIONS:
            raise ValueError(f"expert activation {activation!r} is not one of {EXPERT_ACTIVATIONS}")
        return cls(
            WidthGroups.build("w13", list(w13_specs)),
            WidthGroups.build("w2", list(w2_specs)),
            hidden_size,
            intermediate_size,
            activation,
            has_bias,
        )

    @property
    def num_experts(self) -> int:
        return len(self.w13.where)

    def kernel_config(self, act_dtype: torch.dtype) -> ExpertsConfig:
        return ExpertsConfig(
            tuple(map(self.w13.spec_of, range(self.num_experts))),
            tuple(map(self.w2.spec_of, range(self.num_experts))),
            self.hidden_size,
            self.intermediate_size,
            act_dtype,
            self.activation,
            self.has_bias,
        )

    def groups(self) -> dict[str, WidthGroups]:
        return {"w13": self.w13, "w2": self.w2}

    def shape(self, proj: str) -> tuple[int, int]:
        """(K, N) of one expert's projection on this rank: gate and up are fused along N."""
        if proj == "w13":
            return self.hidden_size, 2 * self.intermediate_size
        return self.intermediate_size, self.hidden_size

    def register(self, layer: torch.nn.Module, where: str = "experts") -> None:
        """Zero parameters for every width group (and the float32 expert biases when the layout has them), the
        where-maps and the routing counter, on `layer`."""
        for proj, grp in self.groups().items():
            k, n = self.shape(proj)
            for g, spec in enumerate(grp.specs):
                spec.check_input_dim(k, f"{where} {proj}", TP_HINT)
                e = len(grp.members[g])
                shapes = {
                    "qweight": ((e, packing.packed_rows(k, spec.bits), n), torch.int32),
                    "scales": ((e, k // spec.group_size, n), SCALE_DTYPE),
                    "qzeros": ((0,) if spec.sym else (e, k // spec.group_size, n), torch.uint8),
                }
                for suffix, (shape, dtype) in shapes.items():
                    layer.register_parameter(
                        grp.param_name(g, suffix),
                        torch.nn.Parameter(torch.zeros(shape, dtype=dtype), requires_grad=False),
                    )
        if self.has_bias:
            for name, width in (("moemix_w13_bias", 2 * self.intermediate_size), ("moemix_w2_bias", self.hidden_size)):
                zeros = torch.zeros(self.num_experts, width, dtype=torch.float32)
                layer.register_parameter(name, torch.nn.Parameter(zeros, requires_grad=False))
        layer.register_buffer("w13_where", self.w13.where_tensor(), persistent=False)
        layer.register_buffer("w2_where", self.w2.where_tensor(), persistent=False)
        # Slot e counts local expert e, the last slot pairs routed to other expert-parallel ranks (id -1 indexes
        # it): one scatter per call, no mask, no shifted copy of the ids -- each eager op costs microseconds a
        # layer at decode.
        layer.register_buffer(
            "moemix_routed_pairs", torch.zeros(self.num_experts + 1, dtype=torch.int64), persistent=False
        )
        layer.register_buffer("moemix_one", torch.ones((), dtype=torch.int64), persistent=False)
        layer.moemix_layout = self

    def put(
        self,
        layer: torch.nn.Module,
        proj: str,
        expert: int,
        qweight: torch.Tensor,
        scales: torch.Tensor,
        qzeros: torch.Tensor | None,
    ) -> None:
        """One expert's stored tensors (checkpoint layout, this rank's slice) into its slot."""
        grp = self.groups()[proj]
        g, slot = grp.where[expert]
        for suffix, tensor in zip(SUFFIXES, (qweight, scales, qzeros)):
            if tensor is not None:
                getattr(layer, grp.param_name(g, suffix))[slot].copy_(tensor)

    def parameter_names(self) -> list[str]:
        """Every parameter `register` made: the width groups' tensors, then the expert biases (if any)."""
        groups = [(grp, g) for grp in self.groups().values() for g in range(len(grp.specs))]
        names = [grp.param_name(g, suffix) for grp, g in groups for suffix in SUFFIXES]
        return names + (["moemix_w13_bias", "moemix_w2_bias"] if self.has_bias else [])

    def op_args(self, layer: torch.nn.Module) -> tuple:
        """What every fused-MoE op takes after its routing arguments, in its schema's order: the where-maps,
        each projection's width groups, then the expert biases (None without) and the activation name."""
        return (
            layer.w13_where,
            layer.w2_where,
            *self.w13.tensor_lists(layer),
            self.w13.bits,
            self.w13.group_sizes,
            *self.w2.tensor_lists(layer),
            self.w2.bits,
            self.w2.group_sizes,
            layer.moemix_w13_bias if self.has_bias else None,
            layer.moemix_w2_bias if self.has_bias else None,
            self.activation,
        )

    @staticmethod
    def route(layer: torch.nn.Module, topk_ids: torch.Tensor) -> torch.Tensor:
        """The router's ids as this rank's local expert ids (-1: another rank's), counted for the usage profile."""
        expert_map = getattr(layer, "expert_map", None)
        local_ids = topk_ids if expert_map is None else expert_map[topk_ids]
        layer.moemix_routed_pairs.index_put_((local_ids.reshape(-1),), layer.moemix_one, accumulate=True)
        return local_ids


def routed_tokens(layer: torch.nn.Module) -> torch.Tensor:
    """Tokens routed to each local expert since the last reset (a view: zero it to reset)."""
    return layer.moemix_routed_pairs[:-1]
