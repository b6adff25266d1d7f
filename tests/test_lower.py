"""Lowering to torchao kernels on the CPU: what is lowered, what is refused and why, that the
lowered model computes what its fake-quant model computes, and the fused attention."""

from __future__ import annotations

import copy
import importlib
import operator
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from segment_anything import SamPredictor

import samq_fx
from samq_fx.config import Override, QuantConfig
from samq_fx.data import generate_scene, mask_box
from samq_fx.demo import calibration_samples
from samq_fx.gemm_epilogue import static_scale
from samq_fx.kernels import rel_pos_attention, rel_pos_bias
from samq_fx.lower import (
    Int4Linear,
    LoweringError,
    compile_parts,
    default_dynamic_scales,
    lower,
    optimize_float,
)
from samq_fx.meta import get_info
from samq_fx.passes.lower_tables import QuantizedTable
from samq_fx.quantizers import QuantSpec, UniformQuantizer


def _sqnr(out: torch.Tensor, ref: torch.Tensor) -> float:
    noise = (out.float() - ref.float()).pow(2).mean().clamp_min(1e-30)
    return float(10 * torch.log10(ref.float().pow(2).mean() / noise))


@pytest.fixture(scope="module")
def calib():
    return calibration_samples(2)


@pytest.fixture(scope="module")
def q_int8(tiny_trained_captured, calib):
    return samq_fx.quantize(
        tiny_trained_captured, calib, QuantConfig.preset("W8A8-int8"), progress=False
    )


@pytest.fixture(scope="module")
def q_int4(tiny_trained_captured, calib):
    return samq_fx.quantize(
        tiny_trained_captured, calib, QuantConfig.preset("W4A16-int4"), progress=False
    )


@pytest.fixture(scope="module")
def lowered_int8(q_int8):
    return lower(q_int8, "int8-static", verbose=False)


@pytest.fixture(scope="module")
def lowered_torchao_int8(q_int8):
    return lower(q_int8, "int8-static", int8_kernel="torchao", verbose=False)


def _masks(model, scenes) -> list[np.ndarray]:
    out = []
    for scene in scenes:
        predictor = SamPredictor(model)
        predictor.set_image(scene.image)
        for mask in scene.masks:
            m, _, _ = predictor.predict(box=np.array(mask_box(mask)), multimask_output=False)
            out.append(m[0])
    return out


def _mean_iou(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    return float(
        np.mean([(x & y).sum() / max((x | y).sum(), 1) for x, y in zip(a, b, strict=True)])
    )


def test_int8_static_lowers_every_quantized_linear(q_int8, lowered_int8):
    report = lowered_int8.samq_lowering_report
    quantized_linears = sum(
        1
        for part in ("image_encoder", "mask_decoder")
        for name in getattr(q_int8, part).samq_quantizers
        if name.endswith("__weight")
    )
    assert len(report.lowered) == quantized_linears > 0
    assert report.kept == {}
    assert (
        report.fused_attention
        == samq_fx.build_sam("tiny", pretrained=False).image_encoder.blocks.__len__()
    )
    enc = lowered_int8.image_encoder
    assert not any("samq_quantizers" in n for n, _ in enc.named_modules()), "quantizers left"
    # plain int8 codes, no tensor subclass; every MLP as the fused pair
    assert all(m.weight.dtype == torch.int8 and type(m.weight) is torch.Tensor
               for m in enc.samq_lowered.values())  # fmt: skip
    kinds = [type(m).__name__ for m in enc.samq_lowered.values()]
    depth = lowered_int8.samq_arch.encoder_depth
    assert kinds.count("Int8LinearAct") == kinds.count("Int8LinearOnCodes") == depth
    assert report.fused_epilogues == depth and report.unfused_epilogues == {}
    targets = [n.target for n in enc.graph.nodes if n.op == "call_function"]
    assert torch.ops.aten.gelu.default not in targets, "a GELU was left between the linears"


def _lower_with_one_fusion_off(q, backend: str, predicate: str):
    """`lower(q, backend)` with `samq_fx.lower.<predicate>` (the switch of one fusion pass)
    answering False, every other fusion as usual."""
    lower_module = importlib.import_module("samq_fx.lower")  # the package exports the function
    original = getattr(lower_module, predicate)
    setattr(lower_module, predicate, lambda cfg: False)
    try:
        return lower(q, backend, verbose=False)
    finally:
        setattr(lower_module, predicate, original)


def _lower_without_residual_fusion(q, backend: str):
    """`lower(q, backend)` with every fusion but the residual adds (`fuse_residual_add`)."""
    return _lower_with_one_fusion_off(q, backend, "_fuses_residual")


@pytest.fixture(scope="module")
def lowered_int8_unfused_residual(q_int8):
    return _lower_without_residual_fusion(q_int8, "int8-static")


def test_residual_adds_join_the_int8_epilogue(lowered_int8, lowered_int8_unfused_residual):
    """Every encoder block's `x + lin2(...)`, and each global block's `x + proj(...)`, becomes
    the GEMM's residual input (a windowed block's projection reaches its add through the
    un-partition, and stays); the finding names the residual on each linear's node."""
    enc = lowered_int8.image_encoder
    arch = lowered_int8.samq_arch
    fused = {
        n.target.removeprefix("samq_lowered."): n
        for n in enc.graph.nodes
        if "fuse_residual_add" in getattr(get_info(n), "findings", {})
    }
    expected = {f"blocks_{i}_mlp_lin2" for i in range(arch.encoder_depth)}
    expected |= {f"blocks_{i}_attn_proj" for i in arch.encoder_global_attn_indexes}
    assert set(fused) == expected
    assert lowered_int8.samq_lowering_report.fused_residuals == len(expected)
    assert lowered_int8.samq_lowering_report.unfused_residuals == {}
    for node in fused.values():
        residual = get_info(node).findings["fuse_residual_add"]["residual"]
        assert len(node.args) == 1 and node.kwargs["residual"].name == residual
    adds = [n for n in enc.graph.nodes if n.target == torch.ops.aten.add.Tensor]
    assert not any(a in fused.values() and len(a.users) == 1 for n in adds for a in n.args)
    assert lowered_int8_unfused_residual.samq_lowering_report.fused_residuals == 0


@settings(max_examples=4, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), batch=st.integers(1, 2))
def test_fused_residual_adds_compute_the_same_encoder(
    lowered_int8, lowered_int8_unfused_residual, seed, batch
):
    """On the CPU (float32) the fused encoder computes what the unfused one does, to float32
    rounding: the residual enters after the bias and activation, before the output's cast."""
    x = torch.randn(batch, 3, 256, 256, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        fused = lowered_int8.image_encoder(x)
        plain = lowered_int8_unfused_residual.image_encoder(x)
    err = float((fused - plain).abs().max() / plain.abs().max())
    assert err < 1e-5, f"fused vs unfused residual adds: largest relative error {err:.2e}"


def test_int8_dynamic_takes_the_residual_too(q_int8):
    """int8-dynamic's linears (per-token scales) take the residual as int8-static's do: the
    same sites fused, the same encoder output to float32 rounding."""
    fused = lower(q_int8, "int8-dynamic", verbose=False)
    plain = _lower_without_residual_fusion(q_int8, "int8-dynamic")
    arch = fused.samq_arch
    expected = arch.encoder_depth + len(arch.encoder_global_attn_indexes)
    assert fused.samq_lowering_report.fused_residuals == expected
    assert plain.samq_lowering_report.fused_residuals == 0
    x = torch.randn(2, 3, 256, 256, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        a, b = fused.image_encoder(x), plain.image_encoder(x)
    assert float((a - b).abs().max() / b.abs().max()) < 1e-5


@pytest.fixture(scope="module")
def lowered_dynamic_pair(q_int8):
    """int8-dynamic lowered with the MLPs' hidden activation per token ("token": lin1 applies
    the GELU and writes the compute dtype) and without the MLP fusion (`fuse_linear_epilogue`)."""
    plain = _lower_with_one_fusion_off(q_int8, "int8-dynamic", "_has_mlp_epilogue")
    return lower(q_int8, "int8-dynamic", dynamic_scales="token", verbose=False), plain


@pytest.fixture(scope="module")
def lowered_dynamic_groups(q_int8):
    """int8-dynamic as `lower` makes it by default on CUDA (asked for by name here, on the
    CPU): the MLPs' hidden codes with a scale per token and 128 channels, written by lin1's
    epilogue."""
    return lower(q_int8, "int8-dynamic", dynamic_scales="group", verbose=False)


def test_int8_dynamic_mlps_pass_group_scaled_codes(lowered_dynamic_groups, lowered_dynamic_pair):
    """int8-dynamic's default MLP: lin1 returns (codes, scales per token and 128 channels), two
    getitems hand them to lin2, no GELU node and no per-token pass is left between the GEMMs,
    the residual adds still join lin2; the report names both kernels."""
    fused = lowered_dynamic_groups
    enc, report = fused.image_encoder, fused.samq_lowering_report
    depth = fused.samq_arch.encoder_depth
    kinds = [type(m).__name__ for m in enc.samq_lowered.values()]
    assert (
        kinds.count("Int8LinearDynamicGroupCodes") == kinds.count("Int8LinearOnGroupCodes") == depth
    )
    assert report.fused_epilogues == depth and report.unfused_epilogues == {}
    assert report.fused_residuals == lowered_dynamic_pair[0].samq_lowering_report.fused_residuals
    lin1 = [v for k, v in report.lowered.items() if k.startswith("enc:") and "lin1" in k]
    lin2 = [v for k, v in report.lowered.items() if k.startswith("enc:") and "lin2" in k]
    assert (
        lin1
        == ["int8 + gelu + int8 (scales per token and 128 channels) out (Triton, fused)"] * depth
    )
    assert (
        lin2 == ["int8 x int8 on lin1's codes, scales per token and 128 channels (Triton)"] * depth
    )
    for node in enc.graph.nodes:
        if (
            node.op == "call_module"
            and type(enc.get_submodule(node.target)).__name__ == "Int8LinearOnGroupCodes"
        ):
            codes, scales = node.args
            assert codes.target is operator.getitem and scales.target is operator.getitem
            assert codes.args == (scales.args[0], 0) and scales.args[1] == 1
            assert (
                codes.meta["val"].dtype == torch.int8 and scales.meta["val"].dtype == torch.float32
            )
            assert "residual" in node.kwargs
    targets = [n.target for n in enc.graph.nodes if n.op == "call_function"]
    assert torch.ops.aten.gelu.default not in targets


def test_group_scaled_hidden_codes_are_at_least_as_close_to_fake_quant(
    q_int8, lowered_dynamic_groups, lowered_dynamic_pair
):
    """Scales per token and 128 channels are a finer grid than per token: the encoder is at
    least as close to the fake-quant model (within 0.5 dB, over three inputs), and compiled
    (inductor on the CPU) computes what it computes eagerly."""
    token = lowered_dynamic_pair[0]
    group_db = [_encoder_sqnr(lowered_dynamic_groups, q_int8, seed) for seed in range(3)]
    token_db = [_encoder_sqnr(token, q_int8, seed) for seed in range(3)]
    assert min(group_db) > 25
    assert sum(group_db) / 3 >= sum(token_db) / 3 - 0.5, (group_db, token_db)
    x = torch.randn(1, 3, 256, 256, generator=torch.Generator().manual_seed(4))
    compiled = torch.compile(lowered_dynamic_groups.image_encoder, fullgraph=True)
    with torch.no_grad():
        eager = lowered_dynamic_groups.image_encoder(x)
        snr = _sqnr(compiled(x), eager)
    assert snr > 35, f"compiled vs eager group-scaled encoder: {snr:.1f} dB"


def test_int8_dynamic_applies_the_gelu_in_lin1(lowered_dynamic_pair):
    """int8-dynamic's MLPs with dynamic_scales="token": lin1 applies the GELU in its epilogue
    and writes the compute dtype (lin2's per-token scale needs the whole row), lin2 stays a
    dynamic linear; no GELU node is left; the attention kernels do not write the projections'
    codes (no static scale)."""
    fused, plain = lowered_dynamic_pair
    enc, report = fused.image_encoder, fused.samq_lowering_report
    depth = fused.samq_arch.encoder_depth
    kinds = [type(m).__name__ for m in enc.samq_lowered.values()]
    assert kinds.count("Int8LinearDynamicAct") == depth
    assert kinds.count("Int8LinearDynamic") == len(kinds) - depth
    assert report.fused_epilogues == depth and report.unfused_epilogues == {}
    assert report.attention_codes == 0
    lin1 = [v for k, v in report.lowered.items() if k.startswith("enc:") and "lin1" in k]
    assert lin1 == [f"int8 + gelu + {report.dtype} out (Triton, fused)"] * depth
    targets = [n.target for n in enc.graph.nodes if n.op == "call_function"]
    assert torch.ops.aten.gelu.default not in targets, "a GELU was left between the linears"
    assert plain.samq_lowering_report.fused_epilogues == 0
    assert any(n.target == torch.ops.aten.gelu.default for n in plain.image_encoder.graph.nodes)


@settings(max_examples=3, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), batch=st.integers(1, 2))
def test_int8_dynamic_gelu_in_lin1_computes_the_same_encoder(lowered_dynamic_pair, seed, batch):
    """With the GELU in lin1's epilogue, int8-dynamic's encoder computes what the separate GELU
    computes: on the CPU both run in float32, so only the order of float32 operations differs."""
    fused, plain = lowered_dynamic_pair
    x = torch.randn(batch, 3, 256, 256, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        a, b = fused.image_encoder(x), plain.image_encoder(x)
    assert float((a - b).abs().max() / b.abs().max()) < 1e-5


def test_torchao_int8_kernel_is_still_there(q_int8, lowered_int8, lowered_torchao_int8):
    """int8_kernel="torchao" lowers to torchao's Int8Tensor (no fused MLP: its GEMM has no
    epilogue to extend) and computes what this project's int8 modules compute."""
    enc = lowered_torchao_int8.image_encoder
    assert all(type(m.weight).__name__ == "Int8Tensor" for m in enc.samq_lowered.values())
    assert lowered_torchao_int8.samq_lowering_report.fused_epilogues == 0
    x = torch.randn(1, 3, 256, 256, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        snr = _sqnr(enc(x), lowered_int8.image_encoder(x))
    assert snr > 35, f"torchao vs samq int8 kernels: {snr:.1f} dB"
    with pytest.raises(LoweringError, match="unknown int8 kernel"):
        lower(q_int8, "int8-static", int8_kernel="cublas", verbose=False)


def test_lowering_leaves_the_quantized_model_alone(tiny_trained_captured, calib):
    q = samq_fx.quantize(
        tiny_trained_captured, calib, QuantConfig.preset("W8A8-int8"), progress=False
    )
    before = {k: v.clone() for k, v in q.state_dict().items() if isinstance(v, torch.Tensor)}
    lower(q, "int8-static", verbose=False)
    after = q.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_lowered_masks_match_fake_quant(q_int8, lowered_int8):
    scenes = [generate_scene(40_000, i) for i in range(3)]
    fid = _mean_iou(_masks(lowered_int8, scenes), _masks(q_int8, scenes))
    assert fid > 0.98, f"lowered int8-static vs its fake-quant model: mask IoU {fid:.4f}"


def test_lowered_encoder_close_to_fake_quant(q_int8, lowered_int8):
    x = torch.randn(2, 3, 256, 256, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        snr = _sqnr(lowered_int8.image_encoder(x), q_int8.image_encoder(x))
    assert snr > 35, f"int8-static encoder vs fake quant: SQNR {snr:.1f} dB"


def _encoder_sqnr(lowered, fake, seed: int) -> float:
    x = torch.randn(1, 3, 256, 256, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return _sqnr(lowered.image_encoder(x), fake.image_encoder(x))


def test_dynamic_int8_close_to_fake_quant(q_int8):
    snr = _encoder_sqnr(lower(q_int8, "int8-dynamic", verbose=False), q_int8, seed=1)
    # per-token scales differ from the calibrated per-tensor grid: close, not equal
    assert snr > 25, f"int8-dynamic encoder vs fake quant: SQNR {snr:.1f} dB"


def test_int4_weight_only(q_int4):
    lowered = lower(q_int4, "int4-weight", verbose=False)
    report = lowered.samq_lowering_report
    assert report.lowered and not report.kept
    table = "8-bit codes per channel, dequantized per call"
    assert report.lowered.pop("enc:pos_embed") == table  # the preset's 8-bit position embedding
    assert set(report.lowered.values()) == {"int4 weights, dequantized per call x float GEMM"}
    pos = lowered.image_encoder.samq_lowered.pos_embed
    assert isinstance(pos, QuantizedTable) and pos.codes.dtype == torch.uint8
    assert not hasattr(lowered.image_encoder, "pos_embed")  # the float table is gone
    channels = pos.codes.shape[-1]
    assert pos.scale.numel() == pos.zero.numel() == channels
    snr = _encoder_sqnr(lowered, q_int4, seed=2)
    # the calibrated codes and float32 grid themselves: equal up to float summation order
    assert snr > 80, f"int4-weight vs its fake quant: SQNR {snr:.1f} dB"
    # 4 bits a weight plus a float32 scale and a one-byte zero point a group of 64
    int4 = [m for m in lowered.modules() if isinstance(m, Int4Linear)]
    weights = sum(m.in_features * m.out_features for m in int4)
    stored = sum(m.packed.nbytes + m.scale.nbytes + m.zero_code.nbytes for m in int4)
    assert stored == weights * (0.5 + 5 / 64)


@settings(max_examples=25, deadline=None)
@given(
    out_f=st.sampled_from([8, 16, 24]),
    groups=st.integers(1, 3),
    group_size=st.sampled_from([32, 64, 128]),
    symmetric=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_int4_linear_keeps_the_calibrated_grid(out_f, groups, group_size, symmetric, seed):
    """Int4Linear packs the quantizer's own codes: its weight is the fake-quant weight (the same
    (q - z) * s per group, also for symmetric grids whose codes start at -8), bias included."""
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(out_f, groups * group_size, generator=gen) * 0.1
    spec = QuantSpec(4, symmetric, "group", observer="mse", group_size=group_size)
    w_q = UniformQuantizer(spec)
    w_q(weight)
    w_q.freeze()
    bias = torch.randn(out_f, generator=gen)
    lin = Int4Linear(w_q.int_repr(weight), w_q.qparams(), bias, group_size, torch.float32)
    with torch.no_grad():
        expected = w_q(weight)
        assert torch.allclose(lin.dequantized_weight(), expected, atol=1e-6, rtol=1e-5)
        x = torch.randn(3, 5, weight.shape[1], generator=gen)
        ref = torch.nn.functional.linear(x, expected, bias)
        assert torch.allclose(lin(x), ref, atol=1e-4, rtol=1e-4)
    assert lin.packed.dtype == torch.uint8 and lin.packed.numel() == weight.numel() // 2


@settings(max_examples=25, deadline=None)
@given(
    bits=st.integers(2, 8),
    symmetric=st.booleans(),
    shape=st.sampled_from([(1, 4, 4, 8), (1, 3, 5, 16), (2, 7)]),
    seed=st.integers(0, 2**16),
)
def test_quantized_table_is_the_fake_quant_table(bits, symmetric, shape, seed):
    """QuantizedTable keeps the quantizer's own per-channel codes in one byte each and gives back
    exactly the fake-quant table, for signed (symmetric) and unsigned grids of 2..8 bits."""
    gen = torch.Generator().manual_seed(seed)
    table = torch.randn(shape, generator=gen) * torch.rand(shape[-1], generator=gen)
    spec = QuantSpec(bits, symmetric, "channel", ch_axis=-1, observer="mse")
    w_q = UniformQuantizer(spec)
    w_q(table)
    w_q.freeze()
    qp = w_q.qparams()
    lowered = QuantizedTable(
        w_q.int_repr(table), qp.scale, qp.zero_point, len(shape) - 1, torch.float32
    )
    assert lowered.codes.element_size() == 1 and lowered.codes.shape == table.shape
    with torch.no_grad():
        assert torch.allclose(lowered(), w_q(table), atol=1e-6, rtol=1e-6)


def test_position_embedding_is_quantized_only_on_request(tiny_trained_captured, calib):
    """The papers' presets keep the position embedding in float (no quantizer at all); an
    Override turns on its weight-only site, per channel of its last axis, never in groups."""
    enc = tiny_trained_captured.image_encoder
    (pos,) = [
        n for n in enc.graph.nodes if (i := get_info(n)) is not None and i.role == "pos_embed"
    ]
    assert pos.args[1].op == "get_attr"
    w8 = samq_fx.quantize(tiny_trained_captured, calib, QuantConfig.preset("W8A8"), progress=False)
    assert not [k for k in w8.image_encoder.samq_quantizers if "pos_embed" in k]
    cfg = QuantConfig(
        w_bits=4, a_bits=None, w_granularity="group", w_group_size=64,
        overrides=(Override(role="pos_embed", quantize=True, w_bits=6),),
    )  # fmt: skip
    q = samq_fx.quantize(tiny_trained_captured, calib, cfg, progress=False)
    spec = q.image_encoder.samq_quantizers["pos_embed__weight"].spec
    assert (spec.bits, spec.granularity, spec.ch_axis) == (6, "channel", -1)


def test_int4_linear_refuses_shapes_without_a_kernel():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    unsupported = Int4Linear.unsupported
    assert "multiple of 32" in unsupported((64, 48), 32, torch.float32, cpu, "dequant")
    assert "multiple of 8" in unsupported((60, 64), 64, torch.float32, cpu, "dequant")
    assert unsupported((64, 768), 128, torch.float32, cpu, "dequant") is None
    assert "runs on CUDA" in unsupported((64, 768), 128, torch.bfloat16, cpu, "tinygemm")
    assert "bfloat16" in unsupported((64, 768), 128, torch.float16, cuda, "tinygemm")
    assert unsupported((64, 768), 128, torch.bfloat16, cuda, "tinygemm") is None


def test_int4_kernel_choice_is_checked_and_named(q_int4):
    with pytest.raises(LoweringError, match="unknown int4 kernel 'marlin'"):
        lower(q_int4, "int4-weight", int4_kernel="marlin", verbose=False)
    # tinygemm is CUDA-only: on the CPU no layer has a kernel, and lower says so
    with pytest.raises(LoweringError, match="int4 tinygemm runs on CUDA"):
        lower(q_int4, "int4-weight", int4_kernel="tinygemm", verbose=False)
    with pytest.raises(LoweringError, match="runs on CUDA"):
        Int4Linear(torch.zeros(8, 32, dtype=torch.int8), None, None, 32, torch.bfloat16, "tinygemm")


def test_no_kernel_for_4_bit_activations(tiny_trained_captured, calib):
    q = samq_fx.quantize(tiny_trained_captured, calib, QuantConfig.preset("W4A4"), progress=False)
    with pytest.raises(LoweringError, match="4-bit activations: no kernel"):
        lower(q, "int8-static", verbose=False)


def test_asymmetric_weights_named(tiny_trained_captured, calib):
    q = samq_fx.quantize(tiny_trained_captured, calib, QuantConfig(method="minmax"), progress=False)
    with pytest.raises(LoweringError, match="asymmetric weights"):
        lower(q, "int8-static", verbose=False)


def test_float8_needs_a_capable_gpu(q_int8):
    with pytest.raises(LoweringError, match="sm_89"):
        lower(q_int8, "float8-static", verbose=False)


def test_cudagraphs_need_compile_and_cuda(q_int8):
    with pytest.raises(LoweringError, match="pass compile=True too"):
        lower(q_int8, "int8-static", cudagraphs=True, verbose=False)
    with pytest.raises(LoweringError, match="needs a model on a CUDA device; this one is on cpu"):
        lower(q_int8, "int8-static", compile=True, cudagraphs=True, verbose=False)


def test_unknown_backend(q_int8):
    with pytest.raises(LoweringError, match="unknown lowering backend 'int3'"):
        lower(q_int8, "int3")


def test_partial_lowering_warns_and_strict_refuses(tiny_trained_captured, calib):
    cfg = QuantConfig.preset(
        "W8A8-int8", overrides=(*QuantConfig.preset("W8A8-int8").overrides,
                                Override(role="mlp_fc1", part="image_encoder", a_bits=6))
    )  # fmt: skip
    q = samq_fx.quantize(tiny_trained_captured, calib, cfg, progress=False)
    with pytest.warns(UserWarning, match="stay fake-quantized"):
        lowered = lower(q, "int8-static", verbose=False)
    kept = lowered.samq_lowering_report.kept
    assert len(kept) == 4 and all("6-bit activations" in r for r in kept.values()), kept
    with pytest.raises(LoweringError, match="stay fake-quantized"):
        lower(q, "int8-static", strict=True, verbose=False)


def test_quantized_attention_stays_unfused(tiny_trained_captured, calib):
    q = samq_fx.quantize(
        tiny_trained_captured, calib, QuantConfig(w_symmetric=True), progress=False
    )
    lowered = lower(q, "int8-static", verbose=False)
    report = lowered.samq_lowering_report
    assert report.fused_attention == 0 and len(report.unfused_attention) == 4
    assert all("quantizer" in why for why in report.unfused_attention.values())
    for name, quantizer in q.image_encoder.samq_quantizers.items():  # FP by choice: identity
        quantizer.enabled = "_matmul__" not in name
    assert lower(q, "int8-static", verbose=False).samq_lowering_report.fused_attention == 4


def test_calibrated_global_attention_takes_static_float8_scales(
    tiny_trained_captured, calib, monkeypatch, tmp_path
):
    """W8A8-int8-attn records q, k, v ranges of the global attentions; the float8 attention
    kernel consumes those quantizers as static scales, and any other kernel refuses them."""
    q = samq_fx.quantize(
        tiny_trained_captured, calib, QuantConfig.preset("W8A8-int8-attn"), progress=False
    )
    sites = {n.target.split(".")[1] for n in q.image_encoder.graph.nodes
             if n.op == "call_module" and "_matmul__" in n.target}  # fmt: skip
    arch = q.samq_arch
    assert len(sites) == 3 * len(arch.encoder_global_attn_indexes), sites
    assert not any(site.endswith("__attn") for site in sites)
    assert not any("_matmul__" in n.target for n in q.mask_decoder.graph.nodes
                   if n.op == "call_module")  # fmt: skip
    lower_module = __import__("sys").modules["samq_fx.lower"]
    monkeypatch.setattr(lower_module, "_check_attention_kernel", lambda kernel, device: None)
    lowered = lower(q, "int8-static", attention="float8", verbose=False)  # CPU: the reference
    report = lowered.samq_lowering_report
    assert report.unfused_attention == {}
    graph = lowered.image_encoder.graph
    assert not any(n.op == "call_module" and "_matmul__" in n.target for n in graph.nodes)
    static = [n for n in graph.nodes if get_info(n) is not None
              and get_info(n).findings.get("fuse_attention", {}).get("scales") == "static"]  # fmt: skip
    assert len(static) == len(arch.encoder_global_attn_indexes)
    block = arch.encoder_global_attn_indexes[0]
    quantizer = q.image_encoder.samq_quantizers[f"blocks_{block}_attn__qk_matmul__q"]
    scales = getattr(lowered.image_encoder, f"samq_attention_scales__blocks_{block}_attn")
    assert torch.equal(scales[0], static_scale(quantizer).reshape(()))
    assert _encoder_sqnr(lowered, q, seed=0) > 25
    loaded = samq_fx.load(samq_fx.save(lowered, tmp_path / "attn.samq"))  # lowers again
    x = torch.randn(1, 3, 256, 256, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert torch.equal(loaded.image_encoder(x), lowered.image_encoder(x))
    refused = lower(q, "int8-static", attention="triton", verbose=False)
    why = refused.samq_lowering_report.unfused_attention
    assert len(why) == len(arch.encoder_global_attn_indexes)
    assert all("only the 'float8'" in reason for reason in why.values())


def test_save_and_load_relower(lowered_int8, tmp_path):
    path = samq_fx.save(lowered_int8, tmp_path / "tiny.samq")
    loaded = samq_fx.load(path)
    assert isinstance(loaded, samq_fx.LoweredSam)
    assert loaded.samq_lowering == lowered_int8.samq_lowering
    x = torch.randn(1, 3, 256, 256, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(loaded.image_encoder(x), lowered_int8.image_encoder(x))


@settings(max_examples=10, deadline=None)
@given(rows=st.integers(1, 16), tokens_first=st.booleans(), seed=st.integers(0, 2**16))
def test_torchao_int8_row_padding_leaves_results_unchanged(
    lowered_torchao_int8, rows, tokens_first, seed
):
    """CUDA's _int_mm needs more than 16 rows, so torchao's int8 linear appends zero rows there:
    the real rows' results must be what the unpadded call gives (checked on the CPU, padding
    forced)."""
    from samq_fx.lower import TorchaoInt8Linear

    decoder = lowered_torchao_int8.mask_decoder
    lin = next(m for m in decoder.modules() if isinstance(m, TorchaoInt8Linear))
    # the decoder's linears see (prompts, tokens, C): the activation scale is shaped for rank 3
    shape = (1, rows, lin.in_features) if tokens_first else (rows, 1, lin.in_features)
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        plain = lin(x)
        forced = copy.copy(lin)
        forced.pads = lambda x, rows: True
        padded = forced(x)
    assert padded.shape == plain.shape and torch.equal(padded, plain)


def test_bf16_lowered_model_gives_the_predictor_float32(q_int4):
    """A lowered model computing in bf16 (the CUDA default) still hands SamPredictor float32
    masks and scores, the decoder's python-level mask choice included (numpy has no bf16)."""
    lowered = lower(q_int4, "int4-weight", dtype="bfloat16", verbose=False)
    scene = generate_scene(7, 0)
    predictor = SamPredictor(lowered)
    predictor.set_image(scene.image)
    box = np.array(mask_box(scene.masks[0]))
    masks, scores, logits = predictor.predict(box=box, multimask_output=True)
    assert masks.dtype == bool and scores.dtype == np.float32 and logits.dtype == np.float32
    assert masks.shape[0] == scores.shape[0] == 3


def test_load_relowers_with_every_saved_option(q_int4, tmp_path):
    """Every LowerConfig field survives save/load, not only the defaults'."""
    options = dict(fuse_attention=False, fuse_epilogue=False, int4_kernel="dequant")
    lowered = lower(q_int4, "int4-weight", **options, verbose=False)
    loaded = samq_fx.load(samq_fx.save(lowered, tmp_path / "int4.samq"))
    assert loaded.samq_lowering == lowered.samq_lowering
    assert loaded.samq_lowering_report.fused_attention == 0


def test_dynamic_scales_default_follows_the_device(q_int8, lowered_dynamic_pair):
    """dynamic_scales=None: "group" on CUDA (the Triton GEMMs write and apply the scales),
    "token" on the CPU, where the group-scaled GEMM is torch._int_mm a group at a time; the
    config keeps None, so a saved model picks again on the device it is loaded on."""
    assert default_dynamic_scales(torch.device("cuda")) == "group"
    assert default_dynamic_scales(torch.device("cpu")) == "token"
    lowered = lower(q_int8, "int8-dynamic", verbose=False)
    assert lowered.samq_lowering.dynamic_scales is None
    kinds = [type(m).__name__ for m in lowered.image_encoder.samq_lowered.values()]
    token = [type(m).__name__ for m in lowered_dynamic_pair[0].image_encoder.samq_lowered.values()]
    assert kinds == token


def test_load_relowers_int8_dynamic_with_its_hidden_scales(lowered_dynamic_pair, tmp_path):
    """dynamic_scales="token" survives save/load: the loaded model's MLPs are the per-token
    pair again, not the default group-scaled one."""
    token = lowered_dynamic_pair[0]
    loaded = samq_fx.load(samq_fx.save(token, tmp_path / "dynamic.samq"))
    assert loaded.samq_lowering.dynamic_scales == "token"
    kinds = [type(m).__name__ for m in loaded.image_encoder.samq_lowered.values()]
    assert kinds.count("Int8LinearDynamicAct") == loaded.samq_arch.encoder_depth
    assert "Int8LinearOnGroupCodes" not in kinds


def test_lowered_encoder_compiles_fullgraph(lowered_int8):
    x = torch.randn(1, 3, 256, 256, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        eager = lowered_int8.image_encoder(x)
        model = compile_parts(lower(lowered_int8.__dict__["_samq_source"], verbose=False))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            compiled = model.image_encoder(x)
    assert _sqnr(compiled, eager) > 30


def test_optimize_float_matches_captured(tiny_trained_captured):
    fused = optimize_float(tiny_trained_captured, "float32")
    x = torch.randn(2, 3, 256, 256, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ref, out = tiny_trained_captured.image_encoder(x), fused.image_encoder(x)
    assert (out - ref).abs().max() <= 1e-4 * ref.abs().max()
    log = {r.name: r.result.counts for r in fused.image_encoder.samq_pass_log}
    assert log["fuse_attention"]["fused"] == 4 and log["patch_embed_as_matmul"]["rewritten"] == 1


@settings(max_examples=25, deadline=None)
@given(
    bh=st.integers(1, 3),
    qh=st.integers(1, 5),
    qw=st.integers(1, 5),
    d=st.sampled_from([4, 8]),
    seed=st.integers(0, 2**16),
)
def test_rel_pos_attention_is_the_eager_chain(bh, qh, qw, d, seed):
    g = torch.Generator().manual_seed(seed)
    L = qh * qw
    q, k, v = (torch.randn(bh, L, d, generator=g, dtype=torch.float64) for _ in range(3))
    rel_h = torch.randn(bh, qh, qw, qh, generator=g, dtype=torch.float64)
    rel_w = torch.randn(bh, qh, qw, qw, generator=g, dtype=torch.float64)
    logits = (q @ k.transpose(-2, -1)).view(bh, qh, qw, qh, qw)
    logits = logits + rel_h[:, :, :, :, None] + rel_w[:, :, :, None, :]
    ref = logits.view(bh, L, L).softmax(-1) @ v
    out = rel_pos_attention(q, k, v, rel_h, rel_w)
    assert torch.allclose(out, ref, rtol=1e-10, atol=1e-12)
    assert rel_pos_bias(rel_h, rel_w).shape == (bh, L, L)
