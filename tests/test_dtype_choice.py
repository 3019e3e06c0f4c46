"""`--dtype auto` (worker/dtype_choice.py): the checkpoint's dtype where the device computes it natively."""

import torch

from qnext.worker.dtype_choice import choose_dtype, cpu_flags

CPU, CUDA = torch.device("cpu"), torch.device("cuda")
AVX512_BF16 = frozenset({"avx512f", "avx512_bf16"})
PLAIN_AVX2 = frozenset({"avx2", "fma"})


def test_cpu_with_native_bf16_takes_the_checkpoint_dtype():
    dtype, why = choose_dtype("auto", "bfloat16", CPU, AVX512_BF16)
    assert dtype == torch.bfloat16 and "avx512_bf16" in why
    assert choose_dtype("auto", "bfloat16", CPU, frozenset({"amx_bf16"}))[0] == torch.bfloat16
    assert choose_dtype("auto", "bfloat16", CPU, frozenset({"fp", "asimd", "bf16"}))[0] == torch.bfloat16  # aarch64


def test_cpu_without_native_half_types_runs_float32_and_says_why():
    dtype, why = choose_dtype("auto", "bfloat16", CPU, PLAIN_AVX2)
    assert dtype == torch.float32 and "avx512_bf16" in why
    assert choose_dtype("auto", "float16", CPU, AVX512_BF16)[0] == torch.float32  # bf16 support is not fp16's
    assert choose_dtype("auto", "float32", CPU, AVX512_BF16)[0] == torch.float32


def test_cuda_runs_the_checkpoints_half_type_and_bf16_for_float32_checkpoints():
    assert choose_dtype("auto", "bfloat16", CUDA, frozenset()) == (torch.bfloat16, "auto: the checkpoint's dtype")
    assert choose_dtype("auto", "float16", CUDA, frozenset())[0] == torch.float16
    assert choose_dtype("auto", "float32", CUDA, frozenset())[0] == torch.bfloat16


def test_an_explicit_dtype_is_kept():
    assert choose_dtype("float32", "bfloat16", CPU, AVX512_BF16) == (torch.float32, "--dtype")
    assert choose_dtype("float64", "bfloat16", CUDA, frozenset()) == (torch.float64, "--dtype")


def test_cpu_flags_reads_x86_and_arm_cpuinfo(tmp_path):
    x86 = tmp_path / "x86"
    x86.write_text("processor\t: 0\nflags\t\t: fpu sse avx512_bf16 amx_tile\n\nprocessor\t: 1\n")
    arm = tmp_path / "arm"
    arm.write_text("processor\t: 0\nFeatures\t: fp asimd bf16 i8mm\n")
    assert {"avx512_bf16", "amx_tile"} <= cpu_flags(x86) and "bf16" in cpu_flags(arm)
    assert cpu_flags(tmp_path / "missing") == frozenset()
