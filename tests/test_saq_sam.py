"""SAQ-SAM as passes: PCC (install_pcc_clips), PAR (samq_fx.par), saq-stage units, the method."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import samq_fx
from samq_fx import recon
from samq_fx.calib import forward_item, prepare_calibration, validate_loader
from samq_fx.config import (
    PCC_PERCENTILES,
    CalibConfig,
    ParConfig,
    PccConfig,
    QuantConfig,
    ReconConfig,
)
from samq_fx.demo import calibration_samples
from samq_fx.meta import get_info, nodes_with_role
from samq_fx.par import PromptAwareLoss, keys_node_name
from samq_fx.passes.install_pcc_clips import (
    choose,
    focus_distance,
    percentile_clips,
    search_clip,
)
from samq_fx.passes.tag_blocks import encoder_stages
from samq_fx.quantizers import QuantSpec, UniformQuantizer, assert_deployable
from samq_fx.taps import tap

# --- PCC: candidates, metric, choice ------------------------------------------------------------


@pytest.mark.unit
def test_pcc_candidates_are_the_papers_29():
    ps = PCC_PERCENTILES
    assert len(ps) == 29 and ps[0] == 0.85 and ps[-1] == 0.99999
    assert list(ps) == sorted(set(ps)) and 0.93 in ps and 0.9993 in ps


@pytest.mark.unit
def test_percentile_clips_are_kthvalues():
    x = torch.randn(3, 1000)
    v = x.flatten()
    for (lo, hi), p in zip(percentile_clips(x, (0.9, 0.99, 0.999)), (0.9, 0.99, 0.999)):
        k = math.ceil(p * v.numel())
        assert hi == float(v.kthvalue(k).values)
        assert lo == float(v.kthvalue(v.numel() - k + 1).values)


@pytest.mark.unit
def test_focus_distance_and_ties_go_to_the_harder_clip():
    a = torch.softmax(torch.randn(2, 4, 7, 64) * 4, -1)
    assert focus_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    flat = torch.full_like(a, 1 / 64)  # focus everywhere: IoU = |focus(a)| / 64
    assert 0.8 < focus_distance(a, flat) < 1.0
    assert choose((0.9, 0.95, 0.99), [0.2, 0.1, 0.1]) == 1


def _planted_attention():
    """Keys from a token input with a few huge outliers in a channel the key projection
    ignores (as SAM's decoder has: values mostly in [-1, 1], a few at +-150)."""
    gen = torch.Generator().manual_seed(0)
    n_q, n_k, d = 16, 256, 32
    x = torch.randn(n_k, d, generator=gen) * 0.5
    w_k = torch.randn(d, d, generator=gen) / math.sqrt(d)
    w_k[0] = 0.0  # channel 0 carries the outliers and no information
    x[torch.randperm(n_k, generator=gen)[:6], 0] = torch.tensor([150.0, -140, 160, -150, 120, 155])
    q = torch.randn(n_q, d, generator=gen)

    def attention(keys_in: torch.Tensor) -> torch.Tensor:
        return torch.softmax(q @ (keys_in @ w_k).T * 2.0, -1)[None, None]

    return x, attention


def _fake_quant(x: torch.Tensor, lo: float, hi: float, bits: int = 4) -> torch.Tensor:
    return UniformQuantizer(QuantSpec(bits=bits)).set_clip(lo, hi)(x)


@pytest.mark.unit
def test_pcc_clips_planted_outliers_far_harder_than_mse_and_keeps_focus():
    x, attention = _planted_attention()
    a_fp = attention(x)
    best, clips, curve = search_clip(
        x,
        PCC_PERCENTILES,
        lambda lo, hi: focus_distance(a_fp, attention(_fake_quant(x, lo, hi))),
    )
    lo, hi = clips[best]
    mse = UniformQuantizer(QuantSpec(bits=4, observer="mse"))
    mse(x)
    mse.freeze()
    s, z = float(mse.scale), float(mse.zero_point)
    mse_lo, mse_hi = -z * s, (15 - z) * s
    iou_pcc = 1 - curve[best]
    iou_mse = 1 - focus_distance(a_fp, attention(mse(x)))
    assert (hi - lo) < (mse_hi - mse_lo) / 20, f"PCC [{lo}, {hi}] vs MSE [{mse_lo}, {mse_hi}]"
    # measured at 4 bits: PCC p=0.987 clip [-1.12, 1.13], focus IoU 0.69; MSE range ~[-150,
    # 157], IoU 0.007 (every ordinary value rounds to one level: the attention goes flat)
    assert iou_pcc >= 0.6, f"PCC keeps focus IoU {iou_pcc:.3f} (threshold 0.6)"
    assert iou_mse < 0.1 and iou_pcc > iou_mse + 0.5, f"IoU PCC {iou_pcc:.3f}, MSE {iou_mse:.3f}"


@pytest.mark.unit
@settings(max_examples=60, deadline=None)
@given(
    lo=st.floats(-50, -0.01),
    hi=st.floats(0.01, 50),
    bits=st.integers(2, 8),
    seed=st.integers(0, 2**16),
)
def test_clip_never_changes_values_within_the_bound(lo, hi, bits, seed):
    """A PCC clip only acts beyond its bound: inside, the error is rounding (<= half a step);
    beyond, values land on the grid's end next to the bound."""
    gen = torch.Generator().manual_seed(seed)
    inside = lo + (hi - lo) * torch.rand(500, generator=gen)
    q = UniformQuantizer(QuantSpec(bits=bits)).set_clip(lo, hi)
    step = float(q.scale)
    assert float((q(inside) - inside).abs().max()) <= step / 2 + 1e-5 * max(hi, -lo)
    beyond = torch.tensor([hi * 10 + 1, lo * 10 - 1])
    out = q(beyond)
    assert abs(float(out[0]) - hi) <= step / 2 + 1e-5 and abs(float(out[1]) - lo) <= step / 2 + 1e-5


# --- config ---------------------------------------------------------------------------------------


@pytest.mark.unit
def test_saq_sam_switches_stack_and_round_trip():
    full = QuantConfig.for_method("saq-sam", 4, 4)
    assert full.pcc == PccConfig() and full.par == ParConfig() and full.bimodal and full.agq
    assert full.recon.units == "saq-stage" and full.recon.iters == 2000
    assert full.recon.lr_scale == 2e-3 and full.name == "W4A4-saq-sam"
    assert QuantConfig.preset("W4A4-saq-sam") == full
    no_pcc = QuantConfig.for_method("saq-sam", 4, 4, pcc=False)
    assert no_pcc.pcc is None and no_pcc.par is not None and no_pcc.name == "W4A4-saq-sam-nopcc"
    no_par = QuantConfig.for_method("saq-sam", 4, 4, par=False)
    assert no_par.par is None and no_par.pcc is not None and no_par.recon is not None
    stats = QuantConfig.for_method("saq-sam", 4, 4, recon=False)
    assert stats.par is None and stats.name == "W4A4-saq-sam-norecon"
    for method in ("mse", "minmax", "ptq4sam"):
        stacked = QuantConfig.for_method(method, 6, 6, pcc=True)
        assert stacked.pcc == PccConfig() and stacked.name.endswith("+pcc")
        assert QuantConfig.for_method(method, 6, 6).pcc is None
    for cfg in (full, no_pcc, no_par, stats, QuantConfig.for_method("mse", 4, 4, pcc=True)):
        assert QuantConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="par .* needs recon"):
        QuantConfig(method="saq-sam", par=ParConfig())
    with pytest.raises(ValueError, match="invalid PccConfig"):
        PccConfig(percentiles=(1.2,))


@pytest.mark.unit
def test_encoder_stages_end_at_global_blocks():
    assert encoder_stages(4, (1, 3)) == [(0, 1), (2, 3)]
    assert encoder_stages(12, (2, 5, 8, 11)) == [(0, 1, 2), (3, 4, 5), (6, 7, 8), (9, 10, 11)]
    assert [len(s) for s in encoder_stages(24, (5, 11, 17, 23))] == [6] * 4
    assert [len(s) for s in encoder_stages(32, (7, 15, 23, 31))] == [8] * 4
    assert encoder_stages(5, (1, 3)) == [(0, 1), (2, 3, 4)]


# --- on the tiny SAM ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def calib():
    return calibration_samples(2)


@pytest.fixture(scope="module")
def mse_pcc(tiny_trained_captured, calib):
    cfg = QuantConfig.for_method("mse", 4, 4, pcc=True, calib=CalibConfig(num_images=2))
    return samq_fx.quantize(tiny_trained_captured, calib, cfg, progress=False)


@pytest.mark.slow
def test_pcc_pass_counts_meta_summary_and_save(mse_pcc, tmp_path):
    (rec,) = [r for r in mse_pcc.mask_decoder.samq_pass_log if r.name == "install_pcc_clips"]
    assert rec.result.counts["sites"] == 28 and not rec.result.rejected
    assert rec.result.counts["candidates"] == 28 * 2 * 29
    (enc,) = [r for r in mse_pcc.image_encoder.samq_pass_log if r.name == "install_pcc_clips"]
    assert enc.result.counts["sites"] == 0
    found = {}
    for node in mse_pcc.mask_decoder.graph.nodes:
        info = get_info(node)
        if info is not None and info.role is not None:
            for slot, f in info.findings.get("install_pcc_clips", {}).items():
                found[f["site"]] = f
                assert f["p"] in PCC_PERCENTILES and f["lo"] <= f["hi"]
                assert len(f["curves"]) == 2 and all(len(c) == 29 for c in f["curves"])
                assert f["distance"] == min(f["curves"][-1])
                q = mse_pcc.mask_decoder.get_submodule(node.args[0 if slot != "k" else 1].target)
                assert float(q.clip_lo) == f["lo"] and float(q.clip_hi) == f["hi"]
    assert len(found) == 28 and len({k.split(":")[0] for k in found}) == 7
    rows = [r for r in samq_fx.summary(mse_pcc).rows if "PCC p=" in r.detail]
    assert len(rows) == 28
    loaded = samq_fx.load(samq_fx.save(mse_pcc, tmp_path / "pcc.samq"))
    x = torch.randn(2, 8, 128) * 30
    clipped = [n for n, m in mse_pcc.mask_decoder.samq_quantizers.items()
               if getattr(m, "clip_lo", None) is not None]  # fmt: skip
    assert len(clipped) == 28
    for name in clipped:
        q0, q1 = (
            mse_pcc.mask_decoder.samq_quantizers[name],
            loaded.mask_decoder.samq_quantizers[name],
        )
        assert torch.equal(q1.clip_hi, q0.clip_hi) and torch.equal(q0(x), q1(x))


@pytest.mark.slow
def test_pcc_switched_off_installs_no_clip(tiny_trained_captured, calib):
    cfg = QuantConfig.for_method("mse", 4, 4, calib=CalibConfig(num_images=2))
    q = samq_fx.quantize(tiny_trained_captured, calib, cfg, progress=False)
    assert "install_pcc_clips" not in [r.name for r in q.mask_decoder.samq_pass_log]
    assert all(m.clip_lo is None for m in q.mask_decoder.samq_quantizers.values()
               if isinstance(m, UniformQuantizer))  # fmt: skip


@pytest.mark.slow
def test_pcc_span_reproduces_the_decoder_attention(mse_pcc, calib):
    """Each candidate runs only the site -> softmax stretch: it must equal the full decoder."""
    q = copy.deepcopy(mse_pcc)
    item = prepare_calibration(q, validate_loader(calib, CalibConfig(num_images=1)),
                               CalibConfig(num_images=1), progress=False)[0]  # fmt: skip
    gm = q.mask_decoder
    for softmax in nodes_with_role(gm, "attn_softmax")[::3]:
        info = get_info(softmax)
        (k_proj,) = [
            n for n in nodes_with_role(gm, "k_proj") if get_info(n).attn_path == info.attn_path
        ]
        site = k_proj.args[0].args[0]
        span = recon.extract_span(gm, [site.name], [softmax.name])
        nodes = {n.name: n for n in gm.graph.nodes}
        watch = [nodes[n] for n in [site.name, *span.extras, softmax.name]]
        with torch.no_grad(), tap(gm, watch) as seen:
            forward_item(q, item)
        values = [seen[n.name][0] for n in watch]
        (out,) = span.module(*values[:-1])
        assert torch.equal(out, values[-1]), info.attn_path


@pytest.mark.slow
def test_saq_stage_units_and_par_targets_are_the_fp_decoder(tiny_random_captured, calib):
    """Units of saq-stage; for the last stage the PAR target (with or without layer skipping)
    is exactly the FP decoder's image tokens after the two-way transformer."""
    cfg = QuantConfig.preset("W4A4-minmax", calib=CalibConfig(num_images=2))
    qmodel = samq_fx.quantize(tiny_random_captured, calib, cfg, progress=False)
    units = recon.tag_units(qmodel, ReconConfig(units="saq-stage"))
    assert units == {
        "image_encoder": ["enc.stage0", "enc.stage1", "enc.neck"],
        "mask_decoder": ["dec.0.layer", "dec.1.layer", "dec.final_t2i"],
    }
    assert qmodel.image_encoder.samq_pass_log[-1].result.counts["quantizers_outside"] == 0
    fp = tiny_random_captured
    items = prepare_calibration(fp, validate_loader(calib, cfg.calib), cfg.calib, progress=False)
    keys = next(n for n in fp.mask_decoder.graph.nodes if n.name == keys_node_name(fp.mask_decoder))
    with torch.no_grad(), tap(fp.mask_decoder, [keys]) as seen:
        forward_item(fp, items[0])
    flags = [p.requires_grad for p in fp.parameters()]
    sizes = {}
    for skip in (True, False):
        with PromptAwareLoss(qmodel, fp, ParConfig(layer_skip=skip)) as par:
            assert not any(p.requires_grad for p in fp.parameters())
            target = par.targets("enc.stage1", items[0])
            torch.testing.assert_close(target[0], seen[keys.name][0], rtol=1e-5, atol=1e-5)
            assert par.targets("enc.neck", items[0]) is None
            par.targets("enc.stage0", items[0])
            sizes[skip] = len(par.heads["enc.stage0"].module.graph.nodes)
    assert sizes[False] > 2 * sizes[True]  # without skipping, stage0 runs blocks 2-3 too
    assert [p.requires_grad for p in fp.parameters()] == flags


@pytest.mark.slow
def test_saq_sam_end_to_end_deployable(tiny_random_captured, calib):
    cfg = QuantConfig.for_method("saq-sam", 4, 4, recon_iters=3, calib=CalibConfig(num_images=2))
    small = {"agq": {"search_images": 2}, "pcc": {"percentiles": [0.9, 0.99], "sweeps": 1}}
    cfg = QuantConfig.from_dict({**cfg.to_dict(), **small})
    q = samq_fx.quantize(tiny_random_captured, calib, cfg, progress=False)
    assert assert_deployable(q) > 100
    assert all(m.drop_prob == 1.0 for m in samq_fx.api.quantizers(q).values())
    names = [u.name for u in q.samq_recon.units]
    assert names == ["enc.stage0", "enc.stage1", "enc.neck", "dec.0.layer", "dec.1.layer",
                     "dec.final_t2i"]  # fmt: skip
    stage = q.samq_recon.units[0]
    assert stage.loss_first is not None and stage.mse_before is None  # PAR loss, not unit MSE
