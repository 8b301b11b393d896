"""Calibrated GPTQ holds one decoder layer plus a bounded batch of Hessians: its memory beyond the float layer
does not grow with the number of experts. (The writer's shard buffer, bounded by max_shard_bytes, is set small
here so that the output's size does not count.)"""

import json
import subprocess
import sys
import textwrap

from tests.conftest import build_random_model

HIDDEN, INTER = 384, 768


def peak_growth_mib(tmp_path, experts: int) -> float:
    """Peak RSS growth (MiB) of quantizing a 2-layer model with calibrated GPTQ, in a fresh process."""
    model = build_random_model(tmp_path / f"e{experts}", layers=2, hidden=HIDDEN, inter=INTER, experts=experts)
    calib = tmp_path / "calib.txt"
    calib.write_text("the quick brown fox jumps over the lazy dog. " * 300)
    script = textwrap.dedent(f"""
        import json, os, threading, time, torch
        from vllm_moemix.calibration import layerwise
        from vllm_moemix.checkpoint.writer import quantize_checkpoint
        from vllm_moemix.config.plan import Plan
        from vllm_moemix.calibration.gptq import CalibratedGPTQ
        torch.set_num_threads(1)
        layerwise.HESSIAN_BATCH_BYTES = 8 << 20  # a few experts per batch at this size
        layerwise.LayerwiseModel({str(model)!r})  # imports and allocator warm-up outside the measurement
        page = os.sysconf("SC_PAGE_SIZE")
        rss = lambda: int(open("/proc/self/statm").read().split()[1]) * page
        before, peak, done = rss(), [0], threading.Event()

        def sample():  # current RSS, not ru_maxrss: the warm-up's transient peak must not hide ours
            while not done.is_set():
                peak[0] = max(peak[0], rss())
                time.sleep(0.002)

        sampler = threading.Thread(target=sample)
        sampler.start()
        quantizer = CalibratedGPTQ({str(model)!r}, [{str(calib)!r}], num_samples=4, seq_len=64, progress=False)
        quantize_checkpoint({str(model)!r}, Plan.uniform(3, 64), {str(tmp_path / f"out{experts}")!r},
                            quantizer=quantizer, progress=False, max_shard_bytes=1 << 20)
        done.set()
        sampler.join()
        print(json.dumps({{"delta_mib": (peak[0] - before) / 2**20}}))
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])["delta_mib"]


def test_calibration_memory_does_not_grow_with_experts(tmp_path):
    def float_layer_mib(experts: int) -> float:
        """The layer the calibration forward holds in float32, and its quantized form the writer is handed."""
        weights = experts * 3 * HIDDEN * INTER + 4 * HIDDEN * HIDDEN
        return weights * (4 + 3 / 8 + 3 / 64) / 2**20  # float32; 3-bit codes + fp16 scale and zero per 64

    few, many = peak_growth_mib(tmp_path, 8), peak_growth_mib(tmp_path, 64)
    beyond_few, beyond_many = few - float_layer_mib(8), many - float_layer_mib(64)
    # Before batching, every expert's Hessians were alive at once: 64 x 5.6 MiB = 360 MiB at 64 experts.
    all_hessians_64 = 64 * (2 * HIDDEN**2 + 2 * INTER**2) * 4 / 2**20
    print(
        f"peak growth 8 experts {few:.0f} MiB, 64 experts {many:.0f} MiB; beyond the float layer "
        f"{beyond_few:.0f} vs {beyond_many:.0f} MiB (all 64 experts' Hessians: {all_hessians_64:.0f} MiB)"
    )
    # 8x the experts may add RSS noise (tens of MiB between runs), not what keeping every Hessian would cost.
    assert beyond_many - beyond_few < 0.4 * all_hessians_64, (beyond_few, beyond_many)
