"""Pure scorers of weights and calibration statistics. Higher score = deserves more bits.

Each function cites where it comes from; all are unit-tested on hand-built
weights whose right answer is known (tests/planning/test_planning.py).
"""

from __future__ import annotations

import torch


def outlier_score(weight: torch.Tensor) -> float:
    """QuantMoE-Bench's outlier-aware linear scorer: max over input columns j of
    max_i |W_ij| / mean_i |W_ij| (W is [out, in])."""
    a = weight.abs().float()
    return float((a.amax(dim=0) / a.mean(dim=0).clamp_min(1e-12)).max())


def kurtosis(weight: torch.Tensor) -> float:
    """Data-free sensitivity (DynaMINT): E[(w-mu)^4] / sigma^4 over all weights; heavy tails quantize worse."""
    w = weight.float().flatten()
    centered = w - w.mean()
    var = centered.pow(2).mean().clamp_min(1e-24)
    return float(centered.pow(4).mean() / var.pow(2))


def max_intra_neuron_variance(w1: torch.Tensor) -> float:
    """Router-norm paper's MaxVar: the largest variance across a neuron's (row's) weights of the
    expert's first projection (w1 / gate_proj, [intermediate, hidden])."""
    return float(w1.float().var(dim=1).max())


def router_norm_scores(router: torch.Tensor, router_init: torch.Tensor | None = None) -> torch.Tensor:
    """Router-norm expert-wise precision (arXiv 2604.06515): experts whose router row changed
    *least* in training learn rare but critical features and get more bits. Score = -|change of
    the row's L2 norm| with an initial checkpoint; without one, -(final norm) (router rows start
    near zero, so a small final norm means little change)."""
    final = router.float().norm(dim=1)
    if router_init is None:
        return -final
    return -(final - router_init.float().norm(dim=1)).abs()


def apply_maxvar(order: list[int], maxvar: list[float], zeta: float = 3.0) -> list[int]:
    """One pass of the paper's MaxVar correction over a most-deserving-first expert order: an expert
    whose MaxVar exceeds zeta times its better-ranked neighbour's moves ahead of it."""
    order = list(order)
    for i in range(len(order) - 1, 0, -1):
        if maxvar[order[i]] > zeta * maxvar[order[i - 1]]:
            order[i - 1], order[i] = order[i], order[i - 1]
    return order


def block_importance(block_cosine: float) -> float:
    """QuantMoE-Bench's block importance: how much a block changes its input, 1 - cos(in, out)."""
    return 1.0 - block_cosine


def hessian_error(weight: torch.Tensor, dequantized: torch.Tensor, hessian: torch.Tensor) -> float:
    """tr(dW H dW^T): summed squared output error over the calibration tokens H was built from."""
    delta = weight.float() - dequantized.to(weight.device, torch.float32)
    return float(((delta @ hessian.float()) * delta).sum(dtype=torch.float64))


def heuristic_levels(avg_bits: float) -> tuple[int, int]:
    """The two widths a two-level heuristic splits between: 2/4 below 4 bits, 4/8 from 4 up, so
    e.g. a 3-bit budget gives half the weights 4 bits and half 2 (QuantMoE-Bench's style)."""
    return (2, 4) if avg_bits < 4 else (4, 8)
