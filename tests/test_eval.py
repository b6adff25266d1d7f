"""Tests of samq_fx/eval.py and `samq-fx eval`: scoring with known answers, the model loop on a
random tiny SAM, the command's JSON and errors, and a 2-process torchrun run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools.coco import COCO

from samq_fx.eval import (
    EvalError,
    ImageResult,
    coco_mask_ap,
    encode_mask,
    evaluate,
    mask_iou,
    predict_image,
    summarize,
)
from samq_fx.models import build_sam

# (height, width) and rectangles (x0, y0, x1, y1, category) per image; image 3 has no object.
# Sizes span COCO's small (< 32^2 px), medium and large (> 96^2 px) ranges.
SCENES = [
    ((120, 160), [(10, 12, 60, 70, 1), (90, 20, 150, 100, 2), (20, 90, 40, 110, 1)]),
    ((160, 120), [(5, 5, 115, 110, 2), (30, 120, 50, 150, 1)]),
    ((96, 128), [(40, 30, 90, 80, 1)]),
    ((100, 100), []),
]


def _write_coco(root: Path, scenes=SCENES) -> tuple[Path, Path]:
    """Write `root/images/*.png` and `root/annotations.json` (polygon rectangles)."""
    rng = np.random.default_rng(0)
    images_dir = root / "images"
    images_dir.mkdir(parents=True)
    images, annotations = [], []
    for image_id, ((h, w), rects) in enumerate(scenes, start=1):
        pixels = rng.integers(0, 60, size=(h, w, 3), dtype=np.uint8)
        for x0, y0, x1, y1, cat in rects:
            pixels[y0:y1, x0:x1] = (200, 40, 40) if cat == 1 else (40, 200, 40)
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": cat,
                    "segmentation": [[x0, y0, x1, y0, x1, y1, x0, y1]],
                    "bbox": [x0, y0, x1 - x0, y1 - y0],
                    "area": (x1 - x0) * (y1 - y0),
                    "iscrowd": 0,
                }
            )
        name = f"{image_id:06d}.png"
        Image.fromarray(pixels).save(images_dir / name)
        images.append({"id": image_id, "file_name": name, "height": h, "width": w})
    ann_file = root / "annotations.json"
    ann_file.write_text(
        json.dumps(
            {
                "images": images,
                "annotations": annotations,
                "categories": [{"id": 1, "name": "red"}, {"id": 2, "name": "green"}],
            }
        )
    )
    return images_dir, ann_file


def _coco(ann_file: Path) -> COCO:
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()):
        return COCO(str(ann_file))


def _gt_results(coco: COCO, shift: int = 0) -> list[dict]:
    """Every ground-truth mask as a result of score 1, moved `shift` px right."""
    results = []
    for ann in coco.loadAnns(coco.getAnnIds()):
        mask = coco.annToMask(ann).astype(bool)
        mask = np.roll(mask, shift, axis=1)
        if shift:
            mask[:, :shift] = False
        results.append(
            {
                "image_id": ann["image_id"],
                "category_id": ann["category_id"],
                "segmentation": encode_mask(mask),
                "score": 1.0,
            }
        )
    return results


@pytest.fixture(scope="module")
def coco_dir(tmp_path_factory) -> tuple[Path, Path]:
    return _write_coco(tmp_path_factory.mktemp("coco"))


@pytest.fixture(scope="module")
def dataset(coco_dir):
    data = pytest.importorskip("samq_fx.data")
    return data.CocoDataset(*coco_dir)


@pytest.fixture(scope="module")
def sam():
    torch.manual_seed(0)
    return build_sam("tiny", pretrained=False)


# --------------------------------------------------------------------------- scoring


@pytest.mark.unit
def test_mask_iou_known_values():
    a = torch.zeros(2, 4, 4, dtype=torch.bool)
    a[:, :2] = True
    b = a.clone()
    b[1] = False
    b[1, :1] = True
    assert mask_iou(a, b).tolist() == [1.0, 0.5]
    assert mask_iou(np.zeros((3, 3), bool), np.zeros((3, 3), bool)).item() == 1.0
    assert mask_iou(a[0], ~a[0]).item() == 0.0


@pytest.mark.unit
def test_encode_mask_round_trips_through_json():
    from pycocotools import mask as mask_utils

    mask = np.zeros((7, 5), bool)
    mask[2:5, 1:4] = True
    rle = json.loads(json.dumps(encode_mask(mask)))
    assert np.array_equal(mask_utils.decode(rle).astype(bool), mask)


@pytest.mark.unit
def test_perfect_masks_give_ap_one(coco_dir):
    coco = _coco(coco_dir[1])
    ap = coco_mask_ap(coco, _gt_results(coco), coco.getImgIds())
    for key in ("mask_ap", "mask_ap50", "mask_ap75", "mask_ap_small", "mask_ap_medium"):
        assert ap[key] == pytest.approx(1.0), (key, ap)
    assert ap["mask_ap_large"] == pytest.approx(1.0)


@pytest.mark.unit
def test_shifted_masks_give_less_ap(coco_dir):
    coco = _coco(coco_dir[1])
    ids = coco.getImgIds()
    slightly = coco_mask_ap(coco, _gt_results(coco, shift=6), ids)["mask_ap"]
    far = coco_mask_ap(coco, _gt_results(coco, shift=90), ids)["mask_ap"]
    assert 0.0 < slightly < 1.0, slightly
    assert far < slightly, (far, slightly)


@pytest.mark.unit
def test_no_results_score_zero_and_missing_ranges_are_none(coco_dir):
    coco = _coco(coco_dir[1])
    assert coco_mask_ap(coco, [], coco.getImgIds())["mask_ap"] == 0.0
    # image 3 holds one 50x50 object: no small or large ground truth there
    ap = coco_mask_ap(coco, [r for r in _gt_results(coco) if r["image_id"] == 3], [3])
    assert ap["mask_ap"] == pytest.approx(1.0)
    assert ap["mask_ap_small"] is None and ap["mask_ap_large"] is None


@pytest.mark.unit
def test_ap_ignores_images_outside_the_evaluated_set(coco_dir):
    coco = _coco(coco_dir[1])
    only_first = [r for r in _gt_results(coco) if r["image_id"] == 1]
    assert coco_mask_ap(coco, only_first, [1])["mask_ap"] == pytest.approx(1.0)
    assert coco_mask_ap(coco, only_first, [1, 2])["mask_ap"] < 1.0
    with pytest.raises(EvalError, match="outside the evaluated set"):
        coco_mask_ap(coco, only_first, [2])


@pytest.mark.unit
def test_summarize_is_independent_of_image_order(coco_dir):
    coco = _coco(coco_dir[1])
    results = _gt_results(coco)
    per_image = [
        ImageResult(
            i,
            instance_ious=[1.0] * sum(r["image_id"] == i for r in results),
            detections=[r for r in results if r["image_id"] == i],
            fidelity_ious=[1.0, 0.5][: i % 3],
        )
        for i in coco.getImgIds()
    ]
    forward = summarize(per_image, coco, with_reference=True)
    backward = summarize(per_image[::-1], coco, with_reference=True)
    assert forward == backward
    assert forward.miou == 1.0 and forward.mask_ap == pytest.approx(1.0)
    assert forward.num_images == 4 and forward.num_instances == 6
    assert forward.fidelity_miou == pytest.approx(3.5 / 4)
    with pytest.raises(EvalError, match="twice"):
        summarize(per_image + per_image[:1], coco)


@pytest.mark.unit
def test_result_table_and_dict():
    from samq_fx.eval import EvalResult

    r = EvalResult(0.5, 0.25, 0.5, None, None, 0.1, 0.3, None, 2, 3, 3, "detections", 1.0)
    table = r.format_table()
    assert "mIoU" in table and "50.00" in table and "n/a" in table and "fidelity" not in table
    assert json.loads(json.dumps(r.to_dict()))["mask_ap"] == 0.25


# --------------------------------------------------------------------------- the model loop


@pytest.mark.unit
def test_masks_match_sam_predictor(sam, dataset):
    from segment_anything import SamPredictor

    sample = dataset[0]
    result = predict_image(sam, sample, batch_prompts=2)  # 3 boxes: chunks of 2 and 1
    predictor = SamPredictor(sam)
    predictor.set_image(sample.image)
    for k, box in enumerate(sample.boxes):
        masks, iou_pred, _ = predictor.predict(box=box, multimask_output=False)
        expected = mask_iou(masks[0], sample.masks[k]).item()
        assert result.instance_ious[k] == expected
        assert result.detections[k]["score"] == pytest.approx(float(iou_pred[0]), rel=1e-5)
        assert result.detections[k]["segmentation"] == encode_mask(masks[0])


@pytest.mark.unit
def test_model_against_itself_has_fidelity_one(sam, dataset):
    result = evaluate(sam, dataset, reference=sam, progress=False)
    assert result.fidelity_miou == 1.0
    assert result.num_images == 4 and result.num_instances == 6 and result.num_prompts == 6
    assert 0.0 <= result.miou <= 1.0 and 0.0 <= result.mask_ap <= 1.0
    assert result.prompts == "ground-truth boxes"


@pytest.mark.slow
def test_captured_model_is_evaluated_like_the_eager_one(sam, dataset):
    capture = pytest.importorskip("samq_fx.capture")
    captured = capture.capture(sam)  # FX image encoder and mask decoder
    result = evaluate(captured, dataset, reference=sam, max_images=2, progress=False)
    assert result.fidelity_miou > 0.999, f"fidelity {result.fidelity_miou} (threshold 0.999)"


@dataclass
class _Dets:
    boxes: np.ndarray
    scores: np.ndarray
    category_ids: np.ndarray


@pytest.mark.unit
def test_detection_prompts_and_empty_lists(sam, dataset):
    dets = {
        1: _Dets(
            np.array([[10, 12, 60, 70], [0, 0, 30, 30]], np.float32),
            np.array([0.9, 0.2], np.float32),
            np.array([1, 2], np.int64),
        ),
        2: _Dets(np.zeros((0, 4), np.float32), np.zeros(0, np.float32), np.zeros(0, np.int64)),
    }
    result = evaluate(sam, dataset, dets, max_images=3, progress=False)
    assert result.num_images == 3 and result.num_instances == 6  # mIoU still on all GT boxes
    assert result.num_prompts == 2 and result.prompts == "detections"
    assert result.fidelity_miou is None
    with pytest.raises(EvalError, match="not in the dataset"):
        evaluate(sam, dataset, {99: dets[1]}, progress=False)


@pytest.mark.unit
def test_bad_arguments(sam, dataset):
    with pytest.raises(ValueError, match="batch_prompts"):
        evaluate(sam, dataset, batch_prompts=0, progress=False)
    with pytest.raises(ValueError, match="max_images"):
        evaluate(sam, dataset, max_images=0, progress=False)


# --------------------------------------------------------------------------- the command


def _flags(**options) -> list[str]:
    """`_flags(max_images=2, no_progress=True)` -> ["--max-images", "2", "--no-progress"]."""
    argv = []
    for name, value in options.items():
        argv.append("--" + name.replace("_", "-"))
        if value is not True:
            argv.append(str(value))
    return argv


def _run_cli(*argv: str) -> int:
    from samq_fx.cli import main

    return main(["eval", *map(str, argv)])


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, sam) -> Path:
    path = tmp_path_factory.mktemp("ckpt") / "tiny_random.pt"
    torch.save(sam.state_dict(), path)
    return path


@pytest.mark.unit
def test_cli_writes_metrics_json(coco_dir, dataset, checkpoint, tmp_path, capsys):
    out = tmp_path / "metrics.json"
    images, annotations = coco_dir
    rc = _run_cli(
        *_flags(model="tiny", checkpoint=checkpoint, images=images, annotations=annotations),
        *_flags(max_images=2, output=out, no_progress=True),
    )
    assert rc == 0
    record = json.loads(out.read_text())
    for key in ("miou", "mask_ap", "mask_ap50", "mask_ap75", "num_images", "num_instances"):
        assert key in record
    assert record["model"] == "tiny" and record["num_images"] == 2
    assert record["config"]["img_size"] == 256 and record["prompts"] == "ground-truth boxes"
    assert "mask AP" in capsys.readouterr().out


@pytest.mark.unit
def test_cli_help_explains_the_numbers(capsys):
    with pytest.raises(SystemExit) as exc:
        _run_cli("--help")
    assert exc.value.code == 0
    text = capsys.readouterr().out
    assert "mIoU" in text and "predicted" in text and "--prompts" in text


def _broken_inputs(coco_dir: Path, tmp: Path) -> dict[str, tuple[list, str]]:
    images, annotations = coco_dir
    no_anns = tmp / "no_anns.json"
    no_anns.write_text(json.dumps({**json.loads(annotations.read_text()), "annotations": []}))
    unknown = tmp / "unknown_ids.json"
    unknown.write_text(
        json.dumps([{"image_id": 99, "bbox": [0, 0, 5, 5], "score": 0.5, "category_id": 1}])
    )
    bad_dir = tmp / "bad_images"
    bad_images, bad_annotations = _write_coco(bad_dir, SCENES[:1])
    (bad_images / "000001.png").write_bytes(b"not a png")
    return {
        "missing folder": (["--images", tmp / "nope", "--annotations", annotations], "nope"),
        "missing annotations": (["--images", images, "--annotations", tmp / "a.json"], "a.json"),
        "no annotations": (["--images", images, "--annotations", no_anns], "annotation"),
        "unknown ids": (
            ["--images", images, "--annotations", annotations, "--prompts", unknown],
            "99",
        ),
        "unreadable image": (["--images", bad_images, "--annotations", bad_annotations], "png"),
        "unknown model": (["--images", images, "--annotations", annotations, "--model", "x"], "x"),
        "bad device": (["--images", images, "--annotations", annotations, "--device", "gpu0"], ""),
    }


@pytest.mark.unit
def test_cli_errors_are_one_line_exit_2(coco_dir, dataset, checkpoint, tmp_path, capsys):
    for case, (argv, needle) in _broken_inputs(coco_dir, tmp_path).items():
        rc = _run_cli("--model", "tiny", "--checkpoint", checkpoint, "--no-progress", *argv)
        err = capsys.readouterr().err.strip()
        assert rc == 2, (case, err)
        assert err.startswith("samq-fx eval: error:") and "\n" not in err, (case, err)
        assert needle in err, (case, err)


# --------------------------------------------------------------------------- distributed


@pytest.mark.slow
def test_two_processes_give_the_same_metrics(coco_dir, dataset, checkpoint, tmp_path):
    images, annotations = coco_dir
    detections = tmp_path / "detections.json"  # image 1: 3 boxes, image 2: 1, images 3-4: none
    detections.write_text(
        json.dumps(
            [
                {"image_id": 1, "bbox": [8, 10, 50, 60], "score": 0.9, "category_id": 1},
                {"image_id": 1, "bbox": [90, 20, 60, 80], "score": 0.9, "category_id": 2},
                {"image_id": 1, "bbox": [0, 0, 30, 30], "score": 0.3, "category_id": 1},
                {"image_id": 2, "bbox": [5, 5, 110, 105], "score": 0.7, "category_id": 2},
            ]
        )
    )
    argv = _flags(
        model="tiny",
        checkpoint=checkpoint,
        images=images,
        annotations=annotations,
        prompts=detections,
        batch_prompts=2,
        no_progress=True,
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    outputs = {}
    for world in (1, 2):
        out = tmp_path / f"world{world}.json"
        cmd = [*launcher, f"--nproc-per-node={world}", "-m", "samq_fx.cli", "eval", *argv]
        proc = subprocess.run(
            [*map(str, cmd), "--output", str(out)],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        outputs[world] = json.loads(out.read_text())
    assert outputs[2].pop("world_size") == 2 and outputs[1].pop("world_size") == 1
    for record in outputs.values():
        record.pop("seconds")
    assert outputs[1] == outputs[2]
    assert outputs[1]["num_images"] == 4 and outputs[1]["num_prompts"] == 4
