"""Test-session set-up shared by every test module.

Without a CUDA device the Triton kernels run under Triton's interpreter. The switch is read when a kernel is
decorated, so it must be set before any fa4 kernel module is imported: conftest runs first.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
