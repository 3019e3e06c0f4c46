"""Helpers for the service tests (no tests here): the real server in a subprocess on free localhost ports."""

from __future__ import annotations

import sys
from pathlib import Path

import grpc

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # the repository root, for bench.* (not installed)
from bench.local_server import LocalServer  # noqa: E402

SERVER_ARGS = ["--cache-memory", "67108864", "--max-num-seqs", "32", "--max-model-len", "4096"]


class ServerProcess(LocalServer):
    """A server on `model` with the tests' small cache and limits (SERVER_ARGS) and then `extra` flags."""

    def __init__(self, model: Path, *extra: str, log_path: Path | None = None,
                 credentials: grpc.ChannelCredentials | None = None) -> None:
        super().__init__("--model", str(model), *SERVER_ARGS, *extra, log_path=log_path, credentials=credentials,
                         start_timeout=180)
