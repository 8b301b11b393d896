"""The kernel benchmark runs end to end on a small shape and reports every row (it is not a speed test)."""

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_kernel_benchmark_quick(tmp_path):
    result = subprocess.run([sys.executable, str(REPO / "benchmarks" / "kernels.py"), "--quick", "--out", str(tmp_path)],
                            capture_output=True, text=True, timeout=300, cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    data = json.loads((tmp_path / "kernels.json").read_text())
    rows = {(r["row"], r["tokens"]) for r in data["results"]}
    assert rows == {(row, m) for row in ("vLLM bf16", "vLLM GPTQ-4bit", "moemix 2.5-bit mixed", "moemix 4-bit",
                                         "moemix 2-bit") for m in (1, 4)}
    moemix = [r for r in data["results"] if r["row"].startswith("moemix")]
    assert {r["kernel"] for r in moemix} == {"NativeCpuExpertsKernel"} and all(r["ms"] > 0 for r in moemix)
    assert (tmp_path / "kernels.png").stat().st_size > 0 and "| moemix 2-bit |" in (tmp_path / "kernels.md").read_text()
