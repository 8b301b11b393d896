"""Reference kernels against plain float math, incl. expert-parallel maps and torch.compile."""

import pytest
import torch
import torch.nn.functional as F

import vllm_moemix.layers  # noqa: F401  (registers the moemix:: ops)
from tests.support import SPECS2, SPECS13, H, MixedExperts, routing, run_experts
from vllm_moemix.config.spec import QuantSpec
from vllm_moemix.layers.kernels.base import ExpertsConfig, LinearConfig
from vllm_moemix.layers.kernels.reference import DequantExpertsKernel, DequantLinearKernel
from vllm_moemix.layers.kernels.select import choose_experts_kernel, choose_linear_kernel
from vllm_moemix.layers.layout import routed_tokens
from vllm_moemix.quant.rtn import quantize_rtn


@pytest.mark.parametrize("tokens, skew", [(1, False), (7, False), (33, True)])
def test_mixed_width_experts_match_naive(tokens, skew):
    layer = MixedExperts(SPECS13, SPECS2)
    x = torch.randn(tokens, H)
    topk_weights, topk_ids = routing(tokens, len(SPECS13), skew=skew)
    kernel = DequantExpertsKernel(layer.config())
    out = run_experts(kernel, layer, x, topk_weights, topk_ids)
    torch.testing.assert_close(out, layer.naive(x, topk_weights, topk_ids), rtol=1e-4, atol=1e-4)
    expected = torch.bincount(topk_ids.flatten().long(), minlength=len(SPECS13))
    assert torch.equal(routed_tokens(layer), expected)  # the usage profile serving collects


def test_expert_parallel_map_skips_remote_experts():
    layer = MixedExperts(SPECS13[:3], SPECS2[:3])
    layer.expert_map = torch.tensor([-1, -1, 0, 1, 2, -1], dtype=torch.int32)  # 6 global experts, 3 local
    x = torch.randn(9, H)
    topk_weights, topk_ids = routing(9, 6, seed=3)
    out = run_experts(DequantExpertsKernel(None), layer, x, topk_weights, topk_ids)
    torch.testing.assert_close(out, layer.naive(x, topk_weights, topk_ids), rtol=1e-4, atol=1e-4)
    global_counts = torch.bincount(topk_ids.flatten().long(), minlength=6)
    assert routed_tokens(layer).tolist() == global_counts[2:5].tolist()  # only this rank's experts


def test_moe_op_compiles_fullgraph_and_runs_bf16():
    layer = MixedExperts(SPECS13, SPECS2)
    kernel = DequantExpertsKernel(None)
    compiled = torch.compile(lambda x, w, i: run_experts(kernel, layer, x, w, i) * 1.0, fullgraph=True, dynamic=True)
    for tokens in (3, 11):
        x = torch.randn(tokens, H)
        w, i = routing(tokens, len(SPECS13), seed=tokens)
        torch.testing.assert_close(compiled(x, w, i), layer.naive(x, w, i), rtol=1e-4, atol=1e-4)
    xb = torch.randn(5, H).to(torch.bfloat16)
    w, i = routing(5, len(SPECS13))
    out = run_experts(kernel, layer, xb, w, i)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), layer.naive(xb.float(), w, i), rtol=0.05, atol=0.05)


@pytest.mark.parametrize("spec", [QuantSpec(2, 32), QuantSpec(3, 64, sym=True), QuantSpec(4, 32), QuantSpec(8, 128)])
def test_linear_kernel_matches_float(spec):
    w = torch.randn(48, 128)
    qw = quantize_rtn(w, spec)
    layer = torch.nn.Module()
    layer.qweight, layer.scales = qw.qweight, qw.scales
    if qw.qzeros is not None:
        layer.qzeros = qw.qzeros
    bias = torch.randn(48)
    x = torch.randn(5, 128)
    kernel = DequantLinearKernel(LinearConfig(spec, 128, 48, torch.float32))
    torch.testing.assert_close(kernel.apply(layer, x, bias), F.linear(x, qw.dequantize(), bias), rtol=1e-4, atol=1e-4)
    compiled = torch.compile(lambda x: kernel.apply(layer, x, None), fullgraph=True)
    torch.testing.assert_close(compiled(x), F.linear(x, qw.dequantize()), rtol=1e-4, atol=1e-4)


def test_selection_reports_every_reason(monkeypatch):
    config = LinearConfig(QuantSpec(4), 128, 64, torch.bfloat16)
    monkeypatch.setenv("MOEMIX_DISABLED_KERNELS", "NativeCpuLinearKernel, NativeCpuExpertsKernel")
    assert choose_linear_kernel(config, torch.device("cpu")) is DequantLinearKernel
    assert (
        choose_experts_kernel(
            ExpertsConfig((QuantSpec(2),), (QuantSpec(2),), 128, 128, torch.bfloat16), torch.device("cpu")
        )
        is DequantExpertsKernel
    )
    monkeypatch.setenv("MOEMIX_DISABLED_KERNELS", "NativeCpuLinearKernel,DequantLinearKernel")
    with pytest.raises(ValueError, match="DequantLinearKernel: disabled by MOEMIX_DISABLED_KERNELS"):
        choose_linear_kernel(config, torch.device("cpu"))


def test_what_serves_is_said_and_a_reference_fallback_explained(monkeypatch):
    from vllm_moemix.layers.introspect import describe_served, reference_fallback_reason

    native = {"experts": {"NativeCpuExpertsKernel (avx2)": 4}, "linears": {"NativeCpuLinearKernel (avx2)": 8}}
    assert describe_served(native) == (
        "experts: NativeCpuExpertsKernel (avx2) x4; linears: NativeCpuLinearKernel (avx2) x8"
    )
    assert reference_fallback_reason(native) is None
    monkeypatch.setenv("MOEMIX_CPU_ISA", "sse2")
    slow = {"experts": {"DequantExpertsKernel": 4}, "linears": {}}
    assert describe_served(slow) == "experts: DequantExpertsKernel x4"
    assert reference_fallback_reason(slow).startswith("MOEMIX_CPU_ISA=sse2 names no variant")
