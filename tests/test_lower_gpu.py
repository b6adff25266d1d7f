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
    "int8-static": ("W8A8-int8", "int_mm"),
    "int8-dynamic": ("W8A8-int8", "int_mm"),
    "float8-static": ("W8A8-int8", "scaled_mm"),
    "int4-weight": ("W4A16-int4", "int4pack_mm"),
}


@pytest.fixture(scope="module")
def tiny_cuda():
    torch.manual_seed(0)
    return samq_fx.capture(samq_fx.build_sam("tiny").cuda().eval())


def _sqnr(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.float(), ref.float()
    return float(10 * torch.log10(ref.pow(2).mean() / (out - ref).pow(2).mean().clamp_min(1e-30)))


@pytest.mark.parametrize("backend", list(KERNELS))
def test_compiled_encoder_calls_the_kernel(tiny_cuda, backend):
    from torch._inductor.utils import run_and_get_code

    preset, kernel = KERNELS[backend]
    if backend.startswith("float8") and torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("float8 needs sm_89+")
    q = samq_fx.quantize(tiny_cuda, calibration_samples(2), samq_fx.QuantConfig.preset(preset),
                         progress=False)  # fmt: skip
    lowered = samq_fx.lower(q, backend, verbose=False)
    assert lowered.samq_lowering_report.fused_attention == 4
    x = torch.randn(2, 3, 256, 256, device="cuda")
    with torch.no_grad():
        eager = lowered.image_encoder(x)
        fake = q.image_encoder(x)
        compile_parts(lowered)
        out, codes = run_and_get_code(lowered.image_encoder, x)
    source = "\n".join(codes)
    calls = sorted(set(re.findall(r"extern_kernels\.\w+|torch\.ops\.\w+\.\w+", source)))
    assert kernel in source, f"{backend}: no {kernel} call in the compiled encoder; calls: {calls}"
    assert "flex" in source.lower(), f"no flex attention kernel in the compiled encoder: {calls}"
    assert _sqnr(out, eager) > 25, f"compiled vs eager lowered: {_sqnr(out, eager):.1f} dB"
    floor = 12 if backend == "int4-weight" else 20
    assert _sqnr(out, fake) > floor, f"lowered vs fake-quant: {_sqnr(out, fake):.1f} dB"
