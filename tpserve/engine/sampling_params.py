"""Per-request sampling parameters, validated with messages that name the value and the limit."""

from __future__ import annotations

from dataclasses import dataclass, field

from tpserve.errors import InvalidRequest

MAX_STOP_STRINGS = 16
MAX_STOP_STRING_LEN = 256
MAX_LOGPROBS = 20
MAX_LOGIT_BIAS = 100.0


class SamplingError(InvalidRequest):
    """An out-of-range sampling parameter."""


@dataclass
class SamplingParams:
    """temperature 0 means greedy. top_k 0 / -1 disables top-k; top_p 1 and min_p 0 disable those.
    Penalties follow the common conventions: repetition (HF, over prompt and output, 1 = off),
    presence and frequency (OpenAI, over output tokens, 0 = off). `logprobs` = number of top
    alternatives returned beside the chosen token's logprob (None: no logprobs); `prompt_logprobs`
    the same for every prompt token after the first, from the prefill (max_tokens 0 then scores the
    prompt without generating). `logit_bias` adds a value in [-100, 100] to a token's logit before
    sampling (OpenAI)."""

    max_tokens: int = 16
    min_tokens: int = 0
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    logit_bias: dict[int, float] = field(default_factory=dict)

    def validate(self, vocab_size: int | None = None) -> None:
        checks = [
            (self.max_tokens >= 1 or (self.max_tokens == 0 and self.prompt_logprobs is not None),
             f"max_tokens={self.max_tokens} must be >= 1 (0 only scores a prompt, with prompt logprobs)"),
            (self.min_tokens >= 0, f"min_tokens={self.min_tokens} must be >= 0"),
            (self.min_tokens <= self.max_tokens,
             f"min_tokens={self.min_tokens} must be <= max_tokens={self.max_tokens}"),
            (0.0 <= self.temperature <= 100.0, f"temperature={self.temperature} must be in [0, 100]"),
            (self.top_k >= -1, f"top_k={self.top_k} must be -1, 0 (off) or a positive count"),
            (0.0 < self.top_p <= 1.0, f"top_p={self.top_p} must be in (0, 1]"),
            (0.0 <= self.min_p <= 1.0, f"min_p={self.min_p} must be in [0, 1]"),
            (0.0 < self.repetition_penalty <= 10.0,
             f"repetition_penalty={self.repetition_penalty} must be in (0, 10]"),
            (-2.0 <= self.presence_penalty <= 2.0, f"presence_penalty={self.presence_penalty} must be in [-2, 2]"),
            (-2.0 <= self.frequency_penalty <= 2.0,
             f"frequency_penalty={self.frequency_penalty} must be in [-2, 2]"),
            (len(self.stop) <= MAX_STOP_STRINGS, f"{len(self.stop)} stop strings given; at most {MAX_STOP_STRINGS}"),
            (self.logprobs is None or 0 <= self.logprobs <= MAX_LOGPROBS,
             f"logprobs={self.logprobs} must be in [0, {MAX_LOGPROBS}]"),
            (self.prompt_logprobs is None or 0 <= self.prompt_logprobs <= MAX_LOGPROBS,
             f"prompt_logprobs={self.prompt_logprobs} must be in [0, {MAX_LOGPROBS}]"),
            (self.seed is None or 0 <= self.seed < 2**63, f"seed={self.seed} must be in [0, 2**63)"),
        ]
        for ok, msg in checks:
            if not ok:
                raise SamplingError(msg)
        for s in self.stop:
            if not s:
                raise SamplingError("stop strings must not be empty")
            if len(s) > MAX_STOP_STRING_LEN:
                raise SamplingError(f"stop string of length {len(s)} exceeds the limit {MAX_STOP_STRING_LEN}")
        for token, bias in self.logit_bias.items():
            if not -MAX_LOGIT_BIAS <= bias <= MAX_LOGIT_BIAS:
                raise SamplingError(f"logit_bias {bias} for token {token} must be in [-100, 100]")
        if vocab_size is not None:
            bad = [t for t in self.logit_bias if not 0 <= t < vocab_size]
            if bad:
                raise SamplingError(f"logit_bias token id {bad[0]} is outside the vocabulary [0, {vocab_size})")
            if self.top_k > vocab_size:
                raise SamplingError(f"top_k={self.top_k} exceeds the vocabulary size {vocab_size}")
            bad = [t for t in self.stop_token_ids if not 0 <= t < vocab_size]
            if bad:
                raise SamplingError(f"stop_token_ids: token id {bad[0]} is outside the vocabulary [0, {vocab_size})")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0
