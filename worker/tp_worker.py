"""Tensor-parallel ranks as processes: rank 0 leads, ranks 1..N-1 follow (how the model is split: parallel.py).

Rank 0 is the process that owns the engine (the server's worker process, qnext-batch, a test). `Followers(...)`
launches ranks 1..N-1 as subprocesses (`python -m qnext.worker.tp_worker`, same interpreter and environment),
joins them in one process group, and `lead()` wraps rank 0's model and cache in `LeadModel` and `LeadCache`.
Their methods are the whole interface the engine has to the model and cache under tensor parallelism, and
which of them cross ranks is spelled out:

- on every rank (`CALLS`; first sent to every follower, which makes the same call on its own shard, then run
  locally): the model's forward (`__call__`), `mtp_forward` and `mtp_write_kv`; the cache's `copy_blocks`, `save_checkpoints`,
  `restore_checkpoints` and `rollback`. Every rank thus runs the same sequence of forwards, so the all-reduces
  inside them pair up, and the same cache writes.
- on rank 0 alone: `compute_logits` (lm_head is replicated and followers never need logits), and the reads
  `model.config` and `cache.ckpt_hidden`.

Anything else (another method, an attribute such as a cache pool) is an AttributeError on rank 0, and a call
outside `CALLS` reaching a follower stops it: nothing runs on rank 0 alone by accident. A new cross-rank call
is a new method here and a new name in `CALLS`. Scheduling, sampling and everything else stay on rank 0.

Transport: the call (target, method, arguments with each tensor replaced by a placeholder) is pickled into each
follower's stdin pipe; the tensor data follows as broadcasts over the process group (NCCL on CUDA, gloo on
CPU). A follower waits for work by reading its pipe, never inside a collective, so an idle server runs into
no collective timeout, and the pipe's EOF stops it when rank 0 closes it or dies.

Failure: a follower that exits unasked is fatal to rank 0, which may be blocked in a collective with it: rank 0
stops the other followers and exits with status 1, so the server sees one dead worker and restarts the whole
group. A follower whose parent has gone exits too. `close()` closes the pipes and joins every follower.
State changes must go through the listed calls: rank 0 writing in place into a tensor it reads (ckpt_hidden)
would not be seen by the followers.
"""

from __future__ import annotations

import argparse
import atexit
import dataclasses
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
from qnext.worker.config import ModelConfig, load_config
from qnext.worker.loader import CheckpointFiles, load_model
from qnext.worker.model import ForwardBatch
from qnext.worker.parallel import FLAG, TensorShard, check_fp8_blocks, shard_config

# Generous: the first forward's all-reduce waits for the slowest rank to finish loading its weights. A rank
# that dies is caught by process supervision, not by this timeout.
_COLLECTIVE_TIMEOUT = timedelta(minutes=30)


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
    if isinstance(obj, _Lead):
        return _Ref(obj.NAME)
    if isinstance(obj, (CacheTensors, torch.nn.Module)):  # would be pickled whole, and not be the follower's own
        raise TypeError(f"a cross-rank call takes the led {type(obj).__name__} (LeadModel / LeadCache), not "
                        f"rank 0's own")
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


class _Lead:
    """Rank 0's stand-in for one led object (module note): its methods are the only calls it takes. There is
    no __getattr__, so a method or attribute not defined here is an AttributeError, never a rank-0-only call."""

    __slots__ = ("_target", "_followers")
    NAME = ""  # the object's name on every rank
    CALLS: tuple[str, ...] = ()  # its methods that run on every rank; the followers accept only these

    def __init__(self, target: Any, followers: Followers) -> None:
        self._target, self._followers = target, followers

    def _on_every_rank(self, method: str, *args: Any, **kwargs: Any) -> Any:
        """Send the call to every follower, then make it here (with rank 0's own objects for led ones)."""
        if method not in self.CALLS:
            raise AttributeError(f"{type(self).__name__}.{method} is not a cross-rank call ({self.CALLS})")
        self._followers.send_call(self.NAME, method, args, kwargs)
        args = tuple(a._target if isinstance(a, _Lead) else a for a in args)
        kwargs = {k: v._target if isinstance(v, _Lead) else v for k, v in kwargs.items()}
        return getattr(self._target, method)(*args, **kwargs)


class LeadModel(_Lead):
    """Rank 0's model: the forwards run on every rank, logits on rank 0 alone."""

    __slots__ = ()
    NAME = "model"
    CALLS = ("__call__", "mtp_forward", "mtp_write_kv")

    def __call__(self, batch: ForwardBatch, cache: LeadCache) -> torch.Tensor:
        """The target forward -> final hidden states [T, H]."""
        return self._on_every_rank("__call__", batch, cache)

    def mtp_forward(self, next_token_ids: torch.Tensor, hidden: torch.Tensor, batch: ForwardBatch,
                    cache: LeadCache, step: int = 0) -> torch.Tensor:
        """One MTP pass -> the MTP's hidden states [T, H] (writes the MTP layer's KV on every rank)."""
        return self._on_every_rank("mtp_forward", next_token_ids, hidden, batch, cache, step=step)

    def mtp_write_kv(self, next_token_ids: torch.Tensor, hidden: torch.Tensor, batch: ForwardBatch,
                     cache: LeadCache, step: int = 0) -> None:
        """The MTP layer's K/V for these rows, each rank its own KV heads (no collective inside)."""
        self._on_every_rank("mtp_write_kv", next_token_ids, hidden, batch, cache, step=step)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Rank 0 alone: lm_head is replicated and only rank 0 samples."""
        return self._target.compute_logits(hidden)

    @property
    def config(self) -> ModelConfig:
        """Read on rank 0 (vocab size, MTP layers, quantisation for the summary)."""
        return self._target.config


class LeadCache(_Lead):
    """Rank 0's cache: every write runs on every rank (each on its own heads); rank 0 reads ckpt_hidden."""

    __slots__ = ()
    NAME = "cache"
    CALLS = ("copy_blocks", "copy_slots", "save_checkpoints", "restore_checkpoints", "rollback")

    def copy_blocks(self, src: list[int], dst: list[int]) -> None:
        self._on_every_rank("copy_blocks", src, dst)

    def copy_slots(self, src: list[int], dst: list[int]) -> None:
        self._on_every_rank("copy_slots", src, dst)

    def save_checkpoints(self, slots: list[int], ckpt_ids: list[int], hidden: torch.Tensor) -> None:
        self._on_every_rank("save_checkpoints", slots, ckpt_ids, hidden)

    def restore_checkpoints(self, ckpt_ids: list[int], slots: list[int]) -> None:
        self._on_every_rank("restore_checkpoints", ckpt_ids, slots)

    def rollback(self, slots: torch.Tensor, positions: torch.Tensor) -> None:
        self._on_every_rank("rollback", slots, positions)

    @property
    def ckpt_hidden(self) -> torch.Tensor:
        """Rank 0 reads a checkpoint's hidden state (the MTP row of a prefix-cache hit). Read only: a write
        into it would not reach the followers (save_checkpoints writes it on every rank)."""
        return self._target.ckpt_hidden


# what a follower accepts: (target, method) pairs of the calls above
_FOLLOWER_CALLS = {lead.NAME: frozenset(lead.CALLS) for lead in (LeadModel, LeadCache)}


class Followers:
    """Rank 0's handle on ranks 1..N-1: launch, call, supervise, close."""

    def __init__(self, model_dir: Path, device: str, dtype: str, size: int) -> None:
        check_tensor_parallel(model_dir, size, device)
        self.size = size
        self.device = rank_device(device, 0)
        self._dir = tempfile.mkdtemp(prefix="qnext-tp-")
        store = os.path.join(self._dir, "store")
        # same interpreter, inherited environment: the followers import the qnext.* rank 0 runs
        self._procs = [subprocess.Popen(
            [sys.executable, "-m", "qnext.worker.tp_worker", "--rank", str(r), "--size", str(size), "--store", store,
             "--model-dir", str(model_dir), "--device", device, "--dtype", dtype], stdin=subprocess.PIPE)
            for r in range(1, size)]
        self._closing = False
        atexit.register(self.close)
        threading.Thread(target=self._watch, name="qnext-tp-watch", daemon=True).start()
        self._host_group = _init_process_group(self.device, store, 0, size)

    def lead(self, model: torch.nn.Module, cache: CacheTensors) -> tuple[LeadModel, LeadCache]:
        """Hand the cache's shape to the followers (they build the same pools over their heads) and return
        the proxies the engine uses in place of `model` and `cache`."""
        self._send(cache.shape)
        return LeadModel(model, self), LeadCache(cache, self)

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
    dtype = getattr(torch, args.dtype)  # resolved by rank 0 (never "auto")
    model = load_model(args.model_dir, device, dtype, tp_rank=args.rank, tp_size=args.size)
    channel = sys.stdin.buffer
    try:
        cache = CacheTensors(model.config, pickle.load(channel), device)
    except EOFError:
        return 0  # rank 0 closed before serving anything
    with torch.inference_mode():
        _serve(channel, {LeadModel.NAME: model, LeadCache.NAME: cache}, device, host_group)
    dist.destroy_process_group()
    return 0


def _serve(channel: Any, objects: dict[str, Any], device: torch.device,
           host_group: dist.ProcessGroup | None) -> None:
    """Make rank 0's calls, in order, until the pipe closes; a call outside the list stops this rank (loudly:
    rank 0 then stops the group)."""
    while True:
        try:
            target, method, packed = pickle.load(channel)
        except EOFError:
            return
        if method not in _FOLLOWER_CALLS.get(target, ()):
            raise RuntimeError(f"tensor-parallel follower: {target}.{method} is not a cross-rank call")
        tensors = []
        for slot in _slots(packed):
            t = torch.empty(slot.shape, dtype=slot.dtype, device=device if slot.on_device else "cpu")
            if t.numel():
                dist.broadcast(t, src=0, group=None if slot.on_device else host_group)
            tensors.append(t)
        args, kwargs = _unpack(packed, tensors, objects)
        getattr(objects[target], method)(*args, **kwargs)


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
    # through the imported module, not __main__: the placeholders rank 0 pickles are qnext.worker.tp_worker classes
    from qnext.worker.tp_worker import follower_main as main
    sys.exit(main())
