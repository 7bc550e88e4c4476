"""Answers out: audio <-> video retrieval (R@k, median rank) on hand-made cases whose answer is
known, and on a prepared split through the command line."""
import json
import math
import os

import pytest
import torch

import data
import finetune
import train
from test_data import make_mp4, needs_ffmpeg

TINY = ["--preset", "quick", "--num_frames", "4", "--image_size", "32", "--patch_size", "16",
        "--audio_frames", "64", "--mel_bins", "32", "--workers", "0", "--picture_every", "0",
        "--batch_size", "8", "--kernels", "torch"]


def test_retrieval_ranks_each_query_s_own_item():
    eye = torch.eye(12)
    perfect = finetune.retrieval_metrics(eye * 3, eye, "a2v")
    assert perfect == {"a2v_R@1": 1.0, "a2v_R@5": 1.0, "a2v_R@10": 1.0, "a2v_median_rank": 1.0}
    # query i's own item ranked (i % 12) + 1: item j scores 1 for query i if j comes before its
    # own in a fixed order, 0.5 for its own, 0 after
    n = 12
    q = torch.zeros(n, n)
    for i in range(n):
        q[i, :i] = 1.0
        q[i, i] = 0.5
    items = torch.eye(n)
    got = finetune.retrieval_metrics(q, items, "x")
    ranks = torch.arange(1, n + 1).float()  # query i's own item comes (i + 1)-th
    assert got["x_R@1"] == pytest.approx(1 / 12) and got["x_R@5"] == pytest.approx(5 / 12)
    assert got["x_R@10"] == pytest.approx(10 / 12)
    assert got["x_median_rank"] == ranks.median().item()
    # a tie with its own item counts against the query
    tied = finetune.retrieval_metrics(torch.ones(3, 2), torch.ones(3, 2), "t")
    assert tied["t_R@1"] == 0.0 and tied["t_median_rank"] == 3.0


def test_retrieval_on_a_prepared_split_writes_its_figures(builtin, tmp_path):
    pre = train.main([*TINY, "--data", builtin, "--max_steps", "1", "--out_dir",
                      str(tmp_path / "pre")])
    res = finetune.main(["--retrieval", "--init", pre["checkpoint"], "--data", builtin,
                         "--workers", "0", "--batch_size", "8", "--kernels", "torch",
                         "--out_dir", str(tmp_path / "r")])
    saved = json.load(open(tmp_path / "r" / "retrieval.json"))
    assert saved == res and res["clips"] > 0
    for name in ("a2v", "v2a"):
        assert 0 <= res[f"{name}_R@1"] <= res[f"{name}_R@5"] <= res[f"{name}_R@10"] <= 1
        assert 1 <= res[f"{name}_median_rank"] <= res["clips"]
    with pytest.raises(SystemExit, match="--retrieval needs a pretrained model"):
        finetune.main(["--retrieval", "--data", builtin, "--out_dir", str(tmp_path / "x")])
    assert not math.isnan(res["a2v_R@1"])


def videos_and_set(tmp_path):
    """Six small mp4s of three tones (one of each tone a test clip), a broken file, and the set
    data.py prepares from them."""
    videos = tmp_path / "videos"
    videos.mkdir()
    tones = {"low": 300.0, "mid": 700.0, "high": 1500.0}
    for name, tone in tones.items():
        for k in range(2):
            make_mp4(videos / f"{name}{k}.mp4", seconds=2.0, tone=tone * (1 + 0.1 * k),
                     size=(96, 64))
    (videos / "broken.mp4").write_bytes(b"not a video")
    rows = ["path,label,split"] + [f"{n}{k}.mp4,{n},{s}" for n in tones for k, s in
                                   ((0, "train"), (1, "test"))]
    (tmp_path / "clips.csv").write_text("\n".join(rows) + "\n")
    root = str(tmp_path / "set")
    data.main(["prepare", "--videos", str(videos), "--manifest", str(tmp_path / "clips.csv"),
               "--format", "generic", "--out", root, "--short_side", "64"])
    return videos, root


@needs_ffmpeg
def test_predict_names_each_video_s_labels_as_evaluation_scores_them(tmp_path, capsys):
    import csv
    videos, root = videos_and_set(tmp_path)
    out = str(tmp_path / "ft")
    finetune.main(["--preset", "quick", "--data", root, "--modality", "av", "--num_frames", "4",
                   "--image_size", "32", "--audio_frames", "64", "--workers", "0",
                   "--batch_size", "3", "--max_steps", "2", "--views", "2", "--kernels",
                   "torch", "--out_dir", out])
    ckpt = train.find_checkpoint("auto", out)
    evaluated = {r["id"]: r for r in csv.DictReader(open(f"{out}/predictions.csv"))}
    rows = finetune.main(["--predict", str(videos), "--resume", ckpt, "--workers", "0",
                          "--kernels", "torch", "--out_dir", str(tmp_path / "p")])
    err = capsys.readouterr().err
    assert "broken.mp4: not read (" in err  # (the rest go on)
    assert len(rows) == 6
    names = torch.load(ckpt, weights_only=True)["labels"]["label"]
    compared = 0
    for r in rows:
        clip = os.path.splitext(os.path.basename(r["file"]))[0]
        if clip in evaluated:  # a test clip of the prepared set: evaluation's own scores
            want = evaluated[clip]
            assert r["label_top5"].split(";") == [names[int(j)] for j in
                                                  want["label_top5"].split(";")]
            assert r["label_scores"] == want["label_scores"]
            compared += 1
    assert compared == 3  # (the three test clips)
    saved = list(csv.DictReader(open(tmp_path / "p" / "predict.csv")))
    assert [s["file"] for s in saved] == [r["file"] for r in rows]


@needs_ffmpeg
def test_embed_writes_each_readable_video_s_pooled_features_as_the_pipeline_makes_them(
        tmp_path, capsys):
    import csv

    import numpy as np

    import avmae
    videos, root = videos_and_set(tmp_path)
    pre = train.main(["--preset", "quick", "--data", root, "--num_frames", "4", "--image_size",
                      "32", "--audio_frames", "64", "--workers", "0", "--batch_size", "3",
                      "--max_steps", "1", "--picture_every", "0", "--kernels", "torch",
                      "--out_dir", str(tmp_path / "pre")])
    res = finetune.main(["--embed", str(videos), "--init", pre["checkpoint"], "--workers", "0",
                         "--batch_size", "4", "--kernels", "torch", "--out_dir",
                         str(tmp_path / "e")])
    assert "broken.mp4: not read (" in capsys.readouterr().err and res["files"] == 6
    index = list(csv.DictReader(open(tmp_path / "e" / "index.csv")))
    emb = {m: np.load(tmp_path / "e" / f"embeddings_{m}.npy") for m in "av"}
    assert len(index) == 6 and all(e.shape == (6, res["dim"]) for e in emb.values())
    # a test clip of the set: the same features as its prepared clip through the same pipeline
    model = avmae.load(pre["checkpoint"], kernels="torch")
    ck = torch.load(pre["checkpoint"], weights_only=True)
    mc, was = model.cfg, ck["train_config"]
    ds = data.AVDataset(data.DataConfig(
        root=root, split="test", train=False, views=1, num_frames=mc.num_frames,
        image_size=mc.image_size, audio_frames=mc.audio_frames, mel_bins=mc.mel_bins,
        frame_stride=was["frame_stride"], window=was["window"],
        audio_norm="{},{}".format(*ck["audio_norm"])))
    item = ds[0]
    row = next(i for i, r in enumerate(index) if r["id"] == item["id"])
    with torch.no_grad():
        want = model.encode(a=item["a"][None, 0] if item["a"].dim() == 3 else item["a"][None],
                            v=data.scale_video(item["v"][None, 0] if item["v"].dim() == 5
                                               else item["v"][None]))
    for m in "av":
        assert np.allclose(emb[m][row], want[m].mean(1)[0].numpy(), atol=1e-5)


def test_class_level_retrieval_counts_any_item_of_the_query_s_class():
    # items 0-1 are class 0, 2-3 class 1; each query points at the other item of its class
    items = torch.eye(4)
    queries = items[[1, 0, 3, 2]]
    got = finetune.retrieval_metrics(queries, items, "q", classes=torch.tensor([0, 0, 1, 1]))
    assert got["q_R@1"] == 0.0 and got["q_class_R@1"] == 1.0
