"""Prometheus metrics: vLLM's names where vLLM has one, `deltapack:` for the tiers.

Each server has its own registry (several servers can live in one process, e.g. in tests). Counters and histograms
are updated by the engine as it works; gauges (requests running / waiting, tier residency and bytes) are read from
the engine and tiers at scrape time by a collector.
"""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Histogram, ProcessCollector, disable_created_metrics, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
_ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
_E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0)


class ServeMetrics:
    def __init__(self):
        disable_created_metrics()  # no *_created series: vLLM does not publish them either
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.prompt_tokens = Counter("vllm:prompt_tokens", "Prompt tokens processed", ["model_name"], registry=r)
        self.generation_tokens = Counter("vllm:generation_tokens", "Generated tokens", ["model_name"], registry=r)
        self.request_success = Counter(
            "vllm:request_success", "Finished requests", ["model_name", "finished_reason"], registry=r
        )
        self.ttft = Histogram(
            "vllm:time_to_first_token_seconds", "Time to first token", ["model_name"], buckets=_TTFT_BUCKETS, registry=r
        )
        self.itl = Histogram(
            "vllm:inter_token_latency_seconds", "Time between generated tokens", ["model_name"], buckets=_ITL_BUCKETS, registry=r
        )
        self.e2e = Histogram(
            "vllm:e2e_request_latency_seconds", "Request latency, arrival to last token", ["model_name"], buckets=_E2E_BUCKETS, registry=r
        )
        self.batch_tenants = Histogram(
            "deltapack:batch_tenants", "Distinct tenants (base included) per decode step", buckets=(1, 2, 3, 4, 6, 8, 16, 32, 64), registry=r
        )
        self.batch_size = Histogram(
            "deltapack:batch_size", "Sequences per decode step", buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256), registry=r
        )
        self.http_errors = Counter("deltapack:http_errors", "Error responses", ["status"], registry=r)
        ProcessCollector(registry=r)  # process_resident_memory_bytes and friends
        self._collector: _StateCollector | None = None

    def bind(self, engine, tiers) -> None:
        self._collector = _StateCollector(engine, tiers)
        self.registry.register(self._collector)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _StateCollector:
    def __init__(self, engine, tiers):
        self.engine = engine
        self.tiers = tiers

    def describe(self):
        return []

    def collect(self):
        e = self.engine.snapshot()
        base = self.tiers.base_name
        g = GaugeMetricFamily("vllm:num_requests_running", "Requests in the running batch", labels=["model_name"])
        g.add_metric([base], e["running"])
        yield g
        g = GaugeMetricFamily("vllm:num_requests_waiting", "Requests waiting to join the batch", labels=["model_name"])
        g.add_metric([base], e["waiting"])
        yield g
        # vLLM publishes the adapters running / waiting as labels of an info-style gauge whose value is a timestamp
        g = GaugeMetricFamily(
            "vllm:lora_requests_info", "Deltas with running / waiting requests",
            labels=["max_lora", "running_lora_adapters", "waiting_lora_adapters"],
        )
        g.add_metric([str(e["max_batch"]), ",".join(sorted(e["running_models"])), ",".join(sorted(e["waiting_models"]))], time.time())
        yield g
        t = self.tiers.snapshot()
        g = GaugeMetricFamily("deltapack:resident_deltas", "Deltas resident per tier (disk = registered)", labels=["tier"])
        for k, v in t["resident"].items():
            g.add_metric([k], v)
        yield g
        g = GaugeMetricFamily("deltapack:delta_bytes", "Bytes of deltas per tier (packed on device/host, files on disk)", labels=["tier"])
        for k, v in t["bytes"].items():
            g.add_metric([k], v)
        yield g
        g = GaugeMetricFamily("deltapack:delta_budget_bytes", "Byte budget per tier", labels=["tier"])
        for k, v in t["budget"].items():
            g.add_metric([k], v)
        yield g
        for name, key, help_ in (
            ("deltapack:delta_loads", "loads", "Deltas brought into a tier"),
            ("deltapack:delta_hits", "hits", "Acquisitions served from a tier without a disk read"),
            ("deltapack:delta_evictions", "evictions", "Deltas evicted from a tier"),
        ):
            c = CounterMetricFamily(name, help_, labels=["tier"])
            for k, v in t[key].items():
                c.add_metric([k], v)
            yield c
        g = GaugeMetricFamily("deltapack:registered_deltas", "Deltas loaded (servable)")
        g.add_metric([], t["registered"])
        yield g
        m = t.get("merged")
        if m is not None:
            yield from _merged_families(m)


def _merged_families(m: dict):
    """Merged copies of hot tenants' weights (deltapack.serve.merged): which, their bytes, and how often used."""
    g = GaugeMetricFamily("deltapack:merged_bytes", "Device bytes of merged tenant weights (builds in progress included)")
    g.add_metric([], m["bytes"])
    yield g
    if m["budget_bytes"] is not None:
        g = GaugeMetricFamily("deltapack:merged_budget_bytes", "Byte budget of merged tenant weights (--merged-bytes)")
        g.add_metric([], m["budget_bytes"])
        yield g
    g = GaugeMetricFamily("deltapack:merged_deltas", "Deltas whose weights are kept merged (1 per usable copy)",
                          labels=["model_name"])
    for name, e in m["tenants"].items():
        g.add_metric([name], 1 if e["complete"] else 0)
    yield g
    c = CounterMetricFamily("deltapack:merged_forwards", "Forwards run on merged weights (reading no delta)")
    c.add_metric([], m["merged_forwards"])
    yield c
    c = CounterMetricFamily("deltapack:merges", "Merged copies built")
    c.add_metric([], m["merges"])
    yield c
    c = CounterMetricFamily("deltapack:merged_evictions", "Merged copies dropped", labels=["reason"])
    for k, v in m["evictions"].items():
        c.add_metric([k], v)
    yield c
