"""Key-image helpers: which slices, which window, which colours, what is drawn."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
from pydicom.dataset import Dataset

from dicom_node import keyimages as ki
from dicom_node.results import ResultWriter
from protos.radbridge.v1 import inference_pb2 as pb


@pytest.mark.parametrize(
    ("segments", "boxes", "limit", "expected"),
    [
        ([5, 2, None], [], 8, [2, 5]),  # per segment its slice; a segment with none adds nothing
        ([5, 5], [(5, 0.9), (1, 0.1)], 8, [1, 5]),  # a slice once, however many reasons
        ([], [(1, 0.1), (7, 0.9), (3, 0.5)], 2, [3, 7]),  # boxes by score when bounded
        ([9, 8, 7], [(1, 1.0)], 2, [8, 9]),  # segments before boxes
        ([], [], 8, []),
    ],
)
def test_choose_key_slices(
    segments: list[int | None], boxes: list[tuple[int, float]], limit: int, expected: list[int]
) -> None:
    assert ki.choose_key_slices(segments, boxes, limit) == expected


def test_key_slices_are_bounded_for_many_segments() -> None:
    assert len(ki.choose_key_slices(list(range(100)), [(k, 0.5) for k in range(100)])) == ki.MAX_KEY_IMAGES


def test_lab_to_rgb() -> None:
    assert ki.lab_to_rgb([65535, 32896, 32896]) == (255, 255, 255)  # L 100, a 0, b 0: white
    assert ki.lab_to_rgb([0, 32896, 32896]) == (0, 0, 0)
    r, g, b = ki.lab_to_rgb(
        [int(53.24 / 100 * 65535), int((80.09 + 128) / 255 * 65535), int((67.2 + 128) / 255 * 65535)]
    )  # type: ignore[misc]
    assert r > 250 and g < 10 and b < 10  # sRGB red
    assert ki.lab_to_rgb([]) is None
    assert ki.colour(2, []) == ki.PALETTE[1]


def _header(**attrs: object) -> Dataset:
    ds = Dataset()
    for k, v in attrs.items():
        setattr(ds, k, v)
    return ds


def test_display_window() -> None:
    values = np.linspace(-1000, 1000, 10000, dtype=np.float32).reshape(100, 100)
    assert ki.display_window(
        _header(Modality="CT", WindowCenter=["50", "400"], WindowWidth=["350", "1500"]), values, True
    ) == (50.0, 350.0)
    assert ki.display_window(_header(Modality="CT"), values, True) == ki.SOFT_TISSUE_WINDOW
    centre, width = ki.display_window(_header(Modality="DX"), values, False)  # percentiles
    assert abs(centre) < 1 and 1900 < width < 1980


def test_windowed() -> None:
    out = ki.windowed(np.array([[-200, -160, 40, 240, 1000]], dtype=np.int16), (40.0, 400.0))
    assert out.dtype == np.uint8 and out.tolist() == [[0, 0, 128, 255, 255]]


@pytest.mark.parametrize(
    ("iop", "expected"),
    [
        ([1, 0, 0, 0, 1, 0], ("L", "P")),  # axial
        ([1, 0, 0, 0, 0, -1], ("L", "F")),  # coronal
        ([0, 1, 0, 0, 0, -1], ("P", "F")),  # sagittal
        ([-1, 0, 0, 0, -1, 0], ("R", "A")),
    ],
)
def test_patient_orientation_from_iop(iop: list[float], expected: tuple[str, str]) -> None:
    assert ki.patient_orientation(_header(ImageOrientationPatient=iop)) == expected


def test_patient_orientation_of_a_projection_and_unknown() -> None:
    assert ki.patient_orientation(_header(PatientOrientation=["P", "F"])) == ("P", "F")
    assert ki.patient_orientation(_header()) is None


def test_render_draws_outline_box_and_labels_only() -> None:
    grey = np.full((64, 64), 100, dtype=np.uint8)
    mask = np.zeros((64, 64), dtype=bool)
    mask[20:40, 20:40] = True
    overlay = ki.Overlay([("Lesion", (255, 0, 0), mask)], [("Box", ki.BOX_COLOUR, (45.0, 45.0, 55.0, 55.0))])
    rgb = ki.render(grey, overlay, [ki.BANNER, "Model: m 1"])
    f = 8  # 64 columns -> enlarged to 512
    assert rgb.shape == (512, 512, 3) and rgb.dtype == np.uint8
    red = np.all(rgb == (255, 0, 0), axis=-1)
    assert red[20 * f : 40 * f, 20 * f - 4 : 20 * f + 4].any()  # the left edge of the square
    assert not red[25 * f : 35 * f, 25 * f : 35 * f].any()  # an outline, not a fill
    assert np.all(rgb[30 * f, 30 * f] == 100)  # inside: the grey image as it was
    assert np.all(rgb[int(50 * f), int(45 * f) - 1 : int(45 * f) + 3] == ki.BOX_COLOUR, axis=-1).any()
    assert (rgb[:10] == 0).all(axis=-1).mean() > 0.5 and (rgb[:40] == (255, 255, 0)).all(axis=-1).any()


def _result_with_masks_and_boxes() -> pb.AnalysisResult:
    code = pb.Code(value="1", scheme="99X", meaning="Thing")
    return pb.AnalysisResult(
        model=pb.ModelIdentity(name="m", backend="b", version="1"),
        tasks=[
            pb.TaskResult(
                task=pb.TASK_KIND_SEGMENT,
                masks=[
                    pb.MaskInfo(segment_number=1, label="a", category=code, type=code),
                    pb.MaskInfo(segment_number=2, label="b", category=code, type=code),
                ],
            ),
            pb.TaskResult(
                task=pb.TASK_KIND_DETECT,
                boxes=[pb.Box(slice_index=0, row_max=2, column_max=2, finding=code, score=0.3)],
            ),
        ],
    )


def test_writer_key_image_slices_follow_the_largest_areas_and_boxes() -> None:
    sources = []
    for k in range(6):
        ds = Dataset()
        ds.SOPInstanceUID = f"1.2.3.{k}"
        ds.SeriesInstanceUID = "1.2.3"
        sources.append(ds)
    a = np.zeros((6, 8, 8), dtype=bool)
    a[1, :2, :2] = True
    a[4, :4, :4] = True  # largest area of segment 1: slice 4
    b = np.zeros((6, 8, 8), dtype=bool)
    b[2, :1, :1] = True  # segment 2: slice 2
    writer = ResultWriter(sources, _result_with_masks_and_boxes(), {1: a, 2: b})
    assert writer.key_image_slices() == [0, 2, 4]


def test_slice_values_needs_pixels_or_a_file() -> None:
    with pytest.raises(ValueError, match="needs the source image's pixels"):
        ki.slice_values(_header(Modality="CT"))


def _cjk_font() -> str | None:
    chars = frozenset("肺结节骨折线")
    for path in (*ki.FALLBACK_FONTS, *ki._fontconfig_files(chars)):
        if Path(path).is_file() and all(ki._draws(path, c) for c in chars):
            return path
    return None


def _label_pixels(label: str) -> np.ndarray:
    grey = np.zeros((64, 64), dtype=np.uint8)
    overlay = ki.Overlay([], [(label, ki.BOX_COLOUR, (40.0, 10.0, 60.0, 50.0))])
    return ki.render(grey, overlay, [ki.BANNER])


def test_a_chinese_box_label_is_drawn_with_its_glyphs() -> None:
    """Pillow's own font has no CJK glyphs: every character would be the same empty box, so two
    labels of as many characters would give the same pixels."""
    if _cjk_font() is None:
        pytest.skip("needs a CJK font: Debian fonts-wqy-microhei (scripts/setup.sh test installs it)")
    assert ki._font_file(frozenset("肺结节 0.91")) != ""
    assert not np.array_equal(_label_pixels("肺结节 0.91"), _label_pixels("骨折线 0.91"))


def test_ascii_labels_keep_pillows_own_font_and_accents_get_one_that_draws_them() -> None:
    assert ki._font_file(frozenset("Lesion 0.93")) == ""
    accented = ki._font_file(frozenset("Läsion"))
    if not accented:
        pytest.skip("needs a font with Latin-1 glyphs: Debian fonts-dejavu-core")
    assert all(ki._draws(accented, c) for c in "Läsion")


def test_a_label_no_installed_font_draws_is_still_drawn_and_warned_about(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(ki, "FALLBACK_FONTS", ())
    monkeypatch.setattr(ki, "_fontconfig_files", lambda chars: [])
    ki._font_file.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger="dicom_node.keyimages"):
            rgb = _label_pixels("肺结节")
    finally:
        ki._font_file.cache_clear()
    assert rgb.shape == (512, 512, 3)
    (record,) = [r for r in caplog.records if getattr(r, "event", "") == "keyimages.missing_glyphs"]
    assert record.characters == 3 and "fonts-wqy-microhei" in record.hint


def test_a_font_file_freetype_cannot_open_is_passed_over(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    broken = tmp_path / "broken.ttf"
    broken.write_bytes(b"not a font")
    monkeypatch.setattr(ki, "FALLBACK_FONTS", (str(broken),))
    monkeypatch.setattr(ki, "_fontconfig_files", lambda chars: [])
    ki._font_file.cache_clear()
    try:
        assert ki._font_file(frozenset("Läsion")) == ""  # Pillow's own font, as with none installed
        assert _label_pixels("Läsion").shape == (512, 512, 3)
    finally:
        ki._font_file.cache_clear()
