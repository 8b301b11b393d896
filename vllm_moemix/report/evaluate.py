"""Quality of a (quantized) model on held-out text.

- `perplexity_vllm`: perplexity through vLLM itself (prompt logprobs), i.e. what serving computes.
- `compare_to_reference`: mean KL(reference || model) of next-token distributions and top-1
  agreement, the measures llama.cpp's perplexity tool reports. On small models perplexity barely
  moves under quantization while KL and agreement move monotonically (shared/NOTES.md §6). Full
  distributions come from transformers on the dequantized weights, which the end-to-end tests show
  equal vLLM's moemix output (greedy tokens identical, logprobs within 2e-3).
"""

from __future__ import annotations

import gc
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass
class Windows:
    ids: torch.Tensor  # [n, seq_len]

    @classmethod
    def from_text(cls, tokenizer, text_path: str | Path, seq_len: int = 256, max_windows: int = 64) -> Windows:
        ids = torch.tensor(tokenizer(Path(text_path).read_text(errors="replace")).input_ids, dtype=torch.int64)
        n = min(max_windows, len(ids) // seq_len)
        if n == 0:
            raise ValueError(f"{text_path}: fewer than {seq_len} tokens")
        return cls(ids[: n * seq_len].reshape(n, seq_len))


def perplexity_vllm(model_dir: str | Path, windows: Windows, **engine_kwargs) -> float:
    """exp(mean NLL) of every token but each window's first, scored by vLLM."""
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    kwargs = dict(max_model_len=windows.ids.shape[1] + 8, enforce_eager=True, seed=0) | engine_kwargs
    llm = LLM(model=str(model_dir), **kwargs)
    params = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0.0)
    outs = llm.generate([TokensPrompt(prompt_token_ids=row.tolist()) for row in windows.ids], params, use_tqdm=False)
    nll, count = 0.0, 0
    for out, row in zip(outs, windows.ids.tolist()):
        for pos, entry in enumerate(out.prompt_logprobs[1:], start=1):
            nll -= entry[row[pos]].logprob
            count += 1
    del llm
    gc.collect()
    return math.exp(nll / count)


def _float_model(model_dir: Path):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir)
    if getattr(config, "quantization_config", None):
        from vllm_moemix.checkpoint.reader import write_dequantized_checkpoint

        tmp = tempfile.TemporaryDirectory()
        model = AutoModelForCausalLM.from_pretrained(
            write_dequantized_checkpoint(model_dir, Path(tmp.name) / "m"), dtype=torch.float32
        )
        tmp.cleanup()
    else:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    return model.eval()


@dataclass
class Comparison:
    perplexity: float  # of the evaluated model (transformers, float32)
    kl: float  # mean KL(reference || model), nats per token
    top1: float  # fraction of positions where both models' argmax agree


def reference_logprobs(reference_dir: str | Path, windows: Windows, batch: int = 8) -> torch.Tensor:
    """Log-softmax of the reference model for every window position, [n, seq_len, vocab] (float16 to save memory)."""
    model = _float_model(Path(reference_dir))
    with torch.no_grad():
        out = torch.cat(
            [
                torch.log_softmax(model(windows.ids[i : i + batch]).logits.float(), -1).half()
                for i in range(0, len(windows.ids), batch)
            ]
        )
    del model
    return out


def compare_logprobs(logp: torch.Tensor, ref: torch.Tensor, ids: torch.Tensor) -> Comparison:
    """KL(ref || model), top-1 agreement and perplexity from log-probabilities [n, seq_len, vocab] of the same ids.

    Engine-neutral, so another engine's logits (llama.cpp's, benchmarks/llamacpp.py) are scored the same way.
    """
    logp, ref = logp.float(), ref.float()  # the reference may be stored as float16
    nll = -logp[:, :-1].gather(-1, ids[:, 1:, None]).sum().item()
    kl = (ref.exp() * (ref - logp)).sum(-1)[:, :-1].sum().item()
    agree = (ref.argmax(-1) == logp.argmax(-1))[:, :-1].sum().item()
    count = ids[:, 1:].numel()
    return Comparison(math.exp(nll / count), kl / count, agree / count)


def compare_to_reference(
    model_dir: str | Path, windows: Windows, ref_logprobs: torch.Tensor, batch: int = 8
) -> Comparison:
    model = _float_model(Path(model_dir))
    with torch.no_grad():
        logp = torch.cat(
            [
                torch.log_softmax(model(windows.ids[i : i + batch]).logits.float(), -1)
                for i in range(0, len(windows.ids), batch)
            ]
        )
    del model
    return compare_logprobs(logp, ref_logprobs, windows.ids)
