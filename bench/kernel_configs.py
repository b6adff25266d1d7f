"""Time this project's Triton kernels at each tile config, outside the autotuner, with what the
compiler made of each: registers, spills, shared memory and the matrix instructions in the PTX
(wgmma is Hopper's warpgroup MMA; mma.sync the older per-warp one). For reading why a kernel
runs where it does, not for picking configs at run time (the autotuners do that).

    PYTHONPATH=. python3 bench/kernel_configs.py --json bench/kernel_configs_h100.json
    PYTHONPATH=. python3 bench/kernel_configs.py --parts int8 --a-in-registers \
        --kernels "tma x2" "tma x2 a-regs" --configs 128,128,128,4,3 128,256,128,8,3
    PYTHONPATH=. python3 bench/kernel_configs.py --parts global global-tables

GEMMs: SAM-B's encoder linears at batch 8 in float8 and int8, both kernels (`pointer`: a program
a tile; `tma`: persistent, at 1 and 2 programs an SM; `a-regs`: x's tile through registers),
and the autotuned `launch` with the config it picked. Window attention: SAM-B's 14 x 14
windows (batch 8: 200 windows, 12 heads, head dim 64). Global attention: SAM-B's and SAM-H's
64 x 64 grids at batch 8, float8, bf16, and float8 q·kᵀ with bf16 P·v, with the error against
`attention_reference` on 8 of the heads; `global-tables`: the same grids as `fuse_attention`
wires them now (rel-pos terms from the tables inside, q, k, v read from the qkv output);
`window-as-global`: SAM-B's and SAM-H's windows on the global kernel against the window kernel.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from functools import partial
from pathlib import Path

import torch

if __package__ is None and "samq_fx" not in sys.modules:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from samq_fx import gemm_epilogue as ge  # noqa: E402
from samq_fx import window_attention as wa  # noqa: E402
from samq_fx.report import format_table  # noqa: E402

GEMM_SHAPES = (  # (name, M, N, K, activation, codes out)
    ("qkv", 32768, 2304, 768, "none", False),
    ("lin1 plain", 32768, 3072, 768, "none", False),
    ("lin1+gelu+codes", 32768, 3072, 768, "gelu", True),
    ("lin2", 32768, 768, 3072, "none", False),
)
GEMM_CONFIGS = (  # (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages)
    (128, 256, 128, 8, 3), (128, 256, 64, 8, 4), (128, 128, 128, 8, 4), (128, 128, 128, 4, 3),
    (128, 128, 128, 4, 2), (128, 128, 64, 4, 3), (128, 256, 128, 8, 2), (128, 256, 128, 8, 4),
    (256, 128, 128, 8, 3),
)  # fmt: skip
WINDOW_CONFIGS = (  # (BLOCK_M, M_STEPS, warps, stages, maxnreg[, key chunks])
    (64, 1, 4, 1, None), (64, 1, 8, 1, None), (64, 2, 4, 1, None), (64, 4, 4, 1, None),
    (64, 4, 8, 1, None), (128, 1, 4, 1, None), (128, 1, 8, 1, None), (128, 2, 8, 1, None),
    (32, 1, 4, 1, None), (32, 2, 4, 1, None), (64, 2, 4, 2, None), (64, 4, 4, 2, None),
    (64, 1, 8, 1, 128), (64, 2, 8, 1, 128), (64, 4, 8, 1, 128),
    # the keys in two chunks (`_window_key_chunks`): 37 KB of shared memory a program instead
    # of 106 (offline, sm_90a: 228 registers uncapped, 168 with 89 spill instructions)
    (64, 1, 4, 1, None, 2), (64, 1, 4, 1, 168, 2), (64, 1, 4, 1, 160, 2), (64, 1, 8, 1, None, 2),
    (128, 1, 8, 1, None, 2),
)  # fmt: skip


def compiled_facts(kernel) -> dict:
    """Registers, spills, shared memory and the matrix instructions of a compiled kernel."""
    ptx = kernel.asm.get("ptx", "")
    mma = sorted(set(re.findall(r"(wgmma\.mma_async[\w.]*|mma\.sync[\w.]*)", ptx)))
    return {"regs": kernel.n_regs, "spills": kernel.n_spills,
            "smem": kernel.metadata.shared, "mma": mma}  # fmt: skip


def _bench(fn) -> float:
    from triton.testing import do_bench

    return do_bench(fn, warmup=10, rep=60, return_mode="median")


def gemm_rows(
    dtype: str,
    only: tuple | None = None,
    a_in_registers: bool = False,
    configs=GEMM_CONFIGS,
    kernels: tuple = (),
    shapes: tuple = (),
    programs_per_sm: tuple = (1, 2),
    autotuned: bool = True,
) -> list[dict]:
    """Each GEMM config on each shape; `a_in_registers` adds variants whose dot takes x from
    registers (`gemm_epilogue._in_registers`), named "... a-regs". `autotuned`: also time
    `launch` at the config it picks (which tunes every config first: slow)."""
    import triton
    from triton.tools.tensor_descriptor import TensorDescriptor

    dev = "cuda"
    rows = []
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    for name, m, n, k, act, codes_out in GEMM_SHAPES:
        if (only and name != only[0]) or (shapes and name not in shapes):
            continue
        g = torch.Generator(device=dev).manual_seed(0)
        if dtype == "int8":
            x = torch.randint(-128, 128, (m, k), device=dev, dtype=torch.int8, generator=g)
            w = torch.randint(-127, 128, (n, k), device=dev, dtype=torch.int8, generator=g)
            extra = (3 * w.sum(1, dtype=torch.int32), torch.rand(n, device=dev) * 1e-4)
            codes = "int8" if codes_out else "none"
        else:
            x = (torch.randn(m, k, device=dev, generator=g) * 30).to(torch.float8_e4m3fn)
            w = (torch.randn(n, k, device=dev, generator=g) * 9).to(torch.float8_e4m3fn)
            extra = None
            codes = "float8" if codes_out else "none"
        out_dtype = ge.CODES[codes] or torch.bfloat16
        out = torch.empty(m, n, dtype=out_dtype, device=dev)
        bias = torch.randn(n, device=dev, generator=g).bfloat16()
        scales = torch.tensor([1e-3, 0.05, -3.0], device=dev)
        unused = scales
        cz, cs = extra if extra else (unused, unused)
        flags = {"HAS_BIAS": True, "ACTIVATION": act, "CODES": codes, "INT8": extra is not None,
                 "HAS_ROW_SCALE": False, "HW_APPROX": True}  # fmt: skip
        flops = 2 * m * n * k
        for bm, bn, bk, warps, stages in [only[1]] if only else configs:
            meta = {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8,
                    "num_warps": warps, "num_stages": stages}  # fmt: skip
            tiles = triton.cdiv(m, bm) * triton.cdiv(n, bn)
            variants = {
                "pointer": partial(ge._linear_act_kernel[(tiles,)],
                    x, w, bias, out, scales, cz, cs, unused, m, n, k,
                    x.stride(0), w.stride(0), out.stride(0), **flags, **meta),
            }  # fmt: skip
            xd = TensorDescriptor.from_tensor(x, [bm, bk])
            wd = TensorDescriptor.from_tensor(w, [bn, bk])
            od = TensorDescriptor.from_tensor(out, [bm, bn])
            for per_sm in programs_per_sm:
                programs = min(per_sm * sms, tiles)
                variants[f"tma x{per_sm}"] = partial(ge._linear_act_kernel_tma[(programs,)],
                    xd, wd, od, bias, scales, cz, cs, unused, m, n, k, **flags, **meta,
                    NUM_SMS=programs, PER_SM=1)  # fmt: skip
            if a_in_registers:
                for kernel_name in list(variants):
                    fn = variants[kernel_name]
                    variants[f"{kernel_name} a-regs"] = partial(fn, A_IN_REGISTERS=True)
            for kernel_name, fn in variants.items():
                if (only and kernel_name != only[2]) or (kernels and kernel_name not in kernels):
                    continue
                row = {"kernel": kernel_name, "dtype": dtype, "shape": name, "M": m, "N": n,
                       "K": k, "config": [bm, bn, bk, warps, stages]}  # fmt: skip
                try:
                    row.update(compiled_facts(fn()))
                    row["ms"] = _bench(fn)
                    row["tops"] = flops / row["ms"] / 1e9
                except Exception as err:  # out of shared memory / registers: say so, go on
                    row["error"] = f"{type(err).__name__}: {str(err)[:120]}"
                rows.append(row)
                _print_row(row)
        if only or not autotuned:
            continue
        auto = partial(
            ge.launch,
            x,
            w,
            scales,
            bias,
            act,
            codes=codes,
            int8=ge.Int8Operands(*extra) if extra else None,
            out_dtype=out_dtype,
        )
        auto()
        row = {"kernel": "launch (autotuned)", "dtype": dtype, "shape": name, "M": m, "N": n,
               "K": k, "ms": _bench(auto), "picked": list(ge.chosen_kernels().values())[-1]}  # fmt: skip
        row["tops"] = flops / row["ms"] / 1e9
        rows.append(row)
        _print_row(row)
    return rows


def window_rows(only: tuple | None = None) -> list[dict]:
    dev = "cuda"
    windows, heads, kh, kw, d = 200, 12, 14, 14, 64
    length = kh * kw
    g = torch.Generator(device=dev).manual_seed(0)
    qkv = torch.randn(windows, length, 3, heads, d, device=dev, generator=g).bfloat16()
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
    th = torch.randn(2 * kh - 1, d, device=dev, generator=g).bfloat16() * 0.1
    tw = torch.randn(2 * kw - 1, d, device=dev, generator=g).bfloat16() * 0.1
    out, args, shape_meta = wa.kernel_arguments(q, k, v, th, tw, d**-0.5, kh, kw)
    ref = None if only else wa.launch(q, k, v, th, tw, d**-0.5, kh, kw)
    rows = []
    for bm, steps, warps, stages, regs, *chunks in [only] if only else WINDOW_CONFIGS:
        grid = (-(-length // (bm * steps)), windows * heads)
        chunks = chunks[0] if chunks else 1
        fn = partial(wa._window_attention_kernel[grid], *args, **shape_meta, BLOCK_M=bm,
                     M_STEPS=steps, num_warps=warps, num_stages=stages, maxnreg=regs,
                     KEY_CHUNKS=chunks)  # fmt: skip
        row = {"kernel": "window", "config": [bm, steps, warps, stages, regs, chunks]}
        try:
            row.update(compiled_facts(fn()))
            if ref is not None:
                row["max_err"] = (out.float() - ref.float()).abs().max().item()
            row["ms"] = _bench(fn)
        except Exception as err:
            row["error"] = f"{type(err).__name__}: {str(err)[:120]}"
        rows.append(row)
        _print_row(row)
    if only:
        return rows
    auto = lambda: wa.launch(q, k, v, th, tw, d**-0.5, kh, kw)  # noqa: E731
    rows.append({"kernel": "window launch (autotuned)", "ms": _bench(auto)})
    _print_row(rows[-1])
    return rows


WINDOW_SHAPES = (("SAM-B windows", 12, 64), ("SAM-H windows", 16, 80))
"""(name, heads, head dim) of the 14 x 14 windows at batch 8: 200 windows."""


def window_as_global_rows() -> list[dict]:
    """The windows on the global kernel (online softmax over key tiles of whole key-grid rows,
    rel-pos terms from `_rel_pos_terms_kernel`), against the window kernel, both autotuned and
    as `fuse_attention` wires them: plain output, and the projection's int8 codes."""
    from samq_fx import triton_attention as ta

    rows = []
    for name, heads, d in WINDOW_SHAPES:
        windows, kh, kw = 200, 14, 14
        g = torch.Generator(device="cuda").manual_seed(heads)
        qkv = torch.randn(windows, kh * kw, 3, heads, d, device="cuda", generator=g).bfloat16()
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        th = torch.randn(2 * kh - 1, d, device="cuda", generator=g).bfloat16() * 0.3
        tw = torch.randn(2 * kw - 1, d, device="cuda", generator=g).bfloat16() * 0.3
        s = torch.tensor(0.05, device="cuda")
        window = partial(wa.launch, q, k, v, th, tw, d**-0.5, kh, kw)
        flash = partial(ta.launch_global, q, k, v.transpose(-1, -2), th, tw, d**-0.5, kh, kw)
        err = (window().float() - flash().float()).abs().max().item()
        variants = {
            "window kernel": window,
            "window kernel, int8 codes": partial(window, s, 3, "int8"),
            "global kernel + rel-pos terms kernel": flash,
            "global kernel + rel-pos terms kernel, int8 codes": partial(flash, None, None, s, 3, "int8"),
            "rel-pos terms kernel alone": partial(ta.rel_pos_terms_triton, q, th, tw, kh, kw),
        }  # fmt: skip
        for kernel, fn in variants.items():
            rows.append({"kernel": kernel, "shape": name, "ms": _bench(fn), "max_diff": err})
            _print_row(rows[-1])
    return rows


GLOBAL_SHAPES = (("SAM-B global", 96, 64, 64, 64), ("SAM-H global", 128, 64, 64, 80))
"""(name, batch x heads, key-grid height, width, head dim) at batch 8."""
GLOBAL_VARIANTS = {"default": {}}
"""Kernel variants by constexpr flags. Branch `experiment/exp2-split` adds `exp2 split` (odd
keys' exponentials on the FMA pipe): slower at every tile (session 22,
bench/global_exp2_split_h100_experiment.json)."""


def global_rows(only: tuple | None = None) -> list[dict]:
    """The global rel-pos attention kernel (`triton_attention`) at each config, float8 and bf16,
    with each kernel variant (`GLOBAL_VARIANTS`), against `attention_reference` on 8 heads."""
    from samq_fx import triton_attention as ta

    dev = "cuda"
    rows = []
    for name, bh, kh, kw, d in GLOBAL_SHAPES:
        length = kh * kw
        g = torch.Generator(device=dev).manual_seed(0)
        q = torch.randn(bh, length, d, device=dev, generator=g) * d**-0.5
        k = torch.randn(bh, length, d, device=dev, generator=g) + 1.0
        v = torch.randn(bh, length, d, device=dev, generator=g)
        rh = torch.randn(bh, kh, kw, kh, device=dev, generator=g)
        rw = torch.randn(bh, kh, kw, kw, device=dev, generator=g)
        for mode in ("float8", "float8 qk, bf16 pv", "bf16"):
            args = ta.op_inputs(*(t.bfloat16() for t in (q, k, v, rh, rw)), mode.split()[0])
            if mode == "float8 qk, bf16 pv":  # P·v in bf16: P needs no float8 layout change
                one = torch.ones((), device=dev)
                args = (*args[:2], v.bfloat16().transpose(1, 2).contiguous(), args[3], one,
                        *args[5:])  # fmt: skip
            ref = ta.attention_reference(*(a[:8] if a.dim() else a for a in args)).float()
            out, launch_args, common = ta.kernel_arguments(*args)
            for cfg in ta._CONFIGS:
                bm, bn = cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_N"]
                config = [bm, bn, cfg.num_warps, cfg.num_stages, cfg.maxnreg]
                if only and config[:4] != list(only[1]):
                    continue
                for variant, flags in GLOBAL_VARIANTS.items():
                    if only and variant != only[2]:
                        continue
                    row = {"kernel": f"global {mode} {variant}", "shape": name, "config": config}
                    grid = (length, kh, kw, bh)
                    checked = (out[:8], ref)  # a view: read after the kernel wrote it
                    rows.append(
                        _global_config_row(row, launch_args, common, cfg, grid, checked, flags)
                    )
    return rows


def _global_config_row(row, launch_args, common, cfg, grid, checked, flags=None) -> dict:
    """Time the global attention kernel (`triton_attention`) at one autotuner config on one
    call's arguments, with what the compiler made of it and the relative error of `checked`
    = (a view of the output it writes, its reference); `grid` is (L, KH, KW, batch·heads)."""
    from samq_fx import triton_attention as ta

    length, kh, kw, bh = grid
    bm, bn = cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_N"]
    tile = {"L": length, "KH": kh, "KW": kw, "BLOCK_M": bm, "BLOCK_N": bn}
    fn = partial(ta._rel_pos_attention_kernel[(length // bm, bh)], *launch_args, **common,
                 BLOCK_M=bm, BLOCK_N=bn, EVEN=ta._even({**common, **tile}), **(flags or {}),
                 num_warps=cfg.num_warps, num_stages=cfg.num_stages, maxnreg=cfg.maxnreg)  # fmt: skip
    try:
        row.update(compiled_facts(fn()))
        written, ref = checked
        row["rel_err"] = float((written.float() - ref).norm() / ref.norm())
        row["ms"] = _bench(fn)
    except Exception as err:
        row["error"] = f"{type(err).__name__}: {str(err)[:120]}"
    _print_row(row)
    return row


def global_tables_rows(configs: tuple = (), shapes: tuple = ()) -> list[dict]:
    """The global attention as `fuse_attention` now wires it (`global_attention_op`): the
    rel-pos terms kernel (q and the tables), then the attention kernel reading q, k, v from a
    qkv output (bf16: strided views; float8: static codes) and writing token-major, at each
    config, against `global_attention_reference` on the first image; the autotuned op and
    the rel-pos terms kernel alone. `configs`: only these (BLOCK_M, BLOCK_N, warps) tiles;
    `shapes`: only these shape names; every `GLOBAL_VARIANTS` entry at each."""
    from samq_fx import triton_attention as ta

    dev = "cuda"
    rows = []
    for name, bh, kh, kw, d in GLOBAL_SHAPES:
        if shapes and name not in shapes:
            continue
        length, heads = kh * kw, bh // 8
        g = torch.Generator(device=dev).manual_seed(0)
        qkv = torch.randn(8, length, 3, heads, d, device=dev, generator=g).bfloat16()
        qkv[:, :, 1] += 1.0
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        th = torch.randn(2 * kh - 1, d, device=dev, generator=g).bfloat16() * 0.1
        tw = torch.randn(2 * kw - 1, d, device=dev, generator=g).bfloat16() * 0.1
        scale = d**-0.5
        scales = torch.stack([t.float().abs().amax() / 448 for t in (q * scale, k, v)])
        q8 = ta.quantize_float8_static(q * scale, scales[0])
        k8 = ta.quantize_float8_static(k, scales[1])
        vt8 = ta.quantize_float8_static(v, scales[2]).transpose(-1, -2).contiguous()
        rel_h, rel_w = ta.rel_pos_terms_triton(q, th, tw, kh, kw)
        for mode, args in (
            ("float8", (q, k8, vt8, th, tw, scale, kh, kw, q8, scales)),
            ("bf16", (q, k, v.transpose(-1, -2), th, tw, scale, kh, kw, None, None)),
        ):
            first = [a[:1] if isinstance(a, torch.Tensor) and a.dim() == 4 else a for a in args]
            ref = ta.global_attention_reference(*first).float()
            q_dot = args[0] if args[8] is None else args[8]
            out, launch_args, common = ta.global_kernel_arguments(
                q_dot, args[1], args[2], rel_h, rel_w, scale, args[9]
            )
            for cfg in ta._CONFIGS:
                config = [cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_N"], cfg.num_warps,
                          cfg.num_stages, cfg.maxnreg]  # fmt: skip
                if configs and tuple(config[:3]) not in configs:
                    continue
                for variant, flags in GLOBAL_VARIANTS.items():
                    row = {"kernel": f"global tables {mode} {variant}", "shape": name,
                           "config": config}  # fmt: skip
                    grid = (length, kh, kw, bh)
                    checked = (out[:1], ref)
                    rows.append(
                        _global_config_row(row, launch_args, common, cfg, grid, checked, flags)
                    )
            auto = partial(ta.launch_global, *args)
            rows.append({"kernel": f"global tables {mode} (autotuned, with the rel-pos kernel)",
                         "shape": name, "ms": _bench(auto)})  # fmt: skip
            _print_row(rows[-1])
        terms = partial(ta.rel_pos_terms_triton, q, th, tw, kh, kw)
        rows.append({"kernel": "global rel-pos terms kernel", "shape": name, "ms": _bench(terms)})
        _print_row(rows[-1])
    return rows


def _print_row(row: dict) -> None:
    print(json.dumps(row), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path)
    parser.add_argument("--parts", nargs="+", default=["window", "global", "int8", "float8"])
    parser.add_argument(
        "--a-in-registers", action="store_true", help="also each config with x in registers"
    )
    parser.add_argument(
        "--kernels", nargs="+", default=(), help="only these variants, e.g. 'tma x2 a-regs'"
    )
    parser.add_argument(
        "--configs", nargs="+", help="GEMM tile configs to sweep, each 'BM,BN,BK,WARPS,STAGES'"
    )
    parser.add_argument("--shapes", nargs="+", default=(), help="only these GEMM shapes")
    parser.add_argument(
        "--global-tiles",
        nargs="+",
        default=(),
        help="global-tables: only these tiles, each 'BM,BN,WARPS'",
    )
    parser.add_argument("--global-shapes", nargs="+", default=(),
                        help="global-tables: only these shapes, e.g. 'SAM-B global'")  # fmt: skip
    parser.add_argument(
        "--no-autotuned", action="store_true", help="skip the autotuned `launch` row of each shape"
    )
    parser.add_argument(
        "--programs-per-sm", type=int, nargs="+", default=[1, 2], help="TMA kernel programs an SM"
    )
    parser.add_argument(
        "--only",
        help="one config, for a profiler: 'window:BM,STEPS,WARPS,STAGES[,MAXNREG[,CHUNKS]]' "
        "or 'int8|float8:SHAPE:BM,BN,BK,WARPS,STAGES:KERNEL'",
    )
    args = parser.parse_args()
    if args.only:
        part, *rest = args.only.split(":")
        if part == "window":
            values = [int(v) for v in rest[0].split(",")]
            window_rows(tuple(values + [None] * (5 - len(values))))  # maxnreg, chunks optional
        else:
            kernel = rest[2].removesuffix(" a-regs")
            gemm_rows(
                part,
                (rest[0], tuple(int(v) for v in rest[1].split(",")), rest[2]),
                a_in_registers=kernel != rest[2],
            )
        return
    configs = (
        [tuple(int(v) for v in c.split(",")) for c in args.configs]
        if args.configs
        else GEMM_CONFIGS
    )
    rows = []
    for part in args.parts:
        if part == "window":
            rows += window_rows()
        elif part == "global":
            rows += global_rows()
        elif part == "global-tables":
            tiles = tuple(tuple(int(v) for v in t.split(",")) for t in args.global_tiles)
            rows += global_tables_rows(tiles, tuple(args.global_shapes))
        elif part == "window-as-global":
            rows += window_as_global_rows()
        else:
            rows += gemm_rows(part, None, args.a_in_registers, configs, tuple(args.kernels),
                              tuple(args.shapes), tuple(args.programs_per_sm),
                              not args.no_autotuned)  # fmt: skip
    table = [
        (r.get("shape", "window"), r.get("dtype", ""), r["kernel"], str(r.get("config", "")),
         f"{r['ms']:.3f}" if "ms" in r else r.get("error", ""), str(r.get("regs", "")),
         str(r.get("spills", "")), str(r.get("smem", "")), " ".join(r.get("mma", [])))
        for r in rows
    ]  # fmt: skip
    print(format_table(("shape", "dtype", "kernel", "config", "ms", "regs", "spills", "smem",
                        "matrix instructions"), table))  # fmt: skip
    if args.json:
        meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
        args.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
