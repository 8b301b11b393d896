"""Nothing wrong gets in: corrupt moemix checkpoints through a real vLLM load, each refused with the problem named.

One good checkpoint (tiny-mixtral, 4-bit group 64 with zero points) is copied and broken in one way per case:
the plan disagreeing with the stored tensors (bits or group size, experts and linears, both directions),
wrong dtypes, missing and duplicate tensors, broken shards and indexes, pickle-only weights, malformed
quantization_config. One child process (vLLM in-process: VLLM_ENABLE_V1_MULTIPROCESSING=0) tries every
case with `LLM(...)` and reports the error; each must fail, and name the module/file and what is wrong.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.conftest import TRAINED_MIXTRAL

pytestmark = pytest.mark.vllm

PLAN = {"default": {"bits": 4, "group_size": 64}}
L = "model.layers.{}.block_sparse_moe.experts.{}.{}"
ATTN = "model.layers.{}.self_attn.{}"
INDEX = "model.safetensors.index.json"


def set_modules(**specs) -> Callable[[Path], None]:
    """Rewrite entries of quantization_config.modules (keys with '/' for '.')."""

    def apply(ckpt: Path) -> None:
        config = json.loads((ckpt / "config.json").read_text())
        for name, value in specs.items():
            config["quantization_config"]["modules"][name.replace("/", ".")] = value
        (ckpt / "config.json").write_text(json.dumps(config))

    return apply


def spec(bits=4, group_size=64, sym=False) -> dict:
    return {"bits": bits, "group_size": group_size, "sym": sym}


def edit_tensors(fn: Callable[[dict[str, torch.Tensor]], None], name: str) -> Callable[[Path], None]:
    """Apply fn to the tensors of the shard holding `name` (and keep the index truthful)."""

    def apply(ckpt: Path) -> None:
        shard = ckpt / json.loads((ckpt / INDEX).read_text())["weight_map"][name]
        tensors = load_file(shard)
        fn(tensors)
        save_file(tensors, shard, metadata={"format": "pt"})
        index = json.loads((ckpt / INDEX).read_text())
        index["weight_map"] = {k: v for k, v in index["weight_map"].items() if k != name or name in tensors}
        (ckpt / INDEX).write_text(json.dumps(index))

    return apply


def retype(name: str, dtype: torch.dtype) -> Callable[[Path], None]:
    return edit_tensors(lambda t: t.__setitem__(name, t[name].to(dtype)), name)


def duplicate(name: str) -> Callable[[Path], None]:
    """A second shard holding a copy of `name`; the index points there, the first shard keeps its copy."""

    def apply(ckpt: Path) -> None:
        index = json.loads((ckpt / INDEX).read_text())
        tensors = load_file(ckpt / index["weight_map"][name])
        save_file({name: tensors[name]}, ckpt / "extra.safetensors", metadata={"format": "pt"})
        index["weight_map"][name] = "extra.safetensors"
        (ckpt / INDEX).write_text(json.dumps(index))

    return apply


def truncate_shard(ckpt: Path) -> None:
    shard = sorted(ckpt.glob("*.safetensors"))[0]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) - 4096])


def write_index(text: str) -> Callable[[Path], None]:
    return lambda ckpt: (ckpt / INDEX).write_text(text)


def escape_index(ckpt: Path) -> None:
    index = json.loads((ckpt / INDEX).read_text())
    name = next(iter(index["weight_map"]))
    shutil.copy(ckpt / index["weight_map"][name], ckpt.parent / "outside.safetensors")
    index["weight_map"][name] = "../outside.safetensors"
    (ckpt / INDEX).write_text(json.dumps(index))


def pickle_only(ckpt: Path) -> None:
    state = {}
    for shard in ckpt.glob("*.safetensors"):
        state.update(load_file(shard))
        shard.unlink()
    (ckpt / INDEX).unlink()
    torch.save(state, ckpt / "pytorch_model.bin")


def set_quantization_config(value) -> Callable[[Path], None]:
    def apply(ckpt: Path) -> None:
        config = json.loads((ckpt / "config.json").read_text())
        config["quantization_config"] = value(config["quantization_config"]) if callable(value) else value
        (ckpt / "config.json").write_text(json.dumps(config))

    return apply


def with_module(value):
    def change(qc: dict) -> dict:
        qc["modules"][ATTN.format(1, "o_proj")] = value
        return qc

    return change


E13 = L.format(1, 3, "w2")
CASES: dict[str, tuple[Callable[[Path], None], list[str]]] = {
    "expert w2: plan 2-bit, stored 4": (
        set_modules(**{E13: spec(2)}),
        [f"{E13}.qweight", "stored as 4-bit, plan says 2-bit"],
    ),
    "expert w1/w3: plan 8-bit, stored 4": (
        set_modules(**{L.format(0, 5, "w1"): spec(8), L.format(0, 5, "w3"): spec(8)}),
        [L.format(0, 5, "w1") + ".qweight", "stored as 4-bit, plan says 8-bit"],
    ),
    "linear o_proj: plan 2-bit, stored 4": (
        set_modules(**{ATTN.format(2, "o_proj"): spec(2)}),
        [ATTN.format(2, "o_proj") + ".qweight", "stored as 4-bit, plan says 2-bit"],
    ),
    "fused qkv: plan 8-bit, stored 4": (
        set_modules(**{ATTN.format(0, p): spec(8) for p in ("q_proj", "k_proj", "v_proj")}),
        [ATTN.format(0, "qkv_proj") + ".qweight", "stored as 4-bit, plan says 8-bit"],
    ),
    "expert group: plan 32, stored 64": (
        set_modules(**{L.format(1, 2, "w2"): spec(group_size=32)}),
        [L.format(1, 2, "w2") + ".", "stored with group size 64, plan says 32"],
    ),
    "linear group: plan 128, stored 64": (
        set_modules(**{ATTN.format(3, "o_proj"): spec(group_size=128)}),
        [ATTN.format(3, "o_proj") + ".", "stored with group size 64, plan says 128"],
    ),
    "plan symmetric, zeros stored": (
        set_modules(**{L.format(1, 4, "w2"): spec(sym=True)}),
        [L.format(1, 4, ""), "zero points but the plan says symmetric"],
    ),
    "qweight stored as float32": (
        retype(L.format(1, 0, "w1") + ".qweight", torch.float32),
        [L.format(1, 0, "w1") + ".qweight", "stored as torch.float32, the format says torch.int32"],
    ),
    "scales stored as bf16": (
        retype(L.format(1, 0, "w2") + ".scales", torch.bfloat16),
        [L.format(1, 0, "w2") + ".scales", "the format says torch.float16"],
    ),
    "linear qzeros stored as int32": (
        retype(ATTN.format(0, "o_proj") + ".qzeros", torch.int32),
        [ATTN.format(0, "o_proj") + ".qzeros", "stored as torch.int32, the format says torch.uint8"],
    ),
    "missing tensor": (
        edit_tensors(lambda t: t.pop(L.format(2, 4, "w2") + ".qzeros"), L.format(2, 4, "w2") + ".qzeros"),
        ["model.layers.2.block_sparse_moe.experts", "missing tensors: local expert 4 w2.qzeros"],
    ),
    "duplicate tensor": (
        duplicate(L.format(2, 6, "w1") + ".scales"),
        ["model.layers.2.block_sparse_moe.experts", "local expert 6 w1.scales (loaded 2 times)"],
    ),
    "truncated shard": (truncate_shard, ["unreadable safetensors file"]),
    "index not JSON": (write_index("{not json"), [INDEX, "not a valid safetensors index"]),
    "index without weight_map": (write_index("[]"), [INDEX, "not a valid safetensors index"]),
    "index shard outside the directory": (escape_index, ["'../outside.safetensors' is not a .safetensors file inside"]),
    "pickle weights only": (pickle_only, ["no safetensors weights found (pickle weights are not read"]),
    "quantization_config: bits 4.0": (
        set_quantization_config(with_module({"bits": 4.0, "group_size": 64, "sym": False})),
        [ATTN.format(1, "o_proj"), "unsupported bit width 4.0"],
    ),
    "quantization_config: sym 'false'": (
        set_quantization_config(with_module({"bits": 4, "group_size": 64, "sym": "false"})),
        [ATTN.format(1, "o_proj"), "sym must be true or false"],
    ),
    "quantization_config: no group_size": (
        set_quantization_config(with_module({"bits": 4, "sym": False})),
        [ATTN.format(1, "o_proj"), "missing group_size"],
    ),
    # Not an object at all: transformers refuses the config.json before moemix code runs (vLLM logs the path).
    "quantization_config: a string": (
        set_quantization_config("moemix"),
        ["self.quantization_config.to_dict()", "'str' object has no attribute"],
    ),
    "quantization_config: a list": (
        set_quantization_config(["moemix"]),
        ["self.quantization_config.to_dict()", "'list' object has no attribute"],
    ),
    "quantization_config: modules a list": (
        set_quantization_config(lambda qc: {**qc, "modules": []}),
        ["quantization_config.modules must be an object"],
    ),
}

CHILD = textwrap.dedent("""
    import json, sys, traceback
    from vllm import LLM

    if __name__ == "__main__":
        results = {}
        for case, path in json.loads(sys.argv[1]).items():
            try:
                LLM(model=path, enforce_eager=True, max_model_len=128, dtype="float32", max_num_seqs=1)
                results[case] = {"loaded": True, "error": ""}
            except BaseException:
                results[case] = {"loaded": False, "error": traceback.format_exc()[-4000:]}
        print("RESULTS " + json.dumps(results))
""")


@pytest.fixture(scope="module")
def good_checkpoint(tmp_path_factory) -> Path:
    from vllm_moemix.checkpoint.writer import quantize_checkpoint
    from vllm_moemix.config.plan import Plan

    out = tmp_path_factory.mktemp("good") / "q4"
    quantize_checkpoint(TRAINED_MIXTRAL, Plan.from_dict(PLAN), out, progress=False)
    return out


@pytest.fixture(scope="module")
def load_results(good_checkpoint, tmp_path_factory) -> dict[str, dict]:
    paths = {}
    for i, (case, (corrupt, _)) in enumerate(CASES.items()):
        ckpt = tmp_path_factory.mktemp(f"case{i}") / "ckpt"
        shutil.copytree(good_checkpoint, ckpt)
        corrupt(ckpt)
        paths[case] = str(ckpt)
    paths["the good one"] = str(good_checkpoint)
    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0", VLLM_CPU_KVCACHE_SPACE="1")
    done = subprocess.run(
        [sys.executable, "-c", CHILD, json.dumps(paths)], capture_output=True, text=True, env=env, timeout=1200
    )
    line = next((x for x in done.stdout.splitlines() if x.startswith("RESULTS ")), None)
    assert line, done.stderr[-3000:]
    return json.loads(line.removeprefix("RESULTS "))


def test_the_good_checkpoint_loads(load_results):
    assert load_results["the good one"]["loaded"], load_results["the good one"]["error"]


@pytest.mark.parametrize("case", list(CASES))
def test_corrupt_checkpoint_is_refused_with_the_problem_named(case, load_results):
    result = load_results[case]
    assert not result["loaded"], f"{case}: vLLM served a corrupt checkpoint"
    for expected in CASES[case][1]:
        assert expected in result["error"], f"{case}: {expected!r} not in\n{result['error']}"
