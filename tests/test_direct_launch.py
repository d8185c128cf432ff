"""The launch-hook guard of the direct launch paths (fa4.kernels.direct_launch, used by decode and the sm90 FAST
plans): idle with Triton's default knobs, busy while a profiler-style hook is installed."""
import pytest

triton = pytest.importorskip("triton")

from fa4.kernels import direct_launch  # noqa: E402


def test_hooks_idle_by_default_and_busy_with_a_hook():
    from triton import knobs
    assert direct_launch.hooks_idle(), "Triton's default (empty) hook chains must count as idle"
    chain = knobs.runtime.launch_enter_hook

    def hook(*args, **kwargs):
        pass

    if hasattr(chain, "add"):  # Triton 3.6: a HookChain
        chain.add(hook)
        try:
            assert not direct_launch.hooks_idle()
        finally:
            chain.remove(hook)
    else:  # older Triton: a plain attribute
        knobs.runtime.launch_enter_hook = hook
        try:
            assert not direct_launch.hooks_idle()
        finally:
            knobs.runtime.launch_enter_hook = None
    assert direct_launch.hooks_idle()


def test_sm90_fast_plans_usable_by_default():
    try:
        from fa4.kernels.sm90 import launch
    except Exception as exc:  # no Gluon in this Triton
        pytest.skip(f"sm90 kernels unavailable: {exc}")
    assert launch.usable()
