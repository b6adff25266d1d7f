"""annotate_roles: every attention, MLP and convolution of SAM is found, named and counted."""

from __future__ import annotations

import copy

import pytest
import torch

import samq_fx
from samq_fx.meta import ATTN_KINDS, get_info, nodes_with_role
from samq_fx.models import ARCHS, sam_from_arch
from samq_fx.passes.annotate_roles import RoleError, annotate_roles, expected_roles
from samq_fx.pipeline import PassContext, PassError, run_passes


def _skeleton(name: str):
    """Structure only: parameters on the meta device, so vit_h captures in seconds."""
    with torch.device("meta"):
        return sam_from_arch(ARCHS[name])


def _kinds(gm) -> dict[str, int]:
    out: dict[str, int] = {}
    for n in nodes_with_role(gm, "attn_softmax"):
        kind = get_info(n).attn_kind
        out[kind] = out.get(kind, 0) + 1
    return out


@pytest.mark.unit
def test_tiny_roles(tiny_random_captured):
    enc, dec = tiny_random_captured.image_encoder, tiny_random_captured.mask_decoder
    assert _kinds(enc) == {"enc_window": 2, "enc_global": 2}
    assert _kinds(dec) == {
        "dec_self": 2,
        "token_to_image": 2,
        "image_to_token": 2,
        "final_token_to_image": 1,
    }
    # global blocks are exactly the configured ones
    global_blocks = sorted(
        get_info(n).block
        for n in nodes_with_role(enc, "attn_softmax")
        if get_info(n).attn_kind == "enc_global"
    )
    assert global_blocks == list(ARCHS["tiny"].encoder_global_attn_indexes)


@pytest.mark.unit
def test_roles_point_at_the_right_modules(tiny_random_captured):
    dec = tiny_random_captured.mask_decoder
    paths = {
        (get_info(n).role, get_info(n).attn_kind, get_info(n).block): get_info(n).module_path
        for n in nodes_with_role(dec, "q_proj", "k_proj", "v_proj", "out_proj")
    }
    assert (
        paths[("k_proj", "token_to_image", 0)]
        == "transformer.layers.0.cross_attn_token_to_image.k_proj"
    )
    assert (
        paths[("q_proj", "image_to_token", 1)]
        == "transformer.layers.1.cross_attn_image_to_token.q_proj"
    )
    assert paths[("v_proj", "dec_self", 1)] == "transformer.layers.1.self_attn.v_proj"
    assert (
        paths[("out_proj", "final_token_to_image", 2)]
        == "transformer.final_attn_token_to_image.out_proj"
    )
    enc = tiny_random_captured.image_encoder
    qkv = {get_info(n).block: get_info(n).module_path for n in nodes_with_role(enc, "qkv_proj")}
    assert qkv == {i: f"blocks.{i}.attn.qkv" for i in range(4)}
    fc1 = {get_info(n).module_path for n in nodes_with_role(enc, "mlp_fc1")}
    assert fc1 == {f"blocks.{i}.mlp.lin1" for i in range(4)}
    hyper = {get_info(n).module_path for n in nodes_with_role(dec, "hypernet_fc")}
    assert hyper == {
        f"output_hypernetworks_mlps.{i}.layers.{j}" for i in range(4) for j in range(3)
    }


@pytest.mark.unit
def test_every_call_node_has_a_record(tiny_random_captured):
    for part in ("image_encoder", "mask_decoder"):
        gm = getattr(tiny_random_captured, part)
        for node in gm.graph.nodes:
            if node.op == "call_function":
                info = get_info(node)
                assert info is not None and info.part == part, node.name
                assert info.attn_kind in (None, *ATTN_KINDS)


@pytest.mark.parametrize("name", ["vit_b", "vit_l", "vit_h"])
@pytest.mark.slow
def test_official_architectures(name):
    """Role counts follow the module structure for every official configuration."""
    arch = ARCHS[name]
    captured = samq_fx.capture(_skeleton(name))
    table = samq_fx.roles(captured)
    enc = table.counts("image_encoder")
    assert enc["qkv_proj"] == enc["attn_softmax"] == arch.encoder_depth
    assert enc["rel_pos"] == 2 * arch.encoder_depth
    g = len(arch.encoder_global_attn_indexes)
    assert _kinds(captured.image_encoder) == {"enc_global": g, "enc_window": arch.encoder_depth - g}
    assert _kinds(captured.mask_decoder) == {
        "dec_self": 2,
        "token_to_image": 2,
        "image_to_token": 2,
        "final_token_to_image": 1,
    }
    assert table.counts("mask_decoder")["hypernet_fc"] == 12


@pytest.mark.unit
def test_vit_b_counts_match_module_tree(vit_b_random):
    captured = samq_fx.capture(_skeleton("vit_b"))
    n_linear_enc = sum(isinstance(m, torch.nn.Linear) for m in vit_b_random.image_encoder.modules())
    counts = samq_fx.roles(captured).counts("image_encoder")
    assert (
        counts["qkv_proj"] + counts["out_proj"] + counts["mlp_fc1"] + counts["mlp_fc2"]
        == n_linear_enc
    )
    n_linear_dec = sum(isinstance(m, torch.nn.Linear) for m in vit_b_random.mask_decoder.modules())
    dec = samq_fx.roles(captured).counts("mask_decoder")
    roles = (
        "q_proj",
        "k_proj",
        "v_proj",
        "out_proj",
        "mlp_fc1",
        "mlp_fc2",
        "hypernet_fc",
        "iou_head_fc",
    )
    assert sum(dec[r] for r in roles) == n_linear_dec


@pytest.mark.unit
def test_missing_role_is_named(tiny_random_captured):
    gm = copy.deepcopy(tiny_random_captured.image_encoder)
    softmax = nodes_with_role(gm, "attn_softmax")[0]
    softmax.target = torch.ops.aten.sigmoid.default  # an attention SAM cannot have
    softmax.args = softmax.args[:1]
    gm.recompile()
    ctx = PassContext(part="image_encoder", arch=ARCHS["tiny"])
    with pytest.raises(RoleError, match=r"attn_softmax: expected 4, found 3"):
        annotate_roles(gm, ctx)
    with pytest.raises(
        PassError,
        match=r"while running 'annotate_roles' on image_encoder after \['canonicalize', 'annotate_roles'\]",
    ):
        run_passes(gm, ctx, [annotate_roles])


@pytest.mark.unit
def test_expected_roles_track_architecture():
    want = expected_roles(PassContext(part="image_encoder", arch=ARCHS["vit_h"]))
    assert want["kind:enc_global"] == 4 and want["kind:enc_window"] == 28
    assert expected_roles(PassContext(part="mask_decoder", arch=ARCHS["tiny"]))["q_proj"] == 7


@pytest.mark.unit
def test_role_table_prints(tiny_random_captured):
    table = samq_fx.roles(tiny_random_captured)
    text = str(table)
    assert text.splitlines()[0].split() == [
        "part",
        "block",
        "attn_kind",
        "role",
        "module_path",
        "op",
        "shape",
        "node",
    ]
    assert "final_token_to_image" in text and "enc_global" in text
    assert len(table.to_dicts()) == len(table) > 100


@pytest.mark.unit
def test_roles_of_uncaptured_model_is_an_error(tiny_random):
    with pytest.raises(TypeError, match="capture"):
        samq_fx.roles(tiny_random)


@pytest.mark.unit
def test_pass_log_records_each_pass(tiny_random_captured):
    log = tiny_random_captured.mask_decoder.samq_pass_log
    assert [r.name for r in log] == ["canonicalize", "annotate_roles"]
    assert log[1].result.counts["attentions"] == 7
    assert "annotate_roles" in log[1].summary()
