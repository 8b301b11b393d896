"""Can `moemix quantize` handle a Qwen3-30B-A3B or a Mixtral-8x7B in bounded memory and hours?

Each run is a fresh `python -m vllm_moemix.cli quantize` process on a random-weight model with one decoder
layer (or --layers) of a real model's shapes; its wall seconds and peak RSS (the whole process tree, sampled
every 0.2 s by a watchdog thread, plus the kernel's high-water mark of the child) are recorded, and the
per-layer seconds are projected to the full model's layer count. Modes: `rtn` (--bits 4), `gptq` (--bits 4
with calibration), `budget-2.5` (the default optimizer at 2.5 bits), `budget-bytes` (the optimizer at the bytes
of uniform 3-bit group-128). A run that grows past --mem-limit-gb is killed, one that passes --timeout too; the
row says so. --baseline REV runs the same modes with the code of another git revision (a worktree under
--work) for a before/after comparison.

Per-layer seconds include process start-up and the non-layer tensors (embeddings, LM head), so the
full-model projection (per-layer x layer count) is conservative; peak RSS is reported as measured (it should
not grow with the layer count: calibration and quantization hold one decoder layer at a time).
Random weights: time and memory only, no quality.

    .venv/bin/python benchmarks/scale.py                      # both shapes, all modes (hours on 2 cores)
    .venv/bin/python benchmarks/scale.py --shapes qwen3-30b-a3b --modes rtn gptq --baseline c5f1ca6
    .venv/bin/python benchmarks/scale.py --quick              # a tiny shape (smoke test)

Models are cached under --work (default runs/scale/models/<shape>-L<layers>; delete one after changing its
shape); writes <out>/scale.{json,md,png}.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TOKENIZER = REPO / "models" / "tiny-mixtral"  # any tokenizer does for random weights; a small vocabulary here
CALIB = REPO / "models" / "calib.txt"
GB = 1e9
POLL_S = 0.2
SHARD_BYTES = 1 << 30  # at most this much of a decoder layer is generated in memory before it is written
STD = 0.02


@dataclass(frozen=True)
class Shape:
    config_class: str  # a transformers config class
    architecture: str  # config.architectures
    full_layers: int  # decoder layers of the real model, for the projection
    config: dict = field(default_factory=dict)


SHAPES: dict[str, Shape] = {
    "qwen3-30b-a3b": Shape(
        "Qwen3MoeConfig",
        "Qwen3MoeForCausalLM",
        48,
        dict(
            hidden_size=2048,
            intermediate_size=6144,
            moe_intermediate_size=768,
            num_experts=128,
            num_experts_per_tok=8,
            norm_topk_prob=True,
            num_attention_heads=32,
            num_key_value_heads=4,
            head_dim=128,
            decoder_sparse_step=1,
            mlp_only_layers=[],
            max_position_embeddings=40960,
            rms_norm_eps=1e-6,
        ),
    ),
    "mixtral-8x7b": Shape(
        "MixtralConfig",
        "MixtralForCausalLM",
        32,
        dict(
            hidden_size=4096,
            intermediate_size=14336,
            num_local_experts=8,
            num_experts_per_tok=2,
            num_attention_heads=32,
            num_key_value_heads=8,
            max_position_embeddings=32768,
            rms_norm_eps=1e-5,
        ),
    ),
    # --quick: Qwen3-MoE style, small enough that every mode runs in seconds
    "quick": Shape(
        "Qwen3MoeConfig",
        "Qwen3MoeForCausalLM",
        4,
        dict(
            hidden_size=256,
            intermediate_size=512,
            moe_intermediate_size=128,
            num_experts=8,
            num_experts_per_tok=2,
            norm_topk_prob=True,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=64,
            decoder_sparse_step=1,
            mlp_only_layers=[],
            max_position_embeddings=1024,
        ),
    ),
}
REAL_SHAPES = ("qwen3-30b-a3b", "mixtral-8x7b")
MODES = ("rtn", "gptq", "budget-2.5", "budget-bytes")


# --- the random-weight model -------------------------------------------------------------------------------------


def shape_config(shape: str, layers: int, vocab_size: int):
    import transformers

    spec = SHAPES[shape]
    return getattr(transformers, spec.config_class)(
        vocab_size=vocab_size,
        num_hidden_layers=layers,
        tie_word_embeddings=False,
        architectures=[spec.architecture],
        dtype="bfloat16",
        **spec.config,
    )


def checkpoint_tensors(config) -> dict[str, tuple[int, ...]]:
    """Checkpoint tensor name -> shape, as real checkpoints name them (per expert, the architecture's names).

    transformers builds the module tree (on the meta device: nothing is allocated); fused 3-D expert parameters
    (`experts.gate_up_proj` [E, 2I, H], `experts.down_proj` [E, H, I]) become per-expert gate/up/down weights,
    and transformers' renames (`Architecture.hf_renames`) are undone, which is what `LayerwiseModel.load_layer`
    and the writer read.
    """
    import torch
    from transformers import AutoModelForCausalLM

    from vllm_moemix.config.arch import architecture_for

    arch = architecture_for(config)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    tensors: dict[str, tuple[int, ...]] = {}
    for name, param in skeleton.named_parameters():
        shape = tuple(param.shape)
        if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            layer = name.split(".")[2]
            base = f"model.layers.{layer}.{arch.experts.prefix}"
            experts, rows, cols = shape
            for e in range(experts):
                if name.endswith("gate_up_proj"):
                    tensors[f"{base}.{e}.{arch.experts.gate}.weight"] = (rows // 2, cols)
                    tensors[f"{base}.{e}.{arch.experts.up}.weight"] = (rows // 2, cols)
                else:
                    tensors[f"{base}.{e}.{arch.experts.down}.weight"] = (rows, cols)
            continue
        ckpt = name
        for original, renamed in reversed(arch.hf_renames):
            ckpt = ckpt.replace(renamed, original)
        if arch.hf_path(ckpt) != name:
            raise ValueError(f"{name}: no checkpoint name maps to it (hf_renames of {arch.name})")
        tensors[ckpt] = shape
    return tensors


def _layer_of(name: str) -> int:
    parts = name.split(".")
    return int(parts[2]) if name.startswith("model.layers.") and parts[2].isdigit() else -1


def _shards(tensors: dict[str, tuple[int, ...]]) -> list[list[str]]:
    """Non-layer tensors in one shard, then each decoder layer's tensors in shards of at most SHARD_BYTES."""
    import math

    groups: dict[int, list[str]] = {}
    for name in tensors:
        groups.setdefault(_layer_of(name), []).append(name)
    shards: list[list[str]] = []
    for layer in sorted(groups):
        current, size = [], 0
        for name in groups[layer]:
            nbytes = 2 * math.prod(tensors[name])
            if current and size + nbytes > SHARD_BYTES:
                shards.append(current)
                current, size = [], 0
            current.append(name)
            size += nbytes
        shards.append(current)
    return shards


def build_real_shape(out: Path, shape: str, layers: int = 1) -> Path:
    """A random bf16 safetensors model of `shape` with `layers` decoder layers at `out` (kept if already built).

    Written shard by shard (peak memory about one shard), into a temporary sibling renamed into place at the
    end, so a directory at `out` is always complete. Normal(0, 0.02) weights; norms are ones, biases zeros.
    """
    import torch
    from safetensors.torch import save_file
    from transformers import AutoTokenizer

    from vllm_moemix.checkpoint.writer import inspect_source

    out = Path(out)
    if (out / "config.json").exists():
        return out
    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER)
    config = shape_config(shape, layers, len(tokenizer))
    tensors = checkpoint_tensors(config)
    shards = _shards(tensors)
    tmp = out.with_name(f".{out.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    generator = torch.Generator().manual_seed(0)
    weight_map, total = {}, 0
    for i, names in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        shard = {}
        for name in names:
            if name.endswith("norm.weight"):
                shard[name] = torch.ones(tensors[name], dtype=torch.bfloat16)
            elif name.endswith(".bias"):
                shard[name] = torch.zeros(tensors[name], dtype=torch.bfloat16)
            else:
                shard[name] = torch.empty(tensors[name], dtype=torch.bfloat16).normal_(0.0, STD, generator=generator)
            weight_map[name] = fname
            total += shard[name].numel() * 2
        save_file(shard, tmp / fname, metadata={"format": "pt"})
        del shard
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=1) + "\n")
    tokenizer.save_pretrained(tmp)
    config.save_pretrained(tmp)
    inspect_source(tmp)  # every quantizable linear is there, at the shape the config implies
    shutil.rmtree(out, ignore_errors=True)
    os.rename(tmp, out)
    return out


# --- one measured run --------------------------------------------------------------------------------------------


def _tree_rss_psutil(pid: int) -> int:
    import psutil

    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return 0
    total = 0
    for proc in procs:
        try:
            total += proc.memory_info().rss
        except psutil.Error:  # exited between listing and reading
            pass
    return total


def _tree_rss_proc(pid: int) -> int:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])  # field 4, after the parenthesized command name
        children.setdefault(ppid, []).append(int(entry))
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        todo += children.get(p, [])
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
        except OSError:
            pass
    return total


def tree_rss(pid: int) -> int:
    """Resident bytes of a process and all its descendants (summed: shared pages count once per process)."""
    try:
        import psutil  # noqa: F401
    except ImportError:
        return _tree_rss_proc(pid)
    return _tree_rss_psutil(pid)


@dataclass
class Watch:
    peak_rss: int = 0
    samples: int = 0
    stopped: str | None = None  # why the watchdog killed the run


def _watchdog(pid: int, start: float, limit_bytes: int, timeout: float, watch: Watch, done: threading.Event):
    """Sample the tree's RSS every POLL_S, keep the max; kill the process group past the memory limit or timeout.

    Runs only while the child is unreaped (the caller waits with WNOWAIT and sets `done` before reaping), so
    the pid and process group cannot have been reused when it kills.
    """
    while True:
        rss = tree_rss(pid)
        watch.peak_rss, watch.samples = max(watch.peak_rss, rss), watch.samples + 1
        elapsed = time.monotonic() - start
        if rss > limit_bytes:
            watch.stopped = f"killed at {rss / GB:.2f} GB after {elapsed:.1f} s"
        elif elapsed > timeout:
            watch.stopped = f"timed out after {elapsed:.1f} s"
        if watch.stopped:
            try:
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            return
        if done.wait(POLL_S):
            return


def run_measured(argv: list[str], cwd: Path, env: dict, limit_bytes: int, timeout: float, log: Path) -> dict:
    """Run argv in its own session; wall seconds, peak RSS and how it ended. Output goes to log(.err)."""
    with open(log, "wb") as stdout, open(log.with_suffix(".err"), "wb") as stderr:
        start = time.monotonic()
        proc = subprocess.Popen(argv, cwd=cwd, env=env, stdout=stdout, stderr=stderr, start_new_session=True)
        watch, done = Watch(), threading.Event()
        thread = threading.Thread(target=_watchdog, args=(proc.pid, start, limit_bytes, timeout, watch, done))
        thread.start()
        os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOWAIT)  # exited, not yet reaped
        seconds = time.monotonic() - start
        done.set()
        thread.join()
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    maxrss = usage.ru_maxrss * 1024  # KiB on Linux: the child's own high-water mark (and its reaped children's)
    out = log.read_text(errors="replace")
    err = log.with_suffix(".err").read_text(errors="replace")
    if watch.stopped:
        status_text = watch.stopped
    elif proc.returncode:
        last = next((line for line in reversed(err.strip().splitlines()) if line.strip()), "")
        status_text = f"failed (exit {proc.returncode}): {last[:200]}"
    else:
        status_text = "ok"
    return {
        "status": status_text,
        "returncode": proc.returncode,
        "seconds": seconds,
        "peak_rss_bytes": max(watch.peak_rss, maxrss),
        "sampled_tree_rss_bytes": watch.peak_rss,
        "child_maxrss_bytes": maxrss,
        "rss_samples": watch.samples,
        "cli_estimates": [line.strip() for line in out.splitlines() if line.strip().startswith(("time:", "memory:"))],
        "stdout_tail": out[-1500:],
        "stderr_tail": err[-3000:] if status_text != "ok" else "",
    }


# --- modes, baseline, projection ---------------------------------------------------------------------------------


def uniform3_bytes(model: Path) -> int:
    """Bytes of uniform 3-bit group-128 over the quantizable linears (scales and zero points included)."""
    from transformers import AutoConfig

    from vllm_moemix.config.arch import quantizable_linears
    from vllm_moemix.config.footprint import footprint
    from vllm_moemix.config.plan import Plan

    linears = quantizable_linears(AutoConfig.from_pretrained(model))
    return footprint(Plan.uniform(3, 128).resolve(linears), linears).nbytes


def mode_args(mode: str, model: Path) -> list[str]:
    calib = ["--calib", str(CALIB)]
    if mode == "rtn":
        return ["--bits", "4"]
    if mode == "gptq":
        return ["--bits", "4", *calib]
    # A whole real model is too big for the Fisher pass and the held-out check (each needs the float model in
    # memory), so it plans with the layer-local estimate and no check; a one-layer model would fit both.
    whole_model = ["--error-model", "estimate", "--no-validate"]
    if mode == "budget-2.5":
        return ["--budget", "2.5", *calib, *whole_model]
    if mode == "budget-bytes":
        return ["--budget-bytes", str(uniform3_bytes(model)), *calib, *whole_model]
    raise ValueError(mode)


def known_flags(argv: list[str], cwd: Path, env: dict) -> list[str]:
    """`argv` without the flags (and their values) that the CLI in `cwd` does not know: a --baseline revision
    may predate them."""
    usage = subprocess.run(
        [sys.executable, "-m", "vllm_moemix.cli", "quantize", "--help"],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
    ).stdout
    out, skip = [], False
    for i, arg in enumerate(argv):
        if skip:
            skip = False
            continue
        if arg.startswith("--") and arg not in usage:
            skip = i + 1 < len(argv) and not argv[i + 1].startswith("-")
            continue
        out.append(arg)
    return out


def baseline_tree(rev: str, work: Path) -> Path:
    """A git worktree of `rev` under work (reused if present), checked to be what `import vllm_moemix` loads."""
    tree = work / f"baseline-{rev.replace('/', '_')}"
    if not (tree / "vllm_moemix").is_dir():
        subprocess.run(["git", "worktree", "add", "--detach", str(tree), rev], cwd=REPO, check=True)
    check = subprocess.run(
        [sys.executable, "-c", "import vllm_moemix, vllm_moemix.cli; print(vllm_moemix.__file__)"],
        cwd=tree,
        env=baseline_env(tree),
        capture_output=True,
        text=True,
        check=True,
    )
    loaded = Path(check.stdout.strip()).resolve()
    print(f"baseline {rev}: vllm_moemix from {loaded}")
    if not loaded.is_relative_to(tree.resolve()):
        raise SystemExit(f"baseline {rev}: `import vllm_moemix` loads {loaded}, not the worktree {tree}")
    return tree


def baseline_env(tree: Path) -> dict:
    pythonpath = os.pathsep.join(p for p in (str(tree), os.environ.get("PYTHONPATH", "")) if p)
    return dict(os.environ, PYTHONPATH=pythonpath, PYTHONUNBUFFERED="1")


def project(row: dict, layers: int, full_layers: int) -> None:
    """Per-layer seconds and the full-model projection (lower bounds when the run did not finish)."""
    row["per_layer_s"] = row["seconds"] / layers
    row["projected_full_h"] = row["per_layer_s"] * full_layers / 3600
    row["projection_is_lower_bound"] = row["status"] != "ok"


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown CPU"


def mem_total() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no MemTotal in /proc/meminfo")


# --- report ------------------------------------------------------------------------------------------------------


def markdown(meta: dict, rows: list[dict]) -> str:
    lines = [
        f"CPU: {meta['cpu']}, {meta['cores']} cores, {meta['mem_total_bytes'] / GB:.0f} GB RAM; {meta['date']}.",
        "",
        f"`moemix quantize` on random-weight models with {meta['layers']} decoder layer(s) of each shape, one fresh "
        "process per run. Per-layer seconds = wall seconds / layers, *including* process start-up and the "
        "non-layer tensors, so the full-model projection (per-layer x the model's layer count) is conservative. "
        "Peak RSS: the process tree, sampled every 0.2 s, or the child's own high-water mark if higher; "
        f"reported as measured (it should not grow with layers). Memory limit {meta['mem_limit_bytes'] / GB:.1f} "
        f"GB, timeout {meta['timeout_s']:.0f} s per run; `≥` marks runs that did not finish.",
        "",
        "| shape | mode | per-layer s | projected full model h | peak RSS GB | status | CLI estimates |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        bound = "≥ " if r["projection_is_lower_bound"] else ""
        lines.append(
            f"| {r['shape']} ({r['full_layers']} layers) | {r['mode']} | {bound}{r['per_layer_s']:.1f} "
            f"| {bound}{r['projected_full_h']:.2f} | {bound}{r['peak_rss_bytes'] / GB:.2f} | {r['status']} "
            f"| {'; '.join(r['cli_estimates']) or '-'} |"
        )
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes = list(dict.fromkeys(r["shape"] for r in rows))
    modes = list(dict.fromkeys(r["mode"] for r in rows))
    fig, axes = plt.subplots(1, 2, figsize=(max(8, 2.2 * len(shapes) * len(modes) ** 0.5 + 5), 4))
    width = 0.8 / len(modes)
    colors = plt.get_cmap("tab10")
    by = {(r["shape"], r["mode"]): r for r in rows}
    for ax, key, scale, title in (
        (axes[0], "per_layer_s", 1, "seconds per decoder layer"),
        (axes[1], "peak_rss_bytes", GB, "peak RSS (GB)"),
    ):
        for j, mode in enumerate(modes):
            for i, shape in enumerate(shapes):
                r = by.get((shape, mode))
                if r is None:
                    continue
                x, v = i + (j - (len(modes) - 1) / 2) * width, r[key] / scale
                ok = r["status"] == "ok"
                ax.bar(x, v, width, color=colors(j % 10), label=mode if i == 0 else None, hatch=None if ok else "//")
                mark = "" if ok else "\n" + r["status"].split(" ")[0].split("(")[0]  # killed / timed / failed
                ax.text(x, v, f"{v:.{1 if scale == 1 else 2}f}{mark}", ha="center", va="bottom", fontsize=7)
        ax.set_xticks(range(len(shapes)), shapes)
        ax.set_title(title)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", choices=sorted(SHAPES), default=list(REAL_SHAPES))
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--layers", type=int, default=1, help="decoder layers of the measured models")
    parser.add_argument("--quick", action="store_true", help="the tiny 'quick' shape, --calib-samples 4")
    parser.add_argument("--baseline", metavar="REV", help="also run every mode with the code of git revision REV")
    parser.add_argument("--extra-args", default="", help="appended to every quantize command, e.g. '--device cpu'")
    parser.add_argument("--mem-limit-gb", type=float, default=None, help="kill a run above this (default 90%% RAM)")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per run")
    parser.add_argument("--work", default=str(REPO / "runs" / "scale"), help="models, baseline worktree, outputs")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    parser.add_argument("--append", action="store_true", help="keep the rows of <out>/scale.json not measured now")
    args = parser.parse_args()
    extra = args.extra_args.split()
    if args.quick:
        args.shapes = ["quick"]
        extra = ["--calib-samples", "4", *extra]
    limit = int(args.mem_limit_gb * GB) if args.mem_limit_gb else int(0.9 * mem_total())
    work, out = Path(args.work), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    logs = work / "logs"
    logs.mkdir(parents=True, exist_ok=True)

    # (revision, cwd, environment); unbuffered so a killed run's `time:`/`memory:` lines are still in its log
    trees = [("", REPO, dict(os.environ, PYTHONUNBUFFERED="1"))]
    if args.baseline:
        tree = baseline_tree(args.baseline, work)
        trees.append((args.baseline, tree, baseline_env(tree)))

    meta = {
        "cpu": cpu_name(),
        "cores": os.cpu_count(),
        "mem_total_bytes": mem_total(),
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "layers": args.layers,
        "mem_limit_bytes": limit,
        "timeout_s": args.timeout,
        "baseline": args.baseline,
        "shapes": {s: {"full_layers": SHAPES[s].full_layers, **SHAPES[s].config} for s in args.shapes},
    }
    rows = []
    if args.append and (out / "scale.json").exists():  # rows of earlier runs stay unless measured again
        earlier = json.loads((out / "scale.json").read_text())
        rows = earlier["rows"]
        meta["shapes"] = {**earlier.get("shapes", {}), **meta["shapes"]}
    for shape in args.shapes:
        print(f"building {shape} with {args.layers} layer(s) under {work / 'models'}", flush=True)
        model = build_real_shape(work / "models" / f"{shape}-L{args.layers}", shape, args.layers).resolve()
        for mode in args.modes:
            margs = mode_args(mode, model)
            for rev, cwd, env in trees:
                label, name = (f" ({rev})", f"{shape}-{mode}-{rev}") if rev else ("", f"{shape}-{mode}")
                target = work / "out" / name
                shutil.rmtree(target, ignore_errors=True)
                argv = [sys.executable, "-m", "vllm_moemix.cli", "quantize", str(model), *margs]
                argv += ["-o", str(target), *extra]  # not --quiet: the CLI's `memory:` and `time:` lines
                if rev:
                    argv = known_flags(argv, cwd, env)
                print(f"{shape} {mode}{label}: {' '.join(argv[1:])}", flush=True)
                log = logs / f"{name}.log"
                row = run_measured(argv, cwd, env, limit, args.timeout, log)
                shutil.rmtree(target, ignore_errors=True)
                row.update(shape=shape, mode=mode + label, full_layers=SHAPES[shape].full_layers, argv=argv[1:])
                project(row, args.layers, SHAPES[shape].full_layers)
                print(
                    f"  {row['status']}: {row['seconds']:.1f} s, peak RSS {row['peak_rss_bytes'] / GB:.2f} GB",
                    flush=True,
                )
                rows = [r for r in rows if (r["shape"], r["mode"]) != (shape, row["mode"])] + [row]
                write_results(meta, rows, out)  # after every run: a long benchmark stopped early keeps its rows
    print(markdown(meta, rows))
    print(f"CPU: {meta['cpu']}")


def write_results(meta: dict, rows: list[dict], out: Path) -> None:
    (out / "scale.md").write_text(markdown(meta, rows) + "\n")
    (out / "scale.json").write_text(json.dumps({**meta, "rows": rows}, indent=1) + "\n")
    plot(rows, out / "scale.png")


if __name__ == "__main__":
    main()
