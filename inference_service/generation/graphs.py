"""The decode step captured as CUDA graphs, one per (batch, length) bucket.

Measured on an H100 (FIELD-NOTES, "GPU serving"): the eager step is bound by
Python and kernel launches (57 ms at batch 1 for a 4B model); the same step
captured by hand with ``torch.cuda.CUDAGraph`` and replayed took 9.7 ms, and
captured in well under a second, where ``torch.compile`` needed ~100 s per
shape. So: every bucket is captured once at start-up (warm-up is timed and
logged), steady state only copies the new tokens and positions into the static
inputs and replays — nothing is captured or compiled while serving.

A bucket that fails to capture is left to the eager step (logged), so a model
or driver that graphs do not suit still serves.

Without CUDA (``capture=False``) the same static buffers are filled and the step
runs eagerly on them: the CPU tests exercise exactly the bookkeeping a replay
depends on (in-place copies, shared index tensors), everything but the capture.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from inference_service.generation.cache import Step

if TYPE_CHECKING:
    from inference_service.generation.engine import Engine

logger = logging.getLogger(__name__)


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph | None  # None: static buffers only, the step runs eagerly
    step: Step
    logits: torch.Tensor | None


class DecodeGraphs:
    """Captured decode steps of one engine."""

    def __init__(self, engine: Engine, capture: bool = True) -> None:
        self.engine = engine
        self.capture = capture
        self._graphs: dict[tuple[int, int], _Graph] = {}
        self._pool: object | None = None
        self.failed: list[tuple[int, int]] = []

    def __len__(self) -> int:
        return len(self._graphs)

    def capture_all(self) -> None:
        for batch in self.engine.batch_buckets:
            for width in self.engine.width_buckets:
                self._capture(batch, width)

    @torch.inference_mode()
    def _capture(self, batch: int, width: int) -> None:
        device = self.engine.device
        index = torch.zeros((batch, 1), dtype=torch.long, device=device)
        step = Step(
            input_ids=torch.zeros((batch, 1), dtype=torch.long, device=device),
            positions=index + self.engine.position_offset,
            write_slot=torch.arange(batch, device=device)[:, None].clone(),
            write_index=index,
            query_index=index,
            end=torch.ones(batch, dtype=torch.long, device=device),
            last=torch.zeros(batch, dtype=torch.long, device=device),
            rows=None,
            width=width,
        )
        if not self.capture:
            self._graphs[(batch, width)] = _Graph(None, step, None)
            return
        try:
            side = torch.cuda.Stream(device)
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):
                for _ in range(2):  # warm-up outside the capture (allocator, lazy kernels)
                    self.engine.forward(step)
            torch.cuda.current_stream(device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
                logits = self.engine.forward(step)
            self._pool = graph.pool()
        except RuntimeError as exc:
            self.failed.append((batch, width))
            logger.warning(
                "decode graph capture failed; this bucket runs eagerly",
                extra={
                    "event": "engine.graph_failed",
                    "batch": batch,
                    "width": width,
                    "error": str(exc)[:200],
                },
            )
            return
        self._graphs[(batch, width)] = _Graph(graph, step, logits)
        self.engine.stats["graph_captures"] += 1

    def run(self, batch: int, width: int, ids: torch.Tensor, index: torch.Tensor) -> torch.Tensor | None:
        """Replay the bucket's graph on new tokens ([batch, 1]) at ``index``; None if not captured."""
        entry = self._graphs.get((batch, width))
        if entry is None:
            return None
        step = entry.step
        index = index.to(step.write_index.device, non_blocking=True)
        step.input_ids.copy_(ids, non_blocking=True)
        step.write_index.copy_(index)  # also the query index: the same tensor
        step.positions.copy_(index + self.engine.position_offset)
        step.end.copy_(index[:, 0] + 1)
        if entry.graph is None:
            return self.engine.forward(step)
        entry.graph.replay()
        return entry.logits
