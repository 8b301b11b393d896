"""Reference kernels against plain float math, incl. expert-parallel maps and torch.compile."""

import pytest
import torch
import torch.nn.functional as F

import vllm_moemix.layers  # noqa: F401  (registers the moemix:: ops)
from vllm_moemix.layers.kernels.base import ExpertsConfig, LinearConfig
from vllm_moemix.layers.kernels.reference import DequantExpertsKernel, DequantLinearKernel
from vllm_moemix.layers.kernels.select import choose_experts_kernel, choose_linear_kernel
from vllm_moemix.layers.moe import WidthGroups
from vllm_moemix.quant.rtn import quantize_rtn
from vllm_moemix.spec import QuantSpec

H, I = 64, 96


class FakeLayer(torch.nn.Module):
    """Holds per-width expert groups the way MoeMixMoEMethod.create_weights lays them out."""

    def __init__(self, w13_specs, w2_specs, seed=0):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        e = len(w13_specs)
        self.w13_float = torch.randn(e, 2 * I, H, generator=gen) * 0.2
        self.w2_float = torch.randn(e, H, I, generator=gen) * 0.2
        self.moemix_groups = {"w13": WidthGroups.build("w13", w13_specs), "w2": WidthGroups.build("w2", w2_specs)}
        self.deq13, self.deq2 = [], []
        for proj, floats, deq in (("w13", self.w13_float, self.deq13), ("w2", self.w2_float, self.deq2)):
            grp = self.moemix_groups[proj]
            for g, spec in enumerate(grp.specs):
                qws = [quantize_rtn(floats[x], spec) for x in grp.members[g]]
                self.register_buffer(grp.param_name(g, "qweight"), torch.stack([q.qweight for q in qws]))
                self.register_buffer(grp.param_name(g, "scales"), torch.stack([q.scales for q in qws]))
                zeros = torch.stack([q.qzeros for q in qws]) if not spec.sym else torch.empty(0, dtype=torch.uint8)
                self.register_buffer(grp.param_name(g, "qzeros"), zeros)
            deq.extend(quantize_rtn(floats[x], s).dequantize() for x, s in enumerate(w13_specs if proj == "w13" else w2_specs))
        self.register_buffer("w13_where", self.moemix_groups["w13"].where_tensor(e))
        self.register_buffer("w2_where", self.moemix_groups["w2"].where_tensor(e))
        self.register_buffer("moemix_no_map", torch.empty(0, dtype=torch.int32))
        self.register_buffer("moemix_routed_tokens", torch.zeros(e, dtype=torch.int64))
        self.expert_map = None

    def naive(self, x, topk_weights, topk_ids, act_quant=lambda v: v):
        """Token by token, expert by expert, in float32; `act_quant` models a kernel's activation quantization."""
        out = torch.zeros(x.shape[0], H)
        for t in range(x.shape[0]):
            for w, e in zip(topk_weights[t].tolist(), topk_ids[t].tolist()):
                if self.expert_map is not None:
                    e = int(self.expert_map[e])
                    if e < 0:
                        continue
                gate_up = act_quant(x[t].float()) @ self.deq13[e].t()
                out[t] += w * (act_quant(F.silu(gate_up[:I]) * gate_up[I:]) @ self.deq2[e].t())
        return out


SPECS13 = [QuantSpec(2, 32), QuantSpec(3, 32, sym=True), QuantSpec(4, 64), QuantSpec(8, 32), QuantSpec(2, 32)]
SPECS2 = [QuantSpec(2, 32), QuantSpec(4, 32), QuantSpec(4, 32), QuantSpec(8, 96, sym=True), QuantSpec(3, 32)]


def _routing(tokens, experts, top_k=2, seed=0, skew=False):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(tokens, experts, generator=gen)
    if skew:  # expert imbalance: most tokens go to expert 0
        logits[:, 0] += 4
    weights, ids = torch.softmax(logits, -1).topk(top_k, dim=-1)
    return (weights / weights.sum(-1, keepdim=True)).float(), ids.to(torch.int32)


@pytest.mark.parametrize("tokens, skew", [(1, False), (7, False), (33, True)])
def test_mixed_width_experts_match_naive(tokens, skew):
    layer = FakeLayer(SPECS13, SPECS2)
    x = torch.randn(tokens, H)
    topk_weights, topk_ids = _routing(tokens, len(SPECS13), skew=skew)
    kernel = DequantExpertsKernel(ExpertsConfig(tuple(SPECS13), tuple(SPECS2), H, I, torch.float32))
    out = kernel.apply(layer, x, topk_weights, topk_ids)
    torch.testing.assert_close(out, layer.naive(x, topk_weights, topk_ids), rtol=1e-4, atol=1e-4)
    expected = torch.bincount(topk_ids.flatten().long(), minlength=len(SPECS13))
    assert torch.equal(layer.moemix_routed_tokens, expected)  # the usage profile serving collects


def test_expert_parallel_map_skips_remote_experts():
    layer = FakeLayer(SPECS13[:3], SPECS2[:3])
    layer.expert_map = torch.tensor([-1, -1, 0, 1, 2, -1], dtype=torch.int32)  # 6 global experts, 3 local
    x = torch.randn(9, H)
    topk_weights, topk_ids = _routing(9, 6, seed=3)
    out = DequantExpertsKernel(None).apply(layer, x, topk_weights, topk_ids)
    torch.testing.assert_close(out, layer.naive(x, topk_weights, topk_ids), rtol=1e-4, atol=1e-4)
    global_counts = torch.bincount(topk_ids.flatten().long(), minlength=6)
    assert layer.moemix_routed_tokens.tolist() == global_counts[2:5].tolist()  # only this rank's experts


def test_moe_op_compiles_fullgraph_and_runs_bf16():
    layer = FakeLayer(SPECS13, SPECS2)
    kernel = DequantExpertsKernel(None)
    compiled = torch.compile(lambda x, w, i: kernel.apply(layer, x, w, i) * 1.0, fullgraph=True, dynamic=True)
    for tokens in (3, 11):
        x = torch.randn(tokens, H)
        w, i = _routing(tokens, len(SPECS13), seed=tokens)
        torch.testing.assert_close(compiled(x, w, i), layer.naive(x, w, i), rtol=1e-4, atol=1e-4)
    xb = torch.randn(5, H).to(torch.bfloat16)
    w, i = _routing(5, len(SPECS13))
    out = kernel.apply(layer, xb, w, i)
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
    assert choose_experts_kernel(ExpertsConfig((QuantSpec(2),), (QuantSpec(2),), 128, 128, torch.bfloat16),
                                 torch.device("cpu")) is DequantExpertsKernel
    monkeypatch.setenv("MOEMIX_DISABLED_KERNELS", "NativeCpuLinearKernel,DequantLinearKernel")
    with pytest.raises(ValueError, match="DequantLinearKernel: disabled by MOEMIX_DISABLED_KERNELS"):
        choose_linear_kernel(config, torch.device("cpu"))


def test_what_serves_is_said_and_a_reference_fallback_explained(monkeypatch):
    from vllm_moemix.routing import describe_served, reference_fallback_reason

    native = {"experts": {"NativeCpuExpertsKernel (avx2)": 4}, "linears": {"NativeCpuLinearKernel (avx2)": 8}}
    assert describe_served(native) == ("experts: NativeCpuExpertsKernel (avx2) x4; "
                                       "linears: NativeCpuLinearKernel (avx2) x8")
    assert reference_fallback_reason(native) is None
    monkeypatch.setenv("MOEMIX_CPU_ISA", "sse2")
    slow = {"experts": {"DequantExpertsKernel": 4}, "linears": {}}
    assert describe_served(slow) == "experts: DequantExpertsKernel x4"
    assert reference_fallback_reason(slow).startswith("MOEMIX_CPU_ISA=sse2 names no variant")
