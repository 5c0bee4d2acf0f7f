"""CT report throughput of the real-size Med3DVLM architecture (random bf16 weights) on a GPU,
beside MedGemma-4B's slice-sampling path for the same CT.

No weights are downloaded: DCFormer-small + the dual-stream MLP-Mixer projector
+ a Qwen2.5-7B-sized decoder are built from the published sizes with random
bf16 weights, wrapped in RadBridge's med3dvlm backend and driven through the
scheduler (several CT volumes per forward pass). Every report is forced to
exactly --tokens tokens so the comparison is fair. Prints CT studies/s and
s/study (preprocessing included: reorient, crop, min-max, resize of a
--slices x 512 x 512 HU volume), then the same for MedGemma-4B reading the CT
as 85 sampled three-window slices (--with-medgemma).

    python bench/bench_med3dvlm.py [--studies 8] [--batch 4] [--tokens 200] [--slices 300] [--with-medgemma]
    python bench/bench_med3dvlm.py --smoke   # tiny checkpoint on the CPU: checks the code path, measures nothing
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

#: Qwen2.5-7B-Instruct's published sizes (the decoder of Med3DVLM-Qwen-2.5-7B).
QWEN25_7B = {
    "vocab_size": 152064, "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
    "num_attention_heads": 28, "num_key_value_heads": 4, "max_position_embeddings": 32768,
    "rms_norm_eps": 1e-6, "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0},
    "tie_word_embeddings": False,
}  # fmt: skip


def ct_volume(n_slices: int) -> Any:  # noqa: ANN401
    from inference_service.types import Geometry, Volume
    from radbridge.synth import phantom_hu

    hu = phantom_hu(n_slices).astype("float32")
    g = Geometry(hu.shape, (1.25, 0.7, 0.7), (1, 0, 0, 0, 1, 0), (0, 0, 0), "CT")
    return Volume(hu, g)


def drive(backend: Any, item: Any, studies: int, batch: int, sync: Any) -> tuple[float, list[int]]:  # noqa: ANN401
    """Seconds for ``studies`` report requests through the scheduler, and the batch sizes it formed."""
    from inference_service.scheduler import Scheduler
    from inference_service.types import TaskKind

    async def run() -> tuple[float, list[int]]:
        sched = Scheduler(max_batch=batch, batch_wait_ms=50, queue_size=studies)
        t = time.perf_counter()
        results = await asyncio.gather(
            *[sched.submit(backend, item, TaskKind.REPORT) for _ in range(studies)]
        )
        sync()
        elapsed = time.perf_counter() - t
        sizes = sched.lane_batches(backend.config.name, TaskKind.REPORT)
        await sched.close()
        assert all(r.report is not None for r in results)
        return elapsed, sizes

    return asyncio.run(run())


def force(backend: Any, tokens: int, eos: int, token: int) -> None:  # noqa: ANN401
    from inference_service.backends._hf import ForcedTokens

    backend.logits_processors = [lambda n: ForcedTokens([token] * tokens, eos, n)]


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--studies", type=int, default=8)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=200)
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--with-medgemma", action="store_true")
    parser.add_argument("--smoke", action="store_true", help="tiny model on the CPU: checks the script")
    args = parser.parse_args()
    import torch

    if args.smoke:
        return smoke(args)
    if not torch.cuda.is_available():
        print("bench_med3dvlm: no CUDA device; this benchmark needs a GPU (nothing was measured).")
        return 2

    from inference_service.backends.base import ModelConfig, WorkItem
    from inference_service.backends.med3dvlm import Med3DVLMBackend, _Tokenizers
    from inference_service.backends.med3dvlm_modeling import Med3DVLMConfig, Med3DVLMForCausalLM
    from inference_service.types import AnalysisSpec, TaskKind
    from tests.unit.inference_service.tiny_checkpoints import gemma_tokenizer

    tok = gemma_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<im_patch>"]})
    tok.padding_side = "left"
    config = Med3DVLMConfig(**QWEN25_7B, image_token_id=tok.convert_tokens_to_ids("<im_patch>"))
    started = time.perf_counter()
    with torch.device("cuda"):
        model = Med3DVLMForCausalLM(config).to(torch.bfloat16).eval()
    build_s = time.perf_counter() - started
    params = sum(p.numel() for p in model.parameters())
    backend = Med3DVLMBackend(ModelConfig(name="med3dvlm-7b-random", backend="med3dvlm", path=Path("/nonexistent"),
                                          options={"max_new_tokens": args.tokens}))  # fmt: skip
    backend.model, backend.processor, backend.device = model, _Tokenizers(tok), torch.device("cuda")
    backend.max_batch = args.batch
    force(backend, args.tokens, tok.convert_tokens_to_ids("<eos>"), tok.convert_tokens_to_ids("a"))
    item = WorkItem(ct_volume(args.slices), AnalysisSpec("m", (TaskKind.REPORT,)))

    t = time.perf_counter()
    backend.prepare(item)
    prep_s = time.perf_counter() - t
    backend.run([item], TaskKind.REPORT)  # warm-up
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    single_s, _ = drive(backend, item, args.studies, 1, torch.cuda.synchronize)
    batched_s, sizes = drive(backend, item, args.studies, args.batch, torch.cuda.synchronize)
    peak = torch.cuda.max_memory_allocated() / (1 << 30)

    print(f"device: {torch.cuda.get_device_name(0)}; Med3DVLM architecture (DCFormer-small + mixer + Qwen2.5-7B), "
          f"random bf16 weights, {params / 1e9:.2f} B params (built in {build_s:.1f} s); peak {peak:.1f} GiB")  # fmt: skip
    print(f"{args.studies} CT studies of {args.slices}x512x512 -> 128x256x256 (preprocess {prep_s:.2f} s/study "
          f"on the CPU), {args.tokens} forced report tokens")  # fmt: skip
    print(f"{'mode':34} {'studies/s':>10} {'s/study':>8}")
    print(f"{'med3dvlm, one CT per pass':34} {args.studies / single_s:10.3f} {single_s / args.studies:8.2f}")
    print(
        f"{f'med3dvlm, batches {sizes}':34} {args.studies / batched_s:10.3f} {batched_s / args.studies:8.2f}"
    )
    if args.with_medgemma:
        del model, backend
        torch.cuda.empty_cache()
        medgemma(args, item)
    return 0


def medgemma(args: argparse.Namespace, item: Any) -> None:  # noqa: ANN401
    """MedGemma-4B (random bf16) on the same CT: 85 sampled slices, three windows each, one turn."""
    import torch
    from transformers import Gemma3ForConditionalGeneration

    from bench.bench_inference import medgemma_4b_parts
    from inference_service.backends.base import ModelConfig
    from inference_service.backends.medgemma import MedGemmaBackend

    processor, config = medgemma_4b_parts()
    vocab = processor.tokenizer.get_vocab()
    with torch.device("cuda"):
        model = Gemma3ForConditionalGeneration(config).to(torch.bfloat16).eval()
    backend = MedGemmaBackend(ModelConfig(name="medgemma-4b-random", backend="medgemma", path=Path("/nonexistent"),
                                          options={"max_new_tokens": args.tokens}))  # fmt: skip
    backend.model, backend.processor, backend.device = model, processor, torch.device("cuda")
    force(backend, args.tokens, vocab["<end_of_turn>"], vocab["a"])
    studies = max(1, args.studies // 4)
    backend.run([item], item.spec.tasks[0])  # warm-up
    single_s, _ = drive(backend, item, studies, 1, torch.cuda.synchronize)
    print(f"{'medgemma-4b, 85 slices, one CT':34} {studies / single_s:10.3f} {single_s / studies:8.2f}")


def smoke(args: argparse.Namespace) -> int:
    """The same backend, scheduler and forced decoding on a tiny checkpoint on the CPU."""
    import tempfile

    from inference_service.backends.base import ModelConfig, WorkItem
    from inference_service.backends.med3dvlm import Med3DVLMBackend
    from inference_service.types import AnalysisSpec, TaskKind
    from tests.unit.inference_service.tiny_checkpoints import MED3DVLM_TINY_SIZE, build_med3dvlm

    path = build_med3dvlm(Path(tempfile.mkdtemp()) / "tiny")
    backend = Med3DVLMBackend(ModelConfig(name="tiny", backend="med3dvlm", path=path, options={
        "max_new_tokens": args.tokens, "size": list(MED3DVLM_TINY_SIZE), "max_batch": args.batch}))  # fmt: skip
    backend.load()
    tok = backend.processor.tokenizer
    force(backend, args.tokens, tok.convert_tokens_to_ids("<eos>"), tok.convert_tokens_to_ids("a"))
    item = WorkItem(ct_volume(min(args.slices, 40)), AnalysisSpec("tiny", (TaskKind.REPORT,)))
    elapsed, sizes = drive(backend, item, args.studies, args.batch, lambda: None)
    print(f"smoke (tiny checkpoint, CPU, not a measurement): {args.studies} CT studies ran in batches of {sizes}, "
          f"{elapsed / args.studies:.2f} s/study")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
