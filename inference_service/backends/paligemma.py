"""PaliGemma multi-task backend (as PaliGemma-CXR): classify, detect, segment, report, VQA.

One model, task prompts configurable per model. Detection answers are 4
``<locNNNN>`` tokens (y_min, x_min, y_max, x_max in 1024 bins of the square
input, clamped to 1023); segmentation adds 16 ``<segNNN>`` codes decoded by
``vqvae.MaskDecoder`` (weights from ``options.vae_path``) to a 64x64 map that
is resized into the box and thresholded at 0.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers import AutoProcessor, PaliGemmaForConditionalGeneration

from inference_service.backends._hf import HFBackend, parse_text_task
from inference_service.backends.base import ModelConfig, ProgressCallback, WorkItem
from inference_service.backends.medgemma import label_code
from inference_service.errors import InvalidInput, UnsupportedTask
from inference_service.parsing import LocSegObject, parse_loc_seg
from inference_service.preprocess import SquareFit, to_rgb
from inference_service.types import Box, Code, Finding, Mask, TaskKind, TaskResult, Volume
from inference_service.vqvae import MaskDecoder

LOC_BINS = 1024.0
#: PaliGemma-CXR prompts (paper repository); override per model with [models.X.prompts].
PROMPTS = {
    "classify": "What is the diagnosis of the X-ray image?",
    "report": "Generate a medical report for the X-ray image provided",
    "detect": "detect {obj}",
    "segment": "segment {obj}",
}
CATEGORY = ("49755003", "SCT", "Morphologically Abnormal Structure")
LAB_COLOURS = ((54000, 50000, 30000), (40000, 30000, 50000), (60000, 34000, 40000), (45000, 45000, 20000))


class PaliGemmaBackend(HFBackend):
    kind = "paligemma"
    accepted = frozenset({"CR", "DX"})
    engine_capable = True
    prefix_lm = True  # the whole prompt attends bidirectionally
    position_offset = 1

    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config)
        self.mask_decoder: MaskDecoder | None = None

    @property
    def tasks(self) -> frozenset[TaskKind]:
        kinds = {TaskKind.CLASSIFY, TaskKind.DETECT, TaskKind.REPORT, TaskKind.VQA}
        if self.config.options.get("vae_path"):
            kinds.add(TaskKind.SEGMENT)
        return frozenset(kinds)

    def _load(self, path: Path, dtype: torch.dtype) -> None:
        self.processor = AutoProcessor.from_pretrained(path, local_files_only=True)
        self.processor.tokenizer.padding_side = "left"
        self.model = PaliGemmaForConditionalGeneration.from_pretrained(
            path, local_files_only=True, dtype=dtype
        )
        vae = self.config.options.get("vae_path")
        if vae:
            self.mask_decoder = MaskDecoder.from_npz(Path(vae))

    @property
    def image_size(self) -> int:
        return int(self.processor.image_processor.size["height"])

    def _image(self, volume: Volume) -> tuple[Image.Image, SquareFit]:
        g = volume.geometry
        if g.shape[0] != 1:
            raise InvalidInput("PaliGemma takes a single 2D image.")
        fit = SquareFit(g.shape[1], g.shape[2], self.image_size)
        rgb = to_rgb(volume.voxels[0], g.modality, g.rescaled, g.window, self.config.preprocess or "window")
        return Image.fromarray(fit.apply(rgb)), fit

    def _prompt(self, item: WorkItem, task: TaskKind) -> tuple[str, str]:
        if task is TaskKind.VQA:
            if not item.spec.question:
                raise InvalidInput("VQA needs a question.")
            return f"{self.config.name}:vqa", item.spec.question
        objects = " ; ".join(item.spec.labels or self.config.labels) or "abnormality"
        return self.prompt(task.value, PROMPTS[task.value], obj=objects)

    def run(
        self, batch: Sequence[WorkItem], task: TaskKind, progress: ProgressCallback | None = None
    ) -> list[TaskResult]:
        if task not in self.tasks:
            raise UnsupportedTask(f"Model {self.config.name!r} cannot do task {task.value!r}.")
        images, fits = zip(*(self._image(item.volume) for item in batch), strict=True)
        prompts = [self._prompt(item, task) for item in batch]
        inputs = self.processor(
            text=[p for _, p in prompts], images=list(images), return_tensors="pt", padding=True
        )
        texts, ids = self.generate_ids(dict(inputs), items=batch)
        # keep <loc>/<seg> tokens: decode again without dropping special tokens where needed
        raw = self.processor.tokenizer.batch_decode(ids, skip_special_tokens=False)
        results = []
        for item, fit, (prompt_id, _), text, full in zip(batch, fits, prompts, texts, raw, strict=True):
            results.append(self._parse(task, item, fit, prompt_id, text, _strip_specials(full)))
        if progress:
            progress(1.0, f"{task.value} x{len(batch)}")
        return results

    def _parse(
        self, task: TaskKind, item: WorkItem, fit: SquareFit, prompt_id: str, text: str, full: str
    ) -> TaskResult:
        result = TaskResult(task=task, prompt_id=prompt_id, raw_output=full)
        if parse_text_task(result, text, item.spec.language):
            return result
        if task is TaskKind.CLASSIFY:
            label = text.strip()
            if not label:
                result.unparsed = True
            else:
                result.findings.append(Finding(label_code(self.config.labels, label), -1.0, True, label))
        else:
            objects = parse_loc_seg(full)
            if objects is None:
                result.unparsed = True
            else:
                self._objects(result, objects, fit, item.volume.geometry.shape, task)
        return result

    def _objects(
        self,
        result: TaskResult,
        objects: list[LocSegObject],
        fit: SquareFit,
        shape: tuple[int, int, int],
        task: TaskKind,
    ) -> None:
        for i, obj in enumerate(objects):
            r0, c0, r1, c1 = fit.box_from_normalized(*obj.bins, scale=LOC_BINS)
            code = label_code(self.config.labels, obj.label)
            result.boxes.append(Box(0, r0, c0, r1, c1, code, obj.label))
            if task is TaskKind.SEGMENT and obj.seg_codes and self.mask_decoder is not None:
                mask = np.zeros(shape, dtype=bool)
                rr0, cc0, rr1, cc1 = int(round(r0)), int(round(c0)), int(round(r1)), int(round(c1))
                if rr1 > rr0 and cc1 > cc0:
                    logits = torch.from_numpy(self.mask_decoder.decode(obj.seg_codes))[None, None]
                    inside = torch.nn.functional.interpolate(
                        logits, size=(rr1 - rr0, cc1 - cc0), mode="bilinear"
                    )
                    mask[0, rr0:rr1, cc0:cc1] = inside[0, 0].numpy() > 0.0
                result.masks.append(
                    Mask(i + 1, obj.label or code.meaning, Code(*CATEGORY), code, LAB_COLOURS[i % 4], mask)
                )
        if task is TaskKind.SEGMENT and self.mask_decoder is None:
            result.unparsed = True


def _strip_specials(text: str) -> str:
    for token in ("<eos>", "<pad>", "<bos>", "<end_of_turn>"):
        text = text.replace(token, "")
    return text.strip()
