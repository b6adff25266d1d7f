"""Block reconstruction: the partition pass (tag_blocks) and the driver (samq_fx.recon)."""

from __future__ import annotations

import copy

import pytest
import torch

import samq_fx
from samq_fx import recon
from samq_fx.calib import forward_item, prepare_calibration, validate_loader
from samq_fx.config import ReconConfig
from samq_fx.demo import calibration_samples
from samq_fx.meta import get_info
from samq_fx.passes.tag_blocks import unit_members
from samq_fx.pipeline import PassError
from samq_fx.quantizers import UniformQuantizer, assert_deployable, dequantize

ENC_UNITS = [f"enc.{i}.{k}" for i in range(4) for k in ("attn", "mlp")] + ["enc.neck"]
DEC_UNITS = [f"dec.{i}.{k}" for i in range(2) for k in ("self_attn", "t2i", "mlp", "i2t")] + [
    "dec.final_t2i"
]


@pytest.fixture(scope="module")
def setup(tiny_random_captured):
    """(quantized model, FP capture, calibration items); tests reconstruct deep copies."""
    cfg = samq_fx.QuantConfig.preset("W4A4-minmax")
    samples = calibration_samples(2)
    qmodel = samq_fx.quantize(tiny_random_captured, samples, cfg, progress=False)
    raws = validate_loader(samples, cfg.calib)
    items = prepare_calibration(tiny_random_captured, raws, cfg.calib, progress=False)
    return qmodel, tiny_random_captured, items


def _quantizer_nodes(gm):
    return [n for n in gm.graph.nodes if n.op == "call_module" and "site" in get_info(n).quant]


# --- tag_blocks: structure, counts, modes ------------------------------------------------------


def test_ptq4sam_units_in_forward_order_and_every_quantizer_in_one(setup):
    qmodel = copy.deepcopy(setup[0])
    units = recon.tag_units(qmodel, ReconConfig())
    assert units == {"image_encoder": ENC_UNITS, "mask_decoder": DEC_UNITS}
    for part in recon.PARTS:
        gm = getattr(qmodel, part)
        assert gm.samq_units == units[part]
        result = gm.samq_pass_log[-1].result
        assert result.counts["units"] == 9 and result.counts["quantizers_outside"] == 0
        outside = [n.name for n in _quantizer_nodes(gm) if get_info(n).unit is None]
        assert not outside, f"quantizers in no unit: {outside}"
        assert result.counts["quantizers"] == len(_quantizer_nodes(gm))


def test_units_follow_roles_and_glue_is_none(setup):
    qmodel = copy.deepcopy(setup[0])
    recon.tag_units(qmodel, ReconConfig())
    for part, prefix in (("image_encoder", "enc"), ("mask_decoder", "dec")):
        for node in getattr(qmodel, part).graph.nodes:
            info = get_info(node)
            if info is None:
                continue
            if info.role in ("qkv_proj", "out_proj", "attn_softmax") and prefix == "enc":
                assert info.unit == f"enc.{info.block}.attn", node.name
            if info.role in ("mlp_fc1", "mlp_fc2"):
                assert info.unit == f"{prefix}.{info.block}.mlp", node.name
            if info.module_type == "LayerNorm" or info.role == "patch_embed":
                assert info.unit is None, f"glue {node.name} tagged {info.unit}"
            if info.unit is not None:
                assert "tag_blocks" in info.touched_by
    add = torch.ops.aten.add.Tensor
    residual = [
        n
        for n in qmodel.image_encoder.graph.nodes
        if n.target is add and get_info(n).module_type == "Block"
    ]
    assert len(residual) == 8 and all(get_info(n).unit is None for n in residual)


def test_joint_cross_merges_t2i_mlp_i2t_with_their_glue(setup):
    qmodel = copy.deepcopy(setup[0])
    units = recon.tag_units(qmodel, ReconConfig(units="joint-cross"))
    assert units["image_encoder"] == ENC_UNITS
    assert units["mask_decoder"] == [
        "dec.0.self_attn",
        "dec.0.cross",
        "dec.1.self_attn",
        "dec.1.cross",
        "dec.final_t2i",
    ]
    paths = {get_info(n).module_path for n in unit_members(qmodel.mask_decoder, "dec.0.cross")}
    layer = "transformer.layers.0"
    assert {f"{layer}.norm2", f"{layer}.norm3", f"{layer}.mlp.lin1"} <= paths
    assert f"{layer}.norm4" not in paths and f"{layer}.self_attn" not in paths
    unit = recon.extract_unit(qmodel.mask_decoder, "dec.0.cross", "mask_decoder")
    assert len(unit.weight_quantizers) == 4 + 2 + 4 and len(unit.outputs) == 2


def test_unknown_unit_mode_lists_the_modes(setup):
    qmodel = copy.deepcopy(setup[0])
    with pytest.raises(PassError, match=r"unknown reconstruction unit mode 'bogus'.*ptq4sam"):
        recon.tag_units(qmodel, ReconConfig(units="bogus"))


# --- extraction ---------------------------------------------------------------------------------


def test_extracted_units_reproduce_the_full_model_exactly(setup):
    qmodel, _, items = setup
    qmodel = copy.deepcopy(qmodel)
    feed = recon.ModelFeed(qmodel)
    for part, names in recon.tag_units(qmodel, ReconConfig()).items():
        for name in names:
            unit = recon.extract_unit(getattr(qmodel, part), name, part)
            (values,) = recon.record(feed, part, unit.inputs + unit.outputs, items[1:])
            k = len(unit.inputs)
            outs = unit(*values[:k])
            assert len(outs) == len(unit.outputs) >= 1
            for out, want in zip(outs, values[k:]):
                assert torch.equal(out, want), f"{name}: extracted unit differs"
            # shares qmodel's quantizers and weights (optimising the unit optimises qmodel)
            site, q, w = unit.weight_quantizers[0]
            assert unit.module.get_submodule(f"samq_quantizers.{site}") is q


# --- optimisation -------------------------------------------------------------------------------


@pytest.mark.slow
def test_reconstruction_reduces_unit_mse(setup):
    qmodel, fp, items = setup
    qmodel = copy.deepcopy(qmodel)
    cfg = ReconConfig(iters=40, lr_round=1e-2)
    report = recon.reconstruct(
        qmodel, fp, items, cfg, units=["enc.0.attn", "dec.0.t2i"], progress=False
    )
    assert [u.name for u in report.units] == ["enc.0.attn", "dec.0.t2i"]
    for u in report.units:
        # measured (W4A4-minmax, random tiny SAM, 40 steps):
        #   enc.0.attn 3.59e-3 -> 2.84e-3 (-21%), dec.0.t2i 7.36e-3 -> 4.90e-3 (-33%)
        assert u.mse_after < 0.85 * u.mse_before, (
            f"{u.name}: unit MSE {u.mse_before:.4g} -> {u.mse_after:.4g}, want a 15% cut"
        )
        assert u.loss_last < u.loss_first
    assert_deployable(qmodel)


def test_reconstruction_is_deterministic_for_a_seed(setup):
    qmodel, fp, items = setup
    states = []
    for _ in range(2):
        q = copy.deepcopy(qmodel)
        recon.reconstruct(
            q, fp, items, ReconConfig(iters=5, seed=3), units=["dec.0.mlp"], progress=False
        )
        sd = q.mask_decoder.samq_quantizers.state_dict()
        states.append({k: v.clone() for k, v in sd.items() if isinstance(v, torch.Tensor)})
    assert states[0].keys() == states[1].keys()
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
    key = "transformer_layers_0_mlp_lin1__input.scale"
    assert not torch.equal(states[0][key], qmodel.mask_decoder.samq_quantizers.state_dict()[key])


def test_loss_and_target_plugins_and_prompt_cap(setup):
    qmodel, fp, items = setup
    q = copy.deepcopy(qmodel)
    calls, prompts = [], []

    def target_fn(unit, item):
        prompts.append(item.num_prompts)
        return [torch.zeros(item.num_prompts, 7, 128)]  # 1 IoU + 4 mask tokens + 2 box corners

    def loss_fn(preds, targets, unit):
        calls.append((unit, float(targets[0].abs().sum())))
        return sum((p - t).pow(2).mean() for p, t in zip(preds, targets))

    cfg = ReconConfig(iters=3, max_prompts=4)
    report = recon.reconstruct(
        q,
        fp,
        items,
        cfg,
        loss_fn=loss_fn,
        target_fn=target_fn,
        units=["dec.0.mlp"],
        progress=False,
    )
    assert prompts == [min(it.num_prompts, 4) for it in items] and max(prompts) == 4
    assert calls == [("dec.0.mlp", 0.0)] * 3
    assert report.units[0].iters == 3 and report.units[0].mse_before is not None


def test_channel_sse_and_beta_schedule():
    p, t = torch.randn(2, 5, 8), torch.randn(2, 5, 8)
    want = (p - t).pow(2).sum(-1).mean()
    assert torch.allclose(recon.channel_sse([p], [t]), want)
    nchw = torch.randn(2, 8, 3, 3)
    got = recon.channel_sse([nchw], [torch.zeros_like(nchw)], channel_dims=[1])
    assert torch.allclose(got, nchw.pow(2).sum(1).mean())
    cfg = ReconConfig(iters=100, beta=(20.0, 2.0), warmup=0.2)
    assert recon.beta_at(19, cfg) is None
    assert recon.beta_at(20, cfg) == 20.0 and recon.beta_at(100, cfg) == 2.0
    assert 2.0 < recon.beta_at(60, cfg) < 20.0


def test_reconstruct_rejects_bad_models_and_units(setup):
    qmodel, fp, items = setup
    cfg = ReconConfig(iters=1)
    with pytest.raises(ValueError, match="fp_model is qmodel"):
        recon.reconstruct(qmodel, qmodel, items, cfg, progress=False)
    with pytest.raises(ValueError, match="enabled quantizers"):
        recon.reconstruct(qmodel, copy.deepcopy(qmodel), items, cfg, progress=False)
    with pytest.raises(ValueError, match=r"unknown units \['enc.9.attn'\].*enc.0.attn"):
        recon.reconstruct(
            copy.deepcopy(qmodel), fp, items, cfg, units=["enc.9.attn"], progress=False
        )
    dropped = copy.deepcopy(qmodel)
    dropped.image_encoder.get_submodule("samq_quantizers.blocks_0_attn_qkv__input").drop_prob = 0.5
    with pytest.raises(ValueError, match="calibrated, frozen qmodel.*drop_prob=0.5"):
        recon.reconstruct(dropped, fp, items, cfg, progress=False)


# --- the whole model, a few steps per unit ------------------------------------------------------


@pytest.fixture(scope="module")
def reconstructed(setup):
    qmodel, fp, items = setup
    q = copy.deepcopy(qmodel)
    report = recon.reconstruct(q, fp, items, ReconConfig(iters=2), progress=False)
    return q, report


@pytest.mark.slow
def test_after_reconstruct_everything_is_deployable_and_on_the_grid(reconstructed):
    q, report = reconstructed
    assert [u.name for u in report.units] == ENC_UNITS + DEC_UNITS
    assert all(u.iters == 2 for u in report.units)
    assert "enc.neck" in report.format_table()
    assert assert_deployable(q) > 0
    n_weights = 0
    for name, module in q.named_modules():
        if not isinstance(module, UniformQuantizer):
            continue
        assert module.drop_prob == 1.0 and not module.scale.requires_grad, name
    for part in recon.PARTS:
        gm = getattr(q, part)
        for node in _quantizer_nodes(gm):
            if get_info(node).quant["slot"] != "weight":
                continue
            quantizer = gm.get_submodule(node.target)
            w = gm.get_parameter(node.args[0].target)
            assert quantizer.rounding == "hard", node.target
            codes = quantizer.int_repr(w)
            assert 0 <= int(codes.min()) and int(codes.max()) <= 15
            s, z, _, _ = quantizer.qparams()
            on_grid = dequantize(codes, s, z, ch_axis=quantizer.spec.ch_axis)
            with torch.no_grad():
                assert torch.equal(quantizer(w), on_grid), f"{node.target} is off the grid"
            n_weights += 1
    assert n_weights == 2 * 4 * 2 + 2 + (3 * 2 + 1) * 4 + 2 * 2


@pytest.mark.slow
def test_qdrop_is_off_after_reconstruct(reconstructed, setup):
    """Two forwards under different seeds agree: any quantizer left at drop_prob 0.5 would make
    them differ, as the probe below shows."""
    q, _ = reconstructed
    item = setup[2][0]

    def run(model, seed):
        torch.manual_seed(seed)
        with torch.no_grad():
            return forward_item(model, item)[0]

    assert torch.equal(run(q, 0), run(q, 1))
    probe = copy.deepcopy(q)
    for name, module in probe.named_modules():
        if name.endswith("__input"):
            module.drop_prob = 0.5  # what the reference repos leave on at test time (§5.1)
    assert not torch.equal(run(probe, 0), run(probe, 1))


def test_stage_joint_is_saq_stages_in_the_encoder_and_joint_cross_in_the_decoder(setup):
    """samq + PAR's units: SAQ-SAM's encoder stages, CAR-SAM's joint decoder layers."""
    qmodel = copy.deepcopy(setup[0])
    units = recon.tag_units(qmodel, ReconConfig(units="stage-joint"))
    assert units["image_encoder"] == ["enc.stage0", "enc.stage1", "enc.neck"]
    assert (
        units["mask_decoder"]
        == recon.tag_units(copy.deepcopy(setup[0]), ReconConfig(units="joint-cross"))[
            "mask_decoder"
        ]
    )
