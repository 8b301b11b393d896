"""Reference kernels against plain float math, incl. expert-parallel maps and torch.compile."""

import pytest
import torch
import torch.nn.functional as F

import vllm_moemix.layers  # noqa: F401  (registers the moemix:: ops)
from tests.support import (
    ACT_BIAS,
    SPECS2,
    SPECS13,
    SWIGLUOAI_ALPHA,
    SWIGLUOAI_LIMIT,
    X_SCALE,
    H,
    I,
    MixedExperts,
    activation,
    reaches_clamp,
    routing,
    run_experts,
)
from vllm_moemix.config.spec import QuantSpec
from vllm_moemix.layers.kernels.base import EXPERT_ACTIVATIONS, ExpertsConfig, LinearConfig, gated_activation
from vllm_moemix.layers.kernels.reference import DequantExpertsKernel, DequantLinearKernel
from vllm_moemix.layers.kernels.select import choose_experts_kernel, choose_linear_kernel
from vllm_moemix.layers.layout import ExpertsLayout, routed_tokens
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


@pytest.mark.parametrize("act, bias", ACT_BIAS)
@pytest.mark.parametrize("tokens", [1, 33])
def test_activations_and_biases_match_naive(act, bias, tokens):
    layer = MixedExperts(SPECS13, SPECS2, activation=act, bias=bias)
    x = torch.randn(tokens, H) * X_SCALE
    topk_weights, topk_ids = routing(tokens, len(SPECS13), seed=tokens)
    if tokens > 1:
        assert reaches_clamp(layer, x, topk_ids)
    kernel = DequantExpertsKernel(layer.config())
    assert (kernel.config.activation, kernel.config.has_bias) == (act, bias)
    out = run_experts(kernel, layer, x, topk_weights, topk_ids)
    torch.testing.assert_close(out, layer.naive(x, topk_weights, topk_ids), rtol=1e-4, atol=1e-3)


def test_gated_activation_formulas_and_clamps():
    """Hand-computed values on both sides of the clamps, then the kernels' torch code against the direct formula."""
    sig = torch.sigmoid
    gate = torch.tensor([10.0, -10.0, 3.0, 0.5])
    up = torch.tensor([10.0, -10.0, -2.0, 8.0])
    gate_up = torch.cat([gate, up])
    alpha, limit = SWIGLUOAI_ALPHA, SWIGLUOAI_LIMIT
    expected = torch.tensor(
        [
            (7 + 1) * 7 * sig(torch.tensor(alpha * 7)),  # gate clamped to 7, up to 7
            (-7 + 1) * -10 * sig(torch.tensor(alpha * -10)),  # gate not clamped from below, up to -7
            (-2 + 1) * 3 * sig(torch.tensor(alpha * 3)),
            (7 + 1) * 0.5 * sig(torch.tensor(alpha * 0.5)),  # up clamped to 7
        ]
    )
    assert (alpha, limit) == (1.702, 7.0)
    torch.testing.assert_close(activation(gate_up, "swigluoai"), expected)
    torch.testing.assert_close(gated_activation(gate_up, "swigluoai"), expected)
    torch.testing.assert_close(gated_activation(gate_up, "silu"), F.silu(gate) * up)
    wide = torch.randn(64, 2 * I) * 10
    for act in EXPERT_ACTIVATIONS:
        torch.testing.assert_close(gated_activation(wide, act), activation(wide, act))
    with pytest.raises(ValueError, match="not one of"):
        gated_activation(wide, "gelu")


def test_activation_and_bias_in_config_and_layout():
    assert EXPERT_ACTIVATIONS == ("silu", "swigluoai")
    plain = ExpertsConfig((QuantSpec(2),), (QuantSpec(2),), 128, 128, torch.bfloat16)
    assert (plain.activation, plain.has_bias) == ("silu", False)
    with pytest.raises(ValueError, match="'gelu' is not one of"):
        ExpertsConfig((QuantSpec(2),), (QuantSpec(2),), 128, 128, torch.bfloat16, activation="gelu")
    with pytest.raises(ValueError, match="'relu' is not one of"):
        ExpertsLayout.build([QuantSpec(2)], [QuantSpec(2)], 128, 128, activation="relu")

    layer = torch.nn.Module()
    layout = ExpertsLayout.build([QuantSpec(2, 32)] * 3, [QuantSpec(4, 32)] * 3, 64, 96, "swigluoai", has_bias=True)
    layout.register(layer)
    assert layer.moemix_w13_bias.shape == (3, 2 * 96) and layer.moemix_w2_bias.shape == (3, 64)
    assert layer.moemix_w13_bias.dtype == torch.float32 and not layer.moemix_w13_bias.requires_grad
    assert not layer.moemix_w13_bias.any() and not layer.moemix_w2_bias.any()
    config = layout.kernel_config(torch.bfloat16)
    assert (config.activation, config.has_bias) == ("swigluoai", True)
    layer.to(torch.device("meta"))  # biases move with the layer (what op_args hands the kernels)
    args = layout.op_args(layer)
    assert args[-3].device.type == "meta" and args[-2] is layer.moemix_w2_bias and args[-1] == "swigluoai"

    bare = torch.nn.Module()
    ExpertsLayout.build([QuantSpec(2, 32)], [QuantSpec(2, 32)], 64, 96).register(bare)
    assert not hasattr(bare, "moemix_w13_bias") and not hasattr(bare, "moemix_w2_bias")
    assert bare.moemix_layout.op_args(bare)[-3:] == (None, None, "silu")


@pytest.mark.parametrize("act, bias", ACT_BIAS)
def test_expert_parallel_map_skips_remote_experts(act, bias):
    layer = MixedExperts(SPECS13[:3], SPECS2[:3], activation=act, bias=bias)
    layer.expert_map = torch.tensor([-1, -1, 0, 1, 2, -1], dtype=torch.int32)  # 6 global experts, 3 local
    x = torch.randn(9, H) * X_SCALE
    topk_weights, topk_ids = routing(9, 6, seed=3)
    topk_ids[0] = torch.tensor([0, 5])  # token 0 is served entirely by other ranks
    out = run_experts(DequantExpertsKernel(None), layer, x, topk_weights, topk_ids)
    torch.testing.assert_close(out, layer.naive(x, topk_weights, topk_ids), rtol=1e-4, atol=1e-3)
    assert not out[0].any()  # no bias leaks from other ranks' pairs
    global_counts = torch.bincount(topk_ids.flatten().long(), minlength=6)
    assert routed_tokens(layer).tolist() == global_counts[2:5].tolist()  # only this rank's experts


@pytest.mark.parametrize("act, bias", [("silu", False), ("swigluoai", True)])
def test_moe_op_compiles_fullgraph_and_runs_bf16(act, bias):
    torch.manual_seed(0)
    layer = MixedExperts(SPECS13, SPECS2, activation=act, bias=bias)
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
    expected = layer.naive(xb.float(), w, i)
    atol = 0.01 * max(5.0, float(expected.abs().max()))  # 0.05, or 1% of the largest output (biases make them ~10)
    torch.testing.assert_close(out.float(), expected, rtol=0.05, atol=atol)


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
