"""Admission control that holds a time-to-first-token SLO (`--slo-ttft S`).

When a request arrives, rank 0 predicts its time to first token from the work already admitted
ahead of it and refuses it at once (Overloaded: gRPC RESOURCE_EXHAUSTED, HTTP 429 with
Retry-After) if the prediction misses the SLO. Refusing the request that would miss keeps every
admitted one inside the SLO; letting it queue would make it, and everyone behind it, miss.

The prediction has two parts, both in measured seconds:

- **waiting for a batch slot.** The running batch holds at most `max_num_seqs` sequences. The
  controller knows every admitted request's remaining output (its expected length minus what it
  has produced; the expected length is max_tokens scaled by the ratio of output to max_tokens
  that finished requests showed, since EOS stops many early), so it replays the slots: each
  decoding request frees its slot after its remaining tokens, each request queued ahead takes the
  first free slot for its whole output, and the new request gets the next free slot. That many
  decode steps, at the measured cost of a step of the current batch, is the wait.
- **prefill.** The prompt tokens of every admitted request that has no first token yet, plus the
  new prompt, computed in chunks of at most `max_num_batched_tokens`, at the measured cost.

Step cost is a plane, seconds = a + b * tokens + c * sequences per engine iteration, fitted by
exponentially weighted least squares of relative errors over the engine's steps (`StepCostModel`),
so it follows the machine and the batch; the prediction is scaled by the learned ratio of real to
predicted first-token times. Until
it has seen both small and large steps the controller admits everything (the server calibrates it
with a few warm-up steps before it reports ready). The prediction must stay under `margin * SLO`
(default 0.8) to leave room for the error of a point estimate on a p95 target.
"""

from __future__ import annotations

import heapq
import math
import threading
import time
from dataclasses import dataclass, field

import numpy as np

from tpserve.errors import Overloaded


class StepCostModel:
    """seconds ~ a + b * tokens + c * sequences per engine step, over recent steps (least squares
    of relative errors, exponentially weighted, coefficients kept non-negative). Tokens carry the
    matmul work, sequences the per-sequence work (attention, sampling, detokenising, emitting)."""

    def __init__(self, half_life_steps: float = 256.0) -> None:
        self.decay = 0.5 ** (1.0 / half_life_steps)
        self.xx = np.zeros((3, 3))
        self.xy = np.zeros(3)
        self.yy = 0.0
        self.num_steps = 0
        self.min_tokens = math.inf
        self.max_tokens = 0
        self._coef: tuple[float, float, float] | None = None

    def observe(self, num_tokens: int, seconds: float, num_seqs: int = 1) -> None:
        x = np.array([1.0, float(num_tokens), float(num_seqs)])
        w = 1.0 / max(seconds, 1e-6) ** 2  # relative errors: a 5 ms decode step counts as much as a 2 s prefill
        self.xx = self.xx * self.decay + w * np.outer(x, x)
        self.xy = self.xy * self.decay + w * x * seconds
        self.yy = self.yy * self.decay + w * seconds * seconds
        self.num_steps += 1
        self.min_tokens = min(self.min_tokens, num_tokens)
        self.max_tokens = max(self.max_tokens, num_tokens)
        self._coef = None

    @property
    def ready(self) -> bool:
        """Enough steps, of sizes far enough apart, to fit a slope."""
        return self.num_steps >= 4 and self.max_tokens >= 2 * max(self.min_tokens, 1)

    def coefficients(self) -> tuple[float, float, float]:
        """(a, b, c): seconds per step, per token and per sequence; the non-negative fit with the
        smallest weighted residual over the subsets of the three terms."""
        if self._coef is None:
            best, best_res = (0.0, 0.0, 0.0), math.inf
            for subset in ((0, 1, 2), (0, 1), (0, 2), (1, 2), (0,), (1,), (2,)):
                idx = list(subset)
                m = self.xx[np.ix_(idx, idx)]
                if abs(np.linalg.det(m)) < 1e-12 * max(1.0, np.abs(m).max()) ** len(idx):
                    continue
                beta = np.linalg.solve(m, self.xy[idx])
                if (beta < 0).any():
                    continue
                res = self.yy - 2 * beta @ self.xy[idx] + beta @ m @ beta
                if res < best_res - 1e-15:
                    full = [0.0, 0.0, 0.0]
                    for i, v in zip(idx, beta):
                        full[i] = float(v)
                    best, best_res = tuple(full), res
            self._coef = best
        return self._coef

    def seconds(self, num_tokens: float, num_seqs: float, num_steps: float = 1.0) -> float:
        a, b, c = self.coefficients()
        return a * num_steps + b * num_tokens + c * num_seqs


@dataclass
class _Admitted:
    prompt_tokens: int
    max_tokens: int
    predicted_s: float = 0.0
    admitted_at: float = field(default_factory=time.monotonic)
    generated: int = 0
    first_output: bool = False


class AdmissionController:
    def __init__(self, slo_ttft_s: float, max_num_seqs: int, max_num_batched_tokens: int,
                 margin: float = 0.8, cost: StepCostModel | None = None) -> None:
        if slo_ttft_s <= 0:
            raise ValueError(f"--slo-ttft={slo_ttft_s} must be > 0 seconds")
        if not 0 < margin <= 1:
            raise ValueError(f"--slo-ttft-margin={margin} must be in (0, 1]")
        self.slo_ttft_s = slo_ttft_s
        self.margin = margin
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.cost = cost or StepCostModel()
        self._lock = threading.Lock()
        self._admitted: dict[str, _Admitted] = {}
        self.num_rejected = 0
        self.correction = 1.0  # actual / predicted TTFT, learned from admitted requests
        self.length_ratio = 1.0  # output tokens / max_tokens of finished requests (EOS stops early)

    LEARN_FROM = 0.1  # of the SLO
    CORRECTION_RATE = 0.05
    LENGTH_RATE = 0.05

    # --- engine thread ------------------------------------------------------------------------
    def observe_step(self, num_tokens: int, num_seqs: int, seconds: float) -> None:
        with self._lock:
            self.cost.observe(num_tokens, seconds, num_seqs)

    def on_output(self, request_id: str, num_output_tokens: int, finished: bool,
                  finish_reason: str | None = None) -> None:
        with self._lock:
            a = self._admitted.get(request_id)
            if a is None:
                return
            if not a.first_output and num_output_tokens > 0:
                a.first_output = True
                self._learn(a, time.monotonic() - a.admitted_at)
            if finished:
                del self._admitted[request_id]
                if finish_reason in ("stop", "length"):  # an abort says nothing about lengths
                    ratio = min(1.0, num_output_tokens / max(1, a.max_tokens))
                    self.length_ratio += self.LENGTH_RATE * (ratio - self.length_ratio)
            else:
                a.generated = num_output_tokens

    def _expected_output(self, a: _Admitted) -> int:
        """Tokens the request will have produced when it finishes: max_tokens scaled by the
        learned length ratio, never less than what it has already produced plus one."""
        return min(a.max_tokens, max(a.generated + 1, math.ceil(self.length_ratio * a.max_tokens)))

    def _learn(self, a: _Admitted, actual_s: float) -> None:
        """Fold how long the first token really took into the correction of predictions (only
        for predictions long enough to be dominated by the queue, not by one step's jitter)."""
        if a.predicted_s < self.LEARN_FROM * self.slo_ttft_s:
            return
        ratio = min(4.0, max(0.5, actual_s / a.predicted_s))
        self.correction += self.CORRECTION_RATE * (ratio - self.correction)

    def forget(self, request_id: str) -> None:
        """A request that ended without a finished output (refused by the engine, group failure)."""
        with self._lock:
            self._admitted.pop(request_id, None)

    # --- front end (the door's submit) --------------------------------------------------------
    def admit(self, request_id: str, prompt_tokens: int, max_tokens: int, check: bool = True) -> float:
        """Admit the request and return its predicted TTFT, or raise Overloaded naming the
        prediction and the SLO (with `retry_after` seconds). check=False admits it regardless
        (another sample of an admitted request) but still counts it."""
        with self._lock:
            predicted = self._predict(prompt_tokens)
            limit = self.margin * self.slo_ttft_s
            if check and predicted > limit:
                self.num_rejected += 1
                raise Overloaded(f"predicted time to first token {predicted:.3f} s would exceed the SLO: "
                                 f"--slo-ttft={self.slo_ttft_s:g} s (admitting up to {limit:.3f} s, margin "
                                 f"{self.margin:g}); {len(self._admitted)} requests are in flight",
                                 retry_after_s=max(1, math.ceil(predicted - limit)), reason="slo_ttft")
            self._admitted[request_id] = _Admitted(prompt_tokens, max_tokens, predicted / self.correction)
            return predicted

    def predict(self, prompt_tokens: int) -> float:
        with self._lock:
            return self._predict(prompt_tokens)

    def _predict(self, prompt_tokens: int) -> float:
        """The model's prediction times the learned correction."""
        if not self.cost.ready:
            return 0.0
        decoding = [a for a in self._admitted.values() if a.first_output]
        queued = [a for a in self._admitted.values() if not a.first_output]
        # Slots: a decoding request frees its slot after its remaining tokens; each queued request
        # (in arrival order: dicts keep insertion order) takes the first free slot for its output.
        slots = [max(0, self._expected_output(a) - a.generated) for a in decoding][: self.max_num_seqs]
        slots += [0] * (self.max_num_seqs - len(slots))
        heapq.heapify(slots)
        for a in queued:
            heapq.heapreplace(slots, slots[0] + self._expected_output(a))
        wait_steps = slots[0]
        batch = min(self.max_num_seqs, len(decoding) + len(queued) + 1)
        decode = self.cost.seconds(batch * wait_steps, batch * wait_steps, wait_steps)
        prefill_tokens = sum(a.prompt_tokens for a in queued) + prompt_tokens
        prefill = self.cost.seconds(prefill_tokens, len(queued) + 1,
                                    math.ceil(prefill_tokens / self.max_num_batched_tokens))
        return self.correction * (decode + prefill)

    @property
    def num_in_flight(self) -> int:
        return len(self._admitted)
