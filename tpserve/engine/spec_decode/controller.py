"""Choosing the number of speculative tokens k for each step.

Whether speculation pays depends on the acceptance rate and on how the cost of a step grows with
the tokens verified and the draft passes run, which differs by machine (a GPU at small batch is
memory-bound and verifies k + 1 tokens almost for free; a CPU pays per token). So the controller
measures the cost instead of assuming it, and splits the throughput of a step into two estimates
that converge at different speeds:

- the *cost*: for each batch-size bucket (powers of two) and each candidate k, a moving average
  of the whole engine step's seconds (draft passes, verification and sampling included) when the
  whole batch speculates with k. Step times vary little from step to step.
- the *yield*: tokens per sequence-step are very noisy (a step emits anything from 1 to k + 1), so
  they are not averaged per k; they come from acceptance rates by proposal position, per sequence
  and pooled (`acceptance.py` explains the model): a sequence speculating with k emits E_k tokens
  on average, and the batch yields the sum over its sequences.

The predicted throughput of k is sum_i E_k / cost_k; the smallest k predicted within
PREFER_SMALLER of the best is chosen (a larger k is more sensitive to an error in the acceptance
estimate, and k = 0 risks nothing, so speculation must be predicted to win by that margin).

A bucket starts at k = 0, the safe choice, and probes before it speculates on everyone, once the
batch size has lasted WARMUP_STEPS steps (the batch sizes a load passes through while ramping up
or down are never probed). A draft model is probed at k = 1 on PROBE_SEQS sequence (the one with
the least context to catch up on: one draft pass per proposed token, and a catch-up over a new
sequence's context; the first probe step, which pays the catch-up, is not measured) and the whole
batch is extrapolated from it. The draft's passes are timed: a fit of their seconds against their
tokens (the catch-up pass against the one-token passes) splits a pass into a fixed part, which the
whole batch shares, and a part per token; the target's extra seconds per speculating sequence
(verification rows) are taken as linear. Without pass timings every sequence is charged what the
probed one added. A proposer whose proposals cost nothing to make (n-gram lookup) is probed at its
largest k on the whole batch: only verification rows are paid for, and measuring the whole batch
needs no extrapolation. A probe measures at
least PROBE_STEPS steps and PROBE_SEQ_STEPS speculating sequence-steps, but it ends early when it
is clearly losing (it would not beat k = 0 by PREFER_SMALLER even if, beyond what it measured,
OPTIMISM more sequence-steps had accepted every proposal: a step whose cost alone loses ends it at
once, a run of rejections within a few steps), clearly winning (after PROBE_STEPS, it would win
even if OPTIMISM more had accepted nothing), or when it has cost PROBE_BUDGET plain steps' worth
of time, catch-up included: a decision that close is worth less than more probing would cost.
Only if the probe does beat k = 0 by that margin does the bucket switch on: it measures each
candidate's cost (smallest first, and it switches off at once if even k = 1 at full acceptance
would lose: a larger k only adds passes), then runs the chosen k, re-measuring the cost of k = 0
every REMEASURE_EVERY steps, and switches off when k = 0 is chosen. A lost probe is repeated after
an interval that doubles each time (64, 128, ... 1024 steps), so probing a bucket where
speculation never pays costs ever less; a probe lost on cost alone (even full acceptance would not match
k = 0, which no text can change) waits the longest interval at once.

Free proposals can also be checked while off: the SpecDecoder feeds `record_verification` with *shadow*
verifications (the lookup made as if speculating, compared with the tokens the target then
emitted, which is exactly what speculation would have accepted). When those predict that the last
probe's measured cost would now be repaid by the margin, the bucket probes again at once instead of
waiting out its backoff. Pinned (`adaptive=False`) it always returns max_k.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tpserve.engine.spec_decode.acceptance import AcceptanceEstimates
from tpserve.engine.spec_decode.state import AcceptanceCounts

WARMUP_STEPS = 8  # consecutive k = 0 steps at a batch size before it is probed (skips transients)
PROBE_STEPS = 4  # a probe measures at least this many steps ...
PROBE_SEQ_STEPS = 16  # ... and this many speculating sequence-steps (acceptance is noisy)
OPTIMISM = 4  # a probe ends early if it loses (wins) even with this many more steps that accepted all (none)
PROBE_BUDGET = 4.0  # plain steps' worth of time a probe may cost before it decides on what it has
PROBE_SEQS = 1  # a draft's probe: one sequence, since each pays a catch-up over its context
COST_SAMPLES = 2  # measured steps of each candidate before predictions use its cost
FIRST_REPROBE = 64  # steps from a lost probe to the next; doubles after each lost probe
MAX_REPROBE = 1024
REMEASURE_EVERY = 32  # while on: one k = 0 step this often keeps its cost current
PREFER_SMALLER = 0.05  # a larger k must be predicted this much faster to be chosen over a smaller


@dataclass
class _Cost:
    seconds: float = 0.0
    count: int = 0

    def add(self, seconds: float, smoothing: float) -> None:
        self.seconds = seconds if self.count == 0 else self.seconds + smoothing * (seconds - self.seconds)
        self.count += 1


@dataclass
class _Probe:
    caught_up: bool  # the first probe step (the draft's catch-up) has passed, unmeasured
    measured: int = 0
    extra_tokens: float = 0.0  # summed over measured steps, beyond one token per sequence
    extra_seconds: float = 0.0  # beyond what the step would have taken at k = 0
    seq_steps: int = 0  # speculating sequences summed over measured steps
    draft_seconds: float = 0.0  # the draft passes' share of extra_seconds
    spent: float = 0.0  # seconds beyond k = 0's cost over every probe step, the catch-up included
    passes: list = field(default_factory=list)  # (tokens, seconds) of every draft pass, catch-up included


@dataclass
class _Bucket:
    costs: dict[int, _Cost] = field(default_factory=dict)
    on: bool = False
    probe: _Probe | None = None
    next_probe: int = WARMUP_STEPS  # step at which the next probe starts (while off)
    interval: int = FIRST_REPROBE
    skip_next: bool = False  # the next full-batch speculative step pays catch-up: don't measure it
    probe_cost_ratio: float | None = None  # the last probe's whole-batch step cost over k = 0's
    probe_ended: int = 0  # step at which the last probe ended
    steps: int = 0
    streak: int = 0  # consecutive steps at this bucket

    def cost(self, k: int) -> _Cost:
        return self.costs.setdefault(k, _Cost())


class _BatchYield:
    """The mean tokens a sequence of the batch being planned emits speculating with k (k = 0 ..
    the largest), computed once, on first use."""

    def __init__(self, estimates: AcceptanceEstimates, batch: list[AcceptanceCounts]) -> None:
        self.estimates = estimates
        self.batch = batch
        self._values: list[float] | None = None

    def __getitem__(self, k: int) -> float:
        if self._values is None:
            self._values = self.estimates.batch_yield(self.batch)
        return self._values[min(k, self.estimates.positions)]


def fit_pass_cost(passes: list[tuple[int, float]]) -> tuple[float, float] | None:
    """Least-squares seconds = a + b * tokens over draft passes; None without two token counts.
    The catch-up pass (a whole context) and the one-token passes give it a long lever arm."""
    if len({t for t, _ in passes}) < 2:
        return None
    n = len(passes)
    mean_t = sum(t for t, _ in passes) / n
    mean_s = sum(s for _, s in passes) / n
    b = sum((t - mean_t) * (s - mean_s) for t, s in passes) / sum((t - mean_t) ** 2 for t, _ in passes)
    b = max(b, 0.0)
    return max(mean_s - b * mean_t, 0.0), b


class SpecController:
    def __init__(self, max_k: int, adaptive: bool = True, smoothing: float = 0.3,
                 free_proposals: bool = False) -> None:
        """free_proposals: the proposer costs nothing per proposed token (n-gram lookup)."""
        self.max_k = max_k
        self.adaptive = adaptive
        self.smoothing = smoothing
        self.candidates = sorted({0, 1, max(1, max_k // 2), max_k})
        self.free_proposals = free_proposals
        self.probe_k = max_k if free_proposals else min(1, max_k)
        self.probe_seqs = None if free_proposals else PROBE_SEQS  # None: the whole batch
        self.probe_catch_up = not free_proposals  # a draft's first probe step catches up
        self.buckets: dict[int, _Bucket] = {}
        self._last_bucket: _Bucket | None = None
        self.estimates = AcceptanceEstimates(max(1, max_k))
        self.num_probes = 0
        self.probe_seconds = 0.0  # what probe steps cost beyond k = 0's step cost, catch-up included

    @staticmethod
    def bucket_of(batch_size: int) -> int:
        return max(1, batch_size).bit_length()

    def _bucket(self, batch_size: int) -> _Bucket:
        return self.buckets.setdefault(self.bucket_of(batch_size), _Bucket())

    def _best_k(self, b: _Bucket, batch_yield: _BatchYield) -> int:
        """The smallest k predicted within PREFER_SMALLER of the best: a larger k is more sensitive
        to an error in the acceptance estimate (it multiplies k rates), and k = 0 risks nothing.
        A k's predicted rate is the batch's mean tokens per sequence-step over the step's cost."""
        rates = {k: batch_yield[k] / b.cost(k).seconds for k in self.candidates}
        best = max(rates.values())
        return min(k for k, r in rates.items() if r >= (1 - PREFER_SMALLER) * best)

    def choose_k(self, batch: list[AcceptanceCounts]) -> tuple[int, int]:
        """batch: the own acceptance counts of this step's decoding sequences -> (k, how many of
        them speculate this step; SpecDecoder.plan_step picks which)."""
        batch_size = len(batch)
        if not self.adaptive or batch_size == 0:
            return self.max_k, batch_size
        self.estimates.new_step()
        batch_yield = _BatchYield(self.estimates, batch)
        b = self._bucket(batch_size)
        b.steps += 1
        b.streak = b.streak + 1 if b is self._last_bucket else 1
        self._last_bucket = b
        if self.max_k == 0 or b.cost(0).count < 2:
            return 0, 0
        if b.on:
            if b.steps % REMEASURE_EVERY == 0:
                return 0, 0
            one = b.costs.get(1)
            if one is not None and one.count >= COST_SAMPLES and 2 / one.seconds < self._margin_rate(b):
                # Even k = 1 at full acceptance loses, so every larger k (more passes) does too.
                self._switch_off(b)
                return 0, 0
            unmeasured = [k for k in self.candidates if b.cost(k).count < COST_SAMPLES]
            k = unmeasured[0] if unmeasured else self._best_k(b, batch_yield)
            if k == 0:  # no k is predicted to beat k = 0 any more: off, and probe again later
                self._switch_off(b)
            return k, (batch_size if k else 0)
        if b.probe is None and b.streak > WARMUP_STEPS and (b.steps >= b.next_probe or self._shadow_says_probe(b, batch_yield)):
            b.probe = _Probe(caught_up=not self.probe_catch_up)
            self.num_probes += 1
        if b.probe is not None:
            return self.probe_k, min(self.probe_seqs or batch_size, batch_size)
        return 0, 0

    @staticmethod
    def _margin_rate(b: _Bucket) -> float:
        """The per-sequence rate speculation has to beat: k = 0's, by the margin."""
        return 1 / b.cost(0).seconds / (1 - PREFER_SMALLER)

    def _shadow_says_probe(self, b: _Bucket, batch_yield: _BatchYield) -> bool:
        """Free proposals, off and backing off: do the shadow verifications since predict that the
        last probe's cost would now be repaid by the margin?"""
        if not self.free_proposals or b.probe_cost_ratio is None or b.steps - b.probe_ended < WARMUP_STEPS:
            return False
        return batch_yield[self.probe_k] > b.probe_cost_ratio / (1 - PREFER_SMALLER)

    def record_step(self, batch_size: int, k: int, num_spec: int, tokens: int, seconds: float,
                    draft_passes: list[tuple[int, float]] = ()) -> None:
        """A decode-only step: `batch_size` sequences, `num_spec` of them with k proposals, emitted
        `tokens` in `seconds` of whole engine step; `draft_passes`: (tokens, seconds) of each
        draft pass the step ran (none for free proposals)."""
        if seconds <= 0 or not self.adaptive:
            return
        b = self._bucket(batch_size)
        if num_spec == 0 or k == 0:
            b.cost(0).add(seconds, self.smoothing)
        elif b.probe is not None and k == self.probe_k:
            self._record_probe(b, batch_size, num_spec, tokens, seconds, list(draft_passes))
        elif num_spec >= batch_size and b.on:
            if b.skip_next:
                b.skip_next = False
            else:
                b.cost(k).add(seconds, self.smoothing)

    def _record_probe(self, b: _Bucket, batch_size: int, num_spec: int, tokens: int, seconds: float,
                      passes: list[tuple[int, float]]) -> None:
        p = b.probe
        p.passes += passes
        plain_seconds = b.cost(0).seconds
        extra = seconds - plain_seconds
        p.spent += extra
        self.probe_seconds += extra
        if not p.caught_up:
            p.caught_up = True
            return
        if num_spec >= batch_size:
            b.cost(self.probe_k).add(seconds, self.smoothing)
        p.extra_tokens += tokens - batch_size
        p.extra_seconds += extra
        p.draft_seconds += sum(s for _, s in passes)
        p.seq_steps += num_spec
        p.measured += 1
        per_seq_tokens = p.extra_tokens / p.seq_steps
        whole_seconds = self._whole_batch_model(p, plain_seconds, batch_size)

        def beats_plain(tokens_per_seq: float, margin: float = PREFER_SMALLER) -> bool:
            """Would the whole batch, each sequence emitting 1 + tokens_per_seq tokens a step, beat
            k = 0 by `margin`?"""
            rate = batch_size * (1 + tokens_per_seq) / whole_seconds(tokens_per_seq)
            return rate > batch_size / plain_seconds / (1 - margin)

        wins = beats_plain(per_seq_tokens)
        # Clearly losing: it would not win even with the yield seen so far plus OPTIMISM
        # sequence-steps that accepted every proposal (the more steps measured, the less that
        # optimism weighs). Clearly winning: it would win even with OPTIMISM more that accepted
        # nothing. Out of budget: the probe has cost PROBE_BUDGET plain steps (catch-up included),
        # more than a close decision is worth, so it decides on what it has measured.
        hopeful = (p.extra_tokens + OPTIMISM * self.probe_k) / (p.seq_steps + OPTIMISM)
        clearly_losing = not beats_plain(hopeful)
        enough = p.measured >= PROBE_STEPS and (
            p.seq_steps >= PROBE_SEQ_STEPS or beats_plain(p.extra_tokens / (p.seq_steps + OPTIMISM)))
        out_of_budget = p.measured >= COST_SAMPLES and p.spent >= PROBE_BUDGET * plain_seconds
        if not (enough or clearly_losing or out_of_budget):
            return
        b.probe = None
        b.probe_cost_ratio = whole_seconds(per_seq_tokens) / plain_seconds
        b.probe_ended = b.steps
        if wins and not clearly_losing:
            b.on = True
            b.interval = FIRST_REPROBE
            b.skip_next = num_spec < batch_size  # the rest of the batch has yet to catch up
        else:
            # Lost on cost alone (even full acceptance would not match k = 0): that is a property of
            # the machine and the batch size, not of the text, so re-probe only after MAX_REPROBE.
            self._switch_off(b, hopeless=not beats_plain(self.probe_k, 0.0))

    def _whole_batch_model(self, p: _Probe, plain_seconds: float, batch_size: int):
        """-> seconds(per_seq_tokens): the predicted seconds of a step in which the whole batch
        speculates with probe_k, each sequence emitting 1 + per_seq_tokens tokens. With draft pass
        timings: the target's extra (verification rows) per speculating sequence, plus probe_k
        draft passes costed by a fit of a fixed part and a part per token (the first pass takes
        each sequence's newly emitted tokens, later ones one token each). Without: every sequence
        adds what a probed one added."""
        fit = fit_pass_cost(p.passes)
        if fit is None:
            linear = max(plain_seconds + batch_size * p.extra_seconds / p.seq_steps, 1e-9)
            return lambda per_seq_tokens: linear
        a, per_token = fit
        verify = max(0.0, p.extra_seconds - p.draft_seconds) / p.seq_steps
        k = self.probe_k

        def seconds(per_seq_tokens: float) -> float:
            draft = k * a + per_token * batch_size * (per_seq_tokens + k)
            return max(plain_seconds + draft + verify * batch_size, 1e-9)

        return seconds

    @staticmethod
    def _switch_off(b: _Bucket, hopeless: bool = False) -> None:
        b.on = False
        b.costs = {0: b.cost(0)}  # speculative costs are measured afresh when it next switches on
        b.next_probe = b.steps + (MAX_REPROBE if hopeless else b.interval)
        b.interval = min(2 * b.interval, MAX_REPROBE)

    def record_verification(self, own: AcceptanceCounts, num_accepted: int, num_requested: int) -> None:
        """One verification of a sequence whose own counts are `own` (real, or a shadow one of free
        proposals): `num_accepted` of the `num_requested` proposals it asked for were accepted (a
        proposer that found fewer counts as rejected at the first missing one)."""
        self.estimates.record(own, num_accepted, num_requested)
