"""Quality of every bit-allocation strategy at several budgets, side by side, on a trained MoE.

For each budget and strategy: plan -> GPTQ checkpoint -> held-out perplexity through vLLM
(moemix method) and, against the bf16 model, mean KL divergence of next-token distributions
and top-1 agreement (transformers on the dequantized weights; identical math, see
tests/test_vllm_e2e.py). Baselines: bf16, uniform GPTQ and RTN at 2/3/4 bits.

    .venv/bin/python benchmarks/quality.py --model models/tiny-mixtral --out docs/quality

Writes <out>/<model>.json, <model>.md (table) and <model>.png (KL and perplexity vs bits).
Budgets are average integer bits per weight over attention + expert (+ shared/dense) linears;
every strategy sees the same budget and must stay within it.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

from rich.console import Console

from vllm_moemix.checkpoint.writer import RTNQuantizer, quantize_checkpoint
from vllm_moemix.report.evaluate import Windows, compare_to_reference, perplexity_vllm, reference_logprobs
from vllm_moemix.config.plan import Plan
from vllm_moemix.planning.pipeline import CalibrationConfig, build_context, plan_model
from vllm_moemix.planning.strategies import STRATEGIES
from vllm_moemix.planning.units import Budget
from vllm_moemix.calibration.gptq import HessianGPTQ

REPO = Path(__file__).resolve().parents[1]


def evaluate(ckpt: Path, windows: Windows, ref, use_vllm: bool) -> dict:
    cmp = compare_to_reference(ckpt, windows, ref)
    row = {"kl": cmp.kl, "top1": cmp.top1, "ppl_hf": cmp.perplexity, "ppl_vllm": None}
    if use_vllm:
        row["ppl_vllm"] = perplexity_vllm(ckpt, windows)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(REPO / "models" / "tiny-mixtral"))
    parser.add_argument("--budgets", type=float, nargs="+", default=[2.25, 2.5, 3.0, 4.0])
    parser.add_argument("--strategies", nargs="+", default=sorted(STRATEGIES))
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument("--heldout", default=str(REPO / "models" / "heldout.txt"))
    parser.add_argument("--calib", default=str(REPO / "models" / "calib.txt"))
    parser.add_argument("--windows", type=int, default=24, help="held-out windows of 256 tokens")
    parser.add_argument("--vllm-at", type=float, nargs="*", default=[2.5],
                        help="budgets whose rows (and all baselines) also get perplexity through vLLM (an engine "
                             "start each); other rows use transformers, equal to vLLM within 1e-3 (tests)")
    parser.add_argument("--out", default=str(REPO / "docs" / "quality"))
    args = parser.parse_args()

    from transformers import AutoTokenizer

    model, out = Path(args.model), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    console = Console()
    started = time.perf_counter()
    windows = Windows.from_text(AutoTokenizer.from_pretrained(model), args.heldout, max_windows=args.windows)
    ref = reference_logprobs(model, windows)
    calib = CalibrationConfig(texts=[Path(args.calib)], quantizer="gptq")
    console.print("calibrating (usage, block similarity, per-width GPTQ errors) ...")
    context = build_context(model, "optimizer", calib, args.group_size, False, {}, progress=True)
    gptq = HessianGPTQ.collect(model, calib.texts, calib.num_samples, calib.seq_len)
    rows = [{"strategy": "bf16", "budget": 16.0, "avg_bits": 16.0, **evaluate(model, windows, ref, True)}]

    work = Path(tempfile.mkdtemp(prefix="moemix-quality-"))
    try:
        def measure(name: str, budget: float, plan: Plan, quantizer, avg_bits: float) -> None:
            ckpt = work / f"{name}-{budget}"
            quantize_checkpoint(model, plan, ckpt, quantizer=quantizer, progress=False)
            use_vllm = name.startswith("uniform-") or budget in args.vllm_at
            row = {"strategy": name, "budget": budget, "avg_bits": avg_bits, **evaluate(ckpt, windows, ref, use_vllm)}
            rows.append(row)
            shutil.rmtree(ckpt)
            console.print(f"{name:>18} @ {budget:<5} bits={avg_bits:.3f} KL={row['kl']:.4f} "
                          f"top1={row['top1']:.3f} ppl={row['ppl_hf']:.2f} ppl_vllm={row['ppl_vllm']}")

        for bits in (2, 3, 4):
            for quantizer, label in ((RTNQuantizer(), "uniform-rtn"), (gptq, "uniform-gptq")):
                plan = Plan.uniform(bits, args.group_size)
                measure(label, float(bits), plan, quantizer, float(bits))
        for budget in args.budgets:
            for strategy in args.strategies:
                result = plan_model(model, strategy, Budget(avg_bits=budget), context=context)
                measure(strategy, budget, result.plan, gptq, result.footprint.avg_payload_bits)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    name = model.name
    meta = {"model": str(model), "group_size": args.group_size, "heldout_tokens": int(windows.ids.numel()),
            "calibration": args.calib, "quantizer": "gptq (static groups) unless named rtn",
            "wall_s": round(time.perf_counter() - started, 1)}
    (out / f"{name}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    write_markdown(out / f"{name}.md", name, meta, rows, args.budgets)
    plot(out / f"{name}.png", name, rows)
    console.print(f"wrote {out}/{name}.{{json,md,png}} in {meta['wall_s']} s")


def write_markdown(path: Path, name: str, meta: dict, rows: list[dict], budgets: list[float]) -> None:
    lines = [f"# Quality of bit-allocation strategies on {name}", "",
             f"Held-out: {meta['heldout_tokens']:,} tokens of Python docs not seen in training; group size "
             f"{meta['group_size']}; {meta['quantizer']}. Perplexity from transformers on the dequantized weights; "
             "`vLLM ppl` is the same text scored by vLLM's moemix method where measured. KL = mean "
             "KL(bf16 || quantized) of next-token distributions (nats/token), lower is better; top-1 = agreement "
             "of argmax with bf16. Bits = average integer bits over attention and expert linears.", ""]
    lines += ["| strategy | budget | bits | KL | top-1 | perplexity | vLLM ppl |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        vllm = "" if r["ppl_vllm"] is None else f"{r['ppl_vllm']:.2f}"
        lines.append(f"| {r['strategy']} | {r['budget']:g} | {r['avg_bits']:.3f} | {r['kl']:.4f} | "
                     f"{r['top1']:.3f} | {r['ppl_hf']:.2f} | {vllm} |")
    lines += ["", "Best strategy per budget (by KL):", ""]
    for b in budgets:
        at = [r for r in rows if r["budget"] == b and r["strategy"] not in ("bf16",) and not r["strategy"].startswith("uniform-")]
        if at:
            best = min(at, key=lambda r: r["kl"])
            opt = next((r for r in at if r["strategy"] == "optimizer"), None)
            note = "" if opt is None else f"; optimizer KL {opt['kl']:.4f} (rank {sorted(r['kl'] for r in at).index(opt['kl']) + 1}/{len(at)})"
            lines.append(f"- {b:g} bits: {best['strategy']} (KL {best['kl']:.4f}){note}")
    path.write_text("\n".join(lines) + "\n")


def plot(path: Path, name: str, rows: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ppl_key = "ppl_hf"
    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    strategies = sorted({r["strategy"] for r in rows if r["strategy"] != "bf16"})
    for strategy in strategies:
        pts = sorted((r["avg_bits"], r["kl"], r[ppl_key]) for r in rows if r["strategy"] == strategy)
        style = dict(linewidth=3, color="black") if strategy == "optimizer" else dict(linewidth=1, alpha=0.8)
        marker = "s--" if strategy.startswith("uniform-") else "o-"
        axes[0].plot([p[0] for p in pts], [p[1] for p in pts], marker, label=strategy, **style)
        axes[1].plot([p[0] for p in pts], [p[2] for p in pts], marker, label=strategy, **style)
    bf16 = next(r for r in rows if r["strategy"] == "bf16")
    axes[1].axhline(bf16[ppl_key], color="gray", linestyle=":", label="bf16")
    axes[0].set_yscale("log")
    axes[0].set_ylabel("KL(bf16 || quantized), nats/token (log)")
    axes[1].set_ylabel("held-out perplexity")
    for ax in axes:
        ax.set_xlabel("average bits per weight (attention + experts)")
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7, ncol=2)
    fig.suptitle(f"{name}: bit-allocation strategies (GPTQ, group size per table)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
