"""Where each slice of an analysed volume came from (shared by the volume reader and the writers).

Its own module so that the SEG/SR writers (and the Slicer panel that loads them) need nothing of
the volume reader.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SliceRef:
    """Where one volume slice came from: a received image (index into the sources) and its frame
    (1-based, multi-frame images only), or neither for a position interpolated by resampling."""

    source: int | None
    frame: int | None = None

    @property
    def received(self) -> bool:
        return self.source is not None
