"""Backend types by name, and the loaded models of a running service."""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Mapping
from dataclasses import dataclass

from inference_service.backends import BACKEND_TYPES
from inference_service.backends.base import Backend, ModelConfig
from inference_service.backends.replicas import ReplicatedBackend
from inference_service.config import ServiceSettings
from inference_service.errors import UnknownModel


def backend_class(kind: str) -> type[Backend]:
    try:
        target = BACKEND_TYPES[kind]
    except KeyError as exc:
        raise ValueError(
            f"Unknown backend type {kind!r}; known: {', '.join(sorted(BACKEND_TYPES))}."
        ) from exc
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


@dataclass
class ModelRegistry:
    """The models a service has loaded, by name."""

    models: Mapping[str, Backend]
    default: str

    def get(self, name: str) -> Backend:
        key = name or self.default
        try:
            return self.models[key]
        except KeyError as exc:
            raise UnknownModel(f"No model named {key!r} is loaded.") from exc

    def close(self) -> None:
        """Stop the backends' own threads (generation engines)."""
        for backend in self.models.values():
            backend.close()

    @classmethod
    def load(cls, settings: ServiceSettings) -> ModelRegistry:
        """Instantiate and load every configured model (fails fast at start-up)."""
        models: dict[str, Backend] = {}
        for name, section in settings.models.items():
            config = ModelConfig(
                name=name,
                backend=section.backend,
                path=section.path,
                dtype=section.dtype,
                device=section.device,
                preprocess=section.preprocess,
                prompts=dict(section.prompts),
                labels=dict(section.labels),
                options=dict(section.options),
            )
            kind = backend_class(section.backend)
            if len(section.devices) > 1:
                copies = [kind(dataclasses.replace(config, device=d)) for d in section.devices]
                backend: Backend = ReplicatedBackend(config, copies)
            else:
                if section.devices:
                    config = dataclasses.replace(config, device=section.devices[0])
                backend = kind(config)
            backend.load()
            models[name] = backend
        return cls(models=models, default=settings.inference_service.default_model)
