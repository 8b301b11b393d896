"""RTN: error bounded by half a step, exact on the grid, sane on degenerate groups."""

import pytest
import torch

from vllm_moemix.config.spec import SUPPORTED_BITS, PlanError, QuantSpec
from vllm_moemix.quant.rtn import quantize_rtn
from vllm_moemix.quant.tensors import dequantize_kn


@pytest.mark.parametrize("bits", SUPPORTED_BITS)
@pytest.mark.parametrize("sym", [False, True])
def test_error_within_half_step(bits, sym):
    torch.manual_seed(bits)
    w = torch.randn(24, 192)
    spec = QuantSpec(bits, group_size=64, sym=sym)
    qw = quantize_rtn(w, spec)
    assert qw.qweight.shape == (192 * bits // 32, 24)
    assert qw.scales.shape == (3, 24) and qw.scales.dtype == torch.float16
    assert (qw.qzeros is None) == sym
    step = qw.scales.float().t().repeat_interleave(64, dim=1)  # [N, K]
    zero = (
        (torch.full_like(qw.scales.float(), 1 << (bits - 1)) if sym else qw.qzeros.float())
        .t()
        .repeat_interleave(64, dim=1)
    )
    lo, hi = -zero * step, (spec.max_q - zero) * step  # the representable range of each group
    err = (qw.dequantize() - w).abs()
    inside = (w >= lo) & (w <= hi)
    assert torch.all(err[inside] <= 0.5 * step[inside] + 1e-6)  # rounding
    assert torch.all(err <= step + 1e-6)  # clipping at the ends costs at most one more half step


@pytest.mark.parametrize("bits", SUPPORTED_BITS)
def test_grid_values_are_exact(bits):
    spec = QuantSpec(bits, group_size=32)
    levels = torch.arange(1 << bits, dtype=torch.float32) - (1 << (bits - 1))
    w = (levels.repeat(32 * 4 // len(levels) + 1)[: 32 * 4] * 0.125).reshape(4, 32)
    w[:, 0] = levels.min() * 0.125  # every group spans the full range
    w[:, 1] = levels.max() * 0.125
    assert torch.equal(quantize_rtn(w, spec).dequantize(), w)


def test_zero_group_and_dequant_leading_dims():
    w = torch.zeros(8, 64)
    w[:, 32:] = torch.randn(8, 32)
    qw = quantize_rtn(w, QuantSpec(3, group_size=32))
    deq = qw.dequantize()
    assert torch.isfinite(deq).all() and torch.equal(deq[:, :32], w[:, :32])
    stacked = dequantize_kn(
        qw.qweight.unsqueeze(0).repeat(2, 1, 1),
        qw.scales.unsqueeze(0).repeat(2, 1, 1),
        qw.qzeros.unsqueeze(0).repeat(2, 1, 1),
        3,
    )
    assert torch.equal(stacked[1].t(), deq)


def test_group_must_divide_k():
    with pytest.raises(PlanError, match="group_size 64 does not divide its input dimension 96"):
        quantize_rtn(torch.randn(4, 96), QuantSpec(4, group_size=64))
