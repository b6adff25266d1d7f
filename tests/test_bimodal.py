"""PTQ4SAM's Bimodal Integration: `detect_bimodal` (analysis) and `fold_bimodal_signs` (rewrite).

Four ways: structure (the graph is unchanged, records written), counts (positive and negative
cases), equivalence as a property (any +-1 signs on any attention leave every fp32 output
bit-identical), error paths. Numerics of the point of it all: after the fold the keys quantize
with lower error.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from samq_fx.calib import CalibItem, forward_item
from samq_fx.config import BimodalConfig, QuantConfig
from samq_fx.meta import ATTN_KINDS, get_info, nodes_with_role
from samq_fx.passes.detect_bimodal import bimodal_test, channel_signs, detect_bimodal
from samq_fx.passes.fold_bimodal_signs import (
    FoldError,
    attention_paths,
    fold_bimodal_signs,
    fold_signs,
    fold_sites,
)
from samq_fx.pipeline import PassContext, run_passes
from samq_fx.quantizers import QuantSpec, UniformQuantizer
from samq_fx.taps import tap

T2I0 = "transformer.layers.0.cross_attn_token_to_image"
BIG = QuantConfig(bimodal=BimodalConfig())
PROPERTY = settings(
    max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


# -- helpers ------------------------------------------------------------------------------------


def _inputs(img_size: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    image = torch.randn(1, 3, img_size, img_size, generator=g)
    s = img_size / 256
    boxes = torch.tensor([[10.0, 20, 100, 120], [50, 60, 200, 240], [0, 0, 255, 255]]) * s
    return image, boxes


def _run(model, image, boxes, emb=None):
    """(image embedding, masks, IoU): encoder (unless emb is given), prompt encoder, decoder."""
    with torch.no_grad():
        if emb is None:
            emb = model.image_encoder(image)
        sparse, dense = model.prompt_encoder(points=None, boxes=boxes, masks=None)
        masks, iou = model.mask_decoder(
            emb, model.prompt_encoder.get_dense_pe(), sparse, dense, True
        )
    return emb, masks, iou


def _items(n: int = 2, img_size: int = 256) -> list[CalibItem]:
    items = []
    for i in range(n):
        image, boxes = _inputs(img_size, seed=100 + i)
        items.append(CalibItem(str(i), image, (img_size,) * 2, (img_size,) * 2, boxes, None, None))
    return items


def _random_signs(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 2, (n,), generator=g) * 2 - 1


def _sign_length(gm, path: str) -> int:
    sites = fold_sites(gm, path)
    return sites.head_dim if sites.encoder else sites.channels


def _param(gm, target: str) -> torch.Tensor:
    return gm.get_parameter(target)


def _ctx(model, part: str, config=BIG, items=None) -> PassContext:
    state = {"model": model, "calib_items": items if items is not None else _items()}
    return PassContext(part, model.samq_arch, config, state)


def _check_fold_exact(model, part: str, flips, ref, image, boxes):
    """Fold each (attn_path, signs) of `flips`, compare every output bit for bit, fold again
    (which must restore the parameters bit for bit)."""
    gm = getattr(model, part)
    sites = [fold_sites(gm, path) for path, _ in flips]
    targets = [t for s in sites for _, w, b, _ in s.linears for t in (w, b) if t]
    targets += [t for s in sites for t in s.tables]
    before = {t: _param(gm, t).clone() for t in targets}
    done = []
    try:
        for (path, signs), site in zip(flips, sites):
            fold_signs(gm, path, signs)
            done.append((path, signs))
            weight = site.linears[0][1]
            assert torch.equal(_param(gm, weight), before[weight]) == bool((signs > 0).all())
        out = _run(model, image, boxes, emb=None if part == "image_encoder" else ref[0])
    finally:
        for path, signs in done:
            fold_signs(gm, path, signs)
    paths = [p for p, _ in flips]
    for name, a, b in zip(("embedding", "masks", "iou"), ref, out):
        assert torch.equal(a, b), f"{paths}: {name} differs by {float((a - b).abs().max())}"
    for t in targets:
        assert torch.equal(_param(gm, t), before[t]), f"folding twice did not restore {t}"


# -- fixtures -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_exact(tiny_random_captured):
    """A private copy of the random tiny SAM (the property test edits it and restores it)."""
    model = copy.deepcopy(tiny_random_captured)
    image, boxes = _inputs(256)
    return model, _run(model, image, boxes), image, boxes


@pytest.fixture
def tiny(tiny_random_captured):
    return copy.deepcopy(tiny_random_captured)


@pytest.fixture
def planted(tiny):
    """tiny, with the layer-0 token->image key made bimodal: small weights, biases of +-8."""
    k_proj = tiny.mask_decoder.get_submodule(f"{T2I0}.k_proj")
    g = torch.Generator().manual_seed(7)
    signs = _random_signs(k_proj.weight.shape[0], seed=7)
    with torch.no_grad():
        k_proj.weight.normal_(0.0, 0.05, generator=g)
        k_proj.bias.copy_(8.0 * signs)
    return tiny, signs


def _key_node(gm, path: str, role: str = "k_proj"):
    (node,) = [n for n in nodes_with_role(gm, role) if get_info(n).attn_path == path]
    return node


# -- (a) equivalence: any signs, any attention, outputs bit-identical ---------------------------


@pytest.mark.unit
@PROPERTY
@given(data=st.data())
def test_fold_signs_keeps_tiny_outputs_bit_identical(tiny_exact, data):
    model, ref, image, boxes = tiny_exact
    part = data.draw(st.sampled_from(["image_encoder", "mask_decoder"]))
    gm = getattr(model, part)
    path = data.draw(st.sampled_from(attention_paths(gm)))
    signs = _random_signs(_sign_length(gm, path), data.draw(st.integers(0, 2**31 - 1)))
    if part == "image_encoder" and data.draw(st.booleans()):  # the same signs, one per channel
        signs = signs.repeat(fold_sites(gm, path).num_heads)
    _check_fold_exact(model, part, [(path, signs)], ref, image, boxes)


@pytest.mark.unit
def test_property_covers_every_attention_kind(tiny_exact):
    model = tiny_exact[0]
    kinds = {
        get_info(n).attn_kind
        for part in ("image_encoder", "mask_decoder")
        for n in nodes_with_role(getattr(model, part), "qk_matmul")
    }
    assert kinds == set(ATTN_KINDS)


@pytest.mark.unit
@pytest.mark.parametrize("part", ["image_encoder", "mask_decoder"])
def test_all_minus_one_is_exact_too(tiny_exact, part):
    model, ref, image, boxes = tiny_exact
    gm = getattr(model, part)
    for path in attention_paths(gm):
        signs = -torch.ones(_sign_length(gm, path), dtype=torch.int64)
        _check_fold_exact(model, part, [(path, signs)], ref, image, boxes)


@pytest.mark.unit
def test_flipping_k_alone_changes_the_masks(tiny_exact):
    """Control: the equality above is not vacuous; k without q breaks q.k^T."""
    model, ref, image, boxes = tiny_exact
    w = model.mask_decoder.get_parameter(f"{T2I0}.k_proj.weight")
    saved = w.detach().clone()
    with torch.no_grad():
        w[:8].neg_()
    try:
        out = _run(model, image, boxes, emb=ref[0])
    finally:
        with torch.no_grad():
            w.copy_(saved)
    assert not torch.equal(out[1], ref[1])


@pytest.fixture(scope="module")
def vit_b_exact(vit_b_captured):
    model = copy.deepcopy(vit_b_captured)
    image, boxes = _inputs(1024)
    return model, _run(model, image, boxes), image, boxes


@pytest.mark.slow
@settings(
    max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.data())
def test_fold_signs_keeps_vit_b_decoder_bit_identical(vit_b_exact, data):
    model, ref, image, boxes = vit_b_exact
    path = data.draw(st.sampled_from(attention_paths(model.mask_decoder)))
    signs = _random_signs(_sign_length(model.mask_decoder, path), data.draw(st.integers(0, 2**31)))
    _check_fold_exact(model, "mask_decoder", [(path, signs)], ref, image, boxes)


@pytest.mark.slow
@settings(
    max_examples=1, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(seed=st.integers(0, 2**31))
def test_fold_signs_keeps_vit_b_encoder_bit_identical(vit_b_exact, seed):
    """A window and a global attention flipped at once: one 1024^2 forward (~70 s on 1 core)."""
    model, ref, image, boxes = vit_b_exact
    gm = model.image_encoder
    kinds = {
        p: get_info(_key_node(gm, p, "k")).attn_kind for p in ("blocks.0.attn", "blocks.2.attn")
    }
    assert kinds == {"blocks.0.attn": "enc_window", "blocks.2.attn": "enc_global"}
    flips = [(p, _random_signs(_sign_length(gm, p), seed + i)) for i, p in enumerate(kinds)]
    _check_fold_exact(model, "image_encoder", flips, ref, image, boxes)


# -- (b) detection: planted samples and one end-to-end model ------------------------------------


@pytest.mark.unit
@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**31), center=st.floats(4.0, 16.0), tokens=st.sampled_from([256, 1024]))
def test_bimodal_test_finds_planted_peaks(seed, center, tokens):
    rng = np.random.default_rng(seed)
    signs = rng.choice([-1.0, 1.0], size=64)
    signs[:16], signs[16:32] = 1.0, -1.0  # both peaks populated
    k = signs * center + rng.normal(size=(tokens, 64))
    verdict, peaks = bimodal_test(k, BimodalConfig())
    assert verdict and len(peaks) == 2
    assert np.allclose(peaks, [-center, center], atol=0.1 * center + 0.5), peaks


@pytest.mark.unit
@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**31), scale=st.floats(0.1, 10.0))
def test_bimodal_test_rejects_unimodal(seed, scale):
    rng = np.random.default_rng(seed)
    k = rng.normal(loc=rng.normal(size=64) * 0.3 * scale, scale=scale, size=(1024, 64))
    verdict, peaks = bimodal_test(k, BimodalConfig())
    assert not verdict and len(peaks) == 1


@pytest.mark.unit
def test_bimodal_test_other_shapes():
    rng = np.random.default_rng(0)
    three = np.concatenate([rng.normal(c, 1.0, 20000) for c in (-12.0, 0.0, 12.0)])
    verdict, peaks = bimodal_test(three, BimodalConfig())
    assert not verdict and np.allclose(peaks, [-12, 0, 12], atol=1.0), peaks
    assert bimodal_test(np.full(100, 3.0), BimodalConfig())[0] is False
    with pytest.raises(ValueError, match="finite"):
        bimodal_test(np.array([1.0, np.nan]), BimodalConfig())


@pytest.mark.unit
def test_channel_signs_never_zero():
    signs = channel_signs(torch.tensor([-2.0, 0.0, 3.0, -0.0, -1e-30]))
    assert signs.tolist() == [-1, 1, 1, 1, -1]


@pytest.mark.unit
def test_detects_planted_bimodal_key_and_folds_it_exactly(planted):
    model, planted_signs = planted
    gm = model.mask_decoder
    nodes_before = [(n.op, n.target) for n in gm.graph.nodes]
    w_k = gm.get_parameter(f"{T2I0}.k_proj.weight").detach().clone()
    w_q = gm.get_parameter(f"{T2I0}.q_proj.weight").detach().clone()
    image, boxes = _inputs(256)
    ref = _run(model, image, boxes)

    ctx = _ctx(model, "mask_decoder")
    detect, fold = run_passes(gm, ctx, [detect_bimodal, fold_bimodal_signs])[-2:]

    assert detect.result.counts == {"candidates": 3, "bimodal": 1}
    assert set(detect.result.rejected) == {
        "transformer.layers.1.cross_attn_token_to_image",
        "transformer.final_attn_token_to_image",
    }
    finding = get_info(_key_node(gm, T2I0)).findings["detect_bimodal"]
    assert finding["bimodal"] and finding["peaks"] == 2
    assert finding["signs"] == planted_signs.tolist()
    assert finding["flipped"] == int((planted_signs < 0).sum())
    assert finding["tested"] == {"image": 0, "image_id": "0", "prompt": 0, "values": 1024 * 64}

    assert fold.result.counts == {"folded": 1, "considered": 3}
    assert [(n.op, n.target) for n in gm.graph.nodes] == nodes_before
    g = planted_signs.float()[:, None]
    assert torch.equal(gm.get_parameter(f"{T2I0}.k_proj.weight"), w_k * g)
    assert torch.equal(gm.get_parameter(f"{T2I0}.q_proj.weight"), w_q * g)
    q_node = _key_node(gm, T2I0, "q_proj")
    assert get_info(q_node).findings["fold_bimodal_signs"]["flipped"] == finding["flipped"]
    assert "fold_bimodal_signs" in get_info(q_node).touched_by
    out = _run(model, image, boxes)
    assert all(torch.equal(a, b) for a, b in zip(ref, out))

    again = fold_bimodal_signs(gm, ctx)  # a second run must not flip back
    assert again.counts["folded"] == 0 and again.rejected[T2I0] == "already folded"


@pytest.mark.unit
def test_detects_encoder_keys_per_head_dim(tiny):
    config = QuantConfig(bimodal=BimodalConfig(attn_kinds=("enc_window", "enc_global")))
    ctx = _ctx(tiny, "image_encoder", config, _items(1))
    result = detect_bimodal(tiny.image_encoder, ctx)
    assert result.counts["candidates"] == 4
    head_dim = tiny.samq_arch.encoder_embed_dim // tiny.samq_arch.encoder_num_heads
    for node in nodes_with_role(tiny.image_encoder, "k"):
        finding = get_info(node).findings["detect_bimodal"]
        assert len(finding["signs"]) == head_dim and set(finding["signs"]) <= {-1, 1}
        assert finding["tested"]["prompt"] is None


# -- (c) the point: keys quantize better after the fold -----------------------------------------


def _tapped_keys(model, items) -> torch.Tensor:
    gm = model.mask_decoder
    with torch.no_grad(), tap(gm, [_key_node(gm, T2I0)]) as seen:
        for item in items:
            forward_item(model, item)
        return torch.cat([k.flatten(0, -2) for k in next(iter(seen.values()))])


def _quant_mse(keys: torch.Tensor, observer: str) -> float:
    q = UniformQuantizer(QuantSpec(bits=4, granularity="tensor", observer=observer))
    q(keys)
    return float((q.freeze()(keys) - keys).pow(2).mean())


@pytest.mark.unit
@pytest.mark.parametrize("observer", ["minmax", "mse"])
def test_folded_keys_quantize_with_lower_error(planted, observer):
    model, planted_signs = planted
    items = _items()
    before = _tapped_keys(model, items)
    ctx = _ctx(model, "mask_decoder", items=items)
    run_passes(model.mask_decoder, ctx, [detect_bimodal, fold_bimodal_signs])
    after = _tapped_keys(model, items)
    assert torch.equal(after, before * planted_signs.float())  # K <- K diag(gamma), exactly
    e0, e1 = _quant_mse(before, observer), _quant_mse(after, observer)
    sqnr = [10 * np.log10(float(before.pow(2).mean()) / e) for e in (e0, e1)]
    # measured on this planted key (range [-12.4, 11.1] -> [4.6, 12.4]): minmax MSE
    # 0.204 -> 0.057 (SQNR 25.0 -> 30.5 dB), mse observer 0.144 -> 0.038 (26.5 -> 32.3 dB)
    assert e1 < e0 / 3, f"4-bit {observer} MSE {e0:.4g} -> {e1:.4g}, SQNR {sqnr} dB"


# -- (d) nothing bimodal: nothing folded, and it says why ---------------------------------------


@pytest.mark.unit
def test_no_bimodal_key_folds_nothing_and_says_why(tiny):
    gm = tiny.mask_decoder
    state = {k: v.clone() for k, v in gm.state_dict().items()}
    ctx = _ctx(tiny, "mask_decoder")
    detect = detect_bimodal(gm, ctx)
    assert detect.counts == {"candidates": 3, "bimodal": 0}
    assert len(detect.rejected) == 3
    assert all(r.endswith(("peak", "peaks")) and r != "2 peaks" for r in detect.rejected.values())
    assert "no bimodal key among 3 candidates" in detect.notes[0]
    fold = fold_bimodal_signs(gm, ctx)
    assert fold.counts == {"folded": 0, "considered": 3}
    assert all(r.startswith("not bimodal (") for r in fold.rejected.values())
    assert fold.notes and fold.notes[0].startswith("nothing folded in mask_decoder")
    assert all(torch.equal(v, gm.state_dict()[k]) for k, v in state.items())


@pytest.mark.unit
def test_off_and_no_candidates(tiny):
    off = PassContext("mask_decoder", tiny.samq_arch, QuantConfig(), {})
    assert detect_bimodal(tiny.mask_decoder, off).notes == ["bimodal is off"]
    assert fold_bimodal_signs(tiny.mask_decoder, off).counts == {"folded": 0, "considered": 0}
    enc = _ctx(tiny, "image_encoder")  # default kinds are decoder kinds
    result = detect_bimodal(tiny.image_encoder, enc)
    assert result.counts == {"candidates": 0, "bimodal": 0}
    assert "no attention of kinds" in result.notes[0]


# -- error paths --------------------------------------------------------------------------------


@pytest.mark.unit
def test_fold_signs_rejects_bad_signs(tiny):
    dec, enc = tiny.mask_decoder, tiny.image_encoder
    with pytest.raises(FoldError, match="signs given, expected 64"):
        fold_signs(dec, T2I0, torch.ones(32))
    with pytest.raises(FoldError, match=r"\+1 or -1"):
        fold_signs(dec, T2I0, torch.zeros(64))
    heads, dim = (
        fold_sites(enc, "blocks.1.attn").num_heads,
        fold_sites(enc, "blocks.1.attn").head_dim,
    )
    uneven = torch.ones(heads * dim)
    uneven[0] = -1  # flips channel 0 of head 0 only: the shared rel-pos tables cannot follow
    with pytest.raises(FoldError, match="shared by all heads"):
        fold_signs(enc, "blocks.1.attn", uneven)
    with pytest.raises(FoldError, match="no attention 'blocks.9.attn'"):
        fold_signs(enc, "blocks.9.attn", torch.ones(dim))


@pytest.mark.unit
def test_fold_refuses_a_key_with_another_consumer(tiny):
    gm = tiny.mask_decoder
    k = _key_node(gm, T2I0)
    with gm.graph.inserting_after(k):
        extra = gm.graph.call_function(torch.ops.aten.neg.default, (k,))
    with pytest.raises(FoldError, match="not only q @ k"):
        fold_sites(gm, T2I0)
    gm.graph.erase_node(extra)
    fold_sites(gm, T2I0)


@pytest.mark.unit
def test_pass_errors_name_the_problem(tiny):
    gm = tiny.mask_decoder
    with pytest.raises(FoldError, match="run detect_bimodal first"):
        fold_bimodal_signs(gm, _ctx(tiny, "mask_decoder"))
    no_state = PassContext("mask_decoder", tiny.samq_arch, BIG, {})
    with pytest.raises(ValueError, match=r"ctx.state\['model'\]"):
        detect_bimodal(gm, no_state)
    far = QuantConfig(bimodal=BimodalConfig(detect_prompt=5))
    with pytest.raises(ValueError, match="detect_prompt=5 but calibration item 0 gives 3"):
        detect_bimodal(gm, _ctx(tiny, "mask_decoder", far, _items(1)))
    with pytest.raises(ValueError, match="detect_image=0 but there are 0"):
        detect_bimodal(gm, _ctx(tiny, "mask_decoder", BIG, []))
