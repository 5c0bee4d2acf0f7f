"""The generation engine against plain ``generate``, on tiny float32 checkpoints of every HF backend.

Each comparison records the scores at every step on both paths (a logits processor
that changes nothing) as well as the tokens: the tiny random models repeat
tokens, so equal scores are the stronger proof.
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import LogitsProcessor

from inference_service.backends._hf import HFBackend
from inference_service.backends.base import ModelConfig, WorkItem
from inference_service.backends.llava import LlavaBackend
from inference_service.backends.medgemma import MedGemmaBackend, PreparedImage
from inference_service.backends.paligemma import PaliGemmaBackend
from inference_service.errors import Cancelled, DeadlineExceeded, InvalidInput
from inference_service.generation import GenRequest, Sampling
from inference_service.generation.cache import SLIDING
from inference_service.scheduler import Scheduler
from inference_service.types import AnalysisSpec, Geometry, TaskKind, Volume
from tests.unit.inference_service.tiny_checkpoints import (
    build_llava,
    build_medgemma,
    build_paligemma,
    force_output,
)

pytestmark = pytest.mark.filterwarnings(
    "ignore::DeprecationWarning", "ignore::FutureWarning", "ignore::UserWarning"
)

BUILDERS = {"medgemma": (build_medgemma, MedGemmaBackend), "paligemma": (build_paligemma, PaliGemmaBackend),
            "llava": (build_llava, LlavaBackend)}  # fmt: skip
PROMPTS = ["Describe the image.", "Is there a nodule? Answer yes or no, then explain.", "Write a report."]
ENGINE = {"engine_slots": 4, "engine_max_length": 256, "engine_chunk": 16, "max_new_tokens": 100}


class Record(LogitsProcessor):
    """Keeps a copy of the scores at every step; returns them unchanged."""

    def __init__(self, pause_s: float = 0.0, reached: threading.Event | None = None, at: int = 0) -> None:
        self.scores: list[torch.Tensor] = []
        self.pause_s, self.reached, self.at = pause_s, reached, at

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self.scores.append(scores.detach().clone())
        if self.reached is not None and len(self.scores) >= self.at:
            self.reached.set()
        if self.pause_s:
            time.sleep(self.pause_s)
        return scores


def _images(n: int, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 255, (28, 28, 3), dtype=np.uint8)) for _ in range(n)]


def _inputs(backend: HFBackend, images: list[Image.Image], prompts: list[str]) -> dict[str, Any]:
    if isinstance(backend, PaliGemmaBackend):
        return dict(backend.processor(text=prompts, images=images, return_tensors="pt", padding=True))
    return dict(backend.build_inputs([PreparedImage([im], None) for im in images], prompts))  # type: ignore[attr-defined]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("engine")
    return {name: build(root / name) for name, (build, _) in BUILDERS.items()}


@pytest.fixture(scope="module", params=list(BUILDERS))
def backend(request: pytest.FixtureRequest, checkpoints: dict[str, Path]) -> Iterator[HFBackend]:
    name = request.param
    b = BUILDERS[name][1](ModelConfig(name, name, checkpoints[name], options=dict(ENGINE)))
    b.load()
    yield b
    b.close()


@pytest.fixture(scope="module")
def medgemma(checkpoints: dict[str, Path]) -> Iterator[MedGemmaBackend]:
    b = MedGemmaBackend(ModelConfig("mg", "medgemma", checkpoints["medgemma"], options=dict(ENGINE)))
    b.load()
    yield b
    b.close()


def _plain(backend: HFBackend, inputs: dict[str, Any], limit: int) -> tuple[list[int], list[torch.Tensor]]:
    """One request alone through transformers' generate, with its scores recorded."""
    record = Record()
    saved, backend.logits_processors = backend.logits_processors, [record]
    try:
        (ids,) = backend._plain_generate(inputs, limit)
    finally:
        backend.logits_processors = saved
    return ids.tolist(), record.scores


def _request(backend: HFBackend, inputs: dict[str, Any], limit: int, **kw: Any) -> GenRequest:
    """The engine request backend.generate makes of a one-row input, with fields replaced."""
    (request,) = backend.engine_requests(inputs, limit)
    return dataclasses.replace(request, **kw)


def test_engine_equals_plain_generate_token_for_token(backend: HFBackend) -> None:
    images, limit = _images(3), 40
    batch = _inputs(backend, images, PROMPTS)
    records = [Record() for _ in PROMPTS]
    backend.logits_processors = []
    futures = []
    for row, (image, prompt) in enumerate(zip(images, PROMPTS, strict=True)):
        single = _inputs(backend, [image], [prompt])
        futures.append(
            backend.engine.submit(_request(backend, single, limit, logits_processors=[records[row]]))
        )
    got = [f.result(timeout=120) for f in futures]
    for row, (image, prompt) in enumerate(zip(images, PROMPTS, strict=True)):
        tokens, scores = _plain(backend, _inputs(backend, [image], [prompt]), limit)
        assert got[row] == tokens, f"row {row}"
        assert len(records[row].scores) == len(scores)
        for step, (ours, theirs) in enumerate(zip(records[row].scores, scores, strict=True)):
            torch.testing.assert_close(ours, theirs, atol=2e-5, rtol=1e-4, msg=f"row {row} step {step}")
    # and the backend's batched path (left-padded batch split into requests) gives the same tokens
    backend.generate(batch, limit)
    assert [t.tolist() for t in backend.last_generated_ids] == got


def test_sliding_window_ring_wraps_and_stays_exact(medgemma: MedGemmaBackend) -> None:
    """Gemma 3's local layers keep a ring of window + chunk - 1 entries; a long answer wraps it."""
    cache = medgemma.engine.cache
    inputs = _inputs(medgemma, _images(1, seed=3), ["Write a long report."])
    limit = 150
    assert cache.capacity[SLIDING] < inputs["input_ids"].shape[1] + limit  # the ring must wrap
    record = Record()
    got = medgemma.engine.submit(_request(medgemma, inputs, limit, logits_processors=[record])).result(60)
    tokens, scores = _plain(medgemma, inputs, limit)
    assert got == tokens
    for ours, theirs in zip(record.scores, scores, strict=True):
        torch.testing.assert_close(ours, theirs, atol=2e-5, rtol=1e-4)


def test_requests_join_and_leave_a_running_batch(medgemma: MedGemmaBackend) -> None:
    engine = medgemma.engine
    long_in = _inputs(medgemma, _images(1, seed=1), [PROMPTS[2]])
    short_in = [_inputs(medgemma, _images(1, seed=s), [p]) for s, p in ((2, PROMPTS[0]), (4, PROMPTS[1]))]
    reached = threading.Event()
    steps_before = engine.stats["decode_steps"]
    rows_before = engine.stats["decode_rows"]
    long_run = engine.submit(
        _request(medgemma, long_in, 80, logits_processors=[Record(pause_s=0.01, reached=reached, at=5)])
    )
    assert reached.wait(30)
    shorts = [engine.submit(_request(medgemma, s, n)) for s, n in zip(short_in, (3, 8), strict=True)]
    short_tokens = [f.result(timeout=30) for f in shorts]
    assert not long_run.done(), "the short answers left while the long one was still running"
    long_tokens = long_run.result(timeout=60)
    assert long_tokens == _plain(medgemma, long_in, 80)[0]
    for got, inputs, n in zip(short_tokens, short_in, (3, 8), strict=True):
        assert got == _plain(medgemma, inputs, n)[0]
    steps = engine.stats["decode_steps"] - steps_before
    rows = engine.stats["decode_rows"] - rows_before
    assert rows > steps, "the short requests shared decode steps with the long one"


def test_image_prefix_is_shared_between_tasks(medgemma: MedGemmaBackend) -> None:
    engine = medgemma.engine
    image = _images(1, seed=11)
    stats = dict(engine.stats)
    prompts = [PROMPTS[0], PROMPTS[1], "Locate nodules in this chest X-ray."]
    requests = [_request(medgemma, _inputs(medgemma, image, [p]), 12) for p in prompts]
    got = [f.result(60) for f in [engine.submit(r) for r in requests]]
    assert engine.stats["images_encoded"] - stats["images_encoded"] == 1
    assert engine.stats["prefills"] - stats["prefills"] == 1
    later = engine.submit(_request(medgemma, _inputs(medgemma, image, ["What is shown?"]), 12)).result(60)
    assert engine.stats["prefix_hits"] - stats["prefix_hits"] >= 1
    assert engine.stats["prefills"] - stats["prefills"] == 1
    for p, tokens in zip([*prompts, "What is shown?"], [*got, later], strict=True):
        assert tokens == _plain(medgemma, _inputs(medgemma, image, [p]), 12)[0]


def test_paligemma_shares_the_vision_tower_not_the_prefix(checkpoints: dict[str, Path]) -> None:
    """PaliGemma's image tokens attend to the prompt (prefix-LM): only the image features are shared."""
    b = PaliGemmaBackend(ModelConfig("pg", "paligemma", checkpoints["paligemma"], options=dict(ENGINE)))
    b.load()
    try:
        image = _images(1, seed=5)
        requests = [_request(b, _inputs(b, image, [p]), 6) for p in ("detect nodule", "segment nodule")]
        got = [f.result(60) for f in [b.engine.submit(r) for r in requests]]
        assert b.engine.stats["images_encoded"] == 1 and b.engine.stats["prefills"] == 2
        for p, tokens in zip(("detect nodule", "segment nodule"), got, strict=True):
            assert tokens == _plain(b, _inputs(b, image, [p]), 6)[0]
    finally:
        b.close()


def test_cancel_stops_a_request_and_frees_its_slot(medgemma: MedGemmaBackend) -> None:
    engine = medgemma.engine
    cancel, reached = threading.Event(), threading.Event()
    inputs = _inputs(medgemma, _images(1, seed=7), [PROMPTS[2]])
    future = engine.submit(
        _request(medgemma, inputs, 100, cancel=cancel,
                 logits_processors=[Record(pause_s=0.01, reached=reached, at=3)])
    )  # fmt: skip
    assert reached.wait(30)
    cancel.set()
    with pytest.raises(Cancelled):
        future.result(timeout=30)
    deadline = time.monotonic() + 5
    while len(engine._free) != engine.settings.slots and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(engine._free) == engine.settings.slots
    after = engine.submit(_request(medgemma, inputs, 20)).result(30)
    assert after == _plain(medgemma, inputs, 20)[0]


def test_deadlines_are_per_request(medgemma: MedGemmaBackend) -> None:
    engine = medgemma.engine
    inputs = _inputs(medgemma, _images(1, seed=8), [PROMPTS[0]])
    with pytest.raises(DeadlineExceeded):
        engine.submit(_request(medgemma, inputs, 10, deadline=time.monotonic() - 1)).result(30)
    slow = _request(medgemma, inputs, 200, deadline=time.monotonic() + 0.2,
                    logits_processors=[Record(pause_s=0.01)])  # fmt: skip
    other = engine.submit(_request(medgemma, inputs, 10))
    with pytest.raises(DeadlineExceeded):
        engine.submit(slow).result(30)
    assert other.result(30) == _plain(medgemma, inputs, 10)[0]


def test_sampling_is_seeded_and_top_k_one_is_greedy(medgemma: MedGemmaBackend) -> None:
    engine = medgemma.engine
    inputs = _inputs(medgemma, _images(1, seed=9), [PROMPTS[1]])
    greedy = engine.submit(_request(medgemma, inputs, 15)).result(30)
    top1 = engine.submit(_request(medgemma, inputs, 15, sampling=Sampling(temperature=1.0, top_k=1))).result(
        30
    )
    assert top1 == greedy
    hot = Sampling(temperature=5.0, top_p=0.95, seed=7)
    first = engine.submit(_request(medgemma, inputs, 15, sampling=hot)).result(30)
    second = engine.submit(_request(medgemma, inputs, 15, sampling=hot)).result(30)
    assert first == second
    vocab = medgemma.model.config.get_text_config().vocab_size
    assert all(0 <= t < vocab for t in first)


def test_prompts_longer_than_the_cache_use_plain_generate(checkpoints: dict[str, Path]) -> None:
    options = {**ENGINE, "engine_max_length": 64}
    b = MedGemmaBackend(ModelConfig("mg-short", "medgemma", checkpoints["medgemma"], options=options))
    b.load()
    try:
        inputs = _inputs(b, _images(1), [PROMPTS[1]])
        with pytest.raises(InvalidInput, match="maximum length 64"):
            b.engine.submit(_request_raw(inputs, 40))
        text = b.generate(inputs, 40)
        assert b.engine.stats["requests"] == 0
        engine, b.engine = b.engine, None
        assert b.generate(inputs, 40) == text
        b.engine = engine
    finally:
        b.close()


def _request_raw(inputs: dict[str, Any], limit: int) -> GenRequest:
    return GenRequest(inputs["input_ids"][0].tolist(), limit, frozenset({1}))


def _cxr(seed: int) -> Volume:
    rng = np.random.default_rng(seed)
    g = Geometry((1, 64, 48), (0, 0.2, 0.2), (1, 0, 0, 0, 1, 0), (0, 0, 0), "CR", rescaled=False)
    return Volume(rng.integers(0, 4096, size=(1, 64, 48)).astype(np.float32), g)


def test_scheduler_lanes_of_one_model_share_the_engine_batch(medgemma: MedGemmaBackend) -> None:
    """Report and VQA requests, from different lanes, decode in the same steps; results as run alone."""
    engine = medgemma.engine
    force_output(medgemma, "Findings: clear lungs. Impression: normal.", "<end_of_turn>")  # no early end
    items = [
        (WorkItem(_cxr(i), AnalysisSpec("mg", (task,), question="Is the heart enlarged?")), task)
        for i, task in enumerate([TaskKind.REPORT, TaskKind.VQA, TaskKind.REPORT, TaskKind.VQA])
    ]

    async def run_all() -> list[Any]:
        scheduler = Scheduler(max_batch=4, batch_wait_ms=5)
        try:
            return await asyncio.gather(*(scheduler.submit(medgemma, item, task) for item, task in items))
        finally:
            await scheduler.close()

    steps, rows = engine.stats["decode_steps"], engine.stats["decode_rows"]
    together = asyncio.run(run_all())
    assert engine.stats["decode_rows"] - rows > engine.stats["decode_steps"] - steps
    alone = [medgemma.run([item], task)[0] for item, task in items]
    medgemma.logits_processors = []
    assert [r.raw_output for r in together] == [r.raw_output for r in alone]
    assert together[0].report is not None and together[1].answer.startswith("Findings")


def test_classification_runs_on_the_engine_thread(medgemma: MedGemmaBackend) -> None:
    seen: list[str] = []
    hook = medgemma.model.register_forward_pre_hook(lambda *a: seen.append(threading.current_thread().name))
    try:
        item = WorkItem(_cxr(0), AnalysisSpec("mg", (TaskKind.CLASSIFY,), labels=("nodule",)))
        (result,) = medgemma.run([item], TaskKind.CLASSIFY)
    finally:
        hook.remove()
    assert seen and set(seen) == {"generation-engine"}
    assert 0.0 <= result.findings[0].score <= 1.0


def test_a_prompt_that_fails_its_prefill_fails_alone(medgemma: MedGemmaBackend) -> None:
    engine = medgemma.engine
    reached = threading.Event()
    good_in = _inputs(medgemma, _images(1, seed=12), [PROMPTS[0]])
    good = engine.submit(
        _request(medgemma, good_in, 30, logits_processors=[Record(pause_s=0.01, reached=reached, at=3)])
    )
    assert reached.wait(30)
    bad = _request(medgemma, _inputs(medgemma, _images(1, seed=13), [PROMPTS[1]]), 10)
    bad = dataclasses.replace(
        bad, pixel_values=torch.cat([bad.pixel_values, bad.pixel_values]), image_keys=()
    )
    with pytest.raises(ValueError, match="[Ii]mage"):
        engine.submit(bad).result(30)
    assert good.result(30) == _plain(medgemma, good_in, 30)[0]


def test_decode_through_the_graphs_static_buffers_stays_exact(medgemma: MedGemmaBackend) -> None:
    """The CUDA-graph path without the capture: each bucket's static tensors are refilled in place
    and the step runs on them. Requests of different lengths join and leave; tokens as plain."""
    from inference_service.generation import Engine, EngineSettings

    engine = Engine(medgemma.model, EngineSettings(slots=4, max_length=256, chunk=16, static_steps=True))
    try:
        inputs = [_inputs(medgemma, _images(1, seed=20 + i), [p]) for i, p in enumerate(PROMPTS)]
        limits = (25, 5, 60)
        reached = threading.Event()
        first = engine.submit(
            _request(
                medgemma,
                inputs[2],
                limits[2],
                logits_processors=[Record(pause_s=0.005, reached=reached, at=4)],
            )
        )
        assert reached.wait(30)
        others = [
            engine.submit(_request(medgemma, x, n)) for x, n in zip(inputs[:2], limits[:2], strict=True)
        ]
        got = [f.result(60) for f in others] + [first.result(60)]
        assert engine.graphs is not None and len(engine.graphs) == len(engine.batch_buckets) * len(
            engine.width_buckets
        )
        assert engine.stats["graph_replays"] == engine.stats["decode_steps"] > 0
        assert engine.stats["graph_captures"] == 0  # nothing is captured without CUDA
    finally:
        engine.stop()
    for tokens, x, n in zip(
        got, [inputs[0], inputs[1], inputs[2]], (limits[0], limits[1], limits[2]), strict=True
    ):
        assert tokens == _plain(medgemma, x, n)[0]


def test_a_slot_is_freed_once_even_if_a_request_is_finished_twice(medgemma: MedGemmaBackend) -> None:
    """A request that ended at its first token and then sits in a failed prefill round must not
    hand its slot back twice (two later requests would share it)."""
    from concurrent.futures import Future

    from inference_service.generation import Engine, EngineSettings
    from inference_service.generation.engine import _Running

    engine = Engine(medgemma.model, EngineSettings(slots=3, max_length=128, chunk=16))
    run = _Running(GenRequest([1, 2, 3], 4, frozenset()), Future())
    run.slot = engine._free.pop(0)
    engine._running[run.slot] = run
    engine._finish(run)
    engine._finish(run, RuntimeError("the prefill round failed"))
    assert sorted(engine._free) == [0, 1, 2] and run.future.result() == []
