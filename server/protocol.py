"""Our additions to vLLM's protocol models (vllm.entrypoints.serve.engine.protocol): a model card that says
what the checkpoint holds (extra fields are ignored by OpenAI clients; the `openai` package keeps them), and a
chat request that rejects wrongly shaped JSON before vLLM's own validators trip over it."""

from __future__ import annotations

from typing import Any

from pydantic import Field, model_validator
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
        return reject_json_vllm_trips_on(data)


class CheckedCompletionRequest(CompletionRequest):
    @model_validator(mode="before")
    @classmethod
    def _shapes_first(cls, data: Any) -> Any:
        return reject_json_vllm_trips_on(data)
