"""Plans: parsing, glob/parent matching, validation errors that name the module."""

import json

import pytest
from transformers import MixtralConfig, OlmoeConfig, Qwen2MoeConfig, Qwen3MoeConfig

from vllm_moemix.config.arch import ROLE_ATTENTION, ROLE_DENSE, ROLE_EXPERT, ROLE_SHARED, quantizable_linears
from vllm_moemix.config.footprint import footprint
from vllm_moemix.config.plan import Plan, resolved_from_config
from vllm_moemix.config.spec import PlanError, QuantSpec

MIXTRAL = MixtralConfig(
    vocab_size=64,
    hidden_size=128,
    intermediate_size=160,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    num_local_experts=4,
)
EXPERTS = "model.layers.{}.block_sparse_moe.experts.{}.{}"


def test_mixtral_linears_and_shapes():
    linears = quantizable_linears(MIXTRAL)
    assert len(linears) == 2 * (4 + 4 * 3)
    w1 = linears[EXPERTS.format(1, 3, "w1")]
    assert (w1.out_features, w1.in_features, w1.role, w1.layer, w1.expert) == (160, 128, ROLE_EXPERT, 1, 3)
    assert w1.fused_with == (EXPERTS.format(1, 3, "w1"), EXPERTS.format(1, 3, "w3"))
    k = linears["model.layers.0.self_attn.k_proj"]
    assert (k.out_features, k.in_features, k.role) == (64, 128, ROLE_ATTENTION)


def test_qwen2_moe_shared_and_dense_layers():
    config = Qwen2MoeConfig(
        hidden_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_experts=4,
        moe_intermediate_size=32,
        shared_expert_intermediate_size=96,
        intermediate_size=160,
        decoder_sparse_step=1,
        mlp_only_layers=[1],
    )
    linears = quantizable_linears(config)
    roles = {(i.layer, i.role) for i in linears.values()}
    assert (1, ROLE_DENSE) in roles and (1, ROLE_EXPERT) not in roles
    assert linears["model.layers.0.mlp.shared_expert.down_proj"].in_features == 96
    assert linears["model.layers.1.mlp.gate_proj"].out_features == 160
    assert (2, ROLE_SHARED) in roles


@pytest.mark.parametrize(
    "config",
    [
        Qwen3MoeConfig(
            hidden_size=64,
            num_hidden_layers=1,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            num_experts=4,
            moe_intermediate_size=32,
        ),
        OlmoeConfig(
            hidden_size=64,
            num_hidden_layers=1,
            num_attention_heads=4,
            num_key_value_heads=4,
            num_experts=4,
            intermediate_size=32,
        ),
    ],
)
def test_architectures_added_by_data(config):
    linears = quantizable_linears(config)
    assert "model.layers.0.mlp.experts.3.down_proj" in linears
    assert linears["model.layers.0.mlp.experts.3.down_proj"].in_features == 32


def test_unsupported_architecture():
    class Config:
        model_type = "llama"

    with pytest.raises(PlanError, match="unsupported architecture model_type='llama'"):
        quantizable_linears(Config())


def test_globs_parents_and_later_keys_win():
    plan = Plan.from_dict(
        {
            "default": {"bits": 4, "group_size": 32},
            "modules": {
                "model.layers.*.self_attn": 8,
                "model.layers.0.block_sparse_moe.experts.1": 2,
                "model.layers.*.block_sparse_moe.experts.[23].w2": {"bits": 3, "sym": True},
                "model.layers.1.self_attn.o_proj": "bf16",
            },
        }
    )
    resolved = plan.resolve(quantizable_linears(MIXTRAL))
    assert resolved["model.layers.1.self_attn.q_proj"] == QuantSpec(8, 32)
    assert resolved["model.layers.1.self_attn.o_proj"] is None
    assert resolved[EXPERTS.format(0, 1, "w1")] == QuantSpec(2, 32)
    assert resolved[EXPERTS.format(1, 1, "w1")] == QuantSpec(4, 32)
    assert resolved[EXPERTS.format(1, 3, "w2")] == QuantSpec(3, 32, sym=True)
    assert resolved[EXPERTS.format(1, 3, "w1")] == QuantSpec(4, 32)


def test_json_roundtrip(tmp_path):
    plan = Plan.from_dict({"default": 3, "modules": {"model.layers.0": {"bits": 8, "group_size": 64}}})
    path = tmp_path / "plan.json"
    plan.save(path)
    assert Plan.load(path) == plan
    assert json.loads(path.read_text())["format"] == "moemix-plan"


@pytest.mark.parametrize(
    "data, message",
    [
        ({"default": 5}, "unsupported bit width 5"),
        ({"modules": {"model.layers.0.self_attn": 5}}, "model.layers.0.self_attn: unsupported bit width 5"),
        (
            {"modules": {"model.layers.9.self_attn": 4}},
            "plan names module 'model.layers.9.self_attn', which does not exist",
        ),
        ({"default": {"bits": 4, "group_size": 48}}, "group_size must be a positive multiple of 32"),
        (
            {"default": {"bits": 4, "group_size": 64}},
            "experts.0.w2: group_size 64 does not divide its input dimension 160",
        ),
        (
            {"default": 4, "modules": {"model.layers.0.self_attn.k_proj": 2}},
            "fused into one vLLM linear and must share a spec",
        ),
        (
            {"default": {"bits": 4, "group_size": 32}, "modules": {EXPERTS.format(0, 1, "w3"): 8}},
            "fused into one vLLM linear",
        ),
        (
            {
                "default": {"bits": 4, "group_size": 32},
                "modules": {"model.layers.0.block_sparse_moe.experts.0": "bf16"},
            },
            "all quantized or all 'bf16'",
        ),
        ({"version": 2}, "plan version 2 is not supported"),
        ({"modules": {"x": {"bits": 4, "groupsize": 64}}}, r"unknown keys \['groupsize'\]"),
        ({"default": True}, "bits must be an integer"),
        ({"default": 4.0}, "bits must be an integer, got 4.0"),
        ({"default": {"bits": 4.0}}, "unsupported bit width 4.0"),
        ({"default": {"bits": 4, "group_size": 64.0}}, "group_size must be a positive multiple of 32, got 64.0"),
        ({"default": {"bits": 4, "sym": "false"}}, "sym must be true or false, got 'false'"),
    ],
)
def test_invalid_plans_name_the_problem(data, message):
    with pytest.raises(PlanError, match=message):
        Plan.from_dict(data).resolve(quantizable_linears(MIXTRAL))


@pytest.mark.parametrize(
    "value, message",
    [
        ({"bits": 4, "sym": False}, "missing group_size"),
        ({"bits": 4, "group_size": 64}, "missing sym"),
        (4, "expected"),
        ({"bits": 4.0, "group_size": 64, "sym": False}, "unsupported bit width 4.0"),
        ({"bits": 4, "group_size": 64, "sym": "false"}, "sym must be true or false"),
    ],
)
def test_checkpoint_modules_are_parsed_strictly(value, message):
    """A checkpoint's resolved plan must say exactly how each tensor is stored: no defaults, no coercion."""
    with pytest.raises(PlanError, match=f"model.layers.0.self_attn.q_proj: .*{message}"):
        resolved_from_config({"model.layers.0.self_attn.q_proj": value})
    assert resolved_from_config({"x": {"bits": 4, "group_size": 64, "sym": True}, "y": "bf16"}) == {
        "x": QuantSpec(4, 64, sym=True),
        "y": None,
    }


def test_missing_or_broken_plan_file(tmp_path):
    with pytest.raises(PlanError, match="does not exist"):
        Plan.load(tmp_path / "nope.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(PlanError, match="not valid JSON"):
        Plan.load(tmp_path / "bad.json")


def test_footprint_counts_scales_and_zeros():
    linears = quantizable_linears(MIXTRAL)
    plan = Plan.from_dict(
        {"default": {"bits": 2, "group_size": 32, "sym": True}, "modules": {"model.layers.*.self_attn": "bf16"}}
    )
    fp = footprint(plan.resolve(linears), linears)
    expert_weights = 2 * 4 * 3 * 160 * 128
    attn_weights = fp.weights - expert_weights
    assert fp.by_width["2"] == expert_weights * 2 // 8 + expert_weights // 32 * 2  # payload + fp16 scale per 32
    assert fp.by_width["bf16"] == attn_weights * 2
    assert fp.avg_payload_bits == pytest.approx((2 * expert_weights + 16 * attn_weights) / fp.weights)
    assert fp.avg_bits > fp.avg_payload_bits
