"""GPU check of issue 4's claims: a model captured on the CPU moves to CUDA, matches eager SAM
there, and compiles with torch.compile(fullgraph=True). Prints one line per check.

    PYTHONPATH=. python3 bench/gpu_check_capture.py
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

if __package__ is None and "samq_fx" not in sys.modules:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import samq_fx  # noqa: E402


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-12))


@torch.no_grad()
def main() -> int:
    device = torch.device("cuda")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    for name in ("tiny", "vit_b"):
        torch.manual_seed(0)
        sam = (
            samq_fx.build_sam(name, pretrained=False) if name == "tiny" else samq_fx.build_sam(name)
        )
        captured = samq_fx.capture(sam).to(device)
        sam = sam.to(device)
        size = sam.image_encoder.img_size
        x = torch.randn(2, 3, size, size, device=device)
        err = rel_err(captured.image_encoder(x), sam.image_encoder(x))
        print(
            f"{name}: captured encoder on {torch.cuda.get_device_name()} vs eager: rel err {err:.2e}"
        )
        start = time.perf_counter()
        compiled = torch.compile(captured.image_encoder, fullgraph=True)
        out = compiled(x)
        torch.cuda.synchronize()
        print(
            f"{name}: torch.compile(fullgraph=True) of the captured encoder: rel err "
            f"{rel_err(out, sam.image_encoder(x)):.2e}, compile+run {time.perf_counter() - start:.1f} s"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
