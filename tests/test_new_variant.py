"""A new fusion variant is one avmae.Fusion subclass and one ENCODERS entry: this file registers one and pretrains
it, counts its FLOPs, finetunes it with layer-wise decay and maps its weights, touching no other
file."""
import dataclasses

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
    ck = torch.load(res["checkpoint"], weights_only=False)
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
