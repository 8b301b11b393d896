#!/usr/bin/env python
"""Build the project's small embedded MoE models, trained on real English text, offline and reproducibly.

Corpus: Python's documentation sources from Debian's `python3.11-doc` package
(/usr/share/doc/python3.11/html/_sources/**/*.rst.txt, ~12 MB of reST). Files are taken in sorted order and
every 33rd one (index 0, 33, 66, ...) is held out of tokenizer and model training.

Outputs under --out:
  heldout.txt       held-out text (capped at 300,000 characters) for perplexity / KL measurements
  calib.txt         calibration sample (100,000 characters, every 7th training file) for GPTQ etc.
  tiny-mixtral/     MixtralForCausalLM   hidden 256, 4 layers, 8 experts (inter 256), top-2
  tiny-qwen2moe/    Qwen2MoeForCausalLM  hidden 256, 4 layers, 8 experts (inter 256) + shared expert 256, top-2
Each model dir holds bf16 safetensors, config, a byte-level BPE tokenizer (vocab 4096, <s> </s> <unk> <pad>,
loadable with AutoTokenizer), a chat template, and TRAINING.md / training.json with the run's record.

Both models start from the same seed, train in fp32 with AdamW (warmup + cosine, budgeted by wall clock)
on a packed token stream ("<s> doc </s> <s> doc </s> ...") in windows of 256 tokens, with the router
load-balancing aux loss.

    .venv/bin/python scripts/build_tiny_models.py --out models --minutes 12 --threads 1
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import shlex
import shutil
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

CORPUS = Path("/usr/share/doc/python3.11/html/_sources")
HELDOUT_EVERY = 33  # every 33rd file in sorted order (~3%) is held out
HELDOUT_CHARS = 300_000
CALIB_EVERY = 7  # calibration sample: every 7th training file ...
CALIB_CHARS = 100_000  # ... truncated to this many characters
VOCAB = 4096
SEQ = 256
BOS, EOS, UNK, PAD = "<s>", "</s>", "<unk>", "<pad>"
SPECIALS = [BOS, EOS, UNK, PAD]  # ids 0, 1, 2, 3
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ message['role'] }}: {{ message['content'] }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)
MODELS = ("tiny-mixtral", "tiny-qwen2moe")
PROMPT = "The Python interpreter"


# --------------------------------------------------------------------------------------------- corpus


def load_corpus() -> tuple[list[Path], list[str], list[str]]:
    if not CORPUS.is_dir():
        sys.exit(f"{CORPUS} not found: apt-get install python3.11-doc")
    files = sorted(CORPUS.rglob("*.rst.txt"))
    if not files:
        sys.exit(f"no *.rst.txt under {CORPUS}")
    train, held = [], []
    for i, path in enumerate(files):
        (held if i % HELDOUT_EVERY == 0 else train).append(path.read_text(encoding="utf-8", errors="replace"))
    return files, train, held


# ------------------------------------------------------------------------------------------ tokenizer


def train_tokenizer(texts: list[str]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    assert [tok.token_to_id(t) for t in SPECIALS] == [0, 1, 2, 3], "special token ids must be 0..3"
    # Like Llama/Mixtral tokenizers: encoding prepends <s> (add_special_tokens=True), matching training documents.
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A $B:1",
                                                       special_tokens=[(BOS, bos_id)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, unk_token=UNK, pad_token=PAD,
                                   model_max_length=1024, clean_up_tokenization_spaces=False)
    fast.chat_template = CHAT_TEMPLATE
    return fast


def save_tokenizer(tokenizer, target: Path) -> None:
    tokenizer.save_pretrained(target)
    # Portable metadata: a class name every transformers version knows, and the classic special_tokens_map.json.
    cfg_path = target / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg.update(bos_token=BOS, eos_token=EOS, unk_token=UNK, pad_token=PAD, model_max_length=1024,
               clean_up_tokenization_spaces=False)
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    (target / "special_tokens_map.json").write_text(
        json.dumps({"bos_token": BOS, "eos_token": EOS, "unk_token": UNK, "pad_token": PAD}, indent=2) + "\n")
    if not (target / "chat_template.jinja").exists():
        (target / "chat_template.jinja").write_text(CHAT_TEMPLATE)


def encode_docs(tokenizer, texts: list[str]) -> torch.Tensor:
    """Packed stream: <s> doc </s> <s> doc </s> ..."""
    ids: list[int] = []
    for enc in tokenizer(texts, add_special_tokens=True).input_ids:  # batched (Rust, parallel)
        ids.extend(enc)
        ids.append(tokenizer.eos_token_id)
    return torch.tensor(ids, dtype=torch.int64)


# ------------------------------------------------------------------------------------------- models


def model_configs(tokenizer) -> dict:
    from transformers import MixtralConfig, Qwen2MoeConfig

    ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
               pad_token_id=tokenizer.pad_token_id)
    common = dict(vocab_size=VOCAB, hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=False,
                  rope_theta=10000.0, router_aux_loss_coef=0.01, **ids)
    return {
        "tiny-mixtral": MixtralConfig(intermediate_size=256, num_local_experts=8, num_experts_per_tok=2,
                                      head_dim=64, **common),
        "tiny-qwen2moe": Qwen2MoeConfig(moe_intermediate_size=256, shared_expert_intermediate_size=256,
                                        intermediate_size=256, num_experts=8, num_experts_per_tok=2,
                                        decoder_sparse_step=1, mlp_only_layers=[], norm_topk_prob=False,
                                        **common),
    }


def lm_loss(out, config) -> float:
    """The language-model part of `out.loss` (which also holds coef * router aux loss)."""
    aux = getattr(out, "aux_loss", None)
    return out.loss.item() - (config.router_aux_loss_coef * aux.item() if aux is not None else 0.0)


@torch.no_grad()
def heldout_loss(model, ids: torch.Tensor, batch: int = 16) -> tuple[float, int]:
    """Mean next-token NLL over non-overlapping SEQ-token windows of `ids` (HF shifts labels internally)."""
    was_training = model.training
    model.eval()
    n = len(ids) // SEQ
    windows = ids[: n * SEQ].view(n, SEQ)
    total, count = 0.0, 0
    for i in range(0, n, batch):
        chunk = windows[i : i + batch]
        logits = model(chunk).logits.float()
        nll = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                                chunk[:, 1:].reshape(-1), reduction="sum")
        total += nll.item()
        count += chunk[:, 1:].numel()
    model.train(was_training)
    return total / count, count


def lr_at(step: int, frac: float, args) -> float:
    warm = min(1.0, (step + 1) / args.warmup)
    return args.lr * warm * (args.min_lr_frac + (1 - args.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0))))


def train(name: str, config, train_ids: torch.Tensor, held_ids: torch.Tensor, args):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(args.seed)
    random.seed(args.seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.config.output_router_logits = True  # -> out.loss includes router_aux_loss_coef * load-balancing loss
    model.train()
    n_params = sum(p.numel() for p in model.parameters())
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "embed" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.95), eps=1e-8)
    gen = torch.Generator().manual_seed(args.seed)
    budget = args.minutes * 60.0
    start = time.time()
    step, loss_ema, aux_last = 0, None, None
    bar = tqdm(desc=name, unit="step", dynamic_ncols=True, mininterval=2.0)
    while step < args.max_steps:
        elapsed = time.time() - start
        if elapsed >= budget:
            break
        lr = lr_at(step, max(elapsed / budget, step / args.max_steps), args)
        for group in opt.param_groups:
            group["lr"] = lr
        offs = torch.randint(0, len(train_ids) - SEQ, (args.batch,), generator=gen)
        batch = torch.stack([train_ids[o : o + SEQ] for o in offs.tolist()])
        out = model(input_ids=batch, labels=batch)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        lm = lm_loss(out, config)
        if not math.isfinite(lm):
            raise RuntimeError(f"{name}: loss is {lm} at step {step}")
        aux_last = out.aux_loss.item() if getattr(out, "aux_loss", None) is not None else None
        loss_ema = lm if loss_ema is None else 0.98 * loss_ema + 0.02 * lm
        bar.update(1)
        bar.set_postfix(loss=f"{loss_ema:.3f}", aux=f"{aux_last:.3f}" if aux_last is not None else "-",
                        lr=f"{lr:.1e}", tok_s=f"{step * args.batch * SEQ / (time.time() - start):.0f}")
    bar.close()
    train_s = time.time() - start
    model.config.output_router_logits = False
    held, held_tokens = heldout_loss(model, held_ids)
    print(f"{name}: {step} steps, {step * args.batch * SEQ:,} tokens, train loss {loss_ema:.4f}, "
          f"held-out loss (fp32) {held:.4f} ppl {math.exp(held):.2f} on {held_tokens:,} tokens, {train_s:.0f}s")
    return model, {
        "params": n_params, "steps": step, "tokens_seen": step * args.batch * SEQ,
        "final_train_loss_ema": round(loss_ema, 4), "final_router_aux_loss": round(aux_last, 4) if aux_last else None,
        "heldout_loss_fp32": round(held, 4), "heldout_ppl_fp32": round(math.exp(held), 2),
        "heldout_eval_tokens": held_tokens, "train_wall_s": round(train_s, 1),
    }


def verify(target: Path, held_ids: torch.Tensor, name: str) -> dict:
    """Reload the saved dir the way users will (bf16 weights -> fp32) and check it end to end."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(target)
    model = AutoModelForCausalLM.from_pretrained(target, dtype=torch.float32)
    held, _ = heldout_loss(model, held_ids)
    enc = tok(PROMPT, return_tensors="pt")
    out = model.generate(**enc, max_new_tokens=20, do_sample=False, pad_token_id=tok.pad_token_id)
    text = tok.decode(out[0], skip_special_tokens=True)
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    print(f"[verify {name}] held-out loss (saved bf16 weights) {held:.4f} ppl {math.exp(held):.2f}")
    print(f"[verify {name}] greedy: {text!r}")
    return {"heldout_loss": round(held, 4), "heldout_ppl": round(math.exp(held), 2), "sample_prompt": PROMPT,
            "sample_greedy_20": text, "chat_template_check": chat}


def write_record(target: Path, name: str, record: dict) -> None:
    (target / "training.json").write_text(json.dumps(record, indent=2) + "\n")
    lines = [f"# {name}", "",
             f"Built by `scripts/build_tiny_models.py`: a {record['architecture']} trained from scratch on Python's "
             f"documentation (Debian python3.11-doc reST sources), byte-level BPE vocab {VOCAB}, sequence length {SEQ}, "
             "fp32 training, saved as bfloat16 safetensors. Held-out numbers are next-token perplexity over "
             f"non-overlapping {SEQ}-token windows of `heldout.txt` (files never seen by the tokenizer or the model).",
             "", "Reproduce:", "", f"    {record['command']}", ""]
    for k, v in record.items():
        if k not in ("command", "sample_greedy_20", "chat_template_check"):
            lines.append(f"- {k}: {json.dumps(v) if isinstance(v, (dict, list)) else v}")
    lines += ["", f"Greedy sample (20 new tokens) for `{record['sample_prompt']}`:", "", "```",
              record["sample_greedy_20"], "```", ""]
    (target / "TRAINING.md").write_text("\n".join(lines))


# --------------------------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="models", help="output directory")
    parser.add_argument("--minutes", type=float, default=12.0, help="training wall-clock budget per model")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch", type=int, default=8, help="sequences of %d tokens per step" % SEQ)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--min-lr-frac", type=float, default=0.1, help="cosine floor as a fraction of --lr")
    parser.add_argument("--warmup", type=int, default=50, help="linear warmup steps")
    parser.add_argument("--weight-decay", type=float, default=0.1)
    parser.add_argument("--clip", type=float, default=1.0, help="gradient-norm clip")
    parser.add_argument("--max-steps", type=int, default=20_000)
    parser.add_argument("--only", choices=MODELS, action="append", help="build only this model (repeatable)")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true" if args.threads > 1 else "false")
    t0 = time.time()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    command = "cd <repo> && .venv/bin/python " + " ".join(shlex.quote(a) for a in sys.argv)

    files, train_texts, held_texts = load_corpus()
    heldout_text = "\n\n".join(held_texts)[:HELDOUT_CHARS]
    calib_text = "\n\n".join(train_texts[::CALIB_EVERY])[:CALIB_CHARS]
    for fname, text in (("heldout.txt", heldout_text), ("calib.txt", calib_text)):
        path = out / fname
        if not path.exists() or path.read_text(encoding="utf-8") != text:  # leave identical files untouched
            path.write_text(text, encoding="utf-8")
    train_chars = sum(len(t) for t in train_texts)
    corpus_desc = (f"{CORPUS}/**/*.rst.txt (Debian python3.11-doc): {len(files)} files in sorted order; one in "
                   f"{HELDOUT_EVERY} (index % {HELDOUT_EVERY} == 0) held out -> {len(held_texts)} files; "
                   f"{len(train_texts)} training files, {train_chars:,} characters")

    print(f"training tokenizer (byte-level BPE, vocab {VOCAB}) on {len(train_texts)} files ...", flush=True)
    tokenizer = train_tokenizer(train_texts)
    train_ids = encode_docs(tokenizer, train_texts)
    held_ids = torch.tensor(tokenizer(heldout_text).input_ids, dtype=torch.int64)
    print(f"corpus: {corpus_desc}\n  train stream {len(train_ids):,} tokens; heldout.txt {len(heldout_text):,} chars "
          f"= {len(held_ids):,} tokens; calib.txt {len(calib_text):,} chars  ({time.time() - t0:.0f}s)", flush=True)

    results = {}
    for name, config in model_configs(tokenizer).items():
        if args.only and name not in args.only:
            continue
        t_model = time.time()
        model, result = train(name, config, train_ids, held_ids, args)
        # Build into a scratch dir and swap it in at the end, so readers of out/<name> never see a half-written model.
        final, target = out / name, out / f".{name}.building"
        shutil.rmtree(target, ignore_errors=True)
        model.to(torch.bfloat16).save_pretrained(target, safe_serialization=True)
        del model
        save_tokenizer(tokenizer, target)
        checks = verify(target, held_ids, name)
        record = {
            "architecture": config.architectures[0] if config.architectures else type(config).__name__,
            "command": command, "seed": args.seed, "threads": args.threads, "batch": args.batch, "seq_len": SEQ,
            "lr": args.lr, "min_lr_frac": args.min_lr_frac, "warmup_steps": args.warmup,
            "weight_decay": args.weight_decay, "grad_clip": args.clip, "budget_minutes": args.minutes,
            "max_steps": args.max_steps, "router_aux_loss_coef": config.router_aux_loss_coef,
            "corpus": corpus_desc, "tokenizer": f"byte-level BPE (tokenizers), vocab {VOCAB}, specials {SPECIALS}, "
                                                 f"<s> prepended on encode",
            "train_tokens_available": len(train_ids),
            **result, **checks,
            "total_wall_s": round(time.time() - t_model, 1),
            "saved_dtype": "bfloat16",
            "versions": {"python": platform.python_version(), "torch": torch.__version__,
                         "transformers": __import__("transformers").__version__,
                         "tokenizers": __import__("tokenizers").__version__},
        }
        if record["architecture"] == type(config).__name__:
            record["architecture"] = {"mixtral": "MixtralForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM"}.get(
                config.model_type, config.model_type)
        write_record(target, name, record)
        old = out / f".{name}.old"
        shutil.rmtree(old, ignore_errors=True)
        if final.exists():
            final.rename(old)
        target.rename(final)
        shutil.rmtree(old, ignore_errors=True)
        results[name] = record

    print("\n=== summary ===")
    for name, r in results.items():
        print(f"{name}: held-out ppl {r['heldout_ppl']} (fp32 before save {r['heldout_ppl_fp32']}), train loss "
              f"{r['final_train_loss_ema']}, {r['steps']} steps, {r['tokens_seen']:,} tokens, "
              f"{r['train_wall_s']}s training\n  sample: {r['sample_greedy_20']!r}")
    for path in sorted(out.rglob("*")):
        if path.is_file() and not any(part.startswith(".") for part in path.relative_to(out).parts):
            print(f"  {path.stat().st_size:>10,}  {path}")
    print(f"done in {time.time() - t0:.0f}s")


if __name__ == "__main__":
    main()
