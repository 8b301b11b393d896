"""Bytes and average bits of a resolved plan, counted honestly.

What "average bits" counts (stated everywhere it is printed): the quantizable
linears only (attention, routed experts, shared experts, dense MLPs; not
embeddings, LM head, norms or routers). `avg_bits` includes scale and zero
overhead (bytes * 8 / weights); `avg_payload_bits` is the integer width alone,
the convention of QuantMoE-Bench and most papers.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

from vllm_moemix.config.arch import LinearInfo
from vllm_moemix.config.plan import Resolved

BF16_BYTES = 2


@dataclass
class Footprint:
    weights: int = 0  # number of weights in quantizable linears
    payload_bits: int = 0  # sum of bits * weights
    nbytes: int = 0  # bytes at rest including scales/zeros (bf16 linears count 2 bytes/weight)
    by_role: dict[str, int] = field(default_factory=lambda: defaultdict(int))  # role -> bytes
    by_width: dict[str, int] = field(default_factory=lambda: defaultdict(int))  # "2".."8"/"bf16" -> bytes
    weights_by_width: dict[str, int] = field(default_factory=lambda: defaultdict(int))

    @property
    def bf16_bytes(self) -> int:
        return self.weights * BF16_BYTES

    @property
    def avg_bits(self) -> float:
        return 8 * self.nbytes / max(self.weights, 1)

    @property
    def avg_payload_bits(self) -> float:
        return self.payload_bits / max(self.weights, 1)


def footprint(resolved: Resolved, linears: dict[str, LinearInfo]) -> Footprint:
    fp = Footprint()
    for name, spec in resolved.items():
        info = linears[name]
        n = info.out_features * info.in_features
        width = "bf16" if spec is None else str(spec.bits)
        nbytes = n * BF16_BYTES if spec is None else spec.nbytes(info.out_features, info.in_features)
        fp.weights += n
        fp.payload_bits += n * (16 if spec is None else spec.bits)
        fp.nbytes += nbytes
        fp.by_role[info.role] += nbytes
        fp.by_width[width] += nbytes
        fp.weights_by_width[width] += n
    return fp
