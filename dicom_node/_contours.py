"""Outline of a 2D binary mask as a closed polygon in DICOM SCOORD pixel coordinates.

Why this exists: OHIF draws an SR measurement only from an image SCOORD, so every
segment of a SEG also gets a planar outline on its key slice (see
`dicom_node.results`, the "keyslices" SR). highdicom does not trace contours, and
the usual tracers (skimage `find_contours`, OpenCV `findContours`) are not
dependencies of RadBridge; this is the small part of them that is needed, in
numpy/scipy only.

The outline follows the pixel edges (a "crack" boundary): its vertices are pixel
corners, so in SCOORD convention (PS3.3 C.18.6.1.1: the top-left corner of the
top-left pixel is (0, 0), the centre of that pixel (0.5, 0.5)) the polygon encloses
exactly the pixels of the filled component, and every vertex touches a mask pixel.
Only collinear corners are dropped while the outline is short enough; a longer one
is simplified with Douglas-Peucker (vertices are kept from the original outline)
until it has at most `max_points` vertices.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

__all__ = ["largest_component", "major_components", "outline", "polygon_area"]


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected component of a 2D mask (all False for an empty mask)."""
    labels, n = ndimage.label(mask)
    if n == 0:
        return np.zeros(mask.shape, dtype=bool)
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return labels == int(sizes.argmax())


def major_components(mask: np.ndarray, min_fraction: float = 0.3, limit: int = 4) -> list[np.ndarray]:
    """The 4-connected components of a 2D mask, largest first, down to ``min_fraction`` of the
    largest and at most ``limit`` of them: both lungs of a "Lungs" segment, not specks."""
    labels, n = ndimage.label(mask)
    if n == 0:
        return []
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    order = [int(i) for i in np.argsort(sizes)[::-1] if sizes[i] >= max(1, min_fraction * sizes.max())]
    return [labels == i for i in order[:limit]]


def polygon_area(points: np.ndarray) -> float:
    """Shoelace area of a polygon given as (N, 2) vertices (closed or not)."""
    x, y = points[:, 0].astype(np.float64), points[:, 1].astype(np.float64)
    return float(abs(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))) / 2)


def _crack_boundary(component: np.ndarray) -> np.ndarray:
    """Corners (x, y) of the outer pixel-edge boundary of one 4-connected component, in order.

    Holes are filled first (with a 4-connected background), which also guarantees
    that no two boundary pixels touch only diagonally: every corner on the boundary
    then has exactly one outgoing edge and the edges form one simple cycle.
    """
    filled = ndimage.binary_fill_holes(component)
    padded = np.pad(filled, 1)
    h, w = filled.shape
    stride = w + 1  # corner (y, x) -> y * stride + x, in unpadded coordinates
    fg = padded[1:-1, 1:-1]
    rows, cols = np.nonzero(fg)
    starts: list[np.ndarray] = []
    ends: list[np.ndarray] = []
    # Each exposed side of a pixel is one directed edge, clockwise on screen (y down).
    sides = (
        (~padded[:-2, 1:-1], (0, 0), (0, 1)),  # top: (r, c) -> (r, c+1)
        (~padded[1:-1, 2:], (0, 1), (1, 1)),  # right: (r, c+1) -> (r+1, c+1)
        (~padded[2:, 1:-1], (1, 1), (1, 0)),  # bottom: (r+1, c+1) -> (r+1, c)
        (~padded[1:-1, :-2], (1, 0), (0, 0)),  # left: (r+1, c) -> (r, c)
    )
    for exposed, (dy0, dx0), (dy1, dx1) in sides:
        sel = exposed[rows, cols]
        r, c = rows[sel], cols[sel]
        starts.append((r + dy0) * stride + c + dx0)
        ends.append((r + dy1) * stride + c + dx1)
    start = np.concatenate(starts)
    end = np.concatenate(ends)
    successor = dict(zip(start.tolist(), end.tolist(), strict=True))
    first = int(start.min())  # the top-left corner of the top-most, left-most pixel
    ring = [first]
    node = successor[first]
    while node != first:
        ring.append(node)
        node = successor[node]
        if len(ring) > len(successor):  # cannot happen for a filled 4-connected component
            raise ValueError("The mask boundary is not a simple cycle.")
    ids = np.asarray(ring, dtype=np.int64)
    return np.stack([ids % stride, ids // stride], axis=1).astype(np.float64)


def _drop_collinear(ring: np.ndarray) -> np.ndarray:
    """Keep only the corners where an open ring of (x, y) vertices changes direction."""
    prev = ring - np.roll(ring, 1, axis=0)
    nxt = np.roll(ring, -1, axis=0) - ring
    cross = prev[:, 0] * nxt[:, 1] - prev[:, 1] * nxt[:, 0]
    return ring[cross != 0]


def _douglas_peucker(path: np.ndarray, tolerance: float) -> np.ndarray:
    """Indices of the vertices of an open path kept by Douglas-Peucker at `tolerance`."""
    keep = np.zeros(len(path), dtype=bool)
    keep[0] = keep[-1] = True
    stack = [(0, len(path) - 1)]
    while stack:
        i, j = stack.pop()
        if j - i < 2:
            continue
        a, b = path[i], path[j]
        seg = b - a
        pts = path[i + 1 : j] - a
        norm = float(np.hypot(*seg))
        if norm == 0:
            dist = np.hypot(pts[:, 0], pts[:, 1])
        else:
            dist = np.abs(seg[0] * pts[:, 1] - seg[1] * pts[:, 0]) / norm
        k = int(dist.argmax())
        if dist[k] > tolerance:
            keep[i + 1 + k] = True
            stack.extend(((i, i + 1 + k), (i + 1 + k, j)))
    return np.flatnonzero(keep)


def _simplify(ring: np.ndarray, max_points: int) -> np.ndarray:
    """An open ring with at most max_points vertices, all taken from ring."""
    if len(ring) <= max_points:
        return ring
    # Split the ring at its first vertex and the vertex farthest from it; simplify both halves.
    far = int(np.hypot(*(ring - ring[0]).T).argmax())
    path = np.concatenate([ring, ring[:1]])
    tolerance = 0.5
    while True:
        left = _douglas_peucker(path[: far + 1], tolerance)
        right = _douglas_peucker(path[far:], tolerance) + far
        idx = np.concatenate([left[:-1], right[:-1]])  # drop the duplicated split points
        if len(idx) <= max_points:
            return ring[idx]
        tolerance *= 2


def outline(mask: np.ndarray, max_points: int = 200) -> np.ndarray:
    """Closed outline of the largest connected component of a non-empty 2D mask.

    Returns (N + 1, 2) float32 (column, row) vertices in SCOORD pixel coordinates with
    the last vertex equal to the first and at most max_points distinct vertices. The
    polygon encloses the component with its holes filled.
    """
    if mask.ndim != 2:
        raise ValueError(f"A 2D mask is needed, got shape {mask.shape}.")
    if max_points < 4:
        raise ValueError("max_points must be at least 4.")
    component = largest_component(np.asarray(mask, dtype=bool))
    if not component.any():
        raise ValueError("An empty mask has no outline.")
    ring = _simplify(_drop_collinear(_crack_boundary(component)), max_points)
    return np.concatenate([ring, ring[:1]]).astype(np.float32)
