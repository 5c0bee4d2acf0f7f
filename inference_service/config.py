"""ServiceSettings: the inference service's typed, frozen configuration.

TOML sections ``[inference_service]`` and ``[models.<name>]``; env overrides as
``RADBRIDGE_INFERENCE_SERVICE__PORT`` (see radbridge_common.settings).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from inference_service.backends import BACKEND_TYPES
from inference_service.preprocess import PRESETS
from radbridge_common.settings import build, read_layers
from radbridge_common.tls import check_pair

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 50051
DEFAULT_MAX_VOLUME_BYTES = 4 * 1024**3
DEFAULT_CHUNK_BYTES = 1024 * 1024  # well under gRPC's 4 MiB message limit
SECTIONS = ("inference_service", "models")
#: Backend types a [models.<name>] entry may name (registry.BACKEND_TYPES implements them).
#: The backend kinds a [models.X] section may name (one list: the registry's).
BACKEND_KINDS = tuple(BACKEND_TYPES)


@dataclass(frozen=True)
class ServiceSection:
    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT  # 0 = any free port
    default_model: str = "reference"
    max_volume_bytes: int = DEFAULT_MAX_VOLUME_BYTES
    chunk_bytes: int = DEFAULT_CHUNK_BYTES
    max_batch: int = 4
    batch_wait_ms: int = 20
    queue_size: int = 64
    # TLS: PEM certificate chain and private key (paths, never the secrets themselves); both or none.
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    # Mutual TLS: clients must present a certificate issued by this CA (PEM); needs cert and key.
    tls_client_ca_file: Path | None = None

    def __post_init__(self) -> None:
        if not 0 < self.chunk_bytes <= 3 * 1024 * 1024:
            raise ValueError("chunk_bytes must be between 1 and 3 MiB (gRPC limit is 4 MiB).")
        if self.max_batch < 1 or self.queue_size < 1:
            raise ValueError("max_batch and queue_size must be positive.")
        check_pair(self.tls_cert_file, self.tls_key_file, "TLS")
        if self.tls_client_ca_file is not None and self.tls_cert_file is None:
            raise ValueError("tls_client_ca_file (mutual TLS) needs tls_cert_file and tls_key_file.")


@dataclass(frozen=True)
class ModelSection:
    backend: str
    path: Path | None = None
    dtype: str = "auto"
    device: str = "auto"
    #: One copy of the model per device ("cuda:0", "cuda:1"); overrides ``device`` when set.
    devices: list[str] = field(default_factory=list)
    preprocess: str = ""
    prompts: dict[str, str] = field(default_factory=dict)
    labels: dict[str, list[str]] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if len(set(self.devices)) != len(self.devices) and any(d != "cpu" for d in self.devices):
            raise ValueError(f"devices lists a GPU twice: {self.devices}.")
        if self.backend not in BACKEND_KINDS:
            raise ValueError(f"Unknown backend {self.backend!r}; known: {', '.join(BACKEND_KINDS)}.")
        if self.preprocess not in PRESETS:
            raise ValueError(
                f"Unknown preprocess preset {self.preprocess!r}; known: {', '.join(PRESETS[1:])} or empty."
            )
        if self.backend != "reference" and self.path is None:
            raise ValueError(f"Backend {self.backend!r} needs a local checkpoint 'path'.")


def _default_models() -> dict[str, ModelSection]:
    return {"reference": ModelSection(backend="reference")}


@dataclass(frozen=True)
class ServiceSettings:
    inference_service: ServiceSection = field(default_factory=ServiceSection)
    models: dict[str, ModelSection] = field(default_factory=_default_models)

    def __post_init__(self) -> None:
        if self.inference_service.default_model not in self.models:
            raise ValueError(f"default_model {self.inference_service.default_model!r} is not in [models].")


def settings_from(data: dict[str, Any]) -> ServiceSettings:
    """Build ServiceSettings from the service's sections of a merged config dict."""
    return build(ServiceSettings, {k: v for k, v in data.items() if k in SECTIONS})


def load_settings(path: str | Path | None = None) -> ServiceSettings:
    return settings_from(read_layers(path))
