"""The C kernels of this package compiled by the machine's C compiler into one shared library, once per source,
compiler and CPU.

The library is built for this CPU (`-march=native`), so the cache key holds the CPU's flags besides the sources,
the compiler's version and the flags: a cache directory shared between machines never hands one the other's
instructions. Builds go to `$QNEXT_CACHE_DIR/cpu-kernels` (default `~/.cache/qnext/cpu-kernels`), written under a
temporary name and renamed, so concurrent processes (a test run, several workers) never load a half-written file;
an unwritable cache falls back to a private temporary directory. `-ffp-contract=off`: every product and sum is
rounded where the C says, whatever the compiler vectorises (decode and verify positions must agree bit for bit).
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

SOURCE_DIR = Path(__file__).resolve().parent
COMPILED = ("deltanet_steps.c", "attention_steps.c", "argmax.c", "norms.c", "moe_hidden.c",
            "int8_head.c", "lm_head.c", "threads.c")  # translation units
SOURCES = (*COMPILED, "deltanet_steps_body.h", "attention_steps_body.h", "norms_body.h", "common.h")  # the cache key
FLAGS = ("-O3", "-march=native", "-ffp-contract=off", "-fno-math-errno", "-std=gnu11", "-shared", "-fPIC")
# Tried first, dropped where the compiler has no OpenMP (the parallel loops then run on the calling thread). With
# GCC the library needs `libgomp.so.1`, which the loader resolves to the copy torch loaded first (a loaded soname is
# reused), so the kernels' parallel loops run on torch's own OpenMP threads: `cpu.openmp_threads()` checks it is so.
OPENMP = "-fopenmp"
COMPILERS = ("cc", "gcc", "clang")
TIMEOUT_S = 120


class BuildError(RuntimeError):
    """No library: no compiler, or it failed (the message says which, with the compiler's own words)."""


def compiler() -> str:
    """$CC, else the first of COMPILERS on PATH."""
    cc = os.environ.get("CC", "").strip()
    found = shutil.which(cc) if cc else next((p for p in map(shutil.which, COMPILERS) if p), None)
    if not found:
        raise BuildError(f"no C compiler ({'$CC=' + cc if cc else ', '.join(COMPILERS)} not found on PATH)")
    return found


def _cpu_identity() -> str:
    """The CPU's instruction-set flags (what -march=native reads), or the machine name where /proc has none."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.machine() + platform.processor()


def _cache_dir() -> Path:
    from qnext.worker.tiny import cache_root  # the embedded checkpoint's cache root; at call time: worker imports us

    path = cache_root() / "cpu-kernels"
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=path, prefix=".probe-")
        probe.close()
        return path
    except OSError:
        return Path(tempfile.mkdtemp(prefix="qnext-cpu-kernels-"))


def library_path() -> Path:
    """The built library for these sources, compiler and CPU: compiled now unless it is in the cache already."""
    cc = compiler()
    try:
        version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as e:
        raise BuildError(f"{cc} --version failed: {e}") from e
    key = hashlib.sha256()
    for name in SOURCES:
        key.update((SOURCE_DIR / name).read_bytes())
    for part in (version, " ".join(FLAGS), OPENMP, _cpu_identity()):
        key.update(part.encode())
    target = _cache_dir() / f"qnext-cpu-kernels-{key.hexdigest()[:16]}.so"
    if target.exists():
        return target
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    for flags in ((*FLAGS, OPENMP), FLAGS):
        cmd = [cc, *flags, "-o", str(tmp), *(str(SOURCE_DIR / name) for name in COMPILED), "-lm"]
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT_S)
        except (OSError, subprocess.SubprocessError) as e:
            raise BuildError(f"{' '.join(cmd)}: {e}") from e
        if done.returncode == 0:
            break
        tmp.unlink(missing_ok=True)
    else:
        raise BuildError(f"{' '.join(cmd)} exited {done.returncode}: {done.stderr.strip()[-2000:]}")
    os.replace(tmp, target)
    return target
