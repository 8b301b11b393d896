"""Expert routing counts collected while serving: the usage profile.

The moemix MoE op counts the tokens routed to each local expert (a per-layer
int64 buffer on the worker). `worker_routing` runs inside vLLM workers through
`collective_rpc("moemix_routing")` (see RoutingWorkerExtension); `merge` turns the per-rank answers into one profile keyed by
checkpoint expert name, which the server exports (Prometheus, aggregated by
layer and bit width; JSON per expert) and `moemix plan --usage` reads back.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from pathlib import Path
from typing import Any

from vllm_moemix.spec import PlanError

PROFILE_FORMAT = "moemix-routing"


def worker_routing(worker: Any, reset: bool = False) -> list[dict[str, Any]]:
    """Per MoE layer on this rank: global expert ids, routed tokens, bits. Runs in a vLLM worker."""
    out = []
    for name, module in worker.get_model().named_modules():
        counts = getattr(module, "moemix_routed_tokens", None)
        if counts is None:
            continue
        moe = module.moe_config
        if not moe.moe_parallel_config.use_ep and moe.tp_rank != 0:
            continue  # tensor-parallel ranks see the same routing: count it once
        w13 = module.moemix_groups["w13"]
        out.append({
            "layer": name,
            "experts": list(module.moemix_local_to_global),
            "tokens": counts.tolist(),
            "bits": [w13.specs[w13.where[e][0]].bits for e in range(len(counts))],
        })
        if reset:
            counts.zero_()
    return out


def worker_resident_bytes(worker: Any) -> dict[str, int]:
    """Bytes the loaded model holds on this rank (parameters and buffers, shared storage once), by dtype.

    Measured on the live model after every kernel's repacking, so it checks what the plan promised.
    """
    seen: set[int] = set()
    by_dtype: dict[str, int] = defaultdict(int)
    model = worker.get_model()
    for tensor in [*model.parameters(), *model.buffers()]:
        storage = tensor.untyped_storage()
        if storage.data_ptr() in seen:
            continue
        seen.add(storage.data_ptr())
        by_dtype[str(tensor.dtype).removeprefix("torch.")] += storage.nbytes()
    return dict(by_dtype)


def worker_kernels(worker: Any) -> dict[str, dict[str, int]]:
    """{"experts": {kernel: MoE layers}, "linears": {kernel: linears}} on this rank: what actually serves."""
    served: dict[str, dict[str, int]] = {"experts": defaultdict(int), "linears": defaultdict(int)}
    for module in worker.get_model().modules():
        kernel = getattr(module, "moemix_kernel", None)
        if kernel is not None:
            served["experts" if hasattr(module, "moemix_groups") else "linears"][kernel] += 1
    return {role: dict(counts) for role, counts in served.items()}


def reference_fallback_reason(served: dict[str, dict[str, int]]) -> str | None:
    """Why the slow reference kernel serves some layer on this machine's CPU, or None if none does."""
    from vllm_moemix.layers.kernels.cpu import choose_variant
    from vllm_moemix.layers.kernels.select import REFERENCE_KERNELS

    reference = {k.__name__ for k in REFERENCE_KERNELS}
    if not any(kernel in reference for counts in served.values() for kernel in counts):
        return None

    variant, why = choose_variant()
    return why if variant is None else "a layer's shape does not fit the native kernel (see the engine log)"


def describe_served(served: dict[str, dict[str, int]]) -> str:
    """One line: 'experts: NativeCpuExpertsKernel (avx2) x4; linears: NativeCpuLinearKernel (avx2) x16'."""
    parts = []
    for role, counts in served.items():
        if counts:
            parts.append(f"{role}: " + ", ".join(f"{k} x{n}" for k, n in sorted(counts.items())))
    return "; ".join(parts) or "no moemix layers"


class RoutingWorkerExtension:
    """Mixed into vLLM's worker class (engine arg `worker_extension_cls`, vLLM's mechanism for this), so a
    front end can call `collective_rpc("moemix_routing")` with a method name: no pickled code crosses."""

    def moemix_routing(self, reset: bool = False) -> list[dict[str, Any]]:
        return worker_routing(self, reset)

    def moemix_resident_bytes(self) -> dict[str, int]:
        return worker_resident_bytes(self)

    def moemix_kernels(self) -> dict[str, dict[str, int]]:
        return worker_kernels(self)


EXTENSION = f"{__name__}.{RoutingWorkerExtension.__name__}"


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
