"""Speed of SAM's image encoder and mask decoder: float baselines against lowered settings.

One row per (model, setting, part, batch): git sha, torch / torchao versions, device, img/s
(batch / the p50 of calls synchronized one by one) and, for the encoder, img/s back to back
(calls enqueued with no sync between them, as a server keeps the GPU fed), both over the best
bf16 pipeline of the run (`against_best_bf16`: the issue's 1.3x reads off it), p50 ms with the
p10-p90 spread over timed repeats after warm-up, peak memory, weight bytes, compile seconds
and fidelity (SQNR in dB of the encoder output against fp32 eager on the same
input; the decoder's against fp32 on the same embeddings and prompts). Random weights: speed does
not depend on them; the tiny model's mask fidelity is measured by bench/lower_quality.py.

Settings:
  fp32               captured SAM, fp32, eager
  bf16               bf16, eager
  bf16-compile       bf16, torch.compile(fullgraph=True)
  bf16-fused         bf16 + fused rel-pos attention (flex attention) + compile
  bf16-triton        bf16 + this project's Triton rel-pos attention kernel + compile; with
                     bf16-fused, the best float pipelines this project builds (`optimize_float`)
  bf16-triton-all    the same with the windows on the Triton window kernel
  fp32-compile, fp32-fused   the same in float32 (the CPU baselines)
  int8-static ...    `samq_fx.lower(q, backend)` + compile, q calibrated on 2 generated images
                     (W8A8-int8 preset, min-max ranges; W4A16-int4 for int4-weight, with
                     groups of 128 on SAM-B/L/H, whose linears all divide by 128);
                     a suffix picks the attention: +unfused (eager chain), +triton (Triton bf16),
                     +f8attn (Triton, float8 q·kᵀ and P·v), +i8attn (int8 q·kᵀ, float8 P·v);
                     for the global attentions, windows keep flex (+f8attn-all: windows too;
                     +wtri: windows on the Triton window kernel, in the compute dtype;
                     +f8sattn: +f8attn with static scales, from W8A8-int8-attn's ranges);
                     float8-static and int8-static fuse each MLP's GELU into lin1's GEMM
                     (+noepi: they do not);
                     int4-weight dequantizes each weight for the bf16 GEMM
                     (+tinygemm: int4 tinygemm instead); int8 runs this project's Triton
                     GEMM on CUDA, its MLPs fused as float8's (+torchao: torchao's Int8Tensor)

    samq-fx bench --model vit_b --device cuda --batch 1 8 --json speed.json
    samq-fx bench --model tiny --device cpu --settings fp32 fp32-compile int8-static
    PYTHONPATH=. python3 bench/speed.py ...        (the same, from a checkout)
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import torch

import samq_fx
from samq_fx.demo import calibration_samples
from samq_fx.gemm_epilogue import chosen_kernels
from samq_fx.lower import compile_parts as _compile_parts
from samq_fx.lower import lower, optimize_float, stored_bytes
from samq_fx.report import format_table

FLOAT_SETTINGS = ("fp32", "fp32-compile", "fp32-fused", "bf16", "bf16-compile", "bf16-fused",
                  "bf16-triton", "bf16-triton-all")  # fmt: skip
VARIANTS = {"unfused": {"fuse_attention": False}, "triton": {"attention": "triton"},
            "f8attn": {"attention": "float8"}, "i8attn": {"attention": "int8-qk"},
            "f8sattn": {"attention": "float8"},
            "f8attn-all": {"attention": "float8", "window_attention": "float8"},
            "i8attn-all": {"attention": "int8-qk", "window_attention": "int8-qk"},
            "wtri": {"window_attention": "triton"},
            "noepi": {"fuse_epilogue": False},
            "tinygemm": {"int4_kernel": "tinygemm"},
            "torchao": {"int8_kernel": "torchao"},
            "tokscales": {"dynamic_scales": "token"},
            "grpscales": {"dynamic_scales": "group"}}  # fmt: skip
"""Variants of a lowered setting, one or more `+` suffixes ("float8-static+i8attn+wtri"): the
attention kernel (without -all the windowed attentions keep flex and the global ones take the
named kernel); +wtri puts the windows on the Triton window kernel (the fastest there: it reads
q, k, v from the qkv output and writes the projection's input layout); +noepi keeps float8 MLPs
as two linears around a separate activation pass instead of the fused GEMM epilogue;
+tinygemm runs int4-weight's linears on tinygemm instead of dequantizing for the float GEMM;
+torchao runs int8's linears on torchao's Int8Tensor (cuBLAS) instead of this project's kernel;
+f8sattn is +f8attn on a model calibrated with the global attentions' q, k, v ranges
(W8A8-int8-attn), which the kernel takes as static scales; +tokscales / +grpscales quantize
int8-dynamic's MLP hidden activations per token (a pass between the GEMMs) or per token and 128
channels (lin1's epilogue) where the device's default is the other (`default_dynamic_scales`)."""
STATIC_ATTENTION = "f8sattn"
LOWERED_SETTINGS = ("int8-static", "int8-dynamic", "float8-static", "int4-weight")
DEFAULT_GPU = ("fp32", "bf16", "bf16-compile", "bf16-fused", *LOWERED_SETTINGS)


@dataclass
class Row:
    sha: str
    torch: str
    torchao: str
    device: str
    model: str
    setting: str
    part: str
    batch: int
    img_per_s: float
    p50_ms: float
    p10_ms: float
    p90_ms: float
    peak_mib: float
    weight_mib: float
    compile_s: float
    sqnr_db: float | None
    back_to_back_img_per_s: float | None = None
    """The encoder's img/s over `repeats` calls enqueued with no sync between them, as a server
    that keeps the GPU fed runs it: each call's CPU work before its first kernel (dynamo's
    guards, the wrapper) overlaps the previous call's kernels. `img_per_s` is batch / the p50
    of calls synchronized one by one, the latency view."""


def git_sha() -> str:
    if os.environ.get("SAMQ_GIT_SHA"):
        return os.environ["SAMQ_GIT_SHA"]
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True
        )
        return out.stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def sqnr(out: torch.Tensor, ref: torch.Tensor) -> float:
    ref, out = ref.float(), out.float()
    noise = (out - ref).pow(2).mean().clamp_min(1e-30)
    return float(10 * torch.log10(ref.pow(2).mean() / noise))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(fn, device, repeats: int, warmup: int) -> tuple[list[float], float]:
    """(per-call seconds of `repeats` timed calls after `warmup`, seconds of the first call)."""
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    first = time.perf_counter() - start
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return times, first


def time_back_to_back(fn, device, repeats: int) -> float:
    """Seconds a call over `repeats` calls enqueued back to back, one sync at the end."""
    _sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    _sync(device)
    return (time.perf_counter() - start) / repeats


def _quantiles(times: list[float]) -> tuple[float, float, float]:
    qs = statistics.quantiles(times, n=10) if len(times) > 1 else [times[0]] * 9
    return statistics.median(times), qs[0], qs[-1]


def lowering_options(setting: str) -> tuple[str, dict]:
    """("float8-static", {"attention": "int8-qk"}) for "float8-static+i8attn": a lowered
    setting's backend and the `lower` keywords of its `VARIANTS` suffixes."""
    backend, *variants = setting.split("+")
    return backend, {k: v for variant in variants for k, v in VARIANTS[variant].items()}


def calibrated(captured, name: str, settings, num_calib: int = 2) -> dict:
    """The quantized models `build` takes for `settings`, keyed by `preset_of` (min-max ranges;
    W4A16-int4 in groups of 64 on the tiny model, whose decoder has 64-wide layers, else 128),
    calibrated on `num_calib` generated images."""
    needed = {preset_of(s) for s in settings if s.partition("+")[0] in LOWERED_SETTINGS}
    group = 64 if name == "tiny" else 128
    calib = calibration_samples(num_calib)
    quantized = {}
    for preset in sorted(needed):
        changes = {"w_group_size": group} if preset == "W4A16-int4" else {}
        cfg = samq_fx.QuantConfig.preset(preset, method="minmax", **changes)
        quantized[preset] = samq_fx.quantize(captured, calib, cfg, progress=False)
    return quantized


def preset_of(setting: str) -> str:
    """The deployment preset a lowered setting lowers: W4A16-int4 for int4-weight,
    W8A8-int8-attn for a +f8sattn setting, W8A8-int8 for the other 8-bit ones."""
    backend, *variants = setting.split("+")
    if backend == "int4-weight":
        return "W4A16-int4"
    return "W8A8-int8-attn" if STATIC_ATTENTION in variants else "W8A8-int8"


def build(setting: str, captured, quantized: dict, cudagraphs: bool = False):
    """(model, compiled?) for a setting."""
    compile_parts = partial(_compile_parts, cudagraphs=cudagraphs)
    if setting == "fp32":
        return captured, False
    if setting == "fp32-compile":
        return compile_parts(optimize_float(captured, "float32", fuse_attention=False)), True
    if setting == "fp32-fused":
        return compile_parts(optimize_float(captured, "float32")), True
    if setting == "bf16":
        return optimize_float(captured, "bfloat16", fuse_attention=False), False
    if setting == "bf16-compile":
        return compile_parts(optimize_float(captured, "bfloat16", fuse_attention=False)), True
    if setting == "bf16-fused":
        return compile_parts(optimize_float(captured, "bfloat16")), True
    if setting == "bf16-triton":  # Triton for the global attentions, flex for the windows
        return compile_parts(optimize_float(captured, "bfloat16", attention="triton")), True
    if setting == "bf16-triton-all":
        model = optimize_float(captured, "bfloat16", attention="triton", window_attention="triton")
        return compile_parts(model), True
    backend, options = lowering_options(setting)
    q = quantized[preset_of(setting)]
    lowered = lower(q, backend, **options, verbose=False)
    return compile_parts(lowered), True


def decoder_inputs(model, emb: torch.Tensor, prompts: int, generator: torch.Generator):
    size = model.image_encoder.img_size if hasattr(model.image_encoder, "img_size") else 1024
    xy = torch.rand(prompts, 2, generator=generator) * size * 0.6
    wh = torch.rand(prompts, 2, generator=generator) * size * 0.3 + 8
    boxes = torch.cat([xy, xy + wh], 1).to(emb.device)
    sparse, dense = model.prompt_encoder(points=None, boxes=boxes, masks=None)
    return sparse, dense, model.prompt_encoder.get_dense_pe()


def run_model(
    args, name: str, device: torch.device, sha: str, versions: dict, done=lambda rows: None
) -> list[Row]:
    """Rows of one model; `done(rows)` after each setting (the JSON is written as rows come)."""
    torch.manual_seed(0)
    sam = samq_fx.build_sam(name, pretrained=False).to(device).eval()
    captured = samq_fx.capture(sam)
    size = captured.image_encoder.img_size
    quantized = calibrated(captured, name, args.settings, args.num_calib)
    gen = torch.Generator().manual_seed(1)
    inputs = {b: torch.randn(b, 3, size, size, generator=gen).to(device) for b in args.batch}
    with torch.no_grad():
        ref_out = {b: captured.image_encoder(x) for b, x in inputs.items()}
        emb1 = ref_out[min(args.batch)][:1]
        if args.prompts:
            sparse, dense, pe = decoder_inputs(captured, emb1, args.prompts, gen)
            ref_dec = captured.mask_decoder(emb1, pe, sparse, dense, True)[0]
    rows = []

    def make_row(setting, part, batch, times, first, peak, weights, fid, per_call=None) -> Row:
        p50, p10, p90 = _quantiles(times)
        if compiled and args.cudagraphs:  # "@cg-skipped": asked for graphs, inductor ran none
            setting += "@cg-skipped" if cudagraph_skips() > skips_before else "@cg"
        return Row(sha, versions["torch"], versions["torchao"], versions["device"], name, setting,
                   part, batch, batch / p50, 1e3 * p50, 1e3 * p10, 1e3 * p90, peak, weights,
                   max(0.0, first - p50), fid, None if per_call is None else batch / per_call)  # fmt: skip

    for setting in args.settings:
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        torch._dynamo.reset()
        skips_before = cudagraph_skips()
        try:
            model, compiled = build(setting, captured, quantized, args.cudagraphs)
        except Exception as err:  # a setting without kernels here (float8 on the CPU) says so
            print(f"{name} {setting}: skipped ({type(err).__name__}: {err})", flush=True)
            continue
        weights = stored_bytes(model.image_encoder) / 2**20
        with torch.inference_mode():
            for b in args.batch:
                x = inputs[b]
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                enc = partial(model.image_encoder, x)
                times, first = time_calls(enc, device, args.repeats, 3)
                peak = (
                    torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else 0
                )
                per_call = time_back_to_back(enc, device, args.repeats)
                fid = sqnr(model.image_encoder(x), ref_out[b])
                rows.append(
                    make_row(setting, "encoder", b, times, first, peak, weights, fid, per_call)
                )
                r = rows[-1]
                print(f"{name} {setting} b{b}: {r.img_per_s:.1f} img/s "
                      f"({r.back_to_back_img_per_s:.1f} back to back), p50 {r.p50_ms:.2f} ms, "
                      f"compile {r.compile_s:.1f} s, SQNR {fid:.1f} dB", flush=True)  # fmt: skip
            if args.prompts and setting in args.decoder_settings:
                dec = partial(model.mask_decoder, emb1, pe, sparse, dense, True)
                times, first = time_calls(dec, device, args.repeats, 3)
                fid = sqnr(dec()[0], ref_dec)
                dec_weights = stored_bytes(model.mask_decoder) / 2**20
                part = f"decoder x{args.prompts}"
                rows.append(make_row(setting, part, 1, times, first, 0.0, dec_weights, fid))
        if setting in args.profile:
            tag = setting.replace("+", "_")
            out = f"{args.profile_json}_{tag}.json" if args.profile_json else None
            profile(model, inputs[max(args.batch)], out)
        del model
        done(rows)
    return rows


def profile(model, x: torch.Tensor, path: str | None) -> None:
    """Where the time goes: CUDA kernels of one encoder call, grouped by kind."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    with torch.inference_mode(), torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            model.image_encoder(x)
        torch.cuda.synchronize()
    kinds: dict[str, float] = {}
    kernels: dict[str, float] = {}
    for evt in prof.key_averages():
        us = evt.self_device_time_total / 3
        if us <= 0:
            continue
        kernels[evt.key] = us
        key = evt.key.lower()
        kind = (
            "int8 gemm" if any(s in key for s in ("_s8", "s8_", "i8", "int_mm", "i16832"))
            else "fp8 gemm" if any(s in key for s in ("qqtst", "f8f8", "fp8", "e4m3"))
            or key.startswith("_linear_act_kernel")  # samq_fx.gemm_epilogue's GEMM
            else "attention" if any(s in key for s in ("flex", "attention", "fmha", "flash"))
            else "bf16 gemm / conv" if any(s in key for s in ("gemm", "nvjet", "cutlass", "conv", "xmma"))
            else "elementwise / norm / other"
        )  # fmt: skip
        kinds[kind] = kinds.get(kind, 0.0) + us
    total = sum(kinds.values())
    print(f"profile: {total / 1e3:.2f} ms of CUDA kernels per encoder call")
    for kind, us in sorted(kinds.items(), key=lambda kv: -kv[1]):
        print(f"  {kind:28s} {us / 1e3:8.2f} ms  {100 * us / total:5.1f}%")
    top = sorted(kernels.items(), key=lambda kv: -kv[1])[:15]
    for key, us in top:
        print(f"    {us / 1e3:8.3f} ms  {key[:110]}")
    if path:
        Path(path).write_text(
            json.dumps({"kinds_us": kinds, "top_kernels_us": dict(top)}, indent=1)
        )


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", nargs="+", default=["vit_b"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    p.add_argument("--settings", nargs="+", default=None, help="default: all that fit the device")
    p.add_argument("--decoder-settings", nargs="*", default=["fp32", "bf16-fused", "int8-static"])
    p.add_argument("--prompts", type=int, default=16, help="box prompts per decoder call (0: skip)")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--num-calib", type=int, default=2)
    p.add_argument("--profile", nargs="*", default=[], help="profile these settings' encoder")
    p.add_argument("--profile-json", default=None, help="prefix of per-setting profile JSONs")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--cudagraphs", action="store_true",
                   help="compiled settings replay CUDA graphs (rows marked '@cg'; '@cg-skipped' where inductor ran none)")  # fmt: skip


def cudagraph_skips() -> int:
    """How many compiled graphs inductor ran without CUDA graphs although asked for them (CPU
    tensors, unsupported ops, ...): it says why only in its log (`TORCH_LOGS=cudagraphs`), so
    the bench reads its counter and labels such rows "@cg-skipped" instead of "@cg"."""
    from torch._dynamo.utils import counters

    return counters["inductor"]["cudagraph_skips"]


def against_best_bf16(rows: list[Row]) -> list[tuple[float | None, float | None]]:
    """Each row's (img/s, back-to-back img/s) over the best bf16 pipeline's of the same run,
    model, part and batch: the highest of every bf16 setting's rows (repeats and CUDA-graph
    rows included), per column. The issue's goal reads off it (1.3x); None where the run has
    no bf16 row or the column no number."""

    def key(r: Row) -> tuple:
        return (r.model, r.part, r.batch)

    best: dict[tuple, list[float]] = {}
    for r in rows:
        if r.setting.split("@")[0] in FLOAT_SETTINGS and r.setting.startswith("bf16"):
            b2b = r.back_to_back_img_per_s or 0.0
            old = best.get(key(r), [0.0, 0.0])
            best[key(r)] = [max(old[0], r.img_per_s), max(old[1], b2b)]

    def ratio(x: float | None, base: float) -> float | None:
        return None if x is None or base <= 0 else x / base

    out = []
    for r in rows:
        base = best.get(key(r))
        if base is None:
            out.append((None, None))
        else:
            out.append((ratio(r.img_per_s, base[0]), ratio(r.back_to_back_img_per_s, base[1])))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_arguments(p)
    return run(p.parse_args(argv), p)


def run(args: argparse.Namespace, p: argparse.ArgumentParser) -> int:
    device = torch.device(args.device)
    if args.settings is None:
        args.settings = list(DEFAULT_GPU if device.type == "cuda" else
                             ("fp32", "fp32-compile", "fp32-fused", "int8-static", "int8-dynamic"))  # fmt: skip
    unknown = {s.partition("+")[0] for s in args.settings} - set(FLOAT_SETTINGS + LOWERED_SETTINGS)
    unknown |= {s for s in args.settings if not set(s.split("+")[1:]) <= set(VARIANTS)}
    if unknown:
        p.error(f"unknown settings {sorted(unknown)}; known: {FLOAT_SETTINGS + LOWERED_SETTINGS}"
                f", lowered ones with a suffix +{'/+'.join(VARIANTS)}")  # fmt: skip
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
    import torchao

    versions = {
        "torch": torch.__version__,
        "torchao": torchao.__version__,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda"
        else f"cpu x{torch.get_num_threads()}",
    }  # fmt: skip
    sha = git_sha()
    rows: list[Row] = []

    def write(model_rows: list[Row]) -> None:
        if args.json:
            record = {"args": {k: v for k, v in vars(args).items() if not callable(v)} | {"json": str(args.json)}, "date": time.strftime("%Y-%m-%d"),
                      "rows": [asdict(r) for r in rows + model_rows],
                      # the quantized GEMMs' autotuned picks, by tuning key (shape, codes, dtypes)
                      "gemm_configs": {str(k): v for k, v in chosen_kernels().items()}}  # fmt: skip
            args.json.write_text(json.dumps(record, indent=1) + "\n")

    for name in args.model:
        rows += run_model(args, name, device, sha, versions, write)
    headers = ("model", "setting", "part", "batch", "img/s", "back to back", "x best bf16 (p50 / b2b)",
               "p50 ms", "p10-p90 ms", "peak MiB", "weights MiB", "compile s", "SQNR dB")  # fmt: skip
    ratios = against_best_bf16(rows)
    table = [
        (r.model, r.setting, r.part, r.batch, f"{r.img_per_s:.1f}",
         "-" if r.back_to_back_img_per_s is None else f"{r.back_to_back_img_per_s:.1f}",
         " / ".join("-" if x is None else f"{x:.2f}" for x in ratio),
         f"{r.p50_ms:.2f}",
         f"{r.p10_ms:.2f}-{r.p90_ms:.2f}", f"{r.peak_mib:.0f}", f"{r.weight_mib:.1f}",
         f"{r.compile_s:.1f}", "inf" if r.sqnr_db is None else f"{r.sqnr_db:.1f}")
        for r, ratio in zip(rows, ratios)
    ]  # fmt: skip
    print(
        f"\n{sha} torch {versions['torch']} torchao {versions['torchao']} on {versions['device']}"
    )
    print(format_table(headers, table))
    return 0


if __name__ == "__main__":
    sys.exit(main())
