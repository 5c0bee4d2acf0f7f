"""Configured checkpoints through the registry, the gRPC server and the node's client."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest

from dicom_node.client import InferenceClient, make_spec
from dicom_node.volume import SeriesVolume
from inference_service.backends.registry import ModelRegistry
from inference_service.config import settings_from
from inference_service.server import run_server
from radbridge.cli import main
from radbridge_common.settings import read_layers
from tests.unit.inference_service.tiny_checkpoints import build_medgemma, force_output

pytestmark = pytest.mark.filterwarnings(
    "ignore::DeprecationWarning", "ignore::FutureWarning", "ignore::UserWarning"
)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_medgemma(tmp_path_factory.mktemp("mg") / "medgemma-tiny")


def _config(tmp_path: Path, checkpoint: Path) -> Path:
    cfg = tmp_path / "models.toml"
    cfg.write_text(
        f"""
[inference_service]
port = 0
default_model = "reference"

[models.reference]
backend = "reference"

[models.medgemma-tiny]
backend = "medgemma"
path = "{checkpoint}"
options = {{ max_new_tokens = 80, version = "tiny-1" }}
labels = {{ "pleural effusion" = ["60046008", "SCT", "Pleural effusion"] }}
prompts = {{ report = "Report on this {{modality}} image." }}
"""
    )
    return cfg


def test_radbridge_models_lists_configured_checkpoints(tmp_path: Path, checkpoint: Path, capsys) -> None:  # noqa: ANN001
    assert main(["models", "--config", str(_config(tmp_path, checkpoint))]) == 0
    out = capsys.readouterr().out
    line = next(ln for ln in out.splitlines() if ln.startswith("medgemma-tiny"))
    assert "backend=medgemma" in line and "version=tiny-1" in line
    assert "report" in line and "detect" in line and "classify" in line and "vqa" in line


def test_missing_weights_fail_at_start_up_naming_the_file(tmp_path: Path, checkpoint: Path, capsys) -> None:  # noqa: ANN001
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(checkpoint, broken)
    (broken / "model.safetensors").unlink()
    cfg = _config(tmp_path, broken)
    assert main(["models", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "cannot start" in err and "model.safetensors" in err


async def test_grpc_round_trip_with_a_vlm(tmp_path: Path, checkpoint: Path) -> None:
    settings = settings_from(read_layers(_config(tmp_path, checkpoint), {}))
    registry = ModelRegistry.load(settings)
    backend = registry.get("medgemma-tiny")
    force_output(backend, "Findings: Small effusion.\nImpression: Effusion.", "<end_of_turn>")
    running = await run_server(settings, registry)
    try:
        img = np.random.default_rng(0).integers(0, 4000, (1, 120, 90)).astype(np.float32)
        volume = SeriesVolume(
            img, (0, 0.2, 0.2), (1, 0, 0, 0, 1, 0), (0, 0, 0), "CR", False, "CHEST", None, []
        )
        client = InferenceClient(f"127.0.0.1:{running.port}")
        progress: list[str] = []
        outcome = await asyncio.to_thread(
            client.analyze,
            volume,
            make_spec(["report"], model="medgemma-tiny"),
            lambda p: progress.append(p.message),
        )
        client.close()
    finally:
        await running.stop(0)
    assert outcome.result.model.name == "medgemma-tiny" and outcome.result.model.version == "tiny-1"
    assert len(outcome.result.model.weights_sha256) == 64
    (task,) = outcome.result.tasks
    assert task.report.findings == "Small effusion." and task.report.impression == "Effusion."
    assert task.prompt_id.startswith("medgemma-tiny:report:")
    assert progress  # progress events reached the client


async def test_a_model_on_several_devices_serves_from_each_copy(tmp_path: Path, checkpoint: Path) -> None:
    """``devices`` loads one copy (and engine) per device; concurrent work is spread over the copies."""
    from inference_service.backends.base import WorkItem
    from inference_service.backends.replicas import ReplicatedBackend
    from inference_service.scheduler import Scheduler
    from inference_service.types import AnalysisSpec, Geometry, TaskKind, Volume

    cfg = _config(tmp_path, checkpoint)
    cfg.write_text(cfg.read_text().replace('path = "', 'devices = ["cpu", "cpu"]\npath = "'))
    registry = ModelRegistry.load(settings_from(read_layers(cfg, {})))
    backend = registry.get("medgemma-tiny")
    assert isinstance(backend, ReplicatedBackend) and len(backend.replicas) == 2
    assert backend.continuous and backend.concurrency == sum(r.engine.settings.slots for r in backend.replicas)
    for replica in backend.replicas:
        force_output(replica, "Findings: Clear.\nImpression: Normal.", "<end_of_turn>")
    geometry = Geometry((1, 64, 48), (0, 0.2, 0.2), (1, 0, 0, 0, 1, 0), (0, 0, 0), "CR", rescaled=False)
    rng = np.random.default_rng(1)
    items = [WorkItem(Volume(rng.integers(0, 4000, (1, 64, 48)).astype(np.float32), geometry),
                      AnalysisSpec("medgemma-tiny", (TaskKind.REPORT,))) for _ in range(6)]  # fmt: skip
    scheduler = Scheduler(max_batch=4, batch_wait_ms=5)
    try:
        results = await asyncio.gather(*(scheduler.submit(backend, i, TaskKind.REPORT) for i in items))
    finally:
        await scheduler.close()
        registry.close()
    assert all(r.report is not None and r.report.impression == "Normal." for r in results)
    assert all(n > 0 for n in backend.served), backend.served
    assert all(r.engine.stats["requests"] > 0 for r in backend.replicas)


def test_the_same_gpu_twice_is_a_config_error(tmp_path: Path, checkpoint: Path) -> None:
    cfg = _config(tmp_path, checkpoint)
    cfg.write_text(cfg.read_text().replace('path = "', 'devices = ["cuda:0", "cuda:0"]\npath = "'))
    with pytest.raises(ValueError, match="GPU twice"):
        settings_from(read_layers(cfg, {}))
