"""Train the tiny SAM on generated scenes, the way SAM was trained; write the shipped weights.

Scenes come from `samq_fx.data.generate_scene`, made on the fly by DataLoader workers (no files,
no pycocotools). Each image gets `--masks-per-image` prompts, half starting from a jittered GT
box, half from one positive point; then `--rounds - 1` correction rounds add a point sampled
from the error region (positive on a miss, negative on a false hit) and feed the previous
low-res logits back as the mask prompt. Loss (SAM's): 20 x focal + dice on the mask, the best of
the three multimask outputs for the ambiguous single point and the single output otherwise,
plus MSE of the IoU head against the true IoU of every output.

Losses are computed on the decoder's low-res logits (128x128 for the tiny SAM: 4x its 32x32
embedding), against the GT resized with the image to the 256 frame and average-pooled 2x2, i.e.
the fraction of each logit cell inside the mask. Soft targets keep the sub-cell boundary that
the evaluation's bilinear upsampling recovers, at a quarter of the memory of a loss on logits
upsampled to 256.

The held-out score is the evaluation protocol: GT box prompts, `multimask_output=False`, masks =
logits > 0 at the original image size, mean IoU over instances, on scenes of seed
`--seed + HELDOUT_SEED_OFFSET` (never trained on), with the weights as saved (float16).

    pip install --no-deps --no-build-isolation -e .   # samq_fx.passes is a mapped package
    python3 bench/train_tiny_sam.py --minutes 8 --batch-size 128 --workers 15 --log run.json

On one H100 that runs ~505 images/s (~3.9 steps/s; data-wait 0%, so the GPU side limits) and
reached a held-out mIoU of 0.824 in 8 minutes (1857 steps). A second run with `--init` on those weights
and another `--seed` continues the training.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from segment_anything.modeling import MaskDecoder, Sam
from segment_anything.utils.transforms import ResizeLongestSide
from torch.utils.data import DataLoader, Dataset

if __package__ is None and "samq_fx" not in sys.modules:  # run as a script from a checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from samq_fx.data import SceneConfig, generate_scene, mask_box  # noqa: E402
from samq_fx.models import ARCHS, TINY_WEIGHTS, build_sam  # noqa: E402

HELDOUT_SEED_OFFSET = 1_000_000
IMG = ARCHS["tiny"].img_size  # 256: the padded input frame
QUALITY_TARGET = 0.85


# --- data (runs in DataLoader workers) ---------------------------------------------------------


class TrainScenes(Dataset):
    """Item i: scene (seed, i) resized into the 256 frame, with `k` prompted objects."""

    def __init__(self, seed: int, cfg: SceneConfig, k: int, length: int):
        self.seed, self.cfg, self.k, self.length = seed, cfg, k, length
        self.resize = ResizeLongestSide(IMG)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> dict:
        scene = generate_scene(self.seed, i, self.cfg)
        h, w = scene.image.shape[:2]
        nh, nw = self.resize.get_preprocess_shape(h, w, IMG)
        image = np.zeros((IMG, IMG, 3), np.uint8)
        image[:nh, :nw] = self.resize.apply_image(scene.image)
        n = len(scene.masks)
        masks = np.zeros((self.k, IMG, IMG), bool)
        boxes = np.zeros((self.k, 4), np.float32)
        valid = np.zeros(self.k, np.float32)
        if n:
            rng = np.random.default_rng([self.seed, i, 1])
            pick = rng.permutation(n)[: self.k]
            pick = np.concatenate([pick, rng.integers(0, n, self.k - len(pick))])
            for j, o in enumerate(pick):
                m = Image.fromarray(scene.masks[o].astype(np.uint8) * 255)
                masks[j, :nh, :nw] = np.asarray(m.resize((nw, nh), Image.BILINEAR)) >= 128
                boxes[j] = self.resize.apply_boxes(np.array(mask_box(scene.masks[o])), (h, w))
                valid[j] = float(masks[j].any())
        return {
            "image": image,
            "masks": masks,
            "boxes": boxes,
            "valid": valid,
            "size": np.array([nh, nw]),
        }


class HeldOutScenes(Dataset):
    def __init__(self, seed: int, cfg: SceneConfig, n: int):
        self.seed, self.cfg, self.n = seed, cfg, n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        return generate_scene(self.seed, i, self.cfg)


def _as_list(batch):
    return batch


def _one_thread(_worker_id: int) -> None:
    torch.set_num_threads(1)


# --- model pieces ------------------------------------------------------------------------------


def decode(dec: MaskDecoder, src, image_pe, sparse, dense):
    """`MaskDecoder.predict_masks` with one image embedding per prompt (`src` is (N, C, h, w)).

    Upstream repeats ONE image's embedding for all prompts; training needs prompts from many
    images in one call. Returns all 4 outputs: 0 is the single-mask output, 1-3 the multimask
    ones. `check_decode` proves this equals upstream on every run.
    """
    tokens = torch.cat([dec.iou_token.weight, dec.mask_tokens.weight], 0)
    tokens = torch.cat([tokens.unsqueeze(0).expand(len(sparse), -1, -1), sparse], 1)
    b, c, h, w = src.shape
    hs, out = dec.transformer(src + dense, image_pe.expand(b, -1, -1, -1), tokens)
    up = dec.output_upscaling(out.transpose(1, 2).reshape(b, c, h, w))
    hyper = torch.stack(
        [mlp(hs[:, 1 + i]) for i, mlp in enumerate(dec.output_hypernetworks_mlps)], 1
    )
    masks = (hyper @ up.flatten(2)).view(b, -1, *up.shape[2:])
    return masks, dec.iou_prediction_head(hs[:, 0])


@torch.no_grad()
def check_decode(sam: Sam, device: torch.device) -> None:
    emb = torch.randn(1, sam.prompt_encoder.embed_dim, *sam.prompt_encoder.image_embedding_size)
    emb = emb.to(device)
    boxes = torch.tensor([[10.0, 20, 120, 90], [50, 60, 200, 250]], device=device)
    sparse, dense = sam.prompt_encoder(points=None, boxes=boxes, masks=None)
    pe = sam.prompt_encoder.get_dense_pe()
    masks, iou = decode(sam.mask_decoder, emb.expand(2, -1, -1, -1), pe, sparse, dense)
    for multi, keep in ((False, slice(0, 1)), (True, slice(1, None))):
        ref = sam.mask_decoder(emb, pe, sparse, dense, multi)
        for a, b in zip(ref, (masks[:, keep], iou[:, keep])):
            if not torch.allclose(a, b, atol=1e-4, rtol=1e-4):
                raise RuntimeError(
                    f"batched decode differs from segment_anything's MaskDecoder by "
                    f"{(a - b).abs().max():.2e}; has MaskDecoder.predict_masks changed?"
                )


def normalise(sam: Sam, images: torch.Tensor, sizes: torch.Tensor) -> torch.Tensor:
    """`Sam.preprocess` for a batch already padded to 256: normalise, then zero the padding."""
    x = (images.permute(0, 3, 1, 2).float() - sam.pixel_mean) / sam.pixel_std
    rows = torch.arange(IMG, device=x.device)
    inside = (rows[None, :, None] < sizes[:, 0, None, None]) & (
        rows[None, None, :] < sizes[:, 1, None, None]
    )
    return x * inside[:, None]


def sample_points(region: torch.Tensor) -> torch.Tensor:
    """One pixel (x, y) per mask, uniform over `region` (anywhere if the region is empty)."""
    weights = region.flatten(1).float() + 1e-9
    idx = torch.multinomial(weights, 1)[:, 0]
    return torch.stack([idx % region.shape[-1], idx // region.shape[-1]], 1).float()


def jitter(boxes: torch.Tensor, max_px: float) -> torch.Tensor:
    """SAM's box noise: std 10% of the side, at most `max_px` (20 px at 1024 = 5 px at 256)."""
    side = (boxes[:, 2:] - boxes[:, :2]).repeat(1, 2)
    noise = (torch.randn_like(boxes) * 0.1 * side).clamp(-max_px, max_px)
    noise = noise * (torch.rand(len(boxes), 1, device=boxes.device) < 0.8)  # some stay exact
    out = (boxes + noise).clamp(0, IMG)
    return torch.cat([out[:, :2], torch.maximum(out[:, 2:], out[:, :2] + 1)], 1)


def mask_losses(logits: torch.Tensor, gt: torch.Tensor):
    """Per (prompt, output): focal, dice and the true IoU. logits (N, M, h, w); gt (N, h, w) is
    the fraction of each logit cell inside the mask."""
    g = gt[:, None].expand_as(logits)
    p = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, g, reduction="none")
    p_t = p * g + (1 - p) * (1 - g)
    focal = ((0.25 * g + 0.75 * (1 - g)) * ce * (1 - p_t) ** 2).mean((2, 3))
    dice = 1 - (2 * (p * g).sum((2, 3)) + 1) / (p.sum((2, 3)) + g.sum((2, 3)) + 1)
    with torch.no_grad():
        hard = logits > 0
        inter = (hard & (g >= 0.5)).sum((2, 3)).float()
        union = (hard | (g >= 0.5)).sum((2, 3)).float()
        iou = inter / union.clamp(min=1)
    return focal, dice, iou


def train_step(sam: Sam, batch: dict, args, device: torch.device, amp) -> dict:
    """One step's losses (mean per prompt and round); no host sync, so the GPU runs ahead.

    Box-started and point-started prompts carry the same number of sparse tokens in every
    round (2 box corners + r points; r + 1 points + the padding point), so each round is ONE
    decoder call over all prompts of the batch: the step is bound by kernel launches.
    """
    images = batch["image"].to(device, non_blocking=True)
    sizes = batch["size"].to(device, non_blocking=True)
    masks = batch["masks"].to(device, non_blocking=True)  # (B, K, 256, 256) bool
    boxes = batch["boxes"].to(device, non_blocking=True)
    valid = batch["valid"].to(device, non_blocking=True)
    b, k = masks.shape[:2]
    kb = max(1, k // 2) if k > 1 else 1  # prompts 0..kb-1 of each image start from a box
    nb = b * kb  # box-started rows come first, then point-started ones
    gt = torch.cat([masks[:, :kb].flatten(0, 1), masks[:, kb:].flatten(0, 1)])
    w = torch.cat([valid[:, :kb].flatten(), valid[:, kb:].flatten()])
    image_of = torch.arange(b, device=device)
    image_of = torch.cat([image_of.repeat_interleave(kb), image_of.repeat_interleave(k - kb)])
    with amp():
        src = sam.image_encoder(normalise(sam, images, sizes))[image_of]
    pe = sam.prompt_encoder.get_dense_pe()
    gt_low = F.avg_pool2d(gt[:, None].float(), 2)[:, 0]  # soft target on the logit grid
    box = jitter(boxes[:, :kb].flatten(0, 1), args.box_noise_px)
    points = sample_points(gt)[:, None]
    labels = torch.ones(points.shape[:2], device=device)
    mask_in = None
    rows = torch.arange(len(gt), device=device)
    # outputs each row may use: first round, box -> 0 and the ambiguous point -> best of 1-3;
    # later rounds (several prompts, no ambiguity) -> 0
    first = torch.zeros(len(gt), 4, dtype=torch.bool, device=device)
    first[:nb, 0], first[nb:, 1:] = True, True
    later = torch.zeros_like(first)
    later[:, 0] = True
    totals = {"focal": 0.0, "dice": 0.0, "iou_mse": 0.0}
    for r in range(args.rounds):
        allowed = first if r == 0 else later
        parts = []
        # box rows take the correction points only (column 0 is the point rows' first click)
        for part, has_box in ((slice(0, nb), True), (slice(nb, len(gt)), False)):
            first_col = 1 if has_box else 0
            if part.stop > part.start:
                parts.append(
                    sam.prompt_encoder(
                        points=None
                        if has_box and r == 0
                        else (points[part, first_col:], labels[part, first_col:]),
                        boxes=box if has_box else None,
                        masks=None if mask_in is None else mask_in[part],
                    )
                )
        with amp():
            sparse = torch.cat([p[0] for p in parts])
            dense = torch.cat([p[1] for p in parts])
            low, iou_pred = decode(sam.mask_decoder, src, pe, sparse, dense)
        low = low.float()
        focal, dice, iou = mask_losses(low, gt_low)
        best = (20 * focal + dice).masked_fill(~allowed, float("inf")).argmin(1)
        totals["focal"] = totals["focal"] + (focal[rows, best] * w).sum()
        totals["dice"] = totals["dice"] + (dice[rows, best] * w).sum()
        iou_mse = ((iou_pred.float() - iou) ** 2 * allowed).sum(1) / allowed.sum(1)
        totals["iou_mse"] = totals["iou_mse"] + (iou_mse * w).sum()
        if r + 1 < args.rounds:  # next round: a correction point and the mask prompt
            with torch.no_grad():
                mask_in = low[rows, best][:, None]
                error = (mask_in[:, 0] > 0) ^ (gt_low >= 0.5)
                cell = sample_points(error)  # on the logit grid: pick a pixel inside the cell
                xy = cell * 2 + torch.randint_like(cell, 0, 2)
                label = gt[rows, xy[:, 1].long(), xy[:, 0].long()].float()
                points = torch.cat([points, xy[:, None]], 1)
                labels = torch.cat([labels, label[:, None]], 1)
    weight = w.sum().clamp(min=1) * args.rounds
    losses = {name: v / weight for name, v in totals.items()}
    losses["loss"] = 20 * losses["focal"] + losses["dice"] + losses["iou_mse"]
    return losses


# --- held-out evaluation -----------------------------------------------------------------------


@torch.no_grad()
def heldout_miou(sam: Sam, scenes: list, device: torch.device) -> float:
    """Mean instance IoU with GT box prompts, single-mask output, at the original image size."""
    resize = ResizeLongestSide(IMG)
    pe = sam.prompt_encoder.get_dense_pe()
    ious: list[torch.Tensor] = []
    for scene in scenes:
        if not scene.masks:
            continue
        image = torch.as_tensor(resize.apply_image(scene.image), device=device)
        x = sam.preprocess(image.permute(2, 0, 1)[None].float())
        emb = sam.image_encoder(x)
        original = scene.image.shape[:2]
        boxes = torch.as_tensor(resize.apply_boxes(scene.boxes(), original), device=device)
        sparse, dense = sam.prompt_encoder(points=None, boxes=boxes.float(), masks=None)
        low, _ = sam.mask_decoder(emb, pe, sparse, dense, multimask_output=False)
        pred = sam.postprocess_masks(low, tuple(image.shape[:2]), original)[:, 0] > 0
        gt = torch.as_tensor(np.stack(scene.masks), device=device)
        inter = (pred & gt).sum((1, 2)).float()
        union = (pred | gt).sum((1, 2)).float()
        ious.append(inter / union.clamp(min=1))
    return float(torch.cat(ious).mean()) if ious else float("nan")


# --- driver ------------------------------------------------------------------------------------


def lr_at(step: int, progress: float, args) -> float:
    """Linear warm-up over `--warmup` steps, then cosine to 2% by the end (steps or minutes)."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    return args.lr * (0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


def save_weights(sam: Sam, path: Path) -> None:
    """Parameters in float16 (small file); buffers (pixel mean/std, PE matrix) stay exact."""
    params = {name for name, _ in sam.named_parameters()}
    state = {
        k: v.detach().cpu().to(torch.float16 if k in params else v.dtype)
        for k, v in sam.state_dict().items()
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(state, tmp)
    tmp.replace(path)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=100_000, help="at most this many steps")
    p.add_argument("--minutes", type=float, help="stop training after this many minutes")
    p.add_argument("--batch-size", type=int, default=128, help="images per step")
    p.add_argument("--masks-per-image", type=int, default=4)
    p.add_argument("--rounds", type=int, default=3, help="1 + correction-point rounds")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--warmup", type=int, default=200, help="warm-up steps")
    p.add_argument("--box-noise-px", type=float, default=5.0)
    p.add_argument(
        "--precision",
        choices=["tf32", "bf16"],
        default="tf32",
        help="tf32: fp32 with TF32 matmuls; bf16: bf16 autocast, slower for this tiny model "
        "(its casts add kernel launches to a launch-bound step)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 1))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", type=Path, default=TINY_WEIGHTS, help="weights file to write")
    p.add_argument("--init", type=Path, help="start from these weights (continue an earlier run)")
    p.add_argument("--log", type=Path, help="JSON log: command, config, curves, held-out mIoU")
    p.add_argument("--log-every", type=int, default=25)
    p.add_argument("--eval-every", type=int, default=1500, help="held-out mIoU every N steps")
    p.add_argument("--eval-images", type=int, default=300)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    cfg = SceneConfig()
    sam = build_sam("tiny", checkpoint=args.init, pretrained=False).to(device)
    check_decode(sam, device)
    sam.train()

    def amp():
        on = device.type == "cuda" and args.precision == "bf16"
        return torch.autocast("cuda", torch.bfloat16, enabled=on)

    decay = [
        m.weight
        for m in sam.modules()
        if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d, torch.nn.ConvTranspose2d))
    ]
    decay_ids = {id(p) for p in decay}
    rest = [p for p in sam.parameters() if id(p) not in decay_ids]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": rest, "weight_decay": 0}],
        lr=args.lr,
        betas=(0.9, 0.999),
    )
    common = {"num_workers": args.workers, "worker_init_fn": _one_thread}
    heldout_seed = args.seed + HELDOUT_SEED_OFFSET
    heldout = [
        s
        for chunk in DataLoader(
            HeldOutScenes(heldout_seed, cfg, args.eval_images),
            batch_size=16,
            collate_fn=_as_list,
            **common,
        )
        for s in chunk
    ]
    loader = DataLoader(
        TrainScenes(args.seed, cfg, args.masks_per_image, args.steps * args.batch_size),
        batch_size=args.batch_size,
        drop_last=True,
        pin_memory=device.type == "cuda",
        prefetch_factor=4 if args.workers else None,
        persistent_workers=args.workers > 0,
        **common,
    )
    log = {
        "command": [sys.executable, *sys.argv],
        "seed": args.seed,
        "heldout_seed": heldout_seed,
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "scene_config": dataclasses.asdict(cfg),
        "arch": ARCHS["tiny"].to_dict(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "python": platform.python_version(),
        "curve": [],
        "heldout": [],
    }
    budget = args.minutes * 60 if args.minutes else float("inf")
    print(
        f"training tiny SAM on {device} ({log['device']}): batch {args.batch_size}, "
        f"{args.masks_per_image} prompts/image, {args.rounds} rounds, {args.precision}, "
        f"{args.workers} workers, "
        f"up to {args.steps} steps / {budget / 60:.1f} min",
        flush=True,
    )
    start = time.perf_counter()
    window_start, window_wait, window_imgs = start, 0.0, 0
    sums: dict[str, torch.Tensor] = {}  # summed on the device: no sync until a log line
    step = 0
    fetch_start = time.perf_counter()
    for batch in loader:
        window_wait += time.perf_counter() - fetch_start
        elapsed = time.perf_counter() - start
        if step >= args.steps or elapsed >= budget:
            break
        lr = lr_at(step, max(step / args.steps, elapsed / budget), args)
        for group in opt.param_groups:
            group["lr"] = lr
        losses = train_step(sam, batch, args, device, amp)
        opt.zero_grad(set_to_none=True)
        losses["loss"].backward()
        torch.nn.utils.clip_grad_norm_(sam.parameters(), 1.0)
        opt.step()
        for name, v in losses.items():
            sums[name] = sums.get(name, 0.0) + v.detach()
        window_imgs += args.batch_size
        step += 1
        if step % args.log_every == 0:
            row = {name: float(v) / args.log_every for name, v in sums.items()}
            now = time.perf_counter()
            row.update(
                step=step,
                lr=lr,
                images_per_s=window_imgs / (now - window_start),
                data_wait=window_wait / (now - window_start),
                elapsed_s=now - start,
            )
            log["curve"].append(row)
            print(
                f"step {step} loss {row['loss']:.4f} (focal {row['focal']:.4f} dice "
                f"{row['dice']:.4f} iou {row['iou_mse']:.4f}) lr {lr:.2e} "
                f"{row['images_per_s']:.0f} img/s data-wait {row['data_wait']:.0%} "
                f"{row['elapsed_s']:.0f}s",
                flush=True,
            )
            sums, window_start, window_wait, window_imgs = {}, now, 0.0, 0
        if step % args.eval_every == 0:
            sam.eval()
            miou = heldout_miou(sam, heldout, device)
            sam.train()
            log["heldout"].append({"step": step, "miou": miou})
            print(f"step {step} held-out mIoU {miou:.4f}", flush=True)
        fetch_start = time.perf_counter()
    train_s = time.perf_counter() - start

    save_weights(sam, args.out)
    final = build_sam("tiny", checkpoint=args.out).to(device)  # the weights as shipped
    miou = heldout_miou(final, heldout, device)
    n_inst = sum(len(s.masks) for s in heldout)
    log["final"] = {
        "steps": step,
        "train_seconds": train_s,
        "heldout_miou": miou,
        "heldout_images": len(heldout),
        "heldout_instances": n_inst,
        "target": QUALITY_TARGET,
        "target_met": miou >= QUALITY_TARGET,
        "weights": str(args.out),
        "weights_bytes": args.out.stat().st_size,
    }
    verdict = "meets" if miou >= QUALITY_TARGET else "is BELOW"
    print(
        f"done: {step} steps in {train_s / 60:.1f} min; wrote {args.out} "
        f"({args.out.stat().st_size / 1e6:.1f} MB); held-out mIoU {miou:.4f} on {n_inst} "
        f"instances of {len(heldout)} images (seed {heldout_seed}) {verdict} the "
        f"{QUALITY_TARGET} target",
        flush=True,
    )
    if args.log:
        args.log.parent.mkdir(parents=True, exist_ok=True)
        args.log.write_text(json.dumps(log, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
