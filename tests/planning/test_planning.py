"""Scorers on hand-built weights with known answers; knapsack optimality; strategies under budgets."""

import itertools

import pytest
import torch

from vllm_moemix.calibration.layerwise import LayerwiseModel, iterate_layers
from vllm_moemix.config.spec import PlanError, QuantSpec
from vllm_moemix.planning import knapsack, scores
from vllm_moemix.planning.pipeline import build_context, pins_from_modules, plan_model
from vllm_moemix.planning.strategies import STRATEGIES
from vllm_moemix.planning.units import Budget, planning_units

# ---- scorers ---------------------------------------------------------------------------------


def test_outlier_score_finds_the_spiky_column():
    w = torch.ones(8, 4)
    w[3, 2] = 9.0  # column 2: max 9, mean (7 + 9) / 8 = 2
    assert scores.outlier_score(w) == pytest.approx(4.5)
    assert scores.outlier_score(torch.ones(8, 4)) == pytest.approx(1.0)


def test_kurtosis_of_known_distributions():
    two_point = torch.tensor([-1.0, 1.0] * 50)  # kurtosis 1
    assert scores.kurtosis(two_point) == pytest.approx(1.0)
    spike = torch.zeros(1000)
    spike[0] = 1.0  # one outlier: very heavy tail
    assert scores.kurtosis(spike) > 100
    assert scores.kurtosis(torch.randn(200_000)) == pytest.approx(3.0, abs=0.1)


def test_max_intra_neuron_variance_picks_the_noisiest_row():
    w1 = torch.zeros(3, 4)
    w1[1] = torch.tensor([1.0, -1.0, 1.0, -1.0])  # unbiased variance 4/3
    assert scores.max_intra_neuron_variance(w1) == pytest.approx(4 / 3)


def test_router_norm_prefers_least_changed_rows():
    init = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    final = torch.tensor([[3.0, 0.0], [1.1, 0.0], [0.0, 2.0]])  # norm changes 2, 0.1, 1
    assert torch.argsort(scores.router_norm_scores(final, init), descending=True).tolist() == [1, 2, 0]
    assert torch.argsort(scores.router_norm_scores(final), descending=True).tolist() == [1, 2, 0]  # small final norm


def test_maxvar_lets_a_high_variance_expert_move_up():
    assert scores.apply_maxvar([0, 1, 2], [1.0, 5.0, 1.0]) == [1, 0, 2]  # 5 > 3 * 1
    assert scores.apply_maxvar([0, 1, 2], [1.0, 2.0, 1.0]) == [0, 1, 2]


def test_block_importance_and_hessian_error():
    assert scores.block_importance(0.9) == pytest.approx(0.1)
    w, q = torch.tensor([[1.0, 2.0]]), torch.tensor([[0.0, 2.0]])
    h = torch.tensor([[3.0, 0.0], [0.0, 100.0]])
    assert scores.hessian_error(w, q, h) == pytest.approx(3.0)  # only the first input differs


def test_heuristic_levels():
    assert scores.heuristic_levels(2.5) == (2, 4)
    assert scores.heuristic_levels(4.0) == (4, 8)


# ---- knapsack ------------------------------------------------------------------------------------


def test_knapsack_matches_brute_force():
    gen = torch.Generator().manual_seed(0)
    options = {}
    for unit in range(6):
        costs = [1, 2, 3, 6]
        losses = sorted((torch.rand(4, generator=gen) * 10).tolist(), reverse=True)
        options[unit] = [knapsack.Option(c, c, l) for c, l in zip(costs, losses)]
    for limit in (8, 12, 17, 25):
        chosen = knapsack.solve(options, limit)
        assert sum(o.cost for o in chosen.values()) <= limit
        best = min(
            sum(o.loss for o in combo)
            for combo in itertools.product(*options.values())
            if sum(o.cost for o in combo) <= limit
        )
        assert sum(o.loss for o in chosen.values()) <= best * 1.15 + 1e-9


def test_knapsack_impossible_budget():
    with pytest.raises(PlanError, match="impossible budget: the cheapest plan needs 4"):
        knapsack.solve({0: [knapsack.Option(2, 2, 1.0)], 1: [knapsack.Option(2, 2, 1.0)]}, 3)


# ---- strategies on a small random model ------------------------------------------------------------


@pytest.fixture(scope="module")
def data_context(random_qwen2moe):
    return build_context(random_qwen2moe, "optimizer", None, group_size=32, sym=False, pins={}, progress=False)


@pytest.mark.parametrize("fixture", ["random_qwen2moe", "random_mixtral"])
def test_calibrated_layers_match_full_forward(fixture, request):
    from transformers import AutoModelForCausalLM

    path = request.getfixturevalue(fixture)
    model = LayerwiseModel(path)
    samples = torch.randint(0, 320, (3, 24), generator=torch.Generator().manual_seed(1))
    ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    ref.config._attn_implementation = "sdpa"
    hidden = ref(samples, output_hidden_states=True).hidden_states
    for layer in iterate_layers(model, samples, batch_size=2, progress=False):
        index, stats = layer.index, layer.stats
        if index + 1 < len(hidden) - 1:  # the last hidden state is after the final norm
            want = torch.nn.functional.cosine_similarity(hidden[index], hidden[index + 1], dim=-1).mean()
            assert stats.block_cosine == pytest.approx(float(want), abs=1e-4)
        if stats.expert_tokens is not None:
            assert stats.expert_tokens.sum() == samples.numel() * 2  # top-2
        batches = list(layer.hessian_batches(with_loss=True))
        units = [unit for batch in batches for unit in batch.units]
        want_units = {info.fused_with or (name,) for name, info in model.linears.items() if info.layer == index}
        assert sorted(units) == sorted(want_units)  # every unit once, one Hessian per distinct input


@pytest.mark.parametrize("name", sorted(STRATEGIES))
@pytest.mark.parametrize("avg_bits", [2.5, 3.0])
def test_every_strategy_respects_the_budget(data_context, random_qwen2moe, name, avg_bits):
    result = plan_model(random_qwen2moe, name, Budget(avg_bits=avg_bits), context=data_context)
    assert result.footprint.avg_payload_bits <= avg_bits + 1e-9
    assert result.footprint.avg_payload_bits >= 2.0
    if name != "uniform":
        assert result.footprint.avg_payload_bits > avg_bits - 0.5  # spends most of it


def test_optimizer_beats_uniform_on_its_own_objective(data_context, random_qwen2moe):
    def total_error(strategy):
        result = plan_model(random_qwen2moe, strategy, Budget(avg_bits=3.0), context=data_context)
        resolved = result.plan.resolve(data_context.linears)
        return sum(data_context.errors[u][resolved[u.names[0]]] for u in data_context.units)

    assert total_error("optimizer") < total_error("uniform")


def test_bytes_budget_counts_scales_and_zeros(data_context, random_qwen2moe):
    uniform3 = plan_model(random_qwen2moe, "uniform", Budget(avg_bits=3.0), context=data_context).footprint.nbytes
    result = plan_model(random_qwen2moe, "optimizer", Budget(nbytes=uniform3), context=data_context)
    assert result.footprint.nbytes <= uniform3


def test_pins_are_constraints(data_context, random_qwen2moe):
    pins = pins_from_modules({"model.layers.*.self_attn": QuantSpec(8, 32)}, data_context.units)
    data_context.pins = pins
    try:
        for name in ("optimizer", "router-norm"):
            result = plan_model(random_qwen2moe, name, Budget(avg_bits=3.75), context=data_context)
            resolved = result.plan.resolve(data_context.linears)
            assert resolved["model.layers.1.self_attn.o_proj"] == QuantSpec(8, 32)
            assert result.footprint.avg_payload_bits <= 3.75
        with pytest.raises(PlanError, match="impossible budget"):  # attention alone at 8 bits needs more
            plan_model(random_qwen2moe, "optimizer", Budget(avg_bits=3.0), context=data_context)
    finally:
        data_context.pins = {}
    with pytest.raises(PlanError, match="covers part of fused"):
        pins_from_modules({"model.layers.0.self_attn.q_proj": QuantSpec(8)}, data_context.units)
    with pytest.raises(PlanError, match="impossible budget"):
        plan_model(random_qwen2moe, "optimizer", Budget(avg_bits=1.5), context=data_context)


def test_frequent_experts_promotes_the_most_routed(data_context, random_qwen2moe):
    stats = data_context.layer_stats[0]
    saved = stats.expert_tokens
    stats.expert_tokens = torch.tensor([1.0, 50.0, 2.0, 3.0])
    try:
        result = plan_model(random_qwen2moe, "frequent-experts", Budget(avg_bits=2.3), context=data_context)
        resolved = result.plan.resolve(data_context.linears)
        assert resolved["model.layers.0.mlp.experts.1.gate_proj"].bits == 4
        assert resolved["model.layers.0.mlp.experts.0.gate_proj"].bits == 2
    finally:
        stats.expert_tokens = saved


def test_units_group_fused_linears(data_context):
    keys = {u.key for u in planning_units(data_context.linears)}
    assert "model.layers.0.self_attn.{q_proj,k_proj,v_proj}" in keys
    assert "model.layers.0.mlp.experts.2.{gate_proj,up_proj}" in keys
    assert "model.layers.0.mlp.experts.2.down_proj" in keys


def test_serving_usage_profile_drives_frequent_experts(random_qwen2moe, tmp_path):
    import json

    from vllm_moemix.config.routing_profile import load_profile, merge

    per_rank = [
        [
            {
                "layer": "model.layers.0.mlp.experts",
                "experts": [0, 1, 2, 3],
                "tokens": [1, 2, 90, 3],
                "bits": [2, 2, 4, 2],
            }
        ],
        [
            {
                "layer": "model.layers.1.mlp.experts",
                "experts": [0, 1, 2, 3],
                "tokens": [50, 1, 1, 1],
                "bits": [2, 2, 2, 2],
            }
        ],
    ]
    path = tmp_path / "routing.json"
    path.write_text(json.dumps(merge(per_rank)))
    usage = load_profile(path)
    assert usage[0][2] == 90 and usage[1][0] == 50  # merged across ranks
    result = plan_model(
        random_qwen2moe, "frequent-experts", Budget(avg_bits=2.3), group_size=32, usage=usage, progress=False
    )
    resolved = result.plan.resolve(quantizable_linears_of(random_qwen2moe))
    assert resolved["model.layers.0.mlp.experts.2.gate_proj"].bits == 4
    assert resolved["model.layers.0.mlp.experts.0.gate_proj"].bits == 2
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(PlanError, match="not a moemix routing profile"):
        load_profile(tmp_path / "bad.json")


def quantizable_linears_of(path):
    from transformers import AutoConfig

    from vllm_moemix.config.arch import quantizable_linears

    return quantizable_linears(AutoConfig.from_pretrained(path))
