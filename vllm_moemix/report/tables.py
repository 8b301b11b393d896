"""Human-readable views of a plan or checkpoint: per-layer width table and totals."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from rich.console import Console
from rich.table import Table

from vllm_moemix.config.arch import ROLE_EXPERT, Architecture, LinearInfo
from vllm_moemix.config.footprint import Footprint
from vllm_moemix.config.plan import Resolved


def _width(spec) -> str:
    return "bf16" if spec is None else str(spec.bits)


def _gib(nbytes: int) -> str:
    return f"{nbytes / 2**20:,.2f} MiB"


def layer_table(resolved: Resolved, linears: dict[str, LinearInfo]) -> Table:
    """One row per decoder layer: attention width, each expert's width(s), shared/dense widths."""
    rows: dict[int, dict[str, set[str]]] = defaultdict(lambda: defaultdict(set))
    experts = sorted({i.expert for i in linears.values() if i.expert is not None})
    for name, info in linears.items():
        key = f"e{info.expert}" if info.role == ROLE_EXPERT else info.role
        rows[info.layer][key].add(_width(resolved[name]))
    columns = ["attention"] + [f"e{e}" for e in experts]
    columns += [c for c in ("shared_expert", "dense_mlp") if any(c in r for r in rows.values())]
    table = Table(title="bits per layer (experts: w13/w2 when they differ)")
    table.add_column("layer", justify="right")
    for c in columns:
        table.add_column(c, justify="center")
    for layer in sorted(rows):
        table.add_row(str(layer), *("/".join(sorted(rows[layer].get(c, {"-"}), key=str)) for c in columns))
    return table


def summary_table(fp: Footprint) -> Table:
    table = Table(title="footprint of the quantizable linears (attention, experts, shared experts, dense MLPs)")
    table.add_column("width")
    table.add_column("weights", justify="right")
    table.add_column("bytes (incl. scales/zeros)", justify="right")
    for width in sorted(fp.by_width, key=lambda w: (w == "bf16", int(w) if w.isdigit() else 0)):
        table.add_row(width, f"{fp.weights_by_width[width]:,}", _gib(fp.by_width[width]))
    table.add_row("total", f"{fp.weights:,}", _gib(fp.nbytes), style="bold")
    table.add_row("bf16 equivalent", f"{fp.weights:,}", _gib(fp.bf16_bytes))
    return table


def print_report(
    resolved: Resolved, linears: dict[str, LinearInfo], fp: Footprint, console: Console | None = None
) -> None:
    console = console or Console()
    console.print(layer_table(resolved, linears))
    console.print(summary_table(fp))
    console.print(
        f"average bits per weight: {fp.avg_payload_bits:.3f} (integer payload), "
        f"{fp.avg_bits:.3f} (with scales and zeros); {fp.nbytes / max(fp.bf16_bytes, 1):.1%} of bf16"
    )


def bits_heatmap(resolved: Resolved, linears: dict[str, LinearInfo], path: str | Path, title: str = "") -> None:
    """PNG: rows = decoder layers, columns = experts (w13 | w2 halves) then attention/shared/dense; colour = bits."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    layers = sorted({i.layer for i in linears.values()})
    experts = sorted({i.expert for i in linears.values() if i.expert is not None})
    others = [r for r in ("attention", "shared_expert", "dense_mlp") if any(i.role == r for i in linears.values())]
    columns = [f"e{e}" for e in experts] + others
    sums = np.zeros((len(layers), len(columns)))
    counts = np.zeros_like(sums)
    for name, info in linears.items():
        cell = layers.index(info.layer), columns.index(f"e{info.expert}" if info.role == ROLE_EXPERT else info.role)
        weights = info.out_features * info.in_features
        sums[cell] += (16 if resolved[name] is None else resolved[name].bits) * weights
        counts[cell] += weights
    grid = np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)
    fig, ax = plt.subplots(figsize=(1 + 0.5 * len(columns), 1 + 0.4 * len(layers)))
    image = ax.imshow(grid, cmap="viridis", vmin=2, vmax=8, aspect="auto")
    for r in range(grid.shape[0]):
        for c in range(grid.shape[1]):
            if not np.isnan(grid[r, c]):
                ax.text(
                    c,
                    r,
                    f"{grid[r, c]:.3g}",
                    ha="center",
                    va="center",
                    fontsize=8,
                    color="black" if grid[r, c] > 5 else "white",
                )
    ax.set_xticks(range(len(columns)), columns, rotation=45, ha="right")
    ax.set_yticks(range(len(layers)), [str(layer) for layer in layers])
    ax.set_xlabel("expert / module")
    ax.set_ylabel("layer")
    ax.set_title(f"{title} bits per weight (cell average)".strip())
    fig.colorbar(image, ax=ax, label="bits")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def predicted_kernels(
    resolved: Resolved, linears: dict[str, LinearInfo], arch: Architecture, device: str = "cpu", act_dtype=None
) -> dict[str, dict[str, int]]:
    """What would serve each MoE layer and quantized linear on this machine (TP=1), as the engine reports it.

    Runs the same selection as loading does (with the family's expert activation and biases), so `moemix
    inspect` can say ahead of time whether the native kernels or the slow reference would serve.
    """
    import torch

    from vllm_moemix.layers.kernels.base import ExpertsConfig, LinearConfig
    from vllm_moemix.layers.kernels.select import choose_experts_kernel, choose_linear_kernel

    dev, dtype = torch.device(device), act_dtype or torch.bfloat16
    served: dict[str, dict[str, int]] = {"experts": defaultdict(int), "linears": defaultdict(int)}
    experts: dict[int, dict[int, dict[str, LinearInfo]]] = defaultdict(lambda: defaultdict(dict))
    fused_done: set[tuple[str, ...]] = set()
    for name, info in linears.items():
        if info.role == ROLE_EXPERT:
            experts[info.layer][info.expert]["w13" if info.fused_with else "w2"] = info
            continue
        group = info.fused_with or (name,)
        if group in fused_done or resolved.get(name) is None:
            continue
        fused_done.add(group)
        out = sum(linears[n].out_features for n in group)
        config = LinearConfig(resolved[name], info.in_features, out, dtype)
        served["linears"][choose_linear_kernel(config, dev)(config).describe()] += 1
    for by_expert in experts.values():
        ordered = [by_expert[e] for e in sorted(by_expert)]
        w13 = tuple(resolved.get(e["w13"].name) for e in ordered)
        w2 = tuple(resolved.get(e["w2"].name) for e in ordered)
        if None in w13 or None in w2:
            continue  # an unquantized expert layer runs vLLM's own MoE
        config = ExpertsConfig(
            w13,
            w2,
            ordered[0]["w13"].in_features,
            ordered[0]["w13"].out_features,
            dtype,
            activation=arch.expert_activation,
            has_bias=arch.expert_bias,
        )
        served["experts"][choose_experts_kernel(config, dev)(config).describe()] += 1
    return {role: dict(counts) for role, counts in served.items()}
