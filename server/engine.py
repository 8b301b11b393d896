"""The only module that builds vLLM objects: one AsyncLLM per served model, plus vLLM's own OpenAI serving
classes (OpenAIServingCompletion, OpenAIServingChat, ServingTokenization, ...) wired exactly as vLLM's API
server does (vllm.entrypoints.launchers.api_server.app_state.init_app_state), each in its own State.

Per model the `vllm serve` argument namespace is built with vLLM's own parser, so every engine option
(`max_model_len`, `dtype`, `enforce_eager`, `chat_template`, ...) means what it means in `vllm serve`. The
parser also accepts `vllm serve`'s HTTP-server options (`api_key`, `ssl_keyfile`, `allowed_origins`, ...);
this server has its own HTTP layer and applies none of them, so start-up warns about each one given.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from starlette.datastructures import State

from server.admission import AdmissionGate, admission_limit
from server.facts import WeightFacts, read_weight_facts
from server.protocol import OPENAI_ROLES, roles_of_template
from server.settings import ModelSettings, ServerSettings, SettingsError, to_vllm_argv
from server.stats import SharedPrometheusStatLogger, Throughput, throughput_logger_factory
from vllm_moemix.config.routing_profile import merge as merge_routing
from vllm_moemix.layers.introspect import EXTENSION as ROUTING_EXTENSION
from vllm_moemix.layers.introspect import describe_served, reference_fallback_reason

logger = logging.getLogger("moemix.server")


def vllm_serve_args(model: ModelSettings, options: dict[str, Any]) -> argparse.Namespace:
    """The namespace `vllm serve --model PATH --served-model-name NAME <options>` would produce."""
    from vllm.entrypoints.launchers.cli_args import make_arg_parser, validate_parsed_serve_args
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    argv = ["--model", model.path, "--served-model-name", model.name, *to_vllm_argv(options)]
    parser = make_arg_parser(FlexibleArgumentParser(prog=f"vllm_args of {model.name}"))
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            args = parser.parse_args(argv)
    except SystemExit as e:
        raise SettingsError(f"model {model.name}: bad vllm_args {options}: {err.getvalue().strip()}") from e
    try:
        validate_parsed_serve_args(args)
    except Exception as e:
        raise SettingsError(f"model {model.name}: {e}") from e
    return args


# Read by vLLM's own HTTP server (FastAPI app, uvicorn, middleware, process launcher), not by the serving
# objects this server builds: every FrontendArgs-only field but the pooling one, plus these.
_HTTP_ONLY_OPTIONS = {
    "sse_keep_alive_interval",
    "tool_parser_plugin",
    "enable_tokenizer_info_endpoint",
    "tokens_only",
    "enable_scale_out",
    "headless",
    "api_server_count",
    "grpc",
}
_OUR_FLAG = {
    "api_key": "--api-key-file",
    "host": "--host",
    "port": "--port",
    "uvicorn_log_level": "--log-level",
    "sse_keep_alive_interval": "--sse-keep-alive",
}


def unapplied_vllm_options(options: dict[str, Any]) -> list[str]:
    """The `vllm serve` HTTP-server options among `options`, each with why it does nothing here."""
    from dataclasses import fields

    from vllm.entrypoints.launchers.cli_args import BaseFrontendArgs, FrontendArgs

    http_only = {f.name for f in fields(FrontendArgs)} - {f.name for f in fields(BaseFrontendArgs)}
    http_only = http_only - {"enable_flash_late_interaction"} | _HTTP_ONLY_OPTIONS
    out = []
    for key in options:
        name = str(key).replace("-", "_")
        if name in http_only:
            hint = f"use {_OUR_FLAG[name]}" if name in _OUR_FLAG else "moemix serve has its own HTTP layer"
            out.append(f"vllm_args `{name}` is a `vllm serve` HTTP-server option and is NOT applied ({hint})")
    return out


@dataclass
class ModelEngine:
    name: str
    path: str
    args: argparse.Namespace
    client: Any  # vllm.v1.engine.async_llm.AsyncLLM
    state: State  # vLLM serving objects for this model
    facts: WeightFacts
    gate: AdmissionGate
    throughput: Throughput
    start_seconds: float = 0.0
    stopped: bool = False
    created: int = field(default_factory=lambda: int(time.time()))
    routing: dict | None = None  # last expert-routing profile (vllm_moemix.layers.introspect.merge), moemix models only
    routing_refresh_s: float = 5.0  # gather it from the workers at most this often
    routing_at: float = float("-inf")  # time.monotonic() of the last gathering
    _routing_lock: asyncio.Lock = field(default_factory=asyncio.Lock, init=False, repr=False)
    kernels: dict[str, dict[str, int]] | None = (
        None  # what serves (vllm_moemix.layers.introspect.worker_kernels), moemix only
    )
    chat_roles: frozenset[str] = OPENAI_ROLES  # roles a chat request may use (server.protocol.roles_of_template)
    death_reported: bool = False  # the engine-death line was logged (app.py's watcher)

    @property
    def counts_routing(self) -> bool:
        return self.args.worker_extension_cls == ROUTING_EXTENSION

    async def refresh_routing(self) -> dict | None:
        """The routed-token counts (moemix checkpoints only), gathered from the workers if the last gathering is
        older than routing_refresh_s: a collective_rpc waits for every worker's current step, so callers
        (the background refresher, GET /v1/moemix/routing) may not stall generation more often than that."""
        if self.dead or not self.counts_routing:
            return None
        async with self._routing_lock:  # concurrent callers share one gathering
            if time.monotonic() - self.routing_at >= self.routing_refresh_s:
                try:
                    self.routing = merge_routing(await self.client.collective_rpc("moemix_routing", timeout=10))
                except Exception:  # never fails the caller; the last counts stay
                    logger.warning("model %s: could not read expert routing counts", self.name, exc_info=True)
                self.routing_at = time.monotonic()
        return self.routing

    @property
    def completion(self):
        return self.state.openai_serving_completion

    @property
    def chat(self):
        return self.state.openai_serving_chat

    @property
    def tokenization(self):
        return self.state.serving_tokenization

    @property
    def max_model_len(self) -> int:
        return self.client.model_config.max_model_len

    @property
    def dead(self) -> bool:
        try:
            return bool(self.client.errored)
        except Exception:
            return True

    def _engine_processes(self) -> list:
        try:
            return list(self.client.engine_core.resources.engine_manager.processes)
        except AttributeError:
            return []

    def engine_pids(self) -> list[int]:
        return [p.pid for p in self._engine_processes() if p.pid is not None]

    def how_it_died(self) -> str:
        """`engine-core process 1234 killed by SIGKILL` (or its exit status), as far as the process object knows."""
        import signal

        parts = []
        for proc in self._engine_processes():
            code = getattr(proc, "exitcode", None)
            if code is None:
                continue
            if code < 0:
                try:
                    what = f"killed by {signal.Signals(-code).name}"
                except ValueError:
                    what = f"killed by signal {-code}"
            else:
                what = f"exited with status {code}"
            parts.append(f"engine-core process {proc.pid} {what}")
        return "; ".join(parts) or "its output handler stopped"

    def shutdown(self) -> None:
        if self.stopped:
            return
        self.stopped = True
        try:
            self.client.shutdown()
        except Exception:
            logger.exception("shutting down %s", self.name)


@dataclass
class EnginePool:
    engines: dict[str, ModelEngine]

    @property
    def default(self) -> ModelEngine:
        return next(iter(self.engines.values()))

    def get(self, name: str | None) -> ModelEngine | None:
        """The engine serving `name`; the first model when the request names none."""
        if not name:
            return self.default
        return self.engines.get(name)

    def shutdown(self) -> None:
        """Stop every engine (concurrently: each takes seconds); safe to call twice."""
        engines = [e for e in self.engines.values() if not e.stopped]
        threads = [threading.Thread(target=e.shutdown, name=f"stop-{e.name}") for e in engines]
        for t in threads:
            t.start()
        for t in threads:
            t.join()


def _build_client(args: argparse.Namespace, throughput: Throughput):
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.usage.usage_lib import UsageContext
    from vllm.v1.engine.async_llm import AsyncLLM

    engine_args = AsyncEngineArgs.from_cli_args(args)
    return AsyncLLM.from_engine_args(
        engine_args,
        usage_context=UsageContext.OPENAI_API_SERVER,
        stat_loggers=[SharedPrometheusStatLogger, throughput_logger_factory(throughput)],
    )


def _chat_template(client, state: State) -> str | None:
    """The chat template vLLM's chat serving will use (--chat-template, else the processor's or tokenizer's)."""
    from vllm.renderers.hf import resolve_chat_template

    serving = getattr(state, "openai_serving_chat", None)
    try:
        return resolve_chat_template(
            client.get_tokenizer(),
            getattr(serving, "chat_template", None),
            None,
            model_config=client.model_config,
        )
    except Exception:  # no template (chat then fails in vLLM anyway), or an unusual tokenizer: OpenAI's roles only
        logger.debug("could not resolve the chat template", exc_info=True)
        return None


async def start_engine(model: ModelSettings, settings: ServerSettings) -> ModelEngine:
    from vllm.entrypoints.launchers.api_server.app_state import init_app_state

    options = settings.vllm_args_for(model)
    args = vllm_serve_args(model, options)
    for warning in unapplied_vllm_options(options):
        logger.warning("model %s: %s", model.name, warning)
    facts = read_weight_facts(model.path) if Path(model.path).is_dir() else WeightFacts(path=model.path)
    if facts.is_moemix and not args.worker_extension_cls:
        args.worker_extension_cls = ROUTING_EXTENSION  # lets /metrics read the experts' routed-token counts
    throughput = Throughput()
    t0 = time.perf_counter()
    # In a worker thread: the constructor blocks until the engine core is up (tens of seconds), and other
    # models start meanwhile. AsyncLLM starts its output handler lazily on the event loop at first use.
    client = await asyncio.to_thread(_build_client, args, throughput)
    try:
        tasks = await client.get_supported_tasks()
        if "generate" not in tasks:
            raise SettingsError(f"model {model.name} supports {tasks}, not text generation")
        state = State()
        await init_app_state(client, state, args, tasks)
    except BaseException:
        client.shutdown()
        raise
    kernels = None
    if args.worker_extension_cls == ROUTING_EXTENSION:  # start the usage profile at zero, not at the warm-up runs
        await client.collective_rpc("moemix_routing", kwargs={"reset": True})
        kernels = (await client.collective_rpc("moemix_kernels", timeout=10))[0]  # rank 0 speaks for all
        logger.info("model %s serving: %s", model.name, describe_served(kernels))
        slow = reference_fallback_reason(kernels)
        if slow:
            logger.warning("model %s: the slow reference kernel serves, because %s", model.name, slow)
    chat_roles = roles_of_template(_chat_template(client, state))
    limit = admission_limit(client.vllm_config.scheduler_config.max_num_seqs, settings.max_queue_for(model))
    eng = ModelEngine(
        name=model.name,
        path=model.path,
        args=args,
        client=client,
        state=state,
        facts=facts,
        gate=AdmissionGate(limit),
        throughput=throughput,
        start_seconds=time.perf_counter() - t0,
        kernels=kernels,
        routing_refresh_s=settings.routing_refresh_s,
        chat_roles=chat_roles,
    )
    logger.info(
        "model %s (%s) ready in %.1f s; quant_method=%s; admission limit %s",
        eng.name,
        eng.path,
        eng.start_seconds,
        facts.quant_method,
        limit,
    )
    return eng


async def start_pool(settings: ServerSettings) -> EnginePool:
    """Start every model's engine concurrently; if any fails, stop the others and raise the first error."""
    results = await asyncio.gather(*(start_engine(m, settings) for m in settings.models), return_exceptions=True)
    started = [r for r in results if isinstance(r, ModelEngine)]
    errors = [r for r in results if not isinstance(r, ModelEngine)]
    if errors:
        for eng in started:
            eng.shutdown()
        raise errors[0]
    return EnginePool({eng.name: eng for eng in started})
