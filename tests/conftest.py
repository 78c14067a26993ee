import os

import pytest
import torch

# Triton kernels run on the CPU through the interpreter; the variable must be set before any
# module defining a @triton.jit kernel is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Tiny test models run fastest on one intra-op thread (thread start-up dominates their small kernels).
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
