"""Prometheus metrics of the node, served at ``/metrics`` by the one HTTP app.

Counters are incremented where things happen (C-STORE and STOW-RS handlers, job outcomes); the
gauges that describe state (jobs by kind and state, instances in the spool, node starts) are read
from the index at scrape time, so they are right after a restart too. One registry per process
(the node is one per process); labels carry no patient data.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from dicom_node.index import Index, JobKind, JobState, Origin

REGISTRY = CollectorRegistry()
CONTENT_TYPE = CONTENT_TYPE_LATEST

INSTANCES_RECEIVED = Counter(
    "radbridge_instances_received_total",
    "Instances stored durably and acknowledged, by protocol.",
    ["via"],
    registry=REGISTRY,
)
INSTANCES_REFUSED = Counter(
    "radbridge_instances_refused_total",
    "Instances refused, by protocol and DICOM status (C-STORE status or STOW-RS FailureReason).",
    ["via", "status"],
    registry=REGISTRY,
)
ASSOCIATIONS = Counter(
    "radbridge_associations_total",
    "Associations the SCP accepted, by acceptor: lean (storage-only, dicom_node.lean_scp) or pynetdicom.",
    ["acceptor"],
    registry=REGISTRY,
)
BYTES_RECEIVED = Counter(
    "radbridge_received_bytes_total",
    "Bytes of acknowledged instances, by protocol.",
    ["via"],
    registry=REGISTRY,
)
STOW_REQUESTS = Counter(
    "radbridge_stow_requests_total", "STOW-RS requests by HTTP status.", ["status"], registry=REGISTRY
)
JOB_OUTCOMES = Counter(
    "radbridge_job_outcomes_total",
    "Finished job runs by kind and outcome (succeeded, retry, waiting, failed, dead_letter).",
    ["kind", "outcome"],
    registry=REGISTRY,
)
EXPORTS = Counter(
    "radbridge_exports_total",
    "Export runs by target and outcome (succeeded, retry, failed, dead_letter).",
    ["target", "outcome"],
    registry=REGISTRY,
)
ANALYSIS_SECONDS = Histogram(
    "radbridge_analysis_seconds",
    "Wall time of one analysis job (volume, inference, SEG/SR writing), by routing rule.",
    ["rule"],
    buckets=(0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1800),
    registry=REGISTRY,
)
JOBS_RESUMED = Counter(
    "radbridge_jobs_resumed_total",
    "Jobs found RUNNING at start (cut off by a stop), by what became of them (resumed, failed).",
    ["outcome"],
    registry=REGISTRY,
)
JOBS = Gauge(
    "radbridge_jobs",
    "Jobs in the index by kind and state (queue depth: PENDING).",
    ["kind", "state"],
    registry=REGISTRY,
)
SPOOLED = Gauge(
    "radbridge_spool_instances",
    "Instances in the spool, by origin (received, output).",
    ["origin"],
    registry=REGISTRY,
)
STARTS = Gauge(
    "radbridge_node_starts", "Times the node has started on this spool (restarts + 1).", registry=REGISTRY
)


def exposition(index: Index) -> bytes:
    """The text exposition, with the index-backed gauges read now."""
    counts = index.job_counts()
    for kind in JobKind:
        for state in JobState:
            JOBS.labels(kind=str(kind), state=str(state)).set(counts.get((kind, state), 0))
    for origin in Origin:
        SPOOLED.labels(origin=str(origin)).set(index.count_instances(origin))
    STARTS.set(index.starts())
    return generate_latest(REGISTRY)
