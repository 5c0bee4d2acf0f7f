"""Tiny random checkpoints built with the real transformers classes, saved with save_pretrained.

They load through the production loaders exactly like real MedGemma / PaliGemma /
SigLIP / LLaVA directories; only the sizes differ. Tokenizers are built offline
(no files): a character vocabulary plus the special tokens each processor needs.
"""

from __future__ import annotations

import string
from pathlib import Path

import numpy as np
import torch

from inference_service.vqvae import EMBEDDING, OUTPUT, UPSAMPLES

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


def force_output(backend, text: str, eos_token: str) -> list[int]:  # noqa: ANN001
    """Make the backend's next generate calls emit ``text`` exactly (then ``eos_token``)."""
    from inference_service.backends._hf import ForcedTokens

    tok = backend.processor.tokenizer
    ids = tok.encode(text, add_special_tokens=False)
    assert tok.decode(ids) == text, "the tiny vocabulary must cover the forced text"
    eos = tok.convert_tokens_to_ids(eos_token)
    backend.logits_processors = [lambda n: ForcedTokens(ids, eos, n)]
    return ids


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


def write_random_npz(
    path: Path, codebook: int = 128, embed_dim: int = 8, dim: int = 8, seed: int = 0
) -> Path:
    """A random segmentation decoder in the vae-oid.npz key layout (no real weights)."""
    rng = np.random.default_rng(seed)
    arrays: dict[str, np.ndarray] = {EMBEDDING: rng.normal(size=(codebook, embed_dim)).astype(np.float32)}

    def put(name: str, shape: tuple[int, ...]) -> None:
        arrays[f"{name}.weight"] = (rng.normal(size=shape) * 0.2).astype(np.float32)
        arrays[f"{name}.bias"] = np.zeros(shape[1] if name in UPSAMPLES else shape[0], np.float32)

    put("decoder.0", (dim, embed_dim, 1, 1))
    for b in (2, 3):
        put(f"decoder.{b}.net.0", (dim, dim, 3, 3))
        put(f"decoder.{b}.net.2", (dim, dim, 3, 3))
        put(f"decoder.{b}.net.4", (dim, dim, 1, 1))
    cin = dim
    for name in UPSAMPLES:
        cout = max(cin // 2, 1) if name != "decoder.4" else cin
        put(name, (cin, cout, 4, 4))
        cin = cout
    put(OUTPUT, (1, cin, 1, 1))
    np.savez(path, **arrays)
    return path


PALI_SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<image>"]


def build_paligemma(directory: Path, image_size: int = 28, seed: int = 0) -> Path:
    """A PaliGemma checkpoint; the processor adds the 1024 <loc> and 128 <seg> tokens itself."""
    from transformers import (
        GemmaTokenizer,
        PaliGemmaConfig,
        PaliGemmaForConditionalGeneration,
        PaliGemmaProcessor,
    )
    from transformers.models.siglip import SiglipImageProcessorPil

    vocab = char_vocab(PALI_SPECIALS)
    tok = GemmaTokenizer(vocab=vocab, merges=[], extra_special_tokens={"image_token": "<image>"})
    image_processor = SiglipImageProcessorPil(size={"height": image_size, "width": image_size})
    image_processor.image_seq_length = (image_size // 14) ** 2
    processor = PaliGemmaProcessor(image_processor=image_processor, tokenizer=tok)
    config = PaliGemmaConfig(
        text_config={
            "vocab_size": len(processor.tokenizer),  # after the loc/seg tokens were added
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "num_key_value_heads": 1,
            "head_dim": 16,
        },
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "image_size": image_size,
            "patch_size": 14,
            "projection_dim": 32,
        },
        projection_dim=32,
        image_token_index=vocab["<image>"],
    )
    torch.manual_seed(seed)
    model = PaliGemmaForConditionalGeneration(config).eval()
    model.generation_config.eos_token_id = vocab["<eos>"]
    model.generation_config.pad_token_id = vocab["<pad>"]
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory


def write_constant_npz(path: Path, value: float) -> Path:
    """A decoder whose map is ``value`` everywhere (output conv weights 0, bias = value)."""
    write_random_npz(path)
    with np.load(path) as npz:
        arrays = {k: npz[k] for k in npz.files}
    arrays[f"{OUTPUT}.weight"] = np.zeros_like(arrays[f"{OUTPUT}.weight"])
    arrays[f"{OUTPUT}.bias"] = np.full_like(arrays[f"{OUTPUT}.bias"], value)
    np.savez(path, **arrays)
    return path


def build_siglip(directory: Path, image_size: int = 28, seed: int = 0) -> Path:
    """A SigLIP dual encoder with a sentencepiece tokenizer trained offline on a few phrases."""
    import sentencepiece as spm
    from transformers import SiglipConfig, SiglipModel, SiglipProcessor, SiglipTokenizer
    from transformers.models.siglip import SiglipImageProcessorPil

    work = directory.parent / f"{directory.name}-sp"
    work.mkdir(parents=True, exist_ok=True)
    corpus = work / "corpus.txt"
    corpus.write_text(
        "\n".join(["a chest x-ray showing effusion", "a chest x-ray showing nodule", "pneumothorax"] * 50)
    )
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(work / "sp"), vocab_size=40, model_type="unigram",
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1, minloglevel=2, hard_vocab_limit=False,
    )  # fmt: skip
    tok = SiglipTokenizer(vocab_file=str(work / "sp.model"))
    processor = SiglipProcessor(
        image_processor=SiglipImageProcessorPil(size={"height": image_size, "width": image_size}),
        tokenizer=tok,
    )
    config = SiglipConfig(
        text_config={"vocab_size": len(tok), "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                     "num_attention_heads": 2, "max_position_embeddings": 64},
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
                       "image_size": image_size, "patch_size": 14},
    )  # fmt: skip
    torch.manual_seed(seed)
    SiglipModel(config).eval().save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory


LLAVA_CHAT = (
    "{% for m in messages %}{{ m['role'] }}: {% if m['content'] is string %}{{ m['content'] }}{% else %}"
    "{% for c in m['content'] %}{% if c['type'] == 'image' %}<image>\n{% else %}{{ c['text'] }}{% endif %}{% endfor %}"
    "{% endif %}\n{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}"
)


def build_llava(directory: Path, image_size: int = 28, seed: int = 0) -> Path:
    """A LLaVA-layout model (CLIP vision tower + Llama text model) with a bilingual char vocabulary."""
    from transformers import (
        CLIPVisionConfig,
        GemmaTokenizer,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )
    from transformers.models.clip import CLIPImageProcessorPil

    vocab = char_vocab(["<pad>", "<eos>", "<bos>", "<unk>", "<image>"])
    tok = GemmaTokenizer(vocab=vocab, merges=[], extra_special_tokens={"image_token": "<image>"})
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )
    processor = LlavaProcessor(
        image_processor=image_processor, tokenizer=tok, patch_size=14, vision_feature_select_strategy="default",
        chat_template=LLAVA_CHAT, num_additional_image_tokens=1,
    )  # fmt: skip
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                       image_size=image_size, patch_size=14),
        text_config=LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=1024),
        image_token_index=vocab["<image>"],
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
    )  # fmt: skip
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).eval()
    model.generation_config.eos_token_id = vocab["<eos>"]
    model.generation_config.pad_token_id = vocab["<pad>"]
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory


def to_pytorch_bin_shards(directory: Path, shards: int = 2) -> dict[str, torch.Tensor]:
    """Rewrite a checkpoint in the older layout: pytorch_model-0000k-of-0000n.bin + index JSON."""
    import json

    from safetensors.torch import load_file

    state = load_file(directory / "model.safetensors")
    (directory / "model.safetensors").unlink()
    keys = sorted(state)
    weight_map = {}
    for k in range(shards):
        name = f"pytorch_model-{k + 1:05d}-of-{shards:05d}.bin"
        part = keys[k::shards]
        torch.save({key: state[key] for key in part}, directory / name)
        weight_map.update(dict.fromkeys(part, name))
    (directory / "pytorch_model.bin.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map})
    )
    return state


#: Tiny Med3DVLM: a 32x64x64 CT -> DCFormer stages (s3: 2x2x1 = 4 tokens, s4: 1 token) -> 8 tokens.
MED3DVLM_TINY_SIZE = (32, 64, 64)
MED3DVLM_TINY_VISION = {
    "dcformer_channels": [4, 4, 8, 8, 16],
    "dcformer_num_blocks": [1, 1, 1, 2, 1],
    "dcformer_kernel_sizes": [5, 5, 3, 3],
    "input_size": [64, 64, 32],
}


def build_med3dvlm(directory: Path, seed: int = 0) -> Path:
    """A Med3DVLM checkpoint in the published layout (vlm_qwen config keys, module names), tiny sizes."""
    from inference_service.backends.med3dvlm_modeling import Med3DVLMConfig, Med3DVLMForCausalLM

    tok = gemma_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<im_patch>"]})
    config = Med3DVLMConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=1024, tie_word_embeddings=False,
        vision_tower="dcformer", vision_select_layer=-2, vision_select_feature="cls_patch",
        mm_projector_type="mixer", mm_mlp_depth=2, proj_out_num=8,
        low_input_size=[4, 8], high_input_size=[1, 16], low_output_size=[6, 3], high_output_size=[2, 5],
        mm_hidden_size=16, **MED3DVLM_TINY_VISION,
    )  # fmt: skip
    torch.manual_seed(seed)
    model = Med3DVLMForCausalLM(config).eval()
    with torch.no_grad():  # layer scale 1 (not 1e-6) so the random blocks shape the visual tokens
        for name, p in model.named_parameters():
            if name.endswith(".scale"):
                p.fill_(1.0)
    model.generation_config.eos_token_id = tok.convert_tokens_to_ids("<eos>")
    model.generation_config.pad_token_id = tok.convert_tokens_to_ids("<pad>")
    model.save_pretrained(directory)
    tok.save_pretrained(directory)
    return directory


def build_med3dvlm_clip(directory: Path, seed: int = 0) -> Path:
    """The DCFormer-text contrastive pair (dec_clip layout) with a tiny DistilBERT text encoder."""
    from transformers import DistilBertConfig

    from inference_service.backends.med3dvlm_modeling import Med3DVLMClipConfig, Med3DVLMClipModel

    tok = gemma_tokenizer()
    text = DistilBertConfig(vocab_size=len(tok), dim=16, hidden_dim=32, n_layers=1, n_heads=2,
                            max_position_embeddings=256)  # fmt: skip
    config = Med3DVLMClipConfig(
        language_model_name_or_path="medicalai/ClinicalBERT", vision_encoder="dcformer", hidden_size=12,
        loss_type="sigmoid", t_prime=2.3, bias=-1.0, text_config=text.to_dict(), **MED3DVLM_TINY_VISION,
    )  # fmt: skip
    torch.manual_seed(seed)
    model = Med3DVLMClipModel(config).eval()
    with torch.no_grad():  # the model keeps checkpoint weights as they are; give the tiny one random ones
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.2)
    model.save_pretrained(directory)
    tok.save_pretrained(directory)
    return directory
