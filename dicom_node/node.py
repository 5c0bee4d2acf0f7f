"""The running node: spool + index + SCP + HTTP front + worker threads, started and stopped together."""

from __future__ import annotations

import logging

from dicom_node.client import InferenceClient, channel_credentials
from dicom_node.config import NodeSettings
from dicom_node.errors import RadBridgeError
from dicom_node.export import tls_args
from dicom_node.http import HttpServer, create_app
from dicom_node.index import Index
from dicom_node.routing import RulePlanner
from dicom_node.scp import start_scp
from dicom_node.spool import Spool
from dicom_node.worker import ProgressHook, StepContext, Worker
from protos.radbridge.v1 import inference_pb2 as pb

logger = logging.getLogger(__name__)
#: How long start-up (and a plan refresh) waits for ListModels before going on without it.
LIST_MODELS_TIMEOUT_S = 3.0


class Node:
    """Owns every resource of one DICOM node; ``stop()`` releases them."""

    def __init__(
        self, settings: NodeSettings, inference_address: str, progress: ProgressHook | None = None
    ) -> None:
        if not inference_address:
            raise ValueError("An inference service address (host:port) is required.")
        inf = settings.inference
        # TLS files are read and checked now (TlsConfigError), not at the first job or export.
        credentials = channel_credentials(inf)
        for target in settings.export.targets.values():
            tls_args(target)
        self.settings = settings
        self.inference_address = inference_address
        self.spool = Spool(settings.spool.directory, settings.spool.min_free_bytes)
        removed = self.spool.remove_partials()
        if removed:
            logger.info("removed partial writes", extra={"event": "spool.partials", "count": removed})
        self.index = Index(self.spool.index_path)

        def list_models() -> list[pb.ModelInfo]:
            client = InferenceClient(
                inference_address, inf.deadline_s, 0, inf.chunk_bytes, credentials, inf.tls_server_name
            )
            try:
                return list(client.list_models(timeout_s=LIST_MODELS_TIMEOUT_S).models)
            finally:
                client.close()

        self.planner = RulePlanner(settings.routing.rules, list_models)
        self.rule_problems: list[str] = []
        self.ctx = StepContext(
            settings=settings,
            spool=self.spool,
            index=self.index,
            client_factory=lambda: InferenceClient(
                inference_address,
                inf.deadline_s,
                inf.connect_retries,
                inf.chunk_bytes,
                credentials,
                inf.tls_server_name,
            ),
            progress=progress,
            planner=self.planner,
        )
        self.worker = Worker(self.ctx)
        self._server = None
        self._http: HttpServer | None = None

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("The node is not started.")
        return int(self._server.server_address[1])

    @property
    def http_port(self) -> int:
        if self._http is None:
            raise RuntimeError("The HTTP front is not started (http.enabled = false?).")
        return self._http.port

    def check_rules(self) -> list[str]:
        """Every routing rule against the models' declared tasks; the problems in words (also logged)."""
        try:
            plans = self.planner.plans()
        except RadBridgeError as exc:
            problems = [f"routing rules not checked yet, the inference service did not answer ({exc})"]
        else:
            problems = [plan.problem for plan in plans.values() if plan.problem]
        for problem in problems:
            logger.warning("routing rule check", extra={"event": "routing.check", "problem": problem})
        return problems

    def start(self) -> Node:
        starts = self.index.count_start()
        logger.info("node start", extra={"event": "node.start", "starts": starts})
        self.rule_problems = self.check_rules()
        self._server = start_scp(self.settings.scp, self.spool, self.index)
        if self.settings.http.enabled:
            http = self.settings.http
            app = create_app(self.settings, self.spool, self.index, stow=True, viewer=False, upstream="")
            self._http = HttpServer(app, http.host, http.port)
            self._http.start()
        self.worker.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None
        if self._http is not None:
            self._http.stop()
            self._http = None
        self.worker.stop()
        self.index.close()

    def __enter__(self) -> Node:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
