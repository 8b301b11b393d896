"""Does the optimizer's cheap error table rank candidates like the full one, and plan as well?

The optimizer's error table (vllm_moemix/planning/errors.py) used to quantize every unit with GPTQ at every
candidate (bits, group): 16 GPTQ runs per unit under a byte budget. The `estimate` model quantizes each unit
once, at the width the budget is nearest to, and scales Hessian-diagonal-weighted RTN errors by that exact
value. Per trained model, side by side from one calibration:
  - the time to build each table,
  - Spearman rank correlation between the two tables over every (unit, candidate) entry, and over units at
    each candidate width (what the knapsack trades),
  - KL(bf16 || quantized) on held-out text of the plans each table gives at uniform GPTQ 2-bit and 3-bit
    bytes (the budgets of docs/quality's first target), next to uniform GPTQ itself.

    .venv/bin/python benchmarks/error_model.py            # three models, group 128 (~15 min on 2 cores)

Writes <out>/error_model.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import torch

from vllm_moemix.calibration.gptq import CalibratedGPTQ
from vllm_moemix.checkpoint.writer import quantize_checkpoint
from vllm_moemix.config.arch import quantizable_linears
from vllm_moemix.config.footprint import footprint
from vllm_moemix.config.plan import Plan
from vllm_moemix.planning.pipeline import CalibrationConfig, build_context, plan_model
from vllm_moemix.planning.units import Budget
from vllm_moemix.report.evaluate import Windows, compare_to_reference, reference_logprobs

REPO = Path(__file__).resolve().parents[1]
MODELS = [
    REPO / "models" / "tiny-mixtral",
    REPO / "models" / "tiny-qwen2moe",
    REPO / "models" / "pysrc" / "tiny-mixtral-pysrc",
]


def spearman(a: list[float], b: list[float]) -> float:
    ra = torch.tensor(a, dtype=torch.float64).argsort().argsort().double()
    rb = torch.tensor(b, dtype=torch.float64).argsort().argsort().double()
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()).clamp_min(1e-30))


def correlations(full, estimate) -> dict:
    pairs = [(full[u][s], estimate[u][s]) for u in full for s in full[u]]
    by_bits: dict[int, list[tuple[float, float]]] = {}
    for u in full:
        for s in full[u]:
            by_bits.setdefault(s.bits, []).append((full[u][s], estimate[u][s]))
    return {
        "all_entries": spearman(*zip(*pairs)),
        **{f"units_at_{b}bit": spearman(*zip(*v)) for b, v in sorted(by_bits.items()) if len(v) > 2},
    }


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown CPU"


def run_model(model: Path, group: int, windows_n: int) -> dict:
    from transformers import AutoConfig, AutoTokenizer

    calib_text, heldout = model.parent / "calib.txt", model.parent / "heldout.txt"
    calib = CalibrationConfig(texts=[calib_text])
    linears = quantizable_linears(AutoConfig.from_pretrained(model))
    windows = Windows.from_text(AutoTokenizer.from_pretrained(model), heldout, max_windows=windows_n)
    ref = reference_logprobs(model, windows)
    work = Path(tempfile.mkdtemp(prefix="moemix-error-model-"))

    def kl(plan: Plan) -> float:
        ckpt = work / "ckpt"
        quantize_checkpoint(
            model, plan, ckpt, quantizer=CalibratedGPTQ(model, [calib_text], progress=False), progress=False
        )
        value = compare_to_reference(ckpt, windows, ref).kl
        shutil.rmtree(ckpt)
        return value

    result = {"model": model.name, "group": group, "budgets": []}
    started = time.perf_counter()
    full = build_context(model, "optimizer", calib, group, False, {}, progress=False, error_model="full")
    result["full_table_s"] = round(time.perf_counter() - started, 1)
    try:
        for bits in (2, 3):
            uniform = Plan.uniform(bits, group)
            budget = Budget(nbytes=footprint(uniform.resolve(linears), linears).nbytes)
            started = time.perf_counter()
            estimate = build_context(model, "optimizer", calib, group, False, {}, progress=False, budget=budget)
            seconds = time.perf_counter() - started
            row = {
                "budget": f"uniform-{bits} bytes",
                "bytes": budget.nbytes,
                "estimate_table_s": round(seconds, 1),
                "reference_bits": budget.reference_bits(estimate.units, group, False),
                "spearman": correlations(full.errors, estimate.errors),
                "kl_uniform_gptq": kl(uniform),
                "kl_full_table": kl(plan_model(model, "optimizer", budget, context=full).plan),
                "kl_estimate": kl(plan_model(model, "optimizer", budget, context=estimate).plan),
            }
            result["budgets"].append(row)
            print(json.dumps({"model": model.name, **row}))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return result


def markdown(results: list[dict], meta: dict) -> str:
    lines = [
        f"# Error table: estimate vs full ({meta['cpu']}, {meta['date']}, group {meta['group']})",
        "",
        "Spearman: rank correlation between the full table (GPTQ at every candidate) and the estimate (GPTQ once "
        "at the reference width, Hessian-diagonal RTN ratios), over all (unit, candidate) entries and over units "
        "at each width. KL(bf16 || q) on held-out text of GPTQ checkpoints; ratio = estimate / full.",
        "",
        "| model | budget | ref bits | table s: full / estimate | Spearman all / per width | KL uniform GPTQ | "
        "KL full table | KL estimate | ratio |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        for b in r["budgets"]:
            per_width = " ".join(f"{v:.3f}" for k, v in b["spearman"].items() if k != "all_entries")
            lines.append(
                f"| {r['model']} | {b['budget']} | {b['reference_bits']} | {r['full_table_s']} / "
                f"{b['estimate_table_s']} | {b['spearman']['all_entries']:.3f} / {per_width} | "
                f"{b['kl_uniform_gptq']:.5f} | {b['kl_full_table']:.5f} | {b['kl_estimate']:.5f} | "
                f"{b['kl_estimate'] / b['kl_full_table']:.2f} |"
            )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=[str(m) for m in MODELS])
    parser.add_argument("--group", type=int, default=128)
    parser.add_argument("--windows", type=int, default=16, help="held-out windows of 256 tokens")
    parser.add_argument("--out", default=str(REPO / "docs" / "quality"))
    args = parser.parse_args()
    results = [run_model(Path(m), args.group, args.windows) for m in args.models if Path(m).exists()]
    meta = {"cpu": cpu_name(), "date": time.strftime("%Y-%m-%d"), "group": args.group}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "error_model.json").write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
    (out / "error_model.md").write_text(markdown(results, meta))
    print(markdown(results, meta))


if __name__ == "__main__":
    main()
