"""kernels/cpu/int8_head.py: the C int8 draft head against its torch reference (the same integer arithmetic: equal
bit for bit), against float64 logits of the dequantised weight (within the activations' 16-bit rounding), on any
thread count, through the plain-C loops as well as the VNNI ones, and as worker/draft_head.py uses it."""

from __future__ import annotations

import ctypes
import os
import platform
import subprocess

import pytest
import torch

from qnext.kernels import cpu
from qnext.kernels.cpu import build
from qnext.kernels.cpu import int8_head as int8_head_cpu
from qnext.worker.draft_head import C_MAX_ROWS, TORCH_MAX_ROWS, Int8DraftHead, quantize_rows

pytestmark = pytest.mark.usefixtures("cpu_kernels_built")


def quantised(V: int, H: int, seed: int, extreme: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """q [V, H] int8 and fp32 scales [V], as Int8DraftHead makes them (all +-127 with `extreme`: the largest sums)"""
    g = torch.Generator().manual_seed(seed)
    if extreme:
        q = torch.where(torch.rand(V, H, generator=g) < 0.5, 127, -127).to(torch.int8)
        q[0] = 127
    else:
        q = torch.randint(-127, 128, (V, H), generator=g, dtype=torch.int8)
    return q, torch.rand(V, generator=g) * 0.01 + 1e-4


def hidden(rows: int, H: int, seed: int, dtype: torch.dtype) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(rows, H, generator=g) * 3
    if rows > 1:
        h[1] = 0.0  # an all-zero row: logits 0
    if rows > 2:
        h[2, 0] = 1e4  # one element far above the rest: the others keep few bits
    return h.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("V,H", [(1, 4), (15, 8), (16, 64), (17, 130), (1003, 256), (257, 2050)])
def test_equals_the_reference_bit_for_bit(dtype, V, H):
    q, scale = quantised(V, H, seed=V + H)
    weight = int8_head_cpu.pack(q, scale)
    for rows in (1, 2, 3, 4, 5, 9):
        h = hidden(rows, H, seed=rows, dtype=dtype)
        got = int8_head_cpu.int8_head(h, weight)
        assert got.dtype == dtype and got.shape == (rows, V)
        assert torch.equal(got, int8_head_cpu.reference(h, q, scale)), (V, H, rows)
        if rows > 1:
            assert not got[1].any()


def test_the_largest_sums_stay_exact():
    """All weights +-127 against activations at the 16-bit extremes, H = 8192: the int32 sums' largest case here
    (exact up to H = 65,536) still equals the int64 reference."""
    q, scale = quantised(64, 8192, seed=1, extreme=True)
    h = torch.full((3, 8192), 2.0)
    h[1] = -2.0
    h[2, ::2] = -2.0
    got = int8_head_cpu.int8_head(h, int8_head_cpu.pack(q, scale))
    assert torch.equal(got, int8_head_cpu.reference(h, q, scale))
    assert got[0, 0] == pytest.approx(2.0 * 127 * 8192 * scale[0].item(), rel=1e-6)


def test_close_to_the_dequantised_weight_in_float64():
    """Every logit within the activations' rounding (half a step of max |h| / 32767 per element, times sum |w|)
    plus fp32 rounding of the exact h @ (q * scale)^T."""
    q, scale = quantised(3000, 192, seed=7)
    h = hidden(5, 192, seed=8, dtype=torch.float32)
    got = int8_head_cpu.int8_head(h, int8_head_cpu.pack(q, scale)).double()
    w = q.double() * scale.double()[:, None]
    exact = h.double() @ w.T
    step = h.double().abs().amax(1, keepdim=True) / 32767
    bound = 0.5 * step * w.abs().sum(1)[None, :] + exact.abs() * 2.0 ** -20 + 1e-9
    assert ((got - exact).abs() <= bound).all()


def test_any_thread_count_gives_the_same_bits():
    q, scale = quantised(20000, 128, seed=3)
    weight = int8_head_cpu.pack(q, scale)
    h = hidden(4, 128, seed=4, dtype=torch.bfloat16)
    before = torch.get_num_threads()
    try:
        outs = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            outs.append(int8_head_cpu.int8_head(h, weight))
    finally:
        torch.set_num_threads(before)
    assert all(torch.equal(o, outs[0]) for o in outs)


def test_runs_on_torchs_openmp_threads():
    """The library's parallel loops run on torch's OpenMP pool (build.py: its libgomp.so.1 is the copy torch
    loaded): with torch's workers started, a multi-threaded call starts no thread of its own. Where the only
    OpenMP runtime mapped is torch's own (GCC's libgomp, as on our machines and in the CPU image), the loops get
    torch's thread count; elsewhere (another compiler's runtime beside it) at most that, and one where two pools
    would compete."""
    torch_dir = os.path.realpath(os.path.dirname(torch.__file__))
    runtimes = {line.split()[-1] for line in open("/proc/self/maps").read().splitlines()
                if cpu._OPENMP_RUNTIME.search(line)}
    if runtimes and all(r.startswith(torch_dir) for r in runtimes):
        assert cpu.openmp_threads() == torch.get_num_threads()
    assert cpu.openmp_threads() in (1, torch.get_num_threads())
    x = torch.randn(256, 256)
    x @ x  # torch's pool up
    before = len(os.listdir("/proc/self/task"))
    q, scale = quantised(4096, 64, seed=9)
    int8_head_cpu.int8_head(hidden(1, 64, seed=9, dtype=torch.float32), int8_head_cpu.pack(q, scale))
    assert len(os.listdir("/proc/self/task")) == before


def _compiled(tmp_path, name: str, flags: tuple[str, ...], source: str = "threads.c") -> ctypes.CDLL | None:
    lib_path = tmp_path / name
    cmd = [build.compiler(), *build.FLAGS, *flags, "-o", str(lib_path), str(build.SOURCE_DIR / source), "-lm"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=build.TIMEOUT_S)
    return ctypes.CDLL(str(lib_path)) if done.returncode == 0 else None


def test_openmp_threads_are_real_threads(tmp_path):
    """The thread count the C passes get (and the start-up log prints) comes from the library itself: built with
    OpenMP wherever the compiler has it, its parallel regions get the threads asked for; the same source built
    without OpenMP gets one, and openmp_threads() would then say 1."""
    plain = _compiled(tmp_path, "plain.so", ())
    assert plain is not None
    plain.openmp_team_size.argtypes, plain.openmp_team_size.restype = [ctypes.c_int64], ctypes.c_int64
    assert plain.openmp_team_size(2) == 1
    with_openmp = _compiled(tmp_path, "openmp.so", ("-fopenmp",))  # what the compiler can do
    if with_openmp is None:  # a compiler without OpenMP: the package's library was built without it too
        assert cpu.openmp_threads() == 1
        return
    with_openmp.openmp_team_size.argtypes = [ctypes.c_int64]
    with_openmp.openmp_team_size.restype = ctypes.c_int64
    assert with_openmp.openmp_team_size(2) == 2
    assert cpu._parallel_library()  # the package's own library too


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="the VNNI path is x86's")
def test_the_plain_c_loops_give_the_same_bits(tmp_path):
    """int8_head.c built without AVX512-VNNI (its portable loops) equals the reference, as the VNNI build does."""
    lib = _compiled(tmp_path, "int8_head_plain.so", ("-mno-avx512vnni",), "int8_head.c")
    assert lib is not None
    fn = lib.int8_head
    fn.argtypes, fn.restype = [ctypes.POINTER(int8_head_cpu._Args)], ctypes.c_int
    q, scale = quantised(1003, 130, seed=5)
    weight = int8_head_cpu.pack(q, scale)
    for dtype in (torch.float32, torch.bfloat16):
        h = hidden(5, 130, seed=6, dtype=dtype)
        out = torch.empty(5, 1003, dtype=dtype)
        args = int8_head_cpu._Args(5, 130, 1003, h.data_ptr(), int(dtype == torch.bfloat16), weight.packed.data_ptr(),
                                   weight.row_sums.data_ptr(), weight.scale.data_ptr(), out.data_ptr(), 1)
        assert fn(ctypes.byref(args)) == 0
        assert torch.equal(out, int8_head_cpu.reference(h, q, scale))


def test_the_draft_head_uses_it_and_falls_back(monkeypatch):
    g = torch.Generator().manual_seed(2)
    w = (torch.randn(500, 64, generator=g) * 0.05).bfloat16()
    head = Int8DraftHead(w)
    assert head.packed is not None and head.takes(C_MAX_ROWS) and not head.takes(C_MAX_ROWS + 1)
    h = torch.randn(3, 64, generator=g).bfloat16()
    c_out = head(h)
    qweight, _ = quantize_rows(w)
    assert torch.equal(c_out, int8_head_cpu.reference(h, qweight, head.packed.scale))  # fp32 scales
    shared = Int8DraftHead(w, head.packed)  # the greedy screen's weights (worker/greedy_screen.py): the same head
    assert shared.packed is head.packed and torch.equal(shared(h), c_out)
    # torch's kernel where the C one does not run: the same logits up to its own roundings (for the shared head
    # its weights are made then)
    monkeypatch.setenv("QNEXT_KERNELS", "reference")
    torch_out = head(h)
    assert not torch.equal(torch_out, c_out)
    assert torch.allclose(torch_out.float(), c_out.float(), atol=0.02, rtol=0.02)
    assert torch.equal(shared(h), torch_out)
    assert Int8DraftHead(w).packed is None and not Int8DraftHead(w).takes(TORCH_MAX_ROWS + 1)
    monkeypatch.setenv("QNEXT_KERNELS", "auto")
    assert Int8DraftHead(w.half()).packed is None  # fp16 rows: torch's kernel


def test_pack_layout():
    """Block b holds vocabulary rows 16b..16b+15, 4 hidden columns per 64 bytes, zero past V and H."""
    q = torch.arange(17 * 6, dtype=torch.int64).remainder(200).sub(100).to(torch.int8).view(17, 6)
    w = int8_head_cpu.pack(q, torch.ones(17))
    assert w.packed.shape == (2, 2, 16, 4)
    assert w.packed[0, 1, 3, 1] == q[3, 5] and w.packed[1, 0, 0, 2] == q[16, 2]
    assert not w.packed[0, 1, :, 2:].any() and not w.packed[1, :, 1:].any()
    assert torch.equal(w.row_sums[:17], q.sum(1, dtype=torch.int32)) and not w.row_sums[17:].any()
