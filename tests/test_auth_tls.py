"""qnext-serve's API key and TLS (qnext/rpc/security.py), against the real server in a subprocess.

Shown: with --api-key, qnext.v1 calls (Generate, Tokenize, ResetPrefixCache) without a key or with a wrong one
get UNAUTHENTICATED, are counted in qnext_rpc_total, and work with the right key, over plaintext and from a sync
channel too, while health and reflection answer without a key; over TLS a client trusting the test CA generates,
while a plaintext client or one trusting only the system's roots cannot connect; with --ssl-ca-certs (mutual TLS)
a client without a certificate is refused and one with the test client certificate served. qnext-generate,
qnext-health and qnext-bench reach a TLS + key server with the flags and fail readably (no traceback) without
them. A half certificate pair or an unreadable file is exit 2 naming the flag, for the server and the clients,
and so is a key that does not match the server's certificate. No key and no TLS on a non-loopback host logs a
warning.

Three servers (plaintext + key, TLS + key, mutual TLS), each started once for the module; the certificates are a
throwaway CA, a server certificate for 127.0.0.1 / localhost and a client certificate, made with the openssl CLI.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import grpc
import pytest
import structlog
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from qnext.rpc import convert, server as server_mod
from qnext.rpc.client import Client
from qnext.rpc.loadtest import cli as bench_cli
from qnext.rpc.security import API_KEY_ENV, ClientSecurity, make_channel
from test_service_support import REPO, SERVER_ARGS, ServerProcess

KEY = "test-key-7f3a"
UNAUTH = grpc.StatusCode.UNAUTHENTICATED
# the subprocesses must not pick up a key from the environment of whoever runs the tests
ENV = {k: v for k, v in os.environ.items() if k != API_KEY_ENV}


def openssl(cwd: Path, *args: str) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Path:
    """ca.pem, server.pem / server.key (SAN 127.0.0.1, localhost), client.pem / client.key, signed by the CA."""
    d = tmp_path_factory.mktemp("pki")
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]  # EC: quicker to make than RSA
    openssl(d, "req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "1",
            "-subj", "/CN=qnext test CA")
    for name, ext in (("server", "subjectAltName=IP:127.0.0.1,DNS:localhost"),
                      ("client", "extendedKeyUsage=clientAuth")):
        (d / f"{name}.ext").write_text(ext + "\n")
        openssl(d, "req", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN=qnext test {name}")
        openssl(d, "x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
                "-days", "1", "-extfile", f"{name}.ext", "-out", f"{name}.pem")
    return d


def server_flags(pki: Path, mutual: bool = False) -> list[str]:
    flags = ["--ssl-certfile", str(pki / "server.pem"), "--ssl-keyfile", str(pki / "server.key")]
    return flags + (["--ssl-ca-certs", str(pki / "ca.pem")] if mutual else [])


def client_flags(pki: Path, cert: bool = False) -> list[str]:
    pair = ["--ssl-certfile", str(pki / "client.pem"), "--ssl-keyfile", str(pki / "client.key")] if cert else []
    return ["--ssl-ca-certs", str(pki / "ca.pem"), *pair]


def trusting(pki: Path, cert: bool = False, api_key: str | None = None) -> ClientSecurity:
    """A client that verifies the server with the test CA (and presents the client certificate with `cert`)."""
    paths = {"ssl_certfile": str(pki / "client.pem"), "ssl_keyfile": str(pki / "client.key")} if cert else {}
    return ClientSecurity(api_key=api_key, ssl_ca_certs=str(pki / "ca.pem"), **paths)


def start(default_ckpt: Path, tmp_path_factory, name: str, *extra: str,
          security: ClientSecurity | None = None) -> ServerProcess:
    log = tmp_path_factory.mktemp("logs") / f"{name}.log"
    creds = security.credentials() if security else None  # the health checks' channel, while it starts
    return ServerProcess(default_ckpt, *extra, log_path=log, credentials=creds)


@pytest.fixture(scope="module")
def key_server(default_ckpt, tmp_path_factory):
    s = start(default_ckpt, tmp_path_factory, "key", "--api-key", KEY)
    yield s
    assert s.stop() == 0


@pytest.fixture(scope="module")
def tls_server(default_ckpt, tmp_path_factory, pki):
    sock = tmp_path_factory.mktemp("uds") / "grpc.sock"
    s = start(default_ckpt, tmp_path_factory, "tls", "--api-key", KEY, *server_flags(pki), "--uds", str(sock),
              security=trusting(pki))
    s.uds = sock
    yield s
    assert s.stop() == 0
    assert not sock.exists()  # gRPC removes its socket when the server stops


@pytest.fixture(scope="module")
def mtls_server(default_ckpt, tmp_path_factory, pki):
    s = start(default_ckpt, tmp_path_factory, "mtls", *server_flags(pki, mutual=True), security=trusting(pki, True))
    yield s
    assert s.stop() == 0


async def outcomes(target: str, security: ClientSecurity) -> dict[str, tuple[grpc.StatusCode, str]]:
    """method -> (status code, details) of a streaming Generate, a Tokenize and a ResetPrefixCache."""
    async def generate(c: Client) -> None:
        assert [t async for chunk in c.generate_stream(text="Hi", max_new_tokens=2) for t in chunk.token_ids]

    calls = {"Generate": generate, "Tokenize": lambda c: c.tokenize("Hi"),
             "ResetPrefixCache": lambda c: c.reset_prefix_cache()}
    result = {}
    async with Client(target, timeout=60, security=security) as c:
        for name, call in calls.items():
            try:
                await call(c)
                result[name] = (grpc.StatusCode.OK, "")
            except grpc.aio.AioRpcError as e:
                result[name] = (e.code(), e.details())
    return result


def test_calls_need_the_key(key_server):
    missing = asyncio.run(outcomes(key_server.target, ClientSecurity()))
    wrong = asyncio.run(outcomes(key_server.target, ClientSecurity(api_key="not-" + KEY)))
    right = asyncio.run(outcomes(key_server.target, ClientSecurity(api_key=KEY)))
    assert all(code == UNAUTH and "missing API key" in details for code, details in missing.values()), missing
    assert all(o == (UNAUTH, "invalid API key") for o in wrong.values()), wrong
    assert all(code == grpc.StatusCode.OK for code, _ in right.values()), right
    # refusals never reach the service: the interceptor's on_reject counts them
    body = urllib.request.urlopen(f"http://127.0.0.1:{key_server.metrics_port}/metrics", timeout=5).read().decode()
    counts = {(m.labels["method"], m.labels["code"]): m.value for f in text_string_to_metric_families(body)
              if f.name == "qnext_rpc" for m in f.samples if m.name == "qnext_rpc_total"}
    assert all(counts.get((method, "UNAUTHENTICATED")) == 2 for method in missing), counts


def test_sync_channel_sends_the_key(key_server):
    """qnext-health's kind of channel (sync): the key goes by its own interceptor."""
    for key, code in ((None, UNAUTH), (KEY, None)):
        with make_channel(key_server.target, ClientSecurity(api_key=key), aio=False) as ch:
            try:
                convert.GenerationStub(ch).Tokenize(convert.tokenize_request("Hi", None), timeout=30)
                got = None
            except grpc.RpcError as e:
                got = e.code()
        assert got == code


def test_health_and_reflection_answer_without_a_key(key_server):
    assert key_server.health() == health_pb2.HealthCheckResponse.SERVING  # ServerProcess sends no key
    with grpc.insecure_channel(key_server.target) as ch:
        stub = reflection_pb2_grpc.ServerReflectionStub(ch)
        resp = next(stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
    assert "qnext.v1.Generation" in {s.name for s in resp.list_services_response.service}


def test_tls_with_the_test_ca(tls_server, pki):
    ok = asyncio.run(outcomes(tls_server.target, trusting(pki, api_key=KEY)))
    assert all(code == grpc.StatusCode.OK for code, _ in ok.values()), ok
    # plaintext to the TLS port, and TLS that trusts only the system's roots: no connection at all
    for security in (ClientSecurity(api_key=KEY), ClientSecurity(api_key=KEY, tls=True)):
        refused = asyncio.run(outcomes(tls_server.target, security))
        assert all(code == grpc.StatusCode.UNAVAILABLE for code, _ in refused.values()), (security, refused)
    assert '"api_key": "on"' in tls_server.log_path.read_text()  # the start-up "security" line


def test_mutual_tls(mtls_server, pki):
    refused = asyncio.run(outcomes(mtls_server.target, trusting(pki)))
    assert all(code == grpc.StatusCode.UNAVAILABLE for code, _ in refused.values()), refused
    served = asyncio.run(outcomes(mtls_server.target, trusting(pki, cert=True)))
    assert all(code == grpc.StatusCode.OK for code, _ in served.values()), served


def cli(module: str, *args: str, **env: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, capture_output=True, text=True,
                          timeout=120, env={**ENV, **env})
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc


def test_generate_cli(tls_server, pki):
    base = ["Hello", "--server", tls_server.target, "--max-new-tokens", "3"]
    ok = cli("qnext.rpc.generate_cli", *base, *client_flags(pki), "--api-key", KEY)
    assert ok.returncode == 0 and "completion 3 tokens" in ok.stderr, ok.stderr
    from_env = cli("qnext.rpc.generate_cli", *base, *client_flags(pki), **{API_KEY_ENV: KEY})
    assert from_env.returncode == 0, from_env.stderr
    no_key = cli("qnext.rpc.generate_cli", *base, *client_flags(pki))
    assert no_key.returncode == 1 and no_key.stderr.startswith("qnext-generate: UNAUTHENTICATED: missing API key")
    no_tls = cli("qnext.rpc.generate_cli", *base, "--api-key", KEY)
    assert no_tls.returncode == 1 and no_tls.stderr.startswith("qnext-generate: UNAVAILABLE: "), no_tls.stderr


def test_health_cli(tls_server, pki):
    args = ["--target", tls_server.target]
    ok = cli("qnext.rpc.health_cli", *args, *client_flags(pki))
    assert ok.returncode == 0 and ok.stdout.strip().endswith("SERVING"), ok.stderr
    # --tls uses the system's roots; grpc reads them from this variable, here the test CA
    roots = cli("qnext.rpc.health_cli", *args, "--tls", GRPC_DEFAULT_SSL_ROOTS_FILE_PATH=str(pki / "ca.pem"))
    assert roots.returncode == 0, roots.stderr
    plain = cli("qnext.rpc.health_cli", *args)
    assert plain.returncode == 1 and "UNAVAILABLE" in plain.stderr, plain.stderr


def test_unix_socket_beside_tls(tls_server):
    """--uds: the health check reaches a TLS server through its unix socket in plaintext; only the server's user
    may connect (0600); the API key is still required there."""
    assert tls_server.uds.is_socket() and tls_server.uds.stat().st_mode & 0o777 == 0o600
    assert f"also on unix:{tls_server.uds}" in tls_server.banner
    health = cli("qnext.rpc.health_cli", "--target", f"unix://{tls_server.uds}")
    assert health.returncode == 0 and health.stdout.strip().endswith("SERVING"), health.stderr

    async def go(key: str | None):
        async with Client(f"unix://{tls_server.uds}", security=ClientSecurity(api_key=key)) as c:
            return list((await c.generate(text="Hi", max_new_tokens=2, temperature=0.0)).token_ids)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        asyncio.run(go(None))
    assert refused.value.code() == UNAUTH
    assert len(asyncio.run(go(KEY))) == 2


@pytest.mark.parametrize("path, named", [("/nonexistent-dir/grpc.sock", "is not a directory"),
                                         ("/tmp/" + "x" * 120, "is longer than 107 bytes"),
                                         ("{pki}/ca.pem", "exists and is not a socket")])
def test_bad_uds_exits_2_naming_the_flag(pki, path, named):
    proc = cli("qnext.rpc.server", "--uds", path.format(pki=pki))  # before any model loads
    assert proc.returncode == 2 and "--uds: " in proc.stderr and named in proc.stderr, proc.stderr


def test_bench_cli(tls_server, pki, tmp_path, capsys):
    args = ["--target", tls_server.target, "--num-requests", "2", "--input-len", "8", "--output-len", "2",
            "--no-plots", "--no-progress", "--output-dir", str(tmp_path), *client_flags(pki), "--api-key", KEY]
    assert bench_cli.main(args) == 0, capsys.readouterr().err
    config = json.loads((tmp_path / "result.json").read_text())["config"]
    assert config["ssl_ca_certs"] == str(pki / "ca.pem") and KEY not in json.dumps(config)  # the key is not kept
    parsed = bench_cli.build_parser().parse_args(["--tls", "--ssl-certfile", "c.pem", "--ssl-keyfile", "k.pem"])
    assert parsed.tls and (parsed.ssl_certfile, parsed.ssl_keyfile) == ("c.pem", "k.pem")


@pytest.mark.parametrize("module, flags, named", [
    ("qnext.rpc.server", ["--ssl-certfile", "{pki}/server.pem"], "--ssl-keyfile is required with --ssl-certfile"),
    ("qnext.rpc.server", ["--ssl-ca-certs", "{pki}/ca.pem"], "--ssl-ca-certs needs --ssl-certfile"),
    ("qnext.rpc.server", ["--ssl-certfile", "{pki}/missing.pem", "--ssl-keyfile", "{pki}/server.key"],
     "--ssl-certfile: cannot read"),
    ("qnext.rpc.server", ["--ssl-certfile", "{pki}/server.pem", "--ssl-keyfile", "{pki}/server.ext"],
     "--ssl-keyfile: "),  # not PEM
    ("qnext.rpc.generate_cli", ["--ssl-keyfile", "{pki}/client.key"], "--ssl-certfile is required with --ssl-keyfile"),
    ("qnext.rpc.health_cli", ["--ssl-ca-certs", "{pki}/missing.pem"], "--ssl-ca-certs: cannot read"),
    ("qnext.rpc.loadtest.cli", ["--no-plots", "--ssl-ca-certs", "{pki}/missing.pem"], "--ssl-ca-certs: cannot read"),
])
def test_bad_tls_flags_exit_2_naming_the_flag(pki, module, flags, named):
    # the files are read before anything starts: the server fails within its argument checks, no model loaded
    proc = cli(module, *[f.format(pki=pki) for f in flags])
    assert proc.returncode == 2 and named in proc.stderr, proc.stderr


def test_key_not_matching_the_certificate_exits_2(default_ckpt, pki):
    """PEM files that grpc cannot pair show only when the port opens, after the worker started: still exit 2
    with the flags named, and the worker stopped (the run returns)."""
    proc = cli("qnext.rpc.server", "--model", str(default_ckpt), "--host", "127.0.0.1", "--port", "0",
               "--metrics-port", "-1", *SERVER_ARGS, "--ssl-certfile", str(pki / "server.pem"),
               "--ssl-keyfile", str(pki / "client.key"))
    assert proc.returncode == 2 and "--ssl-keyfile is not the key of --ssl-certfile" in proc.stderr, proc.stderr


def test_open_port_warning():
    """No key and no TLS on a non-loopback address: one warning at start-up; on loopback none."""
    for host, warned in (("0.0.0.0", True), ("127.0.0.1", False), ("localhost", False), ("::1", False)):
        with structlog.testing.capture_logs() as logs:
            server_mod.Server._log_security(SimpleNamespace(cfg=server_mod.ServerConfig(host=host)))
        assert [e["log_level"] for e in logs] == (["info", "warning"] if warned else ["info"]), (host, logs)
    with structlog.testing.capture_logs() as logs:
        server_mod.Server._log_security(SimpleNamespace(cfg=server_mod.ServerConfig(host="0.0.0.0", api_key=KEY)))
    assert [e["log_level"] for e in logs] == ["info"]
