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

SEQ_MEMORY = 16  # a sequence's own counts decay by 1 - 1/SEQ_MEMORY per verification of it
POOL_MEMORY = 64  # steps: the pooled counts (every sequence's) decay by 1 - 1/POOL_MEMORY per step
PRIOR_TRIALS = 2.0  # pseudo-verifications at the pooled rate that a sequence's estimate starts from


class _Counts:
    """Decayed counts per proposal position j (0-based): verifications that reached j (every
    proposal before it was accepted) and verifications that accepted it."""

    def __init__(self, positions: int) -> None:
        self.reached = [0.0] * positions
        self.accepted = [0.0] * positions

    def decay(self, keep: float) -> None:
        self.reached = [x * keep for x in self.reached]
        self.accepted = [x * keep for x in self.accepted]

    def add(self, num_accepted: int, num_requested: int) -> None:
        for j in range(min(num_accepted + 1, num_requested, len(self.reached))):
            self.reached[j] += 1
            self.accepted[j] += j < num_accepted


def expected_tokens(rates: list[float]) -> list[float]:
    """E_0 .. E_len(rates) for per-position acceptance rates."""
    out, survive = [1.0], 1.0
    for r in rates:
        survive *= r
        out.append(out[-1] + survive)
    return out


class AcceptanceEstimates:
    def __init__(self, positions: int) -> None:
        """positions: the most proposals one verification can ask for."""
        self.positions = positions
        self._pool = _Counts(positions)
        self._seqs: dict[int, _Counts] = {}
        self._batch: list[int] = []  # the decoding sequences of the step being planned
        self._yield: list[float] | None = None  # the batch's mean E_0 .. E_positions, until counts change

    def new_step(self, seq_ids: list[int]) -> None:
        """A step is being planned for these sequences; acceptance drifts with the text, so the
        pooled counts forget a little every step."""
        self._batch = list(seq_ids)
        self._yield = None
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

    def _rates(self, seq_id: int | None, pooled: list[float]) -> list[float]:
        """This sequence's acceptance at each position: its own counts plus PRIOR_TRIALS trials at
        the pooled rate of that position."""
        own = self._seqs.get(seq_id)
        if own is None:
            return pooled
        return [(a + PRIOR_TRIALS * q) / (r + PRIOR_TRIALS) for a, r, q in zip(own.accepted, own.reached, pooled)]

    def sequence_acceptance(self, seq_id: int) -> float:
        """This sequence's estimate over all positions (shrunk towards the pooled rate)."""
        own = self._seqs.get(seq_id)
        if own is None:
            return self.acceptance
        return (sum(own.accepted) + PRIOR_TRIALS * self.acceptance) / (sum(own.reached) + PRIOR_TRIALS)

    def sequence_expected_tokens(self, seq_id: int, k: int) -> float:
        """Mean tokens a verification of this sequence with k proposals emits."""
        return expected_tokens(self._rates(seq_id, self._pooled_rates()))[k]

    def batch_expected_tokens(self, k: int) -> float:
        """Mean over the batch being planned of the tokens a sequence emits speculating with k."""
        if self._yield is None:
            pooled = self._pooled_rates()
            batch = self._batch or [None]
            sums = [0.0] * (self.positions + 1)
            for seq_id in batch:
                for j, e in enumerate(expected_tokens(self._rates(seq_id, pooled))):
                    sums[j] += e
            self._yield = [x / len(batch) for x in sums]
        return self._yield[min(k, self.positions)]

    def record(self, seq_id: int, num_accepted: int, num_requested: int) -> None:
        """One verification: `num_accepted` of the `num_requested` proposals were accepted."""
        if num_requested <= 0:
            return
        own = self._seqs.setdefault(seq_id, _Counts(self.positions))
        own.decay(1 - 1 / SEQ_MEMORY)
        own.add(num_accepted, num_requested)
        self._pool.add(num_accepted, num_requested)
        self._yield = None

    def release(self, seq_id: int) -> None:
        """Forget a finished sequence's own counts (the pooled ones keep its verifications)."""
        self._seqs.pop(seq_id, None)
        self._yield = None

    def __len__(self) -> int:
        """Sequences with counts of their own."""
        return len(self._seqs)
