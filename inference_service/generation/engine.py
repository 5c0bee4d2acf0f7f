"""The generation engine: one model, one thread, continuous batching on a SlotCache.

Why not ``model.generate`` per batch: a batch there runs until its longest
answer ends, so a one-word VQA answer waits for a 300-token report; and each
decode step re-enters Python and the dynamic cache, which costs 90-100 ms per
step on an H100 at any batch size (FIELD-NOTES, "GPU serving").

Here a request goes through three phases:

1. **prefix**: the leading tokens that carry its images (``prefix_length``) go
   through the model's own multimodal forward, so image features, bidirectional
   image attention and PaliGemma's prefix-LM mask stay transformers' code. The
   vision tower runs once per distinct image and the prefix once per distinct
   (image, prefix tokens): report, VQA and detection of one image share it.
2. **extend**: the rest of the prompt, in chunks, on the slot cache;
3. **decode**: one token per step for every running request; a request joins
   at the next step and leaves when it ends, is cancelled or misses its
   deadline.

Greedy output is the same token for token as ``generate`` (tests prove it on
tiny float32 checkpoints); sampling, logits processors, cancellation and
deadlines are per request. The same code runs on the CPU; on a GPU the decode
step is replayed as a CUDA graph per (batch, length) bucket (``graphs``).
"""

from __future__ import annotations

import hashlib
import inspect
import logging
import queue
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import DynamicCache
from transformers.modeling_outputs import BaseModelOutputWithPooling

from inference_service.errors import Cancelled, DeadlineExceeded, InvalidInput
from inference_service.generation.cache import FULL, SLIDING, SlotCache, Step

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Sampling:
    """Per-request decoding: temperature 0 is greedy (the default everywhere in RadBridge)."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None


@dataclass
class GenRequest:
    """One prompt to continue. ``input_ids`` unpadded; ``pixel_values`` this request's images only."""

    input_ids: Sequence[int]
    max_new_tokens: int
    eos_token_ids: frozenset[int]
    pixel_values: torch.Tensor | None = None
    #: One content key per image (``image_key``); computed by the engine when empty.
    image_keys: tuple[str, ...] = ()
    token_type_ids: Sequence[int] | None = None
    #: Leading tokens prefilled by the multimodal forward and shared between requests (0: none).
    prefix_length: int = 0
    sampling: Sampling = field(default_factory=Sampling)
    #: transformers-style logits processors, called as p(input_ids [1, n], scores [1, vocab]).
    logits_processors: Sequence[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = ()
    cancel: threading.Event | None = None
    deadline: float | None = None  # time.monotonic()
    #: Generate exactly max_new_tokens (benchmarks: every request costs the same).
    ignore_eos: bool = False


@dataclass(frozen=True)
class EngineSettings:
    """Sizes fixed at start-up (the cache is allocated once)."""

    slots: int = 8
    max_length: int = 1024
    chunk: int = 64  # prompt tokens per extend step
    prefix_cache: int = 16  # prefilled image prefixes kept for reuse
    image_cache: int = 64  # vision-tower outputs kept for reuse
    vision_batch: int = 16
    cuda_graphs: bool = True
    #: Without CUDA: decode through the graphs' static buffers anyway (tests of the replay bookkeeping).
    static_steps: bool = False


@dataclass
class _Running:
    request: GenRequest
    future: Future[list[int]]
    slot: int = -1
    length: int = 0  # tokens in the slot's cache
    generated: list[int] = field(default_factory=list)
    generator: torch.Generator | None = None


@dataclass
class _Prefix:
    kv: list[tuple[torch.Tensor, torch.Tensor]]  # per layer, [heads, length, dim]
    logits: torch.Tensor  # [vocab] float32, next-token distribution after the prefix


def image_key(pixels: torch.Tensor) -> str:
    """Content key of one preprocessed image (blake2b: a 896 px float image is ~10 MB to hash).

    Computed by the submitting thread (``HFBackend.engine_requests``), not the engine's.
    """
    return hashlib.blake2b(pixels.contiguous().cpu().numpy().tobytes(), digest_size=16).hexdigest()


def _buckets(limit: int, start: int) -> list[int]:
    sizes, n = [], start
    while n < limit:
        sizes.append(n)
        n *= 2
    return [*sizes, limit]


def _pick(buckets: Sequence[int], need: int) -> int:
    return next(b for b in buckets if b >= need)


class Engine:
    """Continuous batching for one transformers image-text-to-text model."""

    def __init__(self, model: Any, settings: EngineSettings, position_offset: int = 0) -> None:
        self.model = model
        self.settings = settings
        self.position_offset = position_offset
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.text_config = model.config.get_text_config()
        self.language_model = model.model.language_model
        self.lm_head = model.lm_head
        self.softcap = getattr(self.text_config, "final_logit_softcapping", None)
        impl = getattr(self.text_config, "_attn_implementation", None) or "sdpa"
        self.additive = self.dtype if impl == "eager" else None
        self.cache = SlotCache(
            self.text_config, settings.slots, settings.max_length, settings.chunk, self.dtype, self.device
        )
        self.batch_buckets = _buckets(settings.slots, 1)
        self.width_buckets = _buckets(settings.max_length, min(64, settings.max_length))
        self._feature_kwargs = self._vision_kwargs()
        self._images: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._prefixes: OrderedDict[tuple[Any, ...], _Prefix] = OrderedDict()
        self._queue: queue.Queue[Any] = queue.Queue()
        self._running: dict[int, _Running] = {}
        self._free = list(range(settings.slots))
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.graphs: Any = None
        self.stats: dict[str, float] = dict.fromkeys(
            ("requests", "decode_steps", "decode_rows", "extend_steps", "prefills", "images_encoded",
             "image_hits", "prefix_hits", "graph_captures", "graph_replays", "warmup_s"), 0
        )  # fmt: skip

    # -- public --------------------------------------------------------------------------
    def start(self) -> None:
        """Start the engine thread; on a GPU capture the decode graphs first (warm-up timed)."""
        with self._lock:
            if self._thread is not None:
                return
            gpu = self.device.type == "cuda"
            if (self.settings.cuda_graphs and gpu) or self.settings.static_steps:
                from inference_service.generation.graphs import DecodeGraphs

                started = time.monotonic()
                self.graphs = DecodeGraphs(self, capture=gpu and self.settings.cuda_graphs)
                self.graphs.capture_all()
                self.stats["warmup_s"] = round(time.monotonic() - started, 3)
                logger.info(
                    "decode graphs captured",
                    extra={
                        "event": "engine.warmup",
                        "graphs": len(self.graphs),
                        "seconds": self.stats["warmup_s"],
                    },
                )
            self._thread = threading.Thread(target=self._loop, name="generation-engine", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._queue.put(None)
        if self._thread is not None:
            self._thread.join(timeout=30)

    def fits(self, prompt_tokens: int, max_new_tokens: int) -> bool:
        return prompt_tokens + max_new_tokens <= self.settings.max_length

    def submit(self, request: GenRequest) -> Future[list[int]]:
        """Queue a request; the future yields its generated token ids (with the end token, if reached)."""
        if not self.fits(len(request.input_ids), request.max_new_tokens):
            raise InvalidInput(
                f"Prompt of {len(request.input_ids)} tokens + {request.max_new_tokens} new tokens exceeds the "
                f"engine's maximum length {self.settings.max_length}."
            )
        future: Future[list[int]] = Future()
        self.start()
        self._queue.put(_Running(request, future))
        return future

    def call(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` on the engine thread between steps (the model is touched by one thread only)."""
        future: Future[Any] = Future()
        self.start()
        self._queue.put((fn, future))
        return future.result()

    # -- the loop --------------------------------------------------------------------------
    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                admitted = self._take(block=not self._running)
                if admitted:
                    try:
                        self._prefill(admitted)
                    except Exception as exc:  # a prompt that fails its prefill fails alone
                        logger.exception("prefill failed", extra={"event": "engine.prefill_failed"})
                        for run in admitted:
                            self._finish(run, exc)
                self._reap()
                if self._running:
                    self._decode()
            except Exception as exc:  # a failed step fails the requests in it, not the engine
                logger.exception("generation step failed", extra={"event": "engine.failed"})
                for run in list(self._running.values()):
                    self._finish(run, exc)

    def _take(self, block: bool) -> list[_Running]:
        """New requests, as many as there are free slots; engine calls run here, between steps."""
        admitted: list[_Running] = []
        while self._free:
            try:
                item = self._queue.get(block=block and not admitted, timeout=None)
            except queue.Empty:
                break
            if item is None:
                break
            if isinstance(item, tuple):
                fn, future = item
                try:
                    with torch.inference_mode():
                        future.set_result(fn())
                except Exception as exc:  # handed to the caller
                    future.set_exception(exc)
                continue
            if not item.future.set_running_or_notify_cancel():
                continue
            refused = self._refusal(item.request, time.monotonic())
            if refused is not None:
                item.future.set_exception(refused)
                continue
            item.slot = self._free.pop(0)
            self._running[item.slot] = item
            self.stats["requests"] += 1
            seed = item.request.sampling.seed
            if item.request.sampling.temperature > 0:
                item.generator = torch.Generator(device=self.device)
                if seed is not None:
                    item.generator.manual_seed(seed)
            admitted.append(item)
            block = False
        return admitted

    def _finish(self, run: _Running, error: BaseException | None = None) -> None:
        if run.slot >= 0 and self._running.get(run.slot) is run:  # a slot is freed once, by its holder
            del self._running[run.slot]
            self._free.append(run.slot)
            self._free.sort()
        if not run.future.done():
            if error is None:
                run.future.set_result(list(run.generated))
            else:
                run.future.set_exception(error)

    @staticmethod
    def _refusal(request: GenRequest, now: float) -> Exception | None:
        if request.cancel is not None and request.cancel.is_set():
            return Cancelled("The request was cancelled.")
        if request.deadline is not None and now > request.deadline:
            return DeadlineExceeded("The request's deadline passed before its answer was complete.")
        return None

    def _reap(self) -> None:
        """Drop requests whose caller went away or whose deadline passed."""
        now = time.monotonic()
        for run in list(self._running.values()):
            refused = self._refusal(run.request, now)
            if refused is not None:
                self._finish(run, refused)

    @staticmethod
    def _plain(run: _Running) -> bool:
        return run.request.sampling.temperature <= 0 and not run.request.logits_processors

    def _accept(self, run: _Running, logits: torch.Tensor, token: int | None = None) -> None:
        """Choose the next token from ``logits`` [vocab] (or take ``token``); finish the request if it ended."""
        if token is None:
            token = self._choose(run, logits)
        run.generated.append(token)
        request = run.request
        ended = token in request.eos_token_ids and not request.ignore_eos
        if ended or len(run.generated) >= request.max_new_tokens:
            self._finish(run)

    def _choose(self, run: _Running, logits: torch.Tensor) -> int:
        request = run.request
        scores = logits[None].float()
        if request.logits_processors:
            ids = torch.tensor([[*request.input_ids, *run.generated]], device=scores.device)
            for processor in request.logits_processors:
                scores = processor(ids, scores)
        sampling = request.sampling
        if sampling.temperature <= 0:
            return int(scores.argmax(-1))
        scores = scores / sampling.temperature
        if sampling.top_k > 0:
            kth = torch.topk(scores, min(sampling.top_k, scores.shape[-1])).values[..., -1, None]
            scores = scores.masked_fill(scores < kth, float("-inf"))
        if sampling.top_p < 1.0:
            ordered, index = torch.sort(scores, descending=True)
            cumulative = torch.softmax(ordered, -1).cumsum(-1)
            drop = cumulative - torch.softmax(ordered, -1) > sampling.top_p
            scores = scores.scatter(-1, index, ordered.masked_fill(drop, float("-inf")))
        probs = torch.softmax(scores, -1)
        return int(torch.multinomial(probs, 1, generator=run.generator))

    # -- phase 1 and 2: prefix and prompt --------------------------------------------------
    @torch.inference_mode()
    def _prefill(self, runs: list[_Running]) -> None:
        for run in [r for r in runs if r.request.prefix_length <= 0 and not r.request.input_ids]:
            self._finish(run, InvalidInput("Empty prompt."))
        runs = [r for r in runs if self._running.get(r.slot) is r]
        with_prefix = [r for r in runs if r.request.prefix_length > 0]
        if with_prefix:
            prefixes = self._prefixes_for(with_prefix)
            for run, prefix in zip(with_prefix, prefixes, strict=True):
                self.cache.load(run.slot, prefix.kv)
                run.length = run.request.prefix_length
                if run.length == len(run.request.input_ids):
                    self._accept(run, prefix.logits)
        rest = [r for r in runs if self._running.get(r.slot) is r and r.length < len(r.request.input_ids)]
        if rest:
            self._extend(rest)

    def _prefixes_for(self, runs: list[_Running]) -> list[_Prefix]:
        keys = [self._prefix_key(r.request) for r in runs]
        missing: dict[tuple[Any, ...], GenRequest] = {}
        for key, run in zip(keys, runs, strict=True):
            if key in self._prefixes:
                self._prefixes.move_to_end(key)
                self.stats["prefix_hits"] += 1
            else:
                missing.setdefault(key, run.request)
        if missing:
            self._compute_prefixes(list(missing.items()))
        found = [self._prefixes[k] for k in keys]
        while len(self._prefixes) > self.settings.prefix_cache:
            self._prefixes.popitem(last=False)
        return found

    @staticmethod
    def _image_keys(request: GenRequest) -> list[str]:
        if request.pixel_values is None:
            return []
        return list(request.image_keys) or [image_key(img) for img in request.pixel_values]

    def _prefix_key(self, request: GenRequest) -> tuple[Any, ...]:
        ids = tuple(request.input_ids[: request.prefix_length])
        types = tuple(request.token_type_ids[: request.prefix_length]) if request.token_type_ids else ()
        return (*self._image_keys(request), ids, types)

    def _vision_kwargs(self) -> dict[str, Any]:
        """LLaVA's get_image_features takes its feature layer as an argument; pass the config's."""
        params = inspect.signature(self.model.model.get_image_features).parameters
        cfg = self.model.config
        return {
            name: getattr(cfg, name)
            for name in ("vision_feature_layer", "vision_feature_select_strategy")
            if name in params and hasattr(cfg, name)
        }

    def _features(self, requests: Sequence[GenRequest]) -> list[list[torch.Tensor]]:
        """Vision-tower outputs per request and image ([tokens, hidden] each); new images batched."""
        per_request = [self._image_keys(r) for r in requests]
        todo: dict[str, torch.Tensor] = {}
        for request, keys in zip(requests, per_request, strict=True):
            for key, image in zip(
                keys, request.pixel_values if request.pixel_values is not None else [], strict=True
            ):
                if key in self._images:
                    self._images.move_to_end(key)
                    self.stats["image_hits"] += 1
                elif key not in todo:
                    todo[key] = image
        items = list(todo.items())
        for start in range(0, len(items), self.settings.vision_batch):
            part = items[start : start + self.settings.vision_batch]
            pixels = torch.stack([img for _, img in part]).to(self.device, self.dtype)
            out = self.model.model.get_image_features(
                pixel_values=pixels, return_dict=True, **self._feature_kwargs
            )
            pooled = out.pooler_output
            for (key, _), feats in zip(part, list(pooled), strict=True):
                self._images[key] = feats
            self.stats["images_encoded"] += len(part)
        found = [[self._images[k] for k in keys] for keys in per_request]
        while len(self._images) > self.settings.image_cache:
            self._images.popitem(last=False)
        return found

    def _compute_prefixes(self, items: list[tuple[tuple[Any, ...], GenRequest]]) -> None:
        """Prefill distinct prefixes with the model's own forward, left-padded in one batch."""
        requests = [r for _, r in items]
        features = self._features(requests)
        length = max(r.prefix_length for r in requests)
        n = len(requests)
        ids = torch.zeros((n, length), dtype=torch.long)
        attention = torch.zeros((n, length), dtype=torch.long)
        types = torch.zeros((n, length), dtype=torch.long)
        for i, r in enumerate(requests):
            p = r.prefix_length
            ids[i, length - p :] = torch.as_tensor(list(r.input_ids[:p]))
            attention[i, length - p :] = 1
            if r.token_type_ids:
                types[i, length - p :] = torch.as_tensor(list(r.token_type_ids[:p]))
        positions = (attention.cumsum(-1) - 1).masked_fill(attention == 0, 0) + self.position_offset
        kwargs: dict[str, Any] = {}
        flat = [f for per in features for f in per]
        if flat:
            pooled: Any = flat if self._features_are_list() else torch.cat(flat, dim=0)
            kwargs["mm_encoder_outputs"] = {"image": BaseModelOutputWithPooling(pooler_output=pooled)}
        if any(r.token_type_ids for r in requests):
            kwargs["token_type_ids"] = types.to(self.device)
        cache = DynamicCache()
        out = self.model(
            input_ids=ids.to(self.device),
            attention_mask=attention.to(self.device),
            position_ids=positions.to(self.device),
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=1,
            **kwargs,
        )
        self.stats["prefills"] += n
        logits = out.logits[:, -1].float()
        for i, ((key, r), row_logits) in enumerate(zip(items, logits, strict=True)):
            first = length - r.prefix_length
            # Copies, not views: a view would keep the whole batch's tensors alive in the LRU.
            kv = [
                (layer.keys[i, :, first:].clone(), layer.values[i, :, first:].clone())
                for layer in cache.layers
            ]
            self._prefixes[key] = _Prefix(kv, row_logits)

    def _features_are_list(self) -> bool:
        """LLaVA concatenates a list of per-image features itself; Gemma 3 and PaliGemma take one tensor."""
        return "llava" in type(self.model).__name__.lower()

    def _extend(self, runs: list[_Running]) -> None:
        """The prompt after the prefix, ``chunk`` tokens per step, on the rows' own slots."""
        chunk = self.settings.chunk
        while runs:
            rows = len(runs)
            ids = torch.zeros((rows, chunk), dtype=torch.long)
            write_slot = torch.full((rows, chunk), self.cache.scratch, dtype=torch.long)
            write_index = torch.zeros((rows, chunk), dtype=torch.long)
            query = torch.zeros((rows, chunk), dtype=torch.long)
            end = torch.zeros(rows, dtype=torch.long)
            last = torch.zeros(rows, dtype=torch.long)
            for i, run in enumerate(runs):
                todo = list(run.request.input_ids[run.length : run.length + chunk])
                n = len(todo)
                ids[i, :n] = torch.as_tensor(todo)
                write_slot[i, :n] = run.slot
                write_index[i] = torch.arange(run.length, run.length + chunk)
                query[i] = torch.clamp(write_index[i], max=run.length + n - 1)
                end[i] = run.length + n
                last[i] = n - 1
            step = Step(
                input_ids=ids.to(self.device),
                positions=(write_index + self.position_offset).to(self.device),
                write_slot=write_slot.to(self.device),
                write_index=write_index.to(self.device),
                query_index=query.to(self.device),
                end=end.to(self.device),
                last=last.to(self.device),
                rows=torch.tensor([r.slot for r in runs], device=self.device),
                width=_pick(self.width_buckets, int(end.max())),
            )
            logits = self.forward(step)
            self.stats["extend_steps"] += 1
            still = []
            for i, run in enumerate(runs):
                run.length = int(end[i])
                if run.length == len(run.request.input_ids):
                    self._accept(run, logits[i])
                else:
                    still.append(run)
            runs = still

    # -- phase 3: decode ----------------------------------------------------------------
    def forward(self, step: Step) -> torch.Tensor:
        """One pass of the language model over ``step``; next-token logits [rows, vocab], float32."""
        masks = self.cache.masks(step, self.additive)
        mask: Any = masks if SLIDING in masks else masks[FULL]
        out = self.language_model(
            input_ids=step.input_ids,
            attention_mask=mask,
            position_ids=step.positions,
            past_key_values=self.cache,
            use_cache=True,
        )
        hidden = out.last_hidden_state
        hidden = hidden[torch.arange(hidden.shape[0], device=hidden.device), step.last]
        logits = self.lm_head(hidden).float()
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits

    def decode_step(self, batch: int, width: int, slots: dict[int, tuple[int, int]]) -> torch.Tensor:
        """One token for each slot in ``slots`` ({slot: (token, length)}) over rows 0..batch-1."""
        ids = torch.zeros((batch, 1), dtype=torch.long)
        index = torch.zeros((batch, 1), dtype=torch.long)
        write_slot = torch.arange(batch, dtype=torch.long)[:, None].clone()
        for slot, (token, length) in slots.items():
            ids[slot, 0] = token
            index[slot, 0] = length
        if self.graphs is not None:
            logits = self.graphs.run(batch, width, ids, index)
            if logits is not None:
                self.stats["graph_replays"] += 1
                return logits
        step = Step(
            input_ids=ids.to(self.device),
            positions=(index + self.position_offset).to(self.device),
            write_slot=write_slot.to(self.device),
            write_index=index.to(self.device),
            query_index=index.to(self.device),
            end=(index[:, 0] + 1).to(self.device),
            last=torch.zeros(batch, dtype=torch.long, device=self.device),
            rows=None,
            width=width,
        )
        return self.forward(step)

    @torch.inference_mode()
    def _decode(self) -> None:
        runs = sorted(self._running.values(), key=lambda r: r.slot)
        batch = _pick(self.batch_buckets, runs[-1].slot + 1)
        width = _pick(self.width_buckets, max(r.length for r in runs) + 1)
        slots = {r.slot: (r.generated[-1], r.length) for r in runs}
        logits = self.decode_step(batch, width, slots)
        self.stats["decode_steps"] += 1
        self.stats["decode_rows"] += len(runs)
        greedy = logits.argmax(-1).tolist() if any(self._plain(r) for r in runs) else []  # one sync per step
        for run in runs:
            run.length += 1
            self._accept(run, logits[run.slot], greedy[run.slot] if self._plain(run) else None)
