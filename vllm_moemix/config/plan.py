"""The bit plan: a small, editable JSON artifact saying which linear gets which width.

    {
      "format": "moemix-plan", "version": 1,
      "default": {"bits": 4, "group_size": 128, "sym": false},
      "modules": {
        "model.layers.*.self_attn": 8,
        "model.layers.0.block_sparse_moe.experts.3": 2,
        "model.layers.3.block_sparse_moe.experts.*.w2": {"bits": 3, "group_size": 64}
      }
    }

`modules` keys are module names or shell-style globs; a key covers a linear if it
names the linear or any of its parent modules. Later keys win. Values are a bit
width, "bf16" (leave unquantized), or an object overriding the default. Every
key must cover at least one linear: a typo is an error, not a silent no-op.

`resolve()` expands a plan against a concrete model into one spec per linear;
that resolved form is what the checkpoint stores and vLLM reads.
"""

from __future__ import annotations

import fnmatch
import json
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vllm_moemix.config.arch import ROLE_EXPERT, LinearInfo
from vllm_moemix.config.spec import UNQUANTIZED, PlanError, QuantSpec

PLAN_FORMAT = "moemix-plan"
PLAN_VERSION = 1

Resolved = dict[str, QuantSpec | None]
"""Linear name -> spec, None meaning unquantized."""


def _covers(pattern: str, name: str) -> bool:
    return fnmatch.fnmatchcase(name, pattern) or fnmatch.fnmatchcase(name, pattern + ".*")


@dataclass
class Plan:
    default: QuantSpec | None = field(default_factory=lambda: QuantSpec(bits=4))
    modules: dict[str, QuantSpec | None] = field(default_factory=dict)

    @classmethod
    def uniform(cls, bits: int | str, group_size: int | None = None, sym: bool = False) -> Plan:
        value: Any = bits if bits == UNQUANTIZED else {"bits": bits, "sym": sym}
        if group_size is not None and isinstance(value, dict):
            value["group_size"] = group_size
        return cls(default=QuantSpec.from_value(value, where="--bits"))

    @classmethod
    def from_dict(cls, data: Any) -> Plan:
        if not isinstance(data, dict):
            raise PlanError("a plan must be a JSON object")
        if data.get("format", PLAN_FORMAT) != PLAN_FORMAT:
            raise PlanError(f"not a moemix plan (format={data.get('format')!r})")
        version = data.get("version", PLAN_VERSION)
        if version != PLAN_VERSION:
            raise PlanError(f"plan version {version} is not supported (this build reads version {PLAN_VERSION})")
        unknown = set(data) - {"format", "version", "default", "modules", "comment"}
        if unknown:
            raise PlanError(f"unknown plan keys {sorted(unknown)}")
        default = QuantSpec.from_value(data.get("default", 4), where="default")
        modules_raw = data.get("modules", {})
        if not isinstance(modules_raw, dict):
            raise PlanError("plan 'modules' must be an object of module -> bits")
        modules = {k: QuantSpec.from_value(v, default, where=k) for k, v in modules_raw.items()}
        return cls(default=default, modules=modules)

    @classmethod
    def load(cls, path: str | Path) -> Plan:
        try:
            data = json.loads(Path(path).read_text())
        except FileNotFoundError:
            raise PlanError(f"plan file {path} does not exist") from None
        except json.JSONDecodeError as err:
            raise PlanError(f"plan file {path} is not valid JSON: {err}") from None
        return cls.from_dict(data)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": PLAN_FORMAT,
            "version": PLAN_VERSION,
            "default": spec_to_value(self.default),
            "modules": {k: spec_to_value(v) for k, v in self.modules.items()},
        }

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    def resolve(self, linears: dict[str, LinearInfo]) -> Resolved:
        """One spec per linear; raises PlanError naming the offending module."""
        resolved: Resolved = {name: self.default for name in linears}
        for pattern, spec in self.modules.items():
            hits = [name for name in linears if _covers(pattern, name)]
            if not hits:
                raise PlanError(f"plan names module {pattern!r}, which does not exist in this model")
            for name in hits:
                resolved[name] = spec
        validate_resolved(resolved, linears)
        return resolved


def spec_to_value(spec: QuantSpec | None) -> Any:
    return UNQUANTIZED if spec is None else spec.to_dict()


def validate_resolved(resolved: Resolved, linears: dict[str, LinearInfo]) -> None:
    """Constraints of serving: packable shapes, fused siblings agree, MoE layers servable."""
    for name, spec in resolved.items():
        info = linears[name]
        if spec is not None:
            spec.check_input_dim(info.in_features, name)
        for sibling in info.fused_with:
            if resolved.get(sibling) != spec:
                raise PlanError(
                    f"{name} and {sibling} are fused into one vLLM linear and must share a spec; "
                    f"got {spec_to_value(spec)} vs {spec_to_value(resolved.get(sibling))}"
                )
    experts_by_layer: dict[int, set[bool]] = defaultdict(set)
    for name, info in linears.items():
        if info.role == ROLE_EXPERT:
            experts_by_layer[info.layer].add(resolved[name] is None)
    for layer, kinds in experts_by_layer.items():
        if len(kinds) > 1:
            raise PlanError(
                f"model.layers.{layer}: experts of one MoE layer must be all quantized or all '{UNQUANTIZED}'"
            )


def resolved_to_config(resolved: Resolved) -> dict[str, Any]:
    return {name: spec_to_value(spec) for name, spec in resolved.items()}


def resolved_from_config(modules: Any) -> Resolved:
    if not isinstance(modules, dict):
        raise PlanError("quantization_config.modules must be an object of linear -> spec")
    return {name: QuantSpec.from_value(value, where=name, complete=True) for name, value in modules.items()}
