"""The router of `auto` requests, on rank 0's engine thread. Plain Python, no torch.

A request names the target, the small model or `auto`. An `auto` request gets a *score* (higher:
the small model is expected to serve it well) and goes to the small model when the score reaches
the threshold. Policies differ in the score and in when it is known:

- `random`: a seeded uniform draw, at submission (the baseline);
- `length`: minus the prompt length (`--route-length-small short`, the default: short prompts to the
  small model) or the length (`long`), at submission;
- `confidence`: the small model's prefill scores the prompt's last `tail_tokens` tokens; the score is
  a low quantile of their log-probabilities; a request routed to the target is handed over before
  any token is sampled;
- `gap`: the target prefills (as it would serve) and the small model computes the prompt beside it
  on rank 0, both scoring the prompt's last `tail_tokens` tokens; the score is the mean of the
  small model's log-probability minus the target's there (how much worse the small model predicts
  this request's own text); a request routed to the small model continues on it from the K/V both
  models wrote into its blocks (the target's first token is kept), so nothing is computed twice;
- `cascade`: the small model prefills and generates `cascade_tokens` tokens; the score is a low
  quantile of the log-probabilities of its own tokens; below the threshold the request is handed
  over to the target, which continues after the tokens already streamed (they stay valid: the
  target computes their K/V and samples from there).

The threshold is `--route-threshold`, or the score quantile that sends `--route-small-fraction` of
the traffic to the small model, computed over a sliding window of the scores of the requests this
server has seen (`ScoreTracker`), seeded with a calibration file's quantiles (`tpserve.route.calibrate`).
"""

from __future__ import annotations

import bisect
import json
import random
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from tpserve.errors import ConfigError

POLICIES = ("random", "length", "confidence", "cascade", "gap")
AUDIT_WINDOW = 50  # audits the quality floor is checked over
AUDIT_MIN_SAMPLES = 10
TARGET = "target"  # the models a request can be served by (Sequence.model)
SMALL = "small"
AUTO = "auto"  # the name a request gives to let the router choose


def quantile(values: list[float], q: float, presorted: bool = False) -> float:
    """The q-quantile of `values` with linear interpolation (numpy's default)."""
    xs = values if presorted else sorted(values)
    if not xs:
        raise ValueError("quantile of no values")
    pos = q * (len(xs) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


@dataclass(frozen=True)
class RouteConfig:
    policy: str | None = "confidence"  # None: `auto` means the target
    small_fraction: float = 0.5  # of `auto` traffic to send to the small model
    threshold: float | None = None  # fixed threshold instead of the tracked fraction
    aggregate_quantile: float = 0.1  # the quantile of token log-probabilities a score takes
    tail_tokens: int = 64  # prompt tokens the confidence policy (and the audit) scores
    cascade_tokens: int = 8  # tokens the small model generates before the cascade decides
    window: int = 1000  # scores the online quantile tracks
    length_small: str = "short"  # which prompts the length policy sends to the small model: short or long
    audit_rate: float = 0.0  # fraction of small-served requests the target scores again
    min_quality: float | None = None  # hold the audit's 1 - quality gap above this by lowering the fraction
    seed: int = 0

    def __post_init__(self) -> None:
        if self.policy is not None and self.policy not in POLICIES:
            raise ConfigError(f"--route-policy {self.policy!r} must be one of {', '.join(POLICIES)}")
        if not 0.0 <= self.small_fraction <= 1.0:
            raise ConfigError(f"--route-small-fraction {self.small_fraction} must be in [0, 1]")
        if not 0.0 <= self.aggregate_quantile <= 1.0:
            raise ConfigError(f"--route-quantile {self.aggregate_quantile} must be in [0, 1]")
        if self.tail_tokens < 1:
            raise ConfigError(f"--route-tail-tokens {self.tail_tokens} must be >= 1")
        if self.cascade_tokens < 1:
            raise ConfigError(f"--route-cascade-tokens {self.cascade_tokens} must be >= 1")
        if self.length_small not in ("short", "long"):
            raise ConfigError(f"--route-length-small {self.length_small!r} must be short or long")
        if self.window < 10:
            raise ConfigError(f"--route-window {self.window} must be >= 10")
        if not 0.0 <= self.audit_rate <= 1.0:
            raise ConfigError(f"--route-audit-rate {self.audit_rate} must be in [0, 1]")
        if self.min_quality is not None:
            if not 0.0 < self.min_quality <= 1.0:
                raise ConfigError(f"--route-min-quality {self.min_quality} must be in (0, 1]")
            if self.audit_rate <= 0.0 or self.threshold is not None:
                raise ConfigError("--route-min-quality adapts the fraction from the audit: it needs "
                                  "--route-audit-rate > 0 and --route-small-fraction (not --route-threshold)")


@dataclass(slots=True)
class RouteState:
    """The router's state of one `auto` request (or of a small-served one the audit may score)."""

    policy: str | None  # None: the client named the model
    tail_tokens: int = 0  # prompt positions the small model's prefill scores (0: none)
    score: float | None = None
    threshold: float | None = None
    decided: bool = False
    handed_over: bool = False  # moved to the other model mid-request
    output_offset: int = 0  # output tokens another model produced before the small model's first
    tail_logprobs: list[float] = field(default_factory=list)  # small model's, last prompt tokens
    target_tail_logprobs: list[float] = field(default_factory=list)  # the target's, same tokens (gap)
    output_logprobs: list[float] = field(default_factory=list)  # small model's, of its own tokens
    audit: Any = None  # on an audit sequence: its tpserve.route.audit.AuditInfo

    def tail_scored(self, model: str) -> list[float]:
        """`model`'s log-probabilities of the prompt's last tokens so far (filled chunk by chunk)."""
        return self.target_tail_logprobs if model == TARGET else self.tail_logprobs

    def tail_start(self, model: str, num_prompt_tokens: int) -> int | None:
        """The first prompt position whose logits `model` still has to return for the router (the
        logits at position p score token p + 1; the tail's last scored token is the prompt's last),
        or None when nothing is left to score."""
        k = min(self.tail_tokens, num_prompt_tokens - 1)
        done = len(self.tail_scored(model))
        return None if done >= k else num_prompt_tokens - 1 - k + done


class ScoreTracker:
    """The scores of the last `window` requests, kept sorted: the threshold that sends a fraction
    of them to the small model is one index away. Seeded with calibration quantiles, which the
    live scores replace as they arrive."""

    def __init__(self, window: int, seed_scores: list[float] = ()) -> None:
        self.window = window
        self._order: deque[float] = deque()
        self._sorted: list[float] = []
        seed_scores = list(seed_scores)
        if len(seed_scores) > window:  # keep the distribution, not its last values
            seed_scores = [seed_scores[round(i * (len(seed_scores) - 1) / (window - 1))] for i in range(window)]
        for s in seed_scores:
            self.add(s)

    def __len__(self) -> int:
        return len(self._sorted)

    def add(self, score: float) -> None:
        self._order.append(score)
        bisect.insort(self._sorted, score)
        if len(self._order) > self.window:
            old = self._order.popleft()
            del self._sorted[bisect.bisect_left(self._sorted, old)]

    def threshold(self, fraction: float) -> float:
        """The score at or above which `fraction` of the tracked scores lie."""
        if fraction <= 0.0 or not self._sorted:
            return float("inf")
        if fraction >= 1.0:
            return float("-inf")
        return quantile(self._sorted, 1.0 - fraction, presorted=True)


class Router:
    """Decides, for each `auto` request, which model serves it. Called by the engine: `start` at
    submission, `after_prefill` with the small model's prompt-tail log-probabilities,
    `after_tokens` with the log-probabilities of its own tokens."""

    def __init__(self, config: RouteConfig, calibration: dict | None = None) -> None:
        self.config = config
        seed = []
        if calibration is not None and config.policy not in (None, "random"):  # random needs none
            check_calibration(calibration, config)
            seed = calibration["quantiles"].get(config.policy, [])
        self.tracker = ScoreTracker(config.window, [float(s) for s in seed])
        self._rng = random.Random(config.seed)
        self._audit_rng = random.Random(config.seed + 1)
        self.num_auto = 0
        self.num_to_small = 0
        self.num_to_target = 0
        self.fraction = config.small_fraction  # the fraction in force (lowered by --route-min-quality)
        self._recent_audits: deque[tuple[float, float]] = deque(maxlen=AUDIT_WINDOW)  # (small, target) bits

    @property
    def threshold(self) -> float:
        c = self.config
        if c.threshold is not None:
            return c.threshold
        if c.policy == "random":  # the score is uniform on [0, 1): the fraction is exact
            return 1.0 - self.fraction
        return self.tracker.threshold(self.fraction)

    def start(self, state: RouteState, num_prompt_tokens: int) -> str | None:
        """At submission: the model an `auto` request starts on ('small' or 'target'), decided for
        `random` and `length`; the others start on the small model and decide later."""
        self.num_auto += 1
        policy = self.config.policy
        if policy == "random":
            return self._decide(state, self._rng.random())
        if policy == "length":
            return self._decide(state, float(num_prompt_tokens if self.config.length_small == "long"
                                              else -num_prompt_tokens))
        state.tail_tokens = self.config.tail_tokens if policy in ("confidence", "gap") else 0
        return TARGET if policy == "gap" else SMALL

    def after_prefill(self, state: RouteState) -> str | None:
        """Confidence and gap: the decision once the prompt's tail is scored (None for other
        policies or a decided request). A prompt with no scored token (a one-token prompt) has no
        score: it goes to the target and the tracker does not see it."""
        if state.decided or state.policy not in ("confidence", "gap"):
            return None
        if state.policy == "gap":
            diffs = [s - t for s, t in zip(state.tail_logprobs, state.target_tail_logprobs)]
            return self._decide(state, sum(diffs) / len(diffs) if diffs else None)
        lps = state.tail_logprobs
        return self._decide(state, quantile(lps, self.config.aggregate_quantile) if lps else None)

    def after_tokens(self, state: RouteState, finished: bool) -> str | None:
        """Cascade: the decision once the small model has generated `cascade_tokens` tokens (or
        finished earlier: a request that ends first stays where it is)."""
        if state.decided or state.policy != "cascade":
            return None
        lps = state.output_logprobs
        if len(lps) < self.config.cascade_tokens and not finished:
            return None
        return self._decide(state, quantile(lps, self.config.aggregate_quantile) if lps else 0.0)

    def _decide(self, state: RouteState, score: float | None) -> str:
        if score is not None:
            self.tracker.add(score)
        state.score, state.threshold, state.decided = score, self.threshold, True
        to_small = score is not None and score >= state.threshold
        if to_small:
            self.num_to_small += 1
        else:
            self.num_to_target += 1
        return SMALL if to_small else TARGET

    def on_audit(self, small_bits: float, target_bits: float) -> None:
        """An audited request's bits on its prompt's tail under each model. With --route-min-quality,
        the fraction in force steps down while the recent audits' quality (1 - relative gap) is
        below the floor, and back up towards --route-small-fraction while it is above."""
        self._recent_audits.append((small_bits, target_bits))
        floor = self.config.min_quality
        if floor is None or len(self._recent_audits) < AUDIT_MIN_SAMPLES:
            return
        small = sum(s for s, _ in self._recent_audits)
        target = sum(t for _, t in self._recent_audits)
        quality = 1.0 - (small - target) / target if target > 0 else 1.0
        if quality < floor:
            self.fraction *= 0.9
        else:
            self.fraction = min(self.config.small_fraction, self.fraction * 1.05 + 0.001)

    def audits(self) -> bool:
        """Whether this small-served request is audited (a seeded draw at the audit rate)."""
        return self.config.audit_rate > 0 and self._audit_rng.random() < self.config.audit_rate


# The settings a policy's scores depend on: a calibration made with other values does not apply.
CALIBRATED_SETTINGS = {"aggregate_quantile": ("--route-quantile", ("confidence", "cascade")),
                       "length_small": ("--route-length-small", ("length",)),
                       "tail_tokens": ("--route-tail-tokens", ("confidence", "gap")),
                       "cascade_tokens": ("--route-cascade-tokens", ("cascade",))}


def load_calibration(path: str) -> dict:
    """A file written by `python -m tpserve.route calibrate`."""
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"--route-calibration {path}: cannot read it ({e})") from None
    if not isinstance(data, dict) or not isinstance(data.get("quantiles"), dict):
        raise ConfigError(f"--route-calibration {path}: not a calibration file (no 'quantiles')")
    return data


def check_calibration(calibration: dict, config: RouteConfig) -> None:
    for key, (flag, policies) in CALIBRATED_SETTINGS.items():
        made_with = calibration.get(key)
        if config.policy in policies and made_with is not None and made_with != getattr(config, key):
            raise ConfigError(f"the route calibration was made with {flag} {made_with}; this server uses "
                              f"{getattr(config, key)} (calibrate again or pass the same value)")
    if config.policy not in calibration["quantiles"]:
        raise ConfigError(f"the route calibration has no scores for policy {config.policy!r} "
                          f"(it has {', '.join(sorted(calibration['quantiles']))})")
