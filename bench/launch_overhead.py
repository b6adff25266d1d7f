"""Host time a call of each custom kernel takes to enqueue (CUDA), layer by layer of its launch path.

A lowered encoder without CUDA graphs is launch-bound when the CPU takes longer to enqueue its
kernels than the GPU takes to run them (SAM-B float8 at batch 1; bench/RESULTS.md, session 7).
This script times, for SAM-B's shapes at batch 8, the CPU side of: the custom op as the
compiled graph calls it (`torch.ops.samq.*`), the Python function under it, the Triton
autotuner's call, and the bare Triton kernel at the autotuner's chosen config; plus
`torch._scaled_mm`, an `aten.add` and a 3-argument Triton kernel as floors. Each number is the
median over 7 rounds of (time to enqueue 20 calls) / 20, with the GPU queue drained between
rounds and never full (so no call blocks).

    PYTHONPATH=. python3 bench/launch_overhead.py --json bench/launch_overhead_h100.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

if __package__ is None and "samq_fx" not in sys.modules:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from samq_fx import gemm_epilogue, triton_attention, window_attention  # noqa: E402


@triton.jit
def _add_kernel(X, Y, N, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(Y + offs, tl.load(X + offs, mask=offs < N) + 1, mask=offs < N)


def host_us(fn, calls: int = 20, rounds: int = 7) -> float:
    """Median host microseconds a call of `fn` takes to return (GPU drained between rounds)."""
    fn()
    torch.cuda.synchronize()
    per_call = []
    for _ in range(rounds):
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        per_call.append((time.perf_counter() - start) / calls * 1e6)
        torch.cuda.synchronize()
    return statistics.median(per_call)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    dev = torch.device("cuda")
    torch.manual_seed(0)
    rows = []

    def record(name: str, fn) -> None:
        us = host_us(fn)
        rows.append({"call": name, "host_us": round(us, 1)})
        print(f"{us:8.1f} us  {name}", flush=True)

    a = torch.randn(1 << 20, device=dev)
    b = torch.empty_like(a)
    record("aten.add (floor)", lambda: torch.add(a, 1))
    record(
        "3-argument Triton kernel (floor)",
        lambda: _add_kernel[(triton.cdiv(a.numel(), 1024),)](a, b, a.numel(), BLOCK=1024),
    )

    # MLP lin1 of SAM-B at batch 8: 32768 x 768 -> 3072, GELU, float8 out
    x8 = torch.randn(32768, 768, device=dev).to(torch.float8_e4m3fn)
    w8 = torch.randn(3072, 768, device=dev).to(torch.float8_e4m3fn)
    scales = torch.tensor([1e-3, 0.05], device=dev)
    bias = torch.randn(3072, device=dev, dtype=torch.bfloat16)
    op = torch.ops.samq.float8_linear_act
    record("samq.float8_linear_act (op)", lambda: op(x8, w8, scales, bias, "gelu"))
    record("gemm_epilogue.launch", lambda: gemm_epilogue.launch(x8, w8, scales, bias, "gelu"))
    out = torch.empty(32768, 3072, device=dev, dtype=torch.float8_e4m3fn)
    for kernel in gemm_epilogue.KERNELS:
        record(
            f"gemm_epilogue._run({kernel!r}) (tuned launcher)",
            lambda k=kernel: gemm_epilogue._run(k, x8, w8, out, scales, bias, "gelu"),
        )
    from triton.tools.tensor_descriptor import TensorDescriptor

    # what the host-made descriptors cost each launch before the TMA kernel made its own
    record("3x TensorDescriptor.from_tensor (no longer per launch)", lambda: [
        TensorDescriptor.from_tensor(t, [1, 32]) for t in (x8, w8, out)])  # fmt: skip
    record("torch.cuda.get_device_properties", lambda: torch.cuda.get_device_properties(dev))
    tuned = gemm_epilogue._tuned_kernel_tma
    if tuned.cache:  # the bare JIT kernel at the autotuner's config (descriptors on the device)
        config = next(iter(tuned.cache.values()))
        sms = torch.cuda.get_device_properties(dev).multi_processor_count
        flags = {"HAS_BIAS": True, "ACTIVATION": "gelu", "CODES": "float8", "INT8": False,
                 "HAS_ROW_SCALE": False, "HW_APPROX": True, "NUM_SMS": sms}  # fmt: skip
        meta = flags | config.all_kwargs()
        programs = (sms * config.kwargs["PER_SM"],)
        unused = (scales, scales, scales)  # col_zero, col_scale, row_scale: read by int8 only
        record("bare TMA kernel", lambda: tuned.fn[programs](
            x8, w8, out, bias, scales, *unused, 32768, 3072, 768, **meta))  # fmt: skip
    # qkv of SAM-B at batch 8 on the int8 GEMM: 32768 x 768 -> 2304, bf16 out, as int8-static's
    # 48 linears a forward call it
    xi = torch.randint(-128, 128, (32768, 768), device=dev, dtype=torch.int8)
    wi = torch.randint(-127, 128, (2304, 768), device=dev, dtype=torch.int8)
    ops = gemm_epilogue.Int8Operands(wi.sum(1, dtype=torch.int32), torch.rand(2304, device=dev))
    si = torch.tensor([1e-3, 1.0, 0.0], device=dev)
    bi = torch.randn(2304, device=dev, dtype=torch.bfloat16)
    iop = torch.ops.samq.int8_linear
    iargs = (xi, wi, ops.col_zero, ops.col_scale, si, None, bi, "none", "none", torch.bfloat16)
    record("samq.int8_linear (op)", lambda: iop(*iargs))
    with torch.inference_mode():
        record("samq.int8_linear (op, inference mode)", lambda: iop(*iargs))
    with torch.no_grad():  # as SamPredictor calls the model
        record("samq.int8_linear (op, no_grad)", lambda: iop(*iargs))
    # the same Python function registered with torch.library.Library instead of custom_op (no
    # autograd wrapper, no aliasing check, no dynamo-disable frame): what dispatch alone costs
    twin = torch.library.Library("samq_bench", "DEF")
    twin.define(str(iop.default._schema).removeprefix("samq::"))
    twin.impl("int8_linear", gemm_epilogue.int8_linear_op._init_fn, "CUDA")
    top = torch.ops.samq_bench.int8_linear
    with torch.no_grad():
        record("Library.impl twin of samq.int8_linear (no_grad)", lambda: top(*iargs))
    with torch.inference_mode():
        record("Library.impl twin of samq.int8_linear (inference mode)", lambda: top(*iargs))
    record("gemm_epilogue.launch (int8)", lambda: gemm_epilogue.launch(
        xi, wi, si, bi, "none", codes="none", int8=ops, out_dtype=torch.bfloat16))  # fmt: skip
    oi = torch.empty(32768, 2304, device=dev, dtype=torch.bfloat16)
    for kernel in gemm_epilogue.KERNELS:
        record(f"gemm_epilogue._run({kernel!r}) (int8, tuned launcher)", lambda k=kernel: (
            gemm_epilogue._run(k, xi, wi, oi, si, bi, "none", codes="none", int8=ops)))  # fmt: skip

    # proj / qkv GEMMs: cuBLAS float8 as inductor calls it
    w_qkv = torch.randn(2304, 768, device=dev).to(torch.float8_e4m3fn)
    one = torch.ones(1, 1, device=dev)
    record("torch._scaled_mm 32768x768 -> 2304", lambda: torch._scaled_mm(
        x8, w_qkv.t(), scale_a=one, scale_b=one, out_dtype=torch.bfloat16, use_fast_accum=True))  # fmt: skip

    # windowed attention: 200 windows x 12 heads x 196 tokens, strided views of the qkv output
    qkv = torch.randn(200, 196, 2304, device=dev, dtype=torch.bfloat16)
    q, k, v = qkv.reshape(200, 196, 3, 12, 64).permute(2, 0, 3, 1, 4).unbind(0)
    th = torch.randn(27, 64, device=dev, dtype=torch.bfloat16)
    tw = torch.randn(27, 64, device=dev, dtype=torch.bfloat16)
    wop = torch.ops.samq.window_attention
    record("samq.window_attention (op)", lambda: wop(q, k, v, th, tw, 0.125, 14, 14))
    record(
        "window_attention.launch", lambda: window_attention.launch(q, k, v, th, tw, 0.125, 14, 14)
    )

    # global attention: 96 = 8 x 12 (batch x heads), 4096 tokens, float8 operands
    qg = torch.randn(96, 4096, 64, device=dev, dtype=torch.bfloat16)
    rel_h = torch.randn(96, 4096, 64, device=dev, dtype=torch.bfloat16)
    args8 = triton_attention.op_inputs(qg, qg, qg, rel_h, rel_h, "float8")
    gop = torch.ops.samq.rel_pos_attention
    record("samq.rel_pos_attention (op, float8)", lambda: gop(*args8))
    record("triton_attention.launch (float8)", lambda: triton_attention.launch(*args8))
    record("torch.empty (96, 4096, 64)", lambda: torch.empty(96, 4096, 64, device=dev))
    if args.json:
        meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                "triton": triton.__version__}  # fmt: skip
        Path(args.json).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
