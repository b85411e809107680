"""Smoke tests for the bundled default models (tpserve/bundled/models).

Skipped when the artifacts have not been built yet
(``python -m tpserve.bundled.build``).  Set TPSERVE_BUNDLED_DIR to test a
build written elsewhere (e.g. a smoke build in /tmp).
"""
import os
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from tpserve.bundled import DEFAULT_DRAFT_DIR, DEFAULT_MODEL_DIR  # noqa: E402

_override = os.environ.get("TPSERVE_BUNDLED_DIR")
TARGET_DIR = Path(_override) / "code-target" if _override else DEFAULT_MODEL_DIR
DRAFT_DIR = Path(_override) / "code-draft" if _override else DEFAULT_DRAFT_DIR
REQUIRED = ("config.json", "model.safetensors", "tokenizer.model", "tokenizer_config.json")


def _built(d: Path) -> bool:
    return all((d / f).is_file() for f in REQUIRED)


pytestmark = pytest.mark.skipif(
    not (_built(TARGET_DIR) and _built(DRAFT_DIR)),
    reason=f"bundled models not built in {TARGET_DIR.parent}; run `python -m tpserve.bundled.build`",
)

ROUNDTRIP = [
    "héllo wörld 你好 🙂\n\tx = 1  \n",
    " starts with a space",
    "def f(a):\n    if a:\n\n        return a  \n\treturn None\n",
    "\n\n  \t mixed   whitespace\t\n",
    "emoji 🐍🚀 and CJK 日本語 and math ∑∫√",
]


@pytest.fixture(scope="module")
def tok():
    return transformers.AutoTokenizer.from_pretrained(str(TARGET_DIR))


@pytest.fixture(scope="module")
def models():
    load = transformers.AutoModelForCausalLM.from_pretrained
    return load(str(TARGET_DIR)).eval(), load(str(DRAFT_DIR)).eval()


def test_tokenizer_vocab_and_special_tokens(tok):
    assert len(tok) == 4096
    assert (tok.unk_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    ids = tok.encode("x = 1")
    assert ids[0] == tok.bos_token_id
    assert ids[1:] == tok.encode("x = 1", add_special_tokens=False)


@pytest.mark.parametrize("text", ROUNDTRIP)
def test_tokenizer_roundtrip_exact(tok, text):
    assert tok.decode(tok.encode(text, add_special_tokens=False)) == text


def test_draft_shares_tokenizer(tok):
    draft_tok = transformers.AutoTokenizer.from_pretrained(str(DRAFT_DIR))
    assert len(draft_tok) == len(tok)
    for text in ROUNDTRIP:
        assert draft_tok.encode(text) == tok.encode(text)


def test_configs_match_and_shard(models):
    target, draft = models
    tc, dc = target.config, draft.config
    assert tc.vocab_size == dc.vocab_size == 4096
    assert tc.hidden_size == dc.hidden_size
    assert tc.num_attention_heads % 8 == 0 and tc.num_key_value_heads == 2
    assert tc.num_hidden_layers > dc.num_hidden_layers

    from safetensors import safe_open

    assert str(tc.dtype).endswith("bfloat16") and str(dc.dtype).endswith("bfloat16")
    for d in (TARGET_DIR, DRAFT_DIR):  # weights ship in bf16
        with safe_open(str(d / "model.safetensors"), framework="pt") as f:
            assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}


@torch.no_grad()
def test_generate_few_tokens(tok, models):
    enc = tok("def add(a, b):\n", return_tensors="pt")
    n = enc["input_ids"].shape[1]
    for model in models:
        logits = model(**enc).logits
        assert logits.shape == (1, n, 4096)
        assert torch.isfinite(logits.float()).all()
        out = model.generate(**enc, max_new_tokens=5, do_sample=False, pad_token_id=tok.eos_token_id)
        assert out.shape[0] == 1 and n < out.shape[1] <= n + 5
        assert isinstance(tok.decode(out[0, n:]), str)
