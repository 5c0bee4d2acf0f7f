"""RadBridge's objects in the pinned OHIF, in headless Chromium, served on one origin.

The study comes from the real pipeline (`run_demo`: synthetic CT by C-STORE, the
reference backend, SEG + SRs back). OHIF reads it over two sources, each behind
`radbridge viewer`'s app: "own" is RadBridge's read-only DICOMweb of the demo
spool; "orthanc-proxy" is the same study uploaded to a real Orthanc and read
through the DICOMweb proxy. Screenshots go to $RADBRIDGE_TEST_ARTIFACTS or
test-artifacts/viewer/.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dicom_node.config import DEFAULT_OHIF_DIR, NodeSettings, SpoolSection
from dicom_node.viewer import ohif_missing
from tests.browser import Browser, ViewerPage, chromium_missing
from tests.peers import DICOMWEB_PLUGIN, ORTHANC_BIN, OrthancServer

OHIF_DIR = Path(os.environ.get("RADBRIDGE_OHIF_DIR", str(DEFAULT_OHIF_DIR)))
SLICES = 40
KEY_SLICE = SLICES // 2  # 1-based instance index in OHIF's "I:k (k/n)": lungs, bone and soft tissue
SERIES = {"seg": "9701", "measurements": "9702", "narrative": "9703", "keyslices": "9704"}
HIDE_VIEWPORT_HTML = (
    '[data-cy="viewport-pane"] *:not(canvas):not(:has(canvas)) { visibility: hidden !important; }'
)
SATURATION = 40  # max-min over RGB: overlay colour, not a grey CT value
COLOUR_CHANGE = 24  # max channel difference from the screenshot without the SEG
JUMP_TO_SLICE = """index => {
  const cs = window.cornerstone;
  const viewport = cs.getRenderingEngines()[0].getViewports()[0];
  return cs.utilities.jumpToSlice(viewport.element, { imageIndex: index }).then(() => true);
}"""
SEGMENTATION_LOADED = "() => window.services.segmentationService.getSegmentations().length > 0"
FRAME_PX = 4  # cropped from each edge of a viewport screenshot
SCENARIO_TIMEOUT_MS = 30_000

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
if chromium_missing():
    pytestmark.append(pytest.mark.skip(reason=chromium_missing()))
elif ohif_missing(OHIF_DIR):
    pytestmark.append(pytest.mark.skip(reason=ohif_missing(OHIF_DIR)))


def artifacts_dir() -> Path:
    root = os.environ.get("RADBRIDGE_TEST_ARTIFACTS")
    directory = (
        Path(root) / "viewer" if root else Path(__file__).resolve().parents[2] / "test-artifacts" / "viewer"
    )
    directory.mkdir(parents=True, exist_ok=True)
    return directory


# -- data and servers ----------------------------------------------------------------
@dataclass(frozen=True)
class DemoStudy:
    study_uid: str
    spool: Path
    files: list[Path]  # source CT + every object RadBridge wrote


@pytest.fixture(scope="module")
def demo_study(tmp_path_factory: pytest.TempPathFactory) -> DemoStudy:
    from radbridge.demo import run_demo

    root = tmp_path_factory.mktemp("viewer-demo")
    outcome = run_demo(root / "out", slices=SLICES, quiet_window_s=0.5, spool=root / "spool", progress=False)
    assert outcome.files, outcome.job_states
    sources = sorted((root / "spool" / "instances").rglob("*.dcm"))
    assert len(sources) == SLICES
    return DemoStudy(outcome.study_instance_uid, root / "spool", sources + list(outcome.files))


@pytest.fixture(scope="module")
def orthanc_with_study(tmp_path_factory: pytest.TempPathFactory, demo_study: DemoStudy) -> Iterator[str]:
    if not os.access(ORTHANC_BIN, os.X_OK) or not Path(DICOMWEB_PLUGIN).exists():
        pytest.skip(f"Orthanc + DICOMweb plugin missing ({ORTHANC_BIN}, {DICOMWEB_PLUGIN})")
    with OrthancServer(tmp_path_factory.mktemp("viewer-orthanc")) as orthanc:
        for path in demo_study.files:
            orthanc._request("/instances", path.read_bytes(), {"Content-Type": "application/dicom"})
        yield orthanc.dicomweb_url


@dataclass(frozen=True)
class Served:
    url: str
    source: str  # "own" | "orthanc-proxy"


@pytest.fixture(scope="module", params=["own", "orthanc-proxy"])
def served(request: pytest.FixtureRequest, demo_study: DemoStudy) -> Iterator[Served]:
    """`radbridge viewer`'s app (viewer=True, stow=False) on a free port: own DICOMweb or the proxy."""
    from dicom_node.http import HttpServer, create_app
    from dicom_node.index import Index
    from dicom_node.spool import Spool

    settings = NodeSettings(spool=SpoolSection(directory=demo_study.spool))
    settings = replace(settings, viewer=replace(settings.viewer, ohif_dir=OHIF_DIR))
    if request.param == "orthanc-proxy":
        upstream = request.getfixturevalue("orthanc_with_study")
        settings = replace(settings, viewer=replace(settings.viewer, upstream=upstream))
    spool = Spool(settings.spool.directory)
    index = Index(spool.index_path)
    server = HttpServer(create_app(settings, spool, index, stow=False, viewer=True), "127.0.0.1", 0)
    server.start()
    try:
        yield Served(f"http://127.0.0.1:{server.port}", request.param)
    finally:
        server.stop()
        index.close()


@pytest.fixture(scope="module")
def chromium() -> Iterator[Browser]:
    browser = Browser("").start()
    try:
        yield browser
    finally:
        browser.stop()


@pytest.fixture
def viewer(chromium: Browser, served: Served) -> Iterator[ViewerPage]:
    """A fresh context and page per scenario."""
    chromium.base_url = served.url
    page = chromium.new_page()
    try:
        yield page
    finally:
        chromium.close_page(page)


# -- page helpers --------------------------------------------------------------------
def open_study(viewer: ViewerPage, study_uid: str) -> None:
    viewer.open_study(study_uid, timeout_ms=SCENARIO_TIMEOUT_MS)
    viewer.page.locator("canvas.cornerstone-canvas").first.wait_for(timeout=SCENARIO_TIMEOUT_MS)
    viewer.page.locator(f'[data-series="{SERIES["seg"]}"]').wait_for(timeout=SCENARIO_TIMEOUT_MS)


def current_slice(viewer: ViewerPage) -> int:
    """The 1-based image index OHIF shows in the viewport ("I:20 (20/40)"); 0 before it shows one."""
    item = viewer.page.locator('[data-cy="viewport-pane"] [title="Instance Number"]')
    if not item.count():
        return 0
    match = re.search(r"\((\d+)/(\d+)\)", item.first.inner_text())
    return int(match.group(1)) if match else 0


def go_to_slice(viewer: ViewerPage, target: int, timeout_s: float = 10.0) -> None:
    """Show the 1-based image ``target`` in the viewport (cornerstone's jumpToSlice, which OHIF's
    production build exposes as ``window.cornerstone``), checked on OHIF's own overlay text."""
    viewer.page.evaluate(JUMP_TO_SLICE, target - 1)
    deadline = time.monotonic() + timeout_s
    while (now := current_slice(viewer)) != target:
        assert time.monotonic() < deadline, f"viewport stuck at image {now}, wanted {target}"
        viewer.page.wait_for_timeout(100)


def viewport_image(viewer: ViewerPage, path: Path) -> np.ndarray:
    """The viewport canvas only, with OHIF's HTML overlays (text, arrows, markers) hidden."""
    page = viewer.page
    style = page.add_style_tag(content=HIDE_VIEWPORT_HTML)
    try:
        page.locator("canvas.cornerstone-canvas").first.screenshot(path=str(path))
    finally:
        style.evaluate("el => el.remove()")
    image = np.asarray(Image.open(path).convert("RGB")).astype(np.int16)
    # The active viewport's blue frame (CSS, 1-2 px) lies over the canvas edge: not an overlay.
    return image[FRAME_PX:-FRAME_PX, FRAME_PX:-FRAME_PX]


def overlay_pixels(image: np.ndarray, without: np.ndarray | None = None) -> int:
    """Pixels of overlay colour: saturated (not grey) and, given ``without``, changed from it."""
    mask = image.max(axis=-1) - image.min(axis=-1) > SATURATION
    if without is not None:
        assert without.shape == image.shape
        mask &= np.abs(image - without).max(axis=-1) > COLOUR_CHANGE
    return int(mask.sum())


def assert_no_error_boundary(viewer: ViewerPage) -> None:
    assert "Something went wrong" not in viewer.text()
    boundary = [line for line in viewer.console if "Error Boundary" in line]
    assert not boundary, boundary[0][:500]


def assert_no_page_errors(viewer: ViewerPage) -> None:
    assert not viewer.page_errors, viewer.page_errors[0][:1000]


# -- scenarios -----------------------------------------------------------------------
def test_seg_overlay_lies_on_the_ct(viewer: ViewerPage, demo_study: DemoStudy, served: Served) -> None:
    """(a) The SEG opens (double-click, "Yes") and colours a large part of the key CT slice."""
    out = artifacts_dir()
    tag = served.source
    open_study(viewer, demo_study.study_uid)
    go_to_slice(viewer, KEY_SLICE)
    plain = viewport_image(viewer, out / f"{tag}-ct-slice{KEY_SLICE}.png")
    plain_count = overlay_pixels(plain)

    viewer.page.locator(f'[data-series="{SERIES["seg"]}"]').dblclick()
    viewer.page.get_by_text("Do you want to open this Segmentation?").wait_for(timeout=SCENARIO_TIMEOUT_MS)
    viewer.page.get_by_role("button", name="Yes").click()
    viewer.page.wait_for_function(SEGMENTATION_LOADED, timeout=SCENARIO_TIMEOUT_MS)
    # Loading the SEG moves the viewport to its first image: go back to the key slice, and
    # look again until the overlay is drawn there.
    total = plain.shape[0] * plain.shape[1]
    deadline = time.monotonic() + 15
    seg_count = 0
    while seg_count <= total // 100 and time.monotonic() < deadline:
        go_to_slice(viewer, KEY_SLICE)
        viewer.page.wait_for_timeout(300)
        shot = viewport_image(viewer, out / f"{tag}-seg-slice{KEY_SLICE}.png")
        if current_slice(viewer) == KEY_SLICE:
            seg_count = overlay_pixels(shot, plain)
    viewer.page.screenshot(path=str(out / f"{tag}-seg-page.png"))
    print(
        f"[{tag}] viewport {plain.shape[1]}x{plain.shape[0]}: overlay pixels with SEG {seg_count} "
        f"({100 * seg_count / total:.1f} %), without SEG {plain_count} ({100 * plain_count / total:.2f} %)"
    )
    assert seg_count > total // 100, f"only {seg_count} of {total} viewport pixels carry the SEG overlay"
    assert plain_count < total // 1000, f"{plain_count} saturated pixels without the SEG"
    assert_no_error_boundary(viewer)
    assert_no_page_errors(viewer)


def test_narrative_sr_shows_the_report(viewer: ViewerPage, demo_study: DemoStudy, served: Served) -> None:
    """(b) The TID 2000 narrative SR opens as text: sections and the reference backend's sentence."""
    open_study(viewer, demo_study.study_uid)
    viewer.page.locator(f'[data-series="{SERIES["narrative"]}"]').dblclick()
    viewer.page.get_by_text("Findings").first.wait_for(timeout=SCENARIO_TIMEOUT_MS)
    viewer.page.screenshot(path=str(artifacts_dir() / f"{served.source}-narrative-sr.png"))
    text = viewer.text()
    assert "Impressions" in text
    assert f"Threshold analysis of {SLICES} slices." in text
    assert "not for diagnostic use" in text
    assert_no_error_boundary(viewer)
    assert_no_page_errors(viewer)


def test_key_slice_sr_shows_labelled_measurements(
    viewer: ViewerPage, demo_study: DemoStudy, served: Served
) -> None:
    """(c) The key-slice TID 1500 SR (9704) loads without OHIF's error boundary and shows each
    segment's outline labelled by its Finding Site; the arrows walk through all of them."""
    open_study(viewer, demo_study.study_uid)
    viewer.page.locator(f'[data-series="{SERIES["keyslices"]}"]').dblclick()
    pane = viewer.page.locator('[data-cy="viewport-pane"]').first
    label = re.compile(r"\d+: ([A-Z][A-Za-z ]+)")
    pane.get_by_text(label).first.wait_for(timeout=SCENARIO_TIMEOUT_MS)
    viewer.page.screenshot(path=str(artifacts_dir() / f"{served.source}-keyslices-sr.png"))
    seen: list[str] = []
    for _ in range(12):
        for name in label.findall(pane.inner_text()):
            if name.strip() not in seen:
                seen.append(name.strip())
        viewer.page.locator('[data-cy="viewport-action-arrows-right"]').first.click()
        viewer.page.wait_for_timeout(400)
    print(f"[{served.source}] key-slice SR labels: {seen}; area shown: {'Area:' in pane.inner_text()}")
    assert "Lung" in seen
    assert "Bone" in seen
    assert_no_error_boundary(viewer)
    assert_no_page_errors(viewer)
