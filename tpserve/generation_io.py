"""JSONL input and output of offline generation (the stable interface of launch/generate.py)."""

from __future__ import annotations

import json
from pathlib import Path


class InputError(ValueError):
    """A line of the input file is malformed; the message names the line and the problem."""


def read_requests(path: str | Path, tokenizer, vocab_size: int) -> list[list[int]]:
    """Prompt token ids for each non-empty line of `path`."""
    prompts = []
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise InputError(f"{path}:{lineno}: not valid JSON ({e})") from None
            prompts.append(_prompt_ids(obj, tokenizer, vocab_size, f"{path}:{lineno}"))
    return prompts


def _prompt_ids(obj, tokenizer, vocab_size: int, where: str) -> list[int]:
    if not isinstance(obj, dict):
        raise InputError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    if "prompt_token_ids" in obj:
        ids = obj["prompt_token_ids"]
        if not isinstance(ids, list) or not all(isinstance(t, int) for t in ids):
            raise InputError(f"{where}: prompt_token_ids must be a list of integers")
        bad = [t for t in ids if not 0 <= t < vocab_size]
        if bad:
            raise InputError(f"{where}: token id {bad[0]} is outside the vocabulary [0, {vocab_size})")
    elif "prompt" in obj:
        if tokenizer is None:
            raise InputError(f"{where}: text prompt given but the model directory has no tokenizer; "
                             "use prompt_token_ids")
        ids = tokenizer.encode(obj["prompt"])
    else:
        raise InputError(f"{where}: needs a 'prompt' or 'prompt_token_ids' field")
    if not ids:
        raise InputError(f"{where}: prompt is empty")
    return list(ids)


def write_results(path: str | Path, results, tokenizer) -> None:
    with open(path, "w") as f:
        for i, res in enumerate(results):
            out = {"index": i, "prompt_token_ids": res.prompt_token_ids, "token_ids": res.token_ids}
            if tokenizer is not None:
                out["text"] = tokenizer.decode(res.token_ids, skip_special_tokens=True)
            out["finish_reason"] = res.finish_reason
            f.write(json.dumps(out) + "\n")
