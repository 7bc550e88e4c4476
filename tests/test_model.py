"""avmae.py: every variant builds, trains and obeys the paper's definitions."""
import itertools
import math

import pytest
import torch
import torch.nn as nn

import avmae
from conftest import tiny_batch, tiny_config


def _valid(**kw):
    try:
        avmae.check_config(tiny_config(**kw))
        return True
    except ValueError:
        return False


PAPER_ENCODERS, PAPER_OBJECTIVES = ("early", "separate", "mid",
                                    "shared"), ("joint", "inpaint_v", "inpaint_a", "inpaint_both")
AV_VARIANTS = [dict(encoder=e, decoder=d, objective=o)
               for e, d, o in itertools.product(PAPER_ENCODERS, avmae.DECODERS, PAPER_OBJECTIVES)
               if _valid(encoder=e, decoder=d, objective=o)]
# the relatives as train.py selects them ; mavil2 learns a teacher's features (random here)
RELATIVES = {k: v for k, v in avmae.VARIANTS.items() if k != "avmae"}
VARIANTS = AV_VARIANTS + [dict(modalities="a"), dict(modalities="v")] + list(RELATIVES.values())
IDS = ["-".join(map(str, v.values())) for v in AV_VARIANTS] + ["audio-only",
                                                               "video-only"] + list(RELATIVES)
# every other valid combination of the model's choices (new encoders x decoders x objectives)
# what an encoder cannot go without (its unimodal norms)
NEEDS = {"cavmae": dict(contrast_inter=0.01)}
EVERY = [dict(encoder=e, decoder=d, objective=o, **NEEDS.get(e, {}))
         for e, d, o in itertools.product(avmae.ENCODERS, avmae.DECODERS, avmae.OBJECTIVES)
         if (e not in PAPER_ENCODERS or o not in PAPER_OBJECTIVES)
         and _valid(encoder=e, decoder=d, objective=o, mask_ratio_a=0.5, **NEEDS.get(e, {}))]


def teacher_targets(model, B, seed=0):
    """Random stand-ins for a teacher's fusion outputs (MAViL stage 2), or None for pixel
    targets."""
    if model.cfg.target != "teacher":
        return None
    g = torch.Generator().manual_seed(seed)
    return {m: torch.randn(B, model.n[m], model.cfg.width, generator=g) for m in model.cfg.mods}


def test_variant_table():
    # 4 encoders x 3 decoders minus separate+separate = 11 joint models; inpainting needs an early
    # or mid encoder (2 x 3 decoders x 2 single-direction objectives = 12) and inpaint_both refuses
    # the early decoder (2 x 2 = 4): 27 audiovisual variants in the paper's tables.
    joint = [v for v in AV_VARIANTS if v["objective"] == "joint"]
    assert len(joint) == 11 and len(AV_VARIANTS) == 27
    assert {v["encoder"] for v in AV_VARIANTS if v["objective"] != "joint"} == {"early", "mid"}
    assert set(RELATIVES) == {"mavil", "mavil_mbt", "mavil2", "cavmae", "avme"} and len(EVERY) > 30


@pytest.mark.parametrize("variant", VARIANTS, ids=IDS)
def test_shapes_loss_and_gradients(variant):
    check_shapes_and_gradients(variant)


@pytest.mark.parametrize("variant", EVERY, ids=["-".join(map(str, v.values())) for v in EVERY])
def test_every_other_combination_builds_and_trains(variant):
    check_shapes_and_gradients(variant)


def check_shapes_and_gradients(variant):
    cfg = tiny_config(**variant)
    model = avmae.AVMAE(cfg)
    x = tiny_batch(cfg, B=3)
    out = model(**x, targets=teacher_targets(model, 3))
    assert torch.isfinite(out["loss"])
    targets = avmae.OBJECTIVES[cfg.objective]
    for m in cfg.mods:
        assert out[f"mask_{m}"].shape == (3, model.n[m])
    for t in (t for t in targets if t in cfg.mods):
        pred, ids = out[f"pred_{t}"], out[f"ids_{t}"]
        dim = cfg.width if cfg.target == "teacher" else model.patches[t].dim
        assert pred.shape == (3, ids.shape[1], dim) and torch.isfinite(out[f"loss_{t}"])
        if cfg.objective in ("joint", "video"):  # predictions are exactly the masked patches
            assert torch.equal(ids, out[f"mask_{t}"].nonzero()[:, 1].view(3, -1))
    assert not any(f"pred_{m}" in out for m in cfg.mods if m not in targets)
    for term, weight in (("loss_inter", cfg.contrast_inter), ("loss_intra", cfg.contrast_intra)):
        assert (term in out) == (weight > 0) and (weight == 0 or torch.isfinite(out[term]))
    out["loss"].backward()
    silent = [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert not silent, f"parameters without gradient: {silent}"


# one case per encoder and per decoder family, one inpainting, one unimodal and the relatives' own
# mechanisms (contrast, teacher targets, cross-attention); every other variant's gradients reach
# every parameter (test_shapes_loss_and_gradients), which is the cheap half of the same property
OVERFIT = {
    "mid-shared-joint": dict(encoder="mid", decoder="shared"),
    "early-early-joint": dict(encoder="early", decoder="early"),
    "separate-shared-joint": dict(encoder="separate", decoder="shared"),
    "shared-separate-joint": dict(encoder="shared", decoder="separate"),
    "mid-separate-inpaint_both": dict(encoder="mid", decoder="separate", objective="inpaint_both"),
    "audio-only": dict(modalities="a"), "mavil": RELATIVES["mavil"], "mavil2": RELATIVES["mavil2"],
    "avme": RELATIVES["avme"]}


@pytest.mark.slow(8)
@pytest.mark.parametrize("variant", OVERFIT.values(), ids=OVERFIT)
def test_overfits_one_batch(variant):
    cfg = tiny_config(**variant)
    model = avmae.AVMAE(cfg)
    x = tiny_batch(cfg, B=2)
    targets = teacher_targets(model, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, betas=(0.9, 0.95), weight_decay=0.0)
    losses = []
    for _ in range(150):  # fresh random masks every step: the model must learn the two clips
        loss = model(**x, targets=targets)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if len(losses) >= 10 and sum(losses[-10:]) / 10 < losses[0] / 3:
            break  # (70-135 steps, by the variant)
    first, last = losses[0], sum(losses[-10:]) / 10
    assert last < first / 3, f"loss {first:.3f} -> {last:.3f} in {len(losses)} steps"


# -----------------------------------------------------------------------------
# masking


def test_mask_counts_and_independence_at_paper_shapes():
    # paper input shapes: 1568 video, 400 audio tokens
    model = avmae.AVMAE(avmae.make_config("tiny"))
    masks = model.sample_masks(8)
    for m, n, ratio in (("v", 1568, 0.9), ("a", 400, 0.5)):
        keep, drop = masks[m]
        assert drop.shape == (8, math.floor(ratio * n)) and keep.shape == (
            8, n - math.floor(ratio * n))
        both = torch.cat([keep, drop], 1).sort(1).values
        assert torch.equal(both, torch.arange(n).expand(8, n))  # a partition of the tokens
        assert len({tuple(d.tolist()) for d in drop}) == 8  # every example has its own mask
    assert drop.shape[1] == 200 and masks["v"][1].shape[1] == 1411


def test_audioset_mask_ratio_count():
    cfg = tiny_config(audio_frames=1000, mel_bins=128, audio_patch_t=16, audio_patch_f=16,
                      mask_ratio_a=0.7)
    keep, drop = avmae.AVMAE(cfg).sample_masks(2)["a"]
    assert keep.shape[1] + drop.shape[1] == 496 and drop.shape[1] == math.floor(0.7 * 496)


def test_tube_masking_repeats_the_spatial_mask():
    cfg = tiny_config(mask_type_v="tube")
    model = avmae.AVMAE(cfg)
    gt, gh, gw = model.patches["v"].grid
    mask = avmae.ids_to_mask(model.sample_masks(4)["v"][1], model.n["v"]).view(4, gt, gh, gw)
    assert torch.equal(mask, mask[:, :1].expand_as(mask))
    assert torch.all(mask[:, 0].sum((1, 2)) == math.floor(0.9 * gh * gw))


@pytest.mark.parametrize("kind,axis", [("time", 1), ("freq", 0)])
def test_time_and_frequency_masking(kind, axis):
    model = avmae.AVMAE(tiny_config(mask_type_a=kind))
    gt, gf = model.patches["a"].grid
    mask = avmae.ids_to_mask(model.sample_masks(4)["a"][1], model.n["a"]).view(4, gt, gf)
    # a masked time column covers every frequency patch (and a frequency row every time patch)
    full = mask.amin(dim=1 + axis)
    assert torch.equal(mask, full.unsqueeze(1 + axis).expand_as(mask))
    assert torch.all(full.sum(1) == math.floor(0.5 * (gt if kind == "time" else gf)))


# -----------------------------------------------------------------------------
# loss


def test_loss_ignores_visible_patches_and_sees_masked_ones():
    cfg = tiny_config()
    model = avmae.AVMAE(cfg)
    x = tiny_batch(cfg)
    patches = model.patchify(x)
    masks = model.sample_masks(2)
    preds = model.forward_decoder(model.forward_encoder(patches, masks), masks)
    base = model.forward_loss(patches, preds, masks)["loss"]
    for m in cfg.mods:
        keep, drop = masks[m]
        changed = {k: p.clone() for k, p in patches.items()}
        changed[m][0, keep[0, 0]] += 5.0  # a visible patch of example 0
        assert torch.equal(model.forward_loss(changed, preds, masks)["loss"], base)
        changed[m][0, drop[0, 0]] += 5.0  # a masked patch of example 0
        assert not torch.allclose(model.forward_loss(changed, preds, masks)["loss"], base)


def test_modalities_weigh_equally():
    model = avmae.AVMAE(tiny_config())
    out = model(**tiny_batch(model.cfg))
    assert torch.allclose(out["loss"], 0.5 * (out["loss_a"] + out["loss_v"]))


def test_norm_pix_loss_normalises_each_target_patch():
    torch.manual_seed(1)
    pred, patches = torch.randn(2, 3, 16), torch.randn(2, 5, 16) * 7 + 3
    ids = torch.tensor([[0, 2, 4], [1, 3, 4]])
    t = avmae.gather_tokens(patches, ids)
    t = (t - t.mean(-1, keepdim=True)) / (t.var(-1, keepdim=True) + 1e-6).sqrt()
    assert torch.allclose(avmae.recon_loss(pred, patches, ids, True), ((pred - t) ** 2).mean())
    assert torch.allclose(avmae.recon_loss(pred, patches, ids, False),
                          ((pred - avmae.gather_tokens(patches, ids)) ** 2).mean())


# -----------------------------------------------------------------------------
# tokenisers


def test_patchify_roundtrip():
    model = avmae.AVMAE(tiny_config())
    x = tiny_batch(model.cfg)
    for m, inp in x.items():
        p = model.patches[m]
        assert torch.equal(p.unpatchify(p.patchify(inp)), inp)
    ap = model.patches["a"]
    # frames that fill no patch fall off
    odd = torch.randn(2, model.cfg.audio_frames + 5, model.cfg.mel_bins)
    assert torch.equal(ap.unpatchify(ap.patchify(odd)), odd[:, : model.cfg.audio_frames])


def test_video_tokeniser_is_a_tubelet_conv3d_in_t_h_w_order():
    cfg = tiny_config()
    model = avmae.AVMAE(cfg)
    pt, ps, C = cfg.tubelet, cfg.patch_size, cfg.in_chans
    lin = model.patch_embed["v"]
    conv = nn.Conv3d(C, cfg.width, (pt, ps, ps), stride=(pt, ps, ps))
    # features are (t, h, w, c) within a tubelet; Conv3d weights are (D, c, t, h, w)
    conv.weight.data = lin.weight.data.view(cfg.width, pt, ps, ps,
                                            C).permute(0, 4, 1, 2, 3).contiguous()
    conv.bias.data = lin.bias.data.clone()
    v = tiny_batch(cfg)["v"]
    ref = conv(v).flatten(2).transpose(1, 2)  # (B, T'*H'*W', D) in (t, h, w) order
    assert torch.allclose(lin(model.patches["v"].patchify(v)), ref, atol=1e-5)


def test_one_hot_pixel_lands_in_its_token_and_feature():
    cfg = tiny_config()
    model = avmae.AVMAE(cfg)
    vp, ap = model.patches["v"], model.patches["a"]
    gt, gh, gw = vp.grid
    t, h, w, c = 3, 17, 9, 2
    v = torch.zeros(1, cfg.in_chans, cfg.num_frames, cfg.image_size, cfg.image_size)
    v[0, c, t, h, w] = 1.0
    tok = (t // 2) * gh * gw + (h // 8) * gw + (w // 8)
    feat = (((t % 2) * 8 + h % 8) * 8 + w % 8) * cfg.in_chans + c
    p = vp.patchify(v)
    assert p.nonzero().tolist() == [[0, tok, feat]]
    # the embedding of that video differs from the embedding of zeros at exactly that token
    diff = (model.patch_embed["v"](p) - model.patch_embed["v"](torch.zeros_like(p))).abs().sum(-1)
    assert diff.nonzero()[:, 1].tolist() == [tok]
    a = torch.zeros(1, cfg.audio_frames, cfg.mel_bins)
    a[0, 21, 30] = 1.0  # time frame 21, mel bin 30
    assert ap.patchify(a).nonzero().tolist() == [[0, (21 // 8) * ap.grid[1] + 30 // 8,
                                                  (21 % 8) * 8 + 30 % 8]]


def test_embedding_visible_patches_equals_embedding_all_then_gathering():
    model = avmae.AVMAE(tiny_config())
    patches = model.patchify(tiny_batch(model.cfg))
    masks = model.sample_masks(2)
    vis = model.embed(patches, masks)
    full = model.embed(patches, None)
    for m in patches:
        assert torch.allclose(vis[m], avmae.gather_tokens(full[m], masks[m][0]), atol=1e-6)


def test_sincos_positions():
    pe = avmae.sincos_1d(400, 64)
    assert pe.shape == (400, 64)
    assert torch.allclose(pe[0], torch.cat([torch.zeros(32), torch.ones(32)]))
    assert torch.allclose(pe[5, 0], torch.tensor(math.sin(5.0))) and torch.allclose(
        pe[5, 32], torch.tensor(math.cos(5.0)))
    assert len({tuple(r.tolist()) for r in pe.round(decimals=4)}) == 400  # every position distinct


# -----------------------------------------------------------------------------
# decoder layouts, inpainting layouts, fusion semantics


def test_gather_layout_equals_unshuffle_layout():
    a = avmae.AVMAE(tiny_config(decoder_layout="gather"))
    b = avmae.AVMAE(tiny_config(decoder_layout="unshuffle"))
    b.load_state_dict(a.state_dict())
    x = tiny_batch(a.cfg)
    masks = a.sample_masks(2)
    oa, ob = a(**x, masks=masks), b(**x, masks=masks)
    for m in "av":
        assert torch.equal(oa[f"ids_{m}"], ob[f"ids_{m}"])
        assert torch.allclose(oa[f"pred_{m}"], ob[f"pred_{m}"], atol=1e-5)
    oa["loss"].backward()
    ob["loss"].backward()
    for (n, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert torch.allclose(pa.grad, pb.grad, atol=1e-5, rtol=1e-4), n


def test_unshuffle_puts_every_token_at_its_raster_position():
    B, K, M, D = 2, 3, 5, 4
    ids = torch.stack([torch.randperm(K + M) for _ in range(B)])
    keep, drop = ids[:, :K], ids[:, K:]
    x_vis, token, pos = torch.randn(B, K, D), torch.randn(D), torch.randn(K + M, D)
    z = avmae.unshuffle(x_vis, token, pos, keep, drop)
    for b in range(B):
        for k in range(K):
            assert torch.allclose(z[b, keep[b, k]], x_vis[b, k] + pos[keep[b, k]])
        for j in range(M):
            assert torch.allclose(z[b, drop[b, j]], token + pos[drop[b, j]])


def test_inpainting_paper_layout_supervises_the_last_raster_patches():
    model = avmae.AVMAE(tiny_config(encoder="early", objective="inpaint_v",
                                    inpaint_layout="paper"))
    out = model(**tiny_batch(model.cfg))
    n_v, k_a = model.n["v"], model.n["a"] - math.floor(0.5 * model.n["a"])
    # m_v repeated n_v - (1 - alpha_a) n_a times (Sec. 3.4)
    assert out["pred_v"].shape[1] == n_v - k_a
    assert torch.equal(out["ids_v"], torch.arange(k_a, n_v).expand(2, -1))
    assert "pred_a" not in out and "loss_a" not in out


def test_inpainting_masked_layout_supervises_masked_patches():
    model = avmae.AVMAE(tiny_config(encoder="mid", objective="inpaint_both",
                                    inpaint_layout="masked"))
    masks = model.sample_masks(2)
    out = model(**tiny_batch(model.cfg), masks=masks)
    for t in "av":
        assert torch.equal(out[f"ids_{t}"], masks[t][1])


def test_inpainting_decoder_never_sees_the_targets_own_tokens():
    # video from audio: the decoder's context is the encoded audio alone (video reaches it only
    # through the encoder's fusion), so replacing the encoded video tokens leaves the prediction
    # unchanged
    model = avmae.AVMAE(tiny_config(encoder="mid", decoder="separate", objective="inpaint_v"))
    patches = model.patchify(tiny_batch(model.cfg))
    masks = model.sample_masks(2)
    e = model.forward_encoder(patches, masks)
    p1 = model.forward_decoder(e, masks)["v"][0]
    p2 = model.forward_decoder({"a": e["a"], "v": torch.randn_like(e["v"])}, masks)["v"][0]
    assert torch.equal(p1, p2)


@pytest.mark.parametrize("encoder,mixes", [("early", True), ("mid", True), ("separate", False),
                                           ("shared", False)])
def test_encoder_fusion(encoder, mixes):
    model = avmae.AVMAE(tiny_config(encoder=encoder)).eval()
    x = tiny_batch(model.cfg)
    e1 = model.encode(**x)
    e2 = model.encode(a=x["a"], v=torch.rand_like(x["v"]))
    assert e1["a"].shape == (2, model.n["a"], model.cfg.width)
    assert (not torch.allclose(e1["a"], e2["a"])) == mixes


def test_shared_encoder_ties_weights():
    model = avmae.AVMAE(tiny_config(encoder="shared", decoder="shared"))
    x = torch.randn(2, 7, model.cfg.width)
    out = model.encoder({"a": x, "v": x})
    assert torch.equal(out["a"], out["v"])
    assert model.num_params("encoder") == model.num_params("encoder.shared")


def test_unimodal_models_have_one_stream():
    for m in "av":
        model = avmae.AVMAE(tiny_config(modalities=m, encoder="mid", decoder="shared"))
        assert model.cfg.encoder == model.cfg.decoder == "separate"
        assert set(model.encoder.streams) == {m} and set(model.decoder.head) == {m}
        out = model(**tiny_batch(model.cfg))
        assert set(k for k in out if k.startswith("loss_")) == {f"loss_{m}"}
        with pytest.raises(ValueError, match="takes modalities"):
            model(**tiny_batch(tiny_config()))


def test_learned_positions_and_norm_pix_train():
    model = avmae.AVMAE(tiny_config(pos_embed="learned", norm_pix_loss=True))
    assert "enc_pos.a.table" in dict(model.named_parameters())
    out = model(**tiny_batch(model.cfg))
    out["loss"].backward()
    assert model.enc_pos["v"].table.grad.abs().sum() > 0
    assert model.decoder.pos["a"].table.grad.abs().sum() > 0
    # sin-cos tables are fixed: never in a checkpoint
    assert not any("table" in k for k in avmae.AVMAE(tiny_config()).state_dict())


def test_reconstruction_pastes_visible_patches_back():
    model = avmae.AVMAE(tiny_config(norm_pix_loss=True))
    x = tiny_batch(model.cfg)
    out = model(**x)
    rec = avmae.reconstruct(model, x, out)
    for m in "av":
        orig, masked, recon = rec[m]
        assert torch.equal(orig, x[m]) and orig.shape == masked.shape == recon.shape
        vis = 1 - out[f"mask_{m}"]
        p = model.patches[m]
        assert torch.equal(p.patchify(recon) * vis[..., None], p.patchify(x[m]) * vis[..., None])
        assert torch.equal(p.patchify(masked) * (1 - vis[..., None]),
                           torch.zeros_like(p.patchify(masked)))


# -----------------------------------------------------------------------------
# the paper model's size (README table): counts derived by hand


def _vit_block(d, hidden):  # 2 LayerNorms + qkv + proj + MLP, all with biases
    return 2 * 2 * d + (d * 3 * d + 3 * d) + (d * d + d) + (d * hidden + hidden) + (hidden * d + d)


def test_vit_base_parameter_counts():
    with torch.device("meta"):  # shapes only: no memory, no init time
        # mid-fusion S=2, shared decoder, paper shapes
        model = avmae.AVMAE(avmae.make_config("base"))
    assert _vit_block(768, 3072) == 7_087_872 and _vit_block(384, 1536) == 1_774_464
    hand = {
        "encoder.streams.a": 10 * 7_087_872 + 1536,  # 10 separate layers + the stream's LayerNorm
        "encoder.streams.v": 10 * 7_087_872 + 1536,
        "encoder.joint": 2 * 7_087_872 + 1536,  # S = 2 joint layers + final LayerNorm
        "patch_embed.v": 1536 * 768 + 768,  # 2x16x16x3 tubelet
        "patch_embed.a": 256 * 768 + 768,  # 16x16 patch
        "decoder.net": 4 * 1_774_464 + 768,
        "decoder.embed": 2 * (768 * 384 + 384),
        "decoder.mask_token": 2 * 384,
        "decoder.head.v": 384 * 1536 + 1536,
        "decoder.head.a": 384 * 256 + 256,
    }
    for prefix, n in hand.items():
        assert abs(model.num_params(prefix) - n) <= 0.01 * n, prefix
    assert model.num_params() == sum(hand.values()) == 165_695_488
    # Table 9 counts the audiovisual MBT it finetunes: Base 172M, Large 611M. Ours at AudioSet's
    # inputs (527 classes, a head per modality) hold 172.30M / 607.54M; scenic's ViViT adds learned
    # position tables at the finetuning shapes (3136 video + 496 audio tokens, restored from the
    # pretraining and resized), which make the Large 611.26M but the Base 175.09M: the paper's two
    # figures do not count the same things (Base: without them, Large: with them)
    import finetune
    for size, width, ours, paper in (("base", 768, 172_303_390, 172e6),
                                     ("large", 1024, 607_544_350, 611e6)):
        with torch.device("meta"):
            mbt = finetune.build_model(finetune.FinetuneConfig(
                size=size, kernels="torch", mbt_head="separate", audio_frames=1000),
                {"label": 527}, None)
        assert sum(p.numel() for p in mbt.parameters()) == ours
        learned = (16 * 14 * 14 + 62 * 8) * width
        counted, not_counted = (ours, ours + learned) if size == "base" else (ours + learned, ours)
        assert abs(counted - paper) < 0.0025 * paper < abs(not_counted - paper)


# -----------------------------------------------------------------------------
# invalid combinations fail fast and say why


@pytest.mark.parametrize("overrides,rule", [
    (dict(encoder="separate", decoder="separate"), "two unrelated MAEs"),
    (dict(encoder="separate", objective="inpaint_v"), "encoder must mix modalities"),
    (dict(encoder="shared", objective="inpaint_both"), "encoder must mix modalities"),
    (dict(encoder="early", decoder="early", objective="inpaint_both"), "would concatenate both"),
    (dict(modalities="a", objective="inpaint_a"), "needs --modalities av"),
    (dict(objective="inpaint_v", decoder_layout="unshuffle"), "objective='joint' only"),
    (dict(encoder="mid", joint_layers=4), "1 <= joint_layers < depth"),
    (dict(encoder="transformer"),
     "encoder='transformer' is not one of early, separate, mid, shared"),
    (dict(decoder="mid"), "decoder='mid' is not one of early, separate, shared"),
    (dict(objective="inpaint"), "objective='inpaint' is not one of"),
    (dict(mask_type_v="time"), "mask_type_v='time' is not one of random, tube"),
    (dict(mask_ratio_v=1.0), "at least one must be masked (it is reconstructed) and one kept"),
    (dict(objective="video", encoder="xattn", decoder="early", mask_ratio_a=1.0), "and one kept"),
    (dict(image_size=30), "does not tile"),
    (dict(encoder="early", objective="inpaint_a", mask_ratio_v=0.0, mask_ratio_a=0.5),
     "leaving no mask token"),
    (dict(encoder="xattn", objective="inpaint_v"), "one direction of the xattn encoder"),
    (dict(modalities="v", contrast_inter=0.1), "contrast_inter relates audio and video"),
    (dict(encoder="early", objective="inpaint_a", num_frames=16, mask_ratio_v=0.1),
     "leaving no mask token"),
    (dict(kernels="cuda"), "kernels='cuda' is not one of auto, triton, torch"),
    (dict(layer_scale=-0.1), "layer_scale=-0.1 is LayerScale's first value, between 0 (off)"),
    # sizes and counts a model cannot have (a traceback from deep inside, or a silently empty
    # decoder, before this)
    (dict(width=-64), "width=-64: must be 1 or more"), (dict(heads=0), "heads=0: must be 1"),
    (dict(dec_depth=0), "dec_depth=0: must be 1 or more"),
    (dict(num_frames=0), "num_frames=0: must be 1"), (dict(mlp_ratio=0), "mlp_ratio=0: must be"),
    (dict(contrast_inter=-1), "contrast_inter=-1: must be 0 or more"),
    (dict(drop_path=1.0), "drop_path=1.0: must be a probability below 1"),  # (NaN before)
    # the rules of the inputs a model reads, and of no other
    (dict(modalities="a", image_size=30, audio_frames=4), "spectrogram 4x32 does not tile"),
])
def test_invalid_configs_say_why(overrides, rule):
    with pytest.raises(ValueError, match=rule.replace("(", r"\(").replace(")", r"\)")):
        avmae.AVMAE(tiny_config(**overrides))


def test_layer_scale_scales_every_encoder_branch_and_keeps_a_deep_stack_apart():
    # off by default (the papers): no parameter and no change; on, each encoder block's attention
    # and MLP branches start at layer_scale times their output, the decoder's are left as they are
    torch.manual_seed(0)
    plain = avmae.AVMAE(tiny_config(depth=12, joint_layers=2))
    torch.manual_seed(0)
    scaled = avmae.AVMAE(tiny_config(depth=12, joint_layers=2, layer_scale=0.1))
    sp, ss = plain.state_dict(), scaled.state_dict()
    extra = set(ss) - set(sp)
    assert all(torch.equal(sp[k], ss[k]) for k in sp)  # the same init otherwise
    assert len(extra) == 2 * 22 and all(k.startswith("encoder.") for k in extra)  # 10+10+2 blocks
    assert all(torch.equal(ss[k], torch.full_like(ss[k], 0.1)) for k in extra)
    blk, pblk = scaled.encoder.joint.blocks[0], plain.encoder.joint.blocks[0]
    x = torch.randn(2, 7, blk.norm1.normalized_shape[0])
    h = x + 0.1 * pblk.attn(pblk.norm1(x))
    torch.testing.assert_close(blk(x), h + 0.1 * pblk.mlp(pblk.norm2(h)))
    # why: at init attention is uniform, so every branch adds its clip's mean to every token, and
    # twelve full-size blocks pull the tokens together (rank collapse); small branches keep them
    # apart. |mean of the tokens| / mean |token| after the audio stream's 10 blocks:
    a = torch.randn(4, scaled.cfg.audio_frames, scaled.cfg.mel_bins)

    def collapse(model):
        with torch.no_grad():
            x = model.patch_embed["a"](model.patches["a"].patchify(a)) + model.enc_pos["a"]()
            for b in model.encoder.streams["a"].blocks:
                x = b(x)
        return float((x.mean(1).norm(dim=-1) / x.norm(dim=-1).mean(1)).mean())
    assert collapse(scaled) < collapse(plain) - 0.1, (collapse(scaled), collapse(plain))


def test_make_config_rejects_unknown_fields_and_sizes():
    with pytest.raises(ValueError, match="unknown config field"):
        avmae.make_config("tiny", mask_ratio=0.9)
    with pytest.raises(ValueError, match="size='huge'"):
        avmae.make_config("huge")
