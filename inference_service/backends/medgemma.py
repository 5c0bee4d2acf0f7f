"""MedGemma (Gemma 3 image-text-to-text) backend: report, VQA, classification, CXR boxes.

Loaded with ``AutoModelForImageTextToText`` + ``AutoProcessor`` from a local
directory. 2D images are windowed, zero-padded to a centred square and resized
to the model's input size by ``preprocess.SquareFit`` (so the processor's own
resize is an identity and boxes map back exactly). CT/MR series go in the
MedGemma 1.5 way: uniformly sampled slices, CT as three windows packed in RGB,
one image per slice, all in one user turn.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

from inference_service.backends._hf import HFBackend, parse_text_task
from inference_service.backends.base import ProgressCallback, WorkItem
from inference_service.errors import InvalidInput, UnsupportedTask
from inference_service.parsing import parse_box_2d
from inference_service.preprocess import SquareFit, sample_slices, to_rgb
from inference_service.types import Box, Code, Finding, TaskKind, TaskResult, Volume

LOCAL_SCHEME = "99RADBRIDGE"
LANGUAGE_NAMES = {"en": "English", "zh": "Chinese", "de": "German", "fr": "French", "es": "Spanish"}
PROMPTS = {
    "report": "Write a radiology report for this {modality} image with a 'Findings:' section and an "
    "'Impression:' section.",
    "language": " Write the report in {language}.",
    "classify": "Is there {label} in this image? Answer yes or no.",
    "choose": "Which one of the following best describes this image: {labels}? Answer with exactly one of them.",
    "detect": "Locate {labels} in this chest X-ray. Output a JSON list with one object per finding: "
    '{{"box_2d": [y0, x0, y1, x1], "label": "<name>"}}, coordinates normalized to 0-1000.',
}


def label_code(labels: dict[str, list[str]], label: str) -> Code:
    """The configured code of a label, or a local-scheme code that keeps the text."""
    entry = labels.get(label)
    if entry and len(entry) == 3:
        return Code(*entry)
    return Code(
        label.strip().lower().replace(" ", "-")[:16] or "unknown", LOCAL_SCHEME, label[:64] or "unknown"
    )


class PreparedImage:
    """The images of one item and the geometry record to map 2D outputs back."""

    def __init__(self, images: list[Image.Image], fit: SquareFit | None) -> None:
        self.images = images
        self.fit = fit


def prepare(volume: Volume, size: int, preset: str = "") -> PreparedImage:
    """2D: one image + its SquareFit; a series: sampled slices (boxes are not mapped back)."""
    g = volume.geometry
    fit = SquareFit(g.shape[1], g.shape[2], size)

    def rgb(k: int) -> np.ndarray:
        if g.samples_per_pixel == 3:
            return np.clip(volume.voxels[k], 0, 255).astype(np.uint8)
        return to_rgb(volume.voxels[k], g.modality, g.rescaled, g.window, preset)

    if g.shape[0] == 1:
        return PreparedImage([Image.fromarray(fit.apply(rgb(0)))], fit)
    return PreparedImage([Image.fromarray(fit.apply(rgb(k))) for k in sample_slices(g.shape[0])], None)


class MedGemmaBackend(HFBackend):
    kind = "medgemma"
    engine_capable = True

    @property
    def tasks(self) -> frozenset[TaskKind]:
        return frozenset({TaskKind.REPORT, TaskKind.VQA, TaskKind.CLASSIFY, TaskKind.DETECT})

    def _load(self, path: Path, dtype: torch.dtype) -> None:
        self.processor = AutoProcessor.from_pretrained(path, local_files_only=True)
        self.processor.tokenizer.padding_side = "left"
        self.model = AutoModelForImageTextToText.from_pretrained(path, local_files_only=True, dtype=dtype)

    @property
    def image_size(self) -> int:
        size = self.processor.image_processor.size
        return int(size.get("height") or size.get("shortest_edge"))

    def build_inputs(self, prepared: Sequence[PreparedImage], prompts: Sequence[str]) -> dict[str, Any]:
        """Chat-formatted, left-padded processor inputs for a batch."""
        texts = []
        for item, prompt in zip(prepared, prompts, strict=True):
            content = [{"type": "image"} for _ in item.images] + [{"type": "text", "text": prompt}]
            messages = [{"role": "user", "content": content}]
            texts.append(
                self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            )
        return self.processor(
            text=texts, images=[p.images for p in prepared], return_tensors="pt", padding=True
        )

    def run(
        self, batch: Sequence[WorkItem], task: TaskKind, progress: ProgressCallback | None = None
    ) -> list[TaskResult]:
        if task not in self.tasks:
            raise UnsupportedTask(f"Model {self.config.name!r} cannot do task {task.value!r}.")
        prepared = [prepare(item.volume, self.image_size, self.config.preprocess) for item in batch]
        if task is TaskKind.CLASSIFY and self.config.options.get("classify_mode", "yesno") == "choice":
            results = [self._choose(item, prep) for item, prep in zip(batch, prepared, strict=True)]
        elif task is TaskKind.CLASSIFY:
            results = self._classify(batch, prepared)
        else:
            results = self._generate(batch, prepared, task)
        if progress:
            progress(1.0, f"{task.value} x{len(batch)}")
        return results

    # -- generation tasks -------------------------------------------------------------
    def _prompt_for(self, item: WorkItem, task: TaskKind) -> tuple[str, str]:
        modality = item.volume.geometry.modality
        if task is TaskKind.REPORT:
            prompt_id, text = self.prompt("report", PROMPTS["report"], modality=modality)
            lang = item.spec.language.split("-")[0] if item.spec.language else "en"
            if lang != "en":
                text += self.prompt("language", PROMPTS["language"], language=LANGUAGE_NAMES.get(lang, lang))[
                    1
                ]
                prompt_id += f"+{lang}"
            return prompt_id, text
        if task is TaskKind.VQA:
            if not item.spec.question:
                raise InvalidInput("VQA needs a question.")
            return f"{self.config.name}:vqa", item.spec.question
        if task is TaskKind.DETECT:
            if item.volume.geometry.shape[0] != 1:
                raise InvalidInput("Localization works on a single 2D image (a CXR), not a series.")
            labels = list(item.spec.labels) or list(self.config.labels) or ["abnormalities"]
            return self.prompt("detect", PROMPTS["detect"], labels=", ".join(labels))
        raise UnsupportedTask(f"Task {task.value!r} is not a generation task.")

    def _generate(
        self, batch: Sequence[WorkItem], prepared: list[PreparedImage], task: TaskKind
    ) -> list[TaskResult]:
        prompts = [self._prompt_for(item, task) for item in batch]
        texts = self.generate(self.build_inputs(prepared, [p for _, p in prompts]), items=batch)
        return [
            self._parse(task, text, prompt_id, item, prep)
            for text, (prompt_id, _), item, prep in zip(texts, prompts, batch, prepared, strict=True)
        ]

    def _parse(
        self, task: TaskKind, text: str, prompt_id: str, item: WorkItem, prep: PreparedImage
    ) -> TaskResult:
        result = TaskResult(task=task, prompt_id=prompt_id, raw_output=text)
        if parse_text_task(result, text, item.spec.language):
            return result
        if task is TaskKind.DETECT:
            boxes = parse_box_2d(text, 1000.0)
            if boxes is None or prep.fit is None:
                result.unparsed = True
            else:
                for b in boxes:
                    r0, c0, r1, c1 = prep.fit.box_from_normalized(b.y0, b.x0, b.y1, b.x1, 1000.0)
                    result.boxes.append(
                        Box(0, r0, c0, r1, c1, label_code(self.config.labels, b.label), b.label)
                    )
        return result

    # -- classification as constrained yes/no answers ----------------------------------
    @torch.inference_mode()
    def _classify(self, batch: Sequence[WorkItem], prepared: list[PreparedImage]) -> list[TaskResult]:
        tok = self.processor.tokenizer
        yes = tok.encode("yes", add_special_tokens=False)[0]
        no = tok.encode("no", add_special_tokens=False)[0]
        results = []
        for item, prep in zip(batch, prepared, strict=True):
            labels = self._labels(item)
            prompt_ids, prompts = zip(
                *(self.prompt("classify", PROMPTS["classify"], label=lb) for lb in labels), strict=True
            )
            inputs = self.build_inputs([prep] * len(labels), list(prompts))
            inputs = {k: v.to(self.device) for k, v in inputs.items()}
            inputs.pop("labels", None)
            inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
            logits = self.model_call(lambda inputs=inputs: self.model(**inputs).logits[:, -1, :].float())
            pair = torch.softmax(logits[:, [yes, no]], dim=-1)[:, 0].cpu().tolist()
            result = TaskResult(task=TaskKind.CLASSIFY, prompt_id=prompt_ids[0])
            for label, score in zip(labels, pair, strict=True):
                code = label_code(self.config.labels, label)
                result.findings.append(Finding(code, round(float(score), 4), score >= 0.5, label))
            result.raw_output = "\n".join(f"{lb}: p(yes)={s:.4f}" for lb, s in zip(labels, pair, strict=True))
            results.append(result)
        return results

    # -- classification as a choice within a label set --------------------------------
    def _labels(self, item: WorkItem) -> list[str]:
        labels = list(item.spec.labels) or list(self.config.labels)
        if not labels:
            raise InvalidInput("Classification needs labels (in the request or the model's config).")
        return labels

    @torch.inference_mode()
    def label_log_probs(self, prep: PreparedImage, prompt: str, labels: Sequence[str]) -> list[float]:
        """Sum of log-probabilities of each label's tokens as the answer (one left-padded batch)."""
        tok = self.processor.tokenizer
        content = [{"type": "image"} for _ in prep.images] + [{"type": "text", "text": prompt}]
        chat = self.processor.apply_chat_template(
            [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False
        )
        lengths = [len(tok.encode(label, add_special_tokens=False)) for label in labels]
        inputs = self.processor(
            text=[chat + label for label in labels],
            images=[prep.images] * len(labels),
            return_tensors="pt",
            padding=True,
        )
        inputs = {k: v.to(self.device) for k, v in inputs.items()}
        inputs.pop("labels", None)
        inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
        logprobs = self.model_call(lambda: torch.log_softmax(self.model(**inputs).logits.float(), dim=-1))
        ids = inputs["input_ids"]
        totals = []
        for row, n in enumerate(lengths):  # left padding: every answer ends at the last position
            positions = torch.arange(ids.shape[1] - n, ids.shape[1], device=ids.device)
            totals.append(float(logprobs[row, positions - 1, ids[row, positions]].sum()))
        return totals

    def _choose(self, item: WorkItem, prep: PreparedImage) -> TaskResult:
        labels = self._labels(item)
        prompt_id, prompt = self.prompt("choose", PROMPTS["choose"], labels=", ".join(labels))
        totals = torch.tensor(self.label_log_probs(prep, prompt, labels))
        probs = torch.softmax(totals, dim=0).tolist()
        best = int(torch.argmax(totals))
        result = TaskResult(task=TaskKind.CLASSIFY, prompt_id=prompt_id)
        for i, (label, p) in enumerate(zip(labels, probs, strict=True)):
            result.findings.append(
                Finding(label_code(self.config.labels, label), round(p, 4), i == best, label)
            )
        result.raw_output = "\n".join(
            f"{lb}: logp={t:.4f}" for lb, t in zip(labels, totals.tolist(), strict=True)
        )
        return result
