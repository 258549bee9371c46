"""Tests of torch_nvdla.calib.strategies: entropy, minmax, percentile and mse amax from a histogram.

The entropy search is checked against a slow reference written here (a Python loop over
candidate thresholds that builds P and Q explicitly) and against modelopt's
``_compute_amax_entropy`` when modelopt is installed.
"""

from __future__ import annotations

import math
import time
import warnings

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from torch_nvdla.calib import strategies as _strategies
from torch_nvdla.calib.strategies import (
    STRATEGIES,
    compute_amax,
    entropy_amax,
    entropy_amax_batch,
    minmax_amax,
    mse_amax,
    percentile_amax,
    threshold_to_percentile,
)
from torch_nvdla.errors import CalibrationError

HYPOTHESIS = settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large]
)
KL_TIE = 1e-11  # KL values closer than this are a tie under float64 rounding


# ---------------------------------------------------------------------------------------
# Slow references
# ---------------------------------------------------------------------------------------


def reference_entropy(counts, edges, *, num_levels=128, start_bin=128, stride=1, copy_first_bin=True):
    """The entropy search written out: one candidate at a time, P and Q built explicitly.

    Returns:
        ``(amax, kls)`` with ``kls[i]`` the divergence of candidate ``i`` (empty when the
        search does not run).
    """
    raw = np.asarray(counts, dtype=np.float64)
    e = np.asarray(edges, dtype=np.float64)
    n = raw.size
    if raw.sum() == 0:
        return 0.0, {}
    if n < start_bin:
        return float(e[n]), {}
    c = raw.copy()
    if copy_first_bin and n >= 2:
        c[0] = c[1]
    if c.sum() == 0:
        return float(e[np.nonzero(raw)[0][-1] + 1]), {}
    kls = {}
    for i in range(start_bin, n + 1, stride):
        # Reference: the first i bins, everything beyond folded into bin i - 1.
        p = c[:i].copy()
        p[-1] += c[i:].sum()
        # Candidate: bin j -> level floor(j * L / i); each level's mass spread evenly over
        # its non-empty bins, empty bins stay empty.
        level = (np.arange(i) * num_levels) // i
        nonempty = c[:i] > 0
        level_mass = np.bincount(level, weights=c[:i], minlength=num_levels)
        level_count = np.bincount(level, weights=nonempty.astype(np.float64), minlength=num_levels)
        q = np.zeros(i)
        q[nonempty] = level_mass[level[nonempty]] / level_count[level[nonempty]]
        if q.sum() == 0 or np.any((p > 0) & (q == 0)):
            kls[i] = math.inf
            continue
        pn, qn = p / p.sum(), q / q.sum()
        keep = pn > 0
        kls[i] = math.fsum(pn[keep] * np.log(pn[keep] / qn[keep]))
    best = min(kls.values())
    last_best = max(i for i, kl in kls.items() if kl == best)
    return float(e[last_best]), kls


def reference_qdq_mse(counts, edges, amax, num_bits=8):
    """Mean squared quantize-dequantize error at ``amax``, brute force over the grid.

    Each bin centre goes to the nearest of ``k * s``, ``k = 0..Qmax``; a tie goes to the
    larger ``k`` (round half away from zero), beyond the grid to ``Qmax * s`` (saturation).
    """
    c = np.asarray(counts, dtype=np.float64)
    e = np.asarray(edges, dtype=np.float64)
    x = 0.5 * (e[:-1] + e[1:])
    qmax = 2 ** (num_bits - 1) - 1
    grid = np.arange(qmax, -1, -1) * (amax / qmax)  # descending: argmin's first = larger k
    q = grid[np.argmin(np.abs(x[:, None] - grid[None, :]), axis=1)]
    return float(np.sum(c * (q - x) ** 2) / c.sum())


def bin_of(edges, amax) -> int:
    """The edge index whose value is ``amax``."""
    e = np.asarray(edges, dtype=np.float64)
    i = int(np.searchsorted(e, amax))
    assert e[i] == amax, (amax, e[i])
    return i


def abs_histogram(x: np.ndarray, bins: int = 2048) -> tuple[np.ndarray, np.ndarray]:
    """The |x| histogram as modelopt collects it (histc on [0, max], linspace edges)."""
    t = torch.from_numpy(np.abs(x).astype(np.float32))
    top = float(t.max())
    counts = torch.histc(t, bins=bins, min=0, max=top).to(torch.int64).numpy()
    return counts, torch.linspace(0, top, bins + 1).numpy()


def realistic(kind: str, bins: int, seed: int = 0, n: int = 100_000) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    if kind == "gauss":
        x = rng.normal(size=n)
    elif kind == "laplace":
        x = rng.laplace(size=n)
    elif kind == "student2":
        x = rng.standard_t(2, size=n)
    elif kind == "relu":
        x = np.maximum(rng.normal(size=n), 0.0)
    elif kind == "sparse":
        counts, edges = abs_histogram(rng.laplace(size=n), bins)
        counts[rng.random(bins) < 0.7] = 0
        return counts, edges
    else:
        raise AssertionError(kind)
    return abs_histogram(x, bins)


KINDS = ["gauss", "laplace", "student2", "relu", "sparse"]


@st.composite
def small_histograms(draw, min_bins: int = 128, max_bins: int = 400):
    """Arbitrary |x| histograms: sparse, dense, huge counts, one non-empty bin, bin 0 only."""
    n = draw(st.integers(min_bins, max_bins))
    shape = draw(st.sampled_from(["sparse", "dense", "huge", "single", "bin0", "random"]))
    if shape == "single":
        counts = np.zeros(n, dtype=np.int64)
        counts[draw(st.integers(0, n - 1))] = draw(st.integers(1, 2**40))
    elif shape == "bin0":
        counts = np.zeros(n, dtype=np.int64)
        counts[0] = draw(st.integers(1, 2**40))
    elif shape == "random":
        rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
        x = rng.standard_t(draw(st.sampled_from([1.5, 3.0, 30.0])), size=draw(st.integers(1, 20000)))
        counts = np.histogram(np.abs(x), bins=n)[0].astype(np.int64)
        counts[rng.random(n) < draw(st.floats(0.0, 0.95))] = 0
    else:
        top = {"sparse": 50, "dense": 50, "huge": 2**40}[shape]
        zero_weight = {"sparse": 8, "dense": 1, "huge": 3}[shape]
        element = st.one_of(*([st.just(0)] * zero_weight), st.integers(1, top))
        counts = np.array(draw(st.lists(element, min_size=n, max_size=n)), dtype=np.int64)
    width = draw(st.sampled_from([1.0, 2.0**-7, 0.37, 1e-5]))
    edges = np.arange(n + 1, dtype=np.float64) * width
    return counts, edges


# ---------------------------------------------------------------------------------------
# entropy vs the slow reference
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("bins", [200, 512])
def test_entropy_matches_reference_exactly(kind, bins):
    counts, edges = realistic(kind, bins, seed=bins)
    expected, _ = reference_entropy(counts, edges)
    assert entropy_amax(counts, edges) == expected


def test_entropy_matches_reference_on_2048_bins():
    counts, edges = realistic("laplace", 2048, seed=7)
    expected, _ = reference_entropy(counts, edges, stride=4)
    assert entropy_amax(counts, edges, stride=4) == expected


def _assert_same_or_tie(got, counts, edges, **options):
    expected, kls = reference_entropy(counts, edges, **options)
    if got == expected:
        return
    assert kls, f"got {got}, expected {expected} (no search ran)"
    i = bin_of(edges, got)
    best = min(kls.values())
    assert i in kls and kls[i] <= best + KL_TIE, (got, expected, kls.get(i), best)


@HYPOTHESIS
@given(small_histograms())
def test_entropy_matches_reference_on_arbitrary_histograms(hist):
    counts, edges = hist
    _assert_same_or_tie(entropy_amax(counts, edges), counts, edges)


@HYPOTHESIS
@given(
    small_histograms(min_bins=1, max_bins=300),
    st.integers(1, 200),
    st.integers(1, 7),
    st.sampled_from([1, 2, 3, 16, 100, 128, 256]),
    st.booleans(),
)
def test_entropy_options_match_reference(hist, start_bin, stride, num_levels, copy_first_bin):
    counts, edges = hist
    options = dict(start_bin=start_bin, stride=stride, num_levels=num_levels, copy_first_bin=copy_first_bin)
    _assert_same_or_tie(entropy_amax(counts, edges, **options), counts, edges, **options)


def test_level_of_bin_is_modelopt_digitize():
    """floor(j * 128 / i) is what ``np.digitize(range(i), np.linspace(0, i, 129)) - 1`` gives."""
    for i in range(1, 2200):
        digitized = np.digitize(range(i), np.linspace(0, i, num=129)) - 1
        np.testing.assert_array_equal((np.arange(i) * 128) // i, digitized, err_msg=f"i={i}")


# ---------------------------------------------------------------------------------------
# entropy edge cases
# ---------------------------------------------------------------------------------------


def test_entropy_empty_histogram_is_zero():
    assert entropy_amax(np.zeros(2048, np.int64), np.linspace(0, 1, 2049)) == 0.0
    assert entropy_amax(np.zeros(10, np.int64), np.linspace(0, 1, 11)) == 0.0


def test_entropy_fewer_bins_than_start_bin_returns_last_edge():
    counts = np.arange(100)
    edges = np.linspace(0, 2.5, 101)
    assert entropy_amax(counts, edges) == 2.5


def test_entropy_all_mass_in_bin_zero_falls_back_to_minmax():
    counts = np.zeros(300, np.int64)
    counts[0] = 12345
    edges = np.linspace(0, 3, 301)
    assert entropy_amax(counts, edges) == edges[1]
    # without the zero-bin replacement the one bin is kept as it is: Q == P for all i
    assert entropy_amax(counts, edges, copy_first_bin=False) == edges[-1]


def test_entropy_single_non_empty_bin_keeps_it():
    counts = np.zeros(300, np.int64)
    counts[150] = 7
    edges = np.linspace(0, 3, 301)
    # every i > 150 represents it exactly (KL = 0); the last minimum is i = N
    assert entropy_amax(counts, edges) == 3.0


def test_entropy_huge_counts_scale_invariant():
    counts, edges = realistic("laplace", 512, seed=3)
    scaled = counts * (2**33 + 1)
    assert scaled.max() > 2**24
    assert entropy_amax(scaled, edges) == entropy_amax(counts, edges)
    assert entropy_amax(scaled, edges) == reference_entropy(scaled, edges)[0]


def test_entropy_does_not_modify_its_inputs():
    counts, edges = realistic("gauss", 300)
    counts_f64 = counts.astype(np.float64)
    tensor = torch.from_numpy(counts_f64.copy())
    before = counts_f64.copy()
    entropy_amax(counts_f64, edges)
    entropy_amax(tensor, torch.from_numpy(edges))
    np.testing.assert_array_equal(counts_f64, before)
    np.testing.assert_array_equal(tensor.numpy(), before)


def test_entropy_float_counts_equal_int_counts():
    counts, edges = realistic("student2", 512)
    as_int = entropy_amax(counts, edges)
    assert entropy_amax(torch.from_numpy(counts).float(), torch.from_numpy(edges).float()) == pytest.approx(
        as_int, rel=1e-6
    )
    assert entropy_amax(counts.astype(np.float64), edges) == as_int
    assert entropy_amax(counts.tolist(), edges.tolist()) == as_int


def test_entropy_is_fast():
    counts, edges = realistic("laplace", 2048)
    entropy_amax(counts, edges)  # builds the cached index
    best = min(_timed(lambda: entropy_amax(counts, edges)) for _ in range(5))
    assert best < 0.05, f"entropy_amax took {best * 1e3:.1f} ms on 2048 bins"


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


# ---------------------------------------------------------------------------------------
# entropy vs modelopt
# ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def modelopt_histogram():
    """modelopt's histogram calibrator module (imported once: the import takes seconds)."""
    pytest.importorskip("modelopt.torch.quantization")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from modelopt.torch.quantization.calib import histogram
    return histogram


def _modelopt_entropy(module, counts, edges, **kwargs) -> float:
    # modelopt writes bin 0 of the array it is given (``calib_hist[:]`` is a view): copy.
    return float(module._compute_amax_entropy(np.array(counts, dtype=np.int64), edges, 8, False, **kwargs))


@pytest.mark.parametrize(
    "kind,bins", [(k, 384) for k in KINDS] + [("relu", 2048)]
)
def test_entropy_matches_modelopt(modelopt_histogram, kind, bins):
    counts, edges = realistic(kind, bins, seed=11)
    expected = _modelopt_entropy(modelopt_histogram, counts, edges)  # a float32 edge
    got = entropy_amax(counts, edges)
    assert bin_of(edges, got) == int(np.argmin(np.abs(edges - expected))), (got, expected)


def test_entropy_matches_modelopt_with_stride(modelopt_histogram):
    counts, edges = realistic("laplace", 1024, seed=5)
    expected = _modelopt_entropy(modelopt_histogram, counts, edges, stride=3, start_bin=200)
    assert entropy_amax(counts, edges, stride=3, start_bin=200) == pytest.approx(expected, rel=1e-6)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(small_histograms(max_bins=300))
def test_entropy_matches_modelopt_on_arbitrary_histograms(modelopt_histogram, hist):
    counts, edges = hist
    counts = np.minimum(counts, 2**31)  # modelopt's count check rounds float sums
    replaced = counts.copy()
    replaced[0] = replaced[1]
    # modelopt's NaN path (no kept mass for some candidate) is a documented difference
    assume(replaced[:128].sum() > 0)
    expected = _modelopt_entropy(modelopt_histogram, counts, edges)
    got = entropy_amax(counts, edges)
    if abs(got - expected) <= (edges[1] - edges[0]) * (1 + 1e-9):
        return
    _, kls = reference_entropy(counts, edges)  # otherwise a tie under rounding
    theirs = int(np.argmin(np.abs(edges - expected)))  # modelopt returns a float32 edge
    assert abs(kls[bin_of(edges, got)] - kls[theirs]) <= KL_TIE, (got, expected)


def test_modelopt_differences_are_the_documented_ones(modelopt_histogram):
    edges = np.linspace(0, 3, 301)
    # no mass in the first start_bin bins: modelopt's NaN divergence wins and clips to the
    # lower edge of the data; here those candidates are +inf
    late = np.zeros(300, np.int64)
    late[200:] = 5
    assert _modelopt_entropy(modelopt_histogram, late, edges) == edges[200]
    assert entropy_amax(late, edges) == reference_entropy(late, edges)[0] == edges[300]
    # all mass in bin 0: modelopt returns the last edge through the same NaN path
    bin0 = np.zeros(300, np.int64)
    bin0[0] = 100
    assert _modelopt_entropy(modelopt_histogram, bin0, edges) == edges[300]
    assert entropy_amax(bin0, edges) == edges[1]
    # fewer bins than start_bin: modelopt fails, here the last edge
    with pytest.raises(ValueError):
        _modelopt_entropy(modelopt_histogram, np.ones(100), np.linspace(0, 1, 101))
    assert entropy_amax(np.ones(100), np.linspace(0, 1, 101)) == 1.0
    # modelopt writes c[0] := c[1] into the caller's array
    counts = np.array([9] + [1] * 299, dtype=np.int64)
    modelopt_histogram._compute_amax_entropy(counts, edges, 8, False)
    assert counts[0] == 1


def test_percentile_lower_side_matches_modelopt(modelopt_histogram):
    """Same bin wherever ``p * total / 100`` is not a whole count.

    Where it is (100000 samples, p = 99.99), modelopt's float CDF ``cumsum(c / T)`` lands
    on either side of ``p / 100`` by rounding; the exact integer comparison here does not.
    """
    for kind in KINDS:
        counts, edges = realistic(kind, 2048, seed=2, n=100_003)
        for p in (50.0, 99.0, 99.9, 99.99):
            expected = float(modelopt_histogram._compute_amax_percentile(counts, edges, p))
            assert percentile_amax(counts, edges, p, side="lower") == pytest.approx(expected, rel=1e-6)


# ---------------------------------------------------------------------------------------
# minmax and percentile, by hand
# ---------------------------------------------------------------------------------------


def test_minmax_by_hand():
    edges = np.arange(7.0)
    assert minmax_amax([0, 3, 0, 2, 0, 0], edges) == 4.0
    assert minmax_amax([5, 0, 0, 0, 0, 0], edges) == 1.0
    assert minmax_amax([0, 0, 0, 0, 0, 1], edges) == 6.0
    assert minmax_amax([0, 0, 0, 0, 0, 0], edges) == 0.0


def test_percentile_by_hand():
    counts = [10, 20, 30, 40]  # cumulative 10, 30, 60, 100
    edges = [0.0, 1.0, 2.0, 3.0, 4.0]
    assert percentile_amax(counts, edges, 10) == 1.0  # 10 samples reach 10 %
    assert percentile_amax(counts, edges, 30) == 2.0
    assert percentile_amax(counts, edges, 30.0001) == 3.0
    assert percentile_amax(counts, edges, 60) == 3.0
    assert percentile_amax(counts, edges, 100) == 4.0
    assert percentile_amax(counts, edges, 30, side="lower") == 1.0
    assert percentile_amax(counts, edges, 100, side="lower") == 3.0
    assert percentile_amax([0, 0, 0, 0], edges, 50) == 0.0


def test_percentile_decimal_percentiles_are_exact():
    counts = np.ones(10000, np.int64)
    edges = np.arange(10001.0)
    assert percentile_amax(counts, edges, 99.99) == 9999.0  # 9999 of 10000 samples
    assert percentile_amax(counts, edges, 99.9) == 9990.0
    assert percentile_amax(counts, edges, 100) == minmax_amax(counts, edges)


@pytest.mark.parametrize("bad", [0, 0.0, -1, 100.5, float("nan"), float("inf"), "99", None, True])
def test_percentile_rejects_bad_values(bad):
    with pytest.raises(ValueError, match="percentile") as info:
        percentile_amax([1, 2], [0, 1, 2], bad)
    assert repr(bad) in str(info.value)


def test_percentile_rejects_bad_side():
    with pytest.raises(ValueError, match="side"):
        percentile_amax([1, 2], [0, 1, 2], 50, side="middle")


def test_threshold_to_percentile():
    assert threshold_to_percentile(0.9) == 90.0
    assert threshold_to_percentile(1) == 100.0
    assert threshold_to_percentile(0.29) == 29.0
    assert threshold_to_percentile(0.9999) == 99.99
    counts, edges = np.ones(10, np.int64), np.arange(11.0)
    assert percentile_amax(counts, edges, threshold_to_percentile(0.9)) == 9.0
    for bad in (0, -0.5, 1.5, 90, float("nan"), "0.9"):
        with pytest.raises(ValueError, match="threshold"):
            threshold_to_percentile(bad)


# ---------------------------------------------------------------------------------------
# mse
# ---------------------------------------------------------------------------------------


def test_mse_uniform_is_254_over_255_of_range():
    """Uniform on [0, A]: MSE(a) ~ a s^2 / (12 A) + (A - a)^3 / (3 A), s = a / 127.

    d/da = 0 gives (A - a) = a / 254, i.e. a = 254 A / 255 (rounding noise against
    clipping of the top 0.4 %).
    """
    for bins in (2048, 4096):
        edges = np.linspace(0.0, 3.0, bins + 1)
        amax = mse_amax(np.full(bins, 1000), edges)
        assert abs(amax - 3.0 * 254 / 255) <= edges[1]


def test_mse_picks_the_exact_grid():
    edges = np.linspace(0.0, 2.0, 201)
    counts = np.zeros(200, np.int64)
    counts[126] = 50
    x = 0.5 * (edges[126] + edges[127])  # the bin's centre stands for its samples
    assert mse_amax(counts, edges, candidates=[x / 2, x, 2 * x, 10 * x]) == x
    # 2 bits: grid {0, s}; amax = x puts the centre on the grid
    assert mse_amax(counts, edges, num_bits=2, candidates=[0.5 * x, x, 3 * x]) == x


@pytest.mark.parametrize("kind", ["gauss", "student2", "relu"])
def test_mse_matches_brute_force(kind):
    counts, edges = realistic(kind, 300, seed=4)
    got = mse_amax(counts, edges)
    errors = {i: reference_qdq_mse(counts, edges, edges[i]) for i in range(128, 301)}
    best = min(errors.values())
    assert errors[bin_of(edges, got)] <= best * (1 + 1e-9)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(small_histograms(min_bins=2, max_bins=300), st.sampled_from([2, 3, 8, 9, 10]), st.integers(1, 40))
def test_mse_matches_brute_force_on_arbitrary_histograms(hist, num_bits, start_bin):
    counts, edges = hist
    assume(counts.sum() > 0 and start_bin <= counts.size)
    stride = max(1, (counts.size - start_bin) // 12)  # ~12 candidates keep the reference fast
    got = mse_amax(counts, edges, num_bits=num_bits, start_bin=start_bin, stride=stride)
    errors = {
        i: reference_qdq_mse(counts, edges, edges[i], num_bits)
        for i in range(start_bin, counts.size + 1, stride)
    }
    best = min(errors.values())
    slack = 1e-12 * edges[-1] ** 2  # rounding of the closed form where the best error is ~0
    assert errors[bin_of(edges, got)] <= best * (1 + 1e-9) + slack


def test_mse_cells_equal_bins():
    """The closed form over grid cells equals the bin-by-bin sum."""
    from torch_nvdla.calib.strategies import _sse_by_bins, _sse_by_cells

    counts, edges = realistic("student2", 2048, seed=8)
    c = torch.from_numpy(counts).double()
    e = torch.from_numpy(edges).double()
    x = 0.5 * (e[:-1] + e[1:])
    scales = e[100::7] / 127
    torch.testing.assert_close(_sse_by_cells(c, x, scales, 127), _sse_by_bins(c, x, scales, 127), rtol=1e-9, atol=0)


def test_mse_beats_minmax_on_heavy_tails():
    counts, edges = realistic("student2", 2048, seed=9)
    got = mse_amax(counts, edges)
    top = minmax_amax(counts, edges)
    assert got < top
    assert reference_qdq_mse(counts, edges, got) < reference_qdq_mse(counts, edges, top)


def test_mse_edge_cases():
    edges = np.linspace(0, 1, 201)
    assert mse_amax(np.zeros(200), edges) == 0.0
    assert mse_amax(np.ones(100), np.linspace(0, 1, 101)) == 1.0  # fewer bins than start_bin
    with pytest.raises(ValueError, match="candidates"):
        mse_amax(np.ones(200), edges, candidates=[0.0, -1.0])
    with pytest.raises(ValueError, match="num_bits"):
        mse_amax(np.ones(200), edges, num_bits=1)
    # non-positive candidates are skipped
    assert mse_amax(np.ones(200), edges, candidates=[-1.0, 0.5, 1.0]) in (0.5, 1.0)


# ---------------------------------------------------------------------------------------
# registry, validation, devices
# ---------------------------------------------------------------------------------------


def test_registry_and_dispatch():
    assert set(STRATEGIES) == {"entropy", "minmax", "percentile", "mse"}
    counts, edges = realistic("laplace", 512)
    assert compute_amax("entropy", counts, edges) == entropy_amax(counts, edges)
    assert compute_amax("MinMax", counts, edges) == minmax_amax(counts, edges)
    assert compute_amax("percentile", counts, edges, percentile=99.9) == percentile_amax(counts, edges, 99.9)
    assert compute_amax("mse", counts, edges, stride=8) == mse_amax(counts, edges, stride=8)
    with pytest.raises(ValueError, match="entropy, minmax, mse, percentile"):
        compute_amax("kl", counts, edges)
    with pytest.raises(ValueError, match="percentile"):
        compute_amax("entropy", counts, edges, percentile=99.9)


@pytest.mark.parametrize("strategy", [entropy_amax, minmax_amax, percentile_amax, mse_amax])
def test_bad_shapes_are_rejected(strategy):
    with pytest.raises(ValueError, match="edges"):
        strategy(np.ones(200), np.linspace(0, 1, 200))
    with pytest.raises(ValueError, match="1-D"):
        strategy(np.ones((2, 100)), np.linspace(0, 1, 201))
    with pytest.raises(ValueError, match="empty"):
        strategy(np.ones(0), np.zeros(1))


@pytest.mark.parametrize("option", ["start_bin", "stride", "num_levels"])
@pytest.mark.parametrize("bad", [0, -3, 1.5, True])
def test_entropy_rejects_bad_options(option, bad):
    with pytest.raises(ValueError, match=option):
        entropy_amax(np.ones(200), np.linspace(0, 1, 201), **{option: bad})


@pytest.mark.parametrize("block", [1, 5000, 10**9])
@pytest.mark.parametrize("via_numpy", [True, False])
def test_blocking_and_cpu_paths_do_not_change_results(monkeypatch, block, via_numpy):
    """Row blocks (CPU) vs one block (the GPU layout), numpy vs torch log/searchsorted."""
    counts, edges = realistic("student2", 1024, seed=6)
    calls = [(m, {}) for m in sorted(STRATEGIES)] + [("mse", {"num_bits": 12}), ("entropy", {"stride": 5})]
    expected = [compute_amax(m, counts, edges, **o) for m, o in calls]
    monkeypatch.setattr(_strategies, "_CPU_BLOCK_ELEMENTS", block)
    monkeypatch.setattr(_strategies, "_CPU_VIA_NUMPY", via_numpy)
    got = [compute_amax(m, counts, edges, **o) for m, o in calls]
    assert got == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("method", sorted(STRATEGIES))
def test_same_answer_on_every_device(device, method):
    counts, edges = realistic("relu", 2048, seed=1)
    expected = compute_amax(method, counts, edges)
    on_device = compute_amax(method, torch.from_numpy(counts).to(device), torch.from_numpy(edges).to(device))
    mixed = compute_amax(method, torch.from_numpy(counts).to(device), edges)
    assert isinstance(on_device, float)
    assert on_device == pytest.approx(expected, rel=1e-12)
    assert mixed == pytest.approx(expected, rel=1e-12)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("method", sorted(STRATEGIES))
def test_one_host_read_on_cuda(method):
    counts, edges = realistic("laplace", 2048, seed=1)
    c = torch.from_numpy(counts).cuda()
    e = torch.from_numpy(edges).cuda()
    compute_amax(method, c, e)  # builds cached index tensors
    torch.cuda.synchronize()
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            compute_amax(method, c, e)
    finally:
        torch.cuda.set_sync_debug_mode(previous)
    syncs = [w for w in caught if "synchroniz" in str(w.message).lower()]
    assert len(syncs) <= 1, [str(w.message) for w in syncs]


def test_entropy_batch_is_entropy_of_each_row():
    """``entropy_amax_batch`` picks, bit for bit, what ``entropy_amax`` picks on each row:
    Gaussian, heavy-tailed, sparse, all-zero and zero-bin-only histograms, several ranges
    and option sets."""
    rng = np.random.default_rng(5)
    for n in (2048, 300, 64):
        rows = [np.histogram(np.abs(rng.standard_normal(20000)) * s, n, (0, 4))[0] for s in (0.3, 1.0, 2.5)]
        rows += [np.histogram(np.abs(rng.standard_cauchy(20000)), n, (0, 30))[0],
                 (rng.random(n) < 0.05) * rng.integers(1, 40, n), np.zeros(n, np.int64),
                 np.eye(1, n, 0, dtype=np.int64)[0] * 7]
        counts = torch.tensor(np.array(rows), dtype=torch.int64)
        edges = torch.stack([torch.linspace(0.0, 2.0**k, n + 1, dtype=torch.float64) for k in range(len(rows))])
        for options in ({}, {"start_bin": 1, "num_levels": 7}, {"stride": 3, "copy_first_bin": False}):
            expected = [entropy_amax(counts[i], edges[i], **options) for i in range(len(rows))]
            assert entropy_amax_batch(counts, edges, **options) == expected, (n, options)
    assert entropy_amax_batch(torch.zeros(0, 8), torch.zeros(0, 9)) == []
    with pytest.raises(CalibrationError, match="edges"):
        entropy_amax_batch(torch.zeros(2, 8), torch.zeros(2, 8))


def test_level_sums_kernel_and_torch_tree_give_the_same_bits():
    """The C level sums and the torch binary tree add the same pair-table entries in the
    same order: bit-identical sums, for a power-of-two level count and odd ones (the carried
    last entry); an index outside the table is refused, not read."""
    from torch_nvdla.calib import native

    if native.kernels is None:
        pytest.skip("the C kernels are not built here (no C compiler at install): torch paths only")
    g = torch.Generator().manual_seed(9)
    for rows, pairs, candidates, levels in ((3, 500, 40, 128), (5, 97, 13, 7), (1, 10, 4, 1), (4, 300, 300, 5)):
        table = torch.randn(pairs, rows, generator=g, dtype=torch.float64) * 1e3
        index = torch.randint(0, pairs, (candidates * levels,), generator=g)
        got = torch.empty(candidates, rows, dtype=torch.float64)
        gathered = table[index].view(candidates, levels, rows)
        for threads in (1, 2):
            native.kernels.level_sums(table.data_ptr(), rows, pairs, index.data_ptr(), candidates, levels,
                                      got.data_ptr(), threads)
            assert torch.equal(got, _strategies._tree_sum(gathered)), (rows, pairs, candidates, levels, threads)
            assert torch.equal(got, _strategies._level_sums(table, index, candidates, levels))
            # By hand for one entry: the tree's pairs, not a left-to-right loop.
            v = gathered[candidates - 1, :, rows - 1].tolist()
            while len(v) > 1:
                h = len(v) // 2
                v = [v[j] + v[j + h] for j in range(h)] + v[2 * h:]
            assert float(got[candidates - 1, rows - 1]) == v[0]
    bad = torch.tensor([0, 1, 10], dtype=torch.int64)
    with pytest.raises(ValueError, match="outside the pair table"):
        native.kernels.level_sums(table.data_ptr(), 1, 10, bad.data_ptr(), 1, 3, got.data_ptr(), 1)


def test_entropy_picks_are_the_same_with_and_without_the_c_kernels(monkeypatch):
    """The batched search through the C level sums picks exactly what the torch path picks."""
    from torch_nvdla.calib import native

    if native.kernels is None:
        pytest.skip("the C kernels are not built here (no C compiler at install): torch paths only")
    rows = [realistic(kind, 2048, seed=s) for s, kind in enumerate(KINDS * 3)]
    counts = torch.stack([torch.as_tensor(c, dtype=torch.float64) for c, _ in rows])
    edges = torch.stack([torch.as_tensor(e, dtype=torch.float64) for _, e in rows])
    options = ({}, {"stride": 3, "num_levels": 127}, {"start_bin": 1000, "num_levels": 64})
    with_kernels = [entropy_amax_batch(counts, edges, **o) for o in options]
    monkeypatch.setattr(_strategies, "KERNELS", False)
    assert [entropy_amax_batch(counts, edges, **o) for o in options] == with_kernels


def test_pair_ratios_kernel_and_torch_give_the_same_bits(monkeypatch):
    """The C pair table (mass and clamped mass per non-empty bin of every level bin range)
    equals the torch gathers bit for bit, empty ranges included; a range outside the prefix
    sums is refused."""
    from torch_nvdla.calib import native

    if native.kernels is None:
        pytest.skip("the C kernels are not built here (no C compiler at install): torch paths only")
    g = torch.Generator().manual_seed(10)
    counts = torch.randint(0, 5, (300, 6), generator=g).to(torch.float64) * torch.rand(300, 6, generator=g,
                                                                                          dtype=torch.float64)
    counts[100:180] = 0  # empty ranges: M = 0, n clamped to 1, ratio clamped to tiny
    pad = torch.zeros(1, 6, dtype=torch.float64)
    mass = torch.cat([pad, counts.cumsum(0)])
    nonempty = torch.cat([pad, (counts > 0).to(torch.float64).cumsum(0)])
    index = _strategies._entropy_index(300, 128, 1, 128, torch.device("cpu"))
    got = _strategies._pair_ratios(mass, nonempty, index)
    monkeypatch.setattr(_strategies, "KERNELS", False)
    want = _strategies._pair_ratios(mass, nonempty, index)
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    assert float(got[1].min()) == _strategies._TINY
    bad = torch.tensor([0, 301], dtype=torch.int64)
    out = torch.empty(2, 6, dtype=torch.float64)
    with pytest.raises(ValueError, match="outside the prefix sums"):
        native.kernels.pair_ratios(mass.data_ptr(), nonempty.data_ptr(), 301, 6, bad.data_ptr(), bad.data_ptr(), 2,
                                   _strategies._TINY, out.data_ptr(), out.data_ptr())
