"""Comparing two training steps that should be the same step computed another way.

Two code paths that sum in a different order (one replica or two, BYOL's one region or
hybrid's three in one matrix product, XLA or not) agree only to float32 rounding, and how
much rounding depends on how oneDNN blocks the sums, i.e. on the threads it gets. So
"the same step" is judged against the step itself: each variable's disagreement must be a
small fraction of how far the step moved it, plus an absolute floor for rounding noise.
A real fault (a region weighted 1 % wrongly, a per-replica instead of a global-batch mean)
moves BatchNorm scales and offsets, which LARS updates by plain SGD, by about 1 % of their
step or more (10⁻³ absolute here); rounding is below 10⁻⁶.
"""
import numpy as np


def assert_same_step(before, got, want, *, step_rtol=1e-3, floor=1e-5):
    """Assert ``|got − want| ≤ step_rtol · |want − before|_max + floor`` per variable.

    before: arrays of the variables before the step; got, want: the variables (Keras
    variables or arrays) after it, taken two ways. Biases in front of a BatchNorm have a
    zero gradient in exact arithmetic, so their "step" is rounding noise and only the
    floor applies to them in effect.
    """
    assert len(before) == len(got) == len(want)
    for b0, g, w in zip(before, got, want):
        name = getattr(w, "path", "")
        g, w = np.asarray(g), np.asarray(w)
        moved = float(np.abs(w - b0).max()) if w.size else 0.0
        apart = float(np.abs(g - w).max()) if w.size else 0.0
        assert apart <= step_rtol * moved + floor, (
            f"{name}: the two steps differ by {apart:.3g}, the step moved it by {moved:.3g}")
