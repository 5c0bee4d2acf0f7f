"""The `radbridge` command line: serve, demo, models, status, retry, pull, viewer, config show."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
from pathlib import Path

from radbridge import __version__
from radbridge_common.settings import ConfigError, read_layers, redacted

VIEWER_LISTED_STUDIES = 20  # study URLs `radbridge viewer` prints
PRIVATE_UMASK = 0o077  # `radbridge serve` holds patient data: files 0600, directories 0700

DESCRIPTION = """\
RadBridge connects a PACS to medical vision-language models.

A DICOM node (C-STORE SCP) spools incoming studies durably, waits until a study
is quiet, routes its series to models by rules, streams each series over gRPC
to the inference service, and sends the answers back as DICOM SEG and SR
(TID 1500 measurements, TID 2000 narrative) to the configured destinations.
The default model is the weight-free 'reference' backend (non-clinical).
"""

EPILOG = """\
examples:
  radbridge demo --out out/           synthetic CT in, SEG + SRs out, on loopback
  radbridge serve --config node.toml  run the node and the inference service
  radbridge status --config node.toml each study's state, and why; --study KEY for its history
  radbridge retry --config node.toml  send the dead letters again
  radbridge pull --from pacs --study UID   fetch a study from a PACS ([pull.sources.pacs]) for analysis
  radbridge models                    models the inference service offers
  radbridge viewer                    OHIF at http://127.0.0.1:3000/ over the spool's studies

configuration: a TOML file (--config or $RADBRIDGE_CONFIG); every key can be
overridden by RADBRIDGE_<SECTION>__<KEY>, e.g. RADBRIDGE_SCP__PORT=11112.
HTTP tokens: a file named by http.token_file, or $RADBRIDGE_HTTP_TOKENS; never the TOML.
"""


def _load(path: str | None) -> tuple[object, object, dict]:
    from dicom_node.config import SECTIONS as NODE_SECTIONS
    from dicom_node.config import settings_from as node_settings
    from inference_service.config import SECTIONS as SERVICE_SECTIONS
    from inference_service.config import settings_from as service_settings

    data = read_layers(path)
    unknown = sorted(set(data) - set(NODE_SECTIONS) - set(SERVICE_SECTIONS))
    if unknown:
        raise ConfigError(f"Unknown config section(s): {', '.join(unknown)}.")
    return node_settings(data), service_settings(data), data


def cmd_serve(args: argparse.Namespace) -> int:
    from dicom_node.node import Node
    from radbridge.embedded import EmbeddedInferenceService
    from radbridge_common import logs

    node_settings, service_settings, _ = _load(args.config)
    # Owner-only for anything this process creates (spool, index, temporary files of libraries);
    # the spool and index also set their modes explicitly.
    os.umask(PRIVATE_UMASK)
    logs.configure(node_settings.logging.level, node_settings.logging.json)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    service = None
    addresses = node_settings.inference.replicas()
    if not addresses:
        service = EmbeddedInferenceService(service_settings).start()
        addresses = [service.address]
    node = Node(node_settings, addresses).start()
    for problem in node.rule_problems:
        print(f"radbridge: warning: {problem}", file=sys.stderr, flush=True)
    print(
        f"radbridge: AE {node_settings.scp.ae_title} listening on {node_settings.scp.host}:{node.port}; "
        f"inference at {', '.join(addresses)}",
        flush=True,
    )
    if node_settings.http.enabled:
        print(
            f"radbridge: DICOMweb (STOW-RS, QIDO-RS, WADO-RS) at "
            f"http://{node_settings.http.host}:{node.http_port}/dicom-web"
            f" ({'bearer token required' if node.http_protected else 'no authentication'})",
            flush=True,
        )
    try:
        stop.wait()
    finally:
        node.stop()
        if service is not None:
            service.stop()
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from radbridge.demo import run_demo
    from radbridge.summary import summarize
    from radbridge_common import logs

    logs.configure("WARNING", json_lines=True)
    spool = Path(args.spool) if args.spool else _load(args.config)[0].spool.directory
    outcome = run_demo(
        Path(args.out),
        slices=args.slices,
        quiet_window_s=args.quiet_window,
        progress=not args.no_progress,
        spool=spool,
    )
    print(summarize(outcome.files))
    print(f"study complete in {outcome.seconds:.1f} s; {len(outcome.files)} object(s) written to {args.out}")
    print(f"the study and its results stay in the spool {spool}: `radbridge viewer` shows them in OHIF")
    failed = {k: v for k, v in outcome.job_states.items() if not v.startswith("SUCCEEDED")}
    for key, value in failed.items():
        print(f"job {key}: {value}", file=sys.stderr)
    return 0 if outcome.files and not failed else 1


def cmd_models(args: argparse.Namespace) -> int:
    from dicom_node.client import InferenceClient, channel_credentials
    from protos.radbridge.v1 import inference_pb2 as pb

    node_settings, service_settings, _ = _load(args.config)
    address = args.address or next(iter(node_settings.inference.replicas()), "")
    service = None
    if not address:
        from radbridge.embedded import EmbeddedInferenceService

        service = EmbeddedInferenceService(service_settings).start()
        address = service.address
    try:
        inf = node_settings.inference
        client = InferenceClient(
            address, credentials=channel_credentials(inf), server_name=inf.tls_server_name
        )
        response = client.list_models()
        client.close()
    finally:
        if service is not None:
            service.stop()
    for m in response.models:
        tasks = ",".join(pb.TaskKind.Name(t).removeprefix("TASK_KIND_").lower() for t in m.tasks)
        flags = " (default)" if m.is_default else ""
        flags += " [non-clinical]" if m.identity.non_clinical else ""
        print(
            f"{m.identity.name}{flags}: backend={m.identity.backend} version={m.identity.version} "
            f"tasks={tasks} modalities={','.join(m.modalities)} ready={m.ready}"
        )
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from dicom_node.index import Index
    from dicom_node.spool import Spool, uid_key
    from dicom_node.status import describe, find_studies, job_label, series_labels

    node_settings, _, _ = _load(args.config)
    index = Index(Spool(node_settings.spool.directory).index_path)
    studies = list(find_studies(index, args.study))
    if args.study and not studies:
        print(f"radbridge: no study whose UID or key starts with {args.study!r}", file=sys.stderr)
        return 1
    doc: dict = {
        "instances": index.count_instances(),
        "studies": [describe(index, s, history=args.history or bool(args.study)) for s in studies],
        "jobs": [],
    }
    wanted = {s["study_instance_uid"] for s in studies}
    labels: dict[str, dict[str, str]] = {}
    for job in index.jobs():
        if job.study_instance_uid not in wanted:
            continue
        if job.study_instance_uid not in labels:
            labels[job.study_instance_uid] = series_labels(index, job.study_instance_uid)
        doc["jobs"].append(
            {
                "id": job.id,
                "kind": str(job.kind),
                "what": job_label(job, labels[job.study_instance_uid]),
                "state": str(job.state),
                "attempts": job.attempts,
                "interruptions": job.interruptions,
                "study_key": uid_key(job.study_instance_uid),
                "error": job.last_error,
                "delivery": str(job.delivery),  # exports: sent / awaiting commitment / committed / …
            }
        )
    print(json.dumps(doc, indent=2))
    return 0


def cmd_retry(args: argparse.Namespace) -> int:
    """Queue dead letters again; a running node (or the next start) sends them."""
    from dicom_node.index import Index
    from dicom_node.spool import Spool
    from dicom_node.status import find_studies

    node_settings, _, _ = _load(args.config)
    index = Index(Spool(node_settings.spool.directory).index_path)
    if args.study:
        studies = [s["study_instance_uid"] for s in find_studies(index, args.study)]
        if not studies:
            print(f"radbridge: no study whose UID or key starts with {args.study!r}", file=sys.stderr)
            return 1
        count = sum(index.retry_dead_letters(uid) for uid in studies)
    else:
        count = index.retry_dead_letters()
    print(f"radbridge: {count} dead-letter job(s) queued again")
    return 0


def _show_progress(received: int, expected: int | None) -> None:
    of = f"/{expected}" if expected is not None else ""
    print(f"\rradbridge pull: {received}{of} instance(s) received", end="", file=sys.stderr, flush=True)


def cmd_pull(args: argparse.Namespace) -> int:
    """Fetch one study from a configured PACS into the spool; the node analyses it."""
    from dicom_node.errors import PullError
    from dicom_node.index import Index
    from dicom_node.retrieve import pull_study
    from dicom_node.spool import Spool

    node_settings, _, _ = _load(args.config)
    sources = node_settings.pull.sources
    if not sources:
        raise ConfigError("No pull source is configured: add a [pull.sources.NAME] section.")
    name = args.source or (next(iter(sources)) if len(sources) == 1 else "")
    if name not in sources:
        known = ", ".join(sorted(sources))
        what = f"Unknown pull source {name!r}" if name else "Several pull sources are configured"
        raise ConfigError(f"{what}; use --from with one of: {known}.")
    spool = Spool(node_settings.spool.directory, node_settings.spool.min_free_bytes)
    index = Index(spool.index_path)
    try:
        outcome = pull_study(
            sources[name],
            spool,
            index,
            node_settings.scp.ae_title,
            study_uid=args.study,
            accession=args.accession,
            progress=None if args.no_progress else _show_progress,
            complete=not args.no_analysis,
        )
    except PullError as exc:
        if not args.no_progress:
            print(file=sys.stderr)
        print(f"radbridge pull: {exc}", file=sys.stderr)
        return 1
    finally:
        index.close()
    if not args.no_progress:
        print(file=sys.stderr)
    expected = "?" if outcome.expected is None else outcome.expected
    print(
        f"radbridge pull: study {outcome.study_instance_uid} (key {outcome.study_key}) from {name}:"
        f" {outcome.received} of {expected} instance(s) received, {outcome.failed} failed;"
        f" the spool holds {outcome.indexed}"
    )
    if outcome.failed or not outcome.indexed:
        where = "" if outcome.indexed else (
            " None is in this node's spool: does the PACS's entry for our AE title point at this node,"
            " and does `radbridge serve` use this config's spool?"
        )
        print(f"radbridge pull: the study is incomplete; it is not queued for analysis.{where}", file=sys.stderr)
        return 1
    if not args.no_analysis:
        print("radbridge pull: study complete; analysis queued (`radbridge serve` runs it, `radbridge status` shows it)")
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    node_settings, service_settings, _ = _load(args.config)
    print(json.dumps({"node": redacted(node_settings), "inference": redacted(service_settings)}, indent=2))
    return 0


def cmd_viewer(args: argparse.Namespace) -> int:
    """OHIF on one origin with its DICOMweb: the spool's own, or a proxy to ``viewer.upstream``."""
    from dataclasses import replace

    from dicom_node.http import HttpServer, create_app
    from dicom_node.index import Index
    from dicom_node.spool import Spool
    from dicom_node.viewer import ohif_missing
    from radbridge_common import logs

    node_settings, _, _ = _load(args.config)
    viewer = node_settings.viewer
    try:
        viewer = replace(
            viewer,
            port=viewer.port if args.port is None else args.port,
            upstream=viewer.upstream if args.upstream is None else args.upstream,
        )
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    node_settings = replace(node_settings, viewer=viewer)
    missing = ohif_missing(viewer.ohif_dir)
    if missing:
        print(f"radbridge: {missing}", file=sys.stderr)
        return 2
    logs.configure(node_settings.logging.level, node_settings.logging.json)
    spool = Spool(node_settings.spool.directory)
    index = Index(spool.index_path)
    app = create_app(node_settings, spool, index, stow=False, viewer=True, host=viewer.host)
    server = HttpServer(app, viewer.host, viewer.port)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    port = server.start()
    host = "127.0.0.1" if viewer.host in ("", "0.0.0.0") else viewer.host
    base = f"http://{'[' + host + ']' if ':' in host else host}:{port}"
    source = f"DICOMweb proxy to {viewer.upstream}" if viewer.upstream else f"spool {spool.root}"
    print(f"radbridge viewer: OHIF at {base}/ ({source}); Ctrl-C to stop", flush=True)
    if app.user_middleware:
        print(f"  log in with an access token (http.token_file / $RADBRIDGE_HTTP_TOKENS) at {base}/login")
    study_uids = [args.open_study] if args.open_study else []
    if not viewer.upstream:
        study_uids += [
            s["study_instance_uid"] for s in index.studies() if s["study_instance_uid"] not in study_uids
        ]
        if not study_uids:
            print(f"  no studies in {spool.root} yet: send one to `radbridge serve`, or run `radbridge demo`")
    for uid in study_uids[:VIEWER_LISTED_STUDIES]:
        print(f"  {base}/viewer?StudyInstanceUIDs={uid}", flush=True)
    if len(study_uids) > VIEWER_LISTED_STUDIES:
        print(f"  ... and {len(study_uids) - VIEWER_LISTED_STUDIES} more in the study list at {base}/")
    if args.open_study and (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")):
        import webbrowser

        webbrowser.open(f"{base}/viewer?StudyInstanceUIDs={args.open_study}")
    try:
        stop.wait()
    finally:
        server.stop()
        index.close()
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="radbridge",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"radbridge {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("serve", help="run the DICOM node and the inference service")
    p.add_argument("--config", help="TOML config file (default: $RADBRIDGE_CONFIG or built-in defaults)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("demo", help="synthetic CT in over C-STORE, SEG + SRs out, all on loopback")
    p.add_argument("--out", required=True, help="directory for the received SEG and SR files")
    p.add_argument("--slices", type=int, default=120, help="number of CT slices (default 120)")
    p.add_argument(
        "--quiet-window", type=float, default=2.0, help="study quiet window in seconds (default 2)"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument(
        "--config", help="TOML config; its spool.directory keeps the study (default radbridge-spool)"
    )
    p.add_argument("--spool", help="spool directory for this run (overrides the config's)")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("models", help="list the models the inference service offers")
    p.add_argument("--config")
    p.add_argument("--address", help="host:port of a running inference service")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser(
        "status",
        help="each study's state and why it is not (fully) processed; jobs; --study for its history",
    )
    p.add_argument(
        "--study", default="", help="only the study whose UID or key starts with this (adds its history)"
    )
    p.add_argument("--history", action="store_true", help="include every study's history")
    p.add_argument("--config")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("retry", help="queue dead-letter jobs (refused or failed exports) again")
    p.add_argument("--study", default="", help="only the study whose UID or key starts with this")
    p.add_argument("--config")
    p.set_defaults(func=cmd_retry)

    p = sub.add_parser("pull", help="fetch a study from a PACS (C-FIND + C-MOVE/C-GET, or QIDO/WADO-RS)")
    p.add_argument("--config")
    p.add_argument("--from", dest="source", default="", help="the [pull.sources.NAME] (default: the only one)")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--study", default="", metavar="UID", help="StudyInstanceUID")
    which.add_argument("--accession", default="", metavar="NUMBER", help="AccessionNumber")
    p.add_argument("--no-progress", action="store_true", help="no progress line")
    p.add_argument(
        "--no-analysis", action="store_true", help="only fetch; the study completes after its quiet window"
    )
    p.set_defaults(func=cmd_pull)

    p = sub.add_parser("viewer", help="OHIF in the browser over the spool's DICOMweb (or a PACS's)")
    p.add_argument("--config")
    p.add_argument("--port", type=int, help="HTTP port (default: viewer.port, 3000; 0 = any free port)")
    p.add_argument("--upstream", help="a PACS's DICOMweb root to proxy instead of the spool's own")
    p.add_argument(
        "--open-study", metavar="UID", help="this study's URL first (opened in a browser if a display is set)"
    )
    p.set_defaults(func=cmd_viewer)

    p = sub.add_parser("config", help="print the merged configuration (secrets redacted)")
    p.add_argument("action", choices=["show"])
    p.add_argument("--config")
    p.set_defaults(func=cmd_config)
    return parser


def main(argv: list[str] | None = None) -> int:
    from inference_service.errors import InferenceError

    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except ConfigError as exc:
        print(f"radbridge: configuration error: {exc}", file=sys.stderr)
        return 2
    except InferenceError as exc:  # e.g. a checkpoint directory is missing a file (at start-up)
        print(f"radbridge: inference service cannot start: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
