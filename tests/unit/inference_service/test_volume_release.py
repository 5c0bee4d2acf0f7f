"""The service lets go of a study's arrays as soon as it is done with them.

A lane of the scheduler must not keep its last batch (and so the last study's volume) alive
while it waits for the next request, and sending masks must free each one before the next.
"""

from __future__ import annotations

import asyncio
import gc
import weakref

import numpy as np

from inference_service.assembly import mask_chunks, pack_mask
from inference_service.backends.base import ModelConfig, WorkItem
from inference_service.backends.reference import ReferenceBackend
from inference_service.scheduler import Scheduler
from inference_service.types import AnalysisSpec, Code, Geometry, Mask, TaskKind, Volume
from radbridge.synth import phantom_hu


def test_scheduler_lane_does_not_keep_the_last_volume() -> None:
    async def scenario() -> tuple[bool, int]:
        scheduler = Scheduler(batch_wait_ms=1)
        backend = ReferenceBackend(ModelConfig("reference", "reference"))
        hu = phantom_hu(4)
        g = Geometry(hu.shape, (2.5, 0.7, 0.7), (1, 0, 0, 0, 1, 0), (0, 0, 0), "CT")
        volume = Volume(hu, g)
        voxels = weakref.ref(hu)
        result = await scheduler.submit(
            backend, WorkItem(volume, AnalysisSpec("", (TaskKind.SEGMENT,))), TaskKind.SEGMENT
        )
        del volume, hu
        await asyncio.sleep(0.05)  # the lane is back waiting for work
        gc.collect()
        alive = voxels() is not None
        await scheduler.close()
        return alive, len(result.masks)

    alive, masks = asyncio.run(scenario())
    assert masks == 3
    assert not alive, "the scheduler (or the backend's memo) still holds the volume"


def test_mask_chunks_count_and_release_each_mask() -> None:
    rng = np.random.default_rng(1)
    code = Code("1", "X", "x")
    voxels = [rng.random((3, 9, 7)) > 0.5 for _ in range(3)]  # 189 voxels: a partial last byte
    masks = [Mask(i + 1, f"m{i}", code, code, (0, 0, 0), v) for i, v in enumerate(voxels)]
    packed = {m.segment_number: pack_mask(m) for m in masks}
    refs = [weakref.ref(m) for m in masks]
    pending = list(masks)
    del masks
    counts: dict[int, int] = {}
    received: dict[int, bytearray] = {}
    for i, msg in enumerate(mask_chunks(pending, chunk_bytes=5, counts=counts)):
        chunk = msg.mask_chunk
        received.setdefault(chunk.segment_number, bytearray()).extend(chunk.data)
        if i == 0:
            gc.collect()
            assert refs[0]() is None and refs[1]() is not None  # the first sent, freed; the rest held
    assert not pending
    assert {k: bytes(v) for k, v in received.items()} == packed
    assert counts == {i + 1: int(np.count_nonzero(v)) for i, v in enumerate(voxels)}
