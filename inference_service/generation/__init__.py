"""Text generation for the transformers backends: continuous batching on a per-slot KV cache.

``engine.Engine`` runs one model's requests in a thread of its own: images go
through the vision tower once, prompt prefixes that carry an image are
prefilled once and shared, every running request advances one token per step,
and a request joins or leaves the batch between steps. ``cache.SlotCache``
holds the keys and values; on a GPU the decode step is replayed as CUDA graphs
(``graphs``).
"""

from inference_service.generation.engine import Engine, EngineSettings, GenRequest, Sampling

__all__ = ["Engine", "EngineSettings", "GenRequest", "Sampling"]
