"""Shared test helpers: mixed-width experts laid out exactly as the MoE method lays them out, the one naive
MoE reference every kernel is checked against, and routing."""

from __future__ import annotations

import torch

from vllm_moemix.config.spec import QuantSpec
from vllm_moemix.layers.kernels.base import ExpertsConfig
from vllm_moemix.layers.layout import ExpertsLayout
from vllm_moemix.quant.rtn import quantize_rtn

H, I = 64, 96
# w13 and w2 of one expert in different width groups; 2/3/4/8 bits, groups 32/64/96, sym and asym.
SPECS13 = [QuantSpec(2, 32), QuantSpec(3, 32, sym=True), QuantSpec(4, 64), QuantSpec(8, 32), QuantSpec(2, 32)]
SPECS2 = [QuantSpec(2, 32), QuantSpec(4, 32), QuantSpec(4, 32), QuantSpec(8, 96, sym=True), QuantSpec(3, 32)]


ACTIVATIONS = ("silu", "swigluoai")  # kernels.base.EXPERT_ACTIVATIONS
SWIGLUOAI_ALPHA, SWIGLUOAI_LIMIT = 1.702, 7.0  # gpt_oss/torch/model.py, written out here on purpose
# (activation, bias) cases every experts kernel is checked with: plain SwiGLU experts and GPT-OSS's
ACT_BIAS = [("silu", False), ("silu", True), ("swigluoai", False), ("swigluoai", True)]
X_SCALE = 3.0  # activations of a few units: gate_up leaves [-7, 7] (the swigluoai clamp) on many pairs


def reaches_clamp(layer, x, topk_ids) -> bool:
    """Both swigluoai clamps are hit by some routed pair: gate > 7 and |up| > 7."""
    gate_up = layer.gate_up(x, topk_ids)
    return bool(
        (gate_up[:, : layer.inter] > SWIGLUOAI_LIMIT).any()
        and (gate_up[:, layer.inter :].abs() > SWIGLUOAI_LIMIT).any()
    )


class MixedExperts(torch.nn.Module):
    """RTN-quantized random experts in an `ExpertsLayout` (what `MoeMixMoEMethod.create_weights` builds and
    the loader fills), with their dequantized weights kept for the naive reference. `bias` fills random
    per-expert biases on both projections (GPT-OSS); `activation` is one of ACTIVATIONS."""

    def __init__(self, w13_specs=SPECS13, w2_specs=SPECS2, seed=0, hidden=H, inter=I, activation="silu", bias=False):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        e = len(w13_specs)
        self.hidden, self.inter = hidden, inter
        self.activation = activation
        self.layout = ExpertsLayout.build(list(w13_specs), list(w2_specs), hidden, inter, activation, bias)
        self.layout.register(self)
        self.biases = (None, None)
        if bias:  # large enough that gate_up leaves [-7, 7] (the swigluoai clamp) with activations of a few units
            self.moemix_w13_bias.data = torch.randn(e, 2 * inter, generator=gen) * 3
            self.moemix_w2_bias.data = torch.randn(e, hidden, generator=gen)
            self.biases = (self.moemix_w13_bias.data.clone(), self.moemix_w2_bias.data.clone())
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
        return naive_moe(
            x,
            topk_weights,
            ids,
            self.dequantized["w13"],
            self.dequantized["w2"],
            act_quant,
            self.activation,
            *self.biases,
        )

    def gate_up(self, x, topk_ids):
        """Float gate_up [pairs, 2I] of the routed (token, local expert) pairs: to check a case reaches the clamp."""
        ids = topk_ids if self.expert_map is None else self.expert_map[topk_ids.long()]
        rows = []
        for token, experts in zip(x.float(), ids.tolist()):
            for e in (e for e in experts if e >= 0):
                b13 = self.biases[0][e] if self.biases[0] is not None else 0
                rows.append(token @ self.dequantized["w13"][e].float().t() + b13)
        return torch.stack(rows)


def activation(gate_up, name):
    """The gated activations written out (gate half, then up half), independent of the kernels' code."""
    inter = gate_up.shape[-1] // 2
    gate, up = gate_up[..., :inter], gate_up[..., inter:]
    if name == "silu":
        return gate * torch.sigmoid(gate) * up
    assert name == "swigluoai", name
    gate = torch.minimum(gate, torch.tensor(SWIGLUOAI_LIMIT))
    up = torch.maximum(torch.minimum(up, torch.tensor(SWIGLUOAI_LIMIT)), torch.tensor(-SWIGLUOAI_LIMIT))
    return gate * torch.sigmoid(SWIGLUOAI_ALPHA * gate) * (up + 1)


def naive_moe(x, topk_weights, ids, w13s, w2s, act_quant=lambda v: v, act="silu", b13s=None, b2s=None):
    """The one naive MoE reference: token by token, expert by expert, in float32. `ids` [T, k] index `w13s` /
    `w2s` (nn.Linear layout [N, K]) and the optional biases `b13s` [E, 2I] / `b2s` [E, H]; -1 contributes
    nothing. `act` names the gated activation (`activation`). `act_quant` models a kernel's activation
    quantization (applied to x and to the activation's output)."""
    out = torch.zeros(x.shape[0], x.shape[1])
    for t in range(x.shape[0]):
        for w, e in zip(topk_weights[t].tolist(), ids[t].tolist()):
            if e < 0:
                continue
            gate_up = act_quant(x[t].float()) @ w13s[e].float().t()
            if b13s is not None:
                gate_up = gate_up + b13s[e].float()
            down = act_quant(activation(gate_up, act)) @ w2s[e].float().t()
            if b2s is not None:
                down = down + b2s[e].float()
            out[t] += w * down
    return out


def run_experts(kernel, layer: torch.nn.Module, x, topk_weights, topk_ids):
    """What `MoeMixMoEMethod.apply` does: the kernel maps, counts and computes."""
    return kernel.apply(layer, x, topk_weights, topk_ids)


def routing(tokens, experts, top_k=2, seed=0, skew=False):
    """Normalised top-k router output; `skew` sends most tokens to expert 0 (expert imbalance)."""
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(tokens, experts, generator=gen)
    if skew:
        logits[:, 0] += 4
    weights, ids = torch.softmax(logits, -1).topk(top_k, dim=-1)
    return (weights / weights.sum(-1, keepdim=True)).float(), ids.to(torch.int32)
