"""Released weights come in through converters, each held equal to the authors' own model on the
same input: the fixtures are the authors' model at a tiny config (random init), its state dict in
the release's layout, a fixed input and the authors' outputs, made by tests/fixtures/make_foreign.py
from the authors' repository at a named commit."""
import os

import pytest
import torch

import avmae
import finetune

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")


def rel(x, y) -> float:
    return ((x - y).norm() / y.norm()).item()


@pytest.fixture
def cavmae(tmp_path):
    f = torch.load(os.path.join(FIXTURES, "cavmae_tiny.pt"), weights_only=True)
    path = tmp_path / "audio_model.pth"  # (the release's name and layout)
    torch.save(f["state"], path)
    return str(path), f


def test_cavmae_release_gives_the_authors_features(cavmae):
    path, f = cavmae
    model = avmae.load(path, heads=f["config"]["num_heads"], kernels="torch")
    cfg, x, want = model.cfg, f["inputs"], f["outputs"]
    assert (cfg.encoder, cfg.depth, cfg.joint_layers, cfg.num_frames) == ("cavmae", 12, 1, 1)
    v = x["v"].unsqueeze(2)  # its one frame as a clip of cfg.num_frames = 1
    with torch.no_grad():
        fused = model.encode(a=x["a"], v=v)
        _, uni = model.encoder.with_unimodal(model.embed(model.patchify(dict(a=x["a"], v=v)),
                                                         None))
    # its audio tokens run frequency-major: ours (time t, frequency f) is its f * gt + t
    gt, gf = model.patches["a"].grid
    theirs = torch.arange(gt * gf).view(gf, gt).T.reshape(-1)
    errors = [rel(fused["a"], want["fused_a"][:, theirs]), rel(fused["v"], want["fused_v"]),
              rel(uni["a"], want["uni_a"][:, theirs]), rel(uni["v"], want["uni_v"])]
    # (LayerNorm eps: the authors' 1e-5 against ours 1e-6, about 1e-6 of the features)
    assert max(errors) < 1e-4, errors
    # a wrong token order would not pass: the unpermuted audio is far off
    assert rel(fused["a"], want["fused_a"]) > 0.1


def test_cavmae_release_initialises_a_finetuning(cavmae, builtin, tmp_path):
    path, _ = cavmae
    res = finetune.main(["--preset", "quick", "--data", builtin, "--init", path, "--num_frames",
                         "2", "--image_size", "32", "--audio_frames", "64", "--workers", "0",
                         "--batch_size", "8", "--max_steps", "1", "--views", "1", "--kernels",
                         "torch", "--out_dir", str(tmp_path / "ft")])
    assert res["clips"] > 0 and "label_top1" in res
    import json
    report = json.load(open(tmp_path / "ft" / "load_report.json"))
    assert "streams.a.embed.bias <- patch_embed.a.bias + type_embed.a" in report["loaded"]
    assert any(r.startswith("streams.v.pos.table <- resized enc_pos.v.table")
               for r in report["loaded"])


def test_a_state_dict_of_another_model_is_named_not_guessed(tmp_path):
    torch.save({"module.fc.weight": torch.zeros(2, 2)}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match=r"other.pth: a state dict avmae cannot place \(it "
                                         r"converts CAV-MAE"):
        avmae.load(str(tmp_path / "other.pth"))


def test_videomae_release_gives_the_authors_features_and_predictions(tmp_path):
    f = torch.load(os.path.join(FIXTURES, "videomae_tiny.pt"), weights_only=True)
    path = tmp_path / "checkpoint.pth"  # (the release wraps its state dict in "model")
    torch.save(f["state"], path)
    heads = f["config"]["encoder_num_heads"]
    # (the clip's shape is in no tensor of the release: 16 frames unless told; heads likewise)
    model = avmae.load(str(path), heads=heads, dec_heads=heads, image_size=32, kernels="torch")
    x, mask, want = f["inputs"]["v"], f["inputs"]["mask"], f["outputs"]
    assert (model.cfg.modalities, model.cfg.num_frames, model.cfg.tubelet) == ("v", 16, 2)
    ids = torch.arange(mask.shape[1])
    masks = {"v": (torch.stack([ids[~m] for m in mask]), torch.stack([ids[m] for m in mask]))}
    with torch.no_grad():
        feats = model.encode(v=x)["v"]  # avmae's [-1, 1] frames; it read them ImageNet-normalised
        pred, where = model.forward_decoder(model.forward_encoder(model.patchify({"v": x}),
                                                                  masks), masks)["v"]
    assert rel(feats, want["features"]) < 1e-4 and rel(pred, want["pred"]) < 1e-4
    assert torch.equal(where, masks["v"][1])


def release(tmp_path, name, file):
    f = torch.load(os.path.join(FIXTURES, name), weights_only=True)
    torch.save(f["state"], tmp_path / file)  # (the release's layout: {"model": encoder})
    return str(tmp_path / file), f


def test_mae_release_as_a_video_and_as_an_audio_encoder_gives_the_authors_tokens(tmp_path):
    path, f = release(tmp_path, "mae_tiny.pt", "mae_pretrain_vit_base.pth")
    heads = f["config"]["heads"]
    video = avmae.load(path, heads=heads, kernels="torch")  # (video: the default)
    assert (video.cfg.modalities, video.cfg.cls_token, video.cfg.num_frames) == ("v", True, 2)
    # its image as a still clip of one tubelet, in avmae's [-1, 1]: the image's tokens
    clip = f["inputs"]["frame"].unsqueeze(2).expand(-1, -1, video.cfg.tubelet, -1, -1)
    audio = avmae.load(path, heads=heads, kernels="torch", modalities="a")
    with torch.no_grad():
        assert rel(video.encode(v=clip)["v"], f["outputs"]["video"]) < 1e-4
        # the spectrogram as the image (time down, frequency across), the RGB filters summed
        assert rel(audio.encode(a=f["inputs"]["spec"])["a"], f["outputs"]["audio"]) < 1e-4
        # its [CLS] token counts: without it the tokens are another function
        video.cfg.cls_token = False
        assert rel(video.encode(v=clip)["v"], f["outputs"]["video"]) > 1e-2
    # the release holds no decoder: ours starts anew, and a strict --init would say so


def test_audiomae_release_gives_the_authors_tokens(tmp_path):
    path, f = release(tmp_path, "audiomae_tiny.pt", "pretrained.pth")
    model = avmae.load(path, heads=f["config"]["heads"], kernels="torch")
    assert (model.cfg.modalities, model.cfg.audio_frames, model.cfg.mel_bins) == ("a", 64, 128)
    with torch.no_grad():
        assert rel(model.encode(a=f["inputs"]["spec"])["a"], f["outputs"]["audio"]) < 1e-4


def test_finetuned_releases_give_the_authors_logits(tmp_path):
    # CAV-MAE's CAVMAEFT (its multimodal mode): the fused tokens averaged, then its mlp_head
    path, f = release(tmp_path, "cavmae_ft_tiny.pt", "cav-mae-ft.pth")
    model = avmae.load(path, heads=f["config"]["num_heads"], kernels="torch")
    assert isinstance(model, avmae.JointPooled) and model.backbone["arch"] == "encoder_pooled"
    x = f["inputs"]
    with torch.no_grad():
        got = model(a=x["a"], v=x["v"].unsqueeze(2))["label"]
    assert rel(got, f["outputs"]["logits"]) < 1e-4
    # AudioMAE's finetuned ViT (global pool, fc_norm): the ViT backbone
    path, f = release(tmp_path, "audiomae_ft_tiny.pt", "as2m_finetuned.pth")
    model = avmae.load(path, heads=f["config"]["heads"], kernels="torch")
    assert isinstance(model, avmae.ViT)
    with torch.no_grad():
        assert rel(model(a=f["inputs"]["spec"])["label"], f["outputs"]["logits"]) < 1e-4


@pytest.mark.parametrize("arch,name,file,modality", [
    ("vit", "audiomae_tiny.pt", "pretrained.pth", "audio"),
    ("encoder_pooled", "cavmae_tiny.pt", "audio_model.pth", "av")])
def test_a_release_finetunes_into_its_own_backbone(arch, name, file, modality, builtin, tmp_path):
    path, _ = release(tmp_path, name, file)
    res = finetune.main(["--preset", "quick", "--data", builtin, "--init", path, "--arch", arch,
                         "--modality", modality, "--num_frames", "1", "--image_size", "32",
                         "--audio_frames", "64", "--workers", "0", "--batch_size", "8",
                         "--max_steps", "2", "--views", "1", "--kernels", "torch", "--out_dir",
                         str(tmp_path / "ft")])
    assert res["clips"] > 0
    import json
    loaded = json.load(open(tmp_path / "ft" / "load_report.json"))["loaded"]
    assert sum("attn.qkv.weight" in r for r in loaded) >= 2
    if arch == "vit":
        assert "cls_token <- cls_token.a" in loaded
