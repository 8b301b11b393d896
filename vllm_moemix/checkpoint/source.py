"""Lazy, tensor-at-a-time access to a safetensors model directory.

Reading one tensor at a time (and shapes from headers only) keeps peak memory
near one tensor, so models larger than RAM can be quantized.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors import safe_open

from vllm_moemix.config.spec import PlanError

INDEX = "model.safetensors.index.json"
_ITEM_BYTES = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "I64": 8,
    "U64": 8,
    "F64": 8,
}


def shard_files(model_dir: Path) -> list[str]:
    """The safetensors shards of a model directory, from its index if it has one.

    Refuses what a loader must not follow: an index that is not JSON or has no weight_map, shard names that
    leave the directory (absolute, `..`, symlinks out), and directories holding only pickle weights.
    """
    index = model_dir / INDEX
    if index.exists():
        try:
            weight_map = json.loads(index.read_text()).get("weight_map")
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as err:
            raise PlanError(f"{index}: not a valid safetensors index ({err})") from None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise PlanError(f"{index}: 'weight_map' must map tensor names to shard file names")
        files = sorted(set(weight_map.values()))
        root = model_dir.resolve()
        for fname in files:
            if not (model_dir / fname).resolve().is_relative_to(root) or not fname.endswith(".safetensors"):
                raise PlanError(f"{index}: shard {fname!r} is not a .safetensors file inside {model_dir}")
    else:
        files = sorted(p.name for p in model_dir.glob("*.safetensors"))
    if not files:
        pickles = [p.name for p in model_dir.glob("*.bin")] + [p.name for p in model_dir.glob("*.pt")]
        hint = " (pickle weights are not read; convert them to safetensors)" if pickles else ""
        raise PlanError(f"{model_dir}: no safetensors weights found{hint}")
    return files


class SafetensorsSource:
    def __init__(self, model_dir: str | Path):
        self.dir = Path(model_dir)
        files = shard_files(self.dir)
        self.files = files
        self._where: dict[str, str] = {}
        self._shapes: dict[str, tuple[int, ...]] = {}
        self._dtypes: dict[str, str] = {}  # safetensors' names: "BF16", "I32", "U8", ...
        for fname in files:
            path = self.dir / fname
            if not path.exists():
                raise PlanError(f"{self.dir}: shard {fname} listed in the index is missing")
            try:
                with safe_open(path, framework="pt") as f:
                    for name in f.keys():
                        tensor = f.get_slice(name)
                        self._where[name] = fname
                        self._shapes[name] = tuple(tensor.get_shape())
                        self._dtypes[name] = tensor.get_dtype()
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

    def dtype(self, name: str) -> str:
        """The stored dtype as safetensors names it ("BF16", "I32", ...), from the header only."""
        return self._dtypes[name]

    def nbytes(self, name: str) -> int:
        """Bytes the tensor occupies at rest, from the header only."""
        return math.prod(self._shapes[name]) * _ITEM_BYTES[self._dtypes[name]]

    def get(self, name: str) -> torch.Tensor:
        with safe_open(self.dir / self._where[name], framework="pt") as f:
            return f.get_tensor(name)
