"""The kernel benchmark runs end to end on a small shape and reports every row (it is not a speed test)."""

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_kernel_benchmark_quick(tmp_path):
    """Every row is reported: measured, or (vLLM's AMX-only int4 MoE on other CPUs) marked unavailable with why."""
    from benchmarks.kernels import default_isas, vllm_int4_unavailable

    result = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "kernels.py"), "--quick", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    data = json.loads((tmp_path / "kernels.json").read_text())
    isas = default_isas()
    moemix_rows = [
        f"{name}{f' [{isa}]' if i else ''}"
        for i, isa in enumerate(isas)
        for name in ("moemix 2.5-bit mixed", "moemix 4-bit", "moemix 2-bit")
    ]
    by = {(r["row"], r["tokens"]): r for r in data["results"]}
    assert set(by) == {(row, m) for row in ("vLLM bf16", "vLLM GPTQ-4bit", *moemix_rows) for m in (1, 4)}
    int4_why = vllm_int4_unavailable()
    assert by[("vLLM GPTQ-4bit", 1)].get("unavailable") == int4_why and (
        by[("vLLM GPTQ-4bit", 1)]["ms"] is None
    ) == bool(int4_why)
    md = (tmp_path / "kernels.md").read_text()
    if int4_why:
        assert f"| vLLM GPTQ-4bit | not available on this CPU: {int4_why} |" in md
    for i, isa in enumerate(isas):
        for row in moemix_rows[3 * i : 3 * i + 3]:
            assert by[(row, 1)]["kernel"] == f"NativeCpuExpertsKernel ({isa})" and by[(row, 1)]["ms"] > 0
    assert data["cpu"] in md and (tmp_path / "kernels.png").stat().st_size > 0 and "| moemix 2-bit |" in md
    # of bw against the bandwidth probe timed in turn with the rows; GMAC/s at the largest M
    mixed = by[("moemix 2.5-bit mixed", 1)]
    assert mixed["bandwidth_gbs"] > 0 and mixed["of_bandwidth"] == mixed["gbs"] / mixed["bandwidth_gbs"]
    assert by[("moemix 2-bit", 4)]["gmacs"] > 0 and "bw (M=1)" in md and "GMAC/s (M=4)" in md
    # the int8 roofline: the vendor int8 GEMM measured once per shape (64 rows); below M=16 no share is shown
    peak = mixed["int8_gemm_gmacs"]
    assert peak is None or peak > 0
    assert "of int8 (M=4)" in md and f"| {by[('moemix 2-bit', 4)]['gmacs']:.0f} | n/a |" in md
    assert ("int8 roofline: n/a" if peak is None else f"int8 roofline: {peak:.0f} GMAC/s") in md


def test_consecutive_reps_route_to_other_experts():
    """At M=1 the benchmark's reps cycle through every expert before reusing one (else a small layer runs from
    the cache), and the routed block is half 2-bit, half 3-bit in the mixed layer."""
    import torch

    from benchmarks.kernels import SHAPES, rotated, routing

    shape = SHAPES["qwen3"]
    _, ids = routing(1, shape)
    reps = [set(rotated(ids, rep, shape).flatten().tolist()) for rep in range(shape.kept // shape.top_k)]
    assert all(len(r) == shape.top_k for r in reps) and len(set().union(*reps)) == shape.kept
    assert torch.equal(rotated(ids, shape.kept // shape.top_k, shape), ids)
    assert sorted(e % 2 for e in reps[0]) == [0] * 4 + [1] * 4  # widths cycle (2, 3) by expert id


def test_kernel_benchmark_biases_swigluoai_and_expert_subset(tmp_path):
    """A GPT-OSS-style layer (biases, swigluoai) keeping a subset of its experts: vLLM's bf16 row runs its own
    bias/activation support, its int4 row says why it cannot, and the table says what the subset means."""
    from benchmarks.kernels import SHAPES, vllm_int4_unavailable

    shape = SHAPES["quick-oss"]
    assert (shape.activation, shape.bias, shape.kept, shape.experts) == ("swigluoai", True, 6, 8)
    assert {"dsv3", "gptoss", "glm45air"} <= set(SHAPES)
    result = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "kernels.py"), "--quick", "--shapes", "quick-oss"]
        + ["--isas", "avx2", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    data = json.loads((tmp_path / "kernels.json").read_text())
    by = {(r["row"], r["tokens"]): r for r in data["results"]}
    int4_why = vllm_int4_unavailable(shape)
    assert "SiLU experts without biases only" in int4_why and by[("vLLM GPTQ-4bit", 1)]["unavailable"] == int4_why
    bf16 = by[("vLLM bf16", 1)]
    assert bf16["ms"] > 0 and (bf16["experts"], bf16["experts_stored"]) == (8, 6)
    assert bf16["layer_bytes"] == 4 * bf16["bytes_read"]  # M=1 reads top-2 of 8 experts' bytes, projected to 8
    for row in ("moemix 2.5-bit mixed", "moemix 4-bit", "moemix 2-bit"):
        assert by[(row, 1)]["kernel"] == "NativeCpuExpertsKernel (avx2)" and by[(row, 1)]["ms"] > 0
    md = (tmp_path / "kernels.md").read_text()
    assert "6 of 8 experts in memory, top-2 routed among them" in md
    assert "experts with biases and the swigluoai activation" in md and "| layer GB |" in md
