"""A new fusion variant is one avmae.Fusion subclass and one ENCODERS entry, a new finetuning
backbone one avmae.Classifier subclass and one BACKBONES entry: this file registers one of each,
pretrains the variant, counts its FLOPs, finetunes it with layer-wise decay and maps its weights,
and finetunes the backbone from a pretraining, touching no other file."""
import dataclasses
import json

import torch
import torch.nn as nn

import avmae
import finetune
import train
from conftest import tiny_batch, tiny_config
from test_fidelity import check_layer_ids_follow_depth


class LateJoint(avmae.Fusion):
    """A toy fusion: full unimodal streams, then one joint block over the concatenation and a
    norm. What it does not say (its unimodal pass, its rules) it takes from avmae.Fusion."""
    mixes, stream_weights = True, avmae.Separate.stream_weights
    mbt_drops = staticmethod(lambda cfg: ("joint.", "norm."))

    def __init__(self, mods, dim, depth, heads, hidden, attn_fn, dpr=None, cfg=None):
        super().__init__()
        self.streams = nn.ModuleDict({m: avmae.Transformer(dim, depth, heads, hidden, attn_fn,
                                                           dpr) for m in mods})
        self.joint, self.norm = avmae.Block(dim, heads, hidden,
                                            attn_fn), nn.LayerNorm(dim, eps=1e-6)
        self.n_layers, self.out_width = depth + 1, dim

    @staticmethod
    def flops(cfg, k, blk):
        return sum(blk(n, cfg.depth) for n in k.values()) + blk(sum(k.values()))

    def layer_ids(self) -> dict:
        ids = {f"streams.{m}.{n}": i for m, s in self.streams.items() for n,
               i in s.layer_ids(1).items()}
        top = {f"{p}.{n}": self.n_layers for p in ("joint", "norm") for n,
               _ in getattr(self, p).named_parameters()}
        return {**ids, **top}

    def forward(self, xs):
        uni = {m: self.streams[m](x) for m, x in xs.items()}
        keys, sizes = list(uni), [u.shape[1] for u in uni.values()]
        return dict(zip(keys, self.norm(self.joint(torch.cat(list(uni.values()),
                                                             1))).split(sizes, 1)))


TINY = ["--preset", "quick", "--num_frames", "4", "--image_size", "32", "--patch_size", "16",
        "--audio_frames", "64", "--mel_bins", "32", "--workers", "0", "--picture_every", "0",
        "--batch_size", "8", "--kernels", "torch"]


def test_a_variant_registered_here_pretrains_counts_flops_and_finetunes(monkeypatch, builtin,
                                                                        tmp_path):
    monkeypatch.setitem(avmae.ENCODERS, "late_joint", LateJoint)
    # pretraining, through the command line (the flag's choices come from the table)
    res = train.main([*TINY, "--data", builtin, "--encoder", "late_joint", "--max_steps", "2",
                      "--out_dir", str(tmp_path / "pre")])
    ck = torch.load(res["checkpoint"], weights_only=True)
    assert ck["model_config"]["encoder"] == "late_joint"
    assert "encoder.joint.attn.qkv.weight" in ck["model"]
    # inpainting needs an encoder that mixes modalities: the class says it does
    avmae.check_config(tiny_config(encoder="late_joint", objective="inpaint_v"))
    # FLOPs: the class's own count, in the model's total
    cfg = tiny_config(encoder="late_joint")
    model = avmae.AVMAE(cfg)
    k = {m: keep.shape[1] for m, (keep, _) in model.sample_masks(1).items()}
    hid = int(cfg.width * cfg.mlp_ratio)
    want = sum(cfg.depth * avmae.block_flops(n, cfg.width, hid) for n in k.values()) \
        + avmae.block_flops(sum(k.values()), cfg.width,
                            hid) + sum(2 * k[m] * model.patches[m].dim * cfg.width for m in k)
    assert model.flops()["encoder"] == want
    # finetuning: the encoder itself with layer ids along the whole depth, and MBT from its streams
    pcfg = dataclasses.asdict(tiny_config(encoder="late_joint", depth=4))
    f = finetune.FinetuneConfig(size="tiny", num_frames=4, image_size=32, audio_frames=64,
                          kernels="torch", fusion_layer=2)
    enc = finetune.build_model(dataclasses.replace(f, arch="encoder"), {"label": 3}, pcfg)
    check_layer_ids_follow_depth(enc, tiny_batch(enc.cfg))
    assert enc.layer_ids()["encoder.joint.mlp.fc1.weight"] == 5 and enc.n_layers == 5
    pre = avmae.AVMAE(avmae.AVMAEConfig(**pcfg))
    mbt = finetune.build_model(f, {"label": 3}, pcfg)
    state, report = finetune.map_pretrained(pre.state_dict(), pcfg, mbt)
    assert torch.equal(state["streams.v.blocks.3.attn.qkv.weight"],
                       pre.state_dict()["encoder.streams.v.blocks.3.attn.qkv.weight"])
    assert "encoder.joint.attn.qkv.weight" in report["dropped_why"]["fusion"]
    out = finetune.main([*TINY[:2], "--data", builtin, "--init", res["checkpoint"], "--num_frames",
                         "4", "--image_size", "32", "--audio_frames", "64", "--workers", "0",
                         "--batch_size", "8", "--max_steps", "2", "--views", "1", "--kernels",
                         "torch", "--out_dir", str(tmp_path / "ft")])
    assert out["clips"] == 8


class PooledPatches(avmae.Classifier):
    """A toy backbone: each modality's patch embedding, mean-pooled, into the heads. Its weight map
    reads the pretraining's patch embeddings; the rest of the encoder it leaves out by design."""
    FROM_STREAMS = False

    def __init__(self, cfg, heads, linear_probe=False):
        super().__init__()
        self.cfg, self.n_layers = cfg, 1
        self.patches = {m: avmae.PATCHES[m](cfg) for m in cfg.mods}
        self.patch_embed = nn.ModuleDict({m: nn.Linear(p.dim, cfg.width)
                                          for m, p in self.patches.items()})
        self.head_key = {m: m for m in cfg.mods}
        self.probe_norm, self.heads = avmae.classifier_heads(cfg.width, cfg.mods, heads,
                                                             linear_probe)

    @classmethod
    def build(cls, cfg, heads, o):
        return cls(cfg, heads, o["linear_probe"])

    def weight_map(self, pretrained):
        return {k: k for k in self.state_dict() if k.startswith("patch_embed.")}

    @staticmethod
    def dropped_by_design(pretrained):
        return ("encoder.",)

    def stream_sources(self):
        return []

    def layer_ids(self):
        return {n: 0 if n.startswith("patch_embed.") else 2 for n, _ in self.named_parameters()}

    def flops(self):
        return dict(forward=0.0)

    def features(self, a=None, v=None):
        return {m: self.patch_embed[m](self.patches[m].patchify(x)).mean(1)
                for m, x in (("a", a), ("v", v)) if m in self.cfg.mods}


def test_a_backbone_registered_here_finetunes_from_a_pretraining(monkeypatch, builtin, tmp_path):
    monkeypatch.setitem(avmae.BACKBONES, "pooled", PooledPatches)
    pre = train.main([*TINY, "--data", builtin, "--max_steps", "1", "--out_dir",
                      str(tmp_path / "pre")])
    out = finetune.main([*TINY[:2], "--data", builtin, "--init", pre["checkpoint"], "--arch",
                         "pooled", "--num_frames", "4", "--image_size", "32", "--audio_frames",
                         "64", "--workers", "0", "--batch_size", "8", "--max_steps", "2",
                         "--views", "1", "--kernels", "torch", "--out_dir", str(tmp_path / "ft")])
    assert out["clips"] == 8
    report = json.load(open(tmp_path / "ft" / "load_report.json"))
    ck = torch.load(pre["checkpoint"], weights_only=True)
    assert sorted(report["loaded"]) == sorted(f"{k} <- {k}" for k in ck["model"]
                                              if k.startswith("patch_embed."))
    assert report["dropped_why"]["fusion"] and not report["new"][0].startswith("patch_embed.")
