"""PTQ4SAM as passes, end to end: AGQ's search, the composed method, its ablation switches."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import samq_fx
from samq_fx.config import AgqConfig, CalibConfig, QuantConfig, ReconConfig
from samq_fx.data import Sample, generate_scene, mask_box
from samq_fx.demo import calibration_samples
from samq_fx.eval import predict_image
from samq_fx.meta import get_info, nodes_with_role
from samq_fx.passes.search_agq import _log_search, agq_errors
from samq_fx.quantizers import Log2Quantizer


@pytest.fixture(scope="module")
def trained():
    return samq_fx.build_sam("tiny")


@pytest.fixture(scope="module")
def captured(trained):
    return samq_fx.capture(trained)


@pytest.fixture(scope="module")
def calib():
    return calibration_samples(3)


def _fidelity(model, reference, n: int = 5) -> float:
    """Mask IoU against `reference` on unseen generated scenes, every object's box a prompt."""
    ious = []
    for i in range(n):
        scene = generate_scene(20_001, i)
        boxes = np.array([mask_box(m) for m in scene.masks], dtype=np.float32)
        sample = Sample(i, f"{i}.png", scene.image, boxes, np.stack(scene.masks),
                        np.ones(len(boxes), np.int64), np.arange(len(boxes)))  # fmt: skip
        ious += predict_image(model, sample, reference=reference).fidelity_ious
    return float(np.mean(ious))


@pytest.mark.unit
def test_log_search_finds_minimum():
    s, err = _log_search(lambda s: (np.log10(s) + 1.3) ** 2, 1e-3, 1.0, 12)
    assert abs(np.log10(s) + 1.3) < 0.1 and err < 0.01


@pytest.mark.unit
def test_agq_errors_prefers_finer_base_for_spread_probabilities():
    """Probabilities spread over many keys (most far below the max) are better served by a
    finer base (larger tau) than by powers of two at 4 bits."""
    torch.manual_seed(0)
    a = torch.softmax(torch.randn(4, 64, 1024) * 3, -1)
    v = torch.randn(4, 1024, 16)
    res = agq_errors(a, v, bits=4, taus=(1, 2, 4), candidates=12, p=2.0)
    assert set(res) == {1, 2, 4}
    assert all(0 < s <= 1 for s, _ in res.values())
    errs = {t: e for t, (_, e) in res.items()}
    assert min(errs, key=errs.get) in (2, 4), errs


@pytest.mark.slow
def test_agq_search_records_bases_and_beats_uniform(trained, captured, calib):
    cal = CalibConfig(num_images=3)
    agq = samq_fx.quantize(
        captured, calib, QuantConfig(method="ptq4sam", w_bits=4, a_bits=4,
                                     agq=AgqConfig(search_images=3), calib=cal), progress=False
    )  # fmt: skip
    uniform = samq_fx.quantize(
        captured, calib, QuantConfig(method="mse", w_bits=4, a_bits=4, calib=cal), progress=False
    )
    sites = [n for p in ("image_encoder", "mask_decoder")
             for n in nodes_with_role(getattr(agq, p), "av_matmul")]  # fmt: skip
    assert len(sites) == 11
    for node in sites:
        f = get_info(node).findings["search_agq"]
        assert f["tau"] in (1, 2, 4) and 0 < f["scale"] <= 1 and f["images"] == 3
    logs = [m for m in agq.modules() if isinstance(m, Log2Quantizer)]
    assert len(logs) == 11 and all(m.frozen for m in logs)
    rows = [r for r in samq_fx.summary(agq).rows if r.kind == "log2"]
    assert len(rows) == 11 and all(r.detail.startswith("tau=") for r in rows)
    f_agq, f_uni = _fidelity(agq, trained), _fidelity(uniform, trained)
    assert f_agq > f_uni + 0.05, f"AGQ fidelity {f_agq:.3f} vs uniform softmax {f_uni:.3f}"


@pytest.mark.unit
def test_method_switches_are_independent():
    full = QuantConfig.for_method("ptq4sam", 4, 4)
    assert full.bimodal and full.agq and full.recon and full.recon.iters == 20_000
    for off in ("bimodal", "agq", "recon"):
        cfg = QuantConfig.for_method("ptq4sam", 4, 4, **{off: False})
        assert getattr(cfg, off) is None
        assert all(getattr(cfg, k) is not None for k in ("bimodal", "agq", "recon") if k != off)
    assert QuantConfig.for_method("ptq4sam", 4, 4, agq=False).name == "W4A4-ptq4sam-noagq"
    assert QuantConfig.from_dict(full.to_dict()) == full
    assert QuantConfig.preset("W4A4-ptq4sam") == full


@pytest.mark.slow
def test_ptq4sam_end_to_end_deployable_and_saves(tmp_path, captured, calib):
    """BIG + AGQ + reconstruction (a few steps a unit): every quantizer quantizes at the end
    (no QDrop, hard rounding), and the file reloads to the same outputs."""
    cfg = QuantConfig.for_method("ptq4sam", 4, 4, recon_iters=2, calib=CalibConfig(num_images=2))
    cfg = QuantConfig.from_dict({**cfg.to_dict(), "agq": {"search_images": 2}})
    q = samq_fx.quantize(captured, calib[:2], cfg, progress=False)
    assert samq_fx.quantizers.assert_deployable(q) > 100
    assert all(m.drop_prob == 1.0 for m in samq_fx.api.quantizers(q).values())
    assert len(q.samq_recon.units) == 18
    decoder_log = [r.name for r in q.mask_decoder.samq_pass_log]
    assert decoder_log[:4] == [
        "canonicalize",
        "annotate_roles",
        "detect_bimodal",
        "fold_bimodal_signs",
    ]
    path = samq_fx.save(q, tmp_path / "p.samq")
    loaded = samq_fx.load(path)
    x = torch.randn(1, 3, 256, 256)
    with torch.no_grad():
        assert torch.equal(q.image_encoder(x), loaded.image_encoder(x))


@pytest.mark.unit
def test_recon_config_validation():
    with pytest.raises(ValueError, match="invalid ReconConfig"):
        ReconConfig(drop_prob=0.0)
