"""What a live vLLM engine holds and serves, asked of its workers by method name.

The moemix MoE op counts the tokens routed to each local expert (a per-layer int64 buffer on the worker) and
every moemix layer records the kernel serving it. `RoutingWorkerExtension` is mixed into vLLM's worker so a
front end can `collective_rpc("moemix_routing" | "moemix_kernels" | "moemix_resident_bytes")`; the per-rank
routing answers become one profile with `vllm_moemix.config.routing_profile.merge`.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from vllm_moemix.layers.layout import routed_tokens


def worker_routing(worker: Any, reset: bool = False) -> list[dict[str, Any]]:
    """Per MoE layer on this rank: global expert ids, routed tokens, bits. Runs in a vLLM worker."""
    out = []
    for name, module in worker.get_model().named_modules():
        layout = getattr(module, "moemix_layout", None)
        if layout is None:
            continue
        moe = module.moe_config
        if not moe.moe_parallel_config.use_ep and moe.tp_rank != 0:
            continue  # tensor-parallel ranks see the same routing: count it once
        counts = routed_tokens(module)
        out.append(
            {
                "layer": name,
                "experts": list(module.moemix_local_to_global),
                "tokens": counts.tolist(),
                "bits": [layout.w13.spec_of(e).bits for e in range(layout.num_experts)],
            }
        )
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
            served["experts" if hasattr(module, "moemix_layout") else "linears"][kernel] += 1
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
