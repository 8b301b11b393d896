"""The stored form of one quantized linear and its exact dequantization.

`QuantizedWeight` is what the quantizers return, what the checkpoint writes
(suffixes `.qweight`, `.scales`, `.qzeros`) and what the reference kernel and
tests dequantize. One definition of the math keeps all of them in agreement.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vllm_moemix.config.spec import QuantSpec
from vllm_moemix.quant import packing

SCALE_DTYPE = torch.float16


@dataclass
class QuantizedWeight:
    """W[N, K] ~= (unpack(qweight)[k, n] - zero[g, n]) * scales[g, n], g = k // group_size."""

    qweight: torch.Tensor  # int32 [K*bits/32, N]
    scales: torch.Tensor  # fp16 [K/group, N]
    qzeros: torch.Tensor | None  # uint8 [K/group, N]; None when symmetric
    spec: QuantSpec

    def tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        """Checkpoint tensors for the linear named `prefix`."""
        out = {f"{prefix}.qweight": self.qweight, f"{prefix}.scales": self.scales}
        if self.qzeros is not None:
            out[f"{prefix}.qzeros"] = self.qzeros
        return out

    def split_rows(self, sizes: list[int]) -> list[QuantizedWeight]:
        """Output rows [0, sizes[0]), ... as separate linears (GPTQ quantizes fused gate/up as one weight)."""
        parts, start = [], 0
        for size in sizes:
            cols = slice(start, start + size)
            parts.append(
                QuantizedWeight(
                    qweight=self.qweight[:, cols].contiguous(),
                    scales=self.scales[:, cols].contiguous(),
                    qzeros=None if self.qzeros is None else self.qzeros[:, cols].contiguous(),
                    spec=self.spec,
                )
            )
            start += size
        return parts

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Float weight in nn.Linear layout [N, K]."""
        return dequantize_kn(self.qweight, self.scales, self.qzeros, self.spec.bits).t().to(dtype)


def dequantize_kn(
    qweight: torch.Tensor,
    scales: torch.Tensor,
    qzeros: torch.Tensor | None,
    bits: int,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Dequantize to the matmul operand W^T [K, N] (float32 math, then `dtype`).

    `qzeros=None` (or an empty tensor) means symmetric: zero point 2**(bits-1).
    Leading dims pass through: qweight [E, K*bits/32, N] -> [E, K, N].
    """
    q = packing.unpack(qweight, bits).to(torch.float32)  # [..., K, N]
    group = q.shape[-2] // scales.shape[-2]
    if qzeros is None or qzeros.numel() == 0:
        zero = torch.full_like(scales, float(1 << (bits - 1)), dtype=torch.float32)
    else:
        zero = qzeros.to(torch.float32)
    scale_k = scales.to(torch.float32).repeat_interleave(group, dim=-2)
    zero_k = zero.repeat_interleave(group, dim=-2)
    return ((q - zero_k) * scale_k).to(dtype)
