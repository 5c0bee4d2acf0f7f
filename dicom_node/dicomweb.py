"""Read-only DICOMweb of the spool: QIDO-RS search and WADO-RS retrieve (PS3.18 §10.4, §10.6).

Enough for OHIF to open a study RadBridge received together with the SEG/SR it
wrote: QIDO answers from the searchable attributes kept in the index (no file
is opened); metadata is read header-only from the spool, with the pixel data
replaced by a BulkDataURI; frames are cut from the stored pixel data as they
are (``transfer-syntax=*``) or decoded to Explicit VR Little Endian when the
client asks for that. Nothing here writes.
"""

from __future__ import annotations

import functools
import re
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.datadict import tag_for_keyword
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.encaps import generate_frames
from pydicom.pixels import pack_bits, pixel_array, unpack_bits
from pydicom.uid import UID, ExplicitVRBigEndian, ExplicitVRLittleEndian
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from dicom_node._pixels import undecodable_reason
from dicom_node.attributes import STUDY_KEYWORDS, TAGS
from dicom_node.index import Index, StoredInstance

DICOM_JSON = "application/dicom+json"
BULK_THRESHOLD = 1024  # binary values above this go out as BulkDataURIs
#: Media types of compressed frames (PS3.18 Table 8.7.3-2); anything else is octet-stream.
FRAME_MEDIA = {
    "1.2.840.10008.1.2.4.50": "image/jpeg",
    "1.2.840.10008.1.2.4.51": "image/jpeg",
    "1.2.840.10008.1.2.4.57": "image/jpeg",
    "1.2.840.10008.1.2.4.70": "image/jpeg",
    "1.2.840.10008.1.2.4.80": "image/jls",
    "1.2.840.10008.1.2.4.81": "image/jls",
    "1.2.840.10008.1.2.4.90": "image/jp2",
    "1.2.840.10008.1.2.4.91": "image/jp2",
    "1.2.840.10008.1.2.4.201": "image/jphc",
    "1.2.840.10008.1.2.4.202": "image/jphc",
    "1.2.840.10008.1.2.4.203": "image/jphc",
}
_TAG_RE = re.compile(r"^[0-9A-Fa-f]{8}$")
_QUERY_CONTROL = {"limit", "offset", "includefield", "fuzzymatching"}


class NotFound(Exception):
    """The addressed study, series, instance, frame or attribute is not in the spool."""


class NotAcceptable(Exception):
    """The frame cannot be served in the transfer syntax asked for (it cannot be decoded): 406."""


def _json_error(code: int, message: str) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=code)


# -- QIDO-RS ------------------------------------------------------------------------------
def _query_terms(request: Request) -> tuple[dict[str, str], int, int, bool]:
    """Attribute filters (keyed by 8-hex tag), limit, offset and fuzzymatching from the query string."""
    terms: dict[str, str] = {}
    limit, offset, fuzzy = 0, 0, False
    for key, value in request.query_params.multi_items():
        lower = key.lower()
        if lower == "limit":
            limit = max(0, int(value)) if value.isdigit() else 0
        elif lower == "offset":
            offset = max(0, int(value)) if value.isdigit() else 0
        elif lower == "fuzzymatching":
            fuzzy = value.strip().lower() == "true"
        elif lower in _QUERY_CONTROL:
            continue
        else:
            tag = key.upper() if _TAG_RE.match(key) else None
            if tag is None:
                number = tag_for_keyword(key)
                tag = f"{number:08X}" if number is not None else None
            if tag is not None and value != "":
                terms[tag] = value
    return terms, limit, offset, fuzzy


def _values(doc: dict[str, Any], tag: str) -> list[str]:
    element = doc.get(tag) or {}
    out = []
    for v in element.get("Value", []):
        out.append(v.get("Alphabetic", "") if isinstance(v, dict) else str(v))
    return out


@functools.lru_cache(maxsize=256)
def _wildcard(pattern: str, fold: bool) -> re.Pattern[str]:
    """PS3.4 C.2.2.2.4: '*' any run of characters, '?' any one; every other character literal
    (fnmatch's "[...]" classes are not DICOM's)."""
    body = "".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern)
    return re.compile(body, re.DOTALL | (re.IGNORECASE if fold else 0))


def _person_name(value: str) -> str:
    """Trailing empty components are not significant ("Doe^Jane^^" is "Doe^Jane")."""
    return value.rstrip("^ ")


def _matches(doc: dict[str, Any], terms: dict[str, str], fuzzy: bool = False) -> bool:
    """PS3.4 C.2.2.2 matching, as much as a small archive needs: UID lists, wildcards, date ranges.

    Values match exactly (with '*'/'?'), case-sensitively, except person names, which match
    regardless of case (C.2.2.2.1 allows it for PN). ``fuzzy`` (QIDO-RS ``fuzzymatching=true``,
    which OHIF sends): a person name matches as a prefix, and other text regardless of case."""
    for tag, wanted in terms.items():
        have = _values(doc, tag)
        vr = (doc.get(tag) or {}).get("vr", "")
        if tag not in doc:
            if tag in TAGS.values():
                return False  # a searchable attribute the instance lacks: no match
            continue  # not searchable here: ignored (PS3.18 allows it)
        if vr == "UI":
            options = {u.strip() for u in re.split(r"[,\\]", wanted) if u.strip()}
            if not options & set(have):
                return False
        elif vr in ("DA", "TM", "DT") and "-" in wanted:
            low, high = wanted.split("-", 1)
            if not any((not low or v >= low) and (not high or v <= high) for v in have):
                return False
        else:
            options = [w.strip() for w in wanted.split(",")] if vr == "CS" else [wanted]
            if vr == "PN":
                have = [_person_name(v) for v in have]
                options = [_person_name(o) + ("*" if fuzzy else "") for o in options]
            fold = fuzzy or vr == "PN"
            if not any(_wildcard(pattern, fold).fullmatch(v) for v in have for pattern in options):
                return False
    return True


def _page(items: list[dict[str, Any]], limit: int, offset: int) -> list[dict[str, Any]]:
    items = items[offset:]
    return items[:limit] if limit else items


def _element(vr: str, *values: Any) -> dict[str, Any]:
    return {"vr": vr, "Value": list(values)} if values else {"vr": vr}


# -- matching, shared by QIDO-RS and the C-FIND/C-MOVE SCP (dicom_node.query) ----------------
def study_matches(index: Index, terms: dict[str, str], fuzzy: bool = False) -> list[dict[str, Any]]:
    """Study-level DICOM JSON of every study matching ``terms`` (8-hex tag -> QIDO value), with
    ModalitiesInStudy and the numbers of related series and instances."""
    terms = dict(terms)
    modalities = terms.pop(f"{tag_for_keyword('ModalitiesInStudy'):08X}", "")
    wanted = {m.strip().upper() for m in re.split(r"[,\\]", modalities) if m.strip()}
    out = []
    for study in index.search_studies():
        doc = {TAGS[k]: study.attributes[TAGS[k]] for k in STUDY_KEYWORDS if TAGS[k] in study.attributes}
        doc[TAGS["StudyInstanceUID"]] = _element("UI", study.study_instance_uid)
        if not _matches(doc, terms, fuzzy):
            continue
        if wanted and not wanted & set(study.modalities):
            continue
        doc["00080061"] = _element("CS", *study.modalities)
        doc["00201206"] = _element("IS", study.series)
        doc["00201208"] = _element("IS", study.instances)
        out.append(doc)
    return out


def series_matches(
    index: Index, study_uid: str, terms: dict[str, str], fuzzy: bool = False
) -> list[dict[str, Any]]:
    """Series-level DICOM JSON of the series of one study matching ``terms``."""
    out = []
    for series in index.search_series(study_uid):
        doc = {k: v for k, v in series.attributes.items() if k not in _instance_tags()}
        doc[TAGS["StudyInstanceUID"]] = _element("UI", study_uid)
        doc[TAGS["SeriesInstanceUID"]] = _element("UI", series.series_instance_uid)
        if not _matches(doc, terms, fuzzy):
            continue
        doc["00201209"] = _element("IS", series.instances)
        out.append(doc)
    return out


def instance_matches(
    index: Index, study_uid: str, series_uid: str | None, terms: dict[str, str], fuzzy: bool = False
) -> list[tuple[StoredInstance, dict[str, Any]]]:
    """The instances of one study (or series) matching ``terms``, each with its DICOM JSON."""
    out = []
    for inst in index.search_instances(study_uid, series_uid):
        doc = dict(inst.attributes)
        if _matches(doc, terms, fuzzy):
            out.append((inst, doc))
    return out


class DicomWeb:
    """The read-only DICOMweb routes over one index; ``root`` is the public URL prefix."""

    def __init__(self, index: Index, root: str = "/dicom-web") -> None:
        self.index = index
        self.root = root.rstrip("/")

    def base_url(self, request: Request) -> str:
        """Absolute root for RetrieveURL/BulkDataURI, from the Host header as Orthanc does.

        dicomweb-client sends ``Host`` without the port; then the port we listen on is used.
        """
        base = request.base_url
        server = request.scope.get("server") or (None, None)
        if base.port is None and server[1] not in (None, 80, 443):
            base = base.replace(port=server[1])
        return str(base).rstrip("/") + self.root

    def routes(self) -> list[Route]:
        r = self.root
        return [
            Route(f"{r}/studies", self.search_studies, methods=["GET"]),
            Route(f"{r}/studies/{{study}}/series", self.search_series, methods=["GET"]),
            Route(f"{r}/studies/{{study}}/instances", self.search_instances, methods=["GET"]),
            Route(
                f"{r}/studies/{{study}}/series/{{series}}/instances", self.search_instances, methods=["GET"]
            ),
            Route(f"{r}/studies/{{study}}/metadata", self.metadata, methods=["GET"]),
            Route(f"{r}/studies/{{study}}/series/{{series}}/metadata", self.metadata, methods=["GET"]),
            Route(
                f"{r}/studies/{{study}}/series/{{series}}/instances/{{instance}}/metadata",
                self.metadata,
                methods=["GET"],
            ),
            Route(f"{r}/studies/{{study}}", self.retrieve, methods=["GET"]),
            Route(f"{r}/studies/{{study}}/series/{{series}}", self.retrieve, methods=["GET"]),
            Route(
                f"{r}/studies/{{study}}/series/{{series}}/instances/{{instance}}",
                self.retrieve,
                methods=["GET"],
            ),
            Route(
                f"{r}/studies/{{study}}/series/{{series}}/instances/{{instance}}/frames/{{frames}}",
                self.frames,
                methods=["GET"],
            ),
            Route(
                f"{r}/studies/{{study}}/series/{{series}}/instances/{{instance}}/bulk/{{tag:path}}",
                self.bulk,
                methods=["GET"],
            ),
        ]

    # -- QIDO ------------------------------------------------------------------------
    async def search_studies(self, request: Request) -> Response:
        terms, limit, offset, fuzzy = _query_terms(request)
        base = self.base_url(request)
        out = study_matches(self.index, terms, fuzzy)
        for doc in out:
            doc["00081190"] = _element("UR", f"{base}/studies/{doc[TAGS['StudyInstanceUID']]['Value'][0]}")
        return JSONResponse(_page(out, limit, offset), media_type=DICOM_JSON)

    async def search_series(self, request: Request) -> Response:
        terms, limit, offset, fuzzy = _query_terms(request)
        study_uid = request.path_params["study"]
        base = self.base_url(request)
        out = series_matches(self.index, study_uid, terms, fuzzy)
        for doc in out:
            series_uid = doc[TAGS["SeriesInstanceUID"]]["Value"][0]
            doc["00081190"] = _element("UR", f"{base}/studies/{study_uid}/series/{series_uid}")
        return JSONResponse(_page(out, limit, offset), media_type=DICOM_JSON)

    async def search_instances(self, request: Request) -> Response:
        terms, limit, offset, fuzzy = _query_terms(request)
        study_uid = request.path_params["study"]
        base = self.base_url(request)
        out = []
        series = request.path_params.get("series")
        for inst, doc in instance_matches(self.index, study_uid, series, terms, fuzzy):
            doc["00081190"] = _element(
                "UR",
                f"{base}/studies/{study_uid}/series/{inst.series_instance_uid}/instances/{inst.sop_instance_uid}",
            )
            out.append(doc)
        return JSONResponse(_page(out, limit, offset), media_type=DICOM_JSON)

    # -- WADO --------------------------------------------------------------------------
    def _instances(self, request: Request) -> list[StoredInstance]:
        p = request.path_params
        found = self.index.search_instances(p["study"], p.get("series"), p.get("instance"))
        if not found:
            raise NotFound("No such study, series or instance in this archive.")
        return found

    async def metadata(self, request: Request) -> Response:
        try:
            instances = self._instances(request)
        except NotFound as exc:
            return _json_error(404, str(exc))
        base = self.base_url(request)
        docs = [_metadata(inst, base) for inst in instances]
        return JSONResponse(docs, media_type=DICOM_JSON)

    async def retrieve(self, request: Request) -> Response:
        """Whole instances as stored, multipart/related; type="application/dicom"."""
        try:
            instances = self._instances(request)
        except NotFound as exc:
            return _json_error(404, str(exc))
        if not _accepts_dicom(request.headers.get("accept", "")):
            return _json_error(406, 'Instances are served as multipart/related; type="application/dicom".')
        boundary = uuid.uuid4().hex
        parts = (
            (("application/dicom", inst.transfer_syntax_uid), _file_chunks(inst.path)) for inst in instances
        )
        return StreamingResponse(
            _multipart(parts, boundary),
            media_type=f'multipart/related; type="application/dicom"; boundary={boundary}',
        )

    async def frames(self, request: Request) -> Response:
        try:
            (inst,) = self._instances(request)
            numbers = [int(n) for n in request.path_params["frames"].split(",")]
        except NotFound as exc:
            return _json_error(404, str(exc))
        except ValueError:
            return _json_error(400, "Frame numbers must be a comma-separated list of integers.")
        wanted = _requested_syntaxes(request.headers.get("accept", ""))
        try:
            frames = [_frame(inst, n, wanted) for n in numbers]
        except NotFound as exc:
            return _json_error(404, str(exc))
        except NotAcceptable as exc:
            return _json_error(406, str(exc))
        boundary = uuid.uuid4().hex
        parts = (((media, syntax), iter([data])) for media, syntax, data in frames)
        first = frames[0][0] if frames else "application/octet-stream"
        return StreamingResponse(
            _multipart(parts, boundary), media_type=f'multipart/related; type="{first}"; boundary={boundary}'
        )

    async def bulk(self, request: Request) -> Response:
        try:
            (inst,) = self._instances(request)
            value = _element_at(pydicom.dcmread(inst.path), request.path_params["tag"]).value
        except NotFound as exc:
            return _json_error(404, str(exc))
        except ValueError:
            return _json_error(400, "The bulk data address must be hexadecimal tags and item numbers.")
        data = value if isinstance(value, bytes) else bytes(value or b"")
        boundary = uuid.uuid4().hex
        parts = iter([(("application/octet-stream", ""), iter([data]))])
        return StreamingResponse(
            _multipart(parts, boundary),
            media_type=f'multipart/related; type="application/octet-stream"; boundary={boundary}',
        )


def _accepts_dicom(accept: str) -> bool:
    """Whether an Accept header admits multipart/related; type="application/dicom" (PS3.18 8.7.5)."""
    if not accept.strip():
        return True
    for media_range in accept.split(","):
        media, *params = (p.strip() for p in media_range.split(";"))
        media = media.lower()
        kinds = [p.split("=", 1)[1].strip('"').lower() for p in params if p.lower().startswith("type=")]
        if media in ("*/*", "multipart/*", "application/dicom") or (
            media == "multipart/related" and kinds in ([], ["application/dicom"])
        ):
            return True
    return False


def _instance_tags() -> set[str]:
    return {
        TAGS[k]
        for k in ("SOPClassUID", "SOPInstanceUID", "InstanceNumber", "Rows", "Columns", "NumberOfFrames")
    }


def _metadata(inst: StoredInstance, base: str) -> dict[str, Any]:
    """Full header as DICOM JSON; binary values (pixel data included) by BulkDataURI."""
    ds = pydicom.dcmread(inst.path, stop_before_pixels=True)
    url = f"{base}/studies/{inst.study_instance_uid}/series/{inst.series_instance_uid}/instances/{inst.sop_instance_uid}"

    doc = _to_json(ds, f"{url}/bulk/")
    if "Rows" in ds:  # pixel data was not read; point at it
        compressed = UID(inst.transfer_syntax_uid).is_compressed
        vr = "OB" if compressed or int(ds.get("BitsAllocated", 16)) <= 8 else "OW"
        doc["7FE00010"] = {"vr": vr, "BulkDataURI": f"{url}/bulk/7FE00010"}
    doc["00020010"] = _element("UI", inst.transfer_syntax_uid)  # lets clients pick a decoder
    return doc


def _to_json(ds: Dataset, prefix: str) -> dict[str, Any]:
    """DICOM JSON whose BulkDataURIs carry the element's path (``00880200/0/7FE00010`` for an
    icon's pixel data), so a nested binary value is addressable, not mistaken for a top-level one."""
    doc: dict[str, Any] = {}
    for element in ds:
        tag = f"{element.tag:08X}"
        if element.VR == "SQ":
            items = [_to_json(item, f"{prefix}{tag}/{i}/") for i, item in enumerate(element.value or [])]
            doc[tag] = {"vr": "SQ", "Value": items} if items else {"vr": "SQ"}
            continue

        def bulk_uri(e: DataElement, where: str = f"{prefix}{tag}") -> str:
            return where

        doc[tag] = element.to_json_dict(bulk_uri, BULK_THRESHOLD)
    return doc


def _element_at(ds: Dataset, path: str) -> DataElement:
    """The element addressed by a BulkDataURI path: tag(/item/tag)*."""
    parts = path.strip("/").split("/")
    if len(parts) % 2 != 1 or not all(_TAG_RE.match(p) for p in parts[::2]):
        raise ValueError(path)
    current: Dataset = ds
    for i in range(0, len(parts) - 1, 2):
        tag, item = int(parts[i], 16), int(parts[i + 1])
        if tag not in current or current[tag].VR != "SQ" or not 0 <= item < len(current[tag].value):
            raise NotFound("No such attribute in the instance.")
        current = current[tag].value[item]
    tag = int(parts[-1], 16)
    if tag not in current:
        raise NotFound("No such attribute in the instance.")
    return current[tag]


def _requested_syntaxes(accept: str) -> set[str]:
    """The transfer syntaxes the Accept header allows: '*' for any (as stored), else UIDs; none
    named means Explicit VR Little Endian (PS3.18 8.7.3.5)."""
    found = set(re.findall(r"transfer-syntax\s*=\s*\"?([0-9.*]+)\"?", accept))
    return found or {str(ExplicitVRLittleEndian)}


def _frame(inst: StoredInstance, number: int, wanted: set[str]) -> tuple[str, str, bytes]:
    """(media type, transfer syntax, bytes) of frame ``number`` (1-based): as stored, or decoded
    to Explicit VR Little Endian; any other syntax asked for alone is NotAcceptable (406), never
    answered in a syntax the client did not accept."""
    ds = pydicom.dcmread(inst.path)
    if "PixelData" not in ds:
        raise NotFound("The instance has no pixel data.")
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if not 1 <= number <= frames:
        raise NotFound(f"Frame {number} does not exist (the instance has {frames}).")
    syntax = UID(inst.transfer_syntax_uid)
    as_stored = "*" in wanted or str(syntax) in wanted
    if not as_stored and str(ExplicitVRLittleEndian) not in wanted:
        raise NotAcceptable(
            f"Frames are served as stored ({syntax}) or as Explicit VR Little Endian "
            f"(1.2.840.10008.1.2.1), not in {', '.join(sorted(wanted))}."
        )
    if syntax.is_compressed:
        if as_stored:
            data = next(_nth(generate_frames(ds.PixelData, number_of_frames=frames), number - 1))
            return FRAME_MEDIA.get(str(syntax), "application/octet-stream"), str(syntax), data
        reason = undecodable_reason(ds, syntax)
        if reason is not None:
            raise NotAcceptable(f"{reason} Ask for transfer-syntax=* to get the frame as stored.")
        try:
            array = pixel_array(inst.path, index=number - 1, raw=True)
        except Exception as exc:  # corrupt or unsupported compressed data from a peer
            raise NotAcceptable(
                f"The frame cannot be decoded ({type(exc).__name__}); ask for transfer-syntax=* to get it as stored."
            ) from exc
        return "application/octet-stream", str(ExplicitVRLittleEndian), np.ascontiguousarray(array).tobytes()
    if syntax == ExplicitVRBigEndian and int(ds.BitsAllocated) > 8:  # served little endian
        array = pixel_array(inst.path, index=number - 1, raw=True)
        little = array.astype(array.dtype.newbyteorder("<"), copy=False)
        return "application/octet-stream", str(ExplicitVRLittleEndian), np.ascontiguousarray(little).tobytes()
    rows, cols = int(ds.Rows), int(ds.Columns)
    samples, bits = int(ds.get("SamplesPerPixel", 1)), int(ds.BitsAllocated)
    pixels = rows * cols * samples
    if bits == 1:  # BINARY SEG: frames are bit-packed back to back, not byte aligned
        flat = unpack_bits(ds.PixelData)[(number - 1) * pixels : number * pixels]
        data = pack_bits(flat)
    else:
        size = pixels * bits // 8
        data = bytes(ds.PixelData[(number - 1) * size : number * size])
    return "application/octet-stream", str(ExplicitVRLittleEndian), data


def _nth(it: Iterator[bytes], n: int) -> Iterator[bytes]:
    for i, item in enumerate(it):
        if i == n:
            yield item
            return


def _file_chunks(path: Path, size: int = 1024 * 1024) -> Iterator[bytes]:
    with open(path, "rb") as fh:
        while chunk := fh.read(size):
            yield chunk


def _multipart(parts: Iterable[tuple[tuple[str, str], Iterable[bytes]]], boundary: str) -> Iterator[bytes]:
    """multipart/related body: each part's Content-Type carries its transfer syntax if known."""
    for (media, syntax), chunks in parts:
        header = f"Content-Type: {media}" + (f"; transfer-syntax={syntax}" if syntax else "")
        yield f"--{boundary}\r\n{header}\r\n\r\n".encode()
        yield from chunks
        yield b"\r\n"
    yield f"--{boundary}--\r\n".encode()
