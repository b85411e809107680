"""Choosing the number of speculative tokens k for each step.

With per-token acceptance rate a, k proposals yield on average (1 - a^(k+1)) / (1 - a) tokens per
sequence and target forward. The cost of a step is modelled from measured wall times as
T(tokens) = t0 + t1 * tokens for a target forward and D(seqs) = d0 + d1 * seqs for a draft pass,
each fitted online by least squares. For batch size B the controller picks the k in [0, max_k]
maximising B * E(k) / (T(B * (k + 1)) + k * D(B)), so speculation switches itself off exactly when
the measured costs say it would make the step slower than plain decoding.
"""

from __future__ import annotations

from collections import deque


class LinearCost:
    """Least-squares fit of seconds = a + b * x over a window of recent samples."""

    def __init__(self, window: int = 256) -> None:
        self.samples: deque[tuple[float, float]] = deque(maxlen=window)

    def add(self, x: float, seconds: float) -> None:
        self.samples.append((float(x), float(seconds)))

    def fit(self) -> tuple[float, float] | None:
        n = len(self.samples)
        if n < 4:
            return None
        mx = sum(x for x, _ in self.samples) / n
        my = sum(y for _, y in self.samples) / n
        var = sum((x - mx) ** 2 for x, _ in self.samples)
        if var == 0:
            return None
        b = sum((x - mx) * (y - my) for x, y in self.samples) / var
        b = max(b, 0.0)
        return max(my - b * mx, 0.0), b

    def predict(self, x: float) -> float | None:
        f = self.fit()
        return None if f is None else f[0] + f[1] * x


class SpecController:
    def __init__(self, max_k: int, adaptive: bool = True, prior_acceptance: float = 0.7,
                 smoothing: float = 0.05) -> None:
        self.max_k = max_k
        self.adaptive = adaptive
        self.acceptance = prior_acceptance
        self.smoothing = smoothing
        self.target_cost = LinearCost()
        self.draft_cost = LinearCost()

    def record_verification(self, num_accepted: int, rejected: bool) -> None:
        """One sequence's verification: geometric model, a = accepted / (accepted + rejections)."""
        trials = num_accepted + (1 if rejected else 0)
        if trials:
            observed = num_accepted / trials
            weight = min(1.0, self.smoothing * trials)
            self.acceptance += weight * (observed - self.acceptance)

    @staticmethod
    def expected_tokens(a: float, k: int) -> float:
        a = min(max(a, 0.0), 0.999)
        return (1 - a ** (k + 1)) / (1 - a)

    def choose_k(self, batch_size: int, other_tokens: int = 0) -> int:
        """k for a step with `batch_size` decoding sequences and `other_tokens` prefill tokens."""
        if not self.adaptive or batch_size == 0:
            return self.max_k
        best_k, best_rate = self.max_k, None
        for k in range(self.max_k + 1):
            target = self.target_cost.predict(other_tokens + batch_size * (k + 1))
            draft = self.draft_cost.predict(batch_size) if k else 0.0
            if target is None or draft is None:
                return self.max_k  # not enough measurements yet: explore at full k
            rate = batch_size * self.expected_tokens(self.acceptance, k) / max(target + k * draft, 1e-9)
            if best_rate is None or rate > best_rate:
                best_k, best_rate = k, rate
        return best_k
