"""The check set (spoken words over noise + shapes crossing the picture; the class is the pair) goes
through the whole user path: mp4 files and a manifest, `prepare`, and a finetuning recipe that must
fit a handful of its clips. A recipe that cannot fit a few clips cannot learn a user's data."""
import json
import os
import shutil

import numpy as np
import pytest

import data
import finetune
from test_data import needs_ffmpeg

needs_espeak = pytest.mark.skipif(shutil.which("espeak-ng") is None,
                                  reason="espeak-ng is not installed (.ci/run installs it)")


@needs_ffmpeg
@needs_espeak
def test_check_clips_carry_the_word_and_the_object_at_the_event():
    label, wave, frames, onset, hit = data.make_check_clip(7, seconds=4.0, size=64)
    assert 0 <= label < len(data.CHECK_WORDS) * len(data.CHECK_SHAPES)
    # the word is much louder than the noise around it, and only there
    s = int(onset * data.SAMPLE_RATE)
    word, before = wave[s:s + 4000], wave[:max(4000, s - 4000)][-4000:]
    assert np.sqrt(np.mean(word ** 2)) > 1.5 * np.sqrt(np.mean(before ** 2))
    # the object is in the picture during the event and nowhere else, in its kind's colours
    f = frames.astype(float)
    warm = ((f[..., 0] > 160) & (f[..., 2] < 80)).sum(axis=(1, 2))
    cool = ((f[..., 2] > 160) & (f[..., 0] < 80)).sum(axis=(1, 2))
    own, other = (warm, cool) if data.CHECK_SHAPES[label % 2] == "circle" else (cool, warm)
    j = int((onset + 0.5) * data.VIDEO_FPS)
    assert own[j] > 100 and other[j] < 5 and own[0 if onset > 1 else -1] < 5
    again = data.make_check_clip(7, seconds=4.0, size=64)
    assert again[0] == label and np.array_equal(again[2], frames)


@pytest.mark.slow(17)
@needs_ffmpeg
@needs_espeak
def test_finetuning_fits_a_handful_of_check_clips(tmp_path):
    raw, root = str(tmp_path / "raw"), str(tmp_path / "set")
    data.make_checkset(raw, n_train=8, n_test=0, size=64, workers=2)
    data.main(["prepare", "--videos", raw, "--manifest", os.path.join(raw, "manifest.csv"),
               "--format", "generic", "--out", root, "--short_side", "64", "--workers", "2"])
    shutil.copy(os.path.join(root, "train.csv"), os.path.join(root, "test.csv"))
    res = finetune.main(["--preset", "quick", "--data", root, "--out_dir", str(tmp_path / "ft"),
                         "--batch_size", "8", "--epochs", "40", "--warmup_epochs", "3",
                         "--eval_every", "40", "--views", "1", "--workers", "0",
                         "--mixup", "0", "--label_smoothing", "0", "--drop_path", "0",
                         "--specaug_freq", "0", "--video_aug", "none", "--kernels", "torch"])
    # the same 8 clips: near-perfect, far above chance (1/6)
    print(json.dumps(res))
    assert res["label_top1"] >= 0.875, json.dumps(res)


def test_check_set_arguments_that_cannot_work_are_refused_in_one_line(tmp_path):
    for kw in (dict(n_train=-3), dict(n_train=0, n_test=0), dict(size=8), dict(seconds=1.0)):
        with pytest.raises(ValueError, match="checkset: "):
            data.make_checkset(str(tmp_path / "x"), **kw)
    assert not os.path.exists(tmp_path / "x")


def test_the_check_set_family_knobs():
    # what carries the label, how many classes, which objects, and the named configurations
    for name, knobs in data.CHECK_CONFIGS.items():
        fam = data.check_family(**knobs)
        names = [data.check_label(fam, c) for c in range(len(fam["pairs"]))]
        assert len(set(names)) == len(names) == fam["knobs"]["classes"], name
    fam = data.check_family(**data.CHECK_CONFIGS["glyphs10"])  # word k with digit k
    assert fam["pairs"][3] == ("three", "3") and data.check_label(fam, 3) == "three_digit3"
    assert data.check_family(carrier="audio", classes=3)["pairs"] == [("one", None),
                                                                      ("four", None),
                                                                      ("seven", None)]
    assert data.check_family(carrier="video", classes=2)["pairs"] == [(None, "circle"),
                                                                      (None, "square")]
    # the ten digits are ten different glyphs
    yy, xx = np.mgrid[0:40, 0:40] + 0.5
    masks = [data._glyph_mask(d, yy, xx, 20, 20, 24) for d in "0123456789"]
    assert all(m.any() for m in masks) and len({m.tobytes() for m in masks}) == 10
    assert masks[8].sum() > masks[1].sum() * 2  # (8 lights every segment, 1 two of them)
    for bad in (dict(classes=12, carrier="both"), dict(objects="letters"), dict(carrier="x"),
                dict(degraded=1.5), dict(snr_db="10,0"), dict(classes=1)):
        with pytest.raises(ValueError, match="checkset: "):
            data.check_family(**bad)


@needs_espeak
def test_the_family_degrades_one_modality_and_draws_what_carries_no_label_at_random():
    fam = data.check_family(**data.CHECK_CONFIGS["glyphs10"])  # every clip degraded
    hits = [data.make_check_clip(s, 4.0, 64, fam)[4] for s in range(24)]
    assert all(hits) and {h.split("_")[0] for h in hits} == {"audio", "video"}
    gone = next(s for s, h in enumerate(hits) if h == "video_gone")
    label, _, frames, onset, _ = data.make_check_clip(gone, 4.0, 64, fam)
    f = frames.astype(float)  # (no glyph colour anywhere: the digit is gone)
    assert (((f[..., 0] > 190) & (f[..., 1] > 190) & (f[..., 2] < 130)).sum(axis=(1, 2)) < 5).all()
    # audio carries the label: the object (here a circle, warm, or a square, cool) is drawn at
    # random, so one class shows both
    fam = data.check_family(carrier="audio", classes=2, words="one,four")
    fam["objects"] = ("circle", "square")
    kinds = {0: set(), 1: set()}
    for s in range(16):
        label, _, frames, onset, _ = data.make_check_clip(s, 4.0, 64, fam)
        f = frames[int((onset + 0.5) * data.VIDEO_FPS)].astype(float)
        kinds[label].add("warm" if ((f[..., 0] > 160) & (f[..., 2] < 80)).sum() > 100 else "cool")
    assert kinds[0] == kinds[1] == {"warm", "cool"}
