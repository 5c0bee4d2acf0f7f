"""CXR report throughput of the real-size MedGemma-4B architecture (random weights) on a GPU.

No weights are downloaded: the Gemma 3 4B + SigLIP-896 architecture of
google/medgemma-4b-it is built from its published sizes with random bf16
weights, wrapped in RadBridge's MedGemma backend, and driven through the
scheduler. Every request is forced to emit exactly --tokens tokens so the
comparison is fair. Prints reports/s for the scheduler's micro-batching vs one
request at a time (plain generate per request), and ms per decoded token.

    python bench/bench_inference.py [--requests 16] [--batch 8] [--tokens 200]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def medgemma_4b_config(vocab_size: int, image_token: int, boi: int, eoi: int):  # noqa: ANN201
    from transformers import Gemma3Config

    return Gemma3Config(
        text_config={
            "vocab_size": 262208, "hidden_size": 2560, "intermediate_size": 10240, "num_hidden_layers": 34,
            "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 256, "sliding_window": 1024,
            "max_position_embeddings": 131072, "rope_theta": 1000000.0, "query_pre_attn_scalar": 256,
        },
        vision_config={
            "hidden_size": 1152, "intermediate_size": 4304, "num_hidden_layers": 27, "num_attention_heads": 16,
            "image_size": 896, "patch_size": 14,
        },
        mm_tokens_per_image=256, image_token_index=image_token, boi_token_index=boi, eoi_token_index=eoi,
    )  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=200)
    parser.add_argument(
        "--smoke", action="store_true", help="tiny model on the CPU: checks the script, measures nothing"
    )
    args = parser.parse_args()
    import torch

    if args.smoke:
        return smoke(args)
    if not torch.cuda.is_available():
        print("bench_inference: no CUDA device; this benchmark needs a GPU (nothing was measured).")
        return 2
    import numpy as np
    from transformers import Gemma3ForConditionalGeneration, Gemma3Processor
    from transformers.models.gemma3 import Gemma3ImageProcessorPil

    from inference_service.backends._hf import ForcedTokens
    from inference_service.backends.base import ModelConfig, WorkItem
    from inference_service.backends.medgemma import MedGemmaBackend
    from inference_service.scheduler import Scheduler
    from inference_service.types import AnalysisSpec, Geometry, TaskKind, Volume
    from tests.unit.inference_service.tiny_checkpoints import GEMMA_CHAT, gemma_tokenizer

    tok = gemma_tokenizer()
    vocab = tok.get_vocab()
    image_processor = Gemma3ImageProcessorPil(size={"height": 896, "width": 896}, do_pan_and_scan=False)
    processor = Gemma3Processor(
        image_processor=image_processor, tokenizer=tok, chat_template=GEMMA_CHAT, image_seq_length=256
    )
    processor.tokenizer.padding_side = "left"
    config = medgemma_4b_config(
        len(tok), vocab["<image_soft_token>"], vocab["<start_of_image>"], vocab["<end_of_image>"]
    )
    started = time.perf_counter()
    with torch.device("cuda"):
        model = Gemma3ForConditionalGeneration(config).to(torch.bfloat16).eval()
    params = sum(p.numel() for p in model.parameters())
    build_s = time.perf_counter() - started

    backend = MedGemmaBackend(ModelConfig(name="medgemma-4b-random", backend="medgemma", path=Path("/nonexistent"),
                                          options={"max_new_tokens": args.tokens}))  # fmt: skip
    backend.model, backend.processor, backend.device = model, processor, torch.device("cuda")
    forced = [vocab["a"]] * args.tokens
    eos = vocab["<end_of_turn>"]
    backend.logits_processors = [lambda n: ForcedTokens(forced, eos, n)]
    rng = np.random.default_rng(0)
    img = rng.integers(0, 4096, (1, 2048, 2048)).astype(np.float32)
    vol = Volume(
        img, Geometry((1, 2048, 2048), (0, 0.15, 0.15), (1, 0, 0, 0, 1, 0), (0, 0, 0), "CR", rescaled=False)
    )
    item = WorkItem(vol, AnalysisSpec("m", (TaskKind.REPORT,)))

    backend.run([item], TaskKind.REPORT)  # warm-up
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(args.requests):
        backend.run([item], TaskKind.REPORT)
    torch.cuda.synchronize()
    single_s = time.perf_counter() - t0

    async def batched() -> float:
        sched = Scheduler(max_batch=args.batch, batch_wait_ms=50, queue_size=args.requests)
        t = time.perf_counter()
        await asyncio.gather(*[sched.submit(backend, item, TaskKind.REPORT) for _ in range(args.requests)])
        torch.cuda.synchronize()
        elapsed = time.perf_counter() - t
        await sched.close()
        return elapsed

    batched_s = asyncio.run(batched())
    tokens = args.requests * args.tokens
    print(f"device: {torch.cuda.get_device_name(0)}; model: MedGemma-4B architecture, random bf16 weights, "
          f"{params / 1e9:.2f} B params (built in {build_s:.1f} s)")  # fmt: skip
    print(f"{args.requests} CXR reports x {args.tokens} forced tokens, 896 px input")
    print(f"{'mode':28} {'reports/s':>10} {'ms/token':>9} {'speed-up':>9}")
    print(
        f"{'one at a time (generate)':28} {args.requests / single_s:10.2f} {1000 * single_s / tokens:9.2f} {1.0:9.2f}"
    )
    print(f"{f'scheduler, batch {args.batch}':28} {args.requests / batched_s:10.2f} "
          f"{1000 * batched_s / tokens:9.2f} {single_s / batched_s:9.2f}")  # fmt: skip
    return 0


def smoke(args: argparse.Namespace) -> int:
    """Run the same code path on a tiny checkpoint on the CPU (no numbers worth reporting)."""
    import tempfile

    import numpy as np

    from inference_service.backends._hf import ForcedTokens
    from inference_service.backends.base import ModelConfig, WorkItem
    from inference_service.backends.medgemma import MedGemmaBackend
    from inference_service.scheduler import Scheduler
    from inference_service.types import AnalysisSpec, Geometry, TaskKind, Volume
    from tests.unit.inference_service.tiny_checkpoints import build_medgemma

    path = build_medgemma(Path(tempfile.mkdtemp()) / "tiny")
    backend = MedGemmaBackend(
        ModelConfig(name="tiny", backend="medgemma", path=path, options={"max_new_tokens": args.tokens})
    )
    backend.load()
    tok = backend.processor.tokenizer
    forced = tok.encode("a" * args.tokens, add_special_tokens=False)
    backend.logits_processors = [
        lambda n: ForcedTokens(forced, tok.convert_tokens_to_ids("<end_of_turn>"), n)
    ]
    vol = Volume(
        np.ones((1, 64, 48), np.float32),
        Geometry((1, 64, 48), (0, 1, 1), (1, 0, 0, 0, 1, 0), (0, 0, 0), "CR", rescaled=False),
    )
    item = WorkItem(vol, AnalysisSpec("tiny", (TaskKind.REPORT,)))

    async def batched() -> list[int]:
        sched = Scheduler(max_batch=args.batch, batch_wait_ms=50, queue_size=args.requests)
        results = await asyncio.gather(
            *[sched.submit(backend, item, TaskKind.REPORT) for _ in range(args.requests)]
        )
        sizes = sched.lane_batches("tiny", TaskKind.REPORT)
        await sched.close()
        assert all(len(r.report.findings) == args.tokens for r in results)
        return sizes

    print(f"smoke: {args.requests} requests ran in batches of {asyncio.run(batched())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
