"""Check a mixed plan against uniform quantization at the same bytes before trusting it.

The optimizer ranks modules by an error proxy measured on the calibration windows; when the proxy
misranks (2-bit error is far from the quadratic regime, experts calibration barely reaches), a
mixed plan can lose to one width everywhere. So both are quantized and scored on calibration text
the plan never saw (windows centred between the calibration windows), and the plan that
measures better there is kept: the caller is told when uniform wins.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from vllm_moemix.config.plan import Plan
from vllm_moemix.config.spec import PlanError


@dataclass
class Validation:
    plan_kl: float  # mean KL(float || plan) on the held-out calibration windows
    uniform_kl: float
    uniform: Plan  # the widest uniform plan within the same budget
    checkpoints: dict[str, Path] | None = None  # "plan" / "uniform" -> its quantized checkpoint, when kept

    @property
    def winner(self) -> str:
        return "uniform" if self.uniform_wins else "plan"

    @property
    def uniform_wins(self) -> bool:
        return self.uniform_kl < self.plan_kl

    def describe(self) -> str:
        verdict = "uniform wins: keeping the uniform plan" if self.uniform_wins else "the plan wins"
        return f"held-out calibration check: plan KL {self.plan_kl:.5f}, uniform KL {self.uniform_kl:.5f} ({verdict})"


def holdout_windows(
    tokenizer, text_paths: list[Path], num_samples: int = 32, seq_len: int = 256, num_windows: int = 8
) -> torch.Tensor:
    """`num_windows` windows of the calibration text that overlap none of `calibration_samples`' windows:
    each starts half-way between two calibration window starts."""
    text = "\n\n".join(Path(p).read_text(errors="replace") for p in text_paths)
    ids = torch.tensor(tokenizer(text).input_ids, dtype=torch.int64)
    spacing = (len(ids) - seq_len - 1) / max(num_samples - 1, 1)
    if spacing < 2 * seq_len:
        raise PlanError(
            f"calibration text has {len(ids)} tokens: too few to hold out windows between "
            f"{num_samples} calibration windows of {seq_len}; give more text or fewer --calib-samples"
        )
    gaps = torch.linspace(0, num_samples - 2, min(num_windows, num_samples - 1)).round().long()
    starts = (gaps.double() * spacing + spacing / 2).long()
    return torch.stack([ids[s : s + seq_len] for s in starts])


def holdout_kls(
    model_dir: str | Path, plans: dict[str, Plan], windows: torch.Tensor, quantizer, keep: Path | None = None
) -> dict[str, float]:
    """Mean KL(float || plan) on `windows` for each named plan, each quantized with `quantizer`; the checkpoints
    stay in `keep`/<name> when given (the caller ships the winner instead of quantizing it again)."""
    from vllm_moemix.checkpoint.writer import quantize_checkpoint
    from vllm_moemix.report.evaluate import Windows, compare_to_reference, reference_logprobs

    held = Windows(windows)
    ref = reference_logprobs(model_dir, held)
    work = Path(tempfile.mkdtemp(prefix="moemix-validate-"))
    try:
        kls = {}
        for name, plan in plans.items():
            ckpt = work / "ckpt" if keep is None else keep / name
            quantize_checkpoint(model_dir, plan, ckpt, quantizer=quantizer, progress=False)
            kls[name] = compare_to_reference(ckpt, held, ref).kl
            if keep is None:
                shutil.rmtree(ckpt)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return kls


def validate_against_uniform(
    model_dir: str | Path, plan: Plan, uniform: Plan, windows: torch.Tensor, quantizer, keep: Path | None = None
) -> Validation:
    """Quantize `plan` and `uniform` with `quantizer` and score both against the float model on `windows`; with
    `keep`, both checkpoints are kept there (`Validation.checkpoints`)."""
    kls = holdout_kls(model_dir, {"plan": plan, "uniform": uniform}, windows, quantizer, keep)
    kept = None if keep is None else {name: keep / name for name in ("plan", "uniform")}
    return Validation(kls["plan"], kls["uniform"], uniform, kept)
