"""Shared fixtures: tiny random-weight models for fast tests; the trained models live in models/."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

REPO = Path(__file__).resolve().parents[1]
TRAINED_MIXTRAL = REPO / "models" / "tiny-mixtral"
TRAINED_QWEN2MOE = REPO / "models" / "tiny-qwen2moe"


FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v2", "deepseek_v3", "glm4_moe", "gpt_oss")
"""Every architecture family moemix supports, as `build_random_model` builds a tiny one of each."""


def family_config(arch: str, layers: int, hidden: int, inter: int, experts: int):
    """A transformers config of family `arch` at toy sizes, with what vLLM's CPU build needs to serve it: MLA at
    its real latent sizes (kv_lora_rank 512, rope head 64), grouped routing set, DeepSeek-V3's `noaux_tc`
    router (real V3 checkpoints carry it; transformers does not write it, and vLLM then has no
    `e_score_correction_bias` to load), a dense first layer where the family has them."""
    import transformers as T

    common = dict(
        vocab_size=VOCAB,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    )
    routed = dict(num_experts_per_tok=2)
    deepseek = dict(
        moe_intermediate_size=inter,
        intermediate_size=2 * inter,
        n_routed_experts=experts,
        n_shared_experts=1,
        first_k_dense_replace=1,
        n_group=2,
        topk_group=1,
        kv_lora_rank=512,
        qk_rope_head_dim=64,
        qk_nope_head_dim=32,
        v_head_dim=32,
        **routed,
        **{**common, "num_key_value_heads": common["num_attention_heads"]},  # MLA: one KV head per head
    )
    if arch == "mixtral":
        return T.MixtralConfig(intermediate_size=inter, num_local_experts=experts, **routed, **common)
    if arch == "qwen2_moe":
        return T.Qwen2MoeConfig(
            moe_intermediate_size=inter,
            shared_expert_intermediate_size=inter,
            intermediate_size=inter,
            num_experts=experts,
            decoder_sparse_step=1,
            mlp_only_layers=[layers - 1],
            **routed,
            **common,
        )
    if arch == "qwen3_moe":
        return T.Qwen3MoeConfig(
            moe_intermediate_size=inter,
            intermediate_size=inter,
            num_experts=experts,
            decoder_sparse_step=1,
            mlp_only_layers=[0],
            head_dim=32,
            **routed,
            **common,
        )
    if arch == "olmoe":
        return T.OlmoeConfig(intermediate_size=inter, num_experts=experts, eos_token_id=1, **routed, **common)
    if arch == "deepseek_v2":  # V2-Lite style: q without a low-rank pair
        return T.DeepseekV2Config(q_lora_rank=None, topk_method="group_limited_greedy", **deepseek)
    if arch == "deepseek_v3":
        return T.DeepseekV3Config(q_lora_rank=hidden, topk_method="noaux_tc", **deepseek)
    if arch == "glm4_moe":
        return T.Glm4MoeConfig(
            **{k: v for k, v in deepseek.items() if "lora" not in k and "head_dim" not in k},
            head_dim=32,
            attention_bias=True,
        )
    if arch == "gpt_oss":
        return T.GptOssConfig(
            intermediate_size=inter, num_local_experts=experts, head_dim=32, sliding_window=64, **routed, **common
        )
    raise ValueError(f"unknown family {arch!r}; one of {FAMILIES}")


def build_random_model(
    out: Path,
    arch: str = "mixtral",
    layers: int = 2,
    hidden: int = 128,
    inter: int = 128,
    experts: int = 4,
    seed: int = 0,
) -> Path:
    """A small random-weight HF checkpoint in bf16 safetensors (fast to quantize and to mutate)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(family_config(arch, layers, hidden, inter, experts))
    if arch == "gpt_oss":  # transformers leaves GPT-OSS's stacked experts and sinks uninitialised
        for name, param in model.named_parameters():
            if "experts" in name or "sinks" in name:
                torch.nn.init.normal_(param, std=0.02 if "bias" not in name else 0.5)
    model.to(torch.bfloat16).save_pretrained(out, safe_serialization=True)
    byte_tokenizer().save_pretrained(out)
    return out


VOCAB = 320


def byte_tokenizer():
    """A byte-level BPE small enough for the random models' vocabulary, trained on a pangram."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB, special_tokens=["<s>", "</s>", "<unk>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(["the quick brown fox jumps over the lazy dog " * 20], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


@pytest.fixture(scope="session")
def random_mixtral(tmp_path_factory) -> Path:
    return build_random_model(tmp_path_factory.mktemp("models") / "rand-mixtral")


@pytest.fixture(scope="session")
def random_qwen2moe(tmp_path_factory) -> Path:
    return build_random_model(tmp_path_factory.mktemp("models") / "rand-qwen2moe", arch="qwen2_moe")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_server(args: list[str], workdir: Path) -> tuple[subprocess.Popen, int, Path]:
    """`python -m server serve ARGS` on a free loopback port, its output in workdir/server.log (not waited for)."""
    port = free_port()
    log = workdir / "server.log"
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1", PYTHONUNBUFFERED="1")
    argv = [sys.executable, "-m", "server", "serve", *args, "--host", "127.0.0.1", "--port", str(port)]
    with open(log, "wb") as out:
        proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
    return proc, port, log


@pytest.fixture(scope="session")
def demo_server(tmp_path_factory):
    """`python -m server serve` on a free loopback port: tiny-mixtral quantized with the demo plan (RTN).

    Shared by the deploy and load-test suites (one engine start). Yields (url, port)."""
    from vllm_moemix.checkpoint.writer import quantize_checkpoint
    from vllm_moemix.config.plan import Plan

    tmp = tmp_path_factory.mktemp("demo-server")
    ckpt = tmp / "tiny-moemix"
    quantize_checkpoint(TRAINED_MIXTRAL, Plan.load(REPO / "plans" / "tiny-mixtral-mixed.json"), ckpt, progress=False)
    args = [f"tiny-moemix={ckpt}", "--max-model-len", "256", "--max-num-seqs", "4", "--max-queue", "8"]
    proc, port, log = launch_server([*args, "--enforce-eager"], tmp)
    url = f"http://127.0.0.1:{port}"
    wait_healthy(proc, url, log, timeout=240)
    yield url, port
    stop_server(proc)


def wait_healthy(proc: subprocess.Popen, url: str, log: Path, timeout: float) -> None:
    """Poll GET /health until 200; fail with the server log's tail if it exits or times out."""
    import httpx

    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            pytest.fail(f"server exited with {proc.returncode} during start-up:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(url + "/health", timeout=5).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"server not healthy after {timeout:.0f} s:\n{log.read_text()[-3000:]}")
        time.sleep(1)


def stop_server(proc: subprocess.Popen) -> None:
    """SIGTERM (graceful drain), then kill after 60 s."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
