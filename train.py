r"""
AV-MAE pretraining, on one CPU, one GPU, or many GPUs and nodes (torchrun + DDP / FSDP):
AV-MAE Sec. 4.1, Table 20.

  python train.py --preset quick                    # built-in data, tiny model, any device: minutes
  python train.py --data data/vggsound              # the paper recipe (ViT-B, VGGSound) on one GPU
  torchrun --standalone --nproc_per_node=8 train.py --encoder mid --decoder shared
  torchrun --nnodes=2 --nproc_per_node=8 --node_rank=0 --rdzv_backend=c10d \
      --rdzv_endpoint=HOST:29500 train.py --preset vggsound_l   # (--node_rank=1 on the second)
  python train.py --preset vggsound_b --bench       # step time, clips/s, MFU, memory (synthetic)
  python train.py ... --resume auto                 # go on where out_dir's last checkpoint stopped
  python train.py --preset quick --variant mavil    # a relative: mavil|mavil_mbt|mavil2|cavmae|avme
  python train.py --variant mavil2 --teacher out/pretrain/ckpt_XXXXXXX.pt   # MAViL stage 2

Every field of avmae.AVMAEConfig and of TrainConfig below is a flag (`-h` lists them); --preset and
--size set defaults, explicit flags win. The whole config goes into every checkpoint.
"""
import argparse
import contextlib
import datetime
import errno
import functools
import glob
import inspect
import io
import itertools
import json
import math
import os
import random
import re
import signal
import sys
import threading
import time
import tokenize
import zlib
from dataclasses import asdict, dataclass, field, fields

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

import avmae
import data

# -----------------------------------------------------------------------------
# config


@dataclass
class TrainConfig:
    """Every flag of train.py beside the model's (avmae.AVMAEConfig), in -h's groups."""
    # model
    preset: str = "vggsound_b"    # a named recipe (PRESETS below); flags given win over it
    size: str = "base"            # model size preset (avmae.SIZES); explicit width flags win
    variant: str = "avmae"        # AV-MAE or a relative's recipe (avmae.VARIANTS): MAViL stage 1
                                  # (mavil, mavil_mbt) or 2 (mavil2), CAV-MAE, AV-MaskEnhancer
    teacher: str = ""             # MAViL stage 2: a frozen teacher checkpoint
                                  # whose fusion outputs are the targets
    init: str = ""                # start from these weights: a checkpoint avmae.load reads (ours
                                  # or a converted release), or AUDIO,VIDEO: two unimodal ones
    init_strict: bool = True      # with --init: every tensor must find its place (false: the
                                  # rest keep their initialisation, each named)
    # data
    data: str = "data/vggsound"   # a prepared set (data.py prepare); a
                                  # missing '*builtin' folder is generated
    split: str = "train"          # the prepared split to pretrain on
    workers: int = -1             # DataLoader workers per rank; -1 = the
                                  # cores per rank (affinity / LOCAL_WORLD_SIZE)
    frame_stride: float = 4       # in 25 fps frames (MAViL 2 fps: 12.5)
    window: str = "hann"          # log-mel window: hann (peers) | hamming (the AV-MAE paper's text)
    audio_norm: str = "none"      # log-mel normalisation: none (AV-MAE) | dataset (the set's own
                                  # mean and 2 std, meta.json) | audiomae | cavmae | "mean,scale"
    video_aug: str = "none"       # none (Table 20: a crop of the 256-short-side frame) | finetune
                                  # (jitter, flip, colour) | rrc (MAE's crop + flip)
    decode: str = "cpu"           # JPEG decoding: cpu (in workers) | gpu
                                  # (JPEG bytes; GPUDecoder, batched) | mixed (both)
    gpu_share: float = 0.5        # --decode mixed: the share of the batches the GPU decodes (the
                                  # workers decode the rest; each batch's clips are the same)
    seed: int = 0                 # the model's init; augmentation randomness = f(seed, epoch, clip)
    # optimisation
    batch_size: int = 512         # global batch (all ranks, all accumulation steps)
    grad_accum: int = 1           # micro-steps per step (the same global batch, less memory)
    epochs: int = 800             # Table 5: 800 on VGGSound
    max_steps: int = 0            # the run's length in steps; > 0 overrides --epochs
    warmup_epochs: float = 40.0   # Table 20 (the authors' config: 4)
    blr: float = 1.5e-4           # base lr per 256 clips (3e-4 at batch 512, Table 20)
    lr: float = 0.0               # absolute; 0 = blr * batch_size / 256
    min_lr: float = 0.0           # where the cosine schedule ends
    weight_decay: float = 0.0     # Table 20 (the authors' config: 0.05 on weight matrices)
    beta1: float = 0.9            # AdamW's first beta (Table 20)
    beta2: float = 0.95           # AdamW's second beta (Table 20)
    grad_clip: float = 0.0        # clip the gradient norm to this; 0 = off
    # run
    precision: str = "auto"       # the autocast dtype: auto (bf16 on a GPU that has it, Ampere
                                  # on; else fp32) | bf16 | fp32
    compile: str = "off"          # torch.compile the model (a GPU: faster steps after a minute):
                                  # off | default (a bare --compile) | max-autotune-no-cudagraphs
                                  # (GEMMs tuned too: minutes more) | max-autotune | reduce-overhead
    checkpoint_blocks: bool = False  # recompute each transformer block's activations in the
                                     # backward instead of keeping them (memory for compute)
    fsdp: bool = False            # shard parameters, gradients and
                                  # optimizer state (torch fully_shard)
    out_dir: str = "out/pretrain" # checkpoints, log.jsonl, curves.png, reconstruction pictures
    tensorboard: str = ""         # also write the log's figures here as TensorBoard scalars
                                  # (needs `pip install tensorboard`); '' = off
    resume: str = ""              # continue a run: auto (out_dir's latest intact checkpoint, if
                                  # any) or a checkpoint path; '' starts anew
    save_every: int = 1000        # steps between checkpoints (a final one is always written)
    keep_last: int = 3            # checkpoints kept (older ones are removed)
    log_every: int = 10           # steps between log.jsonl lines (the mean loss since the last)
    picture_every: int = 1000     # steps between reconstruction pictures (0 = only at the end)
    max_bad_steps: int = 0        # non-finite losses to skip before stopping
    on_save_error: str = "retry"  # a checkpoint that cannot be written (disk
                                  # full): retry at the next save | stop
    dist_timeout: float = 1800.0  # seconds a collective may wait for
                                  # a stuck rank before the run stops
    stop_at: int = 0              # stop (with a checkpoint) after
                                  # this many steps, as if interrupted
    bench: bool = False           # time steps on synthetic in-memory batches, then exit
    bench_steps: int = 10         # with --bench: steps timed (after 3 warm-up steps)
    profile: int = 0              # with --bench: this many more steps under torch.profiler, and
                                  # where their device time goes (matmuls, attention, ...)


PRESETS = {  # overrides of AVMAEConfig / TrainConfig defaults
    "vggsound_b": dict(),  # the defaults: ViT-B, mid-fusion S=2, shared decoder, Table 20
    "vggsound_l": dict(size="large"),
    # AudioSet (AS2M): 10 s of audio (1000 frames -> 496 tokens); 120 epochs (Tables 7b, 9, 16;
    # Table 4's transfer study matched VGGSound's iterations with 80: --epochs 80). The paper gives
    # no AudioSet-specific recipe: audio masking 0.7, base lr 3e-4 per 256 clips (twice VGGSound's)
    # and 4 warm-up epochs are the authors' config (scenic av_mae/configs/audioset/pretrain.py:
    # token_mask_probability_dict, base_lr, warmup_steps)
    "audioset_b": dict(data="data/audioset", audio_frames=1000, mask_ratio_a=0.7, epochs=120,
                       warmup_epochs=4, blr=3e-4),
    "audioset_l": dict(size="large", data="data/audioset", audio_frames=1000, mask_ratio_a=0.7,
                       epochs=120, warmup_epochs=4, blr=3e-4),
    # minutes on a 2-core CPU: windows that cover a 4 s clip (8 frames of 64x64 at 2 fps = 64 video
    # tokens, 400 log-mel frames = 200 audio tokens), so short events are always in view; small
    # batches and many steps (3000 at batch 8 beat 600 at batch 32 on short events: docs/sanity.md)
    "quick": dict(size="tiny", data="data/builtin", num_frames=8, frame_stride=12.5, image_size=64,
                  audio_frames=400, batch_size=8, audio_norm="dataset", epochs=75, warmup_epochs=3,
                  blr=1.6e-2, workers=2, save_every=1000, picture_every=1000, out_dir="out/quick"),
}
# the same windows and set, ViT-S on one GPU (bf16), where the loader, not the model, bounds the
# speed: batch 32 at the lr of `quick` scaled by the square root of the batch and by 1 / width
# (64 -> 384: 1e-3 -> 1.7e-4, as finetuning needs), 400 epochs (5.3x the clips of `quick` on the
# built-in set, 3.7x on the check set), 5% warm-up; LayerScale 0.1 (CaiT's for 12 blocks): without
# it the 12 blocks' attention stays uniform in pretraining, the tokens collapse to their clip's mean
# and the pretraining is a worse start than none on the check set's short words (docs/sanity.md)
PRESETS["quick_gpu"] = {**PRESETS["quick"], "size": "small", "batch_size": 32, "epochs": 400,
                        "warmup_epochs": 20, "workers": -1, "out_dir": "out/quick_gpu",
                        "layer_scale": 0.1,
                        "blr": PRESETS["quick"]["blr"] * (8 / 32) ** 0.5  # lr ~ sqrt(batch)
                        * avmae.SIZES["tiny"]["width"] / avmae.SIZES["small"]["width"]}


TRAIN_CHOICES = dict(preset=tuple(PRESETS), size=tuple(avmae.SIZES), variant=tuple(avmae.VARIANTS),
                     precision=("auto", "bf16", "fp32"), window=("hann", "hamming"),
                     decode=("cpu", "gpu", "mixed"), video_aug=("none", "rrc"),
                     on_save_error=("retry", "stop"))


def _bool(s: str) -> bool:
    v = {"true": True, "1": True, "yes": True, "false": False, "0": False,
         "no": False}.get(s.lower())
    if v is None:
        raise argparse.ArgumentTypeError(f"expected true or false, got {s!r}")
    return v


GROUPS = ("model", "data", "optimisation", "run")  # -h's groups, in its order
COMPILE_MODES = ("off", "default", "max-autotune-no-cudagraphs", "max-autotune", "reduce-overhead")


@functools.cache  # (read once per process: a forked rank parses nothing)
def field_help(dc) -> dict:
    """{field: (its comment in the dataclass's source, its group)}: a field's trailing comment and
    the comment lines under it, at its column; its group the last '# model' / '# data' / ... line
    above it (none: 'model', as avmae.AVMAEConfig's fields are). These comments are the -h text of
    the flags."""
    out, names, current, col, group = {}, set(dc.__annotations__), None, None, "model"
    for tok in tokenize.generate_tokens(io.StringIO(inspect.getsource(dc)).readline):
        if tok.type == tokenize.NAME and tok.start[1] == 4 and tok.string in names and \
                tok.line.lstrip().startswith(tok.string + ":"):
            current, col = tok.string, None
            out[current] = ("", group)
        elif tok.type == tokenize.COMMENT and current and (col is None or tok.start[1] >= col):
            col = tok.start[1] if col is None else col
            out[current] = ((out[current][0] + " " + tok.string.lstrip("#").strip()).strip(),
                            group)
        elif tok.type == tokenize.COMMENT and tok.start[1] == 4:
            current = None  # (a comment that opens the next group of fields)
            group = next((g for g in GROUPS if tok.string == f"# {g}"), group)
    return out


def build_parser(*dataclasses_, description=__doc__, choices=None):
    """One flag per dataclass field (default None = not given), typed from the field, its help the
    field's comment, in -h's groups (model, data, optimisation, run); `choices` (field -> allowed
    values) makes argparse list them."""
    choices = choices or {}
    p = data.Parser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter,
                    usage="%(prog)s [--flag VALUE ...]")
    groups = {g: p.add_argument_group(g) for g in GROUPS}
    seen = set()
    for dc in dataclasses_:
        helps = field_help(dc)
        for f in fields(dc):
            if f.name in seen:
                continue
            seen.add(f.name)
            t = f.type
            if isinstance(t, str):  # (annotations as strings)
                t = {"int": int, "float": float, "str": str, "bool": bool}.get(t, t)
            if t is bool:
                kw = dict(nargs="?", const=True, type=_bool)
            elif f.name == "compile":  # (given bare: the default mode)
                kw = dict(nargs="?", const="default", choices=COMPILE_MODES)
            else:
                kw = dict(type=t, choices=choices.get(f.name))
            text, group = helps.get(f.name, ("", "model"))
            groups[group].add_argument(f"--{f.name}", default=None,
                                       help=f"{text.replace('%', '%%')} (default {f.default!r})",
                                       **kw)
    return p


def resolve(args: dict, presets: dict, sizes: dict, *dataclasses_):
    """Defaults <- the size preset <- the named preset <- the variant (avmae.variant: at a paper
    size with its paper's shapes) <- flags given explicitly. The first dataclass holds the `preset`
    and `size` (and `variant`) fields."""
    given = {k: v for k, v in args.items() if v is not None}
    defaults = {f.name: f.default for f in fields(dataclasses_[0])}
    preset = given.get("preset", defaults["preset"])
    if preset not in presets:
        raise SystemExit(f"--preset {preset!r} is not one of {', '.join(presets)}")
    size = {**presets[preset], **given}.get("size", defaults["size"])
    if size not in sizes:
        raise SystemExit(f"--size {size!r} is not one of {', '.join(sizes)}")
    name = given.get("variant", defaults.get("variant"))
    recipe = avmae.variant(name, size in ("base", "large")) if name else {}
    merged = {**sizes[size], **presets[preset], **recipe, **given}
    out = []
    for dc in dataclasses_:
        names = {f.name for f in fields(dc)}
        out.append(dc(**{k: v for k, v in merged.items() if k in names}))
        if dc is not avmae.AVMAEConfig:  # (the model's numbers are avmae.check_config's)
            check_ranges(out[-1])
        if getattr(out[-1], "workers", 0) < 0:
            out[-1].workers = data.cores_per_rank()
    return out


# run options that a number out of range breaks deep inside (a traceback, or a run that does
# nothing); the model's own shapes and ratios are avmae.check_config's
AT_LEAST_ONE = ("batch_size", "grad_accum", "views", "log_every", "save_every", "eval_every",
                "bench_steps")
ABOVE_ZERO = ("frame_stride", "dist_timeout")
NOT_NEGATIVE = ("epochs", "warmup_epochs", "max_steps", "lr", "blr", "min_lr", "weight_decay",
                "specaug_freq_masks", "weighted_sampling", "video_lr",
                "grad_clip", "mixup", "specaug_freq", "specaug_time", "keep_last",
                "picture_every", "max_bad_steps", "stop_at", "profile", "tokenlearner", "width",
                "depth", "heads", "bottlenecks")
BELOW_ONE = ("beta1", "beta2", "label_smoothing", "drop_path")  # from 0, as Adam and MAE take them
UP_TO_ONE = ("layer_decay",)  # (1: every layer at the same rate; BEiT / MAE: 0.65-0.75)
MINUS_ONE = ("workers", "temporal_layers", "tokenlearner_layer", "fusion_layer")  # (-1: a default)


def check_ranges(cfg):
    """One line for a flag whose number cannot work (e.g. --batch_size 0, --lr -1)."""
    for names, ok, says in ((MINUS_ONE, lambda v: v >= -1, "-1 (the default) or more"),
                            (AT_LEAST_ONE, lambda v: v >= 1, "1 or more"),
                            (ABOVE_ZERO, lambda v: v > 0, "above 0"),
                            (NOT_NEGATIVE, lambda v: v >= 0, "0 or more"),
                            (BELOW_ONE, lambda v: 0 <= v < 1, "0 or more and below 1"),
                            (UP_TO_ONE, lambda v: 0 < v <= 1, "above 0 and at most 1")):
        for name in names:
            v = getattr(cfg, name, None)
            if isinstance(v, (int, float)) and not isinstance(v, bool) and not ok(v):
                raise SystemExit(f"--{name} {v}: must be {says}")
    if getattr(cfg, "epochs", 1) == 0 == getattr(cfg, "max_steps", 1) and \
            not getattr(cfg, "eval_only", False):
        raise SystemExit("--epochs 0 with --max_steps 0 leaves no step to train: give either one "
                         "a number")


def parse_args(argv=None):
    args = vars(build_parser(TrainConfig, avmae.AVMAEConfig,
                             choices={**avmae.CHOICES, **TRAIN_CHOICES}).parse_args(argv))
    cfg, model_cfg = resolve(args, PRESETS, avmae.SIZES, TrainConfig, avmae.AVMAEConfig)
    if "v" in model_cfg.mods and model_cfg.in_chans != 3:
        raise SystemExit(f"--in_chans {model_cfg.in_chans}: data.py's clips are RGB, 3 channels")
    if (model_cfg.target == "teacher") != bool(cfg.teacher):
        raise SystemExit("MAViL stage 2 takes both --target teacher (or --variant mavil2) and "
                         "--teacher PATH")
    model_cfg.audio_frames, model_cfg.num_frames = data.fit_to_clips(
        cfg.data, cfg.split, model_cfg.audio_frames, model_cfg.num_frames, cfg.frame_stride,
        model_cfg.tubelet, model_cfg.audio_patch_t, args)
    return model_cfg, cfg

# -----------------------------------------------------------------------------
# distributed: torchrun sets RANK / LOCAL_RANK / WORLD_SIZE; plain python is a world of one


@dataclass
class Dist:
    rank: int = 0
    local_rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")
    monitor: object = None  # a gloo group to find ranks that stopped answering (monitored_barrier)

    @property
    def master(self) -> bool:
        return self.rank == 0


_GROUPS = itertools.count()  # process groups this process has made


def setup_distributed(timeout: float = 1800.0) -> Dist:
    """torchrun's environment -> the process group, with `timeout` seconds for every collective (a
    stuck rank then stops the others with a message instead of hanging them)."""
    if "RANK" not in os.environ:
        return Dist(device=torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    rank, local, world = (int(os.environ[k]) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"))
    if torch.cuda.is_available():
        if local >= torch.cuda.device_count():  # (else: "invalid device ordinal", a traceback)
            raise SystemExit(f"rank {rank}: LOCAL_RANK {local}, but this node has "
                             f"{torch.cuda.device_count()} GPU(s) (CUDA_VISIBLE_DEVICES="
                             f"{os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}): start torchrun "
                             f"with --nproc_per_node {torch.cuda.device_count()} at most")
        torch.cuda.set_device(local)
        device, backend = torch.device("cuda", local), "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    limit = datetime.timedelta(seconds=timeout)
    # the rendezvous store, with a key prefix per torchrun restart and per group made in this
    # process: without the first a restarted job (a rank died, --max-restarts) reads the dead
    # attempt's addresses and cannot connect; without the second so does a job's second run (a
    # script that calls train.main more than once)
    agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world,
                          timeout=limit, is_master=rank == 0 and not agent, multi_tenant=not agent)
    restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    prefix = f"avmae/restart_{restart}/group_{next(_GROUPS)}"
    dist.init_process_group(backend, store=dist.PrefixStore(prefix, store),
                            rank=rank, world_size=world,
                            device_id=device if device.type == "cuda" else None, timeout=limit)
    # (a group that timed out cannot be asked again)
    monitor = dist.new_group(backend="gloo", timeout=limit)
    return Dist(rank, local, world, device, monitor)


def progress_bar(total: int, step: int, desc: str, master: bool):
    """The training loops' progress bar, on rank 0: redrawn every tenth of a second in a terminal,
    every half minute into a file (SLURM's .out, `> log`), not ten lines a second for days. tqdm's
    monitor thread also redraws a bar that has not drawn for `maxinterval` s (a step that stalls):
    into a file at 40 s, past the half minute (its default, 10 s, drew a second line every 30 s)."""
    from tqdm import tqdm
    every, stalled = (0.1, 10.0) if sys.stderr.isatty() else (30.0, 40.0)
    return tqdm(total=total, initial=step, disable=not master, desc=desc, dynamic_ncols=True,
                mininterval=every, maxinterval=stalled)


print0 = data.print0  # (rank 0 only)


def all_reduce(x: torch.Tensor, op=None) -> torch.Tensor:
    if dist.is_initialized():
        dist.all_reduce(x, op=op or dist.ReduceOp.SUM)
    return x


def autocast_ctx(precision: str, device: torch.device):
    # (a GPU before Ampere, a T4 or a V100, only emulates bf16: 'auto' keeps fp32 there)
    use_bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda"
                                       and torch.cuda.get_device_capability(device)[0] >= 8)
    return torch.autocast(device.type,
                          dtype=torch.bfloat16) if use_bf16 else contextlib.nullcontext()

# -----------------------------------------------------------------------------
# lr schedule and optimizer


def lr_at(step: int, total: int, warmup: int, lr: float, min_lr: float = 0.0) -> float:
    """Linear warm-up from 0, then cosine decay to min_lr (MAE)."""
    if step < warmup:
        return lr * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * min(t, 1.0)))


def param_groups(model: torch.nn.Module, weight_decay: float):
    """Decay weight matrices only; not biases, norms, positions or mask tokens (MAE)."""
    decay, no_decay = [], []
    for n, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 and "table" not in n else no_decay).append(p)
    return [dict(params=decay, weight_decay=weight_decay), dict(params=no_decay, weight_decay=0.0)]


def optimizer(model: torch.nn.Module, cfg: "TrainConfig", lr: float):
    """AdamW over param_groups, fused (one kernel on CUDA; it skips a step whose found_inf is set
    without the host reading it): what training and --bench both step."""
    return torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=lr,
                             betas=(cfg.beta1, cfg.beta2), fused=True)


def clip_grads(model: torch.nn.Module, cfg) -> torch.Tensor:
    """The gradient norm (for the non-finite check), clipped to --grad_clip when that is on (a
    TrainConfig's or finetune.py's FinetuneConfig's)."""
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(),
                                          cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # (FSDP: a DTensor)

# -----------------------------------------------------------------------------
# checkpoints: atomic (write, fsync, rename), a `latest` pointer, the last K kept, a checksum of the
# tensors inside; a damaged one is found on load and `--resume auto` takes the newest intact one


class BadCheckpoint(SystemExit):
    """A checkpoint that cannot be used (missing, unreadable, damaged, foreign): one line, exit
    1."""


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (disk full, out_dir unwritable); nothing older was
    touched."""


def tensor_crc(obj, crc: int = 0) -> int:
    """crc32 over the bytes of every tensor in a nested state (dicts in key order)."""
    if torch.is_tensor(obj):
        return zlib.crc32(obj.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy(),
                          crc)
    if isinstance(obj, dict):
        for k in sorted(obj, key=str):
            crc = tensor_crc(obj[k], crc)
    elif isinstance(obj, (list, tuple)):
        for x in obj:
            crc = tensor_crc(x, crc)
    return crc


def save_checkpoint(out_dir: str, state: dict, step: int, keep: int) -> str:
    """A crash, a full disk or a signal at any point leaves the previous checkpoint and `latest`
    intact; a write that fails raises CheckpointWriteError naming the path and the errno."""
    path = os.path.join(out_dir, f"ckpt_{step:07d}.pt")
    state = {**state, "crc32": tensor_crc([state.get("model"), state.get("optimizer")])}
    try:
        os.makedirs(out_dir, exist_ok=True)
        latest = os.path.join(out_dir, "latest")
        for name, write in ((path, lambda f: torch.save(state, f)),
                            (latest, lambda f: f.write(os.path.basename(path).encode()))):
            with open(name + ".tmp", "wb") as f:
                write(f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(name + ".tmp", name)
    except BaseException as e:  # (a second Ctrl-C too: no half file left behind)
        for name in (path, os.path.join(out_dir, "latest")):
            with contextlib.suppress(OSError):
                os.remove(name + ".tmp")
        if not isinstance(e, OSError):
            raise
        code = errno.errorcode.get(e.errno, str(e.errno))
        raise CheckpointWriteError(e.errno, f"{path}: not written ({code}: {e.strerror}); the "
                                            "previous checkpoint and `latest` are intact") from None
    for old in sorted(glob.glob(os.path.join(out_dir, "ckpt_*.pt")))[:-keep]:
        os.remove(old)
    return path


def find_checkpoint(resume: str, out_dir: str) -> str | None:
    """The path --resume names ('auto': out_dir's `latest`), without reading it."""
    if not resume:
        return None
    if resume == "auto":
        latest = os.path.join(out_dir, "latest")
        if not os.path.exists(latest):
            return None
        resume = os.path.join(out_dir, open(latest).read().strip())
    if not os.path.exists(resume):
        raise SystemExit(f"--resume {resume}: no such checkpoint (--resume auto continues from "
                         "out_dir's latest, if any)")
    return resume


def load_checkpoint(path: str, what: str, kind: str = "pretraining") -> dict:
    """A checkpoint file read on the CPU and checked against its checksum, or BadCheckpoint: one
    line naming the file, the flag it came from and the problem."""
    if os.path.isdir(path):  # a run's out_dir: name the checkpoint its `latest` points at
        latest = os.path.join(path, "latest")
        hint = (f"its latest is {os.path.join(path, open(latest).read().strip())}"
                if os.path.isfile(latest) else "pass one of its ckpt_*.pt files")
        raise BadCheckpoint(f"{what} {path}: a folder, not a checkpoint file ({hint})")
    if not os.path.isfile(path):
        raise BadCheckpoint(f"{what} {path}: no such file")
    try:
        ck = avmae.read_file(path)
    except avmae.UnsafeFile as e:  # (nothing of it ran)
        raise BadCheckpoint(f"{what} {path}: refused: {e}") from None
    except Exception as e:  # truncated / not a torch file
        raise BadCheckpoint(f"{what} {path}: not a readable checkpoint ({type(e).__name__}: "
                            f"{str(e).splitlines()[0][:200]})") from None
    if isinstance(ck, dict) and "model_config" not in ck and kind == "pretraining" and \
            all(torch.is_tensor(t) for t in (ck.get("model") or ck).values()):
        try:  # a released model's state dict (avmae.FOREIGN), converted
            ck = avmae.as_checkpoint(ck, path)
        except ValueError as e:
            raise BadCheckpoint(f"{what} {e}") from None
    if not isinstance(ck, dict) or "model" not in ck or "model_config" not in ck:
        raise BadCheckpoint(f"{what} {path}: not an avmae {kind} checkpoint (no model / "
                            "model_config)")
    made_by = "finetuning" if "finetune_config" in ck else "pretraining"
    if made_by != kind:  # (else the other kind's weights: a traceback of missing keys)
        hint = ("go on with that finetuning by finetune.py --resume, or pass a train.py checkpoint"
                if made_by == "finetuning" else "finetune from it by finetune.py --init")
        raise BadCheckpoint(f"{what} {path}: a {made_by} checkpoint, not a {kind} one: {hint}")
    if "crc32" in ck and tensor_crc([ck["model"], ck.get("optimizer")]) != ck["crc32"]:
        raise BadCheckpoint(f"{what} {path}: damaged (the checksum of its tensors does not match: "
                            "bytes changed)")
    if what != "--init" and any(k.startswith("dec_embed.") for k in ck["model"]):
        raise BadCheckpoint(f"{what} {path}: written before the decoder's parameters moved under "
                            "decoder.* (avmae's layout change); finetune from it with finetune.py "
                            "--init, or pretrain anew")
    return ck


def resume_from(resume: str, out_dir: str, kind: str = "pretraining", d: "Dist | None" = None):
    """(path, checkpoint) to continue from, or (None, None): a named file, or with 'auto' the newest
    intact checkpoint in out_dir (a damaged newer one is reported and passed over). Every rank
    reads it; with `d`, they must agree on the step."""
    path, ckpt = _resume_from(resume, out_dir, kind)
    if d is not None and d.world > 1:
        same_step_on_every_rank(ckpt["step"] if ckpt else 0, d, out_dir)
    return path, ckpt


def _resume_from(resume: str, out_dir: str, kind: str) -> tuple:
    if not resume:
        return None, None
    if resume != "auto":
        return resume, load_checkpoint(find_checkpoint(resume, out_dir), "--resume", kind)
    found = sorted(glob.glob(os.path.join(out_dir, "ckpt_*.pt")), reverse=True)
    for path in found:
        try:
            return path, load_checkpoint(path, "--resume auto:", kind)
        except BadCheckpoint as e:
            print0(f"{e}; trying the one before")
    if found:
        raise SystemExit(f"--resume auto: none of the {len(found)} checkpoints in {out_dir} is "
                         "intact")
    return None, None


# flags that steer only a run's bookkeeping (or its speed): a resumed run changes them unsaid
BOOKKEEPING = ("resume", "out_dir", "stop_at", "workers", "save_every", "log_every",
               "picture_every", "keep_last", "dist_timeout", "on_save_error", "max_bad_steps",
               "bench", "bench_steps", "profile", "preset", "decode", "kernels", "compile", "init",
               "eval_only", "checkpoint_blocks")


def say_resumed(path: str, step: int, saved: dict | None, cfg, master: bool,
                spe: tuple = (None, None)):
    """'resumed from PATH at step N', and the flags this run changes against the checkpoint's run
    (the batch, the schedule, the clips...): they apply from that step on, so the run is no longer
    the one that stopped. Said, not refused: extending --max_steps is a common wish. Printed, and
    an event line in log.jsonl (a curve then shows where its run resumed)."""
    now = asdict(cfg)
    changed = [f"--{k} {saved[k]} -> {v}" for k, v in now.items()
               if k in (saved or {}) and saved[k] != v and k not in BOOKKEEPING]
    if None not in spe and spe[0] != spe[1]:  # (the set's clips, or the batch, changed)
        changed.append(f"steps per epoch {spe[0]} -> {spe[1]}")
    line = f"resumed from {path} at step {step}" + (
        f"; changed since, applying from here: {', '.join(changed)}" if changed else "")
    print0(line)
    if master:
        append_log(os.path.join(cfg.out_dir, "log.jsonl"),
                   dict(step=step, event="resumed", message=line))


def same_step_on_every_rank(step: int, d: "Dist", out_dir: str):
    """Ranks that would resume from different steps (an --out_dir on each node's own disk: the
    other nodes see no checkpoint, or an older one) would run other schedules and sample other
    clips, then hang at the end: stop every rank, saying so."""
    steps = [None] * d.world
    dist.all_gather_object(steps, step, group=d.monitor)
    if len(set(steps)) > 1:
        seen = {}
        for r, s in enumerate(steps):
            seen.setdefault(s, []).append(str(r))
        found = "; ".join(f"step {s} on rank(s) {', '.join(rs[:4])}{', ...' * (len(rs) > 4)}"
                          for s, rs in sorted(seen.items()))
        raise SystemExit(f"rank {d.rank}: the ranks would resume from different steps ({found}): "
                         f"--out_dir {out_dir} must be one folder that every node sees (a shared "
                         "file system)")

# -----------------------------------------------------------------------------
# faults on a cluster: a scheduler's signal, a non-finite step, a full disk, a stuck rank

# (EX_TEMPFAIL) stopped cleanly on SIGTERM / SIGUSR1 / SIGHUP with a checkpoint: --resume auto
EXIT_PREEMPTED = 75
# (128 + SIGINT, the shell's convention) stopped by Ctrl-C, with a checkpoint after the first
EXIT_INTERRUPTED = 130
CTRL_C_AGAIN = ("stopped by Ctrl-C at once, without a new checkpoint; run the same command with "
                "--resume auto to continue from the last one in --out_dir")


class Preemption:
    """SIGTERM and SIGUSR1 (what SLURM and Kubernetes send before a kill) ask for a stop: the step
    in flight finishes, every rank agrees (the flag rides on the step's all-reduce), a checkpoint is
    written and every rank exits with EXIT_PREEMPTED. A second signal only asks again: the save is
    never cut short. Ctrl-C (SIGINT) asks the same way and exits with EXIT_INTERRUPTED; a second
    Ctrl-C stops at once (KeyboardInterrupt, which the command line turns into CTRL_C_AGAIN; the
    last checkpoint stays intact, saves being atomic). Under torchrun one Ctrl-C in the terminal
    reaches a rank twice, from the terminal and forwarded by torchrun (which then waits 30 s before
    SIGKILL): a second SIGINT within ONE_PRESS seconds is that same press. SIGHUP (the terminal
    closed: an ssh connection dropped) asks the same way as SIGTERM (the closed terminal's output:
    data.Unbroken). Every stop is also a line of log.jsonl."""
    SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT, signal.SIGHUP)
    ONE_PRESS = 2.0

    def __init__(self, log: str | None = None):
        self.signal, self._old, self.ctrl_c = None, {}, None  # (ctrl_c: when the first came)
        self.log = log  # (log.jsonl, on rank 0: the stop's line)

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._old = {s: signal.signal(s, self._ask) for s in self.SIGNALS}
        return self

    def _ask(self, signum, frame):
        if signum == signal.SIGINT:
            if self.ctrl_c is not None:
                if ("TORCHELASTIC_RUN_ID" in os.environ
                        and time.monotonic() - self.ctrl_c < self.ONE_PRESS):
                    return  # (the same press, forwarded by torchrun)
                raise KeyboardInterrupt
            self.ctrl_c = time.monotonic()
            if int(os.environ.get("RANK", 0)) == 0:  # (os.write: a print could cut into tqdm's)
                try:
                    os.write(2, b"\nCtrl-C: stopping after this step, with a checkpoint (Ctrl-C "
                                b"again stops at once, without one)\n")
                except OSError:  # (`2>&1 | tee`: the same Ctrl-C stopped the reader: data.Unbroken)
                    pass
        self.signal = self.signal or ("Ctrl-C" if signum == signal.SIGINT
                                      else signal.Signals(signum).name)

    def __exit__(self, *exc):
        for s, handler in self._old.items():
            signal.signal(s, handler)

    def stop(self, step: int, path: str | None):
        msg = (f"stopped at step {step} on {self.signal or 'a signal to another rank'}; "
               f"checkpoint {path}; run the same command with --resume auto to continue")
        if self.log and int(os.environ.get("RANK", 0)) == 0:
            append_log(self.log, dict(step=step, event="stopped", message=msg))
        print0(msg, file=sys.stderr)
        raise SystemExit(EXIT_INTERRUPTED if self.signal == "Ctrl-C" else EXIT_PREEMPTED)


def command_line(main):
    """Runs a command's main: Ctrl-C outside the training loop (or a second one inside it) is one
    line and EXIT_INTERRUPTED, not a traceback; a reader of its output that goes does not stop it
    (data.Unbroken)."""
    with data.unbroken_output():  # (the line below too: `| tee` may have gone with the Ctrl-C)
        try:
            main()
        except KeyboardInterrupt:
            print0(CTRL_C_AGAIN, file=sys.stderr)
            raise SystemExit(EXIT_INTERRUPTED) from None


class NonFinite:
    """The one policy for a non-finite loss or gradient (pretraining and finetuning): the step is
    skipped and logged, up to max_bad times; then the run stops naming the step and the last good
    checkpoint. A bad state is never saved."""

    def __init__(self, max_bad: int, out_dir: str, master: bool):
        self.max_bad, self.out_dir, self.master, self.count = max_bad, out_dir, master, 0

    def __call__(self, step: int, what: str):
        self.count += 1
        msg = f"step {step}: non-finite {what}"
        if self.master:
            append_log(os.path.join(self.out_dir, "log.jsonl"),
                       dict(step=step, event="non-finite", message=msg))
        if self.count > self.max_bad:
            last = find_checkpoint("auto", self.out_dir)
            raise SystemExit(f"{msg}; stopping (--max_bad_steps {self.max_bad}). The last good "
                             f"checkpoint is {last or 'none yet'}")
        print0(f"{msg}; skipped ({self.count}/{self.max_bad})")


NOT_WRITTEN = set()  # the paths whose last write failed (said once until one succeeds)


def write_or_say(path: str, write) -> bool:
    """write() puts a log line, a picture or a report at path. A disk that is full or gone costs
    that file, said in one line (once, until a write there succeeds again), not the run: the
    checkpoints have their own policy (--on_save_error)."""
    try:
        write()
    except OSError as e:
        if path not in NOT_WRITTEN:
            NOT_WRITTEN.add(path)
            code = errno.errorcode.get(e.errno, str(e.errno))
            print0(f"{path}: not written ({code}: {e.strerror}); the run goes on",
                   file=sys.stderr)
        return False
    NOT_WRITTEN.discard(path)
    return True


def append_log(path: str, rec: dict) -> bool:
    """A line of log.jsonl (write_or_say)."""
    def write():
        with open(path, "a") as f:
            f.write(json.dumps(rec) + "\n")
    return write_or_say(path, write)


def save_or_say(out_dir: str, state: dict, step: int, keep: int, policy: str,
                final: bool) -> str | None:
    """save_checkpoint under the --on_save_error policy: 'retry' says what failed and goes on (the
    next save tries again; the last one must succeed), 'stop' stops at once. Either way the previous
    checkpoint is intact and the message says where it is."""
    try:
        return save_checkpoint(out_dir, state, step, keep)
    except CheckpointWriteError as e:
        last = find_checkpoint("auto", out_dir)
        msg = f"step {step}: {e.strerror} ({last or 'none yet'})"
        if policy == "stop" or final:
            raise SystemExit(msg + "; stopping") from None
        print0(msg + "; training goes on and the next save tries again", file=sys.stderr)
        return None


def out_of_memory(e: Exception, d: "Dist", step: int, per_step: int, advice: str,
                  out_dir: str) -> SystemExit:
    """The device's memory ran out in a step (a batch too large for this GPU): one line with what
    to change, not a traceback."""
    tried = re.search(r"Tried to allocate [\d.]+ \w+", str(e))
    return SystemExit(f"rank {d.rank}, step {step}: out of {d.device.type.upper()} memory"
                      f"{f' ({tried.group(0)})' if tried else ''} at {per_step} clips per "
                      f"micro-step on this rank: {advice}. The last good checkpoint is "
                      f"{find_checkpoint('auto', out_dir) or 'none yet'}")


def step_failure(e: RuntimeError, d: "Dist", step: int, cfg, per_step: int,
                 advice: str) -> SystemExit | None:
    """What an error inside a step means for the run, in one line: out of device memory (with
    `advice`, what to change) or a collective that failed or timed out (a rank stuck or gone).
    None for any other error: a bug, whose traceback stands."""
    if isinstance(e, torch.OutOfMemoryError):
        return out_of_memory(e, d, step, per_step, advice, cfg.out_dir)
    if dist.is_initialized() and is_collective_failure(e):
        return collective_failure(e, d, step, cfg.dist_timeout, cfg.out_dir)
    return None


def collective_failure(e: Exception, d: "Dist", step: int, timeout: float,
                       out_dir: str) -> SystemExit:
    """A collective that failed or timed out (a rank stuck or gone): name the ranks that do not
    answer (gloo's monitored barrier), the step, and stop instead of hanging."""
    gone = ""
    if d.monitor is not None:
        try:
            dist.monitored_barrier(d.monitor,
                                   timeout=datetime.timedelta(seconds=max(5.0, timeout / 4)),
                                   wait_all_ranks=True)
        except RuntimeError as m:
            found = re.findall(r"[Rr]anks? ([\d, ]+) failed", str(m))
            gone = f"; rank(s) {found[0].strip()} did not answer" if found else ""
    return SystemExit(f"rank {d.rank}, step {step}: a collective failed or timed out "
                      f"(--dist_timeout {timeout:g} s){gone}: a rank is stuck or gone. The last "
                      f"good checkpoint is {find_checkpoint('auto', out_dir) or 'none yet'} "
                      f"({type(e).__name__}: {str(e).splitlines()[0][:160]})")


def rng_state() -> dict:
    """Every RNG's state as tensors and numbers (a checkpoint is data: weights_only loads it)."""
    np_state, (version, py_state, gauss) = np.random.get_state(), random.getstate()
    s = dict(torch=torch.get_rng_state(),
             numpy=dict(keys=torch.from_numpy(np_state[1].astype(np.int64)), pos=int(np_state[2]),
                        has_gauss=int(np_state[3]), gauss=float(np_state[4])),
             python=dict(version=version, state=torch.tensor(py_state, dtype=torch.int64),
                         gauss=gauss))
    if torch.cuda.is_available():
        s["cuda"] = torch.cuda.get_rng_state_all()
    return s


def set_rng_state(s: dict):
    torch.set_rng_state(s["torch"])
    n, p = s["numpy"], s["python"]
    if isinstance(n, dict):
        np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"],
                             n["has_gauss"], n["gauss"]))
        random.setstate((p["version"], tuple(p["state"].tolist()), p["gauss"]))
    else:  # (a checkpoint of an earlier avmae: numpy's own tuple, Python's)
        np.random.set_state(n)
        random.setstate(p)
    if "cuda" in s and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def model_state(model, fsdp: bool) -> dict:
    """The un-wrapped, un-compiled model's state dict (full, on CPU; gathered from shards with
    FSDP)."""
    if fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True,
                                                                    cpu_offload=True))
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}


def optim_state(model, opt, fsdp: bool) -> dict:
    if fsdp:
        from torch.distributed.checkpoint.state_dict import (StateDictOptions,
                                                             get_optimizer_state_dict)
        return get_optimizer_state_dict(model, opt, options=StateDictOptions(full_state_dict=True,
                                                                             cpu_offload=True))
    return opt.state_dict()


def load_states(model, opt, ckpt: dict, fsdp: bool):
    if fsdp:
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                             set_optimizer_state_dict)
        o = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
        set_model_state_dict(model, ckpt["model"], options=o)
        if opt is not None:
            set_optimizer_state_dict(model, opt, ckpt["optimizer"], options=o)
        return
    model.load_state_dict(ckpt["model"])
    if opt is not None:
        opt.load_state_dict(ckpt["optimizer"])


def need_torchrun_for_fsdp(cfg, script: str):
    if cfg.fsdp and "RANK" not in os.environ:  # (else torch's traceback: "RANK expected")
        raise SystemExit(f"--fsdp shards the model over the ranks of a torchrun job: run torchrun "
                         f"--nproc_per_node N {script} ... --fsdp (N = 1 on one GPU), or leave "
                         "--fsdp out")


def shard(model):
    """--fsdp: each transformer block's parameters, gradients and optimizer state sharded over
    the ranks (torch's fully_shard), then the rest of the model."""
    from torch.distributed.fsdp import fully_shard
    for mod in model.modules():
        if isinstance(mod, avmae.Block):
            fully_shard(mod)
    fully_shard(model)


def unwrap(model):
    model = getattr(model, "_orig_mod", model)
    return getattr(model, "module", model)


def ranks_in_sync(model) -> bool:
    """Every rank holds the same parameters (a checksum all-gathered)."""
    if not dist.is_initialized():
        return True
    s = torch.stack([p.detach().float().sum() for p in model.parameters()])
    s = s.double().sum().reshape(1).cpu()
    s = s.to("cuda") if dist.get_backend() == "nccl" else s
    got = [torch.zeros_like(s) for _ in range(dist.get_world_size())]
    dist.all_gather(got, s)
    return all(torch.equal(g, got[0]) for g in got)

# -----------------------------------------------------------------------------
# throughput: bf16 peaks per GPU, for MFU (the FLOPs: AVMAE.flops, next to the model)


PEAK_BF16 = [  # dense bf16 tensor-core FLOP/s, by device-name substring (first match wins)
    ("H100 PCIe", 756e12), ("H100", 989e12), ("H200", 989e12), ("GH200",
                                                                989e12), ("B200", 2250e12),
    ("A100", 312e12), ("A10G", 70e12), ("A10", 125e12), ("L40S", 362e12), ("L4", 121e12),
    ("RTX 4090", 165e12), ("RTX 3090", 71e12), ("V100", 125e12),
]


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((p for k, p in PEAK_BF16 if k in name), None)


# -----------------------------------------------------------------------------
# pictures: the paper's Figure 5 (rows: original, masked input, reconstruction with the visible
# patches pasted back; frames on the left, spectrogram on the right)

# magma-like
_CMAP = torch.tensor([[0, 0, 4], [80, 18, 123], [183, 55, 121], [251, 136, 97],
                      [252, 253, 191]]) / 255.0


def _colormap(x: torch.Tensor) -> torch.Tensor:  # (H, W) in [0, 1] -> (3, H, W)
    pos = x.clamp(0, 1) * (len(_CMAP) - 1)
    lo = pos.floor().long().clamp(max=len(_CMAP) - 2)
    w = (pos - lo).unsqueeze(-1)
    return (_CMAP[lo] * (1 - w) + _CMAP[lo + 1] * w).permute(2, 0, 1)


@torch.no_grad()
def reconstruction_picture(model: avmae.AVMAE, inputs: dict, out: dict,
                           frames_shown: int = 8) -> torch.Tensor:
    """A (3, H, W) image in [0, 1] for the first clip of a batch."""
    rec = avmae.reconstruct(model, {m: x[:1].float().cpu() for m, x in inputs.items()},
                            {k: (v[:1].float() if v.is_floating_point() else v[:1]).cpu()
                             for k, v in out.items() if torch.is_tensor(v) and v.dim()})
    rows = [[], [], []]
    gray = 0.5
    for m in ("v", "a"):
        if m not in rec:
            continue
        mask = out[f"mask_{m}"][:1].float().cpu()
        P = model.patches[m]
        mask_img = P.unpatchify(mask.unsqueeze(-1).expand(-1, -1, P.dim))[0]
        for r, img in enumerate(rec[m]):
            img = img[0]
            if m == "v":  # (3, T, H, W) in [-1, 1] -> frames side by side
                img = ((img + 1) / 2).clamp(0, 1)
                if r == 1:
                    img = torch.where(mask_img.bool(), torch.full_like(img, gray), img)
                idx = torch.linspace(0, img.shape[1] - 1, min(frames_shown,
                                                              img.shape[1])).round().long()
                rows[r].append(torch.cat([img[:, i] for i in idx], dim=2))
            else:  # (T, F) log-mel -> colour map, time to the right, low frequencies at the bottom
                orig = rec[m][0][0]
                lo, hi = orig.min(), orig.max()
                z = ((img - lo) / (hi - lo + 1e-6)).T.flip(0)
                pic = _colormap(z)
                if r == 1:
                    pic = torch.where(mask_img.T.flip(0).bool().unsqueeze(0),
                                      torch.full_like(pic, gray), pic)
                rows[r].append(pic)
    height = max(x.shape[1] for row in rows for x in row)
    sep = torch.ones(3, height, 4)
    lines = []
    for row in rows:
        parts = []
        for x in row:
            if x.shape[1] != height:  # scale the spectrogram to the frames' height
                w = max(1, round(x.shape[2] * height / x.shape[1]))
                x = F.interpolate(x[None], size=(height, w), mode="nearest")[0]
            parts += [x, sep]
        lines += [torch.cat(parts[:-1], dim=2), torch.ones(3, 4,
                                                           sum(p.shape[2] for p in parts[:-1]))]
    return torch.cat(lines[:-1], dim=1)


def tensorboard(path: str):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # (torch's writer needs the tensorboard package)
        raise SystemExit(f"--tensorboard {path}: TensorBoard is not installed: pip install "
                         "tensorboard (or leave --tensorboard out: log.jsonl and curves.png hold "
                         "the same figures)") from None
    return SummaryWriter(path)


SAID = set()  # (what has been said once)


def draw_curves(log_path: str, png: str):
    """curves.png from log.jsonl: the losses and the learning rate by step, and a finetuning's
    evaluations (test and running train top-1 or mAP) by epoch. Without matplotlib one line says
    how to get the picture (log.jsonl holds the figures)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        if "matplotlib" not in SAID:
            SAID.add("matplotlib")
            print0(f"{png}: not drawn: pip install matplotlib for the loss and accuracy curves "
                   "(log.jsonl holds the figures)")
        return
    steps, evals = {}, {}
    for line in open(log_path):
        try:
            rec = json.loads(line)
        except ValueError:  # (a line cut short by a crash)
            continue
        if "eval" in rec:
            evals[rec["eval"].get("epoch", len(evals))] = rec["eval"]
        elif "loss" in rec and "step" in rec:
            steps[rec["step"]] = rec  # (a resumed run's steps again: the last word)
    rows = [steps[k] for k in sorted(steps)]
    losses = [k for k in (rows[-1] if rows else {}) if k.startswith("loss")]
    panels = [("loss", losses), ("lr", ["lr"])]
    scores = [k for k in (next(iter(evals.values())) if evals else {})
              if k.endswith(("top1", "mAP")) and isinstance(evals[next(iter(evals))][k], float)]
    if scores:
        panels.append(("evaluation", scores))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.2), squeeze=False)
    for ax, (title, keys) in zip(axes[0], panels):
        x_of = sorted(evals) if title == "evaluation" else [r["step"] for r in rows]
        for k in keys:
            ys = [evals[e].get(k) for e in x_of] if title == "evaluation" else [r.get(k)
                                                                                for r in rows]
            label = k if title != "evaluation" or k.startswith("train_") else f"test {k}"
            ax.plot(x_of, [math.nan if y is None else y for y in ys], label=label)
        ax.set_title(title)
        ax.set_xlabel("epoch" if title == "evaluation" else "step")
        if len(keys) > 1:
            ax.legend(fontsize=7)
    fig.tight_layout()
    tmp = png + ".tmp.png"
    fig.savefig(tmp, dpi=90)
    plt.close(fig)
    os.replace(tmp, png)  # (a crash while drawing leaves the last picture whole)


def save_picture(img: torch.Tensor, path: str):
    from torchvision.utils import save_image
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    save_image(img, path)

# -----------------------------------------------------------------------------
# data


def data_config(model_cfg: avmae.AVMAEConfig, cfg, split: str, train: bool,
                **kw) -> data.DataConfig:
    return data.DataConfig(root=cfg.data, split=split, modalities=model_cfg.modalities,
                           num_frames=model_cfg.num_frames, image_size=model_cfg.image_size,
                           audio_frames=model_cfg.audio_frames, mel_bins=model_cfg.mel_bins,
                           train=train, **{f.name: getattr(cfg, f.name)
                                           for f in fields(data.LoadOptions)}, **kw)


def make_out_dir(path: str, master: bool = True):
    """--out_dir, or one line saying why it cannot be made (before any work). Rank 0 holds it (an
    flock on out_dir/.lock, until release_out_dirs): the same command started twice, or a resume
    of a run that is still going, would write one run's checkpoints among the other's."""
    data.make_folder(path, "--out_dir")
    if not master or path in HELD:
        return
    import fcntl
    fd = os.open(os.path.join(path, ".lock"), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        holder = os.read(fd, 64).decode(errors="replace").strip() or "?"
        os.close(fd)
        if e.errno in (errno.EAGAIN, errno.EWOULDBLOCK):
            raise SystemExit(f"--out_dir {path}: another run is writing there (pid {holder}): "
                             "wait for it to end (then --resume auto), or choose another "
                             "--out_dir") from None
        return  # (a file system without locks: run unheld)
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    HELD[path] = fd


HELD = {}  # out_dir -> the descriptor of its held .lock


def release_out_dirs():
    for fd in HELD.values():
        os.close(fd)  # (the flock goes with it)
    HELD.clear()


def refuse_to_overwrite(out_dir: str, resume: str):
    """A new run (no --resume) in a folder that holds a run's checkpoints would write over them,
    and --resume auto after a crash could then pick the older run's later steps: one line instead.
    (A torchrun restart resumes: restart_resume.)"""
    restarted = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0"
    found = sorted(glob.glob(os.path.join(out_dir, "ckpt_*.pt")))
    if found and not resume and not restarted:
        raise SystemExit(f"--out_dir {out_dir} holds a run already (up to "
                         f"{os.path.basename(found[-1])}): --resume auto continues it; for a new "
                         "run choose another --out_dir, or remove that one")


def rank_rows(micro: int, b: int, d: Dist) -> torch.Tensor:
    """Rows of the global batch's masks that belong to this rank's micro-batch: the k-th sample of
    rank r in micro-step m is global position (m * b + k) * W + r (EpochSampler's order)."""
    return (micro * b + torch.arange(b, device=d.device)) * d.world + d.rank


RUN_TIME_FIELDS = ("kernels",)  # chosen by the resuming run, whatever the checkpoint's run used
LOSS_KEYS = ("loss", "loss_a", "loss_v", "loss_inter", "loss_intra")


def global_masks(model: avmae.AVMAE, step: int, seed: int, B: int, device, view: int = 0) -> dict:
    """Masks for the whole global batch from a generator seeded by (seed, step, view): every rank
    draws the same ones and takes its rows, so results do not depend on the number of ranks and a
    resumed run draws what the uninterrupted one would have. view 1: MAViL's second masked view."""
    g = torch.Generator(device=device).manual_seed(seed * 1_000_003 + step * 2 + view)
    return model.sample_masks(B, device, generator=g)


SHAPE_FLAGS = {"a": ("audio_frames", "mel_bins", "audio_patch_t", "audio_patch_f"),
               "v": ("num_frames", "image_size", "tubelet", "patch_size", "in_chans")}


def teacher_fits(t: avmae.AVMAEConfig, model_cfg, path: str) -> None:
    """MAViL stage 2's targets are the teacher's features at each token of the student's inputs:
    the teacher must read the same modalities as the same token grids (one line if not)."""
    if model_cfg.teacher_width not in (0, t.width):
        raise SystemExit(f"--teacher_width {model_cfg.teacher_width}: the teacher {path} is "
                         f"{t.width} "
                         "wide (leave --teacher_width out: it is read from the teacher)")
    for m in model_cfg.mods:
        name = {"a": "audio", "v": "video"}[m]
        if m not in t.mods:
            raise SystemExit(f"--teacher {path}: it was pretrained without {name} (--modalities "
                             f"{t.modalities}), so it has no {name} features to predict: use a "
                             f"teacher pretrained with --modalities {model_cfg.modalities}")
        other = [k for k in SHAPE_FLAGS[m] if getattr(t, k) != getattr(model_cfg, k)]
        if other:
            raise SystemExit(f"--teacher {path}: its {name} was "
                             + " ".join(f"--{k} {getattr(t, k)}" for k in other) + ", this run's "
                             + " ".join(f"--{k} {getattr(model_cfg, k)}" for k in other)
                             + ": the targets are its features per token of the same input, so "
                             "give this run the teacher's shapes")


def load_teacher(path: str, device, ck: dict | None = None) -> avmae.AVMAE:
    """A frozen teacher (MAViL stage 2): any pretraining checkpoint (ck: already read from path),
    in eval mode, without gradients."""
    ck = ck or load_checkpoint(path, "--teacher")
    teacher = avmae.AVMAE(avmae.AVMAEConfig(**ck["model_config"]))
    teacher.load_state_dict(ck["model"])
    teacher.requires_grad_(False)
    return teacher.eval().to(device)

# -----------------------------------------------------------------------------
# the loop: one for both scripts. A script gives it a Run and three functions: the step (forward,
# backward, the gradient clipped; what was not finite; a stop asked), what follows a step
# (pictures, evaluation) and the checkpoint's state.


@dataclass
class Schedule:
    step: int             # where this run starts (a resumed run: the checkpoint's step)
    total: int
    warmup: int
    lr: float
    steps_per_epoch: int
    resumed: str | None = None  # the checkpoint it resumed from


def schedule(cfg, clips: int) -> Schedule:
    """Steps, warm-up and peak lr of a run over `clips` at --batch_size (the lr scaled linearly
    from --blr, Goyal et al.)."""
    spe = clips // cfg.batch_size
    return Schedule(0, cfg.max_steps or cfg.epochs * spe, int(cfg.warmup_epochs * spe),
                    cfg.lr or cfg.blr * cfg.batch_size / 256, spe)


def continue_from(cfg, d: "Dist", s: Schedule, path: str, ckpt: dict, flags: str):
    """A resumed run: the schedule's step and the RNGs follow the checkpoint (its model and
    optimizer states are loaded already); the flags changed since (ckpt[flags]) are said."""
    s.step, s.resumed = ckpt["step"], path
    set_rng_state(ckpt["rng"])
    say_resumed(path, s.step, ckpt.get(flags), cfg, d.master,
                (ckpt.get("steps_per_epoch"), s.steps_per_epoch))


def compiled(model, cfg):
    """torch.compile(model) in --compile's mode (a checkpoint of an older run says True/False)."""
    mode = {True: "default", False: "off"}.get(cfg.compile, cfg.compile)
    if mode == "off":
        return model
    return torch.compile(model, mode=None if mode == "default" else mode)


def checkpoint_blocks(model: torch.nn.Module) -> torch.nn.Module:
    """--checkpoint_blocks: every transformer block's forward runs under activation checkpointing
    (torch.utils.checkpoint, non-reentrant: the same RNG draws in the recomputation), so the
    backward recomputes what a block's forward would have kept."""
    from torch.utils.checkpoint import checkpoint
    for block in model.modules():
        if isinstance(block, avmae.Block):
            block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False)
    return model


def wrap(model, cfg, d: "Dist", ddp: bool = True):
    """The model as the step calls it: with --checkpoint_blocks, compiled (--compile), and
    DDP-wrapped over several ranks (FSDP shards in place instead)."""
    if getattr(cfg, "checkpoint_blocks", False):
        checkpoint_blocks(model)
    model = compiled(model, cfg)
    if d.world > 1 and ddp and not getattr(cfg, "fsdp", False):
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[d.local_rank] if d.device.type == "cuda" else None)
    return model


@dataclass
class Run:
    """What the loop works on; each script's step adds what it needs in `extra`."""
    cfg: object             # the script's flags (TrainConfig / finetune.FinetuneConfig)
    d: "Dist"
    raw: torch.nn.Module    # the model itself (checkpoints, pictures, FLOPs)
    model: torch.nn.Module  # compiled / DDP-wrapped: what the step calls
    opt: torch.optim.Optimizer
    schedule: Schedule
    stream: object          # (epoch, batch) pairs from `batches`
    per_rank: int           # clips per micro-step on this rank
    flops: float | None = None  # training FLOPs per clip, for MFU
    extra: dict = field(default_factory=dict)
    log: "Log | None" = None  # (the loop's, for the steps' hooks)


class Log:
    """log.jsonl on rank 0 and the bar's figures: every --log_every steps (and at the last) a line
    with the losses' mean over the steps since the last line, lr, clips/s, MFU, the bad clips of
    all ranks so far and the skipped steps; the events' and evaluations' lines beside."""

    def __init__(self, run: Run):
        self.run, self.path = run, os.path.join(run.cfg.out_dir, "log.jsonl")
        self.peak = peak_flops(run.d.device)
        self.sums, self.n, self.bad_clips, self.last = {}, 0, 0, {}
        self.t, self.at = time.time(), run.schedule.step
        self.board = tensorboard(run.cfg.tensorboard) if run.d.master and getattr(
            run.cfg, "tensorboard", "") else None

    def add(self, losses: dict):
        self.sums = {k: self.sums.get(k, 0.0) + v for k, v in losses.items()}
        self.n += 1

    def write(self, rec: dict):
        """A line of log.jsonl (rank 0), and its figures as TensorBoard scalars (--tensorboard)."""
        if not self.run.d.master:
            return
        append_log(self.path, rec)
        if self.board is not None:
            step = rec.get("step", rec.get("eval", {}).get("step", 0))
            for k, v in {**rec, **{f"eval/{k}": v for k, v in rec.get("eval", {}).items()}}.items():
                if isinstance(v, (int, float)) and k not in ("step", "eval/step"):
                    self.board.add_scalar(k, v, step)
            self.board.flush()

    def curves(self):
        """curves.png beside the checkpoints, from log.jsonl (rank 0)."""
        if self.run.d.master:
            path = os.path.join(self.run.cfg.out_dir, "curves.png")
            write_or_say(path, lambda: draw_curves(self.path, path))

    def line(self, step: int, skipped: int, bar) -> dict:
        run, now = self.run, time.time()
        mean = {k: v / self.n for k, v in self.sums.items()}
        clips_s = (step - self.at) * run.cfg.batch_size / max(now - self.t, 1e-9)
        bad = int(all_reduce(torch.tensor([self.bad_clips], device=run.d.device)).item())
        rec = dict(step=step, epoch=step / run.schedule.steps_per_epoch,
                   lr=run.opt.param_groups[0]["lr"], **mean, clips_per_s=clips_s,
                   mfu=clips_s * run.flops / (self.peak * run.d.world)
                   if self.peak and run.flops else None, bad_clips=bad, skipped_steps=skipped)
        bar.set_postfix({**{k: f"{v:.4f}" for k, v in mean.items()}, "lr": f"{rec['lr']:.1e}",
                         "clips/s": f"{clips_s:.0f}"}, refresh=False)  # (shown at the bar's next)
        self.write(rec)
        self.sums, self.n, self.t, self.at, self.last = {}, 0, now, step, rec
        return rec


def loop(run: Run, step_fn, after_step, state_fn, desc: str, advice: str) -> tuple:
    """Steps from the schedule's step to --stop_at (or the end): the lr of the step (times a
    group's lr_scale: layer-wise decay), step_fn(run, step, preempt) -> dict(losses, finite, stop,
    report, why, bad_clips, ...), the optimizer's step (the fused AdamW skips a step that is not
    finite on the device: nothing waits for the device before it), one read of the step's figures,
    a skipped step counted (NonFinite), a log line, after_step(run, step, r, preempt, bar, last)
    (True: stop), and a checkpoint of state_fn(run, step) every --save_every steps, at the end and
    at a stop. Out of device memory or a collective that failed is one line (`advice`: what to
    change); a signal stops after the step, with a checkpoint. Returns (step, the last
    checkpoint, the Log)."""
    cfg, d, opt, s = run.cfg, run.d, run.opt, run.schedule
    step, path = s.step, s.resumed
    stop = min(s.total, cfg.stop_at) if cfg.stop_at else s.total
    bar = progress_bar(s.total, step, desc, d.master)
    nonfinite = NonFinite(cfg.max_bad_steps, cfg.out_dir, d.master)
    log = run.log = Log(run)
    # (bar: closed, a line of its own, on any stop; the stream: its workers end with the run)
    with Preemption(log.path) as preempt, bar, contextlib.closing(run.stream):
        while step < stop:
            for g in opt.param_groups:
                g["lr"] = lr_at(step, s.total, s.warmup, s.lr, cfg.min_lr) * g.get("lr_scale", 1)
            try:
                r = step_fn(run, step, preempt)
                opt.found_inf = 1.0 - r["finite"]  # (read by the fused AdamW on the device)
                opt.step()
                opt.zero_grad(set_to_none=True)
                names = [*r["losses"], *r["report"]]
                values = dict(zip(["finite", "stop", *names], torch.stack([  # the one read
                    t.float() for t in (r["finite"], r["stop"], *r["losses"].values(),
                                        *r["report"].values())]).tolist()))
            except RuntimeError as e:
                why = step_failure(e, d, step, cfg, run.per_rank, advice)
                if why is None:
                    raise
                raise why from None
            log.bad_clips += r["bad_clips"]
            step += 1
            bar.update(1)
            if values["finite"] < 1:
                nonfinite(step - 1, r["why"](values))
                continue
            log.add({k: values[k] for k in r["losses"]})
            if step % cfg.log_every == 0 or step == stop:
                log.line(step, nonfinite.count, bar)
            r["values"] = values
            asked = after_step(run, step, r, preempt, bar, step == stop) or values["stop"] > 0
            if step % cfg.save_every == 0 or step == stop or asked:
                path = save_state(run, state_fn(run, step), step, step == stop) or path
                log.curves()
            if asked:
                bar.close()
                preempt.stop(step, path)
    return step, path, log


def save_state(run: Run, state: dict | None, step: int, final: bool) -> str | None:
    """A checkpoint of a good state (finite, ranks in sync) on rank 0, under --on_save_error."""
    cfg, d = run.cfg, run.d

    def local(p):  # an FSDP parameter is a DTensor: check this rank's shard
        return p.to_local() if hasattr(p, "to_local") else p
    if not all(torch.isfinite(local(p)).all() for p in run.raw.parameters()):
        raise SystemExit(f"step {step}: parameters are not finite; "
                         "the last good checkpoint is kept")
    if not getattr(cfg, "fsdp", False) and not ranks_in_sync(run.raw):
        raise SystemExit(f"step {step}: ranks hold different parameters")
    if not d.master:
        return None
    state = dict(state, step=step, steps_per_epoch=run.schedule.steps_per_epoch, rng=rng_state())
    return save_or_say(cfg.out_dir, state, step, cfg.keep_last, cfg.on_save_error, final)


def restart_resume(resume: str) -> str:
    """Under `torchrun --max-restarts N` a restarted job (a rank died) continues from the newest
    intact checkpoint by itself: a restart means --resume auto unless another checkpoint was
    named."""
    restarts = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    if restarts and not resume:
        print0(f"torchrun restart {restarts}: continuing from the newest intact checkpoint "
               "(--resume auto)")
        return "auto"
    return resume


def is_collective_failure(e: Exception) -> bool:
    return isinstance(e, getattr(dist, "DistError", ())) or bool(
        re.search(r"timed out|timeout|connection (closed|reset)|gloo|nccl", str(e), re.I))

# -----------------------------------------------------------------------------
# pretraining


def train(model_cfg: avmae.AVMAEConfig, cfg: TrainConfig, hooks: dict | None = None) -> dict:
    """Pretrain; returns a summary (final loss, paths). hooks['batch'](step, batch) -> batch lets
    tests inject faults."""
    need_torchrun_for_fsdp(cfg, "train.py")
    d = setup_distributed(cfg.dist_timeout)
    try:
        return pretrain(model_cfg, cfg, d, hooks or {})
    finally:
        release_out_dirs()
        if dist.is_initialized():
            dist.destroy_process_group()


def pretrain(model_cfg, cfg, d: "Dist", hooks) -> dict:
    ds = None
    if not cfg.bench:  # the data first: a set that is missing or empty is said at once
        data.ensure_data(cfg, d)
        ds = data.open_dataset(data_config(model_cfg, cfg, cfg.split, train=True))
        if len(ds) < cfg.batch_size:
            raise SystemExit(f"{cfg.data}: {len(ds)} clips are fewer than one batch of "
                             f"{cfg.batch_size}: lower --batch_size")
        refuse_to_overwrite(cfg.out_dir, cfg.resume)
        make_out_dir(cfg.out_dir, d.master)  # (a measurement writes nothing there)
    model, teacher, per_rank = build(model_cfg, cfg, d)
    if cfg.bench:
        try:
            from kernels.bench import step_speed  # (the speed alone: benchmarking's code)
            return step_speed(wrap(model, cfg, d, ddp=False), model_cfg, cfg, d,
                              per_rank)
        except torch.OutOfMemoryError as e:
            raise out_of_memory(e, d, 0, per_rank, "lower --batch_size, raise --grad_accum, or "
                                "add --fsdp", cfg.out_dir) from None
    run = setup(model_cfg, cfg, d, model, per_rank, ds)
    run.extra.update(teacher=teacher, hooks=hooks, model_cfg=model_cfg, picture=None,
                     # (what finetune.py --embed prepares a new video with)
                     inputs=dict(audio_norm=[float(v) for v in ds.norm],
                                 short_side=ds.meta.get("short_side", 256)))
    s, log_path = run.schedule, os.path.join(cfg.out_dir, "log.jsonl")
    stop = min(s.total, cfg.stop_at) if cfg.stop_at else s.total
    if s.step >= stop:  # resumed where this run stops
        print0(f"{s.resumed} is at step {s.step}, and this run stops at step {stop}: nothing to "
               "train (for more steps, raise --max_steps or --epochs, with --resume auto)")
        return dict(step=s.step, loss=float("nan"), checkpoint=s.resumed, picture=None,
                    log=log_path, last={}, in_sync=True)
    step, path, log = loop(run, pretrain_step, picture_step, pretrain_state, "pretrain",
                           "raise --grad_accum (the same global batch and results in smaller "
                           "micro-steps), lower --batch_size, or add --fsdp")
    in_sync = cfg.fsdp or ranks_in_sync(run.raw)  # (FSDP holds one copy, sharded)
    loss = log.last.get("loss", float("nan"))  # the mean over the last log line's steps
    picture = run.extra["picture"]
    shown = picture or ("none (the targets are a teacher's features, not pixels)"
                        if model_cfg.target == "teacher" else "none")
    print0(f"done: step {step}, loss {loss:.4f} | checkpoint {path} | picture {shown} "
           f"| log {log_path}"
           + (f" | {d.world} ranks in sync: {in_sync}" if d.world > 1 else ""))
    return dict(step=step, loss=loss, checkpoint=path, picture=picture, log=log_path,
                last=log.last, in_sync=in_sync)


def build(model_cfg, cfg, d: "Dist") -> tuple:
    """The model (the same initial weights on every rank; FSDP shards them as they are), the
    teacher of MAViL stage 2, and the rank's micro-batch."""
    torch.manual_seed(cfg.seed)
    per_rank = cfg.batch_size // (d.world * cfg.grad_accum)
    if per_rank * d.world * cfg.grad_accum != cfg.batch_size or per_rank == 0:
        raise SystemExit(f"--batch_size {cfg.batch_size} does not split into {d.world} ranks x "
                         f"{cfg.grad_accum} accumulation steps")
    ck = None
    if model_cfg.target == "teacher":  # (read once: checked here, built after the student)
        ck = load_checkpoint(cfg.teacher, "--teacher")
        teacher_fits(avmae.AVMAEConfig(**ck["model_config"]), model_cfg, cfg.teacher)
        model_cfg.teacher_width = ck["model_config"]["width"]
    model = avmae.AVMAE(model_cfg)
    resuming = find_checkpoint(cfg.resume or "auto", cfg.out_dir) if cfg.resume or \
        os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0" else None
    if cfg.init and not resuming:  # (a resumed run's weights are its checkpoint's)
        init_from(model, cfg.init, cfg.init_strict)
    model = model.to(d.device)
    teacher = load_teacher(cfg.teacher, d.device, ck) if cfg.teacher else None
    torch.manual_seed(cfg.seed + d.rank)  # anything drawn later differs per rank
    return model, teacher, per_rank


def init_from(model, paths: str, strict: bool) -> None:
    """--init: each tensor of the model from the first file that has one of its name and shape
    (ours, or a release avmae converts; two unimodal files fill the two modalities). Said: how
    many were loaded, and every tensor of the model that found no source and of a file that found
    no place; with strict, either is one line and a stop."""
    mine, placed, unplaced = model.state_dict(), {}, []
    for path in paths.split(","):
        for k, t in load_checkpoint(path, "--init")["model"].items():
            if k in mine and mine[k].shape == t.shape and k not in placed:
                placed[k] = t
            elif k not in placed:
                why = f"shape {tuple(t.shape)}" if k in mine else "no such tensor"
                unplaced.append(f"{k} ({why})")
    missing = [k for k in mine if k not in placed]

    def names(ks):
        return ", ".join(ks[:4]) + (f" and {len(ks) - 4} more" if len(ks) > 4 else "")
    if strict and (missing or unplaced):
        raise SystemExit(f"--init {paths}: " + "; ".join(
            x for x in (missing and f"{len(missing)} of the model's tensors have no source "
                        f"({names(missing)})", unplaced and f"{len(unplaced)} of the file's no "
                        f"place here ({names(unplaced)})") if x)
            + ": give a checkpoint of this model's shape, or --init_strict false to start those "
            "from their initialisation")
    model.load_state_dict(placed, strict=False)
    print0(f"--init: {len(placed)} of the model's {len(mine)} tensors from {paths}"
           + (f"; initialised anew: {', '.join(missing)}" if missing else "")
           + (f"; not placed: {', '.join(unplaced)}" if unplaced else ""))


def setup(model_cfg, cfg, d: "Dist", model, per_rank: int, ds: data.AVDataset) -> Run:
    """The schedule, the optimizer, a resumed state, the wrapping (FSDP / compile / DDP), the
    batches."""
    s = schedule(cfg, len(ds))
    if cfg.fsdp:
        shard(model)
    opt = optimizer(model, cfg, s.lr)
    path, ckpt = resume_from(restart_resume(cfg.resume), cfg.out_dir, d=d)
    if ckpt:
        diff = {k: (v, asdict(model_cfg).get(k)) for k, v in ckpt["model_config"].items()
                if asdict(model_cfg).get(k) != v and k not in RUN_TIME_FIELDS}
        if diff:
            raise SystemExit(f"{path} was trained with another model config: {diff}")
        load_states(model, opt, ckpt, cfg.fsdp)
        continue_from(cfg, d, s, path, ckpt, "train_config")
    stream = data.batch_stream(ds, per_rank, cfg.workers, cfg.seed, d, s.step, s.steps_per_epoch,
                               per_rank * cfg.grad_accum)
    fl = model.flops()
    print0(f"{model.num_params() / 1e6:.1f}M parameters | {len(ds)} clips, {s.steps_per_epoch} "
           f"steps/epoch, {s.total} steps | global batch {cfg.batch_size} = {d.world} ranks x "
           f"{cfg.grad_accum} x {per_rank} | lr {s.lr:.2e} | {d.device} | "
           f"{fl['forward'] / 1e9:.1f} GFLOP forward/clip")
    return Run(cfg, d, model, wrap(model, cfg, d), opt, s, stream, per_rank, fl["train"])


def pretrain_step(run: Run, step: int, preempt: "Preemption") -> dict:
    """Forward and backward over the step's micro-batches, losses and a requested stop agreed over
    ranks in one all-reduce, the gradient clipped. Returns the losses, what was not finite, the
    last micro-batch and its masks (for the picture)."""
    cfg, d, x = run.cfg, run.d, run.extra
    model_cfg, teacher = x["model_cfg"], x["teacher"]
    masks = global_masks(run.raw, step, cfg.seed, cfg.batch_size, d.device)
    masks2 = global_masks(run.raw, step, cfg.seed, cfg.batch_size, d.device,
                          view=1) if model_cfg.contrast_intra else None
    # the losses, then "a rank was asked to stop"
    sums = torch.zeros(len(LOSS_KEYS) + 1, device=d.device)
    bad_clips = 0
    for micro in range(cfg.grad_accum):
        _, batch = next(run.stream)
        batch = x["hooks"]["batch"](step, batch) if "batch" in x["hooks"] else batch
        bad_clips += len(batch["bad"])
        rows = rank_rows(micro, run.per_rank, d)
        # this micro-batch's rows of the step's masks (and of the second view's, for MAViL)
        own = {m: (keep[rows], drop[rows]) for m, (keep, drop) in masks.items()}
        own2 = None
        if masks2:
            own2 = {m: (keep[rows], drop[rows]) for m, (keep, drop) in masks2.items()}
        targets = None
        if teacher is not None:  # the teacher encodes the full, unmasked clip
            with torch.no_grad(), autocast_ctx(cfg.precision, d.device):
                encoded = teacher.encode(**{m: batch[m] for m in model_cfg.mods})
                targets = {m: t.float() for m, t in encoded.items()}
        last_micro = micro == cfg.grad_accum - 1
        # (DDP: gradients are all-reduced on the last micro-batch only)
        accumulate = not last_micro and hasattr(run.model, "no_sync")
        sync = run.model.no_sync() if accumulate else contextlib.nullcontext()
        with sync, autocast_ctx(cfg.precision, d.device):
            out = run.model(**{m: batch[m] for m in model_cfg.mods}, masks=own, targets=targets,
                            masks2=own2)
            (out["loss"] / cfg.grad_accum).backward()
        zero = torch.zeros((), device=d.device)
        sums[:-1] += torch.stack(
            [out.get(k, zero).detach().float() for k in LOSS_KEYS]) / cfg.grad_accum
    sums[-1] = float(preempt.signal is not None)  # (a signal during this step stops after it)
    sums = all_reduce(sums) / d.world
    gnorm = clip_grads(run.model, cfg)
    finite = all_reduce((torch.isfinite(sums).all() & torch.isfinite(gnorm)).float(),
                        dist.ReduceOp.MIN if dist.is_initialized() else None)
    losses = {k: sums[i] for i, k in enumerate(LOSS_KEYS) if k in out}
    return dict(losses=losses, finite=finite, stop=sums[-1],
                report=dict(audio=sums[1], video=sums[2], grad_norm=gnorm),
                why=lambda v: (f"loss {v['loss']:.4g} (audio {v['audio']:.4g}, video "
                               f"{v['video']:.4g}, grad norm {v['grad_norm']:.4g})"),
                batch=batch, masks=own, bad_clips=bad_clips)


def picture_step(run: Run, step: int, r: dict, preempt, bar, last: bool) -> bool:
    """Every --picture_every steps and at the last, the reconstruction picture of the step's first
    clip (Figure 5); a teacher's features make none."""
    cfg, d, raw, x = run.cfg, run.d, run.raw, run.extra
    mods = x["model_cfg"].mods
    if not ((cfg.picture_every and step % cfg.picture_every == 0) or last):
        return False
    if x["model_cfg"].target != "pixels" or not (d.master or cfg.fsdp):
        return False
    batch, masks = r["batch"], r["masks"]
    raw.eval()  # (an FSDP forward takes every rank)
    # reconstruction only: no contrast
    with torch.no_grad(), autocast_ctx(cfg.precision, d.device):
        o = raw(**{m: batch[m][:1] for m in mods},
                masks={m: (keep[:1], drop[:1]) for m, (keep, drop) in masks.items()},
                contrast=False)
    raw.train()
    if not d.master:
        return False
    img = reconstruction_picture(raw, {m: batch[m][:1] for m in mods}, o)
    path = os.path.join(cfg.out_dir, f"recon_{step:07d}.png")
    latest = os.path.join(cfg.out_dir, "recon_latest.png")
    ok = write_or_say(path, lambda: save_picture(img, path))
    if write_or_say(latest, lambda: save_picture(img, latest)) and ok:
        x["picture"] = path
    return False


def pretrain_state(run: Run, step: int) -> dict | None:
    """What a pretraining checkpoint holds beside the step and the RNGs (None on a rank that
    writes nothing; gathering FSDP shards takes every rank)."""
    cfg, d, spe = run.cfg, run.d, run.schedule.steps_per_epoch
    if not (d.master or cfg.fsdp):
        return None
    return dict(model=model_state(run.raw, cfg.fsdp),
                optimizer=optim_state(run.raw, run.opt, cfg.fsdp), epoch=step // spe,
                step_in_epoch=step % spe, model_config=asdict(run.extra["model_cfg"]),
                train_config=asdict(cfg), world=d.world, **run.extra["inputs"])


def main(argv=None, hooks=None):
    model_cfg, cfg = parse_args(argv)
    try:
        avmae.check_config(model_cfg)
    except ValueError as e:
        raise SystemExit(f"invalid model config: {e}")
    return train(model_cfg, cfg, hooks)


if __name__ == "__main__":
    command_line(main)
