"""End-to-end decode and prefill through vLLM (`LLM.generate`) on a ~1B-parameter random Mixtral-style MoE.

Three checkpoints of the same random model, each served in its own engine (all loaded side by side and
timed round-robin, so machine noise hits each alike):
bf16; vLLM's own GPTQ 4-bit (symmetric, group 128, every attention and expert linear — the best a vLLM
user has on CPU today); moemix at a 2.5-bit mixed plan (experts 0-3 of every layer 2-bit, 4-7 3-bit,
attention 4-bit), once with the fastest native ISA variant and once with AVX2 forced (MOEMIX_CPU_ISA) when
they differ. A checkpoint vLLM cannot serve on this CPU (its GPTQ MoE path is AMX-only) gets a row saying
why instead of numbers. Decode tokens/s = generated tokens after the first / (time of a long run - time of a
1-token run), at batch 1 and 8. Prefill tokens/s = the extra prompt tokens / (time of a 1-token run on a long
prompt - on a short one), one sequence: every MoE layer then multiplies hundreds of rows per weight load (the
compute-bound path). Prompts are fresh random token ids each run, so vLLM's prefix cache never serves them.
Resident weight bytes are measured in the worker on the loaded model (parameters and buffers after every
kernel's repacking) and compared with what the plan predicts.
Random weights: speed and bytes only, no quality.

    .venv/bin/python benchmarks/e2e_decode.py            # ~0.9B model (about 15 minutes on 2 cores)
    .venv/bin/python benchmarks/e2e_decode.py --quick    # a tiny model (smoke test)

Checkpoints are cached under --work (default runs/bench/); writes <out>/e2e_decode.{json,md,png}.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import time
from pathlib import Path

import torch
from tqdm import tqdm

REPO = Path(__file__).resolve().parents[1]
NEW_TOKENS = 64
PREFILL_TOKENS = (16, 448)  # short and long prompt lengths (max_model_len 512)
PROMPT = "def fibonacci(n):\n    "
GROUP = 128
MOEMIX_ROW = "moemix 2.5-bit mixed"
GPTQ_ROW = "vLLM GPTQ 4-bit"
TOKENIZER = REPO / "models" / "tiny-mixtral"  # any tokenizer does for random weights; this one ships here


def moemix_plan(experts: int) -> dict:
    half = experts // 2
    return {
        "default": {"bits": 3, "group_size": GROUP},
        "modules": {
            f"model.layers.*.block_sparse_moe.experts.[0-{half - 1}]": {"bits": 2, "group_size": GROUP},
            "model.layers.*.self_attn": {"bits": 4, "group_size": GROUP},
        },
    }


def build_bf16(out: Path, layers: int, hidden: int, inter: int, experts: int) -> Path:
    from transformers import AutoTokenizer, MixtralConfig, MixtralForCausalLM

    if (out / "config.json").exists():
        return out
    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER)
    torch.manual_seed(0)
    config = MixtralConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 128,
        num_key_value_heads=max(hidden // 512, 1),
        num_local_experts=experts,
        num_experts_per_tok=2,
        max_position_embeddings=1024,
        tie_word_embeddings=False,
    )
    with torch.device("cpu"):
        model = MixtralForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


def build_moemix(src: Path, out: Path, experts: int) -> Path:
    from vllm_moemix.checkpoint.writer import quantize_checkpoint
    from vllm_moemix.config.plan import Plan

    if not (out / "config.json").exists():
        quantize_checkpoint(src, Plan.from_dict(moemix_plan(experts)), out, progress=True)
    return out


def build_gptq(src: Path, out: Path) -> Path:
    """vLLM's GPTQ format (v1: stored zero = zero - 1) from RTN 4-bit symmetric codes of every linear."""
    from safetensors.torch import load_file, save_file
    from transformers import AutoConfig

    from vllm_moemix.config.arch import quantizable_linears
    from vllm_moemix.config.spec import QuantSpec
    from vllm_moemix.quant.rtn import quantize_rtn

    if (out / "config.json").exists():
        return out
    out.mkdir(parents=True)
    config = AutoConfig.from_pretrained(src)
    linears = set(quantizable_linears(config))
    spec = QuantSpec(4, GROUP, sym=True)
    for shard in sorted(src.glob("*.safetensors")):
        tensors = {}
        for name, weight in tqdm(load_file(shard).items(), desc=f"GPTQ {shard.name}"):
            prefix = name.removesuffix(".weight")
            if prefix not in linears:
                tensors[name] = weight
                continue
            qw = quantize_rtn(weight.float(), spec)
            n, k = weight.shape
            tensors[f"{prefix}.qweight"] = qw.qweight
            tensors[f"{prefix}.scales"] = qw.scales
            tensors[f"{prefix}.qzeros"] = torch.full((k // GROUP, n // 8), 0x77777777, dtype=torch.int32)
            tensors[f"{prefix}.g_idx"] = torch.arange(k, dtype=torch.int32) // GROUP
        save_file(tensors, out / shard.name, metadata={"format": "pt"})
    for extra in src.iterdir():
        if extra.suffix != ".safetensors" and extra.name != "config.json" and extra.is_file():
            (out / extra.name).write_bytes(extra.read_bytes())
    index = src / "model.safetensors.index.json"
    if index.exists():
        data = json.loads(index.read_text())
        data["weight_map"] = {}
        for shard in sorted(out.glob("*.safetensors")):
            from safetensors import safe_open

            with safe_open(shard, "pt") as f:
                data["weight_map"].update({key: shard.name for key in f.keys()})
        (out / index.name).write_text(json.dumps(data))
    cfg = json.loads((src / "config.json").read_text())
    cfg["quantization_config"] = {
        "quant_method": "gptq",
        "bits": 4,
        "group_size": GROUP,
        "desc_act": False,
        "sym": True,
        "checkpoint_format": "gptq",
    }
    (out / "config.json").write_text(json.dumps(cfg, indent=1))
    return out


def checkpoint_tensor_bytes(model: Path) -> int:
    from safetensors import safe_open

    total = 0
    for shard in model.glob("*.safetensors"):
        with safe_open(shard, "pt") as f:
            for key in f.keys():
                sl = f.get_slice(key)
                total += torch.Size(sl.get_shape()).numel() * 2  # bf16 checkpoint
    return total


def load(model: Path, isa: str | None = None):
    """An engine for `model`; `isa` forces the native variant in its engine process (MOEMIX_CPU_ISA)."""
    from vllm import LLM

    from vllm_moemix.layers.introspect import EXTENSION
    from vllm_moemix.layers.kernels.cpu import ISA_ENV

    saved = os.environ.get(ISA_ENV)
    if isa:
        os.environ[ISA_ENV] = isa  # read in the engine process, which inherits this environment at start
    start = time.perf_counter()
    try:
        llm = LLM(
            model=str(model),
            dtype="bfloat16",
            max_model_len=512,
            max_num_seqs=8,
            seed=0,
            worker_extension_cls=EXTENSION,
        )
    finally:
        os.environ.pop(ISA_ENV, None) if saved is None else os.environ.__setitem__(ISA_ENV, saved)
    return llm, time.perf_counter() - start


def generate_seconds(llm, batch: int, tokens: int) -> float:
    from vllm import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=tokens, ignore_eos=True)
    start = time.perf_counter()
    llm.generate([PROMPT] * batch, params, use_tqdm=False)
    return time.perf_counter() - start


def prefill_seconds(llm, tokens: int, gen: torch.Generator) -> float:
    """One 1-token generation on a prompt of `tokens` random ids (never a prefix-cache hit)."""
    from vllm import SamplingParams, TokensPrompt

    ids = torch.randint(1000, llm.get_tokenizer().vocab_size, (tokens,), generator=gen).tolist()
    params = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
    start = time.perf_counter()
    llm.generate([TokensPrompt(prompt_token_ids=ids)], params, use_tqdm=False)
    return time.perf_counter() - start


def measure(checkpoints: list[tuple[str, Path, str | None]], reps: int) -> tuple[list[dict], list[dict]]:
    """All engines loaded side by side, then timed round-robin so machine noise hits every checkpoint alike.

    Decode tok/s = batch * NEW_TOKENS / (best time for NEW_TOKENS + 1 tokens - best time for 1 token); prefill
    tok/s likewise over the two prompt lengths of PREFILL_TOKENS.
    Returns (measured rows, rows of checkpoints that could not be served here, with why).
    """
    from vllm_moemix.layers.introspect import describe_served

    engines, rows, unavailable = [], [], []
    for name, path, isa in tqdm(checkpoints, desc="load engines"):
        if name == GPTQ_ROW and not torch.cpu._is_amx_tile_supported():  # vLLM's own device check for it
            unavailable.append(
                {"name": name, "unavailable": "vLLM's GPTQ MoE on CPU (CPUExpertsInt4) needs AMX, which this CPU lacks"}
            )
            continue
        try:
            llm, load_s = load(path, isa)
        except Exception as err:  # e.g. vLLM's GPTQ MoE on a CPU without AMX; the engine process reports it
            unavailable.append({"name": name, "unavailable": f"{type(err).__name__}: {str(err).splitlines()[0]}"})
            continue
        resident = llm.collective_rpc("moemix_resident_bytes")[0]
        kernels = llm.collective_rpc("moemix_kernels")[0]
        generate_seconds(llm, 1, 8)  # warm-up outside the timings
        engines.append(llm)
        rows.append(
            {
                "name": name,
                "load_s": load_s,
                "resident_bytes": sum(resident.values()),
                "resident_by_dtype": resident,
                "kernels": kernels,
                "served_by": describe_served(kernels) if any(kernels.values()) else "vLLM's own kernels",
            }
        )
    for batch in (1, 8):
        best = {(i, n): float("inf") for i in range(len(engines)) for n in (1, NEW_TOKENS + 1)}
        for _ in tqdm(range(reps), desc=f"batch {batch}"):
            for i, llm in enumerate(engines):
                for n in (1, NEW_TOKENS + 1):
                    best[(i, n)] = min(best[(i, n)], generate_seconds(llm, batch, n))
        for i, row in enumerate(rows):
            row[f"tok_s_batch{batch}"] = batch * NEW_TOKENS / (best[(i, NEW_TOKENS + 1)] - best[(i, 1)])
    best = {(i, n): float("inf") for i in range(len(engines)) for n in PREFILL_TOKENS}
    gen = torch.Generator().manual_seed(0)
    for _ in tqdm(range(reps), desc="prefill"):
        for i, llm in enumerate(engines):
            for n in PREFILL_TOKENS:
                best[(i, n)] = min(best[(i, n)], prefill_seconds(llm, n, gen))
    short, long = PREFILL_TOKENS
    for i, row in enumerate(rows):
        row["prefill_tok_s"] = (long - short) / (best[(i, long)] - best[(i, short)])
    del engines
    gc.collect()
    return rows, unavailable


def markdown(rows: list[dict], unavailable: list[dict], meta: dict) -> str:
    bf16 = rows[0]
    lines = [
        f"CPU: {meta['cpu']}.",
        "",
        f"{meta['params'] / 1e9:.2f}B-parameter random Mixtral-style MoE ({meta['layers']} layers, "
        f"E{meta['experts']} top-2, H{meta['hidden']}, I{meta['inter']}), vLLM CPU, bf16 activations, default "
        f"compile mode, {meta['threads']} cores, {NEW_TOKENS} new tokens. moemix plan: "
        f"{meta['moemix_avg_payload_bits']:.2f} payload bits ({meta['moemix_avg_bits']:.2f} with scales/zeros) "
        f"over attention + experts; plan predicts {meta['moemix_predicted_bytes'] / 2**20:.0f} MiB resident.",
        "",
        "| checkpoint | decode tok/s, batch 1 | ×bf16 | decode tok/s, batch 8 | ×bf16 "
        f"| prefill tok/s ({PREFILL_TOKENS[1]}-token prompt) | ×bf16 | resident weights | ×bf16 |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['name']} | {r['tok_s_batch1']:.1f} | {r['tok_s_batch1'] / bf16['tok_s_batch1']:.2f} "
            f"| {r['tok_s_batch8']:.1f} | {r['tok_s_batch8'] / bf16['tok_s_batch8']:.2f} "
            f"| {r['prefill_tok_s']:.0f} | {r['prefill_tok_s'] / bf16['prefill_tok_s']:.2f} "
            f"| {r['resident_bytes'] / 2**20:.0f} MiB | {r['resident_bytes'] / bf16['resident_bytes']:.2f} |"
        )
    for r in unavailable:
        lines.append(f"| {r['name']} | not available on this CPU: {r['unavailable']} | | | | | | | |")
    lines += ["", "Served by: " + "; ".join(f"{r['name']}: {r['served_by']}" for r in rows)]
    moemix = next(r for r in rows if r["name"] == MOEMIX_ROW)
    lines += [
        "",
        f"moemix quantized tensors resident in the worker: {meta['moemix_measured_linear_bytes']:,} bytes; "
        f"the plan's footprint: {meta['moemix_plan_linear_bytes']:,} bytes "
        f"({meta['moemix_measured_linear_bytes'] / meta['moemix_plan_linear_bytes']:.3f}). Whole model "
        f"measured / predicted (plan + bf16 rest of the checkpoint): "
        f"{moemix['resident_bytes'] / meta['moemix_predicted_bytes']:.3f}.",
    ]
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(17, 3.6))
    names = [r["name"] for r in rows]
    for ax, key, title in zip(
        axes,
        ("tok_s_batch1", "tok_s_batch8", "prefill_tok_s", "resident_bytes"),
        ("decode tok/s, batch 1", "decode tok/s, batch 8", "prefill tok/s", "resident weights (MiB)"),
    ):
        values = [r[key] / (2**20 if key == "resident_bytes" else 1) for r in rows]
        ax.bar(names, values, color=["#999999", "#6a9fd8", "#d8783a", "#e8b04a"][: len(rows)])
        ax.set_title(title)
        for i, v in enumerate(values):
            ax.text(i, v, f"{v:.0f}", ha="center", va="bottom", fontsize=8)
        ax.tick_params(axis="x", labelsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=10)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--inter", type=int, default=3584)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--quick", action="store_true", help="2 layers, H256, I512")
    parser.add_argument("--skip-gptq", action="store_true")
    parser.add_argument("--reps", type=int, default=3, help="round-robin timing rounds per batch size")
    parser.add_argument("--work", default=str(REPO / "runs" / "bench"))
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    args = parser.parse_args()
    if args.quick:
        args.layers, args.hidden, args.inter = 2, 256, 512
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from transformers import AutoConfig

    from vllm_moemix.config.arch import quantizable_linears
    from vllm_moemix.config.footprint import footprint
    from vllm_moemix.config.plan import Plan
    from vllm_moemix.layers.kernels.cpu import cpu_summary, variants

    work = Path(args.work) / f"mixtral-l{args.layers}-h{args.hidden}-i{args.inter}-e{args.experts}"
    src = build_bf16(work / "bf16", args.layers, args.hidden, args.inter, args.experts)
    checkpoints = [("bf16", src, None)]
    if not args.skip_gptq:
        checkpoints.append((GPTQ_ROW, build_gptq(src, work / "gptq4"), None))
    moemix_ckpt = build_moemix(src, work / "moemix", args.experts)
    checkpoints.append((MOEMIX_ROW, moemix_ckpt, None))
    supported = [v.name for v in variants() if v.supported]
    if len(supported) > 1 and "avx2" in supported:
        checkpoints.append((f"{MOEMIX_ROW} [avx2]", moemix_ckpt, "avx2"))

    config = AutoConfig.from_pretrained(src)
    linears = quantizable_linears(config)
    fp = footprint(Plan.from_dict(moemix_plan(args.experts)).resolve(linears), linears)
    rows, unavailable = measure(checkpoints, args.reps)
    ckpt_bytes = checkpoint_tensor_bytes(src)
    moemix = next(r for r in rows if r["name"] == MOEMIX_ROW)["resident_by_dtype"]
    meta = {
        "cpu": cpu_summary(),
        "layers": args.layers,
        "hidden": args.hidden,
        "inter": args.inter,
        "experts": args.experts,
        "threads": os.cpu_count(),
        "params": ckpt_bytes // 2,
        "moemix_avg_bits": fp.avg_bits,
        "moemix_avg_payload_bits": fp.avg_payload_bits,
        "moemix_plan_linear_bytes": fp.nbytes,
        "moemix_measured_linear_bytes": sum(moemix.get(d, 0) for d in ("int32", "float16", "uint8")),
        "moemix_predicted_bytes": ckpt_bytes - fp.bf16_bytes + fp.nbytes,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    table = markdown(rows, unavailable, meta)
    (out / "e2e_decode.md").write_text(table + "\n")
    (out / "e2e_decode.json").write_text(json.dumps({"meta": meta, "rows": rows, "unavailable": unavailable}, indent=1))
    plot(rows, out / "e2e_decode.png")
    print(table)


if __name__ == "__main__":
    main()
