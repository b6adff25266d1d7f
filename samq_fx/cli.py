"""The `samq-fx` command. One sub-command per job; each `_cmd_*` parses nothing itself."""

from __future__ import annotations

import argparse
import sys


def _add_make_data(sub: argparse._SubParsersAction) -> None:
    """Registers `make-data`: write a synthetic COCO dataset of shape scenes."""

    def _positive_int(text: str) -> int:
        if not text.isdigit() or int(text) < 1:
            raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
        return int(text)

    def _cmd_make_data(args: argparse.Namespace) -> int:
        from samq_fx.data import DataError, make_dataset

        try:
            path = make_dataset(args.out, args.num_images, args.seed, overwrite=args.force)
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
    p.add_argument("--model", required=True, help="architecture: tiny, vit_b, vit_l or vit_h")
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

    def _cmd_eval(args: argparse.Namespace) -> int:
        from samq_fx.eval import eval_command

        return eval_command(args)

    p.set_defaults(func=_cmd_eval)


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
    _add_eval(sub)
    _add_roles(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
