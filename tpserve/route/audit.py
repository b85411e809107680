"""The online quality audit of routing: a sampled fraction of finished small-served requests is
scored again, teacher-forced over prompt + the small model's output, first by the small model and
then by the target, as background sequences that are admitted only when no request waits.

Two comparisons per audited request, both in bits per byte:

- on a window of the prompt (real text the client sent), the small model's log-likelihood against
  the target's: how much worse the small model predicts this request's own text, the live estimate
  of the quality routing gives up on it (the offline benchmark measures the same on each request's
  true continuation). The window is the `--route-tail-tokens` tokens *before* the prompt's last
  `--route-tail-tokens`: the `confidence` and `gap` policies chose the small model for these
  requests because of how the last ones scored, so those would flatter it (the selection effect),
  while the text just before them is as close to the request's continuation as they are; a prompt
  too short for that is measured whole;
- on the small model's own output, the target's log-likelihood and how often the target's most
  likely token is the small model's (its greedy agreement): how far the answer strays from what the
  target would have said.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

LN2 = math.log(2.0)


@dataclass(slots=True)
class AuditInfo:
    """One audit: which tokens it compares, and the small model's log-probabilities once its pass
    is done (logprobs[i] scores token i + 1)."""

    request_id: str
    num_prompt_tokens: int
    output_offset: int  # output tokens another model produced before the small model's first
    window: tuple[int, int]  # prompt positions [start, end) of the compared text
    small_logprobs: list[float] = field(default_factory=list)


def audit_window(num_prompt_tokens: int, size: int) -> tuple[int, int]:
    """The `size` prompt tokens before the last `size` (or what there is of them); the whole prompt
    (from its second token, the first with a log-probability) when it is too short."""
    end = num_prompt_tokens - size
    if end <= 1:
        return 1, num_prompt_tokens
    return max(1, end - size), end


@dataclass(frozen=True)
class AuditResult:
    request_id: str
    window_tokens: int
    window_bytes: int
    window_small_bits: float
    window_target_bits: float
    output_tokens: int
    output_bytes: int
    output_small_bits: float
    output_target_bits: float
    output_agreement: int  # output tokens equal to the target's most likely token


def audit_result(info: AuditInfo, token_ids: list[int], target_logprobs: list, bytes_of) -> AuditResult:
    """Compare the small model's log-probabilities on `info` with the target's (`target_logprobs[i]`
    scores token i + 1, a TokenLogprobs with the target's top-1 alternative). `bytes_of(ids)` is the
    UTF-8 length of those tokens' text."""
    start, end = info.window
    first = info.num_prompt_tokens + info.output_offset
    window_ids, out_ids = token_ids[start:end], token_ids[first:]
    target_out = target_logprobs[first - 1 :]
    return AuditResult(
        request_id=info.request_id, window_tokens=len(window_ids), window_bytes=bytes_of(window_ids) if window_ids else 0,
        window_small_bits=-sum(info.small_logprobs[start - 1 : end - 1]) / LN2,
        window_target_bits=-sum(lp.logprob for lp in target_logprobs[start - 1 : end - 1]) / LN2,
        output_tokens=len(out_ids), output_bytes=bytes_of(out_ids) if out_ids else 0,
        output_small_bits=-sum(info.small_logprobs[first - 1 :]) / LN2,
        output_target_bits=-sum(lp.logprob for lp in target_out) / LN2,
        output_agreement=sum(1 for lp, tok in zip(target_out, out_ids) if lp.top and lp.top[0][0] == tok),
    )


@dataclass
class AuditTotals:
    """Sums over every audit so far; the ratios are what the metrics and GetServerInfo report."""

    num_audits: int = 0
    window_bytes: int = 0
    window_small_bits: float = 0.0
    window_target_bits: float = 0.0
    output_tokens: int = 0
    output_bytes: int = 0
    output_target_bits: float = 0.0
    output_agreement: int = 0

    def add(self, r: AuditResult) -> None:
        self.num_audits += 1
        self.window_bytes += r.window_bytes
        self.window_small_bits += r.window_small_bits
        self.window_target_bits += r.window_target_bits
        self.output_tokens += r.output_tokens
        self.output_bytes += r.output_bytes
        self.output_target_bits += r.output_target_bits
        self.output_agreement += r.output_agreement

    def summary(self) -> dict:
        wb = max(1, self.window_bytes)
        return {
            "num_audits": self.num_audits,
            "small_bits_per_byte": self.window_small_bits / wb,
            "target_bits_per_byte": self.window_target_bits / wb,
            # Relative quality given up on small-served traffic: (small - target) / target bits.
            "quality_gap": ((self.window_small_bits - self.window_target_bits) / self.window_target_bits
                            if self.window_target_bits > 0 else 0.0),
            "output_target_bits_per_byte": self.output_target_bits / max(1, self.output_bytes),
            "output_greedy_agreement": self.output_agreement / max(1, self.output_tokens),
        }
