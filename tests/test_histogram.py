"""Power-of-two histograms: exact counts, growth without loss, merging, dtypes, ReLU derivation.

Every test runs on the CPU and, when a GPU is present, on CUDA (the ``device`` fixture):
the two binning paths (``bincount`` on the CPU, float64 ``histc`` on CUDA) must agree
bit for bit with the hand-counted expectations.
"""

from __future__ import annotations

import math

import pytest
import torch

from torch_nvdla.calib.histogram import Histogram, HistogramObserver


def _same(a: Histogram, b: Histogram) -> None:
    """Assert two histograms are identical: counts, range, extremes, finiteness, numel."""
    assert a.bins == b.bins
    assert float(a.range) == float(b.range), (float(a.range), float(b.range))
    assert torch.equal(a.counts.cpu(), b.counts.cpu()), _diff(a, b)
    same = lambda u, v: u == v or (math.isnan(u) and math.isnan(v))  # noqa: E731 (NaN: the same NaN extremes)
    assert same(float(a.min), float(b.min)) and same(float(a.max), float(b.max))
    assert bool(a.finite) == bool(b.finite)
    assert a.numel == b.numel


def _diff(a: Histogram, b: Histogram) -> str:
    bad = (a.counts.cpu() != b.counts.cpu()).nonzero().flatten().tolist()
    return f"counts differ in bins {bad[:10]}: {a.counts.cpu()[bad[:10]].tolist()} vs {b.counts.cpu()[bad[:10]].tolist()}"


def _merged(parts: list[torch.Tensor], bins: int = 2048) -> Histogram:
    h = Histogram.of(parts[0], bins)
    for p in parts[1:]:
        h.merge_(Histogram.of(p, bins))
    return h


# -- hand-countable inputs ---------------------------------------------------------------------


def test_hand_counted_bins(device):
    # max|x| = 1.0 -> R = 2 (the smallest power of two strictly above), w = R / bins = 0.5.
    x = torch.tensor([-1.0, -0.75, -0.125, 0.0, 0.125, 0.375, 0.5, 0.875], device=device)
    h = Histogram.of(x, bins=4)
    assert h.device.type == device.type
    assert float(h.range) == 2.0
    # Signed bins: 0:(-2,-1.5] 1:(-1.5,-1] 2:(-1,-0.5] 3:(-0.5,0] 4:[0,0.5) 5:[0.5,1) 6:[1,1.5) 7:[1.5,2)
    assert h.counts.cpu().tolist() == [0, 1, 1, 1, 3, 2, 0, 0]
    counts, edges = h.abs_histogram()
    assert counts.cpu().tolist() == [4, 3, 1, 0]  # |x| bins [0,.5) [.5,1) [1,1.5) [1.5,2)
    assert edges.cpu().tolist() == [0.0, 0.5, 1.0, 1.5, 2.0]
    assert float(h.min) == -1.0 and float(h.max) == 0.875 and h.max_abs() == 1.0
    assert h.numel == 8 and bool(h.finite)


@pytest.mark.parametrize("amax", [0.3, 1.0, 1.5, 3.0, 4.0, 1e-3, 2.0**-20, 12345.0, 3e38])
def test_range_is_smallest_power_of_two_above_max_abs(device, amax):
    for sign in (1.0, -1.0):
        x = torch.tensor([0.0, sign * amax, -sign * amax / 3], device=device)
        h = Histogram.of(x, bins=256)
        expected = 2.0 ** math.frexp(amax)[1]  # amax = m * 2**e, 0.5 <= m < 1
        assert float(h.range) == expected
        assert expected / 2 <= amax < expected
        assert int(h.counts.sum()) == 3


def test_values_at_powers_of_two(device):
    """±2**k with max|x| = 2**k: R = 2**(k+1), both land on the lower edge of the upper half."""
    bins = 8
    x = torch.tensor([4.0, -4.0, 2.0, -2.0], device=device)
    h = Histogram.of(x, bins)
    assert float(h.range) == 8.0  # w = 1
    c = h.counts.cpu()
    assert c[bins + 4] == 1 and c[bins - 1 - 4] == 1  # 4 in [4,5), -4 in (-5,-4]
    assert c[bins + 2] == 1 and c[bins - 1 - 2] == 1  # 2 in [2,3), -2 in (-3,-2]
    assert int(c.sum()) == 4
    abs_counts, edges = h.abs_histogram()
    assert abs_counts.cpu().tolist() == [0, 0, 2, 0, 2, 0, 0, 0]
    assert edges[4] == 4.0 and edges[2] == 2.0


def test_zeros_and_empty(device):
    h = Histogram.of(torch.zeros(7, device=device), bins=16)
    assert h.counts.cpu()[16] == 7 and int(h.counts.sum()) == 7
    assert float(h.range) == 2.0**-126 and h.max_abs() == 0.0
    nz = Histogram.of(torch.tensor([-0.0, 0.0], device=device), bins=16)
    assert nz.counts.cpu()[16] == 2  # -0.0 is not negative
    empty = Histogram.of(torch.empty(0, device=device), bins=16)
    assert empty.numel == 0 and int(empty.counts.sum()) == 0 and empty.max_abs() == 0.0
    _same(empty.clone().merge_(h), h)


def test_negative_values_fold_like_their_magnitudes(device):
    """Negative bins mirror positive ones: x and -x fold into the same |x| bin, edges included."""
    g = torch.Generator().manual_seed(0)
    k = torch.randint(-400, 401, (5000,), generator=g)
    x = (k.float() / 64).to(device)  # many values sit exactly on bin edges
    h, h_abs, h_neg = Histogram.of(x), Histogram.of(x.abs()), Histogram.of(-x)
    assert torch.equal(h.abs_histogram()[0], h_abs.abs_histogram()[0])
    nonzero = x[x != 0]  # (zero stays in bin `bins` under negation: -0.0 is not negative)
    assert torch.equal(Histogram.of(-nonzero).counts, Histogram.of(nonzero).counts.flip(0))
    assert torch.equal(h_neg.abs_histogram()[0], h.abs_histogram()[0])
    # Hand check: -6.25 and 6.25 (R = 8, w = 8/2048) both fold into |x| bin 6.25 / w = 1600.
    two = Histogram.of(torch.tensor([-6.25, 6.25], device=device))
    assert two.abs_histogram()[0].cpu()[1600] == 2


def test_accelerator_binning_path_matches_cpu_path():
    """The sync-free CUDA path (float64 ``histc`` over integer offsets), run here on the CPU."""
    from torch_nvdla.calib.histogram import _count_cpu, _count_device

    g = torch.Generator().manual_seed(6)
    x = torch.cat([torch.randn(3000, generator=g) * 3, torch.randint(-512, 513, (3000,), generator=g) / 64.0,
                   torch.tensor([0.0, -0.0, 7.99, -7.99, 2.0**-140, -(2.0**-140)])])
    base = 2.0 ** math.frexp(float(x.abs().max()))[1]  # the smallest valid range
    for bins in (256, 2048):
        for r in (base, 2 * base, 2.0**20):
            ref = _count_cpu(x, bins, r)
            got = _count_device(x, bins, torch.tensor(r, dtype=torch.float64))
            assert torch.equal(got, ref), (bins, r)
            assert int(got.sum()) == x.numel()
    # fp16 and a tiny range (bins / R is no float32) take the same bins
    tiny = torch.tensor([1e-38, -1e-38, 5e-39, 0.0])
    r = 2.0**-126
    assert torch.equal(_count_device(tiny, 256, torch.tensor(r, dtype=torch.float64)), _count_cpu(tiny, 256, r))
    half = (torch.randn(500, generator=g) * 20).half()  # |x| < 128
    assert torch.equal(_count_device(half, 256, torch.tensor(128.0, dtype=torch.float64)), _count_cpu(half, 256, 128.0))


def test_bins_must_be_a_power_of_two():
    with pytest.raises(ValueError, match="power of two"):
        Histogram.empty(1000)
    with pytest.raises(ValueError, match="cannot merge"):
        Histogram.empty(256).merge_(Histogram.empty(512))


# -- growth, merging, big counts ---------------------------------------------------------------


def test_growth_keeps_every_count_and_equals_one_shot(device):
    g = torch.Generator().manual_seed(1)
    parts = [
        torch.randn(1000, generator=g) * 1e-3,
        (torch.randint(-64, 65, (1000,), generator=g).float() / 128),  # exact edges at every range
        torch.tensor([0.5 - 2.0**-22, -(0.5 - 2.0**-22), 1.0, -1.0, 2.0**-30, -(2.0**-30)]),
        torch.randn(1000, generator=g) * 37,
        torch.tensor([1000.0, -0.0]),
        torch.randn(1000, generator=g) * 1e4,
    ]
    parts = [p.to(device) for p in parts]
    obs = HistogramObserver(bins=2048)
    for p in parts:
        obs.update(p)
    once = Histogram.of(torch.cat(parts))
    assert obs.histogram.numel == sum(p.numel() for p in parts)
    assert int(obs.histogram.counts.sum()) == obs.histogram.numel
    _same(obs.histogram, once)
    _same(_merged(parts), once)
    assert obs.last is not None and obs.last.numel == parts[-1].numel()


def test_rebinned_merges_runs_of_bins(device):
    x = torch.tensor([0.1, 0.2, 0.7, -0.1, -0.9], device=device)
    h = Histogram.of(x, bins=4)  # R = 1, w = 1/4
    assert h.counts.cpu().tolist() == [1, 0, 0, 1, 2, 0, 1, 0]
    up = h.rebinned(torch.tensor(4.0, dtype=torch.float64, device=device))  # k = 2: runs of 4
    assert up.cpu().tolist() == [0, 0, 0, 2, 3, 0, 0, 0]
    at_four = Histogram.of(torch.cat([x, x.new_tensor([3.0])]), bins=4)  # R = 4 directly
    assert at_four.counts.cpu().tolist() == [0, 0, 0, 2, 3, 0, 0, 1]
    # Far beyond the bins' span everything collapses into the two central bins.
    far = h.rebinned(torch.tensor(2.0**40, dtype=torch.float64, device=device))
    assert far.cpu().tolist() == [0, 0, 0, 2, 3, 0, 0, 0]


def test_merge_is_associative_and_commutative(device):
    g = torch.Generator().manual_seed(2)
    a, b, c = (torch.randn(500, generator=g) * s for s in (0.01, 5.0, 300.0))
    ha, hb, hc = (Histogram.of(t.to(device), 1024) for t in (a, b, c))
    left = ha.clone().merge_(hb).merge_(hc)
    right = ha.clone().merge_(hb.clone().merge_(hc))
    swapped = hc.clone().merge_(ha).merge_(hb)
    once = Histogram.of(torch.cat([a, b, c]).to(device), 1024)
    for h in (left, right, swapped):
        _same(h, once)
    # merge_ leaves its argument alone
    _same(hb, Histogram.of(b.to(device), 1024))


def test_counts_exact_past_two_to_the_24(device):
    n = 2**24 + 5
    h = Histogram.of(torch.zeros(n, device=device), bins=256)
    assert int(h.counts[256]) == n and h.numel == n
    ones = Histogram.of(torch.ones(n, device=device), bins=256)
    assert int(ones.counts.sum()) == n and int(ones.counts[256 + 128]) == n  # 1.0 in [1, 1 + 1/128)


def test_merge_many_copies_keeps_int64_counts(device):
    """Counts far beyond float32 (and float64-integer) exactness survive merging."""
    base = Histogram.of(torch.tensor([0.5, -0.25, 3.0], device=device), bins=256)
    state = base.state_dict()
    state["counts"] = state["counts"] * (2**55 + 1)  # 2**55 + 1 is not a float64
    big = Histogram.from_state_dict({**state, "numel": 3 * (2**55 + 1)}, device=device)
    total = big.clone()
    for _ in range(3):
        total.merge_(big)
    assert total.counts.dtype == torch.int64
    assert int(total.counts.sum()) == 4 * 3 * (2**55 + 1)
    assert total.numel == 4 * 3 * (2**55 + 1)


# -- non-finite values, dtypes, layouts ------------------------------------------------------------


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_marks_the_histogram(device, bad):
    x = torch.tensor([1.0, bad, -2.0], device=device)
    h = Histogram.of(x)
    assert not bool(h.finite)
    good = Histogram.of(torch.tensor([0.5], device=device))
    assert bool(good.finite)
    assert not bool(good.clone().merge_(h).finite)
    assert not bool(h.clone().merge_(good).finite)
    obs = HistogramObserver()
    obs.update(torch.ones(3, device=device))
    obs.update(x)
    obs.update(torch.ones(3, device=device))
    assert not bool(obs.histogram.finite)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_low_precision_inputs_count_like_float32(device, dtype):
    g = torch.Generator().manual_seed(3)
    x = (torch.randn(2, 8, 9, 7, generator=g) * 3).to(dtype)
    ref = Histogram.of(x.float().to(device))
    _same(Histogram.of(x.to(device)), ref)


def test_memory_layouts_count_like_contiguous(device):
    g = torch.Generator().manual_seed(4)
    x = torch.randn(3, 5, 6, 7, generator=g).to(device)
    ref = Histogram.of(x)
    cl = x.to(memory_format=torch.channels_last)
    assert not cl.is_contiguous()
    _same(Histogram.of(cl), ref)
    _same(Histogram.of(cl.half()), Histogram.of(x.half().float()))
    _same(Histogram.of(x.transpose(1, 3)), ref)  # any strided view
    _same(Histogram.of(x[:, :, ::2]), Histogram.of(x[:, :, ::2].contiguous()))


# -- ReLU derivation, state ------------------------------------------------------------------------


@pytest.mark.parametrize("scale_neg", [0.5, 1.0, 30.0])
def test_relu_derivation(device, scale_neg):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(4000, generator=g)
    x = torch.where(x < 0, x * scale_neg, x).to(device)
    h = Histogram.of(x)
    derived = h.relu()
    direct = Histogram.of(torch.relu(x))
    assert derived.numel == direct.numel
    assert float(derived.min) == float(direct.min) == 0.0
    assert float(derived.max) == float(direct.max)
    # Same data: equal once on the same grid; identical when the positive side sets the range.
    assert torch.equal(derived.counts, direct.rebinned(derived.range))
    assert h.relu_is_exact() == (float(direct.range) == float(h.range))
    if scale_neg <= 1.0:
        assert h.relu_is_exact()
        _same(derived, direct)
    else:
        assert not h.relu_is_exact()  # negatives 30x larger set the range: finer bins lost


def test_relu_of_all_negative_and_empty(device):
    h = Histogram.of(torch.tensor([-3.0, -1.0], device=device), bins=16)
    r = h.relu()
    assert int(r.counts[16]) == 2 and int(r.counts.sum()) == 2 and r.max_abs() == 0.0
    assert not h.relu_is_exact()
    e = Histogram.empty(16, device).relu()
    assert e.numel == 0 and int(e.counts.sum()) == 0 and Histogram.empty(16).relu_is_exact()


def test_state_dict_round_trip(device):
    x = torch.tensor([-3.5, 0.0, 0.25, 7.0], device=device)
    h = Histogram.of(x, bins=512)
    state = h.state_dict()
    assert state["counts"].device.type == "cpu" and state["bins"] == 512
    back = Histogram.from_state_dict(state, device=device)
    assert back.device.type == device.type
    _same(back, h)
    # Plain Python state (e.g. after JSON) works too.
    plain = {**state, "counts": state["counts"].tolist()}
    _same(Histogram.from_state_dict(plain), h.to("cpu"))
    with pytest.raises(ValueError, match="512 bins"):
        Histogram.from_state_dict({**state, "counts": state["counts"][:10]})
    nan = Histogram.of(torch.tensor([float("nan")], device=device)).state_dict()
    assert nan["finite"] is False


def test_observer_merge_and_reset(device):
    a, b = torch.randn(100, device=device), torch.randn(100, device=device) * 10
    o1, o2 = HistogramObserver(bins=512), HistogramObserver(bins=512)
    o1.update(a)
    o2.update(b)
    o1.merge(o2)
    _same(o1.histogram, Histogram.of(torch.cat([a, b]), 512))
    assert o1.compute("minmax") == Histogram.of(torch.cat([a, b]), 512).max_abs()
    o1.reset()
    assert o1.histogram.numel == 0 and o1.compute("entropy") == 0.0
    fresh = HistogramObserver(bins=512)
    fresh.merge(o2)
    _same(fresh.histogram, o2.histogram)


def test_cpu_binning_paths_agree_on_a_large_tensor():
    """Native and torch CPU binning on more values than one torch chunk (and than one native
    block), with runs of equal values (ReLU zeros) that the native kernel counts in rotation."""
    from torch_nvdla.calib import histogram, native

    if native.kernels is None:
        pytest.skip("the C kernels are not built here (no C compiler at install): torch paths only")
    g = torch.Generator().manual_seed(11)
    x = torch.randn(1_300_001, generator=g).relu_() * 5  # |x| < 64: half zeros
    for dtype in (torch.float32, torch.float64):
        for r in (64.0, 256.0):
            got = histogram._count_cpu_native(x.to(dtype), 2048, r)
            assert torch.equal(got, histogram._count_cpu_torch(x.to(dtype), 2048, r))
            assert int(got.sum()) == x.numel() and int(got[2048]) == int((x < r / 2048).sum())
    # One value a million times: every increment hits one bin of each uint16 sub-histogram,
    # which the kernel must flush before it wraps.
    same = torch.full((1_000_003,), 0.75)
    for threads in (1, 2, 3):  # (split over threads: each part holds more values than one flush)
        c = torch.zeros(512, dtype=torch.int64)
        native.kernels.count(same.data_ptr(), same.numel(), False, 256, 1.0, 256.0, c.data_ptr(), threads)
        assert int(c[256 + 192]) == same.numel() and int(c.sum()) == same.numel()
    strided = x[::3]  # not contiguous: the wrapper makes it so
    assert torch.equal(histogram._count_cpu_native(strided, 256, 64.0), histogram._count_cpu_torch(strided, 256, 64.0))


def test_native_binning_split_over_threads_counts_the_same():
    """The C kernel's parts (one per OpenMP thread) add up to the one-thread counts, for
    float32 and float64 values, a bin count whose scratch is kept between calls and one
    whose scratch is allocated per call; and a thread count of 0 is refused."""
    from torch_nvdla.calib import histogram, native

    if native.kernels is None:
        pytest.skip("the C kernels are not built here (no C compiler at install): torch paths only")
    if not native.kernels.openmp():
        pytest.skip("the C kernels were built without OpenMP here: it runs on one thread")
    g = torch.Generator().manual_seed(5)
    x = torch.randn(700_001, generator=g) * 3  # |x| < 32
    for dtype in (torch.float32, torch.float64):
        v = x.to(dtype)
        for bins in (2048, 1 << 17):
            pre, step = histogram._scaling(bins, 32.0)
            counts = {}
            for threads in (1, 2, 3):
                c = torch.zeros(2 * bins, dtype=torch.int64)
                native.kernels.count(v.data_ptr(), v.numel(), dtype == torch.float64, bins, pre, step,
                                        c.data_ptr(), threads)
                counts[threads] = c
            assert torch.equal(counts[2], counts[1]) and torch.equal(counts[3], counts[1]), (dtype, bins)
            assert int(counts[1].sum()) == x.numel()
            assert torch.equal(counts[1], histogram._count_cpu_torch(v, bins, 32.0))
    with pytest.raises(ValueError, match="threads >= 1"):
        native.kernels.count(x.data_ptr(), x.numel(), False, 2048, 1.0, 64.0, 0, 0)


def test_native_kernel_threads_follow_torch_when_they_share_one_openmp_runtime():
    from torch_nvdla.calib import histogram, native

    if not native.SHARED_OPENMP:
        assert native.threads() == 1
        return
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert native.threads() == 1
        torch.set_num_threads(2)
        assert native.threads() == 2
    finally:
        torch.set_num_threads(before)


def test_openmp_runtimes_are_found_in_a_memory_map():
    """The kernel splits a tensor only when one OpenMP runtime is mapped: torch's libgomp
    (mapped several times) is one; a second runtime beside it makes two."""
    from torch_nvdla.calib.native import openmp_runtimes as _openmp_runtimes

    torch_gomp = "/venv/site-packages/torch/lib/libgomp.so.1"
    lines = [f"7f00-7f10 r-xp 00000000 08:01 42 {torch_gomp}\n", f"7f10-7f20 r--p 00010000 08:01 42 {torch_gomp}\n",
             "7f20-7f30 r-xp 00000000 08:01 43 /usr/lib/libgompish-helper.txt\n",
             "7f30-7f40 rw-p 00000000 00:00 0 \n", "7f40-7f50 r-xp 00000000 08:01 44 /usr/lib/libtorch_cpu.so\n"]
    assert _openmp_runtimes(lines) == {torch_gomp}
    lines.append("7f50-7f60 r-xp 00000000 08:01 45 /opt/intel/lib/libiomp5.so\n")
    assert _openmp_runtimes(lines) == {torch_gomp, "/opt/intel/lib/libiomp5.so"}
    assert _openmp_runtimes(["7f60-7f70 r-xp 0 08:01 46 /usr/lib/x86_64-linux-gnu/libgomp-a34b3233.so.1\n"])


def test_rebinning_merges_runs_of_two_to_the_k_bins():
    """Rebinning to ``2**k`` times the range sends bin ``b`` to ``bins + ((b - bins) >> k)``
    (checked bin by bin with Python integers), for every ``k`` up to past the last run."""
    g = torch.Generator().manual_seed(3)
    for bins in (1, 2, 8, 256):
        for k in range(0, bins.bit_length() + 2):
            h = Histogram(torch.randint(0, 1000, (2 * bins,), generator=g), 4.0, -1.0, 1.0, True, 1)
            expected = [0] * (2 * bins)
            for b, c in enumerate(h.counts.tolist()):
                expected[bins + ((b - bins) >> k)] += c
            assert h.rebinned(torch.tensor(4.0 * 2**k, dtype=torch.float64)).tolist() == expected, (bins, k)


def test_native_extremes_equal_torch_aminmax():
    """The C extremes (integer keys) give torch.aminmax's values for float32 and float64,
    with infinities, NaN of either sign (then both NaN), signed zeros and denormals, on
    one thread and split over several; an empty buffer is refused."""
    from torch_nvdla.calib import native

    if native.kernels is None:
        pytest.skip("the C kernels are not built here (no C compiler at install): torch paths only")
    g = torch.Generator().manual_seed(12)
    cases = [torch.randn(n, generator=g) * 7 for n in (1, 2, 31, 300_001)]
    cases += [torch.tensor(v * 70_000) for v in ([math.inf, 1.0], [-math.inf, 2.0], [-0.0, 0.0], [-0.0],
                                                  [-1e-45, 3e-45], [-3.0, -2.0], [5.0, 4.0])]
    for nan in (math.nan, -math.nan):
        x = torch.randn(200_001, generator=g)
        x[123_456] = nan
        cases.append(x)
    for x in cases:
        for dtype in (torch.float32, torch.float64):
            v = x.to(dtype)
            lo, hi = (float(t) for t in torch.aminmax(v))
            for threads in (1, 2, 3):
                wide = dtype == torch.float64
                got = native.kernels.extremes(v.data_ptr(), v.numel(), wide, threads)
                # The counting pass finds the same extremes.
                counts = torch.empty(2 * 16, dtype=torch.int64)
                also = native.kernels.count(v.data_ptr(), v.numel(), wide, 16, 1.0, 1.0, counts.data_ptr(), threads)
                if math.isnan(lo):
                    assert all(math.isnan(e) for e in got) and all(math.isnan(e) for e in also[:2])
                else:
                    assert got == (lo, hi) == also[:2], (dtype, threads, got, also, (lo, hi))
    with pytest.raises(ValueError, match="n must be >= 1"):
        native.kernels.extremes(cases[0].data_ptr(), 0, False)


def test_native_count_adds_into_a_total_only_when_every_value_fits():
    """``count`` at a guessed range: with every |x| below the range (``|x * pre * step| <
    bins``) its counts are the histogram's at that range and are added into the total;
    with one value on or past the edge, or a NaN, nothing is added (the caller recounts).
    An empty buffer adds zeros and reports (inf, -inf)."""
    from torch_nvdla.calib import native

    if native.kernels is None:
        pytest.skip("the C kernels are not built here (no C compiler at install): torch paths only")
    bins = 8
    for values, fits in (([1.0, -3.99, 0.0], True), ([4.0, 1.0], False), ([1.0, -4.0], False),
                         ([1.0, math.nan], False), ([math.inf], False), ([-0.0, 3.9999], True)):
        for dtype in (torch.float32, torch.float64):
            x = torch.tensor(values, dtype=dtype)
            total = torch.arange(2 * bins, dtype=torch.int64)
            before = total.clone()
            counts = torch.empty(2 * bins, dtype=torch.int64)
            lo, hi, added = native.kernels.count(x.data_ptr(), x.numel(), dtype == torch.float64, bins, 1.0,
                                                 bins / 4.0, counts.data_ptr(), 2, total.data_ptr())
            assert added == fits, (values, dtype)
            if fits:  # the histogram at range 4, added once
                assert torch.equal(counts, Histogram.of(x, bins).rebinned(4.0))
                assert torch.equal(total, before + counts)
                assert (lo, hi) == (float(x.min()), float(x.max()))
            else:
                assert torch.equal(total, before)
    lo, hi, added = native.kernels.count(0, 0, False, bins, 1.0, 1.0, counts.data_ptr(), 1, total.data_ptr())
    assert (lo, hi, added) == (math.inf, -math.inf, True) and int(counts.abs().sum()) == 0


def test_histogram_is_the_same_with_and_without_the_c_kernels(monkeypatch):
    """``Histogram.of`` through the C kernels (extremes and counts) equals the torch path."""
    from torch_nvdla.calib import histogram, native

    if native.kernels is None:
        pytest.skip("the C kernels are not built here (no C compiler at install): torch paths only")
    g = torch.Generator().manual_seed(13)
    xs = [torch.randn(2, 16, 9, 9, generator=g) * 3, torch.randn(300_000, generator=g).relu(),
          torch.randn(50, generator=g, dtype=torch.float64) * 1e-30, torch.randn(4, 4, generator=g).half(),
          torch.tensor([1.5e308, -3.0], dtype=torch.float64), torch.tensor([1.0, math.nan, 2.0])]
    native_hs = [Histogram.of(x) for x in xs]
    # A running total gains a batch at its own range in the counting call, else by a merge.
    totals = [Histogram.of(xs[0]), Histogram.of(xs[0] * 100)]
    for t in totals:
        Histogram._of_native(xs[0].contiguous(), 2048, t)
    monkeypatch.setattr(histogram, "KERNELS", False)
    for x, h in zip(xs, native_hs):
        _same(h, Histogram.of(x))
    for t, scale in zip(totals, (1, 100)):
        _same(t, Histogram.of(torch.cat([xs[0] * scale, xs[0]]).flatten()))


def test_relu_paths_agree_with_and_without_the_c_kernels(monkeypatch):
    """A ReLU's histogram from its input's -- by the C fold or torch, alone or added into a
    running total at the same or another range -- equals the histogram of relu(x) itself;
    ``count`` overwrites whatever its output held."""
    from torch_nvdla.calib import histogram, native

    g = torch.Generator().manual_seed(14)
    parts = [torch.randn(3000, generator=g) * s + 0.5 for s in (1.0, 1.0, 6.0, 0.1)]  # ranges 8, 8, 32, 1
    assert all(Histogram.of(p).relu_is_exact() for p in parts)
    for kernels in ([True, False] if native.kernels is not None else [False]):
        monkeypatch.setattr(histogram, "KERNELS", kernels)
        direct, derived = HistogramObserver(), HistogramObserver()
        for p in parts:
            direct.update(torch.relu(p))
            derived.update_relu_of(Histogram.of(p))
            _same(derived.last, Histogram.of(torch.relu(p)))
        _same(derived.histogram, direct.histogram)
        _same(derived.histogram, Histogram.of(torch.relu(torch.cat(parts))))
    if native.kernels is not None:
        x = torch.randn(1000, generator=g)
        out = torch.full((512,), 7, dtype=torch.int64)
        native.kernels.count(x.data_ptr(), x.numel(), False, 256, 1.0, 256.0 / 8.0, out.data_ptr(), 1)
        assert int(out.sum()) == x.numel()


def test_rebin_add_kernel_equals_torch_rebinning(monkeypatch):
    """The C re-binning (``rebin_add``) adds what the torch path's ``rebinned`` gives, for
    every shift up to past the last run; merges at different ranges agree with and without
    the kernels."""
    from torch_nvdla.calib import histogram, native

    if native.kernels is None:
        pytest.skip("the C kernels are not built here (no C compiler at install): torch paths only")
    g = torch.Generator().manual_seed(15)
    for bins in (1, 2, 8, 256, 2048):
        for k in range(0, bins.bit_length() + 2):
            h = Histogram(torch.randint(0, 1000, (2 * bins,), generator=g), 4.0, -1.0, 1.0, True, 1)
            out = torch.randint(0, 9, (2 * bins,), generator=g)
            want = out + h.rebinned(4.0 * 2**k)
            native.kernels.rebin_add(h.counts.data_ptr(), bins, min(k, bins.bit_length() - 1), out.data_ptr())
            assert torch.equal(out, want), (bins, k)
    parts = [torch.randn(999, generator=g) * s for s in (0.3, 5.0, 1.0, 40.0, 0.01)]
    with_kernels = _merged(parts)
    monkeypatch.setattr(histogram, "KERNELS", False)
    _same(with_kernels, _merged(parts))


# -- the accelerator path, run on the CPU ------------------------------------------------------


def _device_path(x: torch.Tensor, bins: int = 2048) -> Histogram:
    """``Histogram.of`` as an accelerator runs it (tensor scalars, ``histc``), on the CPU."""
    from torch_nvdla.calib.histogram import _flat

    return Histogram._of_device(_flat(x), bins)


def test_accelerator_path_on_the_cpu_equals_the_cpu_path():
    """Without a GPU, the code CUDA runs -- 0-dim tensor scalars, ``histc`` binning, tensor
    merges and re-binning, ReLU folding, the exactness test -- runs on CPU tensors and
    gives the CPU path's histograms bit for bit, mixed merges included."""
    g = torch.Generator().manual_seed(17)
    parts = [torch.randn(4000, generator=g) * s + m for s, m in ((1.0, 0.0), (6.0, 2.0), (0.01, 0.0), (3.0, -5.0))]
    parts += [torch.relu(torch.randn(999, generator=g)), torch.empty(0), torch.randn(50, generator=g).half()]
    for p in parts:
        dev, host = _device_path(p), Histogram.of(p)
        assert not dev._host and host._host
        _same(dev, host)
        assert dev.max_abs() == host.max_abs() and dev.relu_is_exact() == host.relu_is_exact()
        _same(dev.relu(), host.relu())
        assert torch.equal(dev.rebinned(torch.tensor(2.0**10, dtype=torch.float64)), host.rebinned(2.0**10))
    dev, host = _device_path(parts[0]), Histogram.of(parts[0])
    for i, p in enumerate(parts[1:]):
        dev.merge_(_device_path(p))
        host.merge_(Histogram.of(p) if i % 2 else _device_path(p))  # host total, mixed inputs
        _same(dev, host)
    _same(dev, Histogram.of(torch.cat([p.float() for p in parts])))
    bad = torch.tensor([1.0, math.nan])
    assert not bool(_device_path(bad).finite) and not bool(Histogram.of(bad).finite)


def test_calibration_through_the_accelerator_path_gives_the_cpu_table(monkeypatch):
    """A whole calibration with every histogram made by the accelerator path (on the CPU)
    gives the CPU path's table and histograms: ReLU reuse, merges and range picks on tensor
    scalars. (Which batches reuse a histogram may differ: the CPU path bins a batch at its
    running total's range, the accelerator path at the batch's own.)"""
    from torch import nn

    from torch_nvdla import calibrate

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 3), nn.ReLU(),
                          nn.Flatten(), nn.Linear(4 * 4 * 4, 5)).eval()
    with torch.no_grad():
        model[1].running_mean.uniform_(-1, 1)
        model[1].running_var.uniform_(0.5, 2)
    images = [torch.randn(4, 3, 8, 8) * s for s in (1.0, 3.0, 0.5)]
    host = calibrate(model, images, progress=False)
    monkeypatch.setattr(Histogram, "of", classmethod(lambda cls, x, bins=2048: _device_path(x.detach(), bins)))
    dev = calibrate(model, images, progress=False)
    assert dev.amaxes() == host.amaxes() and dev.histograms.keys() == host.histograms.keys()
    for name in host.histograms:
        _same(dev.histograms[name], host.histograms[name])
    assert host.meta["reused"] and dev.meta["reused"], "the model has ReLUs whose histograms are derived"


def test_stacked_abs_histograms_and_scalars_equal_the_one_by_one_ones():
    """``Histogram.abs_histograms`` stacks what ``abs_histogram`` gives each histogram (any
    ranges, CPU and accelerator-path histograms alike): ``counts[bins + j] + counts[bins - 1
    - j]`` and edges ``j * R / bins``; ``scalars()`` gives the attributes' values as Python
    numbers."""
    g = torch.Generator().manual_seed(21)
    xs = [torch.randn(500, generator=g) * s for s in (0.01, 1.0, 300.0)] + [torch.zeros(7)]
    for make in (Histogram.of, _device_path):
        hs = [make(x) for x in xs]
        counts, edges = Histogram.abs_histograms(hs)
        for i, h in enumerate(hs):
            c, e = h.abs_histogram()
            bins, r = h.bins, float(h.range)
            folded = torch.tensor([int(h.counts[bins + j]) + int(h.counts[bins - 1 - j]) for j in range(bins)])
            steps = torch.arange(bins + 1, dtype=torch.float64) * r / bins  # exact: bins is a power of two
            assert torch.equal(counts[i], folded) and torch.equal(c, folded)
            assert torch.equal(edges[i], steps) and torch.equal(e, steps)
            assert h.scalars() == (float(h.range), float(h.min), float(h.max), bool(h.finite))
    assert _device_path(torch.tensor([1.0, math.nan])).scalars()[3] is False
    with pytest.raises(ValueError, match="at least one"):
        Histogram.abs_histograms([])


def test_an_observer_writes_each_batch_into_one_buffer_of_its_own():
    """Hand-countable: on the CPU (C kernels) a settled observer counts every batch into the
    same counts buffer (no allocation per batch), never into a buffer it took from another
    observer, and its ``last`` always holds the latest batch."""
    from torch_nvdla.calib import native

    if not native.KERNELS:
        pytest.skip("the C kernels are not built (or TORCH_NVDLA_KERNELS=torch)")
    producer, copy = HistogramObserver(bins=4), HistogramObserver(bins=4)
    producer.update(torch.tensor([3.0, -1.0]))  # range 4, bin width 1
    copy.update(torch.tensor([0.5]))
    producer.update(torch.tensor([2.5, 2.5, -0.5]))
    buffer = producer.last.counts.data_ptr()
    copy.update_histogram(producer.last)  # (the copy's last is the producer's histogram)
    copy.update(torch.tensor([1.5]))  # counted into a buffer of the copy's own
    assert copy.last.counts.data_ptr() != buffer
    producer.update(torch.tensor([0.5, -3.5]))
    assert producer.last.counts.data_ptr() == buffer
    assert producer.last.counts.tolist() == [1, 0, 0, 0, 1, 0, 0, 0]  # -3.5 in (-4, -3], 0.5 in [0, 1)
    assert producer.histogram.counts.tolist() == [1, 0, 1, 1, 1, 0, 2, 1]
    assert copy.histogram.counts.tolist() == [0, 0, 0, 1, 1, 1, 2, 0]
