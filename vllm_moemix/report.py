"""Human-readable views of a plan or checkpoint: per-layer width table and totals."""

from __future__ import annotations

from collections import defaultdict

from rich.console import Console
from rich.table import Table

from vllm_moemix.arch import ROLE_EXPERT, LinearInfo
from vllm_moemix.footprint import Footprint
from vllm_moemix.plan import Resolved


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


def print_report(resolved: Resolved, linears: dict[str, LinearInfo], fp: Footprint, console: Console | None = None) -> None:
    console = console or Console()
    console.print(layer_table(resolved, linears))
    console.print(summary_table(fp))
    console.print(
        f"average bits per weight: {fp.avg_payload_bits:.3f} (integer payload), "
        f"{fp.avg_bits:.3f} (with scales and zeros); {fp.nbytes / max(fp.bf16_bytes, 1):.1%} of bf16"
    )
