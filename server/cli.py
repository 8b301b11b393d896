"""`moemix serve MODEL [MODEL ...] --host H --port P [--config server.yaml] [--api-key-file F] [--max-queue N] ...`.

`add_serve_parser(subparsers)` registers the subcommand on the `moemix` parser (handler in `func`);
`python -m server serve ...` runs the same thing standalone.

Start-up: read settings (fail fast on mistakes, and on a non-loopback host without an API key), bind the port
(fail fast if taken), start every model's engine, then serve. SIGTERM/SIGINT: stop accepting, let in-flight
requests finish (up to --drain-timeout), then stop the engines; exit status 0. An engine that dies (with
--on-engine-death exit, the default): the same drain, then exit status 3 (server.app.ENGINE_DEATH_EXIT_CODE).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import signal
import socket
import sys

from server.settings import ServerSettings, SettingsError, build_settings, is_loopback

logger = logging.getLogger("moemix.server")
CONCURRENCY_HEADROOM = 256  # connections beyond the admitted requests: probes, scrapes, 429s, idle keep-alives


def _json_dict(value: str) -> dict:
    try:
        parsed = json.loads(value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"not JSON: {e}") from e
    if not isinstance(parsed, dict):
        raise argparse.ArgumentTypeError("expected a JSON object")
    return parsed


def add_serve_parser(subparsers) -> argparse.ArgumentParser:
    """Register `serve` on an argparse subparsers object; sets `func=cmd_serve`."""
    p = subparsers.add_parser(
        "serve",
        help="OpenAI-compatible server for one or more models (moemix or plain checkpoints)",
        description="Serve models through vLLM with an OpenAI-compatible API: /v1/completions, "
        "/v1/chat/completions, /v1/models, /tokenize, /health, /metrics, /version. "
        "Requests pick the model by their `model` field.",
    )
    p.add_argument(
        "models",
        nargs="*",
        metavar="MODEL",
        help="model directory, served under that path, or NAME=PATH (also: `models:` in --config)",
    )
    p.add_argument("--host", default=None, help="bind address (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=None, help="port (default 8000)")
    p.add_argument("--config", default=None, help="server YAML: models, per-model vLLM options, limits")
    key = p.add_mutually_exclusive_group()
    key.add_argument(
        "--api-key-file",
        default=None,
        metavar="PATH",
        help="require `Authorization: Bearer KEY` on every path but /health, /ready, /metrics, /version and "
        "the API docs (those too with --auth-metrics), KEY read from this file (or env MOEMIX_API_KEY). "
        "Needed on any host but loopback",
    )
    key.add_argument(
        "--api-key", default=None, help="the key itself (visible to local users in `ps`: prefer --api-key-file)"
    )
    p.add_argument(
        "--insecure-no-auth",
        action="store_true",
        default=None,
        help="serve a non-loopback host without an API key (refused otherwise)",
    )
    p.add_argument(
        "--auth-metrics",
        action="store_true",
        default=None,
        help="put /metrics, /version, /openapi.json, /docs and /redoc behind the API key too (the probes "
        "/health and /ready stay open); default: open, for scrapers",
    )
    p.add_argument(
        "--on-engine-death",
        choices=["exit", "stay"],
        default=None,
        help="when a model's engine dies: exit (default: log it, stop accepting, let the other models' "
        "in-flight requests finish up to --drain-timeout, exit with status 3 so a supervisor restarts the "
        "server) or stay (keep serving the other models; 503 for that one)",
    )
    p.add_argument(
        "--keep-alive",
        dest="keep_alive_s",
        type=float,
        default=None,
        help="seconds an idle keep-alive connection stays open (default 75: longer than the idle timeouts of "
        "proxies and client pools, so the client side closes idle connections, never mid-request)",
    )
    p.add_argument(
        "--max-queue",
        type=int,
        default=None,
        help="per model, sequences allowed to wait beyond the engine batch (max_num_seqs); past it "
        "429 with Retry-After (default: max_num_seqs)",
    )
    p.add_argument(
        "--limit-concurrency",
        type=int,
        default=None,
        help="uvicorn's bound on connections and tasks; past it 503 (default: the sum of the models' "
        f"admission limits + {CONCURRENCY_HEADROOM})",
    )
    p.add_argument(
        "--routing-refresh",
        dest="routing_refresh_s",
        type=float,
        default=None,
        help="seconds between gatherings of expert-routing counts from the workers (default 5)",
    )
    p.add_argument(
        "--sse-keep-alive",
        dest="sse_keep_alive_s",
        type=float,
        default=None,
        help="seconds a stream may stay silent (queued, long prefill) before an SSE comment "
        "`: keep-alive` is sent, so proxies keep the connection; 0 never (default 15)",
    )
    p.add_argument(
        "--metrics-max-age",
        dest="metrics_max_age_s",
        type=float,
        default=None,
        help="seconds a rendered /metrics body is served again before it is rendered anew, so a "
        "scrape flood cannot slow generation; 0 renders every scrape (default 1)",
    )
    p.add_argument(
        "--metrics-scrapes-per-s",
        dest="metrics_scrapes_per_s",
        type=float,
        default=None,
        help="/metrics answers at most this many scrapes a second, the others wait their turn (idle), "
        "so a flood cannot take CPU from generation; 0 no bound (default 20)",
    )
    p.add_argument(
        "--retry-after", dest="retry_after_s", type=int, default=None, help="Retry-After seconds on 429 (default 1)"
    )
    p.add_argument(
        "--drain-timeout",
        dest="drain_timeout_s",
        type=float,
        default=None,
        help="on SIGTERM, seconds in-flight requests may take to finish (default 30)",
    )
    p.add_argument("--max-model-len", type=int, default=None, help="vLLM max_model_len for every model")
    p.add_argument("--max-num-seqs", type=int, default=None, help="vLLM max_num_seqs (batch) for every model")
    p.add_argument("--dtype", default=None, help="vLLM dtype for every model (auto, bfloat16, float32, ...)")
    p.add_argument("--enforce-eager", action="store_true", default=None, help="no torch.compile / CUDA graphs")
    p.add_argument(
        "--vllm-args",
        type=_json_dict,
        default=None,
        help="any other `vllm serve` options for every model, as JSON: '{\"seed\": 0}'",
    )
    p.add_argument("--log-level", default=None, choices=["debug", "info", "warning", "error"])
    p.set_defaults(func=cmd_serve)
    return p


def settings_from_args(args: argparse.Namespace) -> ServerSettings:
    overrides = dict(args.vllm_args or {})
    for key in ("max_model_len", "max_num_seqs", "dtype", "enforce_eager"):
        if getattr(args, key) is not None:
            overrides[key] = getattr(args, key)
    return build_settings(
        args.models,
        args.config,
        host=args.host,
        port=args.port,
        api_key=args.api_key,
        api_key_file=args.api_key_file,
        insecure_no_auth=args.insecure_no_auth,
        max_queue=args.max_queue,
        retry_after_s=args.retry_after_s,
        drain_timeout_s=args.drain_timeout_s,
        on_engine_death=args.on_engine_death,
        keep_alive_s=args.keep_alive_s,
        auth_metrics=args.auth_metrics,
        limit_concurrency=args.limit_concurrency,
        routing_refresh_s=args.routing_refresh_s,
        sse_keep_alive_s=args.sse_keep_alive_s,
        metrics_max_age_s=args.metrics_max_age_s,
        metrics_scrapes_per_s=args.metrics_scrapes_per_s,
        log_level=args.log_level,
        override_vllm_args=overrides or None,
    )


def startup_warnings(args: argparse.Namespace, settings: ServerSettings) -> list[str]:
    """What the operator should know before the first request (logged as warnings)."""
    out = []
    if args.api_key:
        out.append(
            "--api-key puts the key on the command line, where every local user sees it (`ps`); "
            "prefer --api-key-file or env MOEMIX_API_KEY"
        )
    if settings.api_key is None and not is_loopback(settings.host):
        out.append(
            f"NO AUTHENTICATION (--insecure-no-auth): anyone who can reach {settings.host}:{settings.port} "
            f"can use every model"
        )
    return out


def uvicorn_config(app, settings: ServerSettings, pool):
    import uvicorn

    from server.connection import http_protocol

    limit = settings.limit_concurrency or sum(e.gate.limit for e in pool.engines.values()) + CONCURRENCY_HEADROOM
    return uvicorn.Config(
        app,
        log_level=settings.log_level,
        http=http_protocol(),
        timeout_graceful_shutdown=settings.drain_timeout_s,
        timeout_keep_alive=settings.keep_alive_s,
        limit_concurrency=limit,
        access_log=settings.log_level == "debug",
    )


def run_event_loop(main):
    """Run `main` on uvloop's loop where installed (as uvicorn and vLLM's own server do), else asyncio's: under load
    the event loop is what every request, token and probe waits for, and uvloop's transports cost a fraction."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    return uvloop.run(main)


def freeze_start_up_heap() -> None:
    """Move everything start-up allocated (torch, transformers, vLLM: ~700k objects) out of the garbage
    collector's sight, as vLLM's own server does. Otherwise each full collection under load walks them all: a
    pause of ~0.25 s on an idle core (seconds on a busy one) in which nothing is answered, /health included."""
    from vllm.utils.gc_utils import freeze_gc_heap

    freeze_gc_heap()


def bind_socket(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise SettingsError(f"cannot bind {host}:{port}: {e.strerror}") from e
    sock.set_inheritable(True)
    return sock


async def serve(settings: ServerSettings, sock: socket.socket | None = None) -> int:
    """Serve until SIGTERM/SIGINT (returns 0) or, with on_engine_death=exit, an engine died (returns 3)."""
    import uvicorn

    from server.app import build_app
    from server.engine import start_pool

    sock = sock or bind_socket(settings.host, settings.port)
    pool = await start_pool(settings)
    try:
        app = build_app(pool, settings)
        config = uvicorn_config(app, settings, pool)
        server = uvicorn.Server(config)
        app.state.request_shutdown = lambda: setattr(server, "should_exit", True)
        freeze_start_up_heap()
        host, port = sock.getsockname()[:2]
        logger.info(
            "serving %s on http://%s:%d (at most %d concurrent connections)",
            ", ".join(pool.engines),
            host,
            port,
            config.limit_concurrency,
        )
        await server.serve(sockets=[sock])
        return app.state.exit_code
    finally:
        pool.shutdown()  # idempotent with the lifespan's; covers a failure before uvicorn started
        sock.close()


ENGINE_EXIT_TIMEOUT_S = 10  # after an interrupted start-up, engine processes still there this long are killed


def _engine_processes() -> list:
    """Our descendants but multiprocessing's resource tracker (it must outlive the engines to clean up after
    them): the engine-core processes and their workers."""
    import multiprocessing.resource_tracker

    import psutil

    tracker = getattr(multiprocessing.resource_tracker._resource_tracker, "_pid", None)
    try:
        return [p for p in psutil.Process().children(recursive=True) if p.pid != tracker]
    except psutil.Error:
        return []


def _interrupt_start_up(*_):
    """SIGTERM/SIGINT before serving: an engine constructor blocks until its engine core is up (tens of seconds)
    and cannot be cancelled, and an engine core that is still initializing only notes a SIGTERM for later. Nothing
    is in flight yet, so kill the engine processes (workers included, before they lose their parent): the
    constructors then fail at once."""
    for proc in _engine_processes():
        with contextlib.suppress(Exception):
            proc.kill()
    raise KeyboardInterrupt("terminated")


def _reap_engine_processes() -> None:
    """No engine process outlives the server, however start-up or shutdown ended."""
    import psutil

    _, alive = psutil.wait_procs(_engine_processes(), timeout=ENGINE_EXIT_TIMEOUT_S)
    for proc in alive:
        logger.warning("killing engine process %d, still running %d s after stop", proc.pid, ENGINE_EXIT_TIMEOUT_S)
        with contextlib.suppress(psutil.Error):
            proc.kill()


def cmd_serve(args: argparse.Namespace) -> None:
    try:
        settings = settings_from_args(args)
        sock = bind_socket(settings.host, settings.port)
    except SettingsError as e:
        print(f"moemix serve: error: {e}", file=sys.stderr)
        raise SystemExit(2) from e
    logging.basicConfig(level=settings.log_level.upper(), format="%(levelname)s %(asctime)s %(name)s: %(message)s")
    for warning in startup_warnings(args, settings):
        logger.warning(warning)
    # Until uvicorn installs its own handlers (and after it restores these), a signal stops start-up at once.
    signal.signal(signal.SIGTERM, _interrupt_start_up)
    signal.signal(signal.SIGINT, _interrupt_start_up)
    code = 0
    try:
        code = run_event_loop(serve(settings, sock))
    except KeyboardInterrupt:
        pass
    except SettingsError as e:
        print(f"moemix serve: error: {e}", file=sys.stderr)
        raise SystemExit(2) from e
    finally:
        _reap_engine_processes()
    if code:
        raise SystemExit(code)  # the reason was logged when the engine died (server.app.engine_died)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m server")
    sub = parser.add_subparsers(dest="command", required=True)
    add_serve_parser(sub)
    args = parser.parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
