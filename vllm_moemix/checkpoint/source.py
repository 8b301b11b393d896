"""Lazy, tensor-at-a-time access to a safetensors model directory.

Reading one tensor at a time (and shapes from headers only) keeps peak memory
near one tensor, so models larger than RAM can be quantized.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from vllm_moemix.spec import PlanError


class SafetensorsSource:
    def __init__(self, model_dir: str | Path):
        self.dir = Path(model_dir)
        index = self.dir / "model.safetensors.index.json"
        if index.exists():
            weight_map = json.loads(index.read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(p.name for p in self.dir.glob("*.safetensors"))
        if not files:
            pickles = [p.name for p in self.dir.glob("*.bin")] + [p.name for p in self.dir.glob("*.pt")]
            hint = " (pickle weights are not read; convert them to safetensors)" if pickles else ""
            raise PlanError(f"{self.dir}: no safetensors weights found{hint}")
        self.files = files
        self._where: dict[str, str] = {}
        self._shapes: dict[str, tuple[int, ...]] = {}
        for fname in files:
            path = self.dir / fname
            if not path.exists():
                raise PlanError(f"{self.dir}: shard {fname} listed in the index is missing")
            try:
                with safe_open(path, framework="pt") as f:
                    for name in f.keys():
                        self._where[name] = fname
                        self._shapes[name] = tuple(f.get_slice(name).get_shape())
            except PlanError:
                raise
            except Exception as err:  # safetensors raises its own error types for corrupt headers
                raise PlanError(f"{path}: unreadable safetensors file: {err}") from None

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def names(self) -> list[str]:
        """Tensor names grouped by shard, in file order."""
        return list(self._where)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._shapes[name]

    def get(self, name: str) -> torch.Tensor:
        with safe_open(self.dir / self._where[name], framework="pt") as f:
            return f.get_tensor(name)
