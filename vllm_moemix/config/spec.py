"""What one linear (or one expert's linear) is quantized to.

A `QuantSpec` is the unit every other part of the project agrees on: the plan
assigns one per linear, the quantizer produces tensors for it, the checkpoint
records it and the vLLM method builds kernels from it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

SUPPORTED_BITS = (2, 3, 4, 8)
"""Integer widths we pack. 16 means "kept in the model's float dtype"."""

UNQUANTIZED = "bf16"
"""Plan/config spelling of "leave this linear in its original float dtype"."""

PACK_CHUNK = 32
"""Values are packed along K in chunks of 32 (32 * bits = a whole number of
int32 words for every width), so K and every group size must be multiples."""

DEFAULT_GROUP_SIZE = 128

NATIVE_CPU_BLOCK = 32
"""The native CPU kernels (csrc/) quantize activations per 32 values along K, so a group must
cover whole blocks; they implement every width in SUPPORTED_BITS."""


def native_cpu_refusal(spec: QuantSpec) -> str | None:
    """Why the native CPU kernels cannot run `spec` (None: they can). The planner only picks specs
    this accepts, and the kernels' `can_implement` asks the same question, so a plan never lands
    on the reference kernel because of its (bits, group) choice."""
    if spec.bits not in SUPPORTED_BITS:
        return f"{spec.bits}-bit weights have no native CPU kernel"
    if spec.group_size % NATIVE_CPU_BLOCK:
        return f"group size {spec.group_size} is not a multiple of the {NATIVE_CPU_BLOCK}-value activation block"
    return None


class PlanError(ValueError):
    """A plan, spec or checkpoint that cannot be honoured. Messages name the module."""


@dataclass(frozen=True, order=True)
class QuantSpec:
    """Integer width, group size along K, and whether zero points are stored.

    sym=True follows GPTQ's symmetric convention: zero point fixed at
    2**(bits-1) (vLLM/Marlin call this uint4b8 / uint8b128), so no zeros are
    stored. sym=False stores one uint8 zero point per group and column.
    """

    bits: int
    group_size: int = DEFAULT_GROUP_SIZE
    sym: bool = False

    def __post_init__(self) -> None:
        # type() checks, not isinstance: True is an int and 4.0 == 4, and either would fail far from here.
        if type(self.bits) is not int or self.bits not in SUPPORTED_BITS:
            raise PlanError(f"unsupported bit width {self.bits!r}; choose one of {SUPPORTED_BITS} or '{UNQUANTIZED}'")
        if type(self.group_size) is not int or self.group_size <= 0 or self.group_size % PACK_CHUNK:
            raise PlanError(f"group_size must be a positive multiple of {PACK_CHUNK}, got {self.group_size!r}")
        if type(self.sym) is not bool:
            raise PlanError(f"sym must be true or false, got {self.sym!r}")

    @property
    def max_q(self) -> int:
        return (1 << self.bits) - 1

    def check_input_dim(self, in_features: int, module: str, hint: str = "") -> None:
        """Raise a PlanError naming `module` if K cannot be grouped: the one place this rule lives."""
        if in_features % self.group_size:
            raise PlanError(
                f"{module}: group_size {self.group_size} does not divide its input dimension {in_features}{hint}"
            )

    def nbytes(self, out_features: int, in_features: int) -> int:
        """Bytes at rest: packed integers + fp16 scales + uint8 zeros (asym)."""
        groups = in_features // self.group_size
        payload = out_features * in_features * self.bits // 8
        scales = groups * out_features * 2
        zeros = 0 if self.sym else groups * out_features
        return payload + scales + zeros

    def to_dict(self) -> dict[str, Any]:
        return {"bits": self.bits, "group_size": self.group_size, "sym": self.sym}

    @classmethod
    def from_value(
        cls, value: Any, default: QuantSpec | None = None, where: str = "", complete: bool = False
    ) -> QuantSpec | None:
        """Parse a plan value: 4, "bf16", or {"bits": 4, "group_size": 64, "sym": true}.

        Returns None for "bf16" (unquantized). Missing dict keys come from `default` in a plan; with
        `complete` (a checkpoint's resolved modules, which the writer always spells out) every key must be
        there: a reader must not guess how tensors were stored.
        """
        prefix = f"{where}: " if where else ""
        if value == UNQUANTIZED or (type(value) is int and value == 16):
            return None
        base = default or cls(bits=4)
        if isinstance(value, (bool, float)):
            raise PlanError(f"{prefix}bits must be an integer, got {value!r}")
        if complete and not isinstance(value, dict):
            raise PlanError(f'{prefix}expected {{"bits", "group_size", "sym"}} or \'{UNQUANTIZED}\', got {value!r}')
        if type(value) is int:
            value = {"bits": value}
        if not isinstance(value, dict):
            raise PlanError(f"{prefix}expected bits, '{UNQUANTIZED}' or an object, got {value!r}")
        unknown = set(value) - {"bits", "group_size", "sym"}
        if unknown:
            raise PlanError(f"{prefix}unknown keys {sorted(unknown)}")
        if value.get("bits") == UNQUANTIZED or (type(value.get("bits")) is int and value["bits"] == 16):
            return None
        missing = [k for k in ("bits", "group_size", "sym") if k not in value]
        if complete and missing:
            raise PlanError(f"{prefix}missing {', '.join(missing)} (a checkpoint must say how each tensor is stored)")
        try:
            return cls(
                bits=value.get("bits", base.bits),
                group_size=value.get("group_size", base.group_size),
                sym=value.get("sym", base.sym),
            )
        except PlanError as err:
            raise PlanError(f"{prefix}{err}") from None
