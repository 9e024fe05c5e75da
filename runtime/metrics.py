"""Prometheus metrics of one server, on their own registry (several servers can share a process).

Per-adapter series are what operators ask for, but an unbounded label set would let clients grow
the metrics without limit (one series per adapter ever named), so only the first
`max_adapter_labels` adapter names get a label of their own; the rest are counted as "other".
"""
from __future__ import annotations

import threading
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

OTHER = "other"
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class Exposed:
    """A metrics registry, and /metrics serving it on a port of its own once asked."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self._http: WSGIServer | None = None

    def serve_http(self, port: int, host: str = "127.0.0.1") -> int:
        """Expose /metrics on host:port (port 0 picks a free one); returns the bound port."""
        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        self._http = server
        return int(server.server_port)

    def close(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None


class Metrics(Exposed):
    """Every metric the runtime exports; the server, scheduler and pool record into it."""

    def __init__(self, max_adapter_labels: int = 32) -> None:
        super().__init__()
        self._max_labels = max_adapter_labels
        self._labelled: set[str] = set()
        self._lock = threading.Lock()
        r = self.registry
        self.requests = Counter("adapterhub_requests", "Requests answered, by frontend (grpc, http), method and "
                                "status code", ["frontend", "method", "code"], registry=r)
        self.latency = Histogram("adapterhub_request_seconds", "Request latency, by frontend and method",
                                 ["frontend", "method"], buckets=_LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram("adapterhub_time_to_first_token_seconds",
                              "From the request's arrival to its first generated token", buckets=_LATENCY_BUCKETS,
                              registry=r)
        self.generated_tokens = Counter("adapterhub_generated_tokens", "Tokens generated, by adapter",
                                        ["adapter"], registry=r)
        self.adapter_requests = Counter("adapterhub_adapter_requests", "Requests that named an adapter",
                                        ["adapter"], registry=r)
        self.tokens_per_second = Gauge("adapterhub_tokens_per_second",
                                       "Tokens the last batch step produced, per second of that step", registry=r)
        self.queue_depth = Gauge("adapterhub_queue_depth", "Requests admitted but not yet in the batch", registry=r)
        self.batch_size = Gauge("adapterhub_batch_size", "Rows in the running batch", registry=r)
        self.step_rows = Histogram("adapterhub_step_rows", "Rows per batch step",
                                   buckets=(1, 2, 4, 8, 16, 32, 64, 128), registry=r)
        self.prefills = Counter("adapterhub_prefills", "Prefill forwards (each reads all of the base's weights, "
                                "however few prompts it takes)", registry=r)
        self.cache_hits = Counter("adapterhub_adapter_cache_hits", "Adapter uses served from memory, by tier",
                                  ["tier"], registry=r)
        self.cache_misses = Counter("adapterhub_adapter_cache_misses", "Adapter uses not on the device", registry=r)
        self.loads = Counter("adapterhub_adapter_loads", "Adapters loaded onto the device, by source tier",
                             ["source"], registry=r)
        self.load_seconds = Histogram("adapterhub_adapter_load_seconds", "Time to bring an adapter onto the device",
                                      ["source"], buckets=_LATENCY_BUCKETS, registry=r)
        self.evictions = Counter("adapterhub_adapter_evictions", "Adapters evicted, by the tier they left",
                                 ["tier"], registry=r)
        self.adapter_waits = Counter("adapterhub_adapter_memory_waits",
                                     "Times a request waited for adapters in use to free device memory", registry=r)
        self.adapters_waiting = Gauge("adapterhub_adapter_memory_waiting",
                                      "Requests waiting now for device memory for an adapter", registry=r)
        self.resident_bytes = Gauge("adapterhub_adapter_resident_bytes", "Adapter bytes held, by tier", ["tier"],
                                    registry=r)

    def adapter_label(self, name: str) -> str:
        """`name` while fewer than max_adapter_labels names have a label, else "other"."""
        with self._lock:
            if name in self._labelled:
                return name
            if len(self._labelled) < self._max_labels:
                self._labelled.add(name)
                return name
            return OTHER
