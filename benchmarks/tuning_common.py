"""What the tuning scripts (tune_forward.py, tune_backward.py) share: the suite rows, the options of a row,
and the per-architecture resource limits used to predict occupancy from a compiled kernel."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fa4.bench.suites import training_cases  # noqa: E402

# Shared memory per block (opt-in maximum) and registers per SM, by compute capability.
SMEM_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448, 100: 232448, 120: 101376}
REGS_PER_SM = 65536


def training_suite(dims, causals):
    """(D, S, B, H, causal) rows of DESIGN.md's training suite, restricted to the given head dims / causal flags."""
    return [(c.D, c.S, c.B, c.H, c.causal) for c in training_cases()
            if c.D in dims and int(c.causal) in {int(x) for x in causals}]


def suite_options(d, causal):
    """The canonical backend keywords of a training-suite row (default scale, causal as window (-1, 0))."""
    return dict(softmax_scale=d ** -0.5, window_left=-1, window_right=0 if causal else -1, softcap=0.0,
                sink=None)
