"""Native x86 CPU kernels (csrc/): int8 GEMMs straight from packed weights, one variant per ISA.

Decode is memory-bound, so these kernels stream the packed bits (2 bits per weight for a 2-bit
expert) and widen them in registers only. The extension holds one micro-kernel per ISA (AVX-512
VNNI, AVX-VNNI, AVX2), each compiled for its own target; this module picks the fastest one the CPU
runs (or the one `MOEMIX_CPU_ISA` names) and passes its name to every op call, so the layout a layer
was repacked into and the kernel that reads it always agree. The layout itself (tile width per ISA,
3-bit planes, activation permutation) is owned by the extension: `repack` there, described in
csrc/kernel_api.h.

Activations are quantized to int8 per 32 values on the fly (like vLLM's W4A8 CPU path); the
accuracy cost is far below the weight quantization error and is tested against the reference.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch

from vllm_moemix.config.spec import QuantSpec, native_cpu_refusal
from vllm_moemix.layers.kernels.base import ExpertsConfig, ExpertsKernel, LinearConfig, LinearKernel

ISA_ENV = "MOEMIX_CPU_ISA"


@dataclass(frozen=True)
class IsaVariant:
    """One compiled micro-kernel: `missing` lists the CPU flags this machine lacks for it (empty: runs here)."""

    name: str
    tile: int
    max_rows: int
    requires: tuple[str, ...]
    missing: tuple[str, ...]

    @property
    def supported(self) -> bool:
        return not self.missing


@functools.cache
def _native_status() -> tuple[object | None, str | None]:
    """(extension module, None) when it loads here, else (None, why not)."""
    try:
        from vllm_moemix import _cpu_kernels
    except ImportError as err:
        return None, f"native extension not built ({err}); reinstall with `pip install --no-build-isolation -e .`"
    _register_fakes()
    return _cpu_kernels, None


def variants() -> list[IsaVariant]:
    """Every variant the extension was built with, fastest first (empty without the extension)."""
    module, _ = _native_status()
    if module is None:
        return []
    return [
        IsaVariant(v["name"], v["tile"], v["max_rows"], tuple(v["requires"]), tuple(v["missing"]))
        for v in module.variants()
    ]


def choose_variant() -> tuple[IsaVariant | None, str | None]:
    """The variant this process runs: `MOEMIX_CPU_ISA` if set (it must be supported), else the fastest supported."""
    _, why = _native_status()
    if why:
        return None, why
    known = variants()
    forced = os.environ.get(ISA_ENV, "").strip()
    if forced:
        match = next((v for v in known if v.name == forced), None)
        if match is None:
            return None, f"{ISA_ENV}={forced} names no variant; built: {', '.join(v.name for v in known)}"
        if not match.supported:
            return None, f"{ISA_ENV}={forced}, but the CPU lacks {', '.join(match.missing)}"
        return match, None
    usable = [v for v in known if v.supported]
    if not usable:
        return None, "; ".join(f"{v.name} needs {', '.join(v.missing)}" for v in known) + " (CPU lacks them)"
    return usable[0], None


def cpu_summary() -> str:
    """'AMD EPYC 9B45: avx512_vnni, avx_vnni, avx2 (AMX: no)' -- the CPU a benchmark ran on, as results name it."""
    name = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            name = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), name)
    except OSError:
        pass
    runs = [v.name for v in variants() if v.supported] or ["no native variant"]
    return f"{name}: {', '.join(runs)} (AMX: {'yes' if torch.cpu._is_amx_tile_supported() else 'no'})"


def _native():
    """Load the extension (registering torch.ops.moemix.cpu_*) or say why it cannot run here."""
    module, why = _native_status()
    if module is None:
        raise RuntimeError(f"moemix native CPU kernels unavailable: {why}")
    return module


def _runs_on(device: torch.device) -> tuple[bool, str | None]:
    if device.type != "cpu":
        return False, f"native kernels run on CPU, not {device.type}"
    variant, why = choose_variant()
    return variant is not None, why


def _supports(specs: list[QuantSpec], output_dims: list[int]) -> tuple[bool, str | None]:
    """The specs must be ones the kernels run (`native_cpu_refusal`, the planner's question too) and output
    dimensions must fill whole column tiles of the variant this CPU runs (elsewhere: of the widest variant
    built, so the answer holds on every CPU)."""
    for spec in specs:
        why = native_cpu_refusal(spec)
        if why is not None:
            return False, why
    variant, _ = choose_variant()
    if variant is None:
        module, why = _native_status()
        if module is None:
            return False, why
        variant = max(variants(), key=lambda v: v.tile)
    for n in output_dims:
        if n % variant.tile:
            return False, f"output dimension {n} is not a multiple of {variant.tile} (the {variant.name} tile width)"
    return True, None


def repack_for_cpu(
    qweight: torch.Tensor, scales: torch.Tensor, qzeros: torch.Tensor | None, bits: int, isa: str, gated: bool = False
):
    """One linear's (or a stack of experts') tensors in the native layout of `isa` (same bytes, rearranged).
    `gated`: experts' gate/up projection, whose columns the fused-MoE op reads interleaved per 32."""
    zeros = qzeros if qzeros is not None and qzeros.numel() else torch.empty(0, dtype=torch.uint8)
    q, s, z = _native().repack(qweight, scales, zeros, bits, isa, gated)
    return q, s, (z if z.numel() else None)


def _replace(layer: torch.nn.Module, name: str, value: torch.Tensor) -> None:
    getattr(layer, name).data = value


def _register_fakes() -> None:
    """Shapes for torch.compile; the ops themselves are registered by the extension (C++, no Python hop)."""

    @torch.library.register_fake("moemix::cpu_linear")
    def _(x, qweight, scales, qzeros, bits, group_size, isa):
        return x.new_empty(x.shape[0], qweight.numel() * 32 // (x.shape[1] * bits))

    @torch.library.register_fake("moemix::cpu_fused_moe")
    def _(x, *layout_args):
        return torch.empty_like(x)


class _NativeCpuKernel:
    """The variant is fixed when a kernel is made: its layout and its op calls must agree."""

    def __init__(self, config):
        super().__init__(config)
        variant, why = choose_variant()
        if variant is None:
            raise RuntimeError(f"moemix native CPU kernels unavailable: {why}")
        self.isa = variant.name

    def describe(self) -> str:
        return f"{type(self).__name__} ({self.isa})"


class NativeCpuLinearKernel(_NativeCpuKernel, LinearKernel):
    @classmethod
    def can_run_on(cls, device: torch.device) -> tuple[bool, str | None]:
        return _runs_on(device)

    @classmethod
    def supports(cls, config: LinearConfig) -> tuple[bool, str | None]:
        return _supports([config.spec], [config.out_features])

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        zeros = getattr(layer, "qzeros", None)
        q, s, z = repack_for_cpu(
            layer.qweight.data,
            layer.scales.data,
            zeros.data if zeros is not None else None,
            self.config.spec.bits,
            self.isa,
        )
        _replace(layer, "qweight", q)
        _replace(layer, "scales", s)
        if z is not None:
            _replace(layer, "qzeros", z)

    def apply(self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        zeros = getattr(layer, "qzeros", None)
        if zeros is None:
            zeros = x.new_empty(0, dtype=torch.uint8)
        flat = x.reshape(-1, x.shape[-1])
        out = torch.ops.moemix.cpu_linear(
            flat, layer.qweight, layer.scales, zeros, self.config.spec.bits, self.config.spec.group_size, self.isa
        )
        out = out.reshape(*x.shape[:-1], out.shape[-1])
        return out if bias is None else out + bias


class NativeCpuExpertsKernel(_NativeCpuKernel, ExpertsKernel):
    @classmethod
    def can_run_on(cls, device: torch.device) -> tuple[bool, str | None]:
        return _runs_on(device)

    @classmethod
    def supports(cls, config: ExpertsConfig) -> tuple[bool, str | None]:
        return _supports(list(config.w13_specs + config.w2_specs), [2 * config.intermediate_size, config.hidden_size])

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        """Repacks every width group for this variant straight into the one buffer the op reads (`pack_experts`):
        a decode call then passes two tensors, not six lists, through the dispatcher."""
        layout = layer.moemix_layout
        experts, experts_layout = _native().pack_experts(
            *layout.op_args(layer), layout.hidden_size, layout.intermediate_size, self.isa
        )
        for name in layout.parameter_names():  # now in `experts`: freed, not kept twice
            delattr(layer, name)
        layer.register_buffer("moemix_cpu_experts", experts, persistent=False)
        layer.register_buffer("moemix_cpu_experts_layout", experts_layout, persistent=False)

    def apply(self, layer, x, topk_weights, topk_ids):
        # One op per call: mapping, usage counts and dtype conversions happen inside it (ExpertsLayout.route's
        # work for the other kernels) -- at decode every extra eager op costs ~10-100 us on cold caches. The
        # overload itself, not the packet: resolving it costs a few microseconds more per call.
        return torch.ops.moemix.cpu_fused_moe.default(
            x,
            topk_weights,
            topk_ids,
            getattr(layer, "expert_map", None),
            layer.moemix_routed_pairs,
            layer.moemix_cpu_experts,
            layer.moemix_cpu_experts_layout,
        )
