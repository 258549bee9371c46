"""Tests of the NVDLA integer arithmetic (``_requant``) and the compiler's weight formulas (``_weights``)."""

from __future__ import annotations

import json
import math
from fractions import Fraction

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from torch_nvdla.nvdla.requant import (
    INT32_MAX,
    INT32_MIN,
    avgpool_q16,
    fake_quant,
    int8_conv2d,
    int8_linear,
    multiplier_shift,
    multiplier_shift_per_channel,
    pdp_reciprocal,
    quantize,
    requantize,
    rescale_ratio,
    round_half_away,
    saturate,
    saturate_int8,
    saturate_int32,
    shift_right_round,
)
from torch_nvdla.nvdla.weights import (
    QuantizedWeight,
    bias_int16_shift,
    fold_batchnorm,
    quantize_bias,
    quantize_weight,
    save_quantized_weights,
)

FAST = settings(max_examples=150, deadline=None)

# COMPILER_FACTS.md: (layer, S_in, S_out, printed Sw, printed r, golden m, golden t)
GOLDEN = [
    ("conv1", 1 / 127, 0.06, "0.00483075", "0.00063397", 21272, 25),
    ("conv2", 0.06, 0.12, "0.00191125", "0.00095563", 32065, 25),
    ("ip1", 0.12, 0.10, "0.000809228", "0.00097107", 32583, 25),
    ("ip2", 0.10, 0.20, "0.00209765", "0.00104883", 17596, 24),
]


def _exact_round_half_away(num: Fraction) -> int:
    """Reference: round a rational half away from zero."""
    sign = -1 if num < 0 else 1
    a = abs(num)
    return sign * math.floor(a + Fraction(1, 2))


# ------------------------------------------------------------------ golden vector


@pytest.fixture(scope="module")
def lenet(shared_data):
    path = shared_data / "caffe-lenet-mnist" / "lenet_iter_10000.npz"
    if not path.is_file():
        pytest.skip(f"{path} not found")
    with np.load(path) as d:
        return {k: d[k] for k in d.files}


@pytest.mark.parametrize("layer,s_in,s_out,sw_txt,r_txt,m_gold,t_gold", GOLDEN)
def test_golden_vector_from_real_weights(lenet, layer, s_in, s_out, sw_txt, r_txt, m_gold, t_gold):
    qw = quantize_weight(torch.from_numpy(lenet[f"{layer}.weight"]), "per-kernel", name=layer)
    sw = float(qw.scale)
    assert sw == pytest.approx(float(np.abs(lenet[f"{layer}.weight"]).max()) / 127, rel=1e-7)
    assert f"{sw:.6g}" == sw_txt  # the value printed in COMPILER_FACTS.md
    r = rescale_ratio(s_in, sw, s_out)
    # The printed r values are rounded; conv1's "6.3397e-4" is really 6.33957e-4 (the table's last
    # digit is one unit high). The register values below are what must match exactly.
    assert r == pytest.approx(float(r_txt), rel=3e-5)
    assert multiplier_shift(r) == (m_gold, t_gold)
    # the compiler's own float32 evaluation gives the same register values
    r32 = rescale_ratio(s_in, sw, s_out, float32=True)
    assert multiplier_shift(r32, float32=True) == (m_gold, t_gold)


@pytest.mark.parametrize("layer,s_in,s_out,sw_txt,r_txt,m_gold,t_gold", GOLDEN)
def test_golden_vector_from_printed_ratios(layer, s_in, s_out, sw_txt, r_txt, m_gold, t_gold):
    assert multiplier_shift(float(r_txt)) == (m_gold, t_gold)


def test_basic_profile_unit_rescale():
    # COMPILER_FACTS.md: the basic profile's extra ip1 -> relu1 SDP with ratio 1 is 16384 >> 14
    assert multiplier_shift(1.0) == (16384, 14)


@pytest.mark.parametrize("layer,s_in,s_out,sw_txt,r_txt,m_gold,t_gold", GOLDEN)
def test_real_weights_quantize_within_half_step(lenet, layer, s_in, s_out, sw_txt, r_txt, m_gold, t_gold):
    w = torch.from_numpy(lenet[f"{layer}.weight"])
    pk = quantize_weight(w, "per-kernel")
    pf = quantize_weight(w, "per-filter")
    assert pk.q.dtype == torch.int8 and pf.q.dtype == torch.int8
    assert pf.scale.shape == (w.shape[0],) and pk.scale.shape == ()
    assert torch.all(pf.scale <= pk.scale)
    assert int(pk.q.abs().max()) == 127
    assert pk.max_abs_error <= float(pk.scale) / 2 * (1 + 1e-5)
    assert pf.max_abs_error <= pk.max_abs_error * (1 + 1e-5)
    rs = [rescale_ratio(s_in, float(s), s_out) for s in pf.scale]
    m, t = multiplier_shift_per_channel(rs)
    assert t == t_gold  # the largest filter scale is the layer's
    assert int(m.max()) == m_gold
    b_q = quantize_bias(torch.from_numpy(lenet[f"{layer}.bias"]), s_in, pk.scale)
    assert b_q.dtype == torch.int32
    assert bias_int16_shift(b_q)[1] == 0  # LeNet's biases fit int16 directly


# ------------------------------------------------------------------ multiplier / shift


@pytest.mark.parametrize("bad", [0.0, -1e-3, float("nan"), float("inf"), -float("inf"), 1e30, 1e-30, 2.0**15])
def test_multiplier_shift_rejects_unrepresentable(bad):
    with pytest.raises(ValueError, match="r="):
        multiplier_shift(bad)


def test_multiplier_shift_range_edges():
    assert multiplier_shift(2.0**-49) == (16384, 63)
    assert multiplier_shift(math.nextafter(2.0**15, 0)) == (32767, 0)
    with pytest.raises(ValueError, match=r"out of range \[0,63\]"):
        multiplier_shift(math.nextafter(2.0**-49, 0))
    assert multiplier_shift(2.0**-10) == (16384, 24)  # exact powers of two: m = 2^14


@FAST
@given(st.floats(min_value=-49.0, max_value=14.999999, allow_nan=False))
def test_multiplier_shift_relative_error(log2r):
    r = 2.0**log2r
    m, t = multiplier_shift(r)
    assert 2**14 <= m < 2**15 and 0 <= t <= 63
    approx = Fraction(m, 2**t)
    err = Fraction(r) - approx
    assert 0 <= err < Fraction(1, 2**t)
    assert err / Fraction(r) < Fraction(1, 2**14)


def test_multiplier_shift_per_channel_hand():
    m, t = multiplier_shift_per_channel([1.0, 0.5, 0.25, 0.75])
    assert t == 14
    assert m.tolist() == [16384, 8192, 4096, 12288]
    m, t = multiplier_shift_per_channel(torch.tensor([3e-4, 6.3397e-4]))
    assert (int(m[1]), t) == multiplier_shift(6.3397e-4)
    assert int(m[0]) == math.trunc(3e-4 * 2**t)


def test_multiplier_shift_per_channel_errors():
    with pytest.raises(ValueError, match=r"channel 1.*underflows"):
        multiplier_shift_per_channel([1.0, 1e-6])
    with pytest.raises(ValueError, match=r"r\[2\]"):
        multiplier_shift_per_channel([1.0, 0.5, 0.0])
    with pytest.raises(ValueError, match="empty"):
        multiplier_shift_per_channel([])


# ------------------------------------------------------------------ rounding / saturation / requantize


def test_round_half_away_hand():
    x = torch.tensor([0.5, -0.5, 1.5, -1.5, 2.5, -2.5, 0.49999997, -0.49999997, 2.4, -2.6, 0.0])
    assert round_half_away(x).tolist() == [1, -1, 2, -2, 3, -3, 0, 0, 2, -3, 0]
    tricky = torch.tensor([0.49999999999999994, -0.49999999999999994], dtype=torch.float64)
    assert round_half_away(tricky).tolist() == [0.0, 0.0]  # floor(|x| + 0.5) would give 1
    for dt in (torch.float16, torch.bfloat16):
        y = round_half_away(torch.tensor([0.5, -1.5, 2.5], dtype=dt))
        assert y.dtype == dt and y.tolist() == [1, -2, 3]
    ints = torch.tensor([3, -4])
    assert torch.equal(round_half_away(ints), ints)


def test_saturate_helpers():
    x = torch.tensor([-(2**40), -129, -128, 0, 127, 128, 2**40])
    assert saturate_int8(x).tolist() == [-128, -128, -128, 0, 127, 127, 127]
    assert saturate_int32(x).tolist() == [INT32_MIN, -129, -128, 0, 127, 128, INT32_MAX]
    assert saturate(x, -5, 5).dtype == x.dtype
    with pytest.raises(ValueError):
        saturate(x, 1, 0)


def test_shift_right_round_hand():
    v = torch.tensor([1, -1, 3, -3, 5, -5, 2, -2, 7, -7])
    assert shift_right_round(v, 1).tolist() == [1, -1, 2, -2, 3, -3, 1, -1, 4, -4]  # +-0.5, +-1.5, +-2.5
    assert shift_right_round(v, 0).tolist() == v.tolist()
    assert shift_right_round(torch.tensor([6, -6, 5, -5]), 2).tolist() == [2, -2, 1, -1]  # 1.5, 1.25
    # no overflow near 2^63: (2^62 + 2^62) would wrap if the half LSB were added
    assert shift_right_round(torch.tensor([2**62, -(2**62), 2**62 - 1]), 63).tolist() == [1, -1, 0]
    assert shift_right_round(v, torch.tensor([1, 1, 1, 1, 1, 1, 0, 0, 2, 2])).tolist() == [1, -1, 2, -2, 3, -3, 2, -2, 2, -2]


def test_requantize_hand_cases(device):
    acc = torch.tensor([1, -1, 3, -3, 5, -5, 1000, -1000, 2**40, -(2**40)], device=device)
    y = requantize(acc, 1, 1, channel_dim=0)
    assert y.dtype == torch.int8 and y.device.type == device.type
    # +-0.5 -> +-1, +-1.5 -> +-2, +-2.5 -> +-3; saturation at both ends (after the int32 saturation)
    assert y.tolist() == [1, -1, 2, -2, 3, -3, 127, -128, 127, -128]
    # golden conv1 converter: 21272 >> 25 on a realistic accumulator
    acc = torch.tensor([12345, -12345, 0], device=device)
    exp = [_exact_round_half_away(Fraction(a * 21272, 2**25)) for a in (12345, -12345, 0)]
    assert requantize(acc, 21272, 25, channel_dim=0).tolist() == exp
    # offset
    assert requantize(torch.tensor([10], device=device), 1, 0, channel_dim=0, offset=4).tolist() == [6]


def test_requantize_per_channel(device):
    acc = torch.tensor([[[100, -100]], [[100, -100]], [[100, -100]]], device=device).reshape(1, 3, 1, 2)
    m = torch.tensor([16384, 8192, 24576])  # 0.5, 0.25, 0.75 with t = 15
    y = requantize(acc, m, 15, channel_dim=1)
    assert y.reshape(3, 2).tolist() == [[50, -50], [25, -25], [75, -75]]
    with pytest.raises(ValueError, match="3 channels"):
        requantize(acc, torch.tensor([1, 2]), 15, channel_dim=1)
    with pytest.raises(ValueError, match="int16"):
        requantize(acc, 40000, 15)


@FAST
@given(
    acc=st.lists(st.integers(INT32_MIN, INT32_MAX), min_size=1, max_size=20),
    m=st.integers(-(2**15), 2**15 - 1),
    t=st.integers(0, 63),
)
def test_requantize_matches_rational_reference(acc, m, t):
    y = requantize(torch.tensor(acc), m, t, channel_dim=0)
    exp = [max(-128, min(127, _exact_round_half_away(Fraction(a * m, 2**t)))) for a in acc]
    assert y.tolist() == exp


# ------------------------------------------------------------------ exact int8 conv / linear


def _conv_ref_int64(x, w, b, stride, padding, dilation, groups):
    """Obviously-correct reference: unfold + int64 matmul per group."""
    n, c, h, wd = x.shape
    k, cg, kh, kw = w.shape
    xp = F.pad(x.to(torch.float64), (padding, padding, padding, padding))
    cols = F.unfold(xp, (kh, kw), dilation=dilation, stride=stride).to(torch.int64)  # (N, C*kh*kw, L)
    oh = (h + 2 * padding - dilation * (kh - 1) - 1) // stride + 1
    ow = (wd + 2 * padding - dilation * (kw - 1) - 1) // stride + 1
    kg = k // groups
    outs = []
    for g in range(groups):
        cg_cols = cols[:, g * cg * kh * kw : (g + 1) * cg * kh * kw, :]
        wg = w[g * kg : (g + 1) * kg].reshape(kg, -1).to(torch.int64)
        outs.append(torch.einsum("kc,ncl->nkl", wg, cg_cols))
    out = torch.cat(outs, 1).reshape(n, k, oh, ow)
    if b is not None:
        out = out + b.to(torch.int64).reshape(1, -1, 1, 1)
    return out.clamp(INT32_MIN, INT32_MAX)


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    groups=st.sampled_from([1, 2]),
    stride=st.integers(1, 2),
    padding=st.integers(0, 2),
    dilation=st.integers(1, 2),
    with_bias=st.booleans(),
)
def test_int8_conv2d_matches_int64_reference(seed, groups, stride, padding, dilation, with_bias):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(-128, 128, (2, 4, 7, 6), generator=g, dtype=torch.int64).to(torch.int8)
    w = torch.randint(-128, 128, (6, 4 // groups, 3, 2), generator=g, dtype=torch.int64).to(torch.int8)
    b = torch.randint(INT32_MIN, INT32_MAX, (6,), generator=g, dtype=torch.int64).to(torch.int32) if with_bias else None
    got = int8_conv2d(x, w, b, stride, padding, dilation, groups)
    ref = _conv_ref_int64(x, w, b, stride, padding, dilation, groups)
    assert got.dtype == torch.int64
    assert torch.equal(got, ref)


def test_int8_conv2d_on_device(device):
    g = torch.Generator().manual_seed(0)
    x = torch.randint(-128, 128, (1, 20, 12, 12), generator=g).to(torch.int8)
    w = torch.randint(-128, 128, (50, 20, 5, 5), generator=g).to(torch.int8)
    b = torch.randint(-(2**20), 2**20, (50,), generator=g).to(torch.int32)
    ref = _conv_ref_int64(x, w, b, 1, 0, 1, 1)
    got = int8_conv2d(x.to(device), w.to(device), b.to(device))
    assert got.device.type == device.type
    assert torch.equal(got.cpu(), ref)


def test_int8_linear_matches_reference_and_saturates(device):
    g = torch.Generator().manual_seed(1)
    x = torch.randint(-128, 128, (3, 800), generator=g).to(torch.int8)
    w = torch.randint(-128, 128, (10, 800), generator=g).to(torch.int8)
    b = torch.randint(-1000, 1000, (10,), generator=g).to(torch.int32)
    ref = x.to(torch.int64) @ w.to(torch.int64).T + b.to(torch.int64)
    assert torch.equal(int8_linear(x.to(device), w.to(device), b.to(device)).cpu(), ref)
    k = 140_000  # 128 * 127 * k > 2^31: both sums must saturate to int32
    xs = torch.full((1, k), -128, dtype=torch.int8, device=device)
    wp = torch.full((2, k), -128, dtype=torch.int8, device=device)
    wp[1] = 127
    assert int8_linear(xs, wp).tolist() == [[INT32_MAX, INT32_MIN]]


def test_int8_ops_reject_non_int8_values():
    with pytest.raises(ValueError, match=r"\[-128, 127\]"):
        int8_linear(torch.tensor([[200.0]]), torch.tensor([[1]]))
    with pytest.raises(ValueError, match="integer"):
        int8_linear(torch.tensor([[0.5]]), torch.tensor([[1]]))


# ------------------------------------------------------------------ average pooling


def _pdp_ref(window_sum: int, kh: int, kw: int) -> int:
    u = _exact_round_half_away(Fraction(window_sum * (2**16 // kw), 2**16))
    return _exact_round_half_away(Fraction(u * (2**16 // kh), 2**16))


def test_pdp_reciprocal_table():
    # nvdla/sw kmd/firmware/pdp.c recip_kernel_size (INT8/INT16 row)
    assert [pdp_reciprocal(k) for k in range(1, 9)] == [0x10000, 0x8000, 0x5555, 0x4000, 0x3333, 0x2AAA, 0x2492, 0x2000]
    with pytest.raises(ValueError):
        pdp_reciprocal(9)


def test_avgpool_q16_hand(device):
    x = torch.tensor([[-128, -128, 1, 2], [-128, -125, 1, 2]], dtype=torch.int8, device=device).reshape(1, 1, 2, 4)
    y = avgpool_q16(x, 2)
    assert y.dtype == torch.int8
    # S = -509 (mean -127.25): -254.5 -> -255, -127.5 -> -128 (double rounding); S = 6: 3 -> 1.5 -> 2
    assert y.reshape(-1).tolist() == [-128, 2]


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    kernel=st.integers(1, 4),
    stride=st.integers(1, 3),
    padding=st.integers(0, 1),
)
def test_avgpool_q16_matches_reference(seed, kernel, stride, padding):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(-128, 128, (1, 2, 6, 7), generator=g).to(torch.int8)
    y = avgpool_q16(x, kernel, stride, padding)
    xp = F.pad(x.to(torch.int64), (padding,) * 4)
    oh = (6 + 2 * padding - kernel) // stride + 1
    ow = (7 + 2 * padding - kernel) // stride + 1
    assert y.shape == (1, 2, oh, ow)
    for c in range(2):
        for i in range(oh):
            for j in range(ow):
                s = int(xp[0, c, i * stride : i * stride + kernel, j * stride : j * stride + kernel].sum())
                assert int(y[0, c, i, j]) == _pdp_ref(s, kernel, kernel)


# ------------------------------------------------------------------ quantize / fake_quant


def test_quantize_hand_and_saturation():
    s = 0.25
    x = torch.tensor([0.125, -0.125, 0.375, -0.375, 1000.0, -1000.0, float("inf"), 31.75, -32.0])
    q = quantize(x, s)
    assert q.dtype == torch.int8
    assert q.tolist() == [1, -1, 2, -2, 127, -128, 127, 127, -128]
    with pytest.raises(ValueError, match="NaN"):
        quantize(torch.tensor([float("nan")]), s)
    assert torch.isnan(fake_quant(torch.tensor([float("nan")]), s)).all()
    for bad in (0.0, -1.0, float("inf")):
        with pytest.raises(ValueError, match="scale"):
            quantize(x, bad)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_fake_quant_dtypes_and_per_channel(dtype, device):
    x = torch.tensor([[0.3, -0.3, 1.0], [3.0, -3.0, 10.0]], dtype=dtype, device=device)
    scale = torch.tensor([1 / 127, 10 / 127])
    y = fake_quant(x, scale, axis=0)
    assert y.dtype == dtype and y.device.type == device.type
    ref = torch.clamp(torch.round(x.double().cpu() / scale.double().reshape(2, 1)), -128, 127) * scale.double().reshape(2, 1)
    assert torch.allclose(y.double().cpu(), ref, atol=1e-2)
    q = quantize(x, scale, axis=0)
    assert q.tolist() == [[38, -38, 127], [38, -38, 127]]
    with pytest.raises(ValueError, match="axis"):
        quantize(x, scale)


@FAST
@given(
    amax=st.floats(1e-6, 1e6),
    frac=st.lists(st.floats(-1.0, 1.0), min_size=1, max_size=32),
)
def test_fake_quant_error_at_most_half_step(amax, frac):
    scale = amax / 127
    x = torch.tensor(frac, dtype=torch.float64) * amax
    y = fake_quant(x, scale)
    assert float((y - x).abs().max()) <= scale / 2 * (1 + 1e-12)
    x32 = x.to(torch.float32)
    y32 = fake_quant(x32, scale)
    assert float((y32.double() - x32.double()).abs().max()) <= scale / 2 * (1 + 1e-5) + 1e-30


# ------------------------------------------------------------------ weights


def test_quantize_weight_per_kernel_hand():
    w = torch.tensor([[127.0, -2.5, 2.5, -0.5], [63.5, -1.25, 0.25, 0.0]])
    qw = quantize_weight(w, "per-kernel")
    assert isinstance(qw, QuantizedWeight) and qw.mode == "per-kernel"
    assert float(qw.scale) == 1.0 and qw.scale.dim() == 0
    # floor(x + 0.5): -2.5 -> -2 (not -3), 2.5 -> 3, -0.5 -> 0, 63.5 -> 64, -1.25 -> -1, 0.25 -> 0
    assert qw.q.tolist() == [[127, -2, 3, 0], [64, -1, 0, 0]]
    assert qw.max_abs_error == 0.5


def test_quantize_weight_per_filter_hand():
    w = torch.tensor([[127.0, -2.5, 2.5, -0.5], [63.5, -1.25, 0.25, 0.0]])
    qw = quantize_weight(w, "per_filter")
    assert qw.mode == "per-filter"
    assert qw.scale.tolist() == [1.0, 0.5]
    # filter 1 at scale 0.5: 127, -2.5 -> -2, 0.5 -> 1, 0
    assert qw.q.tolist() == [[127, -2, 3, 0], [127, -2, 1, 0]]
    assert qw.max_abs_error == 0.5


def test_quantize_weight_zero_filters_and_errors():
    w = torch.tensor([[0.0, 0.0], [1.0, -1.0]])
    qw = quantize_weight(w, "per-filter")
    assert qw.scale.tolist() == pytest.approx([1 / 127, 1 / 127])
    assert qw.q.tolist() == [[0, 0], [127, -127]]
    z = quantize_weight(torch.zeros(3, 2, 1, 1), "per-filter")
    assert torch.all(z.scale > 0) and torch.all(torch.isfinite(z.scale))
    assert z.q.abs().max() == 0 and z.max_abs_error == 0.0
    with pytest.raises(ValueError, match="'convX'.*non-finite"):
        quantize_weight(torch.tensor([[1.0, float("nan")]]), name="convX")
    with pytest.raises(ValueError, match="mode"):
        quantize_weight(w, "per-channel")


def test_quantize_bias_hand():
    b = torch.tensor([1.0, -1.0, 0.3, 0.0625, -0.0625, 1e12, -1e12])
    q = quantize_bias(b, 0.5, 0.25)
    assert q.dtype == torch.int32
    # denominator 0.125; ties go up: 0.5 -> 1, -0.5 -> 0; saturation to int32
    assert q.tolist() == [8, -8, 2, 1, 0, INT32_MAX, INT32_MIN]
    qf = quantize_bias(torch.tensor([1.0, 1.0]), 0.5, torch.tensor([0.25, 0.5]))
    assert qf.tolist() == [8, 4]
    with pytest.raises(ValueError, match="'fc'.*non-finite"):
        quantize_bias(torch.tensor([float("inf")]), 0.5, 0.25, name="fc")
    with pytest.raises(ValueError, match="3 entries"):
        quantize_bias(torch.tensor([1.0, 2.0]), 0.5, torch.tensor([0.1, 0.2, 0.3]))


def test_bias_int16_shift():
    cases = {
        (32767, -32768): ([32767, -32768], 0),
        (32768,): ([16384], 1),
        (-32769,): ([-16385], 1),  # arithmetic shift floors
        (65535, 3): ([32767, 1], 1),
        (INT32_MAX,): ([32767], 16),
        (INT32_MIN,): ([-32768], 16),
    }
    for vals, (b16, shift) in cases.items():
        got, s = bias_int16_shift(torch.tensor(vals, dtype=torch.int32))
        assert got.dtype == torch.int16
        assert (got.tolist(), s) == (b16, shift), vals


def test_fold_batchnorm_matches_conv_then_bn():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, 8, 8, generator=g, dtype=torch.float64)
    w = torch.randn(5, 3, 3, 3, generator=g, dtype=torch.float64)
    b = torch.randn(5, generator=g, dtype=torch.float64)
    mean = torch.randn(5, generator=g, dtype=torch.float64)
    var = torch.rand(5, generator=g, dtype=torch.float64) + 0.1
    gamma = torch.randn(5, generator=g, dtype=torch.float64)
    beta = torch.randn(5, generator=g, dtype=torch.float64)
    eps = 1e-5
    ref = F.batch_norm(F.conv2d(x, w, b), mean, var, gamma, beta, training=False, eps=eps)
    wf, bf = fold_batchnorm(w, b, mean, var, eps, gamma, beta)
    assert torch.allclose(F.conv2d(x, wf, bf), ref, rtol=1e-12, atol=1e-12)
    # no bias, no affine; a linear layer
    wl = torch.randn(4, 6, generator=g, dtype=torch.float64)
    xl = torch.randn(7, 6, generator=g, dtype=torch.float64)
    ml, vl = torch.randn(4, generator=g, dtype=torch.float64), torch.rand(4, generator=g, dtype=torch.float64)
    ref = F.batch_norm(xl @ wl.T, ml, vl, training=False, eps=1e-3)
    wf, bf = fold_batchnorm(wl, None, ml, vl, 1e-3)
    assert torch.allclose(F.linear(xl, wf, bf), ref, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="var"):
        fold_batchnorm(wl, None, ml, -torch.ones(4), 0.0)


@pytest.mark.parametrize("mode", ["per-kernel", "per-filter"])
def test_save_quantized_weights(tmp_path, mode):
    g = torch.Generator().manual_seed(4)
    layers = {
        "conv1": (torch.randn(4, 1, 3, 3, generator=g), torch.randn(4, generator=g) * 0.01, 1 / 127),
        "ip1": (torch.randn(3, 8, generator=g), None, 0.05),
    }
    npz, js = tmp_path / "w.npz", tmp_path / "sub" / "w.json"
    summary = save_quantized_weights(npz, js, layers, mode)
    with np.load(npz) as d:
        assert set(d.files) == {f"{n}.{k}" for n in layers for k in ("weight_q", "weight_scale", "bias_q")}
        assert d["conv1.weight_q"].dtype == np.int8 and d["conv1.weight_q"].shape == (4, 1, 3, 3)
        assert d["conv1.weight_scale"].dtype == np.float32
        assert d["conv1.bias_q"].dtype == np.int32 and d["ip1.bias_q"].tolist() == [0, 0, 0]
        qw = quantize_weight(layers["conv1"][0], mode)
        assert np.array_equal(d["conv1.weight_q"], qw.q.numpy())
        assert np.array_equal(d["conv1.bias_q"], quantize_bias(layers["conv1"][1], 1 / 127, qw.scale).numpy())
    loaded = json.loads(js.read_text())
    assert loaded == summary and [e["layer"] for e in loaded] == ["conv1", "ip1"]
    if mode == "per-kernel":
        assert isinstance(loaded[0]["scales"], float)
    else:
        assert isinstance(loaded[0]["scales"], list) and len(loaded[0]["scales"]) == 4
    assert loaded[1]["has_bias"] is False and loaded[0]["mode"] == mode


def test_save_quantized_weights_names_bad_layer(tmp_path):
    layers = {"good": (torch.ones(2, 2), None, 0.1), "bad": (torch.tensor([[float("inf"), 1.0]]), None, 0.1)}
    with pytest.raises(ValueError, match="'bad'"):
        save_quantized_weights(tmp_path / "w.npz", tmp_path / "w.json", layers, "per-kernel")
    assert not (tmp_path / "w.npz").exists() and not (tmp_path / "w.json").exists()
    with pytest.raises(ValueError, match="'good'.*s_in"):
        save_quantized_weights(tmp_path / "w.npz", tmp_path / "w.json", {"good": (torch.ones(2, 2), None, 0.0)})


# -- the runtime's CPU softmax ------------------------------------------------------------------

_HALVES = np.unique(np.arange(1 << 16, dtype=np.uint16).view(np.float16).astype(np.float64))
_HALVES = _HALVES[np.isfinite(_HALVES)]


def _half_away_reference(x: float) -> float:
    """Slow and obvious: the nearest of all finite halves; a tie goes to the larger magnitude."""
    i = int(np.searchsorted(_HALVES, x))
    candidates = [_HALVES[j] for j in (i - 1, i) if 0 <= j < len(_HALVES)]
    best = min(abs(c - x) for c in candidates)
    nearest = [c for c in candidates if abs(c - x) == best]
    return max(nearest, key=abs)


def test_half_round_away_matches_the_nearest_half_with_ties_away_from_zero():
    from torch_nvdla.nvdla.requant import half_round_away

    rng = np.random.default_rng(0)
    h = _HALVES[np.abs(_HALVES) < 60000]
    ties = (h[:-1] + h[1:]) / 2  # every midpoint between neighbouring halves (float32-exact here)
    xs = np.concatenate([ties[::7], rng.normal(0, 3, 2000), rng.uniform(-1e-6, 1e-6, 500),
                         [0.0, -0.0, 2.0**-25, -(2.0**-25), 3 * 2.0**-26, 1 + 2.0**-11, -(1 + 2.0**-11)]])
    xs = xs.astype(np.float32)
    got = half_round_away(torch.from_numpy(xs)).double().numpy()
    want = np.array([_half_away_reference(float(v)) for v in xs])
    assert np.array_equal(got, want)
    assert half_round_away(torch.tensor([1 + 2.0**-11])).item() == 1 + 2.0**-10  # .half() gives 1.0


def test_emulator_softmax_hand_counted():
    """Two equal inputs: p = 0.5 exactly, 0.5 * 127 = 63.5 truncates to 63. One input far
    above the rest: p = 1 -> 127; the others exp(-big) -> 0."""
    from torch_nvdla.nvdla.requant import emulator_softmax

    out = emulator_softmax(torch.tensor([[127.0, 127.0], [0.0, 0.0]]), 1 / 127, 1 / 127)
    assert out.tolist() == [[63.0, 63.0], [63.0, 63.0]]
    assert emulator_softmax(torch.tensor([[127.0, -128.0]]), 1.0, 1 / 127).tolist() == [[127.0, 0.0]]
    # S_in = 0.1: q = (10, 0, -10) -> h = (1, 0, -1) (halves 1.0, 0.0, -1.0);
    # e = (1, e^-1, e^-2) -> p = (0.6652, 0.2447, 0.0900) -> half -> / (1/127) -> trunc
    out = emulator_softmax(torch.tensor([[10.0, 0.0, -10.0]]), 0.1, 1 / 127)
    e = np.exp(np.array([0.0, -1.0, -2.0]))
    p = (e / e.sum()).astype(np.float16).astype(np.float32)
    assert out.tolist() == [list(np.trunc(p / np.float32(1 / 127)))]
    assert out.tolist() == [[84.0, 31.0, 11.0]]
    # the output saturates at 127 (an S_out below 1/127)
    assert emulator_softmax(torch.tensor([[127.0, -128.0]]), 1.0, 1 / 255).tolist() == [[127.0, 0.0]]
