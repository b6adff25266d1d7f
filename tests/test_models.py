"""build_sam and checkpoint loading: right architectures, clear errors for wrong files."""

from __future__ import annotations

import pytest
import torch

import samq_fx
from samq_fx.models import ARCHS, CheckpointError, SamArch, arch_of, sam_from_arch


@pytest.mark.unit
def test_tiny_arch_has_every_sam_feature(tiny_random):
    arch = arch_of(tiny_random)
    assert arch == ARCHS["tiny"]
    assert arch.img_size >= 256
    windows = [b.window_size for b in tiny_random.image_encoder.blocks]
    assert 0 in windows and any(w > 0 for w in windows)  # windowed and global attention
    assert tiny_random.mask_decoder.transformer.depth == 2
    n_params = sum(p.numel() for p in tiny_random.parameters())
    assert n_params < 5_000_000


@pytest.mark.unit
def test_arch_round_trips_through_dict():
    for arch in ARCHS.values():
        assert SamArch.from_dict(arch.to_dict()) == arch
    with pytest.raises(ValueError, match="unknown SamArch keys"):
        SamArch.from_dict({**ARCHS["tiny"].to_dict(), "depth": 3})


@pytest.mark.unit
def test_arch_of_reads_official_structure():
    with torch.device("meta"):
        sam = sam_from_arch(ARCHS["vit_l"])
    assert arch_of(sam) == ARCHS["vit_l"]


@pytest.mark.unit
def test_unknown_model_type_lists_choices():
    with pytest.raises(ValueError, match="vit_b"):
        samq_fx.build_sam("vit_x")


@pytest.mark.unit
def test_checkpoint_round_trip(tmp_path, tiny_random):
    path = tmp_path / "tiny.pth"
    torch.save(tiny_random.state_dict(), path)
    loaded = samq_fx.build_sam("tiny", checkpoint=path)
    for (k, a), b in zip(tiny_random.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), k


@pytest.mark.unit
def test_missing_checkpoint_names_file(tmp_path):
    with pytest.raises(CheckpointError, match=r"nope\.pth.*does not exist.*vit_b"):
        samq_fx.build_sam("vit_b", checkpoint=tmp_path / "nope.pth")


@pytest.mark.unit
def test_corrupt_checkpoint_names_file(tmp_path, tiny_random):
    path = tmp_path / "broken.pth"
    torch.save(tiny_random.state_dict(), path)
    path.write_bytes(path.read_bytes()[:1000])  # truncated download
    with pytest.raises(CheckpointError, match=r"broken\.pth.*cannot be read"):
        samq_fx.build_sam("tiny", checkpoint=path)


@pytest.mark.unit
def test_mismatched_checkpoint_names_architecture_and_keys(tmp_path):
    """vit_l weights given for vit_b: the error names the file, both archs and the keys."""
    with torch.device("meta"):
        vit_l = sam_from_arch(ARCHS["vit_l"])
    # a state dict with vit_l's keys and shapes, cheap to write: zero-size storage is not
    # possible for real shapes, so store 1-element expanded tensors
    state = {k: torch.zeros(1).expand(v.shape) for k, v in vit_l.state_dict().items()}
    path = tmp_path / "sam_vit_l_0b3195.pth"
    torch.save(state, path)
    with pytest.raises(CheckpointError) as err:
        samq_fx.build_sam("vit_b", checkpoint=path)
    msg = str(err.value)
    assert "sam_vit_l_0b3195.pth" in msg and "'vit_b'" in msg
    assert "looks like a vit_l checkpoint" in msg
    assert "image_encoder.patch_embed.proj.weight" in msg or "image_encoder.pos_embed" in msg
    assert "unexpected keys" in msg  # vit_l has blocks 12..23


@pytest.mark.unit
def test_non_state_dict_file(tmp_path):
    path = tmp_path / "list.pth"
    torch.save([1, 2, 3], path)
    with pytest.raises(CheckpointError, match="not a state dict"):
        samq_fx.build_sam("tiny", checkpoint=path)
