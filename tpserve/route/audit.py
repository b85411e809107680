"""The online quality audit of routing: a sampled fraction of small-served requests is scored again
by the target, teacher-forced over prompt + the small model's output, as a background sequence
that is admitted only when no request waits.

Two comparisons per audited request, both in bits per byte:

- on the prompt's last tokens, real text the client sent, the small model's log-likelihood (from
  its prefill) against the target's: how much worse the small model predicts this request's text,
  the live estimate of the quality routing gives up on it (the offline benchmark measures the same
  on each request's true continuation);
- on the small model's own output, the target's log-likelihood and how often the target's most
  likely token equals the small model's (its greedy agreement): how far the answer strays from what
  the target would have said.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from tpserve.route.router import AuditInfo

LN2 = math.log(2.0)


@dataclass(frozen=True)
class AuditResult:
    request_id: str
    tail_tokens: int
    tail_bytes: int
    tail_small_bits: float
    tail_target_bits: float
    output_tokens: int
    output_bytes: int
    output_small_bits: float
    output_target_bits: float
    output_agreement: int  # output tokens equal to the target's most likely token

    @property
    def gap_bits_per_byte(self) -> float:
        return (self.tail_small_bits - self.tail_target_bits) / max(1, self.tail_bytes)


def audit_result(info: AuditInfo, token_ids: list[int], target_logprobs: list, bytes_of) -> AuditResult:
    """Compare from the audit sequence's prompt logprobs (`target_logprobs[i]` scores token i + 1,
    a TokenLogprobs with the target's top-1 alternative) and the small model's logprobs kept on
    `info`. `bytes_of(ids)` is the UTF-8 length of those tokens' text."""
    n_prompt, first = info.num_prompt_tokens, info.num_prompt_tokens + info.output_offset
    tail, out = info.tail_logprobs, info.output_logprobs
    tail_ids = token_ids[n_prompt - len(tail) : n_prompt]
    out_ids = token_ids[first : first + len(out)]
    target_tail = [target_logprobs[p - 1].logprob for p in range(n_prompt - len(tail), n_prompt)]
    target_out = [target_logprobs[p - 1] for p in range(first, first + len(out))]
    agree = sum(1 for lp, tok in zip(target_out, out_ids) if lp.top and lp.top[0][0] == tok)
    return AuditResult(
        request_id=info.request_id, tail_tokens=len(tail), tail_bytes=bytes_of(tail_ids) if tail_ids else 0,
        tail_small_bits=-sum(tail) / LN2, tail_target_bits=-sum(target_tail) / LN2,
        output_tokens=len(out), output_bytes=bytes_of(out_ids) if out_ids else 0,
        output_small_bits=-sum(out) / LN2, output_target_bits=-sum(lp.logprob for lp in target_out) / LN2,
        output_agreement=agree,
    )


@dataclass
class AuditTotals:
    """Sums over every audit so far; the ratios are what the metrics and GetServerInfo report."""

    num_audits: int = 0
    tail_bytes: int = 0
    tail_small_bits: float = 0.0
    tail_target_bits: float = 0.0
    output_tokens: int = 0
    output_bytes: int = 0
    output_target_bits: float = 0.0
    output_agreement: int = 0

    def add(self, r: AuditResult) -> None:
        self.num_audits += 1
        self.tail_bytes += r.tail_bytes
        self.tail_small_bits += r.tail_small_bits
        self.tail_target_bits += r.tail_target_bits
        self.output_tokens += r.output_tokens
        self.output_bytes += r.output_bytes
        self.output_target_bits += r.output_target_bits
        self.output_agreement += r.output_agreement

    def summary(self) -> dict:
        tb = max(1, self.tail_bytes)
        return {
            "num_audits": self.num_audits,
            "small_bits_per_byte": self.tail_small_bits / tb,
            "target_bits_per_byte": self.tail_target_bits / tb,
            # Relative quality given up on small-served traffic: (small - target) / target bits.
            "quality_gap": ((self.tail_small_bits - self.tail_target_bits) / self.tail_target_bits
                            if self.tail_target_bits > 0 else 0.0),
            "output_target_bits_per_byte": self.output_target_bits / max(1, self.output_bytes),
            "output_greedy_agreement": self.output_agreement / max(1, self.output_tokens),
        }
