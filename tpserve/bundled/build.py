"""Rebuild the bundled default models from scratch.

    python -m tpserve.bundled.build [--out DIR] [--target-minutes 65]
                                    [--draft-minutes 15] [--seed 0]

Steps: collect the stdlib corpus and split it by path hash; train a
byte-fallback BPE tokenizer; tokenize the corpus once; train the 6-layer
target LM; distill a 2-layer draft from it; evaluate both on held-out files
and write ``REPORT.json``.  Outputs go to ``<out>/code-target``,
``<out>/code-draft`` and ``<out>/REPORT.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import time
from pathlib import Path

import torch

from . import MODELS_DIR
from . import corpus
from . import train as T

SEQ = 256
PROMPTS = ["def fibonacci(n):\n", "import os\n\ndef ", "class Stack:\n    def __init__(self):\n"]
ARTIFACT_SUFFIXES = (".json", ".safetensors", ".model", ".txt", ".jsonl")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=MODELS_DIR)
    ap.add_argument("--target-minutes", type=float, default=65.0)
    ap.add_argument("--draft-minutes", type=float, default=15.0)
    ap.add_argument("--target-steps", type=int, default=None,
                    help="fix the step count instead of deriving it from the time budget")
    ap.add_argument("--draft-steps", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--target-lr", type=float, default=2.5e-3)
    ap.add_argument("--draft-lr", type=float, default=2e-3)
    ap.add_argument("--eval-tokens", type=int, default=200_000)
    ap.add_argument("--tokenizer-chars", type=int, default=12_000_000)
    ap.add_argument("--new-tokens", type=int, default=48)
    return ap.parse_args(argv)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    torch.set_num_threads(os.cpu_count() or 1)
    torch.use_deterministic_algorithms(True, warn_only=True)


def clean_dir(d: Path) -> None:
    """Remove previous artifacts only (never unknown files) so the output
    directory reflects exactly this build."""
    if d.exists():
        for f in d.iterdir():
            if f.is_file() and f.suffix in ARTIFACT_SUFFIXES:
                f.unlink()
    d.mkdir(parents=True, exist_ok=True)


def dir_size(d: Path) -> int:
    return sum(f.stat().st_size for f in d.iterdir() if f.is_file())


@torch.no_grad()
def completions(model_dir: Path, new_tokens: int) -> list[dict]:
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    model = T.load_fp32(model_dir)
    out = []
    for p in PROMPTS:
        enc = tok(p, return_tensors="pt")
        gen = model.generate(**enc, max_new_tokens=new_tokens, do_sample=False,
                             pad_token_id=corpus.EOS_ID)
        out.append({"prompt": p, "completion": tok.decode(gen[0, enc["input_ids"].shape[1]:])})
    return out


def main(argv=None) -> dict:
    args = parse_args(argv)
    seed_everything(args.seed)
    t_start = time.time()
    out = args.out.resolve()
    tdir, ddir = out / "code-target", out / "code-draft"
    for d in (tdir, ddir):
        clean_dir(d)
    print(f"python {corpus.python_version()}  torch {torch.__version__}  threads {torch.get_num_threads()}  out {out}", flush=True)

    train_txt, held_txt = corpus.load_corpus()
    print(f"corpus: {len(train_txt)} train files, {len(held_txt)} held-out files, "
          f"{sum(map(len, train_txt.values())) / 1e6:.1f}M train chars", flush=True)
    held_list = "".join(r + "\n" for r in sorted(held_txt))
    for d in (tdir, ddir):
        (d / "heldout_files.txt").write_text(held_list)

    t0 = time.time()
    proto = corpus.train_tokenizer(train_txt, args.tokenizer_chars)
    corpus.write_tokenizer(proto, tdir)
    for name in ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copyfile(tdir / name, ddir / name)
    corpus.verify_tokenizer(tdir, extra_texts=[held_txt[r] for r in sorted(held_txt)[:20]])
    corpus.verify_tokenizer(ddir)
    print(f"tokenizer trained + verified in {time.time() - t0:.1f}s", flush=True)

    t0 = time.time()
    train_tok = corpus.tokenize_documents(tdir, train_txt)
    held_tok = corpus.tokenize_documents(tdir, held_txt)
    print(f"tokenized: {train_tok.numel() / 1e6:.2f}M train tokens, {held_tok.numel() / 1e6:.2f}M held-out "
          f"tokens in {time.time() - t0:.1f}s", flush=True)
    eval_windows = T.fixed_windows(held_tok, SEQ, 16 * SEQ)  # cheap periodic eval

    torch.manual_seed(args.seed)
    target = T.new_model(6)
    print(f"target: {T.param_count(target) / 1e6:.2f}M params", flush=True)
    t_stats = T.train_loop(target, T.lm_loss, train_tok, minutes=args.target_minutes, steps=args.target_steps,
                           lr=args.target_lr, batch=args.batch, seq=SEQ, seed=args.seed + 1,
                           log_path=tdir / "train_log.jsonl", eval_windows=eval_windows, desc="target")
    print(f"target done: {t_stats}", flush=True)
    T.save_model(target, tdir)

    # Distil from the *shipped* (bf16-rounded) target, so the draft matches
    # what the runtime will actually serve.
    teacher = T.load_fp32(tdir)
    torch.manual_seed(args.seed + 2)
    draft = T.new_model(2)
    T.init_draft_from_target(draft, teacher)
    d_stats = T.train_loop(draft, T.distill_loss_fn(teacher), train_tok, minutes=args.draft_minutes,
                           steps=args.draft_steps, lr=args.draft_lr, batch=args.batch, seq=SEQ,
                           seed=args.seed + 3, log_path=ddir / "train_log.jsonl",
                           eval_windows=eval_windows, desc="draft")
    print(f"draft done: {d_stats}", flush=True)
    T.save_model(draft, ddir)
    del teacher, target, draft

    t0 = time.time()
    ev = T.evaluate_pair(T.load_fp32(tdir), T.load_fp32(ddir),
                         T.fixed_windows(held_tok, SEQ, args.eval_tokens), corpus.token_byte_lengths(tdir))
    print(f"eval in {time.time() - t0:.1f}s", flush=True)
    report = {
        "python_version": corpus.python_version(),
        "torch_version": torch.__version__,
        "platform": platform.platform(),
        "threads": torch.get_num_threads(),
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "corpus": {"train_files": len(train_txt), "heldout_files": len(held_txt),
                   "train_tokens": train_tok.numel(), "heldout_tokens": held_tok.numel()},
        "eval": ev,
        "target": {"params": T.param_count(T.load_fp32(tdir)), "dir_bytes": dir_size(tdir), **t_stats},
        "draft": {"params": T.param_count(T.load_fp32(ddir)), "dir_bytes": dir_size(ddir), **d_stats},
        "samples": completions(tdir, args.new_tokens),
        "total_build_seconds": round(time.time() - t_start, 1),
    }
    (out / "REPORT.json").write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    print(json.dumps(report, indent=2, ensure_ascii=False), flush=True)
    return report


if __name__ == "__main__":
    main()
