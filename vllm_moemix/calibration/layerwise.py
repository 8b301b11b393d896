"""Calibration: run the float model over text one decoder layer at a time and record
what planners and GPTQ need.

Memory stays near one decoder layer plus the calibration activations: the
Hugging Face model is built on the meta device and each layer is materialized
from the safetensors shards, run, measured and freed before the next.

Per layer we record
  - tokens and routing-weight mass per expert (usage),
  - input second moments per linear: `gptq` Hessians (mean x x^T) and `loss`
    Hessians (sum of w^2 x x^T over calibration tokens, w the routing weight for
    experts, 1 otherwise) whose trace-form tr(dW H dW^T) is the module's summed
    squared output error: directly comparable across modules,
  - the block's input/output cosine similarity (block importance).

Experts that few calibration tokens reach still get a usable GPTQ Hessian: each
expert also sees *all* tokens (as llm-compressor's MoE calibration context and
MoEQuant's balanced sampling do), and its Hessian is the routed one blended with
the all-token one: (n_e H_routed + a H_all) / (n_e + a), a = ALL_TOKEN_PRIOR.
Their loss Hessians (what the planner's error estimates weigh) get a usage floor: an expert
whose routed mass sum w^2 is below USAGE_FLOOR x the layer's average is topped up with the
all-token statistics, so an expert that calibration rarely reaches but serving may route to
is not starved to 2 bits for free.

Memory per MoE layer beyond the layer's float32 weights and the activations:
float32 accumulators of 2 H^2 + 3 I^2 per expert (H hidden, I expert intermediate).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from vllm_moemix.checkpoint.source import SafetensorsSource
from vllm_moemix.config.arch import ROLE_EXPERT, architecture_for, quantizable_linears
from vllm_moemix.config.spec import PlanError
from vllm_moemix.quant.gptq import HessianAccumulator

ALL_TOKEN_PRIOR = 64.0
USAGE_FLOOR = 0.25
DEFAULT_CALIB = Path(__file__).resolve().parents[2] / "models" / "calib.txt"


@dataclass
class LayerStats:
    layer: int
    block_cosine: float = 1.0
    expert_tokens: torch.Tensor | None = None  # [E] tokens routed to each expert
    expert_mass: torch.Tensor | None = None  # [E] sum of routing weights
    gptq_hessians: dict[str, torch.Tensor] = field(default_factory=dict)  # linear -> H for GPTQ
    loss_hessians: dict[str, torch.Tensor] = field(default_factory=dict)  # linear -> H for error estimates


def calibration_samples(tokenizer, text_paths: list[Path], num_samples: int = 32, seq_len: int = 256) -> torch.Tensor:
    """Token windows [num_samples, seq_len] spread evenly over the given text files."""
    text = "\n\n".join(Path(p).read_text(errors="replace") for p in text_paths)
    ids = torch.tensor(tokenizer(text).input_ids, dtype=torch.int64)
    if len(ids) < seq_len + 1:
        raise PlanError(
            f"calibration text {', '.join(map(str, text_paths))} has {len(ids)} tokens; "
            f"need at least {seq_len + 1} (give more or longer --calib files)"
        )
    starts = torch.linspace(0, len(ids) - seq_len - 1, num_samples).long()
    return torch.stack([ids[s : s + seq_len] for s in starts])


class LayerwiseModel:
    """The float model, one decoder layer in memory at a time."""

    def __init__(self, model_dir: str | Path):
        from transformers import AutoConfig, AutoModelForCausalLM

        self.dir = Path(model_dir)
        self.config = AutoConfig.from_pretrained(self.dir)
        self.config._attn_implementation = "sdpa"  # mask=None is then causal
        self.arch = architecture_for(self.config)
        self.linears = quantizable_linears(self.config)
        self.source = SafetensorsSource(self.dir)
        with torch.device("meta"):
            self.skeleton = AutoModelForCausalLM.from_config(self.config, dtype=torch.float32)
        inner = self.skeleton.model
        self.rotary = type(inner.rotary_emb)(config=self.config)
        self.embed = torch.nn.Embedding.from_pretrained(self.source.get("model.embed_tokens.weight").float())

    def load_layer(self, index: int) -> torch.nn.Module:
        layer = self.skeleton.model.layers[index]
        layer.to_empty(device="cpu")
        prefix = f"model.layers.{index}."
        experts = self.arch.experts
        from_hf = {self.arch.hf_path(n): n for n in self.source.names() if n.startswith(prefix)}
        for name, param in layer.named_parameters():
            full = from_hf.get(prefix + name, prefix + name)
            if full in self.source:
                param.data.copy_(self.source.get(full))
            elif name.endswith(("experts.gate_up_proj", "experts.down_proj")):
                base = prefix + experts.prefix
                for e in range(param.shape[0]):
                    if name.endswith("gate_up_proj"):
                        param.data[e].copy_(
                            torch.cat(
                                [
                                    self.source.get(f"{base}.{e}.{experts.gate}.weight"),
                                    self.source.get(f"{base}.{e}.{experts.up}.weight"),
                                ]
                            )
                        )
                    else:
                        param.data[e].copy_(self.source.get(f"{base}.{e}.{experts.down}.weight"))
            else:
                raise KeyError(f"{full}: no tensor in {self.dir} for this parameter")
        for name, buf in layer.named_buffers():
            if buf.is_meta:
                raise KeyError(f"{prefix}{name}: buffer left uninitialized")
        return layer

    def unload_layer(self, index: int) -> None:
        self.skeleton.model.layers[index].to("meta")


def _hook_linears(layer: torch.nn.Module, index: int, model: LayerwiseModel, stats: LayerStats):
    """Pre-hooks on the nn.Linear modules of attention / shared experts / dense MLPs (one per fused group)."""
    handles, groups = [], {}
    prefix = f"model.layers.{index}."
    for name, info in model.linears.items():
        group = info.fused_with or (name,)
        if info.layer != index or info.role == ROLE_EXPERT or group in groups:
            continue
        acc = groups[group] = HessianAccumulator(info.in_features)
        module = layer.get_submodule(model.arch.hf_path(name).removeprefix(prefix))
        handles.append(module.register_forward_pre_hook(lambda _m, args, acc=acc: acc.add(args[0])))

    def finish() -> None:
        for group, acc in groups.items():
            for member in group:
                stats.gptq_hessians[member] = acc.H
                stats.loss_hessians[member] = acc.H * (acc.count / 2)  # mean 2 x x^T -> sum x x^T

    return handles, finish


def _hook_experts(
    layer: torch.nn.Module, index: int, model: LayerwiseModel, stats: LayerStats, usage_floor: float
) -> list:
    """Per-expert statistics from the experts module's inputs: (hidden, top_k_index, top_k_weights)."""
    arch = model.arch
    experts_module = layer.get_submodule(arch.hf_path(arch.experts.prefix))
    num_experts = arch.num_experts(model.config)
    hidden = model.config.hidden_size
    inter = arch.experts.intermediate(model.config)
    names = {
        e: [
            f"model.layers.{index}.{arch.experts.prefix}.{e}.{n}"
            for n in (arch.experts.gate, arch.experts.up, arch.experts.down)
        ]
        for e in range(num_experts)
    }
    sums = {"tokens": torch.zeros(num_experts), "mass": torch.zeros(num_experts), "mass2": torch.zeros(num_experts)}
    acc = {
        e: {
            "r13": torch.zeros(hidden, hidden, dtype=torch.float32),
            "r2": torch.zeros(inter, inter, dtype=torch.float32),
            "w13": torch.zeros(hidden, hidden, dtype=torch.float32),
            "w2": torch.zeros(inter, inter, dtype=torch.float32),
        }
        for e in range(num_experts)
    }
    all13 = torch.zeros(hidden, hidden, dtype=torch.float32)
    all2 = {e: torch.zeros(inter, inter, dtype=torch.float32) for e in range(num_experts)}
    total = {"n": 0}

    def hook(module, args):
        x, top_k_index, top_k_weights = args[0].reshape(-1, hidden).float(), args[1], args[2].float()
        all13.add_(x.t() @ x)
        total["n"] += x.shape[0]
        for e in range(num_experts):
            gate_up = x @ module.gate_up_proj[e].t()
            act = F.silu(gate_up[:, :inter]) * gate_up[:, inter:]
            all2[e].add_(act.t() @ act)
            rows, slots = torch.where(top_k_index == e)
            if rows.numel() == 0:
                continue
            w = top_k_weights[rows, slots].unsqueeze(1)
            xe, ae = x[rows], act[rows]
            sums["tokens"][e] += rows.numel()
            sums["mass"][e] += w.sum().item()
            sums["mass2"][e] += w.pow(2).sum().item()
            acc[e]["r13"].add_(xe.t() @ xe)
            acc[e]["r2"].add_(ae.t() @ ae)
            acc[e]["w13"].add_((xe * w).t() @ (xe * w))
            acc[e]["w2"].add_((ae * w).t() @ (ae * w))

    def finish() -> None:
        n = max(total["n"], 1)
        stats.expert_tokens, stats.expert_mass = sums["tokens"].clone(), sums["mass"].clone()
        floor = usage_floor * float(sums["mass2"].mean())
        for e in range(num_experts):
            top_up = max(0.0, floor - float(sums["mass2"][e])) / n  # per all-token second moment
            n_e = float(sums["tokens"][e])
            blend13 = (acc[e]["r13"] + ALL_TOKEN_PRIOR * all13 / n) / (n_e + ALL_TOKEN_PRIOR)
            blend2 = (acc[e]["r2"] + ALL_TOKEN_PRIOR * all2[e] / n) / (n_e + ALL_TOKEN_PRIOR)
            gate, up, down = names[e]
            for linear in (gate, up):
                stats.gptq_hessians[linear] = 2 * blend13
                stats.loss_hessians[linear] = acc[e]["w13"] + top_up * all13
            stats.gptq_hessians[down] = 2 * blend2
            stats.loss_hessians[down] = acc[e]["w2"] + top_up * all2[e]

    handle = experts_module.register_forward_pre_hook(hook)
    return [handle], finish


def iterate_layers(
    model: LayerwiseModel,
    samples: torch.Tensor,
    batch_size: int = 8,
    progress: bool = True,
    usage_floor: float = USAGE_FLOOR,
) -> Iterator[tuple[int, torch.nn.Module, LayerStats]]:
    """Yield (index, float layer, stats) in order; the layer is freed when the caller moves on."""
    with torch.no_grad():
        hidden = [model.embed(samples[i : i + batch_size]) for i in range(0, len(samples), batch_size)]
        positions = torch.arange(samples.shape[1]).unsqueeze(0)
        cos_sin = model.rotary(hidden[0], positions)
        for index in tqdm(range(model.config.num_hidden_layers), desc="calibrate", unit="layer", disable=not progress):
            layer = model.load_layer(index)
            stats = LayerStats(index)
            handles, finish_linears = _hook_linears(layer, index, model, stats)
            finishers = [finish_linears]
            if model.arch.is_moe_layer(model.config, index):
                more, finish_experts = _hook_experts(layer, index, model, stats, usage_floor)
                handles += more
                finishers.append(finish_experts)
            outputs, cosines = [], []
            for h in hidden:
                out = layer(h, position_embeddings=cos_sin, attention_mask=None, position_ids=positions)
                out = out[0] if isinstance(out, tuple) else out
                cosines.append(F.cosine_similarity(h, out, dim=-1).flatten())
                outputs.append(out)
            for handle in handles:
                handle.remove()
            for finish in finishers:
                finish()
            stats.block_cosine = float(torch.cat(cosines).mean())
            yield index, layer, stats
            model.unload_layer(index)
            hidden = outputs
