"""The talk's video models as finetuning backbones: ViViT's factorisations (Arnab et al., 2021),
TokenLearner (Ryoo et al., 2021) and Multiview Transformers (Yan et al., 2022), with audio as a
view. Shapes and parameter counts by hand, factorised attention against masked full attention,
the direction of MTV's lateral attention, FLOP counts against torch's counter, weight mapping."""
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import avmae
import finetune
from test_finetune import IDS, PRETRAINED, fcfg, pretrained_ckpt

D, L, H = 64, 4, 4  # the tiny size


def block_params(d):  # qkv, projection, MLP (4 d), two LayerNorms
    return (3 * d * d + 3 * d) + (d * d + d) + (4 * d * d + 4 * d) + (4 * d * d + d) + 4 * d


def video_cfg(**kw):  # 8 frames of 32 x 32, 8 x 8 patches, tubelets of 2: t = 4, s = 16
    return avmae.make_config("tiny", modalities="v", num_frames=8, image_size=32, patch_size=8,
                             kernels="torch", **kw)


def masked_attention(attn, x, allowed):
    """Full attention of module `attn` on x (B, N, D) with token i seeing j only where
    allowed[h][i, j] (one mask per head)."""
    B, N, _ = x.shape
    q, k, v = attn.qkv(x).view(B, N, 3, attn.heads, -1).permute(2, 0, 3, 1, 4)
    s = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    s = s.masked_fill(~torch.stack(allowed)[None], float("-inf"))
    return attn.proj((s.softmax(-1) @ v).transpose(1, 2).reshape(B, N, -1))


def grid_masks(t, s):
    i = torch.arange(t * s)
    same_time = i[:, None] // s == i[None] // s  # the tokens of one time index
    same_place = i[:, None] % s == i[None] % s   # the tokens of one spatial position
    return same_time, same_place


def randomise(module):
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)


@pytest.mark.parametrize("kind", ["frames", "fsa", "fdp"])
def test_factorised_attention_is_full_attention_under_the_right_mask(kind):
    t, s = 4, 16
    blk = avmae.BLOCKS[kind](D, H, 4 * D, avmae.attention).eval()
    randomise(blk)
    x = torch.randn(2, t * s, D)
    space, time = grid_masks(t, s)
    with torch.no_grad():
        got = blk(x, t)
        if kind == "frames":  # ViViT-FE's spatial encoder: space only
            y = x + masked_attention(blk.attn, blk.norm1(x), [space] * H)
        elif kind == "fsa":  # space, then time, each with all heads
            y = x + masked_attention(blk.attn, blk.norm1(x), [space] * H)
            y = y + masked_attention(blk.attn_t, blk.norm_t(y), [time] * H)
        else:  # half the heads in space, half in time
            y = x + masked_attention(blk.attn, blk.norm1(x), [space] * (H // 2) + [time] * (H // 2))
        want = y + blk.mlp(blk.norm2(y))
        assert torch.allclose(got, want, atol=1e-4), (got - want).abs().max()
        # and it is not full attention
        full = x + masked_attention(blk.attn, blk.norm1(x), [space | True] * H)
        assert not torch.allclose(got, full + blk.mlp(blk.norm2(full)), atol=1e-3)


def test_fdp_needs_an_even_number_of_heads():
    with pytest.raises(ValueError, match="heads"):
        avmae.FDPBlock(48, 3, 4 * 48, avmae.attention)


class Pick(torch.nn.Module):  # alpha with map i on position i (scores 1e4 there, 0 elsewhere)
    def forward(self, u):
        return 1e4 * torch.eye(u.shape[1]).expand(u.shape[0], -1, -1)


def test_tokenlearner_with_identity_maps_returns_its_input_and_mixes_convexly():
    t, s = 4, 16
    tl = avmae.TokenLearner(D, S=s)
    x = torch.randn(2, t * s, D)
    # map i picks position i: S = N per time index and identity maps give the input back
    tl.alpha = Pick()
    assert torch.allclose(tl(x, t), x, atol=1e-5)
    tl = avmae.TokenLearner(D, S=8)
    out = tl(x, t)
    assert out.shape == (2, t * 8, D)
    # each learned token is a weighted average of its own time index's tokens: a time index of
    # one repeated token gives that token back, whatever the other time indices hold
    out.sum().backward()
    x = x.clone()
    x[:, s:2 * s] = x[:, s:s + 1]
    assert torch.allclose(tl(x, t)[:, 8:16], x[:, s:s + 8], atol=1e-5)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in tl.parameters())


def build(arch, modality="video", **kw):
    f = fcfg(arch=arch, modality=modality, num_frames=8, image_size=64, audio_frames=128,
             fusion_layer=2, **kw)
    return finetune.build_model(f, {"label": 7}, None)


def test_parameter_counts_by_hand():
    d, heads = D, 7 * D + 7
    P = 2 * 16 * 16 * 3          # one tubelet's pixels
    t, s = 8 // 2, (64 // 16) ** 2  # video grid: 4 time indices of 16 positions
    stream = P * d + d + L * block_params(d) + 2 * d  # embedding, blocks, final LayerNorm
    n = {a: sum(p.numel() for p in build(a).parameters()) for a in
         ("mbt", "vivit_fe", "vivit_fsa", "vivit_fdp")}
    assert n["mbt"] == stream + heads                  # unfactorised (ViViT Model 1)
    assert n["vivit_fdp"] == n["mbt"]                  # the same weights, other masks
    attn_t = 4 * d * d + 4 * d + 2 * d                 # temporal attention and its LayerNorm
    assert n["vivit_fsa"] == n["mbt"] + L * attn_t
    temporal = 1 * block_params(d) + 2 * d + t * d     # 1 block (a third of 4), norm, positions
    assert n["vivit_fe"] == n["mbt"] + temporal
    tl = 2 * d + (d * d + d) + (d * 8 + 8)             # LayerNorm, MLP to S = 8 maps
    assert sum(p.numel() for p in build("mbt", tokenlearner=8).parameters()) == n["mbt"] + tl
    # multimodal MTV: views v2 (width 64), v4 (width 32, 2 heads), audio (64); ordered by tokens
    mtv = build("mtv", "av")
    assert [st.name for st in mtv.views] == ["v/4", "v/2", "a"]
    assert [st.patches.n for st in mtv.views] == [2 * s, t * s, (128 // 16) * 8]
    w = [32, 64, 64]
    Pa = 16 * 16
    views = (2 * P * w[0] + w[0] + L * block_params(w[0]) + 2 * w[0]) + stream \
        + (Pa * d + d + L * block_params(d) + 2 * d)

    def cross(q, kv):  # two LayerNorms, q, kv to the querying width, zero-initialised output
        return 2 * q + 2 * kv + (q * q + q) + (kv * 2 * q + 2 * q) + (q * q + q)
    lateral = (L - 2) * (cross(w[0], w[1]) + cross(w[1], w[2]))  # fusion from layer 2 of 4
    T = 2 + 4 + 8  # time indices of the views
    glob = sum(wi * d + d for wi in w) + T * d + block_params(d) + 2 * d
    assert sum(p.numel() for p in mtv.parameters()) == views + lateral + glob + heads


def test_shapes_through_each_model():
    v, a = torch.randn(2, 3, 8, 64, 64), torch.randn(2, 128, 128)
    for arch, mod, tl in [("vivit_fe", "video", 0), ("vivit_fsa", "video", 8),
                          ("vivit_fdp", "video", 0), ("mbt", "av", 8), ("mtv", "av", 8)]:
        m = build(arch, mod, tokenlearner=tl)
        out = m(a=a, v=v) if mod == "av" else m(v=v)
        assert out["label"].shape == (2, 7), arch
        assert set(m.layer_ids()) == {n for n, _ in m.named_parameters()}, arch
    st = build("mbt", tokenlearner=8).streams["v"]
    x = st.tokens(v)
    assert x.shape == (2, 64, D)
    assert st.layer(1, st.layer(0, x)).shape == (2, 4 * 8, D)  # 8 learned tokens per time index


@pytest.mark.parametrize("arch,mod,tl", [("mbt", "video", 0), ("mbt", "av", 0), ("mbt", "av", 8),
                                         ("vivit_fe", "video", 0), ("vivit_fsa", "video", 0),
                                         ("vivit_fdp", "video", 8), ("mtv", "av", 0),
                                         ("mtv", "video", 8)])
def test_flops_match_torch_s_counter(arch, mod, tl, monkeypatch):
    def matmul_attention(q, k=None, v=None):  # what the counter sees (not CPU SDPA)
        if k is None:  # a packed (B, N, 3, H, hd) qkv
            q, k, v = q.permute(2, 0, 3, 1, 4)
        return (q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5).softmax(-1) @ v
    monkeypatch.setattr(avmae, "attention", matmul_attention)
    monkeypatch.setattr(avmae, "get_ops", lambda *a: dict(attention=matmul_attention))
    m = build(arch, mod, tokenlearner=tl).eval()
    v, a = torch.randn(1, 3, 8, 64, 64), torch.randn(1, 128, 128)
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        m.features(**(dict(a=a, v=v) if mod == "av" else dict(v=v)))
    assert m.flops()["forward"] == pytest.approx(fc.get_total_flops(), rel=1e-6)


def test_the_talk_s_trade_off_at_vit_b_scale():
    """ViT-B at the paper's input (16 frames of 224: 1568 tokens) and at ViViT's (32 frames,
    3136 tokens): the factorised encoder and dot-product cost less than the unfactorised model,
    TokenLearner (8 per time index after the middle) about half; factorised self-attention pays
    its second attention's projections (2 x 4 d^2 per token and layer), which only the longer clip
    earns back."""
    def gflop(arch, frames, tl=0):
        cfg = finetune.FinetuneConfig(arch=arch, modality="video", tokenlearner=tl, size="base",
                                      num_frames=frames, image_size=224, drop_path=0.0,
                                      kernels="torch")
        with torch.device("meta"):  # shapes only
            return finetune.build_model(cfg, {"label": 5}, None).flops()["forward"] / 1e9
    full = gflop("mbt", 16)
    # matmuls 2 x 85M x 1568 = 267, attention 4 n^2 d x 12 = 91, the embedding 4
    assert 358 < full < 363
    assert gflop("vivit_fe", 16) < 0.8 * full and gflop("vivit_fdp", 16) < 0.8 * full
    assert gflop("mbt", 16, tl=8) < 0.55 * full  # the first half at full cost, then 64 tokens
    assert full < gflop("vivit_fsa", 16) < 1.05 * full
    assert gflop("vivit_fsa", 32) < 0.85 * gflop("mbt", 32)


def test_mtv_lateral_attention_reads_the_next_view_only():
    m = finetune.build_model(fcfg(arch="mtv", modality="video", num_frames=8, image_size=32,
                                  fusion_layer=3, mtv_views="v1:1,v4:0.5,v2:1"),
                             {"label": 3}, None).eval()
    assert [st.name for st in m.views] == ["v/4", "v/2", "v/1"]  # fewest tokens first
    for layer in m.cross.values():  # view j queries (its width) view j + 1 (keys, values)
        for j, c in enumerate(layer):
            assert c.q.in_features == m.views[j].width
            assert c.kv.in_features == m.views[j + 1].width
            assert torch.count_nonzero(c.proj.weight) == 0  # starts as the views alone
    randomise(m.cross)
    xs = [torch.randn(1, st.patches.n, st.width) for st in m.views]
    base = m.encode_views(list(xs))

    def changed(i):
        ys = list(xs)
        ys[i] = ys[i] + torch.randn(ys[i].shape)
        return [not torch.allclose(b, o, atol=1e-6) for b, o in zip(base, m.encode_views(ys))]
    with torch.no_grad():
        assert changed(0) == [True, False, False]  # information never flows up the order
        assert changed(1) == [True, True, False]
        # one fusion layer (the last of 4) moves it one view down: view 2 reaches view 1 only
        assert changed(2) == [False, True, True]
        m.cross["2"] = m.cross["3"]
        assert changed(2) == [True, True, True]


def test_mtv_views_spec_errors_are_clear():
    for spec, msg in [("v2:1,x:1", "is not"), ("v:1", "is not"), ("a2:1,v2:1", "is not"),
                      ("v2:1,a:1", "modalities")]:
        with pytest.raises(ValueError, match=msg):
            finetune.mtv_views(fcfg(arch="mtv", modality="video", mtv_views=spec), 2)
    with pytest.raises(SystemExit, match="divide"):
        finetune.build_model(fcfg(arch="mtv", modality="video", mtv_views="v3:1"), {"l": 2}, None)
    with pytest.raises(SystemExit, match="--modality video"):
        finetune.parse_args(["--arch", "vivit_fe", "--modality", "av", "--data", "x"])


VIDEO_STREAM = [(p, i) for p, i in zip(PRETRAINED, IDS) if i != "audio-only"]


@pytest.mark.parametrize("pre", [p for p, _ in VIDEO_STREAM], ids=[i for _, i in VIDEO_STREAM])
def test_weight_mapping_from_every_pretraining_with_a_video_stream(tmp_path, pre):
    path, _ = pretrained_ckpt(tmp_path, **pre)
    ck = torch.load(path, weights_only=True)
    pcfg = ck["model_config"]

    def mapped(arch, modality="video", **kw):
        model = finetune.build_model(fcfg(arch=arch, modality=modality, **kw), {"label": 5}, pcfg)
        state, report = finetune.map_pretrained(ck["model"], pcfg, model)
        missing, unexpected = model.load_state_dict(state, strict=False)
        assert not unexpected and sorted(missing) == report["new"]
        return model, report
    ref, _ = mapped("mbt")  # today's video-only model (its mapping is tested against the encoder)
    ref = ref.state_dict()
    expect_new = {"vivit_fe": ("temporal.", "time_pos"), "vivit_fsa": (".attn_t.", ".norm_t."),
                  "vivit_fdp": (), "tokenlearner": (".learner.",)}
    for name, new in expect_new.items():
        model, report = mapped("mbt", tokenlearner=8) if name == "tokenlearner" else mapped(name)
        assert all(k.startswith("heads.") or any(p in k for p in new) for k in report["new"]), name
        assert any(any(p in k for p in new) for k in report["new"]) or not new
        for k, t in model.state_dict().items():  # every pretrained tensor where the model has it
            if k in ref and k not in report["new"]:
                assert torch.equal(t, ref[k]), (name, k)
    # MTV: the full-width views from the streams of their modality, the narrow one new
    model, report = mapped("mtv", "video", mtv_views="v2:1,v4:1,v4:0.5")
    names = [st.name + f"@{st.width}" for st in model.views]
    assert names == ["v/4@64", "v/4@32", "v/2@64"]  # by token count, ties as given
    sd = model.state_dict()
    for k in ref:
        if k.startswith("streams.v.blocks."):
            for view in (0, 2):
                assert torch.equal(sd[k.replace("streams.v", f"views.{view}")], ref[k]), k
    assert all(k.startswith(("views.1.", "cross.", "proj.", "global_", "heads."))
               for k in report["new"])
    # the 4-frame tubelet re-inflated from the 2-frame one: a still clip embeds as before
    still = torch.rand(1, 3, 1, 32, 32).expand(1, 3, 4, 32, 32)
    e2 = model.views[2].embed(model.views[2].patches.patchify(still))  # (1, 2 * 4, D)
    e4 = model.views[0].embed(model.views[0].patches.patchify(still))  # (1, 1 * 4, D)
    assert torch.allclose(e2[:, :4], e4, atol=1e-5)
    assert any("re-inflated to 4 frames" in line for line in report["loaded"])


def test_multimodal_mtv_maps_the_audio_view_from_the_audio_stream(tmp_path):
    path, _ = pretrained_ckpt(tmp_path, encoder="separate")
    ck = torch.load(path, weights_only=True)
    pcfg = ck["model_config"]
    ref = finetune.build_model(fcfg(modality="audio"), {"label": 5}, pcfg)
    ref.load_state_dict(finetune.map_pretrained(ck["model"], pcfg, ref)[0], strict=False)
    mtv = finetune.build_model(fcfg(arch="mtv", modality="av"), {"label": 5}, pcfg)
    state, report = finetune.map_pretrained(ck["model"], pcfg, mtv)
    mtv.load_state_dict(state, strict=False)
    k = [i for i, st in enumerate(mtv.views) if st.mod == "a"][0]
    for n, t in ref.streams["a"].state_dict().items():
        assert torch.equal(mtv.views[k].state_dict()[n], t), n
    # with the lateral connections at zero (their init), the audio view computes the audio stream
    a = torch.randn(2, 64, 32)  # the checkpoint's 32 mel bins
    ref.eval(), mtv.eval()
    with torch.no_grad():
        xs = [st.tokens(a if st.mod == "a" else torch.rand(2, 3, 4, 32, 32)) for st in mtv.views]
        assert torch.allclose(mtv.encode_views(xs)[k].mean(1), ref.features(a=a)["a"], atol=1e-5)


def test_finetune_cli_runs_each_new_architecture(builtin, tmp_path):
    for arch, extra in [("vivit_fsa", ["--tokenlearner", "4"]), ("mtv", ["--modality", "av"])]:
        res = finetune.main(["--preset", "quick", "--data", builtin, "--max_steps", "2",
                             "--out_dir", str(tmp_path / arch), "--num_frames", "4",
                             "--audio_frames", "64", "--batch_size", "4", "--workers", "0",
                             "--arch", arch, *(["--modality", "video"] if arch != "mtv" else []),
                             *extra])
        assert 0 <= res["label_top1"] <= 1 and res["gflop_per_clip"] > 0, res


def test_pool_max_reads_the_largest_token_and_mean_stays_the_default():
    """--pool max: each channel's largest token is the feature (a short event in a long clip is
    not averaged away); mean is the papers' and the default."""
    import avmae
    import torch
    cfg = avmae.make_config("tiny", modalities="a", audio_frames=64, mel_bins=32)
    a = torch.randn(2, 64, 32)
    for arch in ("mbt", "vit"):
        mean = avmae.build_backbone(arch, cfg, {"label": 5}, dict(
            fusion_layer=4, bottlenecks=4, inner=None, linear_probe=False, mbt_head="shared",
            tokenlearner=(0, 0), unimodal_loss=False))
        assert mean.pooling == "mean"
        peak = avmae.build_backbone(arch, cfg, {"label": 5}, dict(
            fusion_layer=4, bottlenecks=4, inner=None, linear_probe=False, mbt_head="shared",
            tokenlearner=(0, 0), unimodal_loss=False, pool="max"))
        peak.load_state_dict(mean.state_dict())
        tokens = peak.tokens(a)["a"]
        want = tokens.amax(1) if arch == "mbt" else peak.fc_norm(tokens.amax(1))
        assert torch.allclose(peak.features(a)["a"], want)
        assert not torch.allclose(peak.features(a)["a"], mean.features(a)["a"])
        assert peak.backbone["options"]["pool"] == "max"


def test_pool_max_reaches_cavmae_pooling_and_is_refused_where_a_backbone_pools_its_own_way():
    import avmae
    import pytest
    import torch
    o = dict(fusion_layer=4, bottlenecks=4, inner=None, linear_probe=False, mbt_head="shared",
             tokenlearner=(0, 0), unimodal_loss=False, temporal=1)
    cfg = avmae.make_config("tiny", audio_frames=64, mel_bins=32, num_frames=4, image_size=32)
    joint = avmae.build_backbone("encoder_pooled", cfg, {"label": 5}, {**o, "pool": "max"})
    a, v = torch.randn(2, 64, 32), torch.randn(2, 3, 4, 32, 32)
    t = joint.tokens(a, v)
    want = joint.head_norm(torch.cat(list(t.values()), 1).amax(1))
    assert torch.allclose(joint.features(a, v)["av"], want)
    vcfg = avmae.make_config("tiny", modalities="v", num_frames=4, image_size=32)
    with pytest.raises(ValueError, match="vivit_fe pools by its own design"):
        avmae.build_backbone("vivit_fe", vcfg, {"label": 5}, {**o, "pool": "max"})
