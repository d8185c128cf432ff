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


def test_launch_grid_always_has_three_dims():
    """The compiled launcher reads grid[0..2]; a 1-D or 2-D JIT grid (the sm90 preprocess uses 2-D) must be padded,
    or every direct launch after the first raises IndexError (seen on the H100, 2026-11-25)."""
    import triton.language as tl

    @triton.jit
    def _k(x_ptr, n, BLOCK: tl.constexpr):
        pass

    for grid, want in (((5,), (5, 1, 1)), ((4, 7), (4, 7, 1)), ((2, 3, 4), (2, 3, 4))):
        launch = direct_launch.Launch(_k, 1, grid, (9,), {"BLOCK": 16}, 4, 1)
        assert launch.grid == want


def test_clustered_launch_divides_axis_0_and_sets_the_cluster():
    """A Launch with cluster=n hands Triton's launcher grid[0] / n and the metadata (num_warps, n, shared): the
    launcher then launches n · (grid[0] / n) CTAs in clusters of n along axis 0, so the kernel's program ids
    are those of the unclustered grid."""
    import triton.language as tl

    @triton.jit
    def _k(x_ptr, n, BLOCK: tl.constexpr):
        pass

    launch = direct_launch.Launch(_k, 1, (12, 1, 3), (9,), {"BLOCK": 16}, 4, 1, cluster=4)
    calls = []
    launch.compiled = (lambda *a: calls.append(a), "function0", launch.with_cluster((4, 1, 70000)))
    launch.fast((1234,), 77)
    (call,) = calls
    assert call[:6] == (3, 1, 3, 77, "function0", (4, 4, 70000))
    assert call[9:] == (1234, 9, 16)
    with pytest.raises(RuntimeError, match="num_ctas"):
        launch.with_cluster((4, 2, 70000))
    with pytest.raises(RuntimeError, match="multiple of the cluster"):
        direct_launch.Launch(_k, 1, (10,), (9,), {"BLOCK": 16}, 4, 1, cluster=4)
    plain = direct_launch.Launch(_k, 1, (10,), (9,), {"BLOCK": 16}, 4, 1)
    assert plain.with_cluster((4, 1, 5)) == (4, 1, 5)
