"""Calibration: run the float model over text one decoder layer at a time and hand out
what planners and GPTQ need, one input at a time.

Memory is bounded by design, independent of the number of experts: the Hugging Face
model is built on the meta device; each layer is materialized from the safetensors
shards, run over the calibration activations and freed *before* any expert statistics
are built. The MoE block's input (hidden states, routed ids, routing weights) is kept,
and `CalibratedLayer.hessian_batches` then builds the Hessians of a few experts at a
time from it, reading those experts' weights from the shards, and drops them when the
consumer (GPTQ, the planner's error table) moves on.

One Hessian per distinct input, i.e. per planning unit: gate and up (and q/k/v) read the
same input and share it. Two kinds, both [K, K] float32:
  - `gptq`: mean 2 x x^T, what GPTQ minimizes against,
  - `loss` (when asked for): sum of w^2 x x^T over calibration tokens, w the routing weight
    for experts, 1 otherwise, whose trace-form tr(dW H dW^T) is the unit's summed squared
    output error: directly comparable across units.

Experts that few calibration tokens reach still get a usable GPTQ Hessian: each expert
also sees *all* tokens (as llm-compressor's MoE calibration context and MoEQuant's
balanced sampling do), and its Hessian is the routed one blended with the all-token one:
(n_e H_routed + a H_all) / (n_e + a), a = ALL_TOKEN_PRIOR. For the down projection the
all-token statistics come from an evenly spaced sample of PRIOR_SAMPLE tokens (a prior of
weight a = 64 needs no more; all tokens would cost T x I^2 per expert). Loss Hessians get a
usage floor: an expert whose routed mass sum w^2 is below USAGE_FLOOR x the layer's average
is topped up with the all-token statistics, so an expert that calibration rarely reaches but
serving may route to is not starved to 2 bits for free.
"""

from __future__ import annotations

import contextlib
import ctypes
import math
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from vllm_moemix.checkpoint.source import SafetensorsSource
from vllm_moemix.checkpoint.writer import DEFAULT_SHARD_BYTES
from vllm_moemix.config.activations import gated
from vllm_moemix.config.arch import ROLE_EXPERT, Architecture, architecture_for, quantizable_linears
from vllm_moemix.config.spec import PlanError
from vllm_moemix.quant.gptq import HessianAccumulator

ALL_TOKEN_PRIOR = 64.0
PRIOR_SAMPLE = 1024  # 256 measured worse: tiny-mixtral uniform 3-bit KL +10%
USAGE_FLOOR = 0.25
HESSIAN_BATCH_BYTES = 2 << 30
"""Bytes a batch of expert units may need for its Hessians and GPTQ's working copies (a batch holds at least
one unit): this bounds the quantization step's memory, whatever the number of experts."""
M_MMAP_THRESHOLD = -3  # glibc mallopt parameter
DEFAULT_CALIB = Path(__file__).resolve().parents[2] / "models" / "calib.txt"


def unit_working_bytes(in_features: int, out_features: int, with_loss: bool) -> int:
    """Peak bytes of one unit in a batch, float32: five K x K (GPTQ's Hessian, its damped copy, the Cholesky
    factor and its workspace, H^-1's factor; one more with the loss Hessian) and nine weight-sized copies (the
    input, the min/max and clip-searched runs, the clip search's temporaries, the error check). Measured on a
    Qwen3-30B-A3B layer: the GPTQ phase peaks at ~2 GiB with HESSIAN_BATCH_BYTES = 2 GiB."""
    return 4 * (in_features * in_features * (5 + with_loss) + 9 * out_features * in_features)


def return_freed_memory() -> None:
    """Have glibc map every allocation above 4 MiB on its own, so freeing a tensor returns its memory.
    Its default threshold grows up to 32 MiB as large blocks are freed, after which GPTQ's many mid-sized
    temporaries stay in fragmented heaps: measured 7.4 vs 5.6 GiB peak on one Qwen3-30B-A3B layer."""
    try:
        ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, 4 << 20)
    except (OSError, AttributeError):  # not glibc: nothing to tune
        pass


def calibration_device(name: str | torch.device | None) -> torch.device:
    """The device calibration and GPTQ run on: `name`, or CUDA when visible, else CPU; a clear error otherwise."""
    try:
        device = torch.device(name or default_device())
    except RuntimeError:
        raise PlanError(f"device {name!r} is not a torch device; use cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise PlanError(f"device {name!r}: calibration runs on cpu or cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise PlanError(f"device {name!r}: no CUDA device is visible to this torch ({torch.__version__})")
    return device


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


@dataclass
class LayerStats:
    """What a layer's calibration leaves behind once its Hessians are gone: usage and similarity."""

    layer: int
    block_cosine: float = 1.0
    expert_tokens: torch.Tensor | None = None  # [E] tokens routed to each expert
    expert_mass: torch.Tensor | None = None  # [E] sum of routing weights


@dataclass
class HessianBatch:
    """B units with inputs of one width: `units[b]` are the linears reading input b."""

    units: list[tuple[str, ...]]
    gptq: torch.Tensor  # [B, K, K]
    loss: torch.Tensor | None  # [B, K, K], when asked for


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


def linear_weight(root: torch.nn.Module, arch: Architecture, name: str) -> torch.Tensor:
    """The [out, in] weight of checkpoint linear `name` in a transformers module tree (`name` relative to `root`):
    the nn.Linear's weight, or its slice of transformers' fused experts (`gate_up_proj` [E, 2I, H], gate rows then
    up rows; `down_proj` [E, H, I]; stacked checkpoints' own layout for GPT-OSS). A view: writing it writes the
    model."""
    path = arch.hf_path(name)
    try:
        return root.get_submodule(path).weight.data
    except AttributeError:
        pass
    container, expert, part = path.rsplit(".", 2)
    experts, e = root.get_submodule(container), int(expert)
    stacked = arch.stacked_experts
    if stacked is not None:  # GPT-OSS: [E, in, out], gate/up interleaved
        role = {arch.experts.gate: "gate", arch.experts.up: "up", arch.experts.down: "down"}[part]
        tensor = getattr(experts, stacked.down if role == "down" else stacked.gate_up).data
        return stacked.expert_view(tensor, e, role)
    if part == arch.experts.down:
        return experts.down_proj.data[e]
    half = experts.gate_up_proj.shape[1] // 2
    return experts.gate_up_proj.data[e, :half] if part == arch.experts.gate else experts.gate_up_proj.data[e, half:]


class LayerwiseModel:
    """The float model, one decoder layer in memory at a time (on `device`)."""

    def __init__(self, model_dir: str | Path, device: str | torch.device | None = None):
        from transformers import AutoConfig, AutoModelForCausalLM

        return_freed_memory()
        self.dir = Path(model_dir)
        self.device = calibration_device(device)
        self.config = AutoConfig.from_pretrained(self.dir)
        # Experts one at a time on their own weights: the fused implementations copy every expert's weights
        # (measured: 7.7 GB peak for one Qwen3-30B-A3B layer whose float weights take 2.3).
        self.config._experts_implementation = "eager"
        self.arch = architecture_for(self.config)
        self.linears = quantizable_linears(self.config)
        self.source = SafetensorsSource(self.dir).view_stacked_experts(self.config)
        with torch.device("meta"):
            try:
                self.config._attn_implementation = "sdpa"
                self.skeleton = AutoModelForCausalLM.from_config(self.config, dtype=torch.float32)
            except ValueError:  # no SDPA path in transformers for this family (GPT-OSS: attention sinks)
                self.config._attn_implementation = "eager"
                self.skeleton = AutoModelForCausalLM.from_config(self.config, dtype=torch.float32)
        inner = self.skeleton.model
        self.rotary = type(inner.rotary_emb)(config=self.config).to(self.device)
        self.embed = torch.nn.Embedding.from_pretrained(self.source.get("model.embed_tokens.weight").float())

    def weight(self, name: str) -> torch.Tensor:
        """A linear's float32 weight [N, K] on the calibration device, read from the shards."""
        return self.source.get(f"{name}.weight").to(device=self.device, dtype=torch.float32)

    def load_layer(self, index: int) -> torch.nn.Module:
        layer = self.skeleton.model.layers[index]
        layer.to_empty(device=self.device)
        prefix = f"model.layers.{index}."
        from_hf = {self.arch.hf_path(n): n for n in self.source.names() if n.startswith(prefix)}
        fused_experts = []
        for name, param in layer.named_parameters():
            full = from_hf.get(prefix + name, prefix + name)
            if full in self.source:
                param.data.copy_(self.source.get(full))
            elif name.endswith(("experts.gate_up_proj", "experts.down_proj")):
                fused_experts.append(name)
            else:
                raise KeyError(f"{full}: no tensor in {self.dir} for this parameter")
        if fused_experts:  # transformers fuses per-expert checkpoint linears: fill them expert by expert
            for name, info in self.linears.items():
                if info.layer == index and info.role == ROLE_EXPERT:
                    linear_weight(layer, self.arch, name.removeprefix(prefix)).copy_(self.source.get(f"{name}.weight"))
        for name, buf in layer.named_buffers():  # to_empty left them uninitialised (DeepSeek-V3's router bias)
            full = from_hf.get(prefix + name, prefix + name)
            if full not in self.source:
                raise KeyError(f"{full}: no tensor in {self.dir} for this buffer")
            buf.copy_(self.source.get(full))
        return layer

    def expert_activation(self, index: int, e: int) -> Callable[[torch.Tensor], torch.Tensor]:
        """x -> the input of expert e's down projection in layer `index` (its activation and gate/up biases)."""
        arch = self.arch
        base = f"model.layers.{index}.{arch.experts.prefix}"
        w_gate, w_up = (self.weight(f"{base}.{e}.{name}") for name in (arch.experts.gate, arch.experts.up))
        b_gate = b_up = None
        if arch.expert_bias:
            gate_up_bias = self.source.get(arch.stacked_experts.bias_names(base)[0])[e].to(self.device).float()
            b_gate, b_up = gate_up_bias[0::2], gate_up_bias[1::2]

        def act(x: torch.Tensor) -> torch.Tensor:
            gate, up = x @ w_gate.t(), x @ w_up.t()
            if b_gate is not None:
                gate, up = gate + b_gate, up + b_up
            return gated(gate, up, arch.expert_activation)

        return act

    def unload_layer(self, index: int) -> None:
        self.skeleton.model.layers[index].to("meta")

    def attention_mask(self, index: int, seq_len: int) -> torch.Tensor:
        """Additive causal mask [1, 1, S, S] for layer `index`, banded for sliding-window layers (GPT-OSS
        alternates them); explicit, because eager attention treats a missing mask as no mask at all."""
        layer_types = getattr(self.config, "layer_types", None) or []
        window = getattr(self.config, "sliding_window", None)
        sliding = index < len(layer_types) and layer_types[index] == "sliding_attention" and window
        pos = torch.arange(seq_len, device=self.device)
        distance = pos.unsqueeze(1) - pos.unsqueeze(0)  # query - key
        allowed = (distance >= 0) & (distance < window if sliding else True)
        mask = torch.zeros(seq_len, seq_len, device=self.device)
        return mask.masked_fill_(~allowed, torch.finfo(torch.float32).min)[None, None]


class CalibratedLayer:
    """One decoder layer after its calibration forward: usage statistics now, Hessians on demand."""

    def __init__(self, model: LayerwiseModel, index: int, stats: LayerStats):
        self.model, self.index, self.stats = model, index, stats
        self.accumulators: dict[tuple[str, ...], HessianAccumulator] = {}  # attention / shared / dense units
        self.moe_input: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # x [T, H], ids, weights
        self.usage_floor = USAGE_FLOOR

    def units(self) -> list[tuple[str, ...]]:
        """Every unit (linears sharing one input) of this layer, in a fixed order."""
        units = list(self.accumulators)
        if self.moe_input is not None:
            for e in range(self.model.arch.num_experts(self.model.config)):
                gate, up, down = self._expert_names(e)
                units += [(gate, up), (down,)]
        return units

    def hessian_batches(
        self,
        wanted: Callable[[tuple[str, ...]], bool] = lambda unit: True,
        with_loss: bool = True,
        max_bytes: int | None = None,
    ) -> Iterator[HessianBatch]:
        """Hessians of the `wanted` units, a few at a time (each batch one input width, at most `max_bytes`
        of Hessians and GPTQ working set, default HESSIAN_BATCH_BYTES, unless a single unit needs more); nothing
        is kept after a batch is consumed."""
        max_bytes = max_bytes or HESSIAN_BATCH_BYTES
        for unit, acc in self.accumulators.items():
            if wanted(unit):
                loss = acc.H * (acc.count / 2) if with_loss else None  # mean 2 x x^T -> sum x x^T
                yield HessianBatch([unit], acc.H.unsqueeze(0), None if loss is None else loss.unsqueeze(0))
        if self.moe_input is None:
            return
        num_experts = self.model.arch.num_experts(self.model.config)
        hidden = self.model.config.hidden_size
        inter = self.model.arch.experts.intermediate(self.model.config)
        moe = _MoeStatistics(self.moe_input, num_experts, self.usage_floor)
        for width, rows, projection in ((hidden, 2 * inter, "gate_up"), (inter, hidden, "down")):
            chunk = max(1, max_bytes // unit_working_bytes(width, rows, with_loss))
            experts = [e for e in range(num_experts) if wanted(self._expert_unit(e, projection))]
            for start in range(0, len(experts), chunk):
                group = experts[start : start + chunk]
                pairs = [self._expert_hessians(moe, e, projection, with_loss) for e in group]
                yield HessianBatch(
                    [self._expert_unit(e, projection) for e in group],
                    torch.stack([p[0] for p in pairs]),
                    torch.stack([p[1] for p in pairs]) if with_loss else None,
                )
                del pairs

    def _expert_names(self, e: int) -> tuple[str, str, str]:
        experts = self.model.arch.experts
        base = f"model.layers.{self.index}.{experts.prefix}.{e}"
        return f"{base}.{experts.gate}", f"{base}.{experts.up}", f"{base}.{experts.down}"

    def _expert_unit(self, e: int, projection: str) -> tuple[str, ...]:
        gate, up, down = self._expert_names(e)
        return (gate, up) if projection == "gate_up" else (down,)

    def _expert_hessians(
        self, moe: _MoeStatistics, e: int, projection: str, with_loss: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        rows, w = moe.routed(e)
        x_all, x_prior = moe.x, moe.x_prior
        if projection == "gate_up":
            x_e, prior = x_all[rows], moe.all_hidden  # prior: mean x x^T over all tokens
        else:
            expert_act = self.model.expert_activation(self.index, e)
            x_e, sample = expert_act(x_all[rows]), expert_act(x_prior)
            prior = sample.t() @ sample / sample.shape[0]
            del sample
        n_e = float(rows.numel())
        routed = x_e.t() @ x_e
        gptq = 2 * (routed + ALL_TOKEN_PRIOR * prior) / (n_e + ALL_TOKEN_PRIOR)
        del routed
        if not with_loss:
            return gptq, None
        xw = x_e * w.unsqueeze(1)
        loss = xw.t() @ xw
        loss.add_(prior, alpha=moe.top_up(e))
        return gptq, loss


class _MoeStatistics:
    """Routing of one MoE block's calibration tokens, and what every expert's Hessians share."""

    def __init__(self, moe_input: tuple[torch.Tensor, torch.Tensor, torch.Tensor], num_experts: int, floor: float):
        self.x, self.ids, self.weights = moe_input
        t = self.x.shape[0]
        self.all_hidden = self.x.t() @ self.x / max(t, 1)
        self.x_prior = self.x[torch.linspace(0, t - 1, min(PRIOR_SAMPLE, t), device=self.x.device).long()]
        mass2 = torch.zeros(num_experts, device=self.x.device)
        mass2.index_add_(0, self.ids.flatten(), self.weights.flatten().pow(2))
        self.mass2, self.floor = mass2, floor * float(mass2.mean())

    def routed(self, e: int) -> tuple[torch.Tensor, torch.Tensor]:
        rows, slots = torch.where(self.ids == e)
        return rows, self.weights[rows, slots]

    def top_up(self, e: int) -> float:
        """All-token mass (a multiple of the mean x x^T) lifting expert e's loss Hessian to the usage floor."""
        return max(0.0, self.floor - float(self.mass2[e]))


def _hook_linears(layer: torch.nn.Module, calibrated: CalibratedLayer) -> list:
    """Pre-hooks on the nn.Linear modules of attention / shared experts / dense MLPs (one per unit)."""
    model, index = calibrated.model, calibrated.index
    handles = []
    prefix = f"model.layers.{index}."
    for name, info in model.linears.items():
        unit = info.fused_with or (name,)
        if info.layer != index or info.role == ROLE_EXPERT or unit in calibrated.accumulators:
            continue
        acc = calibrated.accumulators[unit] = HessianAccumulator(info.in_features, model.device)
        module = layer.get_submodule(model.arch.hf_path(name).removeprefix(prefix))
        handles.append(module.register_forward_pre_hook(lambda _m, args, acc=acc: acc.add(args[0])))
    return handles


def _hook_experts(layer: torch.nn.Module, calibrated: CalibratedLayer) -> tuple[list, Callable[[], None]]:
    """Keeps the experts module's inputs (hidden, top_k_index, top_k_weights); statistics come later."""
    model = calibrated.model
    experts_module = layer.get_submodule(model.arch.hf_path(model.arch.experts.prefix))
    num_experts = model.arch.num_experts(model.config)
    hidden = model.config.hidden_size
    seen: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def hook(_module, args):
        ids, weights = args[1], args[2]
        seen.append((args[0].reshape(-1, hidden).float(), ids.reshape(-1, ids.shape[-1]), weights.float()))

    def finish() -> None:
        x, ids, weights = (torch.cat(parts) for parts in zip(*seen))
        seen.clear()
        ids = ids.long()
        calibrated.moe_input = (x, ids, weights.reshape(ids.shape))
        calibrated.stats.expert_tokens = torch.bincount(ids.flatten().cpu(), minlength=num_experts).float()
        calibrated.stats.expert_mass = torch.zeros(num_experts).index_add_(
            0, ids.flatten().cpu(), weights.flatten().cpu()
        )

    return [experts_module.register_forward_pre_hook(hook)], finish


class HiddenStates:
    """The calibration activations between layers: in memory, or spilled to `spill_dir` when they do not fit."""

    def __init__(self, spill_dir: Path | None):
        self.spill_dir, self.parts = spill_dir, []

    def append(self, h: torch.Tensor) -> None:
        if self.spill_dir is None:
            self.parts.append(h)
            return
        path = self.spill_dir / f"hidden-{id(self)}-{len(self.parts)}.pt"
        torch.save(h.cpu(), path)
        self.parts.append(path)

    def __iter__(self) -> Iterator[torch.Tensor]:
        for part in self.parts:
            yield part if isinstance(part, torch.Tensor) else torch.load(part)

    def release(self) -> None:
        for part in self.parts:
            if isinstance(part, Path):
                part.unlink(missing_ok=True)
        self.parts = []


def iterate_layers(
    model: LayerwiseModel,
    samples: torch.Tensor,
    batch_size: int = 8,
    progress: bool = True,
    usage_floor: float = USAGE_FLOOR,
    stage: str = "calibrate",
    on_first_layer: Callable[[float], None] | None = None,
    last_layer: int | None = None,
) -> Iterator[CalibratedLayer]:
    """Yield each decoder layer calibrated, in order, up to `last_layer`; its float weights are already freed,
    its statistics go when the caller moves on. `on_first_layer(seconds)` is called once the first layer is
    done (forward and the caller's work), for projections. The activations between layers go to a scratch
    directory when they would take more than a quarter of the available memory."""
    last = model.config.num_hidden_layers - 1 if last_layer is None else last_layer
    activation_bytes = 2 * 4 * samples.numel() * model.config.hidden_size  # a layer's input and output
    with contextlib.ExitStack() as scratch, torch.no_grad():
        spill_dir = None
        if activation_bytes > available_memory() // 4:
            spill_dir = Path(scratch.enter_context(tempfile.TemporaryDirectory(prefix="moemix-activations-")))
        hidden = HiddenStates(spill_dir)
        for i in range(0, len(samples), batch_size):
            hidden.append(model.embed(samples[i : i + batch_size]).to(model.device))
        positions = torch.arange(samples.shape[1], device=model.device).unsqueeze(0)
        cos_sin = model.rotary(next(iter(hidden)), positions)
        bar = tqdm(total=last + 1, desc=stage, unit="layer", disable=not progress)
        for index in range(last + 1):
            started = time.perf_counter()
            layer = model.load_layer(index)
            calibrated = CalibratedLayer(model, index, LayerStats(index))
            calibrated.usage_floor = usage_floor
            handles = _hook_linears(layer, calibrated)
            finish_experts = None
            if model.arch.is_moe_layer(model.config, index):
                more, finish_experts = _hook_experts(layer, calibrated)
                handles += more
            outputs, cosines = HiddenStates(spill_dir), []
            mask = model.attention_mask(index, samples.shape[1])
            for h in hidden:
                h = h.to(model.device)
                out = layer(h, position_embeddings=cos_sin, attention_mask=mask, position_ids=positions)
                out = out[0] if isinstance(out, tuple) else out
                cosines.append(F.cosine_similarity(h, out, dim=-1).flatten())
                outputs.append(out)
            for handle in handles:
                handle.remove()
            model.unload_layer(index)  # float weights go before any expert statistics are built
            if finish_experts is not None:
                finish_experts()
            calibrated.stats.block_cosine = float(torch.cat(cosines).mean())
            hidden.release()
            hidden = outputs
            yield calibrated
            del calibrated
            bar.update()
            if index == 0 and on_first_layer is not None:
                on_first_layer(time.perf_counter() - started)
        bar.close()
        hidden.release()


def describe_projection(stage: str, first_layer_s: float, layers: int) -> str:
    """'time: ...' line the CLI prints after the first layer, so a user can plan by it."""
    total = first_layer_s * layers
    hours = f"{total / 3600:.1f} h" if total >= 3600 else f"{total / 60:.1f} min"
    return f"time: {stage}: first layer took {first_layer_s:.1f} s; ~{hours} projected for {layers} layers"


def layer_memory_estimate(model: LayerwiseModel, num_tokens: int) -> dict[str, int]:
    """Bytes one layer of calibration + GPTQ needs at its peak, by part (what `check_memory` compares)."""
    config, linears = model.config, model.linears
    hidden = config.hidden_size
    per_layer: dict[int, int] = {}
    for info in linears.values():
        per_layer[info.layer] = per_layer.get(info.layer, 0) + info.out_features * info.in_features
    weights_f32 = 4 * max(per_layer.values(), default=0)
    activations = 4 * num_tokens * hidden * 3  # layer input, output, MoE input
    unit_bytes = max(
        (
            unit_working_bytes(info.in_features, info.out_features * len(info.fused_with or (1,)), True)
            for info in linears.values()
        ),
        default=0,
    )
    # The Cholesky of the widest reversed H: its flipped copy, the factor and the identity it is solved against
    # (measured on one Mixtral-8x7B layer, K = 14336: 10.5 GiB peak).
    cholesky = 3 * 4 * max((info.in_features for info in linears.values()), default=0) ** 2
    return {
        "float layer": weights_f32,
        "activations": activations,
        "hessians + gptq": max(unit_bytes, HESSIAN_BATCH_BYTES) + cholesky,
        "output shard": DEFAULT_SHARD_BYTES,  # the checkpoint writer's buffer
    }


def available_memory() -> int:
    """Bytes this process may still allocate: MemAvailable, capped by a cgroup limit if there is one."""
    available = math.inf
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                available = int(line.split()[1]) * 1024
    except OSError:
        pass
    for limit_file, usage_file in (
        ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
        ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes"),
    ):
        try:
            limit = Path(limit_file).read_text().strip()
            if limit != "max" and int(limit) < 1 << 60:
                available = min(available, int(limit) - int(Path(usage_file).read_text()))
        except (OSError, ValueError):
            continue
    return int(available) if available != math.inf else 1 << 62


def whole_model_fits(model_dir: str | Path, copies: int = 1) -> tuple[bool, str]:
    """Whether `copies` float32 copies of the whole model fit in a quarter of the available memory (the rest stays
    for calibration and quantization, as for the activations), and the numbers that say so. For the steps that
    need the whole float model at once: the Fisher pass (weights, gradients, Fisher: 3 copies), the held-out
    check (1)."""
    source = SafetensorsSource(model_dir)
    need = copies * 4 * sum(math.prod(source.shape(n)) for n in source.names())
    have = available_memory()
    return (
        need <= have // 4,
        f"~{need / 2**30:.1f} GiB for {copies} float32 model copies, {have / 2**30:.1f} GiB available",
    )


def check_memory(model: LayerwiseModel, num_tokens: int) -> str:
    """Refuse before starting, with the numbers, when one layer cannot fit; else the 'memory:' line to print."""
    parts = layer_memory_estimate(model, num_tokens)
    # The float layer is freed before Hessians and GPTQ: the peak is the larger of the two phases.
    peak = parts["activations"] + parts["output shard"] + max(parts["float layer"], parts["hessians + gptq"])
    available = available_memory() if model.device.type == "cpu" else torch.cuda.mem_get_info(model.device)[0]
    detail = ", ".join(f"{k} {v / 2**30:.2f}" for k, v in parts.items())
    line = (
        f"memory: one layer needs ~{peak / 2**30:.1f} GiB at peak ({detail} GiB); {available / 2**30:.1f} GiB available"
    )
    if peak > available:
        raise PlanError(
            f"not enough {model.device.type} memory to calibrate one layer of {model.dir}: ~{peak / 2**30:.1f} GiB "
            f"needed ({detail} GiB), {available / 2**30:.1f} GiB available; use a machine with more memory or "
            "fewer --calib-samples"
        )
    return line
