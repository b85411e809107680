"""The profiler's requests: a JSONL dataset, or seeded synthetic prompts cut from held-out code.

A length is `N` (fixed) or `LO:HI` (uniform, inclusive). Synthetic prompts are windows of the
held-out part of the bundled corpus (Python's own standard library, files the bundled models never
trained on), tokenised with the served model's tokenizer; a model without one gets seeded random
token ids. Prompts travel as token ids, so both protocols and every run see the same tokens.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from tpserve.errors import ConfigError


@dataclass(frozen=True)
class LengthDist:
    low: int
    high: int

    @classmethod
    def parse(cls, text: str, flag: str) -> LengthDist:
        try:
            low, _, high = str(text).partition(":")
            dist = cls(int(low), int(high or low))
        except ValueError:
            raise ConfigError(f"{flag} {text!r} must be N or LO:HI (token counts)") from None
        if not 1 <= dist.low <= dist.high:
            raise ConfigError(f"{flag} {text!r} must satisfy 1 <= LO <= HI")
        return dist

    def sample(self, rng: random.Random) -> int:
        return rng.randint(self.low, self.high)

    def __str__(self) -> str:
        return str(self.low) if self.low == self.high else f"{self.low}:{self.high}"


Request = tuple[list[int], int]  # prompt token ids, output tokens


def sample_runs(pool: list[Request], n: int, seed: int) -> list[Request]:
    """n requests drawn from a dataset for one run (a seeded shuffle, cycled if n is larger)."""
    order = list(range(len(pool)))
    random.Random(seed).shuffle(order)
    return [pool[order[i % len(order)]] for i in range(n)]


def load_dataset(path: str | Path, tokenizer, default_output: LengthDist, seed: int) -> list[Request]:
    """Lines of {"prompt": str} or {"prompt_token_ids": [...]}, with an optional "output_len"."""
    rng = random.Random(seed)
    out = []
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}:{n}: not JSON ({e})") from None
        if "prompt_token_ids" in item:
            ids = [int(t) for t in item["prompt_token_ids"]]
        elif "prompt" in item:
            if tokenizer is None:
                raise ConfigError(f"{path}:{n}: a text prompt needs a model with a tokenizer; give prompt_token_ids")
            ids = tokenizer.encode(item["prompt"])
        else:
            raise ConfigError(f"{path}:{n}: needs 'prompt' or 'prompt_token_ids'")
        if not ids:
            raise ConfigError(f"{path}:{n}: the prompt is empty")
        output = int(item.get("output_len") or default_output.sample(rng))
        out.append((ids, output))
    if not out:
        raise ConfigError(f"{path} holds no requests")
    return out


def synthetic(num_requests: int, input_len: LengthDist, output_len: LengthDist, tokenizer, vocab_size: int,
              seed: int) -> list[Request]:
    """Seeded prompts: windows at random offsets of held-out code (different seeds give different
    windows, so separate runs do not hit each other's prefix cache)."""
    rng = random.Random(seed)
    stream = _heldout_tokens(tokenizer) if tokenizer is not None else None
    out = []
    for _ in range(num_requests):
        n = input_len.sample(rng)
        if stream is not None and len(stream) > n:
            start = rng.randrange(len(stream) - n)
            ids = stream[start : start + n]
        else:
            ids = [rng.randrange(3, vocab_size) for _ in range(n)]
        out.append((ids, output_len.sample(rng)))
    return out


_HELDOUT: dict[int, list[int]] = {}


def _heldout_tokens(tokenizer, at_least: int = 400_000) -> list[int]:
    """Token ids of held-out standard-library files, in a fixed order, until there are enough
    (computed once per tokenizer)."""
    if id(tokenizer) in _HELDOUT:
        return _HELDOUT[id(tokenizer)]
    from transformers.utils import logging as hf_logging

    from tpserve.bundled.corpus import load_corpus

    hf_logging.set_verbosity_error()  # whole files are longer than the model's context: windows are cut below
    _, heldout = load_corpus()
    ids: list[int] = []
    for rel in sorted(heldout):
        ids += tokenizer.encode(heldout[rel], add_special_tokens=False)
        if len(ids) >= at_least:
            break
    _HELDOUT[id(tokenizer)] = ids
    return ids
