"""data.py: Kaldi log-mel, prepare with ffmpeg, manifests, the built-in set, the loader and bad
input."""
import csv
import errno
import itertools
import json
import math
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import soundfile as sf
import torch

import data
from kernels import bench

FFMPEG = shutil.which("ffmpeg")
needs_ffmpeg = pytest.mark.skipif(
    FFMPEG is None, reason="ffmpeg is not installed (.ci/run installs it with apt-get)")

# -----------------------------------------------------------------------------
# log-mel against a from-the-definition reference (numpy, float64, loops)


def kaldi_fbank_reference(x, sr, n_mels=128, window="hann"):
    x = np.asarray(x, dtype=np.float64)
    x = x - x.mean()
    win, hop = int(sr * 0.025), int(sr * 0.010)
    n_fft = 1
    while n_fft < win:
        n_fft *= 2
    n_frames = 1 + (len(x) - win) // hop
    n = np.arange(win)
    a = 0.5 if window == "hann" else 0.54
    w = a - (1 - a) * np.cos(2 * np.pi * n / (win - 1))  # symmetric window
    mel = lambda f: 1127.0 * np.log(1.0 + f / 700.0)  # noqa: E731
    lo, hi = mel(20.0), mel(sr / 2)
    step = (hi - lo) / (n_mels + 1)
    bank = np.zeros((n_mels, n_fft // 2 + 1))
    for m in range(n_mels):
        left, center, right = lo + m * step, lo + (m + 1) * step, lo + (m + 2) * step
        for k in range(n_fft // 2):  # Kaldi leaves the Nyquist bin out
            f = mel(k * sr / n_fft)
            if left < f < right:
                rising, falling = (f - left) / (center - left), (right - f) / (right - center)
                bank[m, k] = rising if f <= center else falling
    out = np.empty((n_frames, n_mels))
    for t in range(n_frames):
        fr = x[t * hop: t * hop + win].copy()
        fr -= fr.mean()
        fr = fr - 0.97 * np.concatenate([fr[:1], fr[:-1]])
        power = np.abs(np.fft.rfft(np.concatenate([fr * w, np.zeros(n_fft - win)]))) ** 2
        out[t] = np.log(np.maximum(bank @ power, np.finfo(np.float32).eps))
    return out


@pytest.mark.parametrize("sr,seconds", [(16000, 1.0), (16000, 2.37), (8000, 1.5), (22050, 1.1),
                                        (44100, 0.6)])
@pytest.mark.parametrize("window", ["hann", "hamming"])
def test_logmel_matches_kaldi_definition(sr, seconds, window):
    rng = np.random.default_rng(sr)
    t = np.arange(int(sr * seconds)) / sr
    # tone, noise, DC
    x = 0.3 * np.sin(2 * np.pi * 440 * t) + 0.05 * rng.standard_normal(len(t)) + 0.01
    ref = kaldi_fbank_reference(x, sr, window=window)
    ours = data.logmel(torch.tensor(x, dtype=torch.float32), sr=sr, window=window).double().numpy()
    assert ours.shape == ref.shape
    assert np.abs(ours - ref).max() < 1e-3


def test_logmel_shapes_and_batching():
    eight, ten = torch.randn(8 * 16000) * 0.1, torch.randn(10 * 16000) * 0.1
    assert data.logmel(ten).shape == (998, 128)
    assert data.logmel(eight).shape == (798, 128)
    padded = data.logmel(eight, target_frames=800)
    assert padded.shape == (800, 128) and torch.all(padded[798:] == 0)  # zero-padded at the end
    assert data.logmel(ten, target_frames=800).shape == (800, 128)
    assert data.samples_for_frames(800) == 128240 and data.logmel(torch.randn(128240)).shape == (
        800, 128)
    batch = torch.stack([eight, eight * 0.5])
    out = data.logmel(batch)
    assert out.shape == (2, 798, 128) and torch.allclose(out[0], data.logmel(eight), atol=1e-5)
    with pytest.raises(ValueError, match="shorter than one"):
        data.logmel(torch.randn(100))


def test_resample_keeps_a_tone():
    sr_in = 44100
    t = np.arange(sr_in) / sr_in
    y = data.resample(np.sin(2 * np.pi * 1000 * t).astype(np.float32), sr_in, 16000)
    assert len(y) == 16000
    spec = np.abs(np.fft.rfft(y))
    assert abs(np.argmax(spec) - 1000) <= 1  # 1 Hz bins over one second


# -----------------------------------------------------------------------------
# manifests


def _write(path, text):
    with open(path, "w") as f:
        f.write(text)
    return str(path)


def test_vggsound_manifest(tmp_path):
    p = _write(tmp_path / "vgg.csv",
               "abc,30,dog barking,train\n\nxyz,0,cat,test\nbroken line\nq,notanumber,cat,train\n")
    recs, bad = data.read_vggsound(p)
    assert [r.id for r in recs] == ["abc_000030", "xyz_000000"]
    assert recs[0].src[0] == "abc_000030.mp4" and recs[0].labels == {"label": ["dog barking"]}
    # the empty line, the short one, the bad number
    assert len(bad) == 3 and all(str(p) in b for b in bad)
    assert [r.id for r in data.read_vggsound(p, "test")[0]] == ["xyz_000000"]
    # a spreadsheet's export: a byte-order mark and CRLF line ends read as plain UTF-8
    sheet = tmp_path / "sheet.csv"
    sheet.write_bytes(b"\xef\xbb\xbfabc,30,caf\xc3\xa9 noise,train\r\nxyz,0,cat,test\r\n")
    recs, bad = data.read_vggsound(str(sheet))
    assert [r.id for r in recs] == ["abc_000030", "xyz_000000"] and not bad
    assert recs[0].labels == {"label": ["caf\u00e9 noise"]}
    # another encoding (Latin-1 here) is named with its line, not a traceback
    sheet.write_bytes(b"abc,30,dog,train\nxyz,0,caf\xe9,test\n")
    with pytest.raises(ValueError, match=r"sheet.csv:2: not UTF-8 text \(byte 0xe9\): save"):
        data.read_vggsound(str(sheet))


def test_audioset_manifest(tmp_path):
    p = _write(tmp_path / "seg.csv", "# Segments csv\n# num_ytids=3\n# YTID, start_seconds, "
                                     "end_seconds, positive_labels\n"
               '--4gqARaEJE, 0.000, 10.000, "/m/068hy,/m/07q6cd_"\n'
               'abc, 30.000, 40.000, "/m/zzz"\n'
               'def, x, 10.000, "/m/068hy"\n')
    lab = _write(
        tmp_path / "cls.csv",
        'index,mid,display_name\n0,/m/068hy,"Domestic animals, pets"\n1,/m/07q6cd_,Squeak\n')
    recs, bad, mids = data.read_audioset(p, lab)
    assert mids == {"/m/068hy": 0, "/m/07q6cd_": 1}
    assert len(recs) == 1 and recs[0].labels["label"] == ["/m/068hy",
                                                          "/m/07q6cd_"] and recs[0].start is None
    assert any("unknown label" in b for b in bad) and any("expected YTID" in b for b in bad)
    full = data.read_audioset(p, lab, full_videos=True)[0][0]
    assert (full.start, full.end, full.src) == (0.0, 10.0, ("--4gqARaEJE.mp4",))


def test_epic_manifest(tmp_path):
    head = ("narration_id,participant_id,video_id,narration_timestamp,start_timestamp,"
            "stop_timestamp,start_frame,stop_frame,narration,verb,verb_class,noun,noun_class,"
            "all_nouns,all_noun_classes\n")
    good = ("P01_01_0,P01,P01_01,00:00:01.089,00:00:00.14,00:00:03.37,8,202,open door,open,3,"
            "door,8,['door'],[8]\n")
    bad = "P01_01_1,P01,P01_01,x,bad,00:00:03.37,8,202,open door,open,3,door,8,x,x\n"
    p = _write(tmp_path / "epic.csv", head + good + bad)
    recs, bad = data.read_epic(p)
    assert len(recs) == 1 and len(bad) == 1
    r = recs[0]
    assert r.src[0] == os.path.join("P01", "P01_01.MP4") and r.labels == {"verb": [3], "noun": [8]}
    assert r.start == pytest.approx(0.14) and r.end == pytest.approx(3.37)
    with pytest.raises(ValueError, match="header lacks"):
        data.read_epic(_write(tmp_path / "e2.csv", "narration_id,video_id\n"))


def test_generic_manifest(tmp_path):
    p = _write(tmp_path / "g.csv",
               "path,label,split\na/x.mp4,dog,train\nb.mp4,cat;dog,test\n,cat,train\n")
    recs, bad = data.read_generic(p)
    assert [r.id for r in recs] == ["a__x", "b"] and recs[1].labels["label"] == ["cat", "dog"]
    assert len(bad) == 1
    # start / end: seconds, a start of 0 or more and an end after it (ffmpeg made a clip of
    # mismatched audio and video from a negative start, and failed without saying why on an end
    # before the start)
    p = _write(tmp_path / "t.csv", "path,label,start,end\na.mp4,dog,1,3\nb.mp4,dog,,2\n"
               "c.mp4,dog,4,\nd.mp4,dog,3,1\ne.mp4,dog,-2,2\nf.mp4,dog,abc,2\ng.mp4,dog,nan,\n")
    recs, bad = data.read_generic(p)
    assert [(r.id, r.start, r.end) for r in recs] == [("a", 1, 3), ("b", None, 2), ("c", 4, None)]
    rule = ": a clip runs from a start of 0 or more to an end after it (seconds)"
    assert [b.split(": ", 1)[1] for b in bad] == [
        "start 3 s, end 1 s" + rule, "start -2 s, end 2 s" + rule,
        "malformed row ['f.mp4', 'dog', 'abc', '2']", "start nan s, end inf s" + rule]


# -----------------------------------------------------------------------------
# prepare: real mp4 files made with ffmpeg, with a known tone and a known moving square


def make_mp4(path, seconds=2.0, tone=440.0, size=(320, 240), fps=25, sr=44100, channels=2):
    """A white 40x40 square moving right 4 px per frame on black, and a sine tone."""
    W, H = size
    wav = str(path) + ".wav"
    t = np.arange(int(sr * seconds)) / sr
    sf.write(wav, np.stack([0.5 * np.sin(2 * np.pi * tone * t)] * channels, 1), sr)
    frames = np.zeros((int(seconds * fps), H, W, 3), np.uint8)
    for i in range(len(frames)):
        frames[i, 100:140, 20 + 4 * i: 60 + 4 * i] = 255
    subprocess.run(["ffmpeg", "-y", "-loglevel", "error", "-f", "rawvideo", "-pix_fmt", "rgb24",
                    "-s", f"{W}x{H}", "-r", str(fps), "-i", "-", "-i", wav, "-c:v", "libx264",
                    "-pix_fmt", "yuv420p", "-c:a", "aac", "-shortest",
                    str(path)], input=frames.tobytes(), check=True)
    os.remove(wav)


@needs_ffmpeg
def test_prepare_real_mp4s(tmp_path):
    videos = tmp_path / "videos"
    videos.mkdir()
    make_mp4(videos / "aaa_000010.mp4", tone=440.0)
    make_mp4(videos / "bbb_000000.mp4", tone=1000.0, channels=1)
    (videos / "ccc_000000.mp4").write_bytes(os.urandom(5000))  # not a video
    manifest = _write(tmp_path / "vgg.csv", "aaa,10,tone a,train\nbbb,0,tone b,train\nccc,0,tone "
                                            "a,train\n"
                      "ddd,0,tone b,train\nmalformed\n")
    out = str(tmp_path / "prepared")
    data.main(["prepare", "--videos", str(videos), "--manifest", manifest, "--format", "vggsound",
               "--out", out, "--workers", "2"])
    meta = json.load(open(os.path.join(out, "meta.json")))
    assert meta["heads"] == {"label": ["tone a", "tone b"]} and meta["fps"] == 12.5
    rows = list(csv.DictReader(open(os.path.join(out, "train.csv"))))
    assert [r["id"] for r in rows] == ["aaa_000010",
                                       "bbb_000000"] and [r["label"] for r in rows] == ["0", "1"]
    failed = {r["id"]: r["reason"] for r in csv.DictReader(open(os.path.join(out,
                                                                             "failed_train.csv")))}
    assert set(failed) == {"ccc_000000", "ddd_000000",
                           "manifest"} and "no video for ddd_000000" in failed["ddd_000000"]
    for cid, tone in (("aaa_000010", 440.0), ("bbb_000000", 1000.0)):
        wave, sr = sf.read(os.path.join(out, "clips", cid, "audio.flac"))
        assert sr == 16000 and wave.ndim == 1 and abs(len(wave) / sr - 2.0) < 0.1
        spec = np.abs(np.fft.rfft(wave[:16000]))  # 1 Hz bins
        assert abs(np.argmax(spec) - tone) <= 2
        fb = os.path.join(out, "clips", cid, "frames.bin")
        n = data.frame_count(fb)
        assert n == 25  # 2 s at 12.5 fps
        frames = data.decode_frames(data.read_frames(fb, range(n)))
        assert frames.shape[-2:] == (256, 342)  # short side 256
        # stored frame j = source frame 2j: square's left edge at 20 + 8j px
        for j in (0, 6, 12, 20):
            col = frames[j, 0].float().amax(0)  # brightest pixel of each column
            xs = torch.nonzero(col > 127)[:, 0].float()
            assert abs(xs.mean().item() - (40 + 8 * j) * 256 / 240) < 3
    # resumable: a second run re-uses finished clips (their files are untouched)
    stamp = os.path.getmtime(os.path.join(out, "clips", "aaa_000010", "frames.bin"))
    data.main(["prepare", "--videos", str(videos), "--manifest", manifest, "--format", "vggsound",
               "--out", out])
    assert os.path.getmtime(os.path.join(out, "clips", "aaa_000010", "frames.bin")) == stamp
    assert len(list(csv.DictReader(open(os.path.join(out, "train.csv"))))) == 2
    # and the prepared set loads
    ds = data.AVDataset(data.DataConfig(root=out, num_frames=4, image_size=64, audio_frames=128))
    item = ds[0]
    assert item["a"].shape == (128, 128) and item["v"].shape == (3, 4, 64,
                                                                 64) and item["label"] == 0


def _a_clip(i, folder):
    time.sleep(0.3)
    open(os.path.join(folder, f"{i}.done"), "w").close()
    return i


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGHUP], ids=["INT", "HUP"])
def test_ctrl_c_in_prepare_cancels_what_has_not_started_and_finishes_what_has(tmp_path, sig):
    # Ctrl-C reaches every process in the terminal's foreground, and a closed terminal's SIGHUP
    # every process of the session: prepare's workers leave it to the main process, which cancels
    # the clips not started and waits for those in flight (a plain pool's workers took Ctrl-C
    # inside their clips, then went on through every clip left; SIGHUP killed them)
    from concurrent.futures import as_completed
    with pytest.raises(KeyboardInterrupt):
        with data.Pool(2) as ex:
            jobs = [ex.submit(_a_clip, i, str(tmp_path)) for i in range(20)]
            next(as_completed(jobs))
            for p in ex._processes.values():
                os.kill(p.pid, sig)
            raise KeyboardInterrupt  # (the main process's own Ctrl-C)
    done = [j for j in jobs if not j.cancelled()]
    assert all(j.done() and j.exception() is None for j in done), [j.exception() for j in done]
    assert 1 <= len(done) <= 10 and len(os.listdir(tmp_path)) == len(done)  # (of 20)


@needs_ffmpeg
def test_a_clip_in_flight_finishes_through_the_terminals_ctrl_c_and_hang_up():
    # the terminal signals its foreground process group, and ffmpeg stops on SIGINT (exit 255, the
    # clip lost) even where its parent ignores it. A prepare worker in a group of its own (forked),
    # ffmpeg run by it at real-time speed (2 s), and both signals to the group half a second in
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.setpgid(0, 0)
            data._leave_stops_to_the_main_process()
            out = data._ffmpeg(["-re", "-f", "lavfi", "-i", "testsrc=duration=2:size=64x48:rate=25",
                                "-f", "image2pipe", "-c:v", "mjpeg", "-"])
            os.write(w, f"{len(data.split_mjpeg(out))} frames".encode())
        except BaseException as e:
            os.write(w, repr(e).encode())
        finally:
            os._exit(0)
    os.close(w)
    time.sleep(0.5)
    for sig in (signal.SIGINT, signal.SIGHUP):
        os.killpg(pid, sig)
    os.waitpid(pid, 0)
    with os.fdopen(r) as f:
        assert f.read() == "50 frames"


def test_a_stopped_command_says_so_once_whoever_reads_its_output(monkeypatch):
    # data.py's command line as train.py's: a closed terminal (SIGHUP) stops it as Ctrl-C does,
    # with train.py's exit code for it (75: the same command goes on); and under `data.py prepare
    # ... 2>&1 | tee log`, where the same Ctrl-C stops tee, the line meets a pipe without a reader:
    # it goes to /dev/null, not into a BrokenPipeError traceback
    def hangs_up(argv):
        os.kill(os.getpid(), signal.SIGHUP)
        time.sleep(5)  # (the handler raises first)
    monkeypatch.setattr(data, "main", hangs_up)
    before = signal.getsignal(signal.SIGHUP)
    read, write = os.pipe()
    w = os.fdopen(write, "w")
    monkeypatch.setattr(sys, "stderr", w)
    with pytest.raises(SystemExit) as e:
        data.command_line(["prepare"])
    assert sys.stderr is w and signal.getsignal(signal.SIGHUP) == before  # (put back)
    w.close()
    with os.fdopen(read) as r:
        said = r.read()
    assert e.value.code == 75 and said.strip() == (
        "data.py: stopped by SIGHUP; the clips finished are kept, and the same command goes on "
        "from there")

    def ctrl_c(argv):
        raise KeyboardInterrupt
    monkeypatch.setattr(data, "main", ctrl_c)
    read, write = os.pipe()
    os.close(read)  # (tee has gone)
    with os.fdopen(write, "w") as w:
        monkeypatch.setattr(sys, "stderr", w)
        with pytest.raises(SystemExit) as e:
            data.command_line(["prepare"])
    assert e.value.code == 130


def test_split_mjpeg():
    from torchvision.io import encode_jpeg
    jp = [encode_jpeg(torch.full((3, 8, 8), v, dtype=torch.uint8)).numpy() for v in (0, 128, 255)]
    parts = data.split_mjpeg(b"".join(j.tobytes() for j in jp))
    assert [p.tobytes() for p in parts] == [j.tobytes() for j in jp]


# -----------------------------------------------------------------------------
# the built-in set


def test_builtin_is_deterministic(builtin, tmp_path):
    again = data.make_builtin(str(tmp_path / "again"), n_train=24, n_test=8)
    for split in ("train", "test"):
        assert open(os.path.join(builtin, f"{split}.csv")).read() == open(
            os.path.join(again, f"{split}.csv")).read()
    for cid in ("train_00003", "test_00030"):
        for f in ("audio.flac", "frames.bin"):
            assert open(os.path.join(builtin, "clips", cid, f),
                        "rb").read() == open(os.path.join(again, "clips", cid, f), "rb").read()


def test_builtin_labels_and_shapes(builtin):
    meta = json.load(open(os.path.join(builtin, "meta.json")))
    assert meta["heads"]["label"] == [k[0] for k in data.BUILTIN_KINDS]
    ds = data.AVDataset(data.DataConfig(root=builtin, num_frames=8, image_size=32,
                                        audio_frames=256))
    labels = [r["label"][0] for r in ds.rows]
    assert len(ds) == 24 and len(set(labels)) >= 5 and all(0 <= y < 8 for y in labels)
    item = ds[0]
    assert item["a"].shape == (256, 128) and item["v"].shape == (
        3, 8, 32, 32) and item["v"].dtype == torch.uint8
    v = data.to_device(data.collate([item]), "cpu")["v"]
    assert v.dtype == torch.float32 and v.min() >= -1 and v.max() <= 1 and torch.equal(
        v[0], item["v"] / 127.5 - 1)


def test_builtin_events_are_short_and_the_sound_follows_the_picture():
    rms = lambda x: float(np.sqrt(np.mean(x.astype(np.float64) ** 2)))  # noqa: E731
    for seed in range(6):
        kind, wave, frames, ev = data.make_builtin_clip(seed, 4.0, 64)
        assert 1.2 <= ev["off"] - ev["on"] <= 1.8 and len(ev["times"]) >= 2
        # the object is in the picture during the event only: frames outside it are background
        moving = [float(np.abs(f.astype(float) - frames[0].astype(float)).max()) > 60 or
                  float(np.abs(f.astype(float) - frames[-1].astype(float)).max()) > 60
                  for f in frames]
        t = np.arange(len(frames)) / data.FPS
        inside = (t >= ev["on"]) & (t < ev["off"])
        assert all(moving[j] for j in np.flatnonzero(inside))
        assert not any(moving[j] for j in np.flatnonzero(t < ev["on"] - 0.1))
        # its arrival and every bounce (touching a wall) start a sound at that moment, and the
        # room is quiet before it arrives
        assert all(ev["on"] <= tb < ev["off"] for tb in ev["times"])
        assert rms(wave[:int(ev["on"] * 16000)]) < 0.05
        for prev, tb in zip([-1.0] + ev["times"], ev["times"]):
            if tb - prev < 0.3:  # the last tone still rings
                continue
            s = int(tb * 16000)
            assert rms(wave[s: s + 160]) > 3 * rms(wave[s - 320: s])


def test_builtin_xor_pair_needs_both_modalities():
    # the last two classes share their sounds and their shapes, in opposite pairings: each
    # modality alone sees the same distribution in both; only the pairing tells them apart
    seen = {6: set(), 7: set()}
    for seed in range(80):
        kind, _, _, ev = data.make_builtin_clip(seed, 4.0, 32)
        if kind in seen:
            seen[kind].add((ev["sound"], ev["shape"]))
    assert {s for s, _ in seen[6]} == {s for s, _ in seen[7]} and len(seen[6]) == 2
    assert {h for _, h in seen[6]} == {h for _, h in seen[7]}
    assert not seen[6] & seen[7]
    # every other class has a sound and a shape of its own
    others = [p for name, pairs in data.BUILTIN_KINDS[:6] for p in pairs]
    assert len({s for s, _ in others}) == 6 and len({h for _, h in others}) == 6


# -----------------------------------------------------------------------------
# the loader and bad input


def _small(root, **kw):
    return data.AVDataset(data.DataConfig(root=root, **{**dict(num_frames=4, image_size=32,
                                                               audio_frames=128), **kw}))


@pytest.fixture
def copy(builtin, tmp_path):
    dst = str(tmp_path / "set")
    shutil.copytree(builtin, dst)
    return dst


def test_eval_views_are_evenly_spaced(builtin):
    ds = _small(builtin, split="test", train=False, views=4)
    item = ds[0]
    assert item["a"].shape == (4, 128, 128) and item["v"].shape == (4, 3, 4, 32, 32)
    assert item["t0"][0] == 0.0 and np.allclose(np.diff(item["t0"]), np.diff(item["t0"])[0],
                                                atol=0.09)


def test_augmentation_is_a_function_of_seed_epoch_and_index(builtin):
    ds = _small(builtin, seed=1)
    a, b = ds[(5, 3)], ds[(5, 3)]  # (index, epoch), as the EpochSampler sends them
    assert torch.equal(a["v"], b["v"]) and a["t0"] == b["t0"]
    assert not torch.equal(a["v"], ds[(5, 4)]["v"])
    assert not torch.equal(a["v"], _small(builtin, seed=2)[(5, 3)]["v"])


def test_epoch_sampler_global_order_is_independent_of_world_size():
    one = list(data.EpochSampler(20, 1, 0, seed=3))
    two = [list(data.EpochSampler(20, 2, r, seed=3)) for r in range(2)]
    assert [k for pair in zip(*two) for k in pair] == one  # rank r holds positions r, r + W, ...
    s = data.EpochSampler(20, 2, 1, seed=3)
    s.set_position(epoch=0, start=4)
    assert list(s) == two[1][4:] and len(s) == 6
    s.set_position(epoch=1)
    assert list(s) != two[1] and all(e == 1 for _, e in s)


def test_missing_and_corrupt_files_are_replaced_and_reported(copy, caplog):
    ds = _small(copy)
    ids = [r["id"] for r in ds.rows]
    os.remove(os.path.join(copy, "clips", ids[0], "audio.flac"))
    with open(os.path.join(copy, "clips", ids[1], "audio.flac"), "wb") as f:
        f.write(b"fLaC" + os.urandom(300))  # a corrupt FLAC
    fb = os.path.join(copy, "clips", ids[2], "frames.bin")
    raw = bytearray(open(fb, "rb").read())
    n = int(np.frombuffer(raw[:8], dtype=np.int64)[0])
    off = np.frombuffer(bytes(raw[8: 8 * (n + 2)]), dtype=np.int64)
    base = 8 * (n + 2)
    for j in range(n):  # wipe every frame's scan data after its headers: corrupt JPEGs
        raw[base + off[j] + 300: base + off[j + 1] - 2] = b"\x00" * (off[j + 1] - off[j] - 302)
    open(fb, "wb").write(bytes(raw))
    os.remove(os.path.join(copy, "clips", ids[3], "frames.bin"))
    with caplog.at_level(logging.WARNING, logger="avmae.data"):
        for i in range(4):
            item = ds[i]
            assert item["id"] == ids[4]  # the next readable clip takes the bad ones' place
            assert [b[0] for b in item["bad"]] == ids[i:4]
            assert item["v"].shape == (3, 4, 32, 32)
    reasons = " ".join(b[1] for b in ds[0]["bad"])
    for what in ("audio.flac", "unreadable audio", "corrupt JPEG", "frames.bin"):
        assert what in reasons
    assert f"{ids[0]}" in caplog.text and "using the next clip" in caplog.text
    batch = data.collate([ds[0], ds[5]])
    assert len(batch["bad"]) == 4 and batch["v"].shape == (2, 3, 4, 32, 32)


def test_too_many_bad_clips_in_a_row_is_an_error(copy):
    ds = _small(copy)
    for r in ds.rows[:12]:
        os.remove(os.path.join(copy, "clips", r["id"], "audio.flac"))
    with pytest.raises(RuntimeError, match="10 clips in a row"):
        ds[0]


def _rewrite_audio(root, cid, wave, sr):
    sf.write(os.path.join(root, "clips", cid, "audio.flac"), wave, sr)


def test_silent_audio_skipped_in_training_kept_in_evaluation(copy):
    ds = _small(copy)
    cid = ds.rows[0]["id"]
    _rewrite_audio(copy, cid, np.zeros(4 * 16000, np.float32), 16000)
    item = ds[0]
    assert item["id"] != cid and "silent" in item["bad"][0][1]
    ev = _small(copy, train=False, views=2)
    item = ev[0]
    assert item["id"] == cid and item["bad"] == [] and torch.all(item["a"] == item["a"].min())


def test_short_audio_is_zero_padded(copy):
    ds = _small(copy, audio_frames=256)
    cid = ds.rows[0]["id"]
    t = np.arange(8000) / 16000  # half a second of a tone; the window needs 2.56 s
    _rewrite_audio(copy, cid, 0.5 * np.sin(2 * np.pi * 500 * t), 16000)
    item = ds[0]
    assert item["id"] == cid and item["a"].shape == (256, 128)
    floor = float(np.log(np.finfo(np.float32).eps))
    # tone, then zero-padded silence
    assert torch.all(item["a"][60:] == floor) and item["a"][:40].max() > 0


def test_stereo_is_downmixed_and_other_rates_resampled(copy):
    ds = _small(copy, audio_frames=256, train=False, views=1)
    cid = ds.rows[0]["id"]
    t16 = np.arange(4 * 16000) / 16000
    mono = 0.25 * np.sin(2 * np.pi * 700 * t16)
    _rewrite_audio(copy, cid, mono, 16000)
    ref = ds[0]["a"]
    # mean of channels = mono
    _rewrite_audio(copy, cid, np.stack([2 * mono, np.zeros_like(mono)], 1), 16000)
    # (16-bit files: compare where the tone is, not the quantisation noise)
    loud = ref > ref.max() - 8
    assert loud.sum() > 256 and (ds[0]["a"] - ref)[loud].abs().max() < 0.01
    t44 = np.arange(4 * 44100) / 44100
    _rewrite_audio(copy, cid, 0.25 * np.sin(2 * np.pi * 700 * t44), 44100)
    res = ds[0]["a"]
    # the same tone after resampling
    assert res.shape == ref.shape and (res - ref)[loud].abs().max() < 0.1
    assert torch.equal(res[0, 100].argmax(), ref[0, 100].argmax())


def test_short_video_holds_its_last_frame(copy):
    ds = _small(copy, num_frames=8, train=False, views=1)  # needs 1 + 7 x 2 = 15 stored frames
    cid = ds.rows[0]["id"]
    fb = os.path.join(copy, "clips", cid, "frames.bin")
    data.write_frames(fb, [j.numpy() for j in data.read_frames(fb, range(5))])
    v = ds[0]["v"][0]
    assert v.shape == (3, 8, 32, 32)
    # frames 4, 6, ... -> frame 4
    assert torch.equal(v[:, 2], v[:, 3]) and torch.equal(v[:, 2], v[:, 7])
    assert not torch.equal(v[:, 0], v[:, 2])


@needs_ffmpeg
def test_a_full_disk_stops_prepare_at_once_and_keeps_the_clips_finished(tmp_path, monkeypatch):
    # every clip after the disk fills would fail the same way, after its ffmpeg decode: hours of
    # a large set's CPU for a failed_*.csv of "No space left on device"; prepare stops instead
    videos = tmp_path / "videos"
    videos.mkdir()
    for name in ("aaa", "bbb", "ccc", "ddd"):
        make_mp4(videos / f"{name}_000000.mp4", seconds=1.0)
    manifest = _write(tmp_path / "vgg.csv", "".join(f"{n},0,tone,train\n" for n in
                                                    ("aaa", "bbb", "ccc", "ddd")))
    real = data.write_frames

    def full_at_ccc(path, jpegs):
        if "ccc_000000" in path:
            raise OSError(errno.ENOSPC, "No space left on device", path)
        real(path, jpegs)
    monkeypatch.setattr(data, "write_frames", full_at_ccc)  # (the pool's workers are forks)
    out = tmp_path / "prepared"
    args = ["prepare", "--videos", str(videos), "--manifest", manifest, "--format", "vggsound",
            "--out", str(out), "--workers", "1"]
    with pytest.raises(SystemExit) as e:
        data.command_line(args)
    assert str(e.value.code).startswith(
        f"{out}: No space left on device (ENOSPC) while writing ccc_000000; the 2 clips finished "
        "are kept: make room and run the same command")
    assert sorted(os.listdir(out / "clips")) in (["aaa_000000", "bbb_000000"],
                                                 ["aaa_000000", "bbb_000000", "ddd_000000"])
    monkeypatch.setattr(data, "write_frames", real)  # room made: it goes on
    data.command_line(args)
    assert [r["id"] for r in csv.DictReader(open(out / "train.csv"))] == [
        f"{n}_000000" for n in ("aaa", "bbb", "ccc", "ddd")]


def test_a_manifest_of_another_format_or_a_missing_path_is_one_line(tmp_path, monkeypatch, caplog):
    # every row malformed: a few are shown, the rest counted, and the header that names the format
    # the rows are in is said (a generic CSV given as --format vggsound)
    rows = "".join(f"clip{i}.mp4,dog,train\n" for i in range(40))
    manifest = _write(tmp_path / "m.csv", "path,label,split\n" + rows)
    monkeypatch.setattr(data.shutil, "which", lambda name: "/usr/bin/" + name)
    with pytest.raises(SystemExit) as e:
        data.main(["prepare", "--videos", str(tmp_path), "--manifest", manifest, "--format",
                   "vggsound", "--out", str(tmp_path / "o")])
    assert str(e.value) == (f"{manifest}: no usable rows (41 malformed); its first lines are "
                            "--format generic's")
    shown = [r.getMessage() for r in caplog.records if r.getMessage().startswith("manifest:")]
    assert len(shown) == 6 and shown[-1] == "manifest: 36 more malformed rows"
    assert data._other_format(manifest, "generic") == ""  # (its own format: no hint)
    for flag, path, what in (("--videos", tmp_path / "nowhere", "folder"),
                             ("--manifest", tmp_path / "no.csv", "file")):
        args = ["prepare", "--videos", str(tmp_path), "--manifest", manifest, "--format", "generic",
                "--out", str(tmp_path / "o2"), flag, str(path)]
        with pytest.raises(SystemExit, match=f"^{flag} {path}: no such {what}$"):
            data.main(args)
    assert not os.path.exists(tmp_path / "o2")  # (nothing made)


def test_malformed_and_empty_manifest_lines(copy, caplog):
    path = os.path.join(copy, "train.csv")
    lines = open(path).read().splitlines()
    lines[2] = ""                                  # an empty line
    lines[3] = lines[3].split(",")[0] + ",4.0"     # too few fields
    lines[4] = lines[4].rsplit(",", 1)[0] + ",99"  # a label outside the vocabulary
    open(path, "w").write("\n".join(lines) + "\n")
    with caplog.at_level(logging.WARNING, logger="avmae.data"):
        ds = _small(copy)
    assert len(ds) == 21 and len(ds.manifest_problems) == 3
    assert all(path in p for p in ds.manifest_problems) and "outside 0..7" in caplog.text
    open(path, "w").write(lines[0] + "\n\n")
    with pytest.raises(ValueError, match="no usable clips"):
        _small(copy)
    with pytest.raises(FileNotFoundError, match="valid.csv not found"):
        _small(copy, split="valid")


def test_gpu_decoder_path_on_cpu(copy):
    # the GPU path (JPEG bytes from workers, decoded and cropped in one batch) runs on any device;
    # a clip whose JPEGs will not decode is dropped from the batch and reported
    ds_cpu, ds_gpu = _small(copy, train=False, views=2), _small(copy, train=False, views=2,
                                                                decode="gpu")
    out = data.GPUDecoder(ds_gpu, device="cpu")(data.collate([ds_gpu[0], ds_gpu[1]]))
    ref = data.collate([ds_cpu[0], ds_cpu[1]])
    assert out["v"].shape == (2, 2, 3, 4, 32, 32) and out["a"].shape == (2, 2, 128, 128)
    assert torch.allclose(out["v"], data.scale_video(ref["v"]))
    ds_gpu = _small(copy, decode="gpu")
    dec = data.GPUDecoder(ds_gpu, device="cpu")
    assert dec(data.collate([ds_gpu[0], ds_gpu[1]]))["v"].shape == (2, 3, 4, 32, 32)
    batch = data.collate([ds_gpu[0], ds_gpu[1]])
    sizes = batch["v"]["sizes"]  # one tensor of JPEG bytes per batch: damage clip 1's frame 2
    at = int(sizes[0].sum() + sizes[1, 0, :2].sum())
    batch["v"]["bytes"][at:at + int(sizes[1, 0, 2])] = 0
    out = dec(batch)
    assert out["v"].shape[0] == 1 and out["id"] == [ds_gpu.rows[0]["id"]] and out["a"].shape[0] == 1
    assert batch["bad"] and "corrupt JPEG" in batch["bad"][0][1]


@pytest.mark.parametrize("train", [True, False])
def test_gpu_mode_augments_as_the_cpu_path(copy, train):
    # with --decode gpu the workers send samples, JPEG bytes and their random draws; GPUDecoder (run
    # here on CPU tensors) must give the batch the CPU path gives for the same (seed, epoch, clip)
    kw = dict(train=train, views=1 if train else 2, seed=3, specaug_freq=20, specaug_time=16,
              specaug_freq_masks=2, time_shift=True, video_aug="finetune" if train else "none")
    ds_cpu, ds_gpu = _small(copy, **kw), _small(copy, decode="gpu", **kw)
    keys = [(i, 2) for i in range(4)]
    ref = data.to_device(data.collate([ds_cpu[k] for k in keys]), "cpu")
    raw = data.collate([ds_gpu[k] for k in keys])
    assert raw["a"].shape[-1] > 1000 and "a_draws" in raw  # samples, not log-mels
    out = data.GPUDecoder(ds_gpu, device="cpu")(raw)
    assert out["a"].shape == ref["a"].shape and out["v"].shape == ref["v"].shape
    assert torch.allclose(out["a"], ref["a"], atol=1e-4)
    assert torch.equal(out["v"], ref["v"])
    assert out["label"].tolist() == ref["label"].tolist() and "a_draws" not in out
    # the masks and the shift really happened, identically: some rows are the fill value
    if train:
        assert (raw["a_draws"][:, 0, :4] > 0).any()


class _Decoder(data.GPUDecoder):  # GPUDecoder.ahead over a decode that says what it sees
    def __init__(self, decode):
        self.device, self.decode = "cpu", decode

    def __call__(self, batch):
        return self.decode(batch)


def _decode_threads():  # (those of this test: another test's are no concern here)
    return {t for t in threading.enumerate() if t.name.startswith("gpu-decode")}


def test_gpu_decode_runs_ahead_beside_the_step_in_order():
    # decoding batch k + 1 must not wait for the step on batch k (in the step's thread the decode,
    # mostly nvJPEG's entropy decoding on the CPU, added its time to every step): each step here
    # waits until the next batch's decode has started, which a decode after the step never does
    started, before = [threading.Event() for _ in range(5)], _decode_threads()

    def decode(b):
        started[b["i"]].set()
        return {"i": b["i"], "v": torch.full((2,), float(b["i"]))}
    got = []
    for key, out in _Decoder(decode).ahead((k * 10, {"i": k}) for k in range(5)):
        got.append((key, out["i"], out["v"].tolist()))
        if out["i"] < 4:
            assert started[out["i"] + 1].wait(5), "the next batch was not decoded beside the step"
    assert got == [(k * 10, k, [float(k)] * 2) for k in range(5)]
    assert _decode_threads() <= before
    assert list(_Decoder(decode).ahead(iter(()))) == []


def test_gpu_decode_ahead_raises_in_order_and_leaves_no_thread():
    before = _decode_threads()

    def decode(b):
        if b == 2:
            raise RuntimeError("decode failed on batch 2")
        return {"i": b}
    seen = []
    with pytest.raises(RuntimeError, match="batch 2"):
        for _, out in _Decoder(decode).ahead((k, k) for k in range(5)):
            seen.append(out["i"])
    assert seen == [0, 1] and _decode_threads() <= before

    def reader():  # the loader's own errors (a dead worker, say) come through as they are
        yield 0, 0
        raise SystemExit("a data loader worker died")
    with pytest.raises(SystemExit, match="worker died"):
        list(_Decoder(lambda b: {"i": b}).ahead(reader()))
    stream = _Decoder(lambda b: {"i": b}).ahead((k, k) for k in range(100))
    assert next(stream)[1] == {"i": 0}
    stream.close()  # (a run that stops: the decode of the batch ahead ends with it)
    assert _decode_threads() <= before


@pytest.mark.skipif(not torch.cuda.is_available(), reason="nvJPEG needs a CUDA GPU")
def test_gpu_decode_ahead_on_a_gpu_is_the_decode_in_the_steps_thread(copy):
    # the decode ahead runs on a thread and a CUDA stream of its own: the batches it hands over
    # are the ones the step's thread decodes, whatever the step's stream does meanwhile
    ds = _small(copy, train=True, seed=3, decode="gpu", image_size=64)
    dec = data.GPUDecoder(ds, device="cuda")
    raws = [data.collate([ds[(i, e)] for i in range(8)]) for e in range(3)]
    ref = [dec(data.collate([ds[(i, e)] for i in range(8)])) for e in range(3)]
    busy = torch.randn(4096, 4096, device="cuda")
    for (e, out), r in zip(dec.ahead(enumerate(raws)), ref):
        for _ in range(20):  # (the step's stream busy while the next batch decodes)
            busy = busy @ busy / 64
        assert torch.equal(out["v"], r["v"]) and torch.allclose(out["a"], r["a"])
        assert out["v"].device == torch.device("cuda", torch.cuda.current_device())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="nvJPEG needs a CUDA GPU")
def test_gpu_decode_on_a_gpu_is_the_cpu_path_up_to_the_jpeg_decoder(copy):
    # nvJPEG and libjpeg-turbo round their inverse DCT and colour conversion differently: the
    # batches agree up to that (printed; on an H200 with torch 2.11: at most 1 level, mean 0.004,
    # 24% of the values differ; bounded here with room for other decoders); audio: the same maths
    kw = dict(train=True, seed=3, specaug_freq=20, specaug_time=16, time_shift=True,
              video_aug="finetune", image_size=64)
    ds_cpu, ds_gpu = _small(copy, **kw), _small(copy, decode="gpu", **kw)
    keys = [(i, 2) for i in range(16)]
    ref = data.to_device(data.collate([ds_cpu[k] for k in keys]), "cuda")
    out = data.GPUDecoder(ds_gpu, device="cuda")(data.collate([ds_gpu[k] for k in keys]))
    diff = (out["v"].float() - ref["v"].float()).abs()
    print(f"nvJPEG - libjpeg-turbo, uint8 levels: max {diff.max().item():.0f}, mean "
          f"{diff.mean().item():.3f}, fraction differing {(diff > 0).float().mean().item():.3f}")
    assert out["v"].dtype == ref["v"].dtype and out["v"].shape == ref["v"].shape
    assert diff.mean() < 0.1 and diff.max() <= 4
    assert torch.allclose(out["a"], ref["a"], atol=1e-3)


def test_colour_jitter_is_torchvisions_with_a_yiq_hue():
    # brightness, contrast and saturation are torchvision's (on colours that do not clip); the hue
    # turns YIQ's chroma plane: it keeps each pixel's grey and moves the HSV hue by about the turn
    import colorsys
    from torchvision.transforms.v2 import functional as TF
    g = torch.Generator().manual_seed(0)
    x = (torch.rand(3, 2, 8, 8, generator=g) * 120 + 60).to(torch.uint8)  # (3, T, H, W)
    grey = lambda y: torch.einsum("j,jthw->thw", data.YIQ[0], y)[None]  # noqa: E731

    def ours(b, c, s, hue, drop=False):
        y = x.double()
        out = torch.einsum("ij,jthw->ithw", data.colour_matrix(b, c, s, hue, drop).double(), y)
        return out + (1 - c) * b * grey(y).mean(dim=(2, 3), keepdim=True)

    tv = x.double().permute(1, 0, 2, 3) / 255  # torchvision's (T, 3, H, W), in [0, 1]
    for b, c, s in [(1.2, 1, 1), (1, 0.7, 1), (1, 1.3, 1), (1, 1, 0.6), (1, 1, 1.4), (0.9, 1.2, 1)]:
        ref = TF.adjust_saturation(TF.adjust_contrast(TF.adjust_brightness(tv, b), c), s)
        assert torch.allclose(ours(b, c, s, 0), ref.permute(1, 0, 2, 3) * 255, atol=0.05)
    for hue in (-0.1, -0.03, 0.03, 0.1):
        y = ours(1, 1, 1, hue)
        assert torch.allclose(grey(y), grey(x.double()), atol=1e-3)
        hsv = lambda z: [colorsys.rgb_to_hsv(*(p / 255))[0] for p in z.flatten(1).T.numpy()]
        moved = [(h1 - h0 + 0.5) % 1 - 0.5 for h0, h1 in zip(hsv(x.double()), hsv(y))]
        assert abs(np.mean(moved) - hue) < 0.25 * abs(hue)
    drop = ours(1, 1, 1, 0, drop=True)  # colour drop: every channel the pixel's grey
    assert torch.allclose(drop, grey(x.double()).expand_as(drop), atol=1e-3)
    assert torch.equal(data.color_augment(x, np.random.default_rng(5), 0, 0), x)  # nothing drawn
    jittered = 0
    for seed in range(12):  # the clip's draws: factors, then whether to jitter and to drop colour
        u = np.random.default_rng(seed).uniform(size=6)
        if u[4] < 0.8:
            jittered += 1
            b, c, s = 1 + 0.4 * (2 * u[:3] - 1)
            want = ours(b, c, s, 0.1 * (2 * u[3] - 1), u[5] < 0.1).round().clamp(0, 255)
            got = data.color_augment(x, np.random.default_rng(seed)).double()
            assert (got - want).abs().max() <= 1
    assert jittered >= 6


def test_spec_augment_matches_its_definition():
    cfg = data.DataConfig(specaug_freq=10, specaug_time=8, time_shift=True)
    rng = np.random.default_rng(0)
    s = torch.randn(3, 50, 20)
    draws = torch.tensor([data.spec_draw(cfg, rng, 50, 20) for _ in range(3)])
    out = data.augment_spec(s, draws)
    for i, (fw, f0, tw, t0, shift) in enumerate(draws.tolist()):  # one mask per axis, then a roll
        ref = s[i].clone()
        ref[:, f0:f0 + fw] = s[i].mean()
        ref[t0:t0 + tw] = s[i].mean()
        assert torch.equal(out[i], torch.roll(ref, shift, dims=0))


# -----------------------------------------------------------------------------
# audio-video alignment: a flash and a click at the same moment stay at the same token time


def test_flash_and_click_stay_aligned(tmp_path):
    root = str(tmp_path / "av")
    os.makedirs(os.path.join(root, "clips", "c0"))
    from torchvision.io import encode_jpeg
    n_frames, flash = 50, 23  # 4 s at 12.5 fps; the flash in stored frame 23 = 1.84 s
    jp = [encode_jpeg(torch.full((3, 48, 64), 255 if j == flash else 0,
                                 dtype=torch.uint8)).numpy() for j in range(n_frames)]
    data.write_frames(os.path.join(root, "clips", "c0", "frames.bin"), jp)
    wave = np.random.default_rng(0).normal(0, 0.001, 4 * 16000)
    s = int(flash / 12.5 * 16000)
    wave[s: s + 320] += 0.8 * np.sin(2 * np.pi * 3000 * np.arange(320) / 16000)  # a 20 ms click
    sf.write(os.path.join(root, "clips", "c0", "audio.flac"), wave, 16000)
    open(os.path.join(root, "train.csv"), "w").write("id,duration,frames,label\nc0,4.0,50,0\n")
    json.dump(dict(fps=12.5, heads={"label": ["x"]}), open(os.path.join(root, "meta.json"), "w"))
    # 8 frames at stride 4 (0.16 s apart) = 1.28 s of video; 128 log-mel frames = 1.28 s of audio:
    # a video token (tubelet of 2 frames) spans 0.32 s, an audio token (16 frames) 0.16 s
    ds = data.AVDataset(data.DataConfig(root=root, num_frames=8, frame_stride=4, image_size=32,
                                        audio_frames=128))
    seen = 0
    for epoch in range(40):
        ds.set_epoch(epoch)
        item = ds[0]
        bright = item["v"].float().mean((0, 2, 3))
        if bright.max() < 128:  # the flash is outside this window
            continue
        seen += 1
        i = int(bright.argmax())
        t_flash = item["t0"] + i * 4 / 25
        loud = int(item["a"].mean(1).argmax())
        t_click = item["ta"] + loud * 0.01
        assert abs(t_flash - flash / 12.5) < 1e-6 and abs(t_click - flash / 12.5) < 0.03
        assert abs(item["ta"] - item["t0"]) < 1e-6  # equal-length windows: the token grids coincide
        # the video token holding the flash (a tubelet of 2 frames = 0.32 s) spans the audio tokens
        # (16 frames = 0.16 s) holding the click: audio token time // 2 = video token time
        assert int((loud * 0.01 + 0.0125) / 0.16) // 2 == i // 2
    assert seen >= 5


# -----------------------------------------------------------------------------
# loader tuning: decided by the code


def test_loader_workers_default_to_the_cores_per_rank(builtin, monkeypatch):
    import train
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")  # torchrun, 8 ranks on the node
    assert data.cores_per_rank() == 2
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    assert data.cores_per_rank() == 16
    _, tcfg = train.parse_args(["--size", "tiny", "--data", builtin])
    assert tcfg.workers == 16
    _, tcfg = train.parse_args(["--size", "tiny", "--data", builtin, "--workers", "3"])
    assert tcfg.workers == 3


@pytest.mark.parametrize("decode", ["cpu", "gpu"])
def test_bench_prints_clips_per_core_beside_the_models_need(builtin, capsys, decode):
    bench.main(["loader", "--root", builtin, "--workers", "0", "--batches", "3", "--batch_size", "4",
               "--num_frames", "4", "--image_size", "32", "--audio_frames", "128", "--size", "tiny",
               "--cores", "16", "--decode", decode])
    out = capsys.readouterr().out
    rate = float(out.split(" clips/s")[0])
    assert rate > 0 and "per worker core" in out and "16 cores at this rate give" in out
    need = float(out.split("needs ")[1].split(" clips/s")[0])
    assert need > 0 and ("data-bound" if rate * 16 < need else "model-bound") in out
    if decode == "gpu" and not torch.cuda.is_available():
        assert "worker side" in out


@pytest.mark.parametrize("batches", [1, 5])
def test_bench_times_exactly_the_batches_it_counts(builtin, capsys, monkeypatch, batches):
    # a loader whose every batch of 4 takes 1 s: 4 clips/s, however few batches are timed (the
    # first two are the workers' start-up)
    clock = [0.0]

    class Loader:
        dataset = range(400)

        def __len__(self):
            return 100

        def __iter__(self):
            for _ in range(100):
                clock[0] += 1.0
                yield {"id": ["clip"] * 4}
    monkeypatch.setattr(data, "make_loader", lambda *a, **k: Loader())
    monkeypatch.setattr(bench.time, "time", lambda: clock[0])
    bench.main(["loader", "--root", builtin, "--workers", "0", "--batches", str(batches), "--size",
               "tiny", "--num_frames", "4", "--image_size", "32", "--audio_frames", "128"])
    out = capsys.readouterr().out
    assert out.startswith("4.0 clips/s, 4.0 per worker core") and clock[0] == batches + 2, out
    assert "1 cores at this rate give 4" in out  # (no workers: the main process's one core)


def test_numbers_the_commands_cannot_take_are_one_line(tmp_path, capsys):
    cases = [(["prepare", "--videos", ".", "--manifest", "m.csv", "--format", "generic", "--out",
               "o", "--workers", "0"], "argument --workers: 0: must be 1 or more"),
             (["prepare", "--videos", ".", "--manifest", "m.csv", "--format", "generic", "--out",
               "o", "--short_side", "8"], "argument --short_side: 8: must be 32 or more"),
             (["stats", "--root", ".", "--max_clips", "0"], "argument --max_clips: 0: must be 1"),
             (["bench", "--workers", "-1"], "argument --workers: -1: must be 0 or more"),
             (["bench", "--batches", "0"], "argument --batches: 0: must be 1 or more"),
             (["builtin", "--out", str(tmp_path / "b"), "--n_train", "0"], "needs n_train >= 1"),
             (["builtin", "--out", str(tmp_path / "b"), "--seconds", "2"], "seconds >= 2.5"),
             (["bench", "--mfu", "2"], "argument --mfu: 2: must be above 0 and at most 1"),
             (["bench", "--frame_stride", "0"], "argument --frame_stride: 0: must be above 0"),
             (["bench", "--size", "huge"], "argument --size: invalid choice: 'huge'"),
             # (said before the measurement, not after it)
             (["bench", "--root", "nowhere", "--gpu", "TPU"], "--gpu TPU: no known peak; one o"),
             (["bench", "--root", "nowhere", "--num_frames", "15"],
              "bench --size base: video 15x224x224 does not tile into 2x16x16 tubelets"),
             (["builtin", "--out", str(tmp_path / "a_file" / "b")],
              f"--out {tmp_path / 'a_file' / 'b'}: cannot make it (Not a directory: ")]
    (tmp_path / "a_file").write_text("")
    for args, says in cases:
        with pytest.raises(SystemExit) as e:  # (the loader bench: kernels/bench.py's command)
            bench.main(["loader", *args[1:]]) if args[0] == "bench" else data.main(args)
        # argparse's errors: one line on stderr, exit status 2; the rest: one line, status 1
        line = e.value.code if isinstance(e.value.code, str) else capsys.readouterr().err.strip()
        assert e.value.code != 0 and says in line and "\n" not in line, (args, line)
    assert not os.path.exists(tmp_path / "b")


@needs_ffmpeg
def test_a_split_the_manifest_does_not_have_is_named_with_those_it_has(tmp_path):
    manifest = tmp_path / "clips.csv"
    manifest.write_text("path,label,split\na.mp4,dog,train\nb.mp4,cat,test\n")
    with pytest.raises(SystemExit) as e:
        data.main(["prepare", "--videos", str(tmp_path), "--manifest", str(manifest), "--format",
                   "generic", "--out", str(tmp_path / "set"), "--split", "valid"])
    assert "no rows of split 'valid' (its splits: ['test', 'train'])" in e.value.code


@pytest.mark.parametrize("device", ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])
def test_a_crop_of_the_training_size_is_not_resized(device, monkeypatch):
    # pretraining's crop of frames stored at short side 256 is 224 x 224 already: it is copied,
    # not resized, and equals what the resize to its own size gives
    import torch.nn.functional as F
    g = torch.Generator().manual_seed(0)
    frames = torch.randint(0, 256, (4, 3, 40, 50), dtype=torch.uint8, generator=g).to(device)
    box = (3, 5, 32, 32)
    want = data.crop_resize(frames, box, True, 31)  # (another size: resized)
    calls = []
    real = F.interpolate
    monkeypatch.setattr(F, "interpolate", lambda *a, **k: calls.append(1) or real(*a, **k))
    same = data.crop_resize(frames, box, True, 32)
    assert not calls and same.shape == (3, 4, 32, 32) and want.shape == (3, 4, 31, 31)
    x = frames[:, :, 3:35, 5:37].float()
    resized = real(x, size=(32, 32), mode="bilinear", align_corners=False, antialias=True)
    assert torch.equal(same, resized.round().clamp(0, 255).to(torch.uint8).flip(-1).permute(
        1, 0, 2, 3)) and torch.equal(same, frames[:, :, 3:35, 5:37].flip(-1).permute(1, 0, 2, 3))
    assert data.crop_resize(list(frames), box, False, 32).shape == (3, 4, 32, 32)


def test_mixed_decode_shares_the_batches_between_the_gpu_and_the_workers(copy, monkeypatch):
    # --decode mixed: the GPU decoder takes gpu_share of the batches (spread evenly, the same
    # batches after a resume), the workers decode the rest; the stream is the CPU path's (here the
    # "GPU" is the CPU: the same decoder, so the same pixels)
    import train
    kw = dict(seed=3, specaug_freq=20, video_aug="finetune")
    decoded = []
    real = data.GPUDecoder._video
    monkeypatch.setattr(data.GPUDecoder, "_video",
                        lambda self, b: decoded.append(b["id"]) or real(self, b))
    d = train.Dist()

    def stream(decode, step=0):
        ds = _small(copy, decode=decode, gpu_share=0.25, **kw)
        return itertools.islice(data.batch_stream(ds, 2, 0, 0, d, step, len(ds) // 2, 2), 8)
    cpu = [b for _, b in stream("cpu")]
    mixed = [b for _, b in stream("mixed")]
    assert [b["id"] for b in mixed] == [b["id"] for b in cpu]
    assert decoded == [mixed[3]["id"], mixed[7]["id"]]  # (a quarter: batches 3 and 7)
    for c, m in zip(cpu, mixed):
        assert torch.equal(c["v"], m["v"]) and torch.allclose(c["a"], m["a"], atol=1e-4)
    decoded.clear()
    resumed = [b for _, b in stream("mixed", step=2)]  # (batches 2 on: the GPU's are 3 and 7)
    assert decoded[:1] == [mixed[3]["id"]] and [b["id"] for b in resumed[:6]] == [
        b["id"] for b in mixed[2:]]


@needs_ffmpeg
def test_prepare_a_folder_without_a_manifest_gives_an_unlabelled_set_pretraining_reads(tmp_path):
    # every video under the folder (good ones, a corrupt one, one without sound), unlabelled; a
    # manifest without a label column gives the same; pretraining reads it, finetuning refuses
    import finetune
    import train
    videos = tmp_path / "videos"
    (videos / "sub").mkdir(parents=True)
    make_mp4(videos / "sub" / "good.mp4", tone=440.0)
    make_mp4(videos / "mono.mkv", tone=1000.0, channels=1)
    (videos / "corrupt.mp4").write_bytes(os.urandom(5000))
    subprocess.run(["ffmpeg", "-y", "-loglevel", "error", "-f", "lavfi", "-i",
                    "testsrc=size=160x120:rate=25:duration=2", "-c:v", "libx264", "-pix_fmt",
                    "yuv420p", str(videos / "silent.mp4")], check=True)
    (videos / "notes.txt").write_text("not a video")
    out = str(tmp_path / "set")
    data.main(["prepare", "--videos", str(videos), "--out", out, "--workers", "2"])
    assert json.load(open(os.path.join(out, "meta.json")))["heads"] == {}
    rows = list(csv.DictReader(open(os.path.join(out, "train.csv"))))
    assert [r["id"] for r in rows] == ["mono", "sub__good"] and set(rows[0]) == {
        "id", "duration", "frames"}
    failed = {r["id"]: r["reason"] for r in csv.DictReader(open(os.path.join(out,
                                                                             "failed_train.csv")))}
    assert set(failed) == {"corrupt", "silent"} and "audio" in failed["silent"].lower()
    manifest = _write(tmp_path / "m.csv", "path\nsub/good.mp4\nmono.mkv\n")
    out2 = str(tmp_path / "set2")
    data.main(["prepare", "--videos", str(videos), "--manifest", manifest, "--format", "generic",
               "--out", out2, "--workers", "2"])
    assert [r["id"] for r in csv.DictReader(open(os.path.join(out2, "train.csv")))] == [
        "mono", "sub__good"] and json.load(open(os.path.join(out2, "meta.json")))["heads"] == {}
    tiny = ["--preset", "quick", "--num_frames", "4", "--image_size", "32", "--patch_size", "16",
            "--audio_frames", "64", "--mel_bins", "32", "--workers", "0", "--picture_every", "0",
            "--batch_size", "2", "--max_steps", "2", "--kernels", "torch", "--data", out]
    res = train.main([*tiny, "--out_dir", str(tmp_path / "pre")])
    assert res["step"] == 2 and math.isfinite(res["loss"])
    with pytest.raises(SystemExit, match="the set has no labels .*finetuning needs them"):
        finetune.main(["--preset", "quick", "--data", out, "--workers", "0",
                       "--out_dir", str(tmp_path / "ft")])


def test_the_baseline_a_model_must_beat(builtin, capsys):
    # data.py baseline: a nearest-class-mean and a logistic regression on pooled log-mel and pixel
    # features; on the built-in set (audio tells most classes, video some, both more) well above
    # chance, and both modalities no worse than audio alone
    data.main(["baseline", "--root", builtin])
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["test_clips"] == 8 and res["chance"] == 1 / 8
    assert all(0 <= res[f"{m}_{c}"] <= 1 for m in ("audio", "video", "both")
               for c in ("ncm", "logreg"))
    fit = data.baseline(builtin, "train", "train")  # (its own training clips: fitted)
    assert fit["both_logreg"] >= 0.9 and fit["audio_logreg"] >= 0.9
    feats, y = data.crude_features(builtin, "train")
    assert feats["a"].shape == (24, 2 * 128) and feats["v"].shape == (24, 2 * 3 * 64)
    assert len(y) == 24
    with pytest.raises(SystemExit, match="no such|not found"):
        data.main(["baseline", "--root", "/nonexistent"])
