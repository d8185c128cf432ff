"""The check shared by the Gluon launch-plan tests (forward and backward): a cached plan's per-call arguments
must equal what Triton's own binder makes of the same call, specialise the same way, and keep no tensor of
the call that built the plan."""


def assert_plan_matches_binding(plan, kern, fast, bound, spec, binder, opts, *, fresh_descs=(),
                                empty_standins=False):
    """plan: the launch.Plan; fast: its arguments for a later call; bound, spec: the binder's for that call.
    fresh_descs: descriptor parameters built per call (their base is a new tensor, compared by shape only);
    empty_standins: empty tensors may differ by identity (per-call int32 placeholders)."""
    assert list(bound) == kern.arg_names and len(fast) == len(bound)
    for name, got, want in zip(kern.arg_names, fast, bound.values()):
        if hasattr(want, "block_shape"):  # a TensorDescriptor
            assert got.shape == want.shape and got.strides == want.strides, name
            assert got.block_shape == want.block_shape and got.layout == want.layout, name
            if name not in fresh_descs:
                assert got.base is want.base, name
        elif hasattr(want, "data_ptr"):
            if want.numel() or not empty_standins:
                assert got is want, name
        else:
            assert got == want, (name, got, want)
    assert binder(*fast, **opts)[1] == spec
    # The template keeps no tensor of the first call.
    assert not any(hasattr(x, "data_ptr") for x in plan.values)
    assert all(plan.values[i].base is None for i, _ in plan.desc_slots)
