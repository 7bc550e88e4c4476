"""finetune.py: weight mapping from every pretraining strategy, MBT fusion, metrics, the loop."""
import csv
import json
import math
import os
import shutil

import numpy as np
import pytest
import torch

import avmae
import finetune
import train
from conftest import TINY_INPUTS

RELATIVES = ("mavil", "mavil_mbt", "cavmae", "avme")
PRETRAINED = [dict(encoder=e) for e in ("separate", "mid", "early",
                                        "shared")] + [dict(modalities="a"), dict(modalities="v")] \
    + [avmae.VARIANTS[r] for r in RELATIVES]
IDS = ["separate", "mid", "early", "shared", "audio-only", "video-only", *RELATIVES]


def pretrained_ckpt(tmp_path, **kw):
    """A pretraining checkpoint as train.py writes it (random weights, the real layout)."""
    cfg = avmae.make_config("tiny", **{**TINY_INPUTS, "patch_size": 16, "audio_patch_t": 16,
                                       "audio_patch_f": 16, **kw})
    if cfg.encoder == "separate" and cfg.modalities == "av":
        cfg.decoder = "shared"
    model = avmae.AVMAE(cfg)
    path = tmp_path / f"pre_{cfg.modalities}_{cfg.encoder}_{cfg.pos_embed}.pt"
    torch.save(dict(model=model.state_dict(), model_config=cfg.__dict__.copy(), step=1), path)
    return path, model


def fcfg(**kw):
    base = dict(size="tiny", num_frames=4, image_size=32, audio_frames=64, drop_path=0.0,
                kernels="torch")
    return finetune.FinetuneConfig(**{**base, **kw})


@pytest.mark.parametrize("pre", PRETRAINED, ids=IDS)
@pytest.mark.parametrize("modality,arch", [("av", "mbt"), ("audio", "mbt"), ("video", "mbt"),
                                           ("av", "encoder")])
def test_every_checkpoint_loads_into_every_architecture(tmp_path, pre, modality, arch):
    path, pretrained = pretrained_ckpt(tmp_path, **pre)
    ck = torch.load(path, weights_only=True)
    f, pcfg = fcfg(modality=modality, arch=arch), ck["model_config"]
    if arch == "encoder" and pcfg["modalities"] != "av":
        with pytest.raises(ValueError, match="needs an audiovisual checkpoint"):
            finetune.map_pretrained(ck["model"], pcfg, finetune.build_model(f, {"label": 5}, pcfg))
        return
    model = finetune.build_model(f, {"label": 5}, pcfg)
    state, report = finetune.map_pretrained(ck["model"], pcfg, model)
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected
    assert sorted(missing) == [k for k in report["new"] if "num_batches" not in k]
    # every encoder tensor of the finetuned modalities is used; what is dropped is the decoder or
    # the other modality's own stream, and says so
    finetuned = {"av": "av", "audio": "a", "video": "v"}[modality]
    for k in report["dropped"]:
        assert k.startswith("decoder.") or \
            k in report["dropped_why"]["other modality"] or k in report["dropped_why"]["fusion"], k
    assert all(n.startswith((
        "heads.",
        "bottleneck")) or (n.startswith("streams.") and "embed" in n) for n in report["new"])
    for m in finetuned:  # the audio patch embedding included (the authors' code leaves it random)
        name = f"streams.{m}.embed.weight" if arch == "mbt" else f"patch_embed.{m}.weight"
        if m in avmae.AVMAEConfig(**pcfg).mods:
            assert torch.equal(model.state_dict()[name],
                               pretrained.state_dict()[f"patch_embed.{m}.weight"])
        # an audio-only checkpoint: the tubelet filter from the audio patch filter on the
        # tubelet's central frame (ViViT's better initialiser, the authors' config)
        elif m == "v":
            assert f"{name} <- central(patch_embed.a.weight)" in report["loaded"]
        else:
            assert name in report["new"]  # a video-only checkpoint has no embedding for audio


@pytest.mark.parametrize("pre",
                         [dict(encoder="separate"), dict(encoder="shared"), dict(modalities="a")],
                         ids=["separate", "shared", "audio-only"])
def test_mbt_streams_compute_what_the_pretrained_encoder_computed(tmp_path, pre):
    path, pretrained = pretrained_ckpt(tmp_path, **pre)
    ck = torch.load(path, weights_only=True)
    model = finetune.build_model(fcfg(modality="audio"), {"label": 3}, ck["model_config"])
    state, _ = finetune.map_pretrained(ck["model"], ck["model_config"], model)
    model.load_state_dict(state, strict=False)
    model.eval(), pretrained.eval()
    a = torch.randn(2, 64, 32)
    inputs = dict(a=a) if pretrained.cfg.modalities == "a" else dict(a=a,
                                                                     v=torch.rand(2, 3, 4, 32, 32))
    assert torch.allclose(model.features(a=a)["a"], pretrained.encode(**inputs)["a"].mean(1),
                          atol=1e-5)


def test_mid_fusion_maps_joint_layers_into_both_streams_untied(tmp_path):
    path, pretrained = pretrained_ckpt(tmp_path, encoder="mid")
    ck = torch.load(path, weights_only=True)
    model = finetune.build_model(fcfg(), {"label": 3}, ck["model_config"])
    model.load_state_dict(finetune.map_pretrained(ck["model"], ck["model_config"], model)[0],
                          strict=False)
    L, S = 4, 2
    src = pretrained.state_dict()
    for m in "av":
        assert torch.equal(model.streams[m].blocks[0].attn.qkv.weight,
                           src[f"encoder.streams.{m}.blocks.0.attn.qkv.weight"])
        assert torch.equal(model.streams[m].blocks[L - S].mlp.fc1.weight,
                           src["encoder.joint.blocks.0.mlp.fc1.weight"])
        assert torch.equal(model.streams[m].inner_norm.weight,
                           src[f"encoder.streams.{m}.norm.weight"])
    fc1 = {m: model.streams[m].blocks[L - S].mlp.fc1.weight for m in "av"}
    assert fc1["a"] is not fc1["v"]


def test_longer_video_than_pretraining(tmp_path):
    for pos in ("sincos", "learned"):
        path, _ = pretrained_ckpt(tmp_path, encoder="separate", pos_embed=pos)
        ck = torch.load(path, weights_only=True)
        # 4 -> 8 frames
        model = finetune.build_model(fcfg(modality="video", num_frames=8), {"label": 3},
                               ck["model_config"])
        state, report = finetune.map_pretrained(ck["model"], ck["model_config"], model)
        model.load_state_dict(state, strict=False)
        assert model.streams["v"].pos().shape[0] == 2 * 8 and model(
            v=torch.rand(1, 3, 8, 32, 32))["label"].shape == (1, 3)
        if pos == "learned":  # interpolated along time: the first time slice stays close
            assert "streams.v.pos.table <- resized enc_pos.v.table" in report["loaded"]


def test_mismatched_checkpoints_are_clear_errors(tmp_path, builtin):
    path, _ = pretrained_ckpt(tmp_path, encoder="separate")
    ck = torch.load(path, weights_only=True)
    # the config says 96 wide, the weights are 64
    wrong = {**ck["model_config"], "width": 96, "heads": 4}
    model = finetune.build_model(fcfg(), {"label": 3}, wrong)
    with pytest.raises(ValueError, match=r"has shape \(.*\) but .* needs"):
        finetune.map_pretrained(ck["model"], wrong, model)
    state = dict(ck["model"])
    del state["encoder.streams.a.blocks.1.mlp.fc2.weight"]
    with pytest.raises(ValueError,
                       match="checkpoint has no encoder.streams.a.blocks.1.mlp.fc2.weight"):
        finetune.map_pretrained(state, ck["model_config"],
                                finetune.build_model(fcfg(), {"label": 3}, ck["model_config"]))
    torch.save({"state_dict": {}}, tmp_path / "other.pt")  # somebody else's checkpoint
    with pytest.raises(SystemExit, match="not an avmae pretraining checkpoint"):
        finetune.finetune(fcfg(init=str(tmp_path / "other.pt"), data=builtin,
                         out_dir=str(tmp_path / "o")), train.Dist())
    with pytest.raises(SystemExit, match=r"--init .*missing\.pt: no such file"):
        finetune.finetune(fcfg(init=str(tmp_path / "missing.pt"), data=builtin,
                         out_dir=str(tmp_path / "o")), train.Dist())
    (tmp_path / "cut.pt").write_bytes(path.read_bytes()[:1000])  # a copy cut short
    with pytest.raises(SystemExit, match=r"--init .*cut\.pt: not a readable checkpoint"):
        finetune.finetune(
            fcfg(init=str(tmp_path / "cut.pt"), data=builtin, out_dir=str(tmp_path / "o")),
            train.Dist())


def test_scratch_model_takes_the_shape_of_a_pretraining_with_another_depth(tmp_path):
    # train.py --depth 4 has a scratch twin: finetune.py --depth 4 (the size's width and heads)
    m = finetune.build_model(fcfg(modality="audio", depth=6), {"label": 3}, None)
    assert len(m.streams["a"].blocks) == 6 and m.cfg.width == avmae.SIZES["tiny"]["width"]
    m = finetune.build_model(fcfg(modality="audio", width=96, heads=4), {"label": 3}, None)
    assert m.cfg.width == 96 and m.cfg.depth == avmae.SIZES["tiny"]["depth"]
    # from a checkpoint the shape is the checkpoint's; a contradicting flag says so
    path, _ = pretrained_ckpt(tmp_path, depth=6)
    pcfg = torch.load(path, weights_only=True)["model_config"]
    assert finetune.build_model(fcfg(modality="audio", depth=6), {"label": 3}, pcfg).cfg.depth == 6
    with pytest.raises(SystemExit, match=r"encoder is width 64, depth 6.*drop --width"):
        finetune.build_model(fcfg(modality="audio", depth=4, init=str(path)), {"label": 3}, pcfg)


def test_layer_scale_comes_with_the_checkpoint_and_shapes_a_scratch_model(tmp_path):
    path, _ = pretrained_ckpt(tmp_path, layer_scale=0.1)
    ck = torch.load(path, weights_only=True)
    pcfg = ck["model_config"]
    for k, w in ck["model"].items():  # as if pretraining had moved them
        if k.endswith(".gamma"):
            w.fill_(0.37)
    model = finetune.build_model(fcfg(modality="audio"), {"label": 3}, pcfg)
    state, report = finetune.map_pretrained(ck["model"], pcfg, model)
    model.load_state_dict(state, strict=False)  # (all but the new head)
    blocks = list(model.streams["a"].blocks)
    want = torch.full((64,), 0.37)
    assert len(blocks) == 4 and all(torch.equal(b.ls1.gamma, want) and
                                    torch.equal(b.ls2.gamma, want) for b in blocks)
    assert "streams.a.blocks.3.ls2.gamma <- encoder.joint.blocks.1.ls2.gamma" in report["loaded"]
    # from scratch the flag sets it; with --init a contradicting flag says so
    m = finetune.build_model(fcfg(modality="audio", layer_scale=0.2), {"label": 3}, None)
    assert all(torch.equal(b.ls1.gamma, torch.full((64,), 0.2)) for b in m.streams["a"].blocks)
    assert not hasattr(finetune.build_model(fcfg(modality="audio"), {"label": 3},
                                            None).streams["a"].blocks[0].ls1, "gamma")
    with pytest.raises(SystemExit, match=r"layer scale 0.1; drop .*--layer_scale"):
        finetune.build_model(fcfg(modality="audio", layer_scale=0.2, init=str(path)),
                             {"label": 3}, pcfg)
    with pytest.raises(SystemExit, match="--layer_scale -1.0: LayerScale's first value"):
        finetune.parse_args(["--layer_scale", "-1"])


def test_mbt_modalities_meet_only_from_the_fusion_layer():
    cfg = avmae.make_config("tiny", **{**TINY_INPUTS, "patch_size": 16}, depth=6)
    model = avmae.MBT(cfg, {"label": 3}, fusion_layer=3).eval()
    seen = {}
    for i, blk in enumerate(model.streams["v"].blocks):
        blk.register_forward_hook(lambda mod, inp, out,
                                  i=i: seen.__setitem__(i, out[:, :8].detach().clone()))
    v = torch.rand(2, 3, 4, 32, 32)
    model.features(a=torch.randn(2, 64, 32), v=v)
    first = dict(seen)
    model.features(a=torch.randn(2, 64, 32) * 3, v=v)  # other audio, the same video
    # layers 0-2 are separate; layer 3 (the fusion layer) gives video the bottlenecks as they were
    # learned and writes audio into their averaged outputs; video tokens see audio from layer 4 on
    for i in range(6):
        assert torch.equal(first[i], seen[i]) == (i <= 3), f"layer {i}"


# -----------------------------------------------------------------------------
# metrics, against cases computed by hand


def test_top_k_and_epic_action():
    z = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.1, 0.1], [0.2, 0.3, 0.5]])
    y = torch.tensor([1, 2, 2])
    assert finetune.topk_accuracy(z, y, 1) == pytest.approx(2 / 3) and finetune.topk_accuracy(
        z, y, 2) == pytest.approx(2 / 3)
    assert finetune.topk_accuracy(z, y, 3) == 1.0
    m = finetune.metrics({"verb": z, "noun": z.flip(1)},
                         {"verb": y, "noun": torch.tensor([1, 0, 2])}, False)
    # verb right on clips 0 and 2; noun (flipped scores -> argmax 1, 2, 0) right on clip 0 only
    assert m["verb_top1"] == pytest.approx(2 / 3) and m["noun_top1"] == pytest.approx(1 / 3)
    assert m["action_top1"] == pytest.approx(1 / 3)


def test_average_precision_with_ties_and_empty_classes():
    s = torch.tensor([[0.9, 0.5, 0.1], [0.8, 0.5, 0.2], [0.3, 0.5, 0.3], [0.1, 0.2, 0.4]])
    y = torch.tensor([[1, 1, 0], [0, 0, 0], [1, 1, 0], [0, 0, 0]])
    ap = finetune.average_precision(s, y)
    # class 0: ranks 1 (+), 2 (-), 3 (+): AP = (1/1 + 2/3) / 2
    assert ap[0].item() == pytest.approx((1 + 2 / 3) / 2)
    # class 1: three clips tied at 0.5 (2 positives) form one threshold: precision 2/3 at recall 1
    assert ap[1].item() == pytest.approx(2 / 3)
    assert math.isnan(ap[2].item())  # no positives: left out of the mean
    m = finetune.metrics({"label": torch.logit(s)}, {"label": y}, True)
    assert m["label_mAP"] == pytest.approx(((1 + 2 / 3) / 2 + 2 / 3) / 2)


def test_auc_and_d_prime():
    s = torch.tensor([[0.1], [0.4], [0.35], [0.8], [0.4]])
    y = torch.tensor([[0], [0], [1], [1], [1]])
    # positives 0.35, 0.8, 0.4 vs negatives 0.1, 0.4: pairs won 1 + 2 + (1 + 0.5 tie) = 4.5 of 6
    assert finetune.roc_auc(s, y)[0].item() == pytest.approx(4.5 / 6)
    assert finetune.d_prime(0.5) == pytest.approx(0.0)
    assert finetune.d_prime(0.7602499389) == pytest.approx(1.0,
                                                           abs=1e-6)  # Phi(1 / sqrt 2) = 0.76025


# -----------------------------------------------------------------------------
# optimisation


def test_layer_decay_and_mixup():
    model = avmae.MBT(avmae.make_config("tiny", **{**TINY_INPUTS, "patch_size": 16}), {"label": 3},
                      fusion_layer=3)
    f = fcfg(layer_decay=0.5)
    groups = finetune.param_groups(model, f, 1.0)
    scale = {id(p): g["lr_scale"] for g in groups for p in g["params"]}
    assert scale[id(model.heads["av"]["label"].weight)] == 1.0
    # block 3 of 4: one below the top
    assert scale[id(model.streams["a"].blocks[3].attn.qkv.weight)] == 0.5
    assert scale[id(model.streams["v"].embed.weight)] == 0.5 ** 5
    # outside the blocks (as MAE's lr_decay.py and the authors' code): the full rate
    norm = next(p for n, p in model.named_parameters() if n.startswith("norm."))  # (the final)
    assert scale[id(model.bottleneck)] == 1.0 and scale[id(norm)] == 1.0
    g = torch.Generator().manual_seed(0)
    batch = {"a": torch.arange(4.0).view(4, 1), "v": torch.arange(4.0).view(4, 1) * 10,
             "label": torch.tensor([0, 1, 2, 0])}
    mixed, t = finetune.mixup(batch, ("a", "v"), {"label": 3}, 0.5, False, g)
    assert torch.allclose(t["label"].sum(1), torch.ones(4))
    # the same weights and partners for both modalities
    assert torch.allclose(mixed["v"], mixed["a"] * 10)


# -----------------------------------------------------------------------------
# the loop on the built-in set


def test_resuming_with_another_shape_is_a_clear_error(builtin, tmp_path):
    args = ["--preset", "quick", "--data", builtin, "--workers", "0", "--num_frames", "4",
            "--image_size", "32", "--audio_frames", "64", "--batch_size", "8", "--max_steps", "1",
            "--modality", "audio", "--kernels", "torch", "--out_dir", str(tmp_path / "ft")]
    finetune.main([*args, "--depth", "3"])
    with pytest.raises(SystemExit, match=r"its model was made with --depth 3 \(this run: --depth "
                       r"0\); resume or evaluate it with the flags it was made with"):
        finetune.main([*args, "--resume", "auto"])  # the size's depth, 4
    # the flags that make the model, for a resumed run and an evaluation alike (a traceback of
    # load_state_dict before, or a model that was not the one trained)
    for more, made in ((["--modality", "video"], "--modality audio"),
                       (["--mbt_head", "per_modality"], "--mbt_head separate"),
                       (["--fusion_layer", "1"], "--fusion_layer 2"),
                       (["--linear_probe"], "--linear_probe False"),
                       (["--eval_only", "--modality", "av"], "--modality audio")):
        now = " ".join(more[-2:]) if more[-1] != "--linear_probe" else "--linear_probe True"
        with pytest.raises(SystemExit, match=f"made with {made} \\(this run: {now}\\); resume"):
            finetune.main([*args, "--depth", "3", "--resume", "auto", *more])
    # the same flags, other input shapes: learned positions (a pretraining's) of another length
    pre = train.main(["--preset", "quick", "--data", builtin, "--workers", "0", "--audio_frames",
                      "64", "--batch_size", "8", "--max_steps", "1", "--modalities", "a",
                      "--pos_embed", "learned", "--picture_every", "0", "--kernels", "torch",
                      "--out_dir", str(tmp_path / "pre")])
    ft = [*args[:-1], str(tmp_path / "ft2"), "--init", pre["checkpoint"]]
    finetune.main(ft)
    with pytest.raises(SystemExit, match=r"its model does not fit this run's \(streams\.a\.pos"):
        finetune.main([*ft, "--resume", "auto", "--audio_frames", "128"])


def test_finetune_runs_evaluates_and_reports(builtin, tmp_path, capsys):
    pre = train.main(["--preset", "quick", "--data", builtin, "--out_dir", str(tmp_path / "pre"),
                      "--workers", "0", "--num_frames", "4", "--image_size", "32", "--audio_frames",
                      "64", "--max_steps", "2", "--batch_size", "8", "--picture_every", "0",
                      "--kernels", "torch"])
    args = ["--preset", "quick", "--data", builtin, "--init", pre["checkpoint"], "--workers", "0",
            "--num_frames", "4", "--image_size", "32", "--audio_frames", "64", "--batch_size", "8",
            "--max_steps", "4", "--kernels", "torch"]
    res = finetune.main([*args, "--out_dir", str(tmp_path / "ft")])
    assert 0 <= res["label_top1"] <= 1 and res["clips"] == 8
    assert "av mbt fused from layer 2 of 4 | " in capsys.readouterr().out  # (the run's header)
    out = tmp_path / "ft"
    assert json.load(open(out / "metrics.json"))["label_top1"] == res["label_top1"]
    rows = list(csv.DictReader(open(out / "predictions.csv")))
    assert len(rows) == 8 and len(rows[0]["label_top5"].split(";")) == 5
    assert len(list(csv.DictReader(open(out / "per_class.csv")))) == 8
    report = json.load(open(out / "load_report.json"))
    assert "streams.a.embed.weight <- patch_embed.a.weight" in report["loaded"]
    again = finetune.main([*args, "--out_dir", str(out), "--eval_only", "--resume", "auto"])
    assert again["label_top1"] == res["label_top1"]
    # a test clip that cannot be read is left out, said and counted: its stand-in (the next clip)
    # is not counted twice
    copy = tmp_path / "set"
    shutil.copytree(builtin, copy)
    ids = [r["id"] for r in csv.DictReader(open(copy / "test.csv"))]
    with open(copy / "clips" / ids[2] / "audio.flac", "r+b") as f:
        f.truncate(300)
    capsys.readouterr()
    less = finetune.main([*args[:3], str(copy), *args[4:], "--out_dir", str(out), "--eval_only",
                          "--resume", "auto"])
    assert less["clips"] == 7 and less["unreadable_clips"] == 1
    assert f"1 test clip(s) could not be read and are left out of the metrics: {ids[2]}" in (
        capsys.readouterr().err)
    rows = [r["id"] for r in csv.DictReader(open(out / "predictions.csv"))]
    assert sorted(rows) == sorted(set(ids) - {ids[2]})
    # linear probe: the encoder stays exactly as pretrained
    finetune.main([*args, "--out_dir", str(tmp_path / "lp"), "--linear_probe", "--modality",
                   "audio"])
    ck = torch.load(train.find_checkpoint("auto", str(tmp_path / "lp")), weights_only=True)
    src = torch.load(pre["checkpoint"], weights_only=True)["model"]
    assert torch.equal(ck["model"]["streams.a.blocks.1.attn.qkv.weight"],
                       src["encoder.streams.a.blocks.1.attn.qkv.weight"])
    assert not torch.equal(ck["model"]["heads.a.label.weight"],
                           torch.zeros_like(ck["model"]["heads.a.label.weight"]))
    # without --init it probes a random encoder: a baseline, or a forgotten flag, said
    assert "probes a random encoder" not in capsys.readouterr().out
    finetune.main([*args[:4], *args[6:], "--out_dir", str(tmp_path / "lp0"), "--linear_probe",
                   "--modality", "audio", "--max_steps", "1"])
    assert "--linear_probe without --init probes a random encoder" in capsys.readouterr().out


def test_a_global_batch_that_does_not_split_into_the_ranks_is_one_line(tmp_path):
    # (before, 7 on 2 ranks trained batches of 6 at the learning rate of 7)
    fcfg = finetune.parse_args(["--batch_size", "7", "--out_dir", str(tmp_path)])
    with pytest.raises(SystemExit,
                       match="^--batch_size 7 does not split into 2 ranks x 1 accumulation steps"):
        finetune.finetune(fcfg, train.Dist(rank=0, world=2))


def test_a_log_line_holds_the_mean_loss_since_the_last(tmp_path):
    class Bar:
        def set_postfix(self, shown, refresh=True):
            self.shown = shown

    class Opt:
        param_groups = [dict(lr=1e-3)]
    cfg = finetune.FinetuneConfig(out_dir=str(tmp_path), batch_size=8)
    run = train.Run(cfg, train.Dist(), None, None, Opt(), train.Schedule(0, 10, 0, 1e-3, 10), None,
                    8)
    log, bar = train.Log(run), Bar()
    for loss in (1.0, 3.0, 2.0):
        log.add(dict(loss=loss))
    log.line(3, 0, bar)
    log.add(dict(loss=5.0))
    log.line(4, 0, bar)
    lines = [json.loads(x) for x in open(tmp_path / "log.jsonl")]
    assert [r["loss"] for r in lines] == [2.0, 5.0] and bar.shown["loss"] == "5.0000"
    assert [r["step"] for r in lines] == [3, 4] and lines[0]["epoch"] == 0.3


def test_learning_watch_sets_train_accuracy_beside_test_and_warns_at_chance(capsys):
    from tqdm import tqdm
    watch = finetune.LearningWatch({"label": 6}, False, steps_per_epoch=2, chance=math.log(6))
    y = torch.eye(6)[[0, 1]]
    t = {"a": {"label": y}, "v": {"label": y}}
    right = {"a": {"label": y * 5}, "v": {"label": y * 5}, "a_alone": {"label": -y * 9}}
    for _ in range(2):  # MBT's unimodal logits (a_alone) are no part of the model's prediction
        r, n = watch.correct(right, t, True)
        watch.update(float(r), n, math.log(6))
    res = {**watch.summary(), "label_top1": 0.25}
    assert res["train_top1"] == 1.0
    bar = tqdm(disable=False)
    line = watch.line(2 * 3, res, bar)
    cap = capsys.readouterr()
    out = cap.out + cap.err
    assert "epoch 3: train top-1 1.000" in out and "test label_top1 0.250" in out
    assert "warning: the training loss has not moved from chance" in out
    assert json.loads(line)["train_loss"] == pytest.approx(math.log(6))
    for _ in range(2):
        r, n = watch.correct(right, t, True)
        watch.update(float(r), n, 0.5)
    watch.line(2 * 3, watch.summary(), bar)
    assert watch.loss == [0.5, 0.5]  # the last epoch's only: a checkpoint holds no more
    bar.close()
    cap = capsys.readouterr()
    assert "epoch 3" in cap.out + cap.err and "warning" not in cap.out + cap.err
    assert watch.state() == dict(right=0, seen=0, steps=4, loss=[0.5, 0.5])


def test_chance_is_what_the_label_frequencies_alone_score():
    # a model that learns nothing but the label frequencies reaches their entropy, which is below
    # ln(classes) on an unbalanced set (the warning compared with ln(classes) missed it there)
    rows = [{"label": [0]}] * 8 + [{"label": [1]}] * 2
    q = np.array([0.8, 0.2])
    frequencies = float(-(q * np.log(q)).sum())  # 0.500
    assert finetune.chance_loss(rows, {"label": 2}, False, 0.0) == pytest.approx(frequencies)
    blind = torch.log(torch.tensor(q, dtype=torch.float32)).expand(10, 2)  # such a model's logits
    t = {"label": torch.eye(2)[[0] * 8 + [1] * 2]}
    assert finetune.loss_fn({"label": blind}, t, False, 0.0).item() == pytest.approx(frequencies)
    watch = finetune.LearningWatch({"label": 2}, False, 1, finetune.chance_loss(
        rows, {"label": 2}, False, 0.0))
    msgs = []
    bar = type("Bar", (), dict(disable=False, write=lambda self, m: msgs.append(m)))()
    watch.line(3, {"train_loss": frequencies}, bar)
    assert "not moved from chance" in msgs[-1] and frequencies < 0.98 * math.log(2)
    # label smoothing: the frequencies smoothed; balanced: ln(classes)
    assert finetune.chance_loss([{"label": [c]} for c in range(6)], {"label": 6}, False,
                                0.1) == pytest.approx(math.log(6))
    # heads are averaged as the loss averages them (EPIC's verb and noun), and multi-label is the
    # binary entropies of the classes' frequencies summed, as the binary cross-entropy sums them
    epic = [{"verb": [v], "noun": [n]} for v in range(3) for n in range(4)]
    assert finetune.chance_loss(epic, {"verb": 3, "noun": 4}, False, 0.0) == pytest.approx(
        (math.log(3) + math.log(4)) / 2)
    multi = [{"label": [0, 1]}, {"label": [0]}, {"label": [0]}, {"label": [2]}]
    p = np.array([0.75, 0.25, 0.25, 0.0])  # (a class no training clip has scores 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        h = np.nan_to_num(-(p * np.log(p) + (1 - p) * np.log(1 - p)))
    assert finetune.chance_loss(multi, {"label": 4}, True, 0.0) == pytest.approx(h.sum())
    tm = torch.tensor([[1, 1, 0, 0], [1, 0, 0, 0], [1, 0, 0, 0], [0, 0, 1, 0.]])
    blind = torch.logit(torch.tensor(p).clamp(1e-6, 1 - 1e-6)).float().expand(4, 4)
    assert finetune.loss_fn({"label": blind}, {"label": tm}, True, 0.0).item() == pytest.approx(
        h.sum(), abs=1e-3)


def test_encoder_arch_keeps_the_pretrained_function_with_type_embeddings(tmp_path):
    # CAV-MAE's modality-type embedding is folded into the patch embedding's bias: same features
    path, pretrained = pretrained_ckpt(tmp_path, **avmae.VARIANTS["cavmae"])
    ck = torch.load(path, weights_only=True)
    model = finetune.build_model(fcfg(arch="encoder"), {"label": 3}, ck["model_config"])
    state, report = finetune.map_pretrained(ck["model"], ck["model_config"], model)
    model.load_state_dict(state, strict=False)
    assert "patch_embed.a.bias <- patch_embed.a.bias + type_embed.a" in report["loaded"]
    model.eval(), pretrained.eval()
    x = dict(a=torch.randn(2, 64, 32), v=torch.rand(2, 3, 4, 32, 32))
    feats, enc = model.features(**x), pretrained.encode(**x)
    for m in "av":
        assert torch.allclose(feats[m], enc[m].mean(1), atol=1e-5)


def test_finetune_with_the_gpu_decode_path(builtin, tmp_path):
    # --decode gpu: the workers send JPEG bytes, the batch is decoded and augmented on the device
    # (here the CPU), in training and in the multi-view evaluation alike
    res = finetune.main(["--preset", "quick", "--data", builtin, "--num_frames", "4",
                         "--image_size", "32", "--audio_frames", "64", "--workers", "0",
                         "--batch_size", "8", "--max_steps", "2", "--views", "2", "--kernels",
                         "torch", "--decode", "gpu", "--out_dir", str(tmp_path)])
    assert res["clips"] == 8 and 0 <= res["label_top1"] <= 1


def test_finetune_gradient_accumulation_equals_the_full_batch(builtin, tmp_path):
    # two micro-steps of 4 clips step what one of 8 steps (quick: no mixup, no drop path), and
    # every flag a long run uses (--checkpoint_blocks) leaves the run as it is
    args = ["--preset", "quick", "--data", builtin, "--workers", "0", "--num_frames", "4",
            "--image_size", "32", "--audio_frames", "64", "--batch_size", "8", "--max_steps", "3",
            "--kernels", "torch", "--log_every", "1"]
    runs = {name: finetune.main([*args, *more, "--out_dir", str(tmp_path / name)])
            for name, more in (("one", []), ("acc", ["--grad_accum", "2"]),
                               ("ckpt", ["--checkpoint_blocks"]))}
    losses = {n: [r["loss"] for r in map(json.loads, open(tmp_path / n / "log.jsonl"))
                  if "loss" in r] for n in runs}
    assert len(losses["one"]) == 3 and losses["acc"] == pytest.approx(losses["one"], rel=1e-5)
    assert losses["ckpt"] == losses["one"]
    assert runs["acc"]["label_top1"] == runs["one"]["label_top1"]
    with pytest.raises(SystemExit, match="does not split into 1 ranks x 3 accumulation steps"):
        finetune.main([*args, "--grad_accum", "3", "--out_dir", str(tmp_path / "bad")])


def _two_rank_finetunings(jobs):
    shard = train.shard
    train.shard = lambda model: print("SHARDED") or shard(model)  # (this rank's own process)
    for args in jobs:
        finetune.main(args)


@pytest.mark.slow(25)
def test_finetune_on_two_ranks_with_ddp_or_fsdp_equals_one_process(tmp_path):
    # 7 test clips: one rank evaluates a clip fewer (it takes one again, left out); FSDP's
    # checkpoints gather the shards, and a sharded run stopped and resumed continues the same run
    from conftest import ranks
    import data
    root = data.make_builtin(str(tmp_path / "odd"), n_train=16, n_test=7)
    args = ["--preset", "quick", "--data", root, "--workers", "0", "--num_frames", "4",
            "--image_size", "32", "--audio_frames", "64", "--batch_size", "8", "--max_steps", "4",
            "--kernels", "torch", "--log_every", "1", "--eval_every", "1"]
    finetune.main([*args, "--out_dir", str(tmp_path / "one")])
    out = {n: str(tmp_path / n) for n in ("ddp", "fsdp", "cut")}
    jobs = [[*args, "--out_dir", out["ddp"]], [*args, "--fsdp", "--out_dir", out["fsdp"]],
            [*args, "--fsdp", "--out_dir", out["cut"], "--stop_at", "2"],
            [*args, "--fsdp", "--out_dir", out["cut"], "--resume", "auto"]]
    codes, log = ranks(lambda: _two_rank_finetunings(jobs))
    assert codes == [0, 0], log[-3000:]
    assert log.count("SHARDED") == 2 * 3  # (rank 0's and rank 1's output: the three --fsdp runs)

    def losses(d):
        return [r["loss"] for r in map(json.loads, open(os.path.join(d, "log.jsonl")))
                if "loss" in r]
    want = losses(tmp_path / "one")
    metrics = json.load(open(tmp_path / "one" / "metrics.json"))
    predictions = {r["id"]: r for r in csv.DictReader(open(tmp_path / "one" / "predictions.csv"))}
    for name in ("ddp", "fsdp", "cut"):
        assert losses(out[name]) == pytest.approx(want, rel=1e-4), name
        got = json.load(open(os.path.join(out[name], "metrics.json")))
        assert got["clips"] == 7 and got["label_top5"] == pytest.approx(metrics["label_top5"]), name
        rows = {r["id"]: r for r in csv.DictReader(open(os.path.join(out[name],
                                                                     "predictions.csv")))}
        assert rows.keys() == predictions.keys(), name  # (each test clip once)
        for i, r in predictions.items():  # (the top-5's order: scores this close may swap)
            assert sorted(map(float, rows[i]["label_scores"].split(";"))) == pytest.approx(
                sorted(map(float, r["label_scores"].split(";"))), abs=2e-4), name
        w = torch.load(train.find_checkpoint("auto", out[name]), weights_only=True)["model"]
        mine = torch.load(train.find_checkpoint("auto", str(tmp_path / "one")),
                          weights_only=True)["model"]
        assert w.keys() == mine.keys() and all(
            torch.allclose(w[k], mine[k], atol=1e-5) for k in w), name


def test_weighted_sampling_sets_the_epoch(builtin, tmp_path):
    # --weighted_sampling N: an epoch is N clips drawn by the balanced sampler (MAViL's AudioSet
    # recipe), so 16 clips at batch 8 are 2 steps an epoch, whatever the set's size
    res = finetune.main(["--preset", "quick", "--data", builtin, "--workers", "0", "--num_frames",
                         "4", "--image_size", "32", "--audio_frames", "64", "--batch_size", "8",
                         "--epochs", "2", "--weighted_sampling", "16", "--eval_every", "1",
                         "--kernels", "torch", "--out_dir", str(tmp_path)])
    assert res["step"] == 4 and res["epoch"] == 2.0
