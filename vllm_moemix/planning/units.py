"""Planning units: the smallest sets of linears that must share a width.

vLLM fuses q/k/v and gate/up, so those always move together; everything
else (o_proj, each expert's down projection, ...) is its own unit. Budgets
and costs are counted over units.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

from vllm_moemix.config.arch import LinearInfo
from vllm_moemix.config.plan import Plan, Resolved
from vllm_moemix.config.spec import SUPPORTED_BITS, PlanError, QuantSpec


@dataclass(frozen=True)
class Unit:
    names: tuple[str, ...]
    role: str
    layer: int
    expert: int | None
    weights: int  # total weights in the unit
    in_features: int

    @property
    def key(self) -> str:
        return self.names[0] if len(self.names) == 1 else _common_parent(self.names)

    def nbytes(self, spec: QuantSpec | None, linears: dict[str, LinearInfo]) -> int:
        if spec is None:
            return 2 * self.weights
        return sum(spec.nbytes(linears[n].out_features, linears[n].in_features) for n in self.names)


def _common_parent(names: Iterable[str]) -> str:
    parts = [n.split(".") for n in names]
    common = []
    for pieces in zip(*parts):
        if len(set(pieces)) != 1:
            break
        common.append(pieces[0])
    return ".".join(common) + ".{" + ",".join(n.split(".")[-1] for n in names) + "}"


def planning_units(linears: dict[str, LinearInfo]) -> list[Unit]:
    units, seen = [], set()
    for name, info in linears.items():
        group = info.fused_with or (name,)
        if group in seen:
            continue
        seen.add(group)
        members = [linears[n] for n in group]
        units.append(
            Unit(
                tuple(group),
                info.role,
                info.layer,
                info.expert,
                sum(m.out_features * m.in_features for m in members),
                info.in_features,
            )
        )
    return units


@dataclass(frozen=True)
class Budget:
    """Average integer bits per weight over the planned linears, or bytes including scales/zeros."""

    avg_bits: float | None = None
    nbytes: int | None = None

    def __post_init__(self) -> None:
        if (self.avg_bits is None) == (self.nbytes is None):
            raise PlanError("give exactly one budget: average bits or bytes")
        if self.avg_bits is not None and not (math.isfinite(self.avg_bits) and self.avg_bits > 0):
            raise PlanError(f"budget must be a positive number of average bits, got {self.avg_bits!r}")
        if self.nbytes is not None and (type(self.nbytes) is not int or self.nbytes <= 0):
            raise PlanError(f"byte budget must be a positive integer, got {self.nbytes!r}")

    def cost(self, unit: Unit, spec: QuantSpec | None, linears: dict[str, LinearInfo]) -> float:
        if self.avg_bits is not None:
            return unit.weights * (16 if spec is None else spec.bits)
        return unit.nbytes(spec, linears)

    def limit(self, units: list[Unit]) -> float:
        if self.avg_bits is not None:
            return self.avg_bits * sum(u.weights for u in units)
        return float(self.nbytes)

    def reference_bits(self, units: list[Unit], group_size: int, sym: bool) -> int:
        """The supported width nearest to what the budget affords per weight (bytes: less the scales' share)."""
        if self.avg_bits is not None:
            bits = self.avg_bits
        else:
            weights = sum(u.weights for u in units) or 1
            bits = 8 * self.nbytes / weights - (16 + (0 if sym else 8)) / group_size
        return min(SUPPORTED_BITS, key=lambda b: (abs(b - bits), -b))

    def describe(self) -> str:
        return f"{self.avg_bits} average bits" if self.avg_bits is not None else f"{self.nbytes:,} bytes"


def assignment_to_plan(assignment: dict[Unit, QuantSpec | None], default: QuantSpec | None = None) -> Plan:
    """A readable plan: one key per unit, collapsed to whole experts / attention blocks when they agree."""
    resolved: Resolved = {n: spec for unit, spec in assignment.items() for n in unit.names}
    parents: dict[str, list[str]] = {}
    for name in resolved:
        parent = name.rsplit(".", 1)[0]
        parents.setdefault(parent, []).append(name)
    modules: dict[str, QuantSpec | None] = {}
    for parent, names in parents.items():
        specs = {resolved[n] for n in names}
        if len(specs) == 1:
            modules[parent] = specs.pop()
        else:
            modules.update({n: resolved[n] for n in names})
    if default is not None:
        modules = {k: v for k, v in modules.items() if v != default}
    return Plan(default=default, modules=modules)
