from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from inference_service.errors import CheckpointError
from inference_service.vqvae import MaskDecoder
from tests.unit.inference_service.tiny_checkpoints import write_constant_npz, write_random_npz


def test_decodes_16_codes_to_a_64x64_map(tmp_path: Path) -> None:
    decoder = MaskDecoder.from_npz(write_random_npz(tmp_path / "vae.npz"))
    a = decoder.decode(list(range(16)))
    b = decoder.decode(list(range(16)))
    c = decoder.decode([127] * 16)
    assert a.shape == (64, 64) and a.dtype == np.float32
    np.testing.assert_array_equal(a, b)  # deterministic
    assert not np.array_equal(a, c)  # the codes matter


def test_output_bias_sets_the_map(tmp_path: Path) -> None:
    assert (MaskDecoder.from_npz(write_constant_npz(tmp_path / "p.npz", 1.0)).decode([0] * 16) > 0).all()
    assert (MaskDecoder.from_npz(write_constant_npz(tmp_path / "n.npz", -1.0)).decode([0] * 16) < 0).all()


def test_missing_key_is_named(tmp_path: Path) -> None:
    path = write_random_npz(tmp_path / "vae.npz")
    with np.load(path) as npz:
        arrays = {k: npz[k] for k in npz.files if k != "decoder.3.net.2.bias"}
    np.savez(path, **arrays)
    with pytest.raises(CheckpointError, match=r"decoder\.3\.net\.2\.bias"):
        MaskDecoder.from_npz(path)


def test_wrong_code_count(tmp_path: Path) -> None:
    import torch

    decoder = MaskDecoder.from_npz(write_random_npz(tmp_path / "vae.npz"))
    with pytest.raises(ValueError, match="16"):
        decoder(torch.zeros((1, 15), dtype=torch.long))
