"""What a checkpoint holds, read from its files only (config.json + safetensors headers; no tensor data).

Used for /v1/models and for the `moemix_weight_*` metrics, for moemix checkpoints and plain float ones alike,
so a bf16 original and its moemix variant can be compared side by side.

- bytes at rest by component and bit width: every tensor of every shard, classified by name;
  `component` is one of COMPONENTS, `bits` is the moemix width ("2", "3", "4", "8") of a quantized linear
  (its qweight, scales and zero points all count there) or the dtype of a float tensor ("bf16", "fp16", "fp32").
- average bits: for moemix checkpoints the writer's `quantization_config.summary` (quantizable linears only,
  `avg_bits` with scales/zeros, `avg_payload_bits` the integer width); for float checkpoints the dtype width of
  the same linears (attention, experts, shared experts).
"""

from __future__ import annotations

import json
import math
import struct
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vllm_moemix.checkpoint.format import QUANT_METHOD

COMPONENTS = ("experts", "attention", "shared", "other")

_DTYPE_BITS = {"BF16": "bf16", "F16": "fp16", "F32": "fp32", "F64": "fp64", "F8_E4M3": "fp8", "F8_E5M2": "fp8",
               "I8": "int8", "U8": "uint8", "I32": "int32", "I64": "int64", "BOOL": "bool"}
_FLOAT_WIDTH = {"bf16": 16, "fp16": 16, "fp32": 32, "fp64": 64, "fp8": 8}
_QUANT_SUFFIXES = (".qweight", ".scales", ".qzeros", ".weight", ".bias", ".g_idx")


def component_of(tensor_name: str) -> str:
    """experts / attention / shared / other (routers, shared-expert gates, embeddings, norms, LM head)."""
    if ".shared_expert_gate" in tensor_name or tensor_name.endswith(".gate.weight"):
        return "other"
    if ".shared_expert." in tensor_name or ".shared_experts." in tensor_name:
        return "shared"
    if ".experts." in tensor_name:
        return "experts"
    if ".self_attn." in tensor_name and "norm" not in tensor_name.rsplit(".", 2)[-2]:
        return "attention"
    return "other"


def _module_of(tensor_name: str) -> str:
    for suffix in _QUANT_SUFFIXES:
        if tensor_name.endswith(suffix):
            return tensor_name[: -len(suffix)]
    return tensor_name


def read_safetensors_header(path: Path) -> dict[str, Any]:
    with open(path, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        if size > 100 * 2**20:
            raise ValueError(f"{path}: safetensors header of {size} bytes")
        header = json.loads(f.read(size))
    header.pop("__metadata__", None)
    return header


@dataclass
class WeightFacts:
    path: str
    quant_method: str | None = None
    bytes_by: dict[tuple[str, str], int] = field(default_factory=dict)  # (component, bits) -> bytes
    avg_bits: float | None = None
    avg_payload_bits: float | None = None
    summary: dict[str, Any] | None = None  # moemix quantization_config.summary, verbatim

    @property
    def is_moemix(self) -> bool:
        return self.quant_method == QUANT_METHOD

    @property
    def total_bytes(self) -> int:
        return sum(self.bytes_by.values())

    def by_component(self) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = {}
        for (component, bits), n in sorted(self.bytes_by.items()):
            out.setdefault(component, {})[bits] = n
        return out

    def to_json(self) -> dict[str, Any]:
        return {
            "quant_method": self.quant_method,
            "weight_bytes": self.total_bytes,
            "weight_bytes_by_component": self.by_component(),
            "avg_bits": self.avg_bits,
            "avg_payload_bits": self.avg_payload_bits,
        }

    def moemix_json(self) -> dict[str, Any] | None:
        """The moemix facts for /v1/models (None for other checkpoints)."""
        if not self.is_moemix:
            return None
        s = self.summary or {}
        return {
            "avg_bits": s.get("avg_bits"),
            "avg_payload_bits": s.get("avg_payload_bits"),
            "counts": s.get("counts"),
            "quantized_bytes": s.get("quantized_bytes"),
            "bf16_bytes": s.get("bf16_bytes"),
            "bytes_by_width": s.get("bytes_by_width", {}),
            "bytes_by_role": s.get("bytes_by_role", {}),
        }


def _number(value: Any) -> float | None:
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def read_weight_facts(model_dir: str | Path) -> WeightFacts:
    """Facts of a local Hugging Face directory; missing files give empty facts, never an exception."""
    model_dir = Path(model_dir)
    facts = WeightFacts(path=str(model_dir))
    try:
        config = json.loads((model_dir / "config.json").read_text())
    except (OSError, ValueError):
        return facts
    qcfg = config.get("quantization_config") if isinstance(config, dict) else None
    qcfg = qcfg if isinstance(qcfg, dict) else {}  # a malformed one is vLLM's loader's to refuse, with its name
    method = qcfg.get("quant_method")
    facts.quant_method = method if isinstance(method, str) else None
    modules = qcfg.get("modules") if facts.is_moemix else None
    modules = modules if isinstance(modules, dict) else {}
    if facts.is_moemix:
        summary = qcfg.get("summary")
        facts.summary = summary if isinstance(summary, dict) else {}
        facts.avg_bits = _number(facts.summary.get("avg_bits"))
        facts.avg_payload_bits = _number(facts.summary.get("avg_payload_bits"))

    bytes_by: dict[tuple[str, str], int] = defaultdict(int)
    linear_bits = linear_weights = 0
    for shard in sorted(model_dir.glob("*.safetensors")):
        try:
            header = read_safetensors_header(shard)
        except (OSError, ValueError, struct.error):
            continue
        for name, info in header.items():
            try:
                start, end = info["data_offsets"]
                dtype = _DTYPE_BITS.get(info["dtype"], str(info["dtype"]).lower())
                shape = info["shape"]
            except (KeyError, TypeError, ValueError):
                continue  # a broken header entry: facts stay partial, loading will name the shard
            component = component_of(name)
            spec = modules.get(_module_of(name))
            bits = str(spec["bits"]) if isinstance(spec, dict) and "bits" in spec else dtype
            bytes_by[(component, bits)] += end - start
            if component != "other" and bits in _FLOAT_WIDTH and name.endswith("weight") and not isinstance(spec, dict):
                n = math.prod(shape)
                linear_weights += n
                linear_bits += n * _FLOAT_WIDTH[bits]
    facts.bytes_by = dict(bytes_by)
    if not facts.is_moemix and facts.quant_method is None and linear_weights:
        facts.avg_bits = facts.avg_payload_bits = round(linear_bits / linear_weights, 4)
    return facts
