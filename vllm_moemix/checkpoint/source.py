"""Lazy, tensor-at-a-time access to a safetensors model directory.

Reading one tensor at a time (and shapes from headers only) keeps peak memory
near one tensor, so models larger than RAM can be quantized.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from vllm_moemix.config.arch import StackedExperts, architecture_for
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
        self._views: dict[str, tuple[str, int, str, StackedExperts]] = {}  # name -> (stacked tensor, expert, part)
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
        return name in self._where or name in self._views

    def names(self) -> list[str]:
        """Tensor names grouped by shard, in file order; a stacked expert tensor is listed as its experts' views."""
        if not self._views:
            return list(self._where)
        views_of: dict[str, list[str]] = {}
        for view, (base, _, _, _) in self._views.items():
            views_of.setdefault(base, []).append(view)
        return [v for name in self._where for v in views_of.get(name, [name])]

    def shape(self, name: str) -> tuple[int, ...]:
        if name in self._views:
            base, _, part, _ = self._views[name]
            _, k, n = self._shapes[base]
            return (n // 2, k) if part in ("gate", "up") else (n, k)
        return self._shapes[name]

    def dtype(self, name: str) -> str:
        """The stored dtype as safetensors names it ("BF16", "I32", ...), from the header only."""
        return self._dtypes[self._views[name][0] if name in self._views else name]

    def nbytes(self, name: str) -> int:
        """Bytes the tensor occupies at rest, from the header only."""
        return math.prod(self.shape(name)) * _ITEM_BYTES[self.dtype(name)]

    def get(self, name: str) -> torch.Tensor:
        if name in self._views:
            base, expert, part, stacked = self._views[name]
            with safe_open(self.dir / self._where[base], framework="pt") as f:
                one = f.get_slice(base)[expert : expert + 1]  # reads this expert only
            return stacked.expert_weight(one, 0, part)
        with safe_open(self.dir / self._where[name], framework="pt") as f:
            return f.get_tensor(name)

    def stacked_base(self, name: str) -> str | None:
        """The stacked tensor a per-expert view reads from (None: `name` is stored as itself)."""
        return self._views[name][0] if name in self._views else None

    def view_stacked_experts(self, config: Any) -> SafetensorsSource:
        """For architectures that store experts as 3-D tensors (GPT-OSS), expose each expert's gate / up / down
        as a `<experts>.<e>.<name>.weight` tensor, as every other architecture stores them; returns self."""
        arch = architecture_for(config)
        stacked = arch.stacked_experts
        if stacked is None:
            return self
        mlp = arch.experts
        for layer in range(config.num_hidden_layers):
            if not arch.is_moe_layer(config, layer):
                continue
            prefix = f"model.layers.{layer}.{mlp.prefix}"
            for tensor, parts in ((stacked.gate_up, ("gate", "up")), (stacked.down, ("down",))):
                base = f"{prefix}.{tensor}"
                if base not in self._where:
                    continue  # inspect_source names the missing expert linears
                if len(self._shapes[base]) != 3:
                    raise PlanError(f"{base}: expected a 3-D [experts, in, out] tensor, got {list(self._shapes[base])}")
                for e in range(self._shapes[base][0]):
                    for part in parts:
                        self._views[f"{prefix}.{e}.{getattr(mlp, part)}.weight"] = (base, e, part, stacked)
        return self
