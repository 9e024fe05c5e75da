"""`hub serve --replicas N --metrics-port P`: one Prometheus /metrics for the cluster.

Each replica keeps its own metrics (runtime/metrics.py); a scrape of the endpoint's /metrics asks every
replica for its exposition at that moment and serves all of them, each series with a `replica` label
(Serve's replica id, as in the answers' `x-replica-id`), so one scrape target covers the cluster and
`sum without (replica)` gives the cluster's totals. The endpoint's own series (calls retried on another
replica, replicas answering) come with them. A replica that fails to answer a scrape is left out of it.
"""
from __future__ import annotations

from typing import Callable, Iterator

from prometheus_client import Counter, Gauge
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

from runtime.metrics import Exposed

REPLICA_LABEL = "replica"


class ReplicaMetrics:
    """A collector that yields every replica's series, labelled by replica, from `scrape()`: a list of
    (replica id, Prometheus text exposition)."""

    def __init__(self, scrape: Callable[[], list[tuple[str, str]]]) -> None:
        self._scrape = scrape

    def collect(self) -> Iterator[Metric]:
        families: dict[str, Metric] = {}
        for replica, text in sorted(self._scrape()):
            for family in text_string_to_metric_families(text):
                merged = families.get(family.name)
                if merged is None:
                    merged = families[family.name] = Metric(family.name, family.documentation, family.type,
                                                            family.unit)
                merged.samples += [s._replace(labels={**s.labels, REPLICA_LABEL: replica}) for s in family.samples]
        yield from families.values()


class ClusterMetrics(Exposed):
    """The endpoint's registry: its own series and the replicas'; served on a port of its own."""

    def __init__(self, scrape: Callable[[], list[tuple[str, str]]]) -> None:
        super().__init__()
        self.registry.register(ReplicaMetrics(self._counted(scrape)))  # first: it sets `replicas` below
        self.retries = Counter("adapterhub_cluster_retries", "Calls sent again to another replica because the "
                               "replica serving them stopped, by kind (unary, stream)", ["kind"],
                               registry=self.registry)
        self.replicas = Gauge("adapterhub_cluster_replicas", "Replicas that answered this scrape",
                              registry=self.registry)

    def _counted(self, scrape: Callable[[], list[tuple[str, str]]]) -> Callable[[], list[tuple[str, str]]]:
        def counted() -> list[tuple[str, str]]:
            texts = scrape()
            self.replicas.set(len(texts))
            return texts
        return counted
