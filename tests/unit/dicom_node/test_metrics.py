"""/metrics: Prometheus text from the node's one HTTP app; counters move with real C-STOREs."""

from __future__ import annotations

from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage

from dicom_node.config import NodeSettings, ScpSection, SpoolSection
from dicom_node.http import HttpServer, create_app
from dicom_node.index import Index, JobKind
from dicom_node.scp import start_scp
from dicom_node.spool import Spool


def _samples(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    response = httpx.get(f"{url}/metrics", timeout=10)
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(response.text)
        for s in family.samples
    }


def test_metrics_count_ingest_and_show_queue_depth(tmp_path: Path, small_ct_files: list[Path]) -> None:
    settings = NodeSettings(spool=SpoolSection(directory=tmp_path / "spool"))
    spool = Spool(settings.spool.directory)
    index = Index(spool.index_path)
    index.count_start()
    for n in range(3):
        index.add_job(JobKind.ANALYZE, f"s{n}", "1.2.3", {"series_instance_uid": f"s{n}", "rule": "ct"})
    http = HttpServer(create_app(settings, spool, index), "127.0.0.1", 0)
    url = f"http://127.0.0.1:{http.start()}"
    scp = start_scp(ScpSection(port=0, ae_title="RADBRIDGE"), spool, index)
    try:
        before = _samples(url)
        received = ("radbridge_instances_received_total", (("via", "dimse"),))
        ae = AE(ae_title="SCU")
        ae.add_requested_context(CTImageStorage)
        assoc = ae.associate("127.0.0.1", scp.server_address[1], ae_title="RADBRIDGE")
        assert all(assoc.send_c_store(p).Status == 0 for p in small_ct_files[:4])
        assoc.release()
        after = _samples(url)
        assert after[received] - before.get(received, 0.0) == 4
        assert after[("radbridge_jobs", (("kind", "analyze"), ("state", "PENDING")))] == 3
        assert after[("radbridge_spool_instances", (("origin", "received"),))] == 4
        assert after[("radbridge_node_starts", ())] == 1
        assert httpx.get(f"{url}/healthz", timeout=10).json() == {"status": "ok"}
    finally:
        scp.shutdown()
        http.stop()
        index.close()
