"""The asyncio gRPC server: servicer, health service, graceful stop."""

from __future__ import annotations

import asyncio
import logging

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from inference_service.backends.registry import ModelRegistry
from inference_service.config import ServiceSection, ServiceSettings
from inference_service.scheduler import Scheduler
from inference_service.servicer import InferenceServicer
from protos.radbridge.v1 import inference_pb2 as pb
from protos.radbridge.v1 import inference_pb2_grpc as pb_grpc
from radbridge_common.tls import pem_ca, pem_pair

logger = logging.getLogger(__name__)
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["InferenceService"].full_name
MAX_MESSAGE_BYTES = 4 * 1024 * 1024


class RunningServer:
    """A started server and what it owns; ``stop()`` releases all of it."""

    def __init__(
        self, server: grpc.aio.Server, port: int, scheduler: Scheduler, registry: ModelRegistry
    ) -> None:
        self.server = server
        self.port = port
        self.scheduler = scheduler
        self.registry = registry

    async def stop(self, grace_s: float = 5.0) -> None:
        await self.server.stop(grace_s)
        await self.scheduler.close()
        self.registry.close()


def server_credentials(section: ServiceSection) -> grpc.ServerCredentials | None:
    """TLS credentials (mutual with tls_client_ca_file), or None for plaintext; the files are read
    and checked before the port is bound (TlsConfigError naming the file)."""
    if section.tls_cert_file is None or section.tls_key_file is None:
        return None
    chain, key = pem_pair(section.tls_cert_file, section.tls_key_file)
    client_ca = pem_ca(section.tls_client_ca_file) if section.tls_client_ca_file is not None else None
    return grpc.ssl_server_credentials(
        [(key, chain)], root_certificates=client_ca, require_client_auth=client_ca is not None
    )


async def run_server(settings: ServiceSettings, registry: ModelRegistry | None = None) -> RunningServer:
    """Load the models (fail fast), bind, start; returns the bound port."""
    section = settings.inference_service
    credentials = server_credentials(section)  # a bad TLS file stops start-up before models load
    registry = registry or ModelRegistry.load(settings)
    scheduler = Scheduler(section.max_batch, section.batch_wait_ms, section.queue_size)
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ]
    )
    pb_grpc.add_InferenceServiceServicer_to_server(InferenceServicer(registry, scheduler, section), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    address = f"{section.host}:{section.port}"
    if credentials is not None:
        port = server.add_secure_port(address, credentials)  # TLS only: plaintext clients fail
    else:
        port = server.add_insecure_port(address)
    await server.start()
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    tls = "mutual" if section.tls_client_ca_file else bool(credentials)
    logger.info("inference service listening", extra={"event": "service.start", "port": port, "tls": tls})
    return RunningServer(server, port, scheduler, registry)


async def serve_forever(settings: ServiceSettings) -> None:
    running = await run_server(settings)
    try:
        await running.server.wait_for_termination()
    finally:
        await running.stop()


def main(settings: ServiceSettings) -> None:
    asyncio.run(serve_forever(settings))
