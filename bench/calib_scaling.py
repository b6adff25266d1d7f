"""Sharded calibration: time `samq_fx.quantize` with calibration sharded over the ranks of a
torchrun job (NCCL, one GPU a rank), and fingerprint the result so runs on 1 and N GPUs can be
compared (min-max observers reduce exactly).

    torchrun --nproc-per-node 1 bench/calib_scaling.py --model vit_h --num-calib 16 --json one.json
    torchrun --nproc-per-node 2 bench/calib_scaling.py --model vit_h --num-calib 16 --json two.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

if __package__ is None and "samq_fx" not in sys.modules:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import samq_fx  # noqa: E402
from samq_fx.data import SceneConfig, generate_scene, mask_box  # noqa: E402


def fingerprint(model) -> str:
    h = hashlib.sha256()
    for key, value in sorted(model.state_dict().items()):
        if "samq_quantizers" in key and isinstance(value, torch.Tensor):
            h.update(key.encode())
            h.update(value.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="vit_h")
    p.add_argument("--num-calib", type=int, default=16)
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    cuda = torch.cuda.is_available()
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if cuda:
        torch.cuda.set_device(local)
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    if cuda:
        dist.init_process_group("nccl", device_id=device)
    else:
        dist.init_process_group("gloo")
    cfg = SceneConfig(long_side=(1024, 1024))
    samples = []
    for i in range(args.num_calib):
        scene = generate_scene(30_000, i, cfg)
        samples.append({"image": scene.image, "boxes": [mask_box(m) for m in scene.masks]})
    torch.manual_seed(0)
    captured = samq_fx.capture(samq_fx.build_sam(args.model).to(device).eval())
    qcfg = samq_fx.QuantConfig.preset("W8A8-int8", method="minmax")
    dist.barrier()
    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    q = samq_fx.quantize(captured, samples, qcfg, progress=False, process_group=dist.group.WORLD)
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    prints = [None] * dist.get_world_size()
    dist.all_gather_object(prints, fingerprint(q))
    if dist.get_rank() == 0:
        record = {
            "model": args.model,
            "world_size": dist.get_world_size(),
            "num_calib": args.num_calib,
            "quantize_seconds": seconds,
            "fingerprints": prints,
            "device": torch.cuda.get_device_name(device) if cuda else "cpu",
        }
        print(json.dumps(record))
        if args.json:
            args.json.write_text(json.dumps(record, indent=1) + "\n")
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
