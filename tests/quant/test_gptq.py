"""GPTQ: reduces to RTN without input statistics, beats RTN on output error with them."""

import pytest
import torch

from vllm_moemix.config.spec import QuantSpec
from vllm_moemix.quant.gptq import HessianAccumulator, gptq_quantize
from vllm_moemix.quant.rtn import quantize_rtn


def _correlated_inputs(n, k, seed=0):
    gen = torch.Generator().manual_seed(seed)
    mix = torch.randn(k, k, generator=gen) / k**0.5 + torch.eye(k)
    scales = torch.rand(k, generator=gen) * 3 + 0.1  # uneven input magnitudes, like real activations
    return (torch.randn(n, k, generator=gen) @ mix) * scales


def test_hessian_accumulator_is_running_mean():
    x = torch.randn(100, 16)
    acc = HessianAccumulator(16)
    acc.add(x[:30])
    acc.add(x[30:].reshape(7, 10, 16))
    torch.testing.assert_close(acc.H.double(), 2 / 100 * x.double().t() @ x.double(), rtol=1e-5, atol=1e-5)
    assert acc.count == 100


@pytest.mark.parametrize("spec", [QuantSpec(3, 32), QuantSpec(4, 64, sym=True)])
def test_without_statistics_equals_rtn(spec):
    w = torch.randn(16, 128)
    for hessian in (None, torch.eye(128) * 2):
        got, want = gptq_quantize(w, hessian, spec), quantize_rtn(w, spec)
        assert torch.equal(got.qweight, want.qweight) and torch.equal(got.scales, want.scales)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("sym, act_order", [(False, False), (True, False), (False, True), (True, True)])
def test_beats_rtn_on_output_error(bits, sym, act_order):
    torch.manual_seed(bits)
    k, n = 128, 32
    x = _correlated_inputs(512, k)
    w = torch.randn(n, k)
    acc = HessianAccumulator(k)
    acc.add(x)
    spec = QuantSpec(bits, 32, sym=sym)
    gptq = gptq_quantize(w, acc.H, spec, act_order=act_order).dequantize()
    rtn = quantize_rtn(w, spec).dequantize()
    err = lambda q: ((x @ (w - q).t()) ** 2).mean().item()  # noqa: E731
    assert err(gptq) < 0.9 * err(rtn)


def test_reference_dynamic_groups_still_available():
    x, w = _correlated_inputs(256, 64), torch.randn(8, 64)
    acc = HessianAccumulator(64)
    acc.add(x)
    spec = QuantSpec(4, 32)
    dynamic = gptq_quantize(w, acc.H, spec, static_groups=False)
    assert not torch.equal(dynamic.scales, gptq_quantize(w, acc.H, spec).scales)
    assert ((x @ (w - dynamic.dequantize()).t()) ** 2).mean() < (
        (x @ (w - quantize_rtn(w, spec).dequantize()).t()) ** 2
    ).mean()


def test_dead_inputs_are_rounded_not_dropped():
    w = torch.randn(8, 64)
    x = torch.randn(200, 64)
    x[:, :32] = 0  # first group never active in calibration
    acc = HessianAccumulator(64)
    acc.add(x)
    q = gptq_quantize(w, acc.H, QuantSpec(4, 32)).dequantize()
    torch.testing.assert_close(q[:, :32], quantize_rtn(w, QuantSpec(4, 32)).dequantize()[:, :32])
