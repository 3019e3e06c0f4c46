import os
import sys
from pathlib import Path

# transformers is a test-time reference only; it must never reach for the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
sys.path.insert(0, str(Path(__file__).parent))

import pytest

_REPORTS: list[str] = []


@pytest.fixture
def report():
    """report("what", value): a measured figure printed in the run's summary (not only on failure)."""
    def add(what: str, value: object) -> None:
        _REPORTS.append(f"{what}: {value}")
    return add


def pytest_terminal_summary(terminalreporter):
    if _REPORTS:
        terminalreporter.section("measured figures")
        for line in _REPORTS:
            terminalreporter.write_line(line)


_TRITON_PROBLEM: dict[str, str | None] = {}  # device -> why Triton cannot run there (None: it can)


def require_triton(device: str) -> None:
    """Skip, with the reason, when Triton cannot run any kernel at all on `device` (a test module's fixture calls
    this). Decided once per device by a trivial add kernel defined here, not by one of ours: a kernel of ours
    that raises is a test failure, never a skip. On a CUDA device Triton not running is a failure too. On CPU the
    kernels need the interpreter: TRITON_INTERPRET=1 set before triton is first imported (the test modules set
    it at import), which is also why triton is imported here only when called."""
    if device not in _TRITON_PROBLEM:
        _TRITON_PROBLEM[device] = _triton_problem(device)
    problem = _TRITON_PROBLEM[device]
    if problem is None:
        return
    if device.startswith("cuda"):
        pytest.fail(f"Triton cannot run a trivial kernel on {device}: {problem}", pytrace=False)
    pytest.skip(f"Triton cannot run here ({device}): {problem}")


def _triton_problem(device: str) -> str | None:
    import torch
    try:
        import triton
        import triton.language as tl
    except ImportError as e:
        return f"triton is not importable: {e!r}"

    @triton.jit
    def add(x_ptr, y_ptr, out_ptr, n, BLOCK: tl.constexpr):
        offs = tl.arange(0, BLOCK)
        mask = offs < n
        tl.store(out_ptr + offs, tl.load(x_ptr + offs, mask=mask) + tl.load(y_ptr + offs, mask=mask), mask=mask)

    try:
        x = torch.arange(5, dtype=torch.float32, device=device)
        out = torch.zeros_like(x)
        add[(1,)](x, x, out, x.numel(), BLOCK=8)
        ok = torch.equal(out.cpu(), 2 * x.cpu())
    except Exception as e:  # noqa: BLE001 - whatever stops a trivial kernel means Triton cannot run here
        return repr(e)
    return None if ok else f"a trivial add kernel computed {out.cpu().tolist()}"


@pytest.fixture(scope="session")
def default_ckpt(tmp_path_factory):
    """The embedded default checkpoint (real vocabulary and tokenizer), generated once per test session."""
    from qnext.worker.tiny import default_checkpoint

    root = tmp_path_factory.mktemp("qnext_cache")
    mp = pytest.MonkeyPatch()
    mp.setenv("QNEXT_CACHE_DIR", str(root))
    yield default_checkpoint()
    mp.undo()


@pytest.fixture
def cpu_kernels_built():
    """kernels/cpu's library, built: skipped only where there is no C compiler at all; with one, a library that
    does not build is a failure (else a broken .c file would pass CI as a row of skips)."""
    from qnext.kernels import cpu
    from qnext.kernels.cpu import build

    lib, how = cpu.library()
    if lib is None:
        try:
            build.compiler()
        except build.BuildError:
            pytest.skip(how)
        pytest.fail(how)
