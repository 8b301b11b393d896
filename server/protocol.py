"""Our additions to vLLM's protocol models (vllm.entrypoints.serve.engine.protocol): a model card that says
what the checkpoint holds (extra fields are ignored by OpenAI clients; the `openai` package keeps them), and
completion/chat requests checked strictly before vLLM's own validators see them.

Strict, where vLLM's models are lax (pydantic's lax mode turns `"10"` into 10 and `"true"` into True, and vLLM
silently clamps or ignores the rest), each with an OpenAI-style 400 naming the field:
- JSON types: a number field takes a JSON number (not a string, not a boolean; finite), a boolean field a JSON
  boolean, at any depth of vLLM's own request model (`stream_options.include_usage`, `stop_token_ids[0]`, ...);
- `logit_bias` values within OpenAI's [-100, 100] (vLLM would clamp 1e308 to 100 without a word);
- `best_of` (OpenAI's; vLLM ignores it) only as `null` or equal to `n`: more candidates are not generated here;
- wrongly shaped JSON vLLM's before-validators would trip over (500s), and integers past 64 bits.
Unknown fields stay accepted and ignored, as vLLM's server does (clients send vendor extras). Chat roles are
checked per model in the route (server.routes.chat), against the roles its chat template names.
"""

from __future__ import annotations

import functools
import math
import re
import types
import typing
from typing import Any

from pydantic import BaseModel, Field, model_validator
from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
from vllm.entrypoints.openai.completion.protocol import CompletionRequest
from vllm.entrypoints.serve.engine.protocol import ModelCard, ModelList, OpenAIBaseModel
from vllm.exceptions import VLLMValidationError


class MoemixFacts(OpenAIBaseModel):
    """From the checkpoint's quantization_config.summary; averages count the quantizable linears only."""

    avg_bits: float | None = None  # with scales and zero points
    avg_payload_bits: float | None = None  # integer width alone
    counts: str | None = None
    quantized_bytes: int | None = None
    bf16_bytes: int | None = None
    bytes_by_width: dict[str, int] = Field(default_factory=dict)
    bytes_by_role: dict[str, int] = Field(default_factory=dict)


class WeightFactsCard(OpenAIBaseModel):
    """Bytes at rest of every tensor, by component (experts/attention/shared/other) and bit width."""

    quant_method: str | None = None
    weight_bytes: int = 0
    weight_bytes_by_component: dict[str, dict[str, int]] = Field(default_factory=dict)
    avg_bits: float | None = None
    avg_payload_bits: float | None = None


class MoemixModelCard(ModelCard):
    owned_by: str = "moemix"
    weights: WeightFactsCard | None = None
    kernels: dict[str, dict[str, int]] | None = None  # role (experts/linears) -> kernel (with CPU ISA) -> layers
    moemix: MoemixFacts | None = None  # null unless the checkpoint is moemix-quantized


class MoemixModelList(ModelList):
    data: list[MoemixModelCard] = Field(default_factory=list)


_JSON_TYPES = {
    dict: "an object",
    list: "an array",
    str: "a string",
    bool: "a boolean",
    int: "a number",
    float: "a number",
    type(None): "null",
}


def _expect_object(value: Any, param: str) -> None:
    if not isinstance(value, dict):
        got = _JSON_TYPES.get(type(value), type(value).__name__)
        raise VLLMValidationError(f"`{param}` must be an object, got {got}.", parameter=param)


INT64 = (-(2**63), 2**63 - 1)  # what the engine's msgpack encoder can carry
MAX_ECHOED_PATH = 200  # a field path quoted in an error (a nested body may make it as long as the body)


def _reject_huge_integers(data: Any) -> None:
    """Integers vLLM's protocol leaves unbounded (top_k, stream_interval, ...) are encoded for the engine process
    with msgpack, which raises OverflowError past 64 bits: deep in the engine client, a 500. Iterative (a deeply
    nested body must not hit the recursion limit); a field's path is spelled out only for the error."""
    containers: list[tuple[Any, Any, int]] = [(data, None, -1)]  # (dict or list, its key in the parent, parent)
    for index, (container, _, _) in enumerate(containers):  # grows while walked: breadth first
        for key, value in container.items() if isinstance(container, dict) else enumerate(container):
            if isinstance(value, (dict, list)):
                containers.append((value, key, index))
            elif type(value) is int and not INT64[0] <= value <= INT64[1]:  # bool is not int here
                keys = [key]
                while index > 0:
                    _, parent_key, index = containers[index]
                    keys.append(parent_key)
                where = "".join(f"[{k}]" if isinstance(k, int) else f".{k}" for k in reversed(keys)).lstrip(".")
                where = where if len(where) <= MAX_ECHOED_PATH else f"{where[:MAX_ECHOED_PATH]}...[truncated]"
                raise VLLMValidationError(f"`{where}` is outside the 64-bit integer range.", parameter=where)


MAX_LOGIT_BIAS = 100.0  # OpenAI: "a bias value from -100 to 100"


def _kind(tp: Any) -> Any:
    """What JSON a field of this annotation must hold, as far as this check goes: "int", "float", "bool",
    ("list", kind), ("dict", kind), ("model", cls), or None (anything: a union of different kinds, strings, ...).
    """
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Annotated:
        return _kind(args[0])
    if origin in (typing.Union, types.UnionType):
        kinds = {repr(k): k for k in (_kind(a) for a in args if a is not type(None))}
        return next(iter(kinds.values())) if len(kinds) == 1 else None
    if tp in (bool, int, float):
        return tp.__name__
    if origin is list and args:
        inner = _kind(args[0])
        return ("list", inner) if inner else None
    if origin is dict and len(args) == 2:
        inner = _kind(args[1])
        return ("dict", inner) if inner else None
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return ("model", tp)
    return None


@functools.cache
def field_kinds(model: type[BaseModel]) -> dict[str, Any]:
    """{JSON key: kind} of a request model's fields whose kind is known (by name and by alias)."""
    out = {}
    for name, info in model.model_fields.items():
        kind = _kind(info.annotation)
        if kind is not None:
            out[name] = kind
            if info.alias:
                out[info.alias] = kind
    return out


_EXPECTED = {"int": "an integer", "float": "a number", "bool": "a boolean"}


def _type_error(where: str, kind: str, value: Any) -> VLLMValidationError:
    got = _JSON_TYPES.get(type(value), type(value).__name__)
    if isinstance(value, float) and not math.isfinite(value):
        got = "a non-finite number"
    where = where if len(where) <= MAX_ECHOED_PATH else f"{where[:MAX_ECHOED_PATH]}...[truncated]"
    return VLLMValidationError(f"`{where}` must be {_EXPECTED[kind]}, got {got}.", parameter=where)


def _check_value(value: Any, kind: Any, where: str) -> None:
    """Raise a 400 when `value` (JSON) cannot be of `kind` without lax coercion; null is left to pydantic."""
    if value is None:
        return
    if kind == "bool":
        if type(value) is not bool:
            raise _type_error(where, kind, value)
    elif kind in ("int", "float"):
        if type(value) not in (int, float) or (type(value) is float and not math.isfinite(value)):
            raise _type_error(where, kind, value)
    elif kind[0] == "list" and isinstance(value, list):
        for i, item in enumerate(value):
            _check_value(item, kind[1], f"{where}[{i}]")
    elif kind[0] == "dict" and isinstance(value, dict):
        for key, item in value.items():
            _check_value(item, kind[1], f"{where}.{key}")
    elif kind[0] == "model" and isinstance(value, dict):
        check_json_types(kind[1], value, where + ".")


def check_json_types(model: type[BaseModel], data: dict, prefix: str = "") -> None:
    kinds = field_kinds(model)
    for key, value in data.items():
        if key in kinds:
            _check_value(value, kinds[key], f"{prefix}{key}")


def _check_values(data: dict) -> None:
    bias = data.get("logit_bias")
    if isinstance(bias, dict):
        for token, value in bias.items():
            if isinstance(value, (int, float)) and not -MAX_LOGIT_BIAS <= value <= MAX_LOGIT_BIAS:
                shown = str(token)[:MAX_ECHOED_PATH]
                raise VLLMValidationError(
                    f"`logit_bias` values must be within [-100, 100]; token {shown} has {value!r}.",
                    parameter="logit_bias",
                )
    best_of = data.get("best_of")
    if best_of is not None:
        _check_value(best_of, "int", "best_of")
        n = data.get("n")
        n = 1 if n is None else n
        if best_of != n:
            raise VLLMValidationError(
                f"`best_of` other than `n` is not supported (got best_of={best_of!r}, n={n!r}): this server does "
                "not generate extra candidates to choose from. Leave it out.",
                parameter="best_of",
            )


def check_request(model: type[BaseModel], data: Any) -> Any:
    """Every check of this module, for a completion or chat request body (before any of vLLM's validators)."""
    data = reject_json_vllm_trips_on(data)
    if isinstance(data, dict):
        check_json_types(model, data)
        _check_values(data)
    return data


OPENAI_ROLES = frozenset({"system", "developer", "user", "assistant", "tool", "function"})
_TEMPLATE_WORD = re.compile(r"""["']([A-Za-z_][A-Za-z0-9_-]{0,31})["']""")


def roles_of_template(template: str | None) -> frozenset[str]:
    """The roles a chat request may use with this chat template: OpenAI's, plus the custom ones vLLM lets through
    that the template names (a quoted word in it: Llama 3.1's `ipython`, GLM's `observation`, ...)."""
    return OPENAI_ROLES | frozenset(_TEMPLATE_WORD.findall(template or ""))


def check_roles(messages: Any, allowed: frozenset[str]) -> None:
    """400 naming `messages[i].role` for a role that is neither OpenAI's nor named by the chat template."""
    if not isinstance(messages, list):
        return
    for i, message in enumerate(messages):
        role = message.get("role") if isinstance(message, dict) else getattr(message, "role", None)
        if isinstance(role, str) and role not in allowed:
            shown = role if len(role) <= MAX_ECHOED_PATH else f"{role[:MAX_ECHOED_PATH]}...[truncated]"
            known = ", ".join(sorted(OPENAI_ROLES))
            raise VLLMValidationError(
                f"`messages[{i}].role` {shown!r} is not a role this model knows (OpenAI's: {known}; or one its "
                "chat template names).",
                parameter=f"messages[{i}].role",
            )


def reject_json_vllm_trips_on(data: Any) -> Any:
    """vLLM's request models run `mode="before"` validators that dereference raw JSON (`.get`,
    `["function"]["name"]`, `list(...)`) before pydantic has checked a single type: a number or a list where they
    expect an object raised AttributeError/KeyError (500). Run first (pydantic runs a subclass's before-validators
    before its parents'), this turns each such shape, and every integer the engine could not be sent, into a 400
    naming the field."""
    if not isinstance(data, dict):
        return data
    _reject_huge_integers(data)
    if data.get("structured_outputs") is not None:
        _expect_object(data["structured_outputs"], "structured_outputs")
    tools = data.get("tools")
    if isinstance(tools, list):  # read as tools[i]["function"]["name"] when tool_choice names a function
        for i, tool in enumerate(tools):
            _expect_object(tool, f"tools[{i}]")
            _expect_object(tool.get("function"), f"tools[{i}].function")
            if not isinstance(tool["function"].get("name"), str):
                raise VLLMValidationError(
                    f"`tools[{i}].function.name` must be a string.", parameter=f"tools[{i}].function.name"
                )
    messages = data.get("messages")
    if isinstance(messages, list):  # read as list(tool_calls)
        for i, message in enumerate(messages):
            if (
                isinstance(message, dict)
                and message.get("tool_calls") is not None
                and not isinstance(message["tool_calls"], list)
            ):
                raise VLLMValidationError(
                    f"`messages[{i}].tool_calls` must be an array.", parameter=f"messages[{i}].tool_calls"
                )
    return data


class CheckedChatCompletionRequest(ChatCompletionRequest):
    @model_validator(mode="before")
    @classmethod
    def _shapes_first(cls, data: Any) -> Any:
        return check_request(ChatCompletionRequest, data)


class CheckedCompletionRequest(CompletionRequest):
    @model_validator(mode="before")
    @classmethod
    def _shapes_first(cls, data: Any) -> Any:
        return check_request(CompletionRequest, data)
