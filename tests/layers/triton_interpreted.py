"""Triton mixed-width MoE against the reference, run by Triton's interpreter on CPU tensors.

Not collected directly: TRITON_INTERPRET=1 must be set before triton (which vLLM imports) is first
imported, so tests/layers/test_triton_kernels.py runs this file in a fresh pytest process with it set.
"""

import pytest
import torch
import triton

from tests.support import (
    ACT_BIAS,
    SPECS2,
    SPECS13,
    X_SCALE,
    H,
    MixedExperts,
    activation,
    reaches_clamp,
    routing,
    run_experts,
)
from vllm_moemix.config.spec import QuantSpec
from vllm_moemix.layers.kernels.base import ExpertsConfig, LinearConfig
from vllm_moemix.layers.kernels.triton_moe import TritonExpertsKernel, TritonLinearKernel, moe_width_group
from vllm_moemix.layers.layout import routed_tokens
from vllm_moemix.quant.rtn import quantize_rtn


def test_running_under_the_interpreter():
    assert triton.knobs.runtime.interpret, "run via tests/layers/test_triton_kernels.py (sets TRITON_INTERPRET=1)"


def _kernel(specs13=SPECS13, specs2=SPECS2, act="silu", bias=False):
    return TritonExpertsKernel(ExpertsConfig(tuple(specs13), tuple(specs2), H, 96, torch.float32, act, bias))


@pytest.mark.parametrize("tokens, skew", [(1, False), (7, False), (33, True)])
def test_mixed_width_moe_matches_reference(tokens, skew):
    """w13 and w2 of one expert in different width groups; 2/3/4/8 bits, groups 32/64/96, sym and asym."""
    layer = MixedExperts(SPECS13, SPECS2)
    x = torch.randn(tokens, H)
    w, ids = routing(tokens, len(SPECS13), skew=skew, seed=tokens)
    out = run_experts(_kernel(), layer, x, w, ids)
    torch.testing.assert_close(out, layer.naive(x, w, ids), rtol=1e-4, atol=1e-4)
    assert torch.equal(routed_tokens(layer), torch.bincount(ids.flatten().long(), minlength=len(SPECS13)))


@pytest.mark.parametrize("act, bias", ACT_BIAS)
@pytest.mark.parametrize("tokens", [1, 33])
def test_activations_and_biases_match_reference(act, bias, tokens):
    layer = MixedExperts(SPECS13, SPECS2, activation=act, bias=bias)
    x = torch.randn(tokens, H) * X_SCALE
    w, ids = routing(tokens, len(SPECS13), seed=tokens)
    if tokens > 1:
        assert reaches_clamp(layer, x, ids)
    out = run_experts(_kernel(act=act, bias=bias), layer, x, w, ids)
    torch.testing.assert_close(out, layer.naive(x, w, ids), rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("act, bias", ACT_BIAS)
def test_expert_parallel_map_and_bf16(act, bias):
    layer = MixedExperts(SPECS13, SPECS2, activation=act, bias=bias)
    layer.expert_map = torch.tensor([-1, 3, 0, -1, 1, 2, -1, 4], dtype=torch.int32)
    w, ids = routing(9, 8, seed=5)
    ids[0] = torch.tensor([0, 3])  # token 0 is served entirely by other ranks
    x = torch.randn(9, H, generator=torch.Generator().manual_seed(5)).to(torch.bfloat16)
    out = run_experts(_kernel(act=act, bias=bias), layer, x, w, ids)
    assert out.dtype == torch.bfloat16
    assert not out[0].any()  # no bias leaks from other ranks' pairs
    expected = layer.naive(x.float(), w, ids)
    atol = 0.1 * max(1.0, float(expected.abs().max()) / 5)  # bf16 output (biases make outputs ~10)
    torch.testing.assert_close(out.float(), expected, rtol=2e-2, atol=atol)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group, sym", [(32, True), (128, False)])
@pytest.mark.parametrize("act, bias", [("silu", False), ("swigluoai", True)])
def test_width_group_with_unused_slots(bits, group, sym, act, bias):
    """moe_width_group (the Marlin glue's fallback): slots -1 contribute nothing; biases are in slot order."""
    spec = QuantSpec(bits, group, sym=sym)
    hidden, inter, experts = 128, 128, 3
    gen = torch.Generator().manual_seed(bits)
    w13 = [quantize_rtn(torch.randn(2 * inter, hidden, generator=gen) * 0.2, spec) for _ in range(experts)]
    w2 = [quantize_rtn(torch.randn(hidden, inter, generator=gen) * 0.2, spec) for _ in range(experts)]

    def stacked(qws, attr):
        tensors = [getattr(q, attr) for q in qws]
        return torch.stack(tensors) if tensors[0] is not None else torch.empty(0, dtype=torch.uint8)

    x = torch.randn(5, hidden, generator=gen) * X_SCALE
    slots = torch.tensor([[0, 2], [1, -1], [-1, -1], [2, 0], [1, 2]], dtype=torch.int32)
    weights = torch.rand(5, 2, generator=gen)
    b13 = torch.randn(experts, 2 * inter, generator=gen) * 3 if bias else None
    b2 = torch.randn(experts, hidden, generator=gen) if bias else None
    out = moe_width_group(
        x,
        weights,
        slots,
        stacked(w13, "qweight"),
        stacked(w13, "scales"),
        stacked(w13, "qzeros"),
        stacked(w2, "qweight"),
        stacked(w2, "scales"),
        stacked(w2, "qzeros"),
        bits,
        group,
        bits,
        group,
        b13,
        b2,
        act,
    )
    expected = torch.zeros(5, hidden)
    for t in range(5):
        for k in range(2):
            e = int(slots[t, k])
            if e >= 0:
                gate_up = x[t] @ w13[e].dequantize().t() + (b13[e] if bias else 0)
                down = activation(gate_up, act) @ w2[e].dequantize().t() + (b2[e] if bias else 0)
                expected[t] += weights[t, k] * down
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-3)
    assert torch.equal(out[2], torch.zeros(hidden))


def test_align_pairs_pads_each_expert_to_whole_blocks():
    from vllm_moemix.layers.kernels.triton_gemm import align_pairs

    slots = torch.tensor([2, 0, -1, 2, 2, 0])
    sorted_pairs, block_slot = align_pairs(slots, num_slots=3, block_m=2)
    assert block_slot.tolist() == [0, 2, 2]
    assert sorted_pairs.tolist() == [1, 5, 0, 3, 4, -1]


def test_selector_never_picks_triton_on_cpu():
    config = ExpertsConfig((QuantSpec(2),), (QuantSpec(2),), 128, 128, torch.bfloat16)
    ok, why = TritonExpertsKernel.can_implement(config, torch.device("cpu"))
    assert not ok and "CUDA" in why
    assert TritonExpertsKernel.can_implement(config, torch.device("cuda")) == (True, None)


@pytest.mark.parametrize("spec", [QuantSpec(2, 32), QuantSpec(3, 64, sym=True), QuantSpec(4, 128), QuantSpec(8, 32)])
def test_linear_matches_float(spec):
    qw = quantize_rtn(torch.randn(96, 256), spec)
    layer = torch.nn.Module()
    layer.qweight, layer.scales = qw.qweight, qw.scales
    if qw.qzeros is not None:
        layer.qzeros = qw.qzeros
    kernel = TritonLinearKernel(LinearConfig(spec, 256, 96, torch.float32))
    x, bias = torch.randn(2, 5, 256), torch.randn(96)
    expected = torch.nn.functional.linear(x, qw.dequantize(), bias)
    torch.testing.assert_close(kernel.apply(layer, x, bias), expected, rtol=1e-4, atol=1e-4)
