import subprocess
import sys


def test_runtime_code_never_imports_transformers():
    code = ("import sys, worker.loader, worker.tiny, worker.model, worker.sampler, worker.fp8, kernels.moe; "
            "assert 'transformers' not in sys.modules, 'transformers imported at run time'")
    subprocess.run([sys.executable, "-c", code], check=True)
