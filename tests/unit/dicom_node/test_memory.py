"""The analyses' shared memory pool: wait while others hold it, refuse only what can never fit."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from dicom_node.config import WorkerSection
from dicom_node.errors import VolumeTooLarge
from dicom_node.memory import ANALYSIS_MEMORY_FACTOR, MemoryBudget, MemoryWaitInterrupted
from dicom_node.volume import read_series

CT_VOXEL_BYTES = 24 * 512 * 512 * 2  # small_ct_files: 24 slices of 512 x 512 int16


def _in_thread(target: object) -> tuple[threading.Thread, list[BaseException]]:
    errors: list[BaseException] = []

    def run() -> None:
        try:
            target()  # type: ignore[operator]
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            errors.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, errors


def test_a_second_volume_waits_until_the_first_analysis_gives_its_memory_back(
    small_ct_files: list[Path],
) -> None:
    pool = MemoryBudget(int(1.5 * CT_VOXEL_BYTES * ANALYSIS_MEMORY_FACTOR))  # one CT at a time
    waits: list[tuple[int, int]] = []
    first_read, release_first = threading.Event(), threading.Event()
    order: list[str] = []

    def first() -> None:
        with pool.admission() as admit:
            read_series(small_ct_files, max_voxel_bytes=pool.max_voxel_bytes(), admit=admit)
            order.append("first read")
            first_read.set()
            release_first.wait(10)
            order.append("first done")

    def second() -> None:
        with pool.admission(lambda needed, held: waits.append((needed, held))) as admit:
            volume = read_series(small_ct_files, max_voxel_bytes=pool.max_voxel_bytes(), admit=admit)
            order.append("second read")
            assert volume.voxels.shape == (24, 512, 512)

    t1, e1 = _in_thread(first)
    assert first_read.wait(10)
    t2, e2 = _in_thread(second)
    deadline = time.monotonic() + 10
    while not waits:
        assert time.monotonic() < deadline, "the second analysis did not wait"
        time.sleep(0.01)
    time.sleep(0.1)
    assert order == ["first read"]  # still waiting: nothing of the second volume was read
    release_first.set()
    t1.join(10)
    t2.join(10)
    assert not e1 and not e2
    assert order == ["first read", "first done", "second read"]
    assert waits == [(CT_VOXEL_BYTES * ANALYSIS_MEMORY_FACTOR,) * 2]  # needed, held by the first
    assert pool.held_bytes == 0


def test_two_volumes_that_fit_together_do_not_wait(small_ct_files: list[Path]) -> None:
    pool = MemoryBudget(2 * CT_VOXEL_BYTES * ANALYSIS_MEMORY_FACTOR)
    with pool.admission(lambda *_: pytest.fail("waited")) as a, pool.admission(lambda *_: pytest.fail("waited")) as b:
        read_series(small_ct_files, max_voxel_bytes=pool.max_voxel_bytes(), admit=a)
        read_series(small_ct_files, max_voxel_bytes=pool.max_voxel_bytes(), admit=b)
        assert pool.held_bytes == pool.total_bytes
    assert pool.held_bytes == 0


def test_a_volume_larger_than_the_whole_pool_is_refused_before_reading(small_ct_files: list[Path]) -> None:
    pool = MemoryBudget(CT_VOXEL_BYTES * ANALYSIS_MEMORY_FACTOR - 1)
    with pool.admission() as admit, pytest.raises(VolumeTooLarge, match="worker.memory_budget_bytes"):
        read_series(small_ct_files, max_voxel_bytes=pool.max_voxel_bytes(), admit=admit)
    assert pool.held_bytes == 0


def test_memory_is_given_back_when_the_analysis_fails(small_ct_files: list[Path]) -> None:
    pool = MemoryBudget(CT_VOXEL_BYTES * ANALYSIS_MEMORY_FACTOR)
    with pytest.raises(RuntimeError, match="inference failed"), pool.admission() as admit:
        read_series(small_ct_files, max_voxel_bytes=pool.max_voxel_bytes(), admit=admit)
        assert pool.held_bytes == pool.total_bytes
        raise RuntimeError("inference failed")
    assert pool.held_bytes == 0


def test_stopping_the_node_wakes_a_waiting_analysis_with_a_retryable_error() -> None:
    pool = MemoryBudget(100)
    with pool.admission() as holder:
        holder(30)  # 90 bytes of the 100 held
        waiting = threading.Event()

        def blocked() -> None:
            with pool.admission(lambda *_: waiting.set()) as admit:
                admit(30)

        thread, errors = _in_thread(blocked)
        assert waiting.wait(10)
        pool.close()
        thread.join(10)
    assert not thread.is_alive()
    (error,) = errors
    assert isinstance(error, MemoryWaitInterrupted) and error.retryable
    assert pool.held_bytes == 0


def test_no_budget_means_no_limit() -> None:
    pool = MemoryBudget(0)
    with pool.admission(lambda *_: pytest.fail("waited")) as admit:
        admit(10**15)
    assert pool.max_voxel_bytes() == 0 and pool.held_bytes == 0


def test_the_default_pool_is_shared_by_the_threads_not_divided(monkeypatch: pytest.MonkeyPatch) -> None:
    """24 GB and 2 threads: a 4 GB CT (x3 = 12 GB) fits the pool; a per-thread share of 6 GB refused it."""
    pages = {"SC_PAGE_SIZE": 4096, "SC_PHYS_PAGES": 24 * 10**9 // 4096}
    monkeypatch.setattr("dicom_node.config.os.sysconf", lambda name: pages[name])
    budget = MemoryBudget(WorkerSection(threads=2).analysis_budget_bytes())
    assert budget.total_bytes == pytest.approx(0.6 * 24e9, rel=1e-3)
    assert budget.max_voxel_bytes() > 4 * 1024**3
    assert WorkerSection(memory_budget_bytes=123).analysis_budget_bytes() == 123
