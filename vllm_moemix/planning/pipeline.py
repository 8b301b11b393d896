"""plan_model: model + strategy + budget (+ calibration text, pins) -> Plan.

Data-driven strategies get one calibration pass over the float model, one
decoder layer at a time; the optimizer additionally quantizes every unit at
every width with the chosen quantizer and measures tr(dW H dW^T) on the
layer's loss Hessians before they are dropped (every width, and every group size in
`group_choices` for byte budgets).
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from vllm_moemix.calibration.layerwise import (
    DEFAULT_CALIB,
    USAGE_FLOOR,
    LayerStats,
    LayerwiseModel,
    calibration_samples,
    iterate_layers,
)
from vllm_moemix.config.footprint import Footprint, footprint
from vllm_moemix.config.plan import Plan
from vllm_moemix.config.spec import SUPPORTED_BITS, PlanError, QuantSpec
from vllm_moemix.planning import scores
from vllm_moemix.planning.strategies import GROUP_CHOICES, STRATEGIES, Assignment, PlanningContext
from vllm_moemix.planning.units import Budget, Unit, assignment_to_plan, planning_units
from vllm_moemix.quant.quantizers import make_quantizer


@dataclass
class CalibrationConfig:
    texts: list[Path]
    num_samples: int = 32
    seq_len: int = 256
    quantizer: str = "gptq"  # used for the optimizer's error table and for quantizing
    clip_search: bool = True  # GPTQ searches each group's clipping range (quant/rtn.py)
    usage_floor: float = USAGE_FLOOR  # experts' error weight floor, a share of the layer's mean usage

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
    quantizer=None,
) -> PlanningContext:
    """`usage` (layer -> expert -> routed tokens, e.g. a profile saved while serving) replaces
    calibration as the source of expert frequencies for `frequent-experts`. `group_choices`: group
    sizes besides `group_size` the optimizer may pick under a byte budget (() to keep one). `quantizer`
    ((name, weight, spec) -> QuantizedWeight, e.g. a memoizing HessianGPTQ also used to write checkpoints)
    replaces `calib.quantizer` for the error table, so each (linear, spec) is quantized once."""
    if strategy not in STRATEGIES:
        raise PlanError(f"unknown strategy {strategy!r}; choose one of {sorted(STRATEGIES)}")
    model = LayerwiseModel(model_dir)
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
    calib = calib or CalibrationConfig.default()
    from transformers import AutoTokenizer

    samples = calibration_samples(
        AutoTokenizer.from_pretrained(model_dir), calib.texts, calib.num_samples, calib.seq_len
    )
    ctx.layer_stats, ctx.errors = {}, {}
    by_layer: dict[int, list[Unit]] = {}
    for unit in units:
        by_layer.setdefault(unit.layer, []).append(unit)
    for index, _layer, stats in iterate_layers(model, samples, progress=progress, usage_floor=calib.usage_floor):
        if strategy == "optimizer":
            layer_quantizer = quantizer or make_quantizer(
                calib.quantizer, stats.gptq_hessians, clip_search=calib.clip_search
            )
            for unit in tqdm(by_layer.get(index, []), desc=f"errors layer {index}", leave=False, disable=not progress):
                ctx.errors[unit] = {
                    spec: sum(
                        scores.hessian_error(
                            weight(n),
                            layer_quantizer(n, weight(n), spec).dequantize(),
                            stats.loss_hessians[n],
                        )
                        for n in unit.names
                    )
                    for spec in ctx.candidate_specs(unit)
                }
        stats.gptq_hessians, stats.loss_hessians = {}, {}  # keep usage and similarity only
        ctx.layer_stats[index] = stats
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
) -> PlanResult:
    """Run `strategy` under `budget`; pass a `context` to reuse one calibration across strategies."""
    ctx = context or build_context(
        model_dir, strategy, calib, group_size, sym, pins or {}, progress, usage, group_choices
    )
    if STRATEGIES[strategy].needs_data and (
        ctx.layer_stats is None or (strategy == "optimizer" and ctx.errors is None)
    ):
        raise PlanError(f"strategy {strategy!r} needs calibration data; build the context with it")
    assignment = STRATEGIES[strategy].run(ctx, budget)
    plan = assignment_to_plan(assignment, default=ctx.spec(max(SUPPORTED_BITS)))
    resolved = plan.resolve(ctx.linears)
    return PlanResult(plan, footprint(resolved, ctx.linears), strategy, budget)
