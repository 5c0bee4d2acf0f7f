"""NodeSettings: the DICOM node's typed, frozen configuration.

Sections: [scp] (+ [scp.move_destinations]), [http], [viewer], [spool],
[completion], [routing] (+ [[routing.rules]]), [inference], [export]
(+ [export.targets.<name>]), [pull] (+ [pull.sources.<name>]), [worker],
[deidentification]. Every key can be
overridden by RADBRIDGE_<SECTION>__<KEY>; defaults are safe on one machine.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from radbridge_common.settings import ConfigError, build, read_layers
from radbridge_common.tls import check_pair

DEFAULT_AE_TITLE = "RADBRIDGE"
DEFAULT_SCP_PORT = 11112
DEFAULT_MAX_ASSOCIATIONS = 10  # pynetdicom's own default
DEFAULT_MAX_ASSOCIATIONS_PER_PEER = 8
DEFAULT_FIRST_PDU_TIMEOUT_S = 5.0  # ARTIM: connection accepted -> whole A-ASSOCIATE-RQ received
DEFAULT_MAX_FIRST_PDU_BYTES = 256 * 1024  # a 128-context A-ASSOCIATE-RQ is ~100 KiB at most in practice
#: The largest P-DATA-TF the node announces it receives. The lean acceptor holds a PDU whole in
#: memory, and pynetdicom sends a whole data set as one PDU to a peer that announces 0
#: (unlimited); dcmtk sends at most 128 KiB whatever is announced, so this costs no speed.
DEFAULT_MAX_PDU = 4 * 1024 * 1024
DEFAULT_SPOOL = Path("radbridge-spool")
DEFAULT_QUIET_WINDOW_S = 30.0
DEFAULT_HTTP_PORT = 8080
DEFAULT_MAX_REQUEST_BYTES = 4 * 1024**3  # one STOW-RS request body; larger -> 413
DEFAULT_MAX_PART_BYTES = 2 * 1024**3  # one instance inside a STOW-RS request
#: Where `scripts/setup.sh` unpacks the pinned prebuilt OHIF (outside the repository).
OHIF_VERSION = "3.13.2"
DEFAULT_OHIF_DIR = Path.home() / ".cache" / "radbridge" / f"ohif-{OHIF_VERSION}"
EXPORT_TYPES = ("dicom", "dicomweb")
DEFAULT_COMMITMENT_TIMEOUT_S = 300.0  # N-ACTION -> N-EVENT-REPORT; Orthanc answers in well under 1 s
DEFAULT_COMMITMENT_HOLD_S = 5.0
#: http.auth: "auto" = tokens when any are configured, else open on a loopback host only;
#: "token" = tokens required; "none" = open on any host (an explicit choice).
HTTP_AUTH_MODES = ("auto", "none", "token")
DEFAULT_SESSION_TTL_S = 12 * 3600.0  # a browser login (cookie) lasts this long
#: Keys refused wherever they appear: secrets are files or environment variables, never TOML.
SECRET_KEYS = ("token", "tokens", "bearer_token", "password")
SECTIONS = (
    "scp",
    "http",
    "viewer",
    "spool",
    "completion",
    "routing",
    "inference",
    "export",
    "worker",
    "logging",
)
SECTIONS += ("deidentification",)  # the crosswalk key of de-identifying routes
SECTIONS += ("pull",)  # PACS that `radbridge pull` fetches studies from (dicom_node.retrieve)
PULL_RETRIEVE = ("move", "get")  # a "dicom" pull source: C-MOVE to our AE, or C-GET on one association
MAX_PRIORS = 20  # pull_priors of one rule: more is a misconfiguration, not a comparison read
TASKS = ("report", "vqa", "classify", "detect", "segment", "embed")


def _check_ae(value: str, what: str) -> None:
    if not 0 < len(value) <= 16 or "\\" in value or not value.isprintable():
        raise ValueError(f"{what} {value!r} is not a valid AE title (1-16 printable characters).")


@dataclass(frozen=True)
class ScpSection:
    host: str = "127.0.0.1"
    port: int = DEFAULT_SCP_PORT  # 0 = any free port
    ae_title: str = DEFAULT_AE_TITLE
    allowed_calling_aets: list[str] = field(default_factory=list)  # empty = any
    max_pdu: int = DEFAULT_MAX_PDU  # 0 = unlimited (a PDU is held whole: a peer could claim 4 GiB)
    max_associations: int = DEFAULT_MAX_ASSOCIATIONS  # beyond: A-ASSOCIATE-RJ "local limit exceeded"
    max_associations_per_peer: int = DEFAULT_MAX_ASSOCIATIONS_PER_PEER  # per IP address; beyond: closed
    first_pdu_timeout_s: float = DEFAULT_FIRST_PDU_TIMEOUT_S
    max_first_pdu_bytes: int = DEFAULT_MAX_FIRST_PDU_BYTES
    #: pynetdicom's path only (the lean acceptor always writes fragments as they arrive): stream each
    #: received data set to the staging dir (bounded memory for huge instances); off by default:
    #: measured slower for 512x512 CT through pynetdicom (bench/bench_ingest.py).
    stream_to_disk: bool = False
    #: Serve storage-only associations (C-STORE, C-ECHO) with dicom_node.lean_scp instead of
    #: pynetdicom: same negotiation and statuses, about half the CPU per instance.
    lean_store: bool = True
    #: A-ASSOCIATE-RJ "called AE title not recognised" when the peer calls another AE title.
    require_called_aet: bool = True
    #: DICOM TLS (BCP 195 profile): with a certificate and key the port accepts TLS only.
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    #: CA of the client certificates; with tls_require_client_cert a peer without one is refused.
    tls_ca_file: Path | None = None
    tls_require_client_cert: bool = False
    #: Study Root Query/Retrieve FIND and MOVE SCP over the spool (received studies and results).
    query_retrieve: bool = True
    #: C-MOVE destinations the node sends to: AE title -> "host:port"; any other is 0xA801.
    move_destinations: dict[str, str] = field(default_factory=dict)
    #: Processes accepting on the port (SO_REUSEPORT): 1 = the node process alone; more = that
    #: many - 1 receiver processes serving storage associations beside it (dicom_node.receivers).
    receivers: int = 1

    def __post_init__(self) -> None:
        _check_ae(self.ae_title, "scp.ae_title")
        if (
            isinstance(self.receivers, bool)
            or not isinstance(self.receivers, int)
            or not 1 <= self.receivers <= 64
        ):
            raise ValueError(f"scp.receivers must be a whole number from 1 to 64, not {self.receivers!r}.")
        if self.receivers > 1 and (self.tls_cert_file is not None or not self.lean_store):
            raise ValueError(
                "scp.receivers > 1 needs plaintext DICOM and scp.lean_store = true (a TLS session cannot"
                " be handed between processes; the receivers serve storage with the lean acceptor)."
            )
        for aet, address in self.move_destinations.items():
            _check_ae(aet, "scp.move_destinations")
            host, _, port = str(address).rpartition(":")
            if not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ValueError(f"scp.move_destinations.{aet} {address!r} must be host:port.")
        check_pair(self.tls_cert_file, self.tls_key_file, "scp")
        if self.tls_cert_file is None and (self.tls_ca_file is not None or self.tls_require_client_cert):
            raise ValueError(
                "scp.tls_ca_file and scp.tls_require_client_cert need scp.tls_cert_file and key."
            )
        if self.tls_require_client_cert and self.tls_ca_file is None:
            raise ValueError(
                "scp.tls_require_client_cert needs scp.tls_ca_file to verify client certificates."
            )
        for key in ("max_associations", "max_associations_per_peer", "first_pdu_timeout_s"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
                raise ValueError(f"scp.{key} must be a positive number, not {value!r}.")
        if self.max_first_pdu_bytes < 1024:
            raise ValueError(
                f"scp.max_first_pdu_bytes must be at least 1024 (an A-ASSOCIATE-RQ with one presentation"
                f" context is a few hundred bytes), not {self.max_first_pdu_bytes!r}."
            )


@dataclass(frozen=True)
class HttpSection:
    """The node's one HTTP front: STOW-RS, read-only DICOMweb, viewer, /healthz."""

    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = DEFAULT_HTTP_PORT  # 0 = any free port
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES
    max_part_bytes: int = DEFAULT_MAX_PART_BYTES
    #: A STOW-RS request ends its study at once (no quiet window): for clients that send whole studies.
    stow_completes_study: bool = False
    auth: str = "auto"  # one of HTTP_AUTH_MODES; see dicom_node.auth
    #: Bearer tokens, one a line: "TOKEN" (read and write) or "TOKEN read" / "TOKEN write";
    #: more in $RADBRIDGE_HTTP_TOKENS (same format, ";" also separates). Never in the TOML.
    token_file: Path | None = None
    session_ttl_s: float = DEFAULT_SESSION_TTL_S

    def __post_init__(self) -> None:
        if self.max_request_bytes <= 0 or self.max_part_bytes <= 0:
            raise ValueError("http.max_request_bytes and http.max_part_bytes must be positive.")
        if self.auth not in HTTP_AUTH_MODES:
            raise ValueError(f"http.auth {self.auth!r} is not one of {', '.join(HTTP_AUTH_MODES)}.")
        if self.session_ttl_s <= 0:
            raise ValueError("http.session_ttl_s must be positive.")


@dataclass(frozen=True)
class ViewerSection:
    """`radbridge viewer`: OHIF on the same origin as its DICOMweb source."""

    host: str = "127.0.0.1"
    port: int = 3000  # 0 = any free port
    ohif_dir: Path = DEFAULT_OHIF_DIR  # the unpacked `@ohif/app` dist/
    #: "" = RadBridge's own read-only DICOMweb of the spool; else a PACS's DICOMweb root to proxy,
    #: e.g. "http://pacs:8042/dicom-web" (Orthanc).
    upstream: str = ""
    #: A bearer token the proxy sends to ``upstream`` (a protected PACS or RadBridge node): the
    #: first line of this file, or the environment variable named by upstream_token_env.
    upstream_token_file: Path | None = None
    upstream_token_env: str = ""

    def __post_init__(self) -> None:
        if self.upstream and not self.upstream.startswith(("http://", "https://")):
            raise ValueError(f"viewer.upstream {self.upstream!r} must be an http(s) URL or empty.")
        if self.upstream_token_file is not None and self.upstream_token_env:
            raise ValueError("viewer takes upstream_token_file or upstream_token_env, not both.")


@dataclass(frozen=True)
class SpoolSection:
    directory: Path = DEFAULT_SPOOL
    # New C-STOREs are answered 0xA700 and STOW-RS 503 (Retry-After) while less is free on the
    # spool's disk: senders retry later instead of having an instance accepted and then lost.
    min_free_bytes: int = 256 * 1024 * 1024

    def __post_init__(self) -> None:
        if self.min_free_bytes < 0:
            raise ValueError("spool.min_free_bytes must not be negative.")


@dataclass(frozen=True)
class CompletionSection:
    quiet_window_s: float = DEFAULT_QUIET_WINDOW_S

    def __post_init__(self) -> None:
        if self.quiet_window_s < 0:
            raise ValueError("completion.quiet_window_s must not be negative.")


@dataclass(frozen=True)
class RuleMatch:
    """All given fields must match; strings are case-insensitive regular expressions."""

    modality: list[str] = field(default_factory=list)
    body_part: str = ""
    series_description: str = ""
    calling_aet: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        for pattern in (self.body_part, self.series_description):
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"Invalid regular expression {pattern!r}: {exc}") from exc


@dataclass(frozen=True)
class RoutingRule:
    name: str
    model: str = ""  # empty = the inference service's default model
    tasks: list[str] = field(default_factory=lambda: ["segment", "report"])
    match: RuleMatch = field(default_factory=RuleMatch)
    question: str = ""
    labels: list[str] = field(default_factory=list)
    language: str = "en"
    #: Send this route's series de-identified (PS3.15 Basic Profile on what crosses the wire, UIDs
    #: through the keyed crosswalk of [deidentification]); see dicom_node.deidentify.
    deidentify: bool = False
    #: Also write a Secondary Capture series of the key slices with the result burned in, for PACS
    #: and viewers that show neither SEG nor SR (dicom_node.keyimages); exported like the SEG/SR.
    key_images: bool = False
    #: Prior fetching: when the rule matches a newly completed study, pull that patient's N most
    #: recent other studies from the [pull.sources] named by priors_from (0 = off), optionally only
    #: those sharing a modality with it (dicom_node.priors).
    pull_priors: int = 0
    priors_from: str = ""
    priors_same_modality: bool = False

    def __post_init__(self) -> None:
        bad = [t for t in self.tasks if t not in TASKS]
        if bad or not self.tasks:
            raise ValueError(f"Rule {self.name!r}: unknown task(s) {bad}; known: {', '.join(TASKS)}.")
        if isinstance(self.pull_priors, bool) or not 0 <= self.pull_priors <= MAX_PRIORS:
            raise ValueError(
                f"Rule {self.name!r}: pull_priors must be 0 (off) to {MAX_PRIORS}, not {self.pull_priors!r}."
            )
        if self.pull_priors and not self.priors_from:
            raise ValueError(
                f"Rule {self.name!r}: pull_priors = {self.pull_priors} needs priors_from, the name of a"
                " [pull.sources] entry to fetch the priors from."
            )


def _default_rules() -> list[RoutingRule]:
    return [
        RoutingRule(name="ct-reference", match=RuleMatch(modality=["CT"]), tasks=["segment", "report"]),
        RoutingRule(
            name="xray-reference", match=RuleMatch(modality=["CR", "DX"]), tasks=["segment", "report"]
        ),
    ]


@dataclass(frozen=True)
class RoutingSection:
    rules: list[RoutingRule] = field(default_factory=_default_rules)
    min_instances: int = 1


@dataclass(frozen=True)
class InferenceSection:
    address: str = ""  # host:port; empty (and no `addresses`) = the embedded service of `radbridge serve`
    #: More replicas of the same service (host:port each); each analysis goes to the least busy one.
    addresses: list[str] = field(default_factory=list)
    deadline_s: float = 600.0
    connect_retries: int = 3
    chunk_bytes: int = 1024 * 1024
    #: How long a replica that stopped answering is passed over while others answer.
    replica_cooldown_s: float = 30.0
    #: With several replicas: how often each one's gRPC health service is asked (0 = never).
    health_interval_s: float = 5.0

    #: TLS to the service; on as well when any tls_* file is given. No CA file = the system roots.
    tls: bool = False
    tls_ca_file: Path | None = None
    #: Our client certificate, for a service that requires one (tls_client_ca_file there).
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    #: The name the service's certificate is checked against, when not the address's host.
    tls_server_name: str = ""

    def __post_init__(self) -> None:
        check_pair(self.tls_cert_file, self.tls_key_file, "inference")
        for address in self.replicas():
            host, _, port = address.rpartition(":")
            if not host or not port.isdigit():
                raise ValueError(f"inference address {address!r} must be host:port.")

    def replicas(self) -> list[str]:
        """Every configured replica, ``address`` first; empty = start the embedded service."""
        return list(dict.fromkeys(a for a in [self.address, *self.addresses] if a))

    @property
    def uses_tls(self) -> bool:
        return self.tls or any(f is not None for f in (self.tls_ca_file, self.tls_cert_file))


def _article(noun: str) -> str:
    return "An" if noun[0] in "aeiou" else "A"


@dataclass(frozen=True)
class ExportTarget:
    """A destination: ``type = "dicom"`` (C-STORE SCU, optionally with Storage Commitment) or
    ``"dicomweb"`` (STOW-RS to ``url``)."""

    #: What the errors call it (a pull source has the same keys and checks).
    role: ClassVar[str] = "export target"

    type: str = "dicom"
    host: str = "127.0.0.1"
    port: int = 104
    ae_title: str = "PACS"
    calling_ae_title: str = ""  # empty = scp.ae_title
    url: str = ""  # dicomweb: the service root, e.g. "http://pacs:8042/dicom-web"
    timeout_s: float = 60.0  # dicomweb: per request
    #: dicomweb: a bearer token for the PACS, from this file (its first line) or from the
    #: environment variable named by token_env; read at each export, so it may be rotated.
    token_file: Path | None = None
    token_env: str = ""
    #: DICOM TLS (BCP 195) for dicom, HTTPS files for dicomweb; on as well when any tls_* file is
    #: given. No CA file = the system roots.
    tls: bool = False
    tls_ca_file: Path | None = None  # verifies the peer's certificate (and its host name)
    tls_cert_file: Path | None = None  # our client certificate, for a peer that requires one
    tls_key_file: Path | None = None
    tls_server_name: str = ""  # the name the peer's certificate is checked against; "" = host
    #: dicom: Storage Commitment Push Model after the C-STOREs (N-ACTION); the export counts as
    #: delivered only once the PACS's N-EVENT-REPORT says every instance is committed.
    storage_commitment: bool = False
    #: How long after the N-ACTION a report may come before the export fails (and is retried).
    commitment_timeout_s: float = DEFAULT_COMMITMENT_TIMEOUT_S
    #: How long the association stays open after the N-ACTION for a report on it (or on a new
    #: association to our SCP) before the job is parked to wait for it without blocking exports.
    commitment_hold_s: float = DEFAULT_COMMITMENT_HOLD_S

    def __post_init__(self) -> None:
        a = f"{_article(self.role)} {self.role}"  # "An export target", "A pull source"
        check_pair(self.tls_cert_file, self.tls_key_file, a)
        if self.storage_commitment and self.type != "dicom":
            raise ValueError(f"storage_commitment applies to dicom {self.role}s only (C-STORE).")
        for key in ("commitment_timeout_s", "commitment_hold_s"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
                raise ValueError(f"{a}'s {key} must be a number >= 0, not {value!r}.")
        if self.commitment_timeout_s <= 0:
            raise ValueError(f"{a}'s commitment_timeout_s must be positive.")
        if self.type == "dicomweb" and self.uses_tls and not self.url.startswith("https://"):
            raise ValueError(f"A dicomweb {self.role} with tls_* keys needs an https url, not {self.url!r}.")
        if self.type == "dicomweb" and self.tls_server_name:
            raise ValueError(
                f"tls_server_name applies to dicom {self.role}s only (HTTPS checks the url's host)."
            )
        if self.type not in EXPORT_TYPES:
            raise ValueError(
                f"{self.role.capitalize()} type {self.type!r} is not supported (known: {', '.join(EXPORT_TYPES)})."
            )
        if self.type == "dicom":
            _check_ae(self.ae_title, f"{self.role} ae_title")
        elif not self.url.startswith(("http://", "https://")):
            raise ValueError(f"A dicomweb {self.role} needs an http(s) url, not {self.url!r}.")
        if self.token_file is not None and self.token_env:
            raise ValueError(f"{a} takes token_file or token_env, not both.")

    @property
    def uses_tls(self) -> bool:
        return self.tls or any(f is not None for f in (self.tls_ca_file, self.tls_cert_file))


@dataclass(frozen=True)
class ExportSection:
    targets: dict[str, ExportTarget] = field(default_factory=dict)
    max_attempts: int = 6
    backoff_s: float = 2.0
    max_backoff_s: float = 300.0
    #: Export jobs run on this many threads, so a large SEG does not hold back the SRs of its
    #: study (the report reaches the PACS first), nor a slow or unreachable PACS the others.
    threads: int = 2

    def __post_init__(self) -> None:
        if isinstance(self.threads, bool) or not isinstance(self.threads, int) or self.threads < 1:
            raise ValueError(f"export.threads must be a whole number of at least 1, not {self.threads!r}.")


@dataclass(frozen=True)
class PullSource(ExportTarget):
    """A PACS `radbridge pull` fetches from, in an export target's shape: ``type = "dicom"``
    (C-FIND, then C-MOVE to ``move_destination`` or C-GET, per ``retrieve``) or ``"dicomweb"``
    (QIDO-RS, then WADO-RS from ``url``)."""

    role: ClassVar[str] = "pull source"

    retrieve: str = "move"  # one of PULL_RETRIEVE
    #: The AE title the PACS moves to (it must know it, with our host and port); "" = scp.ae_title.
    move_destination: str = ""
    timeout_s: float = 600.0  # dicomweb: per request; dicom: the wait for each C-FIND/C-MOVE answer

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.retrieve not in PULL_RETRIEVE:
            raise ValueError(
                f"A pull source's retrieve {self.retrieve!r} is not one of {', '.join(PULL_RETRIEVE)}."
            )
        if self.move_destination:
            _check_ae(self.move_destination, "pull source move_destination")


@dataclass(frozen=True)
class PullSection:
    sources: dict[str, PullSource] = field(default_factory=dict)


@dataclass(frozen=True)
class WorkerSection:
    threads: int = 2
    poll_interval_s: float = 0.5
    max_attempts: int = 5
    backoff_s: float = 5.0
    uid_root: str = "1.2.826.0.1.3680043.8.498."
    # Memory the analyses may hold at once (each volume and everything made from it, node +
    # embedded service), one pool shared by the analysis threads: an analysis waits while others
    # hold it, and a series whose volume would need more than all of it is refused with its
    # reason instead of risking an out-of-memory kill. 0 = 60% of this machine's memory.
    memory_budget_bytes: int = 0

    def __post_init__(self) -> None:
        if self.memory_budget_bytes < 0:
            raise ValueError("worker.memory_budget_bytes must not be negative (0 = automatic).")

    def analysis_budget_bytes(self) -> int:
        """The memory all analyses together may hold (0 = unknown: no limit)."""
        if self.memory_budget_bytes:
            return self.memory_budget_bytes
        try:
            physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError, AttributeError):
            return 0
        return physical * 6 // 10


@dataclass(frozen=True)
class LoggingSection:
    level: str = "INFO"
    json: bool = True


@dataclass(frozen=True)
class DeidentificationSection:
    """Where the crosswalk key of de-identifying routes comes from: a file (its bytes, at least
    16) or an environment variable named by ``key_env``; never the key itself in the TOML."""

    key_file: Path | None = None
    key_env: str = ""

    def __post_init__(self) -> None:
        if self.key_file is not None and self.key_env:
            raise ValueError("deidentification takes key_file or key_env, not both.")
        if self.key_env.upper().startswith("RADBRIDGE_"):
            raise ValueError(
                f"deidentification.key_env {self.key_env!r} must not start with RADBRIDGE_ (those"
                " variables are config keys); use e.g. DEID_KEY."
            )


@dataclass(frozen=True)
class NodeSettings:
    scp: ScpSection = field(default_factory=ScpSection)
    http: HttpSection = field(default_factory=HttpSection)
    viewer: ViewerSection = field(default_factory=ViewerSection)
    spool: SpoolSection = field(default_factory=SpoolSection)
    completion: CompletionSection = field(default_factory=CompletionSection)
    routing: RoutingSection = field(default_factory=RoutingSection)
    inference: InferenceSection = field(default_factory=InferenceSection)
    export: ExportSection = field(default_factory=ExportSection)
    pull: PullSection = field(default_factory=PullSection)
    worker: WorkerSection = field(default_factory=WorkerSection)
    logging: LoggingSection = field(default_factory=LoggingSection)
    deidentification: DeidentificationSection = field(default_factory=DeidentificationSection)

    def __post_init__(self) -> None:
        for i, rule in enumerate(self.routing.rules):
            if rule.priors_from and rule.priors_from not in self.pull.sources:
                known = ", ".join(sorted(self.pull.sources)) or "none"
                raise ValueError(
                    f"routing.rules[{i}].priors_from: {rule.priors_from!r} (rule {rule.name!r}) is not a"
                    f" [pull.sources] entry (configured: {known})."
                )


def _refuse_secrets(data: dict[str, Any]) -> None:
    """A token written into the config is refused, with where it belongs instead."""
    http = data.get("http")
    if isinstance(http, dict):
        for key in SECRET_KEYS:
            if key in http:
                raise ConfigError(
                    f"http.{key} is refused: tokens never go in the config. Put them in a file named"
                    ' by http.token_file (one a line, e.g. "TOKEN read") or in the environment'
                    " variable RADBRIDGE_HTTP_TOKENS."
                )
    viewer = data.get("viewer")
    for key in SECRET_KEYS + ("upstream_token",):
        if isinstance(viewer, dict) and key in viewer:
            raise ConfigError(
                f"viewer.{key} is refused: secrets never go in the config. Name a file with"
                " viewer.upstream_token_file, or an environment variable with viewer.upstream_token_env."
            )
    for section, group in (("export", "targets"), ("pull", "sources")):
        targets = data.get(section, {}).get(group, {}) if isinstance(data.get(section), dict) else {}
        for name, target in targets.items() if isinstance(targets, dict) else ():
            for key in SECRET_KEYS:
                if isinstance(target, dict) and key in target:
                    where = f"{section}.{group}.{name}"
                    raise ConfigError(
                        f"{where}.{key} is refused: secrets never go in the config. Name a"
                        f" file with {where}.token_file, or an environment variable with"
                        f" {where}.token_env."
                    )


def settings_from(data: dict[str, Any]) -> NodeSettings:
    """Build NodeSettings from the node's sections of a merged config dict."""
    _refuse_secrets(data)
    return build(NodeSettings, {k: v for k, v in data.items() if k in SECTIONS})


def load_settings(path: str | Path | None = None) -> NodeSettings:
    return settings_from(read_layers(path))
