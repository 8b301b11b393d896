"""What a checkpoint holds, read from its files only (config.json + safetensors headers; no tensor data).

Used for /v1/models and for the `moemix_weight_*` metrics, for moemix checkpoints and plain float ones alike,
so a bf16 original and its moemix variant can be compared side by side. Built on the library's own readers:
`SafetensorsSource` for the headers, the checkpoint format for the per-module specs, the architecture table's
roles for what each tensor is.

- bytes at rest by component and bit width: every tensor of every shard; `component` is the role of the
  quantizable linear the tensor belongs to (COMPONENT_OF_ROLE), "other" for everything else (embeddings, LM
  head, norms, routers, and every tensor of an architecture the table does not know); `bits` is the moemix
  width ("2", "3", "4", "8") of a quantized linear (its qweight, scales and zero points all count there) or the
  dtype of a float tensor ("bf16", "fp16", "fp32").
- average bits: for moemix checkpoints the writer's `quantization_config.summary` (quantizable linears only,
  `avg_bits` with scales/zeros, `avg_payload_bits` the integer width); for float checkpoints the dtype width of
  the same quantizable linears.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vllm_moemix.checkpoint.format import QUANT_METHOD, load_config
from vllm_moemix.checkpoint.source import SafetensorsSource
from vllm_moemix.config.arch import ROLE_ATTENTION, ROLE_DENSE, ROLE_EXPERT, ROLE_SHARED, quantizable_linears
from vllm_moemix.config.plan import resolved_from_config
from vllm_moemix.config.spec import PlanError

# Metric label values (dashboards and alerts group by them), one per role of the architecture table.
COMPONENT_OF_ROLE = {ROLE_EXPERT: "experts", ROLE_ATTENTION: "attention", ROLE_SHARED: "shared", ROLE_DENSE: "dense"}
COMPONENTS = (*COMPONENT_OF_ROLE.values(), "other")

_DTYPE_NAMES = {"BF16": "bf16", "F16": "fp16", "F32": "fp32", "F64": "fp64", "F8_E4M3": "fp8", "F8_E5M2": "fp8"}
_FLOAT_WIDTH = {"bf16": 16, "fp16": 16, "fp32": 32, "fp64": 64, "fp8": 8}


def linear_components(model_dir: Path) -> dict[str, str]:
    """Quantizable linear -> component, from the architecture table; {} where it does not know the model."""
    from transformers import AutoConfig

    try:
        linears = quantizable_linears(AutoConfig.from_pretrained(model_dir))
    except Exception:  # unknown or malformed config: every tensor counts as "other", facts stay readable
        return {}
    return {name: COMPONENT_OF_ROLE[info.role] for name, info in linears.items()}


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
    """Facts of a local Hugging Face directory; missing or malformed files give partial facts, never an exception
    (refusing a broken checkpoint is the loader's job, with the module named)."""
    model_dir = Path(model_dir)
    facts = WeightFacts(path=str(model_dir))
    try:
        config = load_config(model_dir)
    except PlanError:
        return facts
    qcfg = config.get("quantization_config") if isinstance(config, dict) else None
    qcfg = qcfg if isinstance(qcfg, dict) else {}
    method = qcfg.get("quant_method")
    facts.quant_method = method if isinstance(method, str) else None
    specs = {}
    if facts.is_moemix:
        try:
            specs = {name: spec for name, spec in resolved_from_config(qcfg.get("modules")).items() if spec}
        except PlanError:
            pass  # widths unknown: quantized tensors count under their storage dtype
        summary = qcfg.get("summary")
        facts.summary = summary if isinstance(summary, dict) else {}
        facts.avg_bits = _number(facts.summary.get("avg_bits"))
        facts.avg_payload_bits = _number(facts.summary.get("avg_payload_bits"))
    try:
        source = SafetensorsSource(model_dir)
    except PlanError:
        return facts

    components = linear_components(model_dir)
    bytes_by: dict[tuple[str, str], int] = defaultdict(int)
    linear_bits = linear_weights = 0
    for name in source.names():
        module = name.rpartition(".")[0]
        component = components.get(module, "other")
        dtype = _DTYPE_NAMES.get(source.dtype(name), source.dtype(name).lower())
        spec = specs.get(module)
        bytes_by[(component, str(spec.bits) if spec else dtype)] += source.nbytes(name)
        if module in components and spec is None and name.endswith(".weight") and dtype in _FLOAT_WIDTH:
            n = math.prod(source.shape(name))
            linear_weights += n
            linear_bits += n * _FLOAT_WIDTH[dtype]
    facts.bytes_by = dict(bytes_by)
    if facts.quant_method is None and linear_weights:
        facts.avg_bits = facts.avg_payload_bits = round(linear_bits / linear_weights, 4)
    return facts
