"""`samq-fx demo`: what quantization does to a real (trained) SAM, in a few CPU minutes.

On the bundled tiny SAM and a freshly generated validation set it evaluates full precision, then
every method at W8A8, W6A6 and W4A4, and prints one table: mIoU with ground-truth boxes, mask AP,
fidelity (mask IoU against the full-precision model on the same prompts) and the seconds
quantization took. The model is captured once; each setting quantizes a copy.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from samq_fx.api import quantize
from samq_fx.capture import capture
from samq_fx.config import AgqConfig, CalibConfig, QuantConfig
from samq_fx.data import CocoDataset, generate_scene, make_dataset, mask_box
from samq_fx.eval import evaluate
from samq_fx.models import build_sam
from samq_fx.report import format_table

DEMO_METHODS = ("minmax", "percentile", "mse", "ptq4sam", "saq-sam", "car-sam", "samq")
VAL_SEED = 20_000  # generator seeds never used for training (bench/train_tiny_sam.py) ...
CALIB_SEED = 30_000  # ... nor for validation


@dataclass
class DemoRow:
    setting: str
    method: str
    w_bits: int | None
    a_bits: int | None
    miou: float
    mask_ap: float
    mask_ap50: float
    fidelity: float | None
    quantize_s: float | None
    eval_s: float


@dataclass
class DemoReport:
    rows: list[DemoRow] = field(default_factory=list)
    meta: dict = field(default_factory=dict)

    def table(self) -> str:
        def pct(v):
            return "-" if v is None else f"{100 * v:.1f}"

        body = format_table(
            ("setting", "method", "mIoU", "mask AP", "AP50", "fidelity", "quantize s"),
            (
                (
                    r.setting,
                    r.method,
                    pct(r.miou),
                    pct(r.mask_ap),
                    pct(r.mask_ap50),
                    pct(r.fidelity),
                    "-" if r.quantize_s is None else f"{r.quantize_s:.1f}",
                )
                for r in self.rows
            ),
        )
        m = self.meta
        head = (
            f"samq-fx demo: tiny SAM, {m['val_images']} generated validation images "
            f"({m['val_instances']} objects, ground-truth box prompts), "
            f"{m['calib_images']} calibration images"
        )
        foot = "mIoU/AP/fidelity in percent; fidelity = mask IoU vs the full-precision model"
        return f"{head}\n{body}\n{foot}"

    def to_dict(self) -> dict:
        return {"meta": self.meta, "rows": [r.__dict__ for r in self.rows]}


def calibration_samples(num_images: int, seed: int = CALIB_SEED) -> list[dict]:
    """Generated scenes (never seen in training or validation) with their ground-truth boxes."""
    samples = []
    for i in range(num_images):
        scene = generate_scene(seed, i)
        boxes = [mask_box(m) for m in scene.masks]
        samples.append({"image": scene.image, "boxes": boxes, "image_id": f"calib-{i}"})
    return samples


def demo_settings(
    bits: tuple[int, ...] = (8, 6, 4),
    methods: tuple[str, ...] = DEMO_METHODS,
    num_calib: int = 8,
    recon_iters: int | None = None,
) -> list[QuantConfig]:
    """The demo's rows: every method at every bit width. "ptq4sam", "saq-sam" and "car-sam" run
    without reconstruction unless `recon_iters` is given (20,000 / 2,000 steps a unit do not fit
    a CPU demo): "saq-sam-norecon" is PTQ4SAM's statistics plus PCC (SAQ-SAM's clipping),
    "car-sam-norecon" is MSE ranges plus MAC and AGQ; "samq-norecon" is this project's
    recipe without its reconstruction (BIG + AGQ + PCC + MAC)."""
    calib = CalibConfig(num_images=num_calib)
    settings = [
        QuantConfig.for_method(
            m, b, b, recon=recon_iters is not None, recon_iters=recon_iters, calib=calib
        )
        for b in bits
        for m in methods
    ]
    # AGQ's base search on 4 images keeps the demo within its CPU budget
    fast_agq = AgqConfig(search_images=min(4, num_calib))
    return [dataclasses.replace(c, agq=fast_agq) if c.agq else c for c in settings]


def run_table(
    settings: list[QuantConfig],
    num_val: int = 16,
    num_calib: int = 8,
    data_dir: str | None = None,
    progress: bool = False,
    on_row=None,
    device: str = "cpu",
) -> DemoReport:
    """Full precision, then each setting: quantize a copy of the captured tiny SAM, evaluate
    (on `device`: the model, calibration and evaluation all run there)."""
    torch.manual_seed(0)
    report = DemoReport()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(data_dir or tmp) / "val"
        if not (root / "annotations.json").exists():
            make_dataset(root, num_val, VAL_SEED, progress=progress)
        dataset = CocoDataset(root / "images", root / "annotations.json")
        fp = build_sam("tiny").to(device)
        captured = capture(fp)
        calib = calibration_samples(num_calib)
        start = time.perf_counter()
        res = evaluate(fp, dataset, progress=progress)
        fp_s = time.perf_counter() - start
        row = DemoRow(
            "FP32", "-", None, None, res.miou, res.mask_ap, res.mask_ap50, None, None, fp_s
        )
        report.rows.append(row)
        report.meta = {
            "val_images": res.num_images,
            "val_instances": res.num_instances,
            "calib_images": num_calib,
            "val_seed": VAL_SEED,
            "calib_seed": CALIB_SEED,
        }
        for cfg in settings:
            print(f"demo: {cfg.name} ...", file=sys.stderr, flush=True)
            start = time.perf_counter()
            q = quantize(captured, calib, cfg, progress=progress)
            q_s = time.perf_counter() - start
            start = time.perf_counter()
            res = evaluate(q, dataset, reference=fp, progress=progress)
            setting, method = cfg.name.split("-", 1)
            row = DemoRow(
                setting, method, cfg.w_bits, cfg.a_bits, res.miou, res.mask_ap, res.mask_ap50,
                res.fidelity_miou, q_s, time.perf_counter() - start,
            )  # fmt: skip
            report.rows.append(row)
            if on_row is not None:
                on_row(report, q)
    return report


def run_demo(
    num_val: int = 16,
    num_calib: int = 8,
    bits: tuple[int, ...] = (8, 6, 4),
    methods: tuple[str, ...] = DEMO_METHODS,
    data_dir: str | None = None,
    progress: bool = False,
    recon_iters: int | None = None,
) -> DemoReport:
    settings = demo_settings(bits, methods, num_calib, recon_iters)
    return run_table(settings, num_val, num_calib, data_dir, progress)


def demo_command(args) -> int:
    report = run_demo(
        num_val=args.num_val,
        num_calib=args.num_calib,
        data_dir=args.data,
        progress=args.progress,
        recon_iters=args.recon_iters,
    )
    print(report.table())
    if args.json:
        Path(args.json).write_text(json.dumps(report.to_dict(), indent=2) + "\n")
        print(f"results written to {args.json}")
    return 0
