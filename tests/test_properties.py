"""Properties of the streaming histogram (hypothesis).

* Merging is associative and equals the histogram of the concatenated data, exactly.
* Batch sizes and batch order do not matter: the same histogram, hence the same ``amax``
  for every strategy (asserted within one bin width, the promise; it is in fact equal).

The entropy-versus-reference property lives in ``tests/test_strategies.py``.
"""

from __future__ import annotations

import math

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from torch_nvdla.calib.histogram import Histogram, HistogramObserver

BINS = 256  # the smallest a calibration accepts; keeps the examples quick
SETTINGS = settings(max_examples=80, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

# Values that stress the binning: anything float32 holds (subnormals and 3e38 included),
# values exactly on bin edges at many ranges, values a hair below edges, and signed zeros.
_EDGY = [0.0, -0.0, 1.0, -1.0, 0.5, -0.5, 0.5 - 2.0**-22, -(0.5 - 2.0**-22), 2.0**-30, -(2.0**-30),
         1000.0, -1000.0, 3.0e38, -1.0e-40]
values = st.one_of(
    st.floats(width=32, allow_nan=False, allow_infinity=False),
    st.integers(-4096, 4096).map(lambda k: k / 512.0),
    st.integers(-4096, 4096).map(lambda k: k * 0.75),
    st.sampled_from(_EDGY),
    st.floats(min_value=-8.0, max_value=8.0, width=32),
)
batch = st.lists(values, min_size=0, max_size=60)


def _t(xs: list[float], device) -> torch.Tensor:
    return torch.tensor(xs, dtype=torch.float32, device=device)


def _assert_same(a: Histogram, b: Histogram) -> None:
    assert float(a.range) == float(b.range)
    assert torch.equal(a.counts.cpu(), b.counts.cpu())
    assert a.numel == b.numel
    if a.numel:
        assert float(a.min) == float(b.min) and float(a.max) == float(b.max)


@SETTINGS
@given(a=batch, b=batch, c=batch)
def test_merge_is_associative_and_equals_concatenation(device, a, b, c):
    ha, hb, hc = (Histogram.of(_t(x, device), BINS) for x in (a, b, c))
    left = ha.clone().merge_(hb).merge_(hc)
    right = ha.clone().merge_(hb.clone().merge_(hc))
    once = Histogram.of(_t(a + b + c, device), BINS)
    _assert_same(left, right)
    _assert_same(left, once)
    assert int(once.counts.sum()) == len(a) + len(b) + len(c)


@st.composite
def batchings(draw):
    """Data, plus two different ways of cutting a reordering of it into batches."""
    data = draw(st.lists(values, min_size=1, max_size=150))
    order = draw(st.permutations(range(len(data))))
    cuts1 = sorted(draw(st.lists(st.integers(0, len(data)), max_size=6)))
    cuts2 = sorted(draw(st.lists(st.integers(0, len(data)), max_size=6)))
    reordered = [data[i] for i in order]

    def split(xs, cuts):
        bounds = [0, *cuts, len(xs)]
        return [xs[lo:hi] for lo, hi in zip(bounds, bounds[1:])]

    return split(data, cuts1), split(reordered, cuts2)


def _observe(batches: list[list[float]], device) -> HistogramObserver:
    obs = HistogramObserver(bins=BINS)
    for xs in batches:
        obs.update(_t(xs, device))
    return obs


@SETTINGS
@given(cut=batchings())
def test_batch_size_and_order_do_not_change_histogram_or_amax(device, cut):
    first, second = (_observe(b, device) for b in cut)
    _assert_same(first.histogram, second.histogram)
    width = float(first.histogram.range) / BINS
    for method, options in (("minmax", {}), ("entropy", {}), ("percentile", {"percentile": 99.0})):
        a1 = first.compute(method, **options)
        a2 = second.compute(method, **options)
        assert math.isfinite(a1) and abs(a1 - a2) <= width, (method, a1, a2)
    assert first.compute("minmax") == first.histogram.max_abs()


@SETTINGS
@given(xs=batch)
def test_relu_derivation_matches_data_when_exact(device, xs):
    x = _t(xs, device)
    h = Histogram.of(x, BINS)
    direct = Histogram.of(torch.relu(x), BINS)
    derived = h.relu()
    assert derived.numel == direct.numel
    if h.relu_is_exact():
        _assert_same(derived, direct)
    else:  # the same data on a coarser grid
        assert torch.equal(derived.counts, direct.rebinned(derived.range))


@SETTINGS
@given(batches=st.lists(batch, min_size=1, max_size=5), relu=st.booleans(), late=st.integers(0, 4))
def test_a_batch_histogram_stands_in_for_its_data_exactly_when_taken(device, batches, relu, late):
    """A producer's batch histogram (binned at its running total's range on the CPU) stands
    in for the data itself -- a ReLU of it, or a copy -- exactly when the consumer
    ``takes`` it: the consumer's histogram equals one of the data after every batch,
    whether the consumer started with the producer or ``late`` batches after it. A copy of
    the consumer (``chained``) takes the consumer's batch histogram in turn, and a second
    consumer of the producer (``sibling``) comes after both: batch histograms share buffers
    that the next batch writes again, which must not show."""
    producer, consumer, direct, chained, sibling = (HistogramObserver(bins=BINS) for _ in range(5))
    for i, xs in enumerate(batches):
        x = _t(xs, device)
        producer.update(x)
        if i < late:
            continue
        y = torch.relu(x) if relu else x
        direct.update(y)
        for observer, source in ((consumer, producer), (chained, consumer), (sibling, producer)):
            relu_of = relu and source is producer
            if not observer.takes(source.last, relu_of):
                observer.update(y)
            elif relu_of:
                observer.update_relu_of(source.last)
            else:
                observer.update_histogram(source.last)
        for observer in (consumer, chained, sibling):
            _assert_same(observer.histogram, direct.histogram)
    _assert_same(producer.histogram, Histogram.of(_t([v for xs in batches for v in xs], device), BINS))


def test_a_coarse_batch_histogram_is_refused_where_it_would_coarsen_the_total():
    """Hand-countable: after a batch of range 16, a batch with max|x| = 1 is binned at 16 on
    the CPU; a fresh consumer (its own range would be 2) must not take it, a consumer
    already at 16 may, and a ReLU consumer whose data sets range 2 must not either."""
    producer = HistogramObserver(bins=BINS)
    producer.update(torch.tensor([10.0, -1.0]))
    producer.update(torch.tensor([1.0, -0.5, 0.25]))
    last = producer.last
    assert float(last.range) == 16.0 and float(Histogram.of(torch.tensor([1.0, -0.5, 0.25]), BINS).range) == 2.0
    assert int(last.counts.sum()) == 3 and float(producer.histogram.range) == 16.0
    fresh, settled, relu = (HistogramObserver(bins=BINS) for _ in range(3))
    settled.update(torch.tensor([9.0]))
    relu.update(torch.tensor([1.5]))  # relu of the producer's data so far would be at 16: here 2
    assert not fresh.takes(last) and settled.takes(last)
    assert not fresh.takes(last, relu=True) and not relu.takes(last, relu=True)
    settled.update_histogram(last)
    _assert_same(settled.histogram, Histogram.of(torch.tensor([9.0, 1.0, -0.5, 0.25]), BINS))


@SETTINGS
@given(xs=batch)
def test_abs_histogram_is_histogram_of_magnitudes(device, xs):
    x = _t(xs, device)
    counts, edges = Histogram.of(x, BINS).abs_histogram()
    counts_abs, edges_abs = Histogram.of(x.abs(), BINS).abs_histogram()
    assert torch.equal(counts, counts_abs) and torch.equal(edges, edges_abs)
    if xs:  # every |x| lies in its bin [edges[j], edges[j+1])
        mags = x.abs().double().cpu()
        j = torch.searchsorted(edges.cpu(), mags, right=True) - 1
        assert torch.equal(torch.bincount(j, minlength=BINS), counts.cpu())


# -- the two CPU binning paths -----------------------------------------------------------------

_dtypes = st.sampled_from([torch.float32, torch.float64, torch.float16, torch.bfloat16])


@SETTINGS
@given(xs=st.lists(values, min_size=1, max_size=200), dtype=_dtypes, bins=st.sampled_from([1, 2, 256, 2048, 65536]),
       grow=st.integers(0, 3))
def test_native_binning_equals_torch_binning(xs, dtype, bins, grow):
    """The C kernel and the torch operations put every value in the same bin, for every
    dtype, bin count and range (the data's own power of two, or a larger one)."""
    from torch_nvdla.calib import histogram, native

    if native.kernels is None:
        import pytest

        pytest.skip("the C kernels are not built here (no C compiler at install): torch paths only")
    x = torch.tensor(xs, dtype=torch.float32).to(dtype)
    x = x[x.isfinite()]  # (values beyond fp16's range became inf: a histogram never bins those)
    amax = float(x.abs().max()) if x.numel() else 0.0
    r = 2.0 ** (math.frexp(max(amax, 2.0**-127))[1] + grow)
    assert torch.equal(histogram._count_cpu_native(x, bins, r), histogram._count_cpu_torch(x, bins, r))
