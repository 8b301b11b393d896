"""The scale benchmark runs end to end on the tiny shape, and its random models have real checkpoints' tensor names
(it is not a speed test)."""

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_scale_benchmark_quick(tmp_path):
    """One row per mode, each finished with seconds and a peak RSS; table, JSON and plot written."""
    modes = ["rtn", "gptq"]
    result = subprocess.run(
        [
            sys.executable,
            str(REPO / "benchmarks" / "scale.py"),
            "--quick",
            "--out",
            str(tmp_path),
            "--work",
            str(tmp_path / "work"),
            "--modes",
            *modes,
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=REPO,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    data = json.loads((tmp_path / "scale.json").read_text())
    assert [r["mode"] for r in data["rows"]] == modes
    for row in data["rows"]:
        assert row["status"] == "ok", row["stderr_tail"]
        assert row["seconds"] > 0 and row["per_layer_s"] > 0 and row["peak_rss_bytes"] > 0
    md = (tmp_path / "scale.md").read_text()
    assert data["cpu"] in md and "| quick (4 layers) | gptq |" in md
    assert (tmp_path / "scale.png").stat().st_size > 0


def test_real_shape_builder_writes_per_expert_checkpoint_names(tmp_path):
    """Per-expert names and shapes exactly as quantizable_linears expects; the layerwise loader fills the fused
    transformers parameters from them; everything the module tree needs is there and nothing else."""
    from benchmarks.scale import build_real_shape, checkpoint_tensors, shape_config
    from vllm_moemix.calibration.layerwise import LayerwiseModel
    from vllm_moemix.checkpoint.writer import inspect_source
    from vllm_moemix.config.arch import ROLE_EXPERT, quantizable_linears

    model = build_real_shape(tmp_path / "quick", "quick", layers=1)
    config, linears, source = inspect_source(model)
    experts = {f"{n}.weight" for n, info in linears.items() if info.role == ROLE_EXPERT}
    assert experts == {n for n in source.names() if ".experts." in n}
    assert "model.layers.0.mlp.experts.7.gate_proj.weight" in experts and len(experts) == 8 * 3
    assert set(source.names()) == set(checkpoint_tensors(config))
    assert LayerwiseModel(model).load_layer(0) is not None
    stamp = (model / "config.json").stat().st_mtime_ns
    build_real_shape(tmp_path / "quick", "quick", layers=1)
    assert (model / "config.json").stat().st_mtime_ns == stamp  # cached, not rebuilt

    for shape, router, expert in (
        ("mixtral-8x7b", "model.layers.0.block_sparse_moe.gate.weight", "block_sparse_moe.experts.7.w2.weight"),
        ("qwen3-30b-a3b", "model.layers.0.mlp.gate.weight", "mlp.experts.127.down_proj.weight"),
    ):
        config = shape_config(shape, layers=1, vocab_size=128)
        names = checkpoint_tensors(config)  # the meta device: names and shapes only
        for name, info in quantizable_linears(config).items():
            assert names[f"{name}.weight"] == (info.out_features, info.in_features)
        assert router in names and f"model.layers.0.{expert}" in names


def test_baseline_runs_drop_flags_their_cli_does_not_know():
    import os

    from benchmarks.scale import known_flags

    argv = ["py", "-m", "vllm_moemix.cli", "quantize", "m", "--budget", "2.5", "--error-model", "estimate"]
    argv += ["--no-validate", "--from-the-future", "x", "--also-new", "-o", "out"]
    kept = known_flags(argv, REPO, dict(os.environ))
    assert kept == argv[:10] + ["-o", "out"]
