"""Round-to-nearest group quantization (the data-free baseline).

Per group of `group_size` input columns and per output row:
  asym: scale = (max - min) / (2**b - 1), zero = round(-min / scale)
  sym:  scale = 2 * max|w| / (2**b - 1), zero = 2**(b-1)   (GPTQ's convention)
q = clamp(round(w / scale) + zero, 0, 2**b - 1).
"""

from __future__ import annotations

import torch

from vllm_moemix.quant import packing
from vllm_moemix.quant.tensors import SCALE_DTYPE, QuantizedWeight
from vllm_moemix.config.spec import QuantSpec

_MIN_SCALE = 1e-7  # keeps all-zero groups finite; fp16 represents it as a subnormal


def group_params(w_groups: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero per group for float32 weights shaped [..., group_size]."""
    max_q = spec.max_q
    if spec.sym:
        absmax = w_groups.abs().amax(dim=-1)
        scale = (2 * absmax / max_q).clamp_min(_MIN_SCALE)
        zero = torch.full_like(scale, float(1 << (spec.bits - 1)))
    else:
        lo = w_groups.amin(dim=-1).clamp_max(0)
        hi = w_groups.amax(dim=-1).clamp_min(0)
        scale = ((hi - lo) / max_q).clamp_min(_MIN_SCALE)
        zero = torch.round(-lo / scale).clamp(0, max_q)
    # Round scales to their stored precision first so q is chosen for the scale we keep.
    return scale.to(SCALE_DTYPE).to(torch.float32).clamp_min(_MIN_SCALE), zero


def quantize_rtn(weight: torch.Tensor, spec: QuantSpec) -> QuantizedWeight:
    """Quantize an nn.Linear weight [N, K] to `spec`."""
    n, k = weight.shape
    spec.check_input_dim(k, "weight")
    w = weight.detach().to(torch.float32).reshape(n, k // spec.group_size, spec.group_size)
    scale, zero = group_params(w, spec)  # [N, G]
    q = torch.clamp(torch.round(w / scale.unsqueeze(-1)) + zero.unsqueeze(-1), 0, spec.max_q)
    q = q.reshape(n, k).to(torch.int32)
    return QuantizedWeight(
        qweight=packing.pack(q.t().contiguous(), spec.bits),
        scales=scale.t().contiguous().to(SCALE_DTYPE),
        qzeros=None if spec.sym else zero.t().contiguous().to(torch.uint8),
        spec=spec,
    )
