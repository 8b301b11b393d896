"""Which sensitivity measure predicts what quantizing one unit does to the model's output?

The optimizer spends bits where its error table says they buy the most. The table holds a layer-local proxy,
tr(dW H dW^T) weighted by routing; this benchmark measures how well that and other candidate measures rank
units by the *true* cost: the mean KL(float || model) on held-out text when that one unit (a fused group of
linears: an expert's gate+up, its down, attention q/k/v, o, ...) is quantized with GPTQ and everything else
stays float. Per trained model, per width (2 and 3 bits, one group size), Spearman rank correlation with the
truth of:

  proxy        the `estimate` error table entry: the unit's own output error tr(dW H dW^T), routing-weighted
               (planning/errors.py; the default before issue 20, still the one for models too big for `fisher`)
  fisher       the `fisher` error table entry: sum_ij F_ij dW_ij^2, F the weights' diagonal empirical Fisher
               (calibration/fisher.py: one backward pass per calibration window; HAWQ-style, the loss change
               through the rest of the network)
  calib-kl     the same single-unit KL, measured on calibration windows (not held out): what sampling the
               truth would give a planner
  layer-scaled the proxy times a per-(layer, role) factor fitted from calib-kl of `--sample` random units of that
               group (correcting the proxy's scale across layers and roles by a few measurements)

then interactions (KL of quantizing every unit at once against the sum of the single-unit KLs), and what it is
for: KL on held-out text of the optimizer's plan from each table at uniform GPTQ 2- and 3-bit bytes, next to
uniform GPTQ itself (the issue-20 target: <= 0.75x uniform).

    .venv/bin/python benchmarks/sensitivity.py             # four models, group 128 (~25 min on 2 cores)

Writes <out>/sensitivity.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch
from error_model import cpu_name, spearman  # benchmarks/ is sys.path[0] when run as a script
from tqdm import tqdm

from vllm_moemix.calibration.gptq import collect_hessians
from vllm_moemix.calibration.layerwise import linear_weight
from vllm_moemix.checkpoint.source import SafetensorsSource
from vllm_moemix.checkpoint.writer import quantize_checkpoint
from vllm_moemix.config.arch import architecture_for, quantizable_linears
from vllm_moemix.config.footprint import footprint
from vllm_moemix.config.plan import Plan
from vllm_moemix.config.spec import QuantSpec
from vllm_moemix.planning.pipeline import CalibrationConfig, build_context, plan_model
from vllm_moemix.planning.units import Budget
from vllm_moemix.quant.quantizers import HessianGPTQ, Memoized
from vllm_moemix.report.evaluate import Windows, compare_logprobs, compare_to_reference, reference_logprobs
from vllm_moemix.report.validate import holdout_windows

REPO = Path(__file__).resolve().parents[1]
MODELS = (
    REPO / "models" / "tiny-mixtral",
    REPO / "models" / "tiny-qwen2moe",
    REPO / "models" / "pysrc" / "tiny-mixtral-pysrc",
    REPO / "models" / "perldoc" / "tiny-olmoe",
)
MEASURES = ("proxy", "fisher", "calib-kl", "layer-scaled")
TARGET_RATIO = 0.75


class Scorer:
    """Logprobs of an in-memory float model on fixed windows, and KL against its unquantized output."""

    def __init__(self, model, windows: torch.Tensor, batch: int = 8):
        self.model, self.windows, self.batch = model, windows, batch
        self.ref = self.logprobs()

    @torch.no_grad()
    def logprobs(self) -> torch.Tensor:
        w = self.windows
        return torch.cat(
            [
                torch.log_softmax(self.model(w[i : i + self.batch]).logits.float(), -1)
                for i in range(0, len(w), self.batch)
            ]
        )

    def kl(self) -> float:
        return compare_logprobs(self.logprobs(), self.ref, self.windows).kl


def run_model(model_dir: Path, group: int, bits_list: list[int], windows_n: int, sample: int, seed: int) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    started = time.perf_counter()
    calib_path, heldout_path = model_dir.parent / "calib.txt", model_dir.parent / "heldout.txt"
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    calib = CalibrationConfig(texts=[calib_path])
    tables = {
        m: build_context(model_dir, "optimizer", calib, group, False, {}, progress=False, error_model=m)
        for m in ("estimate", "fisher")
    }
    ctx = tables["estimate"]
    gptq = Memoized(
        HessianGPTQ(collect_hessians(model_dir, calib.texts, calib.num_samples, calib.seq_len, progress=False).hessians)
    )
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    arch = architecture_for(model.config)
    source = SafetensorsSource(model_dir)
    held_windows = Windows.from_text(tokenizer, heldout_path, max_windows=windows_n)
    held = Scorer(model, held_windows.ids)
    check = Scorer(model, holdout_windows(tokenizer, calib.texts, calib.num_samples, num_windows=windows_n))

    def quantized(names, bits: int) -> dict[str, torch.Tensor]:
        return {n: gptq(n, source.get(f"{n}.weight"), QuantSpec(bits, group)).dequantize().float() for n in names}

    def swap(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Write `weights` into the model; returns what was there."""
        saved = {}
        for n, w in weights.items():
            view = linear_weight(model, arch, n)
            saved[n] = view.clone()
            view.copy_(w)
        return saved

    rows = []
    for unit in tqdm(ctx.units, desc=model_dir.name, unit="unit"):
        info = ctx.linears[unit.names[0]]
        for bits in bits_list:
            spec = QuantSpec(bits, group)
            saved = swap(quantized(unit.names, bits))
            rows.append(
                {
                    "unit": unit.key,
                    "layer": info.layer,
                    "role": info.role,
                    "bits": bits,
                    "truth": held.kl(),
                    "proxy": ctx.errors[unit][spec],
                    "fisher": tables["fisher"].errors[unit][spec],
                    "calib-kl": check.kl(),
                }
            )
            swap(saved)
    _layer_scaled(rows, sample, seed)
    everything = [n for unit in ctx.units for n in unit.names]
    interactions = {}
    for bits in bits_list:
        saved = swap(quantized(everything, bits))
        together = held.kl()
        swap(saved)
        single = sum(r["truth"] for r in rows if r["bits"] == bits)
        interactions[f"{bits}-bit"] = {"all_units_kl": together, "sum_single_kl": single, "ratio": together / single}
    plans = _plans(model_dir, tables, gptq, held_windows, bits_list, group)
    return {
        "model": model_dir.name,
        "arch": arch.name,
        "group": group,
        "rows": rows,
        "spearman": correlations(rows, bits_list),
        "interactions": interactions,
        "plans": plans,
        "seconds": round(time.perf_counter() - started, 1),
    }


def _plans(model_dir: Path, tables: dict, gptq, windows: Windows, bits_list: list[int], group: int) -> list[dict]:
    """Held-out KL of uniform GPTQ and of the optimizer's plan from each error table, at uniform's bytes."""
    from transformers import AutoConfig

    linears = quantizable_linears(AutoConfig.from_pretrained(model_dir))
    ref = reference_logprobs(model_dir, windows)
    work = Path(tempfile.mkdtemp(prefix="moemix-sensitivity-"))

    def kl(plan: Plan) -> float:
        quantize_checkpoint(model_dir, plan, work / "ckpt", quantizer=gptq, progress=False)
        value = compare_to_reference(work / "ckpt", windows, ref).kl
        shutil.rmtree(work / "ckpt")
        return value

    out = []
    try:
        for bits in bits_list:
            uniform = Plan.uniform(bits, group)
            nbytes = footprint(uniform.resolve(linears), linears).nbytes
            row = {"bits": bits, "uniform": kl(uniform)}
            for name, ctx in tables.items():
                row[name] = kl(plan_model(model_dir, "optimizer", Budget(nbytes=nbytes), context=ctx).plan)
            out.append(row)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return out


def _layer_scaled(rows: list[dict], sample: int, seed: int) -> None:
    """proxy x (sum calib-kl / sum proxy) over `sample` random units of the same (layer, role, bits) group."""
    groups = defaultdict(list)
    for row in rows:
        groups[(row["layer"], row["role"], row["bits"])].append(row)
    rng = random.Random(seed)
    for members in groups.values():
        picked = rng.sample(members, min(sample, len(members)))
        scale = sum(r["calib-kl"] for r in picked) / max(sum(r["proxy"] for r in picked), 1e-30)
        for row in members:
            row["layer-scaled"] = row["proxy"] * scale


def correlations(rows: list[dict], bits_list: list[int]) -> dict:
    out = {}
    for measure in MEASURES:
        per = {
            f"{b}-bit": spearman(*zip(*[(r[measure], r["truth"]) for r in rows if r["bits"] == b])) for b in bits_list
        }
        pooled = spearman([r[measure] for r in rows], [r["truth"] for r in rows])
        experts = [(r[measure], r["truth"]) for r in rows if r["role"] == "expert"]
        out[measure] = {**per, "pooled": pooled, "experts only": spearman(*zip(*experts))}
    return out


def markdown(results: list[dict], meta: dict) -> str:
    lines = [
        "# Which measure predicts the output cost of quantizing one unit",
        "",
        f"`benchmarks/sensitivity.py`, {meta['cpu']}, {meta['date']}. Truth: mean KL(float || model) on "
        f"{meta['windows']} held-out windows of 256 tokens with one unit GPTQ-quantized (group {meta['group']}); "
        "Spearman rank correlation of each measure with it over all units of the model, per width, pooled over "
        "both widths (what the knapsack trades), and over expert units only.",
        "",
        "| model | measure | " + " | ".join(results[0]["spearman"]["proxy"]) + " |",
        "|---|---|" + "---|" * len(results[0]["spearman"]["proxy"]),
    ]
    for r in results:
        for measure, cols in r["spearman"].items():
            lines.append(f"| {r['model']} ({r['arch']}) | {measure} | " + " | ".join(f"{v:.3f}" for v in cols.values()))
    lines += ["", "Interactions: KL with every unit quantized at once vs the sum of single-unit KLs.", ""]
    lines += ["| model | width | all at once | sum of singles | ratio |", "|---|---|---|---|---|"]
    for r in results:
        for width, v in r["interactions"].items():
            lines.append(
                f"| {r['model']} | {width} | {v['all_units_kl']:.5f} | {v['sum_single_kl']:.5f} | {v['ratio']:.2f} |"
            )
    lines += [
        "",
        f"What it is for: held-out KL ({meta['windows']} windows) of uniform GPTQ and of the optimizer's plan from "
        "each error table at uniform's bytes (target: optimizer <= 0.75x uniform).",
        "",
        "| model | bytes of | uniform GPTQ | optimizer (estimate) | ratio | optimizer (fisher) | ratio | target |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        for p in r["plans"]:
            est, fis = p["estimate"] / p["uniform"], p["fisher"] / p["uniform"]
            verdict = "holds" if fis <= TARGET_RATIO else f"misses by {fis / TARGET_RATIO - 1:.0%}"
            lines.append(
                f"| {r['model']} | uniform {p['bits']}-bit | {p['uniform']:.5f} | {p['estimate']:.5f} | {est:.2f} "
                f"| {p['fisher']:.5f} | {fis:.2f} | {verdict} |"
            )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=[str(m) for m in MODELS])
    parser.add_argument("--group", type=int, default=128)
    parser.add_argument("--bits", type=int, nargs="+", default=[2, 3])
    parser.add_argument("--windows", type=int, default=16, help="held-out windows of 256 tokens")
    parser.add_argument("--sample", type=int, default=2, help="units measured per (layer, role) for layer-scaled")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=str(REPO / "docs" / "quality"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    meta = {"cpu": cpu_name(), "date": time.strftime("%Y-%m-%d"), "windows": args.windows, "group": args.group}
    results = [run_model(Path(m), args.group, args.bits, args.windows, args.sample, seed=0) for m in args.models]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "sensitivity.json").write_text(json.dumps({"meta": meta, "results": results}, indent=1) + "\n")
    (out / "sensitivity.md").write_text(markdown(results, meta))
    print(markdown(results, meta))


if __name__ == "__main__":
    main()
