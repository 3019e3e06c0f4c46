"""Throughput knobs that must not change a single result: prepacked bf16 linears and fused projections
(worker/cpu_linear.py), the CPU row argmax (worker/sampler.py), the worker's preloaded libraries
(qnext_rpc/worker_env.py), --cpu-threads, and --stream-interval. The one knob that rounds differently, the
packed dense MoE block, is held to the reference's own bf16 error against a float64 computation."""

import copy
import math

import os
import sys

import pytest
import torch
from torch import nn

from qnext.rpc.worker_env import resolve_preload, worker_environment
from qnext.worker.config import config_from_dict
from qnext.worker.cpu_linear import PackedDenseMoE, PackedLinear, PackedProjections, pack_linears, packing_works
from qnext.worker.loader import load_model
from qnext.worker.model import SparseMoE
from qnext.worker.tiny import tiny_config
from qnext.worker.sampler import row_argmax, row_topk

needs_packing = pytest.mark.skipif(not packing_works(torch.bfloat16), reason="no oneDNN bf16 linear in this build")


@needs_packing
@pytest.mark.parametrize("rows", [1, 3, 16, 100])
def test_packed_linear_equals_f_linear_bit_for_bit(rows):
    torch.manual_seed(rows)
    for bias in (False, True):
        lin = nn.Linear(256, 1000, bias=bias).to(torch.bfloat16)
        x = torch.randn(rows, 256).to(torch.bfloat16)
        with torch.no_grad():
            assert torch.equal(PackedLinear(lin)(x), lin(x))
            assert torch.equal(PackedLinear(lin)(x.view(1, rows, 256))[0], lin(x))  # leading dims kept


@needs_packing
@pytest.mark.parametrize("rows", [1, 3, 16, 100])
def test_fused_projections_equal_each_linear_bit_for_bit(rows):
    torch.manual_seed(rows)
    for bias in (False, True):
        linears = [nn.Linear(128, n, bias=bias and n > 1).to(torch.bfloat16) for n in (16, 64, 64, 1)]
        x = torch.randn(rows, 128).to(torch.bfloat16)
        with torch.no_grad():
            outs = PackedProjections(linears)(x)
            assert [o.shape for o in outs] == [(rows, lin.out_features) for lin in linears]
            assert all(torch.equal(o, lin(x)) for o, lin in zip(outs, linears))


@needs_packing
def test_packed_dense_moe_matches_float64_like_the_reference_and_ignores_the_batch():
    """The whole small MoE block as two packed GEMMs (router, shared expert and every routed expert) against the
    block's plain forward in float64 on the same bf16 weights: its error no larger than the plain bf16 forward's
    own (or 4e-3), and a token's result the same alone as in any batch."""
    torch.manual_seed(0)
    cfg = config_from_dict(tiny_config(num_experts=16, num_experts_per_tok=4, hidden_size=128,
                                            moe_intermediate_size=64, shared_expert_intermediate_size=48))
    moe = SparseMoE(cfg)
    for w in moe.parameters():
        nn.init.normal_(w, std=0.05)
    bf16 = copy.deepcopy(moe).to(torch.bfloat16)
    exact = copy.deepcopy(bf16).double()
    packed = PackedDenseMoE(bf16)
    for T in (1, 5, 16, 64):
        x = torch.randn(T, cfg.hidden_size).to(torch.bfloat16)
        with torch.no_grad():
            want = exact(x.double())
            ref = bf16(x)
            got = packed(x)
            one_by_one = torch.cat([packed(x[t:t + 1]) for t in range(T)])
        err = lambda y: ((y.double() - want).norm() / want.norm()).item()  # noqa: E731
        assert got.dtype == torch.bfloat16 and err(got) < max(1.5 * err(ref), 4e-3), (T, err(got), err(ref))
        assert torch.equal(got, one_by_one)  # a token's result does not depend on the rest of the batch


def test_row_argmax_is_torch_argmax():
    torch.manual_seed(0)
    for rows, cols in [(16, 151936), (3, 1000), (5, 513), (2, 600), (4, 100)]:
        for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
            x = torch.randn(rows, cols).to(dtype)
            x[0, cols // 2] = x[0, cols // 3] = x[0].max()  # a tie: the first index wins
            x[1] = -math.inf
            if rows > 2:
                x[2, 7] = x[2, cols - 1] = math.nan  # NaN counts as the maximum, the first one wins
            assert torch.equal(row_argmax(x), x.argmax(dim=-1)), (rows, cols, dtype)
    ints = torch.randint(0, 3, (4, 1000)).float()  # many ties across blocks
    assert torch.equal(row_argmax(ints), ints.argmax(dim=-1))


def test_row_topk_is_torch_topk():
    """The same values as torch.topk, descending, at distinct columns that hold them: random rows (then the same
    columns too), ties across blocks, -inf rows, NaN (the largest), widths that are not a whole number of
    blocks, and n on both sides of the plain-topk fallback."""
    torch.manual_seed(1)
    for rows, cols, n in [(16, 151936, 21), (16, 151936, 1), (3, 5000, 4), (5, 1300, 1), (2, 600, 5), (4, 100, 3)]:
        for dtype in (torch.float32, torch.bfloat16):
            x = torch.randn(rows, cols).to(dtype)
            if dtype == torch.float32:  # distinct values: the columns are torch's too
                assert torch.equal(row_topk(x, n)[1], x.topk(n, dim=-1).indices), (rows, cols, n)
            x[0, cols // 2] = x[0, cols // 3] = x[0, cols - 1] = x[0].max()  # a three-way tie at the top
            x[1] = -math.inf
            if rows > 2:
                x[2, 7] = x[2, cols - 1] = math.nan
            values, columns = row_topk(x, n)
            want = x.topk(n, dim=-1).values
            assert torch.equal(values.nan_to_num(), want.nan_to_num()), (rows, cols, n, dtype)
            assert torch.equal(x.gather(1, columns).nan_to_num(), values.nan_to_num())
            assert all(len(set(r)) == n for r in columns.tolist())
    ints = torch.randint(0, 3, (4, 151936)).float()  # ties everywhere
    values, columns = row_topk(ints, 20)
    assert torch.equal(values, ints.topk(20, dim=-1).values) and torch.equal(ints.gather(1, columns), values)


@needs_packing
def test_bf16_cpu_model_runs_packed_and_gives_the_plain_logits(default_ckpt):
    packed = load_model(default_ckpt, dtype=torch.bfloat16)
    layer = packed.model.layers[0]
    assert isinstance(packed.lm_head, PackedLinear) and isinstance(layer.mlp.fused_forward, PackedDenseMoE)
    assert isinstance(layer.linear_attn.fused_projections, PackedProjections)
    assert type(layer.mlp.gate) is nn.Linear and type(layer.mlp.shared_expert.down_proj) is nn.Linear  # fused: kept plain
    assert "fused_projections" not in layer.mlp.shared_expert.__dict__
    plain = load_model(default_ckpt, dtype=torch.bfloat16)
    with torch.no_grad():
        for name, module in list(plain.named_modules()):
            if isinstance(module, PackedLinear):  # back to F.linear on the same weights
                parent, _, leaf = name.rpartition(".")
                lin = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
                lin.weight, lin.bias = module.weight, module.bias
                setattr(plain.get_submodule(parent) if parent else plain, leaf, lin)
        h = torch.randn(5, packed.config.hidden_size).to(torch.bfloat16)
        for rows in (1, 2, 3, 5):  # under WIDE_MIN_ROWS the LM head runs padded rows: the real ones unchanged
            assert torch.equal(packed.compute_logits(h[:rows]), plain.compute_logits(h[:rows])), rows
    assert pack_linears(nn.Sequential(nn.Linear(4, 4))) == 1
    assert not isinstance(load_model(default_ckpt, dtype=torch.float32).lm_head, PackedLinear)  # float32: plain


def test_worker_preload_settings(tmp_path):
    lib = tmp_path / "libfake.so"
    lib.write_bytes(b"")
    assert resolve_preload("none", "cpu") == []
    assert resolve_preload(str(lib), "cuda:0") == [str(lib)]
    with pytest.raises(ValueError, match="worker_preload: no such file"):
        resolve_preload(f"{lib}:/nope/libx.so", "cpu")
    assert resolve_preload("auto", "cuda") == []  # auto preloads for a CPU worker only
    assert all(os.path.isfile(p) for p in resolve_preload("auto", "cpu"))
    iomp = os.path.join(sys.prefix, "lib", "libiomp5.so")
    assert (iomp in resolve_preload("auto", "cpu")) == os.path.isfile(iomp)


def test_worker_environment_is_set_only_while_spawning(monkeypatch):
    monkeypatch.setenv("LD_PRELOAD", "/already.so")
    with worker_environment(["/a.so", "/b.so"]):
        assert os.environ["LD_PRELOAD"] == "/already.so:/a.so:/b.so"
    assert os.environ["LD_PRELOAD"] == "/already.so"
    monkeypatch.delenv("LD_PRELOAD")
    with worker_environment(["/a.so"]):
        assert os.environ["LD_PRELOAD"] == "/a.so"
    assert "LD_PRELOAD" not in os.environ
    with worker_environment([]):
        assert "LD_PRELOAD" not in os.environ


def test_the_served_worker_gets_the_preload_and_the_server_does_not():
    import subprocess

    from test_service_support import LocalServer
    gomp = next((p for p in ("/usr/lib/x86_64-linux-gnu/libgomp.so.1", "/usr/lib/aarch64-linux-gnu/libgomp.so.1")
                 if os.path.isfile(p)), None)
    if gomp is None:
        pytest.skip("no libgomp to preload harmlessly")
    server = LocalServer("--worker-preload", gomp, "--cache-memory", str(64 << 20))
    try:
        (worker,) = [int(p) for p in subprocess.check_output(["pgrep", "-P", str(server.proc.pid)]).split()
                     if b"spawn_main" in open(f"/proc/{int(p)}/cmdline", "rb").read()]
        environ = lambda pid: open(f"/proc/{pid}/environ", "rb").read().split(b"\0")  # noqa: E731
        assert f"LD_PRELOAD={gomp}".encode() in environ(worker)
        assert not any(v.startswith(b"LD_PRELOAD=") for v in environ(server.proc.pid))
    finally:
        server.stop()


def test_cpu_threads_sets_the_engines_intra_op_threads(default_ckpt):
    from qnext.worker.engine import Engine
    from qnext.worker.types import EngineConfig
    with pytest.raises(ValueError, match="cpu_threads: must be >= 0"):
        EngineConfig(cpu_threads=-1)
    before = torch.get_num_threads()
    try:
        Engine(EngineConfig(model=str(default_ckpt), cache_memory=16 << 20, cpu_threads=1))
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_handle_waits_for_the_interval_the_finish_or_an_error():
    import asyncio

    from qnext.rpc.batcher import RequestFailed, RequestHandle
    from qnext.worker.types import FinishReason, RequestOutput, StepError

    def out(n: int, finished: bool = False, error: StepError | None = None) -> RequestOutput:
        return RequestOutput("r", list(range(n)), [], [], finished, FinishReason.LENGTH if finished else None,
                             1, n, 0, error=error)

    async def scenario():
        h = RequestHandle("1:r", "r")
        h._push(out(1))
        assert [len(o.new_token_ids) for o in await h.next(1)] == [1]
        h._push(out(1))
        h._push(out(2))
        waiter = asyncio.ensure_future(h.next(4))
        await asyncio.sleep(0.01)
        assert not waiter.done()  # 3 tokens of 4
        h._push(out(1))
        assert sum(len(o.new_token_ids) for o in await waiter) == 4
        h._push(out(1, finished=True))
        assert (await h.next(4))[-1].finished  # the final output goes out whatever its size
        h2 = RequestHandle("2:r", "r")
        h2._push(out(2))
        h2._push(out(0, finished=True, error=StepError(False, "boom")))
        assert len(await h2.next(8)) == 1  # the tokens before the error first
        with pytest.raises(RequestFailed):
            await h2.next(8)

    asyncio.run(scenario())


def test_stream_interval_batches_responses_and_keeps_the_tokens(default_ckpt):
    import asyncio

    from test_service_support import LocalServer

    from qnext.rpc.client import Client
    from qnext.worker.engine import Engine
    from qnext.worker.types import EngineConfig, SamplingParams, StoppingParams
    prompt = [151644, 872, 198, 9707, 11, 1879, 0, 151645]
    # float32 on both sides: in bf16 two processes can round the same batch differently (fresh-clone CI once saw
    # the first greedy token differ between the worker and this process on the random-weight default)
    want = Engine(EngineConfig(model=str(default_ckpt), cache_memory=64 << 20, dtype="float32")).generate(
        [prompt], SamplingParams(temperature=0), StoppingParams(max_new_tokens=22, ignore_eos=True))[0].token_ids
    server = LocalServer("--stream-interval", "4", "--cache-memory", str(64 << 20), "--dtype", "float32")

    async def stream() -> list[list[int]]:
        async with Client(server.target) as client:
            return [list(c.token_ids) async for c in client.generate_stream(
                token_ids=prompt, max_new_tokens=22, ignore_eos=True, temperature=0.0)]
    try:
        got = asyncio.run(stream())
    finally:
        server.stop()
    sizes = [len(c) for c in got if c]
    # the first response does not wait for the interval: it carries what has arrived, one token unless the
    # stream's reader fell behind a step on the shared cores (an exact check of 1 failed now and then)
    assert 1 <= sizes[0] < 4 and all(n >= 4 for n in sizes[1:-1]) and len(sizes) <= 7
    assert [t for c in got for t in c] == want and len(want) == 22
