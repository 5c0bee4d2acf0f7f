"""Tiny random checkpoints built with the real transformers classes, saved with save_pretrained.

They load through the production loaders exactly like real MedGemma / PaliGemma /
SigLIP / LLaVA directories; only the sizes differ. Tokenizers are built offline
(no files): a character vocabulary plus the special tokens each processor needs.
"""

from __future__ import annotations

import string
from pathlib import Path

import torch

GEMMA_SPECIALS = [
    "<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<start_of_turn>", "<end_of_turn>",
    "<start_of_image>", "<end_of_image>", "<image_soft_token>",
]  # fmt: skip
CHINESE = "所见论结：印象双肺纹理清晰未见明确结节。，胸腔积液右侧少量无异常心影大小正常"
GEMMA_CHAT = (
    "{{ bos_token }}{% for m in messages %}<start_of_turn>{{ m['role'] }}\n"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<start_of_image>{% else %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)


def char_vocab(specials: list[str]) -> dict[str, int]:
    chars = list(dict.fromkeys(string.printable.replace(" ", "") + "▁" + CHINESE))
    return {t: i for i, t in enumerate(specials + chars)}


def gemma_tokenizer():  # noqa: ANN201
    from transformers import GemmaTokenizer

    vocab = char_vocab(GEMMA_SPECIALS)
    tok = GemmaTokenizer(
        vocab=vocab,
        merges=[],
        extra_special_tokens={
            "image_token": "<image_soft_token>",
            "boi_token": "<start_of_image>",
            "eoi_token": "<end_of_image>",
        },
    )
    tok.add_tokens(["<start_of_turn>", "<end_of_turn>"], special_tokens=True)
    return tok


def build_medgemma(
    directory: Path, image_size: int = 28, seed: int = 0, max_shard_size: str | None = None
) -> Path:
    """A Gemma 3 image-text-to-text checkpoint laid out like google/medgemma-4b-it."""
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, Gemma3Processor
    from transformers.models.gemma3 import Gemma3ImageProcessorPil

    tok = gemma_tokenizer()
    vocab = tok.get_vocab()
    image_processor = Gemma3ImageProcessorPil(
        size={"height": image_size, "width": image_size}, do_pan_and_scan=False
    )
    processor = Gemma3Processor(
        image_processor=image_processor, tokenizer=tok, chat_template=GEMMA_CHAT, image_seq_length=4
    )
    config = Gemma3Config(
        text_config={
            "vocab_size": len(tok),
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "num_key_value_heads": 1,
            "head_dim": 16,
            "sliding_window": 32,
            "max_position_embeddings": 1024,
        },
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "image_size": image_size,
            "patch_size": image_size // 4,
        },
        mm_tokens_per_image=4,
        image_token_index=vocab["<image_soft_token>"],
        boi_token_index=vocab["<start_of_image>"],
        eoi_token_index=vocab["<end_of_image>"],
    )
    torch.manual_seed(seed)
    model = Gemma3ForConditionalGeneration(config).eval()
    model.generation_config.eos_token_id = [vocab["<eos>"], vocab["<end_of_turn>"]]
    model.generation_config.pad_token_id = vocab["<pad>"]
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(directory, **kwargs)
    processor.save_pretrained(directory)
    return directory
