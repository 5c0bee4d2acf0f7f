"""A tiny M3D-LaMed checkpoint built with the re-implemented classes, in the published layout.

Same pattern as ``tiny_checkpoints``: real classes, tiny sizes, ``save_pretrained``,
an offline character tokenizer carrying the tokens M3D's training script adds.
"""

from __future__ import annotations

from pathlib import Path

import torch

from inference_service.backends import m3d_modeling as mm
from tests.unit.inference_service.tiny_checkpoints import char_vocab

TINY_VISION = {
    "image_size": [8, 32, 32],
    "patch_size": [2, 8, 8],  # 4x4x4 patch grid -> 2x2x2 = 8 visual tokens
    "mm_hidden_size": 16,
    "vision_num_layers": 1,
    "vision_num_heads": 2,
    "vision_mlp_dim": 32,
}


def m3d_tokenizer(bos: bool = False):  # noqa: ANN201
    """A character vocabulary with the tokens M3D's training script adds to the LM's tokenizer;
    ``bos=True`` puts <s> before every prompt as the Llama-2 tokenizer does."""
    from transformers import LlamaTokenizer

    tok = LlamaTokenizer(vocab=char_vocab(["<unk>", "<s>", "</s>"]), merges=[], add_bos_token=bos)
    tok.add_special_tokens({"additional_special_tokens": ["<im_patch>", "<bx_start>", "<bx_end>"]})
    tok.add_tokens("[SEG]")
    return tok


def tiny_config(tok, family: str = "phi3", **overrides) -> mm.LamedPhi3Config | mm.LamedLlamaConfig:  # noqa: ANN001, ANN003
    vocab = tok.get_vocab()
    common = {
        "vocab_size": len(tok),
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "num_key_value_heads": 2,
        "max_position_embeddings": 512,
        "bos_token_id": vocab["<s>"],
        "eos_token_id": vocab["</s>"],
        "pad_token_id": vocab["<unk>"],
        "segmentation_module": "segvol",
        "seg_token_id": vocab["[SEG]"],
        **TINY_VISION,
        **overrides,
    }
    return (mm.LamedPhi3Config if family == "phi3" else mm.LamedLlamaConfig)(**common)


def build_m3d(
    directory: Path, family: str = "phi3", seed: int = 0, seg: bool = True, bos: bool = False
) -> Path:
    """A tiny M3D-LaMed checkpoint in the published layout (no img_token_id in config, as published);
    ``seg=False`` leaves out the [SEG] head (``segmentation_module`` unset)."""
    tok = m3d_tokenizer(bos)
    torch.manual_seed(seed)
    cls = mm.LamedPhi3ForCausalLM if family == "phi3" else mm.LamedLlamaForCausalLM
    overrides = {} if seg else {"segmentation_module": None}
    model = cls(tiny_config(tok, family, **overrides)).eval()
    model.generation_config.eos_token_id = tok.convert_tokens_to_ids("</s>")
    model.generation_config.pad_token_id = tok.convert_tokens_to_ids("<unk>")
    model.save_pretrained(directory)
    tok.save_pretrained(directory)
    return directory


def set_constant_mask_logits(model: mm.LamedPhi3ForCausalLM | mm.LamedLlamaForCausalLM) -> None:
    """Hand-set the [SEG] head so that its logits are positive everywhere (a full-cube mask),
    whatever the image and the [SEG] state: the last upscaling conv outputs a constant, the
    single-mask hypernetwork outputs ones, and the text similarity term is zero."""
    decoder = model.model.seg_module.mask_decoder
    with torch.no_grad():
        decoder.output_upscaling[3].weight.zero_()
        decoder.output_upscaling[3].bias.fill_(1.0)
        last = decoder.output_hypernetworks_mlps[0].layers[-1]
        last.weight.zero_()
        last.bias.fill_(1.0)
        decoder.txt_align_upscaled_embedding.weight.zero_()
        decoder.txt_align_upscaled_embedding.bias.zero_()
