"""Native CPU kernels (csrc/cpu_kernels.cpp) against the reference math.

Two kinds of checks: with activations that int8 represents exactly, the kernel must equal the
dequantized float matmul (this pins down unpacking, layouts, scales and zero points); with random
activations it must equal the same math on per-32-value fake-quantized activations, and stay
within a few percent of unquantized activations.
"""

import pytest
import torch
import torch.nn.functional as F

from tests.test_kernels import SPECS2, SPECS13, FakeLayer, H, I, _routing
from vllm_moemix import packing
from vllm_moemix.layers.kernels import cpu
from vllm_moemix.layers.kernels.base import ExpertsConfig, LinearConfig
from vllm_moemix.layers.kernels.cpu import NativeCpuExpertsKernel, NativeCpuLinearKernel
from vllm_moemix.layers.kernels.select import choose_experts_kernel, choose_linear_kernel
from vllm_moemix.quant.rtn import quantize_rtn
from vllm_moemix.spec import QuantSpec

native_ok, native_why = cpu._native_status()
pytestmark = pytest.mark.skipif(not native_ok, reason=f"native CPU kernels unavailable: {native_why}")


def int8_exact(tokens: int, k: int, seed: int = 0) -> torch.Tensor:
    """Integer activations in [-127, 127] with 127 in every 32-block: int8 quantization is lossless."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randint(-127, 128, (tokens, k), generator=gen).float()
    x[:, ::32] = 127.0
    return x


def fake_quant(x: torch.Tensor) -> torch.Tensor:
    """What the kernel does to activations: symmetric int8 per 32 values, round half to even."""
    blocks = x.float().reshape(*x.shape[:-1], -1, 32)
    scale = blocks.abs().amax(-1, keepdim=True) / 127
    q = torch.where(scale > 0, torch.round(blocks / torch.where(scale > 0, scale, 1)), 0)
    return (q * scale).reshape(x.shape)


def test_3bit_split_keeps_every_value_and_size():
    q = torch.randint(0, 8, (128, 64))
    packed = packing.pack(q, 3)
    split = cpu.split_3bit(packed)
    assert split.shape == packed.shape and split.dtype == torch.int32
    low = packing.unpack(split[: 128 // 16], 2)
    words = split[128 // 16 :].to(torch.int64) & 0xFFFFFFFF
    bits = torch.tensor([cpu.hi_bit_position(k) for k in range(32)])
    high = (words.unsqueeze(1) >> bits.view(1, 32, 1)) & 1  # [K/32, 32 values, N]
    assert torch.equal(low | (high.reshape(128, 64) << 2), q.to(torch.int32))


def test_hi_bit_positions_are_a_permutation():
    assert sorted(cpu.hi_bit_position(k) for k in range(32)) == list(range(32))


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group, sym", [(32, False), (64, True), (128, False)])
@pytest.mark.parametrize("tokens", [1, 3, 37])
def test_linear_exact_on_int8_activations(bits, group, sym, tokens):
    spec = QuantSpec(bits, group, sym=sym)
    qw = quantize_rtn(torch.randn(192, 256), spec)
    layer = torch.nn.Module()
    layer.qweight, layer.scales = torch.nn.Parameter(qw.qweight, False), torch.nn.Parameter(qw.scales, False)
    if qw.qzeros is not None:
        layer.qzeros = torch.nn.Parameter(qw.qzeros, False)
    kernel = NativeCpuLinearKernel(LinearConfig(spec, 256, 192, torch.float32))
    kernel.process_weights_after_loading(layer)
    x = int8_exact(tokens, 256, seed=bits)
    bias = torch.randn(192)
    expected = F.linear(x, qw.dequantize(), bias)
    torch.testing.assert_close(kernel.apply(layer, x, bias), expected, rtol=1e-5, atol=1e-3)


def test_linear_keeps_leading_dims_bf16_and_compiles():
    torch.manual_seed(0)
    spec = QuantSpec(4, 64)
    qw = quantize_rtn(torch.randn(128, 128), spec)
    layer = torch.nn.Module()
    layer.qweight, layer.scales, layer.qzeros = qw.qweight.clone(), qw.scales.clone(), qw.qzeros.clone()
    kernel = NativeCpuLinearKernel(LinearConfig(spec, 128, 128, torch.bfloat16))
    kernel.process_weights_after_loading(layer)
    x = torch.randn(2, 5, 128).to(torch.bfloat16)
    compiled = torch.compile(lambda x: kernel.apply(layer, x, None), fullgraph=True, dynamic=True)
    out = compiled(x)
    assert out.shape == (2, 5, 128) and out.dtype == torch.bfloat16
    expected = F.linear(fake_quant(x.float()), qw.dequantize())
    torch.testing.assert_close(out.float(), expected, rtol=2e-2, atol=0.1)  # bf16 output


def _moe_case(tokens, skew=False, expert_map=None, num_global=None):
    torch.manual_seed(tokens)
    layer = FakeLayer(SPECS13, SPECS2)
    layer.expert_map = expert_map
    kernel = NativeCpuExpertsKernel(ExpertsConfig(tuple(SPECS13), tuple(SPECS2), H, I, torch.float32))
    kernel.process_weights_after_loading(layer)
    w, ids = _routing(tokens, num_global or len(SPECS13), skew=skew, seed=tokens)
    return layer, kernel, torch.randn(tokens, H), w, ids


def naive_fake_quant(layer, x, topk_weights, topk_ids):
    """FakeLayer.naive with the kernel's activation quantization applied to x and to h."""
    return layer.naive(x, topk_weights, topk_ids, act_quant=fake_quant)


@pytest.mark.parametrize("tokens, skew", [(1, False), (2, False), (7, False), (33, True)])
def test_mixed_width_moe_matches_reference(tokens, skew):
    layer, kernel, x, w, ids = _moe_case(tokens, skew)
    out = kernel.apply(layer, x, w, ids)
    torch.testing.assert_close(out, naive_fake_quant(layer, x, w, ids), rtol=1e-4, atol=1e-3)
    exact = layer.naive(x, w, ids)
    assert (out - exact).norm() / exact.norm() < 0.03  # int8 activations cost about 1%
    assert torch.equal(layer.moemix_routed_tokens, torch.bincount(ids.flatten().long(), minlength=len(SPECS13)))


def test_expert_parallel_map_skips_remote_experts():
    emap = torch.tensor([-1, 3, 0, -1, 1, 2, -1, 4], dtype=torch.int32)  # 8 global experts, 5 local
    layer, kernel, x, w, ids = _moe_case(9, expert_map=emap, num_global=8)
    out = kernel.apply(layer, x, w, ids)
    torch.testing.assert_close(out, naive_fake_quant(layer, x, w, ids), rtol=1e-4, atol=1e-3)
    counts = torch.bincount(ids.flatten().long(), minlength=8)
    assert layer.moemix_routed_tokens.tolist() == [int(counts[g]) for g in (2, 4, 5, 1, 7)]


def test_no_local_tokens_gives_zeros():
    emap = torch.tensor([-1] * 8 + [0, 1, 2, 3, 4], dtype=torch.int32)
    layer, kernel, x, w, ids = _moe_case(4, expert_map=emap, num_global=8)  # ids only hit global 0..7
    assert torch.equal(kernel.apply(layer, x, w, ids), torch.zeros(4, H))


def test_moe_compiles_fullgraph_bf16():
    layer, kernel, _, _, _ = _moe_case(1)
    compiled = torch.compile(lambda x, w, i: kernel.apply(layer, x, w, i) * 1.0, fullgraph=True, dynamic=True)
    for tokens in (3, 11):
        x = torch.randn(tokens, H).to(torch.bfloat16)
        w, i = _routing(tokens, len(SPECS13), seed=tokens)
        out = compiled(x, w, i)
        assert out.dtype == torch.bfloat16
        torch.testing.assert_close(out.float(), naive_fake_quant(layer, x.float(), w, i), rtol=2e-2, atol=0.1)  # bf16 output


def test_selection_prefers_native_and_explains_refusals(monkeypatch):
    experts = ExpertsConfig((QuantSpec(2),), (QuantSpec(3),), 128, 128, torch.bfloat16)
    linear = LinearConfig(QuantSpec(4), 128, 64, torch.bfloat16)
    assert choose_experts_kernel(experts, torch.device("cpu")) is NativeCpuExpertsKernel
    assert choose_linear_kernel(linear, torch.device("cpu")) is NativeCpuLinearKernel
    ok, why = NativeCpuLinearKernel.can_implement(LinearConfig(QuantSpec(4), 128, 96, torch.bfloat16),
                                                  torch.device("cpu"))
    assert not ok and "96 is not a multiple of 64" in why
    assert NativeCpuExpertsKernel.can_implement(experts, torch.device("meta")) == (
        False, "native kernels run on CPU, not meta")
    monkeypatch.setattr(cpu, "_native_status", lambda: (None, "CPU lacks avx512_vnni"))
    assert NativeCpuExpertsKernel.can_implement(experts, torch.device("cpu")) == (False, "CPU lacks avx512_vnni")
    with pytest.raises(RuntimeError, match="avx512_vnni"):
        cpu._native()
