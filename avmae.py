"""
Audiovisual Masked Autoencoders (AV-MAE), one file.

Georgescu et al., "Audiovisual Masked Autoencoders", ICCV 2023 (Sec. 3).
Every pretraining variant of the paper is a config string, chosen once in __init__:

  encoder   early     concatenate visible audio + video tokens, one transformer      (Fig. 2a)
            separate  one transformer per modality, no exchange ("late fusion")       (Fig. 2b)
            shared    one transformer applied to each modality, tied weights          (Fig. 2c)
            mid       L-S layers per modality, then S joint layers (S=2, Table 15)   (Fig. 2d)
  decoder   early / separate / shared, as above, on full-length sequences            (Sec. 3.3)
  objective joint       reconstruct masked audio and video, equal weights   (Sec. 3.4, Eq. 1)
            inpaint_v   video from the encoded audio tokens alone           (Sec. 3.4, Fig. 3)
            inpaint_a   audio from the encoded video tokens alone
            inpaint_both  both of the above, equal weights
            video       video only, from the encoded video and audio (AV-MaskEnhancer, Sec. III)
  modalities av (default), a (audio-only MAE = AudioMAE), v (video-only MAE = VideoMAE)  (Table 3)
  masking   video: random (0.9) | tube;  audio: random (0.5) | time | freq           (Sec. 4.1)
  relatives encoder mavil: full unimodal streams + F fusion layers (vanilla | mbt)  (MAViL Sec. 3.1)
            encoder xattn: unimodal streams + bidirectional cross-attention
                                                             (AV-MaskEnhancer Sec. III-D)
            contrast_inter / contrast_intra: InfoNCE across / within modalities
                                                             (MAViL Eq. 3, CAV-MAE)
            type_embed: modality-type embeddings (CAV-MAE); target teacher: MAViL stage 2 (Eq. 5)

Shapes: B batch, N tokens, K kept (visible) tokens, M masked tokens, D width, P patch features.
Video enters as (B, 3, T, H, W) in [-1, 1]; audio as a log-mel (B, T_audio, mel_bins).
Masks: 1 = masked (removed). Variables prefixed a_ / v_ belong to audio / video; dicts are keyed
by the modality letter 'a' or 'v'.
"""
import dataclasses
import math
import re
from dataclasses import dataclass, fields, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

import kernels

MODALITIES = ("a", "v")  # the fixed order modalities are concatenated in

# -----------------------------------------------------------------------------
# config


@dataclass
class AVMAEConfig:
    # what is pretrained
    modalities: str = "av"        # what is pretrained: audio and video, or one alone (a: AudioMAE,
                                  # v: VideoMAE; Table 3)
    encoder: str = "mid"          # how the encoder fuses the modalities (Fig. 2; docstring above):
                                  # mid is the paper's best; mavil, cavmae, xattn: the relatives
    decoder: str = "shared"       # how the decoder fuses them (Sec. 3.3): shared (tied weights, per
                                  # modality; best) | separate | early (one over both)
    objective: str = "joint"      # what is reconstructed (Sec. 3.4): joint (both, from both) |
                                  # inpaint_v / inpaint_a / inpaint_both (one modality from the
                                  # other alone) | video (AV-MaskEnhancer)
    # inputs (paper: 16 frames of 224x224, tubelets 2x16x16; 8 s of audio = 800 x 128 log-mel)
    num_frames: int = 16          # video frames per clip (16 at stride 4 = 2.56 s)
    image_size: int = 224         # frame side in pixels (square crops)
    in_chans: int = 3             # colour channels of a frame (RGB)
    tubelet: int = 2              # frames per tubelet
    patch_size: int = 16          # video patch side
    audio_frames: int = 800       # log-mel frames (10 ms hop)
    mel_bins: int = 128           # log-mel frequency bins
    audio_patch_t: int = 16       # spectrogram patch: time frames
    audio_patch_f: int = 16       # spectrogram patch: mel bins
    # encoder (defaults: ViT-B)
    width: int = 768              # encoder width D (ViT-B: 768)
    depth: int = 12               # encoder blocks L (ViT-B: 12)
    heads: int = 12               # encoder attention heads
    mlp_ratio: float = 4.0        # MLP hidden width / D
    joint_layers: int = 2         # S for the mid-fusion encoder
    drop_path: float = 0.0        # stochastic depth (finetuning uses 0.3)
    layer_scale: float = 0.0      # LayerScale's first value (Touvron et al., ICCV 2021): each
                                  # encoder block's two branches times a learned per-channel
                                  # factor; 0 = off (the papers)
    # decoder (Table 21, Base)
    dec_width: int = 384          # decoder width (Table 21)
    dec_depth: int = 4            # decoder blocks (Table 21)
    dec_heads: int = 6            # decoder attention heads
    dec_mlp: int = 1536           # decoder MLP hidden width
    # masking
    mask_ratio_v: float = 0.9     # share of video tokens masked (Table 1: 0.9)
    mask_ratio_a: float = 0.5     # share of audio tokens masked (0.5; AudioSet 0.7)
    mask_type_v: str = "random"   # random tokens, or tube (the same spatial mask in every frame)
    mask_type_a: str = "random"   # random tokens, whole time columns, whole frequency rows, or tf
                                  # (CAV-MAE's time-frequency)
    # positions and targets
    pos_embed: str = "sincos"     # sincos (fixed 1-D per modality, paper) |
                                  # sincos2d (per grid axis, MAViL) | learned
    norm_pix_loss: bool = False   # MAE's per-patch target normalisation; AV-MAE uses raw patches
    recon_sum: bool = False       # sum the modalities' reconstruction terms
                                  # (MAViL Eq. 1) instead of averaging
    decoder_layout: str = "gather"  # the decoder's input order: gather: [visible | mask]
                                    # (VideoMAE) | unshuffle: raster order (MAE); equal results
    inpaint_layout: str = "paper"   # inpainting's mask tokens: paper (the last raster positions,
                                    # the authors' code) | masked (each at a masked patch)
    kernels: str = "auto"         # auto (a kernel where measured faster on this GPU) |
                                  # triton | torch; run time only
    # relatives: MAViL (Huang et al.), CAV-MAE (Gong et al.), AV-MaskEnhancer (Diao et al.)
    fusion: str = "vanilla"       # mavil fusion: vanilla (concatenation)
                                  # | mbt (bottlenecks, one g_av for both modalities, MAViL App. B)
                                  # | mbt_sep (a layer per modality, as MBT itself)
    fusion_layers: int = 2        # F, the mavil encoder's fusion layers on top of full
                                  # unimodal streams
    bottlenecks: int = 4          # bottleneck tokens of mbt fusion
    cross_layers: int = 1         # bidirectional cross-attention layers of the xattn encoder
    xattn_fuse: str = "channel"   # channel: each token beside its cross-attended other modality,
                                  # 2 D wide (AV-MaskEnhancer Sec. III-D) | sequence: the two
                                  # streams concatenated
    type_embed: bool = False      # learned modality-type embeddings on encoder and decoder
                                  # tokens (CAV-MAE)
    dec_tied: bool = False        # one decoder projection and mask token for both modalities
                                  # (CAV-MAE)
    contrast_inter: float = 0.0   # weight of audio<->video InfoNCE on pooled unimodal outputs
                                  # (MAViL 0.1, CAV-MAE 0.01)
    tau_inter: float = 0.1        # temperature of the inter-modal InfoNCE (MAViL 0.1, CAV-MAE 0.05)
    contrast_symmetric: bool = True  # both directions averaged (MAViL Eq. 3) | video picks its
                                     # audio among the batch's only (CAV-MAE's code: a
                                     # log-softmax over audio)
    contrast_intra: float = 0.0   # weight of InfoNCE between two masked views of each
                                  # modality (MAViL 0.01)
    tau_intra: float = 1.0        # temperature of the intra-modal InfoNCE (MAViL 1.0)
    target: str = "pixels"        # pixels (raw patches) | teacher (MAViL stage 2: a frozen
                                  # teacher's fusion outputs)
    teacher_width: int = 0        # the teacher's width (0 = width)
    # released weights
    cls_token: bool = False       # a learned token ahead of each modality's tokens in the
                                  # encoder (MAE's and AudioMAE's), left out of its output

    def __post_init__(self):
        if self.modalities in ("a", "v"):
            # One modality leaves nothing to fuse: every encoder/decoder strategy is the same single
            # stream, stored as 'separate' so a checkpoint says what it holds.
            self.encoder, self.decoder = "separate", "separate"

    @property
    def mods(self) -> tuple:
        return tuple(m for m in MODALITIES if m in self.modalities)


# size presets: overrides of the encoder / decoder widths. base and large are the paper's
# (Table 21); small follows ViT-S with VideoMAE's ViT-S decoder; tiny is for CPU tests and laptops.
SIZES = {
    "tiny": dict(width=64, depth=4, heads=4, dec_width=64, dec_depth=2, dec_heads=4, dec_mlp=256),
    "small": dict(width=384, depth=12, heads=6, dec_width=192, dec_depth=4, dec_heads=3,
                  dec_mlp=768),
    "base": dict(width=768, depth=12, heads=12, dec_width=384, dec_depth=4, dec_heads=6,
                 dec_mlp=1536),
    "large": dict(width=1024, depth=24, heads=16, dec_width=512, dec_depth=4, dec_heads=8,
                  dec_mlp=2048),
}


def make_config(size: str = "base", **overrides) -> AVMAEConfig:
    """A config from a size preset plus field overrides; unknown names are errors."""
    if size not in SIZES:
        raise ValueError(f"size={size!r} is not one of {', '.join(SIZES)}")
    names = {f.name for f in fields(AVMAEConfig)}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise ValueError(f"unknown config field(s) {unknown}; valid fields: {sorted(names)}")
    return AVMAEConfig(**{**SIZES[size], **overrides})

# -----------------------------------------------------------------------------
# tokenisers: patchify / unpatchify in the feature order the embedding and the loss both use


class VideoPatches:
    """Tubelets of (tubelet x patch x patch) over RGB; tokens in (t, h, w) order, features in
    (t, h, w, c) order within a tubelet. A Linear on these features is the paper's Conv3d with
    kernel = stride (ViViT tubelet embedding)."""

    def __init__(self, cfg: AVMAEConfig):
        self.pt, self.ps, self.c = cfg.tubelet, cfg.patch_size, cfg.in_chans
        self.grid = (cfg.num_frames // self.pt, cfg.image_size // self.ps,
                     cfg.image_size // self.ps)
        self.dim = self.pt * self.ps * self.ps * self.c
        self.n = math.prod(self.grid)

    def patchify(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, T, H, W) -> (B, N, P)
        B, C, T, H, W = x.shape
        pt, ps = self.pt, self.ps
        if T % pt or H % ps or W % ps:
            raise ValueError(f"video of shape {tuple(x.shape)} does not tile into {pt}x{ps}x{ps} "
                             "tubelets")
        x = x.reshape(B, C, T // pt, pt, H // ps, ps, W // ps, ps)
        x = x.permute(0, 2, 4, 6, 3, 5, 7, 1)  # (B, T', H', W', pt, ps, ps, C)
        return x.reshape(B, (T // pt) * (H // ps) * (W // ps), pt * ps * ps * C)

    # (B, N, P) -> video
    def unpatchify(self, p: torch.Tensor, grid: tuple | None = None) -> torch.Tensor:
        (gt, gh, gw), pt, ps = grid or self.grid, self.pt, self.ps
        x = p.reshape(p.shape[0], gt, gh, gw, pt, ps, ps, self.c).permute(0, 7, 1, 4, 2, 5, 3, 6)
        return x.reshape(p.shape[0], self.c, gt * pt, gh * ps, gw * ps)


class AudioPatches:
    """Spectrogram patches of (time x freq); tokens in row-major (time patch, freq patch) order,
    features in (time, freq) order. Trailing frames that do not fill a patch are dropped
    (AudioSet: 1000 frames -> 62 x 8 = 496 tokens)."""

    def __init__(self, cfg: AVMAEConfig):
        self.pt, self.pf = cfg.audio_patch_t, cfg.audio_patch_f
        self.grid = (cfg.audio_frames // self.pt, cfg.mel_bins // self.pf)
        self.dim = self.pt * self.pf
        self.n = math.prod(self.grid)

    def patchify(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, F) -> (B, N, P)
        B, T, Fq = x.shape
        pt, pf = self.pt, self.pf
        if Fq % pf:
            raise ValueError(f"spectrogram of shape {tuple(x.shape)}: {Fq} mel bins do not tile "
                             f"into {pf}")
        gt = T // pt
        x = x[:, : gt * pt].reshape(B, gt, pt, Fq // pf, pf).permute(0, 1, 3, 2, 4)
        return x.reshape(B, gt * (Fq // pf), pt * pf)

    # (B, N, P) -> (B, T, F)
    def unpatchify(self, p: torch.Tensor, grid: tuple | None = None) -> torch.Tensor:
        (gt, gf), pt, pf = grid or self.grid, self.pt, self.pf
        x = p.reshape(p.shape[0], gt, gf, pt, pf).permute(0, 1, 3, 2, 4)
        return x.reshape(p.shape[0], gt * pt, gf * pf)


PATCHES = {"a": AudioPatches, "v": VideoPatches}


# -----------------------------------------------------------------------------
# positions


def sincos_1d(n: int, dim: int) -> torch.Tensor:
    """Fixed 1-D sinusoidal positions (n, dim): [sin(p w_i) | cos(p w_i)], w_i = 10000^(-i/(dim/2))
    (the 1-D form of MAE's sin-cos table). Each modality is indexed from 0 (the authors' code)."""
    assert dim % 2 == 0, "sinusoidal positions need an even width"
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2))
    angles = torch.arange(n, dtype=torch.float64)[:, None] * omega[None]
    return torch.cat([angles.sin(), angles.cos()], dim=1).float()


def sincos_grid(grid: tuple, dim: int) -> torch.Tensor:
    """MAE's 2-D sin-cos table on a token grid (MAViL Sec. 3.1 uses it for both modalities): the
    width is split into one even share per grid axis, each share a 1-D table of that axis'
    coordinate. Audio (time, freq) is MAE's 2-D form; video (t, h, w) its 3-D extension; an axis of
    length 1 gets no share (one frame: the 2-D table of an image, as CAV-MAE's). (N, dim), raster
    order."""
    axes = [d for d, g in enumerate(grid) if g > 1] or [0]
    shares = [2 * (dim // (2 * len(axes)))] * len(axes)
    shares[0] += dim - sum(shares)
    coords = torch.meshgrid(*[torch.arange(g) for g in grid], indexing="ij")
    return torch.cat([sincos_1d(grid[d], w)[coords[d].flatten()] for d, w in zip(axes, shares)],
                     dim=1)


class PosEmbed(nn.Module):
    """A position table (N, D) over a token grid: fixed sin-cos (a non-persistent buffer, so it
    never enters a checkpoint and another input length simply gets another table), 1-D over the
    raster order or per grid axis, or learned."""

    def __init__(self, grid: tuple, dim: int, kind: str):
        super().__init__()
        n = math.prod(grid)
        if kind == "sincos":
            self.register_buffer("table", sincos_1d(n, dim), persistent=False)
        elif kind == "sincos2d":
            self.register_buffer("table", sincos_grid(grid, dim), persistent=False)
        elif kind == "learned":
            self.table = nn.Parameter(torch.zeros(n, dim))
            nn.init.trunc_normal_(self.table, std=0.02)
        else:
            raise ValueError(f"pos_embed={kind!r} is not one of sincos, sincos2d, learned")

    def forward(self) -> torch.Tensor:
        return self.table

# -----------------------------------------------------------------------------
# masking (Sec. 3.1, 4.1): per example and modality, independent; 1 = masked


def mask_count(ratio: float, n: int) -> int:
    """floor(ratio * n), robust to float error (0.29 * 100 = 28.999...)."""
    return math.floor(ratio * n + 1e-6)


def mask_units(grid: tuple, axes) -> int:
    """How many units a mask type draws from: the positions spanned by its axes of the grid."""
    return math.prod(grid) if axes == "tf" else math.prod(grid[d] for d in axes)


def sample_mask(B: int, grid: tuple, ratio: float, axes, device=None, generator=None) -> tuple:
    """Random masking over the units spanned by `axes` of the token grid; a unit is masked in every
    position along the other axes. axes = all axes is plain random masking (floor(ratio * N)
    tokens masked); video axes (1, 2) is tube masking (the same spatial mask in every time slice);
    audio axes (0,) masks whole time columns, (1,) whole frequency rows; "tf" is CAV-MAE's
    time-frequency masking (its code's 'tf' mode): 0.7 ratio of the time steps and of the bands
    masked whole, then random tokens, floor(ratio * N) in all (whole ones first if they overflow).
    Returns (ids_keep (B, K), ids_mask (B, M)), each sorted ascending."""
    N, units = math.prod(grid), mask_units(grid, axes)
    m_units = mask_count(ratio, units)

    def rank(n):  # a random rank of each of n units, per example
        return torch.rand(B, n, device=device, generator=generator).argsort(1).argsort(1)
    if axes == "tf":
        (T, Fq), part = grid, lambda n: rank(n) < int(n * ratio * 0.7)
        whole = (part(T)[:, :, None] | part(Fq)[:, None, :]).reshape(B, N)
        score = torch.rand(B, N, device=device, generator=generator) + whole.float()
        mask = score.argsort(1, descending=True).argsort(1) < m_units
    else:  # unit index of every token: ravel of its coordinates along `axes`
        coords = torch.unravel_index(torch.arange(N, device=device), grid)
        unit_of_token = torch.zeros(N, dtype=torch.long, device=device)
        for d in axes:
            unit_of_token = unit_of_token * grid[d] + coords[d]
        mask = rank(units)[:, unit_of_token] < m_units  # (B, N) bool
    order = mask.to(torch.uint8).argsort(dim=1, stable=True)  # kept first, each part ascending
    M = m_units * (N // units)
    return order[:, : N - M], order[:, N - M:]


MASK_AXES = {  # mask type -> masked axes of the token grid
    "v": {"random": (0, 1, 2), "tube": (1, 2)},
    "a": {"random": (0, 1), "time": (0,), "freq": (1,), "tf": "tf"},
}


def ids_to_mask(ids_mask: torch.Tensor, n: int) -> torch.Tensor:
    """(B, M) masked indices -> (B, N) float mask, 1 = masked."""
    return torch.zeros(ids_mask.shape[0], n, device=ids_mask.device).scatter_(1, ids_mask, 1.0)

# -----------------------------------------------------------------------------
# the steps the Triton kernels (kernels/) replace. These plain-torch versions are the definitions.


def gather_tokens(x: torch.Tensor, ids: torch.Tensor,
                  add: torch.Tensor | None = None) -> torch.Tensor:
    """out[b, k] = x[b, ids[b, k]] (+ add[ids[b, k]]).

    x: (B, N, C) tokens or patches, or an (N, C) table shared by the batch (positions);
    ids: (B, K) int64; add: optional (N, C) table gathered with the same ids (positional embedding).
    """
    B, K = ids.shape
    if x.dim() == 2:
        x = x.unsqueeze(0).expand(B, -1, -1)
    out = torch.gather(x, 1, ids.unsqueeze(-1).expand(B, K, x.shape[-1]))
    if add is not None:
        out = out + add[ids]
    return out


def assemble(x_vis: torch.Tensor, pos_vis: torch.Tensor, mask_token: torch.Tensor,
             pos_mask: torch.Tensor, ids_vis: torch.Tensor, ids_mask: torch.Tensor) -> torch.Tensor:
    """Decoder input in the [visible | mask] layout (VideoMAE's; no unshuffle needed).

    x_vis: (B, K, D) projected encoder tokens; pos_vis, pos_mask: (N, D) decoder position tables;
    mask_token: (D,); ids_vis (B, K) / ids_mask (B, M): the positions each part carries.
    Returns (B, K + M, D) = [x_vis + pos_vis[ids_vis] | mask_token + pos_mask[ids_mask]].
    """
    return torch.cat([x_vis + pos_vis[ids_vis], mask_token + pos_mask[ids_mask]], dim=1)


def unshuffle(x_vis: torch.Tensor, mask_token: torch.Tensor, pos: torch.Tensor,
              ids_keep: torch.Tensor, ids_mask: torch.Tensor) -> torch.Tensor:
    """MAE's classic decoder input: visible tokens and mask tokens back in raster order, plus
    positions. (B, K, D) -> (B, N, D), N = K + M."""
    B, K, D = x_vis.shape
    M = ids_mask.shape[1]
    x = torch.cat([x_vis, mask_token.expand(B, M, D)], dim=1)
    ids_restore = torch.argsort(torch.cat([ids_keep, ids_mask], dim=1), dim=1)
    return gather_tokens(x, ids_restore) + pos


def attention(q: torch.Tensor, k: torch.Tensor | None = None,
              v: torch.Tensor | None = None) -> torch.Tensor:
    """Non-causal softmax attention of (B, H, N, hd) q, k, v, or of one packed (B, N, 3, H, hd)
    qkv (self-attention, as the projection makes it: the kernel then returns one packed gradient);
    (B, H, N, hd) out."""
    if k is None:
        q, k, v = q.permute(2, 0, 3, 1, 4)
    return F.scaled_dot_product_attention(q, k, v)


def recon_loss(pred: torch.Tensor, patches: torch.Tensor, ids: torch.Tensor,
               norm_pix: bool) -> torch.Tensor:
    """Eq. 1: mean squared error between predictions (B, M, P) and the target patches at ids (B, M),
    averaged over the M predicted tokens and the P patch features. norm_pix: MAE's per-patch
    normalisation of the target, (t - mean) / sqrt(var + 1e-6) with the unbiased variance."""
    target = gather_tokens(patches, ids).float()
    if norm_pix:
        var = target.var(-1, keepdim=True)
        target = (target - target.mean(-1, keepdim=True)) / (var + 1e-6).sqrt()
    return (pred.float() - target).pow(2).mean()


OPS_TORCH = dict(gather=gather_tokens, assemble=assemble, unshuffle=unshuffle, attention=attention,
                 loss=recon_loss)


def get_ops(choice: str, device=None) -> dict:
    """The ops the model runs, asked for by name: these twins, or where kernels/ picks them (its
    `select`: --kernels auto | triton | torch), their Triton kernels."""
    return kernels.select(choice, OPS_TORCH, device)

# -----------------------------------------------------------------------------
# transformer primitives: pre-LN ViT block (LN eps 1e-6, GELU, MLP 4x), as ViT / MAE


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, attn_fn):
        super().__init__()
        assert dim % heads == 0, f"width {dim} is not divisible by {heads} heads"
        self.heads, self.attn_fn = heads, attn_fn
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, N, D = x.shape
        y = self.attn_fn(self.qkv(x).view(B, N, 3, self.heads, D // self.heads))  # (B, H, N, hd)
        return self.proj(y.transpose(1, 2).reshape(B, N, D))


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class LayerScale(nn.Module):
    """A residual branch times a learned per-channel factor that starts at `init` (CaiT: Touvron
    et al., ICCV 2021, Sec. 2.1). Small branches keep a deep block stack near the identity, so its
    tokens do not all collapse to their mean under the uniform attention of a fresh model."""

    def __init__(self, dim: int, init: float):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), float(init)))

    def forward(self, x):
        return x * self.gamma


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, hidden: int, attn_fn, drop_path: float = 0.0):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim, eps=1e-6), nn.LayerNorm(dim, eps=1e-6)
        self.attn, self.mlp = Attention(dim, heads, attn_fn), MLP(dim, hidden)
        self.ls1, self.ls2 = nn.Identity(), nn.Identity()  # LayerScale where add_layer_scale says
        self.drop_path = drop_path

    def _drop(self, x):  # stochastic depth, per example
        if not self.training or self.drop_path == 0.0:
            return x
        keep = torch.rand(x.shape[0], 1, 1, device=x.device) >= self.drop_path
        return x * keep.to(x.dtype) / (1.0 - self.drop_path)

    def forward(self, x):
        x = x + self._drop(self.ls1(self.attn(self.norm1(x))))
        return x + self._drop(self.ls2(self.mlp(self.norm2(x))))


def add_layer_scale(module: nn.Module, init: float) -> None:
    """LayerScale on both branches of every block in module (the config's layer_scale)."""
    for b in module.modules():
        if isinstance(b, Block):
            dim = b.norm1.normalized_shape[0]
            b.ls1, b.ls2 = LayerScale(dim, init), LayerScale(dim, init)


class Transformer(nn.Module):
    """A stack of blocks ending in a LayerNorm. dpr: per-block stochastic depth rates."""

    def __init__(self, dim: int, depth: int, heads: int, hidden: int, attn_fn, dpr=None):
        super().__init__()
        dpr = dpr if dpr is not None else [0.0] * depth
        self.blocks = nn.ModuleList(Block(dim, heads, hidden, attn_fn,
                                          dpr[i]) for i in range(depth))
        self.norm = nn.LayerNorm(dim, eps=1e-6)

    def forward(self, x):
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)

    def layer_ids(self, first: int) -> dict:
        """{parameter name: depth in the network}: block i sits at depth first + i; the closing
        LayerNorm belongs to the last block (it gets that block's learning rate under layer
        decay)."""
        ids = {f"blocks.{i}.{n}": first + i
               for i, b in enumerate(self.blocks) for n, _ in b.named_parameters()}
        last = first + len(self.blocks) - 1
        return {**ids, **{f"norm.{n}": last for n, _ in self.norm.named_parameters()}}


def _prefix(p: str, ids: dict) -> dict:
    return {f"{p}.{k}": v for k, v in ids.items()}


def block_flops(n: int, d: int, hidden: int) -> float:
    """Forward FLOPs of one pre-LN block on n tokens: matmuls 2 (4 d^2 + 2 d h) per token, attention
    scores and weighted sum 4 n d per token."""
    return n * (2 * (4 * d * d + 2 * d * hidden) + 4 * n * d)

# -----------------------------------------------------------------------------
# fusion strategies (Fig. 2): encoders and decoders are the same shapes at other sizes


class Fusion(nn.Module):
    """The contract of a fusion variant (an ENCODERS or DECODERS entry). A new variant is one
    subclass and one table entry; the rest of the code asks it, never its name.

    forward(xs)              {modality: (B, N_m, D)} -> {modality: (B, N_m, out_width)}
    mixes                    whether one modality's tokens see the other's (inpainting needs it)
    n_layers, out_width      depth along a token's path (the top for layer-wise lr decay); width out
    layer_ids()              {parameter name: depth}, 1..n_layers
    flops(cfg, k, blk)       forward FLOPs on k[m] visible tokens per modality (blk(n, layers): the
                             FLOPs of `layers` blocks on n tokens)
    with_unimodal(xs)        (fused, unimodal): the contrastive terms read each modality's unimodal
                             representation; by default each modality encoded alone
    unimodal_flops(cfg, k, blk)  what one unimodal pass costs; unimodal_free: with_unimodal gets
                             it on the way (no pass of its own)
    stream_weights(cfg, m)   how an MBT finetuning stream of modality m is initialised from it: the
                             source of each block, the closing norm, an inner norm kept (name,
                             after block)
    mbt_drops(cfg)           name prefixes MBT finetuning leaves out (the papers finetune the
                             unimodal encoders)
    out_mods                 the modalities forward returns (None: every one it is given)
    check(cfg)               raise ValueError for a config this variant cannot run
    """
    mixes, out_mods, unimodal_free = False, None, False

    def unimodal(self, xs: dict) -> dict:
        return {m: self({m: x})[m] for m, x in xs.items()}

    def with_unimodal(self, xs: dict) -> tuple:
        out = self(xs)
        return out, (self.unimodal(xs) if self.mixes else out)

    @classmethod
    def unimodal_flops(cls, cfg, k: dict, blk) -> float:
        return sum(cls.flops(cfg, {m: n}, blk) for m, n in k.items())

    @staticmethod
    def mbt_drops(cfg) -> tuple:
        return ()

    @staticmethod
    def check(cfg) -> None:
        pass


def _concat(xs: dict):
    keys = list(xs)
    return keys, torch.cat([xs[m] for m in keys], dim=1), [xs[m].shape[1] for m in keys]


def _joint(net, xs: dict) -> dict:
    keys, x, sizes = _concat(xs)
    return dict(zip(keys, net(x).split(sizes, dim=1)))


class Early(Fusion):
    """One transformer over the concatenation of all modalities' tokens (unimodal: each alone)."""
    mixes = True

    @staticmethod
    def flops(cfg, k, blk):
        return blk(sum(k.values()), cfg.depth)

    @staticmethod
    def stream_weights(cfg, m):
        return dict(blocks=[f"joint.blocks.{i}" for i in range(cfg.depth)], norm="joint.norm",
                    inner=None)

    def __init__(self, mods, dim, depth, heads, hidden, attn_fn, dpr=None, cfg=None):
        super().__init__()
        self.joint = Transformer(dim, depth, heads, hidden, attn_fn, dpr)
        self.n_layers, self.out_width = depth, dim

    def layer_ids(self) -> dict:
        return _prefix("joint", self.joint.layer_ids(1))

    def forward(self, xs: dict) -> dict:
        return _joint(self.joint, xs)


class Separate(Fusion):
    """One transformer per modality, no exchange."""

    @staticmethod
    def flops(cfg, k, blk):
        return sum(blk(n, cfg.depth) for n in k.values())

    @staticmethod
    def stream_weights(cfg, m):
        blocks = [f"streams.{m}.blocks.{i}" for i in range(cfg.depth)]
        return dict(blocks=blocks, norm=f"streams.{m}.norm", inner=None)

    def __init__(self, mods, dim, depth, heads, hidden, attn_fn, dpr=None, cfg=None):
        super().__init__()
        self.streams = nn.ModuleDict({m: Transformer(dim, depth, heads, hidden, attn_fn,
                                                     dpr) for m in mods})
        self.n_layers, self.out_width = depth, dim

    def layer_ids(self) -> dict:
        return {k: v for m, s in self.streams.items() for k, v in _prefix(f"streams.{m}",
                                                                          s.layer_ids(1)).items()}

    def forward(self, xs: dict) -> dict:
        return {m: self.streams[m](x) for m, x in xs.items()}


class Shared(Fusion):
    """One transformer applied to each modality on its own (tied weights)."""
    flops = Separate.flops

    @staticmethod
    def stream_weights(cfg, m):
        return dict(blocks=[f"shared.blocks.{i}" for i in range(cfg.depth)], norm="shared.norm",
                    inner=None)

    def __init__(self, mods, dim, depth, heads, hidden, attn_fn, dpr=None, cfg=None):
        super().__init__()
        self.shared = Transformer(dim, depth, heads, hidden, attn_fn, dpr)
        self.n_layers, self.out_width = depth, dim

    def layer_ids(self) -> dict:
        return _prefix("shared", self.shared.layer_ids(1))

    def forward(self, xs: dict) -> dict:
        return {m: self.shared(x) for m, x in xs.items()}


class Mid(Fusion):
    """depth - S layers per modality (each stream ends in its own LayerNorm, as in the authors'
    code), then S joint layers over the concatenation. Unimodal: the joint layers on each modality
    alone (CAV-MAE's way, S = 1)."""
    mixes = True

    @staticmethod
    def check(cfg):
        if cfg.modalities == "av" and not 1 <= cfg.joint_layers < cfg.depth:
            raise ValueError("mid-fusion needs 1 <= joint_layers < depth, got "
                             f"joint_layers={cfg.joint_layers}, depth={cfg.depth} (joint_layers="
                             "depth is early fusion)")

    @staticmethod
    def flops(cfg, k, blk):
        L, S = cfg.depth, cfg.joint_layers
        return sum(blk(n, L - S) for n in k.values()) + blk(sum(k.values()), S)

    @staticmethod
    def stream_weights(cfg, m):
        # the joint layers copied into both streams (untied); the stream's norm kept
        L, S = cfg.depth, cfg.joint_layers
        blocks = [f"streams.{m}.blocks.{i}" if i < L - S else f"joint.blocks.{i - (L - S)}"
                  for i in range(L)]
        return dict(blocks=blocks, norm="joint.norm", inner=(f"streams.{m}.norm", L - S))

    def __init__(self, mods, dim, depth, heads, hidden, attn_fn, dpr=None, cfg=None):
        super().__init__()
        dpr = dpr if dpr is not None else [0.0] * depth
        L, S = depth, (cfg.joint_layers if cfg is not None else 2)
        self.streams = nn.ModuleDict({m: Transformer(dim, L - S, heads, hidden, attn_fn,
                                                     dpr[: L - S]) for m in mods})
        self.joint = Transformer(dim, S, heads, hidden, attn_fn, dpr[L - S:])
        self.n_layers, self.out_width = depth, dim

    def layer_ids(self) -> dict:
        ids = {k: v for m, s in self.streams.items() for k, v in _prefix(f"streams.{m}",
                                                                         s.layer_ids(1)).items()}
        return {
            **ids,
            **_prefix("joint", self.joint.layer_ids(self.n_layers - len(self.joint.blocks) + 1))}

    def forward(self, xs: dict) -> dict:
        return _joint(self.joint, {m: self.streams[m](x) for m, x in xs.items()})


# + the relatives' below
ENCODERS = {"early": Early, "separate": Separate, "mid": Mid, "shared": Shared}
DECODERS = {"early": Early, "separate": Separate, "shared": Shared}
# objective -> {target modality: source modality whose encoded tokens are the decoder's context}
OBJECTIVES = {
    "joint": {"a": "a", "v": "v"},
    "inpaint_v": {"v": "a"},
    "inpaint_a": {"a": "v"},
    "inpaint_both": {"a": "v", "v": "a"},
    # + every other modality's encoded tokens as extra context (AV-MaskEnhancer)
    "video": {"v": "v"},
}
EXTRA_CONTEXT = {"video": ("a",)}
# (the tables: a new entry counts)
CHOICES = dict(modalities=("av", "a", "v"), encoder=ENCODERS, decoder=DECODERS,
               objective=tuple(OBJECTIVES), pos_embed=("sincos", "sincos2d", "learned"),
               fusion=("vanilla", "mbt", "mbt_sep"), xattn_fuse=("channel", "sequence"),
               target=("pixels", "teacher"), decoder_layout=("gather", "unshuffle"),
               inpaint_layout=("paper", "masked"), mask_type_v=tuple(MASK_AXES["v"]),
               mask_type_a=tuple(MASK_AXES["a"]), kernels=("auto", "triton", "torch"))

# ----------------------------------------------------------------------------- the decoder side
# (Sec. 3.3, 3.4): per target modality a sequence of context tokens and mask tokens, a decoder
# (one of DECODERS), a linear head on the predicted tokens


class MAEDecoder(nn.Module):
    """Encoded tokens {source: (B, K, D_out)} -> predictions {target: (pred (B, M, P), ids (B, M))}.
    targets: {target modality: source modality whose encoded tokens are its context}; extra:
    context-only modalities (AV-MaskEnhancer's audio). tied: one projection and one mask token for
    every modality (CAV-MAE's code); otherwise one per modality."""

    def __init__(self, cfg: AVMAEConfig, patches: dict, targets: dict, extra: tuple, in_width: int,
                 ops: dict):
        super().__init__()
        self.cfg, self.targets, self.extra, self.ops = cfg, targets, extra, ops
        self.n = {m: p.n for m, p in patches.items()}
        D, sources = cfg.dec_width, sorted(set(targets.values()) | set(extra))
        self.key = {m: "av" if cfg.dec_tied else m for m in cfg.mods}
        self.embed = nn.ModuleDict({self.key[s]: nn.Linear(in_width, D) for s in sources})
        self.mask_token = nn.ParameterDict({self.key[t]: nn.Parameter(torch.zeros(D))
                                            for t in targets})
        # the paper's inpainting layout gives context tokens the target's positions (Sec. 3.4)
        own_pos = cfg.inpaint_layout == "masked" or extra
        pos_mods = set(targets) | (set(sources) if own_pos else set())
        self.pos = nn.ModuleDict({m: PosEmbed(patches[m].grid, D, cfg.pos_embed)
                                  for m in sorted(pos_mods)})
        if cfg.type_embed:  # CAV-MAE: which modality a token is
            self.type_embed = nn.ParameterDict({m: nn.Parameter(torch.zeros(D)) for m in cfg.mods})
        self.net = DECODERS[cfg.decoder](list(targets), D, cfg.dec_depth, cfg.dec_heads,
                                         cfg.dec_mlp, ops["attention"])
        out = {t: cfg.teacher_width or cfg.width if cfg.target == "teacher" else patches[t].dim
               for t in targets}  # (MAViL stage 2 predicts a teacher's features)
        self.head = nn.ModuleDict({t: nn.Linear(D, out[t]) for t in targets})
        # how decoder inputs are laid out: chosen once here
        layouts = {"gather": self.visible_then_mask, "unshuffle": self.unshuffle,
                   "paper": self.inpaint_paper,
                   "masked": self.inpaint_masked}
        joint = cfg.objective in ("joint", "video")
        layout = cfg.decoder_layout if joint else cfg.inpaint_layout
        self.context = self.with_extra if extra else layouts[layout]

    def _type(self, z, m):
        return z + self.type_embed[m] if self.cfg.type_embed else z

    # Each layout takes (target t, source s, encoded tokens e {m: (B, K, D)}, masks) and returns
    # (sequence (B, L, Dd), where to read the predictions, which patches they are of).

    def visible_then_mask(self, t, s, e, masks):  # joint: t's own visible tokens, [visible | mask]
        keep, drop = masks[t]
        pos, k = self.pos[t](), self.key[t]
        z = self.ops["assemble"](self.embed[k](e[t]), pos, self.mask_token[k], pos, keep, drop)
        return self._type(z, t), keep.shape[1], drop

    def with_extra(self, t, s, e, masks):
        """[the other modalities' encoded tokens | t's visible tokens | t's mask tokens]: the
        decoder reconstructs t with everything the encoder saw as context (AV-MaskEnhancer)."""
        z, read, ids = self.visible_then_mask(t, s, e, masks)
        ctx = [self.embed[self.key[o]](e[o]) + self.ops["gather"](self.pos[o](), masks[o][0])
               for o in self.extra]
        ctx = [self._type(c, o) for c, o in zip(ctx, self.extra)]
        return torch.cat(ctx + [z], dim=1), read + sum(c.shape[1] for c in ctx), ids

    def unshuffle(self, t, s, e, masks):  # joint, MAE's raster order; read the masked positions
        keep, drop = masks[t]
        k = self.key[t]
        z = self.ops["unshuffle"](self.embed[k](e[t]), self.mask_token[k], self.pos[t](), keep,
                                  drop)
        return self._type(z, t), drop, drop

    def inpaint_paper(self, t, s, e, masks):
        """Authors' inpainting layout (Sec. 3.4): z_t = [e_s || m_t repeated n_t - k_s] with t's
        positions 0..n_t-1 along the sequence; supervises t's last n_t - k_s raster patches."""
        B, k = e[s].shape[:2]
        ids = torch.arange(self.n[t], device=e[s].device).expand(B, -1)
        pos = self.pos[t]()
        z = self.ops["assemble"](self.embed[self.key[s]](e[s]), pos, self.mask_token[self.key[t]],
                                 pos, ids[:, :k], ids[:, k:])
        return z, k, ids[:, k:]

    def inpaint_masked(self, t, s, e, masks):
        """Well-defined inpainting: context tokens keep their own modality's positions, one mask
        token per masked patch of t carries that patch's position and is supervised on it."""
        keep_s, drop_t = masks[s][0], masks[t][1]
        z = self.ops["assemble"](self.embed[self.key[s]](e[s]), self.pos[s](),
                                 self.mask_token[self.key[t]], self.pos[t](), keep_s, drop_t)
        return z, keep_s.shape[1], drop_t

    def forward(self, e: dict, masks: dict) -> dict:
        seqs, reads = {}, {}
        for t, s in self.targets.items():
            seqs[t], *reads[t] = self.context(t, s, e, masks)
        outs, preds = self.net(seqs), {}
        for t, (read, ids) in reads.items():  # the head runs on the predicted tokens only
            y = outs[t][:, read:] if isinstance(read, int) else self.ops["gather"](outs[t], read)
            preds[t] = (self.head[t](y), ids)
        return preds

    def flops(self, k: dict, in_width: int) -> float:
        """Forward FLOPs with k[m] visible tokens per modality: the sequences as `context` builds
        them, the projections of the context tokens, the heads on the predicted tokens."""
        cfg, seq, pred = self.cfg, {}, {}
        for t, s in self.targets.items():
            paper = cfg.objective not in ("joint", "video") and cfg.inpaint_layout == "paper"
            pred[t] = self.n[t] - (k[s] if paper else k[t])
            seq[t] = k[s] + pred[t] + sum(k[o] for o in self.extra)
        lens = [sum(seq.values())] if cfg.decoder == "early" else list(seq.values())
        dec = sum(cfg.dec_depth * block_flops(n, cfg.dec_width, cfg.dec_mlp) for n in lens)
        sources = set(self.targets.values()) | set(self.extra)
        dec += sum(2 * k[s] * in_width * cfg.dec_width for s in sources)
        return dec + sum(2 * pred[t] * cfg.dec_width * self.head[t].out_features for t in pred)

# -----------------------------------------------------------------------------
# the model


class AVMAE(nn.Module):
    """forward(a, v) -> dict(loss, loss_a/loss_v, pred_a/pred_v (B, M, P), ids_a/ids_v (B, M) =
    which patches the predictions are of, mask_a/mask_v (B, N) with 1 = masked).
    encode(a, v) -> {modality: (B, N, D)}: the encoder on unmasked inputs, for finetuning."""

    def __init__(self, cfg: AVMAEConfig):
        super().__init__()
        check_config(cfg)
        self.cfg, mods = cfg, cfg.mods
        self.ops = get_ops(cfg.kernels)
        self.patches = {m: PATCHES[m](cfg) for m in mods}
        self.n = {m: self.patches[m].n for m in mods}
        # encoder: embed only the visible patches (patch embedding is linear: the same result)
        self.patch_embed = nn.ModuleDict({m: nn.Linear(self.patches[m].dim,
                                                       cfg.width) for m in mods})
        self.enc_pos = nn.ModuleDict({m: PosEmbed(self.patches[m].grid, cfg.width, cfg.pos_embed)
                                      for m in mods})
        if cfg.type_embed:  # CAV-MAE: which modality a token is
            self.type_embed = nn.ParameterDict({m: nn.Parameter(torch.zeros(cfg.width))
                                                for m in mods})
        if cfg.cls_token:  # (with its position: MAE's cls_token + pos_embed[0])
            self.cls_token = nn.ParameterDict({m: nn.Parameter(torch.zeros(cfg.width))
                                               for m in mods})
        dpr = [cfg.drop_path * i / max(cfg.depth - 1, 1) for i in range(cfg.depth)]
        self.encoder = ENCODERS[cfg.encoder](mods, cfg.width, cfg.depth, cfg.heads,
                                             int(cfg.width * cfg.mlp_ratio), self.ops["attention"],
                                             dpr, cfg)
        # decoder: context-only modalities (AV-MaskEnhancer's audio) unless the encoder already
        # fused them into the target's channels target -> source
        targets = {t: s for t, s in OBJECTIVES[cfg.objective].items() if t in mods}
        extra = tuple(m for m in EXTRA_CONTEXT.get(cfg.objective, ()) if m in mods
                      and self.encoder.out_width == cfg.width)
        self.decoder = MAEDecoder(cfg, self.patches, targets, extra, self.encoder.out_width,
                                  self.ops)
        self.apply(init_weights)
        for n, p in self.named_parameters():  # learned tokens: N(0, 0.02), as MAE's mask token
            if n.split(".")[-2] in ("mask_token", "type_embed", "cls_token"):
                nn.init.trunc_normal_(p, std=0.02)
        if cfg.layer_scale:
            add_layer_scale(self.encoder, cfg.layer_scale)

    def sample_masks(self, B: int, device=None, generator=None) -> dict:
        """{modality: (ids_keep (B, K), ids_mask (B, M))}, independent per example and modality."""
        cfg = self.cfg
        return {m: sample_mask(B, self.patches[m].grid, getattr(cfg, f"mask_ratio_{m}"),
                               MASK_AXES[m][getattr(cfg, f"mask_type_{m}")], device,
                               generator) for m in cfg.mods}

    def patchify(self, inputs: dict) -> dict:
        return {m: self.patches[m].patchify(x) for m, x in inputs.items()}

    def _inputs(self, a, v, either: bool = False) -> dict:
        inputs = {m: x for m, x in (("a", a), ("v", v)) if x is not None}
        if not (set(inputs) <= set(self.cfg.mods) and inputs) if either else \
                set(inputs) != set(self.cfg.mods):
            raise ValueError(f"this model takes modalities {self.cfg.mods}, got {tuple(inputs)}")
        return inputs

    def embed(self, patches: dict, masks: dict | None) -> dict:
        """Patch embedding + positions of the visible patches only: (B, N, P) -> (B, K, D)."""
        out = {}
        for m, p in patches.items():
            if masks is None:  # no masking: every patch (finetuning / features)
                out[m] = self.patch_embed[m](p) + self.enc_pos[m]()[: p.shape[1]]
            else:
                keep, gather = masks[m][0], self.ops["gather"]
                out[m] = self.patch_embed[m](gather(p, keep)) + gather(self.enc_pos[m](), keep)
            if self.cfg.type_embed:
                out[m] = out[m] + self.type_embed[m]
        return out

    def encode(self, a=None, v=None, masks: dict | None = None) -> dict:
        """Encoder features {modality: (B, K or N, D)}; masks=None encodes every token. Either
        modality or both: one alone is encoded by the encoder's unimodal pass (what the
        contrastive terms read: CAV-MAE's per-modality norms, MAViL's streams)."""
        inputs = self._inputs(a, v, either=masks is None)
        x = self.embed(self.patchify(inputs), masks)
        return self.run_encoder(x, alone=len(inputs) < len(self.cfg.mods))

    # ---- MAE's three steps (models_mae.py): encoder, decoder, loss

    def forward_encoder(self, patches: dict, masks: dict) -> dict:
        """{modality: (B, N, P) patches} -> {modality: (B, K, D) encoded visible tokens}."""
        return self.run_encoder(self.embed(patches, masks))

    def run_encoder(self, x: dict, unimodal: bool = False, alone: bool = False):
        """The encoder on embedded tokens; a [CLS] token (cls_token) goes ahead of each modality's
        and is left out of what comes back. unimodal: (fused, unimodal), the contrast's; alone:
        the unimodal pass only (each modality as if the other were not there)."""
        if self.cfg.cls_token:
            x = {m: torch.cat([self.cls_token[m].expand(t.shape[0], 1, -1).to(t.dtype), t], 1)
                 for m, t in x.items()}
        if alone:
            out = (self.encoder.unimodal(x),)
        else:
            out = self.encoder.with_unimodal(x) if unimodal else (self.encoder(x),)
        if self.cfg.cls_token:
            out = tuple({m: t[:, 1:] for m, t in o.items()} for o in out)
        return out if unimodal else out[0]

    def forward_decoder(self, e: dict, masks: dict) -> dict:
        """{target: (pred (B, M, P), ids (B, M))}: predictions for the target's patches at ids."""
        return self.decoder(e, masks)

    def forward_loss(self, patches: dict, preds: dict, masks: dict,
                     norm_pix: bool | None = None) -> dict:
        """Reconstruction loss per target on the predicted (masked) patches only, averaged over
        targets with equal weights (AV-MAE Sec. 3.4; the authors' code weighs each 0.5) or summed
        (recon_sum: MAViL Eq. 1 and 5, CAV-MAE's code); plus everything the reconstruction pictures
        need. `patches` are the targets: raw patches, or (MAViL stage 2) a teacher's features per
        token."""
        norm_pix = self.cfg.norm_pix_loss if norm_pix is None else norm_pix
        out = {}
        for t, (pred, ids) in preds.items():
            out[f"loss_{t}"] = self.ops["loss"](pred, patches[t], ids, norm_pix)
            out[f"pred_{t}"], out[f"ids_{t}"] = pred, ids
        losses = [out[f"loss_{t}"] for t in preds]
        out["loss"] = sum(losses) / (1 if self.cfg.recon_sum else len(losses))
        for m, (keep, drop) in masks.items():
            out[f"mask_{m}"] = ids_to_mask(drop, self.n[m])
        return out

    def forward(self, a=None, v=None, masks: dict | None = None, targets: dict | None = None,
                masks2: dict | None = None, contrast: bool = True) -> dict:
        """targets: a teacher's features {modality: (B, N, D_teacher)} instead of the raw patches
        (MAViL stage 2); masks2: the second view's masks for the intra-modal contrast;
        contrast=False skips the contrastive terms (e.g. for a picture on one rank: they gather
        across ranks)."""
        patches = self.patchify(self._inputs(a, v))
        if masks is None:
            p = next(iter(patches.values()))
            masks = self.sample_masks(p.shape[0], p.device)
        contrast = contrast and (self.cfg.contrast_inter > 0 or self.cfg.contrast_intra > 0)
        x = self.embed(patches, masks)
        e, uni = self.run_encoder(x, unimodal=True) if contrast else (self.run_encoder(x), None)
        out = self.forward_loss(patches if targets is None else targets, self.decoder(e, masks),
                                masks, None if targets is None else False)
        return contrast_losses(self, out, patches, uni, masks2) if contrast else out

    def flops(self) -> dict:
        """Forward FLOPs per clip (as nanoGPT's estimate_mfu, from the config): the encoder on the
        visible tokens (each encoder class counts its own, and the unimodal passes the contrastive
        terms add), the patch embedding, the decoder side. train = 3 x forward."""
        cfg = self.cfg
        k = {m: keep.shape[1] for m, (keep, _) in self.sample_masks(1).items()}
        hid = int(cfg.width * cfg.mlp_ratio)

        def blk(n, layers=1):
            return layers * block_flops(n, cfg.width, hid)
        enc = type(self.encoder).flops(cfg, k, blk)
        enc += sum(2 * k[m] * self.patches[m].dim * cfg.width for m in k)  # patch embedding
        if cfg.contrast_inter or cfg.contrast_intra:
            enc += unimodal_flops(type(self.encoder), cfg, k, blk)
        dec = self.decoder.flops(k, self.encoder.out_width)
        return dict(encoder=enc, decoder=dec, forward=enc + dec, train=3 * (enc + dec))

    def num_params(self, prefix: str = "") -> int:
        return sum(p.numel() for n, p in self.named_parameters() if n.startswith(prefix))


@torch.no_grad()
def reconstruct(model: AVMAE, inputs: dict, out: dict) -> dict:
    """Per modality (original, masked input, reconstruction with the visible patches pasted back),
    each in input layout: the three rows of the paper's Figure 5."""
    res = {}
    for m, x in inputs.items():
        pt = model.patches[m]
        target = pt.patchify(x).float()
        mask = out[f"mask_{m}"].unsqueeze(-1)
        recon = target.clone()
        if f"pred_{m}" in out and model.cfg.target == "pixels":
            pred = out[f"pred_{m}"].float()
            if model.cfg.norm_pix_loss:  # undo the per-patch normalisation with the target's stats
                t = gather_tokens(target, out[f"ids_{m}"])
                pred = pred * (t.var(-1, keepdim=True) + 1e-6).sqrt() + t.mean(-1, keepdim=True)
            recon.scatter_(1, out[f"ids_{m}"].unsqueeze(-1).expand_as(pred), pred)
        res[m] = tuple(pt.unpatchify(y) for y in (target, target * (1 - mask), recon))
    return res


# -----------------------------------------------------------------------------
# rules (Sec. 3.3, 4.2), which AVMAE checks first: fail fast, say why


# the sizes and counts of the model (each at least 1)
COUNTS = ("num_frames", "image_size", "in_chans", "tubelet", "patch_size", "audio_frames",
          "mel_bins", "audio_patch_t", "audio_patch_f", "width", "depth", "heads", "dec_width",
          "dec_depth", "dec_heads", "dec_mlp", "fusion_layers", "cross_layers")


def check_shapes(cfg: AVMAEConfig) -> None:
    """The numbers any model of this config needs (counts, ratios, heads, tiling of the inputs it
    reads); finetuning's models check these, pretraining all of check_config."""
    for names, ok, says in ((COUNTS, lambda v: v >= 1, "1 or more"),
                            (("mlp_ratio", "tau_inter", "tau_intra"), lambda v: v > 0, "above 0"),
                            (("contrast_inter", "contrast_intra", "teacher_width", "bottlenecks"),
                             lambda v: v >= 0, "0 or more"),
                            (("drop_path",), lambda v: 0 <= v < 1,
                             "a probability below 1 (MAE finetuning: 0.1)")):
        for name in names:
            if not ok(getattr(cfg, name)):
                raise ValueError(f"{name}={getattr(cfg, name)}: must be {says}")
    if not 0.0 <= cfg.layer_scale <= 1.0:
        raise ValueError(f"layer_scale={cfg.layer_scale} is LayerScale's first value, between 0 "
                         "(off) and 1 (CaiT, Sec. 2.1: 0.1 up to 18 blocks, 1e-5 at 24, 1e-6 "
                         "deeper)")
    for w, h, what in ((cfg.width, cfg.heads, "encoder"), (cfg.dec_width, cfg.dec_heads,
                                                           "decoder")):
        if w % h or (w // h) % 2:
            raise ValueError(f"{what} width {w} must split into {h} heads of even size")
    if "v" in cfg.mods and (cfg.num_frames % cfg.tubelet or cfg.image_size % cfg.patch_size):
        raise ValueError(f"video {cfg.num_frames}x{cfg.image_size}x{cfg.image_size} does not tile "
                         f"into {cfg.tubelet}x{cfg.patch_size}x{cfg.patch_size} tubelets")
    if "a" in cfg.mods and (cfg.mel_bins % cfg.audio_patch_f or
                            cfg.audio_frames < cfg.audio_patch_t):
        raise ValueError(f"spectrogram {cfg.audio_frames}x{cfg.mel_bins} does not tile into "
                         f"{cfg.audio_patch_t}x{cfg.audio_patch_f} patches")


def check_config(cfg: AVMAEConfig) -> None:
    for name, allowed in CHOICES.items():
        if getattr(cfg, name) not in allowed:
            raise ValueError(f"{name}={getattr(cfg, name)!r} is not one of {', '.join(allowed)}")
    check_shapes(cfg)
    if cfg.modalities == "av" and cfg.encoder == "separate" and cfg.decoder == "separate":
        raise ValueError("encoder='separate' with decoder='separate' is two unrelated MAEs that "
                         "never exchange information (paper Sec. 3.3); for that baseline "
                         "(Table 10) pretrain --modalities a and --modalities v on their own")
    if cfg.modalities != "av":
        for what, on in (("contrast_inter", cfg.contrast_inter > 0),
                         ("objective='video'", cfg.objective == "video")):
            if on:
                raise ValueError(f"{what} relates audio and video: it needs --modalities av, not "
                                 f"{cfg.modalities!r}")
    if cfg.objective == "video" and cfg.decoder_layout == "unshuffle":
        raise ValueError("decoder_layout='unshuffle' has no place for the audio context of "
                         "objective='video'")
    if cfg.objective not in ("joint", "video"):
        if cfg.modalities != "av":
            raise ValueError(f"objective={cfg.objective!r} reconstructs one modality from the "
                             f"other: it needs --modalities av, not {cfg.modalities!r}")
        if not ENCODERS[cfg.encoder].mixes:
            mixing = ", ".join(k for k, e in ENCODERS.items() if e.mixes)
            raise ValueError(f"objective={cfg.objective!r} decodes one modality from the other's "
                             f"encoded tokens, so the encoder must mix modalities ({mixing}); "
                             f"with encoder={cfg.encoder!r} they never meet and training cannot "
                             "converge (paper Sec. 4.2)")
        if cfg.objective == "inpaint_both" and cfg.decoder == "early":
            raise ValueError("objective='inpaint_both' with decoder='early' would concatenate "
                             "both inpainting sequences, so each modality's reconstruction would "
                             "see its own encoded tokens; use decoder 'shared' or 'separate'")
        if cfg.decoder_layout == "unshuffle":
            raise ValueError("decoder_layout='unshuffle' restores one modality's own raster "
                             "order: it applies to objective='joint' only")
    ENCODERS[cfg.encoder].check(cfg)  # (a variant's own rules)
    for m in cfg.mods:
        grid = PATCHES[m](cfg).grid
        units = mask_units(grid, MASK_AXES[m][getattr(cfg, f"mask_type_{m}")])
        ratio = getattr(cfg, f"mask_ratio_{m}")
        reconstructed = m in OBJECTIVES[cfg.objective]  # (AV-MaskEnhancer keeps all of its audio)
        n = mask_count(ratio, units)
        if (reconstructed and n == 0) or n >= units:
            raise ValueError(f"mask_ratio_{m}={ratio} masks {n} of {units} units: at least one "
                             f"must be masked{' (it is reconstructed)' if reconstructed else ''} "
                             "and one kept")
    if cfg.objective != "joint" and cfg.inpaint_layout == "paper":
        for t, s in OBJECTIVES[cfg.objective].items():
            n_t, k_s = _num_tokens(cfg, t), _num_tokens(cfg, s) - _num_masked(cfg, s)
            if n_t <= k_s:
                raise ValueError(f"objective={cfg.objective!r}, inpaint_layout='paper': the {t} "
                                 f"sequence has n_{t}={n_t} slots but {k_s} are taken by visible "
                                 f"{s} tokens, leaving no mask token to supervise; raise "
                                 f"mask_ratio_{s} or use inpaint_layout='masked'")


def _num_tokens(cfg: AVMAEConfig, m: str) -> int:
    return math.prod(PATCHES[m](cfg).grid)


def _num_masked(cfg: AVMAEConfig, m: str) -> int:
    grid = PATCHES[m](cfg).grid
    axes = MASK_AXES[m][getattr(cfg, f"mask_type_{m}")]
    units = mask_units(grid, axes)
    return mask_count(getattr(cfg, f"mask_ratio_{m}"), units) * (math.prod(grid) // units)


# =============================================================================
# the relatives: MAViL (Huang et al., 2023), CAV-MAE (Gong et al., 2023), AV-MaskEnhancer (Diao et
# al., 2023). They extend the core above: their encoders are ENCODERS entries like the four of
# Fig. 2, and their contrastive terms are added to the reconstruction loss by contrast_losses().
# An encoder that passes through unimodal representations on the way (MAViL's streams, CAV-MAE's
# unimodal pass) gives them by with_unimodal(xs) -> (fused, unimodal) and unimodal(xs); for any
# other encoder the unimodal representation is that modality encoded alone.


class _GatherWithGrad(torch.autograd.Function):
    """All ranks' rows, concatenated in rank order; the backward sums every rank's gradient for this
    rank's rows (each rank's loss used them as negatives)."""

    @staticmethod
    def forward(ctx, x):
        dist = torch.distributed
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        ctx.rows = (dist.get_rank() * x.shape[0], x.shape[0])
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, g):
        g = g.contiguous()
        torch.distributed.all_reduce(g)
        start, n = ctx.rows
        return g[start:start + n]


def info_nce(x: torch.Tensor, y: torch.Tensor, tau: float) -> torch.Tensor:
    """InfoNCE (MAViL Eq. 2): the i-th row of x should pick the i-th row of y among all of y, by
    cosine similarity / tau. x, y: (B, D). Under torch.distributed y is gathered from every rank
    (with its gradient), so the negatives are the global batch. CAV-MAE's single-directional loss
    (a log-softmax over the audio axis) is info_nce(video, audio)."""
    x, y = F.normalize(x.float(), dim=-1), F.normalize(y.float(), dim=-1)
    dist, offset = torch.distributed, 0
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        offset = dist.get_rank() * x.shape[0]
        y = _GatherWithGrad.apply(y)
    labels = torch.arange(x.shape[0], device=x.device) + offset
    return F.cross_entropy(x @ y.T / tau, labels)


def unimodal_flops(enc_cls, cfg, k: dict, blk) -> float:
    """What the contrastive terms add to an encoder's FLOPs: the unimodal pass that with_unimodal
    does not get on the way, and the second masked view (MAViL's intra-modal term)."""
    one = enc_cls.unimodal_flops(cfg, k, blk)
    extra = 0 if enc_cls.unimodal_free or not enc_cls.mixes else one
    return extra + (one if cfg.contrast_intra else 0)


def contrast_losses(model, out: dict, patches: dict, uni: dict, masks2: dict | None) -> dict:
    """MAViL Eq. 3-4 and CAV-MAE: InfoNCE between the mean-pooled unimodal outputs of audio and
    video (symmetric, or CAV-MAE's single direction), and between two independently masked views of
    each modality; added to the reconstruction loss with their weights."""
    cfg = model.cfg
    pooled = {m: u.mean(1) for m, u in uni.items()}
    out["loss_recon"] = out["loss"]
    if cfg.contrast_inter > 0:
        a, v = pooled["a"], pooled["v"]
        nce = info_nce(v, a, cfg.tau_inter)
        if cfg.contrast_symmetric:
            nce = 0.5 * (nce + info_nce(a, v, cfg.tau_inter))
        out["loss_inter"] = nce
        out["loss"] = out["loss"] + cfg.contrast_inter * nce
    if cfg.contrast_intra > 0:
        if masks2 is None:
            p = next(iter(patches.values()))
            masks2 = model.sample_masks(p.shape[0], p.device)
        # the second view: unimodal only
        uni2 = model.encoder.unimodal(model.embed(patches, masks2))
        out["loss_intra"] = sum(info_nce(pooled[m], uni2[m].mean(1),
                                         cfg.tau_intra) for m in uni) / len(uni)
        out["loss"] = out["loss"] + cfg.contrast_intra * out["loss_intra"]
    return out


def _streams(mods, dim, depth, heads, hidden, attn_fn, dpr):
    return nn.ModuleDict({m: Transformer(dim, depth, heads, hidden, attn_fn, dpr) for m in mods})


def _streams_ids(streams) -> dict:
    return {k: v for m, s in streams.items() for k, v in _prefix(f"streams.{m}",
                                                                 s.layer_ids(1)).items()}


class BottleneckFusion(nn.Module):
    """MBT layers (Nagrani et al., 2021): each modality's layer sees [own tokens | shared bottleneck
    tokens]; the bottleneck outputs are averaged over the modalities after every layer. shared: one
    layer g_av applied to both modalities (MAViL App. B: a_um || b_a = g_av(a_um || b), likewise
    for video); otherwise a layer per modality, as MBT itself."""

    def __init__(self, mods, dim, depth, heads, hidden, attn_fn, n_tokens: int,
                 shared: bool = True):
        super().__init__()
        self.layers = _streams(["av"] if shared else mods, dim, depth, heads, hidden, attn_fn,
                               None)
        self.key = {m: "av" if shared else m for m in mods}
        self.tokens = nn.Parameter(torch.zeros(1, n_tokens, dim))
        nn.init.trunc_normal_(self.tokens, std=0.02)

    def layer_ids(self, first: int) -> dict:
        ids = {f"layers.{m}.{k}": v
               for m, s in self.layers.items() for k, v in s.layer_ids(first).items()}
        return {**ids, "tokens": first}

    def forward(self, xs: dict) -> dict:
        z = self.tokens.expand(next(iter(xs.values())).shape[0], -1, -1)
        xs = dict(xs)
        for i in range(len(next(iter(self.layers.values())).blocks)):
            zs = []
            for m, x in xs.items():
                y = self.layers[self.key[m]].blocks[i](torch.cat([x, z], dim=1))
                xs[m], z_m = y.split([x.shape[1], z.shape[1]], dim=1)
                zs.append(z_m)
            z = torch.stack(zs).mean(0)
        return {m: self.layers[self.key[m]].norm(x) for m, x in xs.items()}


class MAViLEncoder(Fusion):
    """MAViL (Huang et al., Sec. 3.1): full unimodal encoders (depth layers + LayerNorm each), then
    a fusion encoder of F layers, vanilla (one transformer over the concatenation) or MBT. The
    contrastive losses use the unimodal outputs, not the fused ones (its footnote 1: fusion leaks
    the pairing)."""
    mixes, unimodal_free, stream_weights = True, True, Separate.stream_weights
    # stage 1 (Sec. 3.1-3.2, 4.1): full unimodal encoders + 2 fusion layers, separate decoders, 80%
    # masking, 2-D sin-cos positions, the reconstruction terms summed (Eq. 1) with inter-modal
    # (alpha 0.1, tau 0.1) and intra-modal (beta 0.01, tau 1.0) contrast on the unimodal outputs
    # (Eq. 4); one g_av for both modalities (mavil_mbt, App. B); stage 2 predicts a frozen
    # teacher's fusion outputs (mavil2, with train.py --teacher)
    RECIPES = dict(mavil=dict(encoder="mavil", fusion="vanilla", fusion_layers=2,
                              decoder="separate", mask_ratio_v=0.8, mask_ratio_a=0.8,
                              pos_embed="sincos2d", recon_sum=True, contrast_inter=0.1,
                              tau_inter=0.1, contrast_intra=0.01, tau_intra=1.0))
    RECIPES.update(mavil_mbt={**RECIPES["mavil"], "fusion": "mbt", "bottlenecks": 4},
                   mavil2={**RECIPES["mavil"], "target": "teacher"})
    # at the paper's sizes (Sec. 4.1 / App. B): 8-layer 512-wide 16-head decoders, 10 s of audio as
    # 1024 x 128 (512 tokens), 8 frames at 2 fps (4 x 14 x 14 = 784 tokens), log-mels normalised by
    # the data set's mean and 2 std (its AudioMAE pipeline; the quick presets' own rule is the same)
    PAPER_SHAPES = dict(dec_width=512, dec_depth=8, dec_heads=16, dec_mlp=2048, audio_frames=1024,
                        num_frames=8, frame_stride=12.5, audio_norm="dataset")
    INPUTS = dict(video_aug="rrc")  # its pretraining flips and randomly crops frames (App. B)
    mbt_drops = staticmethod(lambda cfg: ("fusion.",))

    @staticmethod
    def unimodal_flops(cfg, k, blk):
        return sum(blk(n, cfg.depth) for n in k.values())

    @staticmethod
    def flops(cfg, k, blk):
        nf = cfg.fusion_layers
        fusion = blk(sum(k.values()), nf) if cfg.fusion == "vanilla" else \
            sum(blk(n + cfg.bottlenecks, nf) for n in k.values())
        return MAViLEncoder.unimodal_flops(cfg, k, blk) + fusion

    def __init__(self, mods, dim, depth, heads, hidden, attn_fn, dpr=None, cfg=None):
        super().__init__()
        self.streams = _streams(mods, dim, depth, heads, hidden, attn_fn, dpr)
        n_fusion, self.vanilla = cfg.fusion_layers, cfg.fusion == "vanilla"
        self.fusion = Transformer(dim, n_fusion, heads, hidden, attn_fn) if self.vanilla else \
            BottleneckFusion(mods, dim, n_fusion, heads, hidden, attn_fn, cfg.bottlenecks,
                             cfg.fusion == "mbt")
        self.depth, self.n_layers, self.out_width = depth, depth + n_fusion, dim

    def layer_ids(self) -> dict:
        return {**_streams_ids(self.streams), **_prefix("fusion",
                                                        self.fusion.layer_ids(self.depth + 1))}

    def unimodal(self, xs: dict) -> dict:
        return {m: self.streams[m](x) for m, x in xs.items()}

    def with_unimodal(self, xs: dict) -> tuple:
        uni = self.unimodal(xs)
        return (_joint(self.fusion, uni) if self.vanilla else self.fusion(uni)), uni

    def forward(self, xs: dict) -> dict:
        return self.with_unimodal(xs)[0]


class CAVMAEEncoder(Fusion):
    # as its authors' code runs it: 11 modality layers + 1 unified layer with per-modality norms,
    # modality-type embeddings, one decoder (one projection, one mask token) over the
    # concatenation, 2-D sin-cos positions, 75% unstructured masking of both, per-patch normalised
    # targets, the reconstruction terms summed + 0.01 x single-directional InfoNCE (tau 0.05)
    RECIPES = dict(cavmae=dict(encoder="cavmae", joint_layers=1, type_embed=True, dec_tied=True,
                               decoder="early", pos_embed="sincos2d", contrast_inter=0.01,
                               tau_inter=0.05, contrast_symmetric=False, mask_ratio_v=0.75,
                               mask_ratio_a=0.75, recon_sum=True, norm_pix_loss=True))
    # at the paper's sizes (Sec. 3, its code): an 8-layer 512-wide 16-head decoder, 1024 x 128 audio
    # (512 tokens), one RGB frame, log-mels as its code normalises them: (x + 5.081) / 4.4849
    # (AudioSet's mean and 2 std; a quick preset on a small set keeps that set's own)
    PAPER_SHAPES = dict(dec_width=512, dec_depth=8, dec_heads=16, dec_mlp=2048, audio_frames=1024,
                        num_frames=1, tubelet=1, audio_norm="cavmae")

    """CAV-MAE (Gong et al., Sec. 2.3; the authors' cav_mae.py): L - S modality-specific layers per
    modality (no closing norm), then S unified layers over the concatenation and a LayerNorm. The
    unified layers carry a LayerNorm pair per modality besides their own: the unimodal pass that the
    contrastive term reads runs each modality alone through them with its own norms, then its own
    final norm (norm.a / norm.v); the fused pass uses the shared ones (norm.av)."""
    mixes = unimodal_free = True

    @staticmethod
    def check(cfg):
        if cfg.modalities == "av" and not cfg.contrast_inter > 0:
            raise ValueError("encoder='cavmae' keeps a LayerNorm pair per modality for the "
                             "unimodal pass that only the contrastive term reads: set "
                             "contrast_inter > 0 (CAV-MAE: 0.01), or use encoder='mid' with "
                             "joint_layers=1")
        Mid.check(cfg)

    @staticmethod
    def mbt_drops(cfg):  # MBT finetunes the unimodal path: the fused pass's norms go
        return (*(f"joint.{i}.norm" for i in range(cfg.joint_layers)), "norm.av")

    @staticmethod
    def stream_weights(cfg, m):
        L, S = cfg.depth, cfg.joint_layers
        blocks = [f"streams.{m}.{i}" if i < L - S else
                  (f"joint.{i - L + S}",
                   {"norm1": f"by.{m}.norm1", "norm2": f"by.{m}.norm2"}) for i in range(L)]
        return dict(blocks=blocks, norm=f"norm.{m}", inner=None)

    @staticmethod
    def flops(cfg, k, blk):
        L, S = cfg.depth, cfg.joint_layers
        return sum(blk(n, L - S) for n in k.values()) + blk(sum(k.values()), S)

    @staticmethod
    def unimodal_flops(cfg, k, blk):  # the unified layers on each modality alone
        return sum(blk(n, cfg.joint_layers) for n in k.values())

    def __init__(self, mods, dim, depth, heads, hidden, attn_fn, dpr=None, cfg=None):
        super().__init__()
        dpr = dpr if dpr is not None else [0.0] * depth
        L, S = depth, cfg.joint_layers
        self.streams = nn.ModuleDict({m: nn.ModuleList(Block(dim, heads, hidden, attn_fn, dpr[i])
                                                       for i in range(L - S)) for m in mods})
        self.joint = nn.ModuleList(ModalityNormBlock(mods, dim, heads, hidden, attn_fn, dpr[i])
                                   for i in range(L - S, L))
        self.norm = nn.ModuleDict({k: nn.LayerNorm(dim, eps=1e-6) for k in ("av", *mods)})
        self.n_layers, self.out_width = depth, dim

    def layer_ids(self) -> dict:
        ids = {f"streams.{m}.{i}.{n}": i + 1 for m, s in self.streams.items()
               for i, b in enumerate(s) for n, _ in b.named_parameters()}
        first = self.n_layers - len(self.joint) + 1
        ids.update({f"joint.{j}.{n}": first + j
                    for j, b in enumerate(self.joint) for n, _ in b.named_parameters()})
        return {**ids, **{f"norm.{n}": self.n_layers for n, _ in self.norm.named_parameters()}}

    def with_unimodal(self, xs: dict) -> tuple:
        s = {}
        for m, x in xs.items():
            for blk in self.streams[m]:
                x = blk(x)
            s[m] = x
        keys, x, sizes = _concat(s)
        for blk in self.joint:
            x = blk(x)
        fused = dict(zip(keys, self.norm["av"](x).split(sizes, dim=1)))
        return fused, {m: self._unified(m, x) for m, x in s.items()}

    def _unified(self, m, x):
        for blk in self.joint:
            x = blk(x, m)
        return self.norm[m](x)

    def unimodal(self, xs: dict) -> dict:
        return self.with_unimodal(xs)[1]

    def forward(self, xs: dict) -> dict:
        return self.with_unimodal(xs)[0]


class ModalityNormBlock(Block):
    """A block with a LayerNorm pair per modality besides its own (CAV-MAE's unified layer):
    forward(x) uses its own, forward(x, m) modality m's; attention and MLP are shared."""

    def __init__(self, mods, dim, heads, hidden, attn_fn, drop_path=0.0):
        super().__init__(dim, heads, hidden, attn_fn, drop_path)
        self.by = nn.ModuleDict({m: nn.ModuleDict({n: nn.LayerNorm(dim, eps=1e-6)
                                                   for n in ("norm1", "norm2")}) for m in mods})

    def forward(self, x, m: str | None = None):
        n1, n2 = (self.norm1, self.norm2) if m is None else (self.by[m].norm1, self.by[m].norm2)
        x = x + self._drop(self.ls1(self.attn(n1(x))))
        return x + self._drop(self.ls2(self.mlp(n2(x))))


class CrossBlock(nn.Module):
    """Pre-LN cross-attention (queries from x, keys and values from ctx), then an MLP."""

    def __init__(self, dim: int, heads: int, hidden: int):
        super().__init__()
        self.heads = heads
        self.norm_q, self.norm_kv, self.norm2 = (nn.LayerNorm(dim, eps=1e-6) for _ in range(3))
        self.q, self.kv, self.proj = nn.Linear(dim, dim), nn.Linear(dim,
                                                                    2 * dim), nn.Linear(dim, dim)
        self.mlp = MLP(dim, hidden)

    def forward(self, x, ctx):
        B, N, D = x.shape
        H = self.heads
        q = self.q(self.norm_q(x)).view(B, N, H, D // H).transpose(1, 2)
        k, v = self.kv(self.norm_kv(ctx)).view(B, ctx.shape[1], 2, H,
                                               D // H).permute(2, 0, 3, 1, 4)
        # lengths differ: SDPA
        x = x + self.proj(attention(q, k, v).transpose(1, 2).reshape(B, N, D))
        return x + self.mlp(self.norm2(x))


class XAttnEncoder(Fusion):
    # 90% tube masking of video, all of the audio, bidirectional cross-attention, the video
    # reconstructed from both streams
    RECIPES = dict(avme=dict(encoder="xattn", cross_layers=1, mask_type_v="tube", mask_ratio_v=0.9,
                             mask_ratio_a=0.0, objective="video", decoder="early"))

    """AV-MaskEnhancer (Diao et al., Sec. III-C/D): unimodal encoders (depth layers + LayerNorm),
    then bidirectional cross-attention: video queries attend to audio and audio queries to video,
    both from the previous layer's tokens (Eq. 6). xattn_fuse='channel' (the paper's form): each
    token leaves beside its cross-attended counterpart, N_fuse = N_v tokens of D_fuse = 2 D_v
    (unimodal || cross-attended); 'sequence': the cross-attended tokens alone, and the decoder
    concatenates the two modalities along the sequence. In the channel form with the video-only
    objective nothing reads the audio queries of the last layer, so that layer has video queries
    alone (out_mods = ('v',)): no parameter goes untrained."""
    mixes, unimodal_free, stream_weights = True, True, Separate.stream_weights
    mbt_drops = staticmethod(lambda cfg: ("cross.", "norm."))
    unimodal_flops = MAViLEncoder.unimodal_flops

    @staticmethod
    def check(cfg):
        if cfg.objective not in ("joint", "video", "inpaint_both"):
            raise ValueError(f"objective={cfg.objective!r} decodes from one modality's tokens "
                             "only, so one direction of the xattn encoder's cross-attention would "
                             "never be trained; use inpaint_both")

    @staticmethod
    def flops(cfg, k, blk):  # per layer and direction: q, kv, out projections, scores, MLP
        d, h = cfg.width, int(cfg.width * cfg.mlp_ratio)
        cross = sum(4 * k[m] * d * d + 4 * k[o] * d * d + 4 * k[m] * k[o] * d + 4 * k[m] * d * h
                    for m in k for o in k if o != m)
        return XAttnEncoder.unimodal_flops(cfg, k, blk) + cfg.cross_layers * cross

    def __init__(self, mods, dim, depth, heads, hidden, attn_fn, dpr=None, cfg=None):
        super().__init__()
        self.channel, J = cfg.xattn_fuse == "channel", cfg.cross_layers
        video_only = self.channel and cfg.objective == "video" and "v" in mods
        self.out_mods = ("v",) if video_only else tuple(mods)
        self.streams = _streams(mods, dim, depth, heads, hidden, attn_fn, dpr)
        self.cross = nn.ModuleList(
            nn.ModuleDict({m: CrossBlock(dim, heads, hidden)
                           for m in (self.out_mods if j == J - 1 else mods)}) for j in range(J))
        self.norm = nn.ModuleDict({m: nn.LayerNorm(dim, eps=1e-6) for m in self.out_mods})
        self.depth, self.n_layers = depth, depth + J
        self.out_width = dim * (2 if self.channel else 1)

    def layer_ids(self) -> dict:
        ids = {f"cross.{j}.{n}": self.depth + 1 + j for j, layer in enumerate(self.cross)
               for n, _ in layer.named_parameters()}
        return {**_streams_ids(self.streams), **ids,
                **{f"norm.{n}": self.n_layers for n, _ in self.norm.named_parameters()}}

    unimodal = MAViLEncoder.unimodal

    def with_unimodal(self, xs: dict) -> tuple:
        uni = self.unimodal(xs)
        x = dict(uni)
        for layer in self.cross:
            x = {m: layer[m](x[m], x[o]) for m in layer for o in x if o != m}
        out = {m: self.norm[m](x[m]) for m in self.out_mods}
        if self.channel:  # (B, N_m, 2 D): each token beside what it read of the other modality
            out = {m: torch.cat([uni[m], t], dim=-1) for m, t in out.items()}
        return out, uni

    forward = MAViLEncoder.forward


ENCODERS.update(mavil=MAViLEncoder, cavmae=CAVMAEEncoder, xattn=XAttnEncoder)
# the recipes train.py --variant names: AV-MAE's own (the defaults) and the relatives'
VARIANTS = dict(avmae={}, **{n: r for e in ENCODERS.values() for n, r in
                             getattr(e, "RECIPES", {}).items()})


def variant(name: str, paper_size: bool) -> dict:
    """A recipe's overrides of the model and the data flags: at a paper size (base, large) also the
    paper's decoder and input shapes (smaller sizes keep theirs: a quick CPU run stays quick)."""
    enc = ENCODERS[VARIANTS[name].get("encoder", "mid")]
    return {**VARIANTS[name], **getattr(enc, "INPUTS", {}),
            **(getattr(enc, "PAPER_SHAPES", {}) if paper_size else {})}


# -----------------------------------------------------------------------------
# finetuning models (Sec. 4.1): the pretrained encoder, unmasked, global average pooling and linear
# heads. Audio-only = AST, video-only = unfactorised ViViT, audiovisual = MBT (best, Table 14) or
# the pretraining encoder structure itself. finetune.py maps the weights. Modules that are new in
# finetuning get the pretraining init (a model trained from scratch, Table 9's "Scratch" row, is
# initialised as the pretrained one was), the heads MAE's finetuning init.


def inflate_patch_embed(w2d: torch.Tensor, p: int, c2: int, tubelet: int, in_chans: int,
                        mode: str = "inflate"):
    """ViViT's initialisation (Arnab et al., Sec. 3.4) of a tubelet embedding from a 2-D patch
    embedding. w2d: (D, p*p*c2), features in (h, w, c) order (an image patch, or an audio patch read
    as (time, freq) with c2 = 1); returns (D, tubelet*p*p*in_chans) in the tokeniser's (t, h, w, c)
    order. inflate: the filter repeated over time and divided by tubelet, so a video of one repeated
    image embeds as the image did; central: the filter on the middle frame, zeros elsewhere. A
    single-channel filter is spread over the colour channels and divided by their number (a grey
    video embeds as the patch did)."""
    D = w2d.shape[0]
    w = w2d.reshape(D, p, p, c2)
    if c2 != in_chans:
        if c2 != 1:
            raise ValueError(f"cannot map {c2} input channels onto {in_chans}")
        w = w.expand(D, p, p, in_chans) / in_chans
    if mode == "inflate":
        w3 = w.unsqueeze(1).expand(D, tubelet, p, p, in_chans) / tubelet
    elif mode == "central":
        w3 = torch.zeros(D, tubelet, p, p, in_chans, dtype=w.dtype)
        w3[:, tubelet // 2] = w
    else:
        raise ValueError(f"mode={mode!r} is not one of inflate, central")
    return w3.reshape(D, -1).contiguous()


def init_weights(m):
    """MAE's init: xavier-uniform Linear, zero bias, unit LayerNorm."""
    if isinstance(m, nn.Linear):
        nn.init.xavier_uniform_(m.weight)
        nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


def classifier_heads(width: int, keys, heads: dict, linear_probe: bool):
    """Per key (a modality, or 'av' for one head shared by both) and head a Linear: trunc-normal
    std 2e-5 and zero bias (MAE finetuning), std 0.01 behind a parameter-free BatchNorm for a
    linear probe (MAE's linear probe)."""
    probe = nn.ModuleDict({k: nn.BatchNorm1d(width, affine=False,
                                             eps=1e-6) for k in keys}) if linear_probe else None
    out = nn.ModuleDict({k: nn.ModuleDict({h: nn.Linear(width, n) for h, n in heads.items()})
                         for k in keys})
    for lin in (lin for hs in out.values() for lin in hs.values()):
        nn.init.trunc_normal_(lin.weight, std=0.01 if linear_probe else 2e-5)
        nn.init.zeros_(lin.bias)
    return probe, out


def pretrained_config(pretrained: dict) -> AVMAEConfig:
    """A checkpoint's model config (a dict) as an AVMAEConfig, keys it does not know left out."""
    known = {f.name for f in dataclasses.fields(AVMAEConfig)}
    return AVMAEConfig(**{k: v for k, v in pretrained.items() if k in known})


# mean: the papers' (MAE's global pool); max: each channel's largest token, which a short event in a
# long clip (one word in 4 s of noise) is not averaged away in
POOLS = {"mean": lambda x: x.mean(1), "max": lambda x: x.amax(1)}


class Classifier(nn.Module):
    """What the finetuning models share: pooled features per modality -> logits per head.
    forward(a, v) -> {head: (B, classes)}, averaged over modalities; per_modality=True ->
    {modality: {head: logits}} (the authors' MBT trains each modality's logits on its own loss).
    A backbone is one subclass and one BACKBONES entry: build(cfg, heads, options) makes it from
    finetune.py's options, weight_map(pretrained) says which pretraining tensor initialises each of
    its own (finetune.map_pretrained loads them and reports the rest)."""
    FROM_STREAMS = True  # its streams (stream_sources) take the pretraining's, not its encoder

    @classmethod
    def build(cls, cfg: AVMAEConfig, heads: dict, o: dict) -> "Classifier":
        raise NotImplementedError

    def weight_map(self, pretrained: dict) -> dict:
        """{own tensor: the pretraining tensor (or a tuple of them, averaged)} for the streams of
        stream_sources(): each stream's embedding, positions, blocks and norm from the pretraining
        encoder's stream of that modality (ENCODERS[...].stream_weights; a unimodal checkpoint
        initialises every stream, Table 3)."""
        pc = pretrained_config(pretrained)
        src_mods, mapping = pc.mods, {}
        for prefix, st, m in self.stream_sources():
            s = m if m in src_mods else src_mods[0]
            if m in src_mods:
                mapping[f"{prefix}.embed.weight"] = f"patch_embed.{m}.weight"
                mapping[f"{prefix}.embed.bias"] = f"patch_embed.{m}.bias"
                if pc.pos_embed == "learned":
                    mapping[f"{prefix}.pos.table"] = f"enc_pos.{m}.table"
            # (early / shared: one set of weights into every stream, untied)
            w = ENCODERS[pc.encoder].stream_weights(pc, s)
            # a source block, or (block, {its submodule: the one to read}); a factorised block's
            # new parts (e.g. ViViT-FSA's temporal attention) are left out
            for i in range(self.cfg.depth):
                b = w["blocks"][i]
                src, rename = b if isinstance(b, tuple) else (b, {})
                for k in st.blocks[i].state_dict():
                    head, rest = k.split(".", 1)
                    if head not in getattr(st.blocks[i], "new", ()):
                        mapping[f"{prefix}.blocks.{i}.{k}"] = \
                            f"encoder.{src}.{rename.get(head, head)}.{rest}"
            final = f"encoder.{w['norm']}"
            for k in ("weight", "bias"):
                if self.norm is None:
                    mapping[f"{prefix}.norm.{k}"] = f"{final}.{k}"
                else:  # one LayerNorm for both modalities: the mean of the streams' final norms
                    mapping[f"norm.{k}"] = tuple(sorted(set(mapping.get(f"norm.{k}", ()))
                                                        | {f"{final}.{k}"}))
                if st.inner_norm_at is not None:
                    mapping[f"{prefix}.inner_norm.{k}"] = f"encoder.{w['inner'][0]}.{k}"
        return mapping

    @staticmethod
    def dropped_by_design(pretrained: dict) -> tuple:
        """The pretraining encoder's parts this backbone leaves out (its encoder class says: e.g.
        MAViL's fusion layers)."""
        pc = pretrained_config(pretrained)
        return tuple(f"encoder.{p}" for p in ENCODERS[pc.encoder].mbt_drops(pc))

    def encode(self, a=None, v=None) -> dict:
        """{modality: (B, N, D)}: the backbone's final tokens on the unmasked input, every token
        (a spectrogram (B, T, F), a video (B, 3, T, H, W))."""
        return self.tokens(a, v)

    def features(self, a=None, v=None) -> dict:
        """{modality: (B, D)} pooled features (what a linear probe sees)."""
        return {m: self.pool(x) for m, x in self.tokens(a, v).items()}

    pooling = "mean"  # how tokens become one feature: POOLS (build_backbone sets it)
    OWN_POOL = False  # it pools by a design of its own (ViViT-FE's temporal encoder): mean only

    def pool(self, x):  # (B, N, D) -> (B, D)
        return POOLS[self.pooling](x)

    def forward(self, a=None, v=None, per_modality: bool = False) -> dict:
        logits = {}
        for m, f in self.features(a, v).items():
            k = self.head_key[m]
            f = self.probe_norm[k](f) if self.probe_norm is not None else f
            logits[m] = {h: lin(f) for h, lin in self.heads[k].items()}
        if per_modality:
            return logits
        names = next(iter(logits.values())).keys()
        return {h: torch.stack([lg[h] for lg in logits.values()]).mean(0) for h in names}


# The video transformers of the AV-MAE authors' group that finetune from our pretraining (Arnab's
# talk): ViViT's factorisations, TokenLearner and Multiview Transformers. Tokens of a stream come in
# (time index, position) order: t time indices of s tokens each, N = t s (video: the tubelets' time
# index and the h x w grid; audio: the time patch and the frequency patches).


class FrameBlock(Block):
    """ViViT Model 2's spatial encoder (factorised encoder; Arnab et al., 2021, Sec. 3.3): the
    plain block on the s tokens of each time index alone. (B, t s, D) -> (B, t s, D)."""

    def forward(self, x, t):
        B, N, D = x.shape
        return super().forward(x.reshape(B * t, N // t, D)).reshape(B, N, D)


class FSABlock(Block):
    """ViViT Model 3 (factorised self-attention): attention among the tokens of one time index,
    then a second attention among the tokens of one spatial position, then the MLP. The second
    attention and its LayerNorm are new in finetuning; its output projection starts at zero (set by
    the model after its init), so the block starts as the pretrained spatial block (Sec. 3.4)."""
    new = ("norm_t", "attn_t")  # not in a pretrained block

    def __init__(self, dim: int, heads: int, hidden: int, attn_fn, drop_path: float = 0.0):
        super().__init__(dim, heads, hidden, attn_fn, drop_path)
        self.norm_t, self.attn_t = nn.LayerNorm(dim, eps=1e-6), Attention(dim, heads, attn_fn)

    def forward(self, x, t):
        B, N, D = x.shape
        s = N // t
        y = self.attn(self.norm1(x).reshape(B * t, s, D)).reshape(B, N, D)  # within a frame
        x = x + self._drop(self.ls1(y))
        y = self.norm_t(x).view(B, t, s, D).transpose(1, 2).reshape(B * s, t, D)
        y = self.attn_t(y).view(B, s, t, D).transpose(1, 2).reshape(B, N, D)  # across frames
        x = x + self._drop(y)  # (the new branch starts at zero: no LayerScale)
        return x + self._drop(self.ls2(self.mlp(self.norm2(x))))


class FDPAttention(Attention):
    """ViViT Model 4 (factorised dot-product): the weights of full attention; the first half of
    the heads attend among the tokens of one time index, the other half among the tokens of one
    spatial position; the heads' outputs are concatenated and projected as usual."""

    def forward(self, x, t):
        B, N, D = x.shape
        H, s = self.heads, N // t
        hd, h = D // H, H // 2
        q, k, v = self.qkv(x).view(B, N, 3, H, hd).permute(2, 0, 3, 1, 4)  # (B, H, N, hd)

        def space(u):  # (B, h, t s, hd) -> (B, h t, s, hd)
            return u.reshape(B, -1, s, hd)

        def time(u):  # (B, h, t s, hd) -> (B, h s, t, hd)
            return u.reshape(B, -1, t, s, hd).transpose(2, 3).reshape(B, -1, t, hd)
        ys = self.attn_fn(space(q[:, :h]), space(k[:, :h]), space(v[:, :h])).reshape(B, h, N, hd)
        yt = self.attn_fn(time(q[:, h:]), time(k[:, h:]), time(v[:, h:]))
        yt = yt.reshape(B, H - h, s, t, hd).transpose(2, 3).reshape(B, H - h, N, hd)
        y = torch.cat([ys, yt], dim=1)  # (B, H, N, hd)
        return self.proj(y.transpose(1, 2).reshape(B, N, D))


class FDPBlock(Block):
    def __init__(self, dim: int, heads: int, hidden: int, attn_fn, drop_path: float = 0.0):
        super().__init__(dim, heads, hidden, attn_fn, drop_path)
        if heads < 2 or heads % 2:
            raise ValueError(f"factorised dot-product attention splits the heads in two halves: "
                             f"{heads} heads do not split")
        self.attn = FDPAttention(dim, heads, attn_fn)

    def forward(self, x, t):
        x = x + self._drop(self.ls1(self.attn(self.norm1(x), t)))
        return x + self._drop(self.ls2(self.mlp(self.norm2(x))))


BLOCKS = {"joint": Block, "frames": FrameBlock, "fsa": FSABlock, "fdp": FDPBlock}


class TokenLearner(nn.Module):
    """TokenLearner (Ryoo et al., 2021): S learned tokens per time index. alpha (a LayerNorm and a
    two-layer MLP with S outputs) scores each of the s tokens of a time index S times; a softmax
    over the s positions makes each score map a weighting; learned token i is the weighted sum of
    the tokens under map i. (B, t s, D) -> (B, t S, D): later layers see t S tokens."""

    def __init__(self, dim: int, S: int):
        super().__init__()
        self.S = S
        self.alpha = nn.Sequential(nn.LayerNorm(dim, eps=1e-6), nn.Linear(dim, dim), nn.GELU(),
                                   nn.Linear(dim, S))

    def forward(self, x, t):
        B, N, D = x.shape
        x = x.reshape(B * t, N // t, D)
        w = self.alpha(x).softmax(dim=1)  # (B t, s, S): S maps over the s positions
        return torch.einsum("bns,bnd->bsd", w, x).reshape(B, t * self.S, D)

    def flops(self, n: int, d: int) -> float:  # on n tokens: alpha, then the weighted sums
        return 2 * n * (d * d + d * self.S) + 2 * n * self.S * d


class Stream(nn.Module):
    """One modality's ViT: patch embedding, positions, `depth` blocks, a final LayerNorm (unless the
    model shares one across modalities). A stream initialised from a mid-fusion encoder keeps that
    stream's closing LayerNorm after block `inner_norm_at - 1`, so the pretrained function is kept
    exactly. kind: the blocks (joint: full attention; frames, fsa, fdp: ViViT's factorisations);
    tokenlearner (S, L): S learned tokens per time index after block L - 1 (0: none)."""

    def __init__(self, cfg: AVMAEConfig, m: str, attn_fn, dpr, inner_norm_at: int | None = None,
                 final_norm: bool = True, kind: str = "joint", tokenlearner: tuple = (0, 0)):
        super().__init__()
        self.patches, self.kind, self.mod = PATCHES[m](cfg), kind, m
        self.width, self.heads = cfg.width, cfg.heads
        self.t = self.patches.grid[0]  # time indices
        self.hidden = int(cfg.width * cfg.mlp_ratio)
        self.embed = nn.Linear(self.patches.dim, cfg.width)
        self.pos = PosEmbed(self.patches.grid, cfg.width, cfg.pos_embed)
        self.blocks = nn.ModuleList(BLOCKS[kind](cfg.width, cfg.heads, self.hidden, attn_fn,
                                                 dpr[i]) for i in range(cfg.depth))
        self.inner_norm_at = inner_norm_at
        if inner_norm_at is not None:
            self.inner_norm = nn.LayerNorm(cfg.width, eps=1e-6)
        self.norm = nn.LayerNorm(cfg.width, eps=1e-6) if final_norm else None
        S, self.learn_at = tokenlearner
        if S and not 1 <= self.learn_at <= cfg.depth:
            raise ValueError(f"tokenlearner layer {self.learn_at} must lie in 1..{cfg.depth}")
        self.learner = TokenLearner(cfg.width, S) if S else None

    def tokens(self, x):  # input -> (B, N, D)
        p = self.patches.patchify(x)
        return self.embed(p) + self.pos()[: p.shape[1]]

    def block(self, i, x):
        x = self.blocks[i](x) if self.kind == "joint" else self.blocks[i](x, self.t)
        return self.inner_norm(x) if i + 1 == self.inner_norm_at else x

    def learn(self, i, x):  # TokenLearner after block i, if it sits there
        return self.learner(x, self.t) if self.learner and i + 1 == self.learn_at else x

    def layer(self, i, x):
        return self.learn(i, self.block(i, x))

    def tokens_at(self, i: int) -> int:  # tokens entering block i
        return self.t * self.learner.S if self.learner and i >= self.learn_at else self.patches.n

    def zero_new(self):  # after the model's init: new attentions start as a residual (ViViT)
        for b in self.blocks:
            if isinstance(b, FSABlock):
                nn.init.zeros_(b.attn_t.proj.weight)

    def layer_ids(self, name: str, depth: int):
        """The depth of this stream's parameter `name` (embeddings 0, block i at i + 1, a norm at
        the block it closes, the TokenLearner where it sits)."""
        p = name.split(".")
        return dict(blocks=lambda: int(p[1]) + 1, inner_norm=lambda: self.inner_norm_at,
                    embed=lambda: 0, pos=lambda: 0, learner=lambda: self.learn_at,
                    norm=lambda: depth)[p[0]]()

    def flops(self, extra: dict | None = None) -> float:
        """Forward FLOPs on one clip; extra: {block: tokens added there} (MBT's bottlenecks)."""
        f = 2 * self.patches.n * self.patches.dim * self.width  # patch embedding
        for i in range(len(self.blocks)):
            f += self._block_flops(self.tokens_at(i) + (extra or {}).get(i, 0))
        if self.learner:
            f += self.learner.flops(self.tokens_at(self.learn_at - 1), self.width)
        return f

    def _block_flops(self, n: int) -> float:
        d, h, t = self.width, self.hidden, self.t
        s = n // t
        mm = n * 2 * (4 * d * d + 2 * d * h)  # qkv, projection, MLP
        return {"joint": lambda: block_flops(n, d, h),
                "frames": lambda: mm + 4 * n * s * d,  # scores and weighted sums within a frame
                "fsa": lambda: mm + n * 2 * 4 * d * d + 4 * n * (s + t) * d,
                "fdp": lambda: mm + 4 * n * (s + t) * d / 2}[self.kind]()


class MBT(Classifier):
    """Attention bottlenecks (Nagrani et al., 2021), as the paper finetunes (Sec. 4.1): layers
    before `fusion_layer` run per modality; from it on, each modality's layer sees [own tokens | the
    bottleneck tokens] and the bottleneck outputs are averaged over modalities. With one modality
    this is a plain ViT (AST for audio, ViViT for video). The bottleneck a layer writes is read by
    the next, so fusing from layer L of D gives D - L - 1 exchanges: L = D - 1 is late fusion (each
    stream's logits see only its own input; logits averaged). head: "shared" (the authors' MBT): one
    final LayerNorm and one classifier for both modalities, each modality's logits trained on its
    own loss (finetune.py); "separate": a LayerNorm and a classifier per modality, a loss each;
    "per_modality": heads per modality, one loss on the averaged logits. Evaluation averages the
    modalities' logits in every case. kind: the video stream's blocks (joint; or, video only,
    ViViT's factorised self-attention fsa or dot-product fdp); tokenlearner (S, L): TokenLearner on
    the video stream after block L - 1. unimodal_heads (Gradient Blending, Wang et al., 2020): a
    LayerNorm + classifier per modality on the pooled tokens entering the fusion layer, whose logits
    forward(per_modality=True) adds as "a_alone", "v_alone" for a loss of their own: each stream
    must then learn its modality's part of the label alone, before the other can stand in for it."""

    KIND = "joint"  # the blocks' kind (BLOCKS): ViViT's factorisations subclass with theirs

    @classmethod
    def build(cls, cfg, heads, o):
        return cls(cfg, heads, o["fusion_layer"], o["bottlenecks"], o["inner"], o["linear_probe"],
                   o["mbt_head"], cls.KIND, o["tokenlearner"], o["unimodal_loss"])

    def __init__(self, cfg: AVMAEConfig, heads: dict, fusion_layer: int = 8, bottlenecks: int = 4,
                 inner_norm_at: int | None = None, linear_probe: bool = False,
                 head: str = "shared", kind: str = "joint", tokenlearner: tuple = (0, 0),
                 unimodal_heads: bool = False):
        super().__init__()
        self.cfg, self.mods = cfg, cfg.mods
        if len(self.mods) == 2 and not 0 <= fusion_layer <= cfg.depth:
            raise ValueError(f"fusion_layer={fusion_layer} must lie in 0..{cfg.depth}")
        if kind != "joint" and self.mods != ("v",):
            raise ValueError(f"ViViT's factorised blocks ({kind}) are a video model: finetune "
                             "video only (bottleneck tokens have no place in space or time)")
        if tokenlearner[0] and "v" not in self.mods:
            raise ValueError("TokenLearner works on the video stream: finetune video or av")
        if head not in ("shared", "separate", "per_modality"):
            raise ValueError(f"head={head!r}: shared | separate | per_modality")
        shared = head == "shared" and len(self.mods) == 2
        # finetune.py trains each modality's logits on a loss of their own
        self.loss_per_modality = head != "per_modality" and len(self.mods) == 2
        attn = get_ops(cfg.kernels)["attention"]
        dpr = [cfg.drop_path * i / max(cfg.depth - 1, 1) for i in range(cfg.depth)]
        self.streams = nn.ModuleDict({m: Stream(cfg, m, attn, dpr, inner_norm_at, not shared,
                                                kind if m == "v" else "joint",
                                                tokenlearner if m == "v" else (0, 0))
                                      for m in self.mods})
        self.bottlenecks = bottlenecks
        self.norm = nn.LayerNorm(cfg.width, eps=1e-6) if shared else None
        self.fusion_layer = fusion_layer if len(self.mods) == 2 else cfg.depth
        if len(self.mods) == 2:
            self.bottleneck = nn.Parameter(torch.zeros(1, bottlenecks, cfg.width))
        self.head_key = {m: "av" if shared else m for m in self.mods}
        self.apply(init_weights)
        for st in self.streams.values():
            st.zero_new()
        if len(self.mods) == 2:
            nn.init.trunc_normal_(self.bottleneck, std=0.02)
        self.probe_norm, self.heads = classifier_heads(cfg.width,
                                                       sorted(set(self.head_key.values())), heads,
                                                       linear_probe)
        self.unimodal = self.alone = None
        if unimodal_heads and len(self.mods) == 2 and self.fusion_layer < cfg.depth:
            self.unimodal_norm = nn.ModuleDict({m: nn.LayerNorm(cfg.width, eps=1e-6)
                                                for m in self.mods})
            _, self.unimodal = classifier_heads(cfg.width, self.mods, heads, False)
        self.n_layers = cfg.depth

    def layer_ids(self) -> dict:
        """{parameter name: depth}: embeddings 0, block i at i + 1, a norm at the block it closes,
        the bottleneck tokens where they enter, the heads at depth + 1."""
        ids = {}
        for n, _ in self.named_parameters():
            p = n.split(".")
            if p[0] == "streams":
                ids[n] = self.streams[p[1]].layer_ids(".".join(p[2:]), self.cfg.depth)
            elif p[0].startswith("unimodal"):  # new heads: the full learning rate
                ids[n] = self.n_layers + 1
            elif p[0] == "bottleneck":
                ids[n] = self.fusion_layer + 1
            else:  # the shared final norm, the heads
                ids[n] = self.cfg.depth if p[0] == "norm" else self.n_layers + 1
        return ids

    def stream_sources(self) -> list:
        """[(name prefix, stream, modality)]: the streams a pretrained encoder initialises."""
        return [(f"streams.{m}", st, m) for m, st in self.streams.items()]

    def flops(self) -> dict:
        """Forward FLOPs per clip (one test view) of the backbone, from the config."""
        fused = {i: self.bottlenecks for i in range(self.fusion_layer, self.cfg.depth)}
        f = sum(st.flops(fused if len(self.mods) == 2 else None) for st in self.streams.values())
        return dict(forward=f)

    def tokens(self, a=None, v=None) -> dict:
        xs = {m: self.streams[m].tokens(x) for m, x in (("a", a), ("v", v)) if m in self.mods}
        if set(xs) != set(self.mods):
            raise ValueError(f"this model takes modalities {self.mods}, got {tuple(xs)}")
        z = None
        for i in range(self.cfg.depth):
            if i < self.fusion_layer:
                xs = {m: self.streams[m].layer(i, x) for m, x in xs.items()}
                continue
            if z is None:
                z = self.bottleneck.expand(next(iter(xs.values())).shape[0], -1, -1)
                if self.unimodal is not None:  # what each stream learned alone, for forward()
                    self.alone = {m: self.pool(x) for m, x in xs.items()}
            zs = []
            for m, x in xs.items():
                n = x.shape[1]
                y = self.streams[m].block(i, torch.cat([x, z], dim=1))  # (B, n + bottlenecks, D)
                xs[m] = self.streams[m].learn(i, y[:, :n])
                zs.append(y[:, n:])
            z = torch.stack(zs).mean(0)  # the modalities meet only here
        # the shared head's one LayerNorm, or each stream's own
        return {m: (self.norm or self.streams[m].norm)(x) for m, x in xs.items()}

    def forward(self, a=None, v=None, per_modality: bool = False) -> dict:
        out = super().forward(a, v, per_modality)
        if per_modality and self.unimodal is not None:
            out.update({f"{m}_alone": {h: lin(self.unimodal_norm[m](self.alone[m]))
                                       for h, lin in self.unimodal[m].items()} for m in self.mods})
        return out


class ViViTFE(MBT):
    """ViViT Model 2 (factorised encoder; Arnab et al., 2021, Sec. 3.3), "late fusion" of space and
    time: the video stream is a spatial encoder run on each time index alone (the pretrained
    stream, its positions kept); each time index's tokens are pooled into one, and a temporal
    encoder of `temporal_layers` new blocks, with new temporal positions, runs over those t tokens.
    (ViViT reads CLS tokens; here every pooling is an average, as in the rest of the model.)"""
    OWN_POOL = True

    @classmethod
    def build(cls, cfg, heads, o):
        return cls(cfg, heads, o["temporal"], o["inner"], o["linear_probe"], o["tokenlearner"])

    def __init__(self, cfg: AVMAEConfig, heads: dict, temporal_layers: int = 4,
                 inner_norm_at: int | None = None, linear_probe: bool = False,
                 tokenlearner: tuple = (0, 0)):
        super().__init__(cfg, heads, inner_norm_at=inner_norm_at, linear_probe=linear_probe,
                         kind="frames", tokenlearner=tokenlearner)
        t, hidden = self.streams["v"].t, int(cfg.width * cfg.mlp_ratio)
        self.time_pos = nn.Parameter(torch.zeros(1, t, cfg.width))
        self.temporal = Transformer(cfg.width, temporal_layers, cfg.heads, hidden,
                                    get_ops(cfg.kernels)["attention"])
        self.temporal.apply(init_weights)
        nn.init.trunc_normal_(self.time_pos, std=0.02)
        self.n_layers = cfg.depth + temporal_layers

    def layer_ids(self) -> dict:
        ids = super().layer_ids()
        ids.update(_prefix("temporal", self.temporal.layer_ids(self.cfg.depth + 1)))
        return {**ids, "time_pos": self.cfg.depth + 1}

    def pool(self, x):  # (B, t s, D) -> a token per time index (B, t, D) -> temporal -> (B, D)
        B, N, D = x.shape
        t = self.streams["v"].t
        return self.temporal(x.view(B, t, N // t, D).mean(2) + self.time_pos).mean(1)

    def flops(self) -> dict:
        t, d = self.streams["v"].t, self.cfg.width
        f = len(self.temporal.blocks) * block_flops(t, d, int(d * self.cfg.mlp_ratio))
        return dict(forward=super().flops()["forward"] + f)


class CrossViewAttention(nn.Module):
    """MTV's cross-view attention (Yan et al., 2022, Sec. 3.2): the tokens of one view (width dim)
    query those of the next (width ctx_dim), both LayerNormed; keys and values are projected to the
    querying view's width; the output projection starts at zero (the authors' code), so the views
    start as they were pretrained. Returns the update for the querying view."""

    def __init__(self, dim: int, ctx_dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm_q, self.norm_kv = nn.LayerNorm(dim, eps=1e-6), nn.LayerNorm(ctx_dim, eps=1e-6)
        self.q, self.kv = nn.Linear(dim, dim), nn.Linear(ctx_dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, ctx):  # (B, N, dim), (B, M, ctx_dim) -> (B, N, dim)
        B, N, D = x.shape
        H = self.heads
        q = self.q(self.norm_q(x)).view(B, N, H, D // H).transpose(1, 2)
        k, v = self.kv(self.norm_kv(ctx)).view(B, ctx.shape[1], 2, H,
                                               D // H).permute(2, 0, 3, 1, 4)
        return self.proj(attention(q, k, v).transpose(1, 2).reshape(B, N, D))

    def flops(self, n: int, m: int, ctx_dim: int) -> float:
        d = self.q.out_features
        return 2 * n * 2 * d * d + 2 * m * ctx_dim * 2 * d + 4 * n * m * d


class MTV(Classifier):
    """Multiview Transformers (Yan et al., 2022), multimodal as in the talk (audio as a view; Xiong
    et al., 2022). views: [(modality, tubelet, width scale)]: each view tokenises the clip its own
    way (video with its own tubelet length, or the spectrogram) and has its own encoder of the
    model's depth, width and heads scaled (ViT-B/S/Ti: 1, 1/2, 1/4). The views are ordered by token
    count, fewest first. From `fusion_layer` on, each layer starts with cross-view attention in
    which view i reads view i + 1 (every query made from the layer's inputs: one layer moves
    information one view down the order, never up). A global encoder of `global_layers` blocks
    with learned positions then runs over each view's tokens pooled per time index and projected
    to the model's width; its output, pooled, is the clip's feature. (The authors' code encodes
    each largest-tubelet time span apart; a spectrogram's time patches need not divide into those,
    so each view here is encoded whole.)"""

    @classmethod
    def build(cls, cfg, heads, o):
        return cls(cfg, heads, o["views"], o["fusion_layer"], o["temporal"], o["inner"],
                   o["linear_probe"], o["tokenlearner"])

    def __init__(self, cfg: AVMAEConfig, heads: dict, views: list, fusion_layer: int = 0,
                 global_layers: int = 4, inner_norm_at: int | None = None,
                 linear_probe: bool = False, tokenlearner: tuple = (0, 0)):
        super().__init__()
        self.cfg = cfg
        self.mods = tuple(m for m in MODALITIES if any(w[0] == m for w in views))
        if not 0 <= fusion_layer <= cfg.depth:
            raise ValueError(f"fusion_layer={fusion_layer} must lie in 0..{cfg.depth}")
        attn = get_ops(cfg.kernels)["attention"]
        dpr = [cfg.drop_path * i / max(cfg.depth - 1, 1) for i in range(cfg.depth)]
        streams = []
        for m, tub, scale in views:
            vc = replace(cfg, tubelet=tub, width=round(cfg.width * scale),
                         heads=max(1, round(cfg.heads * scale)))
            if m == "v" and cfg.num_frames % tub:
                raise ValueError(f"a view's tubelet of {tub} frames does not divide "
                                 f"{cfg.num_frames} frames")
            if vc.width % vc.heads:
                raise ValueError(f"a view of width {vc.width} does not split into {vc.heads} heads")
            full = vc.width == cfg.width  # a view that a checkpoint of this width initialises
            st = Stream(vc, m, attn, dpr, inner_norm_at if full else None, True, "joint",
                        tokenlearner if m == "v" else (0, 0))
            st.name = f"v/{tub}" if m == "v" else "a"
            streams.append(st)
        streams.sort(key=lambda st: st.patches.n)  # fewest tokens first (stable)
        self.views = nn.ModuleList(streams)
        self.fusion_layer = fusion_layer
        self.cross = nn.ModuleDict({str(i): nn.ModuleList(
            CrossViewAttention(a.width, b.width, a.heads) for a, b in zip(streams, streams[1:]))
            for i in range(fusion_layer, cfg.depth)})
        self.proj = nn.ModuleList(nn.Linear(st.width, cfg.width) for st in streams)
        self.global_pos = nn.Parameter(torch.zeros(1, sum(st.t for st in streams), cfg.width))
        self.global_enc = Transformer(cfg.width, global_layers, cfg.heads,
                                      int(cfg.width * cfg.mlp_ratio), attn)
        self.norm = None  # (each view closes with its own LayerNorm)
        self.key = "av" if len(self.mods) == 2 else self.mods[0]
        self.head_key = {self.key: self.key}
        self.apply(init_weights)
        for layer in self.cross.values():
            for c in layer:
                nn.init.zeros_(c.proj.weight)
        nn.init.trunc_normal_(self.global_pos, std=0.02)
        self.probe_norm, self.heads = classifier_heads(cfg.width, [self.key], heads, linear_probe)
        self.n_layers = cfg.depth + global_layers

    def stream_sources(self) -> list:
        return [(f"views.{k}", st, st.mod) for k, st in enumerate(self.views)
                if st.width == self.cfg.width]

    def layer_ids(self) -> dict:
        depth, ids = self.cfg.depth, {}
        for n, _ in self.named_parameters():
            p = n.split(".")
            if p[0] == "views":
                ids[n] = self.views[int(p[1])].layer_ids(".".join(p[2:]), depth)
            elif p[0] == "cross":
                ids[n] = int(p[1]) + 1
            elif p[0] in ("proj", "global_pos"):
                ids[n] = depth + 1
            elif p[0] == "heads":
                ids[n] = self.n_layers + 1
        return {**ids, **_prefix("global_enc", self.global_enc.layer_ids(depth + 1))}

    def tokens(self, a=None, v=None) -> dict:  # the global encoder's
        inputs = {m: x for m, x in (("a", a), ("v", v)) if x is not None}
        if set(inputs) != set(self.mods):
            raise ValueError(f"this model's views take modalities {self.mods}, got "
                             f"{tuple(inputs)}")
        xs = self.encode_views([st.tokens(inputs[st.mod]) for st in self.views])
        g = []
        for st, x, proj in zip(self.views, xs, self.proj):
            B, N, D = x.shape
            g.append(proj(x.view(B, st.t, N // st.t, D).mean(2)))  # (B, t_i, width)
        g = torch.cat(g, dim=1) + self.global_pos  # (B, sum t_i, width)
        return {self.key: self.global_enc(g)}

    def encode_views(self, xs: list) -> list:
        """The view encoders with their lateral connections: [(B, N_i, D_i)] -> the same, each
        view closed by its LayerNorm."""
        for i in range(self.cfg.depth):
            if str(i) in self.cross:  # view j reads view j + 1
                ups = [c(xs[j], xs[j + 1]) for j, c in enumerate(self.cross[str(i)])]
                xs = [x + u for x, u in zip(xs, ups)] + xs[len(ups):]
            xs = [st.layer(i, x) for st, x in zip(self.views, xs)]
        return [st.norm(x) for st, x in zip(self.views, xs)]

    def flops(self) -> dict:
        f = sum(st.flops() for st in self.views)
        for i in map(int, self.cross):
            n = [st.tokens_at(i) for st in self.views]
            f += sum(c.flops(n[j], n[j + 1], self.views[j + 1].width)
                     for j, c in enumerate(self.cross[str(i)]))
        d, T = self.cfg.width, self.global_pos.shape[1]
        f += sum(2 * st.t * st.width * d for st in self.views)
        f += len(self.global_enc.blocks) * block_flops(T, d, int(d * self.cfg.mlp_ratio))
        return dict(forward=f)


class EncoderClassifier(Classifier):
    """The pretraining encoder structure itself (Table 14, left column: worse than MBT; MAViL's own
    way, with its fusion layers on top), on unmasked tokens; parameter names match AVMAE's, so a
    checkpoint's encoder loads as it is."""

    FROM_STREAMS = False

    @classmethod
    def build(cls, cfg, heads, o):
        return cls(cfg, heads, o["linear_probe"])

    def weight_map(self, pretrained: dict) -> dict:
        if pretrained["modalities"] != "av":
            raise ValueError("--arch encoder needs an audiovisual checkpoint (this one is "
                             f"modalities={pretrained['modalities']!r}); use --arch mbt")
        return {k: k for k in self.state_dict()
                if k.startswith(("patch_embed.", "enc_pos.", "encoder."))}

    @staticmethod
    def dropped_by_design(pretrained: dict) -> tuple:
        return ()

    def stream_sources(self) -> list:
        return []

    def __init__(self, cfg: AVMAEConfig, heads: dict, linear_probe: bool = False):
        super().__init__()
        self.cfg, mods = cfg, cfg.mods
        self.patches = {m: PATCHES[m](cfg) for m in mods}
        self.patch_embed = nn.ModuleDict({m: nn.Linear(self.patches[m].dim,
                                                       cfg.width) for m in mods})
        self.enc_pos = nn.ModuleDict({m: PosEmbed(self.patches[m].grid, cfg.width,
                                                  cfg.pos_embed) for m in mods})
        dpr = [cfg.drop_path * i / max(cfg.depth - 1, 1) for i in range(cfg.depth)]
        self.encoder = ENCODERS[cfg.encoder](mods, cfg.width, cfg.depth, cfg.heads,
                                             int(cfg.width * cfg.mlp_ratio),
                                             get_ops(cfg.kernels)["attention"], dpr, cfg)
        self.apply(init_weights)
        # (AV-MaskEnhancer's channel fusion: video tokens only)
        outs = self.encoder.out_mods or mods
        self.head_key = {m: m for m in outs}
        self.probe_norm, self.heads = classifier_heads(self.encoder.out_width, outs, heads,
                                                       linear_probe)
        self.n_layers = self.encoder.n_layers

    def layer_ids(self) -> dict:
        enc = _prefix("encoder", self.encoder.layer_ids())
        return {n: enc.get(n,
                           0 if n.startswith(("patch_embed.", "enc_pos.")) else self.n_layers + 1)
                for n, _ in self.named_parameters()}

    def tokens(self, a=None, v=None) -> dict:
        xs = {}
        for m, x in (("a", a), ("v", v)):
            if m in self.cfg.mods:
                p = self.patches[m].patchify(x)
                xs[m] = self.patch_embed[m](p) + self.enc_pos[m]()[: p.shape[1]]
        return self.encoder(xs)


class ViT(Classifier):
    """MAE's finetuning ViT (He et al.; its models_vit.py with global_pool, as AudioMAE finetunes):
    one modality's stream with a [CLS] token ahead of its tokens and no closing norm, the patch
    tokens averaged, then a LayerNorm (fc_norm) and the heads."""

    @classmethod
    def build(cls, cfg, heads, o):
        return cls(cfg, heads, o["linear_probe"])

    def __init__(self, cfg: AVMAEConfig, heads: dict, linear_probe: bool = False):
        super().__init__()
        if len(cfg.mods) != 1:
            raise ValueError("the ViT backbone reads one modality: finetune audio or video")
        self.cfg, self.mods, (m,) = cfg, cfg.mods, cfg.mods
        dpr = [cfg.drop_path * i / max(cfg.depth - 1, 1) for i in range(cfg.depth)]
        self.streams = nn.ModuleDict({m: Stream(cfg, m, get_ops(cfg.kernels)["attention"], dpr,
                                                final_norm=False)})
        self.cls_token = nn.Parameter(torch.zeros(cfg.width))
        self.fc_norm, self.norm = nn.LayerNorm(cfg.width, eps=1e-6), None
        self.apply(init_weights)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        self.head_key, self.n_layers = {m: m}, cfg.depth
        self.probe_norm, self.heads = classifier_heads(cfg.width, [m], heads, linear_probe)

    def tokens(self, a=None, v=None) -> dict:
        (m,) = self.mods
        x = self.streams[m].tokens(a if m == "a" else v)
        x = torch.cat([self.cls_token.expand(x.shape[0], 1, -1).to(x.dtype), x], 1)
        for i in range(self.cfg.depth):
            x = self.streams[m].layer(i, x)
        return {m: x[:, 1:]}

    def pool(self, x):
        return self.fc_norm(super().pool(x))

    def stream_sources(self) -> list:
        return [(f"streams.{m}", st, m) for m, st in self.streams.items()]

    def weight_map(self, pretrained: dict) -> dict:
        """The stream's, without its closing norm (fc_norm starts anew, as MAE's finetuning
        does), and the pretraining's [CLS] token where it has one."""
        mine = self.state_dict()
        out = {k: v for k, v in super().weight_map(pretrained).items() if k in mine}
        if pretrained.get("cls_token"):
            out["cls_token"] = f"cls_token.{self.mods[0]}"
        return out

    def dropped_by_design(self, pretrained: dict) -> tuple:  # (+ its closing norm: see above)
        pc = pretrained_config(pretrained)
        m = self.mods[0] if self.mods[0] in pc.mods else pc.mods[0]
        norm = ENCODERS[pc.encoder].stream_weights(pc, m)["norm"]
        return (*Classifier.dropped_by_design(pretrained), f"encoder.{norm}.")

    def layer_ids(self) -> dict:
        (m,) = self.mods
        st, top = self.streams[m], self.n_layers
        return {n: st.layer_ids(n.split(".", 2)[2], top) if n.startswith("streams.") else
                0 if n == "cls_token" else top + 1 for n, _ in self.named_parameters()}

    def flops(self) -> dict:
        return dict(forward=next(iter(self.streams.values())).flops())


class JointPooled(EncoderClassifier):
    """The pretraining encoder (as EncoderClassifier), its fused tokens of every modality averaged
    together, then a LayerNorm and the heads: CAV-MAE's finetuning (its mlp_head)."""

    def __init__(self, cfg: AVMAEConfig, heads: dict, linear_probe: bool = False):
        super().__init__(cfg, heads, linear_probe)
        self.head_norm = nn.LayerNorm(self.encoder.out_width, eps=1e-6)
        self.head_key = {"av": "av"}
        self.probe_norm, self.heads = classifier_heads(self.encoder.out_width, ["av"], heads,
                                                       linear_probe)

    def features(self, a=None, v=None) -> dict:
        t = self.tokens(a, v)
        return {"av": self.head_norm(self.pool(torch.cat(list(t.values()), 1)))}


class ViViTFSA(MBT):
    """ViViT's factorised self-attention (model 3): spatial, then temporal attention in each block
    (FSABlock)."""
    KIND = "fsa"


class ViViTFDP(MBT):
    """ViViT's factorised dot-product attention (model 4): half the heads spatial, half temporal
    (FDPBlock)."""
    KIND = "fdp"


# the finetuning backbones (finetune.py --arch NAME); a new one: a Classifier subclass, an entry
BACKBONES = {"mbt": MBT, "encoder": EncoderClassifier, "vivit_fe": ViViTFE, "vivit_fsa": ViViTFSA,
             "vivit_fdp": ViViTFDP, "mtv": MTV, "vit": ViT, "encoder_pooled": JointPooled}


def build_backbone(arch: str, cfg: AVMAEConfig, heads: dict, options: dict) -> Classifier:
    """BACKBONES[arch] from its options (plain data: a finetuning checkpoint keeps them as
    `backbone`, and avmae.load rebuilds the model from them), LayerScale on every block."""
    model = BACKBONES[arch].build(cfg, heads, options)
    model.pooling = options.get("pool", "mean")
    if model.OWN_POOL and model.pooling != "mean":
        raise ValueError(f"pool={model.pooling!r}: {arch} pools by its own design; leave it mean")
    if cfg.layer_scale:  # every block, pretrained or new (e.g. ViViT-FE's temporal ones)
        add_layer_scale(model, cfg.layer_scale)
    model.backbone = dict(arch=arch, options=options)
    return model


# -----------------------------------------------------------------------------
# files in: a checkpoint is data. Every file avmae reads (its own checkpoints, the teacher, released
# weights) goes through read_file: torch.load(weights_only=True), which builds tensors and plain
# data and calls nothing a file names; beyond that only numpy's numeric arrays and scalars (earlier
# avmae checkpoints kept numpy's RNG state as an array; other projects' files keep numpy scalars).


class UnsafeFile(ValueError):
    """A file that needs more than tensors and plain data to load: refused, nothing run."""


def _numpy_globals() -> list:
    import numpy as np
    core = getattr(np, "_core", None) or np.core  # (numpy 2 / 1)
    numeric = (np.bool_, np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32,
               np.uint64, np.float16, np.float32, np.float64)
    return [core.multiarray._reconstruct, core.multiarray.scalar, np.ndarray, np.dtype,
            *{type(np.dtype(t)) for t in numeric}]


def read_file(path: str):
    """The object a torch file holds, read as data on the CPU; UnsafeFile (naming the pickled
    object the file asks for) if it holds anything else. Other errors (a truncated file, not a
    torch file) pass through."""
    import pickle
    try:
        with torch.serialization.safe_globals(_numpy_globals()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL ([\w.]+[ .][\w.]+)|got <class '([\w.]+)'>", str(e))
        if not found:
            raise  # (not a pickle at all: the caller says it is unreadable)
        what = (found.group(1) or found.group(2)).replace(" ", ".")
        raise UnsafeFile(f"it holds a pickled object ({what}), not only tensors and plain data: "
                         "avmae reads files with torch.load(weights_only=True) and runs nothing "
                         "from them") from None


def _count(state: dict, prefix: str) -> int:
    return len({k[len(prefix):].split(".")[0] for k in state if k.startswith(prefix)})


def from_cavmae(state: dict, overrides: dict) -> tuple:
    """CAV-MAE's pretrained model (Gong et al., ICLR 2023; the authors' cav_mae.py, CAVMAE: the
    released audio_model.pth, a DataParallel state dict) -> (config fields, state dict) of the
    AVMAE with --variant cavmae's encoder, one frame (num_frames = tubelet = 1); its finetuned
    CAVMAEFT likewise into the JointPooled backbone (+ its heads). Where the layouts
    differ: its audio patches are a conv over the transposed spectrogram, so its tokens run
    frequency-major and each patch's pixels (frequency, time); ours run time-major, (time,
    frequency): the audio positions and the patch-embedding and prediction weights are permuted
    into ours (the attention does not depend on the order). Its fixed 2-D sin-cos positions come in
    as a learned table (pos_embed='learned'), the same numbers. Heads are not in a state dict:
    width / 64 (ViT's), unless load() is told."""
    sd = {k.removeprefix("module."): v for k, v in state.items()}
    finetuned = "mlp_head.1.weight" in sd  # (CAVMAEFT: no decoder, a LayerNorm + Linear head)
    W = sd["pos_embed_a"].shape[-1]
    Wd = sd["decoder_embed.weight"].shape[0] if not finetuned else W // 2
    p = sd["patch_embed_v.proj.weight"].shape[-1]
    na, nv = sd["pos_embed_a"].shape[1], sd["pos_embed_v"].shape[1]
    gf = 128 // p  # (its code: 128 mel bins)
    gt, side = na // gf, math.isqrt(nv)
    own, joint = _count(sd, "blocks_a."), _count(sd, "blocks_u.")
    cfg = dict(VARIANTS["cavmae"], modalities="av", width=W, depth=own + joint, joint_layers=joint,
               heads=max(1, W // 64), mlp_ratio=sd["blocks_a.0.mlp.fc1.weight"].shape[0] / W,
               num_frames=1, tubelet=1, patch_size=p, image_size=side * p, in_chans=3,
               audio_frames=gt * p, mel_bins=gf * p, audio_patch_t=p, audio_patch_f=p,
               pos_embed="learned", dec_width=Wd, dec_depth=max(1, _count(sd, "decoder_blocks.")),
               dec_heads=max(1, Wd // 64), dec_mlp=4 * Wd)
    # ours (time t, frequency f) -> its token index f * gt + t; within a patch likewise
    tokens = torch.arange(na).view(gf, gt).T.reshape(-1)
    pixels = torch.arange(p * p).view(p, p).T.reshape(-1)
    out = {"patch_embed.a.weight": sd["patch_embed_a.proj.weight"][:, 0].transpose(1, 2)
           .reshape(W, -1),
           "patch_embed.v.weight": sd["patch_embed_v.proj.weight"].permute(0, 2, 3, 1)
           .reshape(W, -1),
           "enc_pos.a.table": sd["pos_embed_a"][0, tokens], "enc_pos.v.table": sd["pos_embed_v"][0],
           }
    if not finetuned:
        out.update({"decoder.pos.a.table": sd["decoder_pos_embed_a"][0, tokens],
                    "decoder.pos.v.table": sd["decoder_pos_embed_v"][0],
                    "decoder.head.a.weight": sd["decoder_pred_a.weight"][pixels],
                    "decoder.head.a.bias": sd["decoder_pred_a.bias"][pixels],
                    "decoder.mask_token.av": sd["mask_token"].reshape(-1)})
    names = {"patch_embed_a.proj.bias": "patch_embed.a.bias",
             "patch_embed_v.proj.bias": "patch_embed.v.bias", "norm.": "encoder.norm.av.",
             "norm_a.": "encoder.norm.a.", "norm_v.": "encoder.norm.v.",
             "decoder_embed.": "decoder.embed.av.", "decoder_norm.": "decoder.net.joint.norm.",
             "decoder_pred_v.": "decoder.head.v.", "decoder_blocks.": "decoder.net.joint.blocks.",
             "blocks_a.": "encoder.streams.a.", "blocks_v.": "encoder.streams.v.",
             "blocks_u.": "encoder.joint.", "mlp_head.0.": "head_norm.",
             "mlp_head.1.": "heads.av.label."}
    for m in "av":
        out[f"type_embed.{m}"] = sd[f"modality_{m}"].reshape(-1)
        if not finetuned:
            out[f"decoder.type_embed.{m}"] = sd[f"decoder_modality_{m}"].reshape(-1)
    done = ("pos_embed", "decoder_pos_embed", "modality_", "decoder_modality_", "mask_token",
            "patch_embed_a.proj.weight", "patch_embed_v.proj.weight", "decoder_pred_a.")
    for k, t in sd.items():
        src = None if k.startswith(done) else next((x for x in names if k.startswith(x)), "")
        if src == "":
            raise ValueError(f"CAV-MAE: no place for its {k}")
        if src and "blocks" in src and src != "blocks_u." and \
                re.search(r"\.norm[12]_[av]\.", k):
            continue  # (every block of its code has per-modality norms; only the unified use them)
        if src:
            new = names[src] + k[len(src):]
            for n, m in (("1", "a"), ("1", "v"), ("2", "a"), ("2", "v")):  # per-modality norms
                new = new.replace(f".norm{n}_{m}.", f".by.{m}.norm{n}.")
            out[new] = t
    if not finetuned:
        return cfg, out
    for m in "av":  # (a constant per token: into the embedding's bias, as finetuning maps it)
        out[f"patch_embed.{m}.bias"] = out[f"patch_embed.{m}.bias"] + out.pop(f"type_embed.{m}")
    # CAVMAEFT's multimodal finetuning: the fused tokens averaged, then its mlp_head (JointPooled)
    return cfg, out, dict(heads={"label": sd["mlp_head.1.weight"].shape[0]}, finetune_config={},
                          backbone=dict(arch="encoder_pooled", options=dict(linear_probe=False)))


IMAGENET = (torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225]))


def _fold_input_norm(w: torch.Tensor, b: torch.Tensor, mean, std, channels_last: bool) -> tuple:
    """A patch embedding that reads (x - mean) / std of [0, 1] pixels, made to read avmae's [-1, 1]
    frames, x01 = (x + 1) / 2: the same numbers, exactly (a linear map into a linear map)."""
    shape = (1, 1, -1) if channels_last else (1, -1, 1)
    w3 = w.reshape(w.shape[0], -1, 3) if channels_last else w.reshape(w.shape[0], 3, -1)
    scale, shift = 1 / (2 * std.view(shape)), ((0.5 - mean) / std).view(shape)
    return (w3 * scale).reshape(w.shape[0], -1), b + (w3 * shift).sum((1, 2))


def _interleaved(table: torch.Tensor) -> torch.Tensor:
    """[sin | cos] columns (sincos_1d) -> sin, cos, sin, cos, ... (the Transformer's table, which
    VideoMAE's get_sinusoid_encoding_table makes)."""
    half = table.shape[1] // 2
    return torch.stack([table[:, :half], table[:, half:]], dim=2).reshape(table.shape[0], -1)


def _qkv_bias(sd: dict, prefix: str) -> torch.Tensor:  # q and v biases, no k bias (BEiT's form)
    q, v = sd[f"{prefix}.q_bias"], sd[f"{prefix}.v_bias"]
    return torch.cat([q, torch.zeros_like(q), v])


def from_videomae(state: dict, overrides: dict) -> tuple:
    """VideoMAE's pretrained model (Tong et al., NeurIPS 2022; the authors' modeling_pretrain.py,
    PretrainVisionTransformer: the released checkpoint's "model") -> (config fields, state dict) of
    a video-only AVMAE. Its blocks' q / v biases become one qkv bias (k's is zero); its fixed
    sinusoid tables (not in the file: rebuilt here) come in as learned tables; its patch
    embedding, which reads ImageNet-normalised frames, is made to read avmae's [-1, 1] ones; its
    decoder's projection has no bias (ours: zero). Its reconstruction target normalises each
    patch per colour channel, ours per patch: the predictions are its own numbers either way."""
    sd = dict(state)
    W, Wd = sd["encoder.patch_embed.proj.weight"].shape[0], sd["mask_token"].shape[-1]
    _, _, tub, p, _ = sd["encoder.patch_embed.proj.weight"].shape
    depth, dec_depth = _count(sd, "encoder.blocks."), _count(sd, "decoder.blocks.")
    hidden = sd["encoder.blocks.0.mlp.fc1.weight"].shape[0]
    pred = sd["decoder.head.weight"].shape[0]
    if pred != tub * p * p * 3:
        raise ValueError(f"its decoder predicts {pred} numbers a patch, not {tub * p * p * 3}")
    # (the clip's shape is in no tensor: the release's 16 frames of 224 x 224 unless told)
    fields_ = dict(modalities="v", width=W, depth=depth, heads=max(1, W // 64),
                   mlp_ratio=hidden / W, tubelet=tub, patch_size=p, in_chans=3, num_frames=16,
                   image_size=224, pos_embed="learned", norm_pix_loss=True, mask_type_v="tube",
                   mask_ratio_v=0.9, dec_width=Wd, dec_depth=dec_depth, dec_heads=max(1, Wd // 64),
                   dec_mlp=sd["decoder.blocks.0.mlp.fc1.weight"].shape[0])
    fields_.update({k: v for k, v in overrides.items() if k in ("num_frames", "image_size")})
    return fields_, _videomae_state(sd, AVMAEConfig(**fields_))


def _videomae_state(sd: dict, cfg: AVMAEConfig) -> dict:
    W = cfg.width
    n = PATCHES["v"](cfg).n
    w = sd["encoder.patch_embed.proj.weight"].permute(0, 2, 3, 4, 1)  # (D, t, h, w, c)
    w, b = _fold_input_norm(w, sd["encoder.patch_embed.proj.bias"], *IMAGENET, channels_last=True)
    out = {"patch_embed.v.weight": w.reshape(W, -1), "patch_embed.v.bias": b,
           "enc_pos.v.table": _interleaved(sincos_1d(n, W)),
           "decoder.pos.v.table": _interleaved(sincos_1d(n, cfg.dec_width)),
           "decoder.embed.v.weight": sd["encoder_to_decoder.weight"],
           "decoder.embed.v.bias": torch.zeros(cfg.dec_width),
           "decoder.mask_token.v": sd["mask_token"].reshape(-1)}
    for src, dst, depth in (("encoder", "encoder.streams.v", cfg.depth),
                            ("decoder", "decoder.net.streams.v", cfg.dec_depth)):
        for i in range(depth):
            for k in ("norm1", "norm2", "attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"):
                out[f"{dst}.blocks.{i}.{k}.weight"] = sd[f"{src}.blocks.{i}.{k}.weight"]
                out[f"{dst}.blocks.{i}.{k}.bias"] = _qkv_bias(sd, f"{src}.blocks.{i}.attn") \
                    if k == "attn.qkv" else sd[f"{src}.blocks.{i}.{k}.bias"]
        for k in ("weight", "bias"):
            out[f"{dst}.norm.{k}"] = sd[f"{src}.norm.{k}"]
    for k in ("weight", "bias"):
        out[f"decoder.head.v.{k}"] = sd[f"decoder.head.{k}"]
    return out


def _resize_table(table: torch.Tensor, src: tuple, dst: tuple) -> torch.Tensor:
    """A (N, D) position table on grid src, interpolated (bicubic, as MAE's) onto grid dst."""
    if tuple(src) == tuple(dst):
        return table
    x = table.T.reshape(1, table.shape[1], *src)
    return F.interpolate(x, size=dst, mode="bicubic", align_corners=False).reshape(
        table.shape[1], -1).T


def from_vit_mae(state: dict, overrides: dict) -> tuple:
    """MAE's encoder (He et al., CVPR 2022; the authors' models_mae.py: mae_pretrain_vit_base.pth)
    or AudioMAE's (Huang et al., NeurIPS 2022; its models_mae.py, pretrained.pth): a ViT with a
    [CLS] token over one image or one spectrogram -> (config fields, state dict) of a unimodal
    AVMAE with cls_token. AudioMAE's (one input channel) is audio, its tokens and pixels in our
    order already (time rows, frequency columns); it reads log-mels normalised as
    --audio_norm audiomae does. MAE's is video (modalities='v', the default: its 2-D filter
    inflated over the tubelet, as a still clip's frames average to the image; its ImageNet input
    normalisation folded into the embedding, so it reads avmae's [-1, 1] frames) or audio
    (modalities='a': the RGB filters summed, as AST and CAV-MAE start from it, the spectrogram
    laid as the image, time down and frequency across). Its fixed 2-D sin-cos positions come in
    as a learned table, interpolated onto another grid where the config asks for one (the time
    indices of a longer clip share the image's). The releases hold the encoder only (MAE's
    decoder reads its [CLS] token, ours does not): the decoder starts from its initialisation."""
    sd = dict(state)
    w = sd["patch_embed.proj.weight"]
    W, chans, p = w.shape[0], w.shape[1], w.shape[-1]
    n = sd["pos_embed"].shape[1] - 1
    audio = chans == 1 or overrides.get("modalities") == "a"
    m = "a" if audio else "v"
    base = dict(modalities=m, width=W, depth=_count(sd, "blocks."), heads=max(1, W // 64),
                mlp_ratio=sd["blocks.0.mlp.fc1.weight"].shape[0] / W, cls_token=True,
                pos_embed="learned", patch_size=p, audio_patch_t=p, audio_patch_f=p,
                norm_pix_loss=True)
    if chans == 1:  # AudioMAE: 1024 x 128 at the release's shape (8 frequency patches)
        src = (n // (128 // p), 128 // p)
        base.update(audio_frames=src[0] * p, mel_bins=128)
    else:  # MAE: a square image
        side = math.isqrt(n)
        src = (side, side)
        base.update(audio_frames=side * p, mel_bins=side * p, image_size=side * p, tubelet=2,
                    num_frames=2)
    fields_ = {**base, **{k: v for k, v in overrides.items()
                          if k in ("num_frames", "image_size", "tubelet", "audio_frames",
                                   "mel_bins")}}
    cfg = AVMAEConfig(**fields_)
    grid = PATCHES[m](cfg).grid
    table = sd["pos_embed"][0, 1:]
    if m == "v":
        table = _resize_table(table, src, grid[1:]).repeat(grid[0], 1)
        w2 = w.permute(0, 2, 3, 1)  # (D, h, w, c)
        if chans == 3:
            w2, bias = _fold_input_norm(w2, sd["patch_embed.proj.bias"], *IMAGENET, True)
            w2 = w2.reshape(W, p, p, 3)
        else:
            bias = sd["patch_embed.proj.bias"]
        embed = (w2.unsqueeze(1) / cfg.tubelet).expand(-1, cfg.tubelet, -1, -1, -1)
    else:
        table = _resize_table(table, src, grid)
        embed, bias = w.sum(1), sd["patch_embed.proj.bias"]  # (D, time, frequency)
    out = {f"patch_embed.{m}.weight": embed.reshape(W, -1), f"patch_embed.{m}.bias": bias,
           f"enc_pos.{m}.table": table,
           f"cls_token.{m}": (sd["cls_token"] + sd["pos_embed"][:, :1]).reshape(-1)}
    out.update({f"encoder.streams.{m}.{k}": t for k, t in sd.items()
                if k.startswith(("blocks.", "norm."))})
    return fields_, out


def from_vit_finetuned(state: dict, overrides: dict) -> tuple:
    """AudioMAE's finetuned model (its models_vit.py with global_pool: the AS-2M release) or MAE's
    -> the ViT backbone: the encoder as from_vit_mae converts it, fc_norm, one head ('label')."""
    sd = dict(state)
    fields_, out = from_vit_mae({k: t for k, t in sd.items() if not k.startswith(
        ("fc_norm.", "head."))}, overrides)
    (m,) = AVMAEConfig(modalities=fields_["modalities"]).mods
    out = {k.replace(f"encoder.streams.{m}.", f"streams.{m}.").replace(
        f"patch_embed.{m}.", f"streams.{m}.embed.").replace(f"enc_pos.{m}.", f"streams.{m}.pos.")
        .replace(f"cls_token.{m}", "cls_token"): t for k, t in out.items()}
    out.update({"fc_norm.weight": sd["fc_norm.weight"], "fc_norm.bias": sd["fc_norm.bias"],
                f"heads.{m}.label.weight": sd["head.weight"],
                f"heads.{m}.label.bias": sd["head.bias"]})
    return fields_, out, dict(heads={"label": sd["head.weight"].shape[0]}, finetune_config={},
                              backbone=dict(arch="vit", options=dict(linear_probe=False)))


# foreign formats: how to tell one (a key its state dict always has) -> its name, its converter;
# the first match counts (a finetuned release has its pretrained one's keys too)
FOREIGN = {"mlp_head.1.weight": ("CAV-MAE (finetuned)", from_cavmae),
           "fc_norm.weight": ("MAE / AudioMAE (finetuned)", from_vit_finetuned),
           "blocks_u.0.attn.qkv.weight": ("CAV-MAE (pretrained)", from_cavmae),
           "encoder.blocks.0.attn.q_bias": ("VideoMAE (pretrained)", from_videomae),
           "cls_token": ("MAE / AudioMAE (pretrained)", from_vit_mae)}
PARTIAL = ("MAE / AudioMAE (pretrained)",)  # releases without a decoder: ours starts anew


def read_checkpoint(path: str, overrides: dict | None = None) -> dict:
    """A file as an avmae checkpoint dict (model, model_config, ...): ours as it is, a foreign
    release (FOREIGN) converted, its config from its tensors. ValueError (one line, naming the
    file) for anything else."""
    try:
        ck = read_file(path)
    except UnsafeFile as e:
        raise ValueError(f"{path}: refused: {e}") from None
    except Exception as e:  # (missing, truncated, not a torch file)
        why = e.strerror if isinstance(e, OSError) else \
            f"not a readable torch file ({type(e).__name__})"
        raise ValueError(f"{path}: {why}") from None
    return as_checkpoint(ck, path, overrides)


def as_checkpoint(ck, path: str, overrides: dict | None = None) -> dict:
    """What read_file gave, as an avmae checkpoint dict: ours as it is, a release converted."""
    if isinstance(ck, dict) and "model_config" not in ck and isinstance(ck.get("model"), dict):
        ck = ck["model"]  # (a release that wraps its state dict: VideoMAE's, MAE's)
    if isinstance(ck, dict) and "model" not in ck and ck and \
            all(torch.is_tensor(t) for t in ck.values()):
        keys = {k.removeprefix("module.") for k in ck}
        found = next((f for k, f in FOREIGN.items() if k in keys), None)
        if found is None:
            raise ValueError(f"{path}: a state dict avmae cannot place (it converts "
                             f"{', '.join(name for name, _ in FOREIGN.values())})")
        try:
            fields_, state, *extra = found[1](ck, overrides or {})
        except (KeyError, ValueError) as e:
            raise ValueError(f"{path}: looks like {found[0]} but does not convert ({e})") from None
        ck = dict(model=state, model_config=dataclasses.asdict(AVMAEConfig(**fields_)),
                  converted_from=found[0], **(extra[0] if extra else {}))
    if not isinstance(ck, dict) or "model" not in ck or "model_config" not in ck:
        raise ValueError(f"{path}: not an avmae checkpoint (no model / model_config)")
    return ck


def load(path: str, **overrides):
    """A model from a file, in eval mode, with .cfg (an AVMAEConfig): an avmae pretraining
    checkpoint or a converted release (FOREIGN) gives the AVMAE (model.encode(a=spec, v=video) ->
    {modality: (B, N, D)}, the encoder's final tokens, every token, no masking), a finetuning
    checkpoint its backbone (encode the same; model(a, v) -> {head: logits}). overrides: config
    fields that leave the weights' shapes as they are (e.g. kernels="torch", or the heads a state
    dict does not record). ValueError (one line, naming the file) for anything else."""
    ck = read_checkpoint(path, overrides)
    cfg = replace(pretrained_config(ck["model_config"]), **overrides)
    if "finetune_config" in ck:
        if "backbone" not in ck:
            raise ValueError(f"{path}: a finetuning checkpoint of an earlier avmae, without its "
                             "backbone's options: evaluate it with finetune.py --eval_only "
                             "--resume, or finetune anew")
        model = build_backbone(ck["backbone"]["arch"], cfg, ck["heads"],
                               ck["backbone"]["options"])
    else:
        model = AVMAE(cfg)
    try:
        missing, _ = model.load_state_dict(ck["model"], strict=ck.get("converted_from")
                                           not in PARTIAL)
        if any(not k.startswith("decoder.") for k in missing):
            raise RuntimeError(f"\nno source for {', '.join(missing[:4])}")
    except RuntimeError as e:
        line = (str(e).splitlines()[1:] or [str(e)])[0].strip()
        raise ValueError(f"{path}: its weights do not fit the model its config makes"
                         f"{' with ' + str(overrides) if overrides else ''} "
                         f"({line[:300]}{' ...' if len(line) > 300 else ''})") from None
    return model.eval()
