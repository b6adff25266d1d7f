"""Calibration sharded over 2 CPU processes (gloo) observes what one process observes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

WORKER = Path(__file__).with_name("sharded_calib_worker.py")


def _run(tmp_path, world: int, method: str) -> list[dict]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    prefix = tmp_path / f"w{world}"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc-per-node={world}", str(WORKER), str(prefix), method]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [torch.load(f"{prefix}.rank{r}.pt") for r in range(world)]


@pytest.mark.slow
@pytest.mark.parametrize("method", ["minmax", "percentile"])
def test_two_ranks_calibrate_like_one(tmp_path, method):
    # the same environment (one thread a process) for both, so float rounding is comparable
    (single,) = _run(tmp_path, 1, method)
    ranks = _run(tmp_path, 2, method)
    assert ranks[0].keys() == single.keys() and len(single) > 0
    for key, value in single.items():
        if not isinstance(value, torch.Tensor):
            continue
        assert torch.equal(ranks[0][key], ranks[1][key]), f"ranks differ at {key}"
        if method == "minmax":
            assert torch.equal(ranks[0][key], value), f"sharded != one process at {key}"
        else:  # averages of per-image ranges: equal up to summation order
            torch.testing.assert_close(ranks[0][key], value, rtol=1e-5, atol=1e-6)


def test_too_few_images_for_the_ranks():
    import torch.distributed as dist

    from samq_fx.calib import CalibrationError, run_calibration

    if dist.is_initialized():
        pytest.skip("a process group is already initialised")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        with pytest.raises(CalibrationError, match="cannot be sharded"):
            run_calibration(None, [], progress=False, group=dist.group.WORLD)
    finally:
        dist.destroy_process_group()
