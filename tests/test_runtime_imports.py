import subprocess
import sys


def test_runtime_code_never_imports_transformers():
    code = ("import sys, qnext.worker.loader, qnext.worker.tiny, qnext.worker.model, qnext.worker.sampler, "
            "qnext.worker.fp8, qnext.kernels.moe; "
            "assert 'transformers' not in sys.modules, 'transformers imported at run time'")
    subprocess.run([sys.executable, "-c", code], check=True)
