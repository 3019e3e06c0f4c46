"""Credentials and authentication of qnext's gRPC, for the server and its clients, with vLLM's flag names.

Server (qnext-serve): `--api-key KEY` (or $QNEXT_API_KEY) makes ApiKeyInterceptor require the metadata
`authorization: Bearer KEY` on every call except grpc.health.v1 and server reflection (probes stay open); a missing
or wrong key gets UNAUTHENTICATED. `--ssl-certfile` + `--ssl-keyfile` serve TLS (ServerTLS); `--ssl-ca-certs`
also requires a client certificate signed by that CA (mutual TLS).

Clients (qnext-generate, -health, -bench and Client): `add_client_security_flags` adds the same flags plus `--tls`
(TLS with the system's roots); ClientSecurity holds them and `make_channel` builds a grpc.aio or sync channel. The
key goes as metadata through a client interceptor rather than as call credentials, which grpc refuses on
plaintext channels: one mechanism for plaintext and TLS alike.
"""

from __future__ import annotations

import argparse
import collections
import hmac
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

API_KEY_ENV = "QNEXT_API_KEY"
# methods of these services answer without a key: Kubernetes / docker health probes, grpcurl's reflection
OPEN_SERVICES = frozenset({"grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection",
                           "grpc.reflection.v1.ServerReflection"})
_HEADER = "authorization"


def api_key_from(flag_value: str | None) -> str | None:
    """The flag's key, else $QNEXT_API_KEY; an empty key is no key."""
    key = flag_value if flag_value is not None else os.environ.get(API_KEY_ENV)
    return key or None


def read_pem(flag: str, path: str | None) -> bytes | None:
    """The file's bytes (None for no path); ValueError naming `flag` when it cannot be read or is not PEM."""
    if path is None:
        return None
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise ValueError(f"{flag}: cannot read {path}: {e.strerror or e}") from None
    if b"-----BEGIN " not in data:  # grpc would only fail at the first handshake, with a vaguer message
        raise ValueError(f"{flag}: {path} is not a PEM file (no '-----BEGIN' line)")
    return data


def pair_problem(certfile: str | None, keyfile: str | None) -> str | None:
    """A certificate without its key (or the reverse): the message naming the missing flag."""
    if (certfile is None) == (keyfile is None):
        return None
    given, missing = ("--ssl-certfile", "--ssl-keyfile") if certfile else ("--ssl-keyfile", "--ssl-certfile")
    return f"{missing} is required with {given}"


# --- server ---------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ServerTLS:
    certificate_chain: bytes
    private_key: bytes = field(repr=False)
    client_ca: bytes | None = None  # set: mutual TLS, clients must present a certificate this CA signed

    @classmethod
    def from_files(cls, certfile: str | None, keyfile: str | None, ca_certs: str | None) -> ServerTLS | None:
        """None when no TLS flag is given; ValueError naming the flag for a half pair or an unreadable file."""
        problem = server_tls_problem(certfile, keyfile, ca_certs)
        if problem:
            raise ValueError(problem)
        if certfile is None:
            return None
        return cls(read_pem("--ssl-certfile", certfile), read_pem("--ssl-keyfile", keyfile),
                   read_pem("--ssl-ca-certs", ca_certs))

    def credentials(self) -> grpc.ServerCredentials:
        return grpc.ssl_server_credentials([(self.private_key, self.certificate_chain)],
                                           root_certificates=self.client_ca,
                                           require_client_auth=self.client_ca is not None)


def server_tls_problem(certfile: str | None, keyfile: str | None, ca_certs: str | None) -> str | None:
    """qnext-serve's usage errors among the TLS flags, naming the flag; None when they are consistent."""
    if ca_certs is not None and certfile is None and keyfile is None:
        return "--ssl-ca-certs needs --ssl-certfile and --ssl-keyfile (the server's own certificate)"
    return pair_problem(certfile, keyfile)


def add_server_security_flags(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("security")
    g.add_argument("--api-key", default=None, metavar="KEY",
                   help=f"require the metadata 'authorization: Bearer KEY' on every qnext.v1 call; health and "
                        f"reflection stay open (default: ${API_KEY_ENV}, else no authentication)")
    g.add_argument("--ssl-certfile", default=None, metavar="PEM",
                   help="certificate (chain) of the server: serve TLS (default: plaintext)")
    g.add_argument("--ssl-keyfile", default=None, metavar="PEM", help="private key of --ssl-certfile (default: none)")
    g.add_argument("--ssl-ca-certs", default=None, metavar="PEM",
                   help="CA bundle: require client certificates it signed, mutual TLS (default: none asked)")


class ApiKeyInterceptor(grpc.aio.ServerInterceptor):
    """Refuses calls without `authorization: Bearer <api_key>` with UNAUTHENTICATED, except OPEN_SERVICES'.
    `on_reject(method, code)` (method: the short name, "Generate") is called for each refusal of a method the
    server has, to count it."""

    def __init__(self, api_key: str, on_reject: Callable[[str, grpc.StatusCode], None] | None = None) -> None:
        self._key = api_key.encode()
        self._on_reject = on_reject

    async def intercept_service(self, continuation: Callable, details: grpc.HandlerCallDetails) -> Any:
        service, _, method = details.method.lstrip("/").partition("/")
        if service in OPEN_SERVICES:
            return await continuation(details)
        problem = self._problem(details.invocation_metadata)
        handler = await continuation(details)
        if problem is None:
            return handler
        if self._on_reject is not None and handler is not None:  # unknown names would make a metric label each
            self._on_reject(method, grpc.StatusCode.UNAUTHENTICATED)
        return _refusal(handler, problem)

    def _problem(self, metadata: Sequence[tuple[str, str | bytes]] | None) -> str | None:
        values = [v for k, v in metadata or () if k == _HEADER]
        if not values:
            return f"missing API key: send the metadata '{_HEADER}: Bearer <key>'"
        value = values[0].decode(errors="replace") if isinstance(values[0], bytes) else values[0]
        scheme, _, token = value.partition(" ")
        # compare_digest: the time taken does not tell how much of a guessed key was right
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self._key):
            return "invalid API key"
        return None


def _refusal(handler: grpc.RpcMethodHandler | None, message: str) -> grpc.RpcMethodHandler:
    """A handler of the same kind as `handler` (unary_unary for an unknown method) that aborts; requests are
    left undecoded, so a refusal never depends on the request's bytes."""
    async def refuse(request_or_iterator: Any, context: grpc.aio.ServicerContext) -> None:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    streams = (handler.request_streaming, handler.response_streaming) if handler is not None else (False, False)
    make = {(False, False): grpc.unary_unary_rpc_method_handler, (False, True): grpc.unary_stream_rpc_method_handler,
            (True, False): grpc.stream_unary_rpc_method_handler, (True, True): grpc.stream_stream_rpc_method_handler}
    return make[streams](refuse)


# --- clients --------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ClientSecurity:
    """How a client reaches the server. TLS is on with `tls` or any certificate path; ssl_ca_certs verifies the
    server (None: the system's roots), ssl_certfile / ssl_keyfile are this client's certificate (mutual TLS)."""
    api_key: str | None = field(default=None, repr=False)
    tls: bool = False
    ssl_ca_certs: str | None = None
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None

    @classmethod
    def from_env(cls) -> ClientSecurity:
        """Plaintext, with the key of $QNEXT_API_KEY if set."""
        return cls(api_key=api_key_from(None))

    @property
    def uses_tls(self) -> bool:
        return self.tls or any(p is not None for p in (self.ssl_ca_certs, self.ssl_certfile, self.ssl_keyfile))

    def credentials(self) -> grpc.ChannelCredentials | None:
        """None for plaintext; ValueError naming the flag for a half pair or an unreadable file."""
        if not self.uses_tls:
            return None
        problem = pair_problem(self.ssl_certfile, self.ssl_keyfile)
        if problem:
            raise ValueError(problem)
        return grpc.ssl_channel_credentials(read_pem("--ssl-ca-certs", self.ssl_ca_certs),
                                            read_pem("--ssl-keyfile", self.ssl_keyfile),
                                            read_pem("--ssl-certfile", self.ssl_certfile))


def add_client_security_flags(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("security")
    g.add_argument("--api-key", default=None, metavar="KEY",
                   help=f"sent as the metadata 'authorization: Bearer KEY' (default: ${API_KEY_ENV}, else none)")
    g.add_argument("--tls", action="store_true", help="TLS, verifying the server with the system's root "
                                                      "certificates (implied by the --ssl-* flags)")
    g.add_argument("--ssl-ca-certs", default=None, metavar="PEM",
                   help="CA bundle that verifies the server; turns TLS on (default: the system's roots with "
                        "--tls, else plaintext)")
    g.add_argument("--ssl-certfile", default=None, metavar="PEM",
                   help="client certificate, for mutual TLS (default: none)")
    g.add_argument("--ssl-keyfile", default=None, metavar="PEM", help="private key of --ssl-certfile (default: none)")


def client_security(args: argparse.Namespace) -> ClientSecurity:
    """ClientSecurity from add_client_security_flags' flags, checked now (ValueError naming the flag), so a bad
    path is reported before anything is sent."""
    security = ClientSecurity(api_key_from(args.api_key), args.tls, args.ssl_ca_certs, args.ssl_certfile,
                              args.ssl_keyfile)
    security.credentials()
    return security


def make_channel(target: str, security: ClientSecurity | None = None, *, aio: bool = True,
                 options: Sequence[tuple[str, Any]] = ()) -> grpc.aio.Channel | grpc.Channel:
    """A grpc.aio channel (aio=False: a sync one) to `target`, over TLS or plaintext, adding the API key to every
    call. security None: plaintext without a key."""
    security = security or ClientSecurity()
    creds = security.credentials()
    if aio:
        interceptors = _aio_key_interceptors(security.api_key) if security.api_key else None
        if creds is None:
            return grpc.aio.insecure_channel(target, options=list(options), interceptors=interceptors)
        return grpc.aio.secure_channel(target, creds, options=list(options), interceptors=interceptors)
    channel = grpc.insecure_channel(target, list(options)) if creds is None \
        else grpc.secure_channel(target, creds, list(options))
    return grpc.intercept_channel(channel, _SyncApiKey(security.api_key)) if security.api_key else channel


class _AioApiKey:
    """Adds the key to a call's metadata. grpc.aio files each interceptor object under one kind of call only,
    so there is one subclass per kind (_aio_key_interceptors)."""

    def __init__(self, api_key: str) -> None:
        self._entry = (_HEADER, f"Bearer {api_key}")

    async def _intercept(self, continuation: Callable, details: Any, request: Any) -> Any:
        metadata = grpc.aio.Metadata(*(details.metadata or ()), self._entry)
        return await continuation(details._replace(metadata=metadata), request)


class _AioKeyUnaryUnary(_AioApiKey, grpc.aio.UnaryUnaryClientInterceptor):
    intercept_unary_unary = _AioApiKey._intercept


class _AioKeyUnaryStream(_AioApiKey, grpc.aio.UnaryStreamClientInterceptor):
    intercept_unary_stream = _AioApiKey._intercept


class _AioKeyStreamUnary(_AioApiKey, grpc.aio.StreamUnaryClientInterceptor):
    intercept_stream_unary = _AioApiKey._intercept  # the third argument is the request iterator


class _AioKeyStreamStream(_AioApiKey, grpc.aio.StreamStreamClientInterceptor):
    intercept_stream_stream = _AioApiKey._intercept


def _aio_key_interceptors(api_key: str) -> list[_AioApiKey]:
    return [kind(api_key) for kind in (_AioKeyUnaryUnary, _AioKeyUnaryStream, _AioKeyStreamUnary,
                                       _AioKeyStreamStream)]


class _CallDetails(collections.namedtuple("_CallDetails", ("method", "timeout", "metadata", "credentials",
                                                           "wait_for_ready", "compression")),
                   grpc.ClientCallDetails):
    pass


class _SyncApiKey(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor,
                  grpc.StreamUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
    def __init__(self, api_key: str) -> None:
        self._entry = (_HEADER, f"Bearer {api_key}")

    def intercept_unary_unary(self, continuation: Callable, details: Any, request: Any) -> Any:
        return continuation(_CallDetails(details.method, details.timeout, [*(details.metadata or ()), self._entry],
                                         details.credentials, getattr(details, "wait_for_ready", None),
                                         getattr(details, "compression", None)), request)

    # one object serves every kind here (grpc.intercept_channel asks each kind); the third argument is the
    # request or the request iterator
    intercept_unary_stream = intercept_stream_unary = intercept_stream_stream = intercept_unary_unary
