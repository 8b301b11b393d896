"""CUDA: 4/8-bit experts through vLLM's Marlin MoE, the rest through our Triton kernel.

`fused_marlin_moe` runs gate/up and down of one expert set with one scalar type, so experts are
partitioned by their (w13 spec, w2 spec) pair rather than by width group: a pair Marlin can run
(both 4-bit, or both symmetric 8-bit, supported group and shapes) becomes a Marlin partition, repacked
at load with vLLM's own `gptq_marlin_moe_repack` / `marlin_moe_permute_scales` / `marlin_zero_points`;
every other pair is a Triton partition (`triton_moe.moe_width_group`). The per-width groups the loader
filled are replaced by the partitions (same bytes: Marlin repacking does not widen), so memory stays
what the plan says. Each partition sees this rank's local expert ids through its own expert map (-1: not
in this partition; one sentinel entry past the local experts stands for "another rank's expert") and the
partial outputs are summed.

Expert biases and GPT-OSS's swigluoai go through `fused_marlin_moe` too: it takes per-expert `bias1`/`bias2`
(permuted with vLLM's `marlin_permute_bias`, in the activation dtype, as its MXFP4 GPT-OSS path does) and
`MoEActivation.SWIGLUOAI_UNINTERLEAVE` (swigluoai on gate/up halves, our layout) with alpha 1.702, limit 7 and
beta 1 (the `+1` on the linear half) in its `ApplyMoEActivationConfig`. Triton partitions take them as well.

Only the shape and partition logic runs on this project's CI (no GPU); see tests/layers/test_marlin_glue.py.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vllm_moemix.config.spec import QuantSpec
from vllm_moemix.layers.kernels.base import SWIGLUOAI_ALPHA, SWIGLUOAI_LIMIT, ExpertsConfig, ExpertsKernel
from vllm_moemix.layers.layout import ExpertsLayout

MARLIN_GROUP_SIZES = (32, 64, 128)
MIN_CAPABILITY = (8, 0)


def marlin_pair_reason(w13: QuantSpec, w2: QuantSpec, hidden: int, inter: int) -> str | None:
    """Why Marlin cannot run an expert with these specs (None: it can)."""
    if w13.bits != w2.bits or w13.sym != w2.sym:
        return f"w13 {w13.bits}-bit{'' if w13.sym else ' asym'} and w2 {w2.bits}-bit differ (one Marlin type per call)"
    if w13.bits not in (4, 8):
        return f"{w13.bits}-bit: Marlin runs 4 and 8 bits"
    if w13.bits == 8 and not w13.sym:
        return "8-bit with zero points: Marlin has uint8b128 (symmetric) only"
    for spec in (w13, w2):
        if spec.group_size not in MARLIN_GROUP_SIZES:
            return f"group size {spec.group_size} not in {MARLIN_GROUP_SIZES}"
    if hidden % 128 or inter % max(64, w13.group_size, w2.group_size):
        return f"hidden {hidden} must be a multiple of 128 and intermediate {inter} of max(64, group size)"
    return None


def scalar_type(spec: QuantSpec):
    from vllm.scalar_type import scalar_types

    if spec.bits == 4:
        return scalar_types.uint4b8 if spec.sym else scalar_types.uint4
    return scalar_types.uint8b128


@dataclass
class Partition:
    """Local experts sharing one (w13, w2) spec pair, in slot order, and whether Marlin runs them."""

    w13: QuantSpec
    w2: QuantSpec
    experts: list[int]
    marlin: bool


def partition_experts(config: ExpertsConfig) -> list[Partition]:
    parts: dict[tuple[QuantSpec, QuantSpec], Partition] = {}
    for expert, pair in enumerate(zip(config.w13_specs, config.w2_specs)):
        if pair not in parts:
            ok = marlin_pair_reason(*pair, config.hidden_size, config.intermediate_size) is None
            parts[pair] = Partition(pair[0], pair[1], [], ok)
        parts[pair].experts.append(expert)
    return list(parts.values())


def partition_expert_map(part: Partition, num_local: int) -> torch.Tensor:
    """Local expert id -> slot in this partition, -1 where the expert is elsewhere (int32, num_local + 1 long:
    the last entry is the sentinel that ids of other ranks' experts are sent to)."""
    slot_of_local = torch.full((num_local + 1,), -1, dtype=torch.int32)
    slot_of_local[torch.tensor(part.experts)] = torch.arange(len(part.experts), dtype=torch.int32)
    return slot_of_local


def gather(layer: torch.nn.Module, proj: str, experts: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Stack the qweight/scales/qzeros of `experts` out of the layer's width groups."""
    grp = layer.moemix_layout.groups()[proj]
    where = [grp.where[e] for e in experts]
    out = []
    for suffix in ("qweight", "scales", "qzeros"):
        tensors = [getattr(layer, grp.param_name(g, suffix)) for g, _ in where]
        out.append(torch.stack([t[s] for t, (_, s) in zip(tensors, where)]) if tensors[0].numel() else tensors[0])
    return tuple(out)


def to_marlin(
    qweight: torch.Tensor, scales: torch.Tensor, qzeros: torch.Tensor, spec: QuantSpec, act_dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """vLLM's own repacking: qweight [E, K*b/32, N] is GPTQ's layout already; scales/zeros [E, K/g, N]."""
    from vllm import _custom_ops as ops
    from vllm.model_executor.layers.quantization.utils.marlin_utils import (
        marlin_moe_permute_scales,
        marlin_zero_points,
    )

    k = qweight.shape[1] * 32 // spec.bits
    n = qweight.shape[2]
    marlin_q = ops.gptq_marlin_moe_repack(qweight, k, n, spec.bits)
    marlin_s = marlin_moe_permute_scales(scales.to(act_dtype), k, n, spec.group_size)
    marlin_z = None
    if qzeros.numel():
        marlin_z = torch.stack(
            [marlin_zero_points(z.to(torch.int32), k // spec.group_size, n, spec.bits) for z in qzeros]
        )
    return marlin_q, marlin_s, marlin_z


def to_marlin_bias(bias: torch.Tensor, act_dtype: torch.dtype) -> torch.Tensor:
    """[E, N] float32 biases -> Marlin's per-expert column order in the activation dtype."""
    from vllm.model_executor.layers.quantization.utils.marlin_utils import marlin_permute_bias

    return torch.stack([marlin_permute_bias(b.to(act_dtype)) for b in bias])


def marlin_activation(activation: str) -> dict:
    """fused_marlin_moe's activation arguments for one of EXPERT_ACTIVATIONS (gate/up stored as halves)."""
    from vllm.model_executor.layers.fused_moe.activation import ApplyMoEActivationConfig, MoEActivation

    if activation == "silu":
        return {"activation": MoEActivation.SILU}
    if activation == "swigluoai":
        return {
            "activation": MoEActivation.SWIGLUOAI_UNINTERLEAVE,
            "activation_config": ApplyMoEActivationConfig(clamp_limit=SWIGLUOAI_LIMIT, alpha=SWIGLUOAI_ALPHA, beta=1.0),
        }
    raise ValueError(f"expert activation {activation!r} has no Marlin equivalent")


@torch.library.custom_op("moemix::marlin_moe", mutates_args=())
def marlin_moe(
    x: torch.Tensor,
    topk_weights: torch.Tensor,
    local_ids: torch.Tensor,
    maps: list[torch.Tensor],
    tensors: list[torch.Tensor],
    kinds: list[int],
    specs: list[int],
    activation: str,
) -> torch.Tensor:
    """Sum of the partitions' outputs. Per partition p: maps[p] (global -> slot), eight tensors
    (w13 q/s/z, w2 q/s/z, w13 bias, w2 bias; empty z when symmetric, empty biases without), kinds[p]
    (scalar type id, or -1 for Triton) and specs[4p:4p+4] = (w13 bits, w13 group, w2 bits, w2 group);
    `activation` is one of EXPERT_ACTIVATIONS."""
    from vllm.model_executor.layers.fused_moe.experts.marlin_moe import fused_marlin_moe

    from vllm_moemix.layers.kernels.triton_moe import moe_width_group

    ids = torch.where(local_ids < 0, maps[0].numel() - 1, local_ids)  # other ranks' experts -> the sentinel
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    for p, (emap, kind) in enumerate(zip(maps, kinds)):
        q13, s13, z13, q2, s2, z2, b13, b2 = tensors[8 * p : 8 * p + 8]
        b13, b2 = (b13, b2) if b13.numel() else (None, None)
        bits13, group13, bits2, group2 = specs[4 * p : 4 * p + 4]
        if kind >= 0:
            out += fused_marlin_moe(
                x,
                q13,
                q2,
                b13,
                b2,
                s13,
                s2,
                topk_weights,
                ids,
                quant_type_id=kind,
                global_num_experts=emap.numel(),
                expert_map=emap,
                w1_zeros=z13 if z13.numel() else None,
                w2_zeros=z2 if z2.numel() else None,
                **marlin_activation(activation),
            ).float()
        else:
            out += moe_width_group(
                x,
                topk_weights,
                emap[ids],
                q13,
                s13,
                z13,
                q2,
                s2,
                z2,
                bits13,
                group13,
                bits2,
                group2,
                b13,
                b2,
                activation,
            )
    return out.to(x.dtype)


@marlin_moe.register_fake
def _(x, topk_weights, local_ids, maps, tensors, kinds, specs, activation):
    return torch.empty_like(x)


class MarlinExpertsKernel(ExpertsKernel):
    @classmethod
    def can_run_on(cls, device: torch.device) -> tuple[bool, str | None]:
        if device.type != "cuda":
            return False, f"Marlin runs on CUDA, not {device.type}"
        if torch.cuda.get_device_capability(device) < MIN_CAPABILITY:
            return False, f"Marlin needs compute capability >= {MIN_CAPABILITY}"
        return True, None

    @classmethod
    def supports(cls, config: ExpertsConfig) -> tuple[bool, str | None]:
        parts = partition_experts(config)
        if not any(p.marlin for p in parts):
            reasons = {marlin_pair_reason(p.w13, p.w2, config.hidden_size, config.intermediate_size) for p in parts}
            return False, "no expert Marlin can run: " + "; ".join(sorted(reasons))
        return True, None

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        num_local = len(self.config.w13_specs)
        self.partitions = partition_experts(self.config)
        maps, tensors, kinds, specs = [], [], [], []
        for part in self.partitions:
            w13, w2 = gather(layer, "w13", part.experts), gather(layer, "w2", part.experts)
            empty = torch.empty(0, dtype=torch.int32, device=w13[0].device)
            biases = (empty, empty)
            if self.config.has_bias:
                biases = (layer.moemix_w13_bias[part.experts], layer.moemix_w2_bias[part.experts])
            if part.marlin:
                w13 = to_marlin(*w13, part.w13, self.config.act_dtype)
                w2 = to_marlin(*w2, part.w2, self.config.act_dtype)
                if self.config.has_bias:
                    biases = tuple(to_marlin_bias(b, self.config.act_dtype) for b in biases)
                kinds.append(scalar_type(part.w13).id)
            else:
                kinds.append(-1)
            tensors += [t if t is not None else empty for t in (*w13, *w2, *biases)]
            maps.append(partition_expert_map(part, num_local).to(w13[0].device))
            specs += [part.w13.bits, part.w13.group_size, part.w2.bits, part.w2.group_size]
        for name in layer.moemix_layout.parameter_names():  # the partitions hold them now
            delattr(layer, name)
        for i, t in enumerate(tensors):
            layer.register_buffer(f"moemix_part_{i}", t, persistent=False)
        self.maps, self.kinds, self.specs, self.num_tensors = maps, kinds, specs, len(tensors)

    def apply(self, layer, x, topk_weights, topk_ids):
        local_ids = ExpertsLayout.route(layer, topk_ids)
        tensors = [getattr(layer, f"moemix_part_{i}") for i in range(self.num_tensors)]
        return torch.ops.moemix.marlin_moe(
            x, topk_weights, local_ids, self.maps, tensors, self.kinds, self.specs, self.config.activation
        )
