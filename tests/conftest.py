"""Test-session set-up shared by every test module.

Without a CUDA device the Triton kernels run under Triton's interpreter. The switch is read when a kernel is
decorated, so it must be set before any fa4 kernel module is imported: conftest runs first.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    """FA4_TEST_SHARD=i/n keeps every n-th collected test starting at i, so one file can run in n processes
    side by side on the GPU machine (tests/gpu/run_device.sh), where JIT compilation is the bottleneck."""
    shard = os.environ.get("FA4_TEST_SHARD")
    if not shard:
        return
    index, count = (int(x) for x in shard.split("/"))
    if not 0 <= index < count:
        raise ValueError(f"FA4_TEST_SHARD must be i/n with 0 <= i < n, got {shard!r}")
    kept = [item for position, item in enumerate(items) if position % count == index]
    config.hook.pytest_deselected(items=[item for item in items if item not in kept])
    items[:] = kept
