"""Masks of lowered models on the tiny SAM's validation scenes: against their fake-quant model and
against full precision.

For each deployment preset (W8A8-int8; W8A8-int8-attn for +f8sattn settings; W4A16-int4): quantize the shipped tiny SAM on generated
calibration scenes, evaluate the fake-quant model, then each backend's lowered model
(`samq_fx.lower`) on the same validation scenes with ground-truth boxes. Fidelity = mask IoU
against the full-precision model on the same prompts; "vs fake" = mIoU of the lowered model
minus mIoU of its fake-quant model (the issue asks within 0.5 point).

    python bench/lower_quality.py --num-val 50 --json bench/lower_quality.json
    PYTHONPATH=. python3 bench/lower_quality.py --device cuda --backends int8-static float8-static
    ... --backends float8-static+f8attn int8-static+i8attn   (8-bit attention, see samq-fx bench)
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

if __package__ is None and "samq_fx" not in sys.modules:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import samq_fx  # noqa: E402
from samq_fx.data import CocoDataset, make_dataset  # noqa: E402
from samq_fx.demo import VAL_SEED, calibration_samples  # noqa: E402
from samq_fx.eval import evaluate  # noqa: E402
from samq_fx.report import format_table  # noqa: E402
from samq_fx.speed import lowering_options, preset_of  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--num-val", type=int, default=50)
    p.add_argument("--num-calib", type=int, default=8)
    p.add_argument("--device", default="cpu")
    p.add_argument("--backends", nargs="+", default=["int8-static", "int8-dynamic", "int4-weight"])
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    rows, records = [], []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "val"
        make_dataset(root, args.num_val, VAL_SEED, progress=False)
        data = CocoDataset(root / "images", root / "annotations.json")
        fp = samq_fx.build_sam("tiny").to(device).eval()
        base = evaluate(fp, data, progress=False)
        rows.append(("FP32", "-", f"{100 * base.miou:.2f}", f"{100 * base.mask_ap:.1f}", "-", "-"))
        captured = samq_fx.capture(fp)
        calib = calibration_samples(args.num_calib)
        fakes = {}
        for setting in args.backends:
            backend, options = lowering_options(setting)
            preset = preset_of(setting)
            if preset not in fakes:
                q = samq_fx.quantize(captured, calib, samq_fx.QuantConfig.preset(preset),
                                     progress=False)  # fmt: skip
                res = evaluate(q, data, reference=fp, progress=False)
                fakes[preset] = (q, res)
                rows.append((preset, "fake-quant", f"{100 * res.miou:.2f}",
                             f"{100 * res.mask_ap:.1f}", f"{100 * res.fidelity_miou:.2f}", "-"))  # fmt: skip
                records.append({"preset": preset, "model": "fake-quant", **res.to_dict()})
            q, fake = fakes[preset]
            start = time.perf_counter()
            lowered = samq_fx.lower(q, backend, **options, verbose=False)
            res = evaluate(lowered, data, reference=fp, progress=False)
            delta = 100 * (res.miou - fake.miou)
            rows.append((preset, setting, f"{100 * res.miou:.2f}", f"{100 * res.mask_ap:.1f}",
                         f"{100 * res.fidelity_miou:.2f}", f"{delta:+.2f}"))  # fmt: skip
            records.append({"preset": preset, "model": setting, "seconds": time.perf_counter() - start,
                            "lowering": lowered.samq_lowering_report.to_dict(), **res.to_dict()})  # fmt: skip
            print(rows[-1], flush=True)
    table = format_table(("config", "model", "mIoU", "mask AP", "fidelity", "vs fake"), rows)
    print(f"tiny SAM, {base.num_images} validation images ({base.num_instances} instances, seed "
          f"{VAL_SEED}), {args.num_calib} calibration images, device {device}\n{table}")  # fmt: skip
    if args.json:
        record = {"args": vars(args) | {"json": str(args.json)}, "rows": rows, "runs": records}
        args.json.write_text(json.dumps(record, indent=1, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
