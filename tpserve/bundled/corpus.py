"""Corpus and tokenizer for the bundled models.

The corpus is the standard library of the running interpreter, so the build
needs no network access and anyone with the same Python version gets the same
bytes.  Files are split into train / held-out by a hash of their relative
path, which keeps the split stable as files are added or removed.
"""
from __future__ import annotations

import hashlib
import io
import json
import sys
import sysconfig
from pathlib import Path

import torch

VOCAB_SIZE = 4096
UNK_ID, BOS_ID, EOS_ID = 0, 1, 2
HELDOUT_PER_MILLE = 50  # ~5% of files

# Llama-family tokenizer config.  legacy/add_prefix_space are pinned off so
# that transformers never prepends a space: code must round-trip byte-exactly.
TOKENIZER_CONFIG = {
    "tokenizer_class": "LlamaTokenizer",
    "bos_token": "<s>",
    "eos_token": "</s>",
    "unk_token": "<unk>",
    "pad_token": None,
    "add_bos_token": True,
    "add_eos_token": False,
    "legacy": False,
    "add_prefix_space": False,
    "clean_up_tokenization_spaces": False,
    "model_max_length": 2048,
}
SPECIAL_TOKENS_MAP = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}

ROUNDTRIP_SAMPLES = [
    "héllo wörld 你好 🙂\n\tx = 1  \n",
    " leading space",
    "  two leading spaces\n",
    "def f(a, b):\n    \"\"\"Doc.\"\"\"\n\n\n        return a  +  b   \n\t\tpass\n",
    "\n\n\nclass A:\n\tdef g(self): ...\n",
    "trailing whitespace \t \n   ",
    "x = '\\x00 \u00a0 \u200b \u2028 end'",
]


def python_version() -> str:
    return sys.version.split()[0]


def stdlib_files() -> list[tuple[str, Path]]:
    """Sorted (relative path, absolute path) of every stdlib ``*.py`` file."""
    root = Path(sysconfig.get_paths()["stdlib"])
    out = []
    for p in root.rglob("*.py"):
        rel = p.relative_to(root).as_posix()
        if "site-packages" in rel or "dist-packages" in rel:
            continue
        out.append((rel, p))
    return sorted(out)


def _path_hash(rel: str) -> int:
    return int.from_bytes(hashlib.sha256(rel.encode()).digest()[:8], "big")


def is_heldout(rel: str) -> bool:
    return _path_hash(rel) % 1000 < HELDOUT_PER_MILLE


def load_corpus() -> tuple[dict[str, str], dict[str, str]]:
    """Return (train, heldout) dicts of relative path -> source text.

    Files that are not valid UTF-8 (a few deliberate test fixtures) are
    skipped rather than lossily decoded, so the corpus never contains U+FFFD
    artefacts of our own making.
    """
    train, heldout = {}, {}
    for rel, path in stdlib_files():
        try:
            text = path.read_bytes().decode("utf-8")
        except UnicodeDecodeError:
            continue
        if not text.strip():
            continue
        (heldout if is_heldout(rel) else train)[rel] = text
    return train, heldout


def _spm_sentences(texts: dict[str, str], max_chars: int, lines_per_chunk: int = 32):
    # sentencepiece treats each input as one "sentence"; feeding multi-line
    # chunks (not single lines) lets it learn pieces containing "\n" and
    # newline+indent, which matter most for code.  Files are visited in hash
    # order so the bounded sample spans the whole library.
    total = 0
    for rel in sorted(texts, key=_path_hash):
        lines = texts[rel].splitlines(keepends=True)
        for i in range(0, len(lines), lines_per_chunk):
            chunk = "".join(lines[i:i + lines_per_chunk])
            total += len(chunk)
            yield chunk
            if total >= max_chars:
                return


def train_tokenizer(train: dict[str, str], max_chars: int = 12_000_000) -> bytes:
    """Train a byte-fallback BPE sentencepiece model; returns the model proto."""
    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=_spm_sentences(train, max_chars),
        model_writer=buf,
        model_type="bpe",
        vocab_size=VOCAB_SIZE,
        byte_fallback=True,
        character_coverage=0.9999,
        normalization_rule_name="identity",
        add_dummy_prefix=False,
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        split_by_whitespace=True,
        split_digits=True,
        unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID, pad_id=-1,
        max_sentence_length=1 << 20,
        num_threads=torch.get_num_threads(),
        seed_sentencepiece_size=1_000_000,
        shuffle_input_sentence=False,
        minloglevel=2,
    )
    return buf.getvalue()


def write_tokenizer(model_proto: bytes, out_dir: Path) -> None:
    """Write tokenizer.model plus the HF files AutoTokenizer expects.

    tokenizer.json is produced by letting transformers convert the
    sentencepiece model once and saving its fast backend, so later loads do
    not depend on the (version-sensitive) slow->fast conversion.
    """
    from transformers import AutoTokenizer

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "tokenizer.model").write_bytes(model_proto)
    (out_dir / "tokenizer_config.json").write_text(json.dumps(TOKENIZER_CONFIG, indent=2) + "\n")
    (out_dir / "special_tokens_map.json").write_text(json.dumps(SPECIAL_TOKENS_MAP, indent=2) + "\n")
    tok = AutoTokenizer.from_pretrained(str(out_dir))
    tok.backend_tokenizer.save(str(out_dir / "tokenizer.json"))


def verify_tokenizer(tok_dir: Path, extra_texts: list[str] = ()) -> None:
    """Assert the saved tokenizer has the full vocab and round-trips exactly."""
    import sentencepiece as spm
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    sp = spm.SentencePieceProcessor(model_file=str(tok_dir / "tokenizer.model"))
    tok.model_max_length = 1 << 30  # whole files are encoded below; skip the length warning
    assert len(tok) == VOCAB_SIZE, f"AutoTokenizer vocab {len(tok)} != {VOCAB_SIZE}"
    assert (tok.bos_token_id, tok.eos_token_id, tok.unk_token_id) == (BOS_ID, EOS_ID, UNK_ID)
    for text in list(ROUNDTRIP_SAMPLES) + list(extra_texts):
        ids = tok.encode(text, add_special_tokens=False)
        assert tok.decode(ids) == text, f"round-trip failed for {text[:60]!r}"
        assert ids == sp.encode(text), f"HF and sentencepiece disagree on {text[:60]!r}"
    with_bos = tok.encode("x = 1")
    assert with_bos[0] == BOS_ID and with_bos[1:] == tok.encode("x = 1", add_special_tokens=False)


def tokenize_documents(tok_dir: Path, texts: dict[str, str]) -> torch.Tensor:
    """Flat int16 stream of ``<s> doc </s>`` for every document, in path order.

    int16 suffices for a 4096 vocab and halves memory versus int32.
    """
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    tok.model_max_length = 1 << 30  # silence the per-document length warning
    rels = sorted(texts)
    ids = tok([texts[r] for r in rels], add_special_tokens=False)["input_ids"]
    flat = []
    for doc in ids:
        flat.append(BOS_ID)
        flat.extend(doc)
        flat.append(EOS_ID)
    return torch.tensor(flat, dtype=torch.int16)


def token_byte_lengths(tok_dir: Path) -> torch.Tensor:
    """UTF-8 byte length of each token id, for per-byte perplexity."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(tok_dir / "tokenizer.model"))
    lens = torch.zeros(sp.get_piece_size(), dtype=torch.float64)
    for i in range(sp.get_piece_size()):
        if sp.is_control(i) or sp.is_unknown(i):
            continue
        lens[i] = 1 if sp.is_byte(i) else len(sp.id_to_piece(i).replace("\u2581", " ").encode())
    return lens
