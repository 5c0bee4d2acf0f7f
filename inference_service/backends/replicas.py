"""One model on several devices in one service: the scheduler sees one backend, calls go to the least busy.

``[models.X] devices = ["cuda:0", "cuda:1"]`` loads one copy of the model (and its
generation engine) per device. Why in the service and not one service per GPU:
one port, one queue and one set of lanes per model; a model that fits one GPU
serves twice the work on two. Past one machine, run a service per machine and
list them in the node's ``[inference] addresses`` (dicom_node.replicas).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

from inference_service.backends.base import Backend, ModelConfig, ProgressCallback, WorkItem
from inference_service.types import ModelIdentity, TaskKind, TaskResult


class ReplicatedBackend(Backend):
    """Copies of one backend on several devices, each run call on the copy with the fewest in flight."""

    def __init__(self, config: ModelConfig, replicas: Sequence[Backend]) -> None:
        super().__init__(config)
        if not replicas:
            raise ValueError("ReplicatedBackend needs at least one replica.")
        self.replicas = list(replicas)
        self.kind = replicas[0].kind
        self.max_batch = replicas[0].max_batch
        self._lock = threading.Lock()
        self._in_flight = [0] * len(self.replicas)
        #: Run calls served by each replica (tests, metrics).
        self.served = [0] * len(self.replicas)

    @property
    def tasks(self) -> frozenset[TaskKind]:
        return self.replicas[0].tasks

    @property
    def modalities(self) -> frozenset[str]:
        return self.replicas[0].modalities

    @property
    def identity(self) -> ModelIdentity:
        return self.replicas[0].identity

    @property
    def continuous(self) -> bool:
        return all(r.continuous for r in self.replicas)

    @property
    def concurrency(self) -> int:
        return sum(r.concurrency for r in self.replicas)

    def load(self) -> None:
        for replica in self.replicas:
            replica.load()

    def close(self) -> None:
        for replica in self.replicas:
            replica.close()

    def run(
        self, batch: Sequence[WorkItem], task: TaskKind, progress: ProgressCallback | None = None
    ) -> list[TaskResult]:
        with self._lock:
            index = min(range(len(self.replicas)), key=lambda i: (self._in_flight[i], self.served[i]))
            self._in_flight[index] += 1
            self.served[index] += 1
        try:
            return self.replicas[index].run(batch, task, progress)
        finally:
            with self._lock:
                self._in_flight[index] -= 1
