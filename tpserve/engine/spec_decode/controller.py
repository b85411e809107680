"""Choosing the number of speculative tokens k for each step.

Whether speculation pays depends on the acceptance rate and on how the cost of a step grows with
the tokens verified and the draft passes run, which differs by machine (a GPU at small batch is
memory-bound and verifies k + 1 tokens almost for free; a CPU pays per token). So the controller
measures instead of assuming: for each batch-size bucket (powers of two) it keeps a moving average
of the decode throughput (tokens emitted per second of whole engine step, draft and verification
included) observed with each candidate k, and picks the best. It starts every bucket at k = 0 (the
safe choice), probes k = 1 (the cheapest speculation) for two steps, explores the larger
candidates only when speculation won the probe, and re-probes now and then because acceptance
drifts with the text.
Pinned (`adaptive=False`) it always returns max_k.
"""

from __future__ import annotations

from dataclasses import dataclass, field

PROBE_STEPS = 2
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

    def choose_k(self, batch_size: int) -> int:
        if not self.adaptive or batch_size == 0:
            return self.max_k
        b = self.buckets.setdefault(self.bucket_of(batch_size), _Bucket())
        b.steps += 1
        arm = lambda k: b.arms.setdefault(k, _Arm())  # noqa: E731
        if arm(0).count < PROBE_STEPS:
            return 0
        probe = self.candidates[1]
        if arm(probe).count < PROBE_STEPS or b.steps % REPROBE_EVERY == 0:
            return probe
        best = max((k for k in self.candidates if arm(k).count), key=lambda k: arm(k).rate)
        if best > 0:
            untried = [k for k in self.candidates if arm(k).count == 0]
            if untried:
                return untried[0]
        return best

    def record_step(self, batch_size: int, k: int, tokens: int, seconds: float) -> None:
        """A decode-only step with `batch_size` sequences and `k` proposals each emitted `tokens`."""
        if seconds <= 0:
            return
        b = self.buckets.setdefault(self.bucket_of(batch_size), _Bucket())
        b.arms.setdefault(k, _Arm()).add(tokens / seconds, self.smoothing)

    def record_verification(self, num_accepted: int, num_proposed: int) -> None:
        if num_proposed:
            self.acceptance += self._accept_weight * (num_accepted / num_proposed - self.acceptance)
