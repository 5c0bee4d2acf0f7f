"""`radbridge demo`: the whole loop on one machine, over real DICOM and gRPC.

A synthetic CT study goes to the node by C-STORE; the node routes it to the
embedded inference service (reference backend), writes SEG + SRs and sends
them by C-STORE to a small receiving SCP that stands in for the PACS and
writes what it receives into the output directory.
"""

from __future__ import annotations

import tempfile
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path

from pydicom.dataset import Dataset
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, _config, evt
from pynetdicom.presentation import AllStoragePresentationContexts, StoragePresentationContexts
from tqdm import tqdm

from dicom_node.config import (
    CompletionSection,
    ExportSection,
    ExportTarget,
    HttpSection,
    NodeSettings,
    ScpSection,
    SpoolSection,
)
from dicom_node.index import ACTIVE, JobKind
from dicom_node.node import Node
from dicom_node.spool import write_durably
from inference_service.config import ServiceSection, ServiceSettings
from radbridge.embedded import EmbeddedInferenceService
from radbridge.synth import ct_series

SINK_AE = "DEMOPACS"


class ReceivingScp:
    """A minimal storage SCP (the demo's PACS): writes each received instance to a folder."""

    def __init__(self, directory: Path, ae_title: str = SINK_AE) -> None:
        self.directory = directory
        self.received: list[Path] = []
        self._lock = threading.Lock()
        ae = AE(ae_title=ae_title)
        for cx in AllStoragePresentationContexts:
            ae.add_supported_context(cx.abstract_syntax, ALL_TRANSFER_SYNTAXES)
        self._ae = ae
        self._server = None

    def _on_store(self, event: evt.Event) -> int:
        ds = event.dataset
        name = f"{ds.Modality}-{ds.SeriesNumber}-{ds.SOPInstanceUID}.dcm"
        path = self.directory / name
        # The node's SCP, if in this process, turns on pynetdicom's streaming of received data sets.
        if _config.STORE_RECV_CHUNKED_DATASET:
            data = Path(event.dataset_path).read_bytes()
        else:
            data = event.encoded_dataset(include_meta=True)
        write_durably(path, data)
        with self._lock:
            if path not in self.received:
                self.received.append(path)
        return 0x0000

    def start(self) -> int:
        self.directory.mkdir(parents=True, exist_ok=True)
        self._server = self._ae.start_server(
            ("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_C_STORE, self._on_store)]
        )
        return int(self._server.server_address[1])

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()


def send_datasets(datasets: list[Dataset], port: int, called_ae: str, progress: bool = True) -> None:
    """C-STORE datasets to host 127.0.0.1:port (the way a modality would)."""
    ae = AE(ae_title="DEMOMODALITY")
    for cx in StoragePresentationContexts:
        if cx.abstract_syntax in {ds.SOPClassUID for ds in datasets}:
            ae.add_requested_context(cx.abstract_syntax)
    assoc = ae.associate("127.0.0.1", port, ae_title=called_ae)
    if not assoc.is_established:
        raise RuntimeError("The node refused the association.")
    try:
        for ds in tqdm(datasets, desc="C-STORE", unit="img", disable=not progress):
            status = assoc.send_c_store(ds)
            if getattr(status, "Status", None) != 0x0000:
                raise RuntimeError(f"C-STORE failed with status {status}")
    finally:
        assoc.release()


@dataclass
class DemoOutcome:
    files: list[Path]
    study_instance_uid: str
    job_states: dict[str, str]
    seconds: float


def run_demo(
    out: Path,
    slices: int = 120,
    quiet_window_s: float = 2.0,
    timeout_s: float = 600.0,
    spool: Path | None = None,
    progress: bool = True,
) -> DemoOutcome:
    started = time.monotonic()
    out = Path(out)
    sink = ReceivingScp(out)
    sink_port = sink.start()
    spool_dir = Path(spool) if spool else Path(tempfile.mkdtemp(prefix="radbridge-demo-"))
    settings = NodeSettings(
        scp=ScpSection(port=0),
        http=HttpSection(port=0),
        spool=SpoolSection(directory=spool_dir),
        completion=CompletionSection(quiet_window_s=quiet_window_s),
        export=ExportSection(
            targets={"pacs": ExportTarget(host="127.0.0.1", port=sink_port, ae_title=SINK_AE)}
        ),
    )
    settings = replace(settings, worker=replace(settings.worker, poll_interval_s=0.2))
    bar = tqdm(total=100, desc="analysis", unit="%", disable=not progress)
    state = {"last": 0}

    def on_progress(job, fraction: float, message: str) -> None:  # noqa: ANN001
        value = int(100 * fraction)
        if value > state["last"]:
            bar.update(value - state["last"])
            state["last"] = value
        bar.set_postfix_str(message[:40])

    try:
        with (
            EmbeddedInferenceService(ServiceSettings(inference_service=ServiceSection(port=0))) as service,
            Node(settings, service.address, on_progress) as node,
        ):
            datasets = ct_series(n_slices=slices)
            study_uid = str(datasets[0].StudyInstanceUID)
            send_datasets(datasets, node.port, settings.scp.ae_title, progress)
            del datasets  # the node has them now; holding the sender's copy would add the study's pixels to the peak
            deadline = time.monotonic() + timeout_s
            while time.monotonic() < deadline:
                jobs = node.index.jobs(study_uid)
                exports = [j for j in jobs if j.kind is JobKind.EXPORT]
                if jobs and exports and not any(j.state in ACTIVE for j in jobs):
                    break
                study = node.index.study(study_uid)
                if study and study["state"] == "UNROUTED":
                    break
                time.sleep(0.2)
            else:
                raise TimeoutError(f"No results within {timeout_s:.0f} s.")
            job_states = {
                f"{j.kind}:{j.id}": f"{j.state}{' ' + j.last_error if j.last_error else ''}"
                for j in node.index.jobs(study_uid)
            }
    finally:
        bar.close()
        sink.stop()
    return DemoOutcome(sorted(sink.received), study_uid, job_states, time.monotonic() - started)
