"""The gated activations of MoE experts, defined once for everything that computes an expert in torch
(calibration, the reference and Triton kernels, tests); the native CPU kernel implements the same formulas.

gate and up are the two halves of the expert's first projection (moemix stores them as halves; GPT-OSS
checkpoints interleave them, and are de-interleaved on the way in):
  "silu":      h = silu(gate) * up                                  (Mixtral, Qwen, OLMoE, DeepSeek, GLM)
  "swigluoai": gate = min(gate, 7); up = clamp(up, -7, 7);          (GPT-OSS; vLLM's MoEActivation.SWIGLUOAI)
               h = (up + 1) * gate * sigmoid(1.702 * gate)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

EXPERT_ACTIVATIONS = ("silu", "swigluoai")
SWIGLUOAI_ALPHA = 1.702
SWIGLUOAI_LIMIT = 7.0


def check_activation(activation: str) -> None:
    if activation not in EXPERT_ACTIVATIONS:
        raise ValueError(f"expert activation {activation!r} is not one of {EXPERT_ACTIVATIONS}")


def gated(gate: torch.Tensor, up: torch.Tensor, activation: str) -> torch.Tensor:
    """h from the gate and up projections' outputs."""
    if activation == "silu":
        return F.silu(gate) * up
    check_activation(activation)
    gate = gate.clamp(max=SWIGLUOAI_LIMIT)
    up = up.clamp(-SWIGLUOAI_LIMIT, SWIGLUOAI_LIMIT)
    return (up + 1) * gate * torch.sigmoid(SWIGLUOAI_ALPHA * gate)


def gated_activation(gate_up: torch.Tensor, activation: str) -> torch.Tensor:
    """h [.., I] from gate_up [.., 2I] (gate half, then up half)."""
    inter = gate_up.shape[-1] // 2
    return gated(gate_up[..., :inter], gate_up[..., inter:], activation)
