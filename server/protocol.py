"""Our additions to vLLM's protocol models (vllm.entrypoints.serve.engine.protocol): a model card that says
what the checkpoint holds. Extra fields are ignored by OpenAI clients (the `openai` package keeps them)."""

from __future__ import annotations

from pydantic import Field

from vllm.entrypoints.serve.engine.protocol import ModelCard, ModelList, OpenAIBaseModel


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
