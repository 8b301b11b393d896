"""Every supported MoE family end to end through vLLM: a tiny random model of each (built with transformers' own
config class), quantized with a plan that puts 2, 3, 4 and 8 bits in every MoE layer and 8 bits on attention,
served by vLLM's CPU build with the native kernels.

Asserted per family: which kernel served every MoE layer and every quantized linear (no silent fallback, and
every planned linear reached our method), and teacher-forced logprobs within NATIVE_LOGPROB_TOL of transformers
running the dequantized weights. Mixtral and Qwen2-MoE run on trained models in test_vllm_e2e.py.
"""

from __future__ import annotations

import pytest
from transformers import AutoConfig

from tests.conftest import FAMILIES, build_random_model, family_config
from tests.layers.test_vllm_e2e import assert_close_to_reference, hf_reference, native, vllm_generate
from vllm_moemix.checkpoint.reader import read_plan
from vllm_moemix.checkpoint.writer import quantize_checkpoint
from vllm_moemix.config.arch import ROLE_EXPERT, architecture_for, quantizable_linears
from vllm_moemix.config.plan import Plan

pytestmark = pytest.mark.vllm

LAYERS = 3  # families with dense first layers keep two MoE layers
NEW_FAMILIES = [f for f in FAMILIES if f not in ("mixtral", "qwen2_moe")]


def mixed_plan(family: str) -> Plan:
    """Four widths over the four experts of every MoE layer, 8-bit symmetric attention, 4-bit the rest."""
    experts = f"model.layers.*.{architecture_for(family_config(family, 1, 64, 64, 4)).experts.prefix}"
    return Plan.from_dict(
        {
            "default": {"bits": 4, "group_size": 32},
            "modules": {
                "model.layers.*.self_attn": {"bits": 8, "group_size": 32, "sym": True},
                f"{experts}.0": 2,
                f"{experts}.1": {"bits": 3, "group_size": 32},
                f"{experts}.3": 8,
            },
        }
    )


def expected_kernels(ckpt) -> dict[str, dict[str, int]]:
    """Native kernels on every MoE layer and on every quantized vLLM linear (fused shards count once)."""
    config = AutoConfig.from_pretrained(ckpt)
    resolved = read_plan(ckpt)
    linears = quantizable_linears(config)
    units = {info.fused_with or (name,) for name, info in linears.items() if info.role != ROLE_EXPERT}
    quantized = [u for u in units if all(resolved.get(n) is not None for n in u)]
    moe_layers = {info.layer for info in linears.values() if info.role == ROLE_EXPERT}
    return native(experts=len(moe_layers), linears=len(quantized))


@pytest.mark.parametrize("family", NEW_FAMILIES)
def test_family_serves_mixed_widths(family, tmp_path_factory):
    model = build_random_model(tmp_path_factory.mktemp("float") / family, arch=family, layers=LAYERS)
    ckpt = tmp_path_factory.mktemp("moemix") / family
    quantize_checkpoint(model, mixed_plan(family), ckpt, progress=False)
    reference = hf_reference(ckpt, tmp_path_factory)
    _, forced, served = vllm_generate(ckpt, reference, enforce_eager=True)
    assert served.quant == "moemix"
    assert served.kernels == expected_kernels(ckpt)
    assert_close_to_reference(forced, reference)
