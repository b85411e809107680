"""Choosing the number of speculative tokens k for each step.

Whether speculation pays depends on the acceptance rate and on how the cost of a step grows with
the tokens verified and the draft passes run, which differs by machine (a GPU at small batch is
memory-bound and verifies k + 1 tokens almost for free; a CPU pays per token). So the controller
measures instead of assuming: for each batch-size bucket (powers of two) it keeps a moving average
of the decode throughput (tokens emitted per second of whole engine step, draft and verification
included) observed with each candidate k, and picks the best. It starts every bucket at k = 0 (the
safe choice) and probes k = 1 on a few sequences only (PROBE_SEQS): from the extra tokens and
extra seconds those few cost it extrapolates, linearly per sequence (which over-charges the draft's
shared per-pass cost, so it errs towards not speculating), what speculating on the whole batch
would yield. Only when that beats k = 0 does it speculate on the whole batch and compare the
larger candidates by measured throughput. It re-probes now and then because acceptance drifts.
Pinned (`adaptive=False`) it always returns max_k.
"""

from __future__ import annotations

from dataclasses import dataclass, field

PROBE_STEPS = 2
PROBE_SEQS = 4
REPROBE_EVERY = 64


@dataclass
class _Arm:
    rate: float = 0.0
    count: int = 0

    def add(self, rate: float, smoothing: float) -> None:
        self.rate = rate if self.count == 0 else self.rate + smoothing * (rate - self.rate)
        self.count += 1


@dataclass
class _Bucket:
    arms: dict[int, _Arm] = field(default_factory=dict)
    probe: _Arm = field(default_factory=_Arm)  # extrapolated whole-batch rate at the probe k
    steps: int = 0


class SpecController:
    def __init__(self, max_k: int, adaptive: bool = True, smoothing: float = 0.3) -> None:
        self.max_k = max_k
        self.adaptive = adaptive
        self.smoothing = smoothing
        self.candidates = sorted({0, 1, max(1, max_k // 2), max_k})
        self.buckets: dict[int, _Bucket] = {}
        self.acceptance = 0.0  # moving average per proposed token, for reporting
        self._accept_weight = 0.05

    @staticmethod
    def bucket_of(batch_size: int) -> int:
        return max(1, batch_size).bit_length()

    def choose_k(self, batch_size: int) -> tuple[int, int]:
        """-> (k, how many of the batch's sequences speculate this step)."""
        if not self.adaptive or batch_size == 0:
            return self.max_k, batch_size
        b = self.buckets.setdefault(self.bucket_of(batch_size), _Bucket())
        b.steps += 1
        arm = lambda k: b.arms.setdefault(k, _Arm())  # noqa: E731
        if arm(0).count < PROBE_STEPS:
            return 0, 0
        probe_k = self.candidates[1]
        if b.probe.count < PROBE_STEPS or b.steps % REPROBE_EVERY == 0:
            return probe_k, min(PROBE_SEQS, batch_size)
        if b.probe.rate <= arm(0).rate:
            return 0, 0
        untried = [k for k in self.candidates if arm(k).count == 0]
        if untried:
            return untried[0], batch_size
        return max(self.candidates, key=lambda k: arm(k).rate), batch_size

    def record_step(self, batch_size: int, k: int, num_spec: int, tokens: int, seconds: float) -> None:
        """A decode-only step: `batch_size` sequences, `num_spec` of them with k proposals, emitted
        `tokens` in `seconds` of whole engine step."""
        if seconds <= 0:
            return
        b = self.buckets.setdefault(self.bucket_of(batch_size), _Bucket())
        rate = tokens / seconds
        if k == 0 or num_spec == 0 or num_spec >= batch_size:
            k = k if num_spec else 0
            b.arms.setdefault(k, _Arm()).add(rate, self.smoothing)
            if num_spec and k == self.candidates[1]:
                b.probe.add(rate, self.smoothing)
            return
        base = b.arms.get(0)
        if base is None or not base.count:
            return
        plain_seconds = batch_size / base.rate
        extra_tokens = (tokens - batch_size) / num_spec
        extra_seconds = (seconds - plain_seconds) / num_spec
        whole = batch_size * (1 + extra_tokens) / max(plain_seconds + batch_size * extra_seconds, 1e-9)
        b.probe.add(whole, self.smoothing)

    def record_verification(self, num_accepted: int, num_proposed: int) -> None:
        if num_proposed:
            self.acceptance += self._accept_weight * (num_accepted / num_proposed - self.acceptance)
