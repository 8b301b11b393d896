"""The expert-usage profile: routed tokens per expert, gathered while serving, read back by the planner.

A versioned JSON document (`GET /v1/moemix/routing` writes it, `moemix plan --usage` reads it) keyed by
checkpoint expert name, so it is shared by the server and the planner without either importing the other.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from pathlib import Path
from typing import Any

from vllm_moemix.config.spec import PlanError

PROFILE_FORMAT = "moemix-routing"


def merge(per_rank: list[list[dict[str, Any]]]) -> dict[str, Any]:
    """{"format", "experts": {"<layer prefix>.<expert>": {"layer": i, "expert": e, "bits": b, "tokens": n}}}."""
    experts: dict[str, dict[str, Any]] = {}
    for rank in per_rank:
        for entry in rank:
            layer = int(re.search(r"layers\.(\d+)\.", entry["layer"] + ".").group(1))
            for expert, tokens, bits in zip(entry["experts"], entry["tokens"], entry["bits"]):
                key = f"{entry['layer']}.{expert}"
                row = experts.setdefault(key, {"layer": layer, "expert": expert, "bits": bits, "tokens": 0})
                row["tokens"] += tokens
    return {"format": PROFILE_FORMAT, "version": 1, "experts": dict(sorted(experts.items()))}


def by_layer_and_bits(profile: dict[str, Any]) -> dict[tuple[int, int], int]:
    totals: dict[tuple[int, int], int] = defaultdict(int)
    for row in profile["experts"].values():
        totals[(row["layer"], row["bits"])] += row["tokens"]
    return dict(totals)


def load_profile(path: str | Path) -> dict[int, dict[int, int]]:
    """A saved profile as layer -> expert -> routed tokens (what planners call usage)."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise PlanError(f"routing profile {path}: {err}") from None
    if not isinstance(data, dict) or data.get("format") != PROFILE_FORMAT:
        raise PlanError(f"{path} is not a moemix routing profile (GET /v1/moemix/routing)")
    usage: dict[int, dict[int, int]] = defaultdict(dict)
    experts = data.get("experts")
    if not isinstance(experts, dict):
        raise PlanError(f"{path}: a routing profile needs an 'experts' object (GET /v1/moemix/routing)")
    for key, row in experts.items():
        try:
            usage[int(row["layer"])][int(row["expert"])] = int(row["tokens"])
        except (KeyError, TypeError, ValueError):
            raise PlanError(f"{path}: expert {key!r} needs integer 'layer', 'expert' and 'tokens'") from None
    return dict(usage)
