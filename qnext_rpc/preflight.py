"""qnext-serve's start-up checks that need torch, run once in a short-lived subprocess.

The server process never imports torch (tests/test_torch_free.py): only the worker process loads the engine.
A few things must still be known before the worker starts, and reading them needs the engine's modules:

- the embedded default checkpoint's directory, when no --model is given (it is generated there on first use),
  which the server's tokenizer reads;
- whether the checkpoint has an MTP head, when --num-speculative-tokens asks for one;
- whether it splits --tensor-parallel-size ways, over devices that exist.

A worker that failed on the last two would be restarted forever; here they are a start-up error naming the flag.
With an explicit --model and neither option, there is nothing to check and no subprocess runs.
"""

from __future__ import annotations

import dataclasses
import multiprocessing as mp
from concurrent.futures import ProcessPoolExecutor

from qnext.worker.types import EngineConfig


def needs_preflight(config: EngineConfig) -> bool:
    return config.model is None or config.num_speculative_tokens > 0 or config.tensor_parallel_size > 1


def preflight(config: EngineConfig) -> EngineConfig:
    """`config` with `model` set (None: the embedded default, generated on first use), after the checks above.
    ValueError / FileNotFoundError whose message names the field (or the flag) otherwise. Imports torch: run it
    through `run_preflight`, not in the server process."""
    from qnext.worker.loader import CheckpointFiles
    from qnext.worker.tiny import default_checkpoint

    model = config.model if config.model is not None else str(default_checkpoint())
    if config.num_speculative_tokens and not CheckpointFiles(model).has_mtp:
        raise ValueError(f"num_speculative_tokens: {model} has no MTP head (mtp.* tensors)")
    if config.tensor_parallel_size > 1:
        from qnext.worker.tp_worker import check_tensor_parallel
        check_tensor_parallel(model, config.tensor_parallel_size, config.device)
    return dataclasses.replace(config, model=model)


def run_preflight(config: EngineConfig) -> EngineConfig:
    """`preflight(config)` in a spawned subprocess (when there is anything to do); its errors are raised here."""
    if not needs_preflight(config):
        return config
    with ProcessPoolExecutor(1, mp_context=mp.get_context("spawn")) as pool:
        return pool.submit(preflight, config).result()
