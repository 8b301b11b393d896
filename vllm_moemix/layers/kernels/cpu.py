"""Native x86 CPU kernels (csrc/cpu_kernels.cpp): int8 VNNI GEMMs straight from packed weights.

Decode is memory-bound, so these kernels stream the packed bits (2 bits per weight for a 2-bit
expert) and widen them in registers only. At load the weights are rearranged, never widened:

* tile-major: [.., K*bits/32, N] -> [.., N/64, K*bits/32, 64], so one 64-column strip of a weight is
  contiguous and streams sequentially (GPTQ's row-major layout jumps a page per packed row);
* 3-bit only: GPTQ's straddling 3-bit stream becomes a 2-bit plane plus a 1-bit plane of the same
  total size, ordered so both planes unpack with one shift and mask (`hi_bit_position`).

Activations are quantized to int8 per 32 values on the fly (like vLLM's W4A8 CPU path); the
accuracy cost is far below the weight quantization error and is tested against the reference.
"""

from __future__ import annotations

import functools

import torch

from vllm_moemix import packing
from vllm_moemix.layers.kernels.base import ExpertsConfig, ExpertsKernel, LinearConfig, LinearKernel

TILE = 64
"""Output columns per weight tile in the native kernel (four AVX-512 int32 vectors)."""

REQUIRED_CPU_FLAGS = ("avx512f", "avx512bw", "avx512vl", "avx512_vnni", "f16c")


@functools.cache
def _native_status() -> tuple[object | None, str | None]:
    """(extension module, None) when usable here, else (None, why not)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError as err:
        return None, f"cannot read CPU flags ({err})"
    missing = [flag for flag in REQUIRED_CPU_FLAGS if flag not in flags]
    if missing:
        return None, f"CPU lacks {', '.join(missing)}"
    try:
        from vllm_moemix import _cpu_kernels
    except ImportError as err:
        return None, f"native extension not built ({err}); reinstall with `pip install --no-build-isolation -e .`"
    _register_fakes()
    return _cpu_kernels, None


def _native():
    """Load the extension (registering torch.ops.moemix.cpu_*) or say why it cannot run here."""
    module, why = _native_status()
    if module is None:
        raise RuntimeError(f"moemix native CPU kernels unavailable: {why}")
    return module


def _can_run(device: torch.device, shapes: list[tuple[int, int]]) -> tuple[bool, str | None]:
    if device.type != "cpu":
        return False, f"native kernels run on CPU, not {device.type}"
    _, why = _native_status()
    if why:
        return False, why
    for k, n in shapes:
        if n % TILE:
            return False, f"output dimension {n} is not a multiple of {TILE}"
    return True, None


def hi_bit_position(k: int) -> int:
    """Bit of the 32-bit hi-plane word holding value k's high bit (k within its 32-value chunk).

    The 2-bit plane's extraction j of word r yields, in byte t, value 16r + j + 4t; putting that
    value's high bit at bit 8t + 4r + j lets the kernel fetch it with the same byte mask.
    """
    r, rest = divmod(k, 16)
    j, t = rest % 4, rest // 4
    return 8 * t + 4 * r + j


_HI_ORDER = torch.tensor(sorted(range(32), key=hi_bit_position))  # value index for bit 0..31


def split_3bit(qweight: torch.Tensor) -> torch.Tensor:
    """GPTQ 3-bit stream [3K/32, N] -> [2-bit plane (K/16 rows); hi plane (K/32 rows)], same size."""
    q = packing.unpack(qweight, 3)  # [K, N]
    k, n = q.shape
    low = packing.pack(q & 3, 2)
    high = (q >> 2).to(torch.int64).reshape(k // 32, 32, n)[:, _HI_ORDER, :]
    words = (high << torch.arange(32, dtype=torch.int64).view(1, 32, 1)).sum(1)
    words = torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32)
    return torch.cat([low, words])


def tile_major(t: torch.Tensor) -> torch.Tensor:
    """[..., R, N] -> [..., N/64, R, 64] contiguous: one column strip per tile."""
    *lead, r, n = t.shape
    return t.reshape(*lead, r, n // TILE, TILE).transpose(-3, -2).contiguous()


def repack_for_cpu(qweight: torch.Tensor, scales: torch.Tensor, qzeros: torch.Tensor | None, bits: int):
    """Rearrange one linear's (or a stack of experts') tensors into the native layout, one expert at a time."""
    if bits == 3:
        qweight = torch.stack([split_3bit(w) for w in qweight]) if qweight.dim() == 3 else split_3bit(qweight)
    zeros = qzeros if qzeros is not None and qzeros.numel() else None
    return tile_major(qweight), tile_major(scales), (tile_major(zeros) if zeros is not None else None)


def _replace(layer: torch.nn.Module, name: str, value: torch.Tensor) -> None:
    getattr(layer, name).data = value


def _register_fakes() -> None:
    """Shapes for torch.compile; the ops themselves are registered by the extension (C++, no Python hop)."""

    @torch.library.register_fake("moemix::cpu_linear")
    def _(x, qweight, scales, qzeros, bits, group_size):
        return x.new_empty(x.shape[0], qweight.numel() * 32 // (x.shape[1] * bits))

    @torch.library.register_fake("moemix::cpu_fused_moe")
    def _(x, topk_weights, topk_ids, expert_map, routed_tokens, w13_where, w2_where, w13_qweights, w13_scales,
          w13_qzeros, w13_bits, w13_groups, w2_qweights, w2_scales, w2_qzeros, w2_bits, w2_groups, intermediate):
        return torch.empty_like(x)


class NativeCpuLinearKernel(LinearKernel):
    @classmethod
    def can_implement(cls, config: LinearConfig, device: torch.device) -> tuple[bool, str | None]:
        return _can_run(device, [(config.in_features, config.out_features)])

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        _native()
        zeros = getattr(layer, "qzeros", None)
        q, s, z = repack_for_cpu(layer.qweight.data, layer.scales.data, zeros.data if zeros is not None else None,
                                 self.config.spec.bits)
        _replace(layer, "qweight", q)
        _replace(layer, "scales", s)
        if z is not None:
            _replace(layer, "qzeros", z)

    def apply(self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        zeros = getattr(layer, "qzeros", None)
        if zeros is None:
            zeros = x.new_empty(0, dtype=torch.uint8)
        flat = x.reshape(-1, x.shape[-1])
        out = torch.ops.moemix.cpu_linear(flat, layer.qweight, layer.scales, zeros, self.config.spec.bits,
                                          self.config.spec.group_size)
        out = out.reshape(*x.shape[:-1], out.shape[-1])
        return out if bias is None else out + bias


class NativeCpuExpertsKernel(ExpertsKernel):
    @classmethod
    def can_implement(cls, config: ExpertsConfig, device: torch.device) -> tuple[bool, str | None]:
        h, i = config.hidden_size, config.intermediate_size
        return _can_run(device, [(h, 2 * i), (i, h)])

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        _native()
        for grp in layer.moemix_groups.values():
            for g, spec in enumerate(grp.specs):
                names = [grp.param_name(g, s) for s in ("qweight", "scales", "qzeros")]
                q, s, z = repack_for_cpu(*(getattr(layer, n).data for n in names), spec.bits)
                _replace(layer, names[0], q)
                _replace(layer, names[1], s)
                if z is not None:
                    _replace(layer, names[2], z)

    def apply(self, layer, x, topk_weights, topk_ids):
        w13, w2 = layer.moemix_groups["w13"], layer.moemix_groups["w2"]
        expert_map = layer.expert_map if layer.expert_map is not None else layer.moemix_no_map
        return torch.ops.moemix.cpu_fused_moe(
            x, topk_weights, topk_ids, expert_map, layer.moemix_routed_tokens, layer.w13_where, layer.w2_where,
            *w13.tensor_lists(layer), w13.bits, [s.group_size for s in w13.specs],
            *w2.tensor_lists(layer), w2.bits, [s.group_size for s in w2.specs],
            self.config.intermediate_size,
        )
