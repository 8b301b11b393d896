"""Build the project's embedded MoE models: trained on real English text, reproducibly, offline.

Corpora (--corpus):
  python-doc  Python's documentation sources from Debian's `python3.11-doc` package
              (/usr/share/doc/python3.11/html/_sources, ~12 MB of reST): the embedded models.
  python-src  the Python 3.11 standard library's source (/usr/lib/python3.11, ~7 MB of .py):
              a model on other text that the planner is checked on and never tuned on.
  perl-doc    Perl's documentation (Debian `perl-doc`, /usr/share/perl/5.36.0, ~9 MB of POD prose): the
              fourth checking model (issue 20), another architecture (OLMoE) on text no other model saw.
Every 33rd file (sorted order) is held out. Outputs under --out:
  heldout.txt, calib.txt          held-out and calibration text for quality measurements
  tiny-mixtral/, tiny-qwen2moe/   bf16 safetensors + byte-level BPE tokenizer + TRAINING.md/training.json

    python scripts/train_tiny_moe.py --out models --minutes 10 --threads 2
    python scripts/train_tiny_moe.py --corpus python-src --only tiny-mixtral --out models/pysrc --minutes 12
    python scripts/train_tiny_moe.py --corpus perl-doc --only tiny-olmoe --out models/perldoc --minutes 40
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

CORPORA = {  # name -> (root, file pattern, description, Debian package)
    "python-doc": (
        Path("/usr/share/doc/python3.11/html/_sources"),
        "*.rst.txt",
        "Python's documentation",
        "python3.11-doc",
    ),
    "python-src": (Path("/usr/lib/python3.11"), "*.py", "the Python standard library's source", "libpython3.11-stdlib"),
    "perl-doc": (Path("/usr/share/perl/5.36.0"), "*.pod", "Perl's documentation", "perl-doc"),
}
HELDOUT_EVERY = 33
VOCAB = 4096
SEQ = 256
SPECIALS = ["<s>", "</s>", "<unk>", "<pad>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


def load_corpus(corpus: str) -> tuple[list[str], list[str]]:
    root, pattern, _, package = CORPORA[corpus]
    if not root.is_dir():
        sys.exit(f"{root} not found: apt-get install {package}")
    files = sorted(path for path in root.rglob(pattern) if "site-packages" not in path.parts)
    train, held = [], []
    for i, path in enumerate(files):
        (held if i % HELDOUT_EVERY == 0 else train).append(path.read_text(errors="replace"))
    return train, held


def train_tokenizer(texts: list[str]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        model_max_length=1024,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def encode(tokenizer, texts: list[str]) -> torch.Tensor:
    ids: list[int] = []
    for text in texts:
        ids.extend(tokenizer(text).input_ids)
        ids.append(tokenizer.eos_token_id)
    return torch.tensor(ids, dtype=torch.int64)


def model_configs(tokenizer) -> dict:
    from transformers import MixtralConfig, OlmoeConfig, Qwen2MoeConfig

    ids = dict(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
    )
    common = dict(
        vocab_size=VOCAB,
        hidden_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=False,
        rope_theta=10000.0,
        **ids,
    )
    return {
        "tiny-mixtral": MixtralConfig(
            intermediate_size=256,
            num_local_experts=8,
            num_experts_per_tok=2,
            head_dim=64,
            router_aux_loss_coef=0.01,
            **common,
        ),
        "tiny-qwen2moe": Qwen2MoeConfig(
            moe_intermediate_size=256,
            shared_expert_intermediate_size=256,
            intermediate_size=256,
            num_experts=8,
            num_experts_per_tok=2,
            decoder_sparse_step=1,
            mlp_only_layers=[],
            norm_topk_prob=False,
            router_aux_loss_coef=0.01,
            **common,
        ),
        "tiny-olmoe": OlmoeConfig(  # q/k norms, no shared expert, unnormalised top-k weights
            intermediate_size=256,
            num_experts=8,
            num_experts_per_tok=2,
            router_aux_loss_coef=0.01,
            **common,
        ),
    }


@torch.no_grad()
def evaluate(model, stream: torch.Tensor, max_windows: int = 64) -> float:
    model.eval()
    n = min(max_windows, (len(stream) - 1) // SEQ)
    losses = []
    for i in range(n):
        chunk = stream[i * SEQ : (i + 1) * SEQ + 1].unsqueeze(0)
        losses.append(model(chunk[:, :-1], labels=chunk[:, :-1]).loss.item())
    model.train()
    return sum(losses) / len(losses)


def train(name: str, config, train_ids: torch.Tensor, held_ids: torch.Tensor, args) -> dict:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(args.seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.config.output_router_logits = True
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.1, betas=(0.9, 0.95))
    gen = torch.Generator().manual_seed(args.seed)
    budget = args.minutes * 60
    start, step, loss_ema = time.time(), 0, None
    bar = tqdm(desc=name, unit="step")
    while time.time() - start < budget and step < args.max_steps:
        frac = max((time.time() - start) / budget, step / args.max_steps)  # whichever budget ends first
        lr = args.lr * min(1.0, (step + 1) / 30) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0))))
        for group in opt.param_groups:
            group["lr"] = lr
        starts = torch.randint(0, len(train_ids) - SEQ - 1, (args.batch,), generator=gen)
        batch = torch.stack([train_ids[s : s + SEQ] for s in starts])
        out = model(batch, labels=batch)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        lm = out.loss.item() - (out.aux_loss.item() * config.router_aux_loss_coef if out.aux_loss is not None else 0)
        loss_ema = lm if loss_ema is None else 0.95 * loss_ema + 0.05 * lm
        bar.update(1)
        bar.set_postfix(loss=f"{loss_ema:.3f}", tok_s=f"{step * args.batch * SEQ / (time.time() - start):.0f}")
    bar.close()
    model.config.output_router_logits = False
    held = evaluate(model, held_ids)
    return {
        "model": model,
        "steps": step,
        "tokens_seen": step * args.batch * SEQ,
        "train_loss": round(loss_ema, 4),
        "heldout_loss": round(held, 4),
        "heldout_ppl": round(math.exp(held), 2),
        "wall_s": round(time.time() - start, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="models")
    parser.add_argument("--minutes", type=float, default=10.0, help="training wall-clock budget per model")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--max-steps", type=int, default=100_000)
    parser.add_argument("--corpus", choices=sorted(CORPORA), default="python-doc")
    parser.add_argument("--only", choices=["tiny-mixtral", "tiny-qwen2moe", "tiny-olmoe"], help="build one model")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    train_texts, held_texts = load_corpus(args.corpus)
    root, _, description, package = CORPORA[args.corpus]
    (out / "heldout.txt").write_text("\n\n".join(held_texts)[:300_000])
    (out / "calib.txt").write_text("\n\n".join(train_texts[::7])[:100_000])
    tokenizer = train_tokenizer(train_texts)
    train_ids, held_ids = encode(tokenizer, train_texts), encode(tokenizer, held_texts)
    print(
        f"corpus: {len(train_texts)} train files ({len(train_ids):,} tokens), {len(held_texts)} held out "
        f"({len(held_ids):,} tokens)"
    )

    for name, config in model_configs(tokenizer).items():
        if args.only and name != args.only:
            continue
        result = train(name, config, train_ids, held_ids, args)
        model = result.pop("model")
        target = out / name
        model.to(torch.bfloat16).save_pretrained(target, safe_serialization=True)
        tokenizer.save_pretrained(target)
        record = {
            "command": " ".join(sys.argv),
            "seed": args.seed,
            "batch": args.batch,
            "seq_len": SEQ,
            "threads": args.threads,
            "corpus": f"{root} ({package}), 1 file in {HELDOUT_EVERY} held out",
            **result,
        }
        (target / "training.json").write_text(json.dumps(record, indent=2) + "\n")
        (target / "TRAINING.md").write_text(
            f"# {name}\n\nTrained by `scripts/train_tiny_moe.py` on {description} (Debian {package}), "
            f"byte-level BPE vocab {VOCAB}, sequence length {SEQ}.\n\n"
            + "\n".join(f"- {k}: {v}" for k, v in record.items())
            + "\n"
        )
        print(name, json.dumps(record))


if __name__ == "__main__":
    main()
