"""Tensor-parallel ranks as processes: rank 0 leads, ranks 1..N-1 follow (how the model is split: parallel.py).

Rank 0 is the process that owns the engine (the server's worker process, qnext-batch, a test). `Followers.start`
launches ranks 1..N-1 as subprocesses (`python -m qnext.worker.tp_worker`), joins them in one process group, and
`lead()` wraps rank 0's model and cache in `Lead` proxies: every method call made on them (forward,
mtp_forward, the cache's rollback, any cache method added later) is first sent to every follower, which makes
the same call on its own shard, then runs locally. Every rank thus runs the same sequence of forwards, so
the all-reduces inside them pair up. Scheduling, sampling and everything else stay on rank 0; compute_logits is
rank-0 only, since lm_head is replicated and followers never need logits.

Transport: the call (target, method, arguments with each tensor replaced by a placeholder) is pickled into each
follower's stdin pipe; the tensor data follows as broadcasts over the process group (NCCL on CUDA, gloo on
CPU). A follower waits for work by reading its pipe, never inside a collective, so an idle server runs into
no collective timeout, and the pipe's EOF stops it when rank 0 closes it or dies.

Failure: a follower that exits unasked is fatal to rank 0, which may be blocked in a collective with it: rank 0
stops the other followers and exits with status 1, so the server sees one dead worker and restarts the whole
group. A follower whose parent has gone exits too. `close()` closes the pipes and joins every follower.
State changes must go through methods of the model or cache: an in-place write made by rank 0 on a cache
tensor it reached by attribute would not be seen by the followers.
"""

from __future__ import annotations

import argparse
import atexit
import dataclasses
import inspect
import os
import pickle
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from qnext.worker.cache_tensors import CacheTensors
from qnext.worker.config import load_config
from qnext.worker.loader import CheckpointFiles, load_model
from qnext.worker.parallel import FLAG, TensorShard, check_fp8_blocks, shard_config

# Generous: the first forward's all-reduce waits for the slowest rank to finish loading its weights. A rank
# that dies is caught by process supervision, not by this timeout.
_COLLECTIVE_TIMEOUT = timedelta(minutes=30)
_LOCAL_ONLY = frozenset({"compute_logits"})  # model methods that run on rank 0 alone (see the module note)


def check_tensor_parallel(model_dir: str | Path, size: int, device: str = "cpu") -> None:
    """ValueError naming --tensor-parallel-size when the checkpoint cannot be split `size` ways, or there are
    not `size` devices from `device` on; reads only config.json and the safetensors headers."""
    last = rank_device(device, size - 1)
    if last.type == "cuda" and last.index >= torch.cuda.device_count():
        raise ValueError(f"{FLAG}: {size} ranks from {device} need {last}, but {torch.cuda.device_count()} "
                         f"CUDA device(s) are visible")
    ckpt = CheckpointFiles(model_dir)
    cfg = load_config(model_dir, has_mtp_tensors=ckpt.has_mtp)
    shard_config(cfg, size)
    fp8 = {name: shape for name, (shape, dtype, _) in ckpt.header.items() if dtype == "F8_E4M3"}
    check_fp8_blocks([TensorShard(cfg, r, size) for r in range(size)], fp8)


def rank_device(device: str, rank: int) -> torch.device:
    """Rank r uses the r-th accelerator counted from the configured one (cuda -> cuda:0, cuda:0 + r)."""
    d = torch.device(device)
    if d.type == "cpu":
        return d
    return torch.device(d.type, (d.index or 0) + rank)


def _init_process_group(device: torch.device, store_path: str, rank: int, size: int) -> dist.ProcessGroup | None:
    """Joins the group; returns the gloo group for host tensors when the default group is NCCL (None: the
    default group serves both)."""
    backend = "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
        backend = "nccl"
    dist.init_process_group(backend, store=dist.FileStore(store_path, size), rank=rank, world_size=size,
                            timeout=_COLLECTIVE_TIMEOUT)
    return dist.new_group(backend="gloo") if backend != "gloo" else None


@dataclasses.dataclass(frozen=True)
class _TensorSlot:
    """Stands for the index-th tensor of a call; the data arrives by broadcast."""

    index: int
    shape: tuple[int, ...]
    dtype: torch.dtype
    on_device: bool  # on rank 0's accelerator (else host memory)


@dataclasses.dataclass(frozen=True)
class _Ref:
    """Stands for a led object ("model", "cache"): each rank substitutes its own."""

    name: str


@dataclasses.dataclass(frozen=True)
class _Record:
    """A dataclass argument (ForwardBatch): its type and its init fields, packed."""

    cls: type
    fields: dict[str, Any]


def _pack(obj: Any, tensors: list[torch.Tensor]) -> Any:
    if isinstance(obj, Lead):
        return _Ref(obj._name)
    if isinstance(obj, torch.Tensor):
        tensors.append(obj)
        return _TensorSlot(len(tensors) - 1, tuple(obj.shape), obj.dtype, obj.device.type != "cpu")
    if isinstance(obj, (list, tuple)):
        return type(obj)(_pack(x, tensors) for x in obj)
    if isinstance(obj, dict):
        return {k: _pack(v, tensors) for k, v in obj.items()}
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return _Record(type(obj), {f.name: _pack(getattr(obj, f.name), tensors)
                                   for f in dataclasses.fields(obj) if f.init})
    return obj


def _unpack(obj: Any, tensors: list[torch.Tensor], objects: dict[str, Any]) -> Any:
    if isinstance(obj, _Ref):
        return objects[obj.name]
    if isinstance(obj, _TensorSlot):
        return tensors[obj.index]
    if isinstance(obj, (list, tuple)):
        return type(obj)(_unpack(x, tensors, objects) for x in obj)
    if isinstance(obj, dict):
        return {k: _unpack(v, tensors, objects) for k, v in obj.items()}
    if isinstance(obj, _Record):
        return obj.cls(**{k: _unpack(v, tensors, objects) for k, v in obj.fields.items()})
    return obj


class Lead:
    """Rank 0's stand-in for its model or cache: a method call runs on every rank (module note); attributes
    read straight through."""

    def __init__(self, name: str, target: Any, followers: Followers, local_only: frozenset[str] = frozenset()):
        self._name, self._target, self._followers, self._local_only = name, target, followers, local_only

    def __getattr__(self, attr: str) -> Any:
        value = getattr(self._target, attr)
        if not inspect.ismethod(value) or attr in self._local_only:
            return value
        return lambda *args, **kwargs: self._call(attr, args, kwargs)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._call("__call__", args, kwargs)

    def _call(self, method: str, args: tuple, kwargs: dict[str, Any]) -> Any:
        self._followers.send_call(self._name, method, args, kwargs)
        args = tuple(a._target if isinstance(a, Lead) else a for a in args)
        kwargs = {k: v._target if isinstance(v, Lead) else v for k, v in kwargs.items()}
        return getattr(self._target, method)(*args, **kwargs)


class Followers:
    """Rank 0's handle on ranks 1..N-1: launch, call, supervise, close."""

    def __init__(self, model_dir: Path, device: str, dtype: str, size: int) -> None:
        check_tensor_parallel(model_dir, size, device)
        self.size = size
        self.device = rank_device(device, 0)
        self._dir = tempfile.mkdtemp(prefix="qnext-tp-")
        store = os.path.join(self._dir, "store")
        # followers import the code rank 0 runs, wherever it was imported from
        root = str(Path(__file__).resolve().parent.parent)
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p))
        self._procs = [subprocess.Popen(
            [sys.executable, "-m", "qnext.worker.tp_worker", "--rank", str(r), "--size", str(size), "--store", store,
             "--model-dir", str(model_dir), "--device", device, "--dtype", dtype], stdin=subprocess.PIPE, env=env)
            for r in range(1, size)]
        self._closing = False
        atexit.register(self.close)
        threading.Thread(target=self._watch, name="qnext-tp-watch", daemon=True).start()
        self._host_group = _init_process_group(self.device, store, 0, size)

    def lead(self, model: torch.nn.Module, cache: CacheTensors) -> tuple[Lead, Lead]:
        """Hand the cache's shape to the followers (they build the same pools over their heads) and return
        the proxies the engine uses in place of `model` and `cache`."""
        self._send(cache.shape)
        return Lead("model", model, self, _LOCAL_ONLY), Lead("cache", cache, self)

    def send_call(self, target: str, method: str, args: tuple, kwargs: dict[str, Any]) -> None:
        tensors: list[torch.Tensor] = []
        packed = _pack((args, kwargs), tensors)
        self._send((target, method, packed))
        with torch.inference_mode():  # the model's outputs passed on as arguments are inference tensors
            for t in tensors:
                if t.numel():
                    dist.broadcast(t.contiguous(), src=0, group=None if t.device.type != "cpu" else self._host_group)

    def _send(self, obj: Any) -> None:
        frame = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
        for p in self._procs:
            p.stdin.write(frame)
            p.stdin.flush()

    def _watch(self) -> None:
        """A follower exiting unasked leaves rank 0 unable to finish any collective: stop everything."""
        while not self._closing:
            for r, p in enumerate(self._procs, start=1):
                code = p.poll()
                if code is not None and not self._closing:
                    print(f"qnext: tensor-parallel rank {r} exited with code {code}; stopping rank 0 and the "
                          f"other ranks", file=sys.stderr, flush=True)
                    self._stop_procs(timeout=2.0)
                    os._exit(1)
            time.sleep(0.2)

    def _stop_procs(self, timeout: float) -> None:
        for p in self._procs:
            try:
                p.stdin.close()  # EOF: a follower between calls exits on its own
            except OSError:
                pass
        deadline = time.monotonic() + timeout
        for p in self._procs:
            try:
                p.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()  # stuck in a collective with a rank that is gone
                p.wait()

    def close(self) -> None:
        """Stop and join every follower, then leave the process group (idempotent)."""
        if self._closing:
            return
        self._closing = True
        atexit.unregister(self.close)
        self._stop_procs(timeout=30.0)
        if dist.is_initialized():
            dist.destroy_process_group()
        shutil.rmtree(self._dir, ignore_errors=True)


def _exit_when_orphaned(parent: int) -> None:
    """Rank 0 gone (even killed mid-collective, where the pipe's EOF is never read): exit."""
    while os.getppid() == parent:
        time.sleep(1.0)
    os._exit(1)


def follower_main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m qnext.worker.tp_worker", description="A tensor-parallel follower rank "
                                "(started by rank 0, reads its calls from stdin).")
    for flag in ("--rank", "--size"):
        p.add_argument(flag, type=int, required=True)
    for flag in ("--store", "--model-dir", "--device", "--dtype"):
        p.add_argument(flag, required=True)
    args = p.parse_args(argv)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole process group; rank 0 decides
    threading.Thread(target=_exit_when_orphaned, args=(os.getppid(),), daemon=True).start()
    device = rank_device(args.device, args.rank)
    host_group = _init_process_group(device, args.store, args.rank, args.size)
    dtype = None if args.dtype == "auto" else getattr(torch, args.dtype)
    model = load_model(args.model_dir, device, dtype, tp_rank=args.rank, tp_size=args.size)
    channel = sys.stdin.buffer
    try:
        cache = CacheTensors(model.config, pickle.load(channel), device)
    except EOFError:
        return 0  # rank 0 closed before serving anything
    objects = {"model": model, "cache": cache}
    with torch.inference_mode():
        while True:
            try:
                target, method, packed = pickle.load(channel)
            except EOFError:
                break
            tensors = []
            for slot in _slots(packed):
                t = torch.empty(slot.shape, dtype=slot.dtype, device=device if slot.on_device else "cpu")
                if t.numel():
                    dist.broadcast(t, src=0, group=None if slot.on_device else host_group)
                tensors.append(t)
            args_, kwargs = _unpack(packed, tensors, objects)
            getattr(objects[target], method)(*args_, **kwargs)
    dist.destroy_process_group()
    return 0


def _slots(obj: Any) -> list[_TensorSlot]:
    """The tensor placeholders of a packed call, in index order (the order rank 0 broadcasts them)."""
    found: list[_TensorSlot] = []

    def walk(o: Any) -> None:
        if isinstance(o, _TensorSlot):
            found.append(o)
        elif isinstance(o, (list, tuple)):
            for x in o:
                walk(x)
        elif isinstance(o, dict):
            for x in o.values():
                walk(x)
        elif isinstance(o, _Record):
            walk(o.fields)

    walk(obj)
    return sorted(found, key=lambda s: s.index)


if __name__ == "__main__":
    # through the imported module, not __main__: the placeholders rank 0 pickles are worker.tp_worker classes
    from qnext.worker.tp_worker import follower_main as main
    sys.exit(main())
