"""A checkpoint is data: what avmae writes loads with torch.load(weights_only=True), and every flag
that reads a checkpoint refuses a file that would run code, in one line naming it, running
nothing."""
import dataclasses
import os
import random

import numpy as np
import pytest
import torch

import avmae
import finetune
import train
from conftest import tiny_config

TINY = ["--preset", "quick", "--num_frames", "4", "--image_size", "32", "--patch_size", "16",
        "--audio_frames", "64", "--mel_bins", "32", "--workers", "0", "--picture_every", "0",
        "--batch_size", "8", "--kernels", "torch"]
FT = ["--preset", "quick", "--num_frames", "4", "--image_size", "32", "--audio_frames", "64",
      "--workers", "0", "--batch_size", "8", "--views", "1", "--kernels", "torch"]


class Payload:
    """What a crafted checkpoint hides: unpickling it would run a shell command."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def crafted(path, marker, finetuning=False) -> str:
    cfg = dataclasses.asdict(tiny_config())
    state = dict(model={"w": Payload(marker)}, model_config=cfg, step=1)
    if finetuning:
        state["finetune_config"] = {}
    torch.save(state, path)
    return str(path)


@pytest.mark.parametrize("flag", ["train.py --resume", "train.py --teacher", "train.py --init",
                                  "finetune.py --init",
                                  "finetune.py --resume", "finetune.py --eval_only --resume"])
def test_a_crafted_checkpoint_runs_nothing_and_is_refused_in_one_line(flag, builtin, tmp_path):
    marker = tmp_path / "ran"
    script, *flags = flag.split()
    evil = crafted(tmp_path / "evil.pt", marker, finetuning=script == "finetune.py" and
                   "--resume" in flags)
    with pytest.raises(SystemExit) as e:
        if script == "train.py":
            extra = ["--variant", "mavil2"] if flags == ["--teacher"] else []
            train.main([*TINY, *extra, "--data", builtin, "--max_steps", "1", *flags, evil,
                        "--out_dir", str(tmp_path / "out")])
        else:
            finetune.main([*FT, "--data", builtin, "--max_steps", "1", *flags, evil,
                           "--out_dir", str(tmp_path / "out")])
    msg = str(e.value.code)
    assert not marker.exists()  # (the payload would have made it)
    assert "\n" not in msg and f"{evil}: refused: it holds a pickled object (posix.system" in msg


def test_what_avmae_writes_loads_as_data_and_an_earlier_checkpoints_rng_still_resumes(
        builtin, tmp_path):
    run = [*TINY, "--data", builtin, "--max_steps", "3", "--log_every", "1"]
    pre = train.main([*run, "--stop_at", "1", "--out_dir", str(tmp_path / "pre")])
    ft = finetune.main([*FT, "--data", builtin, "--max_steps", "1", "--init",
                        pre["checkpoint"], "--out_dir", str(tmp_path / "ft")])
    assert ft["clips"] == 8
    for path in (pre["checkpoint"], train.find_checkpoint("auto", str(tmp_path / "ft"))):
        ck = torch.load(path, weights_only=True)  # (plain: no allowlist)
        assert set(ck["rng"]) >= {"torch", "numpy", "python"}
    # an earlier avmae kept numpy's and Python's RNG states as their own objects: still read (numpy
    # arrays are data), and the run resumes from it as from a new one
    full = train.main([*run, "--out_dir", str(tmp_path / "full")])
    first = os.path.join(tmp_path / "pre", "ckpt_0000001.pt")
    ck = torch.load(first, weights_only=True)
    np.random.seed(1)
    random.seed(1)
    train.set_rng_state(ck["rng"])  # the state it holds, as the earlier format held it
    ck["rng"] = dict(ck["rng"], numpy=np.random.get_state(), python=random.getstate())
    old = tmp_path / "old"
    old.mkdir()
    torch.save(ck, old / "ckpt_0000001.pt")
    with pytest.raises(Exception):
        torch.load(old / "ckpt_0000001.pt", weights_only=True)  # (numpy's array: not plain)
    again = train.main([*run, "--out_dir", str(old), "--resume", str(old / "ckpt_0000001.pt")])
    assert again["loss"] == full["loss"]


def test_load_gives_the_model_of_either_checkpoint_in_eval_mode_and_encode_gives_every_token(
        builtin, tmp_path):
    run = [*TINY, "--data", builtin, "--max_steps", "1"]
    pre = train.main([*run, "--out_dir", str(tmp_path / "pre")])
    model = avmae.load(pre["checkpoint"], kernels="torch")
    assert isinstance(model, avmae.AVMAE) and not model.training
    assert isinstance(model.cfg, avmae.AVMAEConfig) and model.cfg.kernels == "torch"
    saved = torch.load(pre["checkpoint"], weights_only=True)["model"]
    assert all(torch.equal(v, saved[k]) for k, v in model.state_dict().items())
    g = torch.Generator().manual_seed(0)
    a = torch.randn(2, model.cfg.audio_frames, model.cfg.mel_bins, generator=g)
    v = torch.rand(2, 3, model.cfg.num_frames, model.cfg.image_size, model.cfg.image_size,
                   generator=g) * 2 - 1
    with torch.no_grad():
        e = model.encode(a=a, v=v)
        # every token (no masking: the same on every call), the encoder's width
        assert {m: x.shape for m, x in e.items()} == {
            m: (2, model.patches[m].n, model.cfg.width) for m in "av"}
        assert all(torch.equal(x, model.encode(a=a, v=v)[m]) for m, x in e.items())
        # either modality alone: the encoder's unimodal pass (mid fusion: the joint layers on it)
        alone = model.encode(a=a)
        assert set(alone) == {"a"} and alone["a"].shape == e["a"].shape
        assert torch.allclose(alone["a"], model.encoder.unimodal(model.embed(
            model.patchify({"a": a}), None))["a"])
        assert not torch.allclose(alone["a"], e["a"])  # (with video the joint layers mix)
    # a finetuning checkpoint: its backbone as the finetuning built it, the same logits
    for arch in ("mbt", "encoder"):
        out = tmp_path / f"ft_{arch}"
        finetune.main([*FT, "--data", builtin, "--max_steps", "1", "--init", pre["checkpoint"],
                       "--arch", arch, "--out_dir", str(out)])
        path = train.find_checkpoint("auto", str(out))
        clf = avmae.load(path)
        ck = torch.load(path, weights_only=True)
        cfg = finetune.FinetuneConfig(**{k: v for k, v in ck["finetune_config"].items()})
        twin = finetune.build_model(cfg, ck["heads"], ck["pretrain_config"])
        twin.load_state_dict(ck["model"])
        twin.eval()
        with torch.no_grad():
            assert torch.equal(clf(a=a, v=v)["label"], twin(a=a, v=v)["label"])
            toks = clf.encode(a=a, v=v)
            assert {m: x.shape[::2] for m, x in toks.items()} == {m: (2, 64) for m in "av"}
            assert all(torch.allclose(toks[m].mean(1), f) for m, f in
                       clf.features(a=a, v=v).items())
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=r"^\S+junk\.pt: [^\n]+$"):
        avmae.load(str(tmp_path / "junk.pt"))
    torch.save({"weights": [1, 2]}, tmp_path / "foreign.pt")
    with pytest.raises(ValueError, match="foreign.pt: not an avmae checkpoint"):
        avmae.load(str(tmp_path / "foreign.pt"))


def test_train_init_starts_from_a_checkpoint_or_two_unimodal_ones_strict_unless_told(
        builtin, tmp_path, capsys):
    run = [*TINY, "--data", builtin, "--max_steps", "1"]
    src = train.main([*run, "--out_dir", str(tmp_path / "src")])["checkpoint"]
    # at lr 0 the first step leaves the weights where --init put them: the source's
    res = train.main([*run, "--init", src, "--lr", "0", "--blr", "0", "--out_dir",
                      str(tmp_path / "from")])
    got = torch.load(res["checkpoint"], weights_only=True)["model"]
    want = torch.load(src, weights_only=True)["model"]
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert f"--init: {len(want)} of the model's {len(want)} tensors from {src}" in \
        capsys.readouterr().out
    # two unimodal pretrainings into one audiovisual model: what has no counterpart is named
    uni = {m: train.main([*run, "--modalities", m, "--out_dir", str(tmp_path / m)])["checkpoint"]
           for m in "av"}
    both = f"{uni['a']},{uni['v']}"
    with pytest.raises(SystemExit, match=r"^--init .*: \d+ of the model's tensors have no source "
                                         r"\(decoder\..*--init_strict false"):
        train.main([*run, "--encoder", "separate", "--init", both, "--out_dir",
                    str(tmp_path / "av1")])
    train.main([*run, "--encoder", "separate", "--init", both, "--init_strict", "false",
                "--lr", "0", "--blr", "0", "--out_dir", str(tmp_path / "av2")])
    out = capsys.readouterr().out
    assert "initialised anew: decoder." in out and "not placed: decoder." in out
    got = torch.load(train.find_checkpoint("auto", str(tmp_path / "av2")), weights_only=True)
    for m in "av":  # each stream from its own modality's pretraining
        w = torch.load(uni[m], weights_only=True)["model"]
        assert torch.equal(got["model"][f"encoder.streams.{m}.blocks.0.attn.qkv.weight"],
                           w[f"encoder.streams.{m}.blocks.0.attn.qkv.weight"])
    # a converted release: CAV-MAE's, at its own shapes
    f = torch.load(os.path.join(os.path.dirname(__file__), "fixtures", "cavmae_tiny.pt"),
                   weights_only=True)
    torch.save(f["state"], tmp_path / "audio_model.pth")
    shape = ["--variant", "cavmae", "--width", "16", "--depth", "12", "--heads", "2",
             "--dec_width", "16", "--dec_depth", "1", "--dec_heads", "2", "--dec_mlp", "64",
             "--num_frames", "1", "--tubelet", "1", "--image_size", "32", "--audio_frames", "64",
             "--mel_bins", "128", "--pos_embed", "learned"]
    res = train.main([*TINY, *shape, "--data", builtin, "--max_steps", "1", "--init",
                      str(tmp_path / "audio_model.pth"), "--out_dir", str(tmp_path / "cav")])
    assert res["step"] == 1 and "initialised anew" not in capsys.readouterr().out
