"""Shared test helpers: mixed-width experts laid out exactly as the MoE method lays them out, the one naive
MoE reference every kernel is checked against, and routing."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from vllm_moemix.config.spec import QuantSpec
from vllm_moemix.layers.kernels.base import ExpertsConfig
from vllm_moemix.layers.layout import ExpertsLayout
from vllm_moemix.quant.rtn import quantize_rtn

H, I = 64, 96
# w13 and w2 of one expert in different width groups; 2/3/4/8 bits, groups 32/64/96, sym and asym.
SPECS13 = [QuantSpec(2, 32), QuantSpec(3, 32, sym=True), QuantSpec(4, 64), QuantSpec(8, 32), QuantSpec(2, 32)]
SPECS2 = [QuantSpec(2, 32), QuantSpec(4, 32), QuantSpec(4, 32), QuantSpec(8, 96, sym=True), QuantSpec(3, 32)]


class MixedExperts(torch.nn.Module):
    """RTN-quantized random experts in an `ExpertsLayout` (what `MoeMixMoEMethod.create_weights` builds and
    the loader fills), with their dequantized weights kept for the naive reference."""

    def __init__(self, w13_specs=SPECS13, w2_specs=SPECS2, seed=0, hidden=H, inter=I):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        e = len(w13_specs)
        self.hidden, self.inter = hidden, inter
        self.layout = ExpertsLayout.build(list(w13_specs), list(w2_specs), hidden, inter)
        self.layout.register(self)
        self.expert_map = None
        floats = {
            "w13": torch.randn(e, 2 * inter, hidden, generator=gen) * 0.2,
            "w2": torch.randn(e, hidden, inter, generator=gen) * 0.2,
        }
        self.dequantized = {"w13": [], "w2": []}
        for proj, specs in (("w13", w13_specs), ("w2", w2_specs)):
            for expert, spec in enumerate(specs):
                qw = quantize_rtn(floats[proj][expert], spec)
                self.layout.put(self, proj, expert, qw.qweight, qw.scales, qw.qzeros)
                self.dequantized[proj].append(qw.dequantize())

    def config(self, act_dtype=torch.float32) -> ExpertsConfig:
        return self.layout.kernel_config(act_dtype)

    def naive(self, x, topk_weights, topk_ids, act_quant=lambda v: v):
        """The naive MoE over this layer's dequantized experts, honouring its expert-parallel map."""
        ids = topk_ids if self.expert_map is None else self.expert_map[topk_ids.long()]
        return naive_moe(x, topk_weights, ids, self.dequantized["w13"], self.dequantized["w2"], act_quant)


def naive_moe(x, topk_weights, ids, w13s, w2s, act_quant=lambda v: v):
    """The one naive MoE reference: token by token, expert by expert, in float32. `ids` [T, k] index `w13s` /
    `w2s` (nn.Linear layout [N, K]); -1 contributes nothing. `act_quant` models a kernel's activation
    quantization (applied to x and to the SwiGLU output)."""
    out = torch.zeros(x.shape[0], x.shape[1])
    for t in range(x.shape[0]):
        for w, e in zip(topk_weights[t].tolist(), ids[t].tolist()):
            if e < 0:
                continue
            gate_up = act_quant(x[t].float()) @ w13s[e].float().t()
            inter = gate_up.shape[0] // 2
            h = F.silu(gate_up[:inter]) * gate_up[inter:]
            out[t] += w * (act_quant(h) @ w2s[e].float().t())
    return out


def run_experts(kernel, layer: torch.nn.Module, x, topk_weights, topk_ids):
    """What `MoeMixMoEMethod.apply` does: route (map + count) once, then the kernel computes."""
    return kernel.apply(layer, x, topk_weights, ExpertsLayout.route(layer, topk_ids))


def routing(tokens, experts, top_k=2, seed=0, skew=False):
    """Normalised top-k router output; `skew` sends most tokens to expert 0 (expert imbalance)."""
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(tokens, experts, generator=gen)
    if skew:
        logits[:, 0] += 4
    weights, ids = torch.softmax(logits, -1).topk(top_k, dim=-1)
    return (weights / weights.sum(-1, keepdim=True)).float(), ids.to(torch.int32)
