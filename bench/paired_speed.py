"""Paired speed of two settings on a noisy machine: calls alternate A, B, A, B, ...

`bench/speed.py` times one setting after another, so drift between them (another tenant, CPU
clocks) lands on whichever setting ran during it: on this project's shared 2-core machine the
same SAM-B CPU setting read 5.9 s and 7.6 s in one A-B-B-A run. Here both models are built and
warmed up first, then each round calls A and B back to back (the order flipping every round), so
a drift hits both calls of a pair alike. Reported: each setting's median, the median of the
per-round ratios B / A and a 95% bootstrap interval of that median.

    OMP_NUM_THREADS=2 python bench/paired_speed.py --model vit_b --device cpu \\
        --a fp32-compile --b int8-static+unfused --rounds 20 --json bench/paired_speed_cpu.json
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

import torch

if __package__ is None and "samq_fx" not in sys.modules:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import samq_fx  # noqa: E402
from samq_fx.speed import _sync, build, calibrated, git_sha  # noqa: E402


def ratio_interval(ratios: list[float], draws: int = 10_000, seed: int = 0) -> tuple[float, float]:
    """95% bootstrap interval of the median of `ratios` (rounds resampled with replacement)."""
    rng = random.Random(seed)
    medians = sorted(statistics.median(rng.choices(ratios, k=len(ratios))) for _ in range(draws))
    return medians[int(0.025 * draws)], medians[int(0.975 * draws) - 1]


def timed(fn, device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="vit_b")
    p.add_argument("--device", default="cpu")
    p.add_argument("--a", required=True, help="the baseline setting (as samq-fx bench names it)")
    p.add_argument("--b", required=True, help="the setting compared with it")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    torch.manual_seed(0)
    sam = samq_fx.build_sam(args.model, pretrained=False).to(device).eval()
    captured = samq_fx.capture(sam)
    quantized = calibrated(captured, args.model, (args.a, args.b))
    size = captured.image_encoder.img_size
    x = torch.randn(args.batch, 3, size, size, generator=torch.Generator().manual_seed(1))
    x = x.to(device)
    models = {}
    with torch.inference_mode():
        for name in (args.a, args.b):
            models[name] = build(name, captured, quantized)[0]
            for _ in range(args.warmup):
                models[name].image_encoder(x)
            print(f"{name}: built and warmed up", flush=True)
        times = {args.a: [], args.b: []}
        for r in range(args.rounds):
            order = (args.a, args.b) if r % 2 == 0 else (args.b, args.a)
            for name in order:
                times[name].append(timed(lambda m=models[name]: m.image_encoder(x), device))
            print(f"round {r + 1}/{args.rounds}: {args.a} {times[args.a][-1]:.3f} s, "
                  f"{args.b} {times[args.b][-1]:.3f} s", flush=True)  # fmt: skip
    ratios = [b / a for a, b in zip(times[args.a], times[args.b])]
    low, high = ratio_interval(ratios)
    result = {
        "sha": git_sha(), "torch": torch.__version__, "device": str(device),
        "threads": torch.get_num_threads(), "model": args.model, "batch": args.batch,
        "a": args.a, "b": args.b, "date": time.strftime("%Y-%m-%d"),
        "median_s": {k: statistics.median(v) for k, v in times.items()},
        "median_ratio_b_over_a": statistics.median(ratios), "ratio_95": [low, high],
        "times_s": times,
    }  # fmt: skip
    print(f"{args.model} batch {args.batch} on {device} x{torch.get_num_threads()}: "
          f"{args.a} median {result['median_s'][args.a]:.3f} s, {args.b} median "
          f"{result['median_s'][args.b]:.3f} s; {args.b} / {args.a} per round: median "
          f"{result['median_ratio_b_over_a']:.3f} (95% interval {low:.3f}-{high:.3f})")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
