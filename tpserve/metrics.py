"""Prometheus metrics of a serving process (`/metrics`), with `prometheus_client`.

Names are prefixed `tpserve:` and mean what vLLM's metrics of the same name mean, so dashboards and
the Gateway API Inference Extension's endpoint picker work with the prefix changed; every metric
is labelled `model_name`. What the engine counts anyway (queue lengths, KV blocks, token and
preemption totals, prefix-cache and speculation counts) is read from the statistics snapshot the
engine loop publishes after each step, at scrape time, so it costs the loop nothing. Per-request
histograms are observed on the front-end thread when a request's last output arrives (its
lifecycle timestamps travel with it); the loop itself only observes each step's token count.
"""

from __future__ import annotations

import math

from collections.abc import Callable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from tpserve.engine.outputs import EngineStats, RequestOutput

PREFIX = "tpserve:"
CONTENT_TYPE = CONTENT_TYPE_LATEST
# Seconds: latencies from milliseconds (a decode step) to tens of minutes (a long queued request).
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
               40.0, 80.0)
REQUEST_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
                   480.0, 960.0, 1920.0, 7680.0)


def token_buckets(limit: int) -> tuple[int, ...]:
    """1, 2, 5, 10, 20, 50, ... up to and including the first value >= limit."""
    out, scale = [], 1
    while not out or out[-1] < limit:
        out += [m * scale for m in (1, 2, 5)]
        scale *= 10
    return tuple(v for i, v in enumerate(out) if i == 0 or out[i - 1] < limit)


class ServerMetrics:
    def __init__(self, model_name: str, stats: Callable[[], EngineStats | None], max_model_len: int,
                 max_num_batched_tokens: int, config: dict[str, str], slo_ttft_s: float | None = None) -> None:
        """stats() returns the engine loop's latest snapshot (None while loading); config labels
        the serving-configuration info metric; with a TTFT SLO, finished requests are counted as
        meeting it or not."""
        self.registry = CollectorRegistry()
        self.model_name = model_name
        self.slo_ttft_s = slo_ttft_s

        def histogram(name: str, doc: str, buckets) -> Histogram:
            return Histogram(PREFIX + name, doc, ["model_name"], buckets=buckets, registry=self.registry).labels(
                model_name)

        self.ttft = histogram("time_to_first_token_seconds", "Time from arrival to the first token.", TTFT_BUCKETS)
        self.itl = histogram("inter_token_latency_seconds", "Time between consecutive output tokens.", ITL_BUCKETS)
        self.e2e = histogram("e2e_request_latency_seconds", "Time from arrival to finish.", REQUEST_BUCKETS)
        self.queue = histogram("request_queue_time_seconds", "Time waiting before first scheduled.",
                               REQUEST_BUCKETS)
        self.prefill = histogram("request_prefill_time_seconds", "Time from first scheduled to the first token.",
                                 REQUEST_BUCKETS)
        self.decode = histogram("request_decode_time_seconds", "Time from the first token to finish.",
                                REQUEST_BUCKETS)
        self.prompt_tokens = histogram("request_prompt_tokens", "Prompt tokens per request.",
                                       token_buckets(max_model_len))
        self.generation_tokens = histogram("request_generation_tokens", "Generated tokens per request.",
                                           token_buckets(max_model_len))
        self.iteration_tokens = histogram("iteration_tokens_total", "Tokens computed per engine step.",
                                          token_buckets(max_num_batched_tokens))
        self.success = Counter(PREFIX + "request_success", "Finished requests, by finish reason.",
                               ["model_name", "finished_reason"], registry=self.registry)
        self.rejected = Counter(PREFIX + "request_rejected", "Requests refused for load, by reason "
                                "(queue_full: --max-queued-requests; slo_ttft: predicted to miss --slo-ttft).",
                                ["model_name", "reason"], registry=self.registry)
        self.unauthenticated = Counter(PREFIX + "request_unauthenticated", "Calls refused for a missing or wrong "
                                       "API key, by protocol (grpc / http).", ["model_name", "protocol"],
                                       registry=self.registry)
        self.slo = Counter(PREFIX + "request_slo_ttft", "Admitted requests that got a first token, by whether "
                           "it came within --slo-ttft (met: true / false).", ["model_name", "met"],
                           registry=self.registry)
        self.registry.register(_EngineCollector(model_name, stats, dict(config)))

    def observe_rejected(self, reason: str) -> None:
        self.rejected.labels(self.model_name, reason).inc()

    def observe_unauthenticated(self, protocol: str) -> None:
        self.unauthenticated.labels(self.model_name, protocol).inc()

    def observe_finished(self, out: RequestOutput) -> None:
        """A request's last output (front-end thread)."""
        self.success.labels(self.model_name, out.finish_reason or "unknown").inc()
        self.prompt_tokens.observe(out.num_prompt_tokens)
        self.generation_tokens.observe(out.num_output_tokens)
        t = out.times
        if t is None:
            return
        for histogram, value in ((self.ttft, t.time_to_first_token), (self.e2e, t.e2e_latency),
                                 (self.queue, t.queue_time), (self.prefill, t.prefill_time),
                                 (self.decode, t.decode_time)):
            if value is not None:
                histogram.observe(value)
        for gap in t.inter_token_times:
            self.itl.observe(gap)
        if self.slo_ttft_s is not None and t.time_to_first_token is not None:
            self.slo.labels(self.model_name, str(t.time_to_first_token <= self.slo_ttft_s).lower()).inc()

    def observe_step(self, num_tokens: int) -> None:
        """One engine step computed `num_tokens` tokens (engine thread)."""
        self.iteration_tokens.observe(num_tokens)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _EngineCollector:
    """Gauges and running totals from the engine loop's statistics snapshot, read at scrape time."""

    def __init__(self, model_name: str, stats: Callable[[], EngineStats | None], config: dict[str, str]) -> None:
        self.model_name = model_name
        self.stats = stats
        self.config = config

    def collect(self):
        labels = ["model_name"]
        info = GaugeMetricFamily(PREFIX + "serving_config_info", "Serving configuration (value 1).",
                                 labels=[*labels, *self.config])
        info.add_metric([self.model_name, *self.config.values()], 1)
        yield info
        s = self.stats()
        if s is None:
            return
        m = [self.model_name]
        gauges = (("num_requests_running", "Requests in the running batch.", s.num_running),
                  ("num_requests_waiting", "Requests waiting to be scheduled.", s.num_waiting),
                  ("kv_cache_usage_perc", "Fraction of KV-cache blocks in use (1 is full).",
                   s.kv_blocks_in_use / s.kv_blocks_total if s.kv_blocks_total else 0.0),
                  ("kv_cache_usage_peak_perc", "The highest fraction of KV-cache blocks in use at once since start.",
                   s.kv_blocks_in_use_peak / s.kv_blocks_total if s.kv_blocks_total else 0.0))
        for name, doc, value in gauges:
            g = GaugeMetricFamily(PREFIX + name, doc, labels=labels)
            g.add_metric(m, value)
            yield g
        spec = s.speculation
        counters = (("prompt_tokens", "Prompt tokens computed.", s.num_prompt_tokens),
                    ("generation_tokens", "Tokens generated.", s.num_generation_tokens),
                    ("num_preemptions", "Preemptions (by recompute).", s.num_preemptions),
                    ("prefix_cache_queries", "Prompt tokens looked up in the prefix cache.", s.prefix_cache_queries),
                    ("prefix_cache_hits", "Prompt tokens found in the prefix cache.", s.prefix_cache_hits),
                    ("spec_decode_num_drafts", "Sequence-steps that verified proposals.", s.spec_num_drafts),
                    ("spec_decode_num_draft_tokens", "Proposed tokens.", spec.num_proposed_tokens if spec else 0),
                    ("spec_decode_num_accepted_tokens", "Accepted proposed tokens.",
                     spec.num_accepted_tokens if spec else 0))
        for name, doc, value in counters:
            c = CounterMetricFamily(PREFIX + name, doc, labels=labels)
            c.add_metric(m, value)
            yield c
        by_position = CounterMetricFamily(PREFIX + "spec_decode_num_accepted_tokens_per_pos",
                                          "Accepted proposed tokens, by proposal position.",
                                          labels=[*labels, "position"])
        for position, value in enumerate(s.spec_accepted_by_position):
            by_position.add_metric([self.model_name, str(position)], value)
        yield by_position
        if s.routing is not None:
            yield from self._routing(s.routing)

    def _routing(self, r):
        """Routing to the small model (tpserve.route): decisions, hand-overs, the audit."""
        m, labels = [self.model_name], ["model_name"]
        decisions = CounterMetricFamily(PREFIX + "route_decisions", "`auto` requests the router decided, by the "
                                        "model it chose (small / target).", labels=[*labels, "routed_to"])
        decisions.add_metric([*m, "small"], r.num_to_small)
        decisions.add_metric([*m, "target"], r.num_to_target)
        yield decisions
        audit = r.audit or {}
        counters = (("route_handovers", "Requests moved from the small model to the target.", r.num_handovers),
                    ("route_small_requests", "Requests the small model served to the end.", r.small_requests),
                    ("route_small_generation_tokens", "Tokens of requests the small model served.",
                     r.small_generation_tokens),
                    ("route_audits", "Small-served requests the target scored again.", audit.get("num_audits", 0)))
        for name, doc, value in counters:
            c = CounterMetricFamily(PREFIX + name, doc, labels=labels)
            c.add_metric(m, value)
            yield c
        gauges = [("route_audit_quality_gap", "Audit: (small - target) / target bits on the prompts' last tokens "
                   "of small-served requests: the relative quality routing gives up.", audit.get("quality_gap")),
                  ("route_audit_small_bits_per_byte", "Audit: the small model's bits per byte on those tokens.",
                   audit.get("small_bits_per_byte")),
                  ("route_audit_target_bits_per_byte", "Audit: the target's bits per byte on those tokens.",
                   audit.get("target_bits_per_byte")),
                  ("route_audit_output_greedy_agreement", "Audit: fraction of the small model's output tokens "
                   "that are the target's most likely token.", audit.get("output_greedy_agreement"))]
        if r.small_fraction is not None:
            gauges.append(("route_small_fraction", "The fraction of `auto` traffic the router sends to the small "
                           "model now.", r.small_fraction))
        if r.threshold is not None and math.isfinite(r.threshold):
            gauges.append(("route_threshold", "The router's current score threshold.", r.threshold))
        for name, doc, value in gauges:
            if value is not None:
                g = GaugeMetricFamily(PREFIX + name, doc, labels=labels)
                g.add_metric(m, value)
                yield g
