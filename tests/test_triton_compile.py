"""Every Triton kernel compiled for the H200 (sm_90) on a machine without a GPU, at the tiles its host wrapper
picks for the model's shapes: catches what the interpreter cannot (errors of the compiled language, such as a
variable changing shape across an `if`, found this way) and register spills (ptxas's stack frame).

Arguments that a real launch sees as multiples of 16 (pointers, and the model's dims and strides) get Triton's
divisibility attribute, as they would at run time, so loads vectorise and the GEMM pipelines as on the GPU.
The compiles run in a child process: the interpreter that other test modules use patches triton.language in
this one.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BF16, FP32, FP8 = "*bf16", "*fp32", "*fp8e4nv"


def compile_sm90(fn, types: dict[str, str], cfg: dict[str, object], divisible: tuple[str, ...] = ()):
    """fn compiled to a cubin: `types` for pointers and floats (other arguments i32), `cfg` the constexprs plus
    num_warps / num_stages, `divisible` the integer arguments that are multiples of 16 at run time."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    cfg = dict(cfg)
    options = {k: cfg.pop(k) for k in ("num_warps", "num_stages") if k in cfg}
    names = fn.arg_names
    sig = {n: "constexpr" if n in cfg else types.get(n, "i32") for n in names}
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in names
             if sig[n].startswith("*") or n in divisible}
    src = ASTSource(fn=fn, signature=sig, constexprs={(names.index(k),): v for k, v in cfg.items()}, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)


def rms_norm(rows: int, D: int, has_residual: bool):
    from qnext.kernels.norms import triton_norms as m
    return compile_sm90(m.rms_norm_fwd_kernel, dict(x_ptr=BF16, r_ptr=BF16, w_ptr=BF16, y_ptr=BF16, h_ptr=BF16,
                                                    eps="fp32"),
                        dict(m.launch_config(rows, D), HAS_RESIDUAL=has_residual),
                        ("D", "stride_x", "stride_r", "stride_y", "stride_h"))


def gated_rms_norm(w_type: str, round_product: bool):
    from qnext.kernels.norms import triton_norms as m
    return compile_sm90(m.gated_rms_norm_fwd_kernel, dict(x_ptr=BF16, z_ptr=BF16, w_ptr=w_type, y_ptr=BF16,
                                                          eps="fp32"),
                        dict(m.launch_config(256 * 32, 128), ROUND_PRODUCT=round_product),
                        ("D", "stride_x", "stride_z", "stride_y"))


def quant(K: int):
    from qnext.kernels.fp8 import triton_quant as m
    return compile_sm90(m.per_token_group_quant_fwd_kernel, dict(x_ptr=BF16, q_ptr=FP8, s_ptr=FP32, eps="fp32",
                                                                 fp8_max="fp32"),
                        dict(m.launch_config(K // 128, 128), GROUP=128), ("K", "stride_x", "stride_q"))


def gemm(M: int):
    from qnext.kernels.fp8 import triton_gemm as m
    return compile_sm90(m.fp8_block_gemm_fwd_kernel, dict(a_ptr=FP8, b_ptr=FP8, c_ptr=BF16, as_ptr=FP32,
                                                           bs_ptr=FP32),
                        dict(m.launch_config(M), K=2048, GROUP_N=128, BLOCK_K=128),
                        ("N", "stride_am", "stride_bn", "stride_cm", "stride_asm", "stride_bsn"))


def conv(max_len: int, has_verify: bool):
    from qnext.kernels.conv1d import triton_conv as m
    return compile_sm90(m.causal_conv1d_fwd_kernel, dict(x_ptr=BF16, w_ptr=BF16, out_ptr=BF16, state_ptr=BF16,
                                                         spec_ptr=BF16, slots_ptr="*i64", meta_ptr="*i32",
                                                         items_ptr="*i32"),
                        dict(m.launch_config(max_len, 8192), K=4, HAS_VERIFY=has_verify, BLOCK_S=4),
                        ("D", "stride_x", "stride_out", "stride_ss", "stride_st", "stride_ps", "stride_pj",
                         "stride_pt"))


def kv_write(fp8: bool):
    """fp8: an FP8 cache (--kv-cache-dtype fp8), quantised with its scales as it is written."""
    from qnext.kernels.attention import triton_attention as m
    cache = FP8 if fp8 else BF16
    return compile_sm90(m.kv_cache_write_kernel, dict(k_ptr=BF16, v_ptr=BF16, k_cache_ptr=cache, v_cache_ptr=cache,
                                                      slots_ptr="*i64", k_scale_ptr=FP32, v_scale_ptr=FP32),
                        dict(HKV=2, D=256, BLOCK_SIZE=16, BLOCK_H=2, BLOCK_D=256, QUANT=fp8, EPS=1e-10,
                             FP8_MAX=448.0, num_warps=4),
                        ("stride_kt", "stride_kh", "stride_vt", "stride_vh", "stride_cb", "stride_cp", "stride_ch",
                         "stride_vb", "stride_vp", "stride_vch", "stride_sb"))


def attention(max_query_len: int, num_splits: int, fp8: bool = False):
    from qnext.kernels.attention import triton_attention as m
    cache = FP8 if fp8 else BF16
    return compile_sm90(m.paged_attention_fwd_kernel, dict(q_ptr=BF16, k_cache_ptr=cache, v_cache_ptr=cache,
                                                           out_ptr=BF16, tables_ptr="*i32", k_scale_ptr=FP32,
                                                           v_scale_ptr=FP32, meta_ptr="*i32", items_ptr="*i32",
                                                           part_ptr=FP32, lse_ptr=FP32, scale_log2="fp32"),
                        dict(m.launch_config(max_query_len, 8, 256), GROUP=8, GROUP_P=8, HEAD_DIM=256,
                             BLOCK_SIZE=16, NUM_SPLITS=num_splits, QUANT=fp8, PRECISION="tf32", INTERPRET=False),
                        ("stride_qt", "stride_qh", "stride_ot", "stride_oh", "stride_kb", "stride_kp", "stride_kh",
                         "stride_vb", "stride_vp", "stride_vh", "stride_sb", "stride_ps", "stride_pt", "stride_ls",
                         "stride_lt"))


def split_kv_combine():
    from qnext.kernels.attention import triton_attention as m
    return compile_sm90(m.split_kv_combine_kernel, dict(part_ptr=FP32, lse_ptr=FP32, out_ptr=BF16),
                        dict(HEAD_DIM=256, NUM_SPLITS=32, BLOCK_S=32, BLOCK_D=256, num_warps=2),
                        ("stride_ps", "stride_pt", "stride_ls", "stride_lt", "stride_ot", "stride_oh"))


def moe_gemm(num_pairs: int, is_fp8: bool, gated: bool):
    from qnext.kernels.moe import triton_moe as m
    w = FP8 if is_fp8 else BF16
    return compile_sm90(m.moe_gemm_kernel, dict(a_ptr=w, as_ptr=FP32, b_ptr=w, b2_ptr=w, bs_ptr=FP32, b2s_ptr=FP32,
                                                c_ptr=BF16, pairs_ptr="*i32", block_expert_ptr="*i32",
                                                num_padded_ptr="*i32", route_w_ptr=FP32),
                        dict(m.launch_config(num_pairs, 512, is_fp8), K=2048 if gated else 512,
                             ROW_DIV=10 if gated else 1, GATED=gated, MUL_ROUTE_W=not gated, IS_FP8=is_fp8,
                             GROUP_N=128, PRECISION="tf32", INTERPRET=False),
                        ("N", "stride_am", "stride_asm", "stride_be", "stride_bn", "stride_bse", "stride_cm"))


def moe_align(num_pairs: int):
    from qnext.kernels.moe import triton_align as m
    from qnext.kernels.moe.align import max_padded_pairs
    max_entries = -(-max_padded_pairs(num_pairs, 512, 16) // 256) * 256
    return compile_sm90(m.moe_align_kernel, dict(ids_ptr="*i64", pairs_ptr="*i32", block_expert_ptr="*i32",
                                                 num_padded_ptr="*i32"),
                        dict(m.launch_config(num_pairs, 512), E=512, BLOCK_M=16, MAX_PAIRS=num_pairs,
                             MAX_ENTRIES=max_entries))


def router():
    from qnext.kernels.moe import triton_router as m
    return compile_sm90(m.topk_softmax_kernel, dict(logits_ptr=BF16, weights_ptr=FP32, ids_ptr="*i64"),
                        dict(K=10, BLOCK_K=16, BLOCK_E=512, RENORMALIZE=True, num_warps=4), ("E", "stride_l"))

def gdr_recurrent(has_verify: bool):
    from qnext.kernels.gated_delta_rule import triton_recurrent as m
    return compile_sm90(m.gdr_recurrent_fwd_kernel, dict(q_ptr=BF16, k_ptr=BF16, v_ptr=BF16, g_ptr=FP32,
                                                         beta_ptr=BF16, out_ptr=BF16, state_ptr=FP32, spec_ptr=FP32,
                                                         slots_ptr="*i64", meta_ptr="*i32", scale="fp32"),
                        dict(m.launch_config(128, 128), HAS_VERIFY=has_verify),
                        ("dk", "dv", "stride_qt", "stride_qh", "stride_kt", "stride_kh", "stride_vt", "stride_vh",
                         "stride_gt", "stride_bt", "stride_ot", "stride_oh", "stride_ss", "stride_sh", "stride_sk",
                         "stride_ps", "stride_pj", "stride_ph", "stride_pk"))


def gdr_chunk(which: str):
    from qnext.kernels.gated_delta_rule import triton_chunk as m
    cfg = m.launch_config(128, 128, on_cuda=True)
    if which == "inverse":
        return compile_sm90(m.gdr_chunk_inverse_kernel, dict(k_ptr=BF16, g_ptr=FP32, beta_ptr=BF16, a_ptr=FP32,
                                                             items_ptr="*i32"),
                            dict(C=m.CHUNK_SIZE, SUB=m.CHUNK_SIZE // 4, BLOCK_K=cfg["BLOCK_K"],
                                 DOT_PRECISION=cfg["INVERSE_PRECISION"], num_warps=4),
                            ("dk", "stride_kt", "stride_kh", "stride_gt", "stride_bt"))
    return compile_sm90(m.gdr_chunk_fwd_kernel, dict(q_ptr=BF16, k_ptr=BF16, v_ptr=BF16, g_ptr=FP32, beta_ptr=BF16,
                                                     out_ptr=BF16, a_ptr=FP32, state_ptr=FP32, slots_ptr="*i64",
                                                     meta_ptr="*i32", scale="fp32"),
                        dict({k: v for k, v in cfg.items() if k != "INVERSE_PRECISION"}, C=m.CHUNK_SIZE),
                        ("dk", "dv", "stride_qt", "stride_qh", "stride_kt", "stride_kh", "stride_vt", "stride_vh",
                         "stride_gt", "stride_bt", "stride_ot", "stride_oh", "stride_ss", "stride_sh", "stride_sk"))


# Register spills (stack bytes) accepted for now, each with its reason in the kernel's launch_config; anything
# above these, or a spill anywhere else, fails.
KNOWN_SPILLS = {"gdr-chunk-fwd": 1024, "conv-len4-verifyFalse": 8}

CASES: dict[str, Callable[[], object]] = {
    **{f"rms_norm-{r}x{d}-res{h}": (lambda r=r, d=d, h=h: rms_norm(r, d, h))
       for r, d in [(1, 2048), (4096, 2048), (64 * 16, 256)] for h in (False, True)},
    "gated_rms_norm-bf16w": lambda: gated_rms_norm(BF16, True),
    "gated_rms_norm-fp32w": lambda: gated_rms_norm(FP32, False),
    **{f"quant-K{k}": (lambda k=k: quant(k)) for k in (512, 2048, 4096)},
    **{f"gemm-M{m}": (lambda m=m: gemm(m)) for m in (1, 64, 4096)},
    **{f"conv-len{n}-verify{v}": (lambda n=n, v=v: conv(n, v)) for n in (1, 4, 4096) for v in (False, True)},
    **{f"kv_write-fp8{f}": (lambda f=f: kv_write(f)) for f in (False, True)},
    **{f"attention-qlen{n}-splits{s}": (lambda n=n, s=s: attention(n, s)) for n, s in ((1, 1), (1, 16), (4, 1),
                                                                                        (4096, 1))},
    **{f"attention-fp8-qlen{n}-splits{s}": (lambda n=n, s=s: attention(n, s, fp8=True)) for n, s in ((1, 16),
                                                                                                     (4096, 1))},
    "split_kv_combine": split_kv_combine,
    **{f"moe-pairs{p}-fp8{f}-gated{g}": (lambda p=p, f=f, g=g: moe_gemm(p, f, g))
       for p in (10, 40960) for f in (False, True) for g in (True, False)},
    **{f"moe_align-pairs{p}": (lambda p=p: moe_align(p)) for p in (16, 1024)},
    "router": router,
    **{f"gdr-recurrent-verify{v}": (lambda v=v: gdr_recurrent(v)) for v in (False, True)},
    **{f"gdr-chunk-{w}": (lambda w=w: gdr_chunk(w)) for w in ("inverse", "fwd")},
}


def stack_bytes(cubin: bytes, cuobjdump: Path) -> int:
    """ptxas's per-thread stack frame: > 0 means registers spilled."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        usage = subprocess.run([str(cuobjdump), "--dump-resource-usage", f.name], capture_output=True, text=True,
                               check=True).stdout
    return int(re.search(r"STACK:(\d+)", usage).group(1))


def compile_all() -> dict[str, dict[str, object]]:
    """Child process: compile every case, report errors, spills and what the PTX uses."""
    import triton
    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    results: dict[str, dict[str, object]] = {}
    for case, build in CASES.items():
        try:
            kernel = build()
        except Exception as e:  # noqa: BLE001 - reported per case by the test
            results[case] = {"error": f"{type(e).__name__}: {e}"}
            continue
        ptx = kernel.asm["ptx"]
        results[case] = {"error": None, "stack": stack_bytes(kernel.asm["cubin"], cuobjdump),
                         "cp_async": "cp.async" in ptx, "wgmma": "wgmma" in ptx}
    return results


@pytest.fixture(scope="module")
def results() -> dict[str, dict[str, object]]:
    pytest.importorskip("triton", reason="triton is not installed")
    pytest.importorskip("triton.backends.nvidia.compiler", reason="triton has no NVIDIA backend here")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    run = subprocess.run([sys.executable, __file__], capture_output=True, text=True, env=env, cwd=ROOT,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-4000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("case", list(CASES))
def test_compiles_for_sm90_without_spills(case: str, results) -> None:
    r = results[case]
    assert r["error"] is None, r["error"]
    assert r["stack"] <= KNOWN_SPILLS.get(case, 0), f"registers spill at these tiles ({r['stack']} bytes of stack)"
    if case.startswith("gemm"):
        assert r["cp_async"], "the K loop is not pipelined"
        assert r["wgmma"] == (case != "gemm-M1"), "Hopper's wgmma for the 64-row tiles and up, mma.sync below"


if __name__ == "__main__":
    print(json.dumps(compile_all()))
