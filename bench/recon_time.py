"""Time block reconstruction (PTQ4SAM's QDrop driver) on one model and extrapolate to the
paper's schedule.

Runs `samq_fx.quantize` twice with reconstruction at two iteration counts; per unit, the
difference of the two times over the difference of the iterations is the cost of one step and
the rest is the fixed cost (gathering inputs and targets, the MSE before/after). The printed
table extrapolates to `--paper-iters` (PTQ4SAM: 20,000 a unit). Random weights are fine for time.

    PYTHONPATH=. python3 bench/recon_time.py --model vit_b --device cuda --json recon_vit_b.json
    python bench/recon_time.py --model tiny --device cpu --iters 10 40
    python bench/recon_time.py --model vit_b --method saq-sam [--no-layer-skip] --json t.json

saq-sam's paper schedule is 2,000 steps a unit with 10,000 for the final token-to-image
attention; the extrapolation uses `--paper-iters` for every unit (2,000 by default).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

if __package__ is None and "samq_fx" not in sys.modules:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import samq_fx  # noqa: E402
from samq_fx.demo import calibration_samples  # noqa: E402
from samq_fx.report import format_table  # noqa: E402


def run(model, samples, method: str, iters: int, units: str | None, layer_skip: bool) -> dict:
    # PCC (saq-sam) is off: it runs before reconstruction and does not change its time
    cfg = samq_fx.QuantConfig.for_method(method, 4, 4, recon=True, recon_iters=iters, pcc=False)
    if units is not None and units != cfg.recon.units:
        cfg = replace(cfg, recon=replace(cfg.recon, units=units))
    if cfg.par is not None and not layer_skip:
        cfg = replace(cfg, par=replace(cfg.par, layer_skip=False))
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    q = samq_fx.quantize(model, samples, cfg, progress=False)
    total = time.perf_counter() - start
    return {"total_s": total, "recon": q.samq_recon.to_dict()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="vit_b")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--method", default="ptq4sam", choices=["ptq4sam", "saq-sam"])
    p.add_argument("--units", help="unit mode (default: the method's own)")
    p.add_argument(
        "--no-layer-skip",
        action="store_true",
        help="saq-sam: stage outputs run the deeper FP encoder blocks before the neck",
    )
    p.add_argument("--iters", type=int, nargs=2, default=(20, 120))
    p.add_argument(
        "--paper-iters", type=int, help="default: 20,000 (ptq4sam), 2,000 (saq-sam) a unit"
    )
    p.add_argument("--num-calib", type=int, default=8)
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    if args.paper_iters is None:
        args.paper_iters = 2_000 if args.method == "saq-sam" else 20_000

    torch.manual_seed(0)
    sam = samq_fx.build_sam(args.model, pretrained=False).to(args.device).eval()
    captured = samq_fx.capture(sam)
    samples = calibration_samples(args.num_calib)
    layer_skip = not args.no_layer_skip
    lo, hi = (run(captured, samples, args.method, n, args.units, layer_skip) for n in args.iters)
    rows, out_units = [], []
    fixed_total = step_total = 0.0
    for a, b in zip(lo["recon"]["units"], hi["recon"]["units"], strict=True):
        step = max(0.0, (b["seconds"] - a["seconds"]) / (args.iters[1] - args.iters[0]))
        fixed = max(0.0, a["seconds"] - step * args.iters[0])
        fixed_total += fixed
        step_total += step
        out_units.append({"unit": a["name"], "step_ms": 1e3 * step, "fixed_s": fixed})
        rows.append((a["name"], f"{1e3 * step:.2f}", f"{fixed:.2f}"))
    paper_s = fixed_total + step_total * args.paper_iters
    dev = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    print(format_table(("unit", "ms / step", "fixed s"), rows))
    print(
        f"{args.model} on {dev}: {len(rows)} units, {1e3 * step_total:.1f} ms per step over all "
        f"units, fixed {fixed_total:.1f} s; quantize with {args.iters[1]} iters took "
        f"{hi['total_s']:.1f} s; at {args.paper_iters} iters a unit: {paper_s / 3600:.2f} h"
    )
    if args.json:
        record = {
            "model": args.model,
            "device": dev,
            "torch": torch.__version__,
            "args": vars(args) | {"json": str(args.json)},
            "units": out_units,
            "step_ms_all_units": 1e3 * step_total,
            "fixed_s": fixed_total,
            "paper_schedule_hours": paper_s / 3600,
            "runs": {str(args.iters[0]): lo, str(args.iters[1]): hi},
        }
        args.json.write_text(json.dumps(record, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
