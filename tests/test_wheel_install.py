"""The package as a user installs it: a wheel built from this tree, installed non-editable into a new virtualenv
beside the newest transformers our test range allows and Hugging Face's `kernels` package (whose import name
clashed with ours before the `qnext` namespace), its files read-only, run from a directory outside the
repository: qnext-make-tiny writes the embedded default, qnext-serve serves it, qnext-generate completes a
Generate, and transformers' Qwen3NextForCausalLM imports in the same environment.

Slow (a virtualenv with torch: about 2-3 minutes, most of it pip), and it needs the package registries; torch comes
from the local 2.13.0 CPU wheel (`pip install torch==2.13.0`), as scripts/setup.sh installs it.
"""

from __future__ import annotations

import os
import re
import select
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
# Root ignores file permissions: as root, the installed package's commands run as `nobody`, the way the container
# image runs them as its `qnext` user over a root-owned install.
AS_USER = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups"] if os.geteuid() == 0 else []


def others_can_run(path: Path) -> bool:
    """Whether a user other than the owner can execute `path` (every folder above it searchable too)."""
    path = path.resolve()
    return all(p.stat().st_mode & stat.S_IXOTH for p in [path, *path.parents])


def base_python() -> str:
    """The interpreter the new virtualenv is made from: this one, or when running as root with this one in a place
    `nobody` cannot reach (a pyenv under /root, say), the system's python of the same version."""
    mine = Path(getattr(sys, "_base_executable", sys.executable))
    if not AS_USER or others_can_run(mine):
        return str(mine)
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    for d in ("/usr/bin", "/usr/local/bin"):
        candidate = Path(d) / version
        if candidate.is_file() and others_can_run(candidate):
            return str(candidate)
    pytest.skip(f"running as root, and no {version} that `nobody` can execute")


def run(cmd: list[str], cwd: Path, timeout: float = 900, **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, **kw)
    assert proc.returncode == 0, f"{' '.join(map(str, cmd))} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n" \
                                 f"{proc.stderr[-3000:]}"
    return proc


def make_read_only(root: Path) -> None:
    for path in [root, *root.rglob("*")]:
        mode = path.stat().st_mode
        path.chmod(mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))


@pytest.fixture(scope="module")
def venv():
    if AS_USER and shutil.which("setpriv") is None:
        pytest.skip("running as root without setpriv: cannot run the install as another user")
    tmp = Path(tempfile.mkdtemp(prefix="qnext-wheel-"))
    tmp.chmod(0o755)  # readable by the other user
    yield _install(tmp)
    shutil.rmtree(tmp, ignore_errors=True)


def _install(tmp: Path) -> Path:
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp / "dist"),
         str(REPO)], cwd=tmp)
    [wheel] = (tmp / "dist").glob("qnext-*.whl")
    env_dir = tmp / "venv"
    run([base_python(), "-m", "venv", str(env_dir)], cwd=tmp)
    pip = [str(env_dir / "bin" / "python"), "-m", "pip", "install", "-q"]
    run(pip + ["torch==2.13.0"], cwd=tmp)  # the CPU build on local disk, never a CUDA download
    run(pip + [str(wheel), "transformers>=5.0,<6", "kernels"], cwd=tmp)
    site = Path(run([str(env_dir / "bin" / "python"), "-c", "import qnext.worker, os; "
                     "print(os.path.dirname(os.path.dirname(qnext.worker.__path__[0])))"], cwd=tmp).stdout.strip())
    make_read_only(site / "qnext")
    return env_dir


def test_the_installed_wheel_serves_beside_transformers(venv: Path) -> None:
    bin_dir = venv / "bin"
    python = str(bin_dir / "python")
    tmp_path = venv.parent / "run"  # outside the repository, writable by the user the commands run as
    tmp_path.mkdir(mode=0o777)
    tmp_path.chmod(0o777)
    # every qnext module comes from the read-only install, and `kernels` is Hugging Face's
    where = run([*AS_USER, python, "-c", "import qnext.worker.engine as e, qnext.kernels.fp8 as k, qnext.v1.generation_pb2 as pb, "
                 "kernels, os; print(e.__file__, k.__file__, pb.__file__, kernels.__file__, "
                 "os.access(os.path.dirname(e.__file__), os.W_OK))"], cwd=tmp_path).stdout.split()
    assert all("site-packages" in p for p in where[:4]) and where[4] == "False", where
    assert "site-packages/kernels/" in where[3]
    run([*AS_USER, python, "-c", "import transformers; from transformers import Qwen3NextForCausalLM"], cwd=tmp_path,
        env=dict(os.environ, HF_HOME=str(tmp_path / "hf")))

    env = dict(os.environ, QNEXT_CACHE_DIR=str(tmp_path / "cache"), HOME=str(tmp_path), HF_HOME=str(tmp_path / "hf"),
               PATH=f"{bin_dir}:{os.environ['PATH']}")
    # the wheel ships the C token steps' sources (kernels/cpu), and the install builds them into the user's cache
    built = run([*AS_USER, python, "-c", "import torch; from qnext.kernels import cpu as d; "
                 "print(d.describe(torch.device('cpu'), torch.bfloat16, torch.float32))"], cwd=tmp_path, env=env)
    if any(map(shutil.which, ("cc", "gcc", "clang"))):
        assert built.stdout.startswith("compiled C token steps") and str(tmp_path / "cache") in built.stdout, built
    else:  # a machine without a C compiler serves through the torch references, and says so
        assert "did not build: no C compiler" in built.stdout, built
    model = tmp_path / "tiny"
    run([*AS_USER, str(bin_dir / "qnext-make-tiny"), str(model)], cwd=tmp_path, env=env)
    server = subprocess.Popen([*AS_USER, str(bin_dir / "qnext-serve"), "--model", str(model), "--host", "127.0.0.1",
                               "--port", "0", "--metrics-port", "0", "--cache-memory", str(64 << 20)],
                              cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        port = wait_for_port(server, timeout=180)
        deadline = time.monotonic() + 60
        while not healthy(bin_dir, port, tmp_path, env):
            assert time.monotonic() < deadline, "qnext-serve never reported SERVING"
            time.sleep(0.5)
        out = run([*AS_USER, str(bin_dir / "qnext-generate"), "Hello", "--server", f"127.0.0.1:{port}", "--max-new-tokens", "4",
                   "--temperature", "0"], cwd=tmp_path, env=env, timeout=120)
        assert out.stdout.strip(), out
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
    assert server.returncode == 0, server.stderr.read()[-3000:]


def healthy(bin_dir: Path, port: int, cwd: Path, env: dict) -> bool:
    proc = subprocess.run([*AS_USER, str(bin_dir / "qnext-health"), "--target", f"127.0.0.1:{port}"], cwd=cwd, env=env,
                          capture_output=True, timeout=30)
    return proc.returncode == 0


def wait_for_port(server: subprocess.Popen, timeout: float) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"qnext-serve exited {server.returncode}: {server.stderr.read()[-3000:]}")
        ready, _, _ = select.select([server.stdout], [], [], 0.5)
        if ready:
            line = server.stdout.readline()
            m = re.search(r"listening on [\d.]+:(\d+) \(gRPC\)", line)
            if m:
                return int(m.group(1))
    raise TimeoutError("qnext-serve did not print its port")
