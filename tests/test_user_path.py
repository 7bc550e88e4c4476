"""A newcomer's path on their own prepared set: statistics computed on first use, the clip window
fitted to the clips, videos without sound, and every user error as one line without a traceback."""
import dataclasses
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

import avmae
import data
from kernels import bench
import finetune
import train
from test_data import make_mp4, needs_ffmpeg, _write

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--preset", "quick", "--num_frames", "4", "--image_size", "32", "--patch_size", "16",
        "--workers", "0", "--picture_every", "0", "--batch_size", "8", "--kernels", "torch"]


@pytest.fixture
def copy(builtin, tmp_path):
    dst = str(tmp_path / "set")
    shutil.copytree(builtin, dst)
    return dst


def cli(*args, cwd=None):
    """Run a command line of the project as a user would (in the test's own folder: the scripts
    by their paths in the checkout); returns (exit code, stderr lines)."""
    args = [os.path.join(ROOT, a) if a.endswith(".py") and os.path.exists(os.path.join(ROOT, a))
            else a for a in args]
    p = subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=cwd,
                       timeout=120, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    return p.returncode, [line for line in p.stderr.splitlines() if line.strip()]


def test_statistics_are_computed_on_first_use_and_saved(copy, tmp_path, capsys):
    meta_path = os.path.join(copy, "meta.json")
    meta = json.load(open(meta_path))
    want = (meta.pop("audio_mean"), meta.pop("audio_std"))
    json.dump(meta, open(meta_path, "w"))
    res = train.main([*TINY, "--data", copy, "--audio_frames", "64", "--max_steps", "1",
                      "--audio_norm", "dataset", "--out_dir", str(tmp_path / "o")])
    assert res["step"] == 1 and "computing them from the train split" in capsys.readouterr().out
    got = json.load(open(meta_path))
    # (the same clips: the same stats)
    assert (got["audio_mean"], got["audio_std"]) == pytest.approx(want, abs=1e-3)
    # a clip whose audio cannot be read is left out and said, not the end of the run
    first = open(os.path.join(copy, "train.csv")).read().splitlines()[1].split(",")[0]
    flac = os.path.join(copy, "clips", first, "audio.flac")
    with open(flac, "r+b") as f:
        f.truncate(300)
    mean, std = data.audio_stats(copy, write=False)
    err = capsys.readouterr().err
    assert "without 1 unreadable clip(s) of " in err and f"(the first: {flac}: " in err
    assert (mean, std) == pytest.approx(want, abs=0.05)


def test_the_window_fits_the_clips_unless_the_user_chose_it(builtin, capsys):
    # the built-in clips are 4 s: the paper's 8 s of audio and 16 frames at stride 4 (2.56 s) become
    # 4 s
    mcfg, _ = train.parse_args(["--data", builtin])
    # 398 real frames -> whole 16-frame patches
    assert (mcfg.audio_frames, mcfg.num_frames) == (384, 16)
    assert "using --audio_frames 384" in capsys.readouterr().out
    # chosen: kept (zero-padded), and said
    mcfg, _ = train.parse_args(["--data", builtin, "--audio_frames", "800"])
    assert mcfg.audio_frames == 800
    assert ("--audio_frames 800 is longer, so each window ends in padding (--audio_frames 384 fits "
            "them)") in capsys.readouterr().out
    # AudioSet's padded 1000 frames are kept
    assert data.fit_window(10.0, 1000, 16, 16, 4, 2) == (1000, 16)
    assert data.fit_window(2.0, 256, 16, 8, 12.5, 2) == (192, 4)  # 198 real frames; 2 s at 2 fps


@pytest.mark.slow(12)
def test_user_errors_are_one_line_without_a_traceback(copy, tmp_path, monkeypatch, capsys):
    bad_ckpt = tmp_path / "bad.pt"
    bad_ckpt.write_bytes(b"not a checkpoint")
    other = tmp_path / "other.pt"
    torch.save({"something": 1}, other)
    pre, ft = tmp_path / "pre.pt", tmp_path / "ft.pt"  # (what load_checkpoint reads of each kind)
    torch.save(dict(model={}, model_config={}), pre)
    torch.save(dict(model={}, model_config={}, finetune_config={}), ft)
    empty = tmp_path / "empty"
    empty.mkdir()
    for f in ("meta.json", "train.csv"):
        shutil.copy(os.path.join(copy, f), empty / f)
    with open(empty / "train.csv") as f:
        header = f.readline()
    (empty / "train.csv").write_text(header)
    cut, vocab = tmp_path / "cut", tmp_path / "vocab"  # meta.json cut short; without its heads
    for d, text in ((cut, '{"heads": {"label": ["a", '), (vocab, '{"fps": 12.5}')):
        d.mkdir()
        (d / "meta.json").write_text(text)
        shutil.copy(os.path.join(copy, "train.csv"), d / "train.csv")
    run = tmp_path / "run"  # a pretraining's out_dir
    run.mkdir()
    (run / "latest").write_text("ckpt_0000002.pt")
    for name, text in (("failed_train.csv", "id,source,reason\n"), ("mine.csv", "path,label\n")):
        _write(os.path.join(copy, name), text)  # (neither is a split)
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    done = tmp_path / "done"  # a run's out_dir, given again without --resume
    done.mkdir()
    (done / "ckpt_0000003.pt").write_bytes(b"")
    stage2 = ["--data", copy, "--preset", "quick", "--variant", "mavil2", "--teacher"]
    student, _ = train.parse_args([*stage2, "t.pt"])
    teachers = {name: tmp_path / f"teacher_{name}.pt" for name in ("short", "audio", "fits")}
    for name, change in (("short", dict(audio_frames=256)), ("audio", dict(modalities="a")),
                         ("fits", {})):
        config = dataclasses.replace(student, target="pixels", teacher_width=0, **change)
        torch.save(dict(model={}, model_config=dataclasses.asdict(config)), teachers[name])
    cases = [  # (main, arguments, what the line says)
        (train.main, ["--data", copy, "--preset", "quick", "--out_dir", str(done)],
         "holds a run already (up to ckpt_0000003.pt): --resume auto continues it; for a new"),
        (finetune.main, ["--data", copy, "--preset", "quick", "--out_dir", str(done)],
         "holds a run already (up to ckpt_0000003.pt): --resume auto continues it; for a new"),
        (train.main, ["--data", copy, "--preset", "quick", "--out_dir", str(a_file / "o")],
         "o: cannot make it (Not a directory: "),
        (finetune.main, ["--data", copy, "--preset", "quick", "--out_dir", str(a_file / "o")],
         "o: cannot make it (Not a directory: "),
        (train.main, ["--data", str(tmp_path / "nowhere")], "not a prepared data set"),
        (train.main, ["--data", str(a_file / "builtin"), "--preset", "quick"],  # (made on first
         f"--data {a_file / 'builtin'}: cannot make it (Not a directory: "),     # use)
        (train.main, ["--data", copy, "--split", "valid"],
         "valid.csv not found (this set's splits: ['test', 'train']; prepare the missing one"),
        (train.main, ["--data", str(empty), "--preset", "quick"], "no usable clips"),
        (train.main, ["--data", copy, "--preset", "quick", "--batch_size", "4096"],
         "fewer than one batch of 4096: lower --batch_size"),
        (train.main, ["--data", copy, "--preset", "quick", "--batch_size", "8", "--resume",
                      str(tmp_path / "no.pt"), "--out_dir", str(tmp_path / "o")],
         "no such checkpoint"),
        (train.main, ["--encoder", "separate", "--decoder", "separate"], "two unrelated MAEs"),
        (finetune.main, ["--data", copy, "--preset", "quick", "--init", str(bad_ckpt)],
         "not a readable checkpoint"),
        (finetune.main, ["--data", copy, "--preset", "quick", "--init", str(other)],
         "not an avmae pretraining"),
        (finetune.main, ["--data", copy, "--preset", "quick", "--init", str(ft)],
         "a finetuning checkpoint, not a pretraining one: go on with that finetuning by "),
        (finetune.main, ["--data", copy, "--preset", "quick", "--resume", str(pre), "--out_dir",
                         str(tmp_path / "o")],
         "a pretraining checkpoint, not a finetuning one: finetune from it by finetune.py --init"),
        (train.main, ["--data", copy, "--preset", "quick", "--resume", str(ft), "--out_dir",
                      str(tmp_path / "o")], "a finetuning checkpoint, not a pretraining one"),
        (train.main, ["--data", copy, "--preset", "quick", "--variant", "mavil2", "--teacher",
                      str(ft)], "--teacher " + str(ft) + ": a finetuning checkpoint, not a"),
        (train.main, ["--data", copy, "--preset", "quick", "--fsdp"],
         "--fsdp shards the model over the ranks of a torchrun job: run torchrun"),
        (finetune.main, ["--data", copy, "--preset", "quick", "--init", str(run)],
         f"a folder, not a checkpoint file (its latest is {run / 'ckpt_0000002.pt'})"),
        (finetune.main, ["--data", copy, "--preset", "quick", "--init", str(empty)],
         "a folder, not a checkpoint file (pass one of its ckpt_*.pt files)"),
        (finetune.main, ["--data", copy, "--preset", "quick", "--eval_only"],
         "--eval_only evaluates a finetuned checkpoint: pass --resume"),
        (train.main, ["--data", str(cut), "--preset", "quick"],
         "meta.json: not readable as JSON (Expecting value, line 1): mend it, or prepare the set"),
        (finetune.main, ["--data", str(vocab), "--preset", "quick"],
         "meta.json: no \"heads\" (the label vocabulary that data.py prepare writes)"),
        (data.command_line, ["stats", "--root", str(cut)], "meta.json: not readable as JSON"),
        (train.main, ["--data", copy, "--batch_size", "0"], "--batch_size 0: must be 1 or more"),
        (train.main, ["--data", copy, "--lr", "-1"], "--lr -1.0: must be 0 or more"),
        (finetune.main, ["--data", copy, "--eval_every", "0"], "--eval_every 0: must be 1 or"),
        (finetune.main, ["--data", copy, "--frame_stride", "0"], "--frame_stride 0.0: must be abo"),
        (bench.main, ["loader", "--root", str(tmp_path / "nowhere")], "--root"),
        (train.main, ["--data", copy, "--workers", "-2"], "--workers -2: must be -1 (the default"),
        (finetune.main, ["--data", copy, "--tokenlearner", "-1"], "--tokenlearner -1: must be 0"),
        (finetune.main, ["--data", copy, "--fusion_layer", "-2"], "--fusion_layer -2: must be -1"),
        (train.main, ["--data", copy, "--heads", "0"], "heads=0: must be 1 or more"),
        # (one rule for the model's numbers: not "0 or more" for a width that must be 1 or more)
        (train.main, ["--data", copy, "--width", "-64"], "width=-64: must be 1 or more"),
        (finetune.main, ["--data", copy, "--audio_norm", "abc"],
         "audio_norm='abc': use one of none, audiomae, cavmae, dataset (the set's own"),
        # numbers torch's optimiser refused with a traceback, or that trained to a NaN or to
        # nothing without a word
        (train.main, ["--data", copy, "--beta1", "1.5"], "--beta1 1.5: must be 0 or more and be"),
        (finetune.main, ["--data", copy, "--label_smoothing", "1"], "--label_smoothing 1.0: must"),
        (finetune.main, ["--data", copy, "--drop_path", "1.5"], "--drop_path 1.5: must be 0 or"),
        (train.main, ["--data", copy, "--drop_path", "2"], "drop_path=2.0: must be a probability"),
        (finetune.main, ["--data", copy, "--layer_decay", "2"], "--layer_decay 2.0: must be above"),
        (train.main, ["--data", copy, "--epochs", "0"], "--epochs 0 with --max_steps 0 leaves no"),
        (finetune.main, ["--data", copy, "--epochs", "0"], "--epochs 0 with --max_steps 0 leave"),
        (train.main, ["--data", copy, "--in_chans", "1"], "--in_chans 1: data.py's clips are RGB"),
        (finetune.main, ["--data", copy, "--preset", "quick", "--num_frames", "3"],
         "video 3x64x64 does not tile into 2x16x16 tubelets"),
        (finetune.main, ["--data", copy, "--preset", "quick", "--audio_frames", "7"],
         "spectrogram 7x128 does not tile into 16x16 patches"),
        # MAViL stage 2: a teacher that does not read this run's inputs as the same tokens (a
        # traceback in the first step before)
        (train.main, [*stage2, str(teachers["short"])],
         "its audio was --audio_frames 256, this run's --audio_frames 400: the targets are its"),
        (train.main, [*stage2, str(teachers["audio"])],
         "it was pretrained without video (--modalities a), so it has no video features"),
        (train.main, [*stage2, str(teachers["fits"]), "--teacher_width", "32"],
         "--teacher_width 32: the teacher " + str(teachers["fits"]) + " is 64 wide"),
    ]

    def built(*a, **k):
        raise AssertionError("the model was built before the out_dir and the set were checked")
    for i, (main, args, says) in enumerate(cases):
        with monkeypatch.context() as m:
            if i < 9:  # (said at once: a paper-size model takes seconds to build)
                m.setattr(avmae.AVMAE, "__init__", built)
            with pytest.raises(SystemExit) as e:
                main(args)
        line = e.value.code  # a string: printed to stderr, exit status 1
        assert isinstance(line, str) and "\n" not in line and says in line, (args, line)
    # a flag argparse refuses: its message and where the flags are listed, not the whole usage
    for main, args, says in ((train.main, ["--preset", "nope"], "invalid choice: 'nope'"),
                             (finetune.main, ["--epox", "3"], "unrecognized arguments: --epox"),
                             (data.main, [], "required: {prepare,builtin,")):
        capsys.readouterr()
        with pytest.raises(SystemExit) as e:
            main(args)
        err = capsys.readouterr().err.strip()
        assert e.value.code == 2 and says in err and "-h lists the flags" in err, err
        assert "\n" not in err, err
    # and from the command line, as a user sees them: one line on stderr, a non-zero exit, no
    # traceback
    for args, says in ((["train.py", "--data", str(tmp_path / "nowhere")],
                        "not a prepared data set"),
                       (["finetune.py", "--data", copy, "--preset", "quick", "--init",
                         str(bad_ckpt)], "not a readable"),
                       (["data.py", "stats", "--root", str(tmp_path / "nowhere")],
                        "meta.json not found")):
        code, err = cli(*args)
        assert code != 0 and not any("Traceback" in line for line in err), (args, err[-5:])
        assert says in err[-1], (args, err[-1])


def test_the_commands_help_shows_each_example_as_written():
    # a shell line continued by "\\" in a docstring that is not raw joined two lines of -h
    import kernels.bench
    for mod in (train, finetune, data, kernels.bench):
        for line in mod.__doc__.splitlines():
            assert len(line) <= 100, (mod.__name__, line)
    assert "--rdzv_backend=c10d \\\n" in train.__doc__


def test_more_ranks_per_node_than_gpus_is_one_line(monkeypatch):
    # torchrun --nproc_per_node 8 on a node with 4 GPUs (or a CUDA_VISIBLE_DEVICES that hides some)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2,3")
    for k, v in dict(RANK="5", LOCAL_RANK="5", WORLD_SIZE="8").items():
        monkeypatch.setenv(k, v)
    with pytest.raises(SystemExit) as e:
        train.setup_distributed()
    assert e.value.code == ("rank 5: LOCAL_RANK 5, but this node has 4 GPU(s) "
                            "(CUDA_VISIBLE_DEVICES=0,1,2,3): start torchrun with --nproc_per_node "
                            "4 at most")


def test_ctrl_c_outside_the_training_loop_is_one_line(monkeypatch, capsys):
    # (inside it the first Ctrl-C checkpoints: test_faults.py)
    def interrupted(*a):
        raise KeyboardInterrupt
    monkeypatch.setattr(data, "main", interrupted)
    for argv, says in ((["prepare", "--out", "x"], "; the clips finished are kept, and the same "
                        "command goes on from there"), (["stats", "--root", "x"], "")):
        with pytest.raises(SystemExit) as e:
            data.command_line(argv)
        assert e.value.code == 130
        assert capsys.readouterr().err == "data.py: stopped by Ctrl-C" + says + "\n"
    # (as while a set is made or a model built)
    monkeypatch.setattr(train, "parse_args", interrupted)
    monkeypatch.setattr(finetune, "parse_args", interrupted)
    for main in (train.main, finetune.main):
        with pytest.raises(SystemExit) as e:
            train.command_line(main)
        assert e.value.code == 130 and capsys.readouterr().err == train.CTRL_C_AGAIN + "\n"


@needs_ffmpeg
def test_a_video_without_sound_is_refused_in_words_or_kept_silent(tmp_path):
    videos = tmp_path / "videos"
    videos.mkdir()
    make_mp4(videos / "aaa_000000.mp4")
    subprocess.run(["ffmpeg", "-y", "-loglevel", "error", "-i", str(videos / "aaa_000000.mp4"),
                    "-an", "-c:v", "copy", str(videos / "mute_000000.mp4")], check=True)
    manifest = _write(tmp_path / "m.csv", "aaa,0,a,train\nmute,0,b,train\n")
    out = str(tmp_path / "p")
    data.main(["prepare", "--videos", str(videos), "--manifest", manifest, "--format", "vggsound",
               "--out", out, "--workers", "1"])
    failed = {
        r.split(",")[0]: r for r in open(os.path.join(out, "failed_train.csv")).read().splitlines()}
    assert "no audio stream" in failed["mute_000000"] and "--allow_silent" in failed["mute_000000"]
    # prepare computes the statistics
    assert "audio_mean" in json.load(open(os.path.join(out, "meta.json")))
    out2 = str(tmp_path / "p2")
    data.main(["prepare", "--videos", str(videos), "--manifest", manifest, "--format", "vggsound",
               "--out", out2, "--workers", "1", "--allow_silent"])
    rows = open(os.path.join(out2, "train.csv")).read().splitlines()
    assert len(rows) == 3  # header + both clips
    ds = data.AVDataset(data.DataConfig(root=out2, modalities="v", num_frames=4, image_size=32))
    assert len(ds) == 2 and ds[1]["v"].shape == (3, 4, 32, 32)


@needs_ffmpeg
def test_prepare_takes_each_clip_once_and_says_what_it_refused(tmp_path):
    videos = tmp_path / "videos"
    videos.mkdir()
    make_mp4(videos / "aaa.mp4", seconds=1.0)
    shutil.copy(videos / "aaa.mp4", videos / "aaa.mkv")
    import soundfile as sf
    sf.write(str(videos / "song.wav"), 0.1 * torch.randn(16000).numpy(), 16000)
    # a row twice, another file with the same clip id, the same clip in the test split, a sound
    # file without pictures: each said in failed_*.csv, none prepared twice at once
    manifest = _write(tmp_path / "m.csv", "path,label,split\naaa.mp4,a,train\naaa.mp4,a,train\n"
                      "aaa.mkv,b,train\naaa.mp4,b,test\nsong.wav,b,train\n")
    out = str(tmp_path / "p")
    args = ["prepare", "--videos", str(videos), "--format", "generic", "--out", out, "--workers",
            "2"]
    data.main([*args, "--manifest", manifest])
    rows = [r.split(",") for r in open(os.path.join(out, "train.csv")).read().splitlines()[1:]]
    assert [(r[0], r[-1]) for r in rows] == [("aaa", "0")]  # (id, label: the first row's)
    assert not os.path.exists(os.path.join(out, "test.csv"))
    failed = open(os.path.join(out, "failed_test_train.csv")).read().splitlines()
    assert sorted(failed[1:]) == [
        "aaa,aaa.mkv,duplicate: aaa.mkv and aaa.mp4 make the same clip id: rename one",
        "aaa,aaa.mp4,duplicate: already in the train split (from aaa.mp4): one clip in two "
        "splits puts test clips into training",
        "aaa,aaa.mp4,duplicate: listed twice in the manifest: prepared once",
        f"song,song.wav,ValueError: {videos / 'song.wav'}: no video stream (an audio-only file?)"]
    # the test split prepared later into the same folder: the clip is in train.csv already, and a
    # run that prepares nothing says so and fails (its manifest kept in the folder is no split)
    later = _write(os.path.join(out, "t.csv"), "path,label,split\naaa.mp4,a,test\nbbb.mp4,b,test\n")
    with pytest.raises(SystemExit, match="none of the 2 clips was prepared: the reasons are in"):
        data.main([*args, "--manifest", later])
    failed = open(os.path.join(out, "failed_test.csv")).read()
    assert "aaa,aaa.mp4,duplicate: already in the train split: one clip" in failed
