"""Hot-path operators, one sub-package per op.

Each `kernels/<op>/` holds `reference.py` (plain torch, runs everywhere, the numerical ground truth) and, on
CUDA, a Triton version tested against it. The public function of each op lives in `kernels/<op>/__init__.py`.
"""
