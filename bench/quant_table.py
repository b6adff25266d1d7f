"""Accuracy table of the quantization methods on the tiny SAM's generated validation set.

One row per setting (mIoU with ground-truth boxes, mask AP, fidelity against full precision,
quantization seconds), printed as a table and written as JSON (rows appended as they finish),
plus what BIG and AGQ saw on the model (bimodal keys, chosen log2 bases) and the reconstruction
report per unit.

    python bench/quant_table.py --table ptq4sam --recon-iters 100 --json bench/ptq4sam_table.json
    python bench/quant_table.py --table saq-sam --recon-iters 200 --json bench/saq_sam_table.json
    python bench/quant_table.py --table car-sam --recon-iters 100 --json bench/car_sam_table.json
    python bench/quant_table.py --table car-sam-agq --num-val 100 --json bench/car_sam_agq_table.json

Prompts are the validation set's ground-truth boxes (CAR-SAM's protocol), never detector boxes.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

if __package__ is None and "samq_fx" not in sys.modules:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from samq_fx.config import CalibConfig, QuantConfig  # noqa: E402
from samq_fx.demo import run_table  # noqa: E402
from samq_fx.meta import get_info  # noqa: E402


def ptq4sam_settings(recon_iters: int, num_calib: int) -> list[QuantConfig]:
    calib = CalibConfig(num_images=num_calib)

    def cfg(method: str, b: int, **switches) -> QuantConfig:
        return QuantConfig.for_method(
            method, b, b, recon_iters=recon_iters, calib=calib, **switches
        )

    rows = []
    for b in (8, 6, 4):
        rows += [cfg("minmax", b), cfg("mse", b), cfg("ptq4sam", b, recon=False), cfg("ptq4sam", b)]
    # ablation of BIG and AGQ (PTQ4SAM's table), at W4A4 and W6A6, statistics only
    for b in (6, 4):
        rows += [
            cfg("ptq4sam", b, recon=False, bimodal=False),
            cfg("ptq4sam", b, recon=False, agq=False),
            cfg("ptq4sam", b, recon=False, bimodal=False, agq=False),
        ]
    return rows


def saq_sam_settings(recon_iters: int, num_calib: int) -> list[QuantConfig]:
    """W4A4 and W6A6: min-max, MSE, ptq4sam, saq-sam, and the ablation of PCC and PAR on
    PTQ4SAM's statistics (BIG + AGQ): neither, PCC alone, PAR alone (saq-sam's units and
    prompt-aware loss, no PCC), both (= saq-sam); plus PCC stacked on MSE."""
    calib = CalibConfig(num_images=num_calib)

    def cfg(method: str, b: int, **switches) -> QuantConfig:
        return QuantConfig.for_method(
            method, b, b, recon_iters=recon_iters, calib=calib, **switches
        )

    rows = []
    for b in (4, 6):  # W4A4 first: the comparison
        rows += [
            cfg("minmax", b),
            cfg("mse", b),
            cfg("mse", b, pcc=True),
            cfg("ptq4sam", b),
            cfg("saq-sam", b),
            cfg("saq-sam", b, recon=False, pcc=False),  # neither: PTQ4SAM's statistics
            cfg("saq-sam", b, recon=False),  # PCC alone
            cfg("saq-sam", b, pcc=False),  # PAR alone
        ]
    return rows


def car_sam_settings(recon_iters: int, num_calib: int) -> list[QuantConfig]:
    """W4A4 first: min-max, MSE, ptq4sam, car-sam, CAR-SAM's ablation (MAC, JCAR) and car-sam
    with the strict reading's uniform softmax grid (agq=False); then W6A6: min-max, MSE,
    ptq4sam, car-sam. (Before `CAR_SAM_AGQ`, car-sam and this ablation ran the uniform grid.)"""
    calib = CalibConfig(num_images=num_calib)

    def cfg(method: str, b: int, **switches) -> QuantConfig:
        return QuantConfig.for_method(
            method, b, b, recon_iters=recon_iters, calib=calib, **switches
        )

    rows = [cfg(m, 4) for m in ("minmax", "mse", "ptq4sam", "car-sam")]
    rows += [
        cfg("car-sam", 4, mac=False),  # JCAR only
        cfg("car-sam", 4, jcar=False),  # MAC + per-branch reconstruction
        cfg("car-sam", 4, mac=False, jcar=False),  # neither: plain per-branch reconstruction
        cfg("car-sam", 4, recon=False),  # MAC only, no reconstruction
        cfg("car-sam", 4, agq=False),  # the strict reading: uniform softmax grid
    ]
    return rows + [cfg(m, 6) for m in ("minmax", "mse", "ptq4sam", "car-sam")]


def car_sam_agq_settings(recon_iters: int, num_calib: int) -> list[QuantConfig]:
    """W4A4, CAR-SAM's post-softmax quantizer (`CAR_SAM_AGQ`): MSE, ptq4sam, car-sam with AGQ
    on the softmax (the default) and with the strict reading's uniform grid (car-sam-noagq),
    samq; then the ablation of the default car-sam: without MAC, per-branch units instead of
    JCAR, no reconstruction (MAC + AGQ only)."""
    calib = CalibConfig(num_images=num_calib)

    def cfg(method: str, **switches) -> QuantConfig:
        return QuantConfig.for_method(
            method, 4, 4, recon_iters=recon_iters, calib=calib, **switches
        )

    return [
        cfg("mse"),
        cfg("ptq4sam"),
        cfg("car-sam", agq=True),
        cfg("car-sam", agq=False),
        cfg("samq"),
        cfg("car-sam", agq=True, mac=False),
        cfg("car-sam", agq=True, jcar=False),
        cfg("car-sam", agq=True, recon=False),
    ]


def final_settings(recon_iters: int, num_calib: int) -> list[QuantConfig]:
    """The one table of issue 10: W4A4, W6A6, W8A8 x {min-max, MSE, ptq4sam, saq-sam, car-sam,
    samq}, then at W4A4 the ablation of samq: without MAC (= saq-sam), with CAR-SAM's JCAR
    decoder units, without PAR, without PCC, without reconstruction, without BIG, without AGQ."""
    calib = CalibConfig(num_images=num_calib)

    def cfg(method: str, b: int, **switches) -> QuantConfig:
        return QuantConfig.for_method(
            method, b, b, recon_iters=recon_iters, calib=calib, **switches
        )

    methods = ("minmax", "mse", "ptq4sam", "saq-sam", "car-sam", "samq")
    rows = [cfg(m, 4) for m in methods]
    rows += [
        cfg("samq", 4, mac=False),
        cfg("samq", 4, jcar=True),
        cfg("samq", 4, par=False),
        cfg("samq", 4, pcc=False),
        cfg("samq", 4, recon=False),
        cfg("samq", 4, bimodal=False),
        cfg("samq", 4, agq=False),
    ]
    return rows + [cfg(m, b) for b in (6, 8) for m in methods]


TABLES = {
    "final": final_settings,
    "ptq4sam": ptq4sam_settings,
    "saq-sam": saq_sam_settings,
    "car-sam": car_sam_settings,
    "car-sam-agq": car_sam_agq_settings,
}


def method_findings(q) -> dict:
    """BIG verdicts and AGQ bases per attention, reconstruction per unit."""
    out = {"big": [], "agq": [], "mac": []}
    for part in ("image_encoder", "mask_decoder"):
        for node in getattr(q, part).graph.nodes:
            info = get_info(node)
            if info is None or info.role is None:  # quantizer nodes copy their consumer's record
                continue
            big = info.findings.get("detect_bimodal")
            if big is not None:
                out["big"].append(
                    {"attn": info.attn_path, "kind": info.attn_kind, "peaks": big.get("peaks"),
                     "bimodal": big.get("bimodal"), "flipped": big.get("flipped")}
                )  # fmt: skip
            mac = info.findings.get("compensate_matmul")
            if mac is not None:
                out["mac"].append({"linear": info.module_path, **mac})
            agq = info.findings.get("search_agq")
            if agq is not None:
                out["agq"].append({"attn": info.attn_path, "kind": info.attn_kind, **agq})
            for slot, pcc in info.findings.get("install_pcc_clips", {}).items():
                out.setdefault("pcc", []).append({"kind": info.attn_kind, "slot": slot, **pcc})
    recon = getattr(q, "samq_recon", None)
    if recon is not None:
        out["recon"] = recon.to_dict()
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--table", choices=sorted(TABLES), default="ptq4sam")
    p.add_argument("--recon-iters", type=int, default=100)
    p.add_argument("--num-val", type=int, default=24)
    p.add_argument("--num-calib", type=int, default=8)
    p.add_argument("--only", nargs="+", metavar="NAME", help="only these settings (e.g. W6A6-mse)")
    p.add_argument("--json", type=Path, required=True)
    p.add_argument("--device", default="cpu", help="cpu or cuda: where quantization and eval run")
    p.add_argument(
        "--start", type=int, default=0, help="skip the table's first K settings (finish a cut run)"
    )
    args = p.parse_args(argv)
    settings = TABLES[args.table](args.recon_iters, args.num_calib)[args.start :]
    if args.only:
        unknown = set(args.only) - {c.name for c in settings}
        if unknown:
            p.error(f"unknown settings {sorted(unknown)}; known: {[c.name for c in settings]}")
        settings = [c for c in settings if c.name in args.only]
    findings = {}

    def on_row(report, q) -> None:
        findings[report.rows[-1].setting + "-" + report.rows[-1].method] = method_findings(q)
        record = {
            **report.to_dict(),
            "findings": findings,
            "args": vars(args) | {"json": str(args.json)},
        }
        args.json.write_text(json.dumps(record, indent=1, default=str) + "\n")
        print(report.table(), flush=True)

    report = run_table(
        settings, args.num_val, args.num_calib, progress=True, on_row=on_row, device=args.device
    )
    print(report.table())
    return 0


if __name__ == "__main__":
    sys.exit(main())
