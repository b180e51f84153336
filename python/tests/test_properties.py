"""Property-based: random shapes, conventions, modes and dtypes against the reference (hypothesis)."""
import numpy as np

from conftest import CONVENTIONS, Pair, random_input, require

hypothesis = require("hypothesis")
from hypothesis import given, settings, strategies as st  # noqa: E402


@st.composite
def cases(draw):
    convention = draw(st.sampled_from(CONVENTIONS))
    groups = draw(st.sampled_from([1, 2, 4])) if convention.groups else None
    channels = (groups or 1) * draw(st.integers(1, 4))
    rank = draw(st.integers(2, 5))
    batch = draw(st.integers(1, 4))
    trailing = tuple(draw(st.integers(1, 4)) for _ in range(rank - 2))
    spatial = int(np.prod(trailing)) if trailing else 1
    if groups and (channels // groups) * spatial == 1:
        spatial_fix = True
        trailing = trailing[:-1] + (2,) if trailing else None
        if trailing is None:
            channels *= 2  # two channels per group
    shape = (batch, channels) + (trailing or ())
    batch_stats = "estimate=False" in convention.name or "BatchNorm2d" in convention.name \
        or convention.name == "labml BatchNorm" or "batch statistics" in convention.name
    if batch_stats and batch * int(np.prod(shape[2:], dtype=int)) == 1:
        shape = (2,) + shape[1:]
    return convention, groups, shape, draw(st.sampled_from([np.float32, np.float64])), \
        draw(st.integers(1, 3)), draw(st.booleans()), draw(st.integers(0, 2 ** 31))


@settings(max_examples=120, deadline=None, derandomize=True)  # the same examples every run: CI is not flaky
@given(cases())
def test_random_cases_match_reference(case):
    convention, groups, shape, dtype, steps, then_eval, seed = case
    rng = np.random.default_rng(seed)
    pair = Pair(convention, shape[1], groups, dtype, rng)
    for step in range(steps):
        pair.step(random_input(rng, shape), rng.normal(0.3, 1.0, shape), f"step {step}, shape {shape}")
    if then_eval:
        pair.train(False)
        pair.step(random_input(rng, shape), rng.normal(0.3, 1.0, shape), f"eval, shape {shape}")
