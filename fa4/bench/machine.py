"""What the run measured on: card, versions, and the card's two ceilings timed in the same run.

matmul_tflops: a bf16 8192³ product (the tensor-core ceiling that attention's products chase);
copy_gbps: a 1 GiB device-to-device copy, read + write bytes (the memory ceiling that decode chases).
"""
import datetime
import platform
import subprocess

import torch

from .timing import Reps, bench_ms


def driver_version():
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
    except (OSError, subprocess.SubprocessError):
        return None


def describe(device=None):
    """Dict of card, driver and versions; the card fields are None without CUDA."""
    import triton
    cuda = torch.cuda.is_available()
    info = {
        "card": torch.cuda.get_device_name(device) if cuda else None,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "driver": driver_version() if cuda else None,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if cuda else None,
        "capability": ".".join(map(str, torch.cuda.get_device_capability(device))) if cuda else None,
        "sms": torch.cuda.get_device_properties(device).multi_processor_count if cuda else None,
        "python": platform.python_version(),
    }
    try:
        import fa4
        info["fa4"] = getattr(fa4, "__version__", None)
    except Exception:  # the bench reports a broken fa4 later, where it uses it
        info["fa4"] = None
    return info


def matmul_tflops(reps=Reps(20, 100), n=8192):
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    ms = bench_ms(lambda: torch.matmul(a, b), reps)
    return 2 * n ** 3 / ms / 1e9


def copy_gbps(reps=Reps(20, 100), nbytes=1 << 30):
    x = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    ms = bench_ms(lambda: y.copy_(x), reps)
    return 2 * nbytes / ms / 1e6  # read + write bytes; ms -> GB/s
