"""GPU checks of lowering: the compiled code calls the integer / float8 kernels, and flex
attention carries the relative-position bias. Run on a CUDA machine: pytest -m gpu."""

from __future__ import annotations

import re

import pytest
import torch

import samq_fx
from samq_fx.demo import calibration_samples
from samq_fx.lower import compile_parts

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

# backend -> (preset, a substring every generated encoder must contain)
KERNELS = {
    "int8-static": ("W8A8-int8", "samq.int8_linear"),
    "int8-dynamic": ("W8A8-int8", "samq.int8_linear"),
    "float8-static": ("W8A8-int8", "scaled_mm"),
    "int4-weight": ("W4A16-int4", "int4pack_mm"),
}


@pytest.fixture(scope="module")
def tiny_cuda():
    torch.manual_seed(0)
    return samq_fx.capture(samq_fx.build_sam("tiny").cuda().eval())


@pytest.fixture(scope="module")
def calibrated(tiny_cuda):
    """preset -> the tiny SAM quantized with it on two generated images, once per module
    (`lower` deep-copies its argument, so the tests share these safely)."""
    cache = {}

    def get(preset: str):
        if preset not in cache:
            cfg = samq_fx.QuantConfig.preset(preset)
            cache[preset] = samq_fx.quantize(tiny_cuda, calibration_samples(2), cfg, progress=False)
        return cache[preset]

    return get


def _sqnr(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.float(), ref.float()
    return float(10 * torch.log10(ref.pow(2).mean() / (out - ref).pow(2).mean().clamp_min(1e-30)))


def _compile_and_run(lowered, q):
    """(compiled output, eager lowered output, fake-quant output, generated code) of the encoder
    on one random batch; `lowered` is compiled in place."""
    from torch._inductor.utils import run_and_get_code

    x = torch.randn(2, 3, 256, 256, device="cuda")
    with torch.no_grad():
        eager = lowered.image_encoder(x)
        fake = q.image_encoder(x)
        compile_parts(lowered)
        out, codes = run_and_get_code(lowered.image_encoder, x)
    return out, eager, fake, "\n".join(codes)


@pytest.mark.parametrize("backend", list(KERNELS))
def test_compiled_encoder_calls_the_kernel(calibrated, backend):
    preset, kernel = KERNELS[backend]
    if backend.startswith("float8") and torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("float8 needs sm_89+")
    q = calibrated(preset)
    # int4: tinygemm here; the default (dequant + float GEMM) is tested below
    options = {"int4_kernel": "tinygemm"} if backend == "int4-weight" else {}
    lowered = samq_fx.lower(q, backend, **options, verbose=False)
    assert lowered.samq_lowering_report.fused_attention == 4
    out, eager, fake, source = _compile_and_run(lowered, q)
    calls = sorted(set(re.findall(r"extern_kernels\.\w+|torch\.ops\.\w+\.\w+", source)))
    assert kernel in source, f"{backend}: no {kernel} call in the compiled encoder; calls: {calls}"
    assert "flex" in source.lower(), f"no flex attention kernel in the compiled encoder: {calls}"
    assert _sqnr(out, eager) > 25, f"compiled vs eager lowered: {_sqnr(out, eager):.1f} dB"
    assert _sqnr(out, fake) > 20, f"lowered vs fake-quant: {_sqnr(out, fake):.1f} dB"


@pytest.mark.parametrize("mode", ["bf16", "float8", "int8-qk"])
@pytest.mark.parametrize(
    "shape",
    [(4, 64, 64, 64), (48, 14, 14, 64), (8, 32, 32, 32), (16, 8, 8, 32), (4, 64, 64, 80)],
    ids=["sam-global", "sam-window", "tiny-global", "tiny-window", "sam-h-global"],
)
def test_triton_attention_kernel(mode, shape):
    """The Triton kernel against its float32 reference on the same (quantized) operands, and
    against exact attention."""
    from samq_fx.kernels import rel_pos_bias
    from samq_fx.triton_attention import attention_reference, launch, op_inputs

    if mode != "bf16" and torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("float8 needs sm_89+")
    bh, kh, kw, d = shape
    L = kh * kw
    g = torch.Generator(device="cuda").manual_seed(bh + d)
    q = torch.randn(bh, L, d, device="cuda", generator=g) * d**-0.5
    k = torch.randn(bh, L, d, device="cuda", generator=g) + 1.0
    v = torch.randn(bh, L, d, device="cuda", generator=g)
    rh = torch.randn(bh, kh, kw, kh, device="cuda", generator=g)
    rw = torch.randn(bh, kh, kw, kw, device="cuda", generator=g)
    args = op_inputs(*(t.bfloat16() for t in (q, k, v, rh, rw)), mode)
    out = launch(*args).float()
    ref = attention_reference(*args).float()
    assert torch.isfinite(out).all()
    err = float((out - ref).norm() / ref.norm())
    assert err < (1e-2 if mode == "bf16" else 2e-2), f"kernel vs reference: {err:.2e}"
    exact = torch.softmax(q @ k.transpose(1, 2) + rel_pos_bias(rh, rw), -1) @ v
    err = float((out - exact).norm() / exact.norm())
    bound = {"bf16": 0.02, "float8": 0.12, "int8-qk": 0.06}[mode]
    assert err < bound, f"kernel vs exact attention: {err:.3f}"


@pytest.mark.parametrize("attention", ["triton", "float8", "int8-qk"])
def test_compiled_encoder_runs_the_triton_attention(calibrated, attention):
    """Global attentions on the Triton kernel, windows on flex: both in the compiled code."""
    if attention != "triton" and torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("float8 needs sm_89+")
    q = calibrated("W8A8-int8")
    lowered = samq_fx.lower(q, "int8-static", attention=attention, verbose=False)
    report = lowered.samq_lowering_report
    assert report.fused_attention == 4 and report.attention == f"global {attention}, window flex"
    out, eager, fake, source = _compile_and_run(lowered, q)
    # "triton" is wired past the head split (the rel-pos terms computed in the kernel)
    op = "samq.global_attention" if attention == "triton" else "samq.rel_pos_attention"
    assert op in source, "the compiled encoder does not call the kernel"
    assert "flex" in source.lower(), "the windows' flex attention is missing"
    assert "samq.int8_linear" in source
    assert _sqnr(out, eager) > 25, f"compiled vs eager lowered: {_sqnr(out, eager):.1f} dB"
    assert _sqnr(out, fake) > 15, f"lowered vs fake-quant: {_sqnr(out, fake):.1f} dB"


@pytest.mark.parametrize("backend", ["float8-static", "int8-static"])
def test_compiled_encoder_takes_static_attention_scales(calibrated, backend):
    """W8A8-int8-attn's calibrated q, k, v ranges: the compiled encoder (float8 or int8
    linears) runs the global attentions in float8 with no amax reduction left, and agrees with
    its fake-quant model as the dynamic scales do."""
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("float8 needs sm_89+")
    q = calibrated("W8A8-int8-attn")
    lowered = samq_fx.lower(
        q, backend, attention="float8", window_attention="triton", verbose=False
    )
    assert lowered.samq_lowering_report.unfused_attention == {}
    out, eager, fake, source = _compile_and_run(lowered, q)
    assert "samq.global_attention" in source and "samq.window_attention" in source
    assert "amax" not in source, "a dynamic-scale reduction is left in the compiled encoder"
    assert _sqnr(out, eager) > 25, f"compiled vs eager lowered: {_sqnr(out, eager):.1f} dB"
    assert _sqnr(out, fake) > 15, f"lowered vs fake-quant: {_sqnr(out, fake):.1f} dB"


def _qkv_views(shape, table_scale: float):
    """q, k, v as the strided (B, heads, L, D) views of a random bf16 qkv output, and random
    rel-pos tables, for shape (B, heads, kh, kw, D)."""
    b, heads, kh, kw, d = shape
    L = kh * kw
    g = torch.Generator(device="cuda").manual_seed(L + d)
    qkv = torch.randn(b, L, 3, heads, d, device="cuda", generator=g).bfloat16()
    qkv[:, :, 1] += 1.0  # keys share a bias, as ViT keys do
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    th = torch.randn(2 * kh - 1, d, device="cuda", generator=g).bfloat16() * table_scale
    tw = torch.randn(2 * kw - 1, d, device="cuda", generator=g).bfloat16() * table_scale
    return q, k, v, th, tw


@pytest.mark.parametrize(
    "shape",
    [(2, 12, 14, 14, 64), (2, 16, 14, 14, 80), (3, 4, 8, 8, 32), (2, 3, 5, 7, 16)],
    ids=["sam-b", "sam-h", "tiny", "ragged"],
)
def test_window_attention_kernel(shape):
    """The window kernel (rel-pos terms computed inside from the tables) on strided views of a
    qkv output, against its float32 reference on the same bf16 operands: output token-major,
    (B, L, heads·D)."""
    from samq_fx.window_attention import launch, window_attention_reference

    b, heads, kh, kw, d = shape
    L = kh * kw
    q, k, v, th, tw = _qkv_views(shape, table_scale=1.0)
    assert not q.is_contiguous()
    out = launch(q, k, v, th, tw, d**-0.5, kh, kw).float()
    ref = window_attention_reference(*(t.float() for t in (q, k, v, th, tw)), d**-0.5, kh, kw)
    assert out.shape == (b, L, heads * d) and torch.isfinite(out).all()
    err = float((out - ref).norm() / ref.norm())
    assert err < 1e-2, f"kernel vs reference: {err:.2e}"


@pytest.mark.parametrize("mode", ["bf16", "float8"])
@pytest.mark.parametrize(
    "shape",
    [(2, 12, 64, 64, 64), (2, 16, 64, 64, 80), (2, 4, 16, 16, 32), (2, 3, 5, 7, 16)],
    ids=["sam-b", "sam-h", "tiny", "ragged"],
)
def test_global_attention_kernel(shape, mode):
    """The global kernel computing the rel-pos terms from the tables, on strided views of a qkv
    output (bf16) or on static float8 codes of k and v, against its float32 reference on the
    same operands; plain and with the projection's int8 codes."""
    from samq_fx.triton_attention import (
        global_attention_reference,
        launch_global,
        quantize_float8_static,
    )

    if mode == "float8" and torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("float8 needs sm_89+")
    b, heads, kh, kw, d = shape
    L = kh * kw
    q, k, v, th, tw = _qkv_views(shape, table_scale=0.5)
    scale = d**-0.5
    if mode == "bf16":
        args = (q, k, v.transpose(-1, -2), th, tw, scale, kh, kw, None, None)
    else:
        scales = torch.stack([t.float().abs().amax() / 448 for t in (q * scale, k, v)])
        q8 = quantize_float8_static(q * scale, scales[0])
        k8 = quantize_float8_static(k, scales[1])
        vt8 = quantize_float8_static(v, scales[2]).transpose(-1, -2).contiguous()
        args = (q, k8, vt8, th, tw, scale, kh, kw, q8, scales)
    ref = global_attention_reference(*args).float()
    tile = {"block_m": 64, "num_warps": 4}  # one compile a case; the encoder tests autotune
    out = launch_global(*args, **tile).float()
    assert out.shape == (b, L, heads * d) and torch.isfinite(out).all()
    err = float((out - ref).norm() / ref.norm())
    # the rel-pos terms reach the kernel in bf16, as SAM's einsums wrote them (the reference
    # keeps them in float32): about 1e-2 with these random tables
    assert err < 2e-2, f"kernel vs reference: {err:.2e}"
    # the projection's int8 codes: the kernel's own output / s + zero, rounded and clamped;
    # its plain output is that float32 value rounded to bf16 (half an ulp: 2^-9 relative)
    s = ref.amax() / 125.0  # + the zero point 7: the largest values saturate at 127
    codes = launch_global(*args, s, 7, "int8", **tile)
    exact = (out / s + 7).clamp(-128, 127)
    allowed = 0.5 + out.abs() * 2.0**-8 / s + 1e-3
    assert codes.dtype == torch.int8 and bool(codes.eq(127).any())
    assert bool(((codes.float() - exact).abs() <= allowed).all())


def test_compiled_encoder_runs_the_window_kernel(calibrated):
    """float8-static with the windows on the Triton window kernel: the compiled encoder calls
    it, and computes what the flex-window lowering computes."""
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("float8 needs sm_89+")
    q = calibrated("W8A8-int8")
    flex = samq_fx.lower(q, "float8-static", verbose=False)
    lowered = samq_fx.lower(q, "float8-static", window_attention="triton", verbose=False)
    assert lowered.samq_lowering_report.fused_attention == 4
    x = torch.randn(2, 3, 256, 256, device="cuda")
    with torch.no_grad():
        ref, eager = flex.image_encoder(x), lowered.image_encoder(x)
    assert _sqnr(eager, ref) > 30, f"window kernel vs flex windows: {_sqnr(eager, ref):.1f} dB"
    out, eager, fake, source = _compile_and_run(lowered, q)
    assert "samq.window_attention" in source, "the compiled encoder does not call the kernel"
    assert _sqnr(out, eager) > 25, f"compiled vs eager lowered: {_sqnr(out, eager):.1f} dB"


@pytest.mark.parametrize("backend", ["float8-static", "int8-static"])
def test_window_kernel_writes_the_projections_codes(calibrated, backend):
    """float8-static / int8-static with the window kernel: each windowed attention writes its
    output projection's 8-bit codes (`fuse_attention_codes`), in the compiled encoder too, and
    the encoder computes what it computes with a separate quantize pass."""
    if backend == "float8-static" and torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("float8 needs sm_89+")
    q = calibrated("W8A8-int8")
    # fuse_epilogue=False also turns the codes pass off (same backends): the unfused reference
    plain = samq_fx.lower(q, backend, window_attention="triton", fuse_epilogue=False, verbose=False)
    lowered = samq_fx.lower(q, backend, window_attention="triton", verbose=False)
    assert plain.samq_lowering_report.attention_codes == 0
    assert lowered.samq_lowering_report.attention_codes >= 1
    x = torch.randn(2, 3, 256, 256, device="cuda")
    with torch.no_grad():
        unfused, fused = plain.image_encoder(x), lowered.image_encoder(x)
    assert _sqnr(fused, unfused) > 25, f"codes vs quantize pass: {_sqnr(fused, unfused):.1f} dB"
    out, eager, fake, source = _compile_and_run(lowered, q)
    assert "samq.window_attention" in source, "the compiled encoder does not call the kernel"
    assert _sqnr(out, eager) > 25, f"compiled vs eager lowered: {_sqnr(out, eager):.1f} dB"
    assert _sqnr(out, fake) > 20, f"lowered vs fake-quant: {_sqnr(out, fake):.1f} dB"


def test_int4_default_dequantizes_every_linear(calibrated):
    """int4-weight's default kernel on CUDA: codes dequantized for the bf16 GEMM, in the encoder
    and the decoder alike (tinygemm only when asked: it is slow at SAM's row counts)."""
    q = calibrated("W4A16-int4")
    lowered = samq_fx.lower(q, "int4-weight", verbose=False)
    kernels = dict(lowered.samq_lowering_report.lowered)
    assert any(s.startswith("dec:") for s in kernels) and any(s.startswith("enc:") for s in kernels)
    # the preset's position embedding is a table, not a linear: 8-bit codes (session 15)
    assert kernels.pop("enc:pos_embed") == "8-bit codes per channel, dequantized per call"
    assert set(kernels.values()) == {"int4 weights, dequantized per call x float GEMM"}
    out, eager, fake, source = _compile_and_run(lowered, q)
    assert "int4pack" not in source, "the encoder runs tinygemm by default"
    assert _sqnr(out, eager) > 25, f"compiled vs eager lowered: {_sqnr(out, eager):.1f} dB"
    assert _sqnr(out, fake) > 20, f"lowered vs fake-quant: {_sqnr(out, fake):.1f} dB"


@pytest.mark.parametrize("kernel", ["tinygemm", "dequant"])
@pytest.mark.parametrize(
    "shape,group_size",
    [((2304, 768), 64), ((768, 3072), 128), ((64, 64), 32), ((256, 96), 32)],
    ids=["sam-b-qkv", "sam-b-lin2", "tiny-decoder", "inner-k-tiles-2"],
)
def test_int4_cuda_kernels_match_the_unpacked_weight(shape, group_size, kernel):
    """Both CUDA kernels (tinygemm's packed tiles, no padding of K; the dequantized bf16
    weight) compute the same product as the CPU layout's unpacked weight, from the same codes
    and grid, in 4 bits a weight."""
    from samq_fx.lower import Int4Linear
    from samq_fx.quantizers import QParams

    gen = torch.Generator().manual_seed(0)
    out_f, in_f = shape
    codes = torch.randint(0, 16, shape, generator=gen, dtype=torch.int32)
    groups = (out_f, in_f // group_size)
    qp = QParams(torch.rand(groups, generator=gen) * 0.02 + 1e-3,
                 torch.randint(0, 16, groups, generator=gen, dtype=torch.int32), 0, 15)  # fmt: skip
    bias = torch.randn(out_f, generator=gen)
    cpu = Int4Linear(codes, qp, bias, group_size, torch.float32)
    cuda = Int4Linear(codes.cuda(), QParams(qp.scale.cuda(), qp.zero_point.cuda(), 0, 15),
                      bias.cuda(), group_size, torch.bfloat16, kernel)  # fmt: skip
    assert cuda.packed.nbytes == out_f * in_f // 2  # no padding
    x = torch.randn(3, 37, in_f, generator=gen)
    with torch.no_grad():
        ref = torch.nn.functional.linear(x.bfloat16().float(), cpu.dequantized_weight(), bias)
        out = cuda(x.cuda().bfloat16()).float().cpu()
    assert out.shape == ref.shape
    assert _sqnr(out, ref) > 40, f"{kernel} vs unpacked reference: {_sqnr(out, ref):.1f} dB"


@pytest.mark.parametrize("kernel", ["pointer", "tma"])
@pytest.mark.parametrize("activation", ["gelu", "relu"])
@pytest.mark.parametrize(
    "shape,bias",
    [((2048, 3072, 768), True), ((1000, 5120, 1280), True), ((77, 256, 64), False),
     ((300, 96, 160), True)],
    ids=["sam-b-lin1", "sam-h-lin1", "tiny-no-bias", "ragged"],
)  # fmt: skip
def test_float8_epilogue_kernel_matches_its_reference(shape, bias, activation, kernel):
    """The fused float8 GEMM + activation + quantize against its float32 reference: no further
    off, in its largest error or in its squared error from the exact function, than the unfused
    lowering it replaces (cuBLAS fast-accumulation GEMM, bf16 output, activation, quantize).
    (The share of codes that differ is no measure: `gelu_fast`'s 0.16% moves values that sit
    near an e4m3 rounding boundary by one step, as bf16's rounding of y does in the other.)"""
    from samq_fx.gemm_epilogue import launch, linear_act_reference

    if torch.cuda.get_device_capability() < ((9, 0) if kernel == "tma" else (8, 9)):
        pytest.skip(f"the {kernel} kernel needs a newer GPU")
    m, n, k = shape
    g = torch.Generator(device="cuda").manual_seed(m + n)
    x8 = (torch.randn(m, k, device="cuda", generator=g) * 30).to(torch.float8_e4m3fn)
    w8 = (torch.randn(n, k, device="cuda", generator=g) * 30).to(torch.float8_e4m3fn)
    b = torch.randn(n, device="cuda", generator=g).bfloat16() if bias else None
    scales = torch.tensor([2e-4 / k**0.5, 0.01], device="cuda")
    out = launch(x8, w8, scales, b, activation, kernel=kernel).float()
    ref = linear_act_reference(x8, w8, scales, b, activation).float()
    one = torch.ones(1, 1, device="cuda")
    y = torch._scaled_mm(x8, w8.t(), scale_a=one * scales[0], scale_b=one, bias=b,
                         out_dtype=torch.bfloat16, use_fast_accum=True)  # fmt: skip
    y = (torch.nn.functional.gelu(y) if activation == "gelu" else torch.relu(y)).float()
    unfused = (y / scales[1]).clamp(-448, 448).to(torch.float8_e4m3fn).float()
    # fast (reduced-precision) float8 accumulation, in cuBLAS and in the kernel alike, moves a
    # value that cancels to near zero by several steps: bound the kernel by what it replaces
    worst, worst_unfused = float((out - ref).abs().max()), float((unfused - ref).abs().max())
    assert worst <= 1.5 * worst_unfused + 1e-6, (
        f"largest error {worst:.4f} > unfused {worst_unfused:.4f}"
    )
    exact = (x8.float() @ w8.float().t()) * scales[0] + (b.float() if bias else 0)
    exact = torch.nn.functional.gelu(exact) if activation == "gelu" else torch.relu(exact)
    exact = (exact / scales[1]).clamp(-448, 448)
    err, err_unfused = float((out - exact).pow(2).mean()), float((unfused - exact).pow(2).mean())
    assert err <= 1.02 * err_unfused, f"squared error {err:.3e} > unfused {err_unfused:.3e}"
    assert float(ref.abs().amax()) > 10, "the test's scales leave the e4m3 range unused"


@pytest.mark.parametrize("backend", ["float8-static", "int8-static", "int8-dynamic"])
def test_compiled_encoder_fuses_the_mlp_epilogue(calibrated, backend):
    """float8-static and int8-static run every MLP's lin1 + GELU + lin2's quantizer as the one
    Triton GEMM, int8-dynamic lin1 + GELU, in the compiled encoder too (no erf left to
    inductor), and compute what the unfused lowering computes."""
    if backend == "float8-static" and torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("float8 needs sm_89+")
    q = calibrated("W8A8-int8")
    plain = samq_fx.lower(q, backend, fuse_epilogue=False, verbose=False)
    lowered = samq_fx.lower(q, backend, verbose=False)
    report = lowered.samq_lowering_report
    assert report.fused_epilogues == 4 and report.unfused_epilogues == {}  # the encoder's MLPs
    x = torch.randn(2, 3, 256, 256, device="cuda")
    with torch.no_grad():
        unfused, fused = plain.image_encoder(x), lowered.image_encoder(x)
    assert _sqnr(fused, unfused) > 25, f"fused vs unfused: {_sqnr(fused, unfused):.1f} dB"
    out, eager, fake, source = _compile_and_run(lowered, q)
    op = "samq.float8_linear_act" if backend == "float8-static" else "samq.int8_linear"
    assert op in source, "the compiled encoder does not call the kernel"
    if backend == "int8-dynamic":  # lin1 writes lin2's codes with per-group scales
        assert "samq.int8_linear_group_codes" in source
    assert not re.search(r"\berf\(", source), "inductor still computes a GELU"
    assert _sqnr(out, eager) > 25, f"compiled vs eager lowered: {_sqnr(out, eager):.1f} dB"
    assert _sqnr(out, fake) > 20, f"lowered vs fake-quant: {_sqnr(out, fake):.1f} dB"


def test_cudagraphs_lowered_model_runs_the_predictor_and_the_mask_generator(calibrated):
    """`lower(..., compile=True, cudagraphs=True)` as the README recommends it for one image at a
    time: SamPredictor over two images and SamAutomaticMaskGenerator (several decoder batches,
    the last one smaller) give what the same lowered model gives without CUDA graphs."""
    import numpy as np
    from segment_anything import SamAutomaticMaskGenerator, SamPredictor

    q = calibrated("W8A8-int8")
    plain = samq_fx.lower(q, "int8-static", verbose=False)
    graphed = samq_fx.lower(q, "int8-static", compile=True, cudagraphs=True, verbose=False)
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (200, 240, 3), dtype=np.uint8) for _ in range(2)]
    box = np.array([40, 30, 160, 150])
    results = {}
    for name, model in (("plain", plain), ("graphed", graphed)):
        predictor = SamPredictor(model)
        out = []
        for image in images:
            predictor.set_image(image)
            masks, scores, _ = predictor.predict(box=box, multimask_output=False)
            out.append((masks, scores))
        gen = SamAutomaticMaskGenerator(model, points_per_side=6, points_per_batch=16,
                                        pred_iou_thresh=0.0, stability_score_thresh=0.0)  # fmt: skip
        results[name] = (out, [gen.generate(image) for image in images])
    for (m0, s0), (m1, s1) in zip(results["plain"][0], results["graphed"][0]):
        assert (m0 != m1).mean() < 0.01 and np.allclose(s0, s1, atol=0.02)
    for a, b in zip(results["plain"][1], results["graphed"][1]):
        assert abs(len(a) - len(b)) <= max(1, len(a) // 10), (len(a), len(b))


def _int8_gemm_case(shape, kernel):
    """(generator, x codes (M, K), w codes (N, K)) for an int8 GEMM test, seeded by the shape;
    skips the TMA kernel below sm_90."""
    if kernel == "tma" and torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("the TMA kernel needs sm_90+")
    m, n, k = shape
    g = torch.Generator(device="cuda").manual_seed(m + n)
    x = torch.randint(-128, 128, (m, k), device="cuda", generator=g, dtype=torch.int8)
    w = torch.randint(-127, 128, (n, k), device="cuda", generator=g, dtype=torch.int8)
    return g, x, w


@pytest.mark.parametrize("kernel", ["pointer", "tma"])
@pytest.mark.parametrize("codes", ["none", "int8"])
@pytest.mark.parametrize(
    "shape,activation,rows",
    [((32768, 2304, 768), "none", False), ((2048, 3072, 768), "gelu", False),
     ((7, 256, 256), "none", False), ((300, 96, 160), "relu", True), ((1000, 1280, 5120), "none", True),
     ((2048, 3072, 768), "gelu", True)],
    ids=["sam-b-qkv-b8", "sam-b-lin1", "decoder-7-rows", "ragged-dynamic", "sam-h-lin2-dynamic",
         "sam-b-lin1-dynamic"],
)  # fmt: skip
def test_int8_kernel_matches_exact_sums(shape, activation, rows, codes, kernel):
    """The int8 GEMM against float64 sums on the same codes (exact here): the linear's output
    to float32 rounding, and the next linear's codes at most one step off where float32
    rounding lands next to a rounding boundary (under 0.1% of them). Any row count runs: the
    mask decoder's token-side linears see 7 rows a prompt, which cuBLAS's _int_mm refuses."""
    from samq_fx.gemm_epilogue import Int8Operands, gelu_fast, launch

    g, x, w = _int8_gemm_case(shape, kernel)
    m, n, k = shape
    zero = 0 if rows else 21
    ops = Int8Operands(
        zero * w.sum(1, dtype=torch.int32),
        torch.rand(n, device="cuda", generator=g) * 1e-4 + 1e-5,
        torch.rand(m, device="cuda", generator=g) + 0.5 if rows else None,
    )
    bias = torch.randn(n, device="cuda", generator=g).bfloat16()
    s_out = 0.05
    scales = torch.tensor([2.0 / k**0.5, s_out, 7.0], device="cuda")
    out_dtype = torch.int8 if codes == "int8" else torch.bfloat16
    out = launch(x, w, scales, bias, activation, codes=codes, int8=ops, out_dtype=out_dtype,
                 kernel=kernel).double()  # fmt: skip
    y = (x.double() @ w.double().t() - ops.col_zero.double()) * ops.col_scale.double()
    y = y * float(scales[0])
    if rows:
        y = y * ops.row_scale.double()[:, None]
    y = y + bias.double()
    if activation == "gelu":
        y = gelu_fast(y.float()).double()
    elif activation == "relu":
        y = torch.relu(y)
    if codes == "none":
        err = float((out - y).abs().max() / y.abs().max())
        assert err < 2**-8, f"largest error {err:.2e} (bf16 output)"
        return
    ref = (torch.round(y / s_out) + 7).clamp(-128, 127)
    off = (out - ref).abs()
    assert float(off.max()) <= 1 and float(off.gt(0).float().mean()) < 1e-3
    assert float(ref.eq(127).float().mean()) < 0.5, "the scales saturate the codes"


@pytest.mark.parametrize("kernel", ["pointer", "tma"])
@pytest.mark.parametrize(
    "shape", [(32768, 768, 3072), (300, 96, 160)], ids=["sam-b-lin2-b8", "ragged"]
)
def test_int8_kernel_adds_the_residual(shape, kernel):
    """`residual` (fuse_residual_add): the bf16 output is x + the linear, rounded once, within
    bf16's rounding of the exact sum, and no further from it than the unfused pair (bf16 linear
    output, then a bf16 add)."""
    from samq_fx.gemm_epilogue import Int8Operands, launch

    g, x, w = _int8_gemm_case(shape, kernel)
    m, n, k = shape
    ops = Int8Operands(
        13 * w.sum(1, dtype=torch.int32), torch.rand(n, device="cuda", generator=g) * 1e-4 + 1e-5
    )
    bias = torch.randn(n, device="cuda", generator=g).bfloat16()
    res = (torch.randn(m, n, device="cuda", generator=g) * 4).bfloat16()
    scales = torch.tensor([2.0 / k**0.5, 1.0, 0.0], device="cuda")
    spec = {"codes": "none", "int8": ops, "out_dtype": torch.bfloat16, "kernel": kernel}
    fused = launch(x, w, scales, bias, "none", residual=res, **spec).double()
    unfused = (launch(x, w, scales, bias, "none", **spec) + res).double()
    y = (x.double() @ w.double().t() - ops.col_zero.double()) * ops.col_scale.double()
    exact = y * float(scales[0]) + bias.double() + res.double()
    err_fused = float((fused - exact).abs().max() / exact.abs().max())
    err_unfused = float((unfused - exact).abs().max() / exact.abs().max())
    assert err_fused < 2**-8, f"largest error {err_fused:.2e} (bf16 output)"
    assert err_fused <= err_unfused * 1.01, (err_fused, err_unfused)
    with pytest.raises(ValueError, match="residual of shape"):
        launch(x, w, scales, bias, "none", residual=res[:, :-1], **spec)


@pytest.mark.parametrize("kernel", ["pointer", "tma"])
@pytest.mark.parametrize(
    "lin1,lin2", [((8192, 3072, 768), (8192, 768, 3072)), ((300, 208, 160), (300, 96, 320))],
    ids=["sam-b-mlp-b2", "ragged"],
)  # fmt: skip
def test_int8_group_codes_match_exact_sums(lin1, lin2, kernel):
    """int8-dynamic's MLP on the GPU: lin1 (per-token input, GELU) writes codes with a scale
    per row and 128 columns, at most one step off `quantize_int8_per_group` of the float64
    output where float32 rounding lands next to a boundary, its scales to float32 rounding;
    lin2's K loop applies each group's scales (a short last group in the ragged case) and adds
    the residual, within the bf16 output's rounding of the float64 result."""
    from samq_fx.gemm_epilogue import Int8Operands, gelu_fast, launch, quantize_int8_per_group

    g, x, w = _int8_gemm_case(lin1, kernel)
    m, n, k = lin1
    rows = torch.rand(m, device="cuda", generator=g) + 0.5
    ops = Int8Operands(torch.zeros(n, device="cuda", dtype=torch.int32),
                       torch.rand(n, device="cuda", generator=g) * 1e-4 + 1e-5, rows)  # fmt: skip
    bias = torch.randn(n, device="cuda", generator=g).bfloat16()
    scales = torch.tensor([2.0 / k**0.5, 1.0, 0.0], device="cuda")
    codes, group_scales = launch(x, w, scales, bias, "gelu", codes="int8_tiles", int8=ops,
                                 kernel=kernel)  # fmt: skip
    y = (x.double() @ w.double().t()) * ops.col_scale.double() * float(scales[0])
    y = gelu_fast((y * rows.double()[:, None] + bias.double()).float()).double()
    ref_codes, ref_scales = quantize_int8_per_group(y)
    off = (codes.double() - ref_codes.double()).abs()
    assert float(off.max()) <= 1 and float(off.gt(0).double().mean()) < 1e-3
    assert float(((group_scales.double() - ref_scales) / ref_scales).abs().max()) < 1e-5

    g, x2, w2 = _int8_gemm_case(lin2, kernel)
    m, n, k = lin2
    ops = Int8Operands(torch.zeros(n, device="cuda", dtype=torch.int32),
                       torch.rand(n, device="cuda", generator=g) * 1e-2 + 1e-3)  # fmt: skip
    x_scales = (torch.rand((k + 127) // 128, m, device="cuda", generator=g) + 0.5) * 1e-2
    bias = torch.randn(n, device="cuda", generator=g).bfloat16()
    res = (torch.randn(m, n, device="cuda", generator=g) * 4).bfloat16()
    out = launch(x2, w2, torch.tensor([1.0, 1.0, 0.0], device="cuda"), bias, "none",
                 codes="none", int8=ops, out_dtype=torch.bfloat16, kernel=kernel,
                 x_tile_scales=x_scales, residual=res).double()  # fmt: skip
    xs = x2.double() * x_scales.double().t().repeat_interleave(128, dim=1)[:, :k]
    exact = (xs @ w2.double().t()) * ops.col_scale.double() + bias.double() + res.double()
    err = float((out - exact).abs().max() / exact.abs().max())
    assert err < 2**-8, f"largest error {err:.2e} (bf16 output)"


def test_tma_kernel_leaves_rows_it_cannot_address_to_the_pointer_kernel():
    """The TMA kernel makes its descriptors on the device, where nothing checks them: an output
    whose rows are not 16-byte multiples (20 bf16 columns) goes to the pointer kernel with the
    same result, and asking for TMA by name says why it cannot."""
    from samq_fx.gemm_epilogue import Int8Operands, _tuning_key, chosen_kernels, launch

    g, x, w = _int8_gemm_case((256, 20, 64), "tma")
    ops = Int8Operands(torch.zeros(20, device="cuda", dtype=torch.int32),
                       torch.rand(20, device="cuda", generator=g) * 1e-2)  # fmt: skip
    scales = torch.tensor([0.05, 1.0, 0.0], device="cuda")
    spec = {"codes": "none", "int8": ops, "out_dtype": torch.bfloat16}
    out = launch(x, w, scales, None, "none", **spec).double()
    exact = (x.double() @ w.double().t()) * ops.col_scale.double() * 0.05
    assert float((out - exact).abs().max() / exact.abs().max()) < 2**-8
    key = _tuning_key(x, w, torch.empty(0, 20, dtype=torch.bfloat16), None, "none", "none", ops)
    assert chosen_kernels()[key].startswith("pointer")
    with pytest.raises(ValueError, match="16-byte"):
        launch(x, w, scales, None, "none", kernel="tma", **spec)


def test_int8_torchao_kernel_still_compiles_to_int_mm(calibrated):
    """int8_kernel="torchao": the compiled encoder calls cuBLAS's int8 GEMM through torchao."""
    q = calibrated("W8A8-int8")
    lowered = samq_fx.lower(q, "int8-static", int8_kernel="torchao", verbose=False)
    out, eager, fake, source = _compile_and_run(lowered, q)
    assert "int_mm" in source and "samq.int8_linear" not in source
    assert _sqnr(out, fake) > 20, f"lowered vs fake-quant: {_sqnr(out, fake):.1f} dB"


_AUTOTUNE_SCRIPT = """
import sys, torch
from triton.runtime import autotuner
from samq_fx.gemm_epilogue import Int8Operands, launch
if sys.argv[1] == "again":  # every config must come from the first process's timings
    def refuse(*args, **kwargs):
        raise AssertionError("the autotuner benchmarked a config again")
    autotuner.Autotuner._bench = refuse
g = torch.Generator(device="cuda").manual_seed(0)
x = torch.randint(-127, 128, (4096, 768), device="cuda", generator=g, dtype=torch.int8)
w = torch.randint(-127, 128, (1024, 768), device="cuda", generator=g, dtype=torch.int8)
ops = Int8Operands(torch.zeros(1024, device="cuda", dtype=torch.int32),
                   torch.full((1024,), 1e-4, device="cuda"))
scales = torch.tensor([1.0, 1.0, 0.0], device="cuda")
kernels = ["pointer"] + (["tma"] if torch.cuda.get_device_capability() >= (9, 0) else [])
for kernel in kernels:
    out = launch(x, w, scales, None, "gelu", codes="none", int8=ops, out_dtype=torch.bfloat16,
                 kernel=kernel)
    print(kernel, float(out.double().sum()))
"""


def test_autotuned_configs_come_from_disk_in_a_new_process(tmp_path):
    """`CACHE_AUTOTUNING`: the first process times the GEMM's candidate configs and leaves the
    timings in TRITON_CACHE_DIR; a second process with the same shapes runs without timing
    any config (its autotuner's benchmark raises) and computes the same outputs."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "TRITON_CACHE_DIR": str(tmp_path / "triton")}
    runs = [
        subprocess.run(
            [sys.executable, "-c", _AUTOTUNE_SCRIPT, mode],
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )  # fmt: skip
        for mode in ("first", "again")
    ]
    for run in runs:
        assert run.returncode == 0, run.stderr[-3000:]
    assert list((tmp_path / "triton").rglob("*.autotune.json")), "no autotune timings on disk"
    first, again = (run.stdout.split() for run in runs)
    assert first == again and len(first) >= 2
