"""M3D-LaMed backend: report, VQA and [SEG] masks on a whole CT volume read natively in 3D.

The checkpoint directory is the published layout (``config.json`` with
``model_type`` "lamed_phi3" or "lamed_llama", the weights, the tokenizer with
``<im_patch>`` and ``[SEG]``), loaded through ``AutoModelForCausalLM`` with
``trust_remote_code=False``: the classes are ours (``m3d_modeling``). The CT
goes through ``volume3d.prepare_ct`` (reorient, foreground crop, min-max to
[0, 1], resize to the model's ``image_size``, 32x256x256 as published); the
prompt is 256 ``<im_patch>`` placeholders then the question, as the model was
trained, and the visual tokens go where the published code put them
(``_splice_mode``). A batch of volumes is one left-padded ``generate`` call.

Segmentation (when the checkpoint has the ``[SEG]`` head, ``segmentation_module``
"segvol"): the published prompt asks for one label's mask; the LM answers with
``[SEG]``; the head's mask (sigmoid > 0.5 on the model cube) is mapped back to
source voxels through the recorded preprocessing and becomes a ``Mask`` (so a
DICOM-SEG on the source series). The ``[SEG]`` token is dropped from text.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from inference_service.backends import m3d_modeling
from inference_service.backends._hf import (
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
from inference_service.backends.reference import ANATOMICAL_STRUCTURE, LAB_FOREGROUND
from inference_service.errors import CheckpointError, InvalidInput, UnsupportedTask
from inference_service.types import Mask, TaskKind, TaskResult
from inference_service.volume3d import DEFAULT_AXES, DEFAULT_FOREGROUND_HU, PreparedCT, prepare_ct, stack

#: Default prompts; the report one is among M3D-Cap's training templates.
PROMPTS = {
    "report": "Please generate a medical report based on this image.",
    "segment": "What is {label} in this image? Please output the segmentation mask.",  # the published example
}
#: Tokenizer files of the published checkpoints (Phi-3 / Llama-2 sentencepiece, or a fast tokenizer).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")


def checkpoint_weight_names(files: Sequence[Path]) -> set[str]:
    """Parameter names stored in a checkpoint's weight files, read from headers and indexes only."""
    from safetensors import safe_open

    names: set[str] = set()
    for f in files:
        if f.suffix == ".safetensors":
            with safe_open(str(f), framework="pt") as fh:
                names.update(fh.keys())
        else:
            index = f.parent / "pytorch_model.bin.index.json"
            if index.is_file():
                names.update(k for k, v in json.loads(index.read_text())["weight_map"].items() if v == f.name)
            else:
                names.update(torch.load(f, map_location="meta", weights_only=True, mmap=True))
    return names


def check_weight_names(path: Path, stored: set[str], expected: set[str]) -> None:
    """Fail, naming the keys, when a checkpoint is not the published M3D-LaMed layout.

    A missing parameter would otherwise be initialised at random without an
    error; a renamed one shows up as both missing and unexpected. The [SEG]
    head's weights (``model.seg_module.*``, ``model.seg_projector.*``) may be there
    unused when the config builds no head (no ``segmentation_module``).
    """
    missing = sorted(expected - stored)
    unexpected = sorted(k for k in stored - expected if not k.startswith(m3d_modeling.SEG_PREFIXES))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(
                f"missing {', '.join(missing[:5])}"
                + (f" (+{len(missing) - 5} more)" if len(missing) > 5 else "")
            )
        if unexpected:
            parts.append(
                f"unexpected {', '.join(unexpected[:5])}"
                + (f" (+{len(unexpected) - 5} more)" if len(unexpected) > 5 else "")
            )
        raise CheckpointError(f"Checkpoint {path} is not in the M3D-LaMed layout: {'; '.join(parts)}.")


class _Tokenizer:
    """What ``HFBackend.generate`` needs of a processor: its tokenizer."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer


class M3DBackend(HFBackend):
    """M3D-LaMed (3D ViT + spatial-pooling projector + Phi-3 or Llama-2)."""

    kind = "m3d"
    accepted = frozenset({"CT"})
    max_new_tokens_default = 256

    @property
    def tasks(self) -> frozenset[TaskKind]:
        if self.model is not None and getattr(self.model.model, "seg_module", None) is not None:
            return frozenset({TaskKind.REPORT, TaskKind.VQA, TaskKind.SEGMENT})
        return frozenset({TaskKind.REPORT, TaskKind.VQA})

    def load(self) -> None:
        files = check_checkpoint(self.config.path, needs_processor=False)
        path = Path(self.config.path)  # type: ignore[arg-type]
        if not any((path / f).is_file() for f in TOKENIZER_FILES):
            raise CheckpointError(
                f"Checkpoint {path} is missing its tokenizer (tokenizer.json or tokenizer.model)."
            )
        self._sha256 = sha256_of(files)
        self.device = pick_device(self.config.device)
        dtype = pick_dtype(self.config.dtype, self.device)
        m3d_modeling.register()
        with offline():
            try:
                tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
                model = AutoModelForCausalLM.from_pretrained(
                    path, local_files_only=True, trust_remote_code=False, dtype=dtype
                )
            except (OSError, ValueError, KeyError) as exc:
                raise CheckpointError(f"Cannot load {path}: {exc}") from exc
        if not isinstance(model, m3d_modeling.LamedPhi3ForCausalLM | m3d_modeling.LamedLlamaForCausalLM):
            raise CheckpointError(
                f"Checkpoint {path} is a {type(model).__name__}, not M3D-LaMed (model_type lamed_phi3 / lamed_llama)."
            )
        check_weight_names(path, checkpoint_weight_names(files), set(model.state_dict()))
        image_id = tokenizer.convert_tokens_to_ids(m3d_modeling.IMAGE_TOKEN)
        if image_id is None or image_id == tokenizer.unk_token_id:
            raise CheckpointError(f"The tokenizer of {path} has no {m3d_modeling.IMAGE_TOKEN} token.")
        if model.config.img_token_id is None:  # the published config does not carry it
            model.config.img_token_id = int(image_id)
        seg_id = tokenizer.convert_tokens_to_ids(m3d_modeling.SEG_TOKEN)
        if seg_id is not None and seg_id != tokenizer.unk_token_id:
            if model.config.seg_token_id is None:
                model.config.seg_token_id = int(seg_id)
            elif model.config.seg_token_id != seg_id:
                raise CheckpointError(
                    f"Checkpoint {path}: config seg_token_id {model.config.seg_token_id} is not the "
                    f"tokenizer's {m3d_modeling.SEG_TOKEN} ({seg_id})."
                )
        model.config.use_cache = True  # training saves use_cache = false; decoding wants the cache
        model.splice_mode = self._splice_mode(tokenizer)
        tokenizer.padding_side = "left"
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
        self.processor = _Tokenizer(tokenizer)
        #: CT volumes per run (a scheduler lane cap where the scheduler reads it); 0: the scheduler's max_batch.
        self.max_batch = max(0, int(self.config.options.get("max_batch", 0)))
        self.model = model.to(self.device).eval()
        if not self._version:
            name = str(getattr(model.config, "_name_or_path", "") or "").rsplit("/", 1)[-1] or "local"
            self._version = f"{name}@{self._sha256[:12]}"

    def _splice_mode(self, tokenizer: Any) -> str:
        """``options.splice``, or by default the conditioning the model was trained with: the
        published positional splice, which equals the placeholder splice when the tokenizer puts
        <s> before the placeholders (then "placeholders", which left padding cannot upset)."""
        mode = str(self.config.options.get("splice", "auto"))
        if mode not in ("auto", "placeholders", "published"):
            raise CheckpointError(f"options.splice must be auto, placeholders or published, not {mode!r}.")
        if mode != "auto":
            return mode
        first = tokenizer(m3d_modeling.IMAGE_TOKEN + "x")["input_ids"][0]
        return (
            "published"
            if first == tokenizer.convert_tokens_to_ids(m3d_modeling.IMAGE_TOKEN)
            else "placeholders"
        )

    # -- preprocessing --------------------------------------------------------------------------
    def _prepare(self, item: WorkItem) -> PreparedCT:
        opts = self.config.options
        window = opts.get("hu_window")
        return prepare_ct(
            item.volume,
            size=tuple(self.model.config.image_size),
            axes=str(opts.get("axes", DEFAULT_AXES)),
            foreground_hu=opts.get("foreground_hu", DEFAULT_FOREGROUND_HU),
            margin=int(opts.get("margin", 0)),
            hu_window=(float(window[0]), float(window[1])) if window else None,
        )

    def _prompt_for(self, item: WorkItem, task: TaskKind) -> tuple[str, str]:
        if task is TaskKind.REPORT:
            return self.prompt("report", PROMPTS["report"])
        if task is TaskKind.SEGMENT:
            return self.prompt("segment", PROMPTS["segment"], label=self._label(item))
        if not item.spec.question:
            raise InvalidInput("VQA needs a question.")
        return f"{self.config.name}:vqa", item.spec.question

    def _label(self, item: WorkItem) -> str:
        labels = list(item.spec.labels) or list(self.config.labels)
        if len(labels) != 1:
            raise InvalidInput(
                "Segmentation takes exactly one label (the structure to segment), in the request or the config."
            )
        return labels[0]

    def build_inputs(self, volumes: np.ndarray, prompts: Sequence[str]) -> dict[str, Any]:
        """Tokenised prompts (placeholders first, as trained), left-padded, plus the image batch."""
        placeholders = m3d_modeling.IMAGE_TOKEN * self.model.config.num_visual_tokens()
        tok = self.processor.tokenizer
        inputs = dict(tok([placeholders + p for p in prompts], return_tensors="pt", padding=True))
        inputs["images"] = torch.from_numpy(volumes)
        return inputs

    def run(
        self, batch: Sequence[WorkItem], task: TaskKind, progress: ProgressCallback | None = None
    ) -> list[TaskResult]:
        if task not in self.tasks:
            raise UnsupportedTask(f"Model {self.config.name!r} cannot do task {task.value!r}.")
        prompts = [self._prompt_for(item, task) for item in batch]
        prepared = [self._prepare(item) for item in batch]
        inputs = self.build_inputs(stack(prepared), [p for _, p in prompts])
        texts, ids = self.generate_ids(inputs)
        masks = (
            self._masks(inputs, torch.stack(ids), prepared, batch)
            if task is TaskKind.SEGMENT
            else [None] * len(batch)
        )
        results = []
        for text, (prompt_id, _), item, mask in zip(texts, prompts, batch, masks, strict=True):
            text = text.replace(m3d_modeling.SEG_TOKEN, "").strip()
            result = TaskResult(task=task, prompt_id=prompt_id, raw_output=text)
            if task is TaskKind.SEGMENT:
                result.answer = text
                if mask is None:
                    result.unparsed = True  # no [SEG] token, or an empty mask: the text says why
                else:
                    result.masks.append(mask)
            else:
                parse_text_task(result, text, item.spec.language)
            results.append(result)
        if progress:
            progress(1.0, f"{task.value} x{len(batch)}")
        return results

    @torch.inference_mode()
    def _masks(
        self,
        inputs: dict[str, Any],
        generated: torch.Tensor,
        prepared: list[PreparedCT],
        batch: Sequence[WorkItem],
    ) -> list[Mask | None]:
        """The [SEG] head's masks for the generated ids ([rows, tokens]), mapped back to source voxels."""
        generated = generated.to(self.device)
        prompt_ids = inputs["input_ids"].to(self.device)
        sequences = torch.cat([prompt_ids, generated], dim=1)
        attention = torch.cat([inputs["attention_mask"].to(self.device), torch.ones_like(generated)], dim=1)
        images = inputs["images"].to(self.device)
        logits = self.model.segment(images, sequences, attention, start=prompt_ids.shape[1])
        out: list[Mask | None] = []
        for row, item in zip(logits, batch, strict=True):
            if row is None:
                out.append(None)
                continue
            model_mask = (torch.sigmoid(row[0].float()) > 0.5).cpu().numpy()
            voxels = prepared[len(out)].mask_to_source(model_mask)
            if not voxels.any():
                out.append(None)
                continue
            label = self._label(item)
            code = label_code(self.config.labels, label)
            out.append(Mask(1, label, ANATOMICAL_STRUCTURE, code, LAB_FOREGROUND, voxels))
        return out
