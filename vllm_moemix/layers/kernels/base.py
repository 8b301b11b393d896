"""The one small interface every moemix kernel implements.

Like vLLM's mixed-precision linear kernels (Marlin, Machete, Exllama), each
kernel says whether it `can_implement` a configuration on a device and why not,
in two questions: can this hardware run it (`can_run_on`), and does it support
this configuration (`supports`: widths, group sizes, shapes — what a planner may
ask without the hardware). `select.py` walks kernels in priority order and
reports every reason when none fits. Layers own the parameters (created from the checkpoint format); kernels
may repack them once in `process_weights_after_loading`, then `apply`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

# The gated activations every experts kernel implements, defined once in config/activations.py and named here
# for the kernels' interface (ExpertsConfig.activation): over gate_up = [gate | up] (halves, not interleaved),
#   "silu":      h = silu(gate) * up
#   "swigluoai": GPT-OSS (vLLM's SWIGLUOAI on de-interleaved halves): gate = min(gate, 7); up = clamp(up, -7, 7);
#                h = (up + 1) * gate * sigmoid(1.702 * gate)
from vllm_moemix.config.activations import EXPERT_ACTIVATIONS as EXPERT_ACTIVATIONS
from vllm_moemix.config.activations import SWIGLUOAI_ALPHA as SWIGLUOAI_ALPHA
from vllm_moemix.config.activations import SWIGLUOAI_LIMIT as SWIGLUOAI_LIMIT
from vllm_moemix.config.activations import gated_activation as gated_activation
from vllm_moemix.config.spec import QuantSpec


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
    activation: str = "silu"  # one of EXPERT_ACTIVATIONS
    has_bias: bool = False  # per-expert biases on both projections (layer.moemix_w13_bias / moemix_w2_bias)

    def __post_init__(self):
        if self.activation not in EXPERT_ACTIVATIONS:
            raise ValueError(f"expert activation {self.activation!r} is not one of {EXPERT_ACTIVATIONS}")

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

    @classmethod
    def can_run_on(cls, device: torch.device) -> tuple[bool, str | None]:
        """Can this device (and this CPU's instruction set) run the kernel at all."""
        return True, None

    @classmethod
    def supports(cls, config) -> tuple[bool, str | None]:
        """Does the kernel handle this configuration (widths, group sizes, shapes) wherever it runs."""
        return True, None

    @classmethod
    def can_implement(cls, config, device: torch.device) -> tuple[bool, str | None]:
        ok, why = cls.can_run_on(device)
        return cls.supports(config) if ok else (False, why)


class LinearKernel(Kernel, ABC):
    def __init__(self, config: LinearConfig):
        super().__init__(config)

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        """Repack layer.qweight/scales/qzeros into this kernel's layout (default: keep)."""

    @abstractmethod
    def apply(self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor: ...


class ExpertsKernel(Kernel, ABC):
    def __init__(self, config: ExpertsConfig):
        super().__init__(config)

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
        """Weighted sum of the routed experts' gated MLPs, [T, H] in x's dtype: per pair (token t, expert e,
        weight w) out[t] += w * (act(x[t] @ W13[e] + b13[e]) @ W2[e] + b2[e]), `config.activation` and biases
        (when `config.has_bias`) as in `EXPERT_ACTIVATIONS`. `topk_ids` are the router's (global) ids: the kernel
        maps them to this rank's experts and counts them for the usage profile, as `ExpertsLayout.route` does."""
