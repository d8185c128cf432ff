"""The packed forward's dynamic work order (fa4/kernels/sm90/packed_order.py) under Triton's interpreter, and when
the Hopper forward chooses it (attention_fwd.dynamic_units, the FAST plans' flag)."""
import pytest
import torch

triton = pytest.importorskip("triton")

try:
    from fa4.kernels.sm90 import attention_fwd, launch, packed_order
except Exception as exc:  # no Gluon in this Triton
    pytest.skip(f"sm90 kernels unavailable: {exc}", allow_module_level=True)


def _order(counts_from, batch, has_used, block):
    sched = torch.full((1 + batch,), -7, dtype=torch.int32)
    packed_order._longest_first_kernel[(batch,)](counts_from, counts_from, sched, batch, HAS_SEQUSED=has_used,
                                                 BLOCK=block)
    return sched


@pytest.mark.parametrize("batch,block", [(1, 16), (2, 16), (7, 16), (50, 16), (37, 64)])
@pytest.mark.parametrize("has_used", [False, True])
def test_longest_first_is_a_stable_descending_sort(batch, block, has_used):
    """sched[0] = 0 (the counter) and sched[1:] the sequences by key count, most first, ties by index: a
    permutation whatever the lengths (empty sequences and many ties included), computed over several chunks."""
    gen = torch.Generator().manual_seed(batch * 31 + block + has_used)
    counts = torch.randint(0, 6, (batch,), generator=gen, dtype=torch.int32) * 128
    counts[torch.randint(0, batch, (1,), generator=gen)] = 0  # an empty sequence
    if has_used:
        counts_from = counts
    else:
        counts_from = torch.cat([torch.zeros(1, dtype=torch.int32), counts.cumsum(0).to(torch.int32)])
    sched = _order(counts_from, batch, has_used, block)
    want = torch.sort(counts.long(), descending=True, stable=True).indices.to(torch.int32)
    assert sched[0].item() == 0
    assert torch.equal(sched[1:], want), (counts.tolist(), sched.tolist())


def test_sorted_order_for_large_batches_matches_the_ranking():
    """Past MAX_RANKED_BATCH sequences the order comes from torch's stable sort: the same permutation."""
    gen = torch.Generator().manual_seed(9)
    counts = torch.randint(0, 4, (40,), generator=gen, dtype=torch.int32) * 64
    cu = torch.cat([torch.zeros(1, dtype=torch.int32), counts.cumsum(0).to(torch.int32)])
    assert torch.equal(packed_order.sorted_order(counts), _order(cu, 40, False, 16))


def test_dynamic_units_only_for_packed_calls_of_unequal_lengths():
    q = torch.zeros(3 * 100, 4, 64)
    cu3 = torch.tensor([0, 100, 200, 300], dtype=torch.int32)
    assert not attention_fwd.dynamic_units(torch.zeros(2, 100, 4, 64), None, None, None), "batched call"
    assert not attention_fwd.dynamic_units(q[:100], cu3[:2], 100, None), "one sequence"
    assert not attention_fwd.dynamic_units(q, cu3, 100, None), "three of 100 rows each: equal lengths"
    assert attention_fwd.dynamic_units(q[:250], torch.tensor([0, 100, 150, 250], dtype=torch.int32), 100, None)
    assert attention_fwd.dynamic_units(q, cu3, 120, None), "max_seqlen_q above every length: lengths unknown"
    assert attention_fwd.dynamic_units(q, cu3, 100, torch.full((3,), 50, dtype=torch.int32)), "key counts vary"


@pytest.mark.parametrize("varlen,dynamic,want", [(True, True, True), (True, False, False), (False, True, True)])
def test_plan_flags_a_dynamic_launch(varlen, dynamic, want):
    """A FAST plan of a DYNAMIC launch makes a fresh counter (and a packed call's order) every call (_from_plan);
    others reuse the dummy for sched_ptr."""
    names = ["sched_ptr", "trace_ptr", "x"]
    plan = launch.Plan(names, dict(sched_ptr=None, trace_ptr=None), dict(x=1, DYNAMIC=dynamic, VARLEN=varlen), 4,
                       descs=(), tensors=(("sched_ptr", "sched"), ("trace_ptr", "dummy")))
    assert plan.dynamic is want
    dummy, sched = torch.zeros(0, dtype=torch.int32), torch.zeros(3, dtype=torch.int32)
    assert plan.bind(dict(sched=sched, dummy=dummy))[0] is sched


def test_cpu_stand_in_for_ahead_of_time_compiles():
    """aot.py binds CPU tensors: the order is a zero stand-in there, nothing launches."""
    cu = torch.tensor([0, 5, 9], dtype=torch.int32)
    sched = packed_order.longest_first(2, cu, None, cu.device)
    assert sched.shape == (3,) and sched.dtype == torch.int32 and not sched.any()
