"""Bounded, headless Locust runs against an OpenAI-compatible server, with a JSON summary and plots.

    python -m loadtests.run --host http://127.0.0.1:8000 --users 1,4,8 --spawn-rate 8 --run-time 30s \
        --max-requests 200 --out runs/loadtest [--slo ttft=0.5 --slo tpot=0.05] [--compare MODEL_A MODEL_B]

One Locust run per (model group, concurrency level): `--users 1,4,8` sweeps concurrency (closed loop: each user
sends its next request when the previous one ended), `--compare A B` runs the same workload against model A,
then model B, on the same server. Every run is bounded by --run-time and --max-requests, and the runner kills a
Locust process that outlives its run by a minute. Only loopback hosts are accepted unless --allow-remote.

Writes to --out:
    <tag>_stats.csv, <tag>_stats_history.csv, <tag>_failures.csv, <tag>_exceptions.csv, <tag>.html   Locust's own
    <tag>.records.jsonl      one line per request (loadtests.metrics.RequestRecord)
    <tag>.locust.log         Locust's console output
    summary.json             per run: throughputs, TTFT/TPOT/ITL/E2E mean/std/p50/p90/p99 (ms), goodput under the
                             SLOs, errors, and the server's own counter deltas (vllm:request_success_total,
                             vllm:generation_tokens_total, vllm:prompt_tokens_total) per model when /metrics is up
    latency_vs_concurrency.png, throughput_vs_concurrency.png, and compare.png with --compare
Exit status: 0 when every request succeeded, 1 when some failed (or a Locust run broke), 2 on bad arguments.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from loadtests.metrics import DEFAULT_PERCENTILES, Distribution, parse_mix, parse_slo, read_records, summarize

REPO = Path(__file__).resolve().parents[1]
LOCUSTFILE = Path(__file__).resolve().parent / "locustfile.py"
MAX_USERS = 1024
MAX_RUN_TIME_S = 24 * 3600
SERVER_COUNTERS = ("vllm:request_success_total", "vllm:generation_tokens_total", "vllm:prompt_tokens_total")


class UsageError(ValueError):
    pass


# ------------------------------------------------------------------------------------------- arguments


def parse_timespan(text: str) -> float:
    """`30s`, `2m`, `1h30m`, `90` (seconds) -> seconds."""
    text = str(text).strip().lower()
    if re.fullmatch(r"\d+(\.\d+)?", text):
        return float(text)
    m = re.fullmatch(r"(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?", text)
    if not text or not m or not any(m.groups()):
        raise UsageError(f"time span {text!r}: expected e.g. 30s, 2m, 1h30m or seconds")
    h, mi, s = (int(g or 0) for g in m.groups())
    return float(h * 3600 + mi * 60 + s)


def parse_users(text: str) -> list[int]:
    try:
        levels = [int(x) for x in str(text).split(",") if x.strip()]
    except ValueError as e:
        raise UsageError(f"--users {text!r}: expected N or N1,N2,...") from e
    if not levels or min(levels) < 1 or max(levels) > MAX_USERS:
        raise UsageError(f"--users {text!r}: each level must be 1..{MAX_USERS}")
    return sorted(set(levels))


def is_loopback_url(url: str) -> bool:
    """True when every address the URL's host resolves to is a loopback address (127.0.0.0/8, ::1)."""
    host = urlparse(url).hostname
    if not host:
        return False
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None)
    except OSError:
        return False
    addrs = {info[4][0].split("%")[0] for info in infos}
    return bool(addrs) and all(ipaddress.ip_address(a).is_loopback for a in addrs)


def check_host(url: str, allow_remote: bool) -> str:
    parsed = urlparse(url)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise UsageError(f"--host {url!r}: expected http(s)://HOST:PORT")
    if not allow_remote and not is_loopback_url(url):
        raise UsageError(
            f"--host {url!r} is not a loopback address; load tests only target this machine "
            "unless --allow-remote is given (and you own that server)"
        )
    return url.rstrip("/")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m loadtests.run",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--host", required=True, help="server base URL, e.g. http://127.0.0.1:8000")
    p.add_argument("--users", default="4", help="concurrent users; a comma list sweeps concurrency (default 4)")
    p.add_argument("--spawn-rate", type=float, default=None, help="users started per second (default: all at once)")
    p.add_argument("--run-time", default="30s", help="per run, e.g. 30s, 2m (default 30s)")
    p.add_argument("--max-requests", type=int, default=500, help="per run, stop after this many requests (default 500)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument(
        "--slo",
        action="append",
        default=[],
        metavar="KEY=SECONDS",
        help="goodput SLO: ttft=0.5, tpot=0.05, e2el=10 (repeatable)",
    )
    g = p.add_mutually_exclusive_group()
    g.add_argument("--model", default="", help="model name(s), comma-separated (default: the server's first)")
    g.add_argument(
        "--compare",
        nargs=2,
        metavar=("MODEL_A", "MODEL_B"),
        help="run the same workload against two models of the server, plot them side by side",
    )
    p.add_argument(
        "--mix",
        default="completion_stream=1,chat_stream=1",
        help="request kinds and weights: completion, completion_stream, chat, chat_stream",
    )
    p.add_argument(
        "--prompt-len",
        default="uniform:8:32",
        help="prompt length in words: N, uniform:LO:HI, normal:MEAN:STD, choice:A,B (default uniform:8:32)",
    )
    p.add_argument("--output-len", default="uniform:16:48", help="max_tokens distribution (default uniform:16:48)")
    p.add_argument("--prompt-file", default="", help="text to cut prompts from (default models/heldout.txt)")
    p.add_argument("--no-ignore-eos", action="store_true", help="let outputs stop at EOS (default: exact lengths)")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--api-key", default=os.environ.get("MOEMIX_API_KEY", ""), help="Bearer token (env MOEMIX_API_KEY)")
    p.add_argument("--think-time", type=float, default=0.0, help="seconds between a user's requests (default 0)")
    p.add_argument(
        "--stop-timeout",
        default="60s",
        help="at the end of --run-time, how long in-flight requests may finish (default 60s)",
    )
    p.add_argument("--percentiles", default=",".join(map(str, DEFAULT_PERCENTILES)), help="default 50,90,99")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--allow-remote", action="store_true", help="allow a non-loopback --host")
    p.add_argument("--allow-failures", action="store_true", help="exit 0 even when requests failed")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--no-server-metrics", action="store_true", help="do not read the server's /metrics")
    return p


# ------------------------------------------------------------------------------------------- server metrics


def scrape_counters(host: str, headers: dict[str, str] | None = None) -> dict[str, dict[str, float]] | None:
    """{counter: {model_name: value summed over other labels}} from the server's /metrics, or None."""
    import urllib.request

    try:
        from prometheus_client.parser import text_string_to_metric_families
    except ImportError:
        return None
    try:
        req = urllib.request.Request(host + "/metrics", headers=headers or {})
        with urllib.request.urlopen(req, timeout=10) as r:  # noqa: S310  (host checked by check_host)
            text = r.read().decode("utf-8", "replace")
    except OSError:
        return None
    out: dict[str, dict[str, float]] = {name: {} for name in SERVER_COUNTERS}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name in out:
                model = s.labels.get("model_name", "")
                out[s.name][model] = out[s.name].get(model, 0.0) + s.value
    return out


def counter_delta(before, after, model: str) -> dict[str, float] | None:
    if not before or not after:
        return None
    short = {
        "vllm:request_success_total": "requests_finished",
        "vllm:generation_tokens_total": "generation_tokens",
        "vllm:prompt_tokens_total": "prompt_tokens",
    }
    return {short[name]: after[name].get(model, 0.0) - before[name].get(model, 0.0) for name in SERVER_COUNTERS}


# ------------------------------------------------------------------------------------------- one run


def locust_command(args, host: str, users: int, models: list[str], tag: str, out: Path) -> list[str]:
    spawn = args.spawn_rate if args.spawn_rate else users
    cmd = [
        sys.executable,
        "-m",
        "locust",
        "-f",
        str(LOCUSTFILE),
        "--headless",
        "--host",
        host,
        "-u",
        str(users),
        "-r",
        str(spawn),
        "-t",
        f"{int(parse_timespan(args.run_time))}s",
        "--stop-timeout",
        f"{int(parse_timespan(args.stop_timeout))}s",
        "--csv",
        str(out / tag),
        "--csv-full-history",
        "--html",
        str(out / f"{tag}.html"),
        "--only-summary",
        "--exit-code-on-error",
        "0",
        "--loglevel",
        "WARNING",
        "--moemix-mix",
        args.mix,
        "--moemix-prompt-len",
        args.prompt_len,
        "--moemix-output-len",
        args.output_len,
        "--moemix-ignore-eos",
        "false" if args.no_ignore_eos else "true",
        "--moemix-temperature",
        str(args.temperature),
        "--moemix-max-requests",
        str(args.max_requests),
        "--moemix-records",
        str(out / f"{tag}.records.jsonl"),
        "--moemix-seed",
        str(args.seed),
        "--moemix-think-time",
        str(args.think_time),
    ]
    if models:
        cmd += ["--moemix-models", ",".join(models)]
    if args.prompt_file:
        cmd += ["--moemix-prompt-file", args.prompt_file]
    return cmd


def run_locust(cmd: list[str], log: Path, wall_timeout: float, api_key: str) -> int:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    env.pop("LOCUST_HOST", None)
    if api_key:
        env["MOEMIX_LT_API_KEY"] = api_key  # not on the command line (ps would show it)
    # Not in a new session (start_new_session): on Linux that puts Locust in its own scheduler autogroup, and on
    # a busy machine it then reads streams late, turning token-by-token streams into bursts (measured here).
    with open(log, "wb") as f:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT)
        try:
            return proc.wait(timeout=wall_timeout)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGTERM)  # Locust writes its reports on SIGTERM
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            return -9


def first_model(host: str, headers: dict[str, str]) -> str:
    import urllib.request

    req = urllib.request.Request(host + "/v1/models", headers=headers)
    with urllib.request.urlopen(req, timeout=30) as r:  # noqa: S310
        return json.load(r)["data"][0]["id"]


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_")[:60] or "model"


def run(args) -> dict[str, Any]:
    host = check_host(args.host, args.allow_remote)
    levels = parse_users(args.users)
    run_time = parse_timespan(args.run_time)
    stop_timeout = parse_timespan(args.stop_timeout)
    if not 0 < run_time <= MAX_RUN_TIME_S:
        raise UsageError(f"--run-time must be within (0, {MAX_RUN_TIME_S}] s")
    if args.max_requests < 1:
        raise UsageError("--max-requests must be >= 1 (every run is bounded)")
    slos = dict(parse_slo(s) for s in args.slo)
    percentiles = tuple(float(x) for x in args.percentiles.split(",") if x.strip())
    Distribution.parse(args.prompt_len)
    Distribution.parse(args.output_len)
    parse_mix(args.mix)
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.compare and args.compare[0] == args.compare[1]:
        raise UsageError("--compare needs two different model names")
    if args.compare:
        groups = [[args.compare[0]], [args.compare[1]]]
    else:
        models = [m.strip() for m in args.model.split(",") if m.strip()]
        groups = [models or [first_model(host, headers)]]

    runs = []
    broken = []
    for models in groups:
        for users in levels:
            tag = f"{_slug('+'.join(models))}_u{users}"
            records_path = out / f"{tag}.records.jsonl"
            records_path.unlink(missing_ok=True)
            before = None if args.no_server_metrics else scrape_counters(host, headers)
            cmd = locust_command(args, host, users, models, tag, out)
            t0 = time.monotonic()
            rc = run_locust(cmd, out / f"{tag}.locust.log", run_time + stop_timeout + 60, args.api_key)
            wall = time.monotonic() - t0
            after = None if args.no_server_metrics else scrape_counters(host, headers)
            records = read_records(records_path) if records_path.exists() else []
            summary = summarize(records, slos, percentiles)
            if rc != 0 or not records:
                broken.append(f"{tag}: locust exit {rc}, {len(records)} records (see {tag}.locust.log)")
            entry = {
                "tag": tag,
                "models": models,
                "users": users,
                "locust_exit": rc,
                "wall_s": wall,
                "summary": summary,
                "server": {m: counter_delta(before, after, m) for m in models},
            }
            runs.append(entry)
            print(_one_line(entry), flush=True)

    result: dict[str, Any] = {
        "host": host,
        "config": {
            "users": levels,
            "spawn_rate": args.spawn_rate,
            "run_time_s": run_time,
            "max_requests": args.max_requests,
            "mix": parse_mix(args.mix),
            "prompt_len": args.prompt_len,
            "output_len": args.output_len,
            "ignore_eos": not args.no_ignore_eos,
            "temperature": args.temperature,
            "think_time_s": args.think_time,
            "seed": args.seed,
            "percentiles": list(percentiles),
        },
        "slos_s": slos,
        "compare": list(args.compare) if args.compare else None,
        "runs": runs,
        "broken_runs": broken,
        "totals": {
            "requests": sum(r["summary"]["requests"] for r in runs),
            "failed": sum(r["summary"]["failed"] for r in runs),
        },
    }
    if args.compare:
        result["comparison"] = comparison(runs, args.compare)
    (out / "summary.json").write_text(json.dumps(result, indent=2))
    if not args.no_plots:
        result["plots"] = [str(p) for p in plot(result, out)]
    return result


def comparison(runs: list[dict], models: list[str]) -> list[dict]:
    """Per concurrency level: B relative to A for throughput and median latencies (ratio B/A)."""
    by = {(r["models"][0], r["users"]): r["summary"] for r in runs}
    out = []
    for users in sorted({r["users"] for r in runs}):
        a, b = by.get((models[0], users)), by.get((models[1], users))
        if not a or not b:
            continue
        row = {"users": users}
        for key, path in (
            ("output_throughput", ("output_throughput",)),
            ("request_throughput", ("request_throughput",)),
            ("ttft_p50", ("ttft_ms", "p50")),
            ("tpot_p50", ("tpot_ms", "p50")),
            ("e2el_p50", ("e2el_ms", "p50")),
        ):
            va, vb = _get(a, path), _get(b, path)
            row[f"{key}_ratio_b_over_a"] = (vb / va) if va and vb is not None else None
        out.append(row)
    return out


def _get(d: dict, path: tuple[str, ...]):
    for k in path:
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d


def _one_line(entry: dict) -> str:
    s = entry["summary"]

    def ms(key):
        v = s[key].get("p50")
        return "-" if v is None else f"{v:.1f}"

    good = f", goodput {s['goodput']:.2f} req/s ({s['goodput_fraction']:.0%})" if s["slos_s"] else ""
    return (
        f"[{entry['tag']}] {s['completed']} ok / {s['failed']} failed in {s['duration_s']:.1f} s: "
        f"{s['request_throughput']:.2f} req/s, {s['output_throughput']:.1f} output tok/s; "
        f"p50 TTFT {ms('ttft_ms')} ms, "
        f"TPOT {ms('tpot_ms')} ms, ITL {ms('itl_ms')} ms, E2E {ms('e2el_ms')} ms{good}"
    )


# ------------------------------------------------------------------------------------------- plots


def _save(fig, title: str, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot(result: dict, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = result["runs"]
    groups: dict[str, list[dict]] = {}
    for r in runs:
        groups.setdefault("+".join(r["models"]), []).append(r)
    for rs in groups.values():
        rs.sort(key=lambda r: r["users"])
    pcts = [f"p{int(p) if float(p).is_integer() else p}" for p in result["config"]["percentiles"]]
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    styles = ["-", "--", ":", "-."]
    written = []

    metrics = [("ttft_ms", "TTFT"), ("tpot_ms", "TPOT"), ("itl_ms", "ITL"), ("e2el_ms", "E2E latency")]
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 3.8), squeeze=False)
    for ax, (key, title) in zip(axes[0], metrics):
        for gi, (name, rs) in enumerate(groups.items()):
            xs = [r["users"] for r in rs]
            for pi, p in enumerate(pcts):
                ys = [r["summary"][key].get(p) for r in rs]
                if any(y is not None for y in ys):
                    ax.plot(
                        xs,
                        [float("nan") if y is None else y for y in ys],
                        marker="o",
                        color=colors[gi % len(colors)],
                        linestyle=styles[pi % len(styles)],
                        label=f"{name} {p}",
                    )
        ax.set_xticks(sorted({r["users"] for r in runs}))
        ax.set_title(title)
        ax.set_xlabel("concurrent users")
        ax.set_ylabel("ms")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    written.append(_save(fig, "Latency percentiles vs concurrency", out / "latency_vs_concurrency.png"))

    tput = [("output_throughput", "output tokens/s"), ("request_throughput", "requests/s")]
    if result["slos_s"]:
        tput.append(("goodput", "goodput (requests/s within SLOs)"))
    fig, axes = plt.subplots(1, len(tput), figsize=(4.5 * len(tput), 3.8), squeeze=False)
    for ax, (key, title) in zip(axes[0], tput):
        for gi, (name, rs) in enumerate(groups.items()):
            ax.plot(
                [r["users"] for r in rs],
                [r["summary"][key] for r in rs],
                marker="o",
                color=colors[gi % len(colors)],
                label=name,
            )
        ax.set_xticks(sorted({r["users"] for r in runs}))
        ax.set_title(title)
        ax.set_xlabel("concurrent users")
        ax.grid(alpha=0.3)
        ax.set_ylim(bottom=0)
    axes[0][0].legend(fontsize=8)
    written.append(_save(fig, "Throughput vs concurrency", out / "throughput_vs_concurrency.png"))

    if result.get("compare"):
        a, b = result["compare"]
        levels = sorted({r["users"] for r in runs})
        by = {(r["models"][0], r["users"]): r["summary"] for r in runs}
        panels = [
            (("output_throughput",), "output tokens/s"),
            (("request_throughput",), "requests/s"),
            (("ttft_ms", "p50"), "TTFT p50 (ms)"),
            (("ttft_ms", "p99"), "TTFT p99 (ms)"),
            (("tpot_ms", "p50"), "TPOT p50 (ms)"),
            (("e2el_ms", "p99"), "E2E p99 (ms)"),
        ]
        fig, axes = plt.subplots(2, 3, figsize=(13, 7))
        width = 0.38
        for ax, (path, title) in zip(axes.flat, panels):
            for mi, model in enumerate((a, b)):
                ys = [_get(by.get((model, u), {}), path) for u in levels]
                xs = [i + (mi - 0.5) * width for i in range(len(levels))]
                ax.bar(xs, [0 if y is None else y for y in ys], width=width, color=colors[mi], label=model)
            ax.set_xticks(range(len(levels)), [str(u) for u in levels])
            ax.set_xlabel("concurrent users")
            ax.set_title(title)
            ax.grid(axis="y", alpha=0.3)
        axes[0][0].legend(fontsize=8)
        written.append(_save(fig, f"{a} vs {b} (same workload, same server)", out / "compare.png"))
    return written


# ------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result = run(args)
    except (UsageError, ValueError) as e:
        print(f"loadtests.run: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {Path(args.out) / 'summary.json'}")
    for line in result["broken_runs"]:
        print(f"broken run: {line}", file=sys.stderr)
    if result["broken_runs"] or (result["totals"]["failed"] and not args.allow_failures):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
