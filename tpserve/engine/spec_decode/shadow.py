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
the first step it is observed with room to spare until it speculates or finishes. Its pending
proposal lives on the sequence (`seq.spec.shadow`).
"""

from __future__ import annotations

from tpserve.engine.sequence import Sequence
from tpserve.engine.spec_decode.state import ShadowProposal, spec_state


class ShadowVerifier:
    def __init__(self, lookup, k: int, record, max_tracked: int = 8) -> None:
        """lookup(seq, k, end) -> the proposal made from seq.token_ids[:end];
        record(seq, num_accepted, num_requested) receives each shadow verification."""
        self.lookup = lookup
        self.k = k
        self.record = record
        self.max_tracked = max_tracked
        self.num_tracked = 0  # sequences followed now (each marked in its own state)

    def observe(self, seq: Sequence, num_new: int) -> None:
        """`seq` just emitted its last `num_new` tokens without speculating."""
        state = spec_state(seq)
        if not state.shadow_tracked:
            if self.num_tracked >= self.max_tracked:
                return
            state.shadow_tracked = True
            self.num_tracked += 1
        for pos in range(seq.num_tokens - num_new, seq.num_tokens):
            self._observe_one(seq, pos)

    def _observe_one(self, seq: Sequence, pos: int) -> None:
        state = seq.spec
        p = state.shadow
        if p is not None and p.bonus_next:
            state.shadow = None
            return
        if p is None:
            proposal = self.lookup(seq, self.k, pos)
            if not proposal:
                self.record(seq, 0, self.k)
                return
            p = state.shadow = ShadowProposal(proposal)
        if seq.token_ids[pos] != p.tokens[p.matched]:
            self.record(seq, p.matched, self.k)
            state.shadow = None
            return
        p.matched += 1
        if p.matched == len(p.tokens):
            self.record(seq, p.matched, self.k)
            p.bonus_next = True

    def forget(self, seq: Sequence) -> None:
        """The sequence speculated (its real verification takes over) or finished."""
        state = seq.spec
        if state is None:
            return
        if state.shadow_tracked:
            state.shadow_tracked = False
            self.num_tracked -= 1
        state.shadow = None
