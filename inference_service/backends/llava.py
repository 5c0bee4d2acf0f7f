"""Bilingual (English / Chinese) report model in the LLaVA layout (SunMed-VL / Doctor Sun style).

``LlavaForConditionalGeneration`` + ``AutoProcessor`` from a local directory.
The chat flow, preprocessing and report parsing are MedGemma's; what differs is
the model class and the per-language report prompt (the report's language is
carried into the narrative SR's Language of Content Item).
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoProcessor, LlavaForConditionalGeneration

from inference_service.backends.base import WorkItem
from inference_service.backends.medgemma import MedGemmaBackend
from inference_service.types import TaskKind

PROMPTS = {
    "report_en": "Write a radiology report for this {modality} image with a 'Findings:' section and an "
    "'Impression:' section.",
    "report_zh": "请为这张{modality}影像撰写放射学报告，分为“所见：”和“结论：”两部分。",
}


class LlavaBackend(MedGemmaBackend):
    kind = "llava"

    @property
    def tasks(self) -> frozenset[TaskKind]:
        return frozenset({TaskKind.REPORT, TaskKind.VQA})

    def _load(self, path: Path, dtype: torch.dtype) -> None:
        self.processor = AutoProcessor.from_pretrained(path, local_files_only=True)
        self.processor.tokenizer.padding_side = "left"
        self.model = LlavaForConditionalGeneration.from_pretrained(path, local_files_only=True, dtype=dtype)

    @property
    def image_size(self) -> int:
        size = self.processor.image_processor.size
        return int(size.get("height") or size.get("shortest_edge"))

    def _prompt_for(self, item: WorkItem, task: TaskKind) -> tuple[str, str]:
        if task is not TaskKind.REPORT:
            return super()._prompt_for(item, task)
        lang = "zh" if (item.spec.language or "en").lower().startswith("zh") else "en"
        return self.prompt(
            f"report_{lang}", PROMPTS[f"report_{lang}"], modality=item.volume.geometry.modality
        )
