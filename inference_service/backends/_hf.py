"""Shared pieces of the transformers backends: offline checkpoint checks, device
and dtype choice, weight checksums, batched greedy generation, forced decoding.

torch and transformers are imported here and in the backend modules only, so
the rest of the service (and the reference backend) runs without them.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import LogitsProcessor, LogitsProcessorList

from inference_service.backends.base import Backend, ModelConfig, WorkItem
from inference_service.errors import CheckpointError
from inference_service.parsing import split_report
from inference_service.types import ModelIdentity, ReportText, TaskKind, TaskResult

logger = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
WEIGHT_PATTERNS = ("model.safetensors", "pytorch_model.bin")
INDEX_SUFFIX = ".index.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "spiece.model", "vocab.json", "tokenizer_config.json")
PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json")


def weight_files(path: Path) -> list[Path]:
    """The weight files of a checkpoint directory (single file or sharded with an index)."""
    for name in WEIGHT_PATTERNS:
        single = path / name
        if single.is_file():
            return [single]
        index = path / f"{name}{INDEX_SUFFIX}"
        if index.is_file():
            try:
                shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            except (ValueError, KeyError) as exc:
                raise CheckpointError(f"{index} is not a valid weight index: {exc}") from exc
            missing = [s for s in shards if not (path / s).is_file()]
            if missing:
                raise CheckpointError(
                    f"Checkpoint {path} is missing weight shard {missing[0]} (named in {index.name})."
                )
            return [path / s for s in shards]
    raise CheckpointError(
        f"Checkpoint {path} has no weights: expected model.safetensors, pytorch_model.bin or a sharded index."
    )


def check_checkpoint(path: Path | None, needs_processor: bool = True) -> list[Path]:
    """Fail at start-up, naming the missing file, rather than at the first study."""
    if path is None:
        raise CheckpointError("No checkpoint path is configured.")
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"Checkpoint directory {path} does not exist.")
    if not (path / CONFIG_FILE).is_file():
        raise CheckpointError(f"Checkpoint {path} is missing {CONFIG_FILE}.")
    try:
        json.loads((path / CONFIG_FILE).read_text())
    except ValueError as exc:
        raise CheckpointError(f"{path / CONFIG_FILE} is not valid JSON: {exc}") from exc
    files = weight_files(path)
    if needs_processor:
        if not any((path / f).is_file() for f in TOKENIZER_FILES):
            raise CheckpointError(
                f"Checkpoint {path} is missing its tokenizer (tokenizer.json or tokenizer.model)."
            )
        if not any((path / f).is_file() for f in PROCESSOR_FILES):
            raise CheckpointError(
                f"Checkpoint {path} is missing processor_config.json / preprocessor_config.json."
            )
    return files


def sha256_of(files: Sequence[Path]) -> str:
    """One SHA-256 over the weight files (names and bytes, in name order)."""
    digest = hashlib.sha256()
    for f in sorted(files, key=lambda p: p.name):
        digest.update(f.name.encode())
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def pick_device(setting: str) -> torch.device:
    if setting and setting != "auto":
        return torch.device(setting)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def pick_dtype(setting: str, device: torch.device) -> torch.dtype:
    """bf16 on a GPU (MedGemma is not stable in fp16), float32 on the CPU, unless configured."""
    if setting and setting != "auto":
        try:
            return {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[setting]
        except KeyError as exc:
            raise CheckpointError(f"Unknown dtype {setting!r} (bfloat16, float16, float32).") from exc
    return torch.bfloat16 if device.type == "cuda" else torch.float32


@contextlib.contextmanager
def offline() -> Iterator[None]:
    """Make any hub access fail instead of downloading (weights are local paths)."""
    saved = {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    os.environ.update({"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


class ForcedTokens(LogitsProcessor):
    """Makes generate emit a fixed token sequence, then ``eos`` (tests drive parsers with it)."""

    def __init__(self, token_ids: Sequence[int], eos_token_id: int, prompt_length: int) -> None:
        self.token_ids = list(token_ids)
        self.eos_token_id = eos_token_id
        self.prompt_length = prompt_length

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        step = input_ids.shape[1] - self.prompt_length
        target = self.token_ids[step] if step < len(self.token_ids) else self.eos_token_id
        forced = torch.full_like(scores, float("-inf"))
        forced[:, target] = 0.0
        return forced


def parse_text_task(result: TaskResult, text: str, language: str) -> bool:
    """Fill a VQA answer or a report from generated text; False if the task is neither."""
    if result.task is TaskKind.VQA:
        result.answer = text.strip()
        result.unparsed = not result.answer
    elif result.task is TaskKind.REPORT:
        parts = split_report(text)
        result.unparsed = parts is None
        if parts is not None:
            result.report = ReportText(findings=parts[0], impression=parts[1], language=language or "en")
    else:
        return False
    return True


class HFBackend(Backend):
    """Base of the transformers backends: load checks, identity, generation."""

    #: DICOM modalities accepted.
    accepted: frozenset[str] = frozenset({"CR", "DX", "CT", "MR"})
    max_new_tokens_default = 300
    #: Whether ``generation.Engine`` can run this model (image-text-to-text with a language_model).
    engine_capable = False
    #: PaliGemma attends bidirectionally over the whole prompt: only the full prompt is a prefix.
    prefix_lm = False
    #: RoPE position of the first token (PaliGemma counts from 1).
    position_offset = 0

    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config)
        self.model: Any = None
        self.processor: Any = None
        self.device = torch.device("cpu")
        self._sha256 = ""
        self._version = str(config.options.get("version", ""))
        #: Extra logits processors for every generate call (forced decoding in tests).
        self.logits_processors: list[Any] = []
        self.engine: Any = None

    @property
    def modalities(self) -> frozenset[str]:
        return self.accepted

    @property
    def identity(self) -> ModelIdentity:
        return ModelIdentity(self.config.name, self.kind, self._version or "unversioned", self._sha256)

    @property
    def max_new_tokens(self) -> int:
        return int(self.config.options.get("max_new_tokens", self.max_new_tokens_default))

    def load(self) -> None:
        files = check_checkpoint(self.config.path)
        self._sha256 = sha256_of(files)
        self.device = pick_device(self.config.device)
        dtype = pick_dtype(self.config.dtype, self.device)
        with offline():
            try:
                self._load(Path(self.config.path), dtype)  # type: ignore[arg-type]
            except (OSError, ValueError) as exc:
                raise CheckpointError(f"Cannot load {self.config.path}: {exc}") from exc
        self.model.to(self.device).eval()
        if self.engine_capable and self._option_bool("engine", True):
            self.engine = self._make_engine()
        if not self._version:
            cfg = self.model.config
            self._version = str(getattr(cfg, "_name_or_path", "") or "").rsplit("/", 1)[-1] or "local"
            self._version = f"{self._version}@{self._sha256[:12]}"

    def _load(self, path: Path, dtype: torch.dtype) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def _option_bool(self, key: str, default: bool) -> bool:
        value = self.config.options.get(key, default)
        return value if isinstance(value, bool) else str(value).lower() in ("1", "true", "yes", "on")

    def _make_engine(self) -> Any:
        from inference_service.generation import Engine, EngineSettings

        gpu = self.device.type == "cuda"
        opts = self.config.options
        settings = EngineSettings(
            slots=int(opts.get("engine_slots", 32 if gpu else 8)),
            max_length=int(opts.get("engine_max_length", 2048 if gpu else 1024)),
            chunk=int(opts.get("engine_chunk", 64)),
            prefix_cache=int(opts.get("engine_prefix_cache", 16)),
            cuda_graphs=self._option_bool("cuda_graphs", True),
        )
        engine = Engine(self.model, settings, position_offset=self.position_offset)
        logger.info(
            "generation engine ready",
            extra={
                "event": "engine.ready",
                "model": self.config.name,
                "slots": settings.slots,
                "max_length": settings.max_length,
                "cache_bytes": engine.cache.bytes,
            },
        )
        return engine

    @property
    def continuous(self) -> bool:
        return self.engine is not None

    @property
    def concurrency(self) -> int:
        return self.engine.settings.slots if self.engine is not None else 1

    def close(self) -> None:
        if self.engine is not None:
            self.engine.stop()

    def model_call(self, fn: Any) -> Any:
        """Run a direct forward pass (classification) on the engine's thread when there is one."""
        return self.engine.call(fn) if self.engine is not None else fn()

    def prompt(self, key: str, default: str, **values: str) -> tuple[str, str]:
        """(prompt id, text) for a task, from the config's prompts or the default."""
        template = self.config.prompts.get(key, default)
        prompt_id = f"{self.config.name}:{key}:{hashlib.sha256(template.encode()).hexdigest()[:8]}"
        return prompt_id, template.format(**values)

    def generate(
        self,
        inputs: dict[str, Any],
        max_new_tokens: int | None = None,
        items: Sequence[WorkItem] | None = None,
    ) -> list[str]:
        """Greedy generation on a left-padded batch; returns the decoded continuations."""
        return self.generate_ids(inputs, max_new_tokens, items)[0]

    def generate_ids(
        self,
        inputs: dict[str, Any],
        max_new_tokens: int | None = None,
        items: Sequence[WorkItem] | None = None,
    ) -> tuple[list[str], list[torch.Tensor]]:
        """The continuations as text and as token ids (for callers that decode special tokens).

        With the engine each row becomes its own request (``items`` give their cancel
        event and deadline); rows too long for the engine's cache use plain ``generate``.
        Several calls may run at once (the engine's lanes), so the ids are returned, not kept;
        ``last_generated_ids`` is for single-threaded tests only.
        """
        limit = max_new_tokens or self.max_new_tokens
        ids: list[torch.Tensor] | None = None
        if self.engine is not None:
            lengths = inputs["attention_mask"].sum(-1).tolist()
            if all(self.engine.fits(int(n), limit) for n in lengths):
                ids = self._engine_generate(inputs, limit, items)
            else:
                logger.info(
                    "prompt longer than the engine's cache: plain generate",
                    extra={"event": "engine.fallback", "tokens": max(lengths)},
                )
        if ids is None:
            ids = self._plain_generate(inputs, limit)
        self.last_generated_ids = ids
        return self.processor.tokenizer.batch_decode(ids, skip_special_tokens=True), ids

    def engine_requests(
        self, inputs: dict[str, Any], limit: int, items: Sequence[WorkItem] | None = None
    ) -> list[Any]:
        """One engine request per row of a left-padded processor batch (pads dropped, images split)."""
        from inference_service.generation import GenRequest
        from inference_service.generation.engine import image_key

        eos = self.model.generation_config.eos_token_id
        eos_ids = frozenset(eos if isinstance(eos, list) else [] if eos is None else [eos])
        image_token = getattr(self.model.config, "image_token_id", None)
        pixels = inputs.get("pixel_values")
        types = inputs.get("token_type_ids")
        cursor = 0
        requests = []
        for row in range(inputs["input_ids"].shape[0]):
            keep = inputs["attention_mask"][row].bool()
            ids = inputs["input_ids"][row][keep].tolist()
            is_image = [t == image_token for t in ids]
            images = sum(1 for j, v in enumerate(is_image) if v and (j == 0 or not is_image[j - 1]))
            row_pixels = pixels[cursor : cursor + images] if pixels is not None and images else None
            cursor += images
            if self.prefix_lm:
                prefix = len(ids) if images else 0
            else:  # causal after the images: the prompt text is not part of the shared prefix
                prefix = max((j + 1 for j, v in enumerate(is_image) if v), default=0)
            item = items[row] if items is not None and row < len(items) else None
            requests.append(
                GenRequest(
                    input_ids=ids,
                    max_new_tokens=limit,
                    eos_token_ids=eos_ids,
                    pixel_values=row_pixels,
                    image_keys=tuple(image_key(img) for img in row_pixels) if row_pixels is not None else (),
                    token_type_ids=types[row][keep].tolist() if types is not None else None,
                    prefix_length=prefix,
                    logits_processors=[
                        p(len(ids)) if callable(p) and not isinstance(p, LogitsProcessor) else p
                        for p in self.logits_processors
                    ],
                    cancel=item.cancel if item is not None else None,
                    deadline=item.deadline if item is not None else None,
                )
            )
        return requests

    def _engine_generate(
        self, inputs: dict[str, Any], limit: int, items: Sequence[WorkItem] | None
    ) -> list[torch.Tensor]:
        futures = [self.engine.submit(r) for r in self.engine_requests(inputs, limit, items)]
        return [torch.tensor(f.result(), dtype=torch.long) for f in futures]

    @torch.inference_mode()
    def _plain_generate(self, inputs: dict[str, Any], limit: int) -> list[torch.Tensor]:
        inputs = {k: v.to(self.device) if hasattr(v, "to") else v for k, v in inputs.items()}
        inputs.pop("labels", None)
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
        prompt_length = inputs["input_ids"].shape[1]
        processors = LogitsProcessorList(
            p(prompt_length) if callable(p) and not isinstance(p, LogitsProcessor) else p
            for p in self.logits_processors
        )
        out = self.model.generate(
            **inputs,
            max_new_tokens=limit,
            do_sample=False,
            logits_processor=processors,
        )
        return list(out[:, prompt_length:].cpu())
