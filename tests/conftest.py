import os

import pytest
import torch

# Triton kernels run on the CPU through the interpreter; the variable must be set before any
# module defining a @triton.jit kernel is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _seed_and_one_thread():
    torch.manual_seed(0)
    # Tiny test models run fastest on one intra-op thread (two spin-wait badly on a busy 2-core machine);
    # set per test because benchmarks and demos under test may change it.
    torch.set_num_threads(1)
