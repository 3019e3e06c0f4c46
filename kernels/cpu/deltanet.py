"""A DeltaNet layer's decode tokens and speculative-verify chunks in one C call per layer (`deltanet_steps.c`),
from the projections (in_proj_qkvz, in_proj_ba) to the gated-norm rows out_proj reads.

In torch a decode token is ~100 small ops per DeltaNet layer; on the 2-core box they were ~2 ms of an 11 ms
decode step at 16 sequences. The reference is the layer's torch path (`worker/model.py` GatedDeltaNet under
`QNEXT_KERNELS=reference`: the conv, gated-delta-rule and norm references composed); tests/test_cpu_deltanet.py
holds the two together. When it runs: the package's docstring (kernels/cpu/__init__.py).
"""

from __future__ import annotations

import ctypes
import functools

import torch

from qnext.kernels import cpu
from qnext.kernels.cpu import DTYPE_NAMES

SEQ_FIELDS = 5  # the sequence table's columns: first row, tokens, state slot, fresh (no history), verify
# rows x Hv x dk x dv below which a call runs on one thread. Measured on the 2-core box (vs-vLLM checkpoint: Hv 4,
# dk = dv = 64, so 16 rows are 262K): one engine alternating one and two threads every 30 steps, 16 rows 1.03-1.04x
# (with the attention split), one row 0.976x when every call split (a parallel region's start and end cost more
# than a 16K-wide call saves). The full model's 32 heads of 128 x 128 are 524K a row: split at any batch.
PARALLEL_MIN_WORK = 1 << 17


class _Args(ctypes.Structure):
    """struct deltanet_args of deltanet_steps.c, field for field."""

    _fields_ = [("num_seqs", ctypes.c_int64), ("seqs", ctypes.c_void_p),
                ("Hk", ctypes.c_int64), ("Hv", ctypes.c_int64), ("dk", ctypes.c_int64), ("dv", ctypes.c_int64),
                ("K", ctypes.c_int64),
                ("qkvz", ctypes.c_void_p), ("qkvz_stride", ctypes.c_int64),
                ("ba", ctypes.c_void_p), ("ba_stride", ctypes.c_int64),
                ("conv_weight", ctypes.c_void_p), ("neg_A", ctypes.c_void_p), ("dt_bias", ctypes.c_void_p),
                ("norm_weight", ctypes.c_void_p), ("eps", ctypes.c_float),
                ("conv_state", ctypes.c_void_p), ("ssm_state", ctypes.c_void_p),
                ("spec_conv", ctypes.c_void_p), ("spec_ssm", ctypes.c_void_p), ("k_max", ctypes.c_int64),
                ("out", ctypes.c_void_p), ("threads", ctypes.c_int64),
                ("parallel_min_work", ctypes.c_int64)]


@functools.cache
def _entries() -> dict[tuple[torch.dtype, torch.dtype], ctypes._CFuncPtr]:
    """{(activation dtype, state dtype): entry point}."""
    return {(act, state): cpu.entry(f"deltanet_token_steps_{a}_{s}", _Args)
            for act, a in DTYPE_NAMES.items() for state, s in DTYPE_NAMES.items()}


def runs(x: torch.Tensor, state_dtype: torch.dtype) -> bool:
    """Whether a DeltaNet layer with activations like x and a state pool of state_dtype takes the C token steps."""
    return state_dtype in DTYPE_NAMES and cpu.runs(x)


def token_steps(qkvz: torch.Tensor, ba: torch.Tensor, seqs: torch.Tensor, heads: tuple[int, int, int, int],
                conv_weight: torch.Tensor, neg_A: torch.Tensor, dt_bias: torch.Tensor, norm_weight: torch.Tensor,
                eps: float, conv_state: torch.Tensor, ssm_state: torch.Tensor, spec_conv: torch.Tensor | None,
                spec_ssm: torch.Tensor | None, out: torch.Tensor) -> None:
    """Advance the sequences of `seqs` ([n, SEQ_FIELDS] int64: first row, tokens, slot, fresh, verify) through
    their tokens: out's rows of them get the gated-norm output, the pools' slots the new conv / recurrent states,
    and spec_conv / spec_ssm[slot, j] the states after position j of each verify chunk but its last.

    qkvz [T, Hk * (2 dk + 2 r dv)] and ba [T, Hk * 2 r] (rows may be strided, columns not); heads (Hk, Hv, dk, dv);
    conv_weight [K, D] (time-major, as conv_state), neg_A = -exp(A_log) [Hv], dt_bias [Hv], norm_weight [dv]: fp32; the pools are one layer's,
    conv_state [S, K-1, D] in the activation dtype; out [T, Hv * dv] contiguous, in the activation dtype."""
    Hk, Hv, dk, dv = heads
    act = qkvz.dtype
    fn = _entries()[act, ssm_state.dtype]
    K, D = conv_weight.shape
    assert ba.dtype == act and conv_state.dtype == act and out.dtype == act, "one activation dtype throughout"
    assert qkvz.stride(-1) == 1 and ba.stride(-1) == 1 and out.is_contiguous() and seqs.is_contiguous()
    assert seqs.dtype == torch.int64 and seqs.dim() == 2 and seqs.shape[1] == SEQ_FIELDS
    assert qkvz.shape[1] == Hk * (2 * dk) + 2 * Hv * dv and ba.shape[1] == 2 * Hv and D == 2 * Hk * dk + Hv * dv
    assert conv_state.is_contiguous() and conv_state.shape[1:] == (K - 1, D) and K >= 2
    assert ssm_state.is_contiguous() and ssm_state.shape[1:] == (Hv, dk, dv)
    for p, n in ((conv_weight, D * K), (neg_A, Hv), (dt_bias, Hv), (norm_weight, dv)):
        assert p.dtype == torch.float32 and p.is_contiguous() and p.numel() == n
    if spec_conv is not None:
        assert spec_ssm is not None and spec_conv.is_contiguous() and spec_ssm.is_contiguous()
        assert spec_conv.dtype == act and spec_ssm.dtype == ssm_state.dtype
    args = _Args(seqs.shape[0], seqs.data_ptr(), Hk, Hv, dk, dv, K, qkvz.data_ptr(), qkvz.stride(0),
                 ba.data_ptr(), ba.stride(0), conv_weight.data_ptr(), neg_A.data_ptr(), dt_bias.data_ptr(),
                 norm_weight.data_ptr(), eps, conv_state.data_ptr(), ssm_state.data_ptr(),
                 spec_conv.data_ptr() if spec_conv is not None else None,
                 spec_ssm.data_ptr() if spec_ssm is not None else None,
                 spec_conv.shape[1] if spec_conv is not None else 0, out.data_ptr(), cpu.openmp_threads(),
                 PARALLEL_MIN_WORK)
    if fn(ctypes.byref(args)) != 0:
        raise MemoryError("DeltaNet token steps: no memory for the call's scratch rows")


__all__ = ["SEQ_FIELDS", "runs", "token_steps"]
