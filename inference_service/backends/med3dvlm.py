"""Med3DVLM backend: native 3D CT report and VQA, and zero-shot classify / embed through the
DCFormer-text contrastive pair when ``options.clip_path`` is configured.

The whole CT goes in as one cube (``volume3d.prepare_ct``: reorient, foreground
crop, min-max, resize to 128x256x256 by default) and becomes 256 visual tokens;
several CTs of one lane run as one forward pass, up to ``max_batch`` (option;
by default what fits in the free GPU memory at ``volume_memory_gib`` per CT).

The checkpoint is the published layout (``model_type = "vlm_qwen"``, a Qwen2
tokenizer with ``<im_patch>`` added), loaded by ``AutoModelForCausalLM`` with
``trust_remote_code=False``: the classes are this project's
(``med3dvlm_modeling``), registered with the Auto classes on import. Prompts are
plain text after the 256 placeholders, as the model was trained (no chat template).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

from inference_service.backends import med3dvlm_modeling as modeling
from inference_service.backends._hf import (
    TOKENIZER_FILES,
    HFBackend,
    check_checkpoint,
    offline,
    parse_text_task,
    pick_device,
    pick_dtype,
    sha256_of,
)
from inference_service.backends.base import ProgressCallback, WorkItem
from inference_service.backends.medgemma import label_code
from inference_service.errors import CheckpointError, InvalidInput, UnsupportedTask
from inference_service.types import Finding, TaskKind, TaskResult
from inference_service.volume3d import (
    DEFAULT_AXES,
    DEFAULT_FOREGROUND_HU,
    DEFAULT_SIZE,
    PreparedCT,
    prepare_ct,
    stack,
)

PROMPTS = {
    "report": "Describe the findings of the medical image you see.",
    "classify": "{label}",
}
MAX_TEXT_TOKENS = 128
GIB = 1 << 30


@dataclass
class _Tokenizers:
    """What ``HFBackend.generate`` and the test helpers reach as ``backend.processor``."""

    tokenizer: Any


def check_loading_info(path: Path, info: dict[str, Any]) -> None:
    """A published-layout checkpoint loads every weight by name; anything else is named and refused."""
    missing = sorted(info.get("missing_keys") or [])
    unexpected = sorted(info.get("unexpected_keys") or [])
    mismatched = [str(m[0]) if isinstance(m, tuple) else str(m) for m in info.get("mismatched_keys") or []]
    problems = []
    if missing:
        problems.append(
            f"missing weight {missing[0]}" + (f" (+{len(missing) - 1} more)" if len(missing) > 1 else "")
        )
    if unexpected:
        problems.append(
            f"unexpected weight {unexpected[0]}"
            + (f" (+{len(unexpected) - 1} more)" if len(unexpected) > 1 else "")
        )
    if mismatched:
        problems.append(f"weight {mismatched[0]} has the wrong shape")
    if problems:
        raise CheckpointError(f"Checkpoint {path} does not match the Med3DVLM layout: {'; '.join(problems)}.")


class Med3DVLMBackend(HFBackend):
    kind = "med3dvlm"
    accepted = frozenset({"CT"})
    max_new_tokens_default = 256

    def __init__(self, config: Any) -> None:
        super().__init__(config)
        self.clip: Any = None
        self.clip_tokenizer: Any = None
        self.max_batch = 0

    @property
    def tasks(self) -> frozenset[TaskKind]:
        tasks = {TaskKind.REPORT, TaskKind.VQA}
        if self.config.options.get("clip_path"):
            tasks |= {TaskKind.EMBED, TaskKind.CLASSIFY}
        return frozenset(tasks)

    # -- loading ----------------------------------------------------------------------
    def load(self) -> None:
        path = Path(self.config.path) if self.config.path else None
        files = check_checkpoint(path, needs_processor=False)
        assert path is not None
        if not any((path / f).is_file() for f in TOKENIZER_FILES):
            raise CheckpointError(
                f"Checkpoint {path} is missing its tokenizer (tokenizer.json or vocab.json)."
            )
        clip_path = self.config.options.get("clip_path")
        clip_files = check_checkpoint(Path(clip_path), needs_processor=False) if clip_path else []
        self._sha256 = sha256_of(files + clip_files)
        self.device = pick_device(self.config.device)
        dtype = pick_dtype(self.config.dtype, self.device)
        with offline():
            try:
                self._load_vlm(path, dtype)
                if clip_path:
                    self._load_clip(Path(clip_path), dtype)
            except (OSError, ValueError, KeyError) as exc:
                raise CheckpointError(f"Cannot load {path}: {exc}") from exc
        self.model.to(self.device).eval()
        if self.clip is not None:
            self.clip.to(self.device).eval()
        if not self._version:
            self._version = f"{path.name or 'local'}@{self._sha256[:12]}"
        self.max_batch = self._max_batch()

    def _load_vlm(self, path: Path, dtype: torch.dtype) -> None:
        config = AutoConfig.from_pretrained(path, local_files_only=True)
        if not isinstance(config, modeling.Med3DVLMConfig):
            raise CheckpointError(f"{path} is a {config.model_type!r} checkpoint, not Med3DVLM's 'vlm_qwen'.")
        tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
        tok.padding_side = "left"
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        image_token = tok.convert_tokens_to_ids(modeling.IMAGE_TOKEN)
        if image_token is None or image_token == tok.unk_token_id:
            raise CheckpointError(f"The tokenizer of {path} has no {modeling.IMAGE_TOKEN} token.")
        config.image_token_id = int(image_token)
        splice = str(self.config.options.get("splice", "placeholders"))
        if splice not in ("placeholders", "published"):
            raise CheckpointError(f"options.splice must be 'placeholders' or 'published', not {splice!r}.")
        config.published_splice = splice == "published"
        model, info = AutoModelForCausalLM.from_pretrained(
            path, config=config, dtype=dtype, local_files_only=True, output_loading_info=True
        )
        check_loading_info(path, info)
        self.model = model
        self.processor = _Tokenizers(tok)
        if self.model.generation_config.pad_token_id is None:
            self.model.generation_config.pad_token_id = tok.pad_token_id

    def _load_clip(self, path: Path, dtype: torch.dtype) -> None:
        config = AutoConfig.from_pretrained(path, local_files_only=True)
        if not isinstance(config, modeling.Med3DVLMClipConfig):
            raise CheckpointError(f"{path} is a {config.model_type!r} checkpoint, not the 'dec_clip' pair.")
        text_path = self.config.options.get("text_encoder_path")
        if not config.text_config and text_path:  # the published config only names its text encoder
            config.text_config = AutoConfig.from_pretrained(text_path, local_files_only=True).to_dict()
        if not config.text_config:
            raise CheckpointError(
                f"{path} does not describe its text encoder: set options.text_encoder_path to a local "
                f"copy of {config.language_model_name_or_path or 'the text encoder'}."
            )
        model, info = AutoModel.from_pretrained(
            path, config=config, dtype=dtype, local_files_only=True, output_loading_info=True
        )
        check_loading_info(path, info)
        self.clip = model
        self.clip_tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)

    def _max_batch(self) -> int:
        """CT volumes per forward pass: the option, else what the free GPU memory holds (1 on CPU)."""
        if "max_batch" in self.config.options:
            return max(1, int(self.config.options["max_batch"]))
        if self.device.type != "cuda":
            return 1
        free, _ = torch.cuda.mem_get_info(self.device)
        per_volume = float(self.config.options.get("volume_memory_gib", 1.0)) * GIB
        return int(max(1, min(8, free // per_volume)))

    # -- preprocessing ----------------------------------------------------------------
    @property
    def input_size(self) -> tuple[int, int, int]:
        size = tuple(int(s) for s in self.config.options.get("size", DEFAULT_SIZE))
        if len(size) != 3:
            raise InvalidInput(f"options.size must be (depth, height, width), got {size}.")
        return size  # type: ignore[return-value]

    def prepare(self, item: WorkItem) -> PreparedCT:
        opts = self.config.options
        window = opts.get("hu_window")
        try:
            return prepare_ct(
                item.volume,
                size=self.input_size,
                axes=str(opts.get("axes", DEFAULT_AXES)),
                foreground_hu=opts.get("foreground_hu", DEFAULT_FOREGROUND_HU)
                if opts.get("crop", True)
                else None,
                margin=int(opts.get("crop_margin", 0)),
                hu_window=(float(window[0]), float(window[1])) if window else None,
            )
        except ValueError as exc:
            raise InvalidInput(str(exc)) from exc

    def images(self, prepared: Sequence[PreparedCT]) -> torch.Tensor:
        return torch.from_numpy(stack(prepared))

    # -- tasks ------------------------------------------------------------------------
    def run(
        self, batch: Sequence[WorkItem], task: TaskKind, progress: ProgressCallback | None = None
    ) -> list[TaskResult]:
        if task not in self.tasks:
            raise UnsupportedTask(f"Model {self.config.name!r} cannot do task {task.value!r}.")
        for item in batch:
            if item.volume.geometry.modality not in self.accepted:
                raise UnsupportedTask(f"Model {self.config.name!r} reads CT volumes only.")
        prepared = [self.prepare(item) for item in batch]
        if task in (TaskKind.REPORT, TaskKind.VQA):
            results = self._generate(batch, prepared, task)
        elif task is TaskKind.EMBED:
            results = self._embed(prepared)
        else:
            results = [self._classify(item, prep) for item, prep in zip(batch, prepared, strict=True)]
        if progress:
            progress(1.0, f"{task.value} x{len(batch)}")
        return results

    def _prompt_for(self, item: WorkItem, task: TaskKind) -> tuple[str, str]:
        if task is TaskKind.REPORT:
            return self.prompt("report", PROMPTS["report"])
        if not item.spec.question:
            raise InvalidInput("VQA needs a question.")
        return f"{self.config.name}:vqa", " " + item.spec.question

    def build_inputs(self, prompts: Sequence[str], prepared: Sequence[PreparedCT]) -> dict[str, Any]:
        """Left-padded ids with ``proj_out_num`` placeholders before each prompt, and the cubes."""
        placeholders = modeling.IMAGE_TOKEN * int(self.model.config.proj_out_num)
        tok = self.processor.tokenizer
        inputs = dict(tok([placeholders + p for p in prompts], return_tensors="pt", padding=True))
        inputs["images"] = self.images(prepared)
        return inputs

    def _generate(
        self, batch: Sequence[WorkItem], prepared: list[PreparedCT], task: TaskKind
    ) -> list[TaskResult]:
        prompts = [self._prompt_for(item, task) for item in batch]
        texts = self.generate(self.build_inputs([p for _, p in prompts], prepared))
        results = []
        for text, (prompt_id, _), item in zip(texts, prompts, batch, strict=True):
            result = TaskResult(task=task, prompt_id=prompt_id, raw_output=text)
            parse_text_task(result, text, item.spec.language)
            results.append(result)
        return results

    @torch.inference_mode()
    def _embed(self, prepared: list[PreparedCT]) -> list[TaskResult]:
        emb = self.clip.encode_image(self.images(prepared).to(self.device)).float().cpu().tolist()
        return [
            TaskResult(task=TaskKind.EMBED, embedding=e, prompt_id=f"{self.config.name}:embed") for e in emb
        ]

    @torch.inference_mode()
    def _classify(self, item: WorkItem, prep: PreparedCT) -> TaskResult:
        labels = list(item.spec.labels) or list(self.config.labels)
        if not labels:
            raise InvalidInput("Zero-shot classification needs labels (request or model config).")
        prompt_id, _ = self.prompt("classify", PROMPTS["classify"], label="")
        texts = [self.prompt("classify", PROMPTS["classify"], label=lb)[1] for lb in labels]
        tokens = self.clip_tokenizer(
            texts, padding=True, max_length=MAX_TEXT_TOKENS, truncation=True, return_tensors="pt"
        ).to(self.device)
        image = self.clip.encode_image(self.images([prep]).to(self.device))
        text = self.clip.encode_text(tokens["input_ids"], tokens["attention_mask"])
        scores = torch.sigmoid(self.clip.pair_logits(image, text).float())[0].cpu().tolist()
        result = TaskResult(task=TaskKind.CLASSIFY, prompt_id=prompt_id)
        for label, score in zip(labels, scores, strict=True):
            result.findings.append(
                Finding(label_code(self.config.labels, label), round(score, 4), score >= 0.5, label)
            )
        result.raw_output = "\n".join(f"{lb}: sigmoid={s:.4f}" for lb, s in zip(labels, scores, strict=True))
        return result
