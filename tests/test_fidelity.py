"""Recipe details as the papers state them (or the authors' code, where the papers are silent).
Each test names the paper passage it holds the code to."""
import dataclasses
import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import avmae
import data
import finetune
import train
from conftest import TINY_INPUTS, tiny_batch, tiny_config

# -----------------------------------------------------------------------------
# layer-wise lr decay: a parameter's layer id is its depth along a token's path through the whole
# network (BEiT; MAE finetuning), whatever sits above the streams


STRATEGIES = {
    "early": dict(encoder="early"), "separate": dict(encoder="separate", decoder="shared"),
    "mid": dict(encoder="mid"), "shared": dict(encoder="shared"),
    "mavil": avmae.VARIANTS["mavil"], "mavil_mbt": avmae.VARIANTS["mavil_mbt"],
    "mavil_mbt_sep": {**avmae.VARIANTS["mavil_mbt"], "fusion": "mbt_sep"},
    "avme": avmae.VARIANTS["avme"], "avme_sequence": {**avmae.VARIANTS["avme"],
                                                      "xattn_fuse": "sequence"},
    "cavmae": avmae.VARIANTS["cavmae"],
}


def _ancestors(tensors) -> set:
    seen, todo = set(), [t.grad_fn for t in tensors if torch.is_tensor(t) and t.grad_fn is not None]
    while todo:
        fn = todo.pop()
        if fn in seen:
            continue
        seen.add(fn)
        todo += [f for f, _ in fn.next_functions if f is not None]
    return seen


def check_layer_ids_follow_depth(model, x):
    """Every block's id is above the id of every block it reads from (autograd ancestry); a
    LayerNorm outside a block has the id of the deepest block it closes; embeddings 0, the top
    block n_layers, heads n_layers + 1."""
    ids, names = model.layer_ids(), {mod: n for n, mod in model.named_modules()}
    assert set(ids) == {n for n, _ in model.named_parameters()}
    blocks = (avmae.Block, avmae.CrossBlock)
    inside = {n for n, mod in model.named_modules() if isinstance(mod, blocks)}
    calls, seen_ids = [], []

    def hook(mod, args, out):
        name = names[mod]
        if isinstance(mod, nn.LayerNorm) and any(name.startswith(b + ".") for b in inside):
            return
        anc = _ancestors(args)
        deeper = [d for d, fn in calls if fn in anc]
        own = ids[f"{name}.weight"] if isinstance(mod, nn.LayerNorm) else \
            ids[next(f"{name}.{p}" for p, _ in mod.named_parameters())]
        if isinstance(mod, blocks):
            assert all(own > d for d in deeper), (name, own, deeper)
            calls.append((own, out.grad_fn))
            seen_ids.append(own)
        else:
            assert deeper and own == max(deeper), (name, own, deeper)

    hooks = [m.register_forward_hook(hook) for m in model.modules()
             if isinstance(m, blocks) or isinstance(m, nn.LayerNorm)]
    model(**x)
    for h in hooks:
        h.remove()
    assert max(seen_ids) == model.n_layers
    for n, i in ids.items():
        if n.startswith(("heads.",)):
            assert i == model.n_layers + 1, n
        if n.startswith(("patch_embed.", "enc_pos.")) or ".embed." in n or ".pos." in n:
            assert i == 0, n


@pytest.mark.parametrize("arch", ["mbt", "encoder"])
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_layer_ids_follow_depth_through_the_whole_network(strategy, arch):
    pcfg = dataclasses.asdict(tiny_config(depth=4, **STRATEGIES[strategy]))
    f = finetune.FinetuneConfig(size="tiny", num_frames=4, image_size=32, audio_frames=64,
                                drop_path=0.0, kernels="torch", arch=arch, fusion_layer=2)
    cfg_in = {k: TINY_INPUTS[k] for k in ("patch_size", "audio_patch_t", "audio_patch_f",
                                          "mel_bins")}
    pcfg.update(cfg_in)
    model = finetune.build_model(f, {"label": 3}, pcfg)
    check_layer_ids_follow_depth(model, tiny_batch(model.cfg))
    groups = finetune.param_groups(model, dataclasses.replace(f, layer_decay=0.5), 1.0)
    scale = {id(p): g["lr_scale"] for g in groups for p in g["params"]}
    ids = model.layer_ids()
    in_block = {f"{m}.{k}" for m, mod in model.named_modules()
                if isinstance(mod, (avmae.Block, avmae.CrossBlock))
                for k, _ in mod.named_parameters()}
    top = model.n_layers + 1
    for n, p in model.named_parameters():  # the lr follows the id: lr * decay^(top + 1 - id),
        # for the embeddings and the blocks; the rest (final norms, bottlenecks, heads, MTV's
        # cross-view projections, TokenLearners) at the full rate, as MAE's and the authors' code
        depth = ids[n] if ids[n] == 0 or n in in_block else top
        assert scale[id(p)] == 0.5 ** (top - depth), n
    full = [n for n, _ in model.named_parameters() if scale[id(_)] == 1.0]
    assert any(n.startswith("heads.") for n in full) and not any(".blocks." in n for n in full)
    if arch == "mbt" and model.fusion_layer < model.cfg.depth:
        assert "bottleneck" in full and any(n.endswith("norm.weight") and "blocks" not in n
                                            for n in full)


def test_mavil_fusion_layers_train_near_the_top_not_the_bottom():
    # MAViL finetuned its own way: 12 + 2 fusion layers; the fusion blocks are layers 13 and 14
    pcfg = dataclasses.asdict(tiny_config(depth=4, **avmae.VARIANTS["mavil"]))
    model = finetune.build_model(finetune.FinetuneConfig(size="tiny", arch="encoder", num_frames=4,
                                             image_size=32, audio_frames=64), {"label": 3}, pcfg)
    ids = model.layer_ids()
    assert model.n_layers == 6
    assert ids["encoder.fusion.blocks.0.attn.qkv.weight"] == 5
    assert ids["encoder.fusion.blocks.1.mlp.fc2.bias"] == 6
    assert ids["encoder.streams.a.norm.weight"] == 4 and ids["heads.a.label.weight"] == 7

# -----------------------------------------------------------------------------
# MAViL Eq. 1 / 4-6: reconstruction terms summed, alpha = 0.1 and beta = 0.01 against the sum


def test_mavil_sums_reconstruction_terms_avmae_averages_them():
    for variant, combine in (("mavil", lambda a, v: a + v), ("avmae", lambda a, v: 0.5 * (a + v))):
        cfg = tiny_config(**avmae.VARIANTS[variant])
        model = avmae.AVMAE(cfg)
        out = model(**tiny_batch(cfg))
        recon = combine(out["loss_a"], out["loss_v"])
        if variant == "mavil":
            assert torch.allclose(out["loss_recon"], recon)
            assert torch.allclose(out["loss"],
                                  recon + 0.1 * out["loss_inter"] + 0.01 * out["loss_intra"])
        else:
            assert torch.allclose(out["loss"], recon)
    mcfg, _ = train.parse_args(["--variant", "mavil2", "--teacher", "t.pt"])
    assert mcfg.recon_sum and mcfg.contrast_inter == 0.1 and mcfg.contrast_intra == 0.01


# -----------------------------------------------------------------------------
# AudioSet finetuning: label smoothing 0.3 (Table 24) on the multi-label targets too


def test_multi_label_targets_are_label_smoothed():
    z = torch.randn(4, 5)
    t = (torch.rand(4, 5) > 0.5).float()
    got = finetune.loss_fn({"label": z}, {"label": t}, True, 0.3)
    want = 5 * F.binary_cross_entropy_with_logits(z, t * 0.7 + 0.3 / 5)  # on 1 - s + s/C, off s/C
    assert torch.allclose(got, want)
    assert not torch.allclose(got, 5 * F.binary_cross_entropy_with_logits(z, t))


def test_the_losses_reduce_as_the_authors_code_does():
    # AudioSet: binary cross-entropy summed over the 527 classes, averaged over clips (the
    # authors' weighted_sigmoid_cross_entropy): zero logits cost 527 ln 2 = 365.29 a clip
    zeros, t = torch.zeros(3, 527), (torch.rand(3, 527) > 0.99).float()
    assert finetune.loss_fn({"label": zeros}, {"label": t}, True, 0.0).item() == pytest.approx(
        527 * math.log(2), rel=1e-5)
    # EPIC-Kitchens: verb and noun cross-entropies averaged (the authors' MBT code)
    z = {"verb": torch.zeros(2, 97), "noun": torch.zeros(2, 300)}
    y = {"verb": torch.eye(97)[[0, 5]], "noun": torch.eye(300)[[1, 7]]}
    assert finetune.loss_fn(z, y, False, 0.0).item() == pytest.approx(
        (math.log(97) + math.log(300)) / 2, rel=1e-5)
    assert finetune.parse_args(["--preset", "audioset"]).label_smoothing == 0.3


# -----------------------------------------------------------------------------
# MBT as the authors finetune it ("mixmod"): one LayerNorm and one classifier for both modalities,
# logits and a mixup weight per modality, the per-modality losses averaged


def _mbt(head="shared"):
    return avmae.MBT(tiny_config(), {"label": 3}, fusion_layer=2, head=head)


def test_mbt_default_has_one_norm_and_one_head_and_a_loss_per_modality():
    model = _mbt()
    assert list(model.heads) == ["av"] and model.norm is not None
    assert all(s.norm is None for s in model.streams.values())
    x = tiny_batch(model.cfg)
    per = model(**x, per_modality=True)
    assert set(per) == {"a", "v"} and not torch.allclose(per["a"]["label"], per["v"]["label"])
    assert torch.allclose(model(**x)["label"], (per["a"]["label"] + per["v"]["label"]) / 2)
    t = {m: {"label": torch.softmax(torch.randn(2, 3), 1)} for m in "av"}
    loss = finetune.finetune_loss(per, t, True, False, 0.0)
    each = [finetune.loss_fn(per[m], t[m], False, 0.0) for m in "av"]
    assert torch.allclose(loss, (each[0] + each[1]) / 2)
    assert model.loss_per_modality
    # the options: heads and norms per modality, a loss each (separate) or one loss on the
    # averaged logits (per_modality)
    for head in ("separate", "per_modality"):
        other = _mbt(head)
        assert set(other.heads) == {"a", "v"} and other.norm is None
        assert all(s.norm is not None for s in other.streams.values())
        assert other.loss_per_modality == (head == "separate")
        per = other(**x, per_modality=True)
        assert torch.allclose(other(**x)["label"], (per["a"]["label"] + per["v"]["label"]) / 2)
    assert not avmae.MBT(tiny_config(modalities="a"), {"label": 3}).loss_per_modality
    assert finetune.parse_args([]).mbt_head == "shared"
    with pytest.raises(ValueError, match=r"shared \| separate \| per_modality"):
        _mbt("both")


def test_mbt_streams_exchange_from_the_layer_after_the_fusion_layer():
    """A bottleneck written at layer i is read at i + 1: fusing from the last layer is late fusion
    (audio logits blind to video), one layer earlier gives the audio stream a view of the video."""
    for fusion, sees_video in ((3, False), (2, True)):
        torch.manual_seed(0)
        model = avmae.MBT(tiny_config(), {"label": 3}, fusion_layer=fusion, head="separate").eval()
        x = tiny_batch(model.cfg)
        a = model(**x, per_modality=True)["a"]["label"]
        b = model(a=x["a"], v=torch.randn_like(x["v"]), per_modality=True)["a"]["label"]
        assert torch.allclose(a, b) != sees_video


def test_mbt_unimodal_heads_read_each_stream_before_fusion_and_add_their_own_loss():
    """Gradient Blending (Wang et al., 2020) on MBT: a_alone sees audio only, its loss trains the
    audio layers before fusion and nothing of the video stream; evaluation never sees it."""
    torch.manual_seed(0)
    model = avmae.MBT(tiny_config(), {"label": 3}, fusion_layer=2, head="separate",
                      unimodal_heads=True)
    x = tiny_batch(model.cfg)
    per = model(**x, per_modality=True)
    assert set(per) == {"a", "v", "a_alone", "v_alone"} and set(model(**x)) == {"label"}
    other = model(a=x["a"], v=torch.randn_like(x["v"]), per_modality=True)
    assert torch.allclose(per["a_alone"]["label"], other["a_alone"]["label"])
    assert not torch.allclose(per["v_alone"]["label"], other["v_alone"]["label"])
    t = {m: {"label": torch.eye(3)[[0, 2]]} for m in "av"}
    fused = finetune.finetune_loss({m: per[m] for m in "av"}, t, True, False, 0.0)
    alone = [finetune.loss_fn(per[f"{m}_alone"], t[m], False, 0.0) for m in "av"]
    total = finetune.finetune_loss(per, t, True, False, 0.0, unimodal=0.5)
    assert torch.allclose(total, fused + 0.5 * (alone[0] + alone[1]) / 2)
    model.zero_grad()
    finetune.loss_fn(per["a_alone"], t["a"], False, 0.0).backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert grads["streams.a.blocks.0.attn.qkv.weight"].abs().sum() > 0
    assert all(g is None or g.abs().sum() == 0 for n, g in grads.items() if ".v." in n)
    # the quick preset learns with it; without fusion layers or with one loss it has no place
    q = finetune.parse_args(["--preset", "quick"])
    assert (q.fusion_layer, q.mbt_head, q.unimodal_loss) == (2, "separate", 1.0)
    late = avmae.MBT(tiny_config(), {"label": 3}, fusion_layer=4, unimodal_heads=True)
    assert late.unimodal is None
    for bad in (["--unimodal_loss", "-1"], ["--unimodal_loss", "1", "--mbt_head", "per_modality"],
                ["--unimodal_loss", "1", "--arch", "mtv"]):
        with pytest.raises(SystemExit, match="--unimodal_loss"):
            finetune.parse_args(bad)


def test_mixup_draws_a_weight_per_modality_with_its_own_targets():
    g = torch.Generator().manual_seed(3)
    batch = {"a": torch.arange(8.0).view(8, 1), "v": torch.arange(8.0).view(8, 1),
             "label": torch.arange(8)}
    mixed, t = finetune.mixup(batch, ("a", "v"), {"label": 8}, 0.5, False, g, per_modality=True)
    lam = {}
    # clip i is mixed with clip p(i): its targets hold lam_m at i and 1 - lam_m at p(i)
    for m in "av":
        y = t[m]["label"]
        lam[m] = y.diagonal().min()
        off = y - torch.diag(y.diagonal())
        # (a clip may draw itself)
        partner = torch.where(off.amax(1) > 0, off.argmax(1), torch.arange(8))
        assert torch.allclose(mixed[m][:, 0],
                              lam[m] * torch.arange(8.0) + (1 - lam[m]) * partner.float())
    assert not torch.isclose(lam["a"], lam["v"])  # a weight per modality, the same partners
    _, one = finetune.mixup(batch, ("a", "v"), {"label": 8}, 0.5, False,
                      torch.Generator().manual_seed(3))
    assert set(one) == {"label"}


def test_shared_norm_loads_the_mean_of_the_streams_final_norms(tmp_path):
    cfg = avmae.make_config("tiny", **{**TINY_INPUTS, "patch_size": 16, "audio_patch_t": 16,
                                       "audio_patch_f": 16, "encoder": "separate",
                                       "decoder": "shared"})
    pre = avmae.AVMAE(cfg)
    with torch.no_grad():
        for m in "av":
            pre.encoder.streams[m].norm.weight.uniform_()
    pcfg = dataclasses.asdict(cfg)
    model = finetune.build_model(
        finetune.FinetuneConfig(size="tiny", num_frames=4, image_size=32, audio_frames=64),
        {"label": 3}, pcfg)
    state, report = finetune.map_pretrained(pre.state_dict(), pcfg, model)
    want = (pre.encoder.streams["a"].norm.weight + pre.encoder.streams["v"].norm.weight) / 2
    assert torch.allclose(state["norm.weight"], want)
    assert ("norm.weight <- mean(encoder.streams.a.norm.weight, encoder.streams.v.norm.weight)"
            in report["loaded"])


# -----------------------------------------------------------------------------
# video augmentation: pretraining has none (AV-MAE Table 20; the authors' pipeline crops 224 of a
# 256 short side); finetuning jitters scale (0.9-1.33), flips, colours (p 0.8) and greys (p 0.1)


def test_video_augmentation_defaults_and_boxes():
    assert train.TrainConfig().video_aug == "none"
    assert finetune.FinetuneConfig().video_aug == "finetune"
    assert data.DataConfig().video_aug == "none"
    rng = np.random.default_rng(0)
    for _ in range(50):
        top, left, h, w = data.video_box(256, 340, rng, "none", True)
        assert h == w == 224 and 0 <= top <= 32 and 0 <= left <= 116
        _, _, h, _ = data.video_box(256, 340, rng, "finetune", True)
        assert round(256 / 1.33 * 224 / 256) - 1 <= h <= min(256, round(224 / 0.9)) + 1
    # central 224 of 256
    assert data.video_box(256, 340, rng, "finetune", False) == (16, 58, 224, 224)


def test_pretraining_clips_are_never_flipped_or_coloured_finetuning_clips_are():
    T = 4
    frames = torch.zeros(T, 3, 64, 80, dtype=torch.uint8)
    frames[:, 0, :, :40] = 200  # red left half: a flip moves it to the right
    frames[:, 1] = 90
    none = data.DataConfig(image_size=32, video_aug="none", train=True)
    fine = data.DataConfig(image_size=32, video_aug="finetune", train=True)
    flips = colours = greys = 0
    for seed in range(60):
        x = data.augment_frames(frames, none, seed).float()  # (3, T, 32, 32)
        assert x[0, :, :, :4].mean() >= x[0, :, :, -4:].mean()  # red stays on the left
        assert torch.equal(x[1], torch.full_like(x[1], 90))  # colours untouched
        y = data.augment_frames(frames, fine, seed).float()
        assert all(torch.equal(y[:, 0], y[:, t]) for t in range(T))  # every frame alike
        flips += int(y[0, 0, :, -4:].mean() > y[0, 0, :, :4].mean())
        greys += int(torch.equal(y[0], y[1]) and torch.equal(y[1], y[2]))
        colours += int(not torch.equal(y[1], torch.full_like(y[1], 90)))
    assert 15 <= flips <= 45 and 1 <= greys <= 15 and colours >= 35


# ----------------------------------------------------------------------------- MAViL at its paper
# shapes (Sec. 4.1, App. B): 8 x 512 decoders with 16 heads, 2-D sin-cos positions, 1024 x 128
# audio (512 tokens), 8 frames at 2 fps (784 tokens); one fusion g_av for both modalities


def test_mavil_builds_its_paper_model_at_paper_sizes():
    for size in ("base", "large"):
        mcfg, tcfg = train.parse_args(["--variant", "mavil", "--size", size])
        assert (mcfg.dec_width, mcfg.dec_depth, mcfg.dec_heads, mcfg.dec_mlp) == (512, 8, 16, 2048)
        assert mcfg.pos_embed == "sincos2d" and tcfg.frame_stride == 12.5  # 25 fps / 12.5 = 2 fps
        assert tcfg.video_aug == "rrc"  # flip + multi-scale crop in pretraining (App. B)
        assert tcfg.audio_norm == "dataset"  # (its AudioMAE pipeline: the set's mean and 2 std)
        assert train.parse_args(["--variant", "cavmae", "--size", size])[1].audio_norm == "cavmae"
        assert math.prod(avmae.AudioPatches(mcfg).grid) == 512
        assert math.prod(avmae.VideoPatches(mcfg).grid) == 784
    mcfg, _ = train.parse_args(["--preset", "quick", "--variant", "mavil"])  # tiny stays small
    assert (mcfg.dec_width, mcfg.audio_frames, mcfg.num_frames) == (64, 400, 8)
    mcfg, _ = train.parse_args(["--variant", "mavil", "--dec_depth", "2"])  # a flag still wins
    assert mcfg.dec_depth == 2


def test_sincos2d_gives_each_grid_axis_its_own_share_of_the_width():
    pe = avmae.sincos_grid((4, 3), 16)  # (time, freq): 8 channels for time, 8 for freq
    t, f = torch.meshgrid(torch.arange(4), torch.arange(3), indexing="ij")
    assert torch.allclose(pe[:, :8], avmae.sincos_1d(4, 8)[t.flatten()])
    assert torch.allclose(pe[:, 8:], avmae.sincos_1d(3, 8)[f.flatten()])
    assert avmae.sincos_grid((2, 3, 5), 64).shape == (30, 64)


def test_mavil_mbt_fusion_is_one_function_for_both_modalities():
    shared = avmae.AVMAE(tiny_config(**avmae.VARIANTS["mavil_mbt"])).encoder.fusion
    sep = avmae.AVMAE(tiny_config(**{**avmae.VARIANTS["mavil_mbt"],
                                     "fusion": "mbt_sep"})).encoder.fusion
    assert list(shared.layers) == ["av"] and sorted(sep.layers) == ["a", "v"]
    # g_av applied to [x | b] is the same function for audio and for video
    x = torch.randn(2, 5, 64)
    out = shared({"a": x.clone(), "v": x.clone()})
    assert torch.allclose(out["a"], out["v"])

# -----------------------------------------------------------------------------
# AV-MaskEnhancer (Sec. III-D): N_fuse = N_v tokens of D_fuse = 2 D_v into the video decoder


def test_avme_fuses_along_channels_and_decodes_n_v_tokens():
    cfg = tiny_config(**avmae.VARIANTS["avme"])
    assert cfg.xattn_fuse == "channel"
    model = avmae.AVMAE(cfg)
    assert model.encoder.out_width == 2 * cfg.width
    assert model.decoder.embed["v"].in_features == 2 * cfg.width
    x = tiny_batch(cfg)
    masks = model.sample_masks(2)
    e, uni = model.encoder.with_unimodal(model.embed(model.patchify(x), masks))
    assert e["v"].shape == (2, masks["v"][0].shape[1], 2 * cfg.width)
    # each video token beside its cross-attended audio
    assert torch.equal(e["v"][..., :cfg.width], uni["v"])
    seen = []
    h = model.decoder.net.register_forward_pre_hook(
        lambda mod, args: seen.append({k: v.shape for k, v in args[0].items()}))
    model(**x, masks=masks)
    h.remove()
    # N_fuse = N_v: no audio tokens in the decoder's sequence
    assert seen[0]["v"][1] == model.n["v"]
    seq = avmae.AVMAE(tiny_config(**{**avmae.VARIANTS["avme"], "xattn_fuse": "sequence"}))
    seq.decoder.net.register_forward_pre_hook(lambda mod, args: seen.append({k: v.shape for k,
                                                                             v in args[0].items()}))
    seq(**x, masks=masks)
    # the option: audio along the sequence
    assert seen[1]["v"][1] == model.n["v"] + masks["a"][0].shape[1]


# -----------------------------------------------------------------------------
# modules new in finetuning start as in pretraining (xavier-uniform, zero bias; tokens trunc-normal
# 0.02) and the heads as in MAE finetuning (trunc-normal std 2e-5, zero bias)


@pytest.mark.parametrize("arch", ["mbt", "encoder"])
def test_finetuning_models_from_scratch_get_the_pretraining_init(arch):
    torch.manual_seed(0)
    model = finetune.build_model(finetune.FinetuneConfig(size="small", arch=arch, num_frames=4,
                                                         image_size=32,
                                                         audio_frames=64), {"label": 309}, None)
    heads = [m for n,
             m in model.named_modules() if n.startswith("heads.") and isinstance(m, nn.Linear)]
    for lin in heads:
        assert 1.8e-5 < lin.weight.std().item() < 2.2e-5
        assert not lin.bias.any()
    for n, lin in model.named_modules():
        if isinstance(lin, nn.Linear) and not n.startswith("heads."):
            fan_out, fan_in = lin.weight.shape
            assert abs(lin.weight.std().item() / math.sqrt(2 / (fan_in + fan_out)) - 1) < 0.05, n
            assert not lin.bias.any(), n
    if arch == "mbt":
        assert abs(model.bottleneck.std().item() - 0.02) < 0.01


# -----------------------------------------------------------------------------
# MBT's fusion layer: 8 of 12 (MBT); of 24, 16 on VGGSound and 18 on AudioSet (the authors' configs)


def test_fusion_layer_follows_the_authors_configs():
    for preset, depth, want in (("vggsound", 12, 8), ("vggsound", 24, 16), ("audioset", 24, 18),
                                ("epic", 24, 16)):
        pcfg = dataclasses.asdict(tiny_config(depth=depth))
        f = finetune.FinetuneConfig(preset=preset, size="tiny", num_frames=4, image_size=32,
                              audio_frames=64)
        assert finetune.build_model(f, {"label": 3}, pcfg).fusion_layer == want, (preset, depth)


# -----------------------------------------------------------------------------
# the recipes' remaining defaults, as the fidelity table (docs/fidelity.md) states them


def test_recipe_defaults_are_the_papers():
    # AV-MAE Table 20 (the authors' config differs: wd 0.05, warm-up 4)
    mcfg, t = train.parse_args([])
    assert (t.weight_decay, t.warmup_epochs, t.beta1, t.beta2, t.blr, t.batch_size, t.epochs) == \
        (0.0, 40.0, 0.9, 0.95, 1.5e-4, 512, 800)
    assert (t.window, t.audio_norm, t.video_aug) == ("hann", "none", "none")
    assert (mcfg.mask_ratio_v, mcfg.mask_ratio_a, mcfg.pos_embed, mcfg.norm_pix_loss,
            mcfg.recon_sum, mcfg.inpaint_layout) == (0.9, 0.5, "sincos", False, False, "paper")
    f = finetune.parse_args([])  # AV-MAE Table 22 (VGGSound) and the authors' MBT
    assert (f.optimizer, f.layer_decay, f.blr * 64 / 256, f.epochs, f.warmup_epochs, f.grad_clip,
            f.mixup, f.label_smoothing, f.drop_path, f.views, f.specaug_freq, f.specaug_time) == \
        ("sgd", 0.75, 0.8, 50, 2.5, 1.0, 0.5, 0.3, 0.3, 4, 48, 0)
    assert (f.arch, f.mbt_head, f.video_aug) == ("mbt", "shared", "finetune")
    assert f.inflate == "central"  # (ViViT Table 1: central frame 79.2 over inflation 77.6)


def test_audioset_finetuning_augments_and_normalises_as_the_authors_config():
    # scenic av_mae/configs/audioset/finetune.py: 2 frequency masks of up to 36 bins, time masks
    # off (time_mask_max_ratio = 0), the spectrogram normalised by the set's own statistics
    f = finetune.parse_args(["--preset", "audioset"])
    assert (f.specaug_freq, f.specaug_freq_masks, f.specaug_time, f.audio_norm) == \
        (36, 2, 0, "dataset")
    cfg = data.DataConfig(specaug_freq=36, specaug_freq_masks=2, train=True)
    draws = torch.tensor([data.spec_draw(cfg, np.random.default_rng(s), 100, 128)
                          for s in range(64)])
    assert draws.shape == (64, 2 * 2 + 3) and (draws[:, [0, 2]] <= 36).all()
    out = data.augment_spec(torch.randn(64, 100, 128), draws)
    for row, d in zip(out, draws.tolist()):  # each of the two bands is the clip's mean
        for w, s0 in ((d[0], d[1]), (d[2], d[3])):
            if w:
                band = row[:, s0:s0 + w]
                assert torch.allclose(band, band.flatten()[0].expand_as(band))
    one = data.DataConfig(specaug_freq=36, train=True)  # (one mask: the draws as before)
    assert data.spec_draw(one, np.random.default_rng(0), 100, 128) == data.spec_draw(
        dataclasses.replace(one, specaug_freq_masks=1), np.random.default_rng(0), 100, 128)


def test_audioset_pretraining_presets_follow_the_tables_and_the_authors_config():
    # Tables 7b, 9, 16: 120 epochs on AS2M; where the paper is silent, scenic
    # av_mae/configs/audioset/pretrain.py: audio masking 0.7, base lr 3e-4 per 256, 4 warm-up epochs
    for preset in ("audioset_b", "audioset_l"):
        mcfg, t = train.parse_args(["--preset", preset])
        assert (t.epochs, t.blr, t.warmup_epochs, mcfg.mask_ratio_a, mcfg.mask_ratio_v,
                mcfg.audio_frames) == (120, 3e-4, 4, 0.7, 0.9, 1000)
    assert train.parse_args(["--preset", "audioset_l", "--epochs", "80"])[1].epochs == 80  # Tab. 4


def test_mavil_finetuning_preset_and_the_balanced_sampler():
    # MAViL App. B / Table 9 (AS-2M): AdamW (0.9, 0.95), 200K clips an epoch drawn with weight
    # sum_c 1000 / (count_c + 0.01), the video encoder at half the lr
    f = finetune.parse_args(["--preset", "mavil_as2m"])
    assert (f.optimizer, f.beta2, f.weight_decay, f.blr, f.batch_size, f.epochs, f.warmup_epochs,
            f.weighted_sampling, f.specaug_freq, f.specaug_time, f.mixup, f.drop_path,
            f.audio_norm, f.video_lr, f.arch) == ("adamw", 0.95, 1e-5, 1e-4, 512, 100, 20,
                                                  200_000, 48, 192, 0.5, 0.1, "audiomae", 0.5,
                                                  "encoder")
    rows = [dict(label=[0])] * 90 + [dict(label=[1])] * 9 + [dict(label=[2, 0])]
    w = data.balanced_weights(rows, {"label": 3})
    assert w[0] == pytest.approx(1000 / 91.01) and w[99] == pytest.approx(1000 / 1.01 + 1000 / 91.01)
    one = data.EpochSampler(100, seed=1, weights=w, size=3000)
    got = [i for i, _ in one]
    share = [sum(rows[i]["label"][0] == c for i in got) / 3000 for c in range(3)]
    assert len(got) == len(one) == 3000 and 0.25 < share[0] < 0.42 and 0.25 < share[1] < 0.42
    assert 0.25 < share[2] < 0.42  # (a third each: the rare classes drawn as often as the common)
    two = [[i for i, _ in data.EpochSampler(100, 2, r, seed=1, weights=w, size=3000)]
           for r in (0, 1)]
    assert got[0::2] == two[0] and got[1::2] == two[1]  # (the same clips whatever the ranks)
    later = data.EpochSampler(100, seed=1, weights=w, size=3000)
    later.set_position(0, 1000)
    assert [i for i, _ in later] == got[1000:]  # (a resumed epoch)
    # the video stream at half the lr, the audio stream at the full rate
    model = finetune.build_model(finetune.FinetuneConfig(size="tiny", num_frames=4, image_size=32,
                                                         audio_frames=64, kernels="torch"),
                                 {"label": 3}, None)
    cfg = finetune.FinetuneConfig(layer_decay=1.0, video_lr=0.5)
    scale = {id(p): g["lr_scale"] for g in finetune.param_groups(model, cfg, 1.0)
             for p in g["params"]}
    for n, p in model.named_parameters():
        assert scale[id(p)] == (0.5 if n.startswith("streams.v.") else 1.0), n
