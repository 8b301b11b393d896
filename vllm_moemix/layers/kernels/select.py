"""Pick the first kernel, in priority order, that can implement a layer.

Set MOEMIX_DISABLED_KERNELS=Name1,Name2 to skip kernels (debugging, A/B
benchmarks). Faster kernels (Triton, Marlin, native CPU) go before the
portable reference, which implements everything. When the reference is
chosen the user is told why the fast kernels refused (once per reason):
it is correct but several times slower.
"""

from __future__ import annotations

import logging
import os
from typing import TypeVar

import torch

from vllm_moemix.layers.kernels.base import ExpertsConfig, ExpertsKernel, LinearConfig, LinearKernel
from vllm_moemix.layers.kernels.cpu import NativeCpuExpertsKernel, NativeCpuLinearKernel
from vllm_moemix.layers.kernels.marlin import MarlinExpertsKernel
from vllm_moemix.layers.kernels.reference import DequantExpertsKernel, DequantLinearKernel
from vllm_moemix.layers.kernels.triton_moe import TritonExpertsKernel, TritonLinearKernel

LINEAR_KERNELS: list[type[LinearKernel]] = [NativeCpuLinearKernel, TritonLinearKernel, DequantLinearKernel]
EXPERTS_KERNELS: list[type[ExpertsKernel]] = [
    MarlinExpertsKernel,
    NativeCpuExpertsKernel,
    TritonExpertsKernel,
    DequantExpertsKernel,
]

K = TypeVar("K", LinearKernel, ExpertsKernel)
REFERENCE_KERNELS = (DequantLinearKernel, DequantExpertsKernel)
logger = logging.getLogger("vllm.moemix")  # a child of vLLM's logger: its handlers and format
_warned: set[str] = set()


def _choose(candidates: list[type[K]], config, device: torch.device) -> type[K]:
    disabled = {n.strip() for n in os.environ.get("MOEMIX_DISABLED_KERNELS", "").split(",") if n.strip()}
    reasons = []
    for kernel in candidates:
        if kernel.__name__ in disabled:
            reasons.append(f"{kernel.__name__}: disabled by MOEMIX_DISABLED_KERNELS")
            continue
        ok, why = kernel.can_implement(config, device)
        if ok:
            if kernel in REFERENCE_KERNELS and reasons:
                _warn_slow_fallback(kernel, reasons)
            return kernel
        reasons.append(f"{kernel.__name__}: {why}")
    raise ValueError(f"no moemix kernel can implement {config} on {device}:\n  " + "\n  ".join(reasons))


def _warn_slow_fallback(kernel: type, reasons: list[str]) -> None:
    message = f"moemix: the slow reference kernel {kernel.__name__} serves here because " + "; ".join(reasons)
    if message not in _warned:
        _warned.add(message)
        logger.warning(message)


def choose_linear_kernel(config: LinearConfig, device: torch.device) -> type[LinearKernel]:
    return _choose(LINEAR_KERNELS, config, device)


def choose_experts_kernel(config: ExpertsConfig, device: torch.device) -> type[ExpertsKernel]:
    return _choose(EXPERTS_KERNELS, config, device)
