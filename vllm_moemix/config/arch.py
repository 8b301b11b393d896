"""Which linears of a Hugging Face MoE checkpoint can be quantized, per architecture.

Everything architecture-specific lives in the `ARCHITECTURES` table: module
names, which layers are MoE, expert and shared-expert sizes, the expert
activation and biases, how a checkpoint stores its experts. Adding an
architecture means adding an entry, not code. Routers, shared-expert gates,
embeddings, norms and the LM head are never quantized (vLLM builds them without
a quantization config).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from vllm_moemix.config.spec import PlanError

Shape = Callable[[Any], int]
AttentionLinears = Callable[[Any], tuple[tuple[str, int, int], ...]]  # config -> (name, out, in) under "self_attn"

ROLE_ATTENTION = "attention"
ROLE_EXPERT = "expert"
ROLE_SHARED = "shared_expert"
ROLE_DENSE = "dense_mlp"


def _head_dim(c: Any) -> int:
    return getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads


@dataclass(frozen=True)
class Mlp:
    """A gated MLP: gate and up read the hidden state, down writes it back."""

    prefix: str  # relative to the decoder layer, e.g. "mlp.shared_expert"
    gate: str
    up: str
    down: str
    intermediate: Shape


@dataclass(frozen=True)
class StackedExperts:
    """Checkpoints that store a layer's experts as two 3-D tensors (GPT-OSS): `gate_up` [E, hidden, 2 x inter]
    with gate and up interleaved column by column, `down` [E, inter, hidden] (both input-major). moemix reads
    them as per-expert linears (`checkpoint/source.py` views) and writes them per expert, quantized."""

    gate_up: str = "gate_up_proj"
    down: str = "down_proj"

    def bias_names(self, prefix: str) -> tuple[str, str]:
        """The gate_up (interleaved like its weight) and down bias tensors of the experts under `prefix`."""
        return f"{prefix}.{self.gate_up}_bias", f"{prefix}.{self.down}_bias"

    def expert_view(self, stacked: torch.Tensor, expert: int, part: str) -> torch.Tensor:
        """One expert's gate / up / down weight in nn.Linear layout [out, in]: a view of its stacked tensor."""
        w = stacked[expert]
        if part == "gate":
            return w[:, 0::2].t()
        if part == "up":
            return w[:, 1::2].t()
        return w.t()

    def expert_weight(self, stacked: torch.Tensor, expert: int, part: str) -> torch.Tensor:
        return self.expert_view(stacked, expert, part).contiguous()

    def stack(self, gates: list[torch.Tensor], ups: list[torch.Tensor], downs: list[torch.Tensor]):
        """The inverse of `expert_weight`: per-expert [out, in] weights back to the stacked tensors."""
        gate, up = torch.stack(gates).transpose(1, 2), torch.stack(ups).transpose(1, 2)
        gate_up = torch.stack([gate, up], dim=-1).flatten(-2)  # interleave: g0 u0 g1 u1 ...
        return gate_up.contiguous(), torch.stack(downs).transpose(1, 2).contiguous()


@dataclass(frozen=True)
class Architecture:
    name: str
    model_types: tuple[str, ...]
    experts: Mlp  # prefix is the expert container, e.g. "block_sparse_moe.experts"
    router: str  # router linear under the decoder layer, e.g. "block_sparse_moe.gate"
    num_experts: Shape
    is_moe_layer: Callable[[Any, int], bool]
    attention: AttentionLinears = lambda c: ()
    attention_fused: Callable[[Any], tuple[tuple[str, ...], ...]] = lambda c: (("q_proj", "k_proj", "v_proj"),)
    shared_expert: Mlp | None = None
    dense_mlp: Mlp | None = None  # used by layers that are not MoE
    hf_renames: tuple[tuple[str, str], ...] = ()  # checkpoint -> transformers module path pieces
    expert_activation: str = "silu"  # one of config.activations.EXPERT_ACTIVATIONS
    expert_bias: bool = False  # biases on both expert projections (stacked checkpoints: StackedExperts.bias_names)
    stacked_experts: StackedExperts | None = None  # None: one tensor per expert linear

    def hf_path(self, name: str) -> str:
        """Where a checkpoint module lives in transformers' own module tree (they may differ)."""
        for ckpt, hf in self.hf_renames:
            name = name.replace(ckpt, hf)
        return name


@dataclass(frozen=True)
class LinearInfo:
    """One quantizable linear of a concrete model."""

    name: str  # checkpoint name without ".weight"
    out_features: int
    in_features: int
    role: str
    layer: int
    expert: int | None = None
    fused_with: tuple[str, ...] = field(default=())  # sibling names vLLM fuses with this one


def llama_attention(c: Any) -> tuple[tuple[str, int, int], ...]:
    """q/k/v/o with grouped KV heads (Mixtral, Qwen, OLMoE, GLM-4.5, GPT-OSS; biases are not our concern)."""
    q, kv = c.num_attention_heads * _head_dim(c), c.num_key_value_heads * _head_dim(c)
    return (
        ("q_proj", q, c.hidden_size),
        ("k_proj", kv, c.hidden_size),
        ("v_proj", kv, c.hidden_size),
        ("o_proj", c.hidden_size, q),
    )


def mla_attention(c: Any) -> tuple[tuple[str, int, int], ...]:
    """DeepSeek-V2/V3 multi-head latent attention: q through a low-rank pair when `q_lora_rank` is set
    (V3, V2, Kimi-K2), one `q_proj` otherwise (V2-Lite, Moonlight-style small models)."""
    heads, qk = c.num_attention_heads, c.qk_nope_head_dim + c.qk_rope_head_dim
    if c.q_lora_rank is None:
        query = (("q_proj", heads * qk, c.hidden_size),)
    else:
        query = (("q_a_proj", c.q_lora_rank, c.hidden_size), ("q_b_proj", heads * qk, c.q_lora_rank))
    return query + (
        ("kv_a_proj_with_mqa", c.kv_lora_rank + c.qk_rope_head_dim, c.hidden_size),
        ("kv_b_proj", heads * (c.qk_nope_head_dim + c.v_head_dim), c.kv_lora_rank),
        ("o_proj", c.hidden_size, heads * c.v_head_dim),
    )


def mla_fused(c: Any) -> tuple[tuple[str, ...], ...]:
    """vLLM fuses q_a_proj with kv_a_proj_with_mqa (`fused_qkv_a_proj`) when q has a low-rank pair."""
    return () if c.q_lora_rank is None else (("q_a_proj", "kv_a_proj_with_mqa"),)


def _deepseek_sparse(c: Any, layer: int) -> bool:
    """DeepSeek / GLM-4.5: the first `first_k_dense_replace` layers are dense, then every `moe_layer_freq`-th."""
    return layer >= c.first_k_dense_replace and layer % getattr(c, "moe_layer_freq", 1) == 0


def _shared_experts_inter(c: Any) -> int:
    return c.moe_intermediate_size * c.n_shared_experts


DEEPSEEK_MOE = dict(
    experts=Mlp("mlp.experts", "gate_proj", "up_proj", "down_proj", lambda c: c.moe_intermediate_size),
    router="mlp.gate",
    num_experts=lambda c: c.n_routed_experts,
    is_moe_layer=_deepseek_sparse,
    shared_expert=Mlp("mlp.shared_experts", "gate_proj", "up_proj", "down_proj", _shared_experts_inter),
    dense_mlp=Mlp("mlp", "gate_proj", "up_proj", "down_proj", lambda c: c.intermediate_size),
)
"""The MoE block DeepSeek-V2/V3 and GLM-4.5 share: routed + shared experts, dense first layers, `mlp.gate`."""


def _qwen_sparse(c: Any, layer: int) -> bool:
    return (
        layer not in (getattr(c, "mlp_only_layers", None) or [])
        and c.num_experts > 0
        and (layer + 1) % c.decoder_sparse_step == 0
    )


ARCHITECTURES: dict[str, Architecture] = {
    a.name: a
    for a in (
        Architecture(
            name="mixtral",
            model_types=("mixtral",),
            attention=llama_attention,
            experts=Mlp("block_sparse_moe.experts", "w1", "w3", "w2", lambda c: c.intermediate_size),
            router="block_sparse_moe.gate",
            hf_renames=(("block_sparse_moe.", "mlp."),),  # transformers >= 5 renames on load
            num_experts=lambda c: c.num_local_experts,
            is_moe_layer=lambda c, layer: True,
        ),
        Architecture(
            name="qwen2_moe",
            model_types=("qwen2_moe",),
            attention=llama_attention,
            experts=Mlp("mlp.experts", "gate_proj", "up_proj", "down_proj", lambda c: c.moe_intermediate_size),
            router="mlp.gate",
            num_experts=lambda c: c.num_experts,
            is_moe_layer=_qwen_sparse,
            shared_expert=Mlp(
                "mlp.shared_expert", "gate_proj", "up_proj", "down_proj", lambda c: c.shared_expert_intermediate_size
            ),
            dense_mlp=Mlp("mlp", "gate_proj", "up_proj", "down_proj", lambda c: c.intermediate_size),
        ),
        Architecture(
            name="qwen3_moe",
            model_types=("qwen3_moe",),
            attention=llama_attention,
            experts=Mlp("mlp.experts", "gate_proj", "up_proj", "down_proj", lambda c: c.moe_intermediate_size),
            router="mlp.gate",
            num_experts=lambda c: c.num_experts,
            is_moe_layer=_qwen_sparse,
            dense_mlp=Mlp("mlp", "gate_proj", "up_proj", "down_proj", lambda c: c.intermediate_size),
        ),
        Architecture(
            name="olmoe",
            model_types=("olmoe",),
            attention=llama_attention,
            experts=Mlp("mlp.experts", "gate_proj", "up_proj", "down_proj", lambda c: c.intermediate_size),
            router="mlp.gate",
            num_experts=lambda c: c.num_experts,
            is_moe_layer=lambda c, layer: True,
        ),
        Architecture(
            name="deepseek_v2",
            model_types=("deepseek_v2", "deepseek_v3", "kimi_k2"),
            attention=mla_attention,
            attention_fused=mla_fused,
            **DEEPSEEK_MOE,
        ),
        Architecture(name="glm4_moe", model_types=("glm4_moe",), attention=llama_attention, **DEEPSEEK_MOE),
        Architecture(
            name="gpt_oss",
            model_types=("gpt_oss",),
            attention=llama_attention,
            experts=Mlp("mlp.experts", "gate_proj", "up_proj", "down_proj", lambda c: c.intermediate_size),
            router="mlp.router",
            num_experts=lambda c: c.num_local_experts,
            is_moe_layer=lambda c, layer: True,
            expert_activation="swigluoai",
            expert_bias=True,
            stacked_experts=StackedExperts(),
        ),
    )
}

RELATED_MODEL_TYPES = {
    "qwen3_next": "qwen3_moe",
    "qwen3_vl_moe": "qwen3_moe",
    "deepseek_v32": "deepseek_v2",
    "deepseek": "deepseek_v2",
    "glm4v_moe": "glm4_moe",
    "glm4_moe_lite": "glm4_moe",
    "phimoe": "mixtral",
    "granitemoe": "mixtral",
}
"""MoE model types moemix does not serve, and the supported family a user could compare them with."""


def architecture_for(config: Any) -> Architecture:
    model_type = getattr(config, "model_type", None)
    for arch in ARCHITECTURES.values():
        if model_type in arch.model_types:
            return arch
    known = sorted(t for a in ARCHITECTURES.values() for t in a.model_types)
    nearest = RELATED_MODEL_TYPES.get(model_type)
    hint = f" (nearest supported family: {nearest}; its module names or routing differ)" if nearest else ""
    raise PlanError(f"unsupported architecture model_type={model_type!r}{hint}; supported: {known}")


def _mlp_linears(mlp: Mlp, base: str, config: Any, role: str, layer: int, expert: int | None) -> list[LinearInfo]:
    inter, hidden = mlp.intermediate(config), config.hidden_size
    gate, up, down = (f"{base}.{n}" for n in (mlp.gate, mlp.up, mlp.down))
    return [
        LinearInfo(gate, inter, hidden, role, layer, expert, (gate, up)),
        LinearInfo(up, inter, hidden, role, layer, expert, (gate, up)),
        LinearInfo(down, hidden, inter, role, layer, expert),
    ]


def quantizable_linears(config: Any) -> dict[str, LinearInfo]:
    """Every linear the plan may assign a width to, with the shape the config implies."""
    arch = architecture_for(config)
    out: list[LinearInfo] = []
    for layer in range(config.num_hidden_layers):
        base = f"model.layers.{layer}"
        fused = {n: tuple(f"{base}.self_attn.{m}" for m in g) for g in arch.attention_fused(config) for n in g}
        for name, out_f, in_f in arch.attention(config):
            out.append(
                LinearInfo(
                    f"{base}.self_attn.{name}",
                    out_f,
                    in_f,
                    ROLE_ATTENTION,
                    layer,
                    None,
                    fused.get(name, ()),
                )
            )
        if arch.is_moe_layer(config, layer):
            for e in range(arch.num_experts(config)):
                out += _mlp_linears(arch.experts, f"{base}.{arch.experts.prefix}.{e}", config, ROLE_EXPERT, layer, e)
            if arch.shared_expert is not None:
                out += _mlp_linears(
                    arch.shared_expert, f"{base}.{arch.shared_expert.prefix}", config, ROLE_SHARED, layer, None
                )
        elif arch.dense_mlp is not None:
            out += _mlp_linears(arch.dense_mlp, f"{base}.{arch.dense_mlp.prefix}", config, ROLE_DENSE, layer, None)
    return {info.name: info for info in out}
