import os
import sys

import torch  # noqa: E402

# Triton decides at @triton.jit time whether a kernel runs in its CPU interpreter, so this must be set before any
# test module imports kernels/ (directly, or through train_images.py). Only where there is no GPU: there the kernel
# tests run on CPU tensors through the interpreter; on a GPU machine the interpreter would also reach the compiled
# training step and CUDA graphs, so it stays off and tests/test_gpu.py tests the kernels on the GPU.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Tests import the scripts as modules from the repository root.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device (tests/test_gpu.py); run with TRITON_INTERPRET=0")
