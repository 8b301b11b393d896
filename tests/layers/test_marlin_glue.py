"""Marlin glue on a CPU-only machine: partitioning, expert maps, repack calls and the partial-sum wiring.

vLLM's CUDA ops are replaced by fakes that check the arguments vLLM's own GPTQ-Marlin MoE path would pass
(size_k, size_n, num_bits) and by a float reference for `fused_marlin_moe`, so the glue is tested end to
end against MixedExperts's naive math; the CUDA kernels themselves run only on a GPU.
"""

import pytest
import torch

from tests.support import ACT_BIAS, X_SCALE, MixedExperts, naive_moe, routing, run_experts
from vllm_moemix.config.spec import QuantSpec
from vllm_moemix.layers.kernels import marlin
from vllm_moemix.layers.kernels.base import ExpertsConfig
from vllm_moemix.layers.layout import routed_tokens
from vllm_moemix.quant import packing
from vllm_moemix.quant.tensors import dequantize_kn

H, I = 64, 96  # MixedExperts's shapes (too small for real Marlin tiles: the shape rule is patched where needed)
S4, S4_SYM, S8_SYM, S8, S2 = (
    QuantSpec(4, 32),
    QuantSpec(4, 32, sym=True),
    QuantSpec(8, 32, sym=True),
    QuantSpec(8, 32),
    QuantSpec(2, 32),
)


def test_pair_reasons():
    assert marlin.marlin_pair_reason(S4, S4, 4096, 14336) is None
    assert marlin.marlin_pair_reason(S8_SYM, S8_SYM, 2048, 768) is None
    assert "differ" in marlin.marlin_pair_reason(S4, S2, 4096, 14336)
    assert "Marlin runs 4 and 8" in marlin.marlin_pair_reason(S2, S2, 4096, 14336)
    assert "uint8b128" in marlin.marlin_pair_reason(S8, S8, 4096, 14336)
    assert "group size 96" in marlin.marlin_pair_reason(QuantSpec(4, 96), QuantSpec(4, 96), 4096, 14304)
    assert "multiple of 128" in marlin.marlin_pair_reason(S4, S4, 4000, 14336)


def _config(w13, w2, hidden=4096, inter=14336):
    return ExpertsConfig(tuple(w13), tuple(w2), hidden, inter, torch.bfloat16)


def test_partitions_follow_spec_pairs_not_width_groups():
    parts = marlin.partition_experts(_config([S4, S4, S2, S4, S8_SYM], [S4, S2, S2, S4, S8_SYM]))
    assert [(p.experts, p.marlin) for p in parts] == [([0, 3], True), ([1], False), ([2], False), ([4], True)]


def test_partition_maps_local_experts_and_a_sentinel_for_other_ranks():
    part = marlin.Partition(S4, S4, experts=[0, 2], marlin=True)
    assert marlin.partition_expert_map(part, 3).tolist() == [0, -1, 1, -1]  # 3 local experts + "elsewhere"


def test_can_implement_reasons(monkeypatch):
    config = _config([S4, S2], [S4, S2])
    assert marlin.MarlinExpertsKernel.can_implement(config, torch.device("cpu")) == (
        False,
        "Marlin runs on CUDA, not cpu",
    )
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    assert "capability" in marlin.MarlinExpertsKernel.can_implement(config, torch.device("cuda"))[1]
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert marlin.MarlinExpertsKernel.can_implement(config, torch.device("cuda")) == (True, None)
    ok, why = marlin.MarlinExpertsKernel.can_implement(_config([S2, S8], [S2, S8]), torch.device("cuda"))
    assert not ok and "Marlin runs 4 and 8" in why and "uint8b128" in why


class FakeVllm:
    """Stands in for vLLM's CUDA ops: records repack arguments, keeps tensors in our layout."""

    def __init__(self):
        self.repacks = []
        self.bias_permutes = []
        self.activations = set()

    def marlin_permute_bias(self, b):
        """vLLM's permutes columns within blocks of 32; order is kept here (the partial sums are checked)."""
        assert b.dim() == 1 and b.numel() % 32 == 0
        self.bias_permutes.append((b.numel(), b.dtype))
        return b.clone()

    def gptq_marlin_moe_repack(self, q, size_k, size_n, num_bits):
        assert q.dtype == torch.int32 and q.shape[1] * 32 // num_bits == size_k and q.shape[2] == size_n
        self.repacks.append((q.shape[0], size_k, size_n, num_bits))
        return q.clone()

    @staticmethod
    def marlin_moe_permute_scales(s, size_k, size_n, group_size):
        assert s.shape[1:] == (size_k // group_size, size_n)
        return s.clone()

    @staticmethod
    def marlin_zero_points(z, size_k, size_n, num_bits):
        """Like vLLM's: packed along N into int32 [size_k, size_n * bits / 32] (order kept, no permutation)."""
        assert z.shape == (size_k, size_n) and z.dtype == torch.int32
        return packing.pack(z.t().contiguous(), num_bits).t().contiguous()

    def fused_marlin_moe(
        self,
        x,
        w1,
        w2,
        b1,
        b2,
        s1,
        s2,
        topk_weights,
        topk_ids,
        quant_type_id,
        global_num_experts,
        expert_map,
        w1_zeros,
        w2_zeros,
        activation,
        activation_config=None,
    ):
        from vllm.model_executor.layers.fused_moe.activation import ApplyMoEActivationConfig, MoEActivation
        from vllm.scalar_type import ScalarType

        bits = ScalarType.from_id(quant_type_id).size_bits
        assert global_num_experts == expert_map.numel()
        if activation == MoEActivation.SILU:
            assert activation_config is None
            act = "silu"
        else:  # what vLLM computes for it: gate * sigmoid(alpha * gate) * (up + beta), both clamped by the limit
            assert activation == MoEActivation.SWIGLUOAI_UNINTERLEAVE  # halves, not SWIGLUOAI's interleaving
            assert activation_config == ApplyMoEActivationConfig(clamp_limit=7.0, alpha=1.702, beta=1.0)
            act = "swigluoai"
        self.activations.add(act)
        for b in (b1, b2):
            assert b is None or (b.dtype == torch.float16 and b.shape[0] == w1.shape[0])  # the test's act dtype

        def unpack_zeros(z):
            return None if z is None else packing.unpack(z.transpose(1, 2).contiguous(), bits).transpose(1, 2)

        return reference_partition(
            x,
            topk_weights,
            expert_map.long()[topk_ids.long()],
            (w1, s1, unpack_zeros(w1_zeros), bits),
            (w2, s2, unpack_zeros(w2_zeros), bits),
            b1,
            b2,
            act,
        ).to(x.dtype)


def reference_partition(x, topk_weights, slots, w13, w2, b13=None, b2=None, act="silu"):
    """What vLLM's fused_marlin_moe computes for one partition: the naive MoE over its dequantized experts."""

    def experts(q, s, z, bits):
        return [dequantize_kn(q[e], s[e], z[e] if z is not None else None, bits).t() for e in range(q.shape[0])]

    return naive_moe(x, topk_weights, slots, experts(*w13), experts(*w2), act=act, b13s=b13, b2s=b2)


@pytest.mark.parametrize("act, bias", ACT_BIAS)
def test_glue_matches_naive_with_fake_vllm_ops(monkeypatch, act, bias):
    from vllm import _custom_ops as ops
    from vllm.model_executor.layers.fused_moe.experts import marlin_moe
    from vllm.model_executor.layers.quantization.utils import marlin_utils

    from vllm_moemix.layers.kernels import triton_moe

    fake = FakeVllm()
    monkeypatch.setattr(ops, "gptq_marlin_moe_repack", fake.gptq_marlin_moe_repack)
    monkeypatch.setattr(marlin_utils, "marlin_moe_permute_scales", fake.marlin_moe_permute_scales)
    monkeypatch.setattr(marlin_utils, "marlin_zero_points", fake.marlin_zero_points)
    monkeypatch.setattr(marlin_utils, "marlin_permute_bias", fake.marlin_permute_bias)
    monkeypatch.setattr(marlin_moe, "fused_marlin_moe", fake.fused_marlin_moe)
    triton_calls = []

    def triton_partition(x, w, slots, q13, s13, z13, q2, s2, z2, bits13, g13, bits2, g2, bias13, bias2, activation):
        triton_calls.append((activation, bias13 is not None and bias13.dtype == torch.float32))
        return reference_partition(
            x,
            w,
            slots,
            (q13, s13, z13 if z13.numel() else None, bits13),
            (q2, s2, z2 if z2.numel() else None, bits2),
            bias13,
            bias2,
            activation,
        )

    monkeypatch.setattr(triton_moe, "moe_width_group", triton_partition)
    monkeypatch.setattr(
        marlin,
        "marlin_pair_reason",
        lambda w13, w2, h, i: (
            None if (w13.bits == w2.bits and w13.bits in (4, 8) and (w13.sym or w13.bits == 4)) else "not marlin"
        ),
    )

    w13 = [S4, S4_SYM, S2, S4, S8_SYM, S4]
    w2 = [S4, S4_SYM, S2, QuantSpec(3, 32), S8_SYM, S4]
    layer = MixedExperts(w13, w2, activation=act, bias=bias)
    layer.expert_map = torch.tensor([-1, 0, 1, 2, -1, 3, 4, 5], dtype=torch.int32)  # EP: 8 global, 6 local

    def group_bytes(suffixes):
        return sum(
            p.nbytes for n, p in layer.named_parameters() if n.startswith(("w13_g", "w2_g")) and n.endswith(suffixes)
        )

    weights_before, zeros_before = group_bytes(("qweight", "scales")), group_bytes("qzeros")
    config = layer.config(torch.float16)
    assert (config.activation, config.has_bias) == (act, bias)
    assert marlin.MarlinExpertsKernel.supports(config) == (True, None)  # vLLM's Marlin MoE takes both
    kernel = marlin.MarlinExpertsKernel(config)
    kernel.process_weights_after_loading(layer)

    assert [(p.experts, p.marlin) for p in kernel.partitions] == [
        ([0, 5], True),
        ([1], True),
        ([2], False),
        ([3], False),
        ([4], True),
    ]
    assert sorted(fake.repacks) == sorted(
        [(2, H, 2 * I, 4), (2, I, H, 4), (1, H, 2 * I, 4), (1, I, H, 4), (1, H, 2 * I, 8), (1, I, H, 8)]
    )
    parts = [getattr(layer, f"moemix_part_{i}") for i in range(kernel.num_tensors)]
    # Per partition: w13 q/s/z, w2 q/s/z, w13 bias, w2 bias. The partitions replace the width groups: weights
    # and scales keep their bytes; Marlin packs zero points tighter than our uint8; nothing is kept twice.
    assert sum(t.nbytes for i, t in enumerate(parts) if i % 8 in (0, 1, 3, 4)) == weights_before
    assert sum(t.nbytes for i, t in enumerate(parts) if i % 8 in (2, 5)) < zeros_before
    assert not any(n.startswith(("w13_g", "w2_g", "moemix_w")) for n, _ in layer.named_parameters())
    biases = [t for i, t in enumerate(parts) if i % 8 in (6, 7)]
    assert all(t.numel() == 0 for t in biases) != bias
    # Marlin partitions' biases permuted per expert in the activation dtype: 3 partitions, 4 experts, 2 biases
    assert sorted(fake.bias_permutes) == (
        sorted([(2 * I, torch.float16)] * 4 + [(H, torch.float16)] * 4) if bias else []
    )

    x = torch.randn(7, H) * X_SCALE
    topk_weights, topk_ids = routing(7, 8, seed=1)
    out = run_experts(kernel, layer, x, topk_weights, topk_ids)
    expected = layer.naive(x, topk_weights, topk_ids)
    torch.testing.assert_close(out, expected, rtol=1e-3, atol=1e-3 * max(1.0, float(expected.abs().max())))
    assert fake.activations == {act} and {a for a, _ in triton_calls} == {act}
    assert all(float32 == bias for _, float32 in triton_calls)  # Triton partitions keep the float32 biases
    counts = torch.bincount(topk_ids.flatten().long(), minlength=8)
    assert routed_tokens(layer).tolist() == [int(counts[g]) for g in (1, 2, 3, 5, 6, 7)]
