"""Portable kernels: dequantize the packed weights on the fly, then matmul.

They run on any device torch runs on and are the numerical reference the
faster kernels are tested against. Weights stay packed in memory; only the
experts a batch actually routes to are dequantized, one at a time.
"""

from __future__ import annotations

import torch

from vllm_moemix.layers.kernels.base import ExpertsKernel, LinearKernel, gated_activation
from vllm_moemix.layers.layout import ExpertsLayout
from vllm_moemix.quant.tensors import dequantize_kn


class DequantLinearKernel(LinearKernel):
    """Runs everywhere, everything (the base class answers yes to both questions)."""

    def apply(self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        w = dequantize_kn(layer.qweight, layer.scales, getattr(layer, "qzeros", None), self.config.spec.bits, x.dtype)
        out = x @ w
        return out if bias is None else out + bias


def _expert_weight(
    qweights: list[torch.Tensor],
    scales: list[torch.Tensor],
    qzeros: list[torch.Tensor],
    bits: list[int],
    group: int,
    slot: int,
    dtype: torch.dtype,
) -> torch.Tensor:
    return dequantize_kn(
        qweights[group][slot],
        scales[group][slot],
        qzeros[group][slot] if qzeros[group].numel() else None,
        bits[group],
        dtype,
    )


@torch.library.custom_op("moemix::dequant_moe", mutates_args=())
def dequant_moe(
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
    """Gated experts with per-expert widths, in the argument order of `ExpertsLayout.op_args`.

    `local_ids` [T, k] are this rank's expert ids (-1: another rank's); `*_where[e] = (group, slot)`
    locates local expert e in the per-width groups (the group size is implied by the scales' shape).
    `w13_bias` [E, 2I] / `w2_bias` [E, H] (or None) are indexed by local expert; `activation` is one of
    `EXPERT_ACTIVATIONS`. Opaque to torch.compile: routing is data-dependent.
    """
    num_tokens, top_k = local_ids.shape
    flat_ids = local_ids.reshape(-1).to(torch.int64)
    flat_weights = topk_weights.reshape(-1).to(torch.float32)
    token_of = torch.arange(num_tokens, device=x.device).repeat_interleave(top_k)
    out = torch.zeros(num_tokens, x.shape[1], dtype=torch.float32, device=x.device)
    order = torch.argsort(flat_ids, stable=True)
    experts, counts = torch.unique_consecutive(flat_ids[order], return_counts=True)
    start = 0
    for expert, count in zip(experts.tolist(), counts.tolist()):
        rows = order[start : start + count]
        start += count
        if expert < 0:
            continue
        tokens = token_of[rows]
        g13, s13 = w13_where[expert].tolist()
        g2, s2 = w2_where[expert].tolist()
        w13 = _expert_weight(w13_qweights, w13_scales, w13_qzeros, w13_bits, g13, s13, x.dtype)
        w2 = _expert_weight(w2_qweights, w2_scales, w2_qzeros, w2_bits, g2, s2, x.dtype)
        gate_up = x[tokens] @ w13
        if w13_bias is not None:  # bias and activation in float32 (biases are float32; bf16 would round them)
            gate_up = gate_up.to(torch.float32) + w13_bias[expert]
        down = (gated_activation(gate_up, activation).to(x.dtype) @ w2).to(torch.float32)
        if w2_bias is not None:
            down = down + w2_bias[expert].to(torch.float32)
        out.index_add_(0, tokens, down * flat_weights[rows, None])
    return out.to(x.dtype)


@dequant_moe.register_fake
def _(x, *layout_args):
    return torch.empty_like(x)


class DequantExpertsKernel(ExpertsKernel):
    def apply(self, layer, x, topk_weights, topk_ids):
        local_ids = ExpertsLayout.route(layer, topk_ids)
        return torch.ops.moemix.dequant_moe(x, topk_weights, local_ids, *layer.moemix_layout.op_args(layer))
