"""worker/graph_runner.py: decode and verify steps replayed on static, padded buffers must compute what the plain
forward computes, and touch nothing but their own sequences (padding rows: no KV write, only the padding slot).

On CPU the runner cannot capture, so it runs the same static buffers eagerly (padded-eager) with the Triton
kernels under the interpreter: that checks the padding, the buffer loads and the in-place refill of the kernels'
varlen tables across steps whose context lengths, slots and batch sizes change. On a CUDA machine the same test
captures real graphs and replays them. The reference is the plain forward over the unpadded batch on a twin cache.
"""

from __future__ import annotations

import os

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu":
    os.environ["TRITON_INTERPRET"] = "1"  # must precede the first @triton.jit of the kernels
pytest.importorskip("triton", reason="triton is not installed")

from qnext.kernels import dispatch  # noqa: E402
from paged_runner import PagedRunner  # noqa: E402
from qnext.worker.engine import Engine  # noqa: E402
from qnext.worker.types import EngineConfig, SamplingParams, StoppingParams
from qnext.worker.graph_runner import batch_buckets, target_runner  # noqa: E402
from qnext.worker.loader import load_model  # noqa: E402
from qnext.worker.tiny import make_checkpoint, tiny_config  # noqa: E402

PROMPTS = [list(range(3, 12)), list(range(40, 45)), list(range(60, 80)), [7]]
# (sequences in the step, tokens per sequence, verify): bucket 4 (1 padding row), a verify step in bucket 4, then
# plain decodes in bucket 4 again with other slots and contexts (the first step's tables refilled in place)
STEPS = [([0, 1, 2], 1, False), ([0, 2, 3], 3, True), ([1, 2, 3], 1, False)]


# aten ops that read device values on the host or size an output by them: fatal inside a CUDA graph capture
CAPTURE_BREAKERS = {"aten._local_scalar_dense.default", "aten.nonzero.default", "aten.masked_select.default",
                    "aten.bincount.default", "aten.unique_consecutive.default", "aten._unique2.default",
                    "aten.is_nonzero.default", "aten.equal.default", "aten.repeat_interleave.Tensor",
                    "aten.masked_scatter.default", "aten.index.Tensor[bool mask]"}


class OpRecorder(TorchDispatchMode):
    """The names of the aten ops run inside it (Triton launches do not pass the dispatcher; the torch ops of
    the kernels' wrappers and of the model do)."""

    def __init__(self) -> None:
        super().__init__()
        self.names: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        if name == "aten.index.Tensor" and any(i is not None and i.dtype == torch.bool for i in args[1]):
            name += "[bool mask]"  # integer gathers are fine in a graph; a mask's result size is data
        self.names.add(name)
        return func(*args, **(kwargs or {}))


def test_batch_buckets() -> None:
    assert batch_buckets(1) == [1]
    assert batch_buckets(6) == [1, 2, 4, 6]
    assert batch_buckets(20) == [1, 2, 4, 8, 16, 20]
    assert batch_buckets(256)[:5] == [1, 2, 4, 8, 16] and batch_buckets(256)[-2:] == [248, 256]


@pytest.fixture(scope="module")
def small_model(tmp_path_factory):
    # one DeltaNet and one attention layer: every kind of kernel, half the interpreter time of the default 3:1
    cfg = tiny_config(vocab_size=512, num_hidden_layers=2, full_attention_interval=2, num_experts=8,
                      num_experts_per_tok=2)
    path = make_checkpoint(tmp_path_factory.mktemp("ckpt") / "m", cfg, seed=3, tokenizer=False)
    return load_model(path, torch.device(DEVICE))  # fp32 activations


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got - want).norm() / want.norm()).item()


def test_padded_static_steps_match_the_plain_forward(small_model, report) -> None:
    plain = PagedRunner(small_model, num_slots=6, max_spec_tokens=2, device=DEVICE, padding_slot=True)
    padded = PagedRunner(small_model, num_slots=6, max_spec_tokens=2, device=DEVICE, padding_slot=True)
    graphs = target_runner(small_model, padded.cache, max_batch=4, max_model_len=256, block_size=4,
                               query_lens=(1, 3), capture=DEVICE == "cuda")
    sids = []
    for twin in (plain, padded):  # the same prefill on both caches (references: faster than the interpreter)
        sids = [twin.new_seq() for _ in PROMPTS]
        twin.step(list(zip(sids, PROMPTS)))
    with torch.inference_mode(), dispatch.force_triton():
        errs = []
        for n, (seqs, q, verify) in enumerate(STEPS):
            chunks = [(sids[i], [(17 * n + 5 * i + j) % 512 for j in range(q)]) for i in seqs]
            step = plain.batch(chunks, verify)
            want = small_model(step, plain.cache)
            # every layer shared the step's tables: attention, conv1d, gated delta rule, one each
            assert step.kernel_meta.num_tables == 3
            batch = padded.batch(chunks, verify)
            assert graphs.bucket_for(batch) is not None
            with OpRecorder() as ops:
                got = graphs.forward(batch)
            # what a capture refuses: a host sync (item, nonzero, bincount...) or a data-dependent shape
            assert not ops.names & CAPTURE_BREAKERS, ops.names & CAPTURE_BREAKERS
            errs.append(rel_err(got, want))
            # the padding wrote no KV and touched no sequence's state: the whole pools agree (to the last bits
            # that CPU matmuls of another row count may change; a stray write would differ by O(1))
            for name in ("k_cache", "v_cache"):
                for a, b in zip(getattr(padded.cache, name), getattr(plain.cache, name)):
                    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
            real = slice(0, padded.cache.padding_slot)
            for name in ("conv_state", "ssm_state", "spec_conv", "spec_ssm"):
                torch.testing.assert_close(getattr(padded.cache, name)[:, real], getattr(plain.cache, name)[:, real],
                                           rtol=1e-4, atol=1e-5)
    report(f"padded static steps vs plain forward ({DEVICE}, graphs captured: {graphs.stats.num_graphs}), "
           f"rel err per step", [f"{e:.1e}" for e in errs])
    assert max(errs) < 1e-5, errs
    assert graphs.stats.replayed_steps == len(STEPS) and graphs.stats.padded_rows == 1 + 1 + 1


def test_steps_that_do_not_fit_a_bucket_run_eagerly(small_model) -> None:
    runner = PagedRunner(small_model, num_slots=6, max_spec_tokens=2, padding_slot=True)
    graphs = target_runner(small_model, runner.cache, max_batch=2, max_model_len=64, block_size=4,
                               query_lens=(1, 3), capture=False)
    s = [runner.new_seq() for _ in range(3)]
    assert graphs.bucket_for(runner.batch([(s[0], [1, 2, 3]), (s[1], [4, 5, 6])])) is None  # prefill, not verify
    assert graphs.bucket_for(runner.batch([(s[0], [1]), (s[1], [4, 5])])) is None  # a prefill chunk mixed in
    assert graphs.bucket_for(runner.batch([(s[0], [1, 2])], verify=True)) is None  # a shortened verify chunk
    assert graphs.bucket_for(runner.batch([(i, [9]) for i in s])) is None  # above the largest bucket
    assert graphs.bucket_for(runner.batch([(s[2], list(range(70)))])) is None  # a prefill
    assert graphs.bucket_for(runner.batch([(s[2], [1])])) is None  # its block table is wider than 64 + 3 tokens
    assert graphs.bucket_for(runner.batch([(s[0], [1, 2, 3])], verify=True)) == (1, 3)
    assert graphs.bucket_for(runner.batch([(s[1], [8])])) == (1, 1)


@pytest.mark.parametrize("k", [0, 2])
def test_engine_tokens_do_not_change_with_padded_steps(k: int) -> None:
    """The whole engine (references on CPU): greedy and seeded sampling, with and without MTP, give the same
    tokens whether decode steps run on the padded static buffers or not."""
    prompts = [[1, 2, 3, 4, 5], [7, 8, 9], [10] * 20, [3, 1, 4, 1, 5, 9, 2, 6], [5]]
    sampling = [SamplingParams(temperature=0.0)] * 3 + [SamplingParams(temperature=0.8, top_p=0.9, seed=11)] * 2
    outs, stats, mtp = {}, None, None
    for mode in ("off", "padded-eager"):
        engine = Engine(EngineConfig(seed=0, cuda_graphs=mode, num_speculative_tokens=k, max_num_seqs=8,
                                     speculative_draft_length="fixed"))  # every step drafts: graphs replayed
        # 12 tokens: enough decode steps that graphs replay whatever the seeded drafts accept
        done = engine.generate(prompts, sampling, StoppingParams(max_new_tokens=12, ignore_eos=True))
        outs[mode] = [c.token_ids for c in done]
        if engine.runner.graphs:
            stats = engine.runner.graphs.stats
            mtp = engine.runner.mtp_graphs.stats if engine.runner.mtp_graphs else None
            worker = engine.stats()  # what the server's metrics and stats report
            assert (worker.cuda_graph_steps, worker.cuda_graph_padded_rows) == (stats.replayed_steps,
                                                                                stats.padded_rows)
        assert engine.cache_manager.slots.num_free == engine.cache_info.num_slots  # nothing leaked
    assert outs["off"] == outs["padded-eager"]
    assert stats.replayed_steps >= 4 and stats.padded_rows > 0 and stats.num_graphs == 0
    if k >= 2:  # the MTP head's second drafting pass of each step ran on its own static buffers
        assert mtp.replayed_steps >= 4 and mtp.padded_rows > 0
    else:
        assert mtp is None


def test_graph_config_is_checked() -> None:
    with pytest.raises(ValueError, match="cuda_graphs: must be one of auto, off, padded-eager"):
        EngineConfig(cuda_graphs="on")
    with pytest.raises(ValueError, match="cuda_graph_max_batch_size: must be >= 1"):
        EngineConfig(cuda_graph_max_batch_size=0)
    engine = Engine(EngineConfig(seed=0))
    assert engine.runner.graphs is None and engine.runner.cache.padding_slot is None  # auto on CPU: nothing to capture
    assert engine.runner.describe_graphs() == "off (not on CUDA)"


@pytest.mark.skipif(DEVICE == "cuda", reason="on CPU a capture cannot succeed: that is what is checked")
def test_a_failed_capture_names_the_graph_and_the_way_out(small_model) -> None:
    runner = PagedRunner(small_model, num_slots=2, padding_slot=True)
    with pytest.raises(RuntimeError, match=r"capture failed for batch 2, 1 tokens per sequence: .*--enforce-eager"):
        target_runner(small_model, runner.cache, max_batch=2, max_model_len=64, block_size=4, query_lens=(1,),
                      capture=True)


def test_engine_steps_refill_the_static_tables_outside_inference_mode(small_model) -> None:
    """Found on the first GPU run: the static batches' kernel tables are built inside the model's inference-mode
    forward, and an engine step called from plain code refilled them in place (an error for inference tensors).
    The engine's steps run in inference mode; here with the Triton kernels (interpreter), which build tables."""
    from qnext.worker.engine import Engine
    from qnext.worker.types import EngineConfig
    engine = Engine(EngineConfig(device=DEVICE, cuda_graphs="padded-eager", max_num_seqs=2,
                                 cache_memory=0.02 if DEVICE == "cuda" else 16 << 20), model=small_model)
    with dispatch.force_triton():
        done = engine.generate([[1, 2, 3], [4, 5]], SamplingParams(temperature=0.0),
                               StoppingParams(max_new_tokens=4, ignore_eos=True))
    assert [len(c.token_ids) for c in done] == [4, 4]
    assert engine.runner.graphs.stats.replayed_steps >= 2
