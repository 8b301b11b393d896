"""Quantizing with calibrated GPTQ keeps about one decoder layer in memory, not the model."""

import json
import subprocess
import sys
import textwrap

from tests.conftest import build_random_model


def test_layerwise_gptq_peak_memory(tmp_path):
    model = build_random_model(tmp_path / "wide", layers=8, hidden=512, inter=1024, experts=8)
    calib = tmp_path / "calib.txt"
    calib.write_text("the quick brown fox jumps over the lazy dog. " * 300)
    script = textwrap.dedent(f"""
        import json, resource, torch
        from vllm_moemix.checkpoint.writer import quantize_checkpoint
        from vllm_moemix.config.plan import Plan
        from vllm_moemix.calibration.gptq import CalibratedGPTQ
        from vllm_moemix.calibration.layerwise import LayerwiseModel
        torch.set_num_threads(1)
        LayerwiseModel({str(model)!r})  # imports and allocator warm-up outside the measurement
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        quantizer = CalibratedGPTQ({str(model)!r}, [{str(calib)!r}], num_samples=4, seq_len=64, progress=False)
        quantize_checkpoint({str(model)!r}, Plan.uniform(3, 64), {str(tmp_path / "out")!r}, quantizer=quantizer,
                            progress=False)
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print(json.dumps({{"delta_kib": after - before}}))
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    delta_mib = json.loads(done.stdout.strip().splitlines()[-1])["delta_kib"] / 1024
    params_per_layer = 8 * 3 * 512 * 1024 + 4 * 512 * 512  # experts + attention (upper bound)
    layer_f32_mib = params_per_layer * 4 / 2**20  # ~50 MiB
    model_f32_mib = 8 * layer_f32_mib  # ~400 MiB: what loading the whole model in float32 would cost
    hessians_mib = 8 * (2 * 512**2 + 3 * 1024**2) * 4 / 2**20  # ~104 MiB, documented in calibration.py
    print(
        f"peak RSS growth {delta_mib:.0f} MiB; one float32 layer {layer_f32_mib:.0f} MiB, "
        f"its Hessians {hessians_mib:.0f} MiB, whole model float32 {model_f32_mib:.0f} MiB"
    )
    # Peak growth: one float32 layer + its Hessians + output shard buffer (~40 MiB at 3 bits), with slack.
    assert delta_mib < layer_f32_mib + hessians_mib + 120, delta_mib
    assert delta_mib < 0.75 * model_f32_mib, delta_mib
