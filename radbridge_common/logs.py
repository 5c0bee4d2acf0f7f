"""Log set-up for the CLI: JSON lines with stable keys, no patient data.

Modules only call logging.getLogger(__name__); handlers are configured here,
once, by the entry point. Extra keys (event, job_id, study_key, peer_ae, ...)
become top-level JSON fields.

No patient data, whoever logs: our own modules log structured events without
values from data sets. Libraries do quote values: pydicom's warnings and
exceptions ("Unable to convert '1941-09-23' to 'DA' object"), pynetdicom's
dumps of identifiers when its DEBUG logging is on. So the handler's
``PhiFilter`` (1) blanks text arguments and quoted or bracketed values in
messages of every logger outside RadBridge's packages, Python warnings included
(they are routed into logging), and (2) renders every traceback with its frames but without the
messages of exceptions that are not RadBridge's own (``<message redacted>``).
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
import traceback
from types import TracebackType

_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime"}
#: Loggers and exception modules whose messages are written to be free of patient data.
OWN_PACKAGES = ("dicom_node", "inference_service", "radbridge", "radbridge_common", "RadBridgeLib")
REDACTED = "<redacted>"
#: Values a library may quote: '...', "...", [...] (pynetdicom/pydicom dumps), b'...'.
_QUOTED = re.compile(r"""b?'[^'\n]*'|b?"[^"\n]*"|\[[^\]\n]*\]""")


def _own(name: str) -> bool:
    return name.split(".")[0] in OWN_PACKAGES


def redact_values(message: str) -> str:
    """``message`` with every quoted or bracketed value replaced by <redacted>."""
    return _QUOTED.sub(REDACTED, message)


def safe_traceback(exc_info: tuple[type[BaseException], BaseException, TracebackType | None]) -> str:
    """The traceback of ``exc_info`` and its causes, with only RadBridge's own exception messages.

    Frames (file, line, function, source line) are kept: they come from code, not data.
    """
    chunks: list[str] = []
    seen: set[int] = set()
    exc: BaseException | None = exc_info[1]
    chain: list[tuple[BaseException, str]] = []
    link = ""
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        chain.append((exc, link))
        if exc.__cause__ is not None:
            exc, link = (
                exc.__cause__,
                "\nThe above exception was the direct cause of the following exception:\n\n",
            )
        elif exc.__context__ is not None and not exc.__suppress_context__:
            exc, link = (
                exc.__context__,
                "\nDuring handling of the above exception, another exception occurred:\n\n",
            )
        else:
            exc = None
    for exc, link in reversed(chain):
        kind = type(exc)
        name = (
            f"{kind.__module__}.{kind.__qualname__}" if kind.__module__ != "builtins" else kind.__qualname__
        )
        message = str(exc) if _own(kind.__module__) else (REDACTED if str(exc) else "")
        if exc.__traceback__ is not None:
            chunks.append("Traceback (most recent call last):\n")
            chunks.extend(traceback.format_tb(exc.__traceback__))
        chunks.append(f"{name}: {message}\n" if message else f"{name}\n")
        chunks.append(link)
    return "".join(chunks).rstrip("\n")


def _foreign_message(record: logging.LogRecord) -> str:
    """A library's message: its text arguments (``%s`` of a value) and quoted values redacted."""
    args = record.args
    if isinstance(args, tuple) and args:
        try:
            message = str(record.msg) % tuple(REDACTED if isinstance(a, str | bytes) else a for a in args)
        except (TypeError, ValueError):  # e.g. "%d" given a str: keep nothing of the arguments
            message = str(record.msg)
    else:
        message = record.getMessage()
    return redact_values(message)


class PhiFilter(logging.Filter):
    """Keeps patient data quoted by libraries out of log records (see the module docstring).

    Rewrites the record in place: the message is rendered once (redacted for foreign loggers),
    a traceback becomes ``exc_text`` without foreign exception messages.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if not getattr(record, "_phi_checked", False):
            record.msg = record.getMessage() if _own(record.name) else _foreign_message(record)
            record.args = None
            if record.exc_info and record.exc_info[1] is not None:
                record.exc_text = safe_traceback(record.exc_info)  # type: ignore[arg-type]
                record.exc_info = None
            if record.stack_info:
                record.stack_info = None if not _own(record.name) else record.stack_info
            record._phi_checked = True
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_"):
                doc[key] = value if isinstance(value, str | int | float | bool | type(None)) else str(value)
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        elif record.exc_text:
            doc["exc"] = record.exc_text
        return json.dumps(doc, ensure_ascii=False)


def configure(level: str = "INFO", json_lines: bool = True, stream=None) -> None:  # noqa: ANN001
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(
        JsonFormatter() if json_lines else logging.Formatter("%(levelname)s %(name)s: %(message)s")
    )
    handler.addFilter(PhiFilter())
    logging.captureWarnings(True)  # pydicom warns with values quoted: through the filter, not raw stderr
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(level.upper())
