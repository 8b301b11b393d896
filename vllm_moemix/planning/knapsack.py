"""Multiple-choice knapsack: one option (width) per unit, minimum total loss within a budget.

Lagrangian relaxation (each unit independently minimizes loss + lambda * cost; bisection
on lambda finds the cheapest feasible multiplier), then a greedy pass spends the slack
on the upgrades with the best loss reduction per unit of cost. Near-optimal, and fast
enough for tens of thousands of units (a DeepSeek-V3 has ~30k expert projections).
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass

from vllm_moemix.config.spec import PlanError


@dataclass(frozen=True)
class Option:
    choice: object
    cost: float
    loss: float


def solve(options: dict[Hashable, list[Option]], limit: float, iterations: int = 100) -> dict[Hashable, Option]:
    """Choose one option per key with total cost <= limit and small total loss."""
    for key, opts in options.items():
        if not opts:
            raise PlanError(f"{key}: no admissible width")
    cheapest = {k: min(opts, key=lambda o: (o.cost, o.loss)) for k, opts in options.items()}
    floor = sum(o.cost for o in cheapest.values())
    if floor > limit * (1 + 1e-12):
        raise PlanError(f"impossible budget: the cheapest plan needs {floor:,.0f}, the budget allows {limit:,.0f}")

    def pick(lam: float) -> dict[Hashable, Option]:
        return {k: min(opts, key=lambda o: (o.loss + lam * o.cost, o.cost)) for k, opts in options.items()}

    def total(choice: dict[Hashable, Option]) -> float:
        return sum(o.cost for o in choice.values())

    best = pick(0.0)
    if total(best) > limit:
        lo, hi = 0.0, 1.0
        while total(pick(hi)) > limit:
            hi *= 4
            if hi > 1e30:
                best = cheapest
                break
        else:
            for _ in range(iterations):
                mid = (lo + hi) / 2
                lo, hi = (mid, hi) if total(pick(mid)) > limit else (lo, mid)
            best = pick(hi)
    # Greedy: spend the remaining budget on the most loss-effective single upgrades.
    spent = total(best)
    while True:
        move, best_ratio = None, 0.0
        for key, opts in options.items():
            for opt in opts:
                extra, gain = opt.cost - best[key].cost, best[key].loss - opt.loss
                if gain <= 0 or spent + extra > limit:
                    continue
                ratio = float("inf") if extra <= 0 else gain / extra
                if ratio > best_ratio:
                    move, best_ratio = (key, opt), ratio
        if move is None:
            return best
        key, opt = move
        spent += opt.cost - best[key].cost
        best[key] = opt
