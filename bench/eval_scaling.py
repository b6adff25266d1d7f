"""Sharded evaluation on several GPUs: the same metrics as one GPU, and how much faster.

For each model: `samq-fx eval` on one GPU, then `samq-fx eval --nproc N` (torchrun, NCCL, one
process a GPU) on the same generated scenes (1024 px, SAM's input size), random weights seeded
identically on every rank. Checks that the two metric JSONs are equal except for the timing and
world-size fields, and prints images/s of the evaluation loop (the `seconds` each run reports:
embedding, decoding, gathering and scoring, after the model is built) and of the whole command.

    PYTHONPATH=. python3 bench/eval_scaling.py --models vit_b vit_h --nproc 2 --num-images 64
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

if __package__ is None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from samq_fx.report import format_table  # noqa: E402

VOLATILE = ("seconds", "world_size")


def run_eval(model: str, data: Path, nproc: int, out: Path) -> tuple[dict, float]:
    cmd = [sys.executable, "-m", "samq_fx.cli", "eval", "--model", model, "--images",
           str(data / "images"), "--annotations", str(data / "annotations.json"),
           "--output", str(out), "--no-progress", "--nproc", str(nproc)]  # fmt: skip
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy())
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    return json.loads(out.read_text()), wall


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["vit_b", "vit_h"])
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--num-images", type=int, default=64)
    p.add_argument("--data", type=Path, default=Path("/tmp/samq_scaling_data"))
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    if not (args.data / "annotations.json").exists():
        subprocess.run([sys.executable, "-m", "samq_fx.cli", "make-data", "--out", str(args.data),
                        "--num-images", str(args.num_images), "--seed", "11", "--long-side",
                        "1024"], check=True)  # fmt: skip
    rows, records = [], []
    for model in args.models:
        one, wall1 = run_eval(model, args.data, 1, args.data / f"{model}_1.json")
        many, wall_n = run_eval(model, args.data, args.nproc, args.data / f"{model}_n.json")
        same = {k: v for k, v in one.items() if k not in VOLATILE} == {
            k: v for k, v in many.items() if k not in VOLATILE
        }
        speedup = one["seconds"] / many["seconds"]
        n = one["num_images"]
        rows.append((model, n, f"{n / one['seconds']:.2f}", f"{n / many['seconds']:.2f}",
                     f"{speedup:.2f}x", f"{100 * speedup / args.nproc:.0f}%",
                     f"{wall1:.0f} / {wall_n:.0f}", "yes" if same else "NO"))  # fmt: skip
        records.append({"model": model, "num_images": n, "one": one, "many": many,
                        "wall_one_s": wall1, "wall_many_s": wall_n, "identical_metrics": same})  # fmt: skip
        print(rows[-1], flush=True)
    headers = ("model", "images", "img/s 1 GPU", f"img/s {args.nproc} GPUs", "speed-up",
               "efficiency", "command wall s (1 / N)", "same metrics")  # fmt: skip
    print(format_table(headers, rows))
    if args.json:
        args.json.write_text(json.dumps({"nproc": args.nproc, "runs": records}, indent=1) + "\n")
    return 0 if all(r["identical_metrics"] for r in records) else 1


if __name__ == "__main__":
    sys.exit(main())
