"""Side by side with llama.cpp, the engine CPU users pick for 2-4-bit MoEs: quality at equal bytes, and speed.

    .venv/bin/python benchmarks/llamacpp.py setup    # once: llama.cpp tools + Python bindings (~15 min, 2 cores)
    .venv/bin/python benchmarks/llamacpp.py          # quality on the embedded models, speed on the 0.92B MoE

llama.cpp comes from PyPI's `llama-cpp-python` source distribution (pinned below), which vendors llama.cpp with
its HF->GGUF converter, quantizer and importance-matrix tool: `setup` builds those with CMake and installs the
bindings against the same library (runs/llamacpp/). Our tokenizers are byte-level BPE with the GPT-2 split; the
converter does not know their hash, so it is told (`get_vocab_base_pre` -> "gpt-2") rather than edited.

Quality (`models/tiny-mixtral`, `models/tiny-qwen2moe`): llama.cpp's Q2_K, Q3_K_S, Q3_K_M and Q4_K_M with an
importance matrix from the same calibration text moemix uses, token embeddings and output kept bf16 as moemix
keeps them; bytes counted per GGUF tensor over attention + expert (+ shared expert) linears only. moemix: the
optimizer at `--budget-bytes` equal to each mix's linear bytes, uniform GPTQ at 2/3/4 bits. Both engines see the
same token ids (held-out windows, fed as ids); each is compared with its own bf16: mean KL(bf16 || quantized)
per token, top-1 agreement, perplexity. Plans are made from calibration text only.

Speed (the random 0.92B Mixtral-style MoE of benchmarks/e2e_decode.py): decode tok/s at batch 1 and 8, prefill
tok/s at 256 tokens, same thread count, at the bytes of Q2_K and Q3_K_S; resident memory of each.

Writes <out>/llamacpp.{json,md,png}.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tarfile
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
LLAMA_CPP_PYTHON = "0.3.36"
WORK = REPO / "runs" / "llamacpp"
MIXES = ("Q2_K", "Q3_K_S", "Q3_K_M", "Q4_K_M")
SPEED_MIXES = ("Q2_K", "Q3_K_S")
TOOLS = ("llama-quantize", "llama-imatrix", "llama-bench", "llama-batched-bench")
# GGUF tensors that are the quantizable linears moemix counts (attention, routed and shared experts).
LINEAR_TENSOR = re.compile(r"\.(attn_(q|k|v|output)|ffn_(gate|up|down)_(exps|shexp))\.weight$")


@dataclass
class LlamaCpp:
    root: Path  # vendor/llama.cpp of the sdist

    @property
    def bin(self) -> Path:
        return self.root / "build" / "bin"

    @classmethod
    def find(cls, work: Path = WORK) -> LlamaCpp | None:
        """The built tree under `work`, or None (run `setup`)."""
        root = work / f"llama_cpp_python-{LLAMA_CPP_PYTHON}" / "vendor" / "llama.cpp"
        found = cls(root)
        return found if all((found.bin / t).exists() for t in TOOLS) and (found.bin / "libllama.so").exists() else None

    @classmethod
    def setup(cls, work: Path = WORK) -> LlamaCpp:
        """Download the pinned sdist, build libllama + the tools, install the bindings against that library."""
        work.mkdir(parents=True, exist_ok=True)
        sdist = work / f"llama_cpp_python-{LLAMA_CPP_PYTHON}.tar.gz"
        if not sdist.exists():
            run(
                [
                    sys.executable,
                    "-m",
                    "pip",
                    "download",
                    "--no-binary",
                    ":all:",
                    "--no-deps",
                    f"llama-cpp-python=={LLAMA_CPP_PYTHON}",
                    "-d",
                    str(work),
                ]
            )
        src = work / f"llama_cpp_python-{LLAMA_CPP_PYTHON}"
        if not src.exists():
            with tarfile.open(sdist) as tar:
                tar.extractall(work, filter="data")
        found = cls(src / "vendor" / "llama.cpp")
        if cls.find(work) is None:
            # The CPU variants llama.cpp itself picks at build time for x86; GGML_NATIVE off so the build is portable.
            run(
                [
                    "cmake",
                    "-B",
                    "build",
                    "-DLLAMA_CURL=OFF",
                    "-DBUILD_SHARED_LIBS=ON",
                    "-DGGML_NATIVE=OFF",
                    "-DGGML_AVX2=ON",
                    "-DGGML_FMA=ON",
                    "-DGGML_F16C=ON",
                    "-DLLAMA_BUILD_TESTS=OFF",
                    "-DLLAMA_BUILD_EXAMPLES=OFF",
                    "-DLLAMA_BUILD_SERVER=OFF",
                    "-DCMAKE_BUILD_TYPE=Release",
                ],
                cwd=found.root,
            )
            run(["cmake", "--build", "build", "-j", str(os.cpu_count()), "--target", "llama", *TOOLS], cwd=found.root)
        # Bindings only (LLAMA_BUILD=OFF): they load build/bin/libllama.so through LLAMA_CPP_LIB_PATH. --no-deps keeps
        # the pinned numpy/torch stack; diskcache is the one dependency of theirs that stack lacks.
        run(
            [sys.executable, "-m", "pip", "install", "--no-deps", str(src), "diskcache>=5.6"],
            env=dict(os.environ, CMAKE_ARGS="-DLLAMA_BUILD=OFF"),
        )
        return found

    def convert(self, hf_dir: Path, out: Path) -> Path:
        """HF -> bf16 GGUF with llama.cpp's converter, told that our BPE pre-tokenizer is GPT-2's."""
        if out.exists():
            return out
        script = textwrap.dedent(f"""
            import sys
            sys.path.insert(0, {str(self.root)!r})
            sys.argv = ["convert_hf_to_gguf.py", {str(hf_dir)!r}, "--outtype", "bf16", "--outfile", {str(out)!r}]
            import convert_hf_to_gguf
            from conversion.base import TextModel
            TextModel.get_vocab_base_pre = lambda self, tokenizer: "gpt-2"  # byte-level BPE, GPT-2 split
            convert_hf_to_gguf.main()
        """)
        run([sys.executable, "-c", script])
        return out

    def imatrix(self, model: Path, text: Path, out: Path, threads: int) -> Path:
        if not out.exists():
            run(
                [
                    str(self.bin / "llama-imatrix"),
                    "-m",
                    str(model),
                    "-f",
                    str(text),
                    "-o",
                    str(out),
                    "-t",
                    str(threads),
                    "-c",
                    "256",
                    "--no-ppl",
                ]
            )
        return out

    def quantize(self, model: Path, mix: str, out: Path, threads: int, imatrix: Path | None = None) -> Path:
        if not out.exists():
            extra = ["--imatrix", str(imatrix)] if imatrix else []
            run(
                [
                    str(self.bin / "llama-quantize"),
                    *extra,
                    "--token-embedding-type",
                    "bf16",
                    "--output-tensor-type",
                    "bf16",
                    str(model),
                    str(out),
                    mix,
                    str(threads),
                ]
            )
        return out

    def linear_bytes(self, model: Path) -> tuple[int, int]:
        """(bytes, weights) of the attention + expert (+ shared) linear tensors of a GGUF file."""
        sys.path.insert(0, str(self.root / "gguf-py"))
        from gguf import GGUFReader

        nbytes = weights = 0
        for t in GGUFReader(model).tensors:
            if LINEAR_TENSOR.search(t.name):
                nbytes += int(t.n_bytes)
                weights += int(t.n_elements)
        return nbytes, weights

    def logprobs(self, model: Path, windows, threads: int) -> torch.Tensor:
        """Log-softmax for every window position, [n, seq_len, vocab] float16, fed token ids (no BOS added)."""
        llm = self.load(model, threads, n_ctx=windows.ids.shape[1])
        out = []
        for row in windows.ids.tolist():
            llm.reset()
            llm.eval(row)
            logits = torch.from_numpy(llm.scores[: len(row)].copy())
            out.append(torch.log_softmax(logits.float(), -1).half())
        del llm
        return torch.stack(out)

    def check_round_trip(self, hf_dir: Path, heldout: Path, work: Path) -> str:
        """The whole path once on a tiny model, right after building: convert (GPT-2 pre-tokenizer told), quantize
        keeping embeddings/output bf16, count linear bytes, score the same token ids. Raises naming what broke."""
        from transformers import AutoTokenizer

        from vllm_moemix.report.evaluate import Windows, compare_logprobs

        work.mkdir(parents=True, exist_ok=True)
        bf16 = self.convert(hf_dir, work / "check-bf16.gguf")
        q4 = self.quantize(bf16, "Q4_K_M", work / "check-q4.gguf", threads=2)
        (bf16_bytes, weights), (q4_bytes, q4_weights) = self.linear_bytes(bf16), self.linear_bytes(q4)
        bits = 8 * q4_bytes / weights
        if weights != q4_weights or bf16_bytes != 2 * weights or not 4 < bits < 6:
            raise RuntimeError(
                f"llama.cpp byte count is off: bf16 {bf16_bytes} B / {weights} weights, Q4_K_M "
                f"{q4_bytes} B / {q4_weights} weights ({bits:.2f} b/w)"
            )
        windows = Windows.from_text(AutoTokenizer.from_pretrained(hf_dir), heldout, max_windows=1)
        cmp = compare_logprobs(self.logprobs(q4, windows, 2), self.logprobs(bf16, windows, 2), windows.ids)
        if not (0 < cmp.kl < 0.1 and cmp.top1 > 0.8 and cmp.perplexity < 200):
            raise RuntimeError(
                f"llama.cpp Q4_K_M scores implausibly: KL {cmp.kl:.4f}, top-1 {cmp.top1:.1%}, "
                f"ppl {cmp.perplexity:.1f} (tokenizer or id feeding broken?)"
            )
        return f"Q4_K_M {bits:.2f} b/w, KL {cmp.kl:.4f}, top-1 {cmp.top1:.1%} on {hf_dir.name}"

    def load(self, model: Path, threads: int, n_ctx: int):
        os.environ["LLAMA_CPP_LIB_PATH"] = str(self.bin)
        from llama_cpp import Llama

        return Llama(
            model_path=str(model), n_ctx=n_ctx, n_batch=n_ctx, n_threads=threads, logits_all=True, verbose=False, seed=0
        )

    def speed(self, model: Path, threads: int) -> dict:
        """llama-bench prefill (256) and decode (64) tok/s; llama-batched-bench decode at 1 and 8 sequences."""
        bench = json.loads(
            run(
                [
                    str(self.bin / "llama-bench"),
                    "-m",
                    str(model),
                    "-t",
                    str(threads),
                    "-p",
                    "256",
                    "-n",
                    "64",
                    "-r",
                    "3",
                    "-o",
                    "json",
                ]
            )
        )
        pp = next(r["avg_ts"] for r in bench if r["n_prompt"] == 256)
        tg = next(r["avg_ts"] for r in bench if r["n_gen"] == 64)
        batched = run(
            [
                str(self.bin / "llama-batched-bench"),
                "-m",
                str(model),
                "-t",
                str(threads),
                "-c",
                "2048",
                "-npp",
                "16",
                "-ntg",
                "64",
                "-npl",
                "1,8",
            ]
        )
        tg_by_batch = {}
        for line in batched.splitlines():  # | PP | TG | B | N_KV | T_PP s | S_PP t/s | T_TG s | S_TG t/s | ...
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if len(cells) >= 8 and cells[0].isdigit():
                tg_by_batch[int(cells[2])] = float(cells[7])
        return {
            "prefill_tok_s": pp,
            "decode_tok_s_batch1": tg,
            "decode_tok_s_batch8": tg_by_batch.get(8),
            "decode_tok_s_batch1_batched_bench": tg_by_batch.get(1),
        }


def run(cmd: list[str], cwd: Path | None = None, env: dict | None = None) -> str:
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"{' '.join(cmd[:3])} ... failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return done.stdout


# ---- quality ------------------------------------------------------------------------------------------------


def compare(logp: torch.Tensor, ref: torch.Tensor, ids: torch.Tensor) -> dict:
    from vllm_moemix.report.evaluate import compare_logprobs

    cmp = compare_logprobs(logp, ref, ids)
    return {"kl": cmp.kl, "top1": cmp.top1, "ppl": cmp.perplexity}


def quality(llama: LlamaCpp, model: Path, work: Path, args) -> list[dict]:
    from transformers import AutoConfig, AutoTokenizer

    from vllm_moemix.calibration.gptq import collect_hessians
    from vllm_moemix.checkpoint.writer import quantize_checkpoint
    from vllm_moemix.config.arch import quantizable_linears
    from vllm_moemix.config.footprint import footprint
    from vllm_moemix.config.plan import Plan
    from vllm_moemix.planning.pipeline import CalibrationConfig, build_context, plan_model
    from vllm_moemix.planning.units import Budget
    from vllm_moemix.report.evaluate import Windows, compare_to_reference, reference_logprobs

    work.mkdir(parents=True, exist_ok=True)
    windows = Windows.from_text(AutoTokenizer.from_pretrained(model), args.heldout, max_windows=args.windows)
    linears = quantizable_linears(AutoConfig.from_pretrained(model))
    rows = []

    bf16 = llama.convert(model, work / "bf16.gguf")
    imatrix = llama.imatrix(bf16, Path(args.calib), work / "imatrix.dat", args.threads)
    llama_ref = llama.logprobs(bf16, windows, args.threads)
    total_weights = llama.linear_bytes(bf16)[1]
    for mix in MIXES:
        gguf = llama.quantize(bf16, mix, work / f"{mix}.gguf", args.threads, imatrix)
        nbytes, weights = llama.linear_bytes(gguf)
        assert weights == total_weights
        rows.append(
            {
                "model": model.name,
                "engine": "llama.cpp",
                "config": f"{mix} (imatrix)",
                "bytes": nbytes,
                "bits_per_weight": 8 * nbytes / weights,
                **compare(llama.logprobs(gguf, windows, args.threads), llama_ref, windows.ids),
            }
        )

    if args.llamacpp_only:
        return rows
    ref = reference_logprobs(model, windows)
    calib = CalibrationConfig(texts=[Path(args.calib)], quantizer="gptq")
    context = build_context(model, "optimizer", calib, args.group_size, False, {}, progress=True)
    gptq = collect_hessians(model, calib.texts, calib.num_samples, calib.seq_len)

    def measure(config: str, plan: Plan) -> None:
        fp = footprint(plan.resolve(linears), linears)
        ckpt = work / f"moemix-{config.replace(' ', '_')}"
        if not ckpt.exists():
            quantize_checkpoint(model, plan, ckpt, quantizer=gptq, progress=False)
        cmp = compare_to_reference(ckpt, windows, ref)
        rows.append(
            {
                "model": model.name,
                "engine": "moemix",
                "config": config,
                "bytes": fp.nbytes,
                "bits_per_weight": 8 * fp.nbytes / fp.weights,
                "kl": cmp.kl,
                "top1": cmp.top1,
                "ppl": cmp.perplexity,
            }
        )

    for bits in (2, 3, 4):
        measure(f"uniform GPTQ {bits}-bit", Plan.uniform(bits, args.group_size))
    for row in [r for r in rows if r["engine"] == "llama.cpp"]:
        result = plan_model(model, "optimizer", Budget(nbytes=row["bytes"]), context=context)
        measure(f"optimizer @ {row['config'].split()[0]} bytes", result.plan)
    return rows


# ---- speed --------------------------------------------------------------------------------------------------


def speed(llama: LlamaCpp, args) -> list[dict]:
    from transformers import AutoConfig

    if str(REPO) not in sys.path:  # run as a script: make the repository's `benchmarks` package importable
        sys.path.insert(0, str(REPO))
    from benchmarks.e2e_decode import build_bf16, generate_seconds, load
    from vllm_moemix.checkpoint.writer import quantize_checkpoint
    from vllm_moemix.config.arch import quantizable_linears
    from vllm_moemix.config.footprint import footprint
    from vllm_moemix.planning.pipeline import plan_model
    from vllm_moemix.planning.units import Budget

    work = Path(args.work) / "speed"
    work.mkdir(parents=True, exist_ok=True)
    # the same random model (seeded) and cache directory as benchmarks/e2e_decode.py
    src = build_bf16(REPO / "runs" / "bench" / "mixtral-l10-h1024-i3584-e8" / "bf16", 10, 1024, 3584, 8)
    linears = quantizable_linears(AutoConfig.from_pretrained(src))
    bf16 = llama.convert(src, work / "bf16.gguf")
    rows = []
    for mix in SPEED_MIXES:
        gguf = llama.quantize(bf16, mix, work / f"{mix}.gguf", args.threads)
        nbytes, _ = llama.linear_bytes(gguf)
        rss = resident_after(lambda gguf=gguf: llama.load(gguf, args.threads, n_ctx=512))
        rows.append(
            {
                "engine": "llama.cpp",
                "config": mix,
                "bytes": nbytes,
                "resident_bytes": rss,
                **llama.speed(gguf, args.threads),
            }
        )
        # moemix at the same bytes; random weights, so a data-free strategy and RTN (speed does not depend on values)
        plan = plan_model(src, "kurtosis", Budget(nbytes=nbytes)).plan
        ckpt = work / f"moemix-{mix}"
        if not ckpt.exists():
            quantize_checkpoint(src, plan, ckpt, progress=False)
        fp = footprint(plan.resolve(linears), linears)
        rows.append(
            {
                "engine": "moemix",
                "config": f"optimizer-free plan @ {mix} bytes (kurtosis, RTN)",
                "bytes": fp.nbytes,
                **moemix_speed(ckpt, load, generate_seconds),
            }
        )
    return rows


def resident_after(make) -> int:
    """RSS growth of this process while `make()`'s object is alive (llama.cpp mmaps and touches its weights)."""

    def rss() -> int:
        return int(next(line for line in open("/proc/self/status") if line.startswith("VmRSS")).split()[1]) * 1024

    before = rss()
    obj = make()
    obj.eval([1, 2, 3])  # touch the weights
    grown = rss() - before
    del obj
    return grown


def moemix_speed(ckpt: Path, load, generate_seconds) -> dict:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    llm, _ = load(ckpt)
    resident = sum(llm.collective_rpc("moemix_resident_bytes")[0].values())
    generate_seconds(llm, 1, 8)  # warm-up
    out = {"resident_bytes": resident}
    for batch in (1, 8):
        short = min(generate_seconds(llm, batch, 1) for _ in range(2))
        long = min(generate_seconds(llm, batch, 65) for _ in range(2))
        out[f"decode_tok_s_batch{batch}"] = batch * 64 / (long - short)
    prompt = TokensPrompt(prompt_token_ids=list(range(10, 266)))
    params = SamplingParams(max_tokens=1, temperature=0.0)
    llm.generate([prompt], params, use_tqdm=False)
    t = time.perf_counter()
    llm.generate([prompt], params, use_tqdm=False)
    out["prefill_tok_s"] = 256 / (time.perf_counter() - t)
    out["step_ms_batch1"] = 1000 / out["decode_tok_s_batch1"]
    del llm
    return out


# ---- report -------------------------------------------------------------------------------------------------


def markdown(quality_rows: list[dict], speed_rows: list[dict], meta: dict) -> str:
    lines = [
        f"CPU: {meta['cpu']}; {meta['threads']} threads for both engines; llama.cpp from llama-cpp-python "
        f"{LLAMA_CPP_PYTHON}. Bytes = attention + expert (+ shared) linears incl. scales/zeros; b/w = bits per "
        "weight over them. KL = mean KL(bf16 || quantized) per token against each engine's own bf16, same token "
        f"ids ({meta['heldout_tokens']} held-out tokens per model).",
        "",
    ]
    for model in dict.fromkeys(r["model"] for r in quality_rows):
        lines += [f"### {model}", "", "| engine | config | b/w | KL | top-1 | ppl |", "|---|---|---|---|---|---|"]
        for r in sorted((r for r in quality_rows if r["model"] == model), key=lambda r: r["bytes"]):
            lines.append(
                f"| {r['engine']} | {r['config']} | {r['bits_per_weight']:.2f} | {r['kl']:.4f} | "
                f"{r['top1']:.1%} | {r['ppl']:.2f} |"
            )
        lines.append("")
    if speed_rows:
        lines += [
            "### Speed: 0.92B random Mixtral-style MoE",
            "",
            "| engine | config | b/w MiB | decode tok/s b1 | decode tok/s b8 | prefill tok/s (256) | resident |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in speed_rows:
            b8 = "n/a" if r.get("decode_tok_s_batch8") is None else f"{r['decode_tok_s_batch8']:.1f}"
            lines.append(
                f"| {r['engine']} | {r['config']} | {r['bytes'] / 2**20:.0f} | {r['decode_tok_s_batch1']:.1f} "
                f"| {b8} | {r['prefill_tok_s']:.0f} | {r['resident_bytes'] / 2**20:.0f} MiB |"
            )
    return "\n".join(lines)


def plot(quality_rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r["model"] for r in quality_rows))
    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4.5), squeeze=False)
    for ax, model in zip(axes[0], models):
        for label, pick, style in (
            ("llama.cpp k-quants (imatrix)", lambda r: r["engine"] == "llama.cpp", "s--"),
            ("moemix optimizer", lambda r: r["config"].startswith("optimizer"), "o-"),
            ("moemix uniform GPTQ", lambda r: r["config"].startswith("uniform"), "^:"),
        ):
            pts = sorted((r["bits_per_weight"], r["kl"]) for r in quality_rows if r["model"] == model and pick(r))
            ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=label)
        ax.set(
            title=model, xlabel="bits per weight (linears, incl. scales)", ylabel="KL(bf16 || quantized)", yscale="log"
        )
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", nargs="?", default="run", choices=["run", "setup"])
    parser.add_argument(
        "--models", nargs="+", default=[str(REPO / "models" / "tiny-mixtral"), str(REPO / "models" / "tiny-qwen2moe")]
    )
    parser.add_argument("--heldout", default=str(REPO / "models" / "heldout.txt"))
    parser.add_argument("--calib", default=str(REPO / "models" / "calib.txt"))
    parser.add_argument("--windows", type=int, default=16, help="held-out windows of 256 tokens per model")
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--skip-speed", action="store_true")
    parser.add_argument(
        "--llamacpp-only",
        action="store_true",
        help="llama.cpp's rows only (benchmarks/quality.py measures moemix on the third model)",
    )
    parser.add_argument("--work", default=str(WORK))
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    args = parser.parse_args()
    if args.command == "setup":
        llama = LlamaCpp.setup(Path(args.work))
        print(f"llama.cpp tools in {llama.bin}")
        hf_dir = Path(args.models[0])
        print("round trip:", llama.check_round_trip(hf_dir, Path(args.heldout), Path(args.work) / "check"))
        return
    llama = LlamaCpp.find(Path(args.work))
    if llama is None:
        sys.exit(f"llama.cpp is not built under {args.work}: run `{sys.argv[0]} setup` first")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    torch.set_num_threads(args.threads)
    from vllm_moemix.layers.kernels.cpu import cpu_summary

    quality_rows = []
    for model in args.models:
        quality_rows += quality(llama, Path(model), Path(args.work) / Path(model).name, args)
    speed_rows = [] if args.skip_speed else speed(llama, args)
    meta = {"cpu": cpu_summary(), "threads": args.threads, "heldout_tokens": args.windows * 256}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    table = markdown(quality_rows, speed_rows, meta)
    (out / "llamacpp.md").write_text(table + "\n")
    (out / "llamacpp.json").write_text(
        json.dumps({"meta": meta, "quality": quality_rows, "speed": speed_rows}, indent=1)
    )
    plot(quality_rows, out / "llamacpp.png")
    print(table)


if __name__ == "__main__":
    main()
