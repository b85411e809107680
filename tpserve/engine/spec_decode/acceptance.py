"""Acceptance rates of speculative proposals, by sequence and by proposal position.

r_j is the chance that proposal j is accepted once every proposal before it was. Each sequence's
rates come from its own last SEQ_MEMORY or so verifications, shrunk position by position towards
the pooled rates (every sequence's verifications of the last POOL_MEMORY or so steps) by
PRIOR_TRIALS pseudo-verifications, so a new request starts from what requests typically achieve,
and its own text takes over within a few steps. A verification with k proposals then emits on
average E_k = 1 + r_1 + r_1 r_2 + ... + r_1 ... r_k tokens: rates by position, rather than one
rate for independent coin flips, keep bursty acceptance (a draft that is right for a whole
stretch or wrong at once) from being over-predicted.
"""

from __future__ import annotations

from tpserve.engine.spec_decode.state import AcceptanceCounts

SEQ_MEMORY = 16  # a sequence's own counts decay by 1 - 1/SEQ_MEMORY per verification of it
POOL_MEMORY = 64  # steps: the pooled counts (every sequence's) decay by 1 - 1/POOL_MEMORY per step
PRIOR_TRIALS = 2.0  # pseudo-verifications at the pooled rate that a sequence's estimate starts from


def expected_tokens(rates: list[float]) -> list[float]:
    """E_0 .. E_len(rates) for per-position acceptance rates."""
    out, survive = [1.0], 1.0
    for r in rates:
        survive *= r
        out.append(out[-1] + survive)
    return out


class AcceptanceEstimates:
    """The pooled counts, and estimates that combine them with a sequence's own counts (an
    `AcceptanceCounts` that lives on the sequence: `seq.spec.acceptance`)."""

    def __init__(self, positions: int) -> None:
        """positions: the most proposals one verification can ask for."""
        self.positions = positions
        self._pool = AcceptanceCounts([0.0] * positions, [0.0] * positions)

    def new_step(self) -> None:
        """A step is being planned; acceptance drifts with the text, so the pooled counts forget a
        little every step."""
        self._pool.decay(1 - 1 / POOL_MEMORY)

    @property
    def pooled_trials(self) -> float:
        return sum(self._pool.reached)

    @property
    def acceptance(self) -> float:
        """Pooled estimate of the probability that a proposal is accepted, over all positions."""
        reached = sum(self._pool.reached)
        return sum(self._pool.accepted) / reached if reached else 0.0

    def _pooled_rates(self) -> list[float]:
        """Pooled acceptance at each position; a position without data yet takes the rate over all
        positions."""
        overall = self.acceptance
        pool = self._pool
        return [a / r if r > 1e-9 else overall for a, r in zip(pool.accepted, pool.reached)]

    @staticmethod
    def _rates(own: AcceptanceCounts | None, pooled: list[float]) -> list[float]:
        """A sequence's acceptance at each position: its own counts plus PRIOR_TRIALS trials at the
        pooled rate of that position."""
        if own is None or not own.reached:
            return pooled
        return [(a + PRIOR_TRIALS * q) / (r + PRIOR_TRIALS) for a, r, q in zip(own.accepted, own.reached, pooled)]

    def sequence_acceptance(self, own: AcceptanceCounts | None) -> float:
        """A sequence's estimate over all positions (shrunk towards the pooled rate)."""
        if own is None or not own.reached:
            return self.acceptance
        return (sum(own.accepted) + PRIOR_TRIALS * self.acceptance) / (sum(own.reached) + PRIOR_TRIALS)

    def sequence_expected_tokens(self, own: AcceptanceCounts | None, k: int) -> float:
        """Mean tokens a verification of a sequence with k proposals emits."""
        return expected_tokens(self._rates(own, self._pooled_rates()))[k]

    def batch_yield(self, batch: list[AcceptanceCounts]) -> list[float]:
        """Mean over `batch` (the decoding sequences' own counts; empty: the pooled profile) of the
        tokens a sequence emits speculating with k, for k = 0 .. positions."""
        pooled = self._pooled_rates()
        members = batch or [None]
        sums = [0.0] * (self.positions + 1)
        for own in members:
            for j, e in enumerate(expected_tokens(self._rates(own, pooled))):
                sums[j] += e
        return [x / len(members) for x in sums]

    def batch_expected_tokens(self, batch: list[AcceptanceCounts], k: int) -> float:
        return self.batch_yield(batch)[min(k, self.positions)]

    def record(self, own: AcceptanceCounts, num_accepted: int, num_requested: int) -> None:
        """One verification of a sequence: `num_accepted` of the `num_requested` proposals were
        accepted."""
        if num_requested <= 0:
            return
        own.decay(1 - 1 / SEQ_MEMORY)
        own.add(num_accepted, num_requested, self.positions)
        self._pool.add(num_accepted, num_requested, self.positions)
