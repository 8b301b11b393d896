"""Diagonal empirical Fisher of the quantizable weights: how much the model's next-token loss cares about each
weight, through every layer after it.

The planner's default error (tr(dW H dW^T), planning/errors.py) is layer-local: it says how much a unit's output
moves, not how much the model's prediction does, so units of different layers and roles are compared on a
common scale they do not share. Weighting dW^2 by the Fisher F_ij = E[(dL/dW_ij)^2] (HAWQ-style, one backward
pass per calibration window) measures the second-order change of the loss instead, and ranks single-unit
quantizations much closer to their measured output KL (docs/quality/sensitivity.md). It needs the whole float
model and its gradients in memory, so it is for models that fit.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import torch
from tqdm import tqdm

from vllm_moemix.calibration.layerwise import linear_weight, whole_model_fits
from vllm_moemix.config.arch import Architecture, architecture_for
from vllm_moemix.config.spec import PlanError


def fisher_fits(model_dir: str | Path) -> tuple[bool, str]:
    """Whether the Fisher pass (float32 weights, gradients and the running Fisher) fits, and the numbers."""
    return whole_model_fits(model_dir, copies=3)


@contextlib.contextmanager
def _parameters_replaced(model: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> Iterator[None]:
    """Temporarily give every parameter other data (same shapes), so module-tree views read those tensors."""
    params = dict(model.named_parameters())
    saved = {n: p.data for n, p in params.items()}
    try:
        for n, p in params.items():
            p.data = tensors[n]
        yield
    finally:
        for n, p in params.items():
            p.data = saved[n]


def weight_fisher(
    model_dir: str | Path, samples: torch.Tensor, names: list[str], progress: bool = True
) -> dict[str, torch.Tensor]:
    """name -> F [out, in] for each checkpoint linear in `names`: the mean over calibration windows of the squared
    gradient of each window's next-token loss (float32, CPU). Refuses, with the numbers, when the model does
    not fit in memory for it."""
    from transformers import AutoModelForCausalLM

    fits, detail = fisher_fits(model_dir)
    if not fits:
        raise PlanError(
            f"the fisher error model holds the whole float model and its gradients ({detail}): "
            "use --error-model estimate for this model"
        )
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.train(False)
    arch: Architecture = architecture_for(model.config)
    fisher = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    for row in tqdm(samples, desc="fisher", unit="window", disable=not progress):
        model.zero_grad(set_to_none=True)
        model(row[None], labels=row[None]).loss.backward()
        for n, p in model.named_parameters():
            if p.grad is not None:
                fisher[n].add_(p.grad.detach().square(), alpha=1.0 / len(samples))
    model.zero_grad(set_to_none=True)
    with _parameters_replaced(model, fisher):
        return {name: linear_weight(model, arch, name).clone() for name in names}
