"""The `samq-fx` command: roles, quantize, eval --quantized, demo; refusals and errors."""

from __future__ import annotations

import json

import pytest
import torch

import samq_fx
from samq_fx.cli import build_parser, main, quant_config_from_args
from samq_fx.config import QuantConfig
from samq_fx.data import make_dataset


@pytest.fixture(scope="module")
def calib_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("calib")
    make_dataset(root, 3, seed=4242, progress=False)
    return root


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    """A random tiny SAM as a checkpoint file, so these tests do not depend on trained weights."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "tiny_random.pth"
    torch.save(samq_fx.build_sam("tiny", pretrained=False).state_dict(), path)
    return path


@pytest.mark.unit
def test_roles_command_prints_table(capsys):
    assert main(["roles", "--model", "vit_b"]) == 0
    out = capsys.readouterr().out
    assert "enc_global" in out and "final_token_to_image" in out
    assert "219 annotated nodes" in out  # pos_embed among them


@pytest.mark.unit
@pytest.mark.parametrize(
    ("switches", "name", "parts"),
    [
        (["--method", "car-sam"], "W4A4-car-sam", {"agq", "mac", "recon"}),
        (["--method", "car-sam", "--no-agq"], "W4A4-car-sam-noagq", {"mac", "recon"}),
        (["--method", "car-sam", "--no-mac", "--no-recon"], "W4A4-car-sam-nomac-norecon", {"agq"}),
        (["--method", "ptq4sam", "--no-agq"], "W4A4-ptq4sam-noagq", {"bimodal", "recon"}),
        (["--method", "samq"], "W4A4-samq", {"bimodal", "agq", "pcc", "mac", "recon", "par"}),
        (
            ["--method", "samq", "--no-recon"],
            "W4A4-samq-norecon",
            {"bimodal", "agq", "pcc", "mac"},
        ),
        (
            ["--method", "samq", "--no-agq"],
            "W4A4-samq-noagq",
            {"bimodal", "pcc", "mac", "recon", "par"},
        ),
        (
            ["--method", "samq", "--no-par"],
            "W4A4-samq-nopar",
            {"bimodal", "agq", "pcc", "mac", "recon"},
        ),
        (
            ["--method", "samq", "--no-pcc", "--no-mac"],
            "W4A4-samq-nopcc-nomac",
            {"bimodal", "agq", "recon", "par"},
        ),
        (
            ["--method", "samq", "--jcar"],
            "W4A4-samq+jcar",
            {"bimodal", "agq", "pcc", "mac", "recon", "par"},
        ),
        (["--method", "saq-sam"], "W4A4-saq-sam", {"bimodal", "agq", "recon", "pcc", "par"}),
        (
            ["--method", "saq-sam", "--no-par"],
            "W4A4-saq-sam-nopar",
            {"bimodal", "agq", "recon", "pcc"},
        ),
        (["--method", "mse"], "W4A4-mse", set()),
    ],
)
def test_quantize_switches_give_the_methods_configs(switches, name, parts):
    args = build_parser().parse_args([
        "quantize", "--model", "tiny", "--calib-images", "calib", "--output", "q.samq",
        "--w-bits", "4", "--a-bits", "4", *switches,
    ])  # fmt: skip
    cfg = quant_config_from_args(args)
    assert cfg.name == name
    on = {k for k in ("bimodal", "agq", "recon", "pcc", "par", "mac") if getattr(cfg, k)}
    assert on == parts
    assert cfg == QuantConfig.for_method(cfg.method, 4, 4, **{k: k in parts for k in
                                         ("bimodal", "agq", "recon", "mac", "par", "pcc")},
                                         jcar=True if "--jcar" in switches else None, calib=cfg.calib)  # fmt: skip


def test_quantize_preset_gives_the_named_config_and_refuses_method_switches():
    base = ["quantize", "--model", "tiny", "--calib-images", "calib", "--output", "q.samq"]
    args = build_parser().parse_args([*base, "--preset", "W8A8-int8-attn", "--calib-size", "4"])
    cfg = quant_config_from_args(args)
    assert cfg == QuantConfig.preset("W8A8-int8-attn", calib=cfg.calib)
    assert cfg.calib.num_images == 4
    for extra in (["--w-bits", "4"], ["--method", "ptq4sam"], ["--no-recon"], ["--pcc"]):
        args = build_parser().parse_args([*base, "--preset", "W8A8-int8", *extra])
        with pytest.raises(ValueError, match="--preset W8A8-int8 sets the whole config"):
            quant_config_from_args(args)
    with pytest.raises(ValueError, match="unknown preset 'W9A9'"):
        quant_config_from_args(build_parser().parse_args([*base, "--preset", "W9A9"]))


@pytest.mark.slow
def test_quantize_then_eval_quantized(tmp_path, calib_dir, tiny_ckpt, capsys):
    out = tmp_path / "q.samq"
    args = [
        "quantize", "--model", "tiny", "--checkpoint", str(tiny_ckpt),
        "--calib-images", str(calib_dir / "images"),
        "--calib-annotations", str(calib_dir / "annotations.json"),
        "--calib-size", "2", "--method", "minmax", "--w-bits", "8", "--a-bits", "8",
        "--output", str(out), "--no-progress",
    ]  # fmt: skip
    assert main(args) == 0
    assert out.is_file()
    text = capsys.readouterr().out
    assert "quantization summary: W8A8-minmax" in text and "calibrated on 2 images" in text
    with pytest.raises(SystemExit) as err:  # refuses to overwrite without --force
        main(args)
    assert err.value.code == 2
    assert "exists" in capsys.readouterr().err
    assert main([*args, "--force"]) == 0
    metrics = tmp_path / "m.json"
    rc = main([
        "eval", "--quantized", str(out), "--checkpoint", str(tiny_ckpt),
        "--images", str(calib_dir / "images"), "--annotations", str(calib_dir / "annotations.json"),
        "--output", str(metrics), "--no-progress",
    ])  # fmt: skip
    assert rc == 0
    record = json.loads(metrics.read_text())
    for key in ("miou", "mask_ap", "mask_ap50", "mask_ap75", "num_images", "num_instances"):
        assert key in record
    assert record["fidelity_miou"] is not None and record["fidelity_miou"] > 0.9
    assert record["config"]["quant"]["w_bits"] == 8


@pytest.mark.unit
def test_quantize_bad_bits_is_one_line_error(tmp_path, calib_dir, tiny_ckpt, capsys):
    with pytest.raises(SystemExit) as err:
        main([
            "quantize", "--model", "tiny", "--checkpoint", str(tiny_ckpt),
            "--calib-images", str(calib_dir / "images"), "--w-bits", "9",
            "--output", str(tmp_path / "x.samq"),
        ])  # fmt: skip
    assert err.value.code == 2
    assert "w_bits=9 is out of range" in capsys.readouterr().err


@pytest.mark.unit
def test_quantize_missing_folder(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main([
            "quantize", "--model", "tiny", "--calib-images", str(tmp_path / "nope"),
            "--output", str(tmp_path / "x.samq"),
        ])  # fmt: skip
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.slow
def test_demo_rows(monkeypatch, tiny_ckpt):
    """The demo's table on a small run: FP first, then one row per setting, fidelity for each."""
    import samq_fx.demo as demo

    monkeypatch.setattr(demo, "build_sam", lambda name: samq_fx.build_sam(name, tiny_ckpt))
    report = demo.run_demo(num_val=3, num_calib=2, bits=(8, 4), methods=("minmax",))
    assert [r.setting for r in report.rows] == ["FP32", "W8A8", "W4A4"]
    assert report.rows[0].fidelity is None
    assert all(0 <= r.fidelity <= 1 for r in report.rows[1:])
    assert report.rows[1].fidelity >= report.rows[2].fidelity
    assert "mask AP" in report.table()
