"""radbridge_common.logs: library messages and tracebacks lose the values they quote."""

from __future__ import annotations

import io
import json
import logging
import warnings
from collections.abc import Iterator

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.valuerep import DA

from dicom_node.errors import InvalidInstance
from radbridge_common import logs

NAME, BIRTH = "Zzyzx^Quintessa", "1941-09-23"


@pytest.fixture
def captured() -> Iterator[io.StringIO]:
    """``logs.configure`` at DEBUG into a buffer; the root logger and warnings capture restored after."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    stream = io.StringIO()
    logs.configure("DEBUG", json_lines=True, stream=stream)
    try:
        yield stream
    finally:
        logging.captureWarnings(False)
        for h in list(root.handlers):
            root.removeHandler(h)
        for h in handlers:
            root.addHandler(h)
        root.setLevel(level)


def _docs(stream: io.StringIO) -> list[dict]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_library_messages_lose_quoted_and_bracketed_values(captured: io.StringIO) -> None:
    lib = logging.getLogger("pynetdicom.dsutils")
    # The node's SCP sets pynetdicom's logger to WARNING (configure_pynetdicom); earlier tests may have.
    parent = logging.getLogger("pynetdicom")
    saved = parent.level, lib.level
    parent.setLevel(logging.DEBUG)
    lib.setLevel(logging.DEBUG)
    try:
        _log_library_lines(lib)
    finally:
        parent.setLevel(saved[0])
        lib.setLevel(saved[1])
    text = captured.getvalue()
    assert NAME not in text and BIRTH not in text
    assert [d["msg"] for d in _docs(captured)] == [
        "(0010,0010) PN <redacted>  # 1 PatientName",
        "Invalid value for VR DA: <redacted>",
        "uvicorn-style <redacted> line",
    ]


def _log_library_lines(lib: logging.Logger) -> None:
    lib.debug("(0010,0010) PN [%s]  # 1 PatientName", NAME)  # pynetdicom's dataset dump
    lib.debug("Invalid value for VR DA: %r", BIRTH)  # pydicom's warning text
    lib.debug('uvicorn-style "%s" line', NAME)


def test_own_messages_are_kept(captured: io.StringIO) -> None:
    logging.getLogger("dicom_node.scp").warning("C-STORE refused", extra={"reason": "Invalid UID in 'x'"})
    (doc,) = _docs(captured)
    assert doc["msg"] == "C-STORE refused" and doc["reason"] == "Invalid UID in 'x'"


def test_tracebacks_keep_frames_but_not_foreign_messages(captured: io.StringIO) -> None:
    def build() -> None:
        try:
            DA(BIRTH)  # pydicom: ValueError("Unable to convert '<the value>' to 'DA' object")
        except ValueError as exc:
            raise InvalidInstance("Cannot understand: bad date") from exc

    try:
        build()
    except InvalidInstance:
        logging.getLogger("dicom_node.worker").error("job crashed", exc_info=True)
    (doc,) = _docs(captured)
    assert BIRTH not in json.dumps(doc)
    exc = doc["exc"]
    assert "ValueError: <redacted>" in exc  # pydicom's message, quoting the value: gone
    assert "dicom_node.errors.InvalidInstance: Cannot understand: bad date" in exc  # ours: kept
    assert "direct cause" in exc and "in build" in exc and "valuerep.py" in exc  # frames: kept


def test_context_chain_and_plain_formatter(captured: io.StringIO) -> None:
    stream = io.StringIO()
    handler = logging.getLogger().handlers[0]
    handler.setStream(stream)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    try:
        try:
            raise KeyError(NAME)
        except KeyError:
            raise RuntimeError(f"while handling {NAME}") from None  # noqa: B904 - suppressed context
    except RuntimeError:
        logging.getLogger("grpc").exception("failed %s", NAME)
    text = stream.getvalue()
    assert NAME not in text
    assert "RuntimeError: <redacted>" in text and "KeyError" not in text  # context suppressed, as Python does


def test_pydicom_warnings_go_through_the_filter(captured: io.StringIO) -> None:
    ds = Dataset()
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        ds.PatientBirthDate = BIRTH  # pydicom warns (and logs) "Invalid value for VR DA: '<the value>'"
    assert pydicom.config.settings.writing_validation_mode is not None
    text = captured.getvalue()
    assert "Invalid value for VR DA" in text  # it was logged...
    assert BIRTH not in text  # ...without the value
