"""The committed gRPC stubs must equal a fresh protoc run over protos/."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]


def _codegen():
    spec = importlib.util.spec_from_file_location("gen_protos", ROOT / "scripts" / "gen_protos.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_committed_stubs_match_proto_sources(tmp_path: Path) -> None:
    pytest.importorskip("grpc_tools", reason="grpcio-tools (test extra) is needed to regenerate stubs")
    gen = _codegen()
    gen.generate(tmp_path)
    fresh = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*_pb2*.py*"))
    assert fresh, "protoc produced no stubs"
    for rel in fresh:
        committed = ROOT / rel
        assert committed.exists(), f"{rel} is not committed; run python scripts/gen_protos.py"
        assert committed.read_text() == (tmp_path / rel).read_text(), (
            f"{rel} differs from its .proto; run python scripts/gen_protos.py"
        )


def test_proto_follows_api_style() -> None:
    from protos.radbridge.v1 import inference_pb2 as pb

    assert pb.DESCRIPTOR.package == "radbridge.v1"
    for enum in pb.DESCRIPTOR.enum_types_by_name.values():
        assert enum.values[0].number == 0 and enum.values[0].name.endswith("UNSPECIFIED")
    service = pb.DESCRIPTOR.services_by_name["InferenceService"]
    analyze = service.methods_by_name["AnalyzeVolume"]
    assert analyze.client_streaming and analyze.server_streaming
    assert analyze.input_type.name == "AnalyzeVolumeRequest"
    assert analyze.output_type.name == "AnalyzeVolumeResponse"
