"""The Fisher error model's statistic: the diagonal empirical Fisher of each checkpoint linear, sliced out of
transformers' fused expert tensors exactly as the weights are."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from vllm_moemix.calibration import layerwise
from vllm_moemix.calibration.fisher import weight_fisher
from vllm_moemix.config.spec import PlanError
from vllm_moemix.planning.pipeline import CalibrationConfig, build_context, plan_model
from vllm_moemix.planning.units import Budget

SAMPLES = torch.randint(0, 320, (3, 16), generator=torch.Generator().manual_seed(0))


def test_fisher_is_the_mean_squared_gradient_per_linear(random_mixtral):
    names = ["model.layers.0.self_attn.q_proj", "model.layers.1.block_sparse_moe.experts.2.w3"]
    got = weight_fisher(random_mixtral, SAMPLES, names, progress=False)
    model = AutoModelForCausalLM.from_pretrained(random_mixtral, dtype=torch.float32)
    want_q, want_up = 0, 0
    for row in SAMPLES:
        model.zero_grad()
        model(row[None], labels=row[None]).loss.backward()
        want_q = want_q + model.model.layers[0].self_attn.q_proj.weight.grad.square() / len(SAMPLES)
        experts = model.model.layers[1].mlp.experts.gate_up_proj.grad  # [E, 2I, H]: gate rows, then up rows
        want_up = want_up + experts[2, experts.shape[1] // 2 :].square() / len(SAMPLES)
    torch.testing.assert_close(got[names[0]], want_q)
    torch.testing.assert_close(got[names[1]], want_up)
    assert got[names[1]].abs().sum() > 0


def test_fisher_error_model_plans(random_qwen2moe):
    calib = CalibrationConfig.default()
    calib.num_samples, calib.seq_len = 4, 32
    ctx = build_context(
        random_qwen2moe, "optimizer", calib, group_size=32, sym=False, pins={}, progress=False, error_model="fisher"
    )
    for table in ctx.errors.values():
        widths = sorted(table, key=lambda s: s.bits)
        assert all(v >= 0 for v in table.values())
        assert table[widths[0]] >= table[widths[-1]]  # fewer bits, more loss
    result = plan_model(random_qwen2moe, "optimizer", Budget(avg_bits=3.0), context=ctx)
    assert result.footprint.avg_payload_bits <= 3.0 + 1e-9


def test_fisher_refuses_a_model_that_does_not_fit(random_mixtral, monkeypatch):
    monkeypatch.setattr(layerwise, "available_memory", lambda: 1 << 20)
    with pytest.raises(PlanError, match="holds the whole float model and its gradients"):
        weight_fisher(random_mixtral, SAMPLES, [], progress=False)
