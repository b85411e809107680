"""Shadow verification of free proposals while a sequence is not speculating.

A proposer whose proposals cost nothing to make (n-gram lookup) can be checked without speculating:
make the proposal it would have made, and compare it with the tokens the target then emits one
step at a time. Speculation would have accepted exactly the matching prefix (greedy: the proposal
equals the argmax; sampled with a one-hot draft: the proposal is accepted with probability
p_target(x), which is the probability that the sampled token is x, and on a rejection the token
that is emitted instead is distributed as the residual), then emitted the target's token, and
proposed afresh from there; after a fully accepted proposal the bonus token comes before the next
proposal. `ShadowVerifier` replays that rule and reports each verification speculation would have
made, so the controller's acceptance estimate stays current while it is off. It follows at most
`max_tracked` sequences at a time (a sample is enough for an estimate, and a lookup per sequence
per step would cost a large batch more than the estimate is worth); a sequence is followed from
the first step it is observed with room to spare until it speculates or finishes.
"""

from __future__ import annotations

from dataclasses import dataclass

from tpserve.engine.sequence import Sequence


@dataclass
class _Pending:
    tokens: list[int]  # the shadow proposal
    matched: int = 0  # how many of them the target has emitted so far
    bonus_next: bool = False  # all matched: the next token is the bonus, then a fresh proposal


class ShadowVerifier:
    def __init__(self, lookup, k: int, record, max_tracked: int = 8) -> None:
        """lookup(seq_id, tokens, k, end) -> the proposal made from tokens[:end];
        record(seq_id, num_accepted, num_requested) receives each shadow verification."""
        self.lookup = lookup
        self.k = k
        self.record = record
        self.max_tracked = max_tracked
        self._tracked: set[int] = set()
        self._pending: dict[int, _Pending] = {}

    def observe(self, seq: Sequence, num_new: int) -> None:
        """`seq` just emitted its last `num_new` tokens without speculating."""
        if seq.seq_id not in self._tracked:
            if len(self._tracked) >= self.max_tracked:
                return
            self._tracked.add(seq.seq_id)
        tokens = seq.token_ids
        for pos in range(len(tokens) - num_new, len(tokens)):
            self._observe_one(seq.seq_id, tokens, pos)

    def _observe_one(self, seq_id: int, tokens: list[int], pos: int) -> None:
        p = self._pending.get(seq_id)
        if p is not None and p.bonus_next:
            del self._pending[seq_id]
            return
        if p is None:
            proposal = self.lookup(seq_id, tokens, self.k, pos)
            if not proposal:
                self.record(seq_id, 0, self.k)
                return
            p = self._pending[seq_id] = _Pending(proposal)
        if tokens[pos] != p.tokens[p.matched]:
            self.record(seq_id, p.matched, self.k)
            del self._pending[seq_id]
            return
        p.matched += 1
        if p.matched == len(p.tokens):
            self.record(seq_id, p.matched, self.k)
            p.bonus_next = True

    def forget(self, seq_id: int) -> None:
        """The sequence speculated (its real verification takes over) or finished."""
        self._tracked.discard(seq_id)
        self._pending.pop(seq_id, None)
