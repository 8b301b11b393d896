"""Issue 13's planner levers: clipping search, (bits, group) choice within kernel support, usage floor,
held-out validation against uniform."""

import pytest
import torch

from vllm_moemix.calibration.layerwise import LayerwiseModel, calibration_samples, iterate_layers
from vllm_moemix.config.plan import Plan
from vllm_moemix.config.spec import SUPPORTED_BITS, QuantSpec, native_cpu_refusal
from vllm_moemix.planning import strategies
from vllm_moemix.planning.pipeline import build_context, plan_model
from vllm_moemix.planning.units import Budget
from vllm_moemix.quant.gptq import HessianAccumulator, gptq_quantize
from vllm_moemix.quant.rtn import _fake_quantize, group_params, quantize_rtn
from vllm_moemix.report.validate import Validation, holdout_windows, validate_against_uniform


@pytest.mark.parametrize("bits", SUPPORTED_BITS)
@pytest.mark.parametrize("sym", [False, True])
def test_clip_search_never_increases_weighted_error(bits, sym):
    gen = torch.Generator().manual_seed(bits)
    w = torch.randn(16, 4, 32, generator=gen) * torch.rand(16, 4, 1, generator=gen)
    w[0, 0, 0] = 12.0  # an outlier that min/max would stretch the whole group for
    x = torch.randn(4, 64, 32, generator=gen) @ (torch.eye(32) + 0.3 * torch.randn(32, 32, generator=gen))
    blocks = x.transpose(1, 2) @ x / 64  # a Hessian block per group
    spec = QuantSpec(bits, 32, sym)

    def error(params):
        delta = w - _fake_quantize(w, *params, spec)
        return torch.einsum("ngi,gij,ngj->ng", delta, blocks, delta)

    searched, minmax = error(group_params(w, spec, blocks, clip_search=True)), error(group_params(w, spec))
    assert torch.all(searched <= minmax + 1e-6)
    if bits <= 3:
        assert searched.sum() < 0.95 * minmax.sum()  # and at low widths it buys something


def test_gptq_without_statistics_clips_like_rtn():
    w = torch.randn(8, 64)
    spec = QuantSpec(2, 32)
    got, want = gptq_quantize(w, None, spec, clip_search=True), quantize_rtn(w, spec, clip_search=True)
    assert torch.equal(got.qweight, want.qweight) and torch.equal(got.scales, want.scales)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_gptq_clip_search_never_raises_any_rows_output_error(bits):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(512, 128, generator=gen) @ (torch.eye(128) + 0.3 * torch.randn(128, 128, generator=gen))
    w = torch.randn(32, 128, generator=gen)
    acc = HessianAccumulator(128)
    acc.add(x)
    row_err = lambda q: ((x @ (w - q.dequantize()).t()) ** 2).sum(0)  # noqa: E731
    spec = QuantSpec(bits, 64)
    searched, plain = row_err(gptq_quantize(w, acc.H, spec, clip_search=True)), row_err(gptq_quantize(w, acc.H, spec))
    assert torch.all(searched <= plain * (1 + 1e-4))
    assert searched.sum() < plain.sum()


@pytest.mark.parametrize("bits", SUPPORTED_BITS)
@pytest.mark.parametrize("group", strategies.GROUP_CHOICES)
def test_every_pair_the_planner_offers_runs_natively(bits, group):
    spec = QuantSpec(bits, group)
    assert native_cpu_refusal(spec) is None
    from vllm_moemix.layers.kernels.base import LinearConfig
    from vllm_moemix.layers.kernels.cpu import NativeCpuLinearKernel, choose_variant

    variant, why = choose_variant()
    if variant is None:
        pytest.skip(why)  # names the instruction-set extensions this CPU lacks
    ok, why = NativeCpuLinearKernel.can_implement(LinearConfig(spec, 256, 256, torch.bfloat16), torch.device("cpu"))
    assert ok, why


@pytest.fixture(scope="module")
def context(random_qwen2moe):
    return build_context(random_qwen2moe, "optimizer", None, group_size=64, sym=False, pins={}, progress=False)


def test_byte_budget_chooses_groups_only_among_kernel_supported_pairs(context, random_qwen2moe, monkeypatch):
    uniform3 = plan_model(random_qwen2moe, "uniform", Budget(avg_bits=3.0), context=context).footprint.nbytes
    result = plan_model(random_qwen2moe, "optimizer", Budget(nbytes=uniform3), context=context)
    resolved = result.plan.resolve(context.linears)
    assert result.footprint.nbytes <= uniform3
    assert all(native_cpu_refusal(s) is None for s in resolved.values() if s is not None)
    assert {s.group_size for s in resolved.values() if s is not None} <= set(strategies.GROUP_CHOICES)
    # a pair the kernels refused would never be offered:
    monkeypatch.setattr(strategies, "native_cpu_refusal", lambda s: "refused" if s.group_size == 32 else None)
    resolved = plan_model(random_qwen2moe, "optimizer", Budget(nbytes=uniform3), context=context).plan.resolve(
        context.linears
    )
    assert all(s.group_size != 32 for s in resolved.values() if s is not None)


def test_average_bits_budget_keeps_the_context_group(context, random_qwen2moe):
    resolved = plan_model(random_qwen2moe, "optimizer", Budget(avg_bits=3.0), context=context).plan.resolve(
        context.linears
    )
    assert {s.group_size for s in resolved.values() if s is not None} == {64}


def test_usage_floor_credits_rarely_routed_experts(random_qwen2moe):
    from transformers import AutoTokenizer

    from vllm_moemix.calibration.layerwise import DEFAULT_CALIB

    model = LayerwiseModel(random_qwen2moe)
    samples = calibration_samples(AutoTokenizer.from_pretrained(random_qwen2moe), [DEFAULT_CALIB], 4, 32)

    def traces(floor):
        layer = next(iterate_layers(model, samples, progress=False, usage_floor=floor))
        mass2 = {}
        for batch in layer.hessian_batches(with_loss=True):
            for (name, *_), h in zip(batch.units, batch.loss):
                if ".experts." in name and name.endswith("down_proj"):
                    mass2[int(name.split(".experts.")[1].split(".")[0])] = float(torch.trace(h))
        return layer.stats.expert_tokens, mass2

    tokens, without = traces(0.0)
    _, with_floor = traces(1.0)  # everyone topped up to the mean
    rarest = int(torch.argmin(tokens))
    assert with_floor[rarest] > without[rarest]
    assert all(with_floor[e] >= without[e] - 1e-6 for e in without)


def test_holdout_windows_avoid_calibration_windows(random_qwen2moe):
    from transformers import AutoTokenizer

    from vllm_moemix.calibration.layerwise import DEFAULT_CALIB

    tok = AutoTokenizer.from_pretrained(random_qwen2moe)
    calib = calibration_samples(tok, [DEFAULT_CALIB], 8, 64)
    held = holdout_windows(tok, [DEFAULT_CALIB], 8, 64, num_windows=4)
    assert held.shape == (4, 64)
    assert not any(torch.equal(h, c) for h in held for c in calib)


def test_validation_falls_back_to_uniform_when_uniform_is_better(random_qwen2moe):
    from transformers import AutoTokenizer

    from vllm_moemix.calibration.layerwise import DEFAULT_CALIB
    from vllm_moemix.quant.quantizers import RTNQuantizer

    windows = holdout_windows(AutoTokenizer.from_pretrained(random_qwen2moe), [DEFAULT_CALIB], 8, 32, num_windows=2)
    bad, good = Plan.uniform(2, 32), Plan.uniform(8, 32)
    check = validate_against_uniform(random_qwen2moe, bad, good, windows, RTNQuantizer())
    assert check.uniform_wins and check.uniform is good and "uniform wins" in check.describe()
    check = validate_against_uniform(random_qwen2moe, good, bad, windows, RTNQuantizer())
    assert not check.uniform_wins and "the plan wins" in check.describe()
    assert Validation(0.1, 0.1, good).uniform_wins is False  # ties keep the plan


@pytest.mark.parametrize("flag, checked", [([], True), (["--validate"], True), (["--no-validate"], False)])
def test_quantize_validates_by_default(random_qwen2moe, tmp_path, capsys, flag, checked):
    """The held-out check runs unless switched off, and its winner is the written checkpoint (not re-quantized)."""
    from vllm_moemix.calibration.layerwise import DEFAULT_CALIB
    from vllm_moemix.checkpoint.reader import read_plan
    from vllm_moemix.cli import main

    args = ["quantize", str(random_qwen2moe), "--budget", "3", "--group-size", "32", "--calib", str(DEFAULT_CALIB)]
    assert main([*args, "--calib-samples", "4", *flag, "--quiet", "-o", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert ("held-out calibration check: plan KL" in out) is checked
    assert read_plan(tmp_path / "out")  # a whole checkpoint where asked
    assert not [p.name for p in tmp_path.iterdir() if p.name != "out"]  # no scratch left beside it


def test_quantize_refuses_a_used_output_before_planning(random_qwen2moe, tmp_path, capsys):
    """A non-empty output directory is refused up front, not after the planner's calibration and GPTQ."""
    from vllm_moemix.cli import main

    used = tmp_path / "used"
    used.mkdir()
    (used / "keep.txt").write_text("mine")
    assert main(["quantize", str(random_qwen2moe), "--budget", "3", "--quiet", "-o", str(used)]) == 2
    err = capsys.readouterr()
    assert "exists and is not an empty directory" in err.err and "held-out" not in err.out
    assert (used / "keep.txt").read_text() == "mine"
