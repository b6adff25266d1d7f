"""CAR-SAM as passes: MAC (compensate_matmul), JCAR (joint-cross units), the composed method."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import samq_fx
from samq_fx import recon
from samq_fx.calib import forward_item, prepare_calibration, validate_loader
from samq_fx.cli import main
from samq_fx.config import (
    CAR_SAM_AGQ,
    SAMQ_RECIPE,
    AgqConfig,
    BimodalConfig,
    CalibConfig,
    MacConfig,
    QuantConfig,
    ReconConfig,
)
from samq_fx.demo import calibration_samples
from samq_fx.meta import get_info, nodes_with_role
from samq_fx.passes.compensate_matmul import (
    PASS,
    QkStats,
    RidgeStats,
    solve,
    sylvester_reference,
)
from samq_fx.quantizers import Log2Quantizer, QuantSpec, UniformQuantizer


def _quantizer(t: torch.Tensor, bits: int = 4) -> UniformQuantizer:
    q = UniformQuantizer(QuantSpec(bits=bits))
    q(t)
    return q.freeze()


def _augment(x: torch.Tensor) -> torch.Tensor:
    return torch.cat([x, torch.ones(*x.shape[:-1], 1, dtype=x.dtype)], -1)


# --- the solves, on plain tensors ----------------------------------------------------------------


@pytest.mark.unit
@settings(max_examples=8, deadline=None)
@given(seed=st.integers(0, 2**16), n=st.integers(2, 6), d=st.integers(1, 4))
def test_kronecker_solve_is_the_papers_sylvester_equation(seed, n, d):
    """One sample, one head: the Kronecker normal equation and scipy's Bartels-Stewart solve of
    A D + D B = C (papers.md §3.1) give the same correction."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3 * n + 4, n, generator=g, dtype=torch.float64)
    own = torch.randn(3 * n + 4, d, generator=g, dtype=torch.float64)
    other = torch.randn(2 * d + 5, d, generator=g, dtype=torch.float64)
    other_q = other + 0.1 * torch.randn(other.shape, generator=g, dtype=torch.float64)
    stats = QkStats()
    stats.add(x[None], own[None, None], other[None, None], other_q[None, None])
    delta, *_ = solve(*stats.system(), stats.rr, lam=0.3, relative=False)
    reference = sylvester_reference(x, own, other, other_q, lam=0.3)
    torch.testing.assert_close(delta.reshape(n, d), reference, rtol=1e-6, atol=1e-8)


def _planted_qk(seed: int, samples: int):
    """Image-token queries X W + b (2 heads of 4) against 3 prompt-token keys quantized to 4
    bits, the same keys for every sample: an i2t attention (7 prompt keys, head dim 8 on tiny)
    of one prompt. A q-side correction moves the logits only within the span of K^'s columns,
    so it can cancel Q dK^T fully only when there are at most head_dim keys (i2t), and only the
    part of the error that is systematic given X (see compensate_matmul's docstring)."""
    g = torch.Generator().manual_seed(seed)
    w, b = torch.randn(8, 16, generator=g) / 4, torch.randn(8, generator=g)
    x = torch.randn(samples, 12, 16, generator=g)
    keys = torch.randn(1, 3, 8, generator=torch.Generator().manual_seed(99)) * 3 + 1
    return x, w, b, keys.expand(samples, -1, -1)


def _heads(t: torch.Tensor) -> torch.Tensor:
    return t.double().reshape(*t.shape[:2], 2, 4).transpose(1, 2)


@pytest.mark.unit
def test_mac_reduces_planted_qk_matmul_error():
    """K quantized to 4 bits per tensor: folding the Sylvester correction into W_q (and b_q)
    cuts the logits error, on the fitted samples and on fresh queries against the same keys
    (measured: to 0.0043 and 0.0044 of the uncorrected error; asserted < 0.2)."""
    x, w, b, k = _planted_qk(0, 64)
    quant = _quantizer(k)
    stats = QkStats()
    stats.add(_augment(x).double(), _heads(x @ w.T + b), _heads(k), _heads(quant(k)))
    delta, _, before, after = solve(*stats.system(), stats.rr, lam=1e-3)
    dw = delta.reshape(2, 17, 4).permute(0, 2, 1).reshape(8, 17).float()
    w2, b2 = w + dw[:, :16], b + dw[:, 16]

    def error(x, w_, b_, k):
        q_fp, q_new = _heads(x @ w.T + b), _heads(x @ w_.T + b_)
        kk, kh = _heads(k), _heads(quant(k))
        return float((q_fp @ kk.transpose(-1, -2) - q_new @ kh.transpose(-1, -2)).norm())

    fit0, fit1 = error(x, w, b, k), error(x, w2, b2, k)
    assert before == pytest.approx(fit0, rel=1e-4) and after == pytest.approx(fit1, rel=1e-3)
    assert fit1 < 0.2 * fit0, f"fitted samples: {fit0:.2f} -> {fit1:.2f}"
    x_new, _, _, k_new = _planted_qk(1, 64)
    new0, new1 = error(x_new, w, b, k_new), error(x_new, w2, b2, k_new)
    assert new1 < 0.2 * new0, f"fresh samples: {new0:.2f} -> {new1:.2f}"


@pytest.mark.unit
def test_mac_ridge_reduces_planted_av_error():
    """Probabilities quantized to 3 bits: the ridge correction of W_v cuts ||A V - A^ V'||
    (measured: 13.38 -> 8.35, 0.62 of the uncorrected error; asserted < 0.7)."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(32, 50, 16, generator=g)  # 32 samples of 50 value tokens
    w, b = torch.randn(8, 16, generator=g) / 4, torch.randn(8, generator=g)
    attn = torch.softmax(torch.randn(32, 2, 6, 50, generator=g) * 2, -1)
    attn_hat = _quantizer(attn, bits=3)(attn)
    v = _heads(x @ w.T + b)
    stats = RidgeStats()
    stats.add(_augment(x).double(), attn, attn_hat, v)
    delta, _, before, after = solve(*stats.system(), stats.rr, lam=1e-3)
    dw = delta.reshape(2, 17, 4).permute(0, 2, 1).reshape(8, 17).float()
    v_new = _heads(x @ (w + dw[:, :16]).T + b + dw[:, 16])
    ref = attn.double() @ v
    e0, e1 = (
        float((ref - attn_hat.double() @ v).norm()),
        float((ref - attn_hat.double() @ v_new).norm()),
    )
    assert before == pytest.approx(e0, rel=1e-4) and after == pytest.approx(e1, rel=1e-3)
    assert e1 < 0.7 * e0, f"{e0:.3f} -> {e1:.3f}"


# --- the pass on the tiny model -------------------------------------------------------------------


@pytest.fixture(scope="module")
def calib():
    return calibration_samples(3)


def _t2i_logit_error(q, fp, items) -> float:
    """Relative error of layer 0's token->image logits (q @ k^T) against full precision."""
    out = []
    for model in (q, fp):
        (node,) = [n for n in nodes_with_role(model.mask_decoder, "qk_matmul")
                   if get_info(n).attn_path == "transformer.layers.0.cross_attn_token_to_image"]  # fmt: skip
        with samq_fx.taps.tap(model.mask_decoder, [node]) as seen, torch.no_grad():
            for item in items:
                forward_item(model, item)
        out.append(torch.cat([t.flatten() for t in seen[node.name]]))
    return float((out[0] - out[1]).norm() / out[1].norm())


@pytest.mark.slow
def test_mac_pass_records_and_lowers_attention_error_on_tiny(tiny_trained_captured, calib):
    cal = CalibConfig(num_images=3)
    base = QuantConfig(method="mse", w_bits=4, a_bits=4, calib=cal)
    plain = samq_fx.quantize(tiny_trained_captured, calib, base, progress=False)
    mac = samq_fx.quantize(tiny_trained_captured, calib, QuantConfig(**{**base.__dict__, "mac": MacConfig()}),
                           progress=False)  # fmt: skip
    (rec,) = [r for r in mac.mask_decoder.samq_pass_log if r.name == PASS]
    assert rec.result.counts == {"attentions": 5, "q_proj": 5, "k_proj": 5, "v_proj": 5}
    (enc,) = [r for r in mac.image_encoder.samq_pass_log if r.name == PASS]
    assert enc.result.counts["attentions"] == 0 and "decoder-only" in enc.result.notes[0]
    findings = [get_info(n).findings[PASS] for n in mac.mask_decoder.graph.nodes
                if get_info(n) is not None and get_info(n).role and PASS in get_info(n).findings]  # fmt: skip
    assert len(findings) == 15
    assert all(f["residual_after"] < f["residual_before"] for f in findings)
    assert {f["absorbs"] for f in findings} == {"q", "k", "attn"}
    samq_fx.quantizers.assert_deployable(mac)
    held = calibration_samples(3, seed=31_000)
    items = prepare_calibration(
        tiny_trained_captured, validate_loader(held, cal), cal, progress=False
    )
    e_plain, e_mac = (
        _t2i_logit_error(plain, tiny_trained_captured, items),
        _t2i_logit_error(mac, tiny_trained_captured, items),
    )
    assert e_mac < e_plain, f"t2i logits relative error: plain {e_plain:.4f}, MAC {e_mac:.4f}"


@pytest.mark.slow
def test_mac_changes_nothing_without_activation_quantization(tiny_trained_captured, calib):
    cal = CalibConfig(num_images=2)
    off = samq_fx.quantize(tiny_trained_captured, calib[:2], QuantConfig(w_bits=4, a_bits=None, calib=cal),
                           progress=False)  # fmt: skip
    on = samq_fx.quantize(
        tiny_trained_captured,
        calib[:2],
        QuantConfig(w_bits=4, a_bits=None, calib=cal, mac=MacConfig()),
        progress=False,
    )
    (rec,) = [r for r in on.mask_decoder.samq_pass_log if r.name == PASS]
    assert rec.result.counts["q_proj"] + rec.result.counts["v_proj"] == 0
    assert len(rec.result.rejected) == 5 and "not quantized" in rec.result.notes[0]
    a, b = off.state_dict(), on.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a if isinstance(a[k], torch.Tensor))


# --- JCAR -----------------------------------------------------------------------------------------


def _composite_mse(model, fp, items, layer: int = 0) -> float:
    """MSE of two-way layer `layer`'s outputs (tokens and image) on quantized inputs vs FP."""
    model = copy.deepcopy(model)
    recon.tag_units(model, ReconConfig(units="joint-cross"))
    unit = recon.extract_unit(model.mask_decoder, f"dec.{layer}.cross", "mask_decoder")
    data = recon.gather(unit, recon.ModelFeed(model), recon.ModelFeed(fp), items)
    return recon.unit_mse(unit, data, torch.device("cpu"))


@pytest.mark.slow
def test_jcar_converges_at_least_as_low_as_branch_by_branch(tiny_trained_captured, calib):
    """Layer 0 of the tiny decoder at W4A4: t2i, MLP and i2t reconstructed one by one (40 steps
    each) vs jointly as dec.0.cross (120 steps), both from the same quantized model; the joint
    unit's composite output error ends at least as low."""
    cal = CalibConfig(num_images=3)
    q = samq_fx.quantize(tiny_trained_captured, calib, QuantConfig(w_bits=4, a_bits=4, calib=cal),
                         progress=False)  # fmt: skip
    items = prepare_calibration(
        tiny_trained_captured, validate_loader(calib, cal), cal, progress=False
    )
    start = _composite_mse(q, tiny_trained_captured, items)
    branch = copy.deepcopy(q)
    recon.reconstruct(branch, tiny_trained_captured, items, ReconConfig(iters=40),
                      units=["dec.0.t2i", "dec.0.mlp", "dec.0.i2t"], progress=False)  # fmt: skip
    joint = copy.deepcopy(q)
    report = recon.reconstruct(joint, tiny_trained_captured, items, ReconConfig(units="joint-cross", iters=120),
                               units=["dec.0.cross"], progress=False)  # fmt: skip
    e_branch, e_joint = (
        _composite_mse(branch, tiny_trained_captured, items),
        _composite_mse(joint, tiny_trained_captured, items),
    )
    assert e_joint <= e_branch and e_joint < start, (
        f"composite MSE: start {start:.5f}, branch-by-branch {e_branch:.5f}, joint {e_joint:.5f}"
    )
    (unit,) = report.units
    assert len(unit.loss_curve) == 120 and all(v >= 0 for v in unit.loss_curve)
    assert unit.loss_first == pytest.approx(sum(unit.loss_curve[:12]) / 12, rel=1e-5)


# --- the method -----------------------------------------------------------------------------------


@pytest.mark.unit
def test_car_sam_switches_names_and_round_trip():
    full = QuantConfig.for_method("car-sam", 4, 4)
    assert CAR_SAM_AGQ and full.agq == AgqConfig()  # the documented default: AGQ softmax grid
    assert full.mac == MacConfig() and full.recon.units == "joint-cross"
    assert full.bimodal is None and full.name == "W4A4-car-sam"
    assert QuantConfig.preset("W4A4-car-sam") == full
    assert QuantConfig.from_dict(full.to_dict()) == full
    assert QuantConfig.for_method("car-sam", 4, 4, agq=True) == full
    strict = QuantConfig.for_method("car-sam", 4, 4, agq=False)  # uniform softmax grid
    assert strict.agq is None and strict.mac == full.mac and strict.recon == full.recon
    assert strict.name == "W4A4-car-sam-noagq"
    assert QuantConfig.from_dict(strict.to_dict()) == strict
    assert QuantConfig.from_dict(strict.to_dict()).name == "W4A4-car-sam-noagq"
    assert QuantConfig.for_method("car-sam", 4, 4, agq=False, mac=False).name == (
        "W4A4-car-sam-nomac-noagq"
    )
    assert dataclasses.replace(full, bimodal=BimodalConfig()).name == "W4A4-car-sam+bimodal"
    nomac = QuantConfig.for_method("car-sam", 4, 4, mac=False)
    assert nomac.mac is None and nomac.recon == full.recon and nomac.name == "W4A4-car-sam-nomac"
    nojcar = QuantConfig.for_method("car-sam", 6, 6, jcar=False, recon_iters=7)
    assert nojcar.recon.units == "ptq4sam" and nojcar.recon.iters == 7 and nojcar.mac
    assert nojcar.name == "W6A6-car-sam-nojcar"
    assert QuantConfig.for_method("car-sam", 4, 4, recon=False).name == "W4A4-car-sam-norecon"
    stacked = QuantConfig(method="mse", mac=MacConfig())
    assert stacked.name == "W8A8-mse+mac"
    assert QuantConfig.for_method("mse", 4, 4, mac=True).mac is None  # mse has no parts
    with pytest.raises(ValueError, match="MAC runs on"):
        MacConfig(attn_kinds=("enc_global",))
    with pytest.raises(ValueError, match="unknown MacConfig keys"):
        MacConfig.from_dict({"lambda": 1.0})


@pytest.mark.slow
def test_car_sam_softmax_quantizer_is_agq_or_uniform_by_switch(tiny_trained_captured, calib):
    """car-sam's post-softmax quantizers: AGQ's log2 grid by default (one per softmax, its
    base searched), a uniform per-tensor asymmetric grid with agq=False."""
    cal = CalibConfig(num_images=2)
    for agq in (True, False):
        cfg = QuantConfig.for_method("car-sam", 4, 4, agq=agq, recon=False, calib=cal)
        if agq:
            cfg = dataclasses.replace(cfg, agq=AgqConfig(search_images=2))
        q = samq_fx.quantize(tiny_trained_captured, calib[:2], cfg, progress=False)
        sites = [n for p in ("image_encoder", "mask_decoder")
                 for n in nodes_with_role(getattr(q, p), "av_matmul")]  # fmt: skip
        assert len(sites) == 11
        logs = [m for m in q.modules() if isinstance(m, Log2Quantizer)]
        searched = ["search_agq" in get_info(n).findings for n in sites]
        if agq:
            assert len(logs) == 11 and all(m.frozen for m in logs) and all(searched)
        else:
            assert logs == [] and not any(searched)
        log2_rows = [r for r in samq_fx.summary(q).rows if r.kind == "log2"]
        assert len(log2_rows) == (11 if agq else 0)


@pytest.mark.slow
def test_car_sam_cli_end_to_end_saves_and_reloads(tmp_path, capsys):
    root = tmp_path / "calib"
    samq_fx.data.make_dataset(root, 2, seed=4243, progress=False)
    out = tmp_path / "c.samq"
    args = [
        "quantize", "--model", "tiny", "--calib-images", str(root / "images"),
        "--calib-annotations", str(root / "annotations.json"), "--calib-size", "2",
        "--method", "car-sam", "--w-bits", "4", "--a-bits", "4", "--recon-iters", "2",
        "--output", str(out), "--no-progress",
    ]  # fmt: skip
    assert main(args) == 0
    assert "W4A4-car-sam" in capsys.readouterr().out
    loaded = samq_fx.load(out)
    assert loaded.samq_config.mac == MacConfig() and loaded.samq_config.recon.iters == 2
    samq_fx.quantizers.assert_deployable(loaded)
    # MAC's correction is in the saved weights: the decoder's t2i v_proj is not the FP one
    fp = dict(samq_fx.build_sam("tiny").named_parameters())
    name = "transformer.layers.0.cross_attn_token_to_image.v_proj.weight"
    saved = dict(loaded.mask_decoder.named_parameters())[name]
    assert not torch.equal(saved, fp[f"mask_decoder.{name}"])
    assert main([*args[:-5], "--no-mac", "--no-jcar", "--no-recon", "--output",
                 str(tmp_path / "d.samq"), "--no-progress"]) == 0  # fmt: skip
    assert "W4A4-car-sam-nomac-norecon" in capsys.readouterr().out


@pytest.mark.unit
def test_samq_recipe_and_its_switches():
    """samq = BIG + AGQ + PCC + MAC + PAR reconstruction on SAQ-SAM's units and schedule (the
    4-seed ablation's choice): saq-sam's configuration plus MAC; CAR-SAM's narrower decoder
    units, plain-MSE units and the statistics-only variant are switches."""
    samq = QuantConfig.for_method("samq", 4, 4)
    saq = QuantConfig.for_method("saq-sam", 4, 4)
    assert samq.name == "W4A4-samq"
    assert all(getattr(samq, part) is not None for part in SAMQ_RECIPE)
    assert samq.recon == saq.recon and samq.recon.units == "saq-stage"
    assert dataclasses.replace(samq, method="saq-sam", mac=None) == saq
    assert samq.mac == QuantConfig.for_method("car-sam", 4, 4).mac
    jcar = QuantConfig.for_method("samq", 4, 4, jcar=True, recon_iters=100)
    assert jcar.name == "W4A4-samq+jcar" and jcar.recon.units == "stage-joint"
    assert jcar.par is not None and jcar.recon.iters == 100
    plain = QuantConfig.for_method("samq", 4, 4, par=False)
    assert (
        plain.name == "W4A4-samq-nopar" and plain.par is None and plain.recon.units == "saq-stage"
    )
    fast = QuantConfig.for_method("samq", 4, 4, recon=False)
    assert fast.name == "W4A4-samq-norecon" and fast.recon is None and fast.par is None
    assert fast.pcc is not None and fast.mac is not None
    for cfg in (samq, jcar, plain, fast):
        assert QuantConfig.from_dict(cfg.to_dict()) == cfg
        assert QuantConfig.from_dict(cfg.to_dict()).name == cfg.name
