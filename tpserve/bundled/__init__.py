"""Bundled default models: a small Llama-family code model and its draft.

The artifacts are committed under ``models/`` and are rebuilt from scratch,
deterministically, by ``python -m tpserve.bundled.build``.  The target model
uses GQA (8 query heads, 2 KV heads) so it shards at TP 1, 2, 4 and 8; the
draft shares its tokenizer and vocabulary for speculative decoding.
"""
from pathlib import Path

BUNDLED_DIR = Path(__file__).resolve().parent
MODELS_DIR = BUNDLED_DIR / "models"
DEFAULT_MODEL_DIR = MODELS_DIR / "code-target"
DEFAULT_DRAFT_DIR = MODELS_DIR / "code-draft"

__all__ = ["BUNDLED_DIR", "MODELS_DIR", "DEFAULT_MODEL_DIR", "DEFAULT_DRAFT_DIR"]
