"""Which linears of a Hugging Face MoE checkpoint can be quantized, per architecture.

Everything architecture-specific lives in the `ARCHITECTURES` table: module
names, which layers are MoE, expert and shared-expert sizes. Adding an
architecture (DeepSeek-V2/V3 MLA attention, for one) means adding an entry,
not code. Routers, shared-expert gates, embeddings, norms and the LM head are
never quantized (vLLM builds them without a quantization config).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from vllm_moemix.config.spec import PlanError

Shape = Callable[[Any], int]

ROLE_ATTENTION = "attention"
ROLE_EXPERT = "expert"
ROLE_SHARED = "shared_expert"
ROLE_DENSE = "dense_mlp"


def _head_dim(c: Any) -> int:
    return getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads


def _hidden(c: Any) -> int:
    return c.hidden_size


@dataclass(frozen=True)
class Mlp:
    """A gated MLP: gate and up read the hidden state, down writes it back."""

    prefix: str  # relative to the decoder layer, e.g. "mlp.shared_expert"
    gate: str
    up: str
    down: str
    intermediate: Shape


@dataclass(frozen=True)
class Architecture:
    name: str
    model_types: tuple[str, ...]
    experts: Mlp  # prefix is the expert container, e.g. "block_sparse_moe.experts"
    router: str  # router linear under the decoder layer, e.g. "block_sparse_moe.gate"
    num_experts: Shape
    is_moe_layer: Callable[[Any, int], bool]
    attention: tuple[tuple[str, Shape, Shape], ...] = ()  # (name, out, in) under "self_attn"
    attention_fused: tuple[tuple[str, ...], ...] = (("q_proj", "k_proj", "v_proj"),)
    shared_expert: Mlp | None = None
    dense_mlp: Mlp | None = None  # used by layers that are not MoE
    hf_renames: tuple[tuple[str, str], ...] = ()  # checkpoint -> transformers module path pieces

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


LLAMA_ATTENTION = (
    ("q_proj", lambda c: c.num_attention_heads * _head_dim(c), _hidden),
    ("k_proj", lambda c: c.num_key_value_heads * _head_dim(c), _hidden),
    ("v_proj", lambda c: c.num_key_value_heads * _head_dim(c), _hidden),
    ("o_proj", _hidden, lambda c: c.num_attention_heads * _head_dim(c)),
)


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
            attention=LLAMA_ATTENTION,
            experts=Mlp("block_sparse_moe.experts", "w1", "w3", "w2", lambda c: c.intermediate_size),
            router="block_sparse_moe.gate",
            hf_renames=(("block_sparse_moe.", "mlp."),),  # transformers >= 5 renames on load
            num_experts=lambda c: c.num_local_experts,
            is_moe_layer=lambda c, layer: True,
        ),
        Architecture(
            name="qwen2_moe",
            model_types=("qwen2_moe",),
            attention=LLAMA_ATTENTION,
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
            attention=LLAMA_ATTENTION,
            experts=Mlp("mlp.experts", "gate_proj", "up_proj", "down_proj", lambda c: c.moe_intermediate_size),
            router="mlp.gate",
            num_experts=lambda c: c.num_experts,
            is_moe_layer=_qwen_sparse,
            dense_mlp=Mlp("mlp", "gate_proj", "up_proj", "down_proj", lambda c: c.intermediate_size),
        ),
        Architecture(
            name="olmoe",
            model_types=("olmoe",),
            attention=LLAMA_ATTENTION,
            experts=Mlp("mlp.experts", "gate_proj", "up_proj", "down_proj", lambda c: c.intermediate_size),
            router="mlp.gate",
            num_experts=lambda c: c.num_experts,
            is_moe_layer=lambda c, layer: True,
        ),
    )
}


def architecture_for(config: Any) -> Architecture:
    model_type = getattr(config, "model_type", None)
    for arch in ARCHITECTURES.values():
        if model_type in arch.model_types:
            return arch
    known = sorted(t for a in ARCHITECTURES.values() for t in a.model_types)
    raise PlanError(f"unsupported architecture model_type={model_type!r}; supported: {known}")


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
        fused = {n: tuple(f"{base}.self_attn.{m}" for m in g) for g in arch.attention_fused for n in g}
        for name, out_f, in_f in arch.attention:
            out.append(
                LinearInfo(
                    f"{base}.self_attn.{name}",
                    out_f(config),
                    in_f(config),
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
