"""capture(): the captured graphs compute what eager SAM computes, and stay a drop-in Sam."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from segment_anything import SamAutomaticMaskGenerator, SamPredictor

import samq_fx
from samq_fx.capture import CapturedSam

RTOL = 1e-5
_FIXTURE_OK = [HealthCheck.function_scoped_fixture]


def _rel_err(a: torch.Tensor | np.ndarray, b: torch.Tensor | np.ndarray) -> float:
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def _image(seed: int, h: int, w: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


@pytest.mark.unit
def test_captured_is_a_sam_with_graph_modules(tiny_random_captured):
    c = tiny_random_captured
    assert isinstance(c, CapturedSam)
    assert isinstance(c.image_encoder, torch.fx.GraphModule)
    assert isinstance(c.mask_decoder, torch.fx.GraphModule)
    assert c.image_encoder.img_size == 256


@pytest.mark.unit
def test_capture_leaves_user_model_untouched(tiny_random):
    before = copy.deepcopy(tiny_random.state_dict())
    samq_fx.capture(tiny_random)
    after = tiny_random.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not isinstance(tiny_random.image_encoder, torch.fx.GraphModule)


@pytest.mark.unit
def test_capture_rejects_captured_and_non_sam(tiny_random_captured):
    with pytest.raises(ValueError, match="already captured"):
        samq_fx.capture(tiny_random_captured)
    with pytest.raises(TypeError, match="segment_anything Sam"):
        samq_fx.capture(torch.nn.Linear(2, 2))


@settings(max_examples=6, deadline=None, suppress_health_check=_FIXTURE_OK)
@given(batch=st.integers(1, 3), seed=st.integers(0, 2**16))
def test_encoder_equals_eager_any_batch(tiny_random, tiny_random_captured, batch, seed):
    x = torch.randn(batch, 3, 256, 256, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        ref = tiny_random.image_encoder(x)
        got = tiny_random_captured.image_encoder(x)
    assert got.shape == ref.shape
    assert _rel_err(got, ref) <= RTOL


@settings(max_examples=8, deadline=None, suppress_health_check=_FIXTURE_OK)
@given(
    h=st.integers(64, 400),
    w=st.integers(64, 400),
    n_boxes=st.integers(1, 5),
    n_points=st.integers(0, 3),
    multimask=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_predictor_equals_eager(
    tiny_random, tiny_random_captured, h, w, n_boxes, n_points, multimask, seed
):
    """Through SamPredictor: any image size, prompt count, boxes with or without points."""
    rng = np.random.default_rng(seed)
    image = _image(seed, h, w)
    x0, y0 = rng.uniform(0, [w / 2, h / 2], size=(n_boxes, 2)).T
    boxes = np.stack(
        [x0, y0, x0 + rng.uniform(4, w / 2, n_boxes), y0 + rng.uniform(4, h / 2, n_boxes)], 1
    )
    pts = rng.uniform(0, [w, h], size=(n_boxes, n_points, 2))
    outs = []
    for model in (tiny_random, tiny_random_captured):
        pred = SamPredictor(model)
        pred.set_image(image)
        tb = pred.transform.apply_boxes_torch(torch.as_tensor(boxes, dtype=torch.float), (h, w))
        coords = labels = None
        if n_points:
            coords = pred.transform.apply_coords_torch(
                torch.as_tensor(pts, dtype=torch.float), (h, w)
            )
            labels = torch.ones(n_boxes, n_points, dtype=torch.int)
        outs.append(
            pred.predict_torch(coords, labels, tb, multimask_output=multimask, return_logits=True)
        )
    (m_ref, s_ref, l_ref), (m_got, s_got, l_got) = outs
    assert m_got.shape == m_ref.shape == (n_boxes, 3 if multimask else 1, h, w)
    assert _rel_err(l_got, l_ref) <= RTOL
    assert _rel_err(s_got, s_ref) <= RTOL


@pytest.mark.unit
def test_points_only_prompts(tiny_random, tiny_random_captured):
    image = _image(1, 200, 300)
    results = []
    for model in (tiny_random, tiny_random_captured):
        pred = SamPredictor(model)
        pred.set_image(image)
        results.append(
            pred.predict(
                point_coords=np.array([[50.0, 60.0], [120.0, 80.0]]),
                point_labels=np.array([1, 0]),
                multimask_output=True,
            )
        )
    assert _rel_err(results[1][2], results[0][2]) <= RTOL
    assert (results[0][0] == results[1][0]).all()


@pytest.mark.slow
def test_automatic_mask_generator_runs(tiny_random_captured):
    gen = SamAutomaticMaskGenerator(tiny_random_captured, points_per_side=4, points_per_batch=8)
    masks = gen.generate(_image(3, 128, 160))
    assert isinstance(masks, list)
    for m in masks:
        assert m["segmentation"].shape == (128, 160)


@pytest.mark.slow
def test_vit_b_predictor_same_masks(vit_b_random, vit_b_captured):
    """The issue's acceptance check: SamPredictor on capture(build_sam('vit_b')) = eager."""
    image = _image(7, 300, 420)
    box = np.array([40, 30, 260, 250])
    points = np.array([[100.0, 120.0]])
    outs = []
    for model in (vit_b_random, vit_b_captured):
        pred = SamPredictor(model)
        pred.set_image(image)
        outs.append(
            pred.predict(
                point_coords=points,
                point_labels=np.array([1]),
                box=box,
                multimask_output=False,
                return_logits=True,
            )
        )
    assert _rel_err(outs[1][2], outs[0][2]) <= RTOL
    assert _rel_err(outs[1][0], outs[0][0]) <= RTOL


@pytest.mark.slow
def test_torch_compile_accepts_captured(tiny_random, tiny_random_captured):
    enc = torch.compile(tiny_random_captured.image_encoder, fullgraph=True)
    x = torch.randn(2, 3, 256, 256)
    with torch.no_grad():
        assert _rel_err(enc(x), tiny_random.image_encoder(x)) <= 1e-4
