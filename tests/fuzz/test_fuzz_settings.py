"""Fuzz the TOML loader: generated config files and RADBRIDGE_* variables -> settings or ConfigError.

Documents are built from the settings dataclasses themselves (known sections and
keys, values of the right type most of the time, of any TOML type otherwise,
unknown keys, nesting where a scalar belongs), plus raw bytes that are not TOML
or not UTF-8. Loading the node's NodeSettings and the inference service's
ServiceSettings must give a frozen settings object or a ConfigError (a
ValueError) whose message names a key of the input or says the file is not
valid TOML; any other exception would be a start-up crash with a traceback.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import math
import shutil
import tempfile
import types
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from dicom_node import config as node_config
from inference_service import config as service_config
from radbridge_common.settings import ConfigError, read_layers
from tests.fuzz import count_input, examples

pytestmark = [pytest.mark.fuzz, pytest.mark.timeout(240)]

_SCALARS = st.one_of(
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.integers(min_value=-5, max_value=70000),
    st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(),
    st.text(max_size=20),
    st.sampled_from(
        ["", "0", "-1", "true", "RADBRIDGE", "x" * 17, "[1,2", "{}", "http://pacs/dicom-web", "a\\b"]
    ),
    st.datetimes(min_value=dt.datetime(1, 1, 1), max_value=dt.datetime(9999, 1, 1)),
)
_ANY = st.recursive(
    _SCALARS,
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3)
    ),
    max_leaves=6,
)


def _typed(tp: Any) -> st.SearchStrategy[Any]:
    """Values of a settings field's type (what a careful operator writes), recursively."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return st.one_of(*(_typed(a) for a in typing.get_args(tp) if a is not type(None)))
    if dataclasses.is_dataclass(tp):
        return _tables(tp)
    if origin in (list, tuple):
        (inner, *_) = typing.get_args(tp) or (Any,)
        return st.lists(_typed(inner), max_size=3)
    if origin is dict:
        _, inner = typing.get_args(tp)
        return st.dictionaries(st.text(alphabet="abcxyz", min_size=1, max_size=6), _typed(inner), max_size=2)
    simple = {
        int: st.integers(min_value=-2, max_value=100_000),
        float: st.floats(min_value=-1, max_value=1000, allow_nan=False),
        bool: st.booleans(),
        str: st.sampled_from(
            ["", "reference", "CT", "RADBRIDGE", "segment", "http://127.0.0.1:8042/dicom-web", "auto"]
        ),
        Path: st.sampled_from(["/tmp/x", "relative/dir", ""]),
    }
    return simple.get(tp, _ANY)


def _tables(cls: type) -> st.SearchStrategy[dict[str, Any]]:
    """A table for dataclass ``cls``: a few of its keys, typed two times in three; sometimes an unknown key."""
    hints = typing.get_type_hints(cls)
    fields = {
        f.name: st.one_of(_typed(hints[f.name]), _typed(hints[f.name]), _ANY) for f in dataclasses.fields(cls)
    }
    # A few keys per table (small documents: generating is the cost here, not loading).
    known = st.lists(st.sampled_from(sorted(fields)), max_size=3, unique=True).flatmap(
        lambda names: st.fixed_dictionaries({n: fields[n] for n in names})
    )
    return st.one_of(known, known, st.builds(lambda d, k, v: {**d, k: v}, known, st.text(max_size=10), _ANY))


_SECTION_TABLES = {
    f.name: _typed(typing.get_type_hints(cls)[f.name])
    for cls in (node_config.NodeSettings, service_config.ServiceSettings)
    for f in dataclasses.fields(cls)
}
#: A whole document: the node's and the service's sections, typed or not, plus stray sections.
DOCUMENTS = st.one_of(
    st.lists(st.sampled_from(sorted(_SECTION_TABLES)), max_size=3, unique=True).flatmap(
        lambda names: st.fixed_dictionaries({n: _SECTION_TABLES[n] for n in names})
    ),
    st.dictionaries(
        st.sampled_from([*node_config.SECTIONS, *service_config.SECTIONS, "other"]), _ANY, max_size=3
    ),
)
#: RADBRIDGE_<SECTION>__<KEY> overrides: strings only, as the environment holds.
ENVIRONS = st.dictionaries(
    st.builds(
        lambda parts: "RADBRIDGE_" + "__".join(parts),
        st.lists(
            st.one_of(
                st.sampled_from([s.upper() for s in (*node_config.SECTIONS, *service_config.SECTIONS)]),
                st.sampled_from(
                    ["PORT", "AE_TITLE", "MAX_PDU", "RULES", "TARGETS", "MODELS", "THREADS", "X"]
                ),
            ),
            min_size=1,
            max_size=3,
        ),
    ),
    st.one_of(
        st.text(max_size=12), st.sampled_from(["1", "true", "[", '["a"]', "{", '{"a": 1}', "nan", "1e999"])
    ),
    max_size=2,
)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return (
            "nan"
            if math.isnan(value)
            else ("inf" if value > 0 else "-inf")
            if math.isinf(value)
            else repr(value)
        )
    if isinstance(value, dt.datetime):
        return value.isoformat()
    if isinstance(value, str):
        return json.dumps(value)  # a TOML basic string (JSON escapes are TOML escapes)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return "{" + ", ".join(f"{json.dumps(k)} = {_toml_value(v)}" for k, v in value.items()) + "}"


def to_toml(doc: dict[str, Any]) -> str:
    """Top-level tables as [section] headers, everything deeper inline."""
    lines = []
    for section, table in doc.items():
        if isinstance(table, dict):
            lines.append(f"[{json.dumps(section)}]")
            lines += [f"{json.dumps(k)} = {_toml_value(v)}" for k, v in table.items()]
        else:
            lines.insert(0, f"{json.dumps(section)} = {_toml_value(table)}")
    return "\n".join(lines) + "\n"


def _names(doc: Any, environ: dict[str, str]) -> set[str]:
    """Every key of the input, at any depth, and every part of every variable's name."""
    names: set[str] = set()

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                names.add(str(k))
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(doc)
    for key in environ:
        names.add(key)
        names.update(p.lower() for p in key[len("RADBRIDGE_") :].split("__"))
    return {n for n in names if n}


@pytest.fixture(scope="module")
def workdir() -> Iterator[Path]:
    shm = Path("/dev/shm")
    root = Path(tempfile.mkdtemp(prefix="radbridge-fuzz-settings-", dir=shm if shm.is_dir() else None))
    yield root
    shutil.rmtree(root, ignore_errors=True)


def _load_both(path: Path, environ: dict[str, str], names: set[str] | None) -> str:
    """Load the node's and the service's settings; return the outcome, or fail on a wrong exception."""
    outcomes = []
    for settings_from, cls in (
        (node_config.settings_from, node_config.NodeSettings),
        (service_config.settings_from, service_config.ServiceSettings),
    ):
        try:
            loaded = settings_from(read_layers(path, environ))
        except ConfigError as exc:
            message = str(exc)
            assert message
            if names is not None and "not valid TOML" not in message:
                assert any(n in message for n in names), f"{message!r} names no key of the input"
            outcomes.append("ConfigError")
            continue
        assert isinstance(loaded, cls)
        with pytest.raises(dataclasses.FrozenInstanceError):
            loaded.__setattr__(dataclasses.fields(cls)[0].name, None)
        outcomes.append("settings")
    return "/".join(outcomes)


@settings(max_examples=examples(3000))
@given(doc=DOCUMENTS, environ=ENVIRONS)
@example(doc={"scp": {"port": float("inf")}}, environ={})  # int(inf): OverflowError escaped
@example(doc={"inference_service": {"tls_cert_file": 5, "tls_key_file": 5}}, environ={})  # Path(5): TypeError
def test_documents_give_settings_or_a_config_error_naming_a_key(
    workdir: Path, doc: dict[str, Any], environ: dict[str, str]
) -> None:
    path = workdir / "radbridge.toml"
    path.write_text(to_toml(doc), encoding="utf-8", errors="surrogatepass")
    count_input("settings.toml", _load_both(path, environ, _names(doc, environ)))


@settings(max_examples=examples(2000))
@given(
    data=st.one_of(
        st.binary(max_size=200), st.text(max_size=200).map(lambda t: t.encode("utf-8", "surrogatepass"))
    )
)
@example(data=b"\xff\xfe[scp]\n")  # not UTF-8: UnicodeDecodeError escaped
@example(data=b"a = " + b"[" * 2000 + b"]" * 2000)  # deep nesting
def test_raw_bytes_give_settings_or_a_config_error(workdir: Path, data: bytes) -> None:
    path = workdir / "raw.toml"
    path.write_bytes(data)
    count_input("settings.raw", _load_both(path, {}, None))
