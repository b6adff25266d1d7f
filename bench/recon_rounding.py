"""How far AdaRound gets in a short reconstruction: soft vs hard rounding, per step count.

Quantizes the tiny SAM at W4A4 with PTQ4SAM's statistics (BIG + AGQ, MSE ranges, no
reconstruction), then reconstructs a few units from that same model for each step count and
reports, per unit and step count, just before the rounding is hardened:

* gap: mean |h(alpha) - 1[alpha >= 0]| over the unit's weights, in grid steps: how far the soft
  weights the optimisation saw are from the hard ones evaluation uses (about 0.25 at the start,
  where h = frac(W/s); 0 once the regulariser has pushed every h to 0 or 1);
* flips: the fraction of weights whose hardened rounding differs from round-to-nearest;
* the unit's output MSE on the calibration items with every quantizer on and hard rounding,
  before and after (`UnitReport.mse_before` / `mse_after`).

    python bench/recon_rounding.py --iters 100 300 1000 --json bench/recon_rounding.json
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

if __package__ is None and "samq_fx" not in sys.modules:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import samq_fx  # noqa: E402
from samq_fx import recon  # noqa: E402
from samq_fx.calib import prepare_calibration, validate_loader  # noqa: E402
from samq_fx.config import CalibConfig, QuantConfig, ReconConfig  # noqa: E402
from samq_fx.demo import calibration_samples  # noqa: E402
from samq_fx.quantizers import UniformQuantizer  # noqa: E402


def rounding_stats(quantizers: list[UniformQuantizer]) -> dict:
    gap, flips, n = 0.0, 0.0, 0
    for q in quantizers:
        h = q.soft_offset().detach()
        hard = (q.alpha.detach() >= 0).float()
        nearest = (q._frac_at_enable >= 0.5).float()
        gap += float((h - hard).abs().sum())
        flips += float((hard != nearest).float().sum())
        n += h.numel()
    return {"gap": gap / max(n, 1), "flips": flips / max(n, 1), "weights": n}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--iters", type=int, nargs="+", default=[100, 300, 1000])
    p.add_argument("--units", nargs="+", default=["enc.1.mlp", "dec.0.t2i", "dec.1.i2t"])
    p.add_argument("--num-calib", type=int, default=8)
    p.add_argument("--json", type=Path, required=True)
    args = p.parse_args(argv)
    torch.manual_seed(0)
    captured = samq_fx.capture(samq_fx.build_sam("tiny"))
    cal = CalibConfig(num_images=args.num_calib)
    calib = calibration_samples(args.num_calib)
    cfg = QuantConfig.for_method("ptq4sam", 4, 4, recon=False, calib=cal)
    base = samq_fx.quantize(captured, calib, cfg, progress=False)
    items = prepare_calibration(captured, validate_loader(calib, cal), cal, progress=False)

    seen: list[dict] = []
    enable, harden = UniformQuantizer.enable_adaround, UniformQuantizer.harden

    def enable_and_keep_frac(self, weight):
        out = enable(self, weight)
        ratio = self._ratio(weight.detach().float())
        self._frac_at_enable = (ratio - torch.floor(ratio)).reshape(weight.shape)
        return out

    def record_then_harden(self):
        seen.append(rounding_stats([self]) | {"id": id(self)})
        return harden(self)

    UniformQuantizer.enable_adaround = enable_and_keep_frac
    UniformQuantizer.harden = record_then_harden
    rows = []
    try:
        for unit in args.units:
            for iters in args.iters:
                q = copy.deepcopy(base)
                seen.clear()
                report = recon.reconstruct(
                    q, captured, items, ReconConfig(iters=iters), units=[unit], progress=False
                )
                (u,) = report.units
                n = sum(s["weights"] for s in seen)
                row = {
                    "unit": unit,
                    "iters": iters,
                    "gap": sum(s["gap"] * s["weights"] for s in seen) / n,
                    "flips": sum(s["flips"] * s["weights"] for s in seen) / n,
                    "mse_before": u.mse_before,
                    "mse_after": u.mse_after,
                    "loss_first": u.loss_first,
                    "loss_last": u.loss_last,
                    "seconds": u.seconds,
                }
                rows.append(row)
                print(json.dumps(row), flush=True)
                args.json.write_text(json.dumps({"rows": rows, "args": vars(args) | {
                    "json": str(args.json)}}, indent=1) + "\n")  # fmt: skip
    finally:
        UniformQuantizer.enable_adaround, UniformQuantizer.harden = enable, harden
    return 0


if __name__ == "__main__":
    sys.exit(main())
