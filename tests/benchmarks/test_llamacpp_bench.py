"""benchmarks/llamacpp.py: the scoring every engine shares, byte counting and the report. The real llama.cpp
path needs a 15-minute build, so it is checked where it is built: `benchmarks/llamacpp.py setup` ends with
`LlamaCpp.check_round_trip` on tiny-mixtral and fails naming what broke."""

from __future__ import annotations

import math

import pytest
import torch

from benchmarks.llamacpp import LINEAR_TENSOR, markdown, plot
from vllm_moemix.report.evaluate import compare_logprobs


def test_scores_same_ids_the_same_way():
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 50, (2, 9), generator=gen)
    ref = torch.log_softmax(torch.randn(2, 9, 50, generator=gen), -1)
    same = compare_logprobs(ref, ref.half(), ids)
    assert same.kl == pytest.approx(0, abs=1e-3) and same.top1 == 1
    nll = -ref[:, :-1].gather(-1, ids[:, 1:, None]).mean().item()
    assert same.perplexity == pytest.approx(math.exp(nll), rel=1e-5)
    other = compare_logprobs(torch.log_softmax(torch.randn(2, 9, 50, generator=gen), -1), ref, ids)
    assert other.kl > 0.1 and other.top1 < 0.5


def test_linear_tensors_are_attention_and_experts_only():
    counted = [
        "blk.0.attn_q.weight",
        "blk.3.attn_output.weight",
        "blk.1.ffn_gate_exps.weight",
        "blk.1.ffn_down_exps.weight",
        "blk.2.ffn_up_shexp.weight",
    ]
    skipped = [
        "token_embd.weight",
        "output.weight",
        "blk.0.attn_norm.weight",
        "blk.1.ffn_gate_inp.weight",
        "blk.1.ffn_gate_inp_shexp.weight",
        "output_norm.weight",
    ]
    assert all(LINEAR_TENSOR.search(n) for n in counted) and not any(LINEAR_TENSOR.search(n) for n in skipped)


def test_report_and_plot(tmp_path):
    rows = [
        {
            "model": "m",
            "engine": "llama.cpp",
            "config": "Q2_K (imatrix)",
            "bytes": 100,
            "bits_per_weight": 3.05,
            "kl": 0.02,
            "top1": 0.9,
            "ppl": 50.0,
        },
        {
            "model": "m",
            "engine": "moemix",
            "config": "optimizer @ Q2_K bytes",
            "bytes": 99,
            "bits_per_weight": 3.0,
            "kl": 0.01,
            "top1": 0.93,
            "ppl": 49.5,
        },
    ]
    speed = [
        {
            "engine": "llama.cpp",
            "config": "Q2_K",
            "bytes": 2**20,
            "decode_tok_s_batch1": 50.0,
            "decode_tok_s_batch8": None,
            "prefill_tok_s": 300.0,
            "resident_bytes": 2**21,
        }
    ]
    md = markdown(rows, speed, {"cpu": "test CPU", "threads": 2, "heldout_tokens": 256})
    assert "| moemix | optimizer @ Q2_K bytes | 3.00 | 0.0100 | 93.0% | 49.50 |" in md and "| n/a |" in md
    plot(rows, tmp_path / "p.png")
    assert (tmp_path / "p.png").stat().st_size > 0
