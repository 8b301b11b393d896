"""Server settings from `moemix serve` flags and an optional YAML file (flags win). No vLLM import.

YAML (every key optional except `models` when no MODEL is given on the command line):

    host: 0.0.0.0
    port: 8000
    api_key_file: /run/secrets/moemix-api-key   # or api_key_env: MOEMIX_API_KEY, or api_key: "..." (leaks)
    max_queue: 16                   # per model: requests waiting beyond the engine's batch -> 429 past it
                                    # (default: max_num_seqs, a queue as deep as the batch)
    retry_after_s: 1
    drain_timeout_s: 30             # graceful shutdown: how long in-flight requests may finish
    on_engine_death: exit           # exit (non-zero, after draining the other models' streams) or stay (503s)
    keep_alive_s: 75                # idle keep-alive connections are closed after this (longer than proxies')
    auth_metrics: false             # true: /metrics, /version and the OpenAPI pages need the API key too
    max_body_bytes: 8388608
    limit_concurrency: 512          # uvicorn's connection bound (default: the admission limits + 256)
    routing_refresh_s: 5            # gather expert-routing counts from the workers at most this often
    sse_keep_alive_s: 15            # a stream idle this long (queued, long prefill) gets an SSE comment; 0: never
    metrics_max_age_s: 1            # /metrics is rendered at most this often; scrapes in between get that body
    metrics_scrapes_per_s: 20       # /metrics answers at most this many scrapes a second; more wait (0: no bound)
    vllm_args:                      # applied to every model; any `vllm serve` engine/frontend option
      max_model_len: 2048
    models:
      - name: tiny-bf16
        path: models/tiny-mixtral
      - name: tiny-moemix
        path: /srv/tiny-mixtral-moemix
        max_queue: 4
        vllm_args: {max_num_seqs: 8, enforce_eager: true}

Fail closed: a host that is not loopback needs an API key, unless `--insecure-no-auth` (a flag only, never
YAML) says otherwise.
"""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

ENGINE_DEATH_POLICIES = ("exit", "stay")


class SettingsError(ValueError):
    """A configuration mistake, reported before any engine starts."""


@dataclass
class ModelSettings:
    name: str
    path: str
    vllm_args: dict[str, Any] = field(default_factory=dict)  # `vllm serve` options, `max_model_len: 256` style
    max_queue: int | None = None  # None: the server-wide value


@dataclass
class ServerSettings:
    models: list[ModelSettings]
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    insecure_no_auth: bool = False  # serve a non-loopback host without a key (the operator said so)
    max_queue: int | None = None  # None: max_num_seqs (vLLM's own --max-num-queued-reqs still applies, as 503)
    retry_after_s: int = 1
    drain_timeout_s: float = 30.0
    on_engine_death: str = "exit"  # exit: stop (drain, exit status 3) so a supervisor restarts us; stay: 503s
    keep_alive_s: float = 75.0  # > the idle timeouts of proxies and client pools: the client closes idle ones
    auth_metrics: bool = False  # /metrics, /version, /openapi.json, /docs, /redoc behind the key too
    max_body_bytes: int = 8 * 2**20
    limit_concurrency: int | None = None  # None: the sum of the models' admission limits + 256 (cli.py)
    routing_refresh_s: float = 5.0
    sse_keep_alive_s: float = 15.0  # proxies close streams silent for longer than their read timeout (often 60 s)
    metrics_max_age_s: float = 1.0  # a /metrics flood renders once per interval, not once per scrape
    metrics_scrapes_per_s: float = 20.0  # and is answered at this rate: even cached answers cost the event loop
    vllm_args: dict[str, Any] = field(default_factory=dict)  # defaults for every model (YAML top level)
    override_vllm_args: dict[str, Any] = field(default_factory=dict)  # command-line flags: win over YAML
    log_level: str = "info"

    def max_queue_for(self, model: ModelSettings) -> int | None:
        return model.max_queue if model.max_queue is not None else self.max_queue

    def vllm_args_for(self, model: ModelSettings) -> dict[str, Any]:
        return {**self.vllm_args, **model.vllm_args, **self.override_vllm_args}


_SERVER_KEYS = {f.name for f in fields(ServerSettings)} - {"override_vllm_args", "insecure_no_auth"} | {
    "api_key_env",
    "api_key_file",
}
_MODEL_KEYS = {f.name for f in fields(ModelSettings)}


def parse_model_arg(arg: str) -> ModelSettings:
    """`PATH` (served under PATH, as vLLM does) or `NAME=PATH`."""
    name, sep, path = arg.partition("=")
    if not sep:
        name, path = arg, arg
    if not name or not path:
        raise SettingsError(f"model argument {arg!r}: expected PATH or NAME=PATH")
    return ModelSettings(name=name, path=path)


def is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1 or `localhost`; anything else (0.0.0.0, a name, a LAN address) may be reachable."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def read_api_key_file(path: str | Path) -> str:
    try:
        key = Path(path).read_text().strip()
    except OSError as e:
        raise SettingsError(f"cannot read the API key file {path}: {e.strerror}") from e
    if not key:
        raise SettingsError(f"the API key file {path} is empty")
    return key


def _non_negative_int(value: Any, what: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise SettingsError(f"{what} must be a non-negative integer, got {value!r}")
    return value


def _model_from_yaml(entry: Any, index: int, base_dir: Path) -> ModelSettings:
    if isinstance(entry, str):
        return parse_model_arg(entry)
    if not isinstance(entry, dict):
        raise SettingsError(f"models[{index}]: expected a mapping with name/path, got {entry!r}")
    unknown = set(entry) - _MODEL_KEYS
    if unknown:
        raise SettingsError(f"models[{index}]: unknown keys {sorted(unknown)} (known: {sorted(_MODEL_KEYS)})")
    if "path" not in entry:
        raise SettingsError(f"models[{index}]: `path` is required")
    path = str(entry["path"])
    if not Path(path).is_absolute() and (base_dir / path).exists():
        path = str(base_dir / path)  # relative to the YAML file when it exists there
    vllm_args = entry.get("vllm_args") or {}
    if not isinstance(vllm_args, dict):
        raise SettingsError(f"models[{index}].vllm_args must be a mapping")
    return ModelSettings(
        name=str(entry.get("name") or entry["path"]),
        path=path,
        vllm_args=dict(vllm_args),
        max_queue=_non_negative_int(entry.get("max_queue"), f"models[{index}].max_queue"),
    )


def load_yaml(path: str | Path) -> dict[str, Any]:
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise SettingsError(f"cannot read config {path}: {e}") from e
    if not isinstance(data, dict):
        raise SettingsError(f"config {path}: top level must be a mapping")
    unknown = set(data) - _SERVER_KEYS
    if unknown:
        raise SettingsError(f"config {path}: unknown keys {sorted(unknown)} (known: {sorted(_SERVER_KEYS)})")
    return data


def build_settings(
    models: list[str], config: str | None = None, api_key_file: str | None = None, **flags: Any
) -> ServerSettings:
    """Merge YAML (if any) and flags (None means 'not given'); validate.

    The API key, first found: --api-key, --api-key-file, YAML api_key_file / api_key_env / api_key, env
    MOEMIX_API_KEY."""
    data = load_yaml(config) if config else {}
    base_dir = Path(config).resolve().parent if config else Path.cwd()
    specs = [_model_from_yaml(m, i, base_dir) for i, m in enumerate(data.get("models") or [])]
    specs += [parse_model_arg(m) for m in models]
    if not specs:
        raise SettingsError("no model to serve: give MODEL arguments or `models:` in --config")
    for m in specs:  # a filesystem path that is not there (anything else may be a Hugging Face repo id)
        if (Path(m.path).is_absolute() or m.path.startswith((".", "~"))) and not Path(m.path).expanduser().exists():
            raise SettingsError(f"model {m.name}: {m.path} does not exist")
    names = [m.name for m in specs]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise SettingsError(f"model names must be unique, repeated: {dupes} (use NAME=PATH)")

    api_key = data.get("api_key")
    if data.get("api_key_env"):
        api_key = os.environ.get(str(data["api_key_env"])) or api_key
    if data.get("api_key_file"):
        api_key = read_api_key_file(base_dir / str(data["api_key_file"]))
    if api_key_file is not None:
        api_key = read_api_key_file(api_key_file)
    vllm_args = data.get("vllm_args") or {}
    if not isinstance(vllm_args, dict):
        raise SettingsError("vllm_args must be a mapping")
    settings = ServerSettings(models=specs, vllm_args=dict(vllm_args), api_key=api_key)
    for key in (
        "host",
        "port",
        "max_queue",
        "retry_after_s",
        "drain_timeout_s",
        "on_engine_death",
        "keep_alive_s",
        "auth_metrics",
        "max_body_bytes",
        "limit_concurrency",
        "routing_refresh_s",
        "sse_keep_alive_s",
        "metrics_max_age_s",
        "metrics_scrapes_per_s",
        "log_level",
    ):
        if key in data:
            setattr(settings, key, data[key])
    for key, value in flags.items():
        if value is not None:
            setattr(settings, key, value)
    settings.api_key = settings.api_key or os.environ.get("MOEMIX_API_KEY") or None
    if settings.api_key is None and not settings.insecure_no_auth and not is_loopback(settings.host):
        raise SettingsError(
            f"refusing to serve {settings.host} without an API key (anyone who can reach the port "
            f"could use the models): give --api-key-file PATH or env MOEMIX_API_KEY, or "
            f"--insecure-no-auth to serve it unauthenticated on purpose"
        )

    if settings.on_engine_death not in ENGINE_DEATH_POLICIES:
        raise SettingsError(
            f"on_engine_death must be one of {list(ENGINE_DEATH_POLICIES)}, got {settings.on_engine_death!r}"
        )
    if not isinstance(settings.auth_metrics, bool):
        raise SettingsError(f"auth_metrics must be true or false, got {settings.auth_metrics!r}")
    if settings.auth_metrics and settings.api_key is None:
        raise SettingsError("auth_metrics puts /metrics and /version behind the API key, but no key is configured")
    settings.max_queue = _non_negative_int(settings.max_queue, "max_queue")
    settings.port = _non_negative_int(settings.port, "port")
    settings.retry_after_s = _non_negative_int(settings.retry_after_s, "retry_after_s")
    settings.max_body_bytes = _non_negative_int(settings.max_body_bytes, "max_body_bytes")
    if _non_negative_int(settings.limit_concurrency, "limit_concurrency") == 0:
        raise SettingsError("limit_concurrency must be positive (leave it out for the default)")
    if not isinstance(settings.routing_refresh_s, (int, float)) or settings.routing_refresh_s <= 0:
        raise SettingsError(f"routing_refresh_s must be a positive number, got {settings.routing_refresh_s!r}")
    value = settings.keep_alive_s
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
        raise SettingsError(f"keep_alive_s must be a positive number, got {value!r}")
    for key in ("drain_timeout_s", "sse_keep_alive_s", "metrics_max_age_s", "metrics_scrapes_per_s"):
        value = getattr(settings, key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < float("inf"):
            raise SettingsError(f"{key} must be a non-negative number, got {value!r}")
    return settings


def to_vllm_argv(options: dict[str, Any]) -> list[str]:
    """{max_model_len: 256, enforce_eager: true, compilation_config: {...}} -> `vllm serve` style argv."""
    import json

    argv: list[str] = []
    for key, value in options.items():
        flag = "--" + str(key).replace("_", "-")
        if value is True:
            argv.append(flag)
        elif value is False:
            argv.append("--no-" + flag[2:])
        elif value is None:
            continue
        elif isinstance(value, dict):
            argv += [flag, json.dumps(value)]
        elif isinstance(value, (list, tuple)):
            argv += [flag, *map(str, value)]
        else:
            argv += [flag, str(value)]
    return argv
