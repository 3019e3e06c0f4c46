"""The server process and the client commands never import torch: only qnext-serve's worker process (and the
short start-up check of qnext/rpc/preflight.py) load the engine."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

CLIENT_AND_SERVER_MODULES = [
    "qnext.rpc.server", "qnext.rpc.service",  # qnext-serve
    "qnext.rpc.generate_cli", "qnext.rpc.health_cli", "qnext.rpc.loadtest.cli",  # qnext-generate, -health, -bench
]


def run(code: str, **env: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, **env})
    assert proc.returncode == 0, proc.stderr
    return proc


def test_importing_the_server_and_client_commands_leaves_torch_out():
    code = (f"import sys\nimport {', '.join(CLIENT_AND_SERVER_MODULES)}\n"
            "assert 'torch' not in sys.modules, 'torch imported'")
    run(code)


def test_serve_without_model_resolves_the_embedded_default_without_torch(default_ckpt):
    """qnext-serve's start-up up to serving (here replaced by a stub): no --model means the embedded default,
    and the MTP-head check runs too, both in a subprocess; this process still has no torch."""
    code = ("import json, sys\nfrom qnext.rpc import server\n"
            "async def serve(cfg, engine):\n"
            "    print(json.dumps({'torch': 'torch' in sys.modules, 'model': engine.model,\n"
            "                      'spec': engine.num_speculative_tokens}))\n"
            "    return 0\n"
            "server.serve = serve\n"
            "sys.exit(server.main(['--num-speculative-tokens', '2', '--log-format', 'console']))")
    out = run(code, QNEXT_CACHE_DIR=str(default_ckpt.parent)).stdout
    assert json.loads(out.strip().splitlines()[-1]) == {"torch": False, "model": str(default_ckpt), "spec": 2}


@pytest.mark.skipif(not Path("/proc/self/maps").is_file(), reason="reads /proc/<pid>/maps (Linux)")
def test_a_serving_server_process_has_no_torch_loaded(default_ckpt, tmp_path):
    """The running server, health SERVING (its worker has the model loaded): torch's libraries are mapped into the
    worker process only."""
    from test_service_support import ServerProcess
    server = ServerProcess(default_ckpt, log_path=tmp_path / "server.log")
    try:
        maps = Path(f"/proc/{server.proc.pid}/maps").read_text()
        assert "libtorch" not in maps and "torch/_C" not in maps
    finally:
        assert server.stop() == 0
