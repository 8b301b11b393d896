"""Checkpoint writing: layout, config, dequantized reader, and bad input that writes nothing."""

import json
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from vllm_moemix.checkpoint.format import read_quantization_config
from vllm_moemix.checkpoint.reader import dequantized_state_dict
from vllm_moemix.checkpoint.writer import quantize_checkpoint
from vllm_moemix.config.plan import Plan
from vllm_moemix.config.spec import PlanError, QuantSpec
from vllm_moemix.quant.rtn import quantize_rtn

MIXED = {
    "default": {"bits": 4, "group_size": 32},
    "modules": {
        "model.layers.*.self_attn": 8,
        "model.layers.*.block_sparse_moe.experts.0": 2,
        "model.layers.*.block_sparse_moe.experts.1": {"bits": 3, "sym": True},
        "model.layers.*.block_sparse_moe.experts.2": {"bits": 8, "group_size": 64},
    },
}


def _all_tensors(path):
    out = {}
    for f in path.glob("*.safetensors"):
        out.update(load_file(f))
    return out


def test_layout_config_and_reader(random_mixtral, tmp_path):
    out = tmp_path / "q"
    fp = quantize_checkpoint(random_mixtral, Plan.from_dict(MIXED), out, progress=False, max_shard_bytes=200_000)
    tensors = _all_tensors(out)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(tensors) and len(set(index["weight_map"].values())) > 1  # sharded
    e0 = "model.layers.1.block_sparse_moe.experts.0.w2"
    assert tensors[f"{e0}.qweight"].shape == (128 * 2 // 32, 128) and tensors[f"{e0}.qweight"].dtype == torch.int32
    assert tensors[f"{e0}.scales"].shape == (4, 128) and tensors[f"{e0}.qzeros"].dtype == torch.uint8
    assert "model.layers.0.block_sparse_moe.experts.1.w1.qzeros" not in tensors  # symmetric
    assert f"{e0}.weight" not in tensors and "model.embed_tokens.weight" in tensors
    assert "model.layers.0.block_sparse_moe.gate.weight" in tensors  # routers stay float

    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    resolved = read_quantization_config(qc)
    assert resolved["model.layers.0.self_attn.q_proj"] == QuantSpec(8, 32)
    assert resolved["model.layers.0.block_sparse_moe.experts.2.w1"] == QuantSpec(8, 64)
    assert qc["summary"]["avg_payload_bits"] == pytest.approx(fp.avg_payload_bits, abs=1e-4)
    assert qc["plan"]["modules"]["model.layers.*.self_attn"] == {"bits": 8, "group_size": 32, "sym": False}

    # The reader's float weights are exactly RTN's dequantization of the source.
    with safe_open(random_mixtral / "model.safetensors", framework="pt") as f:
        w = f.get_tensor(f"{e0}.weight")
    deq = dequantized_state_dict(out)
    assert torch.equal(deq[f"{e0}.weight"], quantize_rtn(w, QuantSpec(2, 32)).dequantize())
    assert (deq[f"{e0}.weight"] - w.float()).abs().max() < 0.75 * w.float().abs().max()


def _expect_nothing_written(tmp_path, out):
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if ".partial-" in p.name]


def test_bad_plan_writes_nothing(random_mixtral, tmp_path):
    out = tmp_path / "q"
    for data, message in [
        ({"default": 5}, "unsupported bit width 5"),
        ({"modules": {"model.layers.7.self_attn": 4}}, "'model.layers.7.self_attn', which does not exist"),
        ({"default": {"bits": 4, "group_size": 256}}, "q_proj: group_size 256 does not divide its input dimension 128"),
    ]:
        with pytest.raises(PlanError, match=message):
            quantize_checkpoint(random_mixtral, Plan.from_dict(data), out, progress=False)
        _expect_nothing_written(tmp_path, out)


def _mutated_copy(src, dst, mutate):
    shutil.copytree(src, dst)
    tensors = load_file(dst / "model.safetensors")
    mutate(tensors)
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def test_missing_tensor_and_shape_mismatch(random_mixtral, tmp_path):
    name = "model.layers.1.block_sparse_moe.experts.3.w3.weight"
    missing = _mutated_copy(random_mixtral, tmp_path / "missing", lambda t: t.pop(name))
    with pytest.raises(PlanError, match="experts.3.w3: tensor .*w3.weight is missing"):
        quantize_checkpoint(missing, Plan.uniform(4, 32), tmp_path / "q", progress=False)
    wrong = _mutated_copy(random_mixtral, tmp_path / "wrong", lambda t: t.__setitem__(name, t[name][:64]))
    with pytest.raises(
        PlanError, match=r"experts.3.w3: weight shape \[64, 128\] does not match the config \(\[128, 128\]\)"
    ):
        quantize_checkpoint(wrong, Plan.uniform(4, 32), tmp_path / "q", progress=False)
    _expect_nothing_written(tmp_path, tmp_path / "q")


def test_refuses_to_overwrite_and_pickles(random_mixtral, tmp_path):
    out = tmp_path / "q"
    quantize_checkpoint(random_mixtral, Plan.uniform(4, 32), out, progress=False)
    before = sorted(p.name for p in out.iterdir())
    with pytest.raises(PlanError, match="already holds a checkpoint"):
        quantize_checkpoint(random_mixtral, Plan.uniform(2, 32), out, progress=False)
    assert sorted(p.name for p in out.iterdir()) == before
    with pytest.raises(PlanError, match="already quantized"):  # quantizing a moemix checkpoint again
        quantize_checkpoint(out, Plan.uniform(2, 32), tmp_path / "q2", progress=False)
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    shutil.copy(random_mixtral / "config.json", pickled)
    (pickled / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(PlanError, match="no safetensors weights found .pickle weights are not read"):
        quantize_checkpoint(pickled, Plan.uniform(2, 32), tmp_path / "q3", progress=False)


def test_reader_rejects_unknown_format_version():
    with pytest.raises(PlanError, match="format_version 2 is not supported"):
        read_quantization_config({"quant_method": "moemix", "format_version": 2, "modules": {}})
    with pytest.raises(PlanError, match="quant_method is 'gptq'"):
        read_quantization_config({"quant_method": "gptq"})


def test_cli_quantize_and_inspect(random_qwen2moe, tmp_path):
    plan = tmp_path / "plan.json"
    plan.write_text(
        json.dumps(
            {
                "default": {"bits": 3, "group_size": 32},
                "modules": {"model.layers.0.mlp.shared_expert": 8, "model.layers.0.mlp.experts.1": 2},
            }
        )
    )
    out = tmp_path / "q"
    cli = [sys.executable, "-m", "vllm_moemix.cli"]
    done = subprocess.run(
        cli + ["quantize", str(random_qwen2moe), "--plan", str(plan), "-o", str(out), "--quiet"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "average" in done.stdout
    shown = subprocess.run(cli + ["inspect", str(out)], capture_output=True, text=True, check=True).stdout
    assert "shared_expert" in shown and "dense_mlp" in shown and "average bits per weight" in shown
    failed = subprocess.run(
        cli + ["quantize", str(random_qwen2moe), "--bits", "5", "-o", str(tmp_path / "x")],
        capture_output=True,
        text=True,
    )
    assert failed.returncode == 2 and "'5' is not a width" in failed.stderr and "Traceback" not in failed.stderr


def test_cli_strategies_gptq_and_heatmap(random_mixtral, tmp_path):
    cli = [sys.executable, "-m", "vllm_moemix.cli"]
    calib = tmp_path / "calib.txt"
    calib.write_text("the quick brown fox jumps over the lazy dog. " * 400)
    plan = tmp_path / "plan.json"
    done = subprocess.run(
        cli
        + [
            "plan",
            str(random_mixtral),
            "--strategy",
            "router-norm",
            "--budget",
            "2.5",
            "--group-size",
            "32",
            "-o",
            str(plan),
            "--quiet",
        ],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    assert "router-norm under 2.5 average bits" in done.stdout
    assert json.loads(plan.read_text())["format"] == "moemix-plan"
    out = tmp_path / "q"
    done = subprocess.run(
        cli
        + [
            "quantize",
            str(random_mixtral),
            "--budget",
            "3",
            "--group-size",
            "32",
            "--pin",
            "model.layers.*.self_attn=4",
            "--calib",
            str(calib),
            "--calib-samples",
            "4",
            "-o",
            str(out),
            "--quiet",
        ],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quantizer"] == "gptq" and qc["summary"]["avg_payload_bits"] <= 3.0
    assert qc["modules"]["model.layers.1.self_attn.o_proj"]["bits"] == 4
    heatmap = tmp_path / "bits.png"
    done = subprocess.run(cli + ["inspect", str(out), "--heatmap", str(heatmap)], capture_output=True, text=True)
    assert done.returncode == 0 and heatmap.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    done = subprocess.run(
        cli
        + [
            "plan",
            str(random_mixtral),
            "--budget",
            "1.2",
            "--strategy",
            "uniform",
            "-o",
            str(tmp_path / "p2.json"),
            "--group-size",
            "32",
        ],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 2 and "impossible budget" in done.stderr


@pytest.mark.parametrize(
    "args, message",
    [
        (["--budget", "nan"], "argument --budget: 'nan' must be a positive finite number"),
        (["--budget", "-1"], "argument --budget: '-1' must be a positive finite number"),
        (["--budget-bytes", "1.5e6"], "argument --budget-bytes: '1.5e6' is not a int"),
        (["--budget", "2.5", "--group-size", "0"], "argument --group-size: '0' must be a positive finite number"),
        (["--budget", "2.5", "--group-size", "48"], "argument --group-size: '48' is not a multiple of 32"),
        (["--budget", "2.5", "--pin", "model.layers.*.self_attn=eight"], "'eight' is not a width"),
        (["--budget", "2.5", "--calib", "SHORT"], "tokens; need at least 257 (give more or longer --calib files)"),
        (["--budget", "2.5", "--strategy", "frequent-experts", "--usage", "PROFILE"], "needs an 'experts' object"),
    ],
)
def test_cli_bad_arguments_are_one_line_and_exit_2(args, message, tmp_path, capsys):
    from tests.conftest import TRAINED_MIXTRAL
    from vllm_moemix.cli import main

    (tmp_path / "short.txt").write_text("hi there")
    (tmp_path / "profile.json").write_text(json.dumps({"format": "moemix-routing", "version": 1}))
    args = [{"SHORT": str(tmp_path / "short.txt"), "PROFILE": str(tmp_path / "profile.json")}.get(a, a) for a in args]
    try:
        rc = main(["plan", str(TRAINED_MIXTRAL), "-o", str(tmp_path / "plan.json"), "--quiet", *args])
    except SystemExit as exit_:  # argparse's own errors
        rc = exit_.code
    err = capsys.readouterr().err
    assert rc == 2 and message in err and "Traceback" not in err
    assert not (tmp_path / "plan.json").exists()
