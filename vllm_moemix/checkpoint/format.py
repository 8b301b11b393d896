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

from vllm_moemix.plan import Resolved, resolved_from_config
from vllm_moemix.spec import PlanError

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
