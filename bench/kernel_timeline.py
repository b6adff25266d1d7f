"""One compiled encoder call, kernel by kernel: where the GPU waits and what the CPU does.

For each setting (as `samq-fx bench` names them): the median wall time of 10 calls at batch 8 (`--batch`),
the CPU time until the call returns (enqueueing), the CUDA kernels' busy time and span in one
profiled call, when the first
kernel starts after the call begins, the CPU events that take longest, and a JSON of the kernel sequence (name,
start, duration in µs) to read block by block. `--inductor key=value` sets inductor options
for the run (how `CUDA_FUSION_OPTIONS` in `samq_fx.lower` was found).

    PYTHONPATH=. python3 bench/kernel_timeline.py --model vit_h \\
        --settings float8-static+i8attn+wtri bf16-triton-all --out timeline
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
import samq_fx  # noqa: E402
from samq_fx.speed import build, calibrated  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="vit_b")
    p.add_argument("--settings", nargs="+", required=True)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--cudagraphs", action="store_true", help="replay the encoder as a CUDA graph")
    p.add_argument("--inductor", nargs="*", default=[], help="inductor options, key=int")
    p.add_argument("--out", default="timeline", help="prefix of the kernel-sequence JSONs")
    args = p.parse_args(argv)
    for option in args.inductor:
        key, value = option.split("=")
        setattr(torch._inductor.config, key, int(value))
    torch.manual_seed(0)
    device = torch.device("cuda")
    captured = samq_fx.capture(samq_fx.build_sam(args.model, pretrained=False).to(device).eval())
    quantized = calibrated(captured, args.model, args.settings)
    x = torch.randn(args.batch, 3, 1024, 1024, device=device)
    for setting in args.settings:
        torch._dynamo.reset()
        model, _ = build(setting, captured, quantized, cudagraphs=args.cudagraphs)
        with torch.inference_mode():
            for _ in range(4):
                model.image_encoder(x)
            torch.cuda.synchronize()
            walls, enqueues = [], []
            for _ in range(10):
                start = time.perf_counter()
                model.image_encoder(x)
                enqueues.append(time.perf_counter() - start)  # the CPU's share of the call
                torch.cuda.synchronize()
                walls.append(time.perf_counter() - start)
            activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
            with torch.profiler.profile(activities=activities) as prof:
                model.image_encoder(x)
                torch.cuda.synchronize()
        events = sorted(prof.events(), key=lambda e: e.time_range.start)
        cuda = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
        cpu = [e for e in events if e.device_type == torch.autograd.DeviceType.CPU]
        t0 = cpu[0].time_range.start
        busy = sum(e.time_range.end - e.time_range.start for e in cuda)
        span = cuda[-1].time_range.end - cuda[0].time_range.start
        print(f"{args.model} {setting}: wall p50 {1e3 * statistics.median(walls):.2f} ms, "
              f"of which enqueueing {1e3 * statistics.median(enqueues):.2f} ms; kernels "
              f"{busy / 1e3:.2f} ms busy over a {span / 1e3:.2f} ms span ({len(cuda)} kernels); "
              f"first kernel {(cuda[0].time_range.start - t0) / 1e3:.2f} ms into the call")  # fmt: skip
        launches = [e for e in cpu if e.name.startswith(("cuLaunch", "cudaLaunch"))]
        first_launch = launches[0].time_range.start if launches else t0
        print("   before the first launch (CPU events over 20 us, by start):")
        for e in cpu:
            took = e.time_range.end - e.time_range.start
            if e.time_range.start < first_launch and took > 20:
                print(f"     +{(e.time_range.start - t0) / 1e3:6.2f} ms {took / 1e3:6.2f} ms "
                      f"{e.name[:90]}")  # fmt: skip
        totals: dict[str, list] = {}
        for e in cpu:
            entry = totals.setdefault(e.name[:90], [0, 0.0])
            entry[0] += 1
            entry[1] += e.time_range.end - e.time_range.start
        for name, (count, us) in sorted(totals.items(), key=lambda kv: -kv[1][1])[:15]:
            print(f"   CPU {us / 1e3:7.2f} ms  x{count:<4d} {name}")
        sequence = [(e.name[:120], e.time_range.start - cuda[0].time_range.start,
                     e.time_range.end - e.time_range.start) for e in cuda]  # fmt: skip
        suffix = ("" if args.batch == 8 else f"_b{args.batch}") + ("_cg" if args.cudagraphs else "")
        path = Path(f"{args.out}_{args.model}{suffix}_{setting.replace('+', '_')}.json")
        path.write_text(json.dumps(sequence) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
