"""The OpenAI API's request bodies (pydantic) and their translation into the serving core's terms.

Fields follow the OpenAI reference for completions and chat completions, plus the extensions
vLLM users expect (`top_k`, `min_p`, `repetition_penalty`, `min_tokens`, `ignore_eos`,
`stop_token_ids`, and `add_generation_prompt` for chat). Unknown fields are refused (400, naming
the field) rather than ignored.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from tpserve.engine.sampling_params import MAX_LOGPROBS, SamplingParams
from tpserve.errors import InvalidRequest


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StreamOptions(_Strict):
    include_usage: bool = False
    continuous_usage_stats: bool = False  # vLLM's extension: every chunk carries the usage so far


class _Sampling(_Strict):
    """Fields completions and chat share."""

    model: str
    temperature: float | None = None
    top_p: float | None = None
    n: int = Field(1, ge=1, le=128)
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    min_tokens: int | None = None
    ignore_eos: bool | None = None
    stop_token_ids: list[int] | None = None

    def sampling_params(self, max_tokens: int, logprobs: int | None, prompt_logprobs: int | None = None
                        ) -> SamplingParams:
        """The first sample's parameters (sample i uses seed + i)."""
        if self.stream_options is not None and not self.stream:
            raise InvalidRequest("stream_options is only allowed with stream: true")
        kwargs = {name: getattr(self, name) for name in ("temperature", "top_p", "seed", "presence_penalty",
                                                         "frequency_penalty", "top_k", "min_p", "repetition_penalty",
                                                         "min_tokens", "ignore_eos")
                  if getattr(self, name) is not None}
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        bias = {}
        for key, value in (self.logit_bias or {}).items():
            try:
                bias[int(key)] = float(value)
            except ValueError:
                raise InvalidRequest(f"logit_bias key {key!r} is not a token id") from None
        return SamplingParams(max_tokens=max_tokens, logprobs=logprobs, prompt_logprobs=prompt_logprobs, stop=stop,
                              stop_token_ids=list(self.stop_token_ids or []), logit_bias=bias, **kwargs)

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    @property
    def continuous_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.continuous_usage_stats


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = 16
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False

    def prompts(self) -> list[tuple[str | None, list[int] | None]]:
        """Each prompt as (text, token ids), one of them set."""
        p = self.prompt
        if isinstance(p, str):
            return [(p, None)]
        if not p:
            raise InvalidRequest("prompt is empty")
        if all(isinstance(x, int) for x in p):
            return [(None, list(p))]
        if all(isinstance(x, str) for x in p):
            return [(x, None) for x in p]
        return [(None, list(x)) for x in p]

    def params(self) -> SamplingParams:
        max_tokens = 16 if self.max_tokens is None else self.max_tokens
        if max_tokens == 0 and not (self.echo and self.logprobs is not None):
            raise InvalidRequest("max_tokens=0 must be >= 1 (0 only scores the prompt, with echo and logprobs)")
        prompt_logprobs = self.logprobs if self.echo and self.logprobs is not None else None
        return self.sampling_params(max_tokens, self.logprobs, prompt_logprobs)


class ContentPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")  # name, tool_call_id, ... travel to the template as given

    role: str
    content: str | list[ContentPart] | None = None

    def for_template(self) -> dict:
        message = self.model_dump(exclude_none=True)
        if isinstance(self.content, list):
            message["content"] = "".join(part.text for part in self.content)
        return message


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    max_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    add_generation_prompt: bool = True

    def params(self, default_max_tokens: int) -> SamplingParams:
        if self.top_logprobs is not None and not self.logprobs:
            raise InvalidRequest("top_logprobs needs logprobs: true")
        max_tokens = self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
        logprobs = (self.top_logprobs or 0) if self.logprobs else None
        return self.sampling_params(default_max_tokens if max_tokens is None else max_tokens, logprobs)


class TokenizeRequest(_Strict):
    model: str | None = None
    prompt: str
    add_special_tokens: bool = True


class DetokenizeRequest(_Strict):
    model: str | None = None
    tokens: list[int]
