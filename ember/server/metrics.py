"""Prometheus metrics named `ember:*` after vLLM's `vllm:*`, so existing dashboards map over.

Engine state (running / waiting requests, KV-cache usage, prefix-cache and preemption counters) is read
at scrape time by a collector; per-request latencies and token counts are recorded by `RequestTracker`s
that the serving layer feeds with each engine output.
"""
from __future__ import annotations

import time

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from ember.engine.async_engine import AsyncEngine
from ember.outputs import RequestOutput

# Bucket edges as vLLM's, so quantiles compare across servers.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
TPOT_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)


class ServerMetrics:
    """One registry per app (no module-global metric objects), exposed by `GET /metrics`."""

    def __init__(self, engine: AsyncEngine, model_name: str):
        prometheus_client.disable_created_metrics()  # no `*_created` series, as vLLM
        self.registry = CollectorRegistry()
        self.model_name = model_name
        labels = ["model_name"]

        def counter(name, doc, extra=()):
            return Counter(name, doc, labels + list(extra), registry=self.registry)

        def histogram(name, doc, buckets):
            return Histogram(name, doc, labels, buckets=buckets, registry=self.registry)

        self.prompt_tokens = counter("ember:prompt_tokens", "Prompt tokens processed.").labels(model_name)
        self.generation_tokens = counter("ember:generation_tokens", "Generated tokens.").labels(model_name)
        self.request_success = counter("ember:request_success", "Finished requests by finish reason.", ["finished_reason"])
        self.ttft = histogram("ember:time_to_first_token_seconds", "Time to first token.", TTFT_BUCKETS).labels(model_name)
        self.itl = histogram("ember:inter_token_latency_seconds", "Time between output tokens.", TPOT_BUCKETS).labels(model_name)
        # vLLM's older name for the same observation; kept so dashboards built on it still work.
        self.tpot = histogram("ember:time_per_output_token_seconds", "Time per output token.", TPOT_BUCKETS).labels(model_name)
        self.e2e = histogram("ember:e2e_request_latency_seconds", "End-to-end request latency.", LATENCY_BUCKETS).labels(model_name)
        self.queue_time = histogram("ember:request_queue_time_seconds", "Time a request waited before it was first scheduled.", LATENCY_BUCKETS).labels(model_name)
        # Editor completions (server/editor.py)
        self.fim_requests = counter("ember:fim_requests", "Editor completion requests, by prompt mode (fim or prefix-only).", ["mode"])
        self.superseded = counter("ember:completion_superseded", "Editor completions cancelled by a newer request of their session.").labels(model_name)
        self.typed_ahead_reuses = counter("ember:completion_typed_ahead_reuses", "Editor completions answered from the generation the user typed ahead through.").labels(model_name)
        self.completion_ttft = histogram("ember:completion_time_to_first_token_seconds", "Editor completions: time to the first delivered text.", TTFT_BUCKETS).labels(model_name)
        self.completion_first_line = histogram("ember:completion_time_to_first_line_seconds", "Editor completions: time to the first full line (or the end).", TTFT_BUCKETS).labels(model_name)
        for mode in ("fim", "prefix"):
            self.fim_requests.labels(model_name, mode)
        self.registry.register(_EngineCollector(engine, model_name))

    def track(self) -> "RequestTracker":
        return RequestTracker(self)

    def exposition(self) -> bytes:
        return prometheus_client.generate_latest(self.registry)


class RequestTracker:
    """Follows one request's outputs and records its latencies and token counts."""

    def __init__(self, metrics: ServerMetrics):
        self.metrics = metrics
        self.num_tokens = 0  # output tokens seen so far, over all samples
        self.last_token_time: float | None = None
        self.arrival_time: float | None = None
        self.finish_reasons: list[str] = []

    def on_output(self, output: RequestOutput) -> None:
        now = time.monotonic()
        m = self.metrics
        num_tokens = sum(len(c.token_ids) for c in output.outputs)
        num_new = num_tokens - self.num_tokens
        if self.last_token_time is None:
            self.arrival_time = output.metrics.get("arrival_time", now)
            m.prompt_tokens.inc(len(output.prompt_token_ids))
            first_token_time = output.metrics.get("first_token_time") or now
            m.ttft.observe(first_token_time - self.arrival_time)
            scheduled_time = output.metrics.get("scheduled_time")
            if scheduled_time is not None:
                m.queue_time.observe(scheduled_time - self.arrival_time)
        elif num_new > 0:
            gap = (now - self.last_token_time) / num_new
            for _ in range(num_new):
                m.itl.observe(gap)
                m.tpot.observe(gap)
        if num_new > 0:
            m.generation_tokens.inc(num_new)
            self.last_token_time = now
        self.num_tokens = num_tokens
        if output.finished:
            self.finish_reasons = [c.finish_reason or "abort" for c in output.outputs]

    def on_end(self) -> None:
        """Called once, when the request finished, failed or was cancelled."""
        m = self.metrics
        reasons = self.finish_reasons or ["abort"]
        for reason in reasons:
            m.request_success.labels(m.model_name, reason).inc()
        if self.arrival_time is not None:
            m.e2e.observe(time.monotonic() - self.arrival_time)


class _EngineCollector:
    """Reads the engine's gauges and cumulative counters at scrape time."""

    def __init__(self, engine: AsyncEngine, model_name: str):
        self.engine = engine
        self.model_name = model_name

    def collect(self):
        llm = self.engine.engine
        labels = [self.model_name]

        def gauge(name, doc, value):
            family = GaugeMetricFamily(name, doc, labels=["model_name"])
            family.add_metric(labels, value)
            return family

        def counter(name, doc, value):
            family = CounterMetricFamily(name, doc, labels=["model_name"])
            family.add_metric(labels, value)
            return family

        kernels = GaugeMetricFamily("ember:kernels_info", "The kernels this model runs on (1 for the variant in use).",
                                    labels=["model_name", "variant"])
        kernels.add_metric([self.model_name, llm.kernel_variant], 1)
        yield kernels
        yield gauge("ember:num_requests_running", "Requests in the running batch.", self.engine.num_running)
        yield gauge("ember:num_requests_waiting", "Requests waiting to be scheduled.", self.engine.num_waiting)
        yield gauge("ember:kv_cache_usage_perc", "Fraction of KV-cache blocks in use (1 = full).", llm.kv_cache.usage)
        yield counter("ember:prefix_cache_queries", "Prompt tokens looked up in the prefix cache.", llm.kv_cache.num_prefix_queries)
        yield counter("ember:prefix_cache_hits", "Prompt tokens found in the prefix cache.", llm.kv_cache.num_prefix_hits)
        yield counter("ember:num_preemptions", "Requests preempted to free KV-cache blocks.", llm.scheduler.num_preemptions)
        if llm.speculation.speculative != "none":  # vLLM's spec_decode metric names, under ember:
            stats = llm.spec_stats
            yield counter("ember:spec_decode_num_drafts", "Verification steps of a request with proposed tokens.", stats.num_drafts)
            yield counter("ember:spec_decode_num_draft_tokens", "Proposed tokens.", stats.num_draft_tokens)
            yield counter("ember:spec_decode_num_accepted_tokens", "Proposed tokens accepted.", stats.num_accepted_tokens)
            per_position = CounterMetricFamily("ember:spec_decode_num_accepted_tokens_per_pos",
                                               "Accepted proposals by position (0 = first proposed).",
                                               labels=["model_name", "position"])
            for position, count in enumerate(stats.accepted_per_position):
                per_position.add_metric([self.model_name, str(position)], count)
            yield per_position
