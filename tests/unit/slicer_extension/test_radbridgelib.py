"""RadBridgeLib: geometry conventions (RAS/LPS, IJK/index) and the client against a real service."""

from __future__ import annotations

import math
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import RadBridgeLib as lib

from inference_service.config import ServiceSection, ServiceSettings
from radbridge.embedded import EmbeddedInferenceService
from radbridge.synth import phantom_hu
from tests.tls_ca import Pki
from tests.unit.slicer_extension.conftest import EXTENSION_DIR

SPACING_IJK = (0.7, 0.9, 2.5)  # i (column), j (row), k (slice)
ORIGIN_RAS = np.array([10.0, -20.0, 30.0])
A = math.radians(20.0)


def _rot_x(a: float) -> np.ndarray:
    c, s = math.cos(a), math.sin(a)
    return np.array([[1, 0, 0], [0, c, -s], [0, s, c]])


def _rot_z(a: float) -> np.ndarray:
    c, s = math.cos(a), math.sin(a)
    return np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])


def oblique_ijk_to_ras() -> np.ndarray:
    """Rotated 20 deg about z, then 20 deg about x; anisotropic spacing."""
    m = np.eye(4)
    m[:3, :3] = _rot_x(A) @ _rot_z(A) @ np.diag(SPACING_IJK)
    m[:3, 3] = ORIGIN_RAS
    return m


# -- geometry -------------------------------------------------------------------------------


def test_known_voxel_lands_at_hand_computed_ras_point() -> None:
    m = oblique_ijk_to_ras()
    c, s = math.cos(A), math.sin(A)
    # Rx(a) Rz(a) maps the i axis (1,0,0) to (cos a, sin a cos a, sin a sin a).
    expected = ORIGIN_RAS + 2 * 0.7 * np.array([c, s * c, s * s])
    assert np.allclose(lib.ijk_to_ras(m, (2, 0, 0)), expected)
    # The k axis (0,0,1) goes to (0, -sin a, cos a): 3 slices of 2.5 mm.
    assert np.allclose(lib.ijk_to_ras(m, (0, 0, 3)), ORIGIN_RAS + 7.5 * np.array([0.0, -s, c]))
    # In LPS the same point has x and y negated.
    assert np.allclose(lib.ras_to_lps(expected), expected * [-1, -1, 1])


def test_ijk_ras_lps_index_round_trip_is_exact() -> None:
    m = oblique_ijk_to_ras()
    rng = np.random.default_rng(1)
    ijk = rng.uniform(0, 50, size=(200, 3))
    ras = lib.ijk_to_ras(m, ijk)
    assert np.allclose(lib.ras_to_ijk(m, ras), ijk)
    geometry = lib.VolumeGeometry.from_ijk_to_ras(m)
    assert np.allclose(geometry.spacing_mm, SPACING_IJK[::-1])  # (slice, row, column)
    lps = lib.ras_to_lps(ras)
    index = geometry.lps_to_index(lps)
    assert np.allclose(index, lib.ijk_to_index(ijk))
    assert np.allclose(lib.index_to_ijk(index), ijk)
    assert np.allclose(lib.lps_to_ras(geometry.index_to_lps(index)), ras)
    assert np.allclose(geometry.ijk_to_ras_matrix(), m)


def test_pb_geometry_round_trip_and_dicom_conventions() -> None:
    m = oblique_ijk_to_ras()
    g = lib.geometry_from_ijk_to_ras(m, (24, 40, 50))
    assert (g.slices, g.rows, g.columns) == (24, 40, 50)
    assert (g.slice_spacing_mm, g.row_spacing_mm, g.column_spacing_mm) == pytest.approx((2.5, 0.9, 0.7))
    # IOP first triple = direction of increasing column (i) in LPS, then increasing row (j).
    i_dir = m[:3, 0] / 0.7 * [-1, -1, 1]
    j_dir = m[:3, 1] / 0.9 * [-1, -1, 1]
    assert np.allclose(g.image_orientation_patient, [*i_dir, *j_dir])
    assert np.allclose(g.image_position_patient, ORIGIN_RAS * [-1, -1, 1])
    assert np.allclose(lib.ijk_to_ras_from_geometry(g), m, atol=1e-12)
    # ... and from the contract side back again.
    again = lib.geometry_from_ijk_to_ras(lib.ijk_to_ras_from_geometry(g), (24, 40, 50))
    assert np.allclose(again.image_orientation_patient, g.image_orientation_patient)
    assert np.allclose(again.image_position_patient, g.image_position_patient)


def test_left_handed_volume_is_flipped_to_contract_slice_order() -> None:
    m = oblique_ijk_to_ras()
    left = m.copy()
    left[:3, 2] *= -1  # k axis against cross(i, j)
    with pytest.raises(ValueError, match="canonical_slice_order"):
        lib.geometry_from_ijk_to_ras(left, (5, 4, 3))
    voxels = np.arange(60, dtype=np.int16).reshape(5, 4, 3)
    flipped, m2, was_flipped = lib.canonical_slice_order(voxels, left)
    assert was_flipped
    # Every voxel keeps its RAS position.
    for k in range(5):
        assert np.allclose(lib.ijk_to_ras(m2, (1, 2, 4 - k)), lib.ijk_to_ras(left, (1, 2, k)))
        assert flipped[4 - k, 2, 1] == voxels[k, 2, 1]
    lib.geometry_from_ijk_to_ras(m2, flipped.shape)  # now representable


def test_sheared_matrix_is_refused() -> None:
    m = oblique_ijk_to_ras()
    m[:3, 2] += 0.3 * m[:3, 0]
    with pytest.raises(ValueError, match="orthonormal"):
        lib.VolumeGeometry.from_ijk_to_ras(m)


def test_library_never_imports_slicer_or_project_packages() -> None:
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); import RadBridgeLib; "
        "bad = [m for m in sys.modules if m.split('.')[0] in "
        "('slicer', 'qt', 'vtk', 'dicom_node', 'radbridge', 'inference_service')]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(EXTENSION_DIR)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stdout + done.stderr


# -- against a real inference service on loopback ------------------------------------------


@pytest.fixture(scope="module")
def service() -> Iterator[EmbeddedInferenceService]:
    with EmbeddedInferenceService(ServiceSettings(inference_service=ServiceSection(port=0))) as svc:
        yield svc


@pytest.fixture(scope="module")
def client(service: EmbeddedInferenceService) -> Iterator[lib.RadBridgeClient]:
    with lib.RadBridgeClient(service.address, deadline_s=120) as c:
        yield c


@pytest.fixture(scope="module")
def ct() -> np.ndarray:
    return phantom_hu(n_slices=24)


def _reference_lungs(hu: np.ndarray) -> np.ndarray:
    """Air (< -500 HU) between the first and last body voxel of each row."""
    dense = hu > -500
    idx = np.arange(hu.shape[2])
    first = np.where(dense.any(axis=2), dense.argmax(axis=2), hu.shape[2])
    last = np.where(dense.any(axis=2), hu.shape[2] - 1 - dense[:, :, ::-1].argmax(axis=2), -1)
    inside = (idx >= first[..., None]) & (idx <= last[..., None])
    return inside & (hu < -500)


def test_list_models_lists_reference(client: lib.RadBridgeClient) -> None:
    names = [m.identity.name for m in client.list_models()]
    assert "reference" in names


def test_segment_and_report_on_phantom(client: lib.RadBridgeClient, ct: np.ndarray) -> None:
    progress: list[tuple[float, str]] = []
    result = client.analyze(
        ct,
        oblique_ijk_to_ras(),
        ["segment", "report"],
        on_progress=lambda f, msg: progress.append((f, msg)),
    )
    assert result.model_name == "reference"
    labels = result.segment_labels()
    assert "Lungs" in labels.values()
    for mask in result.masks.values():
        assert mask.shape == ct.shape and mask.dtype == bool
    lungs = result.masks[next(n for n, label in labels.items() if label == "Lungs")]
    ref = _reference_lungs(ct)
    assert ref.sum() > 1000
    overlap = (lungs & ref).sum()
    assert overlap / ref.sum() > 0.9
    assert overlap / lungs.sum() > 0.9
    assert result.report_text.strip()
    fractions = [f for f, _ in progress]
    assert len(fractions) >= 3
    assert all(b >= a for a, b in zip(fractions, fractions[1:], strict=False))
    assert fractions[0] < fractions[-1] == 1.0


def test_left_handed_input_gets_masks_in_its_own_order(client: lib.RadBridgeClient, ct: np.ndarray) -> None:
    m = oblique_ijk_to_ras()
    n = ct.shape[0]
    left = m.copy()
    left[:3, 3] = m[:3, :3] @ [0, 0, n - 1] + m[:3, 3]
    left[:3, 2] = -m[:3, 2]  # same voxels in space, stored last slice first
    normal = client.analyze(ct, m, ["segment"])
    reversed_ = client.analyze(ct[::-1], left, ["segment"])
    assert normal.masks.keys() == reversed_.masks.keys()
    for number, mask in normal.masks.items():
        assert np.array_equal(reversed_.masks[number], mask[::-1])


def test_cancel_from_progress_callback(client: lib.RadBridgeClient, ct: np.ndarray) -> None:
    cancel = threading.Event()
    calls: list[float] = []

    def on_progress(fraction: float, message: str) -> None:
        calls.append(fraction)
        cancel.set()

    with pytest.raises(lib.RadBridgeCancelled):
        client.analyze(
            ct, oblique_ijk_to_ras(), ["segment", "report"], on_progress=on_progress, cancel_event=cancel
        )
    assert len(calls) == 1
    # The channel and the service are still usable afterwards.
    assert any(m.identity.name == "reference" for m in client.list_models())


def test_cancel_before_start(client: lib.RadBridgeClient, ct: np.ndarray) -> None:
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(lib.RadBridgeCancelled):
        client.analyze(ct, oblique_ijk_to_ras(), ["segment"], cancel_event=cancel)


def test_service_rejection_is_translated(client: lib.RadBridgeClient, ct: np.ndarray) -> None:
    with pytest.raises(lib.RadBridgeServerError) as info:
        client.analyze(ct, oblique_ijk_to_ras(), ["segment"], model="no-such-model")
    assert info.value.code is not None and info.value.code != grpc.StatusCode.OK
    assert "refused" in info.value.message or "no-such-model" in info.value.message


def test_bad_address_gives_clear_error(ct: np.ndarray) -> None:
    with lib.RadBridgeClient("127.0.0.1:1", deadline_s=2) as bad:
        with pytest.raises(lib.RadBridgeServerError) as info:
            bad.list_models()
        assert info.value.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
        assert "127.0.0.1:1" in str(info.value)
        with pytest.raises(lib.RadBridgeServerError, match="127.0.0.1:1"):
            bad.analyze(ct[:2], oblique_ijk_to_ras(), ["segment"])


def test_unknown_task_is_refused_locally(ct: np.ndarray) -> None:
    with lib.RadBridgeClient("127.0.0.1:1", deadline_s=1) as c, pytest.raises(ValueError, match="segmnt"):
        c.analyze(ct[:2], oblique_ijk_to_ras(), ["segmnt"])


# -- TLS: the panel's "Use TLS" + CA file against a service serving TLS ------------------------


def test_tls_channel_with_the_ca_file_reaches_a_tls_service(pki: Pki) -> None:
    section = ServiceSection(port=0, tls_cert_file=pki.server_crt, tls_key_file=pki.server_key)
    with EmbeddedInferenceService(ServiceSettings(inference_service=section)) as svc:
        port = svc.address.rsplit(":", 1)[1]
        with lib.RadBridgeClient(f"localhost:{port}", tls=True, ca_file=str(pki.ca_crt)) as c:
            assert "reference" in [m.identity.name for m in c.list_models()]
            result = c.analyze(phantom_hu(n_slices=4), np.diag([-0.7, -0.7, 2.5, 1.0]), ["segment"])
            assert result.masks and all(m.shape == (4, 512, 512) for m in result.masks.values())
        # Without our CA (system roots only) the server is not trusted; plaintext is refused too.
        for kwargs in ({"tls": True}, {"tls": False}):
            with lib.RadBridgeClient(f"localhost:{port}", deadline_s=5, **kwargs) as c:
                with pytest.raises(lib.RadBridgeServerError, match="Cannot reach") as info:
                    c.list_models()
                assert info.value.code == grpc.StatusCode.UNAVAILABLE


def test_mutual_tls_with_a_client_certificate(pki: Pki, tmp_path: Path) -> None:
    section = ServiceSection(
        port=0, tls_cert_file=pki.server_crt, tls_key_file=pki.server_key, tls_client_ca_file=pki.ca_crt
    )
    with EmbeddedInferenceService(ServiceSettings(inference_service=section)) as svc:
        address = f"localhost:{svc.address.rsplit(':', 1)[1]}"
        ca = str(pki.ca_crt)
        with lib.RadBridgeClient(
            address, ca_file=ca, cert_file=str(pki.client_crt), key_file=str(pki.client_key)
        ) as c:
            assert "reference" in [m.identity.name for m in c.list_models()]
        stranger = {"cert_file": str(pki.other_client_crt), "key_file": str(pki.other_client_key)}
        for kwargs in ({}, stranger):
            with lib.RadBridgeClient(address, ca_file=ca, deadline_s=5, **kwargs) as c:
                with pytest.raises(lib.RadBridgeServerError, match="Cannot reach") as info:
                    c.list_models()
                assert info.value.code == grpc.StatusCode.UNAVAILABLE
    with pytest.raises(ValueError, match="both cert_file and key_file"):
        lib.RadBridgeClient(address, ca_file=ca, cert_file=str(pki.client_crt))
    not_pem = tmp_path / "key.txt"
    not_pem.write_text("not a key")
    with pytest.raises(lib.RadBridgeError, match="key.txt is not a PEM file"):
        lib.RadBridgeClient(address, ca_file=ca, cert_file=str(pki.client_crt), key_file=str(not_pem))


def test_tls_needs_both_certificate_and_key(pki: Pki) -> None:
    with pytest.raises(ValueError, match="both tls_cert_file and tls_key_file"):
        ServiceSection(tls_cert_file=pki.server_crt)


def test_probability_maps_arrive_as_the_same_binary_masks(
    client: lib.RadBridgeClient, ct: np.ndarray
) -> None:
    """A service whose model sends probability maps (MASK_ENCODING_FRACTIONAL_UINT8): the panel
    gets each segment as its voxels of probability >= 0.5, the same structure as the binary mask."""
    from inference_service.config import ModelSection

    settings = ServiceSettings(
        inference_service=ServiceSection(port=0),
        models={"reference": ModelSection(backend="reference", options={"probability_maps": True})},
    )
    binary = client.analyze(ct, oblique_ijk_to_ras(), ["segment"])
    with (
        EmbeddedInferenceService(settings) as svc,
        lib.RadBridgeClient(svc.address, deadline_s=120) as soft_client,
    ):
        soft = soft_client.analyze(ct, oblique_ijk_to_ras(), ["segment"])
    assert soft.masks.keys() == binary.masks.keys()
    for number, mask in soft.masks.items():
        assert mask.dtype == bool and mask.shape == ct.shape
        assert np.mean(mask == binary.masks[number]) > 0.99
