"""
Finetuning and linear probing: audio-only, video-only and audiovisual classification (Sec. 4.1,
Tables 22-24). Shares its distributed / checkpoint / logging plumbing with train.py.

  python finetune.py --preset quick --init out/quick/ckpt_0003000.pt    # built-in data, CPU
  python finetune.py --preset quick                                     # the same from scratch
  torchrun --standalone --nproc_per_node=8 finetune.py --preset vggsound --init out/pretrain/ckpt.pt
  python finetune.py --preset audioset --modality audio --init ...      # AST on AudioSet (mAP)
  python finetune.py --preset epic --init ...                           # verb + noun heads
  python finetune.py ... --linear_probe                         # frozen encoder, linear head
  python finetune.py ... --eval_only --resume out/finetune/ckpt_0005000.pt  # evaluate a checkpoint

--modality audio|video|av; --arch mbt (default; bottleneck fusion from --fusion_layer on), encoder
(the pretraining encoder structure), vivit_fe | vivit_fsa | vivit_fdp (ViViT's factorisations,
video) or mtv (Multiview Transformer; --mtv_views, audio a view with --modality av);
--tokenlearner 8 puts 8 learned tokens per time index on the video stream. Every field of
FinetuneConfig below is a flag.
"""
import contextlib
import csv
import dataclasses
import json
import math
import os
import re
import sys
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

import avmae
import data
import train

# -----------------------------------------------------------------------------
# config


@dataclass
class FinetuneConfig:
    """Every flag of finetune.py, in -h's groups."""
    # model
    preset: str = "vggsound"      # a named recipe (PRESETS below); flags given win over it
    size: str = "base"            # model size preset (avmae.SIZES) of a model from scratch
    init: str = ""                # a pretraining checkpoint (train.py); '' = from scratch
    modality: str = "av"          # audio | video | av
    arch: str = "mbt"             # mbt | encoder (av only) | encoder_pooled (av, CAV-MAE's) |
                                  # vit (one modality, MAE's) | vivit_fe | vivit_fsa | vivit_fdp
                                  # (video only) | mtv
    temporal_layers: int = -1     # ViViT-FE's temporal / MTV's global encoder blocks; -1 = a
                                  # third of the depth (ViViT-B FE: 12 + 4)
    mtv_views: str = ""           # MTV views "v2:1,a:1,v4:0.5": modality (v with its tubelet
                                  # length), width scale; '' = v at the pretraining tubelet (1),
                                  # twice it (0.5), and audio (1) if av
    tokenlearner: int = 0         # S learned tokens per time index on the video stream (0 = off)
    tokenlearner_layer: int = -1  # after this many blocks; -1 = the middle
    mbt_head: str = "shared"      # shared: the authors' MBT (one LayerNorm
                                  # + classifier for both modalities, a loss and a mixup weight per
                                  # modality) | separate (a LayerNorm + classifier per modality, a
                                  # loss per modality) | per_modality (heads per modality, one
                                  # loss on the averaged logits, one mixup)
    pool: str = "mean"            # tokens -> the classifier's feature: mean (the papers') |
                                  # max (per channel: a short event in a long clip stays whole)
    linear_probe: bool = False    # freeze the encoder, train a linear head (Table 18)
    width: int = 0                # from scratch: the size preset's width / depth / heads unless
    depth: int = 0                # given (0), e.g. the scratch twin of a train.py --depth 4 run;
    heads: int = 0                # with --init the checkpoint's, which these must then match
    layer_scale: float = 0.0      # likewise: LayerScale's first value from scratch (0 = off)
    fusion_layer: int = -1        # MBT's first fusion layer; -1 = the
                                  # authors' (8 of 12; 16 of 24, AudioSet 18)
    inflate: str = "central"      # a video stream's tubelets from a 2-D (audio-only) checkpoint:
                                  # central (the 2-D filter on the middle frame, zeros elsewhere:
                                  # ViViT Sec. 3.4 / Table 1's best, the authors' config) |
                                  # inflate (repeated / t) | none
    bottlenecks: int = 4          # MBT's bottleneck tokens (Nagrani et al.: 4)
    unimodal_loss: float = 0.0    # MBT: weight of a loss per modality on each stream's tokens as
                                  # they enter the fusion layer (Gradient Blending); 0 = off, as the
                                  # authors
    # data
    data: str = "data/vggsound"   # a prepared set (data.py prepare); a
                                  # missing '*builtin' folder is generated
    train_split: str = "train"    # the prepared split to finetune on
    test_split: str = "test"      # the split evaluated (metrics.json, predictions.csv)
    workers: int = -1             # DataLoader workers per rank; -1 = the
                                  # cores per rank (affinity / LOCAL_WORLD_SIZE)
    num_frames: int = 32          # Table 22: 32 frames at stride 2
    frame_stride: float = 2       # in 25 fps frames
    image_size: int = 224         # frame side in pixels
    audio_frames: int = 800       # log-mel frames: 8 s (AudioSet: 10 s)
    window: str = "hann"          # log-mel window: hann (peers) | hamming (the AV-MAE paper's text)
    audio_norm: str = "none"      # log-mel normalisation: none (AV-MAE) | dataset (the set's own
                                  # mean and 2 std, meta.json) | audiomae | cavmae | "mean,scale"
    video_aug: str = "finetune"   # finetune (scale jitter, flip, colour,
                                  # the authors' ViViT / MBT) | none | rrc
    decode: str = "cpu"           # JPEG decoding: cpu (in workers) | gpu
                                  # (JPEG bytes; GPUDecoder, batched) | mixed (both)
    gpu_share: float = 0.5        # --decode mixed: the share of the batches the GPU decodes (the
                                  # workers decode the rest; each batch's clips are the same)
    seed: int = 0                 # new layers' init; augmentation and mixup = f(seed, epoch, clip)
    specaug_freq: int = 48        # frequency masks up to 48 bins (AST; the authors' VGGSound)
    specaug_freq_masks: int = 1   # how many (the authors' AudioSet config: 2 of up to 36 bins)
    specaug_time: int = 0         # the authors' code had time masks off
    time_shift: bool = False      # random circular shift of the spectrogram (AudioSet, EPIC)
    views: int = 4                # temporal views averaged at test time
    # optimisation
    batch_size: int = 64          # global batch, over all ranks (Table 22)
    grad_accum: int = 1           # micro-steps per step (the same global batch, less memory)
    epochs: int = 50              # passes over the training split (Table 22)
    max_steps: int = 0            # the run's length in steps; > 0 overrides --epochs
    warmup_epochs: float = 2.5    # linear warm-up, then cosine decay (Table 22)
    optimizer: str = "sgd"        # sgd (momentum 0.9, the paper) | adamw
    beta2: float = 0.999          # AdamW's second beta (MAViL: 0.95)
    video_lr: float = 1.0         # the video stream's lr times this (MAViL's audio+video: 0.5)
    weighted_sampling: int = 0    # clips drawn per epoch with replacement, each with weight the sum
                                  # over its labels of 1000 / (label count + 0.01) (MAViL App. B,
                                  # AudioSet's balanced sampler: 200000); 0 = every clip once
    blr: float = 3.2              # Table 22: 0.8 at batch 64 (AudioSet
                                  # 1.6 at 128; EPIC 1.2 at 64 = 4.8)
    lr: float = 0.0               # absolute; 0 = blr * batch_size / 256
    min_lr: float = 0.0           # where the cosine schedule ends
    weight_decay: float = 0.0     # AdamW / SGD weight decay on weight matrices
    layer_decay: float = 0.75     # layer-wise lr decay (BEiT / ELECTRA)
    grad_clip: float = 1.0        # gradient norm clipped to this (0 = off)
    mixup: float = 0.5            # Beta(alpha, alpha); 0 = off (the same mix for both modalities)
    label_smoothing: float = 0.3  # label smoothing of the targets (Table 22)
    drop_path: float = 0.3        # stochastic depth of the encoder's last block (Table 22)
    # run
    precision: str = "auto"       # the autocast dtype: auto (bf16 on a GPU that has it, Ampere
                                  # on; else fp32) | bf16 | fp32
    compile: str = "off"          # torch.compile the model (a GPU: faster steps after a minute):
                                  # off | default (a bare --compile) | max-autotune-no-cudagraphs
                                  # (GEMMs tuned too: minutes more) | max-autotune | reduce-overhead
    checkpoint_blocks: bool = False  # recompute each transformer block's activations in the
                                     # backward instead of keeping them (memory for compute)
    fsdp: bool = False            # shard parameters, gradients and optimizer state over the
                                  # ranks (torch fully_shard)
    kernels: str = "auto"         # auto | triton | torch (kernels/: which op runs)
    out_dir: str = "out/finetune" # checkpoints, log.jsonl, curves.png, metrics.json,
                                  # predictions.csv
    tensorboard: str = ""         # also write the log's figures here as TensorBoard scalars
                                  # (needs `pip install tensorboard`); '' = off
    resume: str = ""              # continue a run: auto (out_dir's latest intact checkpoint, if
                                  # any) or a checkpoint path; '' starts anew
    save_every: int = 1000        # steps between checkpoints (a final one is always written)
    keep_last: int = 2            # checkpoints kept (older ones are removed)
    log_every: int = 10           # steps between log.jsonl lines (the mean loss since the last)
    eval_every: int = 5           # epochs between evaluations on the test split
    eval_only: bool = False       # evaluate the --resume checkpoint and exit
    embed: str = ""               # a video file, or a folder of them: the --init model's pooled
                                  # features per modality (out_dir/embeddings_a.npy, _v.npy,
                                  # index.csv), then exit
    predict: str = ""             # a video file, or a folder of them: the --resume checkpoint's
                                  # top-5 labels for each (printed, and predict.csv), then exit
    retrieval: bool = False       # audio <-> video retrieval (R@1/5/10, median rank) on
                                  # --test_split with the --init model's pooled features, then exit
    max_bad_steps: int = 0        # non-finite losses to skip before stopping
    on_save_error: str = "retry"  # a checkpoint that cannot be written (disk
                                  # full): retry at the next save | stop
    dist_timeout: float = 1800.0  # seconds a collective may wait for
                                  # a stuck rank before the run stops
    stop_at: int = 0              # stop (with a checkpoint) after
                                  # this many steps, as if interrupted


PRESETS = {
    "vggsound": dict(),
    # the authors' AudioSet config (scenic av_mae/configs/audioset/finetune.py): SpecAugment's 2
    # frequency masks of up to 36 bins (its 4 time masks of up to 48 frames are turned off by
    # time_mask_max_ratio = 0, as in its VGGSound config), log-mels normalised by the set's own
    # statistics (theirs: normalization_mean_spec / _std_spec)
    "audioset": dict(data="data/audioset", audio_frames=1000, blr=3.2, batch_size=128,
                     time_shift=True, specaug_freq=36, specaug_freq_masks=2, audio_norm="dataset"),
    "epic": dict(data="data/epic", blr=4.8, time_shift=True),
    # a tiny model on a CPU in minutes (docs/sanity.md says why each choice): windows that cover a
    # 4 s clip (8 frames at 2 fps, 400 log-mel frames), so a short event is always in view; AdamW at
    # lr 1e-3 without layer decay, small batches (900 steps), light regularisation; MBT fused from
    # layer 2 of 4, a head and a loss per modality, and a unimodal loss before fusion (without it
    # the check set's audio stream stalls on one seed while the video solves its half of the label)
    "quick": dict(size="tiny", data="data/builtin", num_frames=8, frame_stride=12.5, image_size=64,
                  audio_frames=400, audio_norm="dataset", batch_size=8, epochs=30, warmup_epochs=2,
                  fusion_layer=2, mbt_head="separate", unimodal_loss=1.0,
                  optimizer="adamw", blr=3.2e-2, layer_decay=1.0, workers=2, drop_path=0.0,
                  label_smoothing=0.0, mixup=0.0, specaug_freq=24, views=1, eval_every=10,
                  out_dir="out/finetune_quick"),
}
# the same recipe at ViT-S on one GPU (bf16), the loader on every core, with the lr scaled by
# 1 / width from the tiny model's (64 -> 384 wide: 1e-3 -> 1.7e-4); at 1e-3 a 384-wide encoder
# stays at chance on the check set's words, at 1.7e-4 it learns them (docs/sanity.md); LayerScale
# 0.1 as in its pretraining, for the scratch twin (with --init the checkpoint's); MBT fused from
# layer 10 of 12, where the pretraining's mid-fusion encoder joins the modalities (as quick's 2 of
# 4): fused from layer 2 the audio stream reads the check set's words far worse than alone
# MAViL's AudioSet-2M recipe (Huang et al., App. B, Table 9; ViT-B): AdamW (0.9, 0.95), weight
# decay 1e-5, base lr 1e-4 per 256 at batch 512, 100 epochs of 200K clips drawn by the balanced
# sampler, 20 warm-up epochs to a 1e-6 floor, no clipping, SpecAugment 48 frequency / 192 time,
# mixup 0.5, drop path 0.1, AudioMAE's normalisation, the video stream at half the lr; its
# audio+video model: the pretrained encoders + 2 vanilla fusion layers (--arch encoder on a MAViL
# checkpoint). Not implemented: its finetuning masking (20% of each input)
PRESETS["mavil_as2m"] = dict(
    data="data/audioset", audio_frames=1024, num_frames=8, frame_stride=12.5, arch="encoder",
    optimizer="adamw", beta2=0.95, weight_decay=1e-5, blr=1e-4, batch_size=512, epochs=100,
    weighted_sampling=200_000, warmup_epochs=20, min_lr=1e-6, grad_clip=0.0, specaug_freq=48,
    specaug_time=192, mixup=0.5, drop_path=0.1, audio_norm="audiomae",
    time_shift=True, video_lr=0.5, out_dir="out/finetune_mavil")
PRESETS["quick_gpu"] = {**PRESETS["quick"], "size": "small", "workers": -1, "layer_scale": 0.1,
                        "fusion_layer": 10,
                        "blr": PRESETS["quick"]["blr"] * avmae.SIZES["tiny"]["width"]
                        / avmae.SIZES["small"]["width"],
                        "out_dir": "out/finetune_quick_gpu"}
# Tables 23, 24: audio-only finetuning mixes harder
AUDIO_ONLY_MIXUP = {"audioset": 1.25, "epic": 1.25}
MODALITY = {"audio": "a", "video": "v", "av": "av"}
# (preset, depth) -> MBT fusion layer where the authors' config differs
FUSION_LAYER = {("audioset", 24): 18}
CHOICES = dict(preset=tuple(PRESETS), size=tuple(avmae.SIZES), modality=tuple(MODALITY),
               arch=avmae.BACKBONES,  # (the table itself: a new entry counts)
               mbt_head=("shared", "separate", "per_modality"),
               pool=tuple(avmae.POOLS),
               video_aug=("finetune", "none", "rrc"), on_save_error=("retry", "stop"),
               inflate=("central", "inflate", "none"), optimizer=("sgd", "adamw"),
               precision=("auto", "bf16", "fp32"), kernels=("auto", "triton", "torch"),
               window=("hann", "hamming"), decode=("cpu", "gpu", "mixed"))


def parse_args(argv=None) -> FinetuneConfig:
    args = vars(train.build_parser(FinetuneConfig, description=__doc__,
                                   choices=CHOICES).parse_args(argv))
    preset = args.get("preset") or FinetuneConfig.preset
    if args.get("modality") == "audio" and args.get("mixup") is None and preset in AUDIO_ONLY_MIXUP:
        args["mixup"] = AUDIO_ONLY_MIXUP[preset]
    (cfg,) = train.resolve(args, PRESETS, {k: {} for k in avmae.SIZES}, FinetuneConfig)
    if cfg.init and args.get("layer_scale") is None:
        cfg.layer_scale = 0.0  # a preset's is for its scratch runs: --init brings the checkpoint's
    cfg.audio_frames, cfg.num_frames = data.fit_to_clips(cfg.data, cfg.train_split,
                                                         cfg.audio_frames, cfg.num_frames,
                                                         cfg.frame_stride, 2, 16, args)
    if cfg.arch == "encoder" and cfg.modality != "av":
        raise SystemExit("--arch encoder is the audiovisual pretraining encoder: use it with "
                         "--modality av")
    if cfg.arch.startswith("vivit") and cfg.modality != "video":
        raise SystemExit(f"--arch {cfg.arch} is one of ViViT's video models: use it with "
                         "--modality video (--arch mtv takes audio as a view)")
    if cfg.tokenlearner and (cfg.modality == "audio" or cfg.arch == "encoder"):
        raise SystemExit("--tokenlearner works on the video stream of mbt, vivit_* or mtv: use "
                         "--modality video or av")
    if cfg.mtv_views and cfg.arch != "mtv":
        raise SystemExit("--mtv_views is for --arch mtv")
    if not 0.0 <= cfg.layer_scale <= 1.0:
        raise SystemExit(f"--layer_scale {cfg.layer_scale}: LayerScale's first value is between 0 "
                         "(off) and 1")
    if cfg.unimodal_loss < 0:
        raise SystemExit(f"--unimodal_loss {cfg.unimodal_loss}: a loss weight is 0 (off) or more")
    if args.get("unimodal_loss") and (cfg.arch != "mbt" or cfg.mbt_head == "per_modality"):
        raise SystemExit("--unimodal_loss is for --arch mbt with a loss per modality (--mbt_head "
                         "shared or separate)")
    try:
        mtv_views(cfg, 2)
    except ValueError as e:
        raise SystemExit(f"--mtv_views {cfg.mtv_views!r}: {e}")
    return cfg


def mtv_views(cfg, tubelet: int) -> list:
    """[(modality, tubelet, width scale)] from --mtv_views (or its default, given the pretraining
    tubelet); an error names what is wrong."""
    spec = cfg.mtv_views or f"v{tubelet}:1,v{2 * tubelet}:0.5" + (",a:1" if cfg.modality ==
                                                                  "av" else "")
    views = []
    for item in spec.split(","):
        name, _, scale = item.strip().partition(":")
        try:
            views.append((name[0], int(name[1:]) if name[0] == "v" else 0, float(scale or 1)))
        except (ValueError, IndexError):
            raise ValueError(f"view {item!r} is not 'v<tubelet>:<scale>' or 'a:<scale>'")
        if name[0] not in "av" or (name[0] == "a" and name[1:]) or views[-1][2] <= 0:
            raise ValueError(f"view {item!r} is not 'v<tubelet>:<scale>' or 'a:<scale>'")
    mods = {m for m, _, _ in views}
    want = set(MODALITY[cfg.modality])
    if cfg.arch == "mtv" and mods != want:
        raise ValueError(f"the views' modalities {''.join(sorted(mods))} are not those of "
                         f"--modality {cfg.modality}")
    return views

# -----------------------------------------------------------------------------
# the model and the weight mapping from any pretraining strategy


SCRATCH_SHAPE = ("width", "depth", "heads", "layer_scale")  # flags for a model from scratch
# the flags that make the finetuning model: a resumed or evaluated checkpoint keeps its own
MODEL_FLAGS = ("size", *SCRATCH_SHAPE, "modality", "arch", "mbt_head", "fusion_layer",
               "bottlenecks", "temporal_layers", "mtv_views", "tokenlearner", "tokenlearner_layer",
               "unimodal_loss", "linear_probe")
FINETUNE_OWNED = ("modalities", "num_frames", "image_size", "audio_frames", "drop_path", "kernels")


def model_config(cfg: FinetuneConfig, pretrained_cfg: dict | None) -> avmae.AVMAEConfig:
    """The finetuning model's config: architecture from the checkpoint (or the size preset), input
    shapes and stochastic depth from the finetuning config."""
    known = {f.name for f in dataclasses.fields(avmae.AVMAEConfig)}
    arch = {k: v for k, v in (pretrained_cfg or {}).items()
            if k in known and k not in FINETUNE_OWNED}
    shape = {k: getattr(cfg, k) for k in SCRATCH_SHAPE if getattr(cfg, k)}
    if pretrained_cfg is not None and any(arch.get(k, 0.0) != v for k, v in shape.items()):
        raise SystemExit(f"{cfg.init}: the checkpoint's encoder is width {arch['width']}, "
                         f"depth {arch['depth']}, heads {arch['heads']}, layer scale "
                         f"{arch.get('layer_scale', 0.0)}; drop --width / --depth / --heads / "
                         "--layer_scale (they shape a model from scratch)")
    base = {**avmae.SIZES[cfg.size], **shape} if pretrained_cfg is None else arch
    model_cfg = avmae.make_config(
        "base", **{**base, "modalities": MODALITY[cfg.modality], "num_frames": cfg.num_frames,
                   "image_size": cfg.image_size, "audio_frames": cfg.audio_frames,
                   "drop_path": 0.0 if cfg.linear_probe else cfg.drop_path,
                   "kernels": cfg.kernels})
    try:
        avmae.check_shapes(model_cfg)
    except ValueError as e:
        raise SystemExit(f"invalid model config: {e}")
    return model_cfg


def build_model(cfg: FinetuneConfig, heads: dict, pretrained_cfg: dict | None):
    """The --arch backbone (avmae.BACKBONES) from the flags, the checkpoint's encoder shape, the
    preset's fusion layer."""
    model_cfg = model_config(cfg, pretrained_cfg)
    pc = pretrained_cfg and avmae.pretrained_config(pretrained_cfg)
    kept = pc and avmae.ENCODERS[pc.encoder].stream_weights(pc, pc.mods[0])["inner"]
    depth = model_cfg.depth
    options = dict(
        fusion_layer=cfg.fusion_layer if cfg.fusion_layer >= 0 else
        FUSION_LAYER.get((cfg.preset, depth), round(2 * depth / 3)),
        bottlenecks=cfg.bottlenecks, linear_probe=cfg.linear_probe, mbt_head=cfg.mbt_head,
        pool=cfg.pool,
        inner=kept[1] if kept else None,  # e.g. the mid-fusion streams' closing LayerNorm, kept
        tokenlearner=(cfg.tokenlearner, cfg.tokenlearner_layer if cfg.tokenlearner_layer >= 0
                      else depth // 2),
        temporal=cfg.temporal_layers if cfg.temporal_layers >= 0 else max(1, depth // 3),
        unimodal_loss=cfg.unimodal_loss > 0 and not cfg.linear_probe
        and cfg.mbt_head != "per_modality")
    try:
        if cfg.arch == "mtv":
            options["views"] = mtv_views(cfg, model_cfg.tubelet)
        return avmae.build_backbone(cfg.arch, model_cfg, heads, options)
    except ValueError as e:
        raise SystemExit(f"--arch {cfg.arch}: {e}")


def _resize_positions(table: torch.Tensor, src_grid: tuple, dst_grid: tuple) -> torch.Tensor:
    """A learned (N, D) position table on a token grid, interpolated to another grid (e.g. 16 -> 32
    frames). Sin-cos tables need nothing: they are rebuilt for any length."""
    D = table.shape[1]
    x = table.T.reshape(1, D, *src_grid)
    mode = {1: "linear", 2: "bilinear", 3: "trilinear"}[len(src_grid)]
    return F.interpolate(x, size=dst_grid, mode=mode, align_corners=False).reshape(D, -1).T


ENCODER_PREFIXES = ("encoder.", "patch_embed.", "enc_pos.", "type_embed.")


def map_pretrained(state: dict, pretrained_cfg: dict, model, inflate: str = "central") -> tuple:
    """Map a pretraining checkpoint's encoder into a finetuning model. Returns (state dict to load,
    report). The report lists every loaded, new and dropped tensor; it is an error if an encoder
    tensor of a finetuned modality would go unused, or if a shape does not match. MAViL and
    AV-MaskEnhancer finetune their unimodal streams: their fusion / cross-attention layers are
    dropped, and said so. A modality-type embedding (CAV-MAE) is added into the patch embedding's
    bias (a constant per token: the same function)."""
    cfg = model.cfg
    src_mods = avmae.AVMAEConfig(modalities=pretrained_cfg["modalities"]).mods
    mapping = model.weight_map(pretrained_cfg)  # destination name -> source name
    dst = model.state_dict()
    out, loaded, folded = {}, [], set()
    mbt, sources = model.FROM_STREAMS, model.stream_sources()
    if mbt and "v" in cfg.mods and "v" not in src_mods and inflate != "none":
        # an audio-only checkpoint: the video tubelet filter from the audio patch filter
        # (ViViT Sec. 3.4)
        patch = (pretrained_cfg["audio_patch_t"], pretrained_cfg["audio_patch_f"])
        if patch != (cfg.patch_size, cfg.patch_size):
            raise ValueError(f"cannot inflate a {patch[0]}x{patch[1]} "
                             f"audio patch into {cfg.patch_size}x{cfg.patch_size} video patches; "
                             "use --inflate none")
        for prefix, st, m in sources:
            if m == "v":
                out[f"{prefix}.embed.weight"] = avmae.inflate_patch_embed(
                    state["patch_embed.a.weight"], cfg.patch_size, 1,
                    st.patches.pt, cfg.in_chans, inflate)
                out[f"{prefix}.embed.bias"] = state["patch_embed.a.bias"].clone()
                loaded += [f"{prefix}.embed.weight <- {inflate}(patch_embed.a.weight)",
                           f"{prefix}.embed.bias <- patch_embed.a.bias"]
    grids = {f"{prefix}.pos.table": st.patches.grid for prefix, st, _ in sources}
    for d_name, s_name in mapping.items():
        if isinstance(s_name, tuple):  # the mean of several tensors (or one)
            t = torch.stack([state[n] for n in s_name]).mean(0)
            out[d_name] = t
            read = f"mean({', '.join(s_name)})" if len(s_name) > 1 else s_name[0]
            loaded.append(f"{d_name} <- {read}")
            continue
        if s_name not in state:
            raise ValueError(f"checkpoint has no {s_name} for {d_name}: it does not match its own "
                             f"config {pretrained_cfg}")
        t = state[s_name]
        how = ""
        if d_name.endswith("pos.table") and t.shape != dst[d_name].shape:
            src_grid = avmae.PATCHES[s_name.split(".")[1]](avmae.AVMAEConfig(**pretrained_cfg)).grid
            t, how = _resize_positions(t, src_grid, grids[d_name]), "resized "
        if s_name == "patch_embed.v.weight" and t.shape != dst[d_name].shape and \
                t.shape[1] % (cfg.patch_size ** 2 * cfg.in_chans) == 0:
            # another tubelet length (an MTV view): the 2-D filter (the sum over the tubelet's
            # frames) re-inflated, so a still clip embeds as before
            p2 = cfg.patch_size ** 2 * cfg.in_chans
            w2d = t.reshape(t.shape[0], -1, p2).sum(1)
            tub = dst[d_name].shape[1] // p2
            t = avmae.inflate_patch_embed(w2d, cfg.patch_size, cfg.in_chans, tub, cfg.in_chans)
            how = f"re-inflated to {tub} frames "
        if t.shape != dst[d_name].shape:
            raise ValueError(f"{s_name} has shape {tuple(t.shape)} but {d_name} needs "
                             f"{tuple(dst[d_name].shape)}: the checkpoint and the finetuning "
                             "model disagree (width, patch size or input shape)")
        embed_bias = s_name.startswith("patch_embed.") and s_name.endswith(".bias")
        fold = None
        if pretrained_cfg.get("type_embed") and embed_bias:
            fold = f"type_embed.{s_name.split('.')[1]}"
        if fold:  # a constant per token: the same function when added into the embedding's bias
            t = t + state[fold]
            folded.add(fold)
        out[d_name] = t
        loaded.append(f"{d_name} <- {how}{s_name}" + (f" + {fold}" if fold else ""))
    used = {n for s_name in mapping.values()
            for n in (s_name if isinstance(s_name, tuple) else (s_name,))} | folded
    new = sorted(k for k in dst if k not in out)
    dropped = sorted(k for k in state if k not in used)
    # (an MTV without a view of the checkpoint's width for a modality leaves that stream unused)
    other = set(src_mods) - {m for _, _, m in sources} if mbt else set(src_mods) - set(cfg.mods)
    by_design = model.dropped_by_design(pretrained_cfg)
    def of_other(k):
        return any(f".{m}." in k or k.endswith(f".{m}") for m in other)
    encoder_unused = [k for k in dropped if k.startswith(ENCODER_PREFIXES)
                      and not k.startswith(by_design) and not of_other(k)]
    if encoder_unused:
        raise ValueError(f"pretrained encoder tensors would go unused: {encoder_unused[:8]}"
                         f"{' ...' if len(encoder_unused) > 8 else ''}")
    report = dict(loaded=loaded, new=new, dropped=dropped,
                  dropped_why={"decoder": "the decoder is only for pretraining",
                               "other modality": sorted(filter(of_other, dropped)),
                               "fusion": sorted(k for k in dropped
                                                if by_design and k.startswith(by_design))})
    return out, report

# -----------------------------------------------------------------------------
# metrics (Sec. 4.1): top-1/5, mAP, AUC, d', EPIC action accuracy


def topk_accuracy(logits: torch.Tensor, y: torch.Tensor, k: int = 1) -> float:
    top = logits.topk(min(k, logits.shape[1]), dim=1).indices
    return (top == y[:, None]).any(1).float().mean().item()


def average_precision(scores: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-class AP, (N, C) scores and {0, 1} targets; tied scores count as one threshold (as
    sklearn's average_precision_score); NaN for classes without positives."""
    aps = []
    for c in range(scores.shape[1]):
        s, t = scores[:, c].double(), y[:, c].double()
        if t.sum() == 0:
            aps.append(float("nan"))
            continue
        order = torch.argsort(s, descending=True)
        s, t = s[order], t[order]
        last = torch.cat([s[1:] != s[:-1], torch.tensor([True])])  # the last row of each tied group
        tp = torch.cumsum(t, 0)[last]
        fp = torch.cumsum(1 - t, 0)[last]
        precision, recall = tp / (tp + fp), tp / t.sum()
        aps.append(torch.sum(torch.diff(torch.cat([torch.zeros(1, dtype=recall.dtype),
                                                   recall])) * precision).item())
    return torch.tensor(aps)


def roc_auc(scores: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-class ROC AUC by the rank statistic (ties get their average rank); NaN where a class has
    no positives or no negatives."""
    out = []
    for c in range(scores.shape[1]):
        s, t = scores[:, c].double(), y[:, c].bool()
        n_pos, n_neg = int(t.sum()), int((~t).sum())
        if n_pos == 0 or n_neg == 0:
            out.append(float("nan"))
            continue
        _, inv, counts = torch.unique(s, return_inverse=True, return_counts=True)
        first = torch.cumsum(counts, 0) - counts
        ranks = (first + (counts + 1) / 2.0)[inv]  # average 1-based ranks
        out.append(((ranks[t].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)).item())
    return torch.tensor(out)


def d_prime(auc: float) -> float:
    """d' = sqrt(2) * Phi^-1(AUC) (AudioSet's convention)."""
    return math.sqrt(2.0) * torch.special.ndtri(torch.tensor(auc, dtype=torch.float64)).item()


def retrieval_metrics(queries: torch.Tensor, items: torch.Tensor, name: str,
                      classes: torch.Tensor | None = None) -> dict:
    """Row i of queries should find row i of items: by cosine similarity, each query's rank of its
    own item (1 = first; ties counted against it) -> R@1 / R@5 / R@10 (the share of queries whose
    item is among the first k) and the median rank, as CAV-MAE reports retrieval (Sec. 4.3). With
    classes (one per row), also {name}_class_R@k: a hit when an item of the query's class is among
    the first k (its own included)."""
    q, x = F.normalize(queries.float(), dim=-1), F.normalize(items.float(), dim=-1)
    sim = q @ x.T
    own = sim.diagonal().unsqueeze(1)
    rank = (sim >= own).sum(1)  # (its own item counts: rank 1 when nothing scores as high)
    out = {f"{name}_R@{k}": (rank <= k).float().mean().item() for k in (1, 5, 10)}
    out[f"{name}_median_rank"] = rank.float().median().item()
    if classes is not None:
        same = classes[None, :] == classes[:, None]
        top = sim.argsort(1, descending=True)
        for k in (1, 5, 10):
            out[f"{name}_class_R@{k}"] = same.gather(1, top[:, :k]).any(1).float().mean().item()
    return out


def pretrained_model(cfg: "FinetuneConfig", d: train.Dist, flag: str,
                     audiovisual: bool = False) -> avmae.AVMAE:
    """The --init pretraining (avmae.load: ours or a converted release) on the device, or one
    line saying what to pass."""
    if not cfg.init:
        raise SystemExit(f"{flag} needs a pretrained model: pass --init CKPT (a train.py "
                         "checkpoint or a converted release)")
    try:
        model = avmae.load(cfg.init, kernels=cfg.kernels).to(d.device)
    except ValueError as e:
        raise SystemExit(f"--init {e}")
    if not isinstance(model, avmae.AVMAE) or audiovisual and model.cfg.mods != ("a", "v"):
        kind = "an audiovisual" if audiovisual else "a"
        raise SystemExit(f"--init {cfg.init}: {flag} takes {kind} pretraining (train.py's, or a "
                         "converted release); a finetuned model labels videos: --predict")
    return model


def retrieve(cfg: "FinetuneConfig", d: train.Dist) -> dict:
    """finetune.py --retrieval: the --init model's pooled unimodal features (each modality
    encoded alone: no pairing leaks into them; for CAV-MAE and MAViL the representation their
    contrast reads) of every --test_split clip, one central view; audio -> video and video ->
    audio retrieval among them. Written to out_dir/retrieval.json."""
    model = pretrained_model(cfg, d, "--retrieval", audiovisual=True)
    mc = model.cfg
    data.ensure_data(cfg, d)
    ds = data.open_dataset(data.DataConfig(
        root=cfg.data, split=cfg.test_split, train=False, views=1, modalities="av",
        num_frames=mc.num_frames, image_size=mc.image_size, audio_frames=mc.audio_frames,
        mel_bins=mc.mel_bins, **{f.name: getattr(cfg, f.name)
                                 for f in dataclasses.fields(data.LoadOptions)}))
    loader = data.Loader(ds, batch_size=cfg.batch_size, num_workers=min(cfg.workers, 4),
                         collate_fn=data.collate)
    head = next(iter(ds.heads), None)  # (classes: the first head's, for the class figures)
    feats, labels = {"a": [], "v": []}, []
    bar = train.progress_bar(len(loader), 0, "retrieval", d.master)
    batches = data.on_device(((None, b) for b in loader), d.device)
    with contextlib.closing(loader), bar, torch.no_grad(), \
            train.autocast_ctx(cfg.precision, d.device):
        for _, b in batches:
            keep = ~b["replaced"].bool().cpu()  # (an unreadable clip's stand-in is left out)
            for m in "av":
                x = b[m].flatten(0, 1)  # (one view)
                feats[m].append(model.encode(**{m: x})[m].float().mean(1).cpu()[keep])
            if head is not None:
                t = b[head].cpu() if torch.is_tensor(b[head]) else torch.tensor(b[head])
                labels.append((t.argmax(1) if t.dim() > 1 else t)[keep])
            bar.update(1)
    a, v = torch.cat(feats["a"]), torch.cat(feats["v"])
    c = torch.cat(labels) if labels else None  # (an unlabelled set: instance-level figures)
    res = {**retrieval_metrics(a, v, "a2v", c), **retrieval_metrics(v, a, "v2a", c),
           "clips": len(a)}
    if d.master:
        train.make_out_dir(cfg.out_dir)
        path = os.path.join(cfg.out_dir, "retrieval.json")
        train.write_or_say(path, lambda: json.dump(res, open(path, "w"), indent=1))
        train.print0(json.dumps(res))
    return res


def video_files(path: str, flag: str = "--predict") -> list:
    """A file, or every video file under a folder (data.read_folder's), or one line saying what
    is wrong."""
    if os.path.isfile(path):
        return [path]
    if not os.path.isdir(path):
        raise SystemExit(f"{flag} {path}: no such file or folder")
    found = [os.path.join(path, r.src[0]) for r in data.read_folder(path)]
    if not found:
        raise SystemExit(f"{flag} {path}: no video files ({', '.join(data.VIDEO_FILES)}) in it")
    return found


def prepare_videos(files: list, out: str, labels: dict, multi_label: bool, short_side: int,
                   allow_silent: bool, workers: int, flag: str) -> dict:
    """The files as the test split of a prepared set in out (data.prepare: the training
    pipeline's clips), each under an id of its own -> {id: file}. A file that cannot be read is
    said with the reason; none readable is one line and a stop."""
    used, records = set(), []
    for i, f in enumerate(files):
        rid = re.sub(r"[^\w.-]", "_", os.path.splitext(os.path.basename(f))[0]) or "clip"
        rid = rid if rid not in used else f"{rid}_{i}"
        used.add(rid)
        records.append(data.Record(rid, (os.path.abspath(f),), None, None,
                                   {h: [names[0]] for h, names in labels.items()}, "test"))
    data.prepare(records, "/", out, labels, multi_label, flag.strip("-"),
                 workers=max(1, min(workers, len(files))), short_side=short_side,
                 allow_silent=allow_silent)
    by_id = {r.id: f for r, f in zip(records, files)}
    failed = [r for r in csv.reader(open(os.path.join(out, "failed_test.csv"))) if r[0] != "id"]
    for rid, _, why in failed:
        train.print0(f"{by_id.get(rid, rid)}: not read ({why})", file=sys.stderr)
    if len(failed) == len(files):
        raise SystemExit(f"{flag}: none of the {len(files)} files could be read (the reasons "
                         "above)")
    return by_id


def predict(cfg: "FinetuneConfig", d: train.Dist) -> list:
    """finetune.py --predict PATH --resume CKPT: each video prepared as the training set's clips
    were (the checkpoint keeps the short side, the window, the audio statistics and the label
    names), its views' logits averaged as evaluation does, the top-5 labels printed with their
    scores and written to out_dir/predict.csv. A file that cannot be read is listed with the
    reason; the rest go on."""
    import tempfile
    if not cfg.resume:
        raise SystemExit("--predict labels videos with a finetuned model: pass --resume CKPT "
                         "(a finetune.py checkpoint)")
    path = train.find_checkpoint(cfg.resume, cfg.out_dir)
    ck = train.load_checkpoint(path, "--resume", "finetuning")
    if "labels" not in ck or "backbone" not in ck:
        raise SystemExit(f"--resume {path}: written by an earlier avmae, without its label names "
                         "and audio statistics: finetune anew to predict with it")
    try:
        model = avmae.load(path, kernels=cfg.kernels).to(d.device)
    except ValueError as e:
        raise SystemExit(f"--resume {e}")
    files, was = video_files(cfg.predict), ck["finetune_config"]
    with tempfile.TemporaryDirectory() as tmp:
        by_id = prepare_videos(files, tmp, ck["labels"], ck["multi_label"], ck["short_side"],
                               model.cfg.mods == ("v",), cfg.workers, "--predict")
        mean, scale = ck["audio_norm"]
        ds = data.open_dataset(data.DataConfig(
            root=tmp, split="test", train=False, views=was["views"],
            modalities=MODALITY[was["modality"]], num_frames=was["num_frames"],
            image_size=was["image_size"], audio_frames=was["audio_frames"],
            mel_bins=model.cfg.mel_bins, frame_stride=was["frame_stride"], window=was["window"],
            audio_norm=f"{mean},{scale}", decode=cfg.decode))
        res = evaluate(model, ds, dataclasses.replace(cfg, views=was["views"]), d, model.mods,
                       stop=None, scores_only=True)
    rows = []
    for rid, clip in res.items():
        row = dict(file=by_id[rid])
        line = []
        for h, p in clip.items():
            top = p.topk(min(5, len(p)))
            names = [ck["labels"][h][j] for j in top.indices.tolist()]
            row[f"{h}_top5"] = ";".join(names)
            row[f"{h}_scores"] = ";".join(f"{v:.4f}" for v in top.values.tolist())
            line.append(", ".join(f"{n} {v:.3f}" for n, v in zip(names, top.values.tolist())))
        rows.append(row)
        train.print0(f"{row['file']}: {' | '.join(line)}")
    if d.master and rows:
        train.make_out_dir(cfg.out_dir)
        out = os.path.join(cfg.out_dir, "predict.csv")

        def write():
            with open(out, "w", newline="") as f:
                w = csv.DictWriter(f, fieldnames=list(rows[0]))
                w.writeheader()
                w.writerows(rows)
        if train.write_or_say(out, write):
            train.print0(f"{len(rows)} files labelled: {out}")
    return rows


def embed(cfg: "FinetuneConfig", d: train.Dist) -> dict:
    """finetune.py --embed PATH --init CKPT: each video prepared as training prepares clips (a
    train.py checkpoint keeps its short side, window and audio statistics; for a converted
    release the flags say), one central window, the encoder's output on both modalities (split by
    modality: a fused encoder's fused tokens) mean-pooled, batched on the device. Writes
    embeddings_{a,v}.npy (row i: index.csv's row i) to out_dir."""
    import tempfile
    model = pretrained_model(cfg, d, "--embed")
    ck = train.load_checkpoint(cfg.init, "--init")
    was, mc = ck.get("train_config") or {}, model.cfg
    norm = ck.get("audio_norm")
    files = video_files(cfg.embed, "--embed")
    with tempfile.TemporaryDirectory() as tmp:
        by_id = prepare_videos(files, tmp, {"label": ["none"]}, False,
                               ck.get("short_side", 256), mc.mods == ("v",), cfg.workers,
                               "--embed")
        ds = data.open_dataset(data.DataConfig(
            root=tmp, split="test", train=False, views=1, modalities=mc.modalities,
            num_frames=mc.num_frames, image_size=mc.image_size, audio_frames=mc.audio_frames,
            mel_bins=mc.mel_bins, frame_stride=was.get("frame_stride", cfg.frame_stride),
            window=was.get("window", cfg.window),
            audio_norm=f"{norm[0]},{norm[1]}" if norm else cfg.audio_norm, decode=cfg.decode))
        loader = data.Loader(ds, batch_size=cfg.batch_size, num_workers=min(cfg.workers, 4),
                             collate_fn=data.collate)
        feats, ids = {m: [] for m in mc.mods}, []
        bar = train.progress_bar(len(loader), 0, "embed", d.master)
        batches = data.on_device(((None, b) for b in loader), d.device)
        with contextlib.closing(loader), bar, torch.no_grad(), \
                train.autocast_ctx(cfg.precision, d.device):
            for _, b in batches:
                keep = ~b["replaced"].bool().cpu()
                out = model.encode(**{m: b[m].flatten(0, 1) for m in mc.mods})
                for m in mc.mods:
                    feats[m].append(out[m].float().mean(1).cpu()[keep])
                ids += [i for i, k in zip(b["id"], keep.tolist()) if k]
                bar.update(1)
    train.make_out_dir(cfg.out_dir, d.master)
    res = dict(files=len(ids), dim=mc.width)
    if d.master:
        for m in mc.mods:
            np.save(os.path.join(cfg.out_dir, f"embeddings_{m}.npy"),
                    torch.cat(feats[m]).numpy())
        with open(os.path.join(cfg.out_dir, "index.csv"), "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["row", "file", "id"])
            w.writerows((i, by_id[cid], cid) for i, cid in enumerate(ids))
        train.print0(f"{len(ids)} of {len(files)} files embedded ({', '.join(mc.mods)}: "
                     f"{mc.width} each) into {cfg.out_dir}: embeddings_*.npy, index.csv")
    return res


def metrics(logits: dict, targets: dict, multi_label: bool) -> dict:
    """logits / targets per head; EPIC's verb + noun give action = both right."""
    out = {}
    for h, z in logits.items():
        y = targets[h]
        if multi_label:
            p = torch.sigmoid(z.float())
            ap, auc = average_precision(p, y), roc_auc(p, y)
            out[f"{h}_mAP"] = float(np.nanmean(ap.numpy()))
            out[f"{h}_AUC"] = float(np.nanmean(auc.numpy()))
            out[f"{h}_dprime"] = d_prime(out[f"{h}_AUC"])
        else:
            out[f"{h}_top1"], out[f"{h}_top5"] = topk_accuracy(z, y, 1), topk_accuracy(z, y, 5)
    if {"verb", "noun"} <= set(logits):
        right = ((logits["verb"].argmax(1) == targets["verb"])
                 & (logits["noun"].argmax(1) == targets["noun"]))
        out["action_top1"] = right.float().mean().item()
    return out

# -----------------------------------------------------------------------------
# optimisation


def param_groups(model, cfg: FinetuneConfig, lr: float):
    """Layer-wise lr decay (BEiT, MAE's lr_decay.py): lr * decay^(top + 1 - depth), with each
    parameter's depth as the model states it (model.layer_ids(): embeddings 0, its blocks
    1..n_layers along a token's path), applied, as MAE's and the authors' code (scenic
    av_mae/optimizer_utils.py, `_get_layer_id`) apply it, to the embeddings and the transformer
    blocks only: final norms, bottleneck tokens, TokenLearners and heads train at the full rate.
    The video stream's rate times --video_lr (MAViL). No weight decay on biases, norms and
    tokens."""
    groups, ids, top = {}, model.layer_ids(), model.n_layers
    in_block = {f"{name}.{k}" for name, mod in model.named_modules()
                if isinstance(mod, (avmae.Block, avmae.CrossBlock)) for k, _ in
                mod.named_parameters()}
    for n, p in model.named_parameters():
        if not p.requires_grad:
            continue
        depth = ids[n] if ids[n] == 0 or n in in_block else top + 1
        wd = cfg.weight_decay if p.ndim >= 2 and n != "bottleneck" else 0.0
        video = cfg.video_lr if re.match(r"(\w+\.)?(streams|patch_embed)\.v\.", n) else 1.0
        g = groups.setdefault((depth, wd, video), dict(
            params=[], weight_decay=wd, lr_scale=cfg.layer_decay ** (top + 1 - depth) * video))
        g["params"].append(p)
    return list(groups.values())


def mixup(batch: dict, mods, heads: dict, alpha: float, multi_label: bool, gen: torch.Generator,
          per_modality: bool = False):
    """Mix each clip with another of the batch (one permutation). Returns (mixed batch, soft targets
    {head: (B, classes)}). per_modality (the authors' MBT): each modality draws its own weight and
    gets its own mixed targets, returned as {modality: {head: targets}}."""
    B = batch[mods[0]].shape[0]
    targets = {h: batch[h].float() if multi_label else F.one_hot(batch[h], n).float()
               for h, n in heads.items()}
    if alpha <= 0:
        return batch, ({m: targets for m in mods} if per_modality else targets)
    rng = np.random.default_rng(int(torch.randint(2**31, (1,), generator=gen)))
    lams = {m: float(rng.beta(alpha, alpha)) for m in (mods if per_modality else mods[:1])}
    perm = torch.randperm(B, generator=gen).to(batch[mods[0]].device)
    batch = dict(batch)
    for m in mods:
        lam = lams.get(m, lams[mods[0]])
        batch[m] = lam * batch[m] + (1 - lam) * batch[m][perm]
    mixed = {m: {h: lam * t + (1 - lam) * t[perm] for h, t in targets.items()}
             for m, lam in lams.items()}
    return batch, (mixed if per_modality else mixed[mods[0]])


def loss_fn(logits: dict, targets: dict, multi_label: bool, smoothing: float) -> torch.Tensor:
    """Cross-entropy (single label) or binary cross-entropy (multi-label), both on label-smoothed
    targets (on 1 - s + s/C, off s/C, as the authors' code smooths either; AudioSet s = 0.3,
    Table 24); each a clip's loss summed over its classes, averaged over clips (the authors'
    weighted_sigmoid_cross_entropy: zero logits give C ln 2 a clip, 365.29 on AudioSet), and
    averaged over heads (EPIC's verb and noun, as the authors' MBT code does)."""
    total = 0.0
    for h, z in logits.items():
        t = targets[h]
        t = t * (1 - smoothing) + smoothing / t.shape[1]
        if multi_label:
            each = F.binary_cross_entropy_with_logits(z.float(), t, reduction="none")
        else:
            each = -t * F.log_softmax(z.float(), dim=1)
        total = total + each.sum(1).mean()
    return total / len(logits)


def finetune_loss(logits: dict, targets: dict, per_modality: bool, multi_label: bool,
                  smoothing: float, device=None, unimodal: float = 0.0) -> torch.Tensor:
    """per_modality (the authors' MBT): each modality's logits {m: {head: logits}} against its own
    mixed targets {m: {head: targets}}, the losses averaged over modalities; otherwise one loss on
    the averaged logits. MBT's unimodal heads' logits ("a_alone", "v_alone") add `unimodal` times
    their average loss, against their modality's targets."""
    def to(t):
        return {h: x.to(device) for h, x in t.items()}
    if not per_modality:
        return loss_fn(logits, to(targets), multi_label, smoothing)
    def mean_loss(names):
        return sum(loss_fn(logits[m], to(targets[m.split("_")[0]]), multi_label, smoothing)
                   for m in names) / len(names)
    alone = [m for m in logits if m not in targets]
    loss = mean_loss([m for m in logits if m in targets])
    return loss + unimodal * mean_loss(alone) if alone else loss

# -----------------------------------------------------------------------------
# evaluation


@torch.no_grad()
def evaluate(model, ds: data.AVDataset, cfg, d: train.Dist, mods,
             out_dir: str | None = None, stop=None, scores_only: bool = False) -> dict | None:
    """N evenly spaced views per clip, logits averaged; every clip once over all ranks. Writes
    predictions.csv and per_class.csv to out_dir (rank 0). None, on every rank, where stop() (a
    scheduler's signal, Ctrl-C) turned true on any rank before its last batch: the checkpoint comes
    first, within the scheduler's grace time, not after the whole test set."""
    model.eval()
    idx = list(range(d.rank, len(ds), d.world))
    # every rank the same number of batches (an FSDP forward, and the agreed stop, take every
    # rank): a rank one clip short takes its last clip again, left out of the metrics
    pad = -(-len(ds) // d.world) - len(idx)
    padded = torch.tensor([False] * len(idx) + [True] * pad)
    idx += [idx[-1] if idx else 0] * pad
    at = 0
    loader = data.Loader(torch.utils.data.Subset(ds, idx),
                         batch_size=max(1, cfg.batch_size // d.world),
                         num_workers=min(cfg.workers, 4), collate_fn=data.collate)
    ids, logits, targets = [], {h: [] for h in ds.heads}, {h: [] for h in ds.heads}
    gpu = data.GPUDecoder(ds, d.device) if ds.cfg.decode == "gpu" else None
    stopped, unreadable = False, []
    # (--decode gpu: the next batch decoded beside this one's forward pass)
    batches = data.on_device(((None, b) for b in _or_stop(loader)), d.device, gpu)
    # (its workers, and the decode ahead, end here, however the loop ends)
    with contextlib.closing(loader), contextlib.closing(batches):
        for _, b in batches:
            asked = torch.tensor([float(stop is not None and stop())], device=d.device)
            if train.all_reduce(asked, dist.ReduceOp.MAX if dist.is_initialized() else None):
                stopped = True
                break
            # an unreadable clip's stand-in (the next readable clip) is left out: that clip is
            # evaluated at its own turn, and counting it twice would bias the metrics
            keep = ~b["replaced"].bool().cpu() & ~padded[at:at + len(b["id"])]
            at += len(b["id"])
            unreadable += [i for i, _ in b["bad"]]
            V = cfg.views
            x = {m: b[m].flatten(0, 1) for m in mods}  # (B * V, ...)
            with train.autocast_ctx(cfg.precision, d.device):
                out = model(**x)
            for h in ds.heads:
                logits[h].append(out[h].float().view(-1, V, out[h].shape[-1]).mean(1).cpu()[keep])
                t = b[h].cpu() if torch.is_tensor(b[h]) else torch.tensor(b[h])
                targets[h].append(t[keep])
            ids += [i for i, k in zip(b["id"], keep.tolist()) if k]
    local = (ids, {h: torch.cat(v) if v else None for h, v in logits.items()},
             {h: torch.cat(v) if v else None for h, v in targets.items()}, stopped, unreadable)
    if dist.is_initialized():
        parts = [None] * d.world
        dist.all_gather_object(parts, local)
    else:
        parts = [local]
    model.train()
    if any(p[3] for p in parts):
        return None
    ids = [i for p in parts for i in p[0]]
    unreadable = sorted({i for p in parts for i in p[4]})
    if unreadable:
        train.print0(f"{len(unreadable)} test clip(s) could not be read and are left out of the "
                     f"metrics: {', '.join(unreadable[:5])}{', ...' * (len(unreadable) > 5)}",
                     file=sys.stderr)
    # (a rank with no clip: fewer test clips than ranks)
    logits = {h: torch.cat([p[1][h] for p in parts if p[1][h] is not None]) for h in ds.heads}
    targets = {h: torch.cat([p[2][h] for p in parts if p[2][h] is not None]) for h in ds.heads}
    if scores_only:  # {clip: {head: its scores}}, as predictions.csv scores them
        return {cid: {h: scores(logits[h][i], ds.multi_label) for h in ds.heads}
                for i, cid in enumerate(ids)}
    res = metrics(logits, targets, ds.multi_label)
    res["clips"] = len(ids)
    if unreadable:
        res["unreadable_clips"] = len(unreadable)
    if hasattr(model, "flops"):  # the backbone's forward pass on every test view of one clip
        res["gflop_per_clip"] = round(model.flops()["forward"] * cfg.views / 1e9, 4)
    if out_dir and d.master:
        train.write_or_say(reports_path(out_dir),
                           lambda: write_reports(out_dir, ids, logits, targets, ds))
    return res


def _or_stop(loader):
    """The loader's batches; one line where no clip can be read."""
    try:
        yield from loader
    except data.DataUnusable as e:
        raise data.unusable(e) from None


def reports_path(out_dir: str) -> str:
    return os.path.join(out_dir, "predictions.csv") + " and per_class.csv"


def scores(z: torch.Tensor, multi_label: bool) -> torch.Tensor:
    """A clip's logits -> its scores: a sigmoid per class (multi-label) or the softmax."""
    z = z.float()
    return torch.sigmoid(z) if multi_label else torch.softmax(z, 0)


def write_reports(out_dir, ids, logits, targets, ds):
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "predictions.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id"] + [f"{h}_{k}" for h in ds.heads for k in ("true", "top5", "scores")])
        for i, cid in enumerate(ids):
            row = [cid]
            for h in ds.heads:
                p = scores(logits[h][i], ds.multi_label)
                top = p.topk(min(5, len(p)))
                t = targets[h][i]
                if ds.multi_label:
                    true = ";".join(str(j) for j in t.nonzero()[:, 0].tolist())
                else:
                    true = str(int(t))
                row += [true, ";".join(map(str, top.indices.tolist())),
                        ";".join(f"{v:.4f}" for v in top.values.tolist())]
            w.writerow(row)
    with open(os.path.join(out_dir, "per_class.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["head", "class", "name", "clips", "AP" if ds.multi_label else "top1"])
        for h, names in ds.heads.items():
            z, t = logits[h].float(), targets[h]
            ap = average_precision(torch.sigmoid(z), t) if ds.multi_label else None
            for c, name in enumerate(names):
                if ds.multi_label:
                    w.writerow([h, c, name, int(t[:, c].sum()), f"{ap[c].item():.4f}"])
                else:
                    sel = t == c
                    acc = (z[sel].argmax(1) == c).float().mean().item() if sel.any() else math.nan
                    w.writerow([h, c, name, int(sel.sum()), f"{acc:.4f}"])

# -----------------------------------------------------------------------------
# the loop


def main(argv=None) -> dict:
    cfg = parse_args(argv)
    d = train.setup_distributed(cfg.dist_timeout)
    try:
        if cfg.predict or cfg.embed:
            return predict(cfg, d) if cfg.predict else embed(cfg, d)
        return retrieve(cfg, d) if cfg.retrieval else finetune(cfg, d)
    finally:
        train.release_out_dirs()
        if dist.is_initialized():
            dist.destroy_process_group()


def load_init(cfg: FinetuneConfig, model, ck: dict, out_dir: str, master: bool):
    """Load a pretraining checkpoint's encoder into the model; write the load report."""
    try:
        state, report = map_pretrained(ck["model"], ck["model_config"], model, cfg.inflate)
    except ValueError as e:
        raise SystemExit(f"{cfg.init}: {e}")
    missing, unexpected = model.load_state_dict(state, strict=False)
    # (BatchNorm fills that in)
    new = {k for k in report["new"] if not k.endswith("num_batches_tracked")}
    assert not unexpected and set(missing) == new, (unexpected, set(missing) ^ new)
    other = ", other modality" if report["dropped_why"]["other modality"] else ""
    train.print0(f"loaded {len(report['loaded'])} tensors from {cfg.init}; new: {report['new']}; "
                 f"dropped {len(report['dropped'])} (decoder{other})")
    if master:
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, "load_report.json"), "w") as f:
            json.dump(report, f, indent=1)


def setup(cfg: FinetuneConfig, d: train.Dist) -> train.Run:
    """Data, model (from the checkpoint, or resumed), optimiser with layer-wise decay, schedule:
    the loop's Run, whose `extra` holds the sets, the heads and the pretraining's config."""
    torch.manual_seed(cfg.seed)
    mods = avmae.AVMAEConfig(modalities=MODALITY[cfg.modality]).mods
    data.ensure_data(cfg, d)
    train.refuse_to_overwrite(cfg.out_dir, cfg.resume)
    ckpt_path, resumed = train.resume_from(train.restart_resume(cfg.resume), cfg.out_dir,
                                           "finetuning", d)
    if cfg.eval_only and not resumed:
        raise SystemExit("--eval_only evaluates a finetuned checkpoint: pass --resume CKPT (or "
                         "--resume auto with that finetuning's --out_dir)")
    was = (resumed or {}).get("finetune_config") or {}
    other = [k for k in MODEL_FLAGS if k in was and was[k] != getattr(cfg, k)]
    if other:
        raise SystemExit(f"{ckpt_path}: its model was made with "
                         + " ".join(f"--{k} {was[k]}" for k in other) + " (this run: "
                         + " ".join(f"--{k} {getattr(cfg, k)}" for k in other)
                         + "); resume or evaluate it with the flags it was made with")
    ck = train.load_checkpoint(cfg.init, "--init") if cfg.init and not resumed else None
    pretrained_cfg = resumed.get("pretrain_config") if resumed else ck and ck["model_config"]
    data_kw = dict(root=cfg.data, modalities=MODALITY[cfg.modality], num_frames=cfg.num_frames,
                   image_size=cfg.image_size, audio_frames=cfg.audio_frames,
                   mel_bins=(pretrained_cfg or {}).get("mel_bins", 128),
                   **{f.name: getattr(cfg, f.name) for f in dataclasses.fields(data.LoadOptions)})
    train_ds = data.open_dataset(data.DataConfig(split=cfg.train_split, train=True,
                                                 specaug_freq=cfg.specaug_freq,
                                                 specaug_freq_masks=cfg.specaug_freq_masks,
                                                 specaug_time=cfg.specaug_time,
                                                 time_shift=cfg.time_shift, **data_kw))
    heads = {h: len(names) for h, names in train_ds.heads.items()}
    if not heads:
        raise SystemExit(f"{cfg.data}: the set has no labels (prepared without a manifest, or from "
                         "one without a label column): finetuning needs them; pretrain on it "
                         "(train.py --data), or prepare it from a manifest with labels")
    test_ds = data.open_dataset(data.DataConfig(split=cfg.test_split, train=False,
                                                views=cfg.views, **data_kw))
    train.make_out_dir(cfg.out_dir, d.master)
    model = build_model(cfg, heads, pretrained_cfg)
    if ck is not None:
        load_init(cfg, model, ck, cfg.out_dir, d.master)
    if cfg.linear_probe:
        if ck is None and not resumed:
            train.print0("--linear_probe without --init probes a random encoder (a baseline); "
                         "pass --init CKPT to probe a pretraining")
        for n, p in model.named_parameters():
            p.requires_grad = n.startswith("heads.")
    model.to(d.device)
    if cfg.fsdp:
        train.shard(model)
    torch.manual_seed(cfg.seed + d.rank)
    s = train.schedule(cfg, cfg.weighted_sampling or len(train_ds))
    groups = param_groups(model, cfg, s.lr)
    # fused: one kernel on a GPU, and a step that is not finite skipped there (train.loop)
    opt = (torch.optim.SGD(groups, lr=s.lr, momentum=0.9, fused=True) if cfg.optimizer == "sgd"
           else torch.optim.AdamW(groups, lr=s.lr, betas=(0.9, cfg.beta2), fused=True))
    for p in (p for g in groups for p in g["params"]) if cfg.optimizer == "sgd" else ():
        # (torch's fused SGD leaves a buffer unset where its first step is skipped; from zeros,
        # the first step's buffer is the gradient, as unfused SGD starts)
        opt.state[p]["momentum_buffer"] = torch.zeros_like(p)
    if resumed:
        mine, theirs = model.state_dict(), resumed["model"]
        odd = sorted(set(mine) ^ set(theirs)) or [k for k in mine if mine[k].shape !=
                                                  theirs[k].shape]
        if odd:  # (the flags agree: e.g. learned positions of another --num_frames)
            raise SystemExit(f"{ckpt_path}: its model does not fit this run's ({', '.join(odd[:3])}"
                             f"{', ...' * (len(odd) > 3)}); resume or evaluate it with the flags "
                             "and input shapes it was made with")
        train.load_states(model, opt, resumed, cfg.fsdp)
        train.continue_from(cfg, d, s, ckpt_path, resumed, "finetune_config")
    per_rank = cfg.batch_size // (d.world * cfg.grad_accum)
    stream = None if cfg.eval_only else data.batch_stream(
        train_ds, per_rank, cfg.workers, cfg.seed, d, s.step, s.steps_per_epoch,
        per_rank * cfg.grad_accum, weighted=cfg.weighted_sampling)
    watch = LearningWatch(heads, train_ds.multi_label, s.steps_per_epoch, chance_loss(
        train_ds.rows, heads, train_ds.multi_label, cfg.label_smoothing))
    watch.restore((resumed or {}).get("watch", {}))
    return train.Run(cfg, d, model, train.wrap(model, cfg, d, ddp=not cfg.eval_only), opt, s,
                     stream, per_rank, extra=dict(
                         train_ds=train_ds, test_ds=test_ds, mods=mods, heads=heads,
                         pretrained_cfg=pretrained_cfg,
                         resumed=resumed, watch=watch, gen=torch.Generator(), results={},
                         per_modality=getattr(model, "loss_per_modality", False)))


def finetune_step(run: train.Run, step: int, preempt) -> dict:
    """One step's forward and backward, nothing read from the device: every rank agrees on a
    non-finite loss or gradient (the optimizer then skips the step) and on a requested stop. The
    task loss leaves out MBT's unimodal losses (what LearningWatch compares with chance)."""
    cfg, d, x = run.cfg, run.d, run.extra
    mods, per_modality, multi = x["mods"], x["per_modality"], x["train_ds"].multi_label
    sums = torch.zeros(2, device=d.device)  # (loss, task loss)
    right, clips, bad = torch.zeros((), device=d.device), 0, 0
    for micro in range(cfg.grad_accum):
        x["gen"].manual_seed(cfg.seed * 1_000_003 + step * 1009 + d.rank + micro * 100_003)
        batch = next(run.stream)[1]
        batch, targets = mixup(batch, mods, x["heads"], cfg.mixup, multi, x["gen"], per_modality)
        # (DDP: gradients are all-reduced on the last micro-batch only)
        last = micro == cfg.grad_accum - 1
        with (contextlib.nullcontext() if last or not hasattr(run.model, "no_sync")
              else run.model.no_sync()):
            with train.autocast_ctx(cfg.precision, d.device):
                logits = run.model(**{m: batch[m] for m in mods}, per_modality=per_modality)
            loss = finetune_loss(logits, targets, per_modality, multi, cfg.label_smoothing,
                                 d.device, cfg.unimodal_loss)
            (loss / cfg.grad_accum).backward()  # (not finite: the optimizer skips the step)
        task = {m: z for m, z in logits.items() if not per_modality or m in targets}
        task_loss = loss if len(task) == len(logits) else finetune_loss(
            task, targets, True, multi, cfg.label_smoothing, d.device)
        sums += torch.stack([loss.detach(), task_loss.detach()]).float() / cfg.grad_accum
        r, n = x["watch"].correct(logits, targets, per_modality)
        right, clips, bad = right + r, clips + n, bad + len(batch["bad"])
    gnorm = train.clip_grads(run.raw, cfg)
    # over all ranks, in one all-reduce: the losses, the ranks where a figure is not finite, the
    # ranks asked to stop, the training clips right
    total = torch.stack([sums[0], sums[1], ~(torch.isfinite(sums[0]) & torch.isfinite(gnorm)),
                         torch.zeros((), device=d.device), right]).float()
    total[3] = float(preempt.signal is not None)  # (a fill: nothing waits for the device)
    total = train.all_reduce(total)
    return dict(losses=dict(loss=total[0] / d.world), finite=(total[2] == 0).float(),
                stop=total[3],
                report=dict(grad_norm=gnorm, task_loss=total[1] / d.world, right=total[4]),
                why=lambda v: (f"loss {v['loss']:.4g}" if not math.isfinite(v["loss"])
                               else f"gradient (norm {v['grad_norm']:.4g})"),
                clips=clips * d.world, bad_clips=bad)


def evaluate_step(run: train.Run, step: int, r: dict, preempt, bar, last: bool) -> bool:
    """The running training figures, and at every --eval_every epochs' end and at the last step
    an evaluation (True: asked to stop during it)."""
    cfg, d, x, spe = run.cfg, run.d, run.extra, run.schedule.steps_per_epoch
    watch, total = x["watch"], run.schedule.total
    watch.update(r["values"]["right"], r["clips"], r["values"]["task_loss"])
    if not ((step % spe == 0 and (step // spe) % cfg.eval_every == 0) or step == total):
        return False
    results = evaluate(run.raw, x["test_ds"], cfg, d, x["mods"],
                       cfg.out_dir if step == total else None,
                       stop=lambda: preempt.signal is not None)
    if results is None:  # asked to stop during it: a run resumed at the end evaluates then; a
        if step < total:  # mid-run evaluation is left out, and its epoch's training figures
            watch.summary()
        x["results"] = {}
        return True
    results.update(step=step, epoch=step / spe, **watch.summary())
    train.print0(watch.line(step, results, bar))
    run.log.write(dict(eval=results))
    run.log.curves()
    x["results"] = results
    return False


def finetune_state(run: train.Run, step: int) -> dict | None:
    """What a finetuning checkpoint holds beside the step and the RNGs: the model, its heads and
    configs, the last evaluation and the learning watch (None on a rank that writes nothing)."""
    cfg, x = run.cfg, run.extra
    if not (run.d.master or cfg.fsdp):  # (gathering FSDP shards takes every rank)
        return None
    return dict(model=train.model_state(run.raw, cfg.fsdp),
                optimizer=train.optim_state(run.raw, run.opt, cfg.fsdp),
                finetune_config=asdict(run.cfg), model_config=asdict(run.raw.cfg),
                backbone=run.raw.backbone,  # (what avmae.load rebuilds it from)
                # what --predict prepares a new video with and names its classes by
                labels=x["train_ds"].heads, multi_label=x["train_ds"].multi_label,
                audio_norm=[float(v) for v in x["train_ds"].norm],
                short_side=x["train_ds"].meta.get("short_side", 256),
                pretrain_config=x["pretrained_cfg"], heads=x["heads"], results=x["results"],
                watch=x["watch"].state())


def finetune(cfg: FinetuneConfig, d: train.Dist) -> dict:
    train.need_torchrun_for_fsdp(cfg, "finetune.py")
    if cfg.batch_size % (d.world * cfg.grad_accum) and not cfg.eval_only:  # (a global batch,
        # as pretraining's)
        raise SystemExit(f"--batch_size {cfg.batch_size} does not split into {d.world} ranks x "
                         f"{cfg.grad_accum} accumulation steps: use a multiple of "
                         f"{d.world * cfg.grad_accum}")
    run = setup(cfg, d)
    x, s, m = run.extra, run.schedule, run.raw
    if cfg.eval_only:
        res = evaluate(m, x["test_ds"], cfg, d, x["mods"], cfg.out_dir)
        train.print0(json.dumps(res))
        return res
    trainable = sum(p.numel() for p in m.parameters() if p.requires_grad) / 1e6
    fused = (f" fused from layer {m.fusion_layer} of {m.cfg.depth}"
             if isinstance(m, avmae.MBT) and len(m.mods) == 2 else "")
    train.print0(f"{cfg.modality} {cfg.arch}{fused}"
                 f"{' linear probe' if cfg.linear_probe else ''} | "
                 f"{trainable:.2f}M trainable | init {cfg.init or 'scratch'} | "
                 f"{len(x['train_ds'])} train / {len(x['test_ds'])} test clips | {s.total} steps | "
                 f"lr {s.lr:.3g}")
    step, path, _ = train.loop(run, finetune_step, evaluate_step, finetune_state, "finetune",
                               "lower --batch_size (--blr scales the learning rate with it)")
    return finish(run, step, path)


def finish(run: train.Run, step: int, path: str | None) -> dict:
    """The final metrics (evaluated now if the run resumed at its end) in metrics.json."""
    cfg, x, s = run.cfg, run.extra, run.schedule
    results = x["results"]
    if step >= s.total and not results:  # resumed at the end (stopped in the last eval or save)
        results = evaluate(run.raw, x["test_ds"], cfg, run.d, x["mods"], cfg.out_dir)
        # the training figures of the last epoch: saved with the final evaluation, or (stopped
        # during it) still in the watch
        saved = {k: v for k, v in ((x["resumed"] or {}).get("results") or {}).items()
                 if k.startswith("train_")}
        results.update(step=step, epoch=step / s.steps_per_epoch,
                       **(saved or x["watch"].summary()))
    if run.d.master and step >= s.total:
        mpath = os.path.join(cfg.out_dir, "metrics.json")

        def write():
            with open(mpath + ".tmp", "w") as f:
                json.dump(results, f, indent=1)
            os.replace(mpath + ".tmp", mpath)
        train.write_or_say(mpath, write)
        lost = [p for p in (reports_path(cfg.out_dir), mpath) if p in train.NOT_WRITTEN]
        if lost:  # (a disk that filled up at the end)
            raise SystemExit(f"the results were not all written ({', '.join(lost)}); the final "
                             f"checkpoint is {path}: with space again, the same command with "
                             "--resume auto evaluates it and writes them")
        train.print0(f"done: {json.dumps(results)} | checkpoint {path} | predictions "
                     f"{cfg.out_dir}/predictions.csv")
    return results


def chance_loss(rows: list, heads: dict, multi_label: bool, smoothing: float) -> float:
    """The training loss of the best prediction that ignores the clip: each head's label-smoothed
    label frequencies in `rows`, which scores their entropy (single label) or their binary
    entropies summed over classes (multi-label), averaged over heads as loss_fn averages them.
    ln(classes) on a balanced single-label set; lower on an unbalanced one, which a model that
    learns nothing but the frequencies reaches. (Mixup leaves it: the mixed targets' mean is the
    same.)"""
    total = 0.0
    for h, n in heads.items():
        q = np.bincount([c for r in rows for c in r[h]], minlength=n) / max(1, len(rows))
        q = q * (1 - smoothing) + smoothing / n
        with np.errstate(divide="ignore", invalid="ignore"):
            ent = -np.nan_to_num(q * np.log(q))
            if multi_label:
                ent = ent - np.nan_to_num((1 - q) * np.log(1 - q))
        total += float(ent.sum())
    return total / max(1, len(heads))


class LearningWatch:
    """Is the finetuning learning? Running top-1 on the training batches (against the mixed targets'
    largest entry) next to the test top-1 at each evaluation, and a warning when the training loss
    has not left chance (chance_loss: the label frequencies' entropy) after a few epochs: the sign
    of a broken pipeline or recipe."""
    STATE = ("right", "seen", "steps", "loss")  # (what a checkpoint holds)

    def __init__(self, heads: dict, multi_label: bool, steps_per_epoch: int, chance: float):
        self.head, self.chance = next(iter(heads)), chance
        self.multi_label, self.steps_per_epoch = multi_label, steps_per_epoch
        self.right = self.seen = self.steps = 0
        self.loss = []

    def state(self) -> dict:
        return {k: getattr(self, k) for k in self.STATE}

    def restore(self, state: dict):
        vars(self).update((k, v) for k, v in state.items() if k in self.STATE)

    def correct(self, logits: dict, targets: dict, per_modality: bool) -> tuple:
        """(how many of the batch's clips the first head gets right, on the device; the batch's
        size), against the mixed targets' largest entry; (0, 0) for multi-label sets."""
        if per_modality:
            z = torch.stack([lg[self.head] for m, lg in logits.items() if m in targets]).mean(0)
        else:
            z = logits[self.head]
        t = (next(iter(targets.values())) if per_modality else targets)[self.head]
        if self.multi_label:
            return z.new_zeros(()), 0
        return (z.argmax(1) == t.argmax(1)).sum(), len(z)

    def update(self, right: float, n: int, loss: float):
        self.right, self.seen = self.right + int(right), self.seen + n
        self.loss = (self.loss + [loss])[-self.steps_per_epoch:]  # the last epoch's (saved)
        self.steps += 1

    def summary(self) -> dict:
        out = dict(train_loss=sum(self.loss) / max(1, len(self.loss)))
        if self.seen:
            out["train_top1"] = self.right / self.seen
        self.right = self.seen = 0
        return out

    def line(self, step: int, res: dict, bar) -> str:
        epoch = step / self.steps_per_epoch
        test = next((f"{k} {v:.3f}" for k, v in res.items()
                     if k.endswith(("top1", "mAP")) and not k.startswith("train_")), "")
        train_acc = ""
        if "train_top1" in res:
            train_acc = f"train top-1 {res['train_top1']:.3f} (running, on augmented batches), "
        msg = (f"epoch {epoch:.0f}: {train_acc}test {test}; train loss {res['train_loss']:.3f} "
               f"(chance {self.chance:.3f}: the label frequencies alone)")
        if epoch >= 3 and res["train_loss"] > 0.98 * self.chance:
            msg += (f"\nwarning: the training loss has not moved from chance after {epoch:.0f} "
                    "epochs: the model is not learning (check the labels, the inputs' scale, the "
                    "lr)")
        if bar is not None and not bar.disable:
            bar.write(msg)
        return json.dumps(res)


if __name__ == "__main__":
    train.command_line(main)
