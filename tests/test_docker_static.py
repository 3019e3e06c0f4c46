"""What can be checked about docker/ without docker (none on our machines): the images' entrypoint and health
check are real console scripts whose arguments their parsers accept, the exposed and published ports are
qnext-serve's defaults, every file the Dockerfiles copy and compose builds from exists, and the bench service
talks to the server service. Whether the images build and run is not checked here (README "Deployment")."""

from __future__ import annotations

import importlib
import importlib.util
import json
import re
from pathlib import Path

import pytest
import yaml  # PyYAML, a dependency of the test-only transformers

from qnext.rpc import health_cli, server

REPO = Path(__file__).resolve().parent.parent
DOCKER = REPO / "docker"
DOCKERFILES = ["Dockerfile", "Dockerfile.cpu"]
# qnext-bench's flags the compose file may use (issue 8); when qnext-bench is installed its own parser decides.
BENCH_FLAGS = {"--target", "--concurrency", "--num-requests", "--input-len", "--output-len", "--output-dir"}


def scripts() -> dict[str, str]:
    """pyproject.toml's [project.scripts] (read by hand: tomllib needs Python 3.11, the package 3.10)."""
    section = (REPO / "pyproject.toml").read_text().split("[project.scripts]", 1)[1].split("\n[", 1)[0]
    return dict(re.findall(r'^([\w-]+)\s*=\s*"([^"]+)"', section, flags=re.M))


def instructions(name: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, rest) per Dockerfile instruction, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n\s*", " ", (DOCKER / name).read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def one(name: str, instruction: str) -> str:
    found = [rest for word, rest in instructions(name) if word == instruction]
    assert len(found) == 1, f"{name}: expected one {instruction}, found {found}"
    return found[0]


def serve_defaults() -> tuple[int, int]:
    args = server.build_parser().parse_args([])
    return args.port, args.metrics_port


def resolve(entry: str):
    module, _, attr = entry.partition(":")
    return getattr(importlib.import_module(module), attr)


def compose() -> dict:
    return yaml.safe_load((DOCKER / "compose.yaml").read_text())


def env_defaults(value: str) -> str:
    """${VAR:-default} -> default, ${VAR:?message} -> a placeholder path (compose's substitutions)."""
    value = re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", value)
    return re.sub(r"\$\{\w+:\?[^}]*\}", "/placeholder", value)


@pytest.mark.parametrize("name", DOCKERFILES)
def test_dockerfile_entrypoint_healthcheck_ports_user(name):
    entrypoint = json.loads(one(name, "ENTRYPOINT"))
    assert entrypoint[0] == "qnext-serve" and scripts()["qnext-serve"] == "qnext.rpc.server:main"
    uds = server.build_parser().parse_args(entrypoint[1:]).uds
    port, metrics_port = serve_defaults()
    assert {int(p) for p in one(name, "EXPOSE").split()} == {port, metrics_port}

    # the health check goes through the server's unix socket: it works whatever --host, --port and TLS are
    health = one(name, "HEALTHCHECK")
    cmd = json.loads(health[health.index("CMD") + 3:].strip())
    assert cmd[0] in scripts(), f"{cmd[0]} is not a console script of the package"
    assert resolve(scripts()[cmd[0]]) is health_cli.main
    assert uds and health_cli.build_parser().parse_args(cmd[1:]).target == f"unix://{uds}"
    # its directory is made for the unprivileged user before USER switches to it
    made = [rest for word, rest in instructions(name) if word == "RUN" and f"mkdir -p {Path(uds).parent}" in rest]
    assert made and f"chown qnext {Path(uds).parent}" in made[0]

    words = [w for w, _ in instructions(name)]
    user = one(name, "USER")
    assert user not in ("root", "0") and words.index("USER") < words.index("ENTRYPOINT")
    for word, rest in instructions(name):
        if word == "COPY":
            for src in rest.split()[:-1]:
                assert (REPO / src).exists(), f"{name} copies {src}, which does not exist"


def test_cuda_image_serves_the_read_only_model_mount():
    cmd = json.loads(one("Dockerfile", "CMD"))
    args = server.build_parser().parse_args(cmd)
    assert args.model == "/models" and args.device == "cuda"
    assert json.loads(one("Dockerfile", "VOLUME")) == ["/models"]
    assert one("Dockerfile", "FROM") == "${BASE_IMAGE}" and "pytorch/pytorch:" in one("Dockerfile", "ARG")


def test_compose_builds_from_existing_files_and_matches_the_cli():
    services = compose()["services"]
    port, metrics_port = serve_defaults()
    for name, svc in services.items():
        if "build" in svc:
            context = (DOCKER / svc["build"]["context"]).resolve()
            assert context == REPO and (context / svc["build"]["dockerfile"]).is_file(), name
        for mapping in svc.get("ports", []):
            assert int(str(mapping).split(":")[-1]) in (port, metrics_port), (name, mapping)

    qnext = services["qnext"]
    args = server.build_parser().parse_args([env_defaults(a) for a in qnext["command"]])
    mounts = {v.split(":")[1]: v.split(":")[2:] for v in map(env_defaults, qnext["volumes"])}
    assert mounts.get(args.model) == ["ro"], "the model directory is mounted read-only where --model points"
    assert args.num_speculative_tokens > 0 and args.tensor_parallel_size == 1
    assert {int(str(p).split(":")[-1]) for p in qnext["ports"]} == {port, metrics_port}

    bench = services["bench"]
    assert bench["entrypoint"] == ["qnext-bench"] and bench["image"] == qnext["image"]
    assert bench["depends_on"]["qnext"]["condition"] == "service_healthy"
    flags = {a.split("=")[0] for a in bench["command"]}
    assert flags <= BENCH_FLAGS, flags - BENCH_FLAGS
    target = next(a.split("=", 1)[1] for a in bench["command"] if a.startswith("--target="))
    host, _, target_port = target.partition(":")
    assert host in services and int(target_port) == port
    if importlib.util.find_spec("qnext.rpc.loadtest") is not None:  # issue 8's qnext-bench is installed
        from qnext.rpc.loadtest import cli
        assert scripts()["qnext-bench"] == "qnext.rpc.loadtest.cli:main"
        cli.build_parser().parse_args(bench["command"])


def test_health_script_answers_for_a_server_that_is_not_there():
    """qnext-health fails (exit 1), it does not hang, when nothing listens."""
    assert health_cli.main(["--target", "127.0.0.1:1", "--timeout", "1"]) == 1
