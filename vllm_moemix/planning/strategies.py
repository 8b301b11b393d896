"""Bit-allocation strategies, each selectable by name, all emitting the same plan artifact.

Heuristics from the literature rank units and split them between two widths
(`scores.heuristic_levels`) until the budget is spent; `optimizer` (ours, the
default) solves a multiple-choice knapsack over every width with measured
Hessian-weighted errors. User pins are fixed before any strategy runs and
their cost counts against the budget.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from vllm_moemix.calibration.layerwise import LayerStats
from vllm_moemix.config.arch import ROLE_ATTENTION, ROLE_EXPERT, ROLE_SHARED, LinearInfo
from vllm_moemix.config.spec import SUPPORTED_BITS, PlanError, QuantSpec, native_cpu_refusal
from vllm_moemix.planning import knapsack, scores
from vllm_moemix.planning.units import Budget, Unit

Assignment = dict[Unit, QuantSpec | None]
GROUP_CHOICES = (32, 64, 128, 256)
"""Group sizes the optimizer may pick per unit under a byte budget (where a group's scales cost bytes); 256
lets a 2-bit unit shed scale bytes that buy another unit 3 bits (measured: tiny-qwen2moe at uniform 2-bit g128
bytes, KL 0.0100 -> 0.0065). The native CPU kernels run any multiple of 32."""


@dataclass
class PlanningContext:
    """Everything a strategy may look at. Data-driven fields are None for data-free runs."""

    linears: dict[str, LinearInfo]
    units: list[Unit]
    weight: Callable[[str], torch.Tensor]  # linear or tensor name -> float tensor (lazy)
    router_name: Callable[[int], str]  # layer -> router weight tensor name
    group_size: int = 128
    sym: bool = False
    layer_stats: dict[int, LayerStats] | None = None
    errors: dict[Unit, dict[QuantSpec, float]] | None = None  # unit -> spec -> summed output error
    router_init: Callable[[int], torch.Tensor] | None = None
    pins: Assignment = field(default_factory=dict)
    group_choices: tuple[int, ...] = ()  # extra group sizes for the optimizer under byte budgets

    def spec(self, bits: int) -> QuantSpec:
        return QuantSpec(bits, self.group_size, self.sym)

    def candidate_specs(self, unit: Unit, groups_cost_bytes: bool = True) -> list[QuantSpec]:
        """Every (bits, group) the optimizer may give `unit`: the group must divide its input dimension
        and the pair must run on the native CPU kernels. Under an average-bits budget scales are free,
        so only the context's own group size is offered (smaller groups would always win)."""
        groups = sorted({self.group_size, *self.group_choices}) if groups_cost_bytes else [self.group_size]
        specs = [QuantSpec(b, g, self.sym) for g in groups for b in SUPPORTED_BITS if unit.in_features % g == 0]
        return [s for s in specs if native_cpu_refusal(s) is None]

    def free_units(self) -> list[Unit]:
        return [u for u in self.units if u not in self.pins]


@dataclass(frozen=True)
class Strategy:
    name: str
    source: str
    needs_data: bool
    run: Callable[[PlanningContext, Budget], Assignment]


def _cost(ctx: PlanningContext, budget: Budget, assignment: Assignment) -> float:
    return sum(budget.cost(u, s, ctx.linears) for u, s in assignment.items())


def promote_by_priority(ctx: PlanningContext, budget: Budget, priority: list[Unit]) -> Assignment:
    """Everything at the low width; promote units to the high width in priority order while it fits."""
    if budget.avg_bits is not None:
        level = budget.avg_bits
    else:  # bytes budget: the average width it affords over the free units
        free_weights = sum(u.weights for u in ctx.free_units()) or 1
        level = 8 * budget.nbytes / free_weights
    low, high = scores.heuristic_levels(level)
    assignment = dict(ctx.pins) | {u: ctx.spec(low) for u in ctx.free_units()}
    limit, spent = budget.limit(ctx.units), _cost(ctx, budget, assignment)
    if spent > limit:
        raise PlanError(f"impossible budget {budget.describe()}: everything at {low} bits already exceeds it")
    for unit in priority:
        if unit in ctx.pins:
            continue
        extra = budget.cost(unit, ctx.spec(high), ctx.linears) - budget.cost(unit, assignment[unit], ctx.linears)
        if spent + extra <= limit:
            assignment[unit] = ctx.spec(high)
            spent += extra
    return assignment


def uniform(ctx: PlanningContext, budget: Budget) -> Assignment:
    """One width for every free unit: the widest that fits (GPTQ/RTN baseline)."""
    for bits in sorted(SUPPORTED_BITS, reverse=True):
        assignment = dict(ctx.pins) | {u: ctx.spec(bits) for u in ctx.free_units()}
        if _cost(ctx, budget, assignment) <= budget.limit(ctx.units):
            return assignment
    raise PlanError(f"impossible budget {budget.describe()}: even uniform 2-bit exceeds it")


def _roles_first(roles: tuple[str, ...]) -> Callable[[PlanningContext, Budget], Assignment]:
    def run(ctx: PlanningContext, budget: Budget) -> Assignment:
        first = [u for u in ctx.units if u.role in roles]
        return promote_by_priority(ctx, budget, first + [u for u in ctx.units if u.role not in roles])

    return run


def _blocks(order: str) -> Callable[[PlanningContext, Budget], Assignment]:
    def run(ctx: PlanningContext, budget: Budget) -> Assignment:
        key = (lambda u: u.layer) if order == "first" else (lambda u: -u.layer)
        return promote_by_priority(ctx, budget, sorted(ctx.units, key=key))

    return run


def _round_robin(ranked_per_layer: dict[int, list[Unit]]) -> list[Unit]:
    """Interleave per-layer rankings so every layer gets the same share of promotions."""
    out, depth = [], max((len(v) for v in ranked_per_layer.values()), default=0)
    for i in range(depth):
        for layer in sorted(ranked_per_layer):
            if i < len(ranked_per_layer[layer]):
                out.append(ranked_per_layer[layer][i])
    return out


def _experts_ranked(ctx: PlanningContext, rank: Callable[[int, list[int]], list[int]]) -> list[Unit]:
    """Expert units ordered per layer by `rank(layer, experts) -> experts best-first`, interleaved."""
    per_layer: dict[int, list[Unit]] = {}
    by_layer: dict[int, dict[int, list[Unit]]] = {}
    for u in ctx.units:
        if u.role == ROLE_EXPERT:
            by_layer.setdefault(u.layer, {}).setdefault(u.expert, []).append(u)
    for layer, experts in by_layer.items():
        per_layer[layer] = [u for e in rank(layer, sorted(experts)) for u in experts[e]]
    return _round_robin(per_layer)


def frequent_experts(ctx: PlanningContext, budget: Budget) -> Assignment:
    def rank(layer: int, experts: list[int]) -> list[int]:
        tokens = ctx.layer_stats[layer].expert_tokens
        return sorted(experts, key=lambda e: -float(tokens[e]))

    return promote_by_priority(ctx, budget, _experts_ranked(ctx, rank))


def router_norm(ctx: PlanningContext, budget: Budget) -> Assignment:
    arch_units = [u for u in ctx.units if u.role == ROLE_EXPERT]

    def rank(layer: int, experts: list[int]) -> list[int]:
        init = ctx.router_init(layer) if ctx.router_init else None
        score = scores.router_norm_scores(ctx.weight(ctx.router_name(layer)), init)
        order = sorted(experts, key=lambda e: -float(score[e]))
        gate_of = {u.expert: u.names[0] for u in arch_units if u.layer == layer and len(u.names) > 1}
        maxvar = {e: scores.max_intra_neuron_variance(ctx.weight(gate_of[e])) for e in experts}
        return scores.apply_maxvar(order, maxvar)

    return promote_by_priority(ctx, budget, _experts_ranked(ctx, rank))


def _by_unit_score(score: Callable[[PlanningContext, Unit], float]) -> Callable[[PlanningContext, Budget], Assignment]:
    def run(ctx: PlanningContext, budget: Budget) -> Assignment:
        return promote_by_priority(ctx, budget, sorted(ctx.units, key=lambda u: -score(ctx, u)))

    return run


def _outlier(ctx: PlanningContext, unit: Unit) -> float:
    return max(scores.outlier_score(ctx.weight(n)) for n in unit.names)


def _kurtosis(ctx: PlanningContext, unit: Unit) -> float:
    return max(scores.kurtosis(ctx.weight(n)) for n in unit.names)


def _block(ctx: PlanningContext, unit: Unit) -> float:
    return scores.block_importance(ctx.layer_stats[unit.layer].block_cosine)


def optimizer(ctx: PlanningContext, budget: Budget) -> Assignment:
    """Ours: minimize the summed Hessian-weighted output error (usage-weighted for experts)
    over all widths (and, under a byte budget, group sizes), as a multiple-choice knapsack."""
    options = {}
    for unit in ctx.units:
        if unit in ctx.pins:
            spec = ctx.pins[unit]
            options[unit] = [knapsack.Option(spec, budget.cost(unit, spec, ctx.linears), 0.0)]
            continue
        options[unit] = [
            knapsack.Option(spec, budget.cost(unit, spec, ctx.linears), ctx.errors[unit][spec])
            for spec in ctx.candidate_specs(unit, groups_cost_bytes=budget.nbytes is not None)
        ]
    chosen = knapsack.solve(options, budget.limit(ctx.units))
    return {unit: opt.choice for unit, opt in chosen.items()}


STRATEGIES: dict[str, Strategy] = {
    s.name: s
    for s in (
        Strategy("optimizer", "ours: knapsack over Hessian-weighted error x usage", True, optimizer),
        Strategy("uniform", "one width everywhere (GPTQ/RTN baseline)", False, uniform),
        Strategy("attn-higher", "QuantMoE-Bench: attention above experts", False, _roles_first((ROLE_ATTENTION,))),
        Strategy(
            "shared-higher", "QuantMoE-Bench: shared experts above routed ones", False, _roles_first((ROLE_SHARED,))
        ),
        Strategy("first-k", "QuantMoE-Bench: earlier MoE blocks higher", False, _blocks("first")),
        Strategy("last-k", "QuantMoE-Bench: later MoE blocks higher", False, _blocks("last")),
        Strategy("frequent-experts", "QuantMoE-Bench: most-routed experts per layer higher", True, frequent_experts),
        Strategy(
            "outlier",
            "QuantMoE-Bench: outlier-aware linear scorer (max_j max_i|W|/mean_i|W|)",
            False,
            _by_unit_score(_outlier),
        ),
        Strategy(
            "block-importance",
            "QuantMoE-Bench: blocks that change their input most (1 - cos)",
            True,
            _by_unit_score(_block),
        ),
        Strategy("router-norm", "arXiv 2604.06515: least-changed router rows + MaxVar (zeta=3)", False, router_norm),
        Strategy(
            "kurtosis", "DynaMINT-style data-free: heavier-tailed weights higher", False, _by_unit_score(_kurtosis)
        ),
    )
}
