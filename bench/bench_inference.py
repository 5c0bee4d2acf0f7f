"""Generation throughput on one GPU: plain transformers ``generate`` against the continuous-batching
engine, for the real-size MedGemma-4B, PaliGemma-3B and MedSigLIP-448 architectures (random weights).

No weights are downloaded: each architecture is built from its published sizes with random bf16
weights and wrapped in RadBridge's backend. Tokenizers and processors are the unit tests' offline
ones (character-level, so a CXR report prompt is ~380 tokens, 256 of them image tokens, where the
real tokenizer gives ~290). Every generation emits exactly its token count (plain ``generate``
through ForcedTokens, engine requests with ``ignore_eos``), so both paths do the same work, and every
request (in section 3 every study) has an image of its own, so no cache hit comes from a repeat. One
table per section:

1. MedGemma-4B CXR reports of --tokens tokens: plain ``generate`` one at a time and batched, the
   engine with 1/8/32/64 requests in flight; reports/s, wall ms per decode step, ratios to plain
   ``generate``, and the fraction of the bandwidth limit (each decode step reads the language model's
   weights and the batch's KV cache once, at --hbm-tb-s).
2. Open loop: Poisson arrivals at --rate reports/s for --duration s against the engine: throughput,
   p50/p95 latency.
3. Mixed study: report + VQA + classify + detect of one image, the four submitted at once through the
   scheduler; studies/s with and without the engine, and the engine's image encodes and prefills per
   study (report, VQA and detect share the image prefix).
4. PaliGemma-3B detect and segment (--pali-tokens output tokens: prefill-bound) through the scheduler.
5. Vision: SigLIP-896 (MedGemma's tower) and MedSigLIP-448 images/s, MedSigLIP classification
   through its backend.
6. Engines: CUDA-graph warm-up at start-up, and graph captures during the timed runs (must be 0).

Sections 1-2 time the model only (inputs are built before the clock starts); 3-5 go through the
backends, CPU preprocessing of a --source-px square CXR included.

    python bench/bench_inference.py [--tokens 200] [--rate 10] [--duration 20] [--hbm-tb-s 3.0]
    python bench/bench_inference.py --smoke   # tiny checkpoints on the CPU: every code path, no measurement
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import gc
import itertools
import os
import platform
import random
import shlex
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
import torch
import transformers
from PIL import Image

from inference_service.backends._hf import ForcedTokens
from inference_service.backends.base import ModelConfig, WorkItem
from inference_service.backends.medgemma import PROMPTS, MedGemmaBackend, PreparedImage
from inference_service.backends.paligemma import PaliGemmaBackend
from inference_service.backends.siglip import SiglipBackend
from inference_service.generation import Engine, EngineSettings
from inference_service.generation.engine import image_key
from inference_service.scheduler import Scheduler
from inference_service.types import AnalysisSpec, Geometry, TaskKind, Volume
from tests.unit.inference_service.tiny_checkpoints import (
    GEMMA_CHAT,
    build_medgemma,
    build_paligemma,
    build_siglip,
    gemma_tokenizer,
    write_random_npz,
)

REPORT, VQA, CLASSIFY, DETECT, SEGMENT = (
    TaskKind.REPORT, TaskKind.VQA, TaskKind.CLASSIFY, TaskKind.DETECT, TaskKind.SEGMENT,
)  # fmt: skip
QUESTION = "Is there a pleural effusion? Answer in one sentence."
FINDING = "nodule"
LABELS = ("pneumothorax", "pleural effusion", "nodule", "cardiomegaly", "consolidation")
#: Smaller counts for --smoke (tiny checkpoints on the CPU); flags given on the command line still win.
SMOKE = {
    "tokens": 3, "plain_requests": 2, "plain_batches": [2, 4], "engine_batches": [1, 2, 4], "rounds": 1,
    "rate": 4.0, "duration": 1.0, "studies": 2, "micro_batch": 4, "mixed_tokens": [3, 2, 2],
    "pali_requests": 4, "pali_tokens": 2, "source_px": 64, "vision_batch": 2, "siglip_batch": 4,
    "vision_repeats": 1,
}  # fmt: skip
#: Every image the bench makes is new (its own seed): no engine cache hit comes from a repeat.
_SEEDS = itertools.count(1)


# -- real-size architectures -----------------------------------------------------------------------
def medgemma_4b_parts() -> tuple[Any, Any]:
    """The offline Gemma 3 processor at 896 px (left padding) and the real-size MedGemma-4B config."""
    from transformers import Gemma3Processor
    from transformers.models.gemma3 import Gemma3ImageProcessorPil

    tok = gemma_tokenizer()
    vocab = tok.get_vocab()
    processor = Gemma3Processor(
        image_processor=Gemma3ImageProcessorPil(size={"height": 896, "width": 896}, do_pan_and_scan=False),
        tokenizer=tok, chat_template=GEMMA_CHAT, image_seq_length=256,
    )  # fmt: skip
    processor.tokenizer.padding_side = "left"
    config = medgemma_4b_config(
        len(tok), vocab["<image_soft_token>"], vocab["<start_of_image>"], vocab["<end_of_image>"]
    )
    return processor, config


def medgemma_4b_config(vocab_size: int, image_token: int, boi: int, eoi: int):  # noqa: ANN201
    """google/medgemma-4b-it: Gemma 3 4B + SigLIP 896 px (the real vocabulary size; ``vocab_size`` unused)."""
    from transformers import Gemma3Config

    return Gemma3Config(
        text_config={
            "vocab_size": 262208, "hidden_size": 2560, "intermediate_size": 10240, "num_hidden_layers": 34,
            "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 256, "sliding_window": 1024,
            "max_position_embeddings": 131072, "rope_theta": 1000000.0, "query_pre_attn_scalar": 256,
        },
        vision_config={
            "hidden_size": 1152, "intermediate_size": 4304, "num_hidden_layers": 27, "num_attention_heads": 16,
            "image_size": 896, "patch_size": 14,
        },
        mm_tokens_per_image=256, image_token_index=image_token, boi_token_index=boi, eoi_token_index=eoi,
    )  # fmt: skip


def paligemma_3b_config(image_token: int, image_size: int):  # noqa: ANN201
    """google/paligemma-3b-pt-224 (or -448): Gemma 2B + SigLIP so400m/14."""
    from transformers import PaliGemmaConfig

    return PaliGemmaConfig(
        text_config={
            "vocab_size": 257216, "hidden_size": 2048, "intermediate_size": 16384, "num_hidden_layers": 18,
            "num_attention_heads": 8, "num_key_value_heads": 1, "head_dim": 256,
        },
        vision_config={
            "hidden_size": 1152, "intermediate_size": 4304, "num_hidden_layers": 27, "num_attention_heads": 16,
            "image_size": image_size, "patch_size": 14, "projection_dim": 2048,
        },
        projection_dim=2048, hidden_size=2048, vocab_size=257216, image_token_index=image_token,
    )  # fmt: skip


def medsiglip_448_config():  # noqa: ANN201
    """MedSigLIP-448 is published as a SigLIP with a 400M vision and a 400M text encoder and 1152-wide
    embeddings; these are SigLIP so400m/14's sizes at 448 px (64 text positions), not its config file."""
    from transformers import SiglipConfig

    so400m = {
        "hidden_size": 1152,
        "intermediate_size": 4304,
        "num_hidden_layers": 27,
        "num_attention_heads": 16,
    }
    return SiglipConfig(
        text_config={**so400m, "vocab_size": 32000, "max_position_embeddings": 64},
        vision_config={**so400m, "image_size": 448, "patch_size": 14},
    )


# -- backends that emit exactly their token count ---------------------------------------------------
class FixedLength:
    """Mixin for the bench: every generation emits exactly ``task_tokens[task]`` tokens (or the limit
    given to ``generate``). Plain ``generate`` is forced to repeat one ordinary token; engine requests
    set ``ignore_eos`` and carry no logits processor (the engine's greedy path)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config)  # type: ignore[call-arg]
        self.task_tokens: dict[TaskKind, int] = {}
        self._task = threading.local()  # the task of the run() call on this thread

    def force_plain(self) -> None:
        token = self.processor.tokenizer.convert_tokens_to_ids("a")  # type: ignore[attr-defined]
        # ForcedTokens([t], t, n) forces t at every step: its "end" token is t itself.
        self.logits_processors = [lambda n: ForcedTokens([token], token, n)]

    def run(self, batch: Sequence[WorkItem], task: TaskKind, progress: Any = None) -> Any:  # noqa: ANN401
        self._task.kind = task
        return super().run(batch, task, progress)  # type: ignore[misc]

    def generate_ids(
        self, inputs: dict[str, Any], max_new_tokens: int | None = None, items: Any = None
    ) -> Any:  # noqa: ANN401
        limit = max_new_tokens or self.task_tokens[self._task.kind]
        return super().generate_ids(inputs, limit, items)  # type: ignore[misc]

    def engine_requests(self, inputs: dict[str, Any], limit: int, items: Any = None) -> list[Any]:  # noqa: ANN401
        requests = super().engine_requests(inputs, limit, items)  # type: ignore[misc]
        return [dataclasses.replace(r, ignore_eos=True, logits_processors=[]) for r in requests]


class BenchMedGemma(FixedLength, MedGemmaBackend):
    pass


class BenchPaliGemma(FixedLength, PaliGemmaBackend):
    pass


def tiny_backend(cls: type, build: Callable[[Path], Path], workdir: Path, **options: Any) -> Any:  # noqa: ANN401
    """A backend on a tiny checkpoint, loaded like production, on the CPU, engine left to the bench."""
    path = build(workdir / cls.kind)
    backend = cls(ModelConfig(name=cls.kind, backend=cls.kind, path=path, device="cpu",
                              options={"engine": False, **options}))  # fmt: skip
    backend.load()
    return backend


def gpu_backend(cls: type, model_class: type, config: Any, processor: Any, **options: Any) -> Any:  # noqa: ANN401
    """A backend around a real-size model with random bf16 weights, built on the GPU."""
    started = time.perf_counter()
    with torch.device("cuda"):
        model = model_class(config).to(torch.bfloat16).eval()
    params = sum(p.numel() for p in model.parameters())
    print(f"built {model_class.__name__}: {params / 1e9:.2f} B params, random bf16, "
          f"{time.perf_counter() - started:.1f} s")  # fmt: skip
    backend = cls(ModelConfig(name=cls.kind, backend=cls.kind, path=Path("/nonexistent"), options=options))
    backend.model, backend.processor, backend.device = model, processor, torch.device("cuda")
    return backend


def medgemma_backend(args: argparse.Namespace) -> BenchMedGemma:
    if args.smoke:
        backend = tiny_backend(BenchMedGemma, build_medgemma, args.workdir)
    else:
        from transformers import Gemma3ForConditionalGeneration

        processor, config = medgemma_4b_parts()
        vocab = processor.tokenizer.get_vocab()
        backend = gpu_backend(BenchMedGemma, Gemma3ForConditionalGeneration, config, processor)
        backend.model.generation_config.eos_token_id = [vocab["<eos>"], vocab["<end_of_turn>"]]
        backend.model.generation_config.pad_token_id = vocab["<pad>"]
    backend.force_plain()
    return backend


def paligemma_backend(args: argparse.Namespace) -> BenchPaliGemma:
    vae = str(write_random_npz(args.workdir / "vae.npz"))  # SEGMENT needs a mask decoder configured
    if args.smoke:
        backend = tiny_backend(BenchPaliGemma, build_paligemma, args.workdir, vae_path=vae)
    else:
        from transformers import AutoProcessor, PaliGemmaForConditionalGeneration

        from inference_service.vqvae import MaskDecoder

        # The tiny checkpoint's processor: its tokenizer with the 1024 <loc> and 128 <seg> tokens.
        path = build_paligemma(args.workdir / "paligemma-processor", image_size=args.pali_image)
        processor = AutoProcessor.from_pretrained(path, local_files_only=True)
        processor.tokenizer.padding_side = "left"
        tok = processor.tokenizer
        config = paligemma_3b_config(tok.convert_tokens_to_ids("<image>"), args.pali_image)
        backend = gpu_backend(
            BenchPaliGemma, PaliGemmaForConditionalGeneration, config, processor, vae_path=vae
        )
        backend.mask_decoder = MaskDecoder.from_npz(Path(vae))
        backend.model.generation_config.eos_token_id = tok.convert_tokens_to_ids("<eos>")
        backend.model.generation_config.pad_token_id = tok.convert_tokens_to_ids("<pad>")
    backend.force_plain()
    return backend


def siglip_backend(args: argparse.Namespace) -> SiglipBackend:
    if args.smoke:
        return tiny_backend(SiglipBackend, build_siglip, args.workdir)
    from transformers import AutoProcessor, SiglipModel

    path = build_siglip(args.workdir / "siglip-processor", image_size=448)
    processor = AutoProcessor.from_pretrained(path, local_files_only=True)
    return gpu_backend(SiglipBackend, SiglipModel, medsiglip_448_config(), processor)


# -- shared helpers -----------------------------------------------------------------------------------
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def table(title: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    cells = [[_cell(v) for v in row] for row in rows]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]

    def line(values: Sequence[str]) -> str:
        return "  ".join(
            v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in enumerate(zip(values, widths, strict=True))
        )

    print(f"\n{title}")
    print(line(columns))
    print(line(["-" * w for w in widths]))
    for row in cells:
        print(line(row))
    sys.stdout.flush()


def _cell(value: Any) -> str:  # noqa: ANN401
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.0f}" if abs(value) >= 100 else f"{value:.2f}" if abs(value) >= 1 else f"{value:.3f}"
    return str(value)


def fresh_pixels(shape: Sequence[int]) -> torch.Tensor:
    """A new image's pixel values, [1, *shape], float32 in [-1, 1] like a processor's output."""
    generator = torch.Generator().manual_seed(next(_SEEDS))
    return torch.rand((1, *shape), generator=generator) * 2 - 1


def fresh_cxr(size: int) -> Volume:
    """A new square CR image (12-bit noise) for the paths that preprocess like production."""
    rng = np.random.default_rng(next(_SEEDS))
    pixels = rng.integers(0, 4096, (1, size, size)).astype(np.float32)
    geometry = Geometry((1, size, size), (0, 0.15, 0.15), (1, 0, 0, 0, 1, 0), (0, 0, 0), "CR", rescaled=False)
    return Volume(pixels, geometry)


def one_row(backend: Any, prompt: str) -> dict[str, Any]:  # noqa: ANN401
    """A one-row MedGemma processor batch (chat template, image tokens) for ``prompt``."""
    blank = Image.new("RGB", (backend.image_size, backend.image_size))
    return dict(backend.build_inputs([PreparedImage([blank], None)], [prompt]))


def batch_of(one: dict[str, Any], rows: int) -> dict[str, Any]:
    """``rows`` copies of a one-row batch, each with a new image."""
    out = {k: v.repeat(rows, *[1] * (v.dim() - 1)) for k, v in one.items() if k != "pixel_values"}
    out["pixel_values"] = torch.cat([fresh_pixels(one["pixel_values"].shape[1:]) for _ in range(rows)])
    return out


def with_new_image(request: Any) -> Any:  # noqa: ANN401
    """``request`` with a new image and its content key (hashed here, as the submitting thread does)."""
    pixels = fresh_pixels(request.pixel_values.shape[1:])
    return dataclasses.replace(request, pixel_values=pixels, image_keys=(image_key(pixels[0]),))


def fresh_requests(backend: Any, one: dict[str, Any], tokens: int, count: int) -> list[Any]:  # noqa: ANN401
    """``count`` engine requests for the prompt of ``one``, each with a new image, ``tokens`` tokens each."""
    (template,) = backend.engine_requests(one, tokens)
    return [with_new_image(template) for _ in range(count)]


def pow2(n: int) -> int:
    return max(64, 1 << (n - 1).bit_length())


@dataclasses.dataclass(frozen=True)
class Roofline:
    """Decode tokens/s if each step did nothing but read the weights and the batch's KV cache from HBM."""

    weight_bytes: int  # language model + output head (a tied head counted once)
    layer_kv: tuple[tuple[int, int], ...]  # per layer: (K+V bytes per token, sliding window or 0)
    bytes_per_s: float

    @classmethod
    def of(cls, model: Any, hbm_tb_s: float) -> Roofline:  # noqa: ANN401
        cfg = model.config.get_text_config()
        tensors = itertools.chain(model.model.language_model.parameters(), model.lm_head.parameters())
        weights = {id(p): p.numel() * p.element_size() for p in tensors}  # a tied head is the same Parameter
        heads = cfg.num_attention_heads
        kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
        per_token = 2 * kv_heads * head_dim * model.dtype.itemsize
        n = cfg.num_hidden_layers
        window = int(getattr(cfg, "sliding_window", None) or 0)
        kinds = list(getattr(cfg, "layer_types", None) or ["full_attention"] * n)[:n]
        layers = tuple((per_token, window if kind == "sliding_attention" else 0) for kind in kinds)
        return cls(sum(weights.values()), layers, hbm_tb_s * 1e12)

    def tokens_per_s(self, batch: int, context: float) -> float:
        kv = sum(b * (min(context, w) if w else context) for b, w in self.layer_kv)
        return batch * self.bytes_per_s / (self.weight_bytes + batch * kv)


def start_engine(backend: Any, slots: int, max_length: int) -> tuple[Engine, float]:  # noqa: ANN401
    """The backend's engine, started (on a GPU every decode graph is captured here, timed in its stats)."""
    engine = Engine(backend.model, EngineSettings(slots=slots, max_length=max_length),
                    position_offset=backend.position_offset)  # fmt: skip
    engine.start()
    backend.engine = engine
    return engine, engine.stats["graph_captures"]


def engine_row(name: str, engine: Engine, captured: float) -> list[Any]:
    graphs = engine.graphs
    return [
        name, engine.settings.slots, engine.settings.max_length,
        f"{len(graphs)} ({len(graphs.failed)} failed)" if graphs is not None else "none (CPU)",
        float(engine.stats["warmup_s"]), int(engine.stats["graph_captures"] - captured),
        f"{int(engine.stats['graph_replays'])} of {int(engine.stats['decode_steps'])}",
    ]  # fmt: skip


def release(backend: Any) -> None:  # noqa: ANN401
    """Stop the backend's engine and drop its model, so that the next model has the GPU's memory
    (gc: an engine and its captured graphs refer to each other)."""
    if backend.engine is not None:
        backend.engine.stop()
    backend.engine = backend.model = None
    gc.collect()
    if backend.device.type == "cuda":
        torch.cuda.empty_cache()


def named(args: argparse.Namespace, name: str) -> str:
    return f"{name} [tiny stand-in]" if args.smoke else name


def stats_delta(engine: Engine, before: dict[str, float]) -> dict[str, float]:
    return {k: engine.stats[k] - before[k] for k in before}


def closed_loop(engine: Engine, requests: list[Any], concurrency: int) -> tuple[float, list[list[int]]]:
    """Seconds for ``requests`` with at most ``concurrency`` in flight, and their outputs.

    A finished request is replaced from the engine's own thread (the future's callback), so the
    replacement joins at the next step; the first wave is queued from the engine thread too
    (``engine.call``), so it is admitted as one batch.
    """
    assert all(engine.fits(len(r.input_ids), r.max_new_tokens) for r in requests)
    todo = list(reversed(requests))
    futures: list[Future[list[int]]] = []
    lock, done, left = threading.Lock(), threading.Event(), [len(requests)]

    def launch() -> None:
        with lock:
            request = todo.pop() if todo else None
        if request is not None:
            future = engine.submit(request)
            futures.append(future)
            future.add_done_callback(finished)

    def finished(_: Future[list[int]]) -> None:
        with lock:
            left[0] -= 1
            if left[0] == 0:
                done.set()
        launch()

    sync(engine.device)
    started = time.perf_counter()
    engine.call(lambda: [launch() for _ in range(min(concurrency, len(requests)))])
    done.wait()
    sync(engine.device)
    elapsed = time.perf_counter() - started
    return elapsed, [f.result() for f in futures]


def through_scheduler(backend: Any, jobs: list[tuple[TaskKind, WorkItem]], max_batch: int) -> float:  # noqa: ANN401
    """Seconds until every job, all submitted at once through a new Scheduler, has its result."""

    async def run() -> float:
        sched = Scheduler(max_batch=max_batch, batch_wait_ms=20, queue_size=max(64, len(jobs)))
        started = time.perf_counter()
        results = await asyncio.gather(*[sched.submit(backend, item, task) for task, item in jobs])
        sync(backend.device)
        elapsed = time.perf_counter() - started
        await sched.close()
        assert len(results) == len(jobs)
        return elapsed

    return asyncio.run(run())


# -- sections ----------------------------------------------------------------------------------------
def report_section(backend: BenchMedGemma, engine: Engine, roof: Roofline, args: argparse.Namespace) -> None:
    """1. CXR reports of exactly --tokens tokens: plain generate vs the engine at N in flight."""
    tokens = args.tokens
    one = one_row(backend, PROMPTS["report"].format(modality="CR"))
    prompt = one["input_ids"].shape[1]
    context = prompt + tokens / 2  # mean context over the decode, for the KV share of the limit

    def plain(rows: int, calls: int) -> float:
        inputs = [batch_of(one, rows) for _ in range(calls)]
        sync(backend.device)
        started = time.perf_counter()
        for x in inputs:
            backend.generate(x, tokens)
            assert [len(ids) for ids in backend.last_generated_ids] == [tokens] * rows
        sync(backend.device)
        return time.perf_counter() - started

    backend.engine = None  # plain transformers generate
    for rows in [1, *args.plain_batches]:  # warm-up: kernels, allocator, every batch shape
        backend.generate(batch_of(one, rows), 2)
    runs = [("plain generate, one at a time", 1, args.plain_requests, plain(1, args.plain_requests), None)]
    for rows in args.plain_batches:
        runs.append((f"plain generate, batch {rows}", rows, rows, plain(rows, 1), None))
    backend.engine = engine
    slots = engine.settings.slots
    closed_loop(engine, fresh_requests(backend, one, 2, slots), slots)  # warm-up: vision, prefill, extend
    for n in args.engine_batches:
        requests = fresh_requests(backend, one, tokens, n * args.rounds)
        before = dict(engine.stats)
        seconds, outputs = closed_loop(engine, requests, n)
        delta = stats_delta(engine, before)
        assert all(len(o) == tokens for o in outputs), "ignore_eos requests emit exactly --tokens tokens"
        assert delta["images_encoded"] == len(requests), "every request's image is new: no cache hit"
        runs.append((f"engine, {n} in flight", n, len(requests), seconds, delta))

    single = runs[0][2] / runs[0][3]
    batched = max((r[2] / r[3] for r in runs[1 : 1 + len(args.plain_batches)]), default=single)
    rows_out = []
    for label, batch, count, seconds, delta in runs:
        rate = count / seconds
        if delta is None:
            steps, per_step = count / batch * tokens, None
        else:
            steps, per_step = delta["decode_steps"], delta["decode_rows"] / max(1, delta["decode_steps"])
        achieved = count * tokens / seconds
        rows_out.append([label, count, rate, achieved, 1000 * seconds / steps, per_step, rate / single,
                         rate / batched, achieved / roof.tokens_per_s(batch, context)])  # fmt: skip
    table(
        f"1. {named(args, 'MedGemma-4B')} CXR reports, {tokens} tokens each, prompt {prompt} tokens (model only: inputs built "
        f"before the clock; every request a new image)",
        ["mode", "reports", "reports/s", "tokens/s", "ms/step", "rows/step", "x 1-by-1", "x batched",
         "of BW limit"],
        rows_out,
    )  # fmt: skip
    print(f"BW limit: {roof.weight_bytes / 1e9:.2f} GB of language-model weights + the batch's KV cache read "
          f"per step at {args.hbm_tb_s} TB/s = {roof.tokens_per_s(1, context):.0f} tokens/s at batch 1, "
          f"{roof.tokens_per_s(max(args.engine_batches), context):.0f} at batch {max(args.engine_batches)}; "
          "ms/step = wall time / decode steps (prefill included)")  # fmt: skip


def open_loop_section(backend: BenchMedGemma, engine: Engine, args: argparse.Namespace) -> None:
    """2. Poisson arrivals at --rate reports/s for --duration s; latency from each arrival time."""
    one = one_row(backend, PROMPTS["report"].format(modality="CR"))
    (template,) = backend.engine_requests(one, args.tokens)
    rng = random.Random(0)
    arrivals: list[float] = []
    at = rng.expovariate(args.rate)
    while at < args.duration:
        arrivals.append(at)
        at += rng.expovariate(args.rate)
    ends = [0.0] * len(arrivals)
    lock, done, left = threading.Lock(), threading.Event(), [len(arrivals)]
    if not arrivals:
        done.set()

    def finished(i: int) -> None:
        ends[i] = time.perf_counter()
        with lock:
            left[0] -= 1
            if left[0] == 0:
                done.set()

    futures = []
    before = dict(engine.stats)
    sync(engine.device)
    start = time.perf_counter()
    for i, at in enumerate(arrivals):
        request = with_new_image(template)  # built before it is due
        delay = start + at - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        future = engine.submit(request)
        future.add_done_callback(lambda _, i=i: finished(i))
        futures.append(future)
    done.wait()
    assert all(len(f.result()) == args.tokens for f in futures)
    delta = stats_delta(engine, before)
    assert delta["images_encoded"] == len(arrivals), "every request's image is new: no cache hit"
    latency = np.array([end - (start + at) for end, at in zip(ends, arrivals, strict=True)])
    wall = max(ends, default=start) - start
    count = len(arrivals)
    row = [f"{args.rate:g}/s for {args.duration:g} s", count,
           count / wall if wall else None, count * args.tokens / wall if wall else None,
           *(float(np.percentile(latency, q)) if count else None for q in (50, 95, 100)),
           delta["decode_rows"] / max(1, delta["decode_steps"])]  # fmt: skip
    table(
        f"2. Open loop: Poisson arrivals of {args.tokens}-token {named(args, 'MedGemma-4B')} reports, engine with "
        f"{engine.settings.slots} slots (latency from each arrival)",
        ["offered", "reports", "reports/s", "tokens/s", "p50 s", "p95 s", "max s", "rows/step"],
        [row],
    )


def mixed_section(backend: BenchMedGemma, engine: Engine, args: argparse.Namespace) -> None:
    """3. Report + VQA + classify + detect of one image, the four through the scheduler at once."""
    report, vqa, detect = args.mixed_tokens
    counts = {REPORT: report, VQA: vqa, DETECT: detect}

    def study() -> list[tuple[TaskKind, WorkItem]]:
        volume = fresh_cxr(args.source_px)
        specs = {REPORT: AnalysisSpec("m", (REPORT,)), VQA: AnalysisSpec("m", (VQA,), question=QUESTION),
                 CLASSIFY: AnalysisSpec("m", (CLASSIFY,), labels=(LABELS[0],)),
                 DETECT: AnalysisSpec("m", (DETECT,), labels=(FINDING,))}  # fmt: skip
        return [(task, WorkItem(volume, spec)) for task, spec in specs.items()]

    rows, plain_rate = [], None
    modes = [(f"plain generate (engine off), micro-batches of {args.micro_batch}", None), ("engine", engine)]
    for label, mode_engine in modes:
        backend.engine = mode_engine
        backend.task_tokens = dict.fromkeys(counts, 2)
        through_scheduler(backend, study(), args.micro_batch)  # warm-up
        backend.task_tokens = counts
        studies = [study() for _ in range(args.studies)]
        before = dict(engine.stats)
        seconds = through_scheduler(backend, [job for s in studies for job in s], args.micro_batch)
        delta = stats_delta(engine, before)
        # A prompt too long for the engine's cache would quietly run on plain generate instead.
        assert delta["requests"] == (3 * args.studies if mode_engine else 0), delta
        rate = args.studies / seconds
        plain_rate = plain_rate or rate
        per_study = (
            [delta[k] / args.studies for k in ("images_encoded", "prefills")] if mode_engine else [None] * 2
        )
        rows.append([label, args.studies, rate, seconds / args.studies, rate / plain_rate, *per_study])
    backend.engine = engine
    table(
        f"3. Mixed study on {named(args, 'MedGemma-4B')}: report ({report} tokens) + VQA ({vqa}) + classify "
        f"(yes/no, one forward) + detect ({detect}) of one {args.source_px} px CXR, all submitted at once",
        ["mode", "studies", "studies/s", "s/study", "x plain", "images encoded/study", "prefills/study"],
        rows,
    )
    print("engine counts: the vision tower and the image prefix once per study when report, VQA and detect "
          "share them (classification's own forward is not an engine request)")  # fmt: skip


def vision_tower_rows(backend: BenchMedGemma, args: argparse.Namespace) -> list[list[Any]]:
    """SigLIP-896 as MedGemma runs it (``get_image_features``: tower + projector), plain batches."""
    model = backend.model
    size = backend.image_size
    pixels = torch.rand((args.vision_batch, 3, size, size), device=backend.device).to(model.dtype) * 2 - 1
    rate = images_per_s(lambda: model.model.get_image_features(pixel_values=pixels), args.vision_batch,
                        args.vision_repeats, backend.device)  # fmt: skip
    return [[f"SigLIP-{size} (MedGemma's tower + projector)", args.vision_batch, rate, 1000 / rate]]


def images_per_s(fn: Callable[[], Any], batch: int, repeats: int, device: torch.device) -> float:
    with torch.inference_mode():
        fn()  # warm-up
        sync(device)
        started = time.perf_counter()
        for _ in range(repeats):
            fn()
        sync(device)
    return batch * repeats / (time.perf_counter() - started)


def paligemma_section(backend: BenchPaliGemma, args: argparse.Namespace) -> list[Any]:
    """4. PaliGemma detect / segment: few output tokens, so the vision tower and prefill dominate."""
    tokens = args.pali_tokens
    size = backend.image_size
    prompt = backend.processor(text=[f"detect {FINDING}"], images=[Image.new("RGB", (size, size))],
                               return_tensors="pt")["input_ids"].shape[1]  # fmt: skip
    engine, captured = start_engine(backend, max(args.engine_batches), pow2(prompt + 16 + tokens))

    def jobs(task: TaskKind, count: int) -> list[tuple[TaskKind, WorkItem]]:
        return [(task, WorkItem(fresh_cxr(args.source_px), AnalysisSpec("p", (task,), labels=(FINDING,))))
                for _ in range(count)]  # fmt: skip

    rows = []
    modes = [(f"plain generate, scheduler batches of {b}", None, b) for b in args.plain_batches]
    modes.append((f"engine ({engine.settings.slots} slots), scheduler", engine, 1))
    for task in (DETECT, SEGMENT):
        first = len(rows)
        for label, mode_engine, batch in modes:
            backend.engine = mode_engine
            backend.task_tokens = {task: 2}
            through_scheduler(backend, jobs(task, batch), batch)  # warm-up
            backend.task_tokens = {task: tokens}
            work = jobs(task, args.pali_requests)
            before = engine.stats["requests"]
            seconds = through_scheduler(backend, work, batch)
            assert engine.stats["requests"] - before == (len(work) if mode_engine else 0)  # no quiet fallback
            rows.append([task.value, label, len(work), len(work) / seconds, 1000 * seconds / len(work)])
        best_plain = max((r[3] for r in rows[first:-1]), default=rows[-1][3])
        for r in rows[first:]:
            r.append(r[3] / best_plain)
    name = named(args, f"PaliGemma-3B-{args.pali_image}")
    table(
        f"4. {name} detect / segment, {tokens} output tokens, prompt {prompt} tokens, {args.source_px} px CXR "
        "through the backend and the scheduler",
        ["task", "mode", "requests", "requests/s", "ms/request", "x plain batched"],
        rows,
    )
    return engine_row(name, engine, captured)


def siglip_rows(backend: SiglipBackend, args: argparse.Namespace) -> list[list[Any]]:
    """MedSigLIP-448: the vision tower batched, and zero-shot classification through SiglipBackend.run."""
    model, device, batch = backend.model, backend.device, args.siglip_batch
    size = backend.image_size
    pixels = torch.rand((batch, 3, size, size), device=device).to(model.dtype) * 2 - 1
    tower = images_per_s(
        lambda: model.get_image_features(pixel_values=pixels), batch, args.vision_repeats, device
    )

    def items(count: int) -> list[WorkItem]:
        return [WorkItem(fresh_cxr(args.source_px), AnalysisSpec("s", (CLASSIFY,), labels=LABELS))
                for _ in range(count)]  # fmt: skip

    backend.run(items(batch), CLASSIFY)  # warm-up (and the label set's text embeddings, which it keeps)
    work = items(batch)
    started = time.perf_counter()
    prep = backend.processor(images=[backend._image(item.volume) for item in work], return_tensors="pt")
    prep_s = time.perf_counter() - started
    assert prep["pixel_values"].shape[0] == batch
    sync(device)
    started = time.perf_counter()
    results = backend.run(work, CLASSIFY)
    sync(device)
    run_s = time.perf_counter() - started
    assert len(results) == batch and all(len(r.findings) == len(LABELS) for r in results)
    return [
        [f"MedSigLIP-{size} vision tower (get_image_features)", batch, tower, 1000 / tower],
        [f"MedSigLIP-{size} classify, {len(LABELS)} labels: SiglipBackend.run", batch, batch / run_s,
         1000 * run_s / batch],
        [f"  of which CPU preprocessing ({args.source_px} px CXR -> {size})", batch, batch / prep_s,
         1000 * prep_s / batch],
    ]  # fmt: skip


def medgemma_sections(backend: BenchMedGemma, args: argparse.Namespace) -> tuple[list[list[Any]], list[Any]]:
    """Sections 1-3 and MedGemma's vision tower, on one model and one engine."""
    report_prompt = one_row(backend, PROMPTS["report"].format(modality="CR"))["input_ids"].shape[1]
    detect_prompt = one_row(backend, PROMPTS["detect"].format(labels=FINDING))["input_ids"].shape[1]
    longest = max(
        report_prompt + max(args.tokens, args.mixed_tokens[0]), detect_prompt + args.mixed_tokens[2]
    )
    engine, captured = start_engine(backend, max(args.engine_batches), pow2(longest + 16))
    roof = Roofline.of(backend.model, args.hbm_tb_s)
    report_section(backend, engine, roof, args)
    open_loop_section(backend, engine, args)
    mixed_section(backend, engine, args)
    return vision_tower_rows(backend, args), engine_row(named(args, "MedGemma-4B"), engine, captured)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add = parser.add_argument
    add("--tokens", type=int, default=200, help="tokens per report (sections 1-2)")
    add("--plain-requests", type=int, default=4, help="reports for plain generate one at a time")
    add("--plain-batches", type=int, nargs="+", default=[8, 32], help="plain generate batch sizes")
    add("--engine-batches", type=int, nargs="+", default=[1, 8, 32, 64], help="engine requests in flight")
    add("--rounds", type=int, default=2, help="engine: requests per run = rounds x in flight")
    add("--rate", type=float, default=10.0, help="open loop: arrivals per second")
    add("--duration", type=float, default=20.0, help="open loop: seconds of arrivals")
    add("--studies", type=int, default=16, help="mixed: studies, all submitted at once")
    add("--micro-batch", type=int, default=8, help="mixed: the scheduler's max_batch")
    add("--mixed-tokens", type=int, nargs=3, default=[100, 20, 40], metavar=("REPORT", "VQA", "DETECT"))
    add("--pali-requests", type=int, default=64, help="PaliGemma: requests per task and mode")
    add("--pali-tokens", type=int, default=20, help="PaliGemma: output tokens")
    add("--pali-image", type=int, default=224, choices=[224, 448], help="PaliGemma input size")
    add("--source-px", type=int, default=1024, help="side of the CXR the backends preprocess (sections 3-5)")
    add("--vision-batch", type=int, default=16, help="SigLIP-896 batch")
    add("--siglip-batch", type=int, default=64, help="MedSigLIP batch")
    add("--vision-repeats", type=int, default=5, help="timed batches per vision tower")
    add("--hbm-tb-s", type=float, default=3.0, help="HBM bandwidth for the limit (H100 SXM: 3.35 nominal)")
    add("--smoke", action="store_true", help="tiny checkpoints on the CPU: every code path, no measurement")
    args, _ = parser.parse_known_args()
    if args.smoke:
        parser.set_defaults(**SMOKE)
    args = parser.parse_args()
    if not args.smoke and not torch.cuda.is_available():
        print("bench_inference: no CUDA device; this benchmark needs a GPU (nothing was measured).")
        return 2
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()  # per-call processor notices would bury the tables
    started = time.perf_counter()
    if args.smoke:
        print(f"device: CPU, {os.cpu_count()} cores -- SMOKE: tiny checkpoints, the numbers mean nothing")
    else:
        memory = torch.cuda.get_device_properties(0).total_memory / 2**30
        print(
            f"device: {torch.cuda.get_device_name(0)} ({memory:.0f} GiB); real-size architectures, random bf16"
        )
    print(
        f"torch {torch.__version__}, transformers {transformers.__version__}, Python {platform.python_version()}"
    )
    print(f"command: {shlex.join(['python', *sys.argv])}")
    with tempfile.TemporaryDirectory(prefix="bench-inference-") as workdir:
        args.workdir = Path(workdir)
        backend = medgemma_backend(args)
        vision, medgemma_engine = medgemma_sections(backend, args)
        release(backend)
        backend = paligemma_backend(args)
        paligemma_engine = paligemma_section(backend, args)
        release(backend)
        backend = siglip_backend(args)
        vision += siglip_rows(backend, args)
        release(backend)
    table(
        f"5. Vision{' [tiny stand-ins]' if args.smoke else ''}",
        ["model", "batch", "images/s", "ms/image"],
        vision,
    )
    engines = [medgemma_engine, paligemma_engine]
    table(
        "6. Engines: decode graphs captured at start-up (timed); captures during the timed runs must be 0",
        ["model", "slots", "max length", "graphs", "warm-up s", "captured while timed", "steps from graphs"],
        engines,
    )
    print(f"\ntotal {time.perf_counter() - started:.0f} s")
    if any(row[5] for row in engines):  # "captured while timed"
        print("FAIL: a decode graph was captured during the timed runs")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
