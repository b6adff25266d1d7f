"""Calibration data: validate what the user gave, turn it into model inputs, run it.

A `calib_loader` is any iterable of samples. A sample is
  * a dict with "image" (H x W x 3 uint8 RGB array, or a path) and optional prompts:
    "boxes" (N x 4, xyxy in image pixels), "points" (N x K x 2, pixels) with "point_labels"
    (N x K, 1 foreground / 0 background);
  * an object with `.image` and `.boxes` (a `samq_fx.data.Sample`);
  * a bare image array or path (no prompts).

Everything is validated before any model runs, so a bad box in image 31 fails in a second, not
after 30 images of work. Samples without prompts get boxes the way SAM's automatic mask generator
finds objects: a grid of points, the full-precision model's best mask for each, that mask's box.

`prepare_calibration` returns `CalibItem`s (the preprocessed image and transformed prompts),
which `run_calibration` feeds through a model, and which block reconstruction later reuses.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from segment_anything.modeling import Sam
from segment_anything.utils.transforms import ResizeLongestSide

from samq_fx.config import CalibConfig
from samq_fx.progress import Progress


class CalibrationError(ValueError):
    """Calibration input that cannot be used; the message names the sample and the problem."""


@dataclass
class RawSample:
    """A validated sample: an RGB uint8 image and prompts in image pixels."""

    image_id: str
    image: np.ndarray
    boxes: np.ndarray | None = None
    points: np.ndarray | None = None
    point_labels: np.ndarray | None = None


@dataclass
class CalibItem:
    """One calibration image as the model consumes it."""

    image_id: str
    image: torch.Tensor  # (1, 3, S, S): normalised and padded by `Sam.preprocess`
    input_size: tuple[int, int]
    original_size: tuple[int, int]
    boxes: torch.Tensor | None  # (N, 4) in the model's input frame
    points: torch.Tensor | None  # (N, K, 2) in the model's input frame
    point_labels: torch.Tensor | None  # (N, K)

    @property
    def num_prompts(self) -> int:
        for t in (self.boxes, self.points):
            if t is not None:
                return int(t.shape[0])
        return 0


def _load_image(image: Any, where: str) -> np.ndarray:
    if isinstance(image, (str, Path)):
        path = Path(image)
        if not path.is_file():
            raise CalibrationError(f"{where}: image file {str(path)!r} does not exist")
        try:
            with Image.open(path) as im:
                return np.asarray(im.convert("RGB"))
        except OSError as err:
            raise CalibrationError(f"{where}: cannot read image {str(path)!r}: {err}") from err
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu().numpy()
    if not isinstance(image, np.ndarray):
        raise CalibrationError(
            f"{where}: image must be an array or a path, not {type(image).__name__}"
        )
    if image.ndim != 3 or image.shape[2] != 3:
        raise CalibrationError(
            f"{where}: image must be H x W x 3 (RGB), got shape {tuple(image.shape)}"
        )
    if image.dtype != np.uint8:
        raise CalibrationError(f"{where}: image must be uint8 (0..255), got dtype {image.dtype}")
    if min(image.shape[:2]) < 2:
        raise CalibrationError(f"{where}: image is too small ({image.shape[0]}x{image.shape[1]})")
    return image


def _check_boxes(boxes: Any, h: int, w: int, where: str) -> np.ndarray:
    boxes = np.asarray(boxes, dtype=np.float64)
    if boxes.ndim == 1 and boxes.shape[0] == 4:
        boxes = boxes[None]
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise CalibrationError(f"{where}: boxes must be N x 4 (x0, y0, x1, y1), got {boxes.shape}")
    for i, (x0, y0, x1, y1) in enumerate(boxes):
        if not np.isfinite([x0, y0, x1, y1]).all():
            raise CalibrationError(f"{where}: box {i} {boxes[i].tolist()} is not finite")
        if x1 <= x0 or y1 <= y0:
            raise CalibrationError(
                f"{where}: box {i} {boxes[i].tolist()} has zero or negative area (need x1 > x0, y1 > y0)"
            )
        if x0 < 0 or y0 < 0 or x1 > w or y1 > h:
            raise CalibrationError(
                f"{where}: box {i} {boxes[i].tolist()} lies outside the {w}x{h} image"
            )
    return boxes.astype(np.float32)


def _check_points(points: Any, labels: Any, h: int, w: int, where: str):
    points = np.asarray(points, dtype=np.float32)
    if points.ndim == 2:
        points = points[None]
    if points.ndim != 3 or points.shape[2] != 2:
        raise CalibrationError(f"{where}: points must be N x K x 2, got {points.shape}")
    if labels is None:
        raise CalibrationError(f"{where}: points need point_labels (1 foreground, 0 background)")
    labels = np.asarray(labels).reshape(points.shape[:2])
    outside = (
        (points[..., 0] < 0) | (points[..., 0] > w) | (points[..., 1] < 0) | (points[..., 1] > h)
    )
    if outside.any():
        raise CalibrationError(
            f"{where}: {int(outside.sum())} points lie outside the {w}x{h} image"
        )
    return points, labels.astype(np.int64)


def validate_sample(sample: Any, index: int) -> RawSample:
    """Normalise one loader sample, or raise `CalibrationError` naming it."""
    where = f"calibration sample {index}"
    if isinstance(sample, dict):
        if "image" not in sample:
            raise CalibrationError(
                f"{where}: dict sample has no 'image' key (keys: {sorted(sample)})"
            )
        image, boxes = sample["image"], sample.get("boxes")
        points, labels = sample.get("points"), sample.get("point_labels")
        image_id = str(sample.get("image_id", index))
    elif hasattr(sample, "image"):
        image, boxes, points, labels = sample.image, getattr(sample, "boxes", None), None, None
        image_id = str(getattr(sample, "image_id", index))
    else:
        image, boxes, points, labels, image_id = sample, None, None, None, str(index)
    image = _load_image(image, where)
    h, w = image.shape[:2]
    if boxes is not None and len(np.asarray(boxes)) == 0:
        boxes = None
    if boxes is not None:
        boxes = _check_boxes(boxes, h, w, where)
    if points is not None:
        points, labels = _check_points(points, labels, h, w, where)
        if boxes is not None and len(points) != len(boxes):
            raise CalibrationError(f"{where}: {len(boxes)} boxes but {len(points)} point sets")
    return RawSample(image_id, image, boxes, points, labels)


def validate_loader(loader: Iterable, cfg: CalibConfig) -> list[RawSample]:
    """Check (and load) up to `cfg.num_images` samples; error on an empty set."""
    if loader is None:
        raise CalibrationError("empty calibration set: calib_loader is None")
    samples = []
    for i, sample in enumerate(loader):
        if i >= cfg.num_images:
            break
        samples.append(validate_sample(sample, i))
    if not samples:
        raise CalibrationError("empty calibration set: the calib_loader yielded no samples")
    return samples


def _device(model: Sam) -> torch.device:
    return model.pixel_mean.device


def preprocess_image(model: Sam, image: np.ndarray):
    """SamPredictor.set_image's preprocessing: (x (1,3,S,S), input_size, original_size, transform)."""
    transform = ResizeLongestSide(model.image_encoder.img_size)
    if model.image_format != "RGB":
        image = image[..., ::-1]
    resized = transform.apply_image(image)
    x = torch.as_tensor(resized, device=_device(model)).permute(2, 0, 1).contiguous()[None]
    input_size = tuple(x.shape[-2:])
    return model.preprocess(x.float()), input_size, tuple(image.shape[:2]), transform


@torch.no_grad()
def _amg_boxes(
    model: Sam, x: torch.Tensor, input_size, raw: RawSample, cfg: CalibConfig, transform
) -> np.ndarray:
    """Boxes of the FP model's best mask at each point of a grid (SAM's AMG, without the NMS)."""
    h, w = raw.image.shape[:2]
    n = cfg.points_per_side
    offs = (np.arange(n) + 0.5) / n
    grid = np.stack(np.meshgrid(offs * w, offs * h), -1).reshape(-1, 1, 2).astype(np.float32)
    emb = model.image_encoder(x)
    pts = torch.as_tensor(transform.apply_coords(grid, (h, w)), device=x.device)
    labels = torch.ones(pts.shape[:2], dtype=torch.int, device=x.device)
    sparse, dense = model.prompt_encoder(points=(pts, labels), boxes=None, masks=None)
    low_res, iou = model.mask_decoder(
        image_embeddings=emb,
        image_pe=model.prompt_encoder.get_dense_pe(),
        sparse_prompt_embeddings=sparse,
        dense_prompt_embeddings=dense,
        multimask_output=True,
    )
    best = iou.argmax(1)
    masks = model.postprocess_masks(low_res, input_size, (h, w))
    masks = masks[torch.arange(len(best)), best] > model.mask_threshold
    boxes = []
    for m in masks.cpu().numpy():
        ys, xs = np.nonzero(m)
        if len(xs) >= 16:  # ignore specks, as AMG's min area would
            boxes.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
    if not boxes:  # nothing found: the whole image is one prompt
        boxes.append([0, 0, w, h])
    return np.unique(np.asarray(boxes, dtype=np.float32), axis=0)


def prepare_calibration(
    model: Sam, raws: list[RawSample], cfg: CalibConfig, progress: bool = True
) -> list[CalibItem]:
    """Preprocess every validated sample (`validate_loader`) and pick its prompts (seeded)."""
    rng = np.random.default_rng(cfg.seed)
    items = []
    bar = Progress(len(raws), progress, "preparing calibration")
    for i, raw in enumerate(raws):
        x, input_size, original_size, transform = preprocess_image(model, raw.image)
        boxes, points, labels = raw.boxes, raw.points, raw.point_labels
        if boxes is None and points is None:
            boxes = _amg_boxes(model, x, input_size, raw, cfg, transform)
        n = len(boxes) if boxes is not None else len(points)
        keep = (
            np.sort(rng.choice(n, cfg.max_prompts_per_image, replace=False))
            if n > cfg.max_prompts_per_image
            else np.arange(n)
        )
        dev = x.device
        tb = tp = tl = None
        if boxes is not None:
            tb = torch.as_tensor(transform.apply_boxes(boxes[keep], original_size), device=dev)
        if points is not None:
            tp = torch.as_tensor(transform.apply_coords(points[keep], original_size), device=dev)
            tl = torch.as_tensor(labels[keep], device=dev, dtype=torch.int)
        items.append(CalibItem(raw.image_id, x, input_size, original_size, tb, tp, tl))
        bar.update(i + 1)
    return items


def forward_item(
    model: Sam,
    item: CalibItem,
    multimask_output: bool = False,
    image_embeddings: torch.Tensor | None = None,
):
    """Encoder (unless `image_embeddings` are given), prompt encoder and decoder on one item:
    (low-res masks, predicted IoU)."""
    emb = model.image_encoder(item.image) if image_embeddings is None else image_embeddings
    pts = None if item.points is None else (item.points, item.point_labels)
    sparse, dense = model.prompt_encoder(points=pts, boxes=item.boxes, masks=None)
    return model.mask_decoder(
        image_embeddings=emb,
        image_pe=model.prompt_encoder.get_dense_pe(),
        sparse_prompt_embeddings=sparse,
        dense_prompt_embeddings=dense,
        multimask_output=multimask_output,
    )


@torch.no_grad()
def run_calibration(
    model: Sam,
    items: list[CalibItem],
    progress: bool = True,
    label: str = "calibrating",
    group=None,
) -> None:
    """Feed every item through `model` (observers record what they see).

    With a process `group` of several ranks, each rank feeds its shard (items rank, rank +
    world, ...) and the observers' statistics are then combined across ranks, so every rank
    ends with what one process feeding all items would have observed (min-max exactly; the
    averaging observers up to float summation order).
    """
    if group is not None:
        import torch.distributed as dist

        rank, world = dist.get_rank(group), dist.get_world_size(group)
        if len(items) < world:
            raise CalibrationError(
                f"{len(items)} calibration images cannot be sharded over {world} processes"
            )
        items = items[rank::world]
    bar = Progress(len(items), progress, label)
    for i, item in enumerate(items):
        forward_item(model, item)
        bar.update(i + 1)
    if group is not None:
        for module in model.modules():
            reduce = getattr(module, "all_reduce_observer", None)
            if reduce is not None and getattr(module, "observing", False):
                reduce(group)
