"""OpenAI response bodies built from the serving core's outputs: completions and chat completions,
whole or as server-sent-event chunks, their logprobs, usage and error envelopes."""

from __future__ import annotations

import json
import math

from tpserve.engine.detokenizer import IncrementalDetokenizer
from tpserve.engine.outputs import RequestOutput
from tpserve.engine.sampler import TokenLogprobs
from tpserve.errors import RequestError

HTTP_STATUS = {"invalid_argument": 400, "failed_precondition": 400, "not_found": 404, "resource_exhausted": 429,
               "unavailable": 503, "internal": 500}
ERROR_TYPE = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error", 429: "rate_limit_error",
              503: "service_unavailable_error", 500: "server_error"}


def error_body(status: int, message: str, code: str | None = None, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": ERROR_TYPE.get(status, "server_error"), "param": param,
                      "code": code}}


def request_error_status(error: RequestError) -> int:
    return HTTP_STATUS[error.kind]


def sse(payload: dict | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"


def token_texts(tokenizer, token_ids: list[int], context: list[int]) -> list[str]:
    """The text each token adds after `context`, as the detokeniser streams it (a token that ends
    inside a multi-byte character adds nothing; the one completing it adds the character), so the
    texts join into the decoded text."""
    if tokenizer is None:
        return [""] * len(token_ids)
    detok = IncrementalDetokenizer(tokenizer, context)
    out = []
    for token in token_ids:
        before = len(detok.text)
        detok.add([token])
        out.append(detok.text[before:])
    return out


def _top(tokenizer, lp: TokenLogprobs) -> dict[str, float]:
    return {tokenizer.decode([t]) if tokenizer is not None else str(t): v for t, v in lp.top}


def completion_logprobs(tokenizer, token_ids: list[int], lps: list[TokenLogprobs | None], context: list[int],
                        offset: int) -> dict:
    """The completions format for `token_ids` (their logprobs `lps`, None for a prompt's first
    token), the text before them being `offset` characters long."""
    texts = token_texts(tokenizer, token_ids, context)
    offsets = []
    for text in texts:
        offsets.append(offset)
        offset += len(text)
    return {"tokens": texts, "token_logprobs": [None if lp is None else lp.logprob for lp in lps],
            "top_logprobs": [None if lp is None else _top(tokenizer, lp) for lp in lps], "text_offset": offsets}


def chat_logprobs(tokenizer, token_ids: list[int], lps: list[TokenLogprobs], context: list[int]) -> dict:
    texts = token_texts(tokenizer, token_ids, context)

    def entry(text: str, logprob: float) -> dict:
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    content = []
    for text, lp in zip(texts, lps):
        top = [entry(tokenizer.decode([t]) if tokenizer is not None else str(t), v) for t, v in lp.top]
        content.append({**entry(text, lp.logprob), "top_logprobs": top})
    return {"content": content}


def _finite(x: float | None) -> float | None:
    return x if x is not None and math.isfinite(x) else None  # JSON has no infinities


def route_info(model_name: str, route) -> dict:
    """How the router served a choice of an `auto` request (a tpserve extension of the body)."""
    return {"model": model_name, "policy": route.policy, "score": _finite(route.score),
            "threshold": _finite(route.threshold), "handed_over": route.handed_over}


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


class Choice:
    """One choice's accumulated state: its text and tokens so far (for logprob offsets)."""

    def __init__(self, index: int, prompt_ids: list[int], prompt_text: str | None) -> None:
        self.index = index
        self.prompt_ids = prompt_ids
        self.prompt_text = prompt_text
        self.token_ids: list[int] = []
        self.text = ""
        self.finish_reason: str | None = None
        self.prompt_logprobs: list | None = None
        self.num_prompt_tokens = len(prompt_ids)
        self.model: str | None = None  # the model serving it, from its latest output
        self.route = None  # an `auto` request's RouteOutcome, with its last output

    def add(self, out: RequestOutput) -> tuple[int, str]:
        """Take a delta; returns (how many tokens came before it, the text before it)."""
        before = (len(self.token_ids), self.text)
        self.token_ids += out.new_token_ids
        self.text += out.text
        if out.prompt_logprobs is not None:
            self.prompt_logprobs = out.prompt_logprobs
        self.model = out.model
        if out.finished:
            self.finish_reason = out.finish_reason
            self.route = out.route
        return before

    def echo_text(self, tokenizer) -> str:
        """The prompt as text: as given, or detokenised once from its token ids."""
        if self.prompt_text is None:
            self.prompt_text = "".join(token_texts(tokenizer, self.prompt_ids, []))
        return self.prompt_text
