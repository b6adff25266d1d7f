"""Time SAM's linear shapes on each GEMM the lowerings can call: bf16 (cuBLAS), float8
(cuBLAS `_scaled_mm`, and this project's Triton kernel), int8 (cuBLAS `_int_mm`, as torchao
calls it, and this project's Triton kernel with its epilogue). One row per (shape, GEMM):
median ms over `triton.testing.do_bench` and the tensor-core rate it reaches.

    PYTHONPATH=. python3 bench/int8_gemm.py --json bench/int8_gemm_h100.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

if __package__ is None and "samq_fx" not in sys.modules:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from samq_fx.gemm_epilogue import Int8Operands, chosen_kernels, launch  # noqa: E402
from samq_fx.report import format_table  # noqa: E402

# (name, M, N, K, activation, codes): SAM-B's encoder linears at batch 8 (4,096 tokens an
# image), the fused MLP's lin1 writing lin2's codes, and a mask-decoder linear (64 prompts)
SHAPES = (
    ("SAM-B qkv", 32768, 2304, 768, "none", "none"),
    ("SAM-B proj", 32768, 768, 768, "none", "none"),
    ("SAM-B lin1+gelu", 32768, 3072, 768, "gelu", "codes"),
    ("SAM-B lin2", 32768, 768, 3072, "none", "none"),
    ("decoder 64x7 tokens", 448, 256, 256, "none", "none"),
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    rows = [row for shape in SHAPES for row in _time_shape(*shape)]
    table = [(r["shape"], r["gemm"], f"{r['ms']:.3f}", f"{r['tops']:.0f}") for r in rows]
    print(format_table(("shape", "GEMM", "median ms", "TOPS"), table))
    print("kernels picked:", {str(k): v for k, v in chosen_kernels().items()})
    if args.json:
        meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
        args.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))


def _time_shape(name: str, m: int, n: int, k: int, act: str, codes: str) -> list[dict]:
    from triton.testing import do_bench

    dev = "cuda"
    rows = []
    g = torch.Generator(device=dev).manual_seed(0)
    xb = torch.randn(m, k, device=dev, generator=g).bfloat16()
    wb = torch.randn(n, k, device=dev, generator=g).bfloat16() * 0.03
    bias = torch.randn(n, device=dev, generator=g).bfloat16()
    x8 = (xb * 30).to(torch.float8_e4m3fn)
    w8 = (wb * 300).to(torch.float8_e4m3fn)
    xi = torch.randint(-128, 128, (m, k), device=dev, dtype=torch.int8, generator=g)
    wi = torch.randint(-127, 128, (n, k), device=dev, dtype=torch.int8, generator=g)
    one = torch.ones(1, 1, device=dev)
    ops = Int8Operands(3 * wi.sum(1, dtype=torch.int32), torch.rand(n, device=dev) * 1e-4)
    scales = torch.tensor([1e-3, 0.05, -3.0], device=dev)
    f8_codes = "float8" if codes == "codes" else "none"
    i8_codes = "int8" if codes == "codes" else "none"
    f8_out = torch.float8_e4m3fn if codes == "codes" else torch.bfloat16
    i8_out = torch.int8 if codes == "codes" else torch.bfloat16
    gemms = {
        "bf16 cuBLAS (F.linear)": lambda: torch.nn.functional.linear(xb, wb, bias),
        "float8 cuBLAS (_scaled_mm)": lambda: torch._scaled_mm(
            x8, w8.t(), scale_a=one, scale_b=one, bias=bias, out_dtype=torch.bfloat16,
            use_fast_accum=True),
        "float8 samq Triton": lambda: launch(x8, w8, scales, bias, act, codes=f8_codes,
                                             out_dtype=f8_out),
        "int8 cuBLAS (_int_mm, sums only)": lambda: torch._int_mm(xi, wi.t()),
        "int8 samq Triton": lambda: launch(xi, wi, scales, bias, act, codes=i8_codes,
                                           int8=ops, out_dtype=i8_out),
    }  # fmt: skip
    for gemm, fn in gemms.items():
        if m <= 16 and "_int_mm" in gemm:
            continue
        fn()  # autotune / pick outside the timing
        ms = do_bench(fn, warmup=25, rep=100, return_mode="median")
        rows.append({"shape": name, "M": m, "N": n, "K": k, "epilogue": f"{act}/{codes}",
                     "gemm": gemm, "ms": ms, "tops": 2 * m * n * k / ms / 1e9})  # fmt: skip
        print(f"{name:22s} {gemm:34s} {ms:7.3f} ms {rows[-1]['tops']:7.1f} TOPS", flush=True)
    return rows


if __name__ == "__main__":
    main()
