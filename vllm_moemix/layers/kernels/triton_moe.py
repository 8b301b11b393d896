"""Triton fused MoE for experts of mixed widths, and quantized linears (CUDA; tests run both on CPU tensors
under TRITON_INTERPRET=1).

Stage 1 runs gate/up for every (token, expert) pair, one launch per w13 width group; the expert's w13 bias
and the gated activation (SiLU or swigluoai); stage 2 runs down, one launch per w2 width group, scaled by the
router weight, plus the weighted w2 bias; pairs are summed per token. An expert
may sit in different width groups for w13 and w2: each stage sorts the pairs by its own groups. Weights
are never dequantized to memory (see triton_gemm.py).
"""

from __future__ import annotations

import importlib.util

import torch

from vllm_moemix.layers.kernels.base import ExpertsKernel, LinearKernel, gated_activation
from vllm_moemix.layers.layout import ExpertsLayout


def _run_stage(a, a_row, slot_of_pair, group_of_pair, out, qweights, scales, qzeros, bits, groups, mult=None):
    """One GEMM per width group over the pairs whose expert lives in that group."""
    from vllm_moemix.layers.kernels.triton_gemm import packed_pairs_gemm

    for g in range(len(qweights)):
        slots = torch.where(group_of_pair == g, slot_of_pair, -1)
        packed_pairs_gemm(a, a_row, slots, out, qweights[g], scales[g], qzeros[g], bits[g], groups[g], mult)


def _moe(x, topk_weights, local_ids, where13, where2, w13, w2, b13=None, b2=None, activation="silu") -> torch.Tensor:
    """Shared body: local_ids [T, k] with -1 for pairs that contribute nothing; where* [E, 2] (group, slot);
    b13 [E, 2I] / b2 [E, H] (or None) indexed by the same ids."""
    num_tokens, top_k = local_ids.shape
    ids = local_ids.reshape(-1).to(torch.int64)
    live = ids >= 0
    safe = torch.where(live, ids, 0)
    token_of_pair = torch.arange(num_tokens, device=x.device).repeat_interleave(top_k)
    pair_index = torch.arange(ids.numel(), device=x.device)
    inter2 = w13[0][0].shape[-1]
    gate_up = torch.zeros(ids.numel(), inter2, dtype=torch.float32, device=x.device)
    _run_stage(
        x,
        token_of_pair,
        torch.where(live, where13[safe, 1], -1),
        torch.where(live, where13[safe, 0], -1),
        gate_up,
        *w13,
    )
    if b13 is not None:  # rows of dead pairs never reach stage 2
        gate_up += b13.to(torch.float32)[safe]
    hidden = gated_activation(gate_up, activation).contiguous()
    down = torch.zeros(ids.numel(), x.shape[1], dtype=torch.float32, device=x.device)
    weights = torch.where(live, topk_weights.reshape(-1).to(torch.float32), 0.0).contiguous()
    _run_stage(
        hidden,
        pair_index,
        torch.where(live, where2[safe, 1], -1),
        torch.where(live, where2[safe, 0], -1),
        down,
        *w2,
        mult=weights,
    )
    if b2 is not None:  # weights are 0 for dead pairs
        down += weights[:, None] * b2.to(torch.float32)[safe]
    return torch.zeros(num_tokens, x.shape[1], dtype=torch.float32, device=x.device).index_add_(0, token_of_pair, down)


@torch.library.custom_op("moemix::triton_moe", mutates_args=())
def triton_moe(
    x: torch.Tensor,
    topk_weights: torch.Tensor,
    local_ids: torch.Tensor,
    w13_where: torch.Tensor,
    w2_where: torch.Tensor,
    w13_qweights: list[torch.Tensor],
    w13_scales: list[torch.Tensor],
    w13_qzeros: list[torch.Tensor],
    w13_bits: list[int],
    w13_groups: list[int],
    w2_qweights: list[torch.Tensor],
    w2_scales: list[torch.Tensor],
    w2_qzeros: list[torch.Tensor],
    w2_bits: list[int],
    w2_groups: list[int],
    w13_bias: torch.Tensor | None,
    w2_bias: torch.Tensor | None,
    activation: str,
) -> torch.Tensor:
    """Same contract as `moemix::dequant_moe`, opaque to torch.compile."""
    out = _moe(
        x,
        topk_weights,
        local_ids,
        w13_where,
        w2_where,
        (w13_qweights, w13_scales, w13_qzeros, w13_bits, w13_groups),
        (w2_qweights, w2_scales, w2_qzeros, w2_bits, w2_groups),
        w13_bias,
        w2_bias,
        activation,
    )
    return out.to(x.dtype)


@triton_moe.register_fake
def _(x, *layout_args):
    return torch.empty_like(x)


def moe_width_group(
    x,
    topk_weights,
    group_topk_ids,
    w13_qweight,
    w13_scales,
    w13_qzeros,
    w2_qweight,
    w2_scales,
    w2_qzeros,
    bits13,
    group13,
    bits2,
    group2,
    w13_bias=None,
    w2_bias=None,
    activation="silu",
) -> torch.Tensor:
    """Partial fp32 [T, H] output of the experts of one width group (w13 and w2 of the same experts).

    `group_topk_ids` [T, top_k] holds the slot within the group, or -1 (the pair contributes nothing):
    how the Marlin glue runs the experts Marlin cannot (2/3-bit). Biases (or None) are in slot order.
    """
    num = w13_qweight.shape[0]
    where = torch.stack([torch.zeros(num, dtype=torch.int64, device=x.device), torch.arange(num, device=x.device)], 1)
    return _moe(
        x,
        topk_weights,
        group_topk_ids,
        where,
        where,
        ([w13_qweight], [w13_scales], [w13_qzeros], [bits13], [group13]),
        ([w2_qweight], [w2_scales], [w2_qzeros], [bits2], [group2]),
        w13_bias,
        w2_bias,
        activation,
    )


@torch.library.custom_op("moemix::triton_linear", mutates_args=())
def triton_linear(
    x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, qzeros: torch.Tensor, bits: int, group_size: int
) -> torch.Tensor:
    """x [T, K] @ W: the pair GEMM with every token a pair of the one "expert"."""
    from vllm_moemix.layers.kernels.triton_gemm import packed_pairs_gemm

    tokens = torch.arange(x.shape[0], device=x.device)
    out = torch.empty(x.shape[0], qweight.shape[-1], dtype=torch.float32, device=x.device)
    zeros = qzeros[None] if qzeros.numel() else qzeros
    packed_pairs_gemm(
        x.contiguous(), tokens, torch.zeros_like(tokens), out, qweight[None], scales[None], zeros, bits, group_size
    )
    return out.to(x.dtype)


@triton_linear.register_fake
def _(x, qweight, scales, qzeros, bits, group_size):
    return x.new_empty(x.shape[0], qweight.shape[-1])


def _triton_on(device: torch.device) -> tuple[bool, str | None]:
    if importlib.util.find_spec("triton") is None:
        return False, "triton is not installed"
    if device.type == "cuda":
        return True, None
    return False, f"Triton kernels run on CUDA, not {device.type} (tests run them on CPU via TRITON_INTERPRET=1)"


class TritonLinearKernel(LinearKernel):
    @classmethod
    def can_run_on(cls, device: torch.device) -> tuple[bool, str | None]:
        return _triton_on(device)

    def apply(self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        zeros = getattr(layer, "qzeros", None)
        if zeros is None:
            zeros = x.new_empty(0, dtype=torch.uint8)
        flat = x.reshape(-1, x.shape[-1])
        out = torch.ops.moemix.triton_linear(
            flat, layer.qweight, layer.scales, zeros, self.config.spec.bits, self.config.spec.group_size
        )
        out = out.reshape(*x.shape[:-1], out.shape[-1])
        return out if bias is None else out + bias


class TritonExpertsKernel(ExpertsKernel):
    @classmethod
    def can_run_on(cls, device: torch.device) -> tuple[bool, str | None]:
        return _triton_on(device)

    def apply(self, layer, x, topk_weights, topk_ids):
        local_ids = ExpertsLayout.route(layer, topk_ids)
        return torch.ops.moemix.triton_moe(x, topk_weights, local_ids, *layer.moemix_layout.op_args(layer))
