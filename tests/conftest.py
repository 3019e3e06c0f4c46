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


@pytest.fixture(scope="session")
def default_ckpt(tmp_path_factory):
    """The embedded default checkpoint (real vocabulary and tokenizer), generated once per test session."""
    from qnext.worker.tiny import default_checkpoint

    root = tmp_path_factory.mktemp("qnext_cache")
    mp = pytest.MonkeyPatch()
    mp.setenv("QNEXT_CACHE_DIR", str(root))
    yield default_checkpoint()
    mp.undo()
