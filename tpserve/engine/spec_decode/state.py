"""What speculative decoding knows about one sequence. It lives on the sequence (`seq.spec`), made
on first use by `spec_state`, so it goes when the sequence goes: the proposers, the controller and
the shadow verifier keep no table of sequences."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class AcceptanceCounts:
    """Decayed counts per proposal position j (0-based): verifications that reached j (every
    proposal before it was accepted) and verifications that accepted it. The positions grow with
    the largest k seen."""

    reached: list[float] = field(default_factory=list)
    accepted: list[float] = field(default_factory=list)

    def decay(self, keep: float) -> None:
        self.reached = [x * keep for x in self.reached]
        self.accepted = [x * keep for x in self.accepted]

    def add(self, num_accepted: int, num_requested: int, positions: int) -> None:
        """One verification of `num_requested` proposals (counted up to `positions` of them)."""
        missing = positions - len(self.reached)
        if missing > 0:
            self.reached += [0.0] * missing
            self.accepted += [0.0] * missing
        for j in range(min(num_accepted + 1, num_requested, positions)):
            self.reached[j] += 1
            self.accepted[j] += j < num_accepted


@dataclass(frozen=True)
class SpecStats:
    """Speculative decoding counts of one request or of the whole server."""

    num_proposed_tokens: int
    num_accepted_tokens: int
    num_target_forwards: int
    acceptance_rate: float
    mean_accepted_length: float
    tokens_per_target_forward: float


@dataclass
class SpecTotals:
    num_proposed: int = 0
    num_accepted: int = 0
    num_spec_steps: int = 0  # sequence-steps that verified at least one proposal
    num_target_forwards: int = 0  # sequence-steps that produced tokens
    num_output_tokens: int = 0
    accepted_by_position: list[int] = field(default_factory=list)  # proposals accepted at position j

    def add(self, num_proposed: int, num_accepted: int, num_emitted: int) -> None:
        """One sequence-step that emitted `num_emitted` tokens."""
        self.num_proposed += num_proposed
        self.num_accepted += num_accepted
        self.num_spec_steps += 1 if num_proposed else 0
        self.num_target_forwards += 1
        self.num_output_tokens += num_emitted
        if num_accepted > len(self.accepted_by_position):
            self.accepted_by_position += [0] * (num_accepted - len(self.accepted_by_position))
        for j in range(num_accepted):
            self.accepted_by_position[j] += 1

    def stats(self) -> SpecStats:
        return SpecStats(
            num_proposed_tokens=self.num_proposed,
            num_accepted_tokens=self.num_accepted,
            num_target_forwards=self.num_target_forwards,
            acceptance_rate=self.num_accepted / self.num_proposed if self.num_proposed else 0.0,
            mean_accepted_length=self.num_accepted / self.num_spec_steps if self.num_spec_steps else 0.0,
            tokens_per_target_forward=(self.num_output_tokens / self.num_target_forwards
                                       if self.num_target_forwards else 0.0),
        )


@dataclass
class NgramIndex:
    """A sequence's prompt-lookup index: for each n, the latest start of every n-gram that has a
    following token, over the first `num_indexed` tokens."""

    num_indexed: int = 0
    grams: dict[int, dict[tuple, int]] = field(default_factory=dict)


@dataclass
class ShadowProposal:
    """The proposal shadow verification is checking against the emitted tokens."""

    tokens: list[int]
    matched: int = 0  # how many of them the target has emitted so far
    bonus_next: bool = False  # all matched: the next token is the bonus, then a fresh proposal


@dataclass
class SpecState:
    acceptance: AcceptanceCounts = field(default_factory=AcceptanceCounts)
    totals: SpecTotals = field(default_factory=SpecTotals)
    # The draft's K/V are valid for the first `draft_computed` positions, as of the sequence's
    # `draft_preemptions`-th preemption (a preemption invalidates them).
    draft_computed: int = 0
    draft_preemptions: int = 0
    ngram: NgramIndex = field(default_factory=NgramIndex)
    shadow_tracked: bool = False  # followed by shadow verification
    shadow: ShadowProposal | None = None


def spec_state(seq) -> SpecState:
    """The sequence's speculation state, made on first use."""
    if seq.spec is None:
        seq.spec = SpecState()
    return seq.spec
