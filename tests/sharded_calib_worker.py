"""Worker for tests/test_sharded_calibration.py, started by torchrun: quantize the tiny SAM with
calibration sharded over the ranks (gloo) and save each rank's quantizer tensors."""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist

import samq_fx
from samq_fx.demo import calibration_samples


def quantizer_tensors(model) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if "samq_quantizers" in k}


def main(out_prefix: str, method: str) -> int:
    dist.init_process_group("gloo")
    cfg = samq_fx.QuantConfig(method=method)
    q = samq_fx.quantize(
        samq_fx.build_sam("tiny"), calibration_samples(4), cfg, progress=False,
        process_group=dist.group.WORLD,
    )  # fmt: skip
    torch.save(quantizer_tensors(q), f"{out_prefix}.rank{dist.get_rank()}.pt")
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
