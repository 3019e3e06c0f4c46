"""A short run of the chaos soak (bench/soak.py) against a real server: the whole pipeline works (server start,
traffic of every kind, a worker SIGKILL and restart, the idle check, the report), and the server came through it
clean. ~30-40 s; deselect with `-m "not soak"`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.soak

REPORT_KEYS = {"config", "started_utc", "target", "duration_s", "requests_per_s", "tokens_per_s", "traffic",
               "reused_id_mismatches", "worker_kills", "kill_times_s", "worker_restarts", "stats_idle",
               "stats_after_reset", "leaks", "rss_kib", "metrics", "metrics_since_warmup", "counter_disagreements",
               "failures"}
ACTIONS = {"normal", "cancel", "deadline", "reused", "control"}


def test_soak_smoke(tmp_path):
    out = tmp_path / "soak.json"
    proc = subprocess.run([sys.executable, "bench/soak.py", "--minutes", "0.25", "--streams", "8", "--kill-every", "6",
                           "--out", str(out), "--server-log", str(tmp_path / "server.log")],
                          cwd=REPO, capture_output=True, text=True, timeout=150)
    assert proc.returncode in (0, 1), proc.stderr[-3000:]  # 1 = findings; anything else = the soak itself broke
    r = json.loads(out.read_text())
    assert REPORT_KEYS <= set(r)
    assert "RESULT:" in proc.stdout and r["duration_s"] >= 15
    t = r["traffic"]
    assert ACTIONS <= set(t["by_action"]) and any(a.startswith("bad/") for a in t["by_action"])
    assert t["by_method"]["Generate"].get("OK", 0) > 0 and r["tokens_per_s"] > 0
    assert r["worker_kills"] >= 1 and r["worker_restarts"] >= r["worker_kills"]
    assert r["stats_idle"] is not None and r["stats_after_reset"] is not None, "the server never became idle"
    for proc_name in ("server", "worker"):
        assert r["rss_kib"]["end"][proc_name] > 0
    assert any(k.startswith("qnext_rpc_total") for k in r["metrics"])

    # The server's own guarantees (request ids are labels, bad bytes are INVALID_ARGUMENT, nothing held after the
    # run): the soak's verdict.
    assert r["leaks"] == {}, r["leaks"]
    assert r["reused_id_mismatches"] == 0, t["mismatch_examples"]
    assert t["bad_unexpected"] == {}, t["bad_examples"]
    assert r["failures"] == [] and proc.returncode == 0
