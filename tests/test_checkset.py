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
    label, wave, frames, onset = data.make_check_clip(7, seconds=4.0, size=64)
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
