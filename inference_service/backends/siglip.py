"""MedSigLIP backend (``SiglipModel``): zero-shot classification and image embeddings.

Images are windowed, zero-padded to a square and resized to the model's size
(448 px for MedSigLIP); label prompts are tokenized to max_length padding of at
most 64 tokens, as the model was trained; scores are sigmoid(logits_per_image).

The image tower runs once per batch; the label prompts' text embeddings are
computed once per label set and kept (a hospital classifies against the same
few label sets all day), so a classification costs one image forward and a
small matrix product, computed as ``SiglipModel.forward`` does.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image
from transformers import AutoModel, AutoProcessor

from inference_service.backends._hf import HFBackend
from inference_service.backends.base import ModelConfig, ProgressCallback, WorkItem
from inference_service.backends.medgemma import label_code
from inference_service.errors import InvalidInput, UnsupportedTask
from inference_service.preprocess import SquareFit, to_rgb
from inference_service.types import Finding, TaskKind, TaskResult, Volume

MAX_TEXT_TOKENS = 64
PROMPTS = {"classify": "a chest X-ray showing {label}"}
TEXT_CACHE = 32  # label sets whose text embeddings are kept


class SiglipBackend(HFBackend):
    kind = "siglip"
    accepted = frozenset({"CR", "DX", "CT", "MR"})

    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config)
        self._text: OrderedDict[tuple[str, ...], torch.Tensor] = OrderedDict()

    @property
    def tasks(self) -> frozenset[TaskKind]:
        return frozenset({TaskKind.CLASSIFY, TaskKind.EMBED})

    def _load(self, path: Path, dtype: torch.dtype) -> None:
        self.processor = AutoProcessor.from_pretrained(path, local_files_only=True)
        self.model = AutoModel.from_pretrained(path, local_files_only=True, dtype=dtype)

    @property
    def image_size(self) -> int:
        return int(self.processor.image_processor.size["height"])

    def _image(self, volume: Volume) -> Image.Image:
        g = volume.geometry
        middle = volume.voxels[g.shape[0] // 2]  # one representative slice of a series
        fit = SquareFit(g.shape[1], g.shape[2], self.image_size)
        return Image.fromarray(
            fit.apply(to_rgb(middle, g.modality, g.rescaled, g.window, self.config.preprocess or "window"))
        )

    @torch.inference_mode()
    def run(
        self, batch: Sequence[WorkItem], task: TaskKind, progress: ProgressCallback | None = None
    ) -> list[TaskResult]:
        if task not in self.tasks:
            raise UnsupportedTask(f"Model {self.config.name!r} cannot do task {task.value!r}.")
        images = [self._image(item.volume) for item in batch]
        pixels = self.processor(images=images, return_tensors="pt")["pixel_values"].to(
            self.device, self.model.dtype
        )
        emb = self.model.get_image_features(pixel_values=pixels)
        emb = getattr(emb, "pooler_output", emb)
        if task is TaskKind.EMBED:
            emb = torch.nn.functional.normalize(emb.float(), dim=-1).cpu().tolist()
            results = [TaskResult(task=task, embedding=e, prompt_id=f"{self.config.name}:embed") for e in emb]
        else:
            image_embeds = emb / emb.norm(p=2, dim=-1, keepdim=True)
            results = [self._classify(item, image_embeds[i : i + 1]) for i, item in enumerate(batch)]
        if progress:
            progress(1.0, f"{task.value} x{len(batch)}")
        return results

    def _text_embeds(self, texts: tuple[str, ...]) -> torch.Tensor:
        """Normalized text embeddings of the label prompts, computed once per label set."""
        cached = self._text.get(texts)
        if cached is not None:
            self._text.move_to_end(texts)
            return cached
        tokens = self.processor.tokenizer(
            list(texts), padding="max_length", max_length=MAX_TEXT_TOKENS, truncation=True, return_tensors="pt"
        ).to(self.device)
        out = self.model.get_text_features(input_ids=tokens["input_ids"])
        embeds = getattr(out, "pooler_output", out)
        embeds = embeds / embeds.norm(p=2, dim=-1, keepdim=True)
        self._text[texts] = embeds
        while len(self._text) > TEXT_CACHE:
            self._text.popitem(last=False)
        return embeds

    def _classify(self, item: WorkItem, image_embeds: torch.Tensor) -> TaskResult:
        labels = list(item.spec.labels) or list(self.config.labels)
        if not labels:
            raise InvalidInput("Zero-shot classification needs labels (request or model config).")
        prompt_id, _ = self.prompt("classify", PROMPTS["classify"], label="")
        texts = tuple(self.prompt("classify", PROMPTS["classify"], label=lb)[1] for lb in labels)
        text_embeds = self._text_embeds(texts)
        logits = text_embeds @ image_embeds.t().to(text_embeds.device)  # as SiglipModel.forward
        logits = logits * self.model.logit_scale.exp() + self.model.logit_bias
        scores = torch.sigmoid(logits.t().float())[0].cpu().tolist()
        result = TaskResult(task=TaskKind.CLASSIFY, prompt_id=prompt_id)
        for label, score in zip(labels, scores, strict=True):
            result.findings.append(
                Finding(label_code(self.config.labels, label), round(score, 4), score >= 0.5, label)
            )
        result.raw_output = "\n".join(f"{lb}: sigmoid={s:.4f}" for lb, s in zip(labels, scores, strict=True))
        return result
