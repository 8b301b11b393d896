"""Every supported family through what runs before vLLM: the role table, the layer-by-layer calibration forward
(MLA, attention sinks, sliding windows, dense first layers), the planner, quantization and `moemix inspect`.
Tiny random models of each family, built with transformers' own config classes (tests/conftest.py)."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from tests.conftest import FAMILIES, build_random_model
from vllm_moemix.calibration.layerwise import DEFAULT_CALIB, LayerwiseModel, iterate_layers
from vllm_moemix.checkpoint.reader import dequantized_state_dict
from vllm_moemix.checkpoint.source import SafetensorsSource
from vllm_moemix.checkpoint.writer import quantize_checkpoint
from vllm_moemix.cli import main
from vllm_moemix.config.arch import architecture_for, quantizable_linears
from vllm_moemix.config.spec import PlanError
from vllm_moemix.planning.pipeline import CalibrationConfig, plan_model
from vllm_moemix.planning.units import Budget

LAYERS = 3
# role -> linears in a 3-layer model with 4 experts (tests/conftest.py: family_config)
ROLES = {
    "mixtral": {"attention": 12, "expert": 36},
    "qwen2_moe": {"attention": 12, "expert": 24, "shared_expert": 6, "dense_mlp": 3},  # layer 2 dense
    "qwen3_moe": {"attention": 12, "expert": 24, "dense_mlp": 3},  # layer 0 dense (mlp_only_layers)
    "olmoe": {"attention": 12, "expert": 36},
    "deepseek_v2": {"attention": 4 * 3, "expert": 24, "shared_expert": 6, "dense_mlp": 3},  # q_proj, kv_a, kv_b, o
    "deepseek_v3": {"attention": 5 * 3, "expert": 24, "shared_expert": 6, "dense_mlp": 3},  # q_a, q_b, kv_a, kv_b, o
    "glm4_moe": {"attention": 12, "expert": 24, "shared_expert": 6, "dense_mlp": 3},
    "gpt_oss": {"attention": 12, "expert": 36},
}


@pytest.fixture(scope="module", params=FAMILIES)
def family_model(request, tmp_path_factory):
    return request.param, build_random_model(tmp_path_factory.mktemp(request.param) / "float", request.param, LAYERS)


def test_role_table(family_model):
    family, path = family_model
    linears = quantizable_linears(AutoConfig.from_pretrained(path))
    assert Counter(info.role for info in linears.values()) == ROLES[family]


def test_calibration_forward_matches_the_full_model(family_model):
    """Layer-by-layer forward (explicit causal / sliding masks) gives the full model's hidden states."""
    family, path = family_model
    samples = torch.randint(0, 320, (2, 80), generator=torch.Generator().manual_seed(1))  # > GPT-OSS's window 64
    ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        hidden = ref(samples, output_hidden_states=True).hidden_states
    model = LayerwiseModel(path)
    for layer in iterate_layers(model, samples, batch_size=2, progress=False):
        if layer.index + 1 < len(hidden) - 1:  # the last hidden state is after the final norm
            want = torch.nn.functional.cosine_similarity(hidden[layer.index], hidden[layer.index + 1], dim=-1)
            assert layer.stats.block_cosine == pytest.approx(float(want.mean()), abs=1e-4)
        if layer.stats.expert_tokens is not None:
            assert layer.stats.expert_tokens.sum() == samples.numel() * 2  # top-2
        units = [unit for batch in layer.hessian_batches(with_loss=False) for unit in batch.units]
        want_units = {info.fused_with or (n,) for n, info in model.linears.items() if info.layer == layer.index}
        assert sorted(units) == sorted(want_units)


def test_plan_quantize_inspect(family_model, tmp_path, capsys):
    family, path = family_model
    calib = CalibrationConfig(texts=[DEFAULT_CALIB], num_samples=4, seq_len=64)
    result = plan_model(path, "optimizer", Budget(avg_bits=3.0), calib=calib, group_size=32, progress=False)
    assert 2.5 < result.footprint.avg_payload_bits <= 3.0 + 1e-9
    ckpt = tmp_path / "moemix"
    quantize_checkpoint(path, result.plan, ckpt, progress=False)
    assert set(dequantized_state_dict(ckpt)) == set(SafetensorsSource(path).names())  # the float model's tensors
    assert main(["inspect", str(ckpt)]) == 0
    out = capsys.readouterr().out
    assert f"architecture: {architecture_for(AutoConfig.from_pretrained(path)).name}" in out
    assert "NativeCpuExpertsKernel" in out or "DequantExpertsKernel" in out


@pytest.mark.parametrize("model_type, nearest", [("qwen3_next", "qwen3_moe"), ("deepseek_v32", "deepseek_v2")])
def test_unsupported_family_names_the_nearest(model_type, nearest):
    config = type("Config", (), {"model_type": model_type})()
    with pytest.raises(
        PlanError, match=f"unsupported architecture model_type='{model_type}' .nearest supported family: {nearest}"
    ):
        architecture_for(config)
