"""The DICOM SCP: C-ECHO and C-STORE of every storage SOP class and transfer syntax.

The C-STORE handler does I/O only: the encoded bytes go to the durable spool,
the index records them, and only then is 0x0000 returned. Failures become a
specific DIMSE status with an Error Comment (errors.to_dimse_status).
"""

from __future__ import annotations

import logging
import time
from typing import Any

from pydicom.dataset import Dataset
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, _config, evt
from pynetdicom.presentation import AllStoragePresentationContexts
from pynetdicom.sop_class import Verification
from pynetdicom.transport import ThreadedAssociationServer

from dicom_node.attributes import identifiers, searchable_attributes
from dicom_node.config import ScpSection
from dicom_node.errors import InvalidInstance, RadBridgeError, UndecodableInstance, to_dimse_status
from dicom_node.index import Index
from dicom_node.metrics import BYTES_RECEIVED, INSTANCES_RECEIVED, INSTANCES_REFUSED
from dicom_node.spool import Spool, uid_key

logger = logging.getLogger(__name__)


def configure_pynetdicom() -> None:
    """Process-wide pynetdicom switches: no identifiers in logs, accept unknown storage classes."""
    _config.LOG_REQUEST_IDENTIFIERS = False
    _config.LOG_RESPONSE_IDENTIFIERS = False
    _config.UNRESTRICTED_STORAGE_SERVICE = True
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)


def _header(event: evt.Event) -> tuple[Dataset, dict[str, str]]:
    try:
        ds = event.dataset
    except Exception as exc:  # any decode failure of untrusted bytes
        raise UndecodableInstance("Cannot understand: dataset could not be decoded") from exc
    values = identifiers(ds)
    if values["SOPInstanceUID"] != event.request.AffectedSOPInstanceUID:
        raise InvalidInstance("SOPInstanceUID does not match the C-STORE request")
    return ds, values


def handle_store(event: evt.Event, spool: Spool, index: Index) -> Dataset | int:
    """Spool one instance durably, index it, then answer (see module docstring)."""
    started = time.monotonic()
    peer_ae = event.assoc.requestor.ae_title
    context = event.context
    log: dict[str, Any] = {
        "event": "cstore",
        "peer_ae": peer_ae,
        "sop_class": context.abstract_syntax,
        "transfer_syntax": context.transfer_syntax,
    }
    try:
        ds, values = _header(event)
        data = event.encoded_dataset(include_meta=True)
        ref = spool.store(
            data,
            sop_instance_uid=values["SOPInstanceUID"],
            sop_class_uid=values["SOPClassUID"],
            study_instance_uid=values["StudyInstanceUID"],
            series_instance_uid=values["SeriesInstanceUID"],
            transfer_syntax_uid=str(context.transfer_syntax),
        )
        index.add_instance(ref, values["Modality"], peer_ae, attributes=searchable_attributes(ds))
    except RadBridgeError as exc:
        status = to_dimse_status(exc)
        INSTANCES_REFUSED.labels(via="dimse", status=f"0x{status.Status:04X}").inc()
        logger.warning(
            "C-STORE refused",
            extra={**log, "status": f"0x{status.Status:04X}", "reason": status.ErrorComment},
        )
        return status
    except Exception as exc:  # e.g. SQLite failure: never answer success
        status = to_dimse_status(exc)
        INSTANCES_REFUSED.labels(via="dimse", status=f"0x{status.Status:04X}").inc()
        logger.error("C-STORE failed", exc_info=True, extra={**log, "status": f"0x{status.Status:04X}"})
        return status
    INSTANCES_RECEIVED.labels(via="dimse").inc()
    BYTES_RECEIVED.labels(via="dimse").inc(ref.size)
    logger.debug(
        "C-STORE stored",
        extra={
            **log,
            "study_key": uid_key(values["StudyInstanceUID"]),
            "bytes": ref.size,
            "duration_ms": round(1000 * (time.monotonic() - started), 1),
            "status": "0x0000",
        },
    )
    return 0x0000


def handle_echo(event: evt.Event) -> int:
    return 0x0000


def start_scp(settings: ScpSection, spool: Spool, index: Index) -> ThreadedAssociationServer:
    """Start the SCP in the background; ``server.server_address[1]`` is the bound port."""
    configure_pynetdicom()
    ae = AE(ae_title=settings.ae_title)
    ae.maximum_pdu_size = settings.max_pdu
    ae.require_calling_aet = list(settings.allowed_calling_aets)
    for context in AllStoragePresentationContexts:
        ae.add_supported_context(context.abstract_syntax, ALL_TRANSFER_SYNTAXES)
    ae.add_supported_context(Verification)
    handlers = [
        (evt.EVT_C_STORE, handle_store, [spool, index]),
        (evt.EVT_C_ECHO, handle_echo),
    ]
    server = ae.start_server((settings.host, settings.port), block=False, evt_handlers=handlers)
    logger.info(
        "SCP listening",
        extra={"event": "scp.start", "ae_title": settings.ae_title, "port": server.server_address[1]},
    )
    return server
