"""dicom_node.auth: every route of the node's HTTP app behind bearer tokens, the browser login, the config rules.

The route test walks ``app.routes`` of the fullest app (STOW-RS, DICOMweb or the
proxy, OHIF), so a route added later is covered without editing this file.
Tokens are made at run time; the log is searched for them at the end.
"""

from __future__ import annotations

import logging
import re
import secrets
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import httpx
import pytest
from starlette.applications import Starlette
from starlette.routing import Route
from starlette.testclient import TestClient

from dicom_node.auth import LOGIN_PATH, SESSION_COOKIE, TOKENS_ENV, load_tokens, parse_tokens, resolve_auth
from dicom_node.config import HttpSection, NodeSettings, SpoolSection, ViewerSection, load_settings
from dicom_node.http import HttpServer, create_app
from dicom_node.index import Index
from dicom_node.spool import Spool
from radbridge_common.settings import ConfigError, read_layers
from tests.peers import free_port

#: A concrete value for each path parameter the node's routes declare.
SAMPLE_PARAMS = {
    "study": "1.2.3",
    "series": "1.2.3.4",
    "instance": "1.2.3.4.5",
    "frames": "1",
    "tag": "7FE00010",
    "path": "studies/1.2.3/metadata",
}
#: Routes that must be answerable without a token.
OPEN_PATHS = {"/healthz"}


def new_token() -> str:
    return secrets.token_urlsafe(32)


@pytest.fixture
def tokens() -> dict[str, str]:
    return {"all": new_token(), "read": new_token(), "write": new_token()}


@pytest.fixture
def token_file(tmp_path: Path, tokens: dict[str, str]) -> Path:
    path = tmp_path / "tokens"
    path.write_text(
        f"# RadBridge HTTP tokens\n{tokens['all']}\n{tokens['read']} read\n\n{tokens['write']} write\n"
    )
    path.chmod(0o600)
    return path


@pytest.fixture
def ohif_dir(tmp_path: Path) -> Path:
    d = tmp_path / "ohif"
    d.mkdir()
    (d / "index.html").write_text("<!doctype html><title>OHIF</title>")
    return d


@pytest.fixture
def store(tmp_path: Path) -> Iterator[tuple[Spool, Index]]:
    spool = Spool(tmp_path / "spool")
    index = Index(spool.index_path)
    yield spool, index
    index.close()


def settings_with(token_file: Path | None, ohif_dir: Path, tmp_path: Path, **http: object) -> NodeSettings:
    return NodeSettings(
        http=HttpSection(token_file=token_file, **http),  # type: ignore[arg-type]
        viewer=ViewerSection(ohif_dir=ohif_dir),
        spool=SpoolSection(directory=tmp_path / "spool"),
    )


def concrete(route: Route) -> str:
    """The route's path with every ``{param}`` / ``{param:conv}`` filled in."""
    return re.sub(r"\{(\w+)(?::\w+)?\}", lambda m: SAMPLE_PARAMS[m.group(1)], route.path)


def endpoints(app: Starlette) -> list[tuple[str, str]]:
    pairs = []
    for route in app.routes:
        assert isinstance(route, Route), f"unexpected route type {type(route).__name__}"
        pairs += [(method, concrete(route)) for method in sorted(route.methods or ())]
    return pairs


@pytest.mark.parametrize("upstream", ["", "proxy"])
def test_every_route_needs_a_token(
    tmp_path: Path,
    token_file: Path,
    ohif_dir: Path,
    tokens: dict[str, str],
    store: tuple[Spool, Index],
    upstream: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Without a token every (method, route) answers 401 + JSON + WWW-Authenticate; with one, never 401/403."""
    caplog.set_level(logging.DEBUG)
    settings = settings_with(token_file, ohif_dir, tmp_path)
    # The proxy's upstream: a loopback port nobody listens on (502 once authenticated).
    target = f"http://127.0.0.1:{free_port()}/dicom-web" if upstream else ""
    app = create_app(settings, *store, stow=True, viewer=True, upstream=target)
    pairs = endpoints(app)
    paths = {path for _, path in pairs}
    assert {"/healthz", "/metrics", "/dicom-web/studies", "/app-config.js"} <= paths
    assert ("POST", "/dicom-web/studies/1.2.3") in pairs and ("GET", "/studies/1.2.3/metadata") in pairs
    guarded = [(m, p) for m, p in pairs if p not in OPEN_PATHS] + [("GET", "/no/such/route")]
    with TestClient(app) as client:
        for method, path in guarded:
            answer = client.request(method, path)
            assert answer.status_code == 401, (method, path, answer.status_code)
            assert answer.headers["www-authenticate"] == 'Bearer realm="radbridge"', (method, path)
            if method != "HEAD":
                body = answer.json()
                assert body["error"] == "authentication required" and "Bearer" in body["detail"], (
                    method,
                    path,
                )
        bearer = {"Authorization": f"Bearer {tokens['all']}"}
        for method, path in guarded:
            answer = client.request(method, path, headers=bearer)
            assert answer.status_code not in (401, 403), (method, path, answer.status_code, answer.text[:200])
        assert client.get("/healthz").status_code == 200
        assert client.get("/metrics", headers=bearer).text.startswith("#")
    logged = "\n".join(f"{r.getMessage()} {vars(r)}" for r in caplog.records)
    assert "http.auth.refused" in logged
    assert not any(t in logged for t in tokens.values())


def test_wrong_or_malformed_credentials_are_401(
    tmp_path: Path, token_file: Path, ohif_dir: Path, store: tuple[Spool, Index]
) -> None:
    app = create_app(settings_with(token_file, ohif_dir, tmp_path), *store)
    with TestClient(app) as client:
        for header in (f"Bearer {new_token()}", "Bearer ", "Basic dXNlcjpwYXNz", "bearer"):
            answer = client.get("/dicom-web/studies", headers={"Authorization": header})
            assert answer.status_code == 401, header
            assert 'error="invalid_token"' in answer.headers["www-authenticate"]
            assert answer.json()["error"] == "invalid credentials"
        answer = client.get("/metrics", headers={"Cookie": f"{SESSION_COOKIE}={new_token()}"})
        assert answer.status_code == 401 and "log in again" in answer.json()["detail"]


def test_scopes_answer_403(
    tmp_path: Path, token_file: Path, ohif_dir: Path, tokens: dict[str, str], store: tuple[Spool, Index]
) -> None:
    """A read token cannot STOW, a write-only token (a modality) cannot read; 403 names the scope."""
    app = create_app(settings_with(token_file, ohif_dir, tmp_path), *store, viewer=True)
    read = {"Authorization": f"Bearer {tokens['read']}"}
    write = {"Authorization": f"Bearer {tokens['write']}"}
    with TestClient(app) as client:
        answer = client.post("/dicom-web/studies", headers=read, content=b"x")
        assert answer.status_code == 403
        assert answer.json()["error"] == "forbidden" and "needs write" in answer.json()["detail"]
        assert 'error="insufficient_scope", scope="write"' in answer.headers["www-authenticate"]
        assert client.get("/dicom-web/studies", headers=read).status_code == 200
        for path in ("/dicom-web/studies", "/metrics", "/"):
            answer = client.get(path, headers=write)
            assert answer.status_code == 403 and "needs read" in answer.json()["detail"], path
        # Authorised to write: the STOW handler itself judges the (wrong) media type.
        assert client.post("/dicom-web/studies", headers=write, content=b"x").status_code == 415


def test_tokens_from_the_environment_on_a_real_server(
    tmp_path: Path, ohif_dir: Path, store: tuple[Spool, Index], monkeypatch: pytest.MonkeyPatch
) -> None:
    """$RADBRIDGE_HTTP_TOKENS alone ("TOKEN;TOKEN read") protects an app served by uvicorn."""
    full, reader = new_token(), new_token()
    monkeypatch.setenv(TOKENS_ENV, f"{full}; {reader} read")
    server = HttpServer(create_app(settings_with(None, ohif_dir, tmp_path), *store), "127.0.0.1", 0)
    url = f"http://127.0.0.1:{server.start()}"
    try:
        assert httpx.get(f"{url}/healthz").status_code == 200
        assert httpx.get(f"{url}/dicom-web/studies").status_code == 401
        assert (
            httpx.get(f"{url}/dicom-web/studies", headers={"Authorization": f"Bearer {reader}"}).json() == []
        )
        stow = httpx.post(
            f"{url}/dicom-web/studies", headers={"Authorization": f"Bearer {reader}"}, content=b""
        )
        assert stow.status_code == 403
        stow = httpx.post(
            f"{url}/dicom-web/studies", headers={"Authorization": f"Bearer {full}"}, content=b""
        )
        assert stow.status_code == 415
    finally:
        server.stop()


def test_browser_login_sets_a_strict_httponly_session_cookie(
    tmp_path: Path, token_file: Path, ohif_dir: Path, tokens: dict[str, str], store: tuple[Spool, Index]
) -> None:
    app = create_app(settings_with(token_file, ohif_dir, tmp_path, session_ttl_s=0.5), *store, viewer=True)
    with TestClient(app, follow_redirects=False) as client:
        page = client.get("/viewer?StudyInstanceUIDs=1.2.3", headers={"Accept": "text/html,*/*"})
        assert page.status_code == 401 and f"action={LOGIN_PATH}" in page.text
        assert 'value="/viewer?StudyInstanceUIDs=1.2.3"' in page.text
        assert client.get(LOGIN_PATH).status_code == 200
        wrong = client.post(LOGIN_PATH, data={"token": new_token(), "next": "/"})
        assert wrong.status_code == 401 and "not valid" in wrong.text and SESSION_COOKIE not in client.cookies
        for evil in ("https://evil.example/", "//evil.example/x", "/\\evil.example", "/\t/evil.example"):
            away = client.post(LOGIN_PATH, data={"token": tokens["read"], "next": evil})
            assert away.status_code == 303 and away.headers["location"] == "/", evil
        ok = client.post(
            LOGIN_PATH, data={"token": tokens["read"], "next": "/viewer?StudyInstanceUIDs=1.2.3"}
        )
        assert ok.status_code == 303 and ok.headers["location"] == "/viewer?StudyInstanceUIDs=1.2.3"
        cookie = ok.headers["set-cookie"]
        assert "HttpOnly" in cookie and "SameSite=strict" in cookie and "Path=/" in cookie
        assert tokens["read"] not in cookie  # a random session id, not the token
        assert client.get("/dicom-web/studies").status_code == 200  # the cookie, no header
        assert client.get("/viewer").status_code == 200
        assert client.post("/dicom-web/studies", content=b"").status_code == 403  # the token's scopes
        time.sleep(0.6)
        assert client.get("/dicom-web/studies").status_code == 401  # expired
        client.post(LOGIN_PATH, data={"token": tokens["all"]})
        assert client.get("/dicom-web/studies").status_code == 200
        assert client.get("/logout").status_code == 405
        assert client.get("/dicom-web/studies").status_code == 200
        assert client.post("/logout").status_code == 303
        assert client.get("/dicom-web/studies").status_code == 401


@pytest.mark.parametrize(
    ("auth", "host", "with_tokens", "outcome"),
    [
        ("auto", "127.0.0.1", False, "open"),  # the demo and the single-machine default
        ("auto", "::1", False, "open"),
        ("auto", "0.0.0.0", False, "refused"),
        ("auto", "pacs-gw.example", False, "refused"),
        ("auto", "0.0.0.0", True, "tokens"),
        ("auto", "127.0.0.1", True, "tokens"),
        ("token", "127.0.0.1", False, "refused"),
        ("none", "0.0.0.0", False, "open"),  # explicit
        ("none", "0.0.0.0", True, "open"),
    ],
)
def test_auth_mode_rules(
    tmp_path: Path, token_file: Path, auth: str, host: str, with_tokens: bool, outcome: str
) -> None:
    http = HttpSection(auth=auth, token_file=token_file if with_tokens else None)
    if outcome == "refused":
        with pytest.raises(ConfigError, match=r"token_file|RADBRIDGE_HTTP_TOKENS"):
            resolve_auth(http, host, {})
    else:
        result = resolve_auth(http, host, {})
        assert (result is not None) == (outcome == "tokens")
        if result is not None:
            assert len(result.tokens) == 3


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        (
            '[http]\ntoken = "s3cr3t-s3cr3t-s3cr3t"\n',
            "http.token is refused.*token_file.*RADBRIDGE_HTTP_TOKENS",
        ),
        ('[http]\ntokens = ["s3cr3t-s3cr3t-s3cr3t"]\n', "http.tokens is refused"),
        (
            '[export.targets.pacs]\ntype = "dicomweb"\nurl = "http://pacs/dicom-web"\ntoken = "x"\n',
            "export.targets.pacs.token is refused.*token_file.*token_env",
        ),
        ('[http]\nauth = "maybe"\n', "http.auth 'maybe' is not one of auto, none, token"),
        ('[viewer]\nupstream_token = "x"\n', "viewer.upstream_token is refused.*upstream_token_file"),
    ],
)
def test_tokens_in_the_toml_are_refused(tmp_path: Path, toml: str, message: str) -> None:
    cfg = tmp_path / "node.toml"
    cfg.write_text(toml)
    with pytest.raises(ConfigError, match=message):
        load_settings(cfg)


def test_token_env_is_no_config_key_and_the_double_underscore_key_is_refused(tmp_path: Path) -> None:
    """RADBRIDGE_HTTP_TOKENS is read by dicom_node.auth only; RADBRIDGE_HTTP__TOKEN would be config."""
    assert read_layers(None, {TOKENS_ENV: new_token(), "RADBRIDGE_OHIF_DIR": "/x"}) == {}
    with pytest.raises(ConfigError, match="http.token is refused"):
        load_settings_from_env({"RADBRIDGE_HTTP__TOKEN": new_token()})


def load_settings_from_env(env: dict[str, str]) -> NodeSettings:
    from dicom_node.config import settings_from

    return settings_from(read_layers(None, env))


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("short-token", "at least 16"),
        ("{tok} admin", r"unknown scope\(s\) \['admin'\]"),
        ("{tok} read write", "found 3 fields"),
        ("{tok}\n{tok} read", "repeats the token of"),
        ("caf\u00e9-caf\u00e9-caf\u00e9-caf\u00e9", "printable ASCII"),
    ],
)
def test_bad_token_entries_are_named_without_the_token(tmp_path: Path, text: str, message: str) -> None:
    secret = new_token()
    path = tmp_path / "tokens"
    path.write_text(text.format(tok=secret))
    with pytest.raises(ConfigError, match=message) as info:
        load_tokens(HttpSection(token_file=path), {})
    assert secret not in str(info.value) and "short-token" not in str(info.value)


def test_token_file_missing_readable_by_others_and_scopes_parsed(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with pytest.raises(ConfigError, match="cannot be read"):
        load_tokens(HttpSection(token_file=tmp_path / "absent"), {})
    shared = tmp_path / "shared-tokens"
    secret = new_token()
    shared.write_text(secret)
    shared.chmod(0o644)
    with caplog.at_level(logging.WARNING, logger="dicom_node.auth"):
        assert len(load_tokens(HttpSection(token_file=shared), {})) == 1
    assert [getattr(r, "mode", "") for r in caplog.records] == ["0o644"]
    assert secret not in caplog.text
    a, b = new_token(), new_token()
    parsed = parse_tokens(f"{a} write,read\n# {b}\n", "test")
    assert [t.scopes for t in parsed] == [frozenset({"read", "write"})]


def test_cli_viewer_refuses_an_open_public_bind(
    tmp_path: Path, ohif_dir: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """`radbridge viewer` on 0.0.0.0 without tokens stops with a configuration error, before listening."""
    from radbridge.cli import main

    monkeypatch.delenv(TOKENS_ENV, raising=False)
    cfg = tmp_path / "node.toml"
    cfg.write_text(
        f'[viewer]\nhost = "0.0.0.0"\nport = 0\nohif_dir = "{ohif_dir}"\n'
        f'[spool]\ndirectory = "{tmp_path / "spool"}"\n'
    )
    assert main(["viewer", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "configuration error" in err and "http.auth = 'none'" in err


def test_node_settings_default_is_backward_compatible() -> None:
    """No tokens + loopback: the app is open as before (the demo, the existing tests)."""
    settings = NodeSettings()
    assert settings.http.auth == "auto" and settings.http.token_file is None
    assert resolve_auth(replace(settings.http), settings.http.host, {}) is None


def test_node_refuses_to_start_open_on_a_public_address(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Node.start checks the HTTP auth before it opens any port: the SCP port stays free."""
    import socket

    from dicom_node.config import ScpSection
    from dicom_node.node import Node

    monkeypatch.delenv(TOKENS_ENV, raising=False)
    scp_port = free_port()
    settings = NodeSettings(
        scp=ScpSection(port=scp_port),
        http=HttpSection(host="0.0.0.0", port=0),
        spool=SpoolSection(directory=tmp_path / "spool"),
    )
    node = Node(settings, f"127.0.0.1:{free_port()}")
    try:
        with pytest.raises(ConfigError, match="without authentication"):
            node.start()
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", scp_port))  # nothing listens there
    finally:
        node.stop()


def test_viewer_proxy_sends_its_own_token_upstream(
    tmp_path: Path, token_file: Path, ohif_dir: Path, tokens: dict[str, str], store: tuple[Spool, Index]
) -> None:
    """`radbridge viewer --upstream` to a protected node: the proxy's configured token goes upstream,
    the browser's credentials never do."""
    upstream = HttpServer(create_app(settings_with(token_file, ohif_dir, tmp_path), *store), "127.0.0.1", 0)
    upstream.start()
    root = f"{upstream.url}/dicom-web"
    mine = tmp_path / "upstream-token"
    mine.write_text(tokens["read"] + "\n")
    try:
        plain = NodeSettings(viewer=ViewerSection(ohif_dir=ohif_dir, upstream=root))
        with TestClient(create_app(plain, *store, stow=False, viewer=True)) as client:
            answer = client.get("/dicom-web/studies", headers={"Authorization": f"Bearer {tokens['all']}"})
            assert answer.status_code == 401  # the upstream's refusal, passed through
        with_token = replace(plain, viewer=replace(plain.viewer, upstream_token_file=mine))
        with TestClient(create_app(with_token, *store, stow=False, viewer=True)) as client:
            answer = client.get("/dicom-web/studies")
            assert answer.status_code == 200 and answer.json() == []
        missing = replace(plain, viewer=replace(plain.viewer, upstream_token_env="RB_TEST_ABSENT_TOKEN"))
        with pytest.raises(ConfigError, match="RB_TEST_ABSENT_TOKEN is not set"):
            create_app(missing, *store, stow=False, viewer=True)
    finally:
        upstream.stop()
