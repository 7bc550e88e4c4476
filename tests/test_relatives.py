"""The relatives : MAViL's contrast and stage 2, CAV-MAE, AV-MaskEnhancer, ViViT
inflation. (Shapes, gradients and overfitting of every relative are in test_model.py.)"""
import math

import pytest
import torch
import torch.nn.functional as F

import avmae
import train
from conftest import tiny_batch, tiny_config


def relative(name, **kw):
    return avmae.AVMAE(tiny_config(**{**avmae.VARIANTS[name], **kw}))


def test_info_nce_by_hand():
    x = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    y = torch.tensor([[3.0, 0.0], [1.0, 1.0]])
    tau = 0.5
    # cosine similarities: x0.y0 = 1, x0.y1 = 1/sqrt2, x1.y0 = 0, x1.y1 = 1/sqrt2
    s = torch.tensor([[1.0, 1 / math.sqrt(2)], [0.0, 1 / math.sqrt(2)]]) / tau
    by_hand = -0.5 * ((s[0, 0] - torch.logsumexp(s[0], 0)) + (s[1, 1] - torch.logsumexp(s[1], 0)))
    assert torch.allclose(avmae.info_nce(x, y, tau), by_hand)
    assert avmae.info_nce(x, x, 0.01) < 1e-6  # each row finds itself


def test_intra_modal_views_have_their_own_masks():
    model = relative("mavil")
    seen = []
    real = model.embed
    model.embed = lambda patches, masks: seen.append(
        {m: k.clone() for m, (k, _) in masks.items()}) or real(patches, masks)
    out = model(**tiny_batch(model.cfg))
    assert len(seen) == 2 and "loss_intra" in out
    for m in "av":
        assert not torch.equal(seen[0][m], seen[1][m])  # a second, independently masked view


def test_contrast_uses_the_unimodal_outputs_not_the_fusion():
    model = relative("mavil")
    x = tiny_batch(model.cfg)
    masks, masks2 = model.sample_masks(2), model.sample_masks(2)
    before = model(**x, masks=masks, masks2=masks2)
    with torch.no_grad():
        for p in model.encoder.fusion.parameters():
            p.add_(torch.randn_like(p))
    after = model(**x, masks=masks, masks2=masks2)
    for term in ("loss_inter", "loss_intra"):
        assert torch.equal(before[term], after[term])
    # the fusion does feed reconstruction
    assert not torch.equal(before["loss_recon"], after["loss_recon"])
    # CAV-MAE's contrast: the joint layer on each modality alone (its unimodal pass), no audio-video
    # mixing
    cav = relative("cavmae")
    xa = tiny_batch(cav.cfg)
    _, uni1 = cav.encoder.with_unimodal(cav.embed(cav.patchify(xa), None))
    xv = {"a": xa["a"], "v": torch.rand_like(xa["v"])}
    _, uni2 = cav.encoder.with_unimodal(cav.embed(cav.patchify(xv), None))
    assert torch.equal(uni1["a"], uni2["a"])


# The contrast's negatives span the ranks (its gradient reaches every rank's rows), and two
# processes training MAViL equal one: test_train.py's test_two_processes_equal_one, one torchrun
# job for both (a job's start-up is most of its time here).


# -----------------------------------------------------------------------------
# MAViL stage 2


def test_stage2_teacher_is_frozen_sees_full_inputs_and_gives_fusion_targets(builtin, tmp_path,
                                                                            monkeypatch, capsys):
    from test_train import TINY
    stage1 = train.main([*TINY, "--data", builtin, "--out_dir", str(tmp_path / "s1"), "--variant",
                         "mavil", "--max_steps", "1", "--batch_size", "8"])
    teacher_state = {k: v.clone() for k, v in torch.load(stage1["checkpoint"],
                                                         weights_only=True)["model"].items()}
    seen = {}
    real_load = train.load_teacher

    def spy_load(path, device, *read):
        t = real_load(path, device, *read)
        real_encode = t.encode

        def encode(a=None, v=None, masks=None):
            assert masks is None  # the full, unmasked clip
            out = real_encode(a=a, v=v, masks=None)
            seen.setdefault("teacher_out", []).append({m: o.detach().clone() for m,
                                                       o in out.items()})
            seen["teacher"] = t
            return out
        t.encode = encode
        return t

    real_forward = avmae.AVMAE.forward

    def spy_forward(self, *args, targets=None, **kw):
        if self.cfg.target == "teacher":
            seen.setdefault("targets", []).append({m: t.detach().clone() for m,
                                                   t in targets.items()})
        return real_forward(self, *args, targets=targets, **kw)

    monkeypatch.setattr(train, "load_teacher", spy_load)
    monkeypatch.setattr(avmae.AVMAE, "forward", spy_forward)
    res = train.main([*TINY, "--data", builtin, "--out_dir", str(tmp_path / "s2"), "--variant",
                      "mavil2", "--teacher", stage1["checkpoint"], "--max_steps", "3",
                      "--batch_size", "8"])
    t = seen["teacher"]
    assert all(not p.requires_grad and p.grad is None for p in t.parameters()) and not t.training
    # unchanged after 3 steps
    assert all(torch.equal(t.state_dict()[k], v) for k, v in teacher_state.items())
    assert len(seen["targets"]) == 3
    for tgt, tout in zip(seen["targets"], seen["teacher_out"]):
        for m in "av":  # the targets are the teacher's fusion-encoder outputs over every token
            assert tgt[m].shape == (8, t.n[m], t.cfg.width) and torch.allclose(tgt[m],
                                                                               tout[m].float())
    # no picture of features: the last line says why
    assert res["picture"] is None and "picture none (the targets are a teacher's features" in \
        capsys.readouterr().out
    student = torch.load(res["checkpoint"], weights_only=True)
    assert student["model_config"]["target"] == "teacher"
    assert student["model"]["decoder.head.v.weight"].shape[0] == 64
    with pytest.raises(SystemExit, match="--teacher PATH"):
        train.parse_args(["--variant", "mavil2"])


# -----------------------------------------------------------------------------
# AV-MaskEnhancer


def test_av_mask_enhancer_reconstructs_video_from_both():
    model = relative("avme").eval()
    x = tiny_batch(model.cfg)
    masks = model.sample_masks(2)
    # all of the audio is seen
    assert masks["a"][1].shape[1] == 0 and masks["a"][0].shape[1] == model.n["a"]
    patches = model.patchify(x)
    preds = model.forward_decoder(model.forward_encoder(patches, masks), masks)
    assert set(preds) == {"v"}
    base = model.forward_loss(patches, preds, masks)["loss"]
    other = dict(patches, a=patches["a"] + 5.0)  # other audio *targets*: the loss does not change
    assert torch.equal(model.forward_loss(other, preds, masks)["loss"], base)
    # other audio *input*: the video reconstruction changes, through the cross-attention
    out1 = model(**x, masks=masks)
    out2 = model(a=x["a"] + torch.randn_like(x["a"]), v=x["v"], masks=masks)
    assert not torch.allclose(out1["pred_v"], out2["pred_v"])
    e1 = model.encoder(model.embed(patches, masks))
    e2 = model.encoder(model.embed(dict(patches, a=patches["a"] * 2), masks))
    assert not torch.allclose(e1["v"], e2["v"])  # already in the encoder's video tokens
    # tube masking: the same spatial mask in every time slice
    gt, gh, gw = model.patches["v"].grid
    mv = avmae.ids_to_mask(masks["v"][1], model.n["v"]).view(2, gt, gh, gw)
    assert torch.equal(mv, mv[:, :1].expand_as(mv))


# -----------------------------------------------------------------------------
# ViViT initialisation


@pytest.mark.parametrize("mode", ["inflate", "central"])
def test_inflated_tubelets_embed_a_repeated_image_as_the_image(mode):
    D, p, t, C = 8, 4, 2, 3
    torch.manual_seed(0)
    w2 = torch.randn(D, p * p * C)
    img = torch.randn(C, p, p)
    w3 = avmae.inflate_patch_embed(w2, p, C, t, C, mode)
    video = img.unsqueeze(1).expand(C, t, p, p)  # (C, T, H, W): the image in every frame
    cfg = avmae.make_config("tiny", num_frames=t, image_size=p, patch_size=p, tubelet=t)
    tokens = avmae.VideoPatches(cfg).patchify(video.unsqueeze(0))[0] @ w3.T
    image_token = img.permute(1, 2, 0).reshape(-1) @ w2.T  # (h, w, c) order
    # exactly, for both inflation and central frame
    assert torch.allclose(tokens[0], image_token, atol=1e-5)
    # an audio-style single-channel filter spreads over the colour channels: a grey video embeds the
    # same
    w_audio = torch.randn(D, p * p)
    grey = torch.randn(p, p)
    w3a = avmae.inflate_patch_embed(w_audio, p, 1, t, C, mode)
    vid = grey.expand(C, t, p, p)
    tok = avmae.VideoPatches(cfg).patchify(vid.unsqueeze(0))[0] @ w3a.T
    assert torch.allclose(tok[0], grey.reshape(-1) @ w_audio.T, atol=1e-5)


# -----------------------------------------------------------------------------
# CAV-MAE as its authors' code (cav_mae.py, run_cavmae_pretrain_base.sh) runs it


def _block(d, hidden, norms=2):  # LayerNorms + qkv + proj + MLP, all with biases
    qkv, proj, fc1, fc2 = d * 3 * d + 3 * d, d * d + d, d * hidden + hidden, hidden * d + d
    return norms * 2 * d + qkv + proj + fc1 + fc2


def test_cavmae_builds_its_published_model_at_base():
    mcfg, tcfg = train.parse_args(["--variant", "cavmae", "--size", "base"])
    assert (mcfg.dec_width, mcfg.dec_depth, mcfg.dec_heads, mcfg.dec_mlp) == (512, 8, 16, 2048)
    assert (mcfg.audio_frames, mcfg.num_frames, mcfg.tubelet, mcfg.image_size) == (1024, 1, 1, 224)
    assert (mcfg.mask_ratio_a, mcfg.mask_ratio_v, mcfg.mask_type_a,
            mcfg.pos_embed) == (0.75, 0.75, "random", "sincos2d")
    assert mcfg.norm_pix_loss and mcfg.recon_sum and not mcfg.contrast_symmetric
    assert mcfg.tau_inter == 0.05
    with torch.device("meta"):
        model = avmae.AVMAE(mcfg)
    assert model.n == {"a": 512, "v": 196}
    D, Dd = 768, 512
    hand = {
        # 16x16 audio patch, one 16x16 RGB patch
        "patch_embed.a": 256 * D + D, "patch_embed.v": 768 * D + D,
        "type_embed": 2 * D,  # modality_a, modality_v
        # no closing norm
        "encoder.streams.a": 11 * _block(D, 4 * D), "encoder.streams.v": 11 * _block(D, 4 * D),
        "encoder.joint": _block(D, 4 * D, norms=6),  # norm1, norm2 and norm1_a/_v, norm2_a/_v
        "encoder.norm": 3 * 2 * D,  # norm (fused), norm_a, norm_v
        "decoder.embed": D * Dd + Dd, "decoder.mask_token": Dd,  # one of each for both modalities
        "decoder.type_embed": 2 * Dd,
        "decoder.net": 8 * _block(Dd, 4 * Dd) + 2 * Dd,  # 8 blocks + decoder_norm
        "decoder.head.a": Dd * 256 + 256, "decoder.head.v": Dd * 768 + 768,
    }
    for prefix, n in hand.items():
        assert model.num_params(prefix) == n, prefix
    assert model.num_params() == sum(hand.values()) == 189_961_984
    # the authors' Block carries 4 modality norms in every layer, used in the unified one only:
    # their model's trainable count is ours + 22 x 4 + 8 x 4 unused LayerNorms (kernels/bench.py
    # --cavmae)
    assert model.num_params() + 22 * 4 * 2 * D + 8 * 4 * 2 * Dd == 190_129_920
    mcfg, _ = train.parse_args(["--preset", "quick", "--variant", "cavmae"])  # tiny stays small
    assert (mcfg.dec_width, mcfg.audio_frames, mcfg.num_frames) == (64, 400, 8)


def test_cavmae_loss_is_the_sum_plus_one_direction_of_infonce():
    model = relative("cavmae")
    x, masks = tiny_batch(model.cfg, B=4), model.sample_masks(4)
    out = model(**x, masks=masks)
    _, uni = model.encoder.with_unimodal(model.embed(model.patchify(x), masks))
    a, v = (F.normalize(uni[m].mean(1), dim=-1) for m in "av")
    total = a @ v.T / 0.05  # the authors' forward_contrastive: rows audio, columns video
    one_way = -torch.diag(total.log_softmax(dim=0)).mean()  # each video picks its audio
    assert torch.allclose(out["loss"], out["loss_a"] + out["loss_v"] + 0.01 * one_way, atol=1e-6)
    assert torch.allclose(out["loss_inter"], avmae.info_nce(v, a, 0.05), atol=1e-6)
    sym = relative("cavmae", contrast_symmetric=True)
    sym.load_state_dict(model.state_dict())
    out2 = sym(**x, masks=masks)
    other_way = -torch.diag(total.log_softmax(dim=1)).mean()  # each audio picks its video
    assert torch.allclose(out2["loss_inter"], (one_way + other_way) / 2, atol=1e-6)
    assert not torch.allclose(one_way, other_way)  # a case where the two directions differ
    assert torch.allclose(out2["loss"] - out["loss"], 0.01 * (other_way - one_way) / 2, atol=1e-6)


def test_cavmae_unimodal_pass_uses_each_modality_s_own_norms():
    model = relative("cavmae")
    enc = model.encoder
    x = model.embed(model.patchify(tiny_batch(model.cfg)), None)
    fused, uni = enc.with_unimodal(x)
    with torch.no_grad():
        enc.joint[0].by["v"].norm1.weight.add_(1.0)
        enc.norm["v"].bias.add_(1.0)
    fused2, uni2 = enc.with_unimodal(x)
    assert torch.equal(uni["a"], uni2["a"]) and not torch.allclose(uni["v"], uni2["v"])
    assert all(torch.equal(fused[m], fused2[m]) for m in "av")  # the fused pass uses its own norms


def test_time_frequency_masking_masks_whole_steps_and_bands():
    # CAV-MAE's audio grid; its 'tf' mode: 0.7 x 0.75 of the steps and bands whole
    grid, B = (64, 8), 64
    keep, drop = avmae.sample_mask(B, grid, 0.75, "tf", generator=torch.Generator().manual_seed(0))
    assert drop.shape == (B, 384) and keep.shape == (B, 128)
    mask = avmae.ids_to_mask(drop, 512).view(B, 64, 8)
    whole_steps = (mask.sum(2) == 8).sum(1)  # 33 chosen; the overflow (388 > 384) unmasks at most 4
    assert whole_steps.min() >= 29
    _, rnd = avmae.sample_mask(B, grid, 0.75, (0, 1), generator=torch.Generator().manual_seed(0))
    # random: about 6
    assert (avmae.ids_to_mask(rnd, 512).view(B, 64, 8).sum(2) == 8).sum(1).max() < 20
