"""Tests of samq_fx/quantizers.py: the integer grid, observers, LSQ, AdaRound, QDrop, PCC, AGQ.

Numerical claims are stated exactly where they are theorems (grid membership, idempotence, the
half-step error bound, AdaRound's untrained hard rounding) and as statistical properties, with the
reason, where they are not (error against bits, per-channel against per-tensor).
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from samq_fx import quantizers as qz
from samq_fx.quantizers import (
    Log2Quantizer,
    NotDeployableError,
    QuantSpec,
    UniformQuantizer,
    assert_deployable,
    dequantize,
    log2_fake_quantize,
    quantize_tensor,
)

pytestmark = pytest.mark.unit

FAST = settings(max_examples=25, deadline=None)
BITS = st.integers(2, 8)
# Finite, normal float32 values; hypothesis likes 0, 1, 2, ... which is exactly the adversarial
# lattice data that breaks "more bits is better" (see test_error_against_bits_*).
VALUES = st.floats(-100, 100, width=32, allow_nan=False, allow_subnormal=False)


def matrices(max_rows: int = 4, max_cols: int = 8):
    """A (rows, cols) float32 tensor built from hypothesis floats."""
    return st.tuples(st.integers(1, max_rows), st.integers(1, max_cols)).flatmap(
        lambda rc: st.lists(VALUES, min_size=rc[0] * rc[1], max_size=rc[0] * rc[1]).map(
            lambda v: torch.tensor(v, dtype=torch.float32).reshape(rc)
        )
    )


def calibrated(spec: QuantSpec, *batches: torch.Tensor) -> UniformQuantizer:
    q = UniformQuantizer(spec)
    for x in batches:
        q(x)
    return q.freeze()


def broadcast_qparams(q: UniformQuantizer, x: torch.Tensor):
    """(scale, zero_point) of a per-tensor or per-channel(axis 0) quantizer, broadcast over x."""
    s, z = q.scale.detach(), q.zero_point
    if s.dim() == 1:
        shape = (-1,) + (1,) * (x.dim() - 1)
        s, z = s.reshape(shape), z.reshape(shape)
    return s, z


def lp_error(x_hat: torch.Tensor, x: torch.Tensor, p: float = 2.4) -> float:
    return float((x_hat - x).abs().pow(p).sum())


# ---------------------------------------------------------------------------------------------
# QuantSpec
# ---------------------------------------------------------------------------------------------


def test_spec_round_trips_through_dict():
    spec = QuantSpec(bits=4, granularity="group", group_size=32, observer="mse")
    assert QuantSpec.from_dict(spec.to_dict()) == spec
    assert (spec.qmin, spec.qmax) == (0, 15)
    assert (QuantSpec(bits=4, symmetric=True).qmin, QuantSpec(bits=4, symmetric=True).qmax) == (
        -8,
        7,
    )


@pytest.mark.parametrize("bits", [1, 9, 0, True, 4.0])
def test_spec_rejects_bits_outside_2_to_8(bits):
    with pytest.raises(ValueError, match=rf"bits must be an int in 2\.\.8, got {bits!r}"):
        QuantSpec(bits=bits)


def test_spec_error_paths():
    with pytest.raises(ValueError, match="needs a positive int group_size, got None"):
        QuantSpec(bits=4, granularity="group")
    with pytest.raises(ValueError, match="group_size=8 is only used with granularity='group'"):
        QuantSpec(bits=4, group_size=8)
    with pytest.raises(ValueError, match="granularity 'row' not in"):
        QuantSpec(bits=4, granularity="row")
    with pytest.raises(ValueError, match="observer 'avg' not in"):
        QuantSpec(bits=4, observer="avg")
    with pytest.raises(ValueError, match="percentile must be in"):
        QuantSpec(bits=4, percentile=0.3)
    with pytest.raises(ValueError, match=r"unknown QuantSpec keys \['nbits'\]; known: \[.*'bits'"):
        QuantSpec.from_dict({"nbits": 4})


# ---------------------------------------------------------------------------------------------
# The grid
# ---------------------------------------------------------------------------------------------


@FAST
@given(
    x=matrices(),
    bits=BITS,
    symmetric=st.booleans(),
    granularity=st.sampled_from(["tensor", "channel"]),
    observer=st.sampled_from(["minmax", "percentile", "mse"]),
)
def test_output_is_on_the_grid_and_in_range(x, bits, symmetric, granularity, observer):
    q = calibrated(QuantSpec(bits, symmetric, granularity, observer=observer), x)
    x_hat = q(x * 3.0)  # also values beyond the calibrated range
    s, z = broadcast_qparams(q, x)
    codes = x_hat / s + z
    assert torch.allclose(codes, codes.round(), atol=1e-3), (codes - codes.round()).abs().max()
    assert codes.round().min() >= q.qmin and codes.round().max() <= q.qmax
    assert bool((q.zero_point == q.zero_point.round()).all())
    assert bool(((q.zero_point >= q.qmin) & (q.zero_point <= q.qmax)).all())


@FAST
@given(
    x=matrices(max_cols=8),
    bits=BITS,
    symmetric=st.booleans(),
    granularity=st.sampled_from(["tensor", "channel", "group"]),
)
def test_quantizing_twice_changes_nothing(x, bits, symmetric, granularity):
    group_size = x.shape[1] if granularity == "group" else None
    spec = QuantSpec(bits, symmetric, granularity, group_size=group_size)
    q = calibrated(spec, x)
    once = q(x)
    assert torch.equal(q(once), once)


@FAST
@given(
    x=matrices(),
    bits=BITS,
    symmetric=st.booleans(),
    granularity=st.sampled_from(["tensor", "channel"]),
)
def test_minmax_error_is_at_most_half_a_step(x, bits, symmetric, granularity):
    """Theorem: with min-max qparams every observed value is within s/2 of its fake quant.

    (Asymmetric: rounding z moves the grid by at most s/2, so values near max(x, 0) may clamp to
    the top level, still within s/2. Symmetric: s = amax / qmax never clamps observed values.)
    """
    q = calibrated(QuantSpec(bits, symmetric, granularity), x)
    s, _ = broadcast_qparams(q, x)
    err = (q(x) - x).abs()
    assert bool((err <= s / 2 * (1 + 1e-4) + 1e-6).all()), float((err / s).max())


@FAST
@given(seed=st.integers(0, 2**16), n=st.integers(256, 2048), symmetric=st.booleans())
def test_error_against_bits_is_non_increasing_on_continuous_data(seed, n, symmetric):
    """Statistical, not a theorem: the b-bit grid is not a subset of the (b+1)-bit grid, so data
    lying on the 2-bit lattice ({0, 1, 2, 3}) has zero 2-bit error and non-zero 3-bit error.
    On continuous data the error ~ s^2 / 12 falls ~4x per bit, far beyond sampling noise."""
    x = torch.randn(n, generator=torch.Generator().manual_seed(seed))
    errors = [
        float((calibrated(QuantSpec(b, symmetric), x)(x) - x).pow(2).mean()) for b in range(2, 9)
    ]
    for lo_bits, hi_bits in zip(errors, errors[1:]):
        assert hi_bits <= lo_bits * (1 + 1e-6) + 1e-12, errors


def test_error_against_bits_counterexample_on_lattice_data():
    """Why the test above uses continuous data."""
    x = torch.tensor([0.0, 1.0, 2.0, 3.0])
    assert float((calibrated(QuantSpec(2), x)(x) - x).abs().max()) == 0.0
    assert float((calibrated(QuantSpec(3), x)(x) - x).abs().max()) > 0.1


@FAST
@given(seed=st.integers(0, 2**16), n=st.integers(64, 1024))
def test_8bit_fake_quant_is_close_to_identity(seed, n):
    """Bound stated: per-tensor asymmetric 8-bit min-max has |x_hat - x| <= (max - min) / 510
    for every observed x (half a step, range including 0; float slack 1e-4 relative), and
    SQNR >= 40 dB on Gaussian data (about 45 dB expected for 255 steps over ~6 sigma)."""
    x = torch.randn(n, generator=torch.Generator().manual_seed(seed)) * 3 + 1
    x_hat = calibrated(QuantSpec(8), x)(x)
    span = float(x.max().clamp(min=0) - x.min().clamp(max=0))
    assert float((x_hat - x).abs().max()) <= span / 510 * (1 + 1e-4) + 1e-6
    sqnr = 10 * math.log10(float(x.pow(2).sum() / (x_hat - x).pow(2).sum()))
    assert sqnr >= 40, f"SQNR {sqnr:.1f} dB < 40 dB"


@FAST
@given(x=matrices(), bits=BITS, granularity=st.sampled_from(["tensor", "channel"]))
def test_symmetric_grid_is_symmetric(x, bits, granularity):
    """zero_point is 0, the grid is [-2^(b-1), 2^(b-1)-1], and within the observed range the fake
    quant is odd: fq(-x) = -fq(x) exactly (round half to even is odd; s = amax / qmax)."""
    q = calibrated(QuantSpec(bits, symmetric=True, granularity=granularity), x)
    assert bool((q.zero_point == 0).all())
    assert (q.qmin, q.qmax) == (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
    assert torch.equal(q(-x), -q(x))


# ---------------------------------------------------------------------------------------------
# Granularities and the lowering helpers
# ---------------------------------------------------------------------------------------------


@FAST
@given(seed=st.integers(0, 2**16), rows=st.integers(1, 4), groups=st.integers(1, 3), bits=BITS)
def test_per_group_equals_per_tensor_on_each_group(seed, rows, groups, bits):
    group_size = 4
    w = torch.randn(rows, groups * group_size, generator=torch.Generator().manual_seed(seed))
    q = calibrated(QuantSpec(bits, granularity="group", group_size=group_size), w)
    scale, zero_point, _, _ = q.qparams()
    assert scale.shape == (rows, groups)  # torchao int4's (rows, groups) layout
    w_hat = q(w)
    for r in range(rows):
        for g in range(groups):
            cols = slice(g * group_size, (g + 1) * group_size)
            alone = calibrated(QuantSpec(bits), w[r, cols])
            assert torch.equal(alone.scale.detach(), scale[r, g])
            assert int(alone.zero_point) == int(zero_point[r, g])
            assert torch.equal(alone(w[r, cols]), w_hat[r, cols])


@FAST
@given(
    seed=st.integers(0, 2**16),
    spec=st.sampled_from(
        [
            QuantSpec(4, granularity="channel", ch_axis=0),
            QuantSpec(4, granularity="channel", ch_axis=-1),
            QuantSpec(3, True, granularity="channel", ch_axis=1),
            QuantSpec(8, granularity="group", group_size=3),
            QuantSpec(6, True),
        ]
    ),
)
def test_module_agrees_with_pure_helpers(seed, spec):
    """Lowering rebuilds integers from qparams(); they must be the module's integers."""
    x = torch.randn(2, 5, 6, generator=torch.Generator().manual_seed(seed))
    q = calibrated(spec, x)
    scale, zero_point, qmin, qmax = q.qparams()
    assert zero_point.dtype == torch.int32 and scale.dtype == torch.float32
    layout = {"ch_axis": spec.ch_axis if spec.granularity == "channel" else None}
    layout["group_size"] = spec.group_size
    codes = quantize_tensor(x, scale, zero_point, qmin, qmax, **layout)
    assert torch.equal(codes.to(torch.int32), q.int_repr(x))
    assert torch.allclose(dequantize(codes, scale, zero_point, **layout), q(x), atol=1e-6)


@FAST
@given(seed=st.integers(0, 2**16), bits=st.integers(2, 6), log_spread=st.floats(2.0, 6.0))
def test_per_channel_mse_beats_per_tensor_on_channels_of_different_scale(seed, bits, log_spread):
    """Statistical (see the counterexample below): channels whose scales differ by 2^2..2^6."""
    gen = torch.Generator().manual_seed(seed)
    scales = torch.exp2(torch.linspace(0, log_spread, 6))[torch.randperm(6, generator=gen)]
    w = torch.randn(6, 48, generator=gen) * scales[:, None]
    per_tensor = calibrated(QuantSpec(bits, observer="mse"), w)(w)
    per_channel = calibrated(QuantSpec(bits, granularity="channel", observer="mse"), w)(w)
    assert lp_error(per_channel, w) <= lp_error(per_tensor, w)
    assert lp_error(per_channel, w, 2) <= lp_error(per_tensor, w, 2)


def test_per_channel_can_lose_on_lattice_data():
    """Not a theorem: row 0 lies on the per-tensor grid (s = 1) but not on its own (s = 0.8)."""
    w = torch.tensor([[0.0, 1.0, 2.0, 2.4], [0.0, 1.0, 2.0, 3.0]])
    per_tensor = calibrated(QuantSpec(2), w)(w)
    per_channel = calibrated(QuantSpec(2, granularity="channel"), w)(w)
    assert lp_error(per_channel, w, 2) > lp_error(per_tensor, w, 2)


@FAST
@given(
    x=matrices(max_cols=8),
    bits=BITS,
    symmetric=st.booleans(),
    granularity=st.sampled_from(["tensor", "channel"]),
)
def test_mse_observer_is_never_worse_than_minmax(x, bits, symmetric, granularity):
    """Theorem on one batch: shrink factor 1 (min-max) is among the MSE candidates."""
    minmax = calibrated(QuantSpec(bits, symmetric, granularity), x)(x)
    mse = calibrated(QuantSpec(bits, symmetric, granularity, observer="mse"), x)(x)
    assert lp_error(mse, x) <= lp_error(minmax, x) * (1 + 1e-5) + 1e-9


def test_observers_combine_batches_as_documented():
    a, b = torch.linspace(-1, 1, 101), torch.linspace(-3, 3, 101)
    assert torch.allclose(calibrated(QuantSpec(8), a, b).scale, torch.tensor(6 / 255))
    averaged = calibrated(QuantSpec(8, observer="percentile", percentile=1.0), a, b)
    assert torch.allclose(averaged.scale, torch.tensor(4 / 255))


def test_percentile_ignores_a_lone_outlier():
    x = torch.cat([torch.linspace(-1, 1, 999), torch.tensor([1000.0])])
    clipped = calibrated(QuantSpec(8, observer="percentile", percentile=0.99), x)
    assert float(clipped.scale) < 2.5 / 255 < float(calibrated(QuantSpec(8), x).scale)


def test_sampled_observers_are_deterministic(monkeypatch):
    monkeypatch.setattr(qz, "SAMPLE_CAP", 64)
    x = torch.randn(4, 1000, generator=torch.Generator().manual_seed(0))
    for observer in ("percentile", "mse"):
        spec = QuantSpec(4, granularity="channel", observer=observer, percentile=0.99)
        assert torch.equal(calibrated(spec, x).scale, calibrated(spec, x.clone()).scale)


def test_unchanged_weight_is_observed_once_and_changed_weight_again():
    w = nn.Parameter(torch.tensor([[-1.0, 1.0]]))
    q = UniformQuantizer(QuantSpec(8, observer="mse"))
    for _ in range(3):
        q(w)
    assert torch.equal(q.compute_qparams()[0], calibrated(QuantSpec(8, observer="mse"), w).scale)
    with torch.no_grad():
        w.mul_(3.0)
    q(w)  # now averaged with the new range: (2 + 6) / 2 wide
    assert torch.allclose(q.compute_qparams()[0], torch.tensor(4 / 255), rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# LSQ and straight-through gradients
# ---------------------------------------------------------------------------------------------


def test_lsq_gradient_reaches_scale_and_matches_the_formula():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, generator=gen)
    q = calibrated(QuantSpec(4), x[:48]).learn_scale(True)  # x[48:] partly beyond the range
    x = x.clone().requires_grad_(True)
    upstream = torch.randn(64, generator=gen)
    (q(x) * upstream).sum().backward()

    s, z = q.scale.detach(), q.zero_point
    v = x.detach() / s
    inside = (torch.round(v) + z >= q.qmin) & (torch.round(v) + z <= q.qmax)
    low = torch.round(v) + z < q.qmin
    d_scale = torch.where(inside, torch.round(v) - v, torch.where(low, q.qmin - z, q.qmax - z))
    g = 1 / math.sqrt(64 * q.qmax)
    assert torch.allclose(q.scale.grad, (upstream * d_scale).sum() * g, rtol=1e-4)
    # straight-through: d out / d x = 1 inside the range, 0 where clamped
    assert torch.allclose(x.grad, torch.where(inside, upstream, torch.zeros_like(upstream)))
    assert not bool(inside.all())  # the test did reach clamped values


def test_scale_is_fixed_unless_learn_scale():
    x = torch.randn(16)
    q = calibrated(QuantSpec(4), x)
    q(x.clone().requires_grad_(True)).sum().backward()
    assert q.scale.grad is None and not q.scale.requires_grad
    with pytest.raises(RuntimeError, match="freeze"):
        UniformQuantizer(QuantSpec(4)).learn_scale(True)


# ---------------------------------------------------------------------------------------------
# AdaRound
# ---------------------------------------------------------------------------------------------


@FAST
@given(seed=st.integers(0, 2**16), bits=st.integers(2, 6), symmetric=st.booleans())
def test_adaround_untrained_hard_rounding_is_round_half_up(seed, bits, symmetric):
    """Exactly: codes = clamp(floor(W/s) + 1[frac(W/s) >= 0.5] + z, qmin, qmax). That is
    round-to-nearest except at exact ties (frac == 0.5), where nearest rounds half to even."""
    w = torch.randn(4, 9, generator=torch.Generator().manual_seed(seed))
    w[0, :3] = torch.tensor([0.5, 1.5, 2.5])  # forces exact ties when s is a power of 2 below
    q = calibrated(QuantSpec(bits, symmetric, "channel"), w)
    nearest = q.int_repr(w)
    q.enable_adaround(w).harden()
    s, z = broadcast_qparams(q, w)
    ratio = w / s
    frac = ratio - torch.floor(ratio)
    expected = torch.clamp(torch.floor(ratio) + (frac >= 0.5).float() + z, q.qmin, q.qmax)
    assert torch.equal(q.int_repr(w), expected.to(torch.int32))
    ties = frac == 0.5
    assert torch.equal(q.int_repr(w)[~ties], nearest[~ties])
    w_hat = q(w)
    codes = w_hat / s + z
    assert torch.allclose(codes, codes.round(), atol=1e-4)  # on the grid
    assert q.alpha is None and q.rounding == "hard"


def test_adaround_soft_mode_starts_at_w_and_trains_alpha():
    w = torch.randn(3, 8, generator=torch.Generator().manual_seed(1))
    q = calibrated(QuantSpec(4, granularity="channel"), w).enable_adaround(w)
    s, z = broadcast_qparams(q, w)
    ratio = w / s
    frac = ratio - torch.floor(ratio)
    # Weights whose code is not clamped come back as themselves (a row's extremes may clamp:
    # rounding z shifts the grid by up to half a step).
    unclamped = (ratio + z >= q.qmin) & (ratio + z <= q.qmax)
    assert unclamped.float().mean() > 0.8
    assert torch.allclose(q(w)[unclamped], w[unclamped], atol=1e-5)
    assert torch.allclose(q.soft_offset(), frac, atol=1e-5)
    expected = (1 - (2 * q.soft_offset() - 1).abs().pow(3.0)).sum()
    assert torch.allclose(q.rounding_loss(3.0), expected)
    ((q(w) - w * 1.1).pow(2).sum() + 0.01 * q.rounding_loss(20.0)).backward()
    assert q.alpha.grad is not None and float(q.alpha.grad.abs().sum()) > 0
    assert q.deployment_problems() == ["soft AdaRound rounding still on (call harden())"]


def test_adaround_error_paths():
    w = torch.randn(2, 4)
    with pytest.raises(RuntimeError, match="freeze"):
        UniformQuantizer(QuantSpec(4, granularity="channel")).enable_adaround(w)
    q = calibrated(QuantSpec(4, granularity="channel"), w)
    with pytest.raises(RuntimeError, match="not 'soft'"):
        q.harden()
    q.enable_adaround(w).harden()
    with pytest.raises(RuntimeError, match="already hardened"):
        q.enable_adaround(w)
    with pytest.raises(ValueError, match=r"needs qparams of shape \(3,\)"):
        q(torch.randn(3, 4))


# ---------------------------------------------------------------------------------------------
# QDrop and the deployment check
# ---------------------------------------------------------------------------------------------


def test_drop_prob_quantizes_the_stated_fraction():
    x = torch.randn(20_000, generator=torch.Generator().manual_seed(0))
    q = calibrated(QuantSpec(4), x)
    x_q = q(x)
    assert not bool((x_q == x).any())  # so "out == x" below means "left unquantized"
    torch.manual_seed(0)
    q.drop_prob = 0.5
    out = q(x)
    kept_fp = float((out == x).float().mean())
    assert 0.47 < kept_fp < 0.53, kept_fp
    assert torch.equal(out[out != x], x_q[out != x])
    q.drop_prob = 1.0
    assert torch.equal(q(x), x_q)
    with pytest.raises(ValueError, match="drop_prob must be in"):
        q.drop_prob = 1.5


def test_assert_deployable_names_every_offender():
    w = torch.randn(4, 4)
    model = nn.ModuleDict(
        {
            "enc": nn.ModuleDict(
                {"q_in": calibrated(QuantSpec(4), w), "ok": calibrated(QuantSpec(4), w)}
            ),
            "dec": nn.ModuleDict(
                {
                    "w": calibrated(QuantSpec(4, granularity="channel"), w).enable_adaround(w),
                    "fresh": UniformQuantizer(QuantSpec(4)),
                    "softmax": Log2Quantizer(4),
                }
            ),
            "fp": UniformQuantizer(QuantSpec(4)),  # never calibrated, but disabled on purpose
        }
    )
    model["enc"]["q_in"].drop_prob = 0.5
    model["dec"]["softmax"].set_agq(0.5, 2).drop_prob = 0.5
    model["fp"].enabled = False
    with pytest.raises(NotDeployableError, match="4 of 6 quantizers") as err:
        assert_deployable(model)
    message = str(err.value)
    for name in ("enc.q_in", "dec.w", "dec.fresh", "dec.softmax"):
        assert name in message
    assert "enc.ok" not in message and "fp (" not in message
    assert "drop_prob=0.5" in message and "soft AdaRound" in message and "not calibrated" in message

    model["enc"]["q_in"].drop_prob = 1.0
    model["dec"]["softmax"].drop_prob = 1.0
    model["dec"]["w"].harden()
    model["dec"]["fresh"](w)
    model["dec"]["fresh"].freeze()
    assert assert_deployable(model) == 6


def test_assert_deployable_on_a_model_without_quantizers():
    with pytest.raises(NotDeployableError, match="no quantizer found in Linear"):
        assert_deployable(nn.Linear(2, 2))
    assert assert_deployable(nn.Linear(2, 2), allow_empty=True) == 0


# ---------------------------------------------------------------------------------------------
# PCC clip bounds
# ---------------------------------------------------------------------------------------------


@FAST
@given(
    x=matrices(),
    lo=st.floats(-50, -0.01),
    hi=st.floats(0.01, 50),
    bits=BITS,
)
def test_set_clip_clamps_beyond_bounds_and_only_rounds_inside(x, lo, hi, bits):
    """Exactly what holds: s and z follow PCC's formula; values inside [lo, hi] move by at most
    half a step (rounding only); values beyond land on the grid's end levels, which lie within
    half a step of the bounds (z is rounded)."""
    q = UniformQuantizer(QuantSpec(bits)).set_clip(lo, hi)
    assert q.frozen and float(q.clip_lo) == pytest.approx(lo)
    s = (hi - lo) / (2**bits - 1)
    assert float(q.scale) == pytest.approx(s, rel=1e-5)
    assert int(q.zero_point) == min(max(-round(lo / float(q.scale)), 0), 2**bits - 1)
    s = float(q.scale)
    out = q(x)
    slack = s / 2 * (1 + 1e-4) + 1e-6
    inside = (x >= lo) & (x <= hi)
    assert bool(((out - x).abs()[inside] <= slack).all())
    top, bottom = (q.qmax - q.zero_point) * s, (q.qmin - q.zero_point) * s
    assert bool((out[x > hi] == top).all()) and bool((out[x < lo] == bottom).all())
    assert abs(float(top) - hi) <= slack and abs(float(bottom) - lo) <= slack


def test_set_clip_error_and_survives_freeze():
    q = UniformQuantizer(QuantSpec(4)).set_clip(-1.0, 2.0)
    scale = q.scale.detach().clone()
    q.freeze()  # already frozen: a calibration loop freezing everything keeps the clip
    assert torch.equal(q.scale.detach(), scale)
    with pytest.raises(ValueError, match="lo <= hi"):
        UniformQuantizer(QuantSpec(4)).set_clip(1.0, -1.0)


# ---------------------------------------------------------------------------------------------
# Log2 quantizer (AGQ)
# ---------------------------------------------------------------------------------------------

PROBS = st.lists(st.floats(0, 1, width=32, allow_subnormal=False), min_size=1, max_size=64)


@FAST
@given(probs=PROBS, bits=st.integers(2, 8), tau=st.sampled_from([1, 2, 4]))
def test_log2_outputs_are_levels_or_zero_and_monotone(probs, bits, tau):
    a = torch.tensor(probs)
    q = Log2Quantizer(bits, tau)
    q(a)
    if float(a.max()) == 0:
        return
    q.freeze()
    s = float(q.scale)
    assert s == pytest.approx(min(max(float(a.max()), 1e-20), 1.0))  # s = max, in [1e-20, 1]
    out = q(a)
    nonzero = out[out != 0]
    k = -tau * torch.log2(nonzero / s)
    assert torch.allclose(k, k.round(), atol=1e-3)
    assert float(k.round().min()) >= 0 and float(k.round().max()) <= 2**bits - 1
    order = torch.argsort(a)
    assert bool((out[order].diff() >= 0).all())  # monotone non-decreasing in the input
    assert torch.equal(q(out), out)  # idempotent
    assert torch.equal(out, log2_fake_quantize(a, q.scale.detach(), tau, bits))


def test_log2_saturates_above_scale_and_zeroes_below_the_last_level():
    q = Log2Quantizer(bits=2, tau=1).set_agq(0.5, 1)  # levels 0.5, 0.25, 0.125, 0.0625
    a = torch.tensor([1.0, 0.5, 0.26, 0.0625, 0.04, 0.0])
    assert torch.equal(q(a), torch.tensor([0.5, 0.5, 0.25, 0.0625, 0.0, 0.0]))
    assert q.qparams()[2:] == (0, 3)


def test_log2_scale_learns_and_error_paths():
    a = torch.softmax(torch.randn(4, 16, generator=torch.Generator().manual_seed(0)), -1)
    q = Log2Quantizer(4, 2)
    with pytest.raises(RuntimeError, match="no data observed"):
        q.freeze()
    q(a)
    q.freeze().learn_scale(True)
    (q(a) - a).pow(2).sum().backward()
    assert q.scale.grad is not None and math.isfinite(float(q.scale.grad))
    with pytest.raises(ValueError, match=r"tau must be one of \(1, 2, 4\), got 3"):
        q.tau = 3
    with pytest.raises(ValueError, match="bits must be an int in 2..8, got 9"):
        Log2Quantizer(9)


# ---------------------------------------------------------------------------------------------
# State, save/load, error paths
# ---------------------------------------------------------------------------------------------


def test_states_and_reset():
    x = torch.randn(8)
    q = UniformQuantizer(QuantSpec(4))
    assert q.observing and not q.frozen
    assert q(x) is x  # observing passes x through
    q.freeze()
    assert q.frozen and not torch.equal(q(x), x)
    q.enabled = False
    assert q(x) is x
    q.enabled = True
    q.reset()
    assert q.observing and q.enabled
    with pytest.raises(RuntimeError, match="no data observed"):
        q.freeze()
    assert "state=observing" in repr(q)


def test_error_paths_of_uniform_quantizer():
    with pytest.raises(RuntimeError, match="no data observed"):
        UniformQuantizer(QuantSpec(4)).freeze()
    with pytest.raises(RuntimeError, match="not frozen"):
        UniformQuantizer(QuantSpec(4)).qparams()
    with pytest.raises(ValueError, match="not a multiple of group_size 4"):
        UniformQuantizer(QuantSpec(4, granularity="group", group_size=4))(torch.randn(2, 6))
    q = UniformQuantizer(QuantSpec(4, granularity="channel"))
    q(torch.randn(3, 4))
    with pytest.raises(ValueError, match=r"observed qparam shape \(5,\) differs"):
        q(torch.randn(5, 4))


def test_state_dict_round_trip_into_a_fresh_quantizer():
    w = torch.randn(4, 8)
    spec = QuantSpec(4, granularity="channel", observer="mse")
    q = calibrated(spec, w).enable_adaround(w).harden()
    q.drop_prob = 0.5
    fresh = UniformQuantizer(spec)
    fresh.load_state_dict(q.state_dict())
    assert fresh.frozen and fresh.rounding == "hard" and fresh.drop_prob == 0.5
    assert torch.equal(fresh.int_repr(w), q.int_repr(w))
    clipped = UniformQuantizer(QuantSpec(4)).set_clip(-1, 1)
    fresh = UniformQuantizer(QuantSpec(4))
    fresh.load_state_dict(clipped.state_dict())
    assert float(fresh.clip_hi) == 1.0 and "clip=fixed" in repr(fresh)
    with pytest.raises(ValueError, match="saved quantizer has spec"):
        UniformQuantizer(QuantSpec(8)).load_state_dict(clipped.state_dict())


def test_calibration_under_inference_mode_leaves_trainable_qparams():
    w = nn.Parameter(torch.randn(4, 8))
    q, log2 = UniformQuantizer(QuantSpec(4, granularity="channel")), Log2Quantizer(4)
    with torch.inference_mode():
        q(w)
        log2(torch.softmax(torch.randn(2, 8), -1))
        q.freeze()
        log2.freeze()
    assert q.learn_scale(True).scale.requires_grad and log2.learn_scale(True).scale.requires_grad
    q.enable_adaround(w)
    q(w).sum().backward()
    assert q.scale.grad is not None and q.alpha.grad is not None
