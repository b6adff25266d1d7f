"""Paired comparison of quantization settings on the same objects: per-instance IoUs and a
bootstrap interval of each mIoU difference.

The tables (`bench/quant_table.py`) give one mIoU per setting; whether a gap of a few tenths is
more than the choice of validation scenes needs the per-object IoUs of both settings. This
quantizes the tiny SAM with each setting (the same calibration images and validation scenes as
`quant_table.py`), keeps every ground-truth-box IoU, and resamples images (with all their
objects) 10,000 times for a 95% interval of mIoU(a) - mIoU(b). Each setting is also scored on
its own calibration scenes (`calib_miou`), which tells overfitting (better there, worse on the
validation scenes) from a worse fit.

    python bench/paired_miou.py --num-val 100 --json bench/paired_miou.json \\
        --rows W4A4-ptq4sam@100 W4A4-car-sam@100 W4A4-ptq4sam@300 \\
        --pairs W4A4-car-sam@100:W4A4-ptq4sam@100 W4A4-ptq4sam@300:W4A4-ptq4sam@100
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
import tempfile
import time
from pathlib import Path

if __package__ is None and "samq_fx" not in sys.modules:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from samq_fx import build_sam, capture, quantize  # noqa: E402
from samq_fx.config import CalibConfig, QuantConfig, ReconConfig  # noqa: E402
from samq_fx.data import CocoDataset, make_dataset  # noqa: E402
from samq_fx.demo import CALIB_SEED, VAL_SEED, calibration_samples  # noqa: E402
from samq_fx.eval import predict_image  # noqa: E402


def setting(row: str, num_calib: int) -> QuantConfig:
    """A row name, e.g. W4A4-car-sam-noagq@300: for_method("car-sam", 4, 4, agq=False,
    recon_iters=300); without @ITERS the method's own step count. "+part" switches a part on
    (W4A4-samq+pcc), and ",field=value" after the steps overrides a `ReconConfig` field
    (W4A4-samq@1000,lr_scale=2e-3)."""
    row, *recon_changes = row.split(",")
    name, _, iters = row.partition("@")
    bits, method = name.split("-", 1)
    w, a = (int(x) for x in bits[1:].split("A"))
    switches = {}
    for base in ("car-sam", "ptq4sam", "saq-sam", "samq", "mse", "minmax"):
        if method.startswith(base):
            for sign, part in re.findall(r"(-no|\+)([a-z0-9]+)", method[len(base) :]):
                switches[{"big": "bimodal"}.get(part, part)] = sign == "+"
            method = base
            break
    cfg = QuantConfig.for_method(
        method, w, a, recon_iters=int(iters) if iters else None,
        calib=CalibConfig(num_images=num_calib), **switches,
    )  # fmt: skip
    if cfg.name != name:
        raise ValueError(f"{row!r} parses to {cfg.name}")
    if recon_changes:
        if cfg.recon is None:
            raise ValueError(f"{row!r} has no reconstruction to change")
        fields = {f.name for f in dataclasses.fields(ReconConfig)}
        changes = {}
        for change in recon_changes:
            key, _, value = change.partition("=")
            if key not in fields:
                raise ValueError(f"{change!r}: ReconConfig has no field {key!r}")
            changes[key] = type(getattr(cfg.recon, key))(value)
        cfg = dataclasses.replace(cfg, recon=dataclasses.replace(cfg.recon, **changes))
    return cfg


def per_image_ious(model, dataset) -> list[list[float]]:
    return [predict_image(model, dataset[i]).instance_ious for i in range(len(dataset))]


def paired_interval(a: list[list[float]], b: list[list[float]], draws: int = 10_000) -> dict:
    """mIoU(a) - mIoU(b) over all objects, and a 95% bootstrap interval resampling images."""
    rng = np.random.default_rng(0)
    sums = np.array([sum(x) - sum(y) for x, y in zip(a, b, strict=True)])
    counts = np.array([len(x) for x in a])
    idx = rng.integers(0, len(a), size=(draws, len(a)))
    boot = sums[idx].sum(1) / counts[idx].sum(1)
    lo, hi = np.percentile(boot, [2.5, 97.5])
    better = np.mean([xi > yi for x, y in zip(a, b) for xi, yi in zip(x, y)])
    return {
        "diff": float(sums.sum() / counts.sum()),
        "ci95": [float(lo), float(hi)],
        "objects_a_better": float(better),
    }


def split_seed(row: str) -> tuple[str, int]:
    """("W4A4-saq-sam@1000", 2) for "W4A4-saq-sam@1000,seed=2"; no seed field is seed 0."""
    fields = row.split(",")
    seeds = [int(f.removeprefix("seed=")) for f in fields if f.startswith("seed=")]
    return ",".join(f for f in fields if not f.startswith("seed=")), (seeds or [0])[0]


def seed_averaged(a: dict[int, list], b: dict[int, list]) -> dict:
    """Two settings run with several reconstruction seeds: each object's IoU averaged over the
    seeds both have, then the paired image bootstrap of that average (scene noise of the
    seed-averaged models), plus each seed's own paired difference (seed noise)."""
    seeds = sorted(set(a) & set(b))
    if not seeds:
        raise ValueError("no seed in common")

    def average(runs):
        first = runs[seeds[0]]
        return [
            [sum(runs[s][i][j] for s in seeds) / len(seeds) for j in range(len(first[i]))]
            for i in range(len(first))
        ]

    out = paired_interval(average(a), average(b))
    out["seeds"] = seeds
    out["per_seed_diff"] = [paired_interval(a[s], b[s])["diff"] for s in seeds]
    return out


def seed_pair_up(pairs: list[str], ious: dict, done: dict) -> dict[str, dict[int, float]]:
    """Add (and print) each "A:B" seed-averaged pair (rows A, "A,seed=1", ... against B's);
    return each setting run with several seeds: {seed: mIoU}."""
    runs: dict[str, dict[int, list]] = {}
    for row, v in ious.items():
        base, seed = split_seed(row)
        runs.setdefault(base, {})[seed] = v
    for pair in pairs:
        a, b = pair.split(":")
        if a in runs and b in runs:
            done[pair] = r = seed_averaged(runs[a], runs[b])
            per_seed = ", ".join(f"{100 * d:+.2f}" for d in r["per_seed_diff"])
            print(f"{a} - {b}, seeds {r['seeds']}: {100 * r['diff']:+.2f} mIoU, 95% CI "
                  f"[{100 * r['ci95'][0]:+.2f}, {100 * r['ci95'][1]:+.2f}]; per seed {per_seed}",
                  flush=True)  # fmt: skip
    return {
        base: {s: float(np.mean([x for img in by_seed[s] for x in img])) for s in sorted(by_seed)}
        for base, by_seed in runs.items()
        if len(by_seed) > 1
    }


def pair_up(pairs: list[str], ious: dict, done: dict) -> None:
    """Add (and print) each "A:B" pair whose two rows are known and not yet paired."""
    for pair in pairs:
        a, b = pair.split(":")
        if a in ious and b in ious and pair not in done:
            done[pair] = r = paired_interval(ious[a], ious[b])
            print(f"{a} - {b}: {100 * r['diff']:+.2f} mIoU, 95% CI "
                  f"[{100 * r['ci95'][0]:+.2f}, {100 * r['ci95'][1]:+.2f}]", flush=True)  # fmt: skip


def run_rows(settings: dict[str, QuantConfig], args, ious: dict, out: dict) -> None:
    """Quantize and score each setting on the validation and calibration scenes; the JSON is
    written after each row."""
    with tempfile.TemporaryDirectory() as tmp:
        make_dataset(Path(tmp) / "val", args.num_val, VAL_SEED, progress=False)
        make_dataset(Path(tmp) / "calib", args.num_calib, CALIB_SEED, progress=False)
        dataset, calib_scenes = (
            CocoDataset(Path(tmp) / d / "images", Path(tmp) / d / "annotations.json")
            for d in ("val", "calib")
        )
        captured = capture(build_sam("tiny").to(args.device))
        calib = calibration_samples(args.num_calib)
        for row, cfg in settings.items():
            start = time.perf_counter()
            q = quantize(captured, calib, cfg, progress=False)
            q_s = time.perf_counter() - start
            ious[row] = per_image_ious(q, dataset)
            flat = [x for img in ious[row] for x in img]
            on_calib = [x for img in per_image_ious(q, calib_scenes) for x in img]
            out["rows"][row] = {
                "miou": float(np.mean(flat)), "objects": len(flat), "quantize_s": q_s,
                "calib_miou": float(np.mean(on_calib)), "calib_objects": len(on_calib),
                "per_image_ious": ious[row],
            }  # fmt: skip
            print(f"{row}: mIoU {100 * np.mean(flat):.2f} ({len(flat)} objects), on the "
                  f"calibration scenes {100 * np.mean(on_calib):.2f} ({len(on_calib)}), "
                  f"quantize {q_s:.0f} s", flush=True)  # fmt: skip
            pair_up(args.pairs, ious, out["pairs"])
            args.json.write_text(json.dumps(out) + "\n")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", nargs="*", default=[], metavar="NAME[@ITERS][,FIELD=VALUE]")
    p.add_argument(
        "--from-json", nargs="*", type=Path, default=[], metavar="JSON",
        help="earlier runs' files: their rows join the pairs (same --num-val and scenes)",
    )  # fmt: skip
    p.add_argument("--pairs", nargs="*", default=[], metavar="A:B")
    p.add_argument(
        "--seed-pairs", nargs="*", default=[], metavar="A:B",
        help="rows without their ',seed=N' (N=0 when absent): IoUs averaged over common seeds",
    )  # fmt: skip
    p.add_argument("--num-val", type=int, default=100)
    p.add_argument("--num-calib", type=int, default=8)
    p.add_argument("--json", type=Path, required=True)
    p.add_argument("--device", default="cpu", help="cpu or cuda: where quantization and eval run")
    args = p.parse_args(argv)
    settings = {row: setting(row, args.num_calib) for row in args.rows}
    torch.manual_seed(0)
    out = {
        "args": vars(args)
        | {"json": str(args.json), "from_json": [str(f) for f in args.from_json]},
        "rows": {},
        "pairs": {},
    }
    ious = {}
    for path in args.from_json:
        earlier = json.loads(path.read_text())
        if earlier["args"]["num_val"] != args.num_val:
            raise ValueError(f"{path}: --num-val {earlier['args']['num_val']}, not {args.num_val}")
        ious |= {row: r["per_image_ious"] for row, r in earlier["rows"].items()}
    if settings:
        run_rows(settings, args, ious, out)
    pair_up(args.pairs, ious, out["pairs"])
    out["seed_pairs"] = {}
    out["seed_mious"] = seed_pair_up(args.seed_pairs, ious, out["seed_pairs"])
    for base, mious in out["seed_mious"].items():
        spread = " ".join(f"{100 * m:.2f}" for m in mious.values())
        mean = 100 * np.mean(list(mious.values()))
        print(f"{base}: seeds {list(mious)}: mIoU {spread}, mean {mean:.2f}")
    args.json.write_text(json.dumps(out) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
