"""The running node: spool + index + SCP + HTTP front + worker threads, started and stopped together."""

from __future__ import annotations

import logging
from collections.abc import Sequence

from dicom_node.client import InferenceClient, channel_credentials
from dicom_node.config import NodeSettings
from dicom_node.deidentify import require_key
from dicom_node.errors import RadBridgeError
from dicom_node.export import tls_args
from dicom_node.http import HttpServer, create_app
from dicom_node.index import Index
from dicom_node.recovery import recover
from dicom_node.replicas import ReplicaPool
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
        self,
        settings: NodeSettings,
        inference_address: str | Sequence[str],
        progress: ProgressHook | None = None,
    ) -> None:
        """``inference_address``: one service (host:port) or several replicas of it."""
        require_key(settings)  # a de-identifying rule without its key stops start-up (ConfigError)
        addresses = [inference_address] if isinstance(inference_address, str) else list(inference_address)
        inf = settings.inference
        # TLS files are read and checked now (TlsConfigError), not at the first job or export.
        credentials = channel_credentials(inf)
        for target in settings.export.targets.values():
            tls_args(target)
        self.replicas = ReplicaPool(
            addresses,
            lambda address: InferenceClient(
                address,
                inf.deadline_s,
                inf.connect_retries,
                inf.chunk_bytes,
                credentials,
                inf.tls_server_name,
            ),
            inf.replica_cooldown_s,
        )
        self.settings = settings
        self.inference_address = self.replicas.addresses[0]
        self.spool = Spool(settings.spool.directory, settings.spool.min_free_bytes)
        removed = self.spool.remove_partials()
        if removed:
            logger.info("removed partial writes", extra={"event": "spool.partials", "count": removed})
        self.index = Index(self.spool.index_path)

        def list_models() -> list[pb.ModelInfo]:
            return self.replicas.list_models(LIST_MODELS_TIMEOUT_S)

        self.planner = RulePlanner(settings.routing.rules, list_models)
        self.rule_problems: list[str] = []
        self.ctx = StepContext(
            settings=settings,
            spool=self.spool,
            index=self.index,
            client_factory=self.replicas.client,
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

    @property
    def http_protected(self) -> bool:
        """Whether the HTTP front asks for tokens (False when open on loopback, or http.auth = none)."""
        return self._http is not None and bool(getattr(self._http.app, "user_middleware", None))

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
        http = self.settings.http
        # The app first: a refused auth configuration stops start-up before any port is open.
        app = (
            create_app(
                self.settings, self.spool, self.index, stow=True, viewer=False, upstream="", host=http.host
            )
            if http.enabled
            else None
        )
        starts = self.index.count_start()
        logger.info("node start", extra={"event": "node.start", "starts": starts})
        self.rule_problems = self.check_rules()
        recover(self.spool, self.index)  # after an unclean stop: index the files whose rows were lost
        self._server = start_scp(self.settings.scp, self.spool, self.index)
        if app is not None:
            self._http = HttpServer(app, http.host, http.port)
            self._http.start()
        self.worker.start()
        self.replicas.start_health_checks(self.settings.inference.health_interval_s)
        return self

    def stop(self) -> None:
        indexed = True
        if self._server is not None:
            self._server.shutdown()
            indexed = self._server.all_indexed  # else the next start re-indexes from the spool
            self._server = None
        if self._http is not None:
            self._http.stop()
            self._http = None
        if self.worker.stop() and indexed:
            self.index.mark_clean_stop()  # nothing is written any more: no recovery scan at the next start
        self.replicas.close()
        self.index.close()

    def __enter__(self) -> Node:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
