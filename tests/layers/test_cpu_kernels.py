"""Native CPU kernels (csrc/) against the reference math, for every ISA variant this CPU runs.

Two kinds of checks: with activations that int8 represents exactly, the kernel must equal the
dequantized float matmul (this pins down unpacking, layouts, scales and zero points); with random
activations it must equal the same math on per-32-value fake-quantized activations, and stay
within a few percent of unquantized activations.

Numeric tests run once per variant (`isa` fixture): the fastest one and every lower one forced through
MOEMIX_CPU_ISA, so an AVX-512 machine also checks the AVX2 path. A variant is skipped only when the CPU
lacks its ISA, and the skip names what is missing. Layout tests need no particular ISA.
"""

import os
import shutil
import subprocess

import pytest
import torch
import torch.nn.functional as F

from tests.support import (
    ACT_BIAS,
    SPECS2,
    SPECS13,
    X_SCALE,
    H,
    MixedExperts,
    reaches_clamp,
    routing,
    run_experts,
)
from vllm_moemix.config.spec import QuantSpec
from vllm_moemix.layers.kernels import cpu
from vllm_moemix.layers.kernels.base import ExpertsConfig, LinearConfig
from vllm_moemix.layers.kernels.cpu import NativeCpuExpertsKernel, NativeCpuLinearKernel
from vllm_moemix.layers.kernels.select import choose_experts_kernel, choose_linear_kernel
from vllm_moemix.layers.layout import routed_tokens
from vllm_moemix.quant import packing
from vllm_moemix.quant.rtn import quantize_rtn

native_ok, native_why = cpu._native_status()
pytestmark = pytest.mark.skipif(not native_ok, reason=f"native CPU kernels unavailable: {native_why}")
VARIANTS = {v.name: v for v in cpu.variants()} or {"avx512_vnni": None, "avx_vnni": None, "avx2": None}


@pytest.fixture(params=list(VARIANTS))
def isa(request, monkeypatch):
    """Run the test with this variant forced; skip (naming the missing flags) where the CPU lacks it."""
    variant = VARIANTS[request.param]
    if not variant.supported:
        pytest.skip(f"CPU lacks {', '.join(variant.missing)} (needed by the {variant.name} variant)")
    monkeypatch.setenv(cpu.ISA_ENV, variant.name)
    return variant


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


# --- layout (csrc/cpu_kernels.cpp `repack`, `quantize_activations`), re-derived here from its description ---


def hi_bit_position(k: int) -> int:
    """kernel_api.h: value k of a 32-value chunk keeps its high bit at bit 8t + 4r + j, k = 16r + 4t + j."""
    r, rest = divmod(k, 16)
    t, j = divmod(rest, 4)
    return 8 * t + 4 * r + j


def untile(t: torch.Tensor, tile: int) -> torch.Tensor:
    """[..., N/tile, R, tile] -> [..., R, N]."""
    *lead, strips, r, width = t.shape
    assert width == tile
    return t.transpose(-3, -2).reshape(*lead, r, strips * tile)


@pytest.mark.parametrize("name", list(VARIANTS))
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_repack_is_tile_major_with_3bit_planes(name, bits):
    tile = VARIANTS[name].tile
    q = torch.randint(0, 1 << bits, (2, 128, 2 * tile))  # two experts, K=128
    packed = torch.stack([packing.pack(e, bits) for e in q])
    scales = torch.randn(2, 4, 2 * tile).half()
    zeros = torch.randint(0, 255, (2, 4, 2 * tile), dtype=torch.uint8)
    rq, rs, rz = cpu.repack_for_cpu(packed, scales, zeros, bits, name)
    assert rq.dtype == torch.int32 and rq.numel() == packed.numel()  # same bytes, rearranged
    assert torch.equal(untile(rs, tile), scales) and torch.equal(untile(rz, tile), zeros)
    flat = untile(rq, tile)
    if bits != 3:
        assert torch.equal(flat, packed)
        return
    low = packing.unpack(flat[:, : 128 // 16], 2)
    words = flat[:, 128 // 16 :].to(torch.int64) & 0xFFFFFFFF  # [E, K/32, N]
    positions = torch.tensor([hi_bit_position(k) for k in range(32)])
    high = (words.unsqueeze(2) >> positions.view(1, 1, 32, 1)) & 1  # [E, K/32, 32 values, N]
    assert torch.equal(low | (high.reshape(2, 128, 2 * tile) << 2).to(torch.int32), q.to(torch.int32))


@pytest.mark.parametrize("name", list(VARIANTS))
def test_gated_repack_interleaves_gate_and_up_per_block(name):
    """Experts' gate/up columns [gate | up] are stored as [gate 0:32 | up 0:32 | gate 32:64 | ...] (one 64-column
    chunk gives one block of the gated activation), then tiled like any weight."""
    tile, inter = VARIANTS[name].tile, 96
    q = torch.randint(0, 4, (2, 64, 2 * inter))
    packed = torch.stack([packing.pack(e, 2) for e in q])
    scales = torch.randn(2, 2, 2 * inter).half()
    rq, rs, rz = cpu.repack_for_cpu(packed, scales, None, 2, name, gated=True)
    order = torch.arange(2 * inter).view(2, inter // 32, 32).transpose(0, 1).reshape(-1)  # stored column -> original
    assert torch.equal(untile(rq, tile), packed[..., order]) and torch.equal(untile(rs, tile), scales[..., order])
    assert rz is None


def _vm_flags(address: int) -> list[str]:
    """The kernel's VmFlags of the mapping holding `address` (/proc/self/smaps)."""
    inside = False
    for line in open("/proc/self/smaps"):
        head = line.split()[0]
        if "-" in head and all(c in "0123456789abcdef-" for c in head):
            lo, hi = (int(a, 16) for a in head.split("-"))
            inside = lo <= address < hi
        elif inside and line.startswith("VmFlags:"):
            return line.split()[1:]
    return []


@pytest.mark.skipif(
    not os.path.exists("/sys/kernel/mm/transparent_hugepage/enabled"),
    reason="no transparent huge pages here (non-Linux, or a kernel built without THP)",
)
def test_repacked_weights_ask_for_huge_pages():
    """Decode streams each routed expert from a fresh place: the packed weights are advised onto transparent huge
    pages (one TLB entry per 2 MB instead of per 4 KB); the advice shows as `hg` in the mapping's VmFlags."""
    packed = torch.randint(-(2**31), 2**31 - 1, (4096 * 2 // 32, 4096), dtype=torch.int32)  # 4 MB, 2-bit
    rq, _, _ = cpu.repack_for_cpu(packed, torch.ones(32, 4096).half(), None, 2, "avx2")
    middle = rq.data_ptr() + rq.nbytes // 2 // (1 << 21) * (1 << 21)  # inside the aligned interior
    assert "hg" in _vm_flags(middle)


@pytest.mark.skipif(shutil.which("objdump") is None, reason="needs objdump (binutils) to read the built extension")
def test_micro_kernels_keep_their_software_prefetches():
    """GCC's dead-code elimination once deleted every __builtin_prefetch loop in the micro-kernels (no prefetcht0
    in the binary at all; 2-bit streamed at 81% of a core's bandwidth instead of 95%)."""
    from vllm_moemix import _cpu_kernels

    listing = subprocess.run(["objdump", "-d", _cpu_kernels.__file__], capture_output=True, text=True, check=True)
    assert listing.stdout.count("prefetcht0") >= 100  # every width x rows x ISA instance prefetches


def test_hi_bit_positions_are_a_permutation():
    assert sorted(hi_bit_position(k) for k in range(32)) == list(range(32))


def test_repack_keeps_symmetric_weights_without_zeros():
    packed = packing.pack(torch.randint(0, 4, (64, 64)), 2)
    _, _, z = cpu.repack_for_cpu(packed, torch.ones(2, 64).half(), None, 2, "avx2")
    assert z is None


@pytest.mark.parametrize("bits, window", [(2, 16), (3, 16), (4, 8), (8, 1)])
def test_activation_permutation_and_block_scales(bits, window):
    """Values j, j+s, j+2s, j+3s of each window (s = window/4) sit together: one broadcast meets one lane."""
    x = torch.randn(3, 96)
    q, scale, bsum = cpu._native().quantize_activations(x, bits)
    blocks = x.reshape(3, 3, 32)
    expected_scale = blocks.abs().amax(-1) / 127
    torch.testing.assert_close(scale, expected_scale)
    plain = torch.round(blocks / expected_scale.unsqueeze(-1)).to(torch.int8).reshape(3, 96)
    if window == 1:
        order = torch.arange(96)
    else:
        stride = window // 4
        order = torch.tensor([base + (p % 4) * stride + p // 4 for base in range(0, 96, window) for p in range(window)])
    assert torch.equal(q, plain[:, order])  # position p of a window holds value (p % 4) * stride + p // 4
    torch.testing.assert_close(bsum, expected_scale * plain.reshape(3, 3, 32).float().sum(-1))


# --- numerics, per variant ---


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group", [32, 64, 128])
@pytest.mark.parametrize("sym", [False, True])
@pytest.mark.parametrize("tokens", [1, 3, 37])
def test_linear_exact_on_int8_activations(isa, bits, group, sym, tokens):
    torch.manual_seed(1000 * bits + group + tokens)
    spec = QuantSpec(bits, group, sym=sym)
    qw = quantize_rtn(torch.randn(192, 256), spec)
    layer = torch.nn.Module()
    layer.qweight, layer.scales = torch.nn.Parameter(qw.qweight, False), torch.nn.Parameter(qw.scales, False)
    if qw.qzeros is not None:
        layer.qzeros = torch.nn.Parameter(qw.qzeros, False)
    kernel = NativeCpuLinearKernel(LinearConfig(spec, 256, 192, torch.float32))
    assert kernel.isa == isa.name
    kernel.process_weights_after_loading(layer)
    x = int8_exact(tokens, 256, seed=bits)
    bias = torch.randn(192)
    expected = F.linear(x, qw.dequantize(), bias)
    # exact integer products; only float32 summation order differs (outputs reach ~1e2 at 8 bits)
    torch.testing.assert_close(kernel.apply(layer, x, bias), expected, rtol=1e-4, atol=1e-3)


def test_linear_keeps_leading_dims_bf16_and_compiles(isa):
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


def _moe_case(tokens, skew=False, expert_map=None, num_global=None, act="silu", bias=False, x_scale=1.0):
    torch.manual_seed(tokens)
    layer = MixedExperts(SPECS13, SPECS2, activation=act, bias=bias)
    layer.expert_map = expert_map
    kernel = NativeCpuExpertsKernel(layer.config())
    kernel.process_weights_after_loading(layer)
    assert kernel.isa == os.environ[cpu.ISA_ENV]
    w, ids = routing(tokens, num_global or len(SPECS13), skew=skew, seed=tokens)
    return layer, kernel, torch.randn(tokens, H) * x_scale, w, ids


def naive_fake_quant(layer, x, topk_weights, topk_ids):
    """MixedExperts.naive with the kernel's activation quantization applied to x and to h."""
    return layer.naive(x, topk_weights, topk_ids, act_quant=fake_quant)


@pytest.mark.parametrize("tokens, skew", [(1, False), (2, False), (7, False), (33, True)])
def test_mixed_width_moe_matches_reference(isa, tokens, skew):
    layer, kernel, x, w, ids = _moe_case(tokens, skew)
    out = run_experts(kernel, layer, x, w, ids)
    torch.testing.assert_close(out, naive_fake_quant(layer, x, w, ids), rtol=1e-4, atol=1e-3)
    exact = layer.naive(x, w, ids)
    assert (out - exact).norm() / exact.norm() < 0.03  # int8 activations cost about 1%
    assert torch.equal(routed_tokens(layer), torch.bincount(ids.flatten().long(), minlength=len(SPECS13)))


@pytest.mark.parametrize("act, bias", ACT_BIAS)
@pytest.mark.parametrize("tokens", [1, 7, 33])
def test_activations_and_biases_match_reference(isa, act, bias, tokens):
    """GPT-OSS experts (biases, swigluoai with both clamps hit) and SwiGLU with biases, on every variant."""
    layer, kernel, x, w, ids = _moe_case(tokens, act=act, bias=bias, x_scale=X_SCALE)
    if tokens > 1:
        assert reaches_clamp(layer, x, ids)
    out = run_experts(kernel, layer, x, w, ids)
    expected = naive_fake_quant(layer, x, w, ids)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-3 * max(1.0, float(expected.abs().max())))
    exact = layer.naive(x, w, ids)
    assert (out - exact).norm() / exact.norm() < 0.03


@pytest.mark.parametrize("act, bias", ACT_BIAS)
def test_expert_parallel_map_skips_remote_experts(isa, act, bias):
    emap = torch.tensor([-1, 3, 0, -1, 1, 2, -1, 4], dtype=torch.int32)  # 8 global experts, 5 local
    layer, kernel, x, w, ids = _moe_case(9, expert_map=emap, num_global=8, act=act, bias=bias, x_scale=X_SCALE)
    ids[0] = torch.tensor([0, 3])  # token 0 is served entirely by other ranks
    out = run_experts(kernel, layer, x, w, ids)
    expected = naive_fake_quant(layer, x, w, ids)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-3 * max(1.0, float(expected.abs().max())))
    assert not out[0].any()  # no bias leaks from other ranks' pairs
    counts = torch.bincount(ids.flatten().long(), minlength=8)
    assert routed_tokens(layer).tolist() == [int(counts[g]) for g in (2, 4, 5, 1, 7)]


@pytest.mark.parametrize("bias", [False, True])
def test_no_local_tokens_gives_zeros(isa, bias):
    emap = torch.tensor([-1] * 8 + [0, 1, 2, 3, 4], dtype=torch.int32)
    layer, kernel, x, w, ids = _moe_case(4, expert_map=emap, num_global=8, act="swigluoai", bias=bias)
    assert torch.equal(run_experts(kernel, layer, x, w, ids), torch.zeros(4, H))


@pytest.mark.parametrize("act, bias", [("silu", False), ("swigluoai", True)])
def test_moe_compiles_fullgraph_bf16(isa, act, bias):
    layer, kernel, _, _, _ = _moe_case(1, act=act, bias=bias)
    compiled = torch.compile(lambda x, w, i: run_experts(kernel, layer, x, w, i) * 1.0, fullgraph=True, dynamic=True)
    seen = []
    for tokens in (3, 11):
        x = torch.randn(tokens, H).to(torch.bfloat16)
        w, i = routing(tokens, len(SPECS13), seed=tokens)
        out = compiled(x, w, i)
        assert out.dtype == torch.bfloat16
        expected = naive_fake_quant(layer, x.float(), w, i)
        atol = 0.1 * max(1.0, float(expected.abs().max()) / 5)  # bf16 output (biases make outputs ~10)
        torch.testing.assert_close(out.float(), expected, rtol=2e-2, atol=atol)
        seen.append(i.flatten())
    # the op counts routed pairs in place: the mutation survives functionalization
    assert torch.equal(routed_tokens(layer), torch.bincount(torch.cat(seen).long(), minlength=len(SPECS13)))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_moe_reads_and_writes_half_precision_itself(isa, dtype):
    """bf16/fp16 activations are converted inside the op (no ATen conversions per call): same result as float32
    input, rounded once at the output."""
    layer, kernel, x, w, ids = _moe_case(5)
    x = x.to(dtype)
    out = run_experts(kernel, layer, x, w, ids)
    assert out.dtype == dtype
    reference = run_experts(kernel, layer, x.float(), w, ids)
    torch.testing.assert_close(out, reference.to(dtype), rtol=0, atol=0)


def test_moe_refuses_expert_ids_out_of_range(isa):
    layer, kernel, x, w, ids = _moe_case(2)
    ids[1, 0] = len(SPECS13)
    with pytest.raises(RuntimeError, match=f"expert id {len(SPECS13)} out of range"):
        run_experts(kernel, layer, x, w, ids)
    layer.expert_map = torch.tensor([0, 1, 2, 3, 4, 5, 9], dtype=torch.int32)
    ids[1, 0] = 6
    with pytest.raises(RuntimeError, match="expert_map gives local id 9"):
        run_experts(kernel, layer, x, w, ids)


def test_selection_prefers_native_and_explains_refusals(isa, monkeypatch):
    experts = ExpertsConfig((QuantSpec(2),), (QuantSpec(3),), 128, 128, torch.bfloat16)
    linear = LinearConfig(QuantSpec(4), 128, 64, torch.bfloat16)
    assert choose_experts_kernel(experts, torch.device("cpu")) is NativeCpuExpertsKernel
    assert choose_linear_kernel(linear, torch.device("cpu")) is NativeCpuLinearKernel
    ok, why = NativeCpuLinearKernel.can_implement(
        LinearConfig(QuantSpec(4), 128, 80, torch.bfloat16), torch.device("cpu")
    )
    assert not ok and why == f"output dimension 80 is not a multiple of {isa.tile} (the {isa.name} tile width)"
    assert NativeCpuExpertsKernel.can_implement(experts, torch.device("meta")) == (
        False,
        "native kernels run on CPU, not meta",
    )
    monkeypatch.setattr(cpu, "_native_status", lambda: (None, "native extension not built"))
    assert NativeCpuExpertsKernel.can_implement(experts, torch.device("cpu")) == (False, "native extension not built")
    with pytest.raises(RuntimeError, match="not built"):
        cpu._native()


def test_default_is_the_fastest_supported_variant(monkeypatch):
    monkeypatch.delenv(cpu.ISA_ENV, raising=False)
    fastest = next(v for v in cpu.variants() if v.supported)
    assert cpu.choose_variant() == (fastest, None)


def test_refusals_name_the_missing_isa(monkeypatch):
    lacking = [
        cpu.IsaVariant("avx512_vnni", 64, 4, ("avx512f", "avx512_vnni"), ("avx512f", "avx512_vnni")),
        cpu.IsaVariant("avx2", 32, 4, ("avx2", "fma"), ("avx2",)),
    ]
    monkeypatch.setattr(cpu, "variants", lambda: lacking)
    monkeypatch.delenv(cpu.ISA_ENV, raising=False)
    variant, why = cpu.choose_variant()
    assert variant is None and why == "avx512_vnni needs avx512f, avx512_vnni; avx2 needs avx2 (CPU lacks them)"
    monkeypatch.setenv(cpu.ISA_ENV, "avx512_vnni")
    assert cpu.choose_variant() == (None, "MOEMIX_CPU_ISA=avx512_vnni, but the CPU lacks avx512f, avx512_vnni")
    monkeypatch.setenv(cpu.ISA_ENV, "neon")
    assert cpu.choose_variant() == (None, "MOEMIX_CPU_ISA=neon names no variant; built: avx512_vnni, avx2")
    ok, why = NativeCpuExpertsKernel.can_implement(
        ExpertsConfig((QuantSpec(2),), (QuantSpec(2),), 64, 64, torch.float32), torch.device("cpu")
    )
    assert not ok and "neon" in why


def test_pack_experts_refuses_what_does_not_fit_the_layer(isa):
    """Every width group, bias and where-map is checked against the layer's shape when the buffer is made."""
    layer = MixedExperts(SPECS13, SPECS2, bias=True)
    args = list(layer.layout.op_args(layer))
    pack = lambda args: cpu._native().pack_experts(*args, H, layer.inter, isa.name)  # noqa: E731
    experts, experts_layout = pack(args)
    assert experts.dtype == torch.uint8 and experts_layout.dtype == torch.int64
    with pytest.raises(RuntimeError, match="unknown expert activation 'gelu'"):
        pack(args[:-1] + ["gelu"])
    with pytest.raises(RuntimeError, match=r"w2_bias must be \[local experts, 64\]"):
        pack(args[:-2] + [torch.zeros(len(SPECS13), 32), "silu"])
    short = [q[:, :-1] for q in args[2]]  # one packed row too few per expert
    with pytest.raises(RuntimeError, match=r"0 group 0 qweight must be Int \[2, 4, 192\] .*got Int \[2, 3, 192\]"):
        pack(args[:2] + [short] + args[3:])
    flat = [s.reshape(s.shape[0], -1, s.shape[-1] // 2) for s in args[3]]  # same values, wrong shape
    with pytest.raises(RuntimeError, match="projection 0 group 0 scales must be Half"):
        pack(args[:3] + [flat] + args[4:])
    where = args[1].clone()
    where[0, 1] = 99
    with pytest.raises(RuntimeError, match=r"projection 1 places expert 0 at \(group \d, slot 99\)"):
        pack(args[:1] + [where] + args[2:])
    with pytest.raises(RuntimeError, match="unknown moemix cpu kernel variant 'sse2'"):
        cpu._native().pack_experts(*args, H, layer.inter, "sse2")


def test_experts_move_into_one_buffer_and_the_op_checks_it(isa):
    """After loading, the layer holds its experts once (the group parameters are freed), and the op refuses a
    buffer/layout pair it did not make."""
    layer = MixedExperts(SPECS13, SPECS2, bias=True)
    group_bytes = sum(getattr(layer, n).nbytes for n in layer.layout.parameter_names())
    NativeCpuExpertsKernel(layer.config()).process_weights_after_loading(layer)
    assert not any(hasattr(layer, n) for n in layer.layout.parameter_names())
    segments = len(layer.layout.parameter_names())
    assert group_bytes <= layer.moemix_cpu_experts.nbytes < group_bytes + 64 * segments
    w, ids = routing(2, len(SPECS13))
    call = lambda experts, experts_layout: torch.ops.moemix.cpu_fused_moe(  # noqa: E731
        torch.randn(2, H), w, ids, None, layer.moemix_routed_pairs, experts, experts_layout
    )
    assert call(layer.moemix_cpu_experts, layer.moemix_cpu_experts_layout).shape == (2, H)
    foreign = layer.moemix_cpu_experts_layout.clone()
    foreign[0] += 1
    with pytest.raises(RuntimeError, match="not made by this extension's pack_experts"):
        call(layer.moemix_cpu_experts, foreign)
    with pytest.raises(RuntimeError, match="experts must be the contiguous uint8 buffer of"):
        call(layer.moemix_cpu_experts[:-64], layer.moemix_cpu_experts_layout)
    miscounted = layer.moemix_cpu_experts_layout.clone()
    miscounted[2] = 7  # the header's expert count disagrees with the table
    with pytest.raises(RuntimeError, match="its header says 7 experts"):
        call(layer.moemix_cpu_experts, miscounted)
    unknown_act = layer.moemix_cpu_experts_layout.clone()
    unknown_act[5] = 9  # the header's activation field
    with pytest.raises(RuntimeError, match=r"names no known activation \(9\)"):
        call(layer.moemix_cpu_experts, unknown_act)


def test_op_refuses_unknown_variant():
    packed = packing.pack(torch.randint(0, 4, (64, 64)), 2)
    with pytest.raises(RuntimeError, match="unknown moemix cpu kernel variant 'sse2'"):
        torch.ops.moemix.cpu_linear(
            torch.randn(1, 64), packed, torch.ones(2, 64).half(), torch.empty(0, dtype=torch.uint8), 2, 32, "sse2"
        )
