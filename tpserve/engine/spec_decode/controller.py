"""Choosing the number of speculative tokens k for each step.

Whether speculation pays depends on the acceptance rate and on how the cost of a step grows with
the tokens verified and the draft passes run, which differs by machine (a GPU at small batch is
memory-bound and verifies k + 1 tokens almost for free; a CPU pays per token). So the controller
measures instead of assuming. For each batch-size bucket (powers of two) it keeps a moving average
of decode throughput (tokens emitted per second of whole engine step, draft and verification
included) for each candidate k it has run on the whole batch.

A bucket starts at k = 0, the safe choice. It then probes `probe_k` for PROBE_STEPS steps, for a
draft model on a few sequences only (PROBE_SEQS). From the extra tokens and extra seconds those few
add, summed over the probe, it extrapolates linearly per sequence (which over-charges the draft's shared
per-pass cost, so it errs towards not speculating) what speculating on the whole batch would
yield. Only if that beats k = 0 does the bucket switch on; it then runs each candidate on the
whole batch and keeps the best, re-measuring k = 0 now and then. A lost probe is repeated after
an interval that doubles each time (acceptance drifts, so the answer may change), so the probes
of a bucket where speculation never pays cost ever less.

The first step of a probe, and the first after switching on, is not measured: it includes the
draft's one-time catch-up over the new speculating sequences' contexts.

A probe that is clearly losing after two measured steps stops early.

A draft model is probed at k = 1 on PROBE_SEQS sequences (one draft pass per proposed token, and
a catch-up over each new sequence's context: the cheapest probe). A proposer whose proposals cost
nothing to make (n-gram lookup) is probed at its largest k on the whole batch: only verification
rows are paid for, and measuring the whole batch needs no extrapolation. Pinned
(`adaptive=False`) it always returns max_k.
"""

from __future__ import annotations

from dataclasses import dataclass, field

WARMUP_STEPS = 2  # k = 0 steps measured before the first probe
PROBE_STEPS = 4  # measured probe steps (after one unmeasured catch-up step)
PROBE_SEQS = 4
CLEARLY_LOSING = 0.8  # a probe stops early when, after two measured steps, it is this far behind
FIRST_REPROBE = 64  # steps from a lost probe to the next; doubles after each lost probe
MAX_REPROBE = 1024
REMEASURE_EVERY = 32  # while on: one k = 0 step this often keeps the baseline current


@dataclass
class _Arm:
    rate: float = 0.0
    count: int = 0

    def add(self, rate: float, smoothing: float) -> None:
        self.rate = rate if self.count == 0 else self.rate + smoothing * (rate - self.rate)
        self.count += 1


@dataclass
class _Probe:
    caught_up: bool  # the first probe step (the draft's catch-up) has passed, unmeasured
    measured: int = 0
    extra_tokens: float = 0.0  # summed over measured steps, beyond one token per sequence
    extra_seconds: float = 0.0  # beyond what the step would have taken at k = 0
    seq_steps: int = 0  # speculating sequences summed over measured steps


@dataclass
class _Bucket:
    arms: dict[int, _Arm] = field(default_factory=dict)
    on: bool = False
    probe: _Probe | None = None
    next_probe: int = WARMUP_STEPS  # step at which the next probe starts (while off)
    interval: int = FIRST_REPROBE
    skip_next: bool = False  # the next full-batch speculative step pays catch-up: don't measure it
    steps: int = 0

    def arm(self, k: int) -> _Arm:
        return self.arms.setdefault(k, _Arm())


class SpecController:
    def __init__(self, max_k: int, adaptive: bool = True, smoothing: float = 0.3,
                 free_proposals: bool = False) -> None:
        """free_proposals: the proposer costs nothing per proposed token (n-gram lookup)."""
        self.max_k = max_k
        self.adaptive = adaptive
        self.smoothing = smoothing
        self.candidates = sorted({0, 1, max(1, max_k // 2), max_k})
        self.probe_k = max_k if free_proposals else min(1, max_k)
        self.probe_seqs = None if free_proposals else PROBE_SEQS  # None: the whole batch
        self.probe_catch_up = not free_proposals  # a draft's first probe step catches up
        self.buckets: dict[int, _Bucket] = {}
        self.acceptance = 0.0  # moving average per proposed token, for reporting
        self._accept_weight = 0.05

    @staticmethod
    def bucket_of(batch_size: int) -> int:
        return max(1, batch_size).bit_length()

    def _bucket(self, batch_size: int) -> _Bucket:
        return self.buckets.setdefault(self.bucket_of(batch_size), _Bucket())

    def choose_k(self, batch_size: int) -> tuple[int, int]:
        """-> (k, how many of the batch's sequences speculate this step)."""
        if not self.adaptive or batch_size == 0:
            return self.max_k, batch_size
        b = self._bucket(batch_size)
        b.steps += 1
        if self.max_k == 0 or b.arm(0).count < WARMUP_STEPS:
            return 0, 0
        if b.on:
            if b.steps % REMEASURE_EVERY == 0:
                return 0, 0
            untried = [k for k in self.candidates if b.arm(k).count == 0]
            k = untried[0] if untried else max(self.candidates, key=lambda c: b.arm(c).rate)
            if k == 0:  # no k beats k = 0 any more: off, and probe again later
                self._switch_off(b)
            return k, (batch_size if k else 0)
        if b.probe is None and b.steps >= b.next_probe:
            b.probe = _Probe(caught_up=not self.probe_catch_up)
        if b.probe is not None:
            return self.probe_k, min(self.probe_seqs or batch_size, batch_size)
        return 0, 0

    def record_step(self, batch_size: int, k: int, num_spec: int, tokens: int, seconds: float) -> None:
        """A decode-only step: `batch_size` sequences, `num_spec` of them with k proposals, emitted
        `tokens` in `seconds` of whole engine step."""
        if seconds <= 0 or not self.adaptive:
            return
        b = self._bucket(batch_size)
        if num_spec == 0 or k == 0:
            b.arm(0).add(tokens / seconds, self.smoothing)
            return
        if b.probe is not None and k == self.probe_k:
            self._record_probe(b, batch_size, num_spec, tokens, seconds)
        elif num_spec >= batch_size and b.on:
            if b.skip_next:
                b.skip_next = False
            else:
                b.arm(k).add(tokens / seconds, self.smoothing)

    def _record_probe(self, b: _Bucket, batch_size: int, num_spec: int, tokens: int, seconds: float) -> None:
        p = b.probe
        if not p.caught_up:
            p.caught_up = True
            return
        base = b.arm(0).rate
        plain_seconds = batch_size / base
        p.extra_tokens += tokens - batch_size
        p.extra_seconds += seconds - plain_seconds
        p.seq_steps += num_spec
        p.measured += 1
        # Whole-batch estimate: every sequence adds what the probed ones added on average.
        per_seq_tokens = p.extra_tokens / p.seq_steps
        per_seq_seconds = p.extra_seconds / p.seq_steps
        whole = batch_size * (1 + per_seq_tokens) / max(plain_seconds + batch_size * per_seq_seconds, 1e-9)
        clearly_losing = p.measured >= 2 and whole < CLEARLY_LOSING * base
        if p.measured < PROBE_STEPS and not clearly_losing:
            return
        b.probe = None
        if whole > base:
            b.on = True
            b.interval = FIRST_REPROBE
            arm = b.arm(self.probe_k)
            arm.rate, arm.count = whole, 1
            b.skip_next = num_spec < batch_size  # the rest of the batch has yet to catch up
        else:
            self._switch_off(b)

    @staticmethod
    def _switch_off(b: _Bucket) -> None:
        b.on = False
        b.arms = {0: b.arm(0)}  # speculative arms are measured afresh when it next switches on
        b.next_probe = b.steps + b.interval
        b.interval = min(2 * b.interval, MAX_REPROBE)

    def record_verification(self, num_accepted: int, num_proposed: int) -> None:
        if num_proposed:
            self.acceptance += self._accept_weight * (num_accepted / num_proposed - self.acceptance)
