"""Quality of every bit-allocation strategy at equal bytes, side by side, on trained MoEs.

For each model and group size: uniform RTN / GPTQ at 2/3/4 bits (at their real bytes), then the
optimizer at the bytes of each uniform GPTQ width and at fixed byte budgets (bits per weight over the
quantizable linears *including* scales and zeros), and every other strategy at those budgets. Each
plan -> GPTQ checkpoint -> mean KL(bf16 || quantized) of next-token distributions, top-1 agreement
and perplexity on held-out text (transformers on the dequantized weights, equal to vLLM's moemix
output within 1e-3, tests/test_vllm_e2e.py).

Levers are measured by switching them off at the uniform budgets:
  uniform-gptq-minmax   GPTQ with plain min/max group ranges (before issue 13); uniform-gptq searches the
                        clipping range per group (the default now)
  optimizer-v0          the optimizer before issue 13: min/max GPTQ, one group size, no usage floor
  optimizer-one-group   today's optimizer (clip search, usage floor) with the group size fixed
  optimizer             + (bits, group) knapsack over {32,64,128,256} under byte budgets (the default)
  optimizer+check       the one of {optimizer, optimizer-one-group, uniform} with the lowest KL on calibration
                        windows the planner never saw (the held-out check; `moemix quantize --validate`
                        compares the plan with uniform)
Planning + quantization time and peak memory come from `moemix quantize` in a subprocess.

    .venv/bin/python benchmarks/quality.py --out docs/quality          # all models, group 64 and 128

Writes <out>/<model>.json, <model>.md and <model>.png (KL vs bits per weight, llama.cpp's points from
benchmarks/results/llamacpp.json where that model was measured), and <out>/summary.md.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from rich.console import Console
from tqdm import tqdm

from vllm_moemix.calibration.gptq import collect_hessians
from vllm_moemix.checkpoint.writer import quantize_checkpoint
from vllm_moemix.config.arch import quantizable_linears
from vllm_moemix.config.footprint import footprint
from vllm_moemix.config.plan import Plan
from vllm_moemix.planning.pipeline import CalibrationConfig, build_context, plan_model
from vllm_moemix.planning.strategies import GROUP_CHOICES, STRATEGIES
from vllm_moemix.planning.units import Budget
from vllm_moemix.quant.quantizers import HessianGPTQ, Memoized, RTNQuantizer
from vllm_moemix.report.evaluate import Windows, compare_to_reference, reference_logprobs
from vllm_moemix.report.validate import holdout_kls, holdout_windows

REPO = Path(__file__).resolve().parents[1]
THIRD_MODEL = REPO / "models" / "pysrc" / "tiny-mixtral-pysrc"
FOURTH_MODEL = REPO / "models" / "perldoc" / "tiny-olmoe"  # issue 20: another architecture, another corpus
BUDGETS = (2.7, 3.05, 3.19, 3.58, 3.91)
LLAMACPP = REPO / "benchmarks" / "results" / "llamacpp.json"
LLAMACPP_THIRD = REPO / "docs" / "quality" / "llamacpp" / "llamacpp.json"  # benchmarks/llamacpp.py --llamacpp-only
TARGET_RATIO = 0.75  # issue 13: optimizer KL <= 0.75 x uniform GPTQ's at uniform's bytes


def texts_for(model: Path) -> tuple[Path, Path]:
    """(calibration, held-out) text of a model: the files next to its directory (models/*.txt)."""
    return model.parent / "calib.txt", model.parent / "heldout.txt"


def measure_cli(model: Path, calib: Path, nbytes: int) -> dict:
    """Wall time and peak RSS of `moemix quantize --budget-bytes` (planning + GPTQ) in a fresh process."""
    out = Path(tempfile.mkdtemp(prefix="moemix-cli-")) / "ckpt"
    cmd = [
        sys.executable,
        "-c",
        "import sys; from vllm_moemix.cli import main; sys.exit(main())",
        "quantize",
        str(model),
        "--budget-bytes",
        str(nbytes),
        "--calib",
        str(calib),
        "-o",
        str(out),
        "--quiet",
    ]
    started = time.perf_counter()
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    shutil.rmtree(out.parent, ignore_errors=True)
    return {
        "wall_s": round(time.perf_counter() - started, 1),
        "peak_rss_mib": round(max(peak, before) / 1024, 1),
    }  # ru_maxrss is KiB on Linux


def run_model(model: Path, args) -> dict:
    from transformers import AutoConfig, AutoTokenizer

    calib_path, heldout_path = texts_for(model)
    tokenizer = AutoTokenizer.from_pretrained(model)
    windows = Windows.from_text(tokenizer, heldout_path, max_windows=args.windows)
    ref = reference_logprobs(model, windows)
    linears = quantizable_linears(AutoConfig.from_pretrained(model))
    calib = CalibrationConfig(texts=[calib_path], quantizer="gptq")
    check_windows = holdout_windows(tokenizer, calib.texts, calib.num_samples)
    hessians = collect_hessians(model, calib.texts, calib.num_samples, calib.seq_len, progress=False).hessians
    gptq, gptq_minmax = Memoized(HessianGPTQ(hessians)), Memoized(HessianGPTQ(hessians, clip_search=False))
    rows: list[dict] = []
    work = Path(tempfile.mkdtemp(prefix="moemix-quality-"))

    def measure(strategy: str, budget: str, group: int, plan: Plan, quantizer, note: str = "") -> dict:
        fp = footprint(plan.resolve(linears), linears)
        ckpt = work / "ckpt"
        quantize_checkpoint(model, plan, ckpt, quantizer=quantizer, progress=False)
        cmp = compare_to_reference(ckpt, windows, ref)
        shutil.rmtree(ckpt)
        row = {
            "model": model.name,
            "group": group,
            "strategy": strategy,
            "budget": budget,
            "bytes": fp.nbytes,
            "bpw": 8 * fp.nbytes / fp.weights,
            "kl": cmp.kl,
            "top1": cmp.top1,
            "ppl": cmp.perplexity,
            "note": note,
        }
        rows.append(row)
        bar.write(
            f"{model.name} g{group} {strategy:>18} @ {budget:<12} b/w={row['bpw']:.3f} KL={row['kl']:.5f} "
            f"top1={row['top1']:.3f} ppl={row['ppl']:.2f} {note}"
        )
        return row

    total_weights = sum(info.out_features * info.in_features for info in linears.values())
    started = time.perf_counter()
    timings = {}
    bar = tqdm(total=len(args.group_sizes), desc=model.name, unit="group")
    try:
        for group in args.group_sizes:
            t0 = time.perf_counter()
            contexts = {
                "optimizer-v0": build_context(
                    model,
                    "optimizer",
                    replace(calib, clip_search=False, usage_floor=0.0),
                    group,
                    False,
                    {},
                    progress=False,
                    group_choices=(),
                ),
                "optimizer": build_context(model, "optimizer", calib, group, False, {}, progress=False),
            }
            timings[f"g{group}_contexts_s"] = round(time.perf_counter() - t0, 1)
            uniform_bytes = {}
            for bits in (2, 3, 4):
                plan = Plan.uniform(bits, group)
                if group in args.full_groups:
                    measure("uniform-rtn", f"{bits}-bit", group, plan, RTNQuantizer())
                measure("uniform-gptq-minmax", f"{bits}-bit", group, plan, gptq_minmax)
                uniform_bytes[bits] = measure("uniform-gptq", f"{bits}-bit", group, plan, gptq)["bytes"]
            full = contexts["optimizer"]
            for bits, nbytes in uniform_bytes.items():
                budget, label = Budget(nbytes=nbytes), f"uniform-{bits} bytes"
                v0 = plan_model(model, "optimizer", budget, context=contexts["optimizer-v0"]).plan
                measure("optimizer-v0", label, group, v0, gptq_minmax)
                full.group_choices = ()
                one_group = plan_model(model, "optimizer", budget, context=full).plan
                measure("optimizer-one-group", label, group, one_group, gptq)
                full.group_choices = GROUP_CHOICES
                best = plan_model(model, "optimizer", budget, context=full).plan
                measure("optimizer", label, group, best, gptq)
                candidates = {"optimizer": best, "optimizer-one-group": one_group, "uniform": Plan.uniform(bits, group)}
                kls = holdout_kls(model, candidates, check_windows, gptq)
                chosen = min(kls, key=kls.get)
                measure(
                    "optimizer+check",
                    label,
                    group,
                    candidates[chosen],
                    gptq,
                    note="held-out calibration KL: "
                    + ", ".join(f"{k} {v:.5f}" for k, v in kls.items())
                    + f" -> {chosen}",
                )
            for bpw in BUDGETS if group in args.full_groups else ():
                budget = Budget(nbytes=int(bpw * total_weights / 8))
                every = group in args.strategy_groups and bpw in args.strategy_budgets
                for strategy in args.strategies if every else ["optimizer"]:
                    result = plan_model(model, strategy, budget, context=contexts["optimizer"])
                    measure(strategy, f"{bpw} b/w", group, result.plan, gptq)
            for row in llamacpp_rows(model.name) if group == 128 and group in args.full_groups else []:
                if not row["config"].startswith(("Q2_K", "Q3_K_S")):
                    continue
                budget = Budget(nbytes=row["bytes"])
                plan = plan_model(model, "optimizer", budget, context=contexts["optimizer"]).plan
                measure("optimizer", f"{row['config'].split()[0]} bytes", group, plan, gptq)
            bar.update(1)
    finally:
        bar.close()
        shutil.rmtree(work, ignore_errors=True)
    cli = (
        measure_cli(
            model,
            calib_path,
            next(r["bytes"] for r in rows if r["strategy"] == "uniform-gptq" and r["budget"] == "3-bit"),
        )
        if args.cli_timing
        else None
    )
    meta = {
        "model": str(model.relative_to(REPO)) if model.is_relative_to(REPO) else str(model),
        "calibration": str(calib_path),
        "heldout": str(heldout_path),
        "heldout_tokens": int(windows.ids.numel()),
        "quantize_cli_at_uniform3_bytes": cli,
        **timings,
        "wall_s": round(time.perf_counter() - started, 1),
    }
    return {"meta": meta, "rows": rows}


def llamacpp_rows(model_name: str) -> list[dict]:
    """llama.cpp's k-quant rows for a model: benchmarks/llamacpp.py's results, and for the third model its
    `--llamacpp-only` run (LLAMACPP_THIRD, same protocol)."""
    rows = []
    for path in (LLAMACPP, LLAMACPP_THIRD):
        if path.exists():
            rows += [
                r
                for r in json.loads(path.read_text())["quality"]
                if r["model"] == model_name and r["engine"] == "llama.cpp"
            ]
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    default_models = [REPO / "models" / "tiny-mixtral", REPO / "models" / "tiny-qwen2moe", THIRD_MODEL, FOURTH_MODEL]
    parser.add_argument("--models", nargs="+", default=[str(m) for m in default_models])
    parser.add_argument("--group-sizes", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--strategies", nargs="+", default=sorted(STRATEGIES))
    parser.add_argument(
        "--full-groups",
        type=int,
        nargs="+",
        default=[128],
        help="group sizes that also get RTN, the b/w budgets and llama.cpp's bytes (others: uniform "
        "GPTQ and the optimizer at uniform bytes, issue 13's first target)",
    )
    parser.add_argument(
        "--cli-timing",
        action="store_true",
        help="also time `moemix quantize` (planning + GPTQ from scratch, peak RSS) per model",
    )
    parser.add_argument(
        "--strategy-groups",
        type=int,
        nargs="+",
        default=[128],
        help="group sizes at which every strategy runs (others: the optimizer only)",
    )
    parser.add_argument(
        "--strategy-budgets",
        type=float,
        nargs="+",
        default=[3.05],
        help="b/w budgets at which every strategy runs (others: the optimizer only)",
    )
    parser.add_argument("--windows", type=int, default=16, help="held-out windows of 256 tokens (llama.cpp's too)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (this runs on shared 2-core machines)")
    parser.add_argument("--out", default=str(REPO / "docs" / "quality"))
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    console = Console()
    results = {}
    for model in map(Path, args.models):
        if not model.exists():
            console.print(
                f"[yellow]{model} missing[/]: the third model is built by `scripts/train_tiny_moe.py "
                "--corpus python-src --only tiny-mixtral --out models/pysrc` (then renamed, TRAINING.md)"
            )
            continue
        result = run_model(model.resolve(), args)
        results[model.name] = result
        (out / f"{model.name}.json").write_text(json.dumps(result, indent=1) + "\n")
        (out / f"{model.name}.md").write_text(markdown(model.name, result) + "\n")
        plot(out / f"{model.name}.png", model.name, result["rows"], args.group_sizes)
    for path in sorted(out.glob("*.json")):  # models measured by earlier (or parallel) runs too
        results.setdefault(path.stem, json.loads(path.read_text()))
    current = {
        name: r
        for name, r in results.items()  # this benchmark's format, not an older one's
        if any(row.get("strategy") == "optimizer+check" and row.get("budget") == "uniform-2 bytes" for row in r["rows"])
    }
    table = summary(current)
    (out / "summary.md").write_text(table + "\n")
    console.print(table)


def markdown(name: str, result: dict) -> str:
    meta, rows = result["meta"], result["rows"]
    lines = [
        f"# {name}: bit allocation at equal bytes",
        "",
        f"Held-out: {meta['heldout_tokens']:,} tokens of `{Path(meta['heldout']).name}` next to the model "
        f"(calibration: `{Path(meta['calibration']).name}`). b/w = bits per weight of the quantizable linears "
        "including fp16 scales and uint8 zeros. KL = mean KL(bf16 || quantized) per token (nats), top-1 = "
        "argmax agreement with bf16, ppl from transformers on the dequantized weights.",
        "",
        timing_line(meta),
        "",
    ]
    for group in sorted({r["group"] for r in rows}):
        lines += [
            f"## group {group}",
            "",
            "| strategy | budget | b/w | KL | top-1 | ppl | note |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in (r for r in rows if r["group"] == group):
            lines.append(
                f"| {r['strategy']} | {r['budget']} | {r['bpw']:.3f} | {r['kl']:.5f} | {r['top1']:.3f} | "
                f"{r['ppl']:.2f} | {r['note']} |"
            )
        lines.append("")
    return "\n".join(lines)


def timing_line(meta: dict) -> str:
    cli = meta["quantize_cli_at_uniform3_bytes"]
    contexts = ", ".join(f"{k.split('_')[0]} {v} s" for k, v in meta.items() if k.endswith("_contexts_s"))
    line = f"Calibration + error tables of both optimizer contexts per group (this benchmark): {contexts}."
    if cli:
        line += (
            f" `moemix quantize --budget-bytes` at uniform 3-bit bytes (planning + GPTQ from scratch, fresh "
            f"process): {cli['wall_s']} s, peak RSS {cli['peak_rss_mib']} MiB."
        )
    return line


def summary(results: dict) -> str:
    """Issue 13's targets per model and group."""
    lines = [
        "| model | group | uniform | uniform GPTQ KL | optimizer KL | ratio | optimizer+check KL | ratio | "
        "target 0.75 (optimizer / +check) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, result in results.items():
        rows = result["rows"]

        def kl(group, strategy, budget, rows=rows):
            return next(r["kl"] for r in rows if (r["group"], r["strategy"], r["budget"]) == (group, strategy, budget))

        for group in sorted({r["group"] for r in rows}):
            for bits in (2, 3, 4):
                base = kl(group, "uniform-gptq", f"{bits}-bit")
                opt, checked = [kl(group, s, f"uniform-{bits} bytes") for s in ("optimizer", "optimizer+check")]
                verdicts = " / ".join("holds" if v / base <= TARGET_RATIO else "misses" for v in (opt, checked))
                lines.append(
                    f"| {name} | {group} | {bits}-bit | {base:.5f} | {opt:.5f} | {opt / base:.2f} | "
                    f"{checked:.5f} | {checked / base:.2f} | {verdicts} |"
                )
    lines += [
        "",
        "| model | llama.cpp mix | its KL | optimizer at Q2_K / Q3_K_S bytes | KL | target |",
        "|---|---|---|---|---|---|",
    ]
    for name, result in results.items():
        llama = {r["config"].split()[0]: r for r in llamacpp_rows(name)}
        for at, reach in (("Q2_K", "Q3_K_S"), ("Q3_K_S", "Q4_K_M")):
            opt = next(
                (r for r in result["rows"] if r["strategy"] == "optimizer" and r["budget"] == f"{at} bytes"), None
            )
            if opt is None or reach not in llama:
                continue
            lines.append(
                f"| {name} | {reach} | {llama[reach]['kl']:.5f} | {at} bytes ({opt['bpw']:.2f} b/w) | "
                f"{opt['kl']:.5f} | {'holds' if opt['kl'] <= llama[reach]['kl'] else 'misses'} |"
            )
    return "\n".join(lines)


def plot(path: Path, name: str, rows: list[dict], groups: list[int]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(groups), figsize=(7 * len(groups), 5), squeeze=False)
    for ax, group in zip(axes[0], groups):
        at = [r for r in rows if r["group"] == group]
        for strategy in dict.fromkeys(r["strategy"] for r in at):
            pts = sorted((r["bpw"], r["kl"]) for r in at if r["strategy"] == strategy)
            style = dict(linewidth=3, color="black") if strategy == "optimizer" else dict(linewidth=1, alpha=0.7)
            marker = "s--" if strategy.startswith("uniform") else "o-"
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker, label=strategy, markersize=4, **style)
        llama = sorted((r["bits_per_weight"], r["kl"], r["config"].split()[0]) for r in llamacpp_rows(name))
        if llama:
            ax.plot([p[0] for p in llama], [p[1] for p in llama], "D:", color="tab:red", label="llama.cpp (imatrix)")
            for x, y, mix in llama:
                ax.annotate(mix, (x, y), fontsize=7, color="tab:red")
        ax.set(
            title=f"{name}, group {group}",
            xlabel="bits per weight (linears, incl. scales/zeros)",
            ylabel="KL(bf16 || quantized), nats/token",
            yscale="log",
        )
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
