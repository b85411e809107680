"""JSONL input and output of offline generation (the stable interface of launch/generate.py)."""

from __future__ import annotations

import json
from dataclasses import asdict, fields, replace
from pathlib import Path

from tpserve.engine.sampling_params import SamplingParams

SAMPLING_FIELDS = {f.name for f in fields(SamplingParams)}


class InputError(ValueError):
    """A line of the input file is malformed; the message names the line and the problem."""


def read_requests(path: str | Path, defaults: SamplingParams) -> list[tuple[dict, SamplingParams]]:
    """(prompt, params) for each non-empty line: prompt is {"prompt": str} or
    {"prompt_token_ids": [int]}; any SamplingParams field on the line overrides `defaults`."""
    requests = []
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise InputError(f"{where}: not valid JSON ({e})") from None
            if not isinstance(obj, dict):
                raise InputError(f"{where}: expected a JSON object, got {type(obj).__name__}")
            unknown = set(obj) - SAMPLING_FIELDS - {"prompt", "prompt_token_ids"}
            if unknown:
                raise InputError(f"{where}: unknown fields {sorted(unknown)}")
            if ("prompt" in obj) == ("prompt_token_ids" in obj):
                raise InputError(f"{where}: needs exactly one of 'prompt' and 'prompt_token_ids'")
            prompt = {k: obj[k] for k in ("prompt", "prompt_token_ids") if k in obj}
            params = replace(defaults, **{k: v for k, v in obj.items() if k in SAMPLING_FIELDS})
            requests.append((prompt, params))
    return requests


def result_line(index: int, result, with_text: bool) -> dict:
    out = {"index": index, "prompt_token_ids": result.prompt_token_ids, "token_ids": result.token_ids}
    if with_text:
        out["text"] = result.text
    out["finish_reason"] = result.finish_reason
    out["num_cached_tokens"] = result.num_cached_tokens
    if result.logprobs:
        out["logprobs"] = [asdict(lp) for lp in result.logprobs]
    if result.speculation:
        out["speculation"] = asdict(result.speculation)
    return out


def write_results(path: str | Path, results, with_text: bool) -> None:
    with open(path, "w") as f:
        for i, res in enumerate(results):
            f.write(json.dumps(result_line(i, res, with_text)) + "\n")
