"""The moemix checkpoint format (version 1); docs/checkpoint-format.md explains the why.

A checkpoint is a Hugging Face model directory: config.json, tokenizer files and
safetensors shards. Each quantized linear `X` (e.g.
`model.layers.0.block_sparse_moe.experts.3.w1`) replaces `X.weight` with
  X.qweight  int32 [K*bits/32, N]  bit stream along K (see packing.py)
  X.scales   fp16  [K/group, N]
  X.qzeros   uint8 [K/group, N]    only when the spec is asymmetric
and config.json carries `quantization_config`:
  {"quant_method": "moemix", "format_version": 1,
   "modules": {"<linear>": {"bits", "group_size", "sym"} | "bf16", ...},
   "plan": <the plan as given>, "summary": {...}, "quantizer": "rtn"}
`modules` is the resolved plan: one entry per quantizable linear, so a reader
needs no pattern logic.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from vllm_moemix.config.plan import Resolved, resolved_from_config
from vllm_moemix.config.spec import PlanError, QuantSpec
from vllm_moemix.quant.tensors import SCALE_DTYPE

QUANT_METHOD = "moemix"
FORMAT_VERSION = 1
SUFFIXES = ("qweight", "scales", "qzeros")


def is_checkpoint_dir(path: Path) -> bool:
    """True if `path` already holds a model (we never write over one)."""
    return path.is_dir() and ((path / "config.json").exists() or any(path.glob("*.safetensors")))


def read_quantization_config(quant_config: Any, source: str = "quantization_config") -> Resolved:
    """Validate a moemix quantization_config dict and return its resolved plan."""
    if not isinstance(quant_config, dict):
        raise PlanError(f"{source}: expected an object")
    method = str(quant_config.get("quant_method", "")).lower()
    if method != QUANT_METHOD:
        raise PlanError(f"{source}: quant_method is {method!r}, not {QUANT_METHOD!r}")
    version = quant_config.get("format_version")
    if version != FORMAT_VERSION:
        raise PlanError(
            f"{source}: moemix format_version {version!r} is not supported (this build reads {FORMAT_VERSION})"
        )
    if "modules" not in quant_config:
        raise PlanError(f"{source}: missing 'modules' (the resolved bit plan)")
    return resolved_from_config(quant_config["modules"])


def load_config(model_dir: str | Path) -> dict[str, Any]:
    path = Path(model_dir) / "config.json"
    if not path.exists():
        raise PlanError(f"{model_dir}: no config.json (not a Hugging Face model directory)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise PlanError(f"{path}: invalid JSON: {err}") from None


def expected_tensor(suffix: str, spec: QuantSpec, k: int, n: int) -> tuple[tuple[int, int], torch.dtype]:
    """(shape, dtype) of one stored tensor of a [K, N] linear (K = in_features, before any TP split)."""
    rows = k * spec.bits // 32 if suffix == "qweight" else k // spec.group_size
    return (rows, n), {"qweight": torch.int32, "scales": SCALE_DTYPE, "qzeros": torch.uint8}[suffix]


def check_stored_tensor(where: str, suffix: str, tensor: torch.Tensor, spec: QuantSpec, k: int, n: int | None) -> None:
    """Raise a PlanError naming `where` unless `tensor` is exactly what `spec` stores for a [K, N] linear.

    Loaders call this on the full checkpoint tensor before narrowing it to a rank's slice or copying it,
    so an oversized tensor is never silently truncated and a dtype is never silently converted. The message
    says what the stored shape implies (the bits or group size it was written with). `n=None` skips the
    column count (fused shards, which vLLM's own loader checks).
    """
    (rows, cols), dtype = expected_tensor(suffix, spec, k, n or 0)
    if tensor.dtype != dtype:
        raise PlanError(f"{where}.{suffix}: stored as {tensor.dtype}, the format says {dtype}")
    if tensor.dim() != 2:
        raise PlanError(f"{where}.{suffix}: stored with shape {list(tensor.shape)}, expected 2 dimensions")
    found_rows, found_cols = tensor.shape
    if found_rows != rows:
        if suffix == "qweight" and (found_rows * 32) % k == 0:
            implied = f"stored as {found_rows * 32 // k}-bit, plan says {spec.bits}-bit"
        elif suffix != "qweight" and found_rows and k % found_rows == 0:
            implied = f"stored with group size {k // found_rows}, plan says {spec.group_size}"
        else:
            implied = f"does not match {spec.bits}-bit group {spec.group_size} for {k} inputs"
        raise PlanError(
            f"{where}.{suffix}: shape {list(tensor.shape)}, expected {[rows, cols if n else found_cols]} ({implied})"
        )
    if n is not None and found_cols != cols:
        raise PlanError(
            f"{where}.{suffix}: shape {list(tensor.shape)}, expected {[rows, cols]} "
            f"({found_cols} output columns, the model has {cols})"
        )
