"""Evaluate a SAM the way the quantization papers do: box prompts in, COCO mask metrics out.

Protocol (docs: `/work/shared/papers.md` section 4). For every image the image embedding is
computed once; every box of the image is a prompt, batched through the mask decoder with
`multimask_output=False` (one mask per box, the first mask token). Images and boxes go through
`ResizeLongestSide(img_size)` exactly as `SamPredictor` does; a mask is `logits > mask_threshold`
at the original image size. Three numbers come out of one pass:

* `miou`: mean mask IoU over all ground-truth instances, each prompted by its own box.
* `mask_ap` (and AP50, AP75, APs/m/l): each prompt box's mask becomes a COCO segmentation result
  (RLE) scored `detection score x SAM predicted IoU`, labelled with the detection's category,
  and pycocotools' COCOeval (`segm`, maxDets 100) scores them. Without detections the
  ground-truth boxes act as detections with score 1.
* `fidelity_miou`: with a `reference` model, the mean IoU between the two models' masks on the
  AP prompts (detections, or ground-truth boxes without them).

Scoring is factored out of the model loop: `predict_image` turns one image into an
`ImageResult` (plain numbers and RLE dicts), `summarize` turns a list of them into an
`EvalResult`. Under `torch.distributed` each rank runs `predict_image` on its share of the images
and rank 0 gathers and runs `summarize` once, on results sorted by image id, so the metrics are
exactly those of one process.

Example:
    >>> from samq_fx import build_sam
    >>> from samq_fx.data import CocoDataset
    >>> ds = CocoDataset("data/synth/images", "data/synth/annotations.json")
    >>> result = evaluate(build_sam("tiny"), ds)
    >>> print(result.format_table())
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import math
import os
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from segment_anything.modeling import Sam
from segment_anything.utils.transforms import ResizeLongestSide

from samq_fx.calib import preprocess_image
from samq_fx.progress import Progress

__all__ = [
    "EvalError",
    "EvalResult",
    "ImageResult",
    "coco_mask_ap",
    "encode_mask",
    "eval_command",
    "evaluate",
    "init_distributed",
    "mask_iou",
    "predict_image",
    "summarize",
]

GT_PROMPTS = "ground-truth boxes"
DET_PROMPTS = "detections"
AP_KEYS = (
    "mask_ap",
    "mask_ap50",
    "mask_ap75",
    "mask_ap_small",
    "mask_ap_medium",
    "mask_ap_large",
)


class EvalError(ValueError):
    """Inputs that cannot be evaluated: prompts for unknown images, a dataset without labels."""


@dataclass(frozen=True)
class ImageResult:
    """What one image contributes to the metrics; plain data, cheap to gather across ranks.

    `instance_ious[k]` is the IoU of the mask prompted by ground-truth box k with instance k's
    mask; `detections[j]` is the COCO result dict (RLE segmentation) of AP prompt j;
    `fidelity_ious[j]` the IoU of model vs reference on AP prompt j (empty without reference).
    """

    image_id: int
    instance_ious: list[float] = field(default_factory=list)
    detections: list[dict] = field(default_factory=list)
    fidelity_ious: list[float] = field(default_factory=list)


@dataclass(frozen=True)
class EvalResult:
    """Metrics of one evaluation. Fractions in [0, 1]; `None` where a metric is undefined.

    `miou` is None without ground-truth instances; an AP is None where COCOeval reports -1
    (no ground truth in that size range); `fidelity_miou` is None without a reference model.
    """

    miou: float | None
    mask_ap: float | None
    mask_ap50: float | None
    mask_ap75: float | None
    mask_ap_small: float | None
    mask_ap_medium: float | None
    mask_ap_large: float | None
    fidelity_miou: float | None
    num_images: int
    num_instances: int
    num_prompts: int
    prompts: str
    seconds: float
    world_size: int = 1

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def format_table(self) -> str:
        """A table of the metrics (percent, as the papers print them) and what each means."""

        def pct(v: float | None) -> str:
            return "n/a" if v is None else f"{100 * v:6.2f}"

        rows = [
            ("mIoU", pct(self.miou), "mean IoU of each instance's mask, prompted by its GT box"),
            ("mask AP", pct(self.mask_ap), f"COCO AP@[.50:.95], prompts: {self.prompts}"),
            ("mask AP50", pct(self.mask_ap50), "AP at mask IoU 0.50"),
            ("mask AP75", pct(self.mask_ap75), "AP at mask IoU 0.75"),
            ("mask AP small", pct(self.mask_ap_small), "AP of objects < 32x32 px"),
            ("mask AP medium", pct(self.mask_ap_medium), "AP of objects 32x32 to 96x96 px"),
            ("mask AP large", pct(self.mask_ap_large), "AP of objects > 96x96 px"),
        ]
        if self.fidelity_miou is not None:
            rows.append(
                ("fidelity mIoU", pct(self.fidelity_miou), "IoU with the reference model's masks")
            )
        rate = self.num_images / self.seconds if self.seconds > 0 else float("nan")
        width = max(len(r[0]) for r in rows)
        lines = [f"{'metric':<{width}}  {'value %':>7}  meaning"]
        lines += [f"{name:<{width}}  {value:>7}  {meaning}" for name, value, meaning in rows]
        lines.append(
            f"{self.num_images} images, {self.num_instances} instances, {self.num_prompts} "
            f"prompts ({self.prompts}); {self.seconds:.1f} s, {rate:.2f} img/s"
            + (f", {self.world_size} processes" if self.world_size > 1 else "")
        )
        return "\n".join(lines)


# --------------------------------------------------------------------------- scoring


def mask_iou(a: torch.Tensor | np.ndarray, b: torch.Tensor | np.ndarray) -> torch.Tensor:
    """IoU of boolean masks (..., H, W) -> (...,) float64; two empty masks have IoU 1."""
    a, b = torch.as_tensor(a, dtype=torch.bool), torch.as_tensor(b, dtype=torch.bool)
    inter = (a & b).sum(dim=(-2, -1), dtype=torch.int64)
    union = (a | b).sum(dim=(-2, -1), dtype=torch.int64)
    iou = inter.double() / union.clamp(min=1).double()
    return torch.where(union == 0, torch.ones_like(iou), iou)


def encode_mask(mask: np.ndarray | torch.Tensor) -> dict:
    """A boolean (H, W) mask as COCO compressed RLE with str counts (JSON-serialisable)."""
    m = np.asfortranarray(torch.as_tensor(mask).cpu().numpy().astype(np.uint8))
    rle = mask_utils.encode(m)
    return {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")}


def coco_mask_ap(
    coco_gt: COCO, results: Sequence[Mapping], image_ids: Sequence[int]
) -> dict[str, float | None]:
    """Score segmentation results with COCOeval (`segm`), restricted to `image_ids`.

    Args:
        coco_gt: the ground truth.
        results: COCO result dicts (`image_id`, `category_id`, `segmentation` RLE, `score`);
            not modified. An empty list scores 0 wherever there is ground truth.
        image_ids: the images evaluated; ground truth of other images is ignored.

    Returns:
        `{mask_ap, mask_ap50, mask_ap75, mask_ap_small, mask_ap_medium, mask_ap_large}` from
        `stats[0:6]`, None where COCOeval reports -1 (no ground truth in that range).
    """
    image_ids = sorted(int(i) for i in image_ids)
    if not image_ids:
        return dict.fromkeys(AP_KEYS)
    unknown = {int(r["image_id"]) for r in results} - set(image_ids)
    if unknown:
        raise EvalError(f"results name images outside the evaluated set: {sorted(unknown)[:5]}")
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress and tables
        if results:
            coco_dt = coco_gt.loadRes([dict(r) for r in results])
        else:  # loadRes cannot take an empty list
            coco_dt = COCO()
            coco_dt.dataset = {
                "images": list(coco_gt.dataset["images"]),
                "categories": list(coco_gt.dataset.get("categories", [])),
                "annotations": [],
            }
            coco_dt.createIndex()
        coco_eval = COCOeval(coco_gt, coco_dt, iouType="segm")
        coco_eval.params.imgIds = image_ids
        coco_eval.evaluate()
        coco_eval.accumulate()
        coco_eval.summarize()
    stats = [float(s) for s in coco_eval.stats[:6]]
    return {k: (None if s < 0 else s) for k, s in zip(AP_KEYS, stats)}


def summarize(
    image_results: Sequence[ImageResult],
    coco_gt: COCO,
    *,
    prompts: str = GT_PROMPTS,
    with_reference: bool = False,
    seconds: float = 0.0,
    world_size: int = 1,
) -> EvalResult:
    """Turn per-image results into metrics; the order of `image_results` does not matter.

    Results are sorted by image id (the prompts within an image keep their order), so any
    sharding of the images gives bit-identical numbers.
    """
    ordered = sorted(image_results, key=lambda r: r.image_id)
    ids = [r.image_id for r in ordered]
    if len(set(ids)) != len(ids):
        raise EvalError("an image was evaluated twice")
    ious = [x for r in ordered for x in r.instance_ious]
    fidelity = [x for r in ordered for x in r.fidelity_ious]
    detections = [d for r in ordered for d in r.detections]
    ap = coco_mask_ap(coco_gt, detections, ids)
    return EvalResult(
        miou=_mean(ious),
        **ap,
        fidelity_miou=_mean(fidelity) if with_reference else None,
        num_images=len(ordered),
        num_instances=len(ious),
        num_prompts=len(detections),
        prompts=prompts,
        seconds=seconds,
        world_size=world_size,
    )


def _mean(values: Sequence[float]) -> float | None:
    return math.fsum(values) / len(values) if values else None


# --------------------------------------------------------------------------- the model side


@dataclass
class _Embedded:
    model: Sam
    embedding: torch.Tensor
    transform: ResizeLongestSide
    input_size: tuple[int, int]
    original_size: tuple[int, int]


def _embed(model: Sam, image: np.ndarray) -> _Embedded:
    """`SamPredictor.set_image`, through the public `Sam` surface only."""
    x, input_size, original_size, transform = preprocess_image(model, image)
    embedding = model.image_encoder(x)
    return _Embedded(model, embedding, transform, input_size, tuple(int(s) for s in original_size))


def _masks_for_boxes(
    e: _Embedded, boxes: np.ndarray, batch: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield (masks bool (B, H, W), predicted IoU (B,)) for chunks of `batch` xyxy boxes."""
    model, device = e.model, e.embedding.device
    for start in range(0, len(boxes), batch):
        chunk = e.transform.apply_boxes(boxes[start : start + batch], e.original_size)
        box_t = torch.as_tensor(chunk, dtype=torch.float, device=device)
        sparse, dense = model.prompt_encoder(points=None, boxes=box_t, masks=None)
        low_res, iou_pred = model.mask_decoder(
            image_embeddings=e.embedding,
            image_pe=model.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=False,
        )
        logits = model.postprocess_masks(low_res, e.input_size, e.original_size)
        yield logits[:, 0] > model.mask_threshold, iou_pred[:, 0]


@torch.inference_mode()
def predict_image(
    model: Sam,
    sample: Any,
    detections: Any | None = None,
    *,
    reference: Sam | None = None,
    batch_prompts: int = 64,
) -> ImageResult:
    """Run `model` (and `reference`) on one dataset sample; see the module docstring.

    Args:
        model: a `Sam`, eager or captured.
        sample: a `samq_fx.data.Sample` (image, boxes, masks, category_ids, image_id).
        detections: a `samq_fx.data.Detections` for this image, or None to use the
            ground-truth boxes as detections of score 1.
        reference: a second `Sam` for the fidelity IoU on the AP prompts.
        batch_prompts: boxes per mask-decoder call.
    """
    gt_boxes = np.asarray(sample.boxes, dtype=np.float32).reshape(-1, 4)
    if detections is None:
        ap_boxes, det_scores, det_cats = gt_boxes, np.ones(len(gt_boxes)), sample.category_ids
    else:
        ap_boxes = np.asarray(detections.boxes, dtype=np.float32).reshape(-1, 4)
        det_scores, det_cats = detections.scores, detections.category_ids
    image_id = int(sample.image_id)
    if len(gt_boxes) == 0 and len(ap_boxes) == 0:
        return ImageResult(image_id)  # nothing to prompt: skip the image encoder

    e = _embed(model, sample.image)
    e_ref = _embed(reference, sample.image) if reference is not None else None
    gt_masks = torch.as_tensor(np.asarray(sample.masks, dtype=bool))

    instance_ious: list[float] = []
    if detections is not None:  # the GT boxes need their own decoder pass for mIoU
        start = 0
        for masks, _ in _masks_for_boxes(e, gt_boxes, batch_prompts):
            instance_ious += mask_iou(masks.cpu(), gt_masks[start : start + len(masks)]).tolist()
            start += len(masks)

    results: list[dict] = []
    fidelity: list[float] = []
    ref_chunks = _masks_for_boxes(e_ref, ap_boxes, batch_prompts) if e_ref is not None else None
    start = 0
    for masks, iou_pred in _masks_for_boxes(e, ap_boxes, batch_prompts):
        masks = masks.cpu()
        n = len(masks)
        if detections is None:
            instance_ious += mask_iou(masks, gt_masks[start : start + n]).tolist()
        if ref_chunks is not None:
            ref_masks, _ = next(ref_chunks)
            fidelity += mask_iou(masks, ref_masks.cpu()).tolist()
        for j in range(n):
            results.append(
                {
                    "image_id": image_id,
                    "category_id": int(det_cats[start + j]),
                    "segmentation": encode_mask(masks[j]),
                    "score": float(det_scores[start + j]) * float(iou_pred[j]),
                }
            )
        start += n
    return ImageResult(image_id, instance_ious, results, fidelity)


# --------------------------------------------------------------------------- distribution


def init_distributed() -> dist.ProcessGroup | None:
    """Join the `torchrun` process group; None (and nothing done) in a single process.

    Backend nccl with CUDA (each rank on `cuda:LOCAL_RANK`), gloo otherwise. Safe to call
    twice. Returns the default group when the world has more than one process.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    if not dist.is_initialized():
        if torch.cuda.is_available():
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(device)
            dist.init_process_group("nccl", device_id=device)
        else:
            dist.init_process_group("gloo")
    return dist.group.WORLD


def rank_device() -> torch.device:
    """The device this process should use: `cuda:LOCAL_RANK` with CUDA, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def _resolve_group(group: dist.ProcessGroup | None) -> dist.ProcessGroup | None:
    if group is None:
        group = init_distributed() if not dist.is_initialized() else dist.group.WORLD
    if group is None or dist.get_world_size(group) <= 1:
        return None
    return group


# --------------------------------------------------------------------------- the verb


def evaluate(
    model: Sam,
    dataset: Any,
    prompts: Mapping[int, Any] | None = None,
    *,
    reference: Sam | None = None,
    max_images: int | None = None,
    batch_prompts: int = 64,
    progress: bool = True,
    process_group: dist.ProcessGroup | None = None,
) -> EvalResult | None:
    """Evaluate `model` on a COCO-style dataset with box prompts, by the papers' protocol.

    Args:
        model: a `segment_anything.modeling.Sam`, eager or captured (FX image encoder and mask
            decoder); it runs on the device of its parameters.
        dataset: a `samq_fx.data.CocoDataset` (or anything with `len`, `[i] -> Sample`,
            `image_ids` and `coco`).
        prompts: detections per image id, from `samq_fx.data.load_detections`; images absent
            from it get no detection prompts. None: the ground-truth boxes are the detections.
        reference: a second `Sam` (usually the FP model) for `fidelity_miou`.
        max_images: evaluate only the first N images of the dataset.
        batch_prompts: boxes per mask-decoder call.
        progress: print a progress line to stderr every few seconds.
        process_group: shard the images over this group. Without it, the images are sharded
            over the default group when `torchrun` launched the process (WORLD_SIZE > 1; the
            group is initialised by `init_distributed` if needed).

    Returns:
        An `EvalResult`. When sharded, group rank 0 returns it and every other rank returns
        None; the numbers equal those of a single-process run exactly.

    Example:
        >>> result = evaluate(build_sam("tiny"), CocoDataset(images_dir, annotations_json))
        >>> result.miou, result.mask_ap
    """
    t0 = time.perf_counter()
    if batch_prompts < 1:
        raise ValueError(f"batch_prompts must be >= 1, got {batch_prompts}")
    n = len(dataset) if max_images is None else min(len(dataset), max_images)
    if max_images is not None and max_images < 1:
        raise ValueError(f"max_images must be >= 1, got {max_images}")
    if prompts is not None:
        unknown = set(prompts) - {int(i) for i in dataset.image_ids}
        if unknown:
            raise EvalError(
                f"detections name {len(unknown)} image ids not in the dataset, "
                f"e.g. {sorted(unknown)[:5]}"
            )
    group = _resolve_group(process_group)
    rank = dist.get_rank(group) if group is not None else 0
    world = dist.get_world_size(group) if group is not None else 1
    mine = [i for i in range(n) if i % world == rank]

    label = "eval" if world == 1 else f"eval rank {rank}/{world}"
    bar = Progress(len(mine), progress and rank == 0, label)
    local: list[ImageResult] = []
    failure: BaseException | None = None
    try:
        for done, i in enumerate(mine, start=1):
            sample = dataset[i]
            dets = None if prompts is None else prompts.get(int(sample.image_id), _NO_DETECTIONS)
            local.append(
                predict_image(model, sample, dets, reference=reference, batch_prompts=batch_prompts)
            )
            bar.update(done)
    except Exception as err:
        if group is None:
            raise
        failure = err  # still join the gather below, so the other ranks do not hang

    if group is not None:
        gathered: list | None = [None] * world if rank == 0 else None
        dist.gather_object((local, failure), gathered, group=group, group_dst=0)
        if failure is not None:
            raise failure
        if rank != 0:
            return None
        for _, err in gathered:
            if err is not None:  # re-raise another rank's failure here, where results go
                raise err
        local = [r for part, _ in gathered for r in part]
    return summarize(
        local,
        dataset.coco,
        prompts=GT_PROMPTS if prompts is None else DET_PROMPTS,
        with_reference=reference is not None,
        seconds=time.perf_counter() - t0,
        world_size=world,
    )


@dataclass(frozen=True)
class _NoDetections:
    boxes: np.ndarray = field(default_factory=lambda: np.zeros((0, 4), np.float32))
    scores: np.ndarray = field(default_factory=lambda: np.zeros((0,), np.float32))
    category_ids: np.ndarray = field(default_factory=lambda: np.zeros((0,), np.int64))


_NO_DETECTIONS = _NoDetections()


# --------------------------------------------------------------------------- the command


@dataclass
class LoadedModels:
    """What `samq-fx eval` evaluates: the model, an optional reference, and how to name them."""

    model: Sam
    reference: Sam | None
    name: str
    config: dict
    source: dict


def _load_model_for_eval(args: argparse.Namespace, device: torch.device) -> LoadedModels:
    """Build the model(s) named on the command line.

    `--quantized FILE` loads the saved quantized model as `model` and rebuilds the
    full-precision model it came from as `reference` (fidelity against FP): from `--checkpoint`,
    else the checkpoint recorded when it was quantized, else the bundled tiny weights.
    """
    from samq_fx.models import ARCHS, arch_of, build_sam

    if args.quantized is not None:
        return _load_quantized_for_eval(args, device)
    if args.model is None:
        raise EvalError("give --model NAME (or --quantized FILE)")
    if args.model not in ARCHS:
        raise EvalError(f"unknown --model {args.model!r}; choose one of {sorted(ARCHS)}")
    random_weights = args.checkpoint is None and args.model != "tiny"
    if random_weights:  # every rank of a sharded run must build the same random model
        torch.manual_seed(0)
    model = build_sam(args.model, args.checkpoint).to(device)
    return LoadedModels(
        model=model,
        reference=None,
        name=args.model,
        config=arch_of(model).to_dict(),
        source={
            "checkpoint": None if args.checkpoint is None else str(args.checkpoint),
            **({"weights": "random, torch.manual_seed(0)"} if random_weights else {}),
        },
    )


def _load_quantized_for_eval(args: argparse.Namespace, device: torch.device) -> LoadedModels:
    from samq_fx.api import load
    from samq_fx.models import ARCHS, build_sam

    q = load(args.quantized).to(device)
    source = dict(getattr(q, "samq_source", None) or {})
    name = source.get("model") or q.samq_arch.name
    if args.model is not None and args.model != name:
        raise EvalError(f"--model {args.model} but {args.quantized} holds a quantized {name}")
    checkpoint = args.checkpoint or source.get("checkpoint")
    reference = None
    if name in ARCHS and (name == "tiny" or (checkpoint and Path(checkpoint).is_file())):
        reference = build_sam(name, checkpoint).to(device)
    else:
        print(
            f"samq-fx eval: no full-precision {name} to compare against (give --checkpoint); "
            "fidelity is not computed",
            file=sys.stderr,
        )
    return LoadedModels(
        model=q,
        reference=reference,
        name=f"{name} {q.samq_config.name}",
        config={"arch": q.samq_arch.to_dict(), "quant": q.samq_config.to_dict()},
        source={"quantized": str(args.quantized), "checkpoint": checkpoint},
    )


def _check_inputs(args: argparse.Namespace) -> None:
    if not Path(args.images).is_dir():
        raise EvalError(f"images folder {str(args.images)!r} does not exist")
    for flag, path in (("--annotations", args.annotations), ("--prompts", args.prompts)):
        if path is not None and not Path(path).is_file():
            raise EvalError(f"{flag} file {str(path)!r} does not exist")
    if args.quantized is not None and not Path(args.quantized).is_file():
        raise EvalError(f"--quantized file {str(args.quantized)!r} does not exist")
    if args.checkpoint is not None and not Path(args.checkpoint).is_file():
        raise EvalError(f"--checkpoint file {str(args.checkpoint)!r} does not exist")


def _device_from_args(args: argparse.Namespace) -> torch.device:
    if args.device is None:
        return rank_device()
    try:
        device = torch.device(args.device)
    except RuntimeError:
        raise EvalError(
            f"--device {args.device!r} is not a torch device (cpu, cuda, cuda:1, ...)"
        ) from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise EvalError(f"--device {args.device!r} asked for CUDA but none is available")
    return device


def eval_command(args: argparse.Namespace) -> int:
    """`samq-fx eval`: exit 0 on success, 2 with a one-line message for bad inputs."""
    from samq_fx.api import SaveFileError
    from samq_fx.data import CocoDataset, DataError, load_detections
    from samq_fx.models import CheckpointError

    started_group = not dist.is_initialized()
    try:
        _check_inputs(args)
        device = _device_from_args(args)
        group = init_distributed()
        dataset = CocoDataset(args.images, args.annotations)
        if not dataset.coco.getAnnIds():
            raise EvalError(
                f"{str(args.annotations)!r} has no annotations: mIoU and mask AP need ground truth"
            )
        prompts = load_detections(args.prompts, dataset) if args.prompts else None
        loaded = _load_model_for_eval(args, device)
        result = evaluate(
            loaded.model,
            dataset,
            prompts,
            reference=loaded.reference,
            max_images=args.max_images,
            batch_prompts=args.batch_prompts,
            progress=not args.no_progress,
            process_group=group,
        )
    except (EvalError, DataError, CheckpointError, SaveFileError, OSError) as err:
        print(f"samq-fx eval: error: {err}", file=sys.stderr)
        return 2
    finally:
        if started_group and dist.is_initialized():
            dist.destroy_process_group()
    if result is None:  # a non-zero rank of a sharded run: rank 0 reports
        return 0
    print(result.format_table())
    if args.output is not None:
        record = {
            **result.to_dict(),
            "model": loaded.name,
            "config": loaded.config,
            **loaded.source,
            "prompts_file": None if args.prompts is None else str(args.prompts),
            "images": str(args.images),
            "annotations": str(args.annotations),
            "max_images": args.max_images,
        }
        out = Path(args.output)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(record, indent=2) + "\n")
        print(f"metrics written to {out}")
    return 0
