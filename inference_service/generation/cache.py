"""A preallocated KV cache with one row ("slot") per running request.

transformers' own caches give every batch row the same length, so a request
can neither join a running batch nor leave it. Here each slot keeps its own
length: a step writes each row's new keys and values at that row's own
positions, and the attention masks are built from those lengths. The cache is
allocated once (slots x maximum length), so a decode step has fixed shapes and
can be captured as a CUDA graph.

Sliding-window layers (Gemma 2/3 interleave them with global layers) keep a
ring of ``window + chunk - 1`` positions instead of the whole length: a step of
``chunk`` tokens then never overwrites a key that one of its own queries still
needs. The ring is plain ``position % capacity`` indexing; the mask recovers
which absolute position each ring entry holds from the slot's length.

The object is duck-typed for the decoder layers, which only call
``update(key, value, layer_idx)``; the engine always passes position ids and
ready-made masks, so no other Cache method is reached.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

FULL = "full_attention"
SLIDING = "sliding_attention"


@dataclass
class Step:
    """Where one forward pass reads and writes; tensors so that a captured graph sees new values.

    Shapes: ``B`` rows, ``T`` tokens per row. Token indices count from 0 within the
    request (the cache position); RoPE positions are ``index + position_offset``.
    """

    input_ids: torch.Tensor  # [B, T]
    positions: torch.Tensor  # [B, T] RoPE positions
    write_slot: torch.Tensor  # [B, T] slot each token's K/V goes to (the scratch slot for padding)
    write_index: torch.Tensor  # [B, T] token index each token is written at
    query_index: torch.Tensor  # [B, T] token index each query sits at (padding clamped to the last real one)
    end: torch.Tensor  # [B] tokens held by the row's slot after this step's writes
    last: torch.Tensor  # [B] which of the T outputs is the row's next-token distribution
    rows: torch.Tensor | None  # [B] slot each row reads; None: rows are slots 0..B-1 (views, no copy)
    width: int  # cache positions the full-attention layers read


class SlotCache:
    """Keys and values of every layer for ``slots`` requests of up to ``max_length`` tokens."""

    def __init__(
        self,
        text_config: Any,
        slots: int,
        max_length: int,
        chunk: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        n_layers = int(text_config.num_hidden_layers)
        heads = int(text_config.num_attention_heads)
        kv_heads = int(getattr(text_config, "num_key_value_heads", None) or heads)
        head_dim = int(getattr(text_config, "head_dim", None) or text_config.hidden_size // heads)
        types = list(getattr(text_config, "layer_types", None) or [FULL] * n_layers)[:n_layers]
        window = getattr(text_config, "sliding_window", None)
        self.slots = slots
        self.scratch = slots  # one extra slot takes the writes of padding tokens
        self.max_length = max_length
        self.window = int(window) if window else 0
        self.layer_types = [SLIDING if t == SLIDING and self.window else FULL for t in types]
        ring = min(max_length, self.window + chunk - 1) if self.window else max_length
        self.capacity = {FULL: max_length, SLIDING: ring}
        shape = {kind: (slots + 1, kv_heads, cap, head_dim) for kind, cap in self.capacity.items()}
        self.keys = [torch.zeros(shape[t], dtype=dtype, device=device) for t in self.layer_types]
        self.values = [torch.zeros(shape[t], dtype=dtype, device=device) for t in self.layer_types]
        self.device = device
        self.bytes = sum(t.numel() * t.element_size() for t in self.keys + self.values)
        self._step: Step | None = None
        self._ring_index: dict[str, torch.Tensor] = {}
        self._widths: dict[str, int] = {}

    # -- what the engine calls ---------------------------------------------------------
    def masks(self, step: Step, additive_dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
        """Bind ``step`` for the coming forward and return one 4D mask per layer type.

        ``additive_dtype`` None: boolean masks (True = attend, for SDPA); else additive
        masks of that dtype (0 / most negative, for eager attention).
        """
        self._step = step
        out: dict[str, torch.Tensor] = {}
        for kind in set(self.layer_types):
            cap = self.capacity[kind]
            width = step.width if kind == FULL else min(cap, step.width)
            self._widths[kind] = width
            self._ring_index[kind] = step.write_index % cap
            r = torch.arange(width, device=self.device)
            end = step.end[:, None, None]
            query = step.query_index[:, :, None]
            if cap >= self.max_length:  # no wrap-around: entry r holds token r
                held = r
                valid = held <= query
            else:  # ring: the latest token index below `end` that maps to entry r
                back = end - 1 - r
                held = r + cap * torch.div(back, cap, rounding_mode="floor")
                valid = (back >= 0) & (held <= query)
            if kind == SLIDING:
                valid = valid & (query - held < self.window)
            mask = valid[:, None]  # [B, 1, T, width]
            if additive_dtype is not None:
                zero = torch.zeros((), dtype=additive_dtype, device=self.device)
                low = torch.full(
                    (), torch.finfo(additive_dtype).min, dtype=additive_dtype, device=self.device
                )
                mask = torch.where(mask, zero, low)
            out[kind] = mask
        return out

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any):
        """Write this step's keys/values at each token's slot and index; return what attention reads."""
        step = self._step
        assert step is not None, "SlotCache.masks binds a step before each forward"
        kind = self.layer_types[layer_idx]
        keys, values = self.keys[layer_idx], self.values[layer_idx]
        index = self._ring_index[kind]
        keys[step.write_slot, :, index] = key.transpose(1, 2).to(keys.dtype)
        values[step.write_slot, :, index] = value.transpose(1, 2).to(values.dtype)
        width = self._widths[kind]
        if step.rows is None:
            rows = key.shape[0]
            return keys[:rows, :, :width], values[:rows, :, :width]
        return keys[step.rows, :, :width], values[step.rows, :, :width]

    def load(self, slot: int, layer_kv: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Copy a prefilled prompt's keys/values ([heads, length, dim] per layer) into ``slot``."""
        for layer, (k, v) in enumerate(layer_kv):
            cap = self.keys[layer].shape[2]
            length = k.shape[1]
            first = max(0, length - cap)  # a ring keeps the last `cap` tokens
            index = torch.arange(first, length, device=self.device) % cap
            self.keys[layer][slot, :, index] = k[:, first:].to(self.keys[layer].dtype)
            self.values[layer][slot, :, index] = v[:, first:].to(self.values[layer].dtype)

    # -- the rest of the Cache surface the models might look at ------------------------
    @property
    def is_initialized(self) -> bool:
        return True

    @property
    def is_compileable(self) -> bool:
        return True

    def get_seq_length(self, layer_idx: int = 0) -> int:  # only reached without position ids
        raise RuntimeError("SlotCache needs explicit position ids")
