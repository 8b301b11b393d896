"""The one small interface every moemix kernel implements.

Like vLLM's mixed-precision linear kernels (Marlin, Machete, Exllama), each
kernel says whether it `can_implement` a configuration on a device and why not;
`select.py` walks kernels in priority order and reports every reason when none
fits. Layers own the parameters (created from the checkpoint format); kernels
may repack them once in `process_weights_after_loading`, then `apply`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

from vllm_moemix.spec import QuantSpec


@dataclass(frozen=True)
class LinearConfig:
    """One linear on this rank: K x N after tensor-parallel sharding."""

    spec: QuantSpec
    in_features: int
    out_features: int
    act_dtype: torch.dtype


@dataclass(frozen=True)
class ExpertsConfig:
    """The local experts of one fused-MoE layer; specs are per local expert."""

    w13_specs: tuple[QuantSpec, ...]
    w2_specs: tuple[QuantSpec, ...]
    hidden_size: int
    intermediate_size: int  # per partition
    act_dtype: torch.dtype

    @property
    def widths(self) -> set[int]:
        return {s.bits for s in self.w13_specs + self.w2_specs}


class Kernel:
    """What every kernel shares: its config, and the name it reports as serving."""

    def __init__(self, config):
        self.config = config

    def describe(self) -> str:
        """What serves, as logs, /v1/models and metrics name it (native CPU kernels add their ISA)."""
        return type(self).__name__


class LinearKernel(Kernel, ABC):
    def __init__(self, config: LinearConfig):
        super().__init__(config)

    @classmethod
    @abstractmethod
    def can_implement(cls, config: LinearConfig, device: torch.device) -> tuple[bool, str | None]: ...

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        """Repack layer.qweight/scales/qzeros into this kernel's layout (default: keep)."""

    @abstractmethod
    def apply(self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor: ...


class ExpertsKernel(Kernel, ABC):
    def __init__(self, config: ExpertsConfig):
        super().__init__(config)

    @classmethod
    @abstractmethod
    def can_implement(cls, config: ExpertsConfig, device: torch.device) -> tuple[bool, str | None]: ...

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        """Repack the layer's per-width expert groups (default: keep)."""

    @abstractmethod
    def apply(
        self,
        layer: torch.nn.Module,
        x: torch.Tensor,
        topk_weights: torch.Tensor,
        topk_ids: torch.Tensor,
    ) -> torch.Tensor:
        """Weighted sum of the routed experts' SwiGLU MLPs, [T, H] in x's dtype."""
