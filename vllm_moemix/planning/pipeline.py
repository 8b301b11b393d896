"""plan_model: model + strategy + budget (+ calibration text, pins) -> Plan.

Data-driven strategies get one calibration pass over the float model, one
decoder layer at a time; the optimizer additionally fills its error table
(planning/errors.py: each unit quantized once at the reference width the budget
is nearest to, every other (bits, group) candidate estimated from it) from the
layer's Hessians, a few units at a time, before they are dropped.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from vllm_moemix.calibration.fisher import weight_fisher
from vllm_moemix.calibration.gptq import GPTQOptions
from vllm_moemix.calibration.layerwise import (
    DEFAULT_CALIB,
    USAGE_FLOOR,
    LayerStats,
    LayerwiseModel,
    calibration_samples,
    check_memory,
    describe_projection,
    iterate_layers,
)
from vllm_moemix.config.footprint import Footprint, footprint
from vllm_moemix.config.plan import Plan
from vllm_moemix.config.spec import SUPPORTED_BITS, PlanError, QuantSpec
from vllm_moemix.planning.errors import ERROR_MODELS, batch_errors, resolve_error_model
from vllm_moemix.planning.strategies import GROUP_CHOICES, STRATEGIES, Assignment, PlanningContext
from vllm_moemix.planning.units import Budget, Unit, assignment_to_plan, planning_units
from vllm_moemix.quant.quantizers import QuantStash


@dataclass
class CalibrationConfig:
    texts: list[Path]
    num_samples: int = 32
    seq_len: int = 256
    quantizer: str = "gptq"  # used for the optimizer's error table and for quantizing
    clip_search: bool = True  # GPTQ searches each group's clipping range (quant/rtn.py)
    usage_floor: float = USAGE_FLOOR  # experts' error weight floor, a share of the layer's mean usage
    device: str | None = None  # calibration forward, Hessians and GPTQ (default: CUDA if available, else CPU)

    @classmethod
    def default(cls) -> CalibrationConfig:
        return cls(texts=[DEFAULT_CALIB])


def pins_from_modules(modules: dict[str, QuantSpec | None], units: list[Unit]) -> Assignment:
    """User pins (plan-style module globs -> spec) as fixed unit widths; a pin must cover whole units."""
    pins: Assignment = {}
    for pattern, spec in modules.items():
        hit = False
        for unit in units:
            covered = [fnmatch.fnmatchcase(n, pattern) or fnmatch.fnmatchcase(n, pattern + ".*") for n in unit.names]
            if any(covered) and not all(covered):
                raise PlanError(f"pin {pattern!r} covers part of fused {unit.key}; pin all of it")
            if all(covered):
                pins[unit], hit = spec, True
        if not hit:
            raise PlanError(f"pin {pattern!r} matches no module of this model")
    return pins


def build_context(
    model_dir: str | Path,
    strategy: str,
    calib: CalibrationConfig | None,
    group_size: int,
    sym: bool,
    pins: dict[str, QuantSpec | None],
    progress: bool = True,
    usage: dict[int, dict[int, int]] | None = None,
    group_choices: tuple[int, ...] = GROUP_CHOICES,
    budget: Budget | None = None,
    error_model: str = "auto",
    stash: QuantStash | None = None,
) -> PlanningContext:
    """`usage` (layer -> expert -> routed tokens, e.g. a profile saved while serving) replaces
    calibration as the source of expert frequencies for `frequent-experts`. `group_choices`: group
    sizes besides `group_size` the optimizer may pick under a byte budget (() to keep one).
    The error table quantizes each unit for real at the width `budget` is nearest to (3 bits without one;
    planning/errors.py) and keeps those quantizations in `stash` for the writer when one is given."""
    if strategy not in STRATEGIES:
        raise PlanError(f"unknown strategy {strategy!r}; choose one of {sorted(STRATEGIES)}")
    if error_model not in ERROR_MODELS:
        raise PlanError(f"unknown error model {error_model!r}; choose one of {', '.join(ERROR_MODELS)}")
    calib = calib or CalibrationConfig.default()
    model = LayerwiseModel(model_dir, calib.device)
    units = planning_units(model.linears)
    for unit in units:
        QuantSpec(SUPPORTED_BITS[0], group_size, sym).check_input_dim(unit.in_features, unit.key)

    def weight(name: str) -> torch.Tensor:
        return model.source.get(name + ".weight" if name in model.linears else name).float()

    ctx = PlanningContext(
        linears=model.linears,
        units=units,
        weight=weight,
        group_size=group_size,
        sym=sym,
        router_name=lambda layer: f"model.layers.{layer}.{model.arch.router}.weight",
        pins=pins_from_modules(pins, units),
        group_choices=tuple(group_choices),
    )
    if usage is not None and strategy == "frequent-experts":
        num_experts = model.arch.num_experts(model.config)
        ctx.layer_stats = {
            layer: LayerStats(layer, expert_tokens=torch.tensor([float(counts.get(e, 0)) for e in range(num_experts)]))
            for layer, counts in usage.items()
        }
        return ctx
    if not STRATEGIES[strategy].needs_data:
        return ctx
    from transformers import AutoTokenizer

    samples = calibration_samples(
        AutoTokenizer.from_pretrained(model_dir), calib.texts, calib.num_samples, calib.seq_len
    )
    memory = check_memory(model, samples.numel())  # refuses before any work when one layer cannot fit
    if progress:
        print(memory)
    ctx.layer_stats, ctx.errors = {}, {}
    by_names = {unit.names: unit for unit in units}
    reference_bits = budget.reference_bits(units, group_size, sym) if budget is not None else 3
    # Under an average-bits budget the optimizer offers one group size: no other candidate needs an error.
    groups_cost_bytes = budget is None or budget.nbytes is not None
    options = GPTQOptions(clip_search=calib.clip_search)

    def reference(names: tuple[str, ...]) -> QuantSpec:
        unit = by_names[names]
        specs = ctx.candidate_specs(unit, groups_cost_bytes)
        return min(specs, key=lambda s: (abs(s.bits - reference_bits), s.group_size != group_size, s.bits))

    def project(seconds: float) -> None:
        if progress:
            print(describe_projection("plan", seconds, model.config.num_hidden_layers))

    fisher = None
    if strategy == "optimizer":
        error_model, why = resolve_error_model(error_model, model_dir)
        if progress:
            print(why)
        if error_model == "fisher":
            fisher = weight_fisher(model_dir, samples, list(model.linears), progress=progress)
    layers = iterate_layers(
        model, samples, progress=progress, usage_floor=calib.usage_floor, stage="plan", on_first_layer=project
    )
    for layer in layers:
        if strategy == "optimizer":
            bar = tqdm(
                total=len(layer.units()), desc=f"layer {layer.index}", unit="unit", leave=False, disable=not progress
            )
            for batch in layer.hessian_batches(with_loss=True):
                errors = batch_errors(
                    model,
                    batch,
                    lambda names: ctx.candidate_specs(by_names[names], groups_cost_bytes),
                    reference,
                    calib.quantizer,
                    options,
                    error_model,
                    stash,
                    fisher,
                )
                ctx.errors.update({by_names[names]: table for names, table in errors.items()})
                bar.update(len(batch.units))
            bar.close()
        ctx.layer_stats[layer.index] = layer.stats
    return ctx


@dataclass
class PlanResult:
    plan: Plan
    footprint: Footprint
    strategy: str
    budget: Budget


def plan_model(
    model_dir: str | Path,
    strategy: str,
    budget: Budget,
    calib: CalibrationConfig | None = None,
    group_size: int = 128,
    sym: bool = False,
    pins: dict[str, QuantSpec | None] | None = None,
    progress: bool = True,
    context: PlanningContext | None = None,
    usage: dict[int, dict[int, int]] | None = None,
    group_choices: tuple[int, ...] = GROUP_CHOICES,
    stash: QuantStash | None = None,
    error_model: str = "auto",
) -> PlanResult:
    """Run `strategy` under `budget`; pass a `context` to reuse one calibration across strategies, a `stash`
    to keep the error table's quantizations for the writer."""
    ctx = context or build_context(
        model_dir,
        strategy,
        calib,
        group_size,
        sym,
        pins or {},
        progress,
        usage,
        group_choices,
        budget=budget,
        error_model=error_model,
        stash=stash,
    )
    if STRATEGIES[strategy].needs_data and (
        ctx.layer_stats is None or (strategy == "optimizer" and ctx.errors is None)
    ):
        raise PlanError(f"strategy {strategy!r} needs calibration data; build the context with it")
    assignment = STRATEGIES[strategy].run(ctx, budget)
    plan = assignment_to_plan(assignment, default=ctx.spec(max(SUPPORTED_BITS)))
    resolved = plan.resolve(ctx.linears)
    return PlanResult(plan, footprint(resolved, ctx.linears), strategy, budget)
