"""SAM's MLP lin1 on the H100: float8 GEMM then a GELU + float8-quantize pass (what
`float8-static` lowered to before `fuse_linear_epilogue`), against the one Triton GEMM whose
epilogue does both (`samq_fx.gemm_epilogue`).

Shapes at batch 8: SAM-B lin1 32768 x 768 -> 3072, SAM-H 32768 x 1280 -> 5120 (tokens x K -> N).
Each variant is timed compiled, as the lowered model runs it, from float8 x codes to float8
codes for lin2; the table also gives each GEMM's TFLOP/s and how far the output codes differ.

    PYTHONPATH=. python3 bench/mlp_epilogue.py [--json out.json]
    PYTHONPATH=. python3 bench/mlp_epilogue.py --dtype bfloat16   # the bf16 baseline's lin1

With `--dtype bfloat16` the question is the baseline's: does the bf16 pipeline gain from the
same kernel with its GELU in the epilogue, against cuBLAS and inductor's GELU pass?
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

if __package__ is None and "samq_fx" not in sys.modules:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from samq_fx.gemm_epilogue import (  # noqa: E402
    _tuned_kernel,
    _tuned_kernel_tma,
    chosen_kernels,
    float8_linear_act_op,
    launch,
)
from samq_fx.report import format_table  # noqa: E402
from samq_fx.triton_attention import FLOAT8_MAX  # noqa: E402

SHAPES = {"SAM-B lin1": (32768, 3072, 768), "SAM-H lin1": (32768, 5120, 1280)}
E4M3 = torch.float8_e4m3fn


def _median_ms(fn, repeats: int = 50) -> float:
    for _ in range(5):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def _unfused(x8, w8, x_scale, w_scale, bias, out_scale):
    y = torch._scaled_mm(x8, w8.t(), scale_a=x_scale, scale_b=w_scale, bias=bias,
                         out_dtype=torch.bfloat16, use_fast_accum=True)  # fmt: skip
    y = torch.nn.functional.gelu(y).float() / out_scale
    return y.clamp(-FLOAT8_MAX, FLOAT8_MAX).to(E4M3)


def _time_shape(m: int, n: int, k: int) -> tuple[dict[str, float], float, str]:
    """({variant: ms}, fraction of output codes that differ, the kernel's autotuned config)."""
    x8 = (torch.randn(m, k, device="cuda") * 40).clamp(-448, 448).to(E4M3)
    w8 = (torch.randn(n, k, device="cuda") * 40).clamp(-448, 448).to(E4M3)
    bias = torch.randn(n, device="cuda").bfloat16()
    x_scale = torch.tensor(0.01, device="cuda").reshape(1, 1)
    w_scale = torch.tensor(0.002, device="cuda").reshape(1, 1)
    out_scale = torch.tensor(0.01, device="cuda")
    scales = torch.stack([(x_scale * w_scale).reshape(()), out_scale])
    unfused = torch.compile(_unfused, fullgraph=True)
    inputs = (x8, w8, x_scale, w_scale, bias, out_scale)
    a, b = unfused(*inputs), float8_linear_act_op(x8, w8, scales, bias, "gelu")
    times = {
        "scaled_mm (bf16 out)": _median_ms(
            lambda: torch._scaled_mm(
                x8,
                w8.t(),
                scale_a=x_scale,
                scale_b=w_scale,
                bias=bias,
                out_dtype=torch.bfloat16,
                use_fast_accum=True,
            )  # fmt: skip
        ),
        "scaled_mm + GELU/quant pass": _median_ms(lambda: unfused(*inputs)),
        "fused Triton GEMM, pointer kernel": _median_ms(
            lambda: launch(x8, w8, scales, bias, "gelu", kernel="pointer")
        ),
        "fused Triton GEMM, TMA persistent kernel": _median_ms(
            lambda: launch(x8, w8, scales, bias, "gelu", kernel="tma")
        ),
    }
    differ = float((a.view(torch.uint8) != b.view(torch.uint8)).float().mean())
    configs = f"pointer {_tuned_kernel.best_config}; tma {_tuned_kernel_tma.best_config}"
    return times, differ, f"{configs}; launch picks {chosen_kernels()}"


def _bf16_unfused(x, w, bias):
    return torch.nn.functional.gelu(torch.nn.functional.linear(x, w, bias))


def _time_shape_bf16(m: int, n: int, k: int) -> tuple[dict[str, float], float, str]:
    """The bf16 pipeline's lin1: cuBLAS + inductor's GELU pass, against the same Triton GEMM
    with the GELU in its epilogue and bf16 out; (times, largest |difference| relative to the
    output's largest value, configs)."""
    x = torch.randn(m, k, device="cuda").bfloat16()
    w = (torch.randn(n, k, device="cuda") / k**0.5).bfloat16()
    bias = torch.randn(n, device="cuda").bfloat16()
    one = torch.ones(1, device="cuda")
    unfused = torch.compile(_bf16_unfused, fullgraph=True)
    fused = lambda kernel: launch(x, w, one, bias, "gelu", codes="none",  # noqa: E731
                                  out_dtype=torch.bfloat16, kernel=kernel)  # fmt: skip
    a, b = unfused(x, w, bias), fused("tma")
    differ = float((a.float() - b.float()).abs().max() / a.float().abs().max())
    times = {
        "bf16 cuBLAS + GELU pass (compiled)": _median_ms(lambda: unfused(x, w, bias)),
        "bf16 cuBLAS linear alone": _median_ms(lambda: torch.nn.functional.linear(x, w, bias)),
        "bf16 fused Triton GEMM, pointer kernel": _median_ms(lambda: fused("pointer")),
        "bf16 fused Triton GEMM, TMA persistent kernel": _median_ms(lambda: fused("tma")),
    }
    configs = f"pointer {_tuned_kernel.best_config}; tma {_tuned_kernel_tma.best_config}"
    return times, differ, configs


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", type=Path)
    p.add_argument("--dtype", choices=("float8", "bfloat16"), default="float8",
                   help="float8: the lowered MLP; bfloat16: the bf16 baseline's lin1")  # fmt: skip
    args = p.parse_args(argv)
    torch.manual_seed(0)
    rows, record = [], []
    time_shape = _time_shape if args.dtype == "float8" else _time_shape_bf16
    for name, (m, n, k) in SHAPES.items():
        times, differ, config = time_shape(m, n, k)
        flops = 2.0 * m * n * k
        for variant, ms in times.items():
            rows.append((name, variant, f"{ms:.3f}", f"{flops / ms / 1e9:.0f}"))
            record.append({"shape": name, "m": m, "n": n, "k": k, "variant": variant, "ms": ms,
                           "tflops": flops / ms / 1e9, "codes_differ": differ,
                           "config": config})  # fmt: skip
        what = "codes differing" if args.dtype == "float8" else "largest difference / max |y|"
        rows.append((name, f"{what} (fused vs unfused): {differ:.2%}", "", ""))
        print(name, "autotuned:", config, flush=True)
    print(torch.cuda.get_device_name(), torch.__version__)
    print(format_table(("shape", "variant", "ms", "TFLOP/s"), rows))
    if args.json:
        meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
        args.json.write_text(json.dumps({**meta, "rows": record}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
