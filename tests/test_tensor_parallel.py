"""Tensor parallelism on CPU: two ranks over gloo generate exactly what one rank does, and sizes the model
cannot be split by are refused with an error naming --tensor-parallel-size.

The engines run in float64 so that the ranks' different summation order (partial sums + all-reduce) stays
far below any logit gap: greedy tokens must match exactly, log-probs to 1e-9.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from safetensors import safe_open

from qnext.rpc import server
from qnext.worker.config import load_config
from qnext.worker.engine import Engine
from qnext.worker.types import EngineConfig, GenerationRequest, SamplingParams, StoppingParams
from qnext.worker.loader import CheckpointFiles, load_model
from qnext.worker.parallel import TensorShard, shard_config
from qnext.worker.tiny import make_checkpoint, tiny_config
from qnext.worker.tp_worker import LeadCache, LeadModel

LONG = list(range(1000, 1040))
# Rounds of (prompt, draft tokens). Plain decoding and MTP speculation (2 drafts) share each batch; the 40-token
# prompt is prefilled in chunks of max_num_batched_tokens; round 2 extends it, so it starts from the prefix
# cache (block copies and a DeltaNet state checkpoint restored on every rank).
ROUNDS = [[([1, 2, 3, 4, 5, 6, 7], 2), ([100, 200, 300], 0), (LONG, 2), ([42] * 5, 0)],
          [(LONG + [7, 8, 9, 10, 11], 2)]]


def _generate(ckpt, tp: int) -> tuple[dict[str, tuple[list[int], list[float]]], int, int]:
    engine = Engine(EngineConfig(model=str(ckpt), dtype="float64", tensor_parallel_size=tp, num_speculative_tokens=2,
                                 max_num_batched_tokens=16, cache_memory=64 << 20))
    out: dict[str, tuple[list[int], list[float]]] = {}
    try:
        if tp > 1:
            _check_lead_interface(engine)
        for n, requests in enumerate(ROUNDS):
            for i, (prompt, k) in enumerate(requests):
                out[f"r{n}.{i}"] = ([], [])
                engine.add_request(GenerationRequest(f"r{n}.{i}", prompt,
                                                     SamplingParams(temperature=0.0, top_logprobs=1),
                                                     StoppingParams(max_new_tokens=10, ignore_eos=True), k))
            if n == len(ROUNDS) - 1:  # parallel samples: the forked DeltaNet state and tail block on every rank
                engine.add_request(GenerationRequest("par", LONG[:21], SamplingParams(temperature=1.0, seed=3,
                                                                                      top_logprobs=1),
                                                     StoppingParams(max_new_tokens=10, ignore_eos=True), n=2))
                out["par"], out["par#1"] = ([], []), ([], [])
            while engine.has_unfinished():
                for o in engine.step():
                    key = o.request_id + (f"#{o.index}" if o.index else "")
                    out[key][0].extend(o.new_token_ids)
                    out[key][1].extend(o.logprobs)
        return out, engine.spec.counters.num_drafted, engine.cache_manager.prefix.stats.num_hits
    finally:
        engine.close()


def _check_lead_interface(engine: Engine) -> None:
    """Under TP the runner holds the explicit proxies, graphs are off, and what is not listed is refused on rank 0
    before anything reaches the followers (the generation that follows would desynchronise the ranks otherwise)."""
    runner = engine.runner
    assert isinstance(runner.model, LeadModel) and isinstance(runner.cache, LeadCache)
    assert runner.graphs is None and runner.mtp_graphs is None and runner.graphs_off_because == "tensor parallel"
    assert runner.model.config.vocab_size == runner.vocab_size and runner.cache.ckpt_hidden.shape[0] > 0
    for lead, name in [(runner.model, "forward"), (runner.model, "load_state_dict"), (runner.model, "lm_head"),
                       (runner.cache, "conv_state"), (runner.cache, "k_cache"), (runner.cache, "shape")]:
        with pytest.raises(AttributeError):
            getattr(lead, name)
    with pytest.raises(AttributeError):
        runner.cache.extra = 1  # no new attributes on a proxy either


def test_two_ranks_generate_what_one_does(default_ckpt, report):
    one, drafted_one, hits_one = _generate(default_ckpt, 1)
    two, drafted_two, hits_two = _generate(default_ckpt, 2)
    assert drafted_one > 0 and drafted_two == drafted_one  # MTP drafted, and verified, the same on both
    assert hits_one > 0 and hits_two == hits_one
    for rid, (tokens, logprobs) in one.items():
        assert len(tokens) == 10
        assert two[rid][0] == tokens, rid
        assert torch.allclose(torch.tensor(two[rid][1]), torch.tensor(logprobs), rtol=0, atol=1e-9), rid
    assert one["par"][0] != one["par#1"][0]  # two samples, each forked from the prompt on every rank
    report("TP=2 vs TP=1 tokens (5 greedy requests, 3 with MTP k=2, 1 prefix-cache hit; n=2 sampled)", "identical")


def test_rank_slices_partition_every_split_tensor(default_ckpt):
    """Over the ranks, the rows (or columns) each split tensor hands out cover it exactly once; replicated
    KV heads (size > num_key_value_heads) go to the ranks whose query heads read them."""
    cfg = load_config(default_ckpt, has_mtp_tensors=True)
    names = {"model.layers.0.linear_attn.in_proj_qkvz.weight": cfg.conv_dim + cfg.linear_value_dim,
             "model.layers.0.linear_attn.in_proj_ba.weight": 2 * cfg.linear_num_value_heads,
             "model.layers.0.linear_attn.conv1d.weight": cfg.conv_dim,
             "model.layers.0.linear_attn.A_log": cfg.linear_num_value_heads,
             "model.layers.3.self_attn.q_proj.weight": 2 * cfg.num_attention_heads * cfg.head_dim,
             "model.layers.3.self_attn.k_proj.weight": cfg.num_key_value_heads * cfg.head_dim,
             "mtp.layers.0.mlp.experts.5.down_proj.weight": cfg.moe_intermediate_size,
             "mtp.layers.0.mlp.shared_expert.up_proj.weight": cfg.shared_expert_intermediate_size}
    for name, total in names.items():
        covered = []
        for rank in range(2):
            _, runs = TensorShard(cfg, rank, 2).ranges(name)
            covered += [i for a, b in runs for i in range(a, b)]
        assert sorted(covered) == list(range(total)), name
    assert TensorShard(cfg, 0, 2).ranges("model.layers.3.mlp.gate.weight") is None  # the router is replicated
    # a 4-way split of 2 KV heads: ranks 0, 1 read head 0, ranks 2, 3 head 1
    cfg4 = dataclasses.replace(cfg, linear_num_key_heads=4, linear_num_value_heads=8)
    kv = [TensorShard(cfg4, r, 4).ranges("model.layers.3.self_attn.v_proj.weight")[1] for r in range(4)]
    d = cfg.head_dim
    assert kv == [[(0, d)], [(0, d)], [(d, 2 * d)], [(d, 2 * d)]]
    assert shard_config(cfg4, 4).num_key_value_heads == 1


def test_sizes_that_do_not_divide_the_heads_are_refused(default_ckpt, capsys):
    cfg = load_config(default_ckpt, has_mtp_tensors=True)
    with pytest.raises(ValueError, match="--tensor-parallel-size.*num_attention_heads=4"):
        shard_config(cfg, 3)
    with pytest.raises(ValueError, match="--tensor-parallel-size.*linear_num_key_heads=2"):
        shard_config(cfg, 4)  # 4 attention heads would split; 2 DeltaNet key-head groups do not
    with pytest.raises(ValueError, match="--tensor-parallel-size"):  # the engine refuses before starting ranks
        Engine(EngineConfig(model=str(default_ckpt), tensor_parallel_size=3))
    assert server.main(["--model", str(default_ckpt), "--tensor-parallel-size", "3"]) == 2
    assert "--tensor-parallel-size" in capsys.readouterr().err
    beyond = f"cuda:{torch.cuda.device_count()}"  # the first device that is not there
    assert server.main(["--model", str(default_ckpt), "--device", beyond, "--tensor-parallel-size", "2"]) == 2
    assert "--tensor-parallel-size" in capsys.readouterr().err


def test_fp8_slices_must_keep_blocks_whole(tmp_path):
    """docs/model.md §8: a rank's slice of an FP8 weight must start (and end) on a 128 block edge, or its block
    scales would be shared between ranks. The tiny model's halves (32 rows of k_proj, of each expert) are refused,
    a wider model's (all multiples of 128) are loaded, still FP8, and checked against the stored tensors."""
    from qnext.worker.tp_worker import check_tensor_parallel
    small = tiny_config(num_hidden_layers=4, vocab_size=512)
    ckpt = make_checkpoint(tmp_path / "fp8", small, fp8=True, tokenizer=False)
    with pytest.raises(ValueError, match=r"--tensor-parallel-size.*FP8 128x128 blocks"):
        check_tensor_parallel(ckpt, 2)
    wide = tiny_config(num_hidden_layers=4, vocab_size=512, num_experts=4, head_dim=128, moe_intermediate_size=256,
                       shared_expert_intermediate_size=256, linear_key_head_dim=64, linear_value_head_dim=64)
    ok = make_checkpoint(tmp_path / "fp8-wide", wide, fp8=True, tokenizer=False)
    check_tensor_parallel(ok, 2)  # every boundary on a multiple of 128: accepted

    # Kept FP8 (as on CUDA), each rank's weights and block scales are exactly its rows / columns of the stored ones.
    ranks = [load_model(ok, keep_fp8=True, tp_rank=r, tp_size=2) for r in range(2)]
    files = CheckpointFiles(ok)

    def stored(name: str) -> torch.Tensor:
        with safe_open(ok / files.header[name][2], framework="pt") as f:
            return f.get_tensor(name)

    attn, gdn, mtp, moe = "model.layers.3.self_attn", "model.layers.0.linear_attn", "mtp.layers.0", "model.layers.1.mlp"
    # (stored weight, our parameter, expert index or None, split dim)
    for name, param, expert, dim in [(f"{attn}.q_proj.weight", f"{attn}.q_proj.weight", None, 0),
                                     (f"{gdn}.in_proj_qkvz.weight", f"{gdn}.in_proj_qkvz.weight", None, 0),
                                     (f"{gdn}.out_proj.weight", f"{gdn}.out_proj.weight", None, 1),
                                     (f"{mtp}.self_attn.o_proj.weight", f"{mtp}.self_attn.o_proj.weight", None, 1),
                                     (f"{moe}.experts.3.down_proj.weight", f"{moe}.experts.w_down", 3, 1),
                                     (f"{moe}.experts.2.up_proj.weight", f"{moe}.experts.w_up", 2, 0)]:
        scale = param.removesuffix(".weight") + (".weight_scale_inv" if expert is None else "_scale_inv")
        for stored_name, key in ((name, param), (name + "_scale_inv", scale)):
            parts = [m.get_parameter(key) for m in ranks]
            parts = parts if expert is None else [p[expert] for p in parts]
            whole = stored(stored_name)
            assert parts[0].dtype == whole.dtype, stored_name  # FP8 stays FP8, scales fp32
            assert torch.equal(torch.cat([p.float() for p in parts], dim), whole.float()), stored_name


class _Recorder:
    """Stands for the followers and for a led object: records what would cross ranks and what ran locally."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, str]] = []
        self.ran: list[str] = []
        self.conv_state = torch.zeros(1)  # an attribute of the real cache that is not in the list

    def send_call(self, target: str, method: str, args: tuple, kwargs: dict) -> None:
        from qnext.worker.tp_worker import _pack
        _pack((args, kwargs), [])
        self.sent.append((target, method))

    def copy_blocks(self, src, dst):
        self.ran.append("copy_blocks")

    def forward(self, *args):
        self.ran.append("forward")


def test_cross_rank_calls_are_a_fixed_list_and_others_fail_loudly():
    """Engine redesign: the calls that cross ranks are named (LeadModel / LeadCache), not whatever __getattr__
    finds. A listed call is sent to the followers, then run; anything else raises on rank 0 and sends nothing,
    and a follower refuses a call outside the list."""
    import io
    import pickle

    from qnext.worker.tp_worker import _serve
    assert LeadModel.CALLS == ("__call__", "mtp_forward", "mtp_write_kv")
    assert LeadCache.CALLS == ("copy_blocks", "copy_slots", "save_checkpoints", "restore_checkpoints", "rollback")
    # the whole interface: the calls above plus rank-0-only compute_logits and reads
    public = {cls: {n for n in vars(cls) if not n.startswith("_") and n not in ("NAME", "CALLS")} for cls in
              (LeadModel, LeadCache)}
    assert public[LeadModel] == {"mtp_forward", "mtp_write_kv", "compute_logits", "config"} and \
        "__call__" in vars(LeadModel)
    assert public[LeadCache] == {*LeadCache.CALLS, "ckpt_hidden"}

    rec = _Recorder()
    cache, model = LeadCache(rec, rec), LeadModel(rec, rec)
    cache.copy_blocks([1], [2])
    assert rec.sent == [("cache", "copy_blocks")] and rec.ran == ["copy_blocks"]
    for lead, name in [(cache, "conv_state"), (cache, "forward"), (model, "forward"), (model, "conv_state")]:
        with pytest.raises(AttributeError):
            getattr(lead, name)
    from qnext.worker.cache_tensors import CacheTensors
    for own in (CacheTensors.__new__(CacheTensors), torch.nn.Linear(1, 1)):  # rank 0's own objects: never pickled
        with pytest.raises(TypeError, match="LeadModel / LeadCache"):
            model(None, own)
    assert rec.sent == [("cache", "copy_blocks")] and rec.ran == ["copy_blocks"]

    for target, method in [("cache", "conv_state"), ("model", "forward"), ("model", "compute_logits"),
                           ("engine", "step")]:
        channel = io.BytesIO(pickle.dumps((target, method, ((), {}))))
        with pytest.raises(RuntimeError, match="not a cross-rank call"):
            _serve(channel, {"model": rec, "cache": rec}, torch.device("cpu"), None)
    assert rec.ran == ["copy_blocks"]
