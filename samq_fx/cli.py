"""The `samq-fx` command. One sub-command per job; each `_cmd_*` parses nothing itself."""

from __future__ import annotations

import argparse
import os
import sys


def _add_make_data(sub: argparse._SubParsersAction) -> None:
    """Registers `make-data`: write a synthetic COCO dataset of shape scenes."""

    def _positive_int(text: str) -> int:
        if not text.isdigit() or int(text) < 1:
            raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
        return int(text)

    def _cmd_make_data(args: argparse.Namespace) -> int:
        from samq_fx.data import DataError, SceneConfig, make_dataset

        cfg = (
            SceneConfig()
            if args.long_side is None
            else SceneConfig(long_side=(args.long_side,) * 2)
        )
        try:
            path = make_dataset(args.out, args.num_images, args.seed, cfg, overwrite=args.force)
        except (DataError, FileExistsError) as err:
            print(f"samq-fx make-data: error: {err}", file=sys.stderr)
            return 2
        print(f"wrote {args.num_images} images to {path.parent / 'images'} and {path}")
        return 0

    p = sub.add_parser(
        "make-data",
        help="write a synthetic COCO dataset (images/*.png + annotations.json)",
        description="Generate shape scenes with visible-part instance masks as a COCO dataset. "
        "Image id k+1 is samq_fx.data.generate_scene(seed, k).",
    )
    p.add_argument("--out", required=True, help="dataset folder (created if needed)")
    p.add_argument("--num-images", type=_positive_int, required=True, help="how many scenes")
    p.add_argument("--seed", type=int, default=0, help="the stream of scenes (default 0)")
    p.add_argument("--force", action="store_true", help="replace an existing annotations.json")
    p.add_argument(
        "--long-side",
        type=_positive_int,
        metavar="PX",
        help="every image's longer side in pixels (default: 192..320 at random); 1024 gives "
        "SAM-sized inputs for speed runs",
    )
    p.set_defaults(func=_cmd_make_data)


def _add_eval(sub: argparse._SubParsersAction) -> None:
    """Registers `eval`; the work is `samq_fx.eval.eval_command`."""

    def _positive_int(text: str) -> int:
        if not text.isdigit() or int(text) < 1:
            raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
        return int(text)

    p = sub.add_parser(
        "eval",
        help="score a SAM on a COCO-style dataset with box prompts (mIoU, mask AP)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Evaluate a SAM the way the quantization papers do. Each box prompt gives "
        "one mask (multimask_output=False); a mask is logits > 0 at the original image size.",
        epilog="""what the numbers mean (printed in percent, written to JSON as fractions):
  mIoU           mean intersection-over-union of SAM's mask with the true mask, over all
                 annotated instances, each prompted by its own ground-truth box
  mask AP        COCO mask AP@[.50:.95] (pycocotools COCOeval, segm, 100 detections per image):
                 each prompt box's mask is a detection scored detector score x SAM's predicted
                 IoU; without --prompts the ground-truth boxes are the detections (score 1)
  AP50 / AP75    the same AP at a single mask-IoU threshold of 0.50 / 0.75
  AP s / m / l   AP of small (< 32x32 px), medium, and large (> 96x96 px) objects
  n/a            undefined: no ground truth of that kind among the evaluated images

examples:
  samq-fx eval --model tiny --images data/synth/images --annotations data/synth/annotations.json
  samq-fx eval --model vit_b --checkpoint sam_vit_b_01ec64.pth --images val2017 \\
      --annotations instances_val2017.json --prompts dino_val2017.json --output metrics.json
  torchrun --nproc-per-node 8 -m samq_fx.cli eval ...   (images sharded over 8 processes;
      the numbers equal a 1-process run)""",
    )
    p.add_argument("--model", help="architecture: tiny, vit_b, vit_l or vit_h")
    p.add_argument(
        "--quantized",
        metavar="FILE",
        help="a model saved by `samq-fx quantize`; adds fidelity against its full-precision model",
    )
    p.add_argument(
        "--checkpoint",
        metavar="PATH",
        help="SAM state dict (e.g. sam_vit_b_01ec64.pth); default: the bundled weights for "
        "tiny, random weights for the others",
    )
    p.add_argument("--images", required=True, metavar="DIR", help="folder of the images")
    p.add_argument(
        "--annotations", required=True, metavar="JSON", help="COCO instances JSON (ground truth)"
    )
    p.add_argument(
        "--prompts",
        metavar="DETECTIONS_JSON",
        help="COCO detection results (image_id, bbox xywh, score, category_id) to prompt SAM "
        "for mask AP; default: the ground-truth boxes",
    )
    p.add_argument(
        "--max-images", type=_positive_int, metavar="N", help="evaluate the first N images only"
    )
    p.add_argument(
        "--batch-prompts",
        type=_positive_int,
        default=64,
        metavar="B",
        help="boxes per decoder call",
    )
    p.add_argument("--output", metavar="FILE", help="write the metrics as JSON to FILE")
    p.add_argument(
        "--device",
        help="torch device, e.g. cpu or cuda:0; default: cuda:LOCAL_RANK if any, else cpu",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress lines on stderr")
    p.add_argument(
        "--nproc",
        type=_positive_int,
        default=1,
        metavar="N",
        help="shard the images over N processes (one per GPU): runs this command under "
        "torchrun; the metrics equal a 1-process run",
    )

    def _cmd_eval(args: argparse.Namespace) -> int:
        from samq_fx.eval import eval_command

        if args.nproc > 1 and "LOCAL_RANK" not in os.environ:
            return _relaunch_under_torchrun(args.nproc)
        return eval_command(args)

    p.set_defaults(func=_cmd_eval)


def _add_bench(sub: argparse._SubParsersAction) -> None:
    """Registers `bench`: the speed benchmark of `samq_fx.speed`."""
    from samq_fx import speed

    p = sub.add_parser(
        "bench",
        help="speed of the encoder and decoder: float baselines vs lowered settings",
        description=speed.__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=speed.__doc__.split("\n\n", 1)[1],
    )
    speed.add_arguments(p)
    p.set_defaults(func=lambda args: speed.run(args, p))


def _relaunch_under_torchrun(nproc: int) -> int:
    """Run this same `samq-fx eval` command as `torchrun --nproc-per-node nproc -m samq_fx.cli`."""
    import subprocess

    argv, skip = [], False
    for arg in sys.argv[1:]:
        if skip:
            skip = False
        elif arg == "--nproc":
            skip = True
        elif not arg.startswith("--nproc="):
            argv.append(arg)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc-per-node={nproc}", "-m", "samq_fx.cli", *argv]  # fmt: skip
    print("samq-fx eval: running " + " ".join(cmd[1:]), file=sys.stderr)
    return subprocess.run(cmd, check=False).returncode


def _add_roles(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "roles",
        help="capture a SAM and print the role of every attention, MLP and convolution node",
        description="Capture the image encoder and mask decoder with torch.export and print "
        "the role table every later pass reads: per node, its part, block, attention kind "
        "(enc_window, enc_global, dec_self, token_to_image, image_to_token, "
        "final_token_to_image), role (qkv_proj, qk_matmul, attn_softmax, ...), module path, op "
        "and shape. Without --checkpoint only the structure is built (no weights), so even "
        "vit_h takes seconds.",
    )
    p.add_argument("--model", default="tiny", choices=["tiny", "vit_b", "vit_l", "vit_h"])
    p.add_argument("--checkpoint", help="official SAM checkpoint to load (optional)")
    p.add_argument("--json", metavar="FILE", help="also write the rows as JSON to FILE")

    def _cmd_roles(args: argparse.Namespace) -> int:
        import json
        from pathlib import Path

        import torch

        import samq_fx
        from samq_fx.models import ARCHS, sam_from_arch

        if args.checkpoint:
            sam = samq_fx.build_sam(args.model, args.checkpoint)
        else:
            with torch.device("meta"):
                sam = sam_from_arch(ARCHS[args.model])
        table = samq_fx.roles(samq_fx.capture(sam))
        print(table)
        if args.json:
            out = Path(args.json)
            if out.exists():
                parser_error(f"{out} exists; not overwriting it")
            out.write_text(json.dumps({"model": args.model, "rows": table.to_dicts()}, indent=1))
        return 0

    p.set_defaults(func=_cmd_roles)


def _add_quantize(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "quantize",
        help="quantize a SAM post-training and save it",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Capture a SAM, insert fake quantizers, calibrate them on a folder of "
        "images and save the quantized model (tensors, quantizer state and config; no pickled "
        "code). The saved file loads with samq_fx.load() and evaluates with "
        "`samq-fx eval --quantized FILE`.",
        epilog="""examples:
  samq-fx quantize --model tiny --calib-images data/calib/images \\
      --calib-annotations data/calib/annotations.json --method mse --w-bits 4 --a-bits 4 \\
      --output tiny_w4a4.samq
  samq-fx quantize --model vit_b --checkpoint sam_vit_b_01ec64.pth \\
      --calib-images coco/train2017 --calib-size 32 --method mse --w-bits 6 --a-bits 6 \\
      --output sam_b_w6a6.samq

Without --calib-annotations each image gets boxes the way SAM's automatic mask generator finds
objects (a point grid, the full-precision model's mask for each point, its box).""",
    )
    p.add_argument("--model", required=True, choices=["tiny", "vit_b", "vit_l", "vit_h"])
    p.add_argument("--checkpoint", metavar="PATH", help="official SAM state dict to quantize")
    p.add_argument("--calib-images", required=True, metavar="DIR", help="calibration images")
    p.add_argument(
        "--calib-annotations",
        metavar="JSON",
        help="COCO instances JSON for the calibration images: its boxes become the prompts",
    )
    p.add_argument("--calib-size", type=int, default=32, metavar="N", help="images used (32)")
    p.add_argument(
        "--method",
        default="mse",
        choices=["minmax", "percentile", "mse", "ptq4sam", "saq-sam", "car-sam", "samq"],
        help="range setting (minmax, percentile, mse) or a method: ptq4sam (BIG sign folding + "
        "AGQ log2 softmax quantizer + QDrop block reconstruction); saq-sam (ptq4sam's BIG + AGQ, "
        "PCC clipping of decoder q/k, prompt-aware stage reconstruction); car-sam (MAC "
        "matmul-aware weight compensation + JCAR joint cross-attention reconstruction, AGQ on "
        "the softmax; --no-agq: uniform softmax grid); samq "
        "(this project's recipe: BIG + AGQ + PCC + MAC + PAR reconstruction on SAQ-SAM's "
        "stages and whole decoder layers; every part has a --no- switch)",
    )
    p.add_argument(
        "--pcc",
        action="store_true",
        help="stack SAQ-SAM's perceptual-consistency clipping on any method",
    )
    p.add_argument(
        "--jcar",
        action="store_true",
        help="samq: CAR-SAM's decoder units (t2i + MLP + i2t) instead of whole two-way layers",
    )
    p.add_argument(
        "--recon-iters",
        type=int,
        metavar="N",
        help="reconstruction steps per unit (default: ptq4sam / car-sam 20000, saq-sam 2000, "
        "as the papers)",
    )
    for part, what in (
        ("big", "bimodal sign folding"),
        ("recon", "block reconstruction"),
        ("pcc", "perceptual-consistency clipping"),
        ("par", "prompt-aware reconstruction (plain MSE on its units)"),
        ("layer-skip", "PAR's layer skipping (stage outputs run the deeper FP blocks)"),
    ):
        p.add_argument(
            f"--no-{part}", action="store_true", help=f"ptq4sam / saq-sam / samq without {what}"
        )
    p.add_argument(
        "--no-agq",
        action="store_true",
        help="ptq4sam / saq-sam / car-sam / samq without the AGQ log2 softmax quantizer: a "
        "uniform per-tensor grid on the softmax (for car-sam, the paper's strict reading)",
    )
    for part, what in (
        ("mac", "matmul-aware compensation"),
        ("jcar", "joint cross-attention units (per-branch units instead)"),
    ):
        p.add_argument(f"--no-{part}", action="store_true", help=f"car-sam (samq) without {what}")
    p.add_argument("--w-bits", type=int, default=8, metavar="W", help="weight bits, 2..8")
    p.add_argument(
        "--a-bits",
        type=int,
        default=8,
        metavar="A",
        help="activation bits, 2..8; 16 = weights only",
    )
    p.add_argument(
        "--preset",
        metavar="NAME",
        help="a named config instead of --method and the bit widths, e.g. the deployment "
        "grids `samq_fx.lower` has kernels for: W8A8-int8, W8A8-int8-attn (plus the global "
        "attentions' q, k, v ranges: static float8 attention scales), W4A16-int4",
    )
    p.add_argument("--seed", type=int, default=0, help="seeds image choice and prompt sampling")
    p.add_argument("--output", required=True, metavar="FILE", help="where to write the model")
    p.add_argument("--force", action="store_true", help="overwrite an existing --output")
    p.add_argument("--device", default="cpu", help="torch device for calibration (cpu, cuda)")
    p.add_argument("--no-progress", action="store_true", help="no progress lines on stderr")
    p.set_defaults(func=_cmd_quantize)


def _calibration_loader(args: argparse.Namespace):
    """Samples for `quantize` from a folder (and optionally its COCO annotations)."""
    from pathlib import Path

    import numpy as np

    folder = Path(args.calib_images)
    if not folder.is_dir():
        parser_error(f"--calib-images folder {str(folder)!r} does not exist")
    if args.calib_annotations:
        from samq_fx.data import CocoDataset

        ds = CocoDataset(folder, args.calib_annotations)
        order = np.random.default_rng(args.seed).permutation(len(ds))[: args.calib_size]
        return [ds[int(i)] for i in sorted(order)]
    suffixes = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}
    files = sorted(f for f in folder.iterdir() if f.suffix.lower() in suffixes)
    if not files:
        parser_error(f"--calib-images folder {str(folder)!r} has no images ({sorted(suffixes)})")
    order = np.random.default_rng(args.seed).permutation(len(files))[: args.calib_size]
    return [{"image": files[i], "image_id": files[i].name} for i in sorted(order)]


def quant_config_from_args(args: argparse.Namespace):
    """The `QuantConfig` of `samq-fx quantize`'s arguments: the method's own parts unless a
    `--no-...` switch drops one (so `--method car-sam` keeps AGQ on its softmax,
    `CAR_SAM_AGQ`, and `--method samq --no-recon` is the recipe without reconstruction)."""
    import dataclasses

    from samq_fx.config import CalibConfig, QuantConfig

    calib = CalibConfig(num_images=args.calib_size, seed=args.seed)
    if args.preset:
        defaults = {"method": "mse", "w_bits": 8, "a_bits": 8, "recon_iters": None}
        changed = [k for k, v in defaults.items() if getattr(args, k) != v]
        changed += [k for k, v in vars(args).items() if k.startswith("no_") and k != "no_progress"
                    and v] + [k for k in ("pcc", "jcar") if getattr(args, k)]  # fmt: skip
        if changed:
            raise ValueError(
                f"--preset {args.preset} sets the whole config; drop "
                + ", ".join("--" + k.replace("_", "-") for k in changed)
            )
        return QuantConfig.preset(args.preset, calib=calib)
    cfg = QuantConfig.for_method(
        args.method,
        args.w_bits,
        None if args.a_bits == 16 else args.a_bits,
        bimodal=not args.no_big,
        agq=False if args.no_agq else None,
        recon=False if args.no_recon else None,
        recon_iters=args.recon_iters,
        pcc=False if args.no_pcc else (True if args.pcc else None),
        par=False if args.no_par else None,
        mac=False if args.no_mac else None,
        jcar=False if args.no_jcar else (True if args.jcar else None),
        calib=calib,
    )
    if args.no_layer_skip and cfg.par is not None:
        cfg = dataclasses.replace(cfg, par=dataclasses.replace(cfg.par, layer_skip=False))
    return cfg


def _cmd_quantize(args: argparse.Namespace) -> int:
    from pathlib import Path

    import samq_fx

    out = Path(args.output)
    if out.exists() and not args.force:
        parser_error(f"{out} exists; pass --force to overwrite it")
    try:
        cfg = quant_config_from_args(args)
        loader = _calibration_loader(args)
        sam = samq_fx.build_sam(args.model, args.checkpoint).to(args.device)
        q = samq_fx.quantize(sam, loader, cfg, progress=not args.no_progress)
    except (ValueError, OSError) as err:
        parser_error(str(err))
    q.samq_source = {"model": args.model, "checkpoint": args.checkpoint}
    samq_fx.save(q, out, overwrite=args.force)
    print(samq_fx.summary(q))
    cal = q.samq_calibration
    print(
        f"calibrated on {len(cal['image_ids'])} images ({cal['num_prompts']} prompts) in "
        f"{cal['seconds']:.1f} s; saved to {out}"
    )
    return 0


def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="full precision vs W8A8 / W6A6 / W4A4 on the bundled tiny SAM, as one table",
        description="Generate a validation set of synthetic scenes, quantize the bundled tiny "
        "SAM with every method at W8A8, W6A6 and W4A4, and print mIoU, mask AP, fidelity "
        "against full precision and quantization time. A few minutes on 2 CPU cores. ptq4sam "
        "runs without its block reconstruction unless --recon-iters is given.",
    )
    p.add_argument(
        "--recon-iters", type=int, metavar="N", help="add ptq4sam's reconstruction, N steps a unit"
    )
    p.add_argument("--num-val", type=int, default=16, metavar="N", help="validation images")
    p.add_argument("--num-calib", type=int, default=8, metavar="N", help="calibration images")
    p.add_argument("--data", metavar="DIR", help="keep the generated validation set here")
    p.add_argument("--json", metavar="FILE", help="also write the table as JSON")
    p.add_argument("--progress", action="store_true", help="progress lines on stderr")

    def _cmd_demo(args: argparse.Namespace) -> int:
        from samq_fx.demo import demo_command

        return demo_command(args)

    p.set_defaults(func=_cmd_demo)


def parser_error(message: str) -> None:
    """Exit with status 2 and one line on stderr, as argparse does for bad flags."""
    print(f"samq-fx: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="samq-fx",
        description="Post-training quantization of Segment Anything models (PTQ4SAM, SAQ-SAM, "
        "CAR-SAM) as FX graph passes.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_make_data(sub)
    _add_bench(sub)
    _add_eval(sub)
    _add_roles(sub)
    _add_quantize(sub)
    _add_demo(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
