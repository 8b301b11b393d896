"""Layer-at-a-time calibration: Hessians handed out in bounded batches, activations spilled to disk when
memory is short, the memory check refusing before any work, GPTQ reusing the planner's quantizations."""

import pytest
import torch
from transformers import AutoTokenizer

from vllm_moemix.calibration import layerwise
from vllm_moemix.calibration.gptq import CalibratedGPTQ
from vllm_moemix.calibration.layerwise import (
    DEFAULT_CALIB,
    LayerwiseModel,
    calibration_samples,
    check_memory,
    iterate_layers,
    unit_working_bytes,
)
from vllm_moemix.checkpoint.reader import read_plan
from vllm_moemix.checkpoint.source import SafetensorsSource
from vllm_moemix.checkpoint.writer import quantize_checkpoint
from vllm_moemix.config.spec import PlanError
from vllm_moemix.planning.pipeline import plan_model
from vllm_moemix.planning.units import Budget
from vllm_moemix.quant.quantizers import QuantStash


@pytest.fixture(scope="module")
def samples(random_qwen2moe):
    return calibration_samples(AutoTokenizer.from_pretrained(random_qwen2moe), [DEFAULT_CALIB], 4, 32)


def _hessians(model, samples, max_bytes=None):
    out = {}
    for layer in iterate_layers(model, samples, progress=False):
        for batch in layer.hessian_batches(with_loss=True, max_bytes=max_bytes):
            if max_bytes is not None and len(batch.units) > 1:
                k = batch.gptq.shape[-1]
                rows = sum(model.linears[n].out_features for n in batch.units[0])
                assert len(batch.units) * unit_working_bytes(k, rows, True) <= max_bytes
            for unit, g, loss in zip(batch.units, batch.gptq, batch.loss):
                assert unit not in out  # every unit once
                out[unit] = (g.clone(), loss.clone())
        out[layer.index] = layer.stats.block_cosine
    return out


def test_batches_are_bounded_and_equal_one_big_batch(random_qwen2moe, samples):
    model = LayerwiseModel(random_qwen2moe, "cpu")
    small = _hessians(model, samples, max_bytes=3 * unit_working_bytes(128, 256, True))
    big = _hessians(model, samples)
    assert small.keys() == big.keys()
    for key, value in big.items():
        if isinstance(value, tuple):
            torch.testing.assert_close(small[key][0], value[0])
            torch.testing.assert_close(small[key][1], value[1])


def test_spilled_activations_give_the_same_statistics(random_qwen2moe, samples, monkeypatch):
    model = LayerwiseModel(random_qwen2moe, "cpu")
    in_memory = _hessians(model, samples)
    spilled_files = []
    real_save = torch.save

    def save(obj, path, *args, **kwargs):
        spilled_files.append(path)
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(layerwise, "available_memory", lambda: 1 << 10)  # nothing fits: spill
    monkeypatch.setattr(layerwise.torch, "save", save)
    spilled = _hessians(model, samples)
    assert spilled_files and all("moemix-activations-" in str(p) for p in spilled_files)  # the spill path ran
    assert not any(p.exists() for p in spilled_files)  # and cleaned up
    for key, value in in_memory.items():
        if isinstance(value, tuple):
            torch.testing.assert_close(spilled[key][0], value[0])
        else:
            assert spilled[key] == pytest.approx(value)


@pytest.mark.parametrize(
    ("device", "message"),
    [("gpu0", "not a torch device"), ("meta", "runs on cpu or cuda")]
    + ([] if torch.cuda.is_available() else [("cuda", "no CUDA device is visible")]),
)
def test_bad_device_is_a_clear_error(random_qwen2moe, device, message):
    with pytest.raises(PlanError, match=message):
        LayerwiseModel(random_qwen2moe, device)


def test_memory_check_refuses_before_work_with_the_numbers(random_qwen2moe, monkeypatch):
    model = LayerwiseModel(random_qwen2moe, "cpu")
    assert check_memory(model, 8192).startswith("memory: one layer needs ~")
    monkeypatch.setattr(layerwise, "available_memory", lambda: 1 << 20)
    with pytest.raises(PlanError, match=r"not enough cpu memory .* GiB needed .* 0\.0 GiB available"):
        check_memory(model, 8192)


def test_writer_reuses_the_planners_quantizations(random_mixtral, tmp_path):
    """Units the plan puts at the planner's reference width come from the stash, the rest get GPTQ; both
    agree with quantizing everything afresh."""
    stash = QuantStash(tmp_path / "stash")
    result = plan_model(random_mixtral, "optimizer", Budget(avg_bits=2.5), group_size=32, progress=False, stash=stash)
    linears = LayerwiseModel(random_mixtral, "cpu").linears
    resolved = result.plan.resolve(linears)
    assert len(stash) == len(linears)  # every linear once, at the reference width
    reused = {n for n, s in resolved.items() if stash.has(n, s)}
    assert reused and len(reused) < len(resolved)  # a mix: some at the reference width, some not

    calib = [DEFAULT_CALIB]
    with_stash = CalibratedGPTQ(random_mixtral, calib, progress=False, reuse=stash)
    quantize_checkpoint(random_mixtral, result.plan, tmp_path / "reused", quantizer=with_stash, progress=False)
    assert not any(n in reused for unit in with_stash._specs for n in unit)  # GPTQ ran only for the others
    quantize_checkpoint(
        random_mixtral,
        result.plan,
        tmp_path / "fresh",
        quantizer=CalibratedGPTQ(random_mixtral, calib, progress=False),
        progress=False,
    )
    a, b = SafetensorsSource(tmp_path / "reused"), SafetensorsSource(tmp_path / "fresh")
    assert read_plan(tmp_path / "reused") == read_plan(tmp_path / "fresh")
    for name in a.names():
        if name.endswith(".qweight"):
            same = (a.get(name) == b.get(name)).float().mean()
            assert same > 0.99, (name, float(same))
