"""The interface every backend implements.

A backend declares its capabilities (tasks x modalities), loads its model from
a local path (or needs none), and turns a batch of prepared inputs into typed
results. The server owns queueing, batching, devices and deadlines.
"""

from __future__ import annotations

import abc
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from inference_service.types import AnalysisSpec, ModelIdentity, TaskKind, TaskResult, Volume

ProgressCallback = Callable[[float, str], None]


@dataclass(frozen=True)
class ModelConfig:
    """One entry of the model registry (``[models.<name>]`` in the config)."""

    name: str
    backend: str
    path: Path | None = None
    dtype: str = "auto"
    device: str = "auto"
    preprocess: str = ""
    prompts: dict[str, str] = field(default_factory=dict)
    labels: dict[str, list[str]] = field(default_factory=dict)  # label -> [code, scheme, meaning]
    options: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class WorkItem:
    """One volume and what to do with it: the unit a batch is made of."""

    volume: Volume
    spec: AnalysisSpec
    #: Set by the scheduler when the caller goes away; a running generation stops at its next step.
    cancel: threading.Event | None = field(default=None, compare=False)
    #: time.monotonic() by which the caller needs the answer (the gRPC deadline), or None.
    deadline: float | None = None


class Backend(abc.ABC):
    """A model and its pre/post-processing."""

    #: Registry name of the backend type, e.g. "reference".
    kind: str = ""
    #: Most work items per ``run`` call (memory-bound models, e.g. 3D CT); 0: the scheduler's limit.
    max_batch: int = 0

    def __init__(self, config: ModelConfig) -> None:
        self.config = config

    @property
    @abc.abstractmethod
    def tasks(self) -> frozenset[TaskKind]:
        """Tasks this backend can do."""

    @property
    @abc.abstractmethod
    def modalities(self) -> frozenset[str]:
        """DICOM modalities this backend accepts."""

    @property
    @abc.abstractmethod
    def identity(self) -> ModelIdentity:
        """Name, version and weights checksum, carried in every result."""

    def load(self) -> None:  # noqa: B027 - optional hook; weight-free backends need nothing
        """Load weights from the configured local path; raise CheckpointError if bad."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Stop what the backend runs beside its model (the generation engine's thread)."""

    @property
    def continuous(self) -> bool:
        """True when ``run`` calls may overlap: the backend batches across them itself (the engine)."""
        return False

    @property
    def concurrency(self) -> int:
        """How many ``run`` calls the scheduler may have in flight for this model."""
        return 1

    @abc.abstractmethod
    def run(
        self,
        batch: Sequence[WorkItem],
        task: TaskKind,
        progress: ProgressCallback | None = None,
    ) -> list[TaskResult]:
        """Run one task on a batch; return one result per item, in order."""
