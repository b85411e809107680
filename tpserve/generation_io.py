"""JSONL input and output of offline generation (the stable interface of launch/generate.py)."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

from tpserve.engine.sampling_params import SamplingParams

SAMPLING_FIELDS = {f.name for f in fields(SamplingParams)}


class InputError(ValueError):
    """A line of the input file is malformed; the message names the line and the problem."""


@dataclass
class InputLine:
    """A non-empty input line: its index (its place among the non-empty lines, the output's
    `index`), its line number, and its prompt and parameters, or the error that makes it unusable."""

    index: int
    lineno: int
    prompt: dict | None = None
    params: SamplingParams | None = None
    error: str | None = None


def read_requests(path: str | Path, defaults: SamplingParams) -> list[InputLine]:
    """Every non-empty line: prompt is {"prompt": str} or {"prompt_token_ids": [int]}; any
    SamplingParams field on the line overrides `defaults`. A malformed line carries its error
    (naming the file and line) instead."""
    lines = []
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            entry = InputLine(len(lines), lineno)
            try:
                entry.prompt, entry.params = _parse(line, defaults)
            except InputError as e:
                entry.error = f"{path}:{lineno}: {e}"
            lines.append(entry)
    return lines


def _parse(line: str, defaults: SamplingParams) -> tuple[dict, SamplingParams]:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise InputError(f"not valid JSON ({e})") from None
    if not isinstance(obj, dict):
        raise InputError(f"expected a JSON object, got {type(obj).__name__}")
    unknown = set(obj) - SAMPLING_FIELDS - {"prompt", "prompt_token_ids"}
    if unknown:
        raise InputError(f"unknown fields {sorted(unknown)}")
    if ("prompt" in obj) == ("prompt_token_ids" in obj):
        raise InputError("needs exactly one of 'prompt' and 'prompt_token_ids'")
    prompt = {k: obj[k] for k in ("prompt", "prompt_token_ids") if k in obj}
    try:
        params = replace(defaults, **{k: v for k, v in obj.items() if k in SAMPLING_FIELDS})
    except (TypeError, ValueError) as e:
        raise InputError(f"bad sampling field: {e}") from None
    return prompt, params


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


def done_indices(path: str | Path) -> set[int]:
    """The indices an earlier run already wrote to `path` (for --resume). A last line cut short by
    a kill is removed from the file, so appending starts on a line boundary."""
    path = Path(path)
    if not path.exists():
        return set()
    data = path.read_bytes()
    keep = data.rfind(b"\n") + 1  # everything after the last newline is a partial line
    if keep < len(data):
        with open(path, "r+b") as f:
            f.truncate(keep)
    done = set()
    for n, line in enumerate(data[:keep].decode().splitlines(), 1):
        if line.strip():
            try:
                done.add(int(json.loads(line)["index"]))
            except (ValueError, KeyError, TypeError):
                raise InputError(f"{path}:{n}: not a result line of launch/generate.py; cannot resume") from None
    return done


class ResultWriter:
    """Appends result lines as they finish: each is flushed at once and the file is fsynced every
    `sync_every` lines and on close, so a killed job keeps what it finished."""

    def __init__(self, path: str | Path, with_text: bool, append: bool = False, sync_every: int = 16) -> None:
        self.file = open(path, "a" if append else "w")
        self.with_text = with_text
        self.sync_every = sync_every
        self.num_written = 0

    def write(self, index: int, result) -> None:
        self.file.write(json.dumps(result_line(index, result, self.with_text)) + "\n")
        self.file.flush()
        self.num_written += 1
        if self.num_written % self.sync_every == 0:
            os.fsync(self.file.fileno())

    def close(self) -> None:
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
