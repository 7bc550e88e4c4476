r"""
Data: raw video -> prepared set -> batches (AV-MAE Sec. 4.1; the data sets as their own papers
publish them).

  python data.py prepare --videos DIR --manifest vggsound.csv --format vggsound --out data/vggsound
  python data.py prepare --videos DIR --manifest balanced_train_segments.csv --format audioset \
      --labels class_labels_indices.csv --split train --out data/audioset
  python data.py prepare --videos DIR --manifest EPIC_100_train.csv --format epic --split train \
      --out data/epic
  python data.py prepare --videos DIR --out data/mine   # every video under DIR, unlabelled
  python data.py builtin --out data/builtin        # the procedural set (also made on first use)
  python data.py stats --root data/vggsound        # log-mel mean/std for audio_norm=dataset

A prepared set (real or built-in) is one folder:
  meta.json                 sample rate, frame rate, short side, label vocabularies ("heads"),
                            multi_label
  {split}.csv               id,duration,frames,<one column per head: ';'-joined label indices>
  clips/{id}/audio.flac     16 kHz mono
  clips/{id}/frames.bin     the clip's JPEG frames at 12.5 fps, back to back after an offset table
  failed_{split}.csv        clips that could not be prepared, and why
12.5 fps serves both pretraining (16 frames at stride 4 of 25 fps = every 2nd stored frame) and
finetuning (32 frames at stride 2 = every stored frame).

Bad clips never stop a run: the Dataset replaces a clip it cannot read by the next readable one
(idx + 1, idx + 2, ...; at most 10 tries), logs the file and the reason, and reports it in the
batch ("bad"), so the training loop counts them. See `AVDataset` for each rule.
"""
import argparse
import contextlib
import csv
import errno
import functools
import io
import json
import logging
import math
import multiprocessing
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import weakref
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor, as_completed
from dataclasses import dataclass

import numpy as np
import soundfile as sf
import torch
import torch.nn.functional as F

log = logging.getLogger("avmae.data")
SAMPLE_RATE = 16000
FPS = 12.5
# the frame rate strides are counted in (paper: stride 4 pretraining, 2 finetuning)
VIDEO_FPS = 25.0

# ----------------------------------------------------------------------------- log-mel, Kaldi's
#   fbank as every peer computes it (AST, AudioMAE, CAV-MAE), in torch, batched, CPU or GPU

AUDIO_NORMS = {"none": (0.0, 1.0), "audiomae": (-4.27, 2 * 4.57), "cavmae": (-5.081, 4.4849)}


@functools.lru_cache  # (one per shape: a clip's log-mel reuses it)
def kaldi_mel_banks(n_mels: int, n_fft: int, sr: int, low: float = 20.0,
                    high: float = 0.0) -> torch.Tensor:
    """(n_mels, n_fft // 2 + 1) triangles on the mel scale 1127 ln(1 + f / 700), drawn in mel space
    between `low` and `high` (<= 0 means Nyquist + high); the Nyquist bin gets no weight (Kaldi)."""
    high = sr / 2 + high if high <= 0 else high
    mel = lambda f: 1127.0 * np.log1p(np.asarray(f, dtype=np.float64) / 700.0)  # noqa: E731
    lo, hi = mel(low), mel(high)
    delta = (hi - lo) / (n_mels + 1)
    left = lo + delta * np.arange(n_mels)[:, None]
    center, right = left + delta, left + 2 * delta
    m = mel(np.arange(n_fft // 2) * sr / n_fft)[None]  # mel of each FFT bin but Nyquist
    banks = np.maximum(0.0, np.minimum((m - left) / (center - left),
                                       (right - m) / (right - center)))
    return torch.from_numpy(np.pad(banks, ((0, 0), (0, 1)))).float()


def logmel(wave: torch.Tensor, sr: int = SAMPLE_RATE, n_mels: int = 128,
           target_frames: int | None = None, window: str = "hann") -> torch.Tensor:
    """Kaldi-compatible log-mel filterbank. wave: (n,) or (B, n) floats in [-1, 1]. Returns (frames,
    n_mels) or (B, frames, n_mels), frames = 1 + (n - 25 ms) // 10 ms, then zero-padded at the end
    or cropped to `target_frames` (8 s at 16 kHz: 798 -> 800)."""
    single = wave.dim() == 1
    x = wave.reshape(1, -1) if single else wave
    x = x.float()
    win, hop = int(sr * 0.025), int(sr * 0.010)
    n_fft = 1 << (win - 1).bit_length()
    if x.shape[1] < win:
        raise ValueError(f"audio of {x.shape[1]} samples is shorter than one {win}-sample frame")
    x = x - x.mean(dim=1, keepdim=True)                               # remove the waveform's mean
    # (B, T, win), whole frames only
    frames = x.unfold(1, win, hop)
    frames = frames - frames.mean(dim=2, keepdim=True)                # each frame's DC offset
    # pre-emphasis, x[0] uses itself
    prev = torch.cat([frames[..., :1], frames[..., :-1]], dim=2)
    frames = frames - 0.97 * prev
    w = {"hann": torch.hann_window, "hamming": torch.hamming_window}[window](win, periodic=False,
                                                                             device=x.device)
    X = torch.fft.rfft(frames * w, n=n_fft)                           # (B, T, n_fft / 2 + 1)
    spec = X.real.square() + X.imag.square()       # power (5x faster on a CPU than |X| ** 2)
    mel = spec @ kaldi_mel_banks(n_mels, n_fft, sr).to(x.device).T
    out = mel.clamp_min(torch.finfo(torch.float32).eps).log()
    if target_frames is not None:
        T = out.shape[1]
        out = F.pad(out, (0, 0, 0, target_frames - T)) if T < target_frames else out[:,
                                                                                     :target_frames]
    return out[0] if single else out


def samples_for_frames(frames: int, sr: int = SAMPLE_RATE) -> int:
    """The waveform length whose log-mel has exactly `frames` frames (no padding needed)."""
    return int(sr * 0.025) + (frames - 1) * int(sr * 0.010)


def resample(x: np.ndarray, sr_in: int, sr_out: int) -> np.ndarray:
    """Band-limited resampling by FFT (exact for content below both Nyquists). x: (n,)."""
    if sr_in == sr_out:
        return x
    n_out = int(round(len(x) * sr_out / sr_in))
    X = np.fft.rfft(x.astype(np.float64))
    keep = min(len(X), n_out // 2 + 1)
    Y = np.zeros(n_out // 2 + 1, dtype=np.complex128)
    Y[:keep] = X[:keep]
    return (np.fft.irfft(Y, n=n_out) * (n_out / len(x))).astype(np.float32)

# -----------------------------------------------------------------------------
# frames.bin: a clip's JPEGs back to back. Layout: int64 n, int64 offsets[n + 1], then the bytes.


def write_frames(path: str, jpegs: list) -> None:
    offsets = np.cumsum([0] + [len(j) for j in jpegs]).astype(np.int64)
    with open(path, "wb") as f:
        f.write(np.int64(len(jpegs)).tobytes())
        f.write(offsets.tobytes())
        for j in jpegs:
            f.write(bytes(j))


def frame_count(path: str) -> int:
    with open(path, "rb") as f:
        return int(np.frombuffer(f.read(8), dtype=np.int64)[0])


def read_frames(path: str, indices) -> list:
    """The JPEG bytes (uint8 tensors) of the given frame indices; raises ValueError on a damaged
    file."""
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError(f"{path}: truncated frame file")
        n = int(np.frombuffer(head, dtype=np.int64)[0])
        offsets = np.frombuffer(f.read(8 * (n + 1)), dtype=np.int64)
        if n <= 0 or len(offsets) != n + 1:
            raise ValueError(f"{path}: damaged frame table (n={n})")
        base, out, cache = 8 * (n + 2), [], {}
        for i in indices:
            if i not in cache:
                f.seek(base + int(offsets[i]))
                size = int(offsets[i + 1] - offsets[i])
                b = f.read(size)
                if len(b) != size:
                    raise ValueError(f"{path}: frame {i} is truncated")
                cache[i] = torch.frombuffer(bytearray(b), dtype=torch.uint8)
            out.append(cache[i])
    return out


def split_mjpeg(stream: bytes) -> list:
    """Split ffmpeg's image2pipe MJPEG output into JPEGs (0xFFD8 ... 0xFFD9; entropy-coded data
    stuffs every 0xFF with 0x00, so an EOI marker cannot appear inside a frame)."""
    out, start = [], 0
    while True:
        s = stream.find(b"\xff\xd8", start)
        if s < 0:
            return out
        e = stream.find(b"\xff\xd9", s + 2)
        if e < 0:
            return out
        out.append(np.frombuffer(stream[s:e + 2], dtype=np.uint8))
        start = e + 2

# -----------------------------------------------------------------------------
# manifests: each reader yields records and reports the lines it could not use


@dataclass
class Record:
    id: str            # the prepared clip's name
    src: tuple         # candidate video files, relative to --videos; the first that exists is used
    start: float | None  # the segment to cut from the source, seconds (None: the whole file)
    end: float | None
    labels: dict       # head -> list of label names (or class indices for EPIC)
    split: str


def _rows(path: str, skip_comments: bool = False):
    """(line number, fields) of a CSV, counting empty lines as problems rather than rows. UTF-8,
    with or without the byte-order mark spreadsheets write."""
    with open(path, newline="", encoding="utf-8-sig") as f:
        try:
            for i, row in enumerate(csv.reader(f, skipinitialspace=True), 1):
                if skip_comments and row and row[0].startswith("#"):
                    continue
                yield i, [c.strip() for c in row]
        except UnicodeDecodeError:
            raw = open(path, "rb").read().removeprefix(b"\xef\xbb\xbf")
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError as e:  # (the whole file, to name the line)
                line = raw[:e.start].count(b"\n") + 1
                raise ValueError(f"{path}:{line}: not UTF-8 text (byte {raw[e.start]:#04x}): save "
                                 "the file as UTF-8") from None


def read_vggsound(path: str, split: str | None = None):
    """VGGSound CSV rows `youtube_id,start_seconds,label,split`; files `{id}_{start:06d}.mp4`."""
    recs, bad = [], []
    for i, row in _rows(path):
        try:
            ytid, start, label, sp = row
            start = int(float(start))
        except ValueError:
            bad.append(f"{path}:{i}: expected youtube_id,start_seconds,label,split, got {row!r}")
            continue
        if split is None or sp == split:
            name = f"{ytid}_{start:06d}"
            recs.append(Record(name, (name + ".mp4", name + ".mkv", name + ".webm"), None, None,
                               {"label": [label]}, sp))
    return recs, bad


def read_audioset(path: str, labels_csv: str, split: str = "train", full_videos: bool = False):
    """AudioSet segment CSV (`YTID, start_seconds, end_seconds, "mid1,mid2"`, comment lines on top),
    labels from class_labels_indices.csv (index,mid,display_name). Sources are the downloaded 10 s
    segments, named `{YTID}.mp4`, `Y{YTID}.mp4`, `{YTID}_{start}.mp4` or
    `{YTID}_{start_ms}_{end_ms}.mp4`; with full_videos the segment is cut from the whole video
    `{YTID}.mp4`."""
    mids = {}
    for i, row in _rows(labels_csv):
        if i == 1 and row and row[0] == "index":
            continue
        if len(row) >= 2 and row[0].isdigit():
            mids[row[1]] = int(row[0])
    recs, bad = [], []
    for i, row in _rows(path, skip_comments=True):
        try:
            ytid, start, end = row[0], float(row[1]), float(row[2])
        except (ValueError, IndexError):
            bad.append(f"{path}:{i}: expected YTID, start_seconds, end_seconds, positive_labels, "
                       f"got {row!r}")
            continue
        labs = [m for m in ",".join(row[3:]).strip('"').split(",") if m]
        unknown = [m for m in labs if m not in mids]
        if unknown or not labs:
            bad.append(f"{path}:{i}: "
                       f"{'unknown label ids ' + str(unknown) if unknown else 'no labels'}")
            continue
        ms = f"{int(start * 1000)}_{int(end * 1000)}"
        names = (f"{ytid}.mp4",) if full_videos else (f"{ytid}.mp4", f"Y{ytid}.mp4",
                                                      f"{ytid}_{int(start)}.mp4",
                                                      f"{ytid}_{int(start):06d}.mp4",
                                                      f"{ytid}_{ms}.mp4")
        recs.append(Record(f"{ytid}_{int(start * 1000)}", names, start if full_videos else None,
                           end if full_videos else None, {"label": labs}, split))
    return recs, bad, mids


def read_epic(path: str, split: str = "train"):
    """EPIC-Kitchens-100 (narration_id, participant_id, video_id, ..., start/stop_timestamp,
    verb_class, noun_class): one segment of the long video `{participant}/{video_id}.MP4` each."""
    recs, bad, head = [], [], None
    for i, row in _rows(path):
        if head is None:
            head = {k: j for j, k in enumerate(row)}
            need = {"narration_id", "participant_id", "video_id", "start_timestamp",
                    "stop_timestamp", "verb_class", "noun_class"}
            if not need <= set(head):
                raise ValueError(f"{path}: header lacks {sorted(need - set(head))}")
            continue
        try:
            g = lambda k: row[head[k]]  # noqa: E731
            vid = os.path.join(g("participant_id"), g("video_id"))
            names = (vid + ".MP4", vid + ".mp4",
                     os.path.join(g("participant_id"), "videos", g("video_id") + ".MP4"))
            rec = Record(g("narration_id"), names,
                         _seconds(g("start_timestamp")), _seconds(g("stop_timestamp")),
                         {"verb": [int(g("verb_class"))], "noun": [int(g("noun_class"))]}, split)
        except (ValueError, IndexError):
            bad.append(f"{path}:{i}: malformed row {row!r}")
            continue
        recs.append(rec)
    return recs, bad


VIDEO_FILES = (".mp4", ".m4v", ".mkv", ".webm", ".avi", ".mov", ".mpg", ".mpeg", ".flv", ".wmv",
               ".3gp", ".ts")


def clip_id(path: str) -> str:  # a/b/c.mp4 -> a__b__c
    return os.path.splitext(path.replace(os.sep, "/").replace("/", "__"))[0]


def read_folder(videos: str) -> list:
    """Every video file under `videos` (by its extension, in sorted order), as unlabelled
    training records: `prepare --videos DIR` without a manifest."""
    recs = []
    for top, dirs, files in os.walk(videos):
        dirs.sort()
        for name in sorted(files):
            if name.lower().endswith(VIDEO_FILES) and not name.startswith("."):
                rel = os.path.relpath(os.path.join(top, name), videos)
                recs.append(Record(clip_id(rel), (rel,), None, None, {}, "train"))
    return recs


def _seconds(ts: str) -> float:  # "00:01:02.35" -> 62.35
    h, m, s = ts.split(":")
    return int(h) * 3600 + int(m) * 60 + float(s)


def read_generic(path: str, split: str | None = None):
    """A plain CSV with a header: `path` and optionally `label` (';'-separated for multi-label;
    without the column: an unlabelled set, which pretraining reads), `split`, `start`, `end`."""
    recs, bad, head = [], [], None
    for i, row in _rows(path):
        if head is None:
            head = {k: j for j, k in enumerate(row)}
            if "path" not in head:
                raise ValueError(f"{path}: a generic manifest needs a header with path "
                                 "(and label, split, start, end where it has them)")
            continue
        try:
            def g(k, d=None):  # a column's value, or d where it is missing or empty
                return row[head[k]] if k in head and row[head[k]] != "" else d
            p, lab = g("path"), g("label")
            if not p or (lab is None and "label" in head):
                raise ValueError
            start, end = (float(x) if x else None for x in (g("start"), g("end")))
            rec = Record(clip_id(p), (p,), start, end,
                         {"label": lab.split(";")} if "label" in head else {},
                         g("split", "train"))
        except (ValueError, IndexError):
            bad.append(f"{path}:{i}: malformed row {row!r}")
            continue
        t0, t1 = start or 0.0, end if end is not None else math.inf
        if not 0 <= t0 < t1:  # (NaN: False)
            bad.append(f"{path}:{i}: start {t0:g} s, end {t1:g} s: a clip runs from a start of 0 "
                       "or more to an end after it (seconds)")
            continue
        if split is None or rec.split == split:
            recs.append(rec)
    return recs, bad

# -----------------------------------------------------------------------------
# prepare: ffmpeg -> 16 kHz mono FLAC + JPEG frames, parallel, resumable, with a failure report


def _ffmpeg(args: list, timeout: float = 600) -> bytes:
    """ffmpeg's output. It runs in a session of its own: ffmpeg stops on SIGINT and SIGHUP whatever
    it inherits, so the terminal's Ctrl-C (or hang-up) would end the clips in flight; from here it
    reaches the main process only, which lets them finish."""
    p = subprocess.run(["ffmpeg", "-nostdin", "-hide_banner", "-loglevel", "error"] + args,
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=timeout,
                       start_new_session=True)
    if p.returncode != 0:
        raise RuntimeError(p.stderr.decode(errors="replace").strip().splitlines()[-1:] or "ffmpeg "
                                                                                          "failed")
    return p.stdout


def prepare_clip(src: str, dst: str, start: float | None, end: float | None, short_side: int = 256,
                 fps: float = FPS, quality: int = 3, allow_silent: bool = False) -> dict:
    """Extract one clip into dst/ (written to a temporary folder, then renamed: a clip folder that
    exists is complete). Returns its manifest fields; raises with the reason on failure. A video
    without an audio stream is refused (audiovisual pretraining needs both) unless allow_silent,
    which keeps it with silent audio of the video's length (for video-only use)."""
    if not os.path.exists(src):
        raise FileNotFoundError(f"missing video {src}")
    tmp = dst + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    cut = (["-ss", f"{start:.3f}"] if start else []) + ["-i", src] + (
        ["-t", f"{end - (start or 0):.3f}"] if end else [])
    scale = f"scale='if(lt(iw,ih),{short_side},-2)':'if(lt(iw,ih),-2,{short_side})'"
    try:
        jpegs = split_mjpeg(_ffmpeg(cut + ["-an", "-vf", f"fps={fps},{scale}", "-f", "image2pipe",
                                           "-c:v", "mjpeg", "-q:v", str(quality), "-"]))
    except RuntimeError as e:  # ffmpeg: "Output file ... does not contain any stream"
        if "does not contain any stream" in str(e):
            raise ValueError(f"{src}: no video stream (an audio-only file?)") from None
        raise
    if not jpegs:
        raise ValueError(f"{src}: no video frames" + (f" from {start:g} s on (past its end?)"
                                                      if start else ""))
    try:
        pcm = _ffmpeg(cut + ["-vn", "-ac", "1", "-ar", str(SAMPLE_RATE), "-f", "s16le", "-"])
    except RuntimeError as e:  # ffmpeg: "Output file ... does not contain any stream"
        if "stream" not in str(e):
            raise
        pcm = None
    audio = np.frombuffer(pcm or b"", dtype=np.int16)
    if len(audio) < SAMPLE_RATE // 10:
        if not allow_silent:
            what = ("no audio stream" if pcm is None
                    else f"no usable audio track ({len(audio)} samples)")
            raise ValueError(f"{src}: {what}; --allow_silent keeps such clips with silent audio "
                             "(video-only use)")
        audio = np.zeros(int(round(len(jpegs) / fps * SAMPLE_RATE)), np.int16)
    flac = io.BytesIO()  # (written by Python: a full disk is an OSError with its errno)
    sf.write(flac, audio, SAMPLE_RATE, format="FLAC", subtype="PCM_16")
    with open(os.path.join(tmp, "audio.flac"), "wb") as f:
        f.write(flac.getvalue())
    write_frames(os.path.join(tmp, "frames.bin"), jpegs)
    shutil.rmtree(dst, ignore_errors=True)
    os.rename(tmp, dst)
    return dict(duration=round(len(audio) / SAMPLE_RATE, 3), frames=len(jpegs))


def _prepare_one(args):
    rec, videos, out, short_side, allow_silent = args
    dst = os.path.join(out, "clips", rec.id)
    try:
        if os.path.isdir(dst):  # resumable: a finished clip is a renamed folder
            info = dict(duration=round(sf.info(os.path.join(dst, "audio.flac")).duration, 3),
                        frames=frame_count(os.path.join(dst, "frames.bin")))
        else:
            found = [os.path.join(videos, c) for c in rec.src if os.path.exists(os.path.join(videos,
                                                                                             c))]
            if not found:
                raise FileNotFoundError(f"no video for {rec.id} in {videos} (looked for "
                                        f"{', '.join(rec.src)})")
            info = prepare_clip(found[0], dst, rec.start, rec.end, short_side,
                                allow_silent=allow_silent)
        return rec, info, None
    except OSError as e:
        if e.errno in OUT_OF_ROOM:  # (the output's disk, not this clip: the others would fail too)
            shutil.rmtree(dst + ".tmp", ignore_errors=True)
            return rec, None, e
        return rec, None, f"{type(e).__name__}: {e}"
    except Exception as e:  # reported in failed.csv; the run goes on
        return rec, None, f"{type(e).__name__}: {e}"


OUT_OF_ROOM = (errno.ENOSPC, errno.EDQUOT, errno.EROFS)  # stop prepare: no clip can be written


def split_names(folder: str) -> list:
    """The splits of a prepared set: its CSVs with an id column (not failed_*.csv, nor a user's
    manifest kept beside them)."""
    names = []
    for f in sorted(os.listdir(folder)):
        if f.endswith(".csv") and not f.startswith("failed_"):
            with open(os.path.join(folder, f)) as fh:
                if fh.read(3) == "id,":
                    names.append(f[:-4])
    return names


def _unique(records: list, out: str, failed: list) -> list:
    """Each clip id once: a row whose id is taken (listed twice, in another split, also one
    prepared earlier into `out`, or another file that makes the same id) goes to failed_*.csv
    instead of being prepared twice at once."""
    splits, taken, keep = {r.split for r in records}, {}, []
    for split in set(split_names(out)) - splits:
        with open(os.path.join(out, f"{split}.csv")) as f:
            taken.update({row["id"]: (split, None) for row in csv.DictReader(f)})
    for r in records:
        if r.id not in taken:
            taken[r.id] = (r.split, r.src[0])
            keep.append(r)
            continue
        split, src = taken[r.id]
        if split != r.split:
            why = (f"already in the {split} split" + (f" (from {src})" if src else "") + ": one "
                   "clip in two splits puts test clips into training")
        elif src != r.src[0]:
            why = f"{r.src[0]} and {src} make the same clip id: rename one"
        else:
            why = "listed twice in the manifest: prepared once"
        failed.append((r.id, r.src[0], f"duplicate: {why}"))
    return keep


class Pool(ProcessPoolExecutor):
    """A process pool whose workers (and the ffmpeg they run) leave Ctrl-C and a closed terminal's
    SIGHUP to the main process: there, the jobs not started are cancelled and those in flight
    finish (a clip is written whole or not at all), then the KeyboardInterrupt goes on. (A plain
    pool would run every job left.)"""

    def __init__(self, workers: int):
        super().__init__(max(1, workers), initializer=_leave_stops_to_the_main_process)

    def __exit__(self, kind, *exc):
        self.shutdown(wait=True, cancel_futures=kind is not None)
        return False


def _leave_stops_to_the_main_process():
    for sig in (signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)


def prepare(records: list, videos: str, out: str, heads: dict, multi_label: bool, source: str,
            workers: int = os.cpu_count() or 1, short_side: int = 256, problems: list = (),
            allow_silent: bool = False) -> dict:
    """Prepare every record; writes {split}.csv, meta.json (with the training split's log-mel
    statistics, for audio_norm='dataset') and failed_{split}.csv. Re-running skips finished clips;
    preparing another split into the same folder needs the same vocabulary."""
    from tqdm import tqdm
    os.makedirs(os.path.join(out, "clips"), exist_ok=True)
    meta_path = os.path.join(out, "meta.json")
    old = {}
    if os.path.exists(meta_path):
        old = read_meta(out)
        if old["heads"] != json.loads(json.dumps(heads)) or old.get("short_side") != short_side:
            raise ValueError(f"{meta_path} holds another vocabulary or frame size: prepare into a "
                             "new folder")
    index = {h: {name: i for i, name in enumerate(names)} for h, names in heads.items()}
    rows, failed = {}, [("manifest", "", p) for p in problems]
    kept = _unique(records, out, failed)
    with Pool(workers) as ex:
        jobs = [ex.submit(_prepare_one, (r, videos, out, short_side,
                                         allow_silent)) for r in kept]
        for job in tqdm(as_completed(jobs), total=len(jobs), desc="prepare", unit="clip"):
            rec, info, err = job.result()
            if isinstance(err, OSError):  # (the clips not started are cancelled)
                raise SystemExit(
                    f"{out}: {err.strerror} ({errno.errorcode[err.errno]}) while writing {rec.id}; "
                    f"the {sum(map(len, rows.values()))} clips finished are kept: make room and "
                    "run the same command, which goes on from there")
            if err:
                failed.append((rec.id, rec.src[0], err))
                continue
            labs = {h: ";".join(str(index[h][x]) for x in rec.labels[h]) for h in heads}
            rows.setdefault(rec.split, []).append(dict(id=rec.id, **info, **labs))
    for split, rs in rows.items():
        with open(os.path.join(out, f"{split}.csv"), "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=["id", "duration", "frames", *heads])
            w.writeheader()
            w.writerows(sorted(rs, key=lambda r: r["id"]))
    splits = sorted({r.split for r in records})
    with open(os.path.join(out, f"failed_{'_'.join(splits)}.csv"), "w", newline="") as f:
        csv.writer(f).writerows([("id", "source", "reason"), *failed])
    meta = dict(sample_rate=SAMPLE_RATE, fps=FPS, short_side=short_side, heads=heads,
                multi_label=multi_label, source=source,
                **{k: old[k] for k in ("audio_mean", "audio_std") if k in old})
    with open(os.path.join(out, "meta.json"), "w") as f:
        json.dump(meta, f, indent=1)
    if "train" in rows and "audio_mean" not in meta:
        mean, std = audio_stats(out, "train")
        print(f"log-mel statistics of the training split: mean {mean:.3f}, std {std:.3f} (for "
              "--audio_norm dataset)")
    counts = dict(prepared=sum(len(r) for r in rows.values()), failed=len(failed))
    print(f"prepared {counts['prepared']} clips into {out}; " + (
        f"{counts['failed']} failed (why: {out}/failed_{'_'.join(splits)}.csv)"
        if failed else "none failed"))
    return counts


def _vocab(records, head):
    return sorted({x for r in records for x in r.labels[head]}, key=str)

# -----------------------------------------------------------------------------
# the built-in data set: short audiovisual events inside 4 s clips. An object appears for 1.2-1.8 s,
# bounces off the walls, and every bounce (and its arrival) makes its sound; before and after, the
# picture is an empty background and the sound is room noise. Deterministic (one seed per clip),
# generated in seconds.

# timbres: (fundamental Hz, harmonic amplitudes)
BUILTIN_SOUNDS = {
    "bell": (880.0, (1.0, 0.0, 0.6, 0.0, 0.3)), "drum": (110.0, (1.0, 0.7, 0.5, 0.4, 0.3)),
    "chime": (1320.0, (1.0, 0.2)), "wood": (330.0, (1.0, 0.5, 0.25)),
    "glass": (1760.0, (1.0, 0.0, 0.0, 0.4)), "gong": (165.0, (1.0, 0.9, 0.8, 0.7, 0.6, 0.5)),
    "pluck": (440.0, (1.0, 0.5, 0.33, 0.25)),
    "buzz": (220.0, (1.0, 0.0, 0.33, 0.0, 0.2, 0.0, 0.14)),
}
# each shape's hue (degrees) +-12: a tiny model sees the shape's kind in a 64-pixel frame
BUILTIN_HUES = dict(circle=0, square=220, triangle=120, diamond=50, ring=280, cross=170)
# (class name, its (sound, shape) pairs, one drawn per clip). The last two classes are an XOR pair:
# each has both sounds and both shapes, in opposite pairings, so audio alone and video alone are at
# chance between them and only the two together tell them apart (audio-only tops out at 7/8,
# video-only at 3/4 of the set)
BUILTIN_KINDS = [
    ("bell", (("bell", "circle"),)), ("drum", (("drum", "square"),)),
    ("chime", (("chime", "triangle"),)), ("wood", (("wood", "diamond"),)),
    ("glass", (("glass", "ring"),)), ("gong", (("gong", "cross"),)),
    ("pluck-circle|buzz-square", (("pluck", "circle"), ("buzz", "square"))),
    ("pluck-square|buzz-circle", (("pluck", "square"), ("buzz", "circle"))),
]
BUILTIN = dict(n_train=320, n_test=80, seconds=4.0, size=64, seed=0)
BUILTIN_VERSION = 2  # 1: the object and its sound all through the clip, no XOR pair


def _shape_mask(shape, yy, xx, cy, cx, r):
    dy, dx = yy - cy, xx - cx
    return {
        "circle": dy ** 2 + dx ** 2 <= r ** 2,
        "square": (np.abs(dy) <= r * 0.85) & (np.abs(dx) <= r * 0.85),
        "triangle": (dy <= r * 0.8) & (dy >= -r) & (np.abs(dx) <= (dy + r) * 0.6),
        "diamond": np.abs(dy) + np.abs(dx) <= r,
        "ring": (dy ** 2 + dx ** 2 <= r ** 2) & (dy ** 2 + dx ** 2 >= (0.55 * r) ** 2),
        "cross": (((np.abs(dy) <= r * 0.3) | (np.abs(dx) <= r * 0.3))
                  & (np.abs(dy) <= r) & (np.abs(dx) <= r)),
    }[shape]


def _hue_rgb(hue: float, sat: float, val: float) -> np.ndarray:
    k = (np.array([5.0, 3.0, 1.0]) + hue / 60.0) % 6
    return 255 * val * (1 - sat * np.clip(np.minimum(k, 4 - k), 0, 1))


def make_builtin_clip(seed: int, seconds: float, size: int):
    """(label, waveform (n,) float32, frames uint8 (T, size, size, 3), event) where event =
    dict(sound, shape, on, off (s: the object is in the picture from on to off), times (s: each
    sound's start))."""
    rng = np.random.default_rng(seed)
    kind = int(rng.integers(len(BUILTIN_KINDS)))
    pairs = BUILTIN_KINDS[kind][1]
    sound, shape = pairs[int(rng.integers(len(pairs)))]
    f0, harm = BUILTIN_SOUNDS[sound]
    color = _hue_rgb(BUILTIN_HUES[shape] + rng.uniform(-12, 12), rng.uniform(0.6, 1.0),
                     rng.uniform(0.7, 1.0))
    r = rng.uniform(0.14, 0.22) * size                  # radius: bigger objects sound lower
    pitch = f0 * (0.18 * size / r) ** 0.5
    p0, vel = rng.uniform(r, size - r, 2), rng.uniform(0.8, 1.4, 2) * size * rng.choice([-1, 1], 2)
    bg = rng.uniform(0, 60, 3)
    dur = rng.uniform(1.2, 1.8)
    on = rng.uniform(0.2, seconds - dur - 0.2)
    n_frames, span = int(round(seconds * FPS)), size - 2 * r

    def position(t):  # elastic bounces between the walls: unfold, then fold back
        u = np.mod(p0 - r + vel * np.asarray(t, dtype=np.float64)[..., None], 2 * span)
        return r + np.where(u <= span, u, 2 * span - u)

    times = [on]  # its arrival, then a bounce whenever the unfolded coordinate crosses a multiple
    for d in range(2):  # of the free span
        u0 = p0[d] - r
        ks = np.arange(np.floor(min(u0, u0 + vel[d] * dur) / span) + 1,
                       np.ceil(max(u0, u0 + vel[d] * dur) / span))
        times += [on + t for t in (ks * span - u0) / vel[d] if 0.05 < t < dur]
    times.sort()
    yy, xx = np.mgrid[0:size, 0:size] + 0.5
    frames = np.empty((n_frames, size, size, 3), dtype=np.uint8)
    for j in range(n_frames):
        img = np.broadcast_to(bg, (size, size, 3)).copy()
        t = j / FPS
        if on <= t < on + dur:
            cy, cx = position(t - on)
            img[_shape_mask(shape, yy, xx, cy, cx, r)] = color
        frames[j] = np.clip(img + rng.normal(0, 4, img.shape), 0, 255)
    n = int(seconds * SAMPLE_RATE)
    t = np.arange(int(0.4 * SAMPLE_RATE)) / SAMPLE_RATE
    tone = sum(a * np.sin(2 * np.pi * pitch * (k + 1) * t) for k, a in enumerate(harm))
    tone = tone * np.exp(-t * 12)
    tone /= np.abs(tone).max()
    # room noise of random loudness, never digital silence
    wave = rng.normal(0, rng.uniform(0.003, 0.03), n)
    for tb in times:
        s = int(tb * SAMPLE_RATE)
        seg = tone[: n - s] * rng.uniform(0.3, 0.6)
        wave[s:s + len(seg)] += seg
    event = dict(sound=sound, shape=shape, on=on, off=on + dur, times=times)
    return kind, np.clip(wave, -1, 1).astype(np.float32), frames, event


def read_meta(root: str) -> dict:
    """A prepared set's meta.json, or ValueError naming the file and what is wrong with it (a file
    cut short or edited by hand: a line, not a traceback from the json module)."""
    path = os.path.join(root, "meta.json")
    with open(path, "rb") as f:
        raw = f.read()
    try:
        meta = json.loads(raw.decode("utf-8"))
    except ValueError as e:  # (JSONDecodeError, UnicodeDecodeError)
        why = f"{e.msg}, line {e.lineno}" if isinstance(e, json.JSONDecodeError) else "not UTF-8"
        raise ValueError(f"{path}: not readable as JSON ({why}): mend it, or prepare the set "
                         "again") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("heads"), dict):
        raise ValueError(f"{path}: no \"heads\" (the label vocabulary that data.py prepare "
                         "writes): mend it, or prepare the set again")
    return meta


def builtin_outdated(root: str) -> bool:
    """Whether root holds a built-in set made by an earlier version of its generator."""
    try:
        meta = read_meta(root)
    except (OSError, ValueError):  # being made by another rank
        return False
    return meta.get("source") == "builtin" and meta.get("generator", {}).get(
        "version", 1) != BUILTIN_VERSION


def make_builtin(out: str, n_train: int = BUILTIN["n_train"], n_test: int = BUILTIN["n_test"],
                 seconds: float = BUILTIN["seconds"], size: int = BUILTIN["size"],
                 seed: int = BUILTIN["seed"], flag: str = "--out") -> str:
    """Generate the built-in set in the prepared-set format (idempotent: returns at once if
    done; a set made by an earlier version of the generator is made again). flag: the option
    that named `out`, for the line that says it cannot be made."""
    from torchvision.io import encode_jpeg
    if n_train < 1 or n_test < 0 or size < 32 or seconds < 2.5:
        raise ValueError(f"builtin: n_train={n_train}, n_test={n_test}, size={size}, "
                         f"seconds={seconds}: needs n_train >= 1, n_test >= 0, size >= 32 and "
                         f"seconds >= 2.5 (an event lasts up to 1.8 s, with 0.2 s either side)")
    if os.path.exists(os.path.join(out, "meta.json")):
        if not builtin_outdated(out):
            return out
        print(f"{out}: made by an earlier version of the built-in generator; making version "
              f"{BUILTIN_VERSION}")
    make_folder(out, flag)  # (its parent holds the temporary folder, renamed to it at the end)
    t0 = time.time()
    tmp = out.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    rows = {"train": [], "test": []}
    for i in range(n_train + n_test):
        split = "train" if i < n_train else "test"
        kind, wave, frames, _ = make_builtin_clip(seed * 1_000_003 + i, seconds, size)
        cid = f"{split}_{i:05d}"
        d = os.path.join(tmp, "clips", cid)
        os.makedirs(d)
        sf.write(os.path.join(d, "audio.flac"), wave, SAMPLE_RATE, subtype="PCM_16")
        jp = [encode_jpeg(torch.from_numpy(f).permute(2, 0, 1).contiguous(),
                          quality=90).numpy() for f in frames]
        write_frames(os.path.join(d, "frames.bin"), jp)
        rows[split].append(dict(id=cid, duration=seconds, frames=len(frames), label=kind))
    for split, rs in rows.items():
        with open(os.path.join(tmp, f"{split}.csv"), "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=["id", "duration", "frames", "label"])
            w.writeheader()
            w.writerows(rs)
    with open(os.path.join(tmp, "meta.json"), "w") as f:
        gen = dict(n_train=n_train, n_test=n_test, seconds=seconds, size=size, seed=seed,
                   version=BUILTIN_VERSION)
        json.dump(dict(sample_rate=SAMPLE_RATE, fps=FPS, short_side=size, multi_label=False,
                       source="builtin", heads={"label": [k[0] for k in BUILTIN_KINDS]},
                       generator=gen), f, indent=1)
    audio_stats(tmp, max_clips=64)
    shutil.rmtree(out, ignore_errors=True)
    os.rename(tmp, out)
    print(f"built-in data set: {n_train + n_test} clips in {out} ({time.time() - t0:.1f} s)")
    return out

# -----------------------------------------------------------------------------
# the check set: what a user's own data looks like. Each class is a short audiovisual event inside a
# longer clip: a spoken word (espeak-ng) over noise, while an object (a warm circle or a cool
# square) crosses the picture for 1.5 s. The label is the pair (word, shape), so audio alone can
# tell the word only and video alone the shape only: audio-only tops out at 1/2, video-only at 1/3,
# both at 1.
# Written as ordinary H.264/AAC mp4 files and a generic manifest, so that `prepare` is exercised.

CHECK_WORDS = ("one", "four", "seven")
CHECK_SHAPES = ("circle", "square")
# each shape's colour range (RGB): warm circles, cool squares, so that a small model can see the
# object's kind in a 64-pixel frame (a tiny ViT does not learn the shape alone within a CPU budget)
CHECK_COLOURS = {"circle": ((170, 255), (40, 140), (0, 60)),
                 "square": ((0, 60), (90, 190), (170, 255)),
                 "triangle": ((0, 80), (170, 255), (0, 80)),
                 "diamond": ((170, 255), (0, 60), (170, 255)),
                 "ring": ((200, 255), (200, 255), (0, 60)),
                 "cross": ((200, 255), (200, 255), (200, 255))}
GLYPH_COLOURS = ((200, 255), (200, 255), (40, 120))  # (every digit alike: only the form differs)
CHECK_VOICES = ("en-us", "en-gb", "en-gb-scotland", "en-gb-x-rp", "en-gb-x-gbclan")
CHECKSET = dict(n_train=240, n_test=120, seconds=4.0, size=128, seed=0)
# What makes one check set differ from another (data.py checkset --classes 10 --objects glyphs ...).
# classes: how many; carrier: what tells them apart: pair (a word x an object: neither modality
# alone suffices), both (word k with object k: either does), audio (the word; the object random) or
# video (the object; the word random); objects: shapes (coloured by kind) or glyphs (the digits
# 0-9 in one colour range: only their form differs); object_size: its height as a share of the
# frame (0: the shapes' own, about half of it); words: the spoken vocabulary; onset_spread: the
# share of the clip the word's onset may range over (1: all of it); snr_db: the noise's level below
# the speech, a range; degraded: the share of clips with one modality, at random, gone (the word
# or the object left out) or degraded (buried in noise).
CHECK_FAMILY = dict(classes=6, carrier="pair", objects="shapes", object_size=0.0,
                    words="one,four,seven", onset_spread=1.0, snr_db="0,15", degraded=0.0)
CHECK_MORE_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine",
                    "red", "green", "blue", "left", "right", "up", "down", "yes", "no", "stop")
CHECK_OBJECTS = {"shapes": ("circle", "square", "triangle", "diamond", "ring", "cross"),
                 "glyphs": tuple("0123456789")}
# the named configurations docs/sanity.md describes (data.py checkset --config NAME)
CHECK_CONFIGS = {
    "default": {},
    "glyphs10": dict(classes=10, carrier="both", objects="glyphs", object_size=0.15,
                     words=",".join(CHECK_MORE_WORDS[:10]), degraded=1.0),
    "audio10": dict(classes=10, carrier="audio", words=",".join(CHECK_MORE_WORDS[:10]),
                    onset_spread=1.0, snr_db="-5,10"),
    "video6": dict(classes=6, carrier="video", objects="shapes", object_size=0.2),
    "pair8_noisy": dict(classes=8, carrier="pair", words="one,four,seven,nine",
                        snr_db="-5,5", onset_spread=0.5, degraded=0.3),
}
# a 7-segment digit: which of the segments a (top), b, c (right, top to bottom), d (bottom), e, f
# (left, bottom to top), g (middle) it lights
SEGMENTS = dict(zip("0123456789", ("abcdef", "bc", "abdeg", "abcdg", "bcfg", "acdfg", "acdefg",
                                   "abc", "abcdefg", "abcdfg")))


def check_family(**knobs) -> dict:
    """CHECK_FAMILY with `knobs`, checked: (the knobs, its words, its objects, each class's (word,
    object) pair: None where that modality does not carry it)."""
    k = {**CHECK_FAMILY, **knobs}
    words = tuple(w for w in str(k["words"]).split(",") if w)
    objects = CHECK_OBJECTS.get(k["objects"])
    n, carrier = int(k["classes"]), k["carrier"]
    if objects is None or carrier not in ("pair", "both", "audio", "video"):
        raise ValueError(f"checkset: objects {k['objects']!r} (shapes | glyphs) or carrier "
                         f"{carrier!r} (pair | both | audio | video) is not one of those")
    lo, hi = (float(x) for x in str(k["snr_db"]).split(","))
    per_word = math.ceil(n / max(1, len(words)))  # (pair: objects per word)
    need = dict(pair=(math.ceil(n / per_word), per_word), both=(n, n), audio=(n, 1),
                video=(1, n))[carrier]
    if n < 2 or len(words) < need[0] or len(objects) < need[1] or not lo <= hi or not (
            0 <= k["degraded"] <= 1 and 0 <= k["onset_spread"] <= 1 and
            0 <= k["object_size"] < 0.6):
        raise ValueError(f"checkset: {n} classes carried by {carrier} need {need[0]} words and "
                         f"{need[1]} objects (given {len(words)}: {','.join(words)}, and "
                         f"{len(objects)} {k['objects']}); snr_db lo,hi; degraded and "
                         "onset_spread in 0..1; object_size below 0.6")
    n_obj = need[1]
    pairs = [(w if carrier != "video" else None, o if carrier != "audio" else None)
             for w, o in ((words[c // n_obj] if carrier == "pair" else words[c % len(words)],
                           objects[c % n_obj] if carrier == "pair" else objects[c % len(objects)])
                          for c in range(n))]
    return dict(knobs=k, words=words, objects=objects, pairs=pairs, snr=(lo, hi))


def check_label(fam: dict, label: int) -> str:
    w, o = fam["pairs"][label]
    return "_".join(x for x in (w, o and (f"digit{o}" if o.isdigit() else o)) if x)


def _glyph_mask(digit, yy, xx, cy, cx, h):
    """A 7-segment digit of height h (width h / 2, strokes h / 8) centred at (cy, cx)."""
    w, t = h / 2, h / 8
    dy, dx = yy - cy, xx - cx
    horiz = lambda y0: (np.abs(dy - y0) <= t / 2) & (np.abs(dx) <= w / 2)  # noqa: E731
    vert = lambda x0, top: ((np.abs(dx - x0) <= t / 2) & (dy >= (-h / 2 if top else 0))  # noqa
                            & (dy <= (0 if top else h / 2)))
    seg = dict(a=horiz(-h / 2), g=horiz(0), d=horiz(h / 2), b=vert(w / 2, True),
               c=vert(w / 2, False), f=vert(-w / 2, True), e=vert(-w / 2, False))
    out = np.zeros(yy.shape, bool)
    for s in SEGMENTS[digit]:
        out |= seg[s]
    return out


def _speak(word: str, voice: str, speed: int, pitch: int) -> np.ndarray:
    """espeak-ng's rendering of `word`, at 16 kHz."""
    import io
    p = subprocess.run(["espeak-ng", "--stdout", "-v", voice, "-s", str(speed), "-p", str(pitch),
                        word], capture_output=True, timeout=60)
    if p.returncode:
        raise RuntimeError(f"espeak-ng failed: {p.stderr.decode(errors='replace').strip()}")
    x, sr = sf.read(io.BytesIO(p.stdout), dtype="float32")
    n = int(len(x) * SAMPLE_RATE / sr)
    return np.interp(np.arange(n) * sr / SAMPLE_RATE, np.arange(len(x)), x).astype(np.float32)


def make_check_clip(seed: int, seconds: float, size: int, fam: dict | None = None):
    """(label, waveform (n,) float32 at 16 kHz, frames uint8 (T, size, size, 3) at 25 fps,
    the word's onset in s, what was degraded: '' or audio|video _gone|_noisy). fam:
    check_family's (default: the default set)."""
    fam = fam or check_family()
    k, rng = fam["knobs"], np.random.default_rng(seed)
    label = int(rng.integers(len(fam["pairs"])))
    word, shape = fam["pairs"][label]
    if word is None:  # (video carries the label: a word at random)
        word = fam["words"][int(rng.integers(len(fam["words"])))]
    if shape is None:  # (audio carries it: an object at random)
        shape = fam["objects"][int(rng.integers(len(fam["objects"])))]
    speech = _speak(word, CHECK_VOICES[int(rng.integers(len(CHECK_VOICES)))],
                    int(rng.integers(130, 211)), int(rng.integers(25, 76)))
    speech = speech / (np.abs(speech).max() + 1e-6) * rng.uniform(0.3, 0.7)
    onset = rng.uniform(0.4, seconds - 1.2)
    if k["onset_spread"] != 1:
        onset = 0.4 + (onset - 0.4) * k["onset_spread"]
    # one modality gone or buried in noise (a draw only where the family asks for it)
    hit = ""
    if k["degraded"] and rng.uniform() < k["degraded"]:
        hit = ("audio", "video")[int(rng.integers(2))] + ("_gone", "_noisy")[int(rng.integers(2))]
    n = int(seconds * SAMPLE_RATE)
    # brown-ish noise at 0-15 dB below the speech, never digital silence
    noise = np.cumsum(rng.normal(0, 1, n))
    noise = noise - np.convolve(noise, np.ones(400) / 400, mode="same")
    rms = np.sqrt(np.mean(speech ** 2))
    lo, hi = fam["snr"]
    wave = noise / noise.std() * rms * 10 ** (-rng.uniform(lo, hi) / 20)
    if hit == "audio_noisy":
        wave *= 10 ** (20 / 20)  # (the noise 20 dB louder)
    s = int(onset * SAMPLE_RATE)
    if hit != "audio_gone":
        wave[s:s + len(speech)] += speech[: n - s]
    # the picture: a smooth random background, a grey distractor always moving, and the labelled
    # shape crossing the frame from 0.3 s before the word to 1.2 s after it
    n_frames = int(round(seconds * VIDEO_FPS))
    yy, xx = np.mgrid[0:size, 0:size] + 0.5
    bg = (rng.uniform(20, 90, 3)[None, None] + rng.uniform(-30, 30, 3)[None, None]
          * (yy / size)[..., None])
    d0, dv, dr = rng.uniform(0.2, 0.8, 2) * size, rng.uniform(-0.3, 0.3, 2) * size, 0.08 * size
    r = rng.uniform(0.2, 0.28) * size
    if k["object_size"]:  # (the same draw, scaled: height object_size of the frame on average)
        r *= k["object_size"] / 2 / 0.24
    glyph = shape.isdigit()
    colours = GLYPH_COLOURS if glyph else CHECK_COLOURS[shape]
    color = np.array([rng.uniform(lo, hi) for lo, hi in colours])
    p0 = rng.uniform(r, size - r, 2)
    v = rng.uniform(-0.35, 0.35, 2) * size
    frames = np.empty((n_frames, size, size, 3), dtype=np.uint8)
    for j in range(n_frames):
        t = j / VIDEO_FPS
        img = bg.copy()
        dy, dx = d0 + dv * t
        img[(yy - dy) ** 2 / 4 + (xx - dx) ** 2 <= dr ** 2] = 128
        if onset - 0.3 <= t <= onset + 1.2 and hit != "video_gone":
            cy, cx = np.clip(p0 + v * (t - onset), r, size - r)
            mask = (_glyph_mask(shape, yy, xx, cy, cx, 2 * r) if glyph else
                    _shape_mask(shape, yy, xx, cy, cx, r))
            img[mask] = color if hit != "video_noisy" else 0.15 * color + 0.85 * img[mask]
        frames[j] = np.clip(img + rng.normal(0, 6 if hit != "video_noisy" else 40, img.shape),
                            0, 255)
    return label, np.clip(wave, -1, 1).astype(np.float32), frames, onset, hit


def _write_mp4(path: str, wave: np.ndarray, frames: np.ndarray):
    """H.264 (yuv420p) + AAC, as a camera or a download would have it (one thread: the same bytes
    every time)."""
    wav = path + ".wav"
    sf.write(wav, wave, SAMPLE_RATE, subtype="PCM_16")
    T, H, W, _ = frames.shape
    try:
        p = subprocess.run(["ffmpeg", "-v", "error", "-y", "-f", "rawvideo", "-pix_fmt", "rgb24",
                            "-s", f"{W}x{H}", "-r", str(VIDEO_FPS), "-i", "-", "-i", wav,
                            "-c:v", "libx264", "-preset", "veryfast", "-crf", "20",
                            "-pix_fmt", "yuv420p", "-threads", "1", "-c:a", "aac", "-b:a", "96k",
                            "-shortest", path], input=frames.tobytes(), capture_output=True,
                           timeout=600)
    finally:
        os.remove(wav)
    if p.returncode:
        raise RuntimeError(f"ffmpeg could not write {path}: {p.stderr.decode(errors='replace')}")


def _check_item(args):
    i, split, seed, seconds, size, out, knobs = args
    fam = check_family(**knobs)
    label, wave, frames, onset, hit = make_check_clip(seed * 1_000_003 + i, seconds, size, fam)
    name = f"{split}_{i:05d}.mp4"
    _write_mp4(os.path.join(out, name), wave, frames)
    return dict(path=name, label=check_label(fam, label), split=split, onset=f"{onset:.3f}",
                degraded=hit)


def make_checkset(out: str, n_train: int = CHECKSET["n_train"], n_test: int = CHECKSET["n_test"],
                  seconds: float = CHECKSET["seconds"], size: int = CHECKSET["size"],
                  seed: int = CHECKSET["seed"], workers: int = os.cpu_count() or 1,
                  **knobs) -> str:
    """The check set (CHECK_FAMILY's knobs: which one of the family) as mp4 files in `out` and
    `out`/manifest.csv (generic format: path, label, split; the word's onset for reference), its
    knobs in `out`/checkset.json. Then: data.py prepare --format generic."""
    fam = check_family(**knobs)
    if n_train < 0 or n_test < 0 or n_train + n_test == 0 or size < 32 or seconds < 2.0:
        raise ValueError(f"checkset: n_train={n_train}, n_test={n_test}, size={size}, "
                         f"seconds={seconds}: need counts >= 0 (not both 0), size >= 32 and "
                         "seconds >= 2 (the event lasts about a second)")
    for tool in ("espeak-ng", "ffmpeg"):
        if shutil.which(tool) is None:
            raise FileNotFoundError(f"{tool} is not installed (Debian: apt-get install {tool})")
    make_folder(out)
    with open(os.path.join(out, "checkset.json"), "w") as f:
        json.dump(dict(fam["knobs"], n_train=n_train, n_test=n_test, seconds=seconds, size=size,
                       seed=seed), f, indent=1)
    jobs = [(i, "train" if i < n_train else "test", seed, seconds, size, out, fam["knobs"])
            for i in range(n_train + n_test)]
    t0 = time.time()
    with Pool(workers) as ex:
        rows = list(ex.map(_check_item, jobs, chunksize=4))
    with open(os.path.join(out, "manifest.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["path", "label", "split", "onset", "degraded"])
        w.writeheader()
        w.writerows(rows)
    print(f"check set: {len(rows)} mp4 clips and manifest.csv in {out} "
          f"({time.time() - t0:.1f} s)")
    return out

# -----------------------------------------------------------------------------
# frames: crop, flip, resize, scale to [-1, 1] (the same on CPU in workers or on the GPU)


def decode_frames(jpegs: list, device="cpu", stack: bool = True):
    """JPEG bytes -> (T, 3, H, W) uint8 on `device` (batched nvJPEG when device is CUDA), or the
    list of T (3, H, W) frames (stack=False: the CPU path crops them before any copy)."""
    from torchvision.io import ImageReadMode, decode_jpeg
    frames = decode_jpeg(jpegs, mode=ImageReadMode.RGB, device=device)
    return torch.stack(frames) if stack else frames


def random_crop_box(h: int, w: int, rng: np.random.Generator, scale=(0.3, 1.0),
                    ratio=(3 / 4, 4 / 3)):
    """RandomResizedCrop's box (top, left, height, width), one for the whole clip."""
    area = h * w
    for _ in range(10):
        a = area * rng.uniform(*scale)
        ar = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        cw, ch = int(round(math.sqrt(a * ar))), int(round(math.sqrt(a / ar)))
        if 0 < cw <= w and 0 < ch <= h:
            return int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1)), ch, cw
    s = min(h, w)  # fall back to the central square
    return (h - s) // 2, (w - s) // 2, s, s


SHORT_SIDE = 256 / 224  # the authors' pipeline: short side resized to 256, a 224 crop taken


def video_box(h: int, w: int, rng: np.random.Generator, aug: str, train: bool,
              crop_scale=(0.3, 1.0)):
    """One crop box (top, left, height, width) for every frame of a clip, in stored-frame pixels.
    none (pretraining, AV-MAE Table 20: no augmentation): the short side resized to 256/224 of the
    crop, a random square crop; finetune: the same with that resize scaled by a random factor in
    [0.9, 1.33] (scale jitter, the authors' finetuning config); rrc: MAE's RandomResizedCrop.
    Evaluation: the central crop of the 256/224 resize."""
    if aug == "rrc" and train:
        return random_crop_box(h, w, rng, crop_scale)
    jitter = rng.uniform(0.9, 1.33) if aug == "finetune" and train else 1.0
    side = min(h, w, max(1, round(min(h, w) / (SHORT_SIDE * jitter))))
    if not train:
        return (h - side) // 2, (w - side) // 2, side, side
    return int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1)), side, side


GREY = (0.299, 0.587, 0.114)  # ITU-R 601 luma: YIQ's Y, torchvision's grey (0.2989, ...)
YIQ = torch.tensor([GREY, (0.596, -0.274, -0.322), (0.211, -0.523, 0.312)], dtype=torch.float64)


def colour_matrix(b: float, c: float, s: float, hue: float, grey: bool) -> torch.Tensor:
    """The 3 x 3 RGB map of brightness b, contrast c's scaling (its offset, (1 - c) x the frame's
    mean grey, is added apart), saturation s (a blend with the pixel's grey), a hue rotation by
    `hue` turns (a rotation of YIQ's chroma plane, which keeps the grey), then grey if asked."""
    w = YIQ[0:1]
    ones = torch.ones(3, 1, dtype=torch.float64)
    t = -2 * math.pi * hue  # (this sign turns red towards yellow for hue > 0, as HSV does)
    rot = torch.tensor([[1, 0, 0], [0, math.cos(t), -math.sin(t)], [0, math.sin(t), math.cos(t)]],
                       dtype=torch.float64)
    sat = s * torch.eye(3, dtype=torch.float64) + (1 - s) * ones @ w
    m = torch.linalg.inv(YIQ) @ rot @ YIQ @ sat
    m = m * (b * c)
    return (ones @ w @ m if grey else m).float()


def color_augment(x: torch.Tensor, rng: np.random.Generator, p_color: float = 0.8,
                  p_drop: float = 0.1):
    """The authors' finetuning colour augmentation on a (3, T, H, W) uint8 clip, the same for every
    frame: with p_color a jitter of brightness, contrast (about each frame's mean grey), saturation
    and hue of torchvision's ColorJitter(0.4, 0.4, 0.4, 0.1) strengths, with p_drop grey. All of
    it is one affine map of each pixel's colour (as NVIDIA DALI's ColorTwist; the hue turns YIQ's
    chroma plane where torchvision turns HSV's hue circle), clipped once at the end: about 10x
    faster on a CPU than torchvision's four passes. Every random number is drawn whether used or
    not (a fixed stream per clip)."""
    u = rng.uniform(size=6)
    b, c, s = 1 + 0.4 * (2 * u[:3] - 1)
    hue = 0.1 * (2 * u[3] - 1)
    jitter, grey = bool(u[4] < p_color), bool(u[5] < p_drop)
    if not (jitter or grey):
        return x.contiguous()
    m = colour_matrix(b, c, s, hue, grey) if jitter else colour_matrix(1, 1, 1, 0, grey)
    y = x.float()
    out = torch.einsum("ij,jthw->ithw", m.to(y.device), y)
    if jitter:  # contrast's offset, the same in every channel (saturation and hue keep greys)
        mean = torch.einsum("j,jt->t", YIQ[0].float().to(y.device), y.mean(dim=(2, 3)))
        out += ((1 - c) * b * mean).view(1, -1, 1, 1)
    return out.round_().clamp_(0, 255).to(torch.uint8)


def augment_frames(frames, cfg, seed: int) -> torch.Tensor:
    """(T, 3, H, W) uint8 stored frames (or a list of T (3, H, W)) -> (3, T, size, size) uint8, on
    any device: crop (video_box), flip (except video_aug='none'), colour (video_aug='finetune');
    every random choice from `seed`, so the CPU workers and the GPU decoder make the same clip."""
    rng = np.random.default_rng(seed)
    box = video_box(*frames[0].shape[-2:], rng, cfg.video_aug, cfg.train, cfg.crop_scale)
    flip = bool(rng.random() < 0.5) and cfg.train and cfg.video_aug != "none"
    x = crop_resize(frames, box, flip, cfg.image_size)
    return color_augment(x, rng) if cfg.train and cfg.video_aug == "finetune" else x


def crop_resize(frames, box, flip: bool, size: int) -> torch.Tensor:
    """(T, 3, H, W) uint8 (or a list of T (3, H, W)) -> (3, T, size, size) uint8, the model's video
    layout (a view: the batch's stack makes it contiguous). Frames stay uint8 until they reach the
    training device (4x less to copy between processes): `to_device` scales them to [-1, 1]
    there."""
    top, left, h, w = box
    if (h, w) == (size, size):  # (the crop has the training size already, as pretraining's
        # 224 of frames stored at 256 has: a resize to its own size is the identity)
        x = torch.stack([f[:, top:top + h, left:left + w] for f in frames])
    elif frames[0].is_cuda:
        x = torch.stack(list(frames)) if isinstance(frames, list) else frames
        x = F.interpolate(x[:, :, top:top + h, left:left + w].float(), size=(size, size),
                          mode="bilinear", align_corners=False, antialias=True)
        x = x.round_().clamp_(0, 255).to(torch.uint8)
    else:  # the crops copied once into a channels-last buffer, resized in uint8 there (a CPU fast
        # path, 9x faster than float)
        x = torch.empty((len(frames), 3, h, w), dtype=torch.uint8,
                        memory_format=torch.channels_last)
        for i, f in enumerate(frames):
            x[i] = f[:, top:top + h, left:left + w]
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False,
                          antialias=True)
    if flip:
        x = x.flip(-1)
    return x.permute(1, 0, 2, 3)


def scale_video(v: torch.Tensor) -> torch.Tensor:
    """uint8 frames -> floats in [-1, 1] (ViViT / the paper: [0, 255] -> [-1, 1])."""
    return v.float().div_(127.5).sub_(1.0)


def to_device(batch: dict, device) -> dict:
    """Move a batch to `device` and scale its video to [-1, 1] there."""
    out = {k: (x.to(device, non_blocking=True) if isinstance(x, torch.Tensor) else x)
           for k, x in batch.items()}
    if "v" in out and out["v"].dtype == torch.uint8:
        out["v"] = scale_video(out["v"])
    return out


# -----------------------------------------------------------------------------
# the Dataset


class BadClip(Exception):
    """A clip that cannot be used; the message names the file and the problem."""


class DataUnusable(RuntimeError):
    """No clip can be read: the data folder disappeared during a run (an unmounted disk), or clip
    after clip is bad. A run stops with the message as its one line."""


@dataclass
class LoadOptions:
    """What train.py and finetune.py pass through to the loader as they are (declared once,
    here)."""
    frame_stride: float = 4       # in 25 fps frames: 4 pretraining,
                                  # 2 finetuning (MAViL 2 fps: 12.5)
    window: str = "hann"          # log-mel window: hann (peers) | hamming (the AV-MAE paper's text)
    audio_norm: str = "none"      # log-mel normalisation: none (AV-MAE) | dataset (the set's own
                                  # mean and 2 std, meta.json) | audiomae | cavmae | "mean,scale"
    video_aug: str = "none"       # none (pretraining, Table 20: a crop
                                  # of the 256-short-side frame) |
                                  # finetune (jitter, flip, colour) | rrc (MAE's crop + flip)
    decode: str = "cpu"           # JPEG decoding: cpu (in workers) | gpu
                                  # (JPEG bytes; GPUDecoder, batched) | mixed (both)
    gpu_share: float = 0.5        # --decode mixed: the share of the batches the GPU decodes (the
                                  # workers decode the rest; each batch's clips are the same)
    seed: int = 0                 # augmentation randomness = f(seed, epoch, clip index)


@dataclass
class DataConfig(LoadOptions):
    root: str = "data/builtin"
    split: str = "train"
    modalities: str = "av"
    num_frames: int = 16          # video frames per view
    image_size: int = 224
    audio_frames: int = 800       # log-mel frames (10 ms): 800 = 8 s
    mel_bins: int = 128
    train: bool = True            # random window, crop and flip; else
                                  # N evenly spaced views, centre crop
    views: int = 1                # test views per clip (eval)
    specaug_freq: int = 0         # finetuning: max width of a frequency mask (AST: 48)
    specaug_freq_masks: int = 1   # frequency masks per clip (the authors' AudioSet config: 2)
    specaug_time: int = 0         # finetuning: max width of one time mask (authors' code: off)
    time_shift: bool = False      # finetuning: random circular shift of the spectrogram in time
    crop_scale: tuple = (0.3, 1.0)  # video_aug='rrc': RandomResizedCrop's area range
    skip_silent: bool | None = None  # None: skip silent clips when
                                     # training, keep them in evaluation


def _norm(spec: str, meta: dict):
    """(mean, scale) with x -> (x - mean) / scale. 'dataset' uses the set's own log-mel statistics
    and, like AudioMAE, scale = 2 std."""
    if spec == "dataset":
        if "audio_mean" not in meta:
            raise ValueError("audio_norm='dataset' needs the set's statistics: run python data.py "
                             "stats --root ROOT")
        return meta["audio_mean"], 2 * meta["audio_std"]
    if spec in AUDIO_NORMS:
        return AUDIO_NORMS[spec]
    try:
        mean, scale = (float(x) for x in spec.split(","))
        return mean, scale
    except ValueError:
        raise ValueError(f"audio_norm={spec!r}: use one of {', '.join(AUDIO_NORMS)}, dataset "
                         "(the set's own statistics) or 'mean,scale'") from None


def read_manifest(path: str, heads: dict) -> tuple:
    """(rows, problems): a split's CSV as dicts (id, duration, frames, one label list per head); a
    malformed line is skipped and named (file:line), an empty manifest is an error."""
    if not os.path.exists(path):
        folder = os.path.dirname(path) or "."
        raise FileNotFoundError(f"{path} not found (this set's splits: {split_names(folder)}; "
                                "prepare the missing one: the manifest's split column names "
                                "a clip's split)")
    rows, problems = [], []
    with open(path, newline="") as f:
        reader = csv.reader(f)
        head = next(reader, None)
        need = ["id", "duration", "frames", *heads]
        if head is None or any(h not in head for h in need):
            raise ValueError(f"{path}: header {head} lacks one of {need}")
        col = {h: head.index(h) for h in head}
        for i, row in enumerate(reader, 2):
            try:
                if not any(c.strip() for c in row):
                    raise ValueError("empty line")
                r = dict(id=row[col["id"]], duration=float(row[col["duration"]]),
                         frames=int(row[col["frames"]]))
                for h, names in heads.items():
                    labs = [int(x) for x in row[col[h]].split(";") if x != ""]
                    if not labs or any(not 0 <= x < len(names) for x in labs):
                        raise ValueError(f"label {row[col[h]]!r} outside 0..{len(names) - 1}")
                    r[h] = labs
                if not r["id"]:
                    raise ValueError("no id")
            except (ValueError, IndexError) as e:
                problems.append(f"{path}:{i}: {e} ({row!r})")
                continue
            rows.append(r)
    for p in problems:
        log.warning("skipping manifest line %s", p)
    if not rows:
        raise ValueError(f"{path}: no usable clips ({len(problems)} malformed lines)")
    return rows, problems


def audio_windows(path: str, t0s: list, span_v: float, audio_frames: int) -> tuple:
    """(waves (views, samples) at 16 kHz mono, window starts in s): per video window starting at t0
    (span_v s long), the log-mel frame grid (frame k starts at ta + 10 ms k) centred on it, then
    moved (not cropped) to stay inside the recording; beyond a short recording, zeros."""
    try:
        info = sf.info(path)
    except Exception as e:
        raise BadClip(f"{path}: unreadable audio ({e})") from None
    sr, n_win = info.samplerate, samples_for_frames(audio_frames, SAMPLE_RATE)
    waves, tas = [], []
    for t0 in t0s:
        ta = t0 + span_v / 2 - audio_frames * 0.01 / 2
        ta = min(max(ta, 0.0), max(0.0, info.frames / sr - n_win / SAMPLE_RATE))
        s0 = int(round(ta * sr))
        s1 = s0 + int(math.ceil(n_win * sr / SAMPLE_RATE))
        try:
            x, _ = sf.read(path, start=max(0, s0), stop=max(0, min(s1, info.frames)),
                           dtype="float32", always_2d=True)
        except Exception as e:
            raise BadClip(f"{path}: unreadable audio ({e})") from None
        x = resample(np.pad(x.mean(axis=1), (max(0, -s0), 0)), sr, SAMPLE_RATE)  # stereo -> mono
        waves.append(torch.from_numpy(np.pad(x, (0, max(0, n_win - len(x))))[:n_win]))
        tas.append(ta)
    return torch.stack(waves), tas


def spec_draw(cfg: DataConfig, rng, T: int, Fq: int) -> list:
    """The random part of SpecAugment for one (T, mel) log-mel, drawn on the CPU in the loader:
    [(frequency mask width, start) x specaug_freq_masks, time mask width, start, circular time
    shift]."""
    p = []
    for width, n in ((cfg.specaug_freq, Fq),) * cfg.specaug_freq_masks + ((cfg.specaug_time, T),):
        w = int(rng.integers(0, width + 1)) if width else 0
        p += [w, int(rng.integers(0, max(1, n - w + 1))) if width else 0]
    return p + [int(rng.integers(0, T)) if cfg.time_shift else 0]


def augment_spec(s: torch.Tensor, draws: torch.Tensor) -> torch.Tensor:
    """SpecAugment (frequency masks and a time mask, filled with the log-mel's mean, as AST) and a
    circular time shift, on a batch of log-mels s (N, T, mel) given each one's spec_draw (N, 2 k +
    3 for k frequency masks). The same code in the loader (CPU) and in GPUDecoder (the device)."""
    N, T, Fq = s.shape
    p = draws.to(s.device)[:, :, None]                                # (N, 2 k + 3, 1)
    f, t = torch.arange(Fq, device=s.device), torch.arange(T, device=s.device)
    masked = ((t >= p[:, -2]) & (t < p[:, -2] + p[:, -3]))[:, :, None]  # (N, T, 1)
    for k in range(0, p.shape[1] - 3, 2):
        masked = masked | ((f >= p[:, k + 1]) & (f < p[:, k + 1] + p[:, k]))[:, None, :]
    s = torch.where(masked, s.mean((1, 2), keepdim=True), s)
    rolled = (t - p[:, -1]) % T                                       # roll: out[t] = s[t - shift]
    return s.gather(1, rolled[:, :, None].expand(N, T, Fq))


# Rules for bad input in AVDataset (each counted in the item's `bad` and logged with the file):
#   missing or unreadable audio / frames, a corrupt JPEG, an empty frame file -> replace the clip by
#   the next readable one (at most 10 tries, then an error listing them);
#   silent audio (peak < 1e-4) -> replaced when training, kept (and reported) in evaluation;
#   audio shorter than the window -> zero-padded; fewer frames than the window -> the last frame is
#   held; stereo -> mean of the channels; another sample rate -> resampled to 16 kHz;
#   empty / malformed manifest lines -> skipped and logged (an empty manifest is an error).


def label_target(labs: list, n: int, multi_label: bool):
    """A class index, or a multi-hot (n,) vector for a multi-label set (AudioSet)."""
    if not multi_label:
        return labs[0]
    y = torch.zeros(n)
    y[labs] = 1.0
    return y


class AVDataset(torch.utils.data.Dataset):
    """Clips of a prepared set as model inputs, one item (train=True) or `views` items (eval):
    a (audio_frames, mel_bins) log-mel; v (3, num_frames, image_size, image_size) uint8 (to_device
    scales it to [-1, 1] on the device); the labels; id; t0, ta: the video and audio windows'
    starts (s); bad: the clips replaced. The video window starts on a stored frame (t0 = j0 / 12.5);
    the audio window (frame k starts at ta + 10 ms k) is centred on it and moved, if needed, inside
    the recording, so a sound and the picture of its cause keep one time. Bad input: see above."""

    MAX_TRIES = 10

    def __init__(self, cfg: DataConfig):
        self.cfg = cfg
        meta_path = os.path.join(cfg.root, "meta.json")
        if not os.path.exists(meta_path):
            raise FileNotFoundError(f"{meta_path} not found: prepare the data set first (python "
                                    "data.py prepare/builtin)")
        self.meta = read_meta(cfg.root)
        self.heads = self.meta["heads"]
        self.multi_label = self.meta.get("multi_label", False)
        self.fps = float(self.meta.get("fps", FPS))
        self.rows, self.manifest_problems = read_manifest(
            os.path.join(cfg.root, f"{cfg.split}.csv"), self.heads)
        self.norm = _norm(cfg.audio_norm, self.meta)
        self.skip_silent = cfg.train if cfg.skip_silent is None else cfg.skip_silent
        self.step = cfg.frame_stride / VIDEO_FPS * self.fps  # stored frames between sampled frames
        self.span_v = cfg.num_frames * cfg.frame_stride / VIDEO_FPS  # seconds of video per view
        self.epoch = 0
        self.reading = multiprocessing.Array("q", [-1] * 256, lock=False)  # clip per worker

    def being_read(self) -> list:
        """The clips the loader workers were reading last (to name the clip when a worker dies)."""
        return [self.rows[i]["id"] for i in self.reading if i >= 0]

    def __len__(self):
        return len(self.rows)

    def set_epoch(self, epoch: int):
        """Augmentation randomness is a function of (seed, epoch, index), resumable and the same in
        any worker layout (EpochSampler passes the epoch with each index; this sets the default)."""
        self.epoch = epoch

    def __getitem__(self, key):
        # from EpochSampler: (index, epoch[, decoded on the GPU: --decode mixed])
        idx, epoch, *gpu = key if isinstance(key, tuple) else (key, self.epoch)
        gpu = gpu[0] if gpu else self.cfg.decode == "gpu"
        worker = torch.utils.data.get_worker_info()
        self.reading[worker.id if worker else 0] = idx  # (named if the worker dies)
        bad = []
        for k in range(self.MAX_TRIES):
            j = (idx + k) % len(self.rows)
            try:
                item = self._load(j, epoch, gpu)
                item["bad"] = bad
                item["replaced"] = bool(bad)  # (evaluation leaves a stand-in out: it has its turn)
                return item
            except BadClip as e:
                if not os.path.isdir(os.path.join(self.cfg.root, "clips")):
                    raise DataUnusable(f"{self.cfg.root}: the data folder is gone (unmounted or "
                                       f"deleted?) while reading {self.rows[j]['id']}") from None
                log.warning("bad clip %s: %s (using the next clip instead)", self.rows[j]["id"], e)
                bad.append((self.rows[j]["id"], str(e)))
        silent = all(why.endswith(" is silent") for _, why in bad)
        raise DataUnusable(f"{self.cfg.root}: {self.MAX_TRIES} clips in a row could not be used, "
                           f"from {self.rows[idx]['id']} on (the first: {bad[0][1]})" + (
                               "; training skips silent clips: a set without sound trains "
                               "video-only (train.py --modalities v, finetune.py --modality "
                               "video)" if silent else ""))

    def _load(self, j, epoch, gpu: bool):
        cfg, row = self.cfg, self.rows[j]
        clip = os.path.join(cfg.root, "clips", row["id"])
        rng = np.random.default_rng([cfg.seed, epoch, j])
        n_stored = row["frames"]
        last_start = max(0, n_stored - 1 - int(math.ceil(self.step * (cfg.num_frames - 1))))
        if cfg.train:
            starts = [int(rng.integers(0, last_start + 1))]
        else:
            starts = [int(round(s)) for s in np.linspace(0, last_start, cfg.views)]
        out = dict(id=row["id"], t0=[s / self.fps for s in starts])
        if "a" in cfg.modalities:
            a, out["ta"], silent = self._audio(os.path.join(clip, "audio.flac"), out["t0"], rng,
                                               gpu)
            if gpu:  # samples and SpecAugment draws: GPUDecoder makes the log-mels
                out["a"], out["a_draws"] = a
            else:
                out["a"] = a
            if silent and self.skip_silent:
                raise BadClip(f"{clip}/audio.flac is silent")
            if silent:
                log.warning("silent audio kept (evaluation): %s/audio.flac", clip)
        if "v" in cfg.modalities:
            out["v"] = self._video(os.path.join(clip, "frames.bin"), starts, rng, gpu)
        for h in self.heads:
            out[h] = label_target(row[h], len(self.heads[h]), self.multi_label)
        if cfg.train:  # one view: drop the view axis (GPU decoding keeps its views)
            for k in ("t0", "ta") + (() if gpu else ("a", "v")):
                if k in out:
                    out[k] = out[k][0]
        return out

    def _audio(self, path, t0s, rng, gpu: bool):
        """(log-mels (views, T, mel), or with decode='gpu' the samples (views, n) and the
        SpecAugment draws (views, 5) that GPUDecoder turns into them; audio start times; silent)"""
        cfg = self.cfg
        wave, tas = audio_windows(path, t0s, self.span_v, cfg.audio_frames)
        draws = torch.tensor([spec_draw(cfg, rng, cfg.audio_frames, cfg.mel_bins)
                              for _ in t0s]) if self.spec_augmented else None
        lo, hi = torch.aminmax(wave)
        silent = bool(hi < 1e-4 and lo > -1e-4)
        if gpu:
            if draws is None:
                draws = torch.zeros(len(t0s), 5, dtype=torch.long)
            return (wave, draws), tas, silent
        return self.log_mels(wave, draws), tas, silent

    @property
    def spec_augmented(self) -> bool:
        return bool(self.cfg.specaug_freq or self.cfg.specaug_time or self.cfg.time_shift)

    def log_mels(self, wave: torch.Tensor, draws: torch.Tensor | None) -> torch.Tensor:
        """Samples (N, n) -> normalised, augmented log-mels (N, T, mel), on wave's device."""
        cfg = self.cfg
        a = logmel(wave, SAMPLE_RATE, cfg.mel_bins, cfg.audio_frames, cfg.window)
        a = (a - self.norm[0]) / self.norm[1]
        return augment_spec(a, draws) if draws is not None and self.spec_augmented else a

    def _video(self, path, starts, rng, gpu: bool):
        cfg = self.cfg
        try:
            n = frame_count(path)  # (fewer frames than the window: the last one is held)
            views = [read_frames(path, [min(n - 1, j0 + round(i * self.step))
                                        for i in range(cfg.num_frames)]) for j0 in starts]
        except (OSError, ValueError) as e:
            raise BadClip(f"{path}: {e}") from None
        seed = int(rng.integers(2**31))  # every view of a clip is augmented alike
        if gpu:  # the GPUDecoder decodes and augments; here only the seed
            return [dict(jpegs=v, seed=seed) for v in views]
        out = []
        for jp in views:
            try:
                frames = decode_frames(jp, stack=False)
            except RuntimeError as e:
                raise BadClip(f"{path}: corrupt JPEG ({str(e).splitlines()[0]})") from None
            out.append(augment_frames(frames, cfg, seed))
        # (one view, training: a view of it, which the batch's stack copies once into shared memory)
        return out[0][None] if len(out) == 1 else torch.stack(out)


def collate(items: list) -> dict:
    """Stack tensors, keep ids / bad lists as lists; pack --decode gpu's JPEGs into one tensor (one
    shared-memory transfer per batch instead of one per frame)."""
    out = {}
    for k in items[0]:
        vals = [it[k] for it in items]
        if k == "v" and isinstance(vals[0], list):  # per clip, per view: dict(jpegs, seed)
            jpegs = [j for views in vals for v in views for j in v["jpegs"]]
            out[k] = dict(bytes=torch.cat(jpegs),
                          sizes=torch.tensor([len(j) for j in jpegs]).view(
                              len(vals), len(vals[0]), -1),
                          seeds=torch.tensor([[v["seed"] for v in views] for views in vals]))
        elif isinstance(vals[0], torch.Tensor):  # (stacked straight into shared memory in a
            out[k] = torch.utils.data.default_collate(vals)  # worker: one copy, not two)
        elif isinstance(vals[0], (int, float)) and k not in ("id",):
            out[k] = torch.tensor(vals)
        elif k == "bad":
            out[k] = [b for v in vals for b in v]
        else:
            out[k] = vals
    return out


class GPUDecoder:
    """--decode gpu: what the workers leave to the device, batched. The workers send JPEG bytes,
    audio samples and their random draws; here the batch's JPEGs are decoded in one nvJPEG call and
    cropped, flipped and resized, and the log-mels computed, normalised and SpecAugmented, with the
    same randomness as the CPU path. A clip with a frame that will not decode is dropped from the
    batch and reported in batch['bad']."""

    def __init__(self, ds: "AVDataset", device="cuda"):
        self.ds, self.cfg, self.device = ds, ds.cfg, device

    def __call__(self, batch: dict) -> dict:
        cfg, n = self.cfg, len(batch["id"])
        if not (isinstance(batch.get("v"), dict) or "a_draws" in batch):
            return to_device(batch, self.device)  # (--decode mixed: the workers decoded this one)
        keep, videos = list(range(n)), None
        if "v" in batch:
            keep, videos = self._video(batch)
        out = {k: (x[keep] if isinstance(x, torch.Tensor) and len(x) == n else
                   [x[c] for c in keep] if isinstance(x, list) and k != "bad" and len(x) == n
                   else x) for k, x in batch.items()}
        if videos is not None:
            out["v"] = videos[:, 0] if cfg.train else videos
        out = to_device(out, self.device)
        if "a" in out:  # samples (B, views, n) -> log-mels (B, views, T, mel)
            wave, draws = out["a"], out.pop("a_draws")
            a = self.ds.log_mels(wave.flatten(0, 1), draws.flatten(0, 1))
            a = a.view(*wave.shape[:2], *a.shape[1:])
            out["a"] = a[:, 0] if cfg.train else a
        return out

    def _video(self, batch: dict):
        cfg, packed = self.cfg, batch["v"]  # collate's dict(bytes, sizes (B, views, T), seeds)
        n, nv, T = packed["sizes"].shape
        jpegs = list(packed["bytes"].split(packed["sizes"].flatten().tolist()))
        seeds = packed["seeds"].flatten().tolist()
        try:
            frames = list(decode_frames(jpegs, self.device).split(T))
        except RuntimeError:  # find the culprit clip by clip
            frames = []
            for i in range(n * nv):
                try:
                    frames.append(decode_frames(jpegs[i * T:(i + 1) * T], self.device))
                except RuntimeError:
                    frames.append(None)
        keep = [c for c in range(n) if all(frames[c * nv + k] is not None for k in range(nv))]
        for c in sorted(set(range(n)) - set(keep)):
            log.warning("bad clip %s: corrupt JPEG (dropped from the batch)", batch["id"][c])
            batch["bad"].append((batch["id"][c], "corrupt JPEG"))
        videos = [torch.stack([augment_frames(frames[c * nv + k], cfg, seeds[c * nv + k])
                               for k in range(nv)]) for c in keep]
        return keep, torch.stack(videos)

    def ahead(self, pairs):
        """(key, batch) pairs -> (key, decoded batch), in order, each batch decoded on a thread of
        its own while the caller works on the one before. Decoding a batch in the step's thread
        would add its time to every step (nvJPEG reads each JPEG's header on the CPU, waits for
        its stream, and decodes the entropy code on the CPU where the GPU has no JPEG engine; the
        crops are a few kernels per clip, launched from Python); here it overlaps the step. On
        CUDA the thread decodes on a stream of its own, which the caller's stream waits for before
        it uses the batch."""
        dev = torch.device(self.device)
        if dev.type == "cuda" and dev.index is None:  # ("cuda": the caller's current GPU)
            dev = torch.device("cuda", torch.cuda.current_device())
        side = torch.cuda.Stream(dev) if dev.type == "cuda" else None

        def work(batch):
            if side is None:
                return self(batch), None
            # (a thread starts on GPU 0 and the default stream: this rank's GPU, its own stream)
            with torch.cuda.device(dev), torch.cuda.stream(side):
                out = self(batch)
                done = torch.cuda.Event()
                done.record(side)
            return out, done

        def hand_over(key, job):
            out, done = job.result()  # (an error of the decode is raised here, in order)
            if done is not None:
                main = torch.cuda.current_stream(dev)
                main.wait_event(done)
                for x in out.values():  # (freed by the caller's stream: reused after it)
                    if isinstance(x, torch.Tensor) and x.is_cuda:
                        x.record_stream(main)
            return key, out

        with ThreadPoolExecutor(1, thread_name_prefix="gpu-decode") as pool:
            last = None
            for key, batch in pairs:
                job = pool.submit(work, batch)
                if last is not None:
                    yield hand_over(*last)
                last = key, job
            if last is not None:
                yield hand_over(*last)


def on_device(pairs, device, gpu_decoder: GPUDecoder | None = None):
    """(key, batch) pairs -> (key, batch on `device`); with --decode gpu decoded there, the next
    batch beside the caller's work on the current one (GPUDecoder.ahead)."""
    if gpu_decoder is not None:
        return gpu_decoder.ahead(pairs)
    return ((k, to_device(b, device)) for k, b in pairs)


class EpochSampler(torch.utils.data.Sampler):
    """This rank's share of a seeded permutation of the data set, as (index, epoch) keys, starting
    at a given position: resuming mid-epoch skips the consumed samples without loading them. The
    global order is the same for any number of ranks: rank r of W takes positions r, r + W, r + 2W,
    ... of the epoch's permutation, so a global batch holds the same clips whatever W is."""

    def __init__(self, n: int, world: int = 1, rank: int = 0, seed: int = 0, shuffle: bool = True,
                 batch: int = 0, gpu_share: float | None = None,
                 weights: torch.Tensor | None = None, size: int = 0):
        self.n, self.world, self.rank, self.seed, self.shuffle = n, world, rank, seed, shuffle
        self.epoch, self.start = 0, 0
        self.weights, self.size = weights, size  # (weighted: `size` clips drawn with replacement)
        self.batch, self.gpu_share = batch, gpu_share  # (--decode mixed: which batches the GPU
        # decodes, spread evenly: batch b if floor((b + 1) share) > floor(b share))

    def set_position(self, epoch: int, start: int = 0):
        """Epoch, and how many of this rank's samples of it are already consumed."""
        self.epoch, self.start = epoch, start

    def __len__(self):
        return (self.size or self.n) // self.world - self.start

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        if self.weights is not None:
            perm = torch.multinomial(self.weights, self.size, replacement=True, generator=g)
        else:
            perm = torch.randperm(self.n, generator=g) if self.shuffle else torch.arange(self.n)
        n = self.size or self.n
        mine = perm[: n // self.world * self.world][self.rank::self.world]
        if self.gpu_share is None:
            return iter((int(i), self.epoch) for i in mine[self.start:])
        share = self.gpu_share
        on_gpu = [math.floor((b + 1) * share) > math.floor(b * share)
                  for b in range(self.start // self.batch, len(mine) // self.batch + 1)]
        return iter((int(i), self.epoch, on_gpu[p // self.batch - self.start // self.batch])
                    for p, i in enumerate(mine[self.start:], self.start))


def make_loader(cfg: DataConfig, batch_size: int, workers: int = 2, sampler=None,
                drop_last: bool = True):
    """A DataLoader over AVDataset; `sampler` (e.g. an EpochSampler) picks the clips."""
    ds = AVDataset(cfg)
    sampler = sampler if sampler is not None else EpochSampler(len(ds), shuffle=cfg.train)
    return Loader(ds, batch_size=batch_size, sampler=sampler, num_workers=workers,
                  collate_fn=collate, drop_last=drop_last, pin_memory=torch.cuda.is_available(),
                  persistent_workers=workers > 0)


class Loader(torch.utils.data.DataLoader):
    """torch's DataLoader, whose workers leave a stop to the main process. A scheduler that
    preempts a job (SLURM, scancel) signals every process of it, and Ctrl-C every process in the
    terminal's foreground, the loader's workers too; a worker killed by it failed the run in its
    last step ("DataLoader worker is killed by signal"), with no checkpoint. Here a worker ignores
    SIGINT, SIGHUP (a closed terminal's) and SIGUSR1, and SIGTERM unless its own main process sent
    it (the loader's terminate(), at exit); the main process finishes the step, checkpoints and
    shuts the workers down. A worker whose main process has gone ends by itself (the loader's
    watchdog). SIGTERM needs workers made by fork on Linux (the default before Python 3.14);
    elsewhere (macOS has no sigwaitinfo; spawn, forkserver) a worker takes it as torch's do.
    close() ends the workers at once: a run closes its loaders when it ends, however it ends."""

    def __iter__(self):
        ctx = self.multiprocessing_context or multiprocessing.get_context()
        fork = self.num_workers > 0 and ctx.get_start_method() == "fork"
        term = fork and hasattr(signal, "sigwaitinfo")
        if self.num_workers > 0:
            self.worker_init_fn = functools.partial(_worker_init, os.getpid() if term else None)
        # forked workers start with SIGINT, SIGHUP and SIGTERM blocked, in every thread they have
        # (some start at fork, before _worker_init): one thread of theirs reads SIGTERM, with its
        # sender
        hold = ({signal.SIGINT, signal.SIGHUP} if fork else set()) | (
            {signal.SIGTERM} if term else set())
        old = signal.pthread_sigmask(signal.SIG_BLOCK, hold)
        try:
            it = super().__iter__()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)
        self.__dict__.setdefault("_made", weakref.WeakSet()).add(it)
        return it

    def close(self):
        """Shuts the workers down now. Left to the garbage collector, a loader that an exception's
        traceback holds (a run stopped by a signal or an error, in a process that goes on: a
        notebook, a job that runs several) kept its workers until a collection, which then waited
        5 s per worker: the collector had closed the queues that carry the workers' stop."""
        for it in list(self.__dict__.get("_made", ())):
            if hasattr(it, "_shutdown_workers"):  # (none with --workers 0)
                it._shutdown_workers()
        self.__dict__.pop("_made", None)
        self._iterator = None  # (persistent workers: the next iter() starts new ones)


def _worker_init(main_pid: int | None, _worker_id: int):
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGHUP})  # (held: dropped)
    if main_pid is None:
        return
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # (not the main process's handler, inherited)
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    threading.Thread(target=_sigterm_from_the_main_process_only, args=(main_pid,),
                     daemon=True).start()


def _sigterm_from_the_main_process_only(main_pid: int):
    while signal.sigwaitinfo({signal.SIGTERM}).si_pid != main_pid:
        pass  # (a scheduler's: the main process stops the run)
    os._exit(0)  # (not killed by the signal, which the main process's loader reports as a fault)


def median_duration(root: str, split: str = "train") -> float | None:
    """The median clip length (s) of a prepared split, or None where there is no manifest yet."""
    try:
        with open(os.path.join(root, f"{split}.csv"), newline="") as f:
            durations = sorted(float(r["duration"]) for r in csv.DictReader(f) if r.get("duration"))
    except (OSError, ValueError, KeyError):
        return None
    return durations[len(durations) // 2] if durations else None


def fit_window(seconds: float, audio_frames: int, audio_patch: int, num_frames: int,
               frame_stride: float, tubelet: int) -> tuple:
    """The largest (audio_frames, num_frames) no longer than asked that fit a clip of `seconds`:
    log-mel frames of 25 ms every 10 ms, whole audio patches; video frames every frame_stride / 25
    s, whole tubelets. A window up to 5% longer than the clip is kept (zero-padded, as AudioSet's
    1000 frames of 10 s clips and MAViL's 1024 are). Used when the user did not choose the
    window."""
    a_max = int((seconds - 0.025) / 0.01) + 1
    a = audio_frames if audio_frames <= 1.05 * a_max else max(audio_patch,
                                                              a_max // audio_patch * audio_patch)
    v_max = int(seconds * VIDEO_FPS / frame_stride)
    v = num_frames if num_frames <= 1.05 * v_max else max(tubelet, v_max // tubelet * tubelet)
    return a, v


def crude_features(root: str, split: str, num_frames: int = 8, image_size: int = 32,
                   audio_frames: int = 400, frame_stride: float = 12.5) -> tuple:
    """({"a": (N, 2 mel), "v": (N, 384)}, labels (N,)) of a prepared split for `baseline`: each
    clip's log-mel mean and std over time, and its frames (the evaluation crop, 8 x 8 pixels)
    averaged over time and their std over time (what moves)."""
    ds = AVDataset(DataConfig(root=root, split=split, train=False, views=1, skip_silent=False,
                              num_frames=num_frames, image_size=image_size,
                              audio_frames=audio_frames, frame_stride=frame_stride))
    head = next(iter(ds.heads), None)
    if head is None or ds.multi_label:
        raise ValueError(f"{root}: baseline needs a single-label set (it has "
                         f"{'no labels' if head is None else 'multi-label ones'})")
    feats, labels = {"a": [], "v": []}, []
    for b in Loader(ds, batch_size=16, num_workers=0, collate_fn=collate):
        a = b["a"][:, 0]                                          # (B, T, mel)
        v = F.avg_pool2d(scale_video(b["v"][:, 0]).flatten(1, 2), image_size // 8)  # (B, 3T, 8, 8)
        v = v.view(len(a), 3, num_frames, 8, 8)
        feats["a"].append(torch.cat([a.mean(1), a.std(1)], 1))
        feats["v"].append(torch.cat([v.mean(2).flatten(1), v.std(2).flatten(1)], 1))
        labels.append(b[head])
    return {m: torch.cat(x) for m, x in feats.items()}, torch.cat(labels)


def baseline(root: str, train_split: str = "train", test_split: str = "test") -> dict:
    """What a model must beat on a prepared set: a nearest-class-mean and a logistic regression
    (L2, L-BFGS) on crude_features, standardised on the training split; test top-1 for audio,
    video and both."""
    (tr, ytr), (te, yte) = (crude_features(root, s) for s in (train_split, test_split))
    n_cls = int(max(ytr.max(), yte.max())) + 1
    out = {}
    for name, keys in (("audio", "a"), ("video", "v"), ("both", "av")):
        x_tr = torch.cat([tr[m] for m in keys], 1).double()
        x_te = torch.cat([te[m] for m in keys], 1).double()
        mu, sd = x_tr.mean(0), x_tr.std(0).clamp_min(1e-6)
        x_tr, x_te = (x_tr - mu) / sd, (x_te - mu) / sd
        means = torch.stack([x_tr[ytr == c].mean(0) if (ytr == c).any() else
                             torch.full_like(mu, math.inf) for c in range(n_cls)])
        out[f"{name}_ncm"] = (torch.cdist(x_te, means).argmin(1) == yte).double().mean().item()
        x_tr, x_te = (F.pad(x, (0, 1), value=1.0) for x in (x_tr, x_te))  # (a bias column)
        w = torch.zeros(x_tr.shape[1], n_cls, dtype=torch.float64, requires_grad=True)
        opt = torch.optim.LBFGS([w], max_iter=200, line_search_fn="strong_wolfe")

        def loss():
            opt.zero_grad()
            f = F.cross_entropy(x_tr @ w, ytr) + 1e-2 * (w[:-1] ** 2).sum()
            f.backward()
            return f
        opt.step(loss)
        out[f"{name}_logreg"] = ((x_te @ w).argmax(1) == yte).double().mean().item()
    return dict(out, train_clips=len(ytr), test_clips=len(yte), chance=1 / n_cls)


def audio_stats(root: str, split: str = "train", max_clips: int = 2000,
                write: bool = True) -> tuple:
    """Mean and std of the raw log-mel over (up to) max_clips clips, whole recordings; stored in
    meta.json for audio_norm='dataset'. An unreadable clip is left out and said, as the loader
    does in training."""
    from tqdm import tqdm
    ds = AVDataset(DataConfig(root=root, split=split, modalities="a", train=False,
                              skip_silent=False))
    s = s2 = n = 0.0
    rows, bad = ds.rows[:: max(1, len(ds.rows) // max_clips)], []
    for r in tqdm(rows, desc="log-mel statistics", unit="clip", leave=False,
                  disable=len(rows) < 200):
        path = os.path.join(root, "clips", r["id"], "audio.flac")
        try:
            wave, sr = sf.read(path, dtype="float32", always_2d=True)
        except (OSError, RuntimeError) as e:  # (soundfile's errors are RuntimeErrors)
            bad.append(f"{path}: {e}")
            continue
        x = logmel(torch.from_numpy(resample(wave.mean(1), sr, SAMPLE_RATE))).double()
        s, s2, n = s + x.sum().item(), s2 + (x ** 2).sum().item(), n + x.numel()
    if bad:
        print(f"{root}: log-mel statistics without {len(bad)} unreadable clip(s) of {len(rows)} "
              f"(the first: {bad[0]})", file=sys.stderr)
    if not n:
        raise ValueError(f"{root}: no readable audio in the {split} split for the log-mel "
                         "statistics")
    mean = s / n
    std = math.sqrt(max(s2 / n - mean ** 2, 0.0))
    if write:
        meta_path = os.path.join(root, "meta.json")
        meta = read_meta(root)
        meta.update(audio_mean=round(mean, 4), audio_std=round(std, 4))
        with open(meta_path + ".tmp", "w") as f:
            json.dump(meta, f, indent=1)
        os.replace(meta_path + ".tmp", meta_path)
    return mean, std


# -----------------------------------------------------------------------------
# command line


# -----------------------------------------------------------------------------
# what both training scripts read through: the set made or checked, the dataset opened (a user
# error is one line), the window fitted to the clips, and the stream of batches on the device


def print0(*a, **k):
    """print on rank 0 only (torchrun's RANK)."""
    if int(os.environ.get("RANK", 0)) == 0:
        print(*a, **k, flush=True)


def ensure_data(cfg, d):
    """Generate the built-in set on first use, and the set's log-mel statistics when
    --audio_norm dataset needs them and the set has none yet (rank 0; the others wait)."""
    meta_path = os.path.join(cfg.data, "meta.json")
    builtin = os.path.basename(os.path.normpath(cfg.data)).endswith("builtin")
    if not os.path.exists(meta_path) or (builtin and builtin_outdated(cfg.data)):
        if not builtin:
            raise SystemExit(f"{cfg.data}: not a prepared data set (no meta.json). Prepare one "
                             "with `python py prepare ...` (README: Data) or run `python "
                             "train.py --preset quick`.")
        if d.master:
            make_builtin(cfg.data, flag="--data")
    elif cfg.audio_norm == "dataset" and "audio_mean" not in _meta(cfg.data):
        split = getattr(cfg, "train_split", getattr(cfg, "split", "train"))
        if d.master:
            print0(f"{cfg.data}: no log-mel statistics yet (--audio_norm dataset); computing "
                   f"them from the {split} split, once (they are saved in meta.json)")
            try:
                audio_stats(cfg.data, split)
            except (OSError, ValueError) as e:
                raise SystemExit(f"{cfg.data}: cannot compute the log-mel statistics: {e}")
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def _meta(root: str) -> dict:
    try:
        return read_meta(root)
    except ValueError as e:
        raise SystemExit(str(e)) from None


def open_dataset(cfg: DataConfig) -> AVDataset:
    """The dataset, or one line saying what is wrong with the set (a user error, not a
    traceback)."""
    try:
        return AVDataset(cfg)
    except (OSError, ValueError) as e:
        raise SystemExit(f"{cfg.root}: {e}")


def fit_to_clips(root: str, split: str, audio_frames: int, num_frames: int, frame_stride: float,
                 tubelet: int, audio_patch: int, given: dict) -> tuple:
    """(audio_frames, num_frames), shrunk to the set's median clip length where a preset's window
    does not fit it and the user did not choose the window (--audio_frames / --num_frames); said.
    A window the user chose is kept, and said where it does not fit: the rest is padding."""
    seconds = median_duration(root, split)
    if seconds is None:
        return audio_frames, num_frames
    fit = dict(zip(
        ("audio_frames", "num_frames"),
        fit_window(seconds, audio_frames, audio_patch, num_frames, frame_stride, tubelet)))
    out = dict(audio_frames=audio_frames, num_frames=num_frames)
    for name, new in fit.items():
        if new == out[name]:
            continue
        if given.get(name) is None:
            print0(f"{root}: clips are {seconds:g} s long (median); --{name} {out[name]} does not "
                   f"fit them, using --{name} {new} (pass --{name} to choose)")
            out[name] = new
        else:  # (audio: zeros; video: the last frame again)
            print0(f"{root}: clips are {seconds:g} s long (median); --{name} {out[name]} is "
                   f"longer, so each window ends in padding (--{name} {new} fits them)")
    return out["audio_frames"], out["num_frames"]


def balanced_weights(rows: list, heads) -> torch.Tensor:
    """Each clip's sampling weight, the sum over its labels of 1000 / (the label's count + 0.01)
    (MAViL App. B; AudioSet's balanced sampler, as AST and AudioMAE use it)."""
    counts = {}
    for r in rows:
        for h in heads:
            for c in r[h]:
                counts[h, c] = counts.get((h, c), 0) + 1
    return torch.tensor([sum(1000 / (counts[h, c] + 0.01) for h in heads for c in r[h])
                         for r in rows], dtype=torch.float64)


def batch_stream(ds: AVDataset, per_rank: int, workers: int, seed: int, d, step: int,
                 steps_per_epoch: int, per_step: int, weighted: int = 0):
    """The one loader of both scripts: EpochSampler's order (independent of the number of
    ranks, resumable at any step: `per_step` samples of this rank per step; `weighted`: that many
    clips an epoch, drawn by balanced_weights), pinned memory and persistent workers, batches
    moved to the device (and decoded there with --decode gpu)."""
    mixed = ds.cfg.decode == "mixed"
    sampler = EpochSampler(len(ds), d.world, d.rank, seed, batch=per_rank,
                           gpu_share=ds.cfg.gpu_share if mixed else None,
                           weights=balanced_weights(ds.rows, ds.heads) if weighted else None,
                           size=weighted)
    loader = Loader(ds, batch_size=per_rank, sampler=sampler, num_workers=workers,
                    collate_fn=collate, drop_last=True,
                    pin_memory=d.device.type == "cuda", persistent_workers=workers > 0)
    gpu_decoder = GPUDecoder(ds, d.device) if ds.cfg.decode in ("gpu", "mixed") else None
    epoch0, in_epoch = divmod(step, steps_per_epoch)
    return batches(loader, sampler, epoch0, in_epoch * per_step, d, gpu_decoder)


def unusable(e: DataUnusable) -> SystemExit:
    """The one line a run stops with when no clip can be read (from a loader worker the message
    ends with the worker's traceback, whose last line is the original)."""
    return SystemExit(str(e).strip().splitlines()[-1].split("DataUnusable: ")[-1])


def batches(loader, sampler, epoch: int, start: int, d, gpu_decoder=None):
    """Batches from `start` (this rank's samples already used) of `epoch` on, moved to the device
    (with --decode gpu: decoded there, the next batch beside the current step). A data folder that
    vanished, or a loader worker that died (killed for memory), stops the run with one line naming
    the folder or the clips being read, instead of retrying or hanging."""
    def read(epoch, start):
        while True:
            sampler.set_position(epoch, start)
            it = iter(loader)
            while True:
                try:
                    b = next(it)
                except StopIteration:
                    break
                except DataUnusable as e:
                    raise unusable(e) from None
                except RuntimeError as e:
                    if "DataLoader worker" not in str(e):
                        raise
                    raise SystemExit(f"rank {d.rank}: a data loader worker died "
                                     f"({str(e).splitlines()[0]}) while reading "
                                     f"{', '.join(loader.dataset.being_read()) or 'no clip yet'}"
                                     ": out of memory? use fewer --workers or a smaller batch; "
                                     "--resume auto continues") from None
                yield epoch, b
            epoch, start = epoch + 1, 0
    try:
        yield from on_device(read(epoch, start), d.device, gpu_decoder)
    finally:  # (the stream closed: the run ends, however it ends)
        loader.close()


def cores_per_rank() -> int:
    """The CPU cores this process may use, shared among the ranks on its node (torchrun sets
    LOCAL_WORLD_SIZE): the default number of loader workers per rank."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(1, cores // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


def at_least(low: int):
    """An argparse type: an integer of at least `low` (else one line, at parse time)."""
    def parse(text):
        v = int(text)
        if v < low:
            raise argparse.ArgumentTypeError(f"{v}: must be {low} or more")
        return v
    return parse


def above_zero(most: float | None = None):
    """An argparse type: a number above 0 (and at most `most`)."""
    def parse(text):
        v = float(text)
        if not (v > 0 and (most is None or v <= most)):
            raise argparse.ArgumentTypeError(f"{v:g}: must be above 0" + (
                f" and at most {most:g}" if most is not None else ""))
        return v
    return parse


def make_folder(path: str, flag: str = "--out") -> None:
    """os.makedirs, or one line that says why the folder cannot be made (before any work)."""
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise SystemExit(f"{flag} {path}: cannot make it ({e.strerror}: {e.filename}); "
                         "choose another")


class Parser(argparse.ArgumentParser):
    """argparse with a user error on one line: the message and where the flags are listed (not
    the whole usage, 50 lines for train.py's flags); exit status 2, as argparse's."""

    def error(self, message):
        self.exit(2, f"{self.prog}: {message} ({self.prog} -h lists the flags)\n")


def main(argv=None):
    p = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    pp = sub.add_parser("prepare", help="raw videos (+ a manifest) -> a prepared set")
    pp.add_argument("--videos", required=True, help="folder of the source videos")
    pp.add_argument("--manifest", help="the clips and their labels; without it every video under "
                    "--videos, unlabelled (what pretraining needs)")
    pp.add_argument("--format", choices=["vggsound", "audioset", "epic", "generic"],
                    help="the manifest's format (needed with --manifest)")
    pp.add_argument("--labels", help="AudioSet class_labels_indices.csv")
    pp.add_argument("--split", default=None,
                    help="keep this split only (vggsound/generic); the split name (audioset/epic)")
    pp.add_argument("--out", required=True)
    pp.add_argument("--workers", type=at_least(1), default=os.cpu_count())
    pp.add_argument("--short_side", type=at_least(32), default=256)
    pp.add_argument("--full_videos", action="store_true",
                    help="audioset: cut each segment from the whole video")
    pp.add_argument("--allow_silent", action="store_true",
                    help="keep videos without audio, with silent audio (for video-only use; "
                    "audiovisual training skips silent clips)")
    pb = sub.add_parser("builtin", help="generate the built-in data set")
    pb.add_argument("--out", default="data/builtin")
    for k, v in BUILTIN.items():
        pb.add_argument(f"--{k}", type=type(v), default=v)
    pc = sub.add_parser("checkset", help="write the check set (spoken words over noise + shapes) "
                        "as mp4 files and a generic manifest; needs espeak-ng and ffmpeg")
    pc.add_argument("--out", default="raw/checkset")
    pc.add_argument("--workers", type=at_least(1), default=os.cpu_count())
    pc.add_argument("--config", choices=list(CHECK_CONFIGS), default="default",
                    help="a named configuration (docs/sanity.md); the knobs below override it")
    for k, v in {**CHECKSET, **CHECK_FAMILY}.items():
        pc.add_argument(f"--{k}", type=type(v), default=None, help=f"(default {v!r})")
    pl = sub.add_parser("baseline", help="what a model must beat on a prepared set: a nearest-"
                        "class-mean and a logistic regression on pooled log-mel and pixel features")
    pl.add_argument("--root", required=True)
    pl.add_argument("--train_split", default="train")
    pl.add_argument("--test_split", default="test")
    ps = sub.add_parser(
        "stats", help="log-mel mean/std of a prepared set into its meta.json (audio_norm=dataset)")
    ps.add_argument("--root", required=True)
    ps.add_argument("--split", default="train")
    ps.add_argument("--max_clips", type=at_least(1), default=2000)
    sub.metavar = "{" + ",".join(sub.choices) + "}"  # (named so when it is missing)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    if args.cmd == "builtin":
        try:
            make_builtin(args.out, **{k: getattr(args, k) for k in BUILTIN})
        except ValueError as e:
            sys.exit(str(e))
    elif args.cmd == "checkset":
        try:
            given = {k: getattr(args, k) for k in {**CHECKSET, **CHECK_FAMILY}
                     if getattr(args, k) is not None}
            make_checkset(args.out, workers=args.workers,
                          **{**CHECK_CONFIGS[args.config], **given})
        except (FileNotFoundError, RuntimeError, ValueError) as e:
            sys.exit(str(e))
    elif args.cmd == "baseline":
        try:
            res = baseline(args.root, args.train_split, args.test_split)
        except (FileNotFoundError, ValueError) as e:
            sys.exit(str(e))
        print(json.dumps(res))
    elif args.cmd == "stats":
        mean, std = audio_stats(args.root, args.split, args.max_clips)
        print(f"{args.root}: log-mel mean {mean:.4f}, std {std:.4f} (written to meta.json)")
    else:
        if shutil.which("ffmpeg") is None:
            sys.exit("prepare needs ffmpeg on the PATH (Debian: apt-get install -y ffmpeg)")
        for flag, path, isit, what in (("--manifest", args.manifest, os.path.isfile, "file"),
                                       ("--videos", args.videos, os.path.isdir, "folder")):
            if path is not None and not isit(path):  # (else a set of nothing, each clip
                sys.exit(f"{flag} {path}: no such {what}")  # failed "no video for ...")
        if args.manifest and not args.format:
            sys.exit("--manifest needs its --format (vggsound, audioset, epic or generic)")
        listed = None  # the splits a --split filter chose from
        if not args.manifest:  # every video under --videos, unlabelled
            recs, bad, heads, multi = read_folder(args.videos), [], {}, False
            if not recs:
                sys.exit(f"--videos {args.videos}: no video files there (by extension: "
                         f"{', '.join(VIDEO_FILES)}); or pass a --manifest")
        elif args.format == "vggsound":  # the vocabulary comes from every split of the CSV
            recs, bad = read_vggsound(args.manifest)
            heads, multi = {"label": _vocab(recs, "label")}, False
            listed = sorted({r.split for r in recs})
            recs = [r for r in recs if args.split is None or r.split == args.split]
        elif args.format == "audioset":
            if not args.labels:
                sys.exit("--format audioset needs --labels class_labels_indices.csv")
            recs, bad, mids = read_audioset(args.manifest, args.labels, args.split or "train",
                                            args.full_videos)
            heads, multi = {"label": sorted(mids, key=mids.get)}, True
        elif args.format == "epic":
            recs, bad = read_epic(args.manifest, args.split or "train")
            heads, multi = {"verb": list(range(97)), "noun": list(range(300))}, False
        else:
            recs, bad = read_generic(args.manifest)
            labelled = any(r.labels for r in recs)
            heads = {"label": _vocab(recs, "label")} if labelled else {}
            multi = labelled and any(len(r.labels["label"]) > 1 for r in recs)
            listed = sorted({r.split for r in recs})
            recs = [r for r in recs if args.split is None or r.split == args.split]
        for b in bad[:SHOWN]:  # (all of them in failed_*.csv)
            log.warning("manifest: %s", b)
        if len(bad) > SHOWN:
            log.warning("manifest: %d more malformed rows", len(bad) - SHOWN)
        if not recs:
            if listed and args.split is not None:
                sys.exit(f"{args.manifest}: no rows of split {args.split!r} (its splits: "
                         f"{listed}): pass one of them to --split, or leave --split out")
            sys.exit(f"{args.manifest}: no usable rows ({len(bad)} malformed)"
                     + _other_format(args.manifest, args.format))
        make_folder(args.out)
        counts = prepare(recs, args.videos, args.out, heads, multi, args.format, args.workers,
                         args.short_side, bad, allow_silent=args.allow_silent)
        if not counts["prepared"]:
            sys.exit(f"data.py: none of the {len(recs)} clips was prepared: the reasons are in "
                     f"{args.out}/failed_*.csv")


SHOWN = 5  # malformed manifest rows shown; the rest counted
# words of a manifest's first lines (its header) that name its format
FORMAT_WORDS = {"generic": {"path", "label"}, "audioset": {"YTID", "positive_labels"},
                "epic": {"narration_id", "verb_class"}}


def _other_format(path: str, given: str) -> str:
    """'; its first lines are --format F's' where the manifest's header names another format."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            words = set(re.split(r"[\s,#]+", "".join(f.readline() for _ in range(3))))
    except OSError:
        return ""
    return next((f"; its first lines are --format {name}'s" for name, need in FORMAT_WORDS.items()
                 if name != given and need <= words), "")


class Unbroken:
    """sys.stdout / sys.stderr of a command (this file's, train.py's, finetune.py's), outliving
    their reader: where a write fails because the pipe's reader has gone (`python train.py ...
    2>&1 | tee log`: the same Ctrl-C stops tee) or the terminal has hung up (SIGHUP), the stream
    goes to /dev/null from then on. Else the next write (a progress bar's) ended the run with a
    traceback, in a training run before its checkpoint."""

    def __init__(self, stream):
        self.stream = stream

    def _guard(self, write, *a):
        try:
            return write(*a)
        except OSError as e:
            if e.errno not in (errno.EPIPE, errno.EIO):
                raise
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, self.stream.fileno())
        os.close(null)
        return write(*a)  # (what was buffered goes there too)

    def write(self, text):
        return self._guard(self.stream.write, text)

    def flush(self):
        return self._guard(self.stream.flush)

    def __getattr__(self, name):
        return getattr(self.stream, name)


@contextlib.contextmanager
def unbroken_output():
    """sys.stdout and sys.stderr as Unbroken while a command runs (train.py's, finetune.py's, this
    file's); put back after."""
    streams = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = Unbroken(sys.stdout), Unbroken(sys.stderr)
    try:
        yield
    finally:
        sys.stdout, sys.stderr = streams


class HungUp(KeyboardInterrupt):
    """SIGHUP (the terminal closed: an ssh connection dropped without tmux or nohup), taken as
    Ctrl-C is: what has not started is cancelled, what is in flight finishes."""


def _hung_up(*_):
    raise HungUp


def command_line(argv=None):
    """main as a command: a missing or malformed set, manifest or file, Ctrl-C or a closed
    terminal, is one line on stderr and a non-zero exit (130 for Ctrl-C, 75 for SIGHUP, as
    train.py's), not a traceback; a reader of the output that goes does not stop it (Unbroken)."""
    argv = sys.argv[1:] if argv is None else argv
    hup = signal.signal(signal.SIGHUP, _hung_up)
    with unbroken_output():  # (the lines below too: `| tee` may have gone with the Ctrl-C)
        try:
            main(argv)
        except (OSError, ValueError) as e:
            sys.exit(f"data.py: {e}")
        except KeyboardInterrupt as e:
            print(f"data.py: stopped by {'SIGHUP' if isinstance(e, HungUp) else 'Ctrl-C'}" + (
                  "; the clips finished are kept, and the same command goes on from there"
                  if argv[:1] == ["prepare"] else ""), file=sys.stderr, flush=True)
            sys.exit(75 if isinstance(e, HungUp) else 130)
        finally:
            signal.signal(signal.SIGHUP, hup)


if __name__ == "__main__":
    command_line()
