"""Test-only fault injection, off unless the environment asks for it.

`QNEXT_INJECT_STEP_FAILURE=<token id>[:oom][,<token id>[:oom]...]` makes every engine step whose plan holds a
request with such a token in its prompt raise (torch.OutOfMemoryError for one marked `:oom`, RuntimeError
otherwise) before its forward: how the
service tests show that one request's failure leaves the others serving (worker/step_failure.py). The worker
process installs it at start-up and logs a warning when it does; nothing else reads the variable.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from qnext.worker.engine import Engine

ENV = "QNEXT_INJECT_STEP_FAILURE"


def install_from_env(engine: Engine) -> str | None:
    """Wrap the engine's forward when ENV is set; returns the setting (None when off)."""
    setting = os.environ.get(ENV)
    if not setting:
        return None
    errors: dict[int, type[Exception]] = {}
    for rule in setting.split(","):
        token, _, kind = rule.partition(":")
        errors[int(token)] = torch.OutOfMemoryError if kind == "oom" else RuntimeError
    forward = engine.runner.forward

    def failing_forward(plan):  # noqa: ANN001, ANN202 - same signature as ModelRunner.forward
        for c in plan.chunks:
            for token in errors.keys() & set(c.request.prompt_token_ids):
                raise errors[token](f"injected step failure ({ENV}={setting})")
        return forward(plan)

    engine.runner.forward = failing_forward
    return setting
