"""The quantize engine: plan, insert, calibrate, save/load, summary, bad input."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from segment_anything import SamPredictor

import samq_fx
from samq_fx.api import quantizers
from samq_fx.config import Override, QuantConfig
from samq_fx.data import generate_scene, mask_box
from samq_fx.meta import get_info, nodes_with_role
from samq_fx.passes.plan_quantization import PlanError
from samq_fx.quantizers import Log2Quantizer, UniformQuantizer, assert_deployable


def _loader(n: int = 3, seed: int = 5):
    out = []
    for i in range(n):
        scene = generate_scene(seed, i)
        boxes = [mask_box(m) for m in scene.masks]
        out.append({"image": scene.image, "boxes": np.array(boxes, dtype=np.float32)})
    return out


@pytest.fixture(scope="module")
def w4a4(tiny_random_captured):
    return samq_fx.quantize(
        tiny_random_captured, _loader(), QuantConfig.preset("W4A4"), progress=False
    )


@pytest.mark.unit
def test_quantizer_count_vit_b_structure(vit_b_random):
    """vit_b: 12 blocks x (qkv, proj, fc1, fc2: weight + input; q, k, attn, v) + 2 neck convs
    (weight + input), decoder 7 attentions x (4 proj: weight + input; q, k, attn, v)
    + 2 MLPs x 2 linears x 2."""
    cfg = QuantConfig.preset("W8A8-minmax")
    captured = samq_fx.capture(_skeleton_vit_b())
    from samq_fx.api import _prepare_graphs

    _prepare_graphs(captured, cfg)
    enc = len(quantizers(captured.image_encoder))
    dec = len(quantizers(captured.mask_decoder))
    assert enc == 12 * (4 * 2 + 4) + 2 * 2
    assert dec == 7 * (4 * 2 + 4) + 2 * 2 * 2
    del vit_b_random


def _skeleton_vit_b():
    from samq_fx.models import ARCHS, sam_from_arch

    with torch.device("meta"):
        return sam_from_arch(ARCHS["vit_b"])


@pytest.mark.unit
def test_plan_follows_paper_defaults(w4a4):
    enc, dec = w4a4.image_encoder, w4a4.mask_decoder
    (patch,) = nodes_with_role(enc, "patch_embed")
    assert get_info(patch).quant == {"weight": None, "input": None}
    for node in nodes_with_role(dec, "hypernet_fc", "iou_head_fc", "upscale_conv"):
        assert all(v is None for v in get_info(node).quant.values())
    for node in nodes_with_role(enc, "qkv_proj"):
        q = get_info(node).quant
        assert q["weight"]["spec"]["granularity"] == "channel"
        assert q["weight"]["spec"]["bits"] == 4 and q["input"]["spec"]["granularity"] == "tensor"
        assert q["weight"]["spec"]["symmetric"] is False
    for node in nodes_with_role(dec, "av_matmul"):
        assert set(get_info(node).quant) == {"attn", "v"}


@pytest.mark.unit
def test_user_model_untouched(tiny_random):
    before = copy.deepcopy(tiny_random.state_dict())
    samq_fx.quantize(tiny_random, _loader(1), QuantConfig.preset("W8A8-minmax"), progress=False)
    assert all(torch.equal(before[k], v) for k, v in tiny_random.state_dict().items())
    assert not isinstance(tiny_random.image_encoder, torch.fx.GraphModule)


@pytest.mark.unit
def test_quantized_model_is_deployable_and_predicts(w4a4):
    assert assert_deployable(w4a4) == len(quantizers(w4a4)) > 100
    scene = generate_scene(9, 0)
    pred = SamPredictor(w4a4)
    pred.set_image(scene.image)
    masks, scores, _ = pred.predict(box=np.array([10, 10, 120, 100]), multimask_output=False)
    assert masks.shape == (1, *scene.image.shape[:2]) and np.isfinite(scores).all()


@pytest.mark.unit
def test_weights_land_on_grid(w4a4):
    q = w4a4.image_encoder.samq_quantizers["blocks_0_attn_qkv__weight"]
    w = w4a4.image_encoder.get_parameter("blocks.0.attn.qkv.weight")
    codes = q.int_repr(w)
    assert codes.min() >= 0 and codes.max() <= 15
    assert torch.unique(codes).numel() <= 16


def _predict(model, image, box):
    pred = SamPredictor(model)
    pred.set_image(image)
    return pred.predict(box=box, multimask_output=False, return_logits=True)


def _fidelity(model, reference, n: int = 4) -> float:
    ious = []
    for i in range(n):
        scene = generate_scene(77, i)
        for m in scene.masks[:3]:
            box = np.array(mask_box(m))
            a = _predict(model, scene.image, box)[2] > 0
            b = _predict(reference, scene.image, box)[2] > 0
            union = (a | b).sum()
            ious.append(1.0 if union == 0 else (a & b).sum() / union)
    return float(np.mean(ious))


@pytest.fixture(scope="module")
def tiny_trained():
    return samq_fx.build_sam("tiny")


@pytest.mark.slow
def test_w8a8_keeps_masks_w4a4_does_not(tiny_trained):
    """On the trained tiny SAM and unseen scenes: fidelity (mask IoU vs FP) of W8A8 min-max is
    at least 0.98 once the softmax outputs stay in floating point, and W4A4 is visibly lower.

    With the papers' default, which also puts the softmax outputs on a uniform 8-bit grid,
    fidelity drops to about 0.88 (bench/RESULTS.md): the token->image and global-attention
    probabilities (1024 keys) sit mostly below one grid step. Those sites are what PTQ4SAM's
    log2 quantizer (AGQ) exists for; the test pins both facts so neither drifts silently.
    """
    captured = samq_fx.capture(tiny_trained)
    loader = _loader(4)
    fp_probs = Override(slot="attn", quantize=False)
    w8 = samq_fx.quantize(
        captured, loader, QuantConfig(method="minmax", overrides=(fp_probs,)), progress=False
    )
    w8_all = samq_fx.quantize(captured, loader, QuantConfig.preset("W8A8-minmax"), progress=False)
    w4 = samq_fx.quantize(captured, loader, QuantConfig.preset("W4A4-minmax"), progress=False)
    f8 = _fidelity(w8, tiny_trained, n=6)
    f8_all = _fidelity(w8_all, tiny_trained, n=6)
    f4 = _fidelity(w4, tiny_trained, n=6)
    assert f8 >= 0.98, f"W8A8 min-max (t2i probabilities FP) fidelity {f8:.3f} < 0.98"
    assert f8_all < f8, (
        f"quantizing t2i probabilities should cost fidelity: {f8_all:.3f} vs {f8:.3f}"
    )
    assert f4 < f8_all - 0.05, f"W4A4 fidelity {f4:.3f} not visibly below W8A8's {f8_all:.3f}"


@pytest.mark.unit
def test_calibration_is_deterministic(tiny_random_captured):
    cfg = QuantConfig.preset("W6A6-percentile")
    loader = [{"image": s["image"]} for s in _loader(2)]  # no prompts: AMG-style boxes
    a = samq_fx.quantize(tiny_random_captured, loader, cfg, progress=False)
    b = samq_fx.quantize(tiny_random_captured, loader, cfg, progress=False)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        if isinstance(sa[k], torch.Tensor):
            assert torch.equal(sa[k], sb[k]), k
    assert a.samq_calibration["image_ids"] == ["0", "1"]


@pytest.mark.unit
def test_save_load_round_trip_bit_exact(tmp_path, w4a4):
    path = samq_fx.save(w4a4, tmp_path / "q.samq")
    loaded = samq_fx.load(path)
    scene = generate_scene(11, 0)
    box = np.array([20, 20, 150, 120])
    a, b = _predict(w4a4, scene.image, box), _predict(loaded, scene.image, box)
    assert np.array_equal(a[2], b[2]) and np.array_equal(a[1], b[1])
    assert loaded.samq_config == w4a4.samq_config
    with pytest.raises(FileExistsError, match="exists"):
        samq_fx.save(w4a4, path)


@pytest.mark.unit
def test_load_rejects_other_version_and_truncated(tmp_path, w4a4):
    path = samq_fx.save(w4a4, tmp_path / "q.samq")
    payload = torch.load(path, weights_only=True)
    payload["version"] = 99
    torch.save(payload, tmp_path / "v99.samq")
    with pytest.raises(samq_fx.SaveFileError, match="format version 99"):
        samq_fx.load(tmp_path / "v99.samq")
    (tmp_path / "cut.samq").write_bytes(path.read_bytes()[:5000])
    with pytest.raises(samq_fx.SaveFileError, match="cannot be read"):
        samq_fx.load(tmp_path / "cut.samq")
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(samq_fx.SaveFileError, match="not a samq-fx"):
        samq_fx.load(tmp_path / "other.pt")


@pytest.mark.unit
def test_summary_lists_bits_ranges_and_fp_layers(w4a4):
    s = samq_fx.summary(w4a4)
    text = str(s)
    assert "W4A4-mse" in text and "kept in floating point" in text
    fp_roles = {r.role for r in s.fp_sites()}
    # the position embedding too: a weight-only site the papers' presets leave in float
    assert fp_roles == {"patch_embed", "pos_embed", "upscale_conv", "hypernet_fc", "iou_head_fc"}
    quant = [r for r in s.rows if r.kind == "uniform"]
    assert all(r.bits == 4 and r.lo <= 0 <= r.hi for r in quant if r.slot != "attn")


@pytest.mark.unit
def test_override_is_one_line(tiny_random_captured):
    cfg = QuantConfig(
        w_bits=4,
        a_bits=4,
        method="minmax",
        overrides=(Override(role="upscale_conv", quantize=True, w_bits=8, a_bits=8),),
    )
    q = samq_fx.quantize(tiny_random_captured, _loader(1), cfg, progress=False)
    rows = [r for r in samq_fx.summary(q).rows if r.role == "upscale_conv"]
    assert len(rows) == 4 and all(r.bits == 8 for r in rows)
    others = [r for r in samq_fx.summary(q).rows if r.role == "qkv_proj"]
    assert all(r.bits == 4 for r in others)


@pytest.mark.unit
def test_override_matching_nothing_is_an_error(tiny_random_captured):
    cfg = QuantConfig(overrides=(Override(module=r"blocks\.99\..*", w_bits=8),))
    with pytest.raises(PlanError, match="matches no quantizer site"):
        samq_fx.quantize(tiny_random_captured, _loader(1), cfg, progress=False)


@pytest.mark.unit
@pytest.mark.parametrize("bits", [1, 9, 0, 16])
def test_bits_out_of_range(bits):
    with pytest.raises(ValueError, match="out of range"):
        QuantConfig(w_bits=bits)
    with pytest.raises(ValueError, match="out of range"):
        QuantConfig(a_bits=bits)


@pytest.mark.unit
def test_unknown_preset_lists_valid_names():
    with pytest.raises(ValueError, match="W4A4"):
        QuantConfig.preset("W3A3")


@pytest.mark.unit
def test_config_round_trips_and_rejects_unknown_keys():
    cfg = QuantConfig(w_bits=6, a_bits=6, overrides=(Override(role="neck_conv", w_bits=8),))
    assert QuantConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown QuantConfig keys"):
        QuantConfig.from_dict({**cfg.to_dict(), "wbits": 4})


@pytest.mark.unit
@pytest.mark.parametrize(
    "sample, message",
    [
        ({"image": np.zeros((64, 64), np.uint8)}, "H x W x 3"),
        ({"image": np.zeros((64, 64, 3), np.float32)}, "uint8"),
        (
            {"image": np.zeros((64, 64, 3), np.uint8), "boxes": [[10, 10, 10, 30]]},
            "zero or negative area",
        ),
        (
            {"image": np.zeros((64, 64, 3), np.uint8), "boxes": [[10, 10, 80, 30]]},
            "outside the 64x64",
        ),
        ({"image": "/nonexistent/x.png"}, "does not exist"),
        ({"boxes": [[0, 0, 1, 1]]}, "no 'image' key"),
    ],
)
def test_bad_calibration_input_fails_before_work(tiny_random, sample, message):
    good = {"image": np.zeros((64, 64, 3), np.uint8)}
    with pytest.raises(samq_fx.CalibrationError, match=message):
        samq_fx.quantize(tiny_random, [good, sample], progress=False)


@pytest.mark.unit
def test_empty_calibration_set(tiny_random):
    with pytest.raises(samq_fx.CalibrationError, match="empty calibration set"):
        samq_fx.quantize(tiny_random, [], progress=False)


@pytest.mark.unit
def test_log2_decision_builds_log2_quantizer():
    from samq_fx.passes.insert_quantizers import make_quantizer

    assert isinstance(make_quantizer({"kind": "log2", "bits": 4, "tau": 2}), Log2Quantizer)
    assert isinstance(make_quantizer({"kind": "uniform", "spec": {"bits": 4}}), UniformQuantizer)
    with pytest.raises(ValueError, match="unknown quantizer kind"):
        make_quantizer({"kind": "cubic"})
