"""One fused-MoE layer at real model shapes: moemix kernels vs vLLM's own CPU MoE paths, side by side.

Rows, all timed in this process on the same routing, round-robin (one call of each row in turn): vLLM bf16
(`cpu_fused_moe`, AMX-prepacked where the CPU has AMX, else its portable "vec" path — what vLLM runs for an
unquantized MoE on x86), vLLM's GPTQ-4bit CPU MoE (`fused_experts_cpu` W4A8, what it runs for a GPTQ/AWQ
4-bit checkpoint; AMX-only, so elsewhere its row says "not available on this CPU" and the rest runs), and
moemix with a 2.5-bit mixed layer (half the experts 2-bit, half 3-bit), all-4-bit and all-2-bit experts
(group 128, uint8 zero points), through whichever kernel the selector picks (`--disable` A/B tests others),
once per native ISA variant in `--isas` (default: the fastest this CPU runs, and AVX2 forced beside it).
Weights are random codes: speed does not depend on their values.

Also timed in turn with the rows: memory read bandwidth (a streaming sum over a fresh 64 MB slice), so each
row can say how close it is to the bandwidth limit: bytes of the routed experts (each counted once per call) /
time / that bandwidth; and once per shape, before the rows, the CPU's own int8 GEMM on dense int8 weights (oneDNN
through torch._int_mm, AMX where present), so the int8 rows' multiply-add rate at the largest M reads as a share of
what the hardware's vendor library reaches. Each rep routes to other experts than the last (the routing shifted
by top-k), as in decode, where dozens of layers run between two calls of one layer: with one fixed routing, a
small layer's experts stayed in the last-level cache and the M=1 figures read partly from L3. The garbage
collector is frozen after set-up, as vLLM's engine core does.

GPT-OSS-20B's layer has per-expert biases on both projections and the swigluoai activation: the moemix rows
run them, vLLM's bf16 row runs them through `cpu_fused_moe`'s own bias and "swigluoai" support, and its int4
row says why it cannot (vLLM's W4A8 CPU MoE runs SiLU without biases only). Layers too big for this
machine's memory with every row built at once (DeepSeek-V3: 22.5 GB in bf16 alone) keep a subset of their
experts (`stored`), the router choosing top-k among those: at M=1 a call reads exactly what the full layer
reads (top-k experts' bytes); larger M touch fewer distinct experts than the full layer would, so those
columns are optimistic for every row alike. The table says so per shape, and `layer GB` projects each row's
memory for all experts.

    .venv/bin/python benchmarks/kernels.py                 # Mixtral, Qwen3-30B-A3B, DeepSeek-V2/V3, GPT-OSS, GLM
    .venv/bin/python benchmarks/kernels.py --quick         # a small shape (smoke test)
    .venv/bin/python benchmarks/kernels.py --quick --shapes quick-oss  # small, with biases and swigluoai

Writes <out>/kernels.{json,md,png}.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

# No vllm_moemix.layers (hence vLLM) import at module level: run as a script from benchmarks/, this file is
# importable as `kernels`, which transformers probes for (the PyPI `kernels` package) while vLLM is importing.

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class LayerShape:
    name: str
    experts: int
    top_k: int
    hidden: int
    inter: int
    activation: str = "silu"  # one of vllm_moemix.layers.kernels.base.EXPERT_ACTIVATIONS
    bias: bool = False  # per-expert biases on both projections
    stored: int | None = None  # experts kept in memory and routed among (None: all)
    group: int = 128  # the moemix rows' (and vLLM GPTQ row's) group size

    @property
    def kept(self) -> int:
        return self.stored or self.experts

    def notes(self) -> list[str]:
        out = []
        if self.kept < self.experts:
            out.append(
                f"{self.kept} of {self.experts} experts in memory, top-{self.top_k} routed among them: M=1 reads what "
                f"the full layer reads; larger M touch fewer distinct experts than the full layer would (optimistic "
                f"for every row alike); `layer GB` is projected to all {self.experts} experts"
            )
        if self.bias or self.activation != "silu":
            out.append(f"experts with {'biases and ' if self.bias else ''}the {self.activation} activation")
        if self.group != 128:
            out.append(f"group size {self.group} (128 does not divide hidden {self.hidden})")
        return out


SHAPES = {
    "mixtral": LayerShape("Mixtral-8x7B", 8, 2, 4096, 14336),
    "qwen3": LayerShape("Qwen3-30B-A3B", 128, 8, 2048, 768),
    "dsv2lite": LayerShape("DeepSeek-V2-Lite (routed experts)", 64, 6, 2048, 1408),
    # bf16 alone would be 22.5 GB (all 256) / 4.4 GB (all 128): 32 / 64 kept so every row fits beside the others
    "dsv3": LayerShape("DeepSeek-V3 (routed experts)", 256, 8, 7168, 2048, stored=32),
    "gptoss": LayerShape("GPT-OSS-20B", 32, 4, 2880, 2880, activation="swigluoai", bias=True, group=64),
    "glm45air": LayerShape("GLM-4.5-Air (routed experts)", 128, 8, 4096, 1408, stored=64),
    "quick": LayerShape("quick", 8, 2, 512, 768),
    "quick-oss": LayerShape("quick-oss", 8, 2, 576, 576, activation="swigluoai", bias=True, stored=6, group=64),
}
DEFAULT_SHAPES = "mixtral,qwen3,dsv2lite,dsv3,gptoss,glm45air"
MOEMIX_ROWS = {"moemix 2.5-bit mixed": (2, 3), "moemix 4-bit": (4,), "moemix 2-bit": (2,)}
BF16_ROW, INT4_ROW = "vLLM bf16", "vLLM GPTQ-4bit"
ROOFLINE_ROWS = 64  # rows of the int8 roofline GEMM at least; `of int8` is shown where the largest M reaches 16


class Unavailable(Exception):
    """A row that cannot run on this CPU; its reason goes in the table instead of numbers."""


def interleaved_times(fns, reps: int, warmup: int = 2) -> list[list[float]]:
    """Seconds of each fn(rep) per rep, timed round-robin so machine noise hits every row alike (ratios stay fair).
    Each round starts one row later, so no row always follows the same one (whatever a call leaves behind --
    caches, clocks, sleeping threads -- falls on every row alike). Warm-up calls get negative rep numbers."""
    for fn in fns:
        for rep in range(-warmup, 0):
            fn(rep)
    times: list[list[float]] = [[] for _ in fns]
    for rep in range(reps):
        for i in range(len(fns)):
            j = (i + rep) % len(fns)
            start = time.perf_counter()
            fns[j](rep)
            times[j].append(time.perf_counter() - start)
    return times


class BandwidthProbe:
    """Streaming read bandwidth, timed as one more row beside the kernels: a sum over a fresh 64 MB slice of a
    1 GiB tensor each rep (never cached). This machine's bandwidth drifts by 20% over minutes (a shared VM), so a
    figure taken at the start of the run misstates how close a row measured later came to the limit."""

    def __init__(self, total: int = 1 << 30, chunk: int = 64 << 20):
        self.data = torch.ones(total // 4, dtype=torch.float32)
        self.chunk = chunk // 4
        self.slices = self.data.numel() // self.chunk

    @property
    def bytes(self) -> int:
        return self.chunk * 4

    def __call__(self, rep: int) -> None:
        start = (rep % self.slices) * self.chunk
        self.data[start : start + self.chunk].sum()


def int8_gemm_gmacs(rows: int, k: int, n: int, reps: int = 5) -> float | None:
    """Multiply-adds per second of the CPU's vendor int8 GEMM on dense int8 weights (oneDNN through
    torch._int_mm: VNNI, or AMX tiles where the CPU has them): the compute roofline the int8 rows' GMAC/s at the
    largest M are read against. None where this torch build has no CPU int8 GEMM."""
    gen = torch.Generator().manual_seed(0)
    a = torch.randint(-127, 128, (rows, k), dtype=torch.int8, generator=gen)
    b = torch.randint(-127, 128, (k, n), dtype=torch.int8, generator=gen)
    try:
        torch._int_mm(a, b)
    except RuntimeError:
        return None
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        torch._int_mm(a, b)
        best = min(best, time.perf_counter() - start)
    return rows * k * n / best / 1e9


def routing(tokens: int, shape: LayerShape, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k among the experts kept in memory. One token routes to a block of top-k consecutive experts (in the
    mixed layer half 2-bit, half 3-bit: its average width), so `rotated` reaches new experts every rep."""
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(tokens, shape.kept, generator=gen)
    weights, ids = torch.softmax(logits, -1).topk(shape.top_k, dim=-1)
    if tokens == 1:
        ids = torch.randperm(shape.top_k, generator=gen)[None]
    return (weights / weights.sum(-1, keepdim=True)).float(), ids.to(torch.int32)


def rotated(ids: torch.Tensor, rep: int, shape: LayerShape) -> torch.Tensor:
    """Rep `rep`'s expert ids: the routing shifted by rep * top_k experts. As in decode, where dozens of other
    layers run between two calls of one layer, consecutive reps read other experts, so a call finds its weights
    in RAM, not left in the last-level cache by the previous rep (same routing every rep: M=1 of a small layer
    ran from L3)."""
    return (ids + rep * shape.top_k) % shape.kept


def random_codes(*shape: int) -> torch.Tensor:
    return torch.empty(shape, dtype=torch.int32).random_()


def bias_bytes(shape: LayerShape, dtype: torch.dtype) -> int:
    """Bytes of one expert's two biases (0 without)."""
    return (2 * shape.inter + shape.hidden) * dtype.itemsize if shape.bias else 0


# ---- moemix -------------------------------------------------------------------------------------------


def moemix_layer(shape: LayerShape, widths: tuple[int, ...], isa: str | None = None):
    """A module laid out like MoeMixMoEMethod.create_weights, its experts cycling through `widths`.

    `isa` forces a native variant (MOEMIX_CPU_ISA while the kernel is made; the kernel keeps it)."""
    from vllm_moemix.config.spec import QuantSpec
    from vllm_moemix.layers.kernels import cpu
    from vllm_moemix.layers.kernels.select import choose_experts_kernel
    from vllm_moemix.layers.layout import ExpertsLayout

    specs = [QuantSpec(widths[e % len(widths)], shape.group) for e in range(shape.kept)]
    layer = torch.nn.Module()
    layer.expert_map = None
    layout = ExpertsLayout.build(specs, specs, shape.hidden, shape.inter, shape.activation, shape.bias)
    layout.register(layer)
    if shape.bias:
        layer.moemix_w13_bias.data.normal_(0, 0.1)
        layer.moemix_w2_bias.data.normal_(0, 0.1)
    for grp in layout.groups().values():
        for g, spec in enumerate(grp.specs):
            qweight = getattr(layer, grp.param_name(g, "qweight"))
            qweight.data = random_codes(*qweight.shape)
            getattr(layer, grp.param_name(g, "scales")).data.uniform_(0, 1e-3)
            getattr(layer, grp.param_name(g, "qzeros")).data.random_(0, 1 << spec.bits)
    config = layout.kernel_config(torch.bfloat16)
    saved = os.environ.get(cpu.ISA_ENV)
    if isa:
        os.environ[cpu.ISA_ENV] = isa
    try:
        kernel = choose_experts_kernel(config, torch.device("cpu"))(config)
    finally:
        os.environ.pop(cpu.ISA_ENV, None) if saved is None else os.environ.__setitem__(cpu.ISA_ENV, saved)
    per_expert = [bias_bytes(shape, torch.float32)] * shape.kept  # counted before loading moves them (same bytes)
    for grp in layout.groups().values():
        for g, members in enumerate(grp.members):
            group_bytes = sum(getattr(layer, grp.param_name(g, s)).nbytes for s in ("qweight", "scales", "qzeros"))
            for e in members:
                per_expert[e] += group_bytes // len(members)
    kernel.process_weights_after_loading(layer)
    return (lambda x, w, i: kernel.apply(layer, x, w, i)), kernel.describe(), per_expert


# ---- vLLM baselines -----------------------------------------------------------------------------------


def has_amx() -> bool:
    """vLLM's own test for its AMX MoE paths (X86CPUUnquantizedExperts, CPUExpertsInt4)."""
    return torch.cpu._is_amx_tile_supported()


def vllm_bf16_layer(shape: LayerShape):
    from vllm import _custom_ops as ops

    isa = "amx" if has_amx() else "vec"  # as vLLM's unquantized CPU MoE chooses
    e = shape.kept
    w13 = ops.cpu_prepack_moe_weight(
        torch.randn(e, 2 * shape.inter, shape.hidden, dtype=torch.bfloat16).mul_(0.02), isa
    )
    w2 = ops.cpu_prepack_moe_weight(torch.randn(e, shape.hidden, shape.inter, dtype=torch.bfloat16).mul_(0.02), isa)
    # vLLM's own expert biases and activation (GPT-OSS: "swigluoai", bf16 biases, as its CPU MoE passes them)
    b13 = torch.randn(e, 2 * shape.inter, dtype=torch.bfloat16).mul_(0.1) if shape.bias else None
    b2 = torch.randn(e, shape.hidden, dtype=torch.bfloat16).mul_(0.1) if shape.bias else None

    def run(x, w, i):
        out = torch.empty_like(x)
        ops.cpu_fused_moe(out, x, w13, w2, b13, b2, w, i, shape.activation, isa)
        return out

    per_expert = w13[0].nbytes + w2[0].nbytes + bias_bytes(shape, torch.bfloat16)
    return run, f"vLLM cpu_fused_moe ({isa})", [per_expert] * e


def vllm_int4_unavailable(shape: LayerShape | None = None) -> str | None:
    """Why vLLM's int4 CPU MoE cannot run this layer here (it would die with SIGILL or a missing op, not raise)."""
    if shape is not None and (shape.bias or shape.activation != "silu"):
        return (
            "vLLM's W4A8 MoE (CPUExpertsInt4) runs SiLU experts without biases only "
            f"(this layer: {shape.activation}{' with biases' if shape.bias else ''})"
        )
    if not has_amx():
        return "vLLM's W4A8 MoE (CPUExpertsInt4) needs AMX, which this CPU lacks"
    if not hasattr(torch.ops._C, "convert_weight_packed_scale_zp"):
        return "this vLLM build has no int4 CPU GEMM (torch.ops._C.convert_weight_packed_scale_zp is missing)"
    return None


def vllm_int4_layer(shape: LayerShape):
    from vllm._custom_ops import CPUQuantMethod, fused_experts_cpu
    from vllm.model_executor.layers.fused_moe.experts.cpu_moe import prepare_int4_moe_layer_for_cpu

    why = vllm_int4_unavailable(shape)
    if why:
        raise Unavailable(why)
    e, h, i, group = shape.kept, shape.hidden, shape.inter, shape.group
    w13, w2, s13, s2, z13, z2 = prepare_int4_moe_layer_for_cpu(
        random_codes(e, h // 8, 2 * i),
        random_codes(e, i // 8, h),
        (torch.rand(e, h // group, 2 * i) * 1e-3).to(torch.bfloat16),
        (torch.rand(e, i // group, h) * 1e-3).to(torch.bfloat16),
    )

    def run(x, w, ids):
        out = torch.empty_like(x)
        fused_experts_cpu(
            out, x, w13, w2, w, ids, CPUQuantMethod.INT4_W4A8, s13, s2, z13, z2, None, None, None, None, None, True
        )
        return out

    per_expert = sum(t[0].nbytes for t in (w13, w2, s13, s2, z13, z2))
    return run, "vLLM fused_experts_cpu (W4A8)", [per_expert] * e


def default_isas() -> list[str]:
    """The fastest variant this CPU runs, and AVX2 forced beside it (the floor every x86-64 user gets)."""
    from vllm_moemix.layers.kernels import cpu

    supported = [v.name for v in cpu.variants() if v.supported]
    return supported[:1] + [v for v in supported[1:] if v == "avx2"]


def rows_for(isas: list[str]) -> dict:
    rows = {BF16_ROW: vllm_bf16_layer, INT4_ROW: vllm_int4_layer}
    for i, isa in enumerate(isas or [None]):
        for name, widths in MOEMIX_ROWS.items():
            label = name if i == 0 else f"{name} [{isa}]"  # the default variant's rows keep the plain names
            rows[label] = lambda shape, widths=widths, isa=isa: moemix_layer(shape, widths, isa)
    return rows


def bench_shape(shape: LayerShape, tokens: list[int], reps: int, probe: BandwidthProbe, rows: dict) -> list[dict]:
    """Every row of one shape is built first, then timed interleaved (with the bandwidth probe), token count by
    token count."""
    built, results = {}, []
    for row, build in tqdm(rows.items(), desc=f"{shape.name}: build", leave=False):
        try:
            built[row] = build(shape)
        except Unavailable as why:
            results += [
                {"shape": shape.name, "row": row, "kernel": None, "tokens": m, "ms": None, "unavailable": str(why)}
                for m in tokens
            ]
    # Before the rows are timed, alone: the gate/up GEMM of one expert on dense int8 weights, at 64 rows or the
    # largest M (fewer rows would measure the weights' streaming, not the arithmetic).
    int8_peak = int8_gemm_gmacs(max(ROOFLINE_ROWS, *tokens), shape.hidden, 2 * shape.inter)
    meta = {
        "experts": shape.experts,
        "experts_stored": shape.kept,
        "notes": shape.notes(),
        "int8_gemm_gmacs": int8_peak,
    }
    gc.collect()
    gc.freeze()  # as vLLM's engine core does after start-up: the timed calls never pay for collecting start-up objects
    for m in tqdm(tokens, desc=f"{shape.name}: time", leave=False):
        w, ids = routing(m, shape, seed=m)
        x = torch.randn(m, shape.hidden, dtype=torch.bfloat16)
        routes = [rotated(ids, rep, shape).contiguous() for rep in range(reps)]  # warm-ups (rep < 0) wrap
        fns = [lambda rep, run=run, x=x, w=w, routes=routes: run(x, w, routes[rep]) for run, _, _ in built.values()]
        *row_times, probe_times = interleaved_times([*fns, probe], reps)
        routed = [route.unique().tolist() for route in routes]  # each rep's distinct experts, for every row
        rows_at_m = []
        for (row, (_, kernel, per_expert)), times in zip(built.items(), row_times):
            read = [sum(per_expert[e] for e in experts) for experts in routed]
            ms = statistics.median(times) * 1e3
            rows_at_m.append(
                {
                    "shape": shape.name,
                    "row": row,
                    "kernel": kernel,
                    "tokens": m,
                    "ms": ms,
                    **meta,
                    "layer_bytes": sum(per_expert) * shape.experts // len(per_expert),  # projected to all experts
                    "bytes_read": statistics.mean(read),
                    "gbs": statistics.median(b / t / 1e9 for b, t in zip(read, times)),
                    # int8 (moemix) / bf16 (vLLM) multiply-adds per second: the compute roofline at large M
                    "gmacs": m * shape.top_k * 3 * shape.hidden * shape.inter / ms / 1e6,
                }
            )
        # The limit a row is measured against: the streaming sum, or any row that streamed faster (torch's sum
        # reaches ~85% of what a plain streaming kernel such as vLLM's bf16 MoE reads at M=1).
        probe_gbs = statistics.median(probe.bytes / t / 1e9 for t in probe_times)
        fastest = max(rows_at_m, key=lambda r: r["gbs"])
        bandwidth, source = (
            (probe_gbs, "streaming sum") if probe_gbs >= fastest["gbs"] else (fastest["gbs"], fastest["row"])
        )
        for r in rows_at_m:
            r |= {"bandwidth_gbs": bandwidth, "bandwidth_source": source, "of_bandwidth": r["gbs"] / bandwidth}
        results += rows_at_m
    gc.unfreeze()
    del built
    gc.collect()
    order = list(rows)
    return sorted(results, key=lambda r: (order.index(r["row"]), r["tokens"]))


def _ratio(r: dict, anchor: dict | None) -> str:
    return "n/a" if anchor is None or anchor.get("ms") is None else f"{r['ms'] / anchor['ms']:.2f}"


def markdown(results: list[dict], threads: int, cpu_name: str) -> str:
    lines = [
        f"CPU: {cpu_name}. Median ms per layer call, {threads} threads. `of bw` = routed experts' bytes / time / "
        "read bandwidth (`bw` per shape): a streaming sum timed in turn with the rows, or the fastest row's own "
        "rate where it streamed faster; "
        "`GMAC/s` = multiply-adds per second at the largest M (the compute roofline once weights are reused); "
        "`of int8` = that rate / the CPU's vendor int8 GEMM on dense int8 weights (oneDNN via torch._int_mm, "
        "M x hidden x 2·inter, AMX where present), for the rows that compute in int8. `kernel` names the variant "
        "that serves every M (moemix picks none by M: an AMX variant for large M is not built yet). "
        "Consecutive calls route to different experts, as in decode where other layers run in between.",
        "",
    ]
    for shape in dict.fromkeys(r["shape"] for r in results):
        rows = [r for r in results if r["shape"] == shape]
        tokens = sorted({r["tokens"] for r in rows})
        first_m, last_m = tokens[0], tokens[-1]
        notes = next((r["notes"] for r in rows if r.get("notes")), [])
        ref = next((r for r in rows if r["tokens"] == first_m and r.get("bandwidth_gbs")), None)
        lines += [f"### {shape}", ""] + [f"*{note}.*" for note in notes]
        if ref:
            lines.append(f"*bw (M={first_m}): {ref['bandwidth_gbs']:.1f} GB/s ({ref['bandwidth_source']}).*")
        peak = rows[0].get("int8_gemm_gmacs")
        lines.append(
            f"*int8 roofline: {peak:.0f} GMAC/s (oneDNN int8 GEMM, {max(ROOFLINE_ROWS, last_m)} rows).*"
            if peak
            else "*int8 roofline: n/a (this torch has no CPU int8 GEMM).*"
        )
        lines.append("")
        lines += [
            "| row | kernel | "
            + " | ".join(f"M={m}" for m in tokens)
            + f" | ×bf16 (M={first_m}) | ×vLLM-4bit (M={first_m}) | ×vLLM-4bit (M={last_m}) | of bw (M={first_m})"
            f" | GMAC/s (M={last_m}) | of int8 (M={last_m}) | layer GB |",
            "|---|---|" + "---|" * len(tokens) + "---|---|---|---|---|---|---|",
        ]
        by = {(r["row"], r["tokens"]): r for r in rows}
        for row in dict.fromkeys(r["row"] for r in rows):
            first, last = by[(row, first_m)], by[(row, last_m)]
            if first["ms"] is None:
                lines.append(
                    f"| {row} | not available on this CPU: {first['unavailable']} |" + " |" * (len(tokens) + 7)
                )
                continue
            cells = " | ".join(f"{by[(row, m)]['ms']:.2f}" for m in tokens)
            of_int8 = "bf16" if row == BF16_ROW else f"{last['gmacs'] / peak:.0%}" if peak and last_m >= 16 else "n/a"
            lines.append(
                f"| {row} | {first['kernel']} | {cells} | {_ratio(first, by.get((BF16_ROW, first_m)))} "
                f"| {_ratio(first, by.get((INT4_ROW, first_m)))} | {_ratio(last, by.get((INT4_ROW, last_m)))} "
                f"| {first['of_bandwidth']:.0%} | {last['gmacs']:.0f} | {of_int8} | {first['layer_bytes'] / 1e9:.3g} |"
            )
        lines.append("")
    return "\n".join(lines)


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes = list(dict.fromkeys(r["shape"] for r in results))
    fig, axes = plt.subplots(1, len(shapes), figsize=(5 * len(shapes), 4), squeeze=False)
    for ax, shape in zip(axes[0], shapes):
        rows = [r for r in results if r["shape"] == shape]
        for row in dict.fromkeys(r["row"] for r in rows):
            pts = sorted((r["tokens"], r["ms"]) for r in rows if r["row"] == row and r["ms"] is not None)
            if not pts:
                continue
            ax.plot(
                [p[0] for p in pts],
                [p[1] for p in pts],
                marker="o",
                label=row,
                linestyle="--" if row.startswith("vLLM") else "-",
            )
        ax.set(title=shape, xlabel="tokens (M)", ylabel="ms per layer", xscale="log", yscale="log")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--shapes", default=None, help=f"comma list of {sorted(SHAPES)} (default: {DEFAULT_SHAPES}; --quick: quick)"
    )
    parser.add_argument("--tokens", default="1,4,16,64")
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument(
        "--quick", action="store_true", help="a small shape (unless --shapes names others), M=1,4, 3 reps"
    )
    parser.add_argument("--disable", default="", help="MOEMIX_DISABLED_KERNELS for the moemix rows")
    parser.add_argument(
        "--isas",
        default=",".join(default_isas()),
        help="native variants to time, comma list (default: fastest here, and avx2)",
    )
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    args = parser.parse_args()
    if args.quick:
        args.shapes, args.tokens, args.reps = args.shapes or "quick", "1,4", 3
    args.shapes = args.shapes or DEFAULT_SHAPES
    if args.disable:
        os.environ["MOEMIX_DISABLED_KERNELS"] = args.disable
    torch.set_num_threads(args.threads)
    if has_amx():
        torch._C._cpu._init_amx()  # vLLM's AMX kernels need the AMX state requested (SIGILL otherwise)
    tokens = [int(t) for t in args.tokens.split(",")]
    from vllm_moemix.layers.kernels.cpu import cpu_summary

    rows = rows_for([i for i in args.isas.split(",") if i])
    cpu_name = cpu_summary()
    print(f"CPU: {cpu_name}")
    probe = BandwidthProbe(*((256 << 20, 16 << 20) if args.quick else ()))
    results = []
    for name in args.shapes.split(","):
        results += bench_shape(SHAPES[name], tokens, args.reps, probe, rows)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    del probe
    table = markdown(results, args.threads, cpu_name)
    (out / "kernels.md").write_text(table + "\n")
    (out / "kernels.json").write_text(
        json.dumps({"cpu": cpu_name, "threads": args.threads, "results": results}, indent=1)
    )
    plot(results, out / "kernels.png")
    print(table)


if __name__ == "__main__":
    main()
