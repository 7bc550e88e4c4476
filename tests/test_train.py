"""train.py: flags, schedule, FLOPs, checkpoints, resume, NaN handling, DDP / FSDP equivalence."""
import glob
import json
import math
import os
import re
import subprocess
import sys
import textwrap
from types import SimpleNamespace

import pytest
import torch
from torch.autograd import DeviceType

import avmae
import train
from kernels import bench

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# (blr pinned: at the quick preset's larger lr, Adam magnifies the float summation-order differences
# of 1 vs 2 processes past the tolerances below)
TINY = ["--preset", "quick", "--num_frames", "4", "--image_size", "32", "--patch_size", "16",
        "--audio_frames", "64", "--mel_bins", "32", "--workers", "0", "--log_every", "1",
        "--save_every", "100", "--picture_every", "0", "--blr", "1.5e-3"]


def run(builtin, out_dir, *extra, hooks=None):
    return train.main([*TINY, "--data", builtin, "--out_dir", str(out_dir), *extra], hooks)


def weights(path):
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


def losses(out_dir):
    return [r["loss"] for r in map(json.loads, open(os.path.join(out_dir,
                                                                 "log.jsonl"))) if "loss" in r]


# -----------------------------------------------------------------------------
# config and flags


def test_flags_come_from_the_configs():
    mcfg, tcfg = train.parse_args(["--preset", "quick", "--encoder", "early", "--width", "96",
                                   "--norm_pix_loss"])
    # tiny depth
    assert (mcfg.encoder, mcfg.width, mcfg.depth, mcfg.norm_pix_loss) == ("early", 96, 4, True)
    assert (tcfg.batch_size, tcfg.data, tcfg.audio_norm) == (8, "data/builtin", "dataset")
    mcfg, tcfg = train.parse_args([])  # the paper recipe
    assert (mcfg.encoder, mcfg.decoder, mcfg.width, mcfg.joint_layers, tcfg.batch_size,
            tcfg.epochs) == \
        ("mid", "shared", 768, 2, 512, 800)
    mcfg, _ = train.parse_args(["--preset", "audioset_l"])
    assert (mcfg.width, mcfg.audio_frames, mcfg.mask_ratio_a) == (1024, 1000, 0.7)
    for bad in (["--encodr", "mid"], ["--preset", "nope"], ["--size", "huge"],
                ["--compile", "maybe"]):
        with pytest.raises(SystemExit):
            train.parse_args(bad)
    with pytest.raises(SystemExit, match="two unrelated MAEs"):
        train.main(["--encoder", "separate", "--decoder", "separate", "--data", "/nonexistent"])


def test_quick_gpu_is_the_quick_recipe_at_vit_s():
    import finetune
    (qm, qt), (gm, gt) = (train.parse_args(["--preset", p]) for p in ("quick", "quick_gpu"))
    assert (gm.width, gm.depth, gm.heads, gm.dec_width) == (384, 12, 6, 192)
    # the same windows, set and loss; lr sqrt-scaled from batch 8 to 32; the loader takes every core
    same = ("num_frames", "image_size", "audio_frames", "mask_ratio_v", "tubelet")
    assert all(getattr(gm, k) == getattr(qm, k) for k in same)
    assert (gt.data, gt.frame_stride, gt.audio_norm, gt.batch_size) == \
        (qt.data, qt.frame_stride, "dataset", 32)
    assert train.PRESETS["quick_gpu"]["workers"] == finetune.PRESETS["quick_gpu"]["workers"] == -1
    lr = lambda t: t.blr * t.batch_size / 256  # noqa: E731
    assert lr(gt) == pytest.approx(2 * lr(qt) * 64 / 384)  # and by 1 / width: 1.7e-4
    qf, gf = (finetune.parse_args(["--preset", p]) for p in ("quick", "quick_gpu"))
    # finetuning's lr scaled by 1 / width (tiny 64 -> ViT-S 384): 1e-3 -> 1.7e-4
    assert gf.size == "small" and lr(gf) == pytest.approx(lr(qf) * 64 / 384)
    assert lr(gf) == pytest.approx(1e-3 / 6)
    assert all(getattr(gf, k) == getattr(qf, k) for k in
               ("mbt_head", "unimodal_loss", "optimizer", "layer_decay", "audio_frames",
                "num_frames", "epochs", "batch_size", "mixup", "specaug_freq"))
    # MBT fuses where the pretraining's mid-fusion encoder joins the modalities: 2 of 4, 10 of 12
    assert (qf.fusion_layer, gf.fusion_layer) == (qm.depth - qm.joint_layers,
                                                  gm.depth - gm.joint_layers) == (2, 10)
    # LayerScale 0.1 in pretraining and in its scratch twin; from a checkpoint, the checkpoint's (a
    # pretraining without it finetunes without it, no contradiction); given, the flag wins
    assert (gm.layer_scale, qm.layer_scale, gf.layer_scale, qf.layer_scale) == (0.1, 0.0, 0.1, 0.0)
    assert finetune.parse_args(["--preset", "quick_gpu", "--init", "x.pt"]).layer_scale == 0.0
    assert finetune.parse_args(["--preset", "quick_gpu", "--init", "x.pt",
                                "--layer_scale", "0.2"]).layer_scale == 0.2


def test_lr_schedule_warms_up_then_decays_to_min():
    lrs = [train.lr_at(s, 100, 10, 1e-3) for s in range(100)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:])) and lrs[-1] < 1e-6
    assert train.lr_at(55, 100, 10, 1e-3) == pytest.approx(0.5e-3)  # cosine midpoint


def test_flops_match_the_spec_for_vit_b():
    with torch.device("meta"):
        model = avmae.AVMAE(avmae.make_config("base"))
    fl = model.flops()
    # about 110 GFLOP forward per clip = encoder ~64 on 357 visible tokens + decoder ~46 on 1968
    assert fl["encoder"] / 1e9 == pytest.approx(64, rel=0.05)
    assert fl["decoder"] / 1e9 == pytest.approx(46, rel=0.05)
    assert fl["train"] == 3 * fl["forward"]


# -----------------------------------------------------------------------------
# the main command, checkpoints and pictures


def test_the_progress_bar_into_a_file_draws_at_most_every_half_minute(monkeypatch, tmp_path):
    # tqdm draws on an update mininterval s after its last drawing, and its monitor thread redraws
    # a bar that has not drawn for maxinterval s: into a file (SLURM's .out) 30 s, and past it (at
    # maxinterval's default, 10 s, 95 s of updates drew at 30, 50, 60, 80 and 90 s; at 30 s, the
    # monitor's drawing came beside the update's at 60 s). A terminal's keeps a tenth of a second.
    with open(tmp_path / "out", "w") as f:
        monkeypatch.setattr(sys, "stderr", f)
        bar = train.progress_bar(100, 0, "pretrain", master=True)
        assert bar.mininterval == 30.0 and bar.maxinterval > 30.0
        bar.close()
    monkeypatch.setattr(sys, "stderr", type("Tty", (), {"isatty": lambda self: True,
                                                        "write": lambda self, s: len(s),
                                                        "flush": lambda self: None})())
    bar = train.progress_bar(100, 0, "pretrain", master=True)
    assert bar.mininterval == 0.1 and bar.maxinterval == 10.0
    bar.close()


def test_quick_run_writes_checkpoint_picture_and_log(builtin, tmp_path, capsys):
    res = run(builtin, tmp_path, "--max_steps", "12", "--batch_size", "8", "--save_every", "12")
    assert res["step"] == 12 and math.isfinite(res["loss"])
    assert os.path.exists(res["checkpoint"]) and os.path.exists(res["picture"])
    out = capsys.readouterr()
    assert res["checkpoint"] in out.out  # says where things are
    # the progress bar into a file (not a terminal; SLURM's .out): its start and its end, not a
    # line per step
    assert out.err.count("pretrain:") <= 3, out.err
    ck = torch.load(res["checkpoint"], map_location="cpu", weights_only=True)
    assert {"model", "optimizer", "step", "epoch", "step_in_epoch", "model_config", "train_config",
            "rng"} <= set(ck)
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in ck["model"])
    model = avmae.AVMAE(avmae.AVMAEConfig(**ck["model_config"]))
    model.load_state_dict(ck["model"])
    log = [json.loads(x) for x in open(res["log"])]
    assert [r["step"] for r in log] == list(range(1, 13)) and all(
        "clips_per_s" in r and "lr" in r for r in log)


def test_reconstruction_picture_has_three_rows():
    model = avmae.AVMAE(avmae.make_config("tiny", num_frames=4, image_size=32, patch_size=16,
                                          audio_frames=64, mel_bins=32))
    x = {"a": torch.randn(2, 64, 32), "v": torch.rand(2, 3, 4, 32, 32) * 2 - 1}
    img = train.reconstruction_picture(model, x, model(**x))
    assert img.shape[0] == 3 and img.shape[1] == 3 * 32 + 2 * 4 and 0 <= img.min()
    assert img.max() <= 1
    assert img.shape[2] == 4 * 32 + 64 + 4  # 4 frames, a spacer, the spectrogram scaled to 32 high


@pytest.mark.parametrize("decode", ["cpu", "gpu"])  # (gpu: decoded ahead, here on the CPU)
def test_resume_continues_exactly(builtin, tmp_path, capsys, decode):
    a, b = tmp_path / "a", tmp_path / "b"
    run(builtin, a, "--max_steps", "6", "--batch_size", "8", "--decode", decode)
    run(builtin, b, "--max_steps", "6", "--batch_size", "8", "--stop_at", "3", "--decode", decode)
    assert len(losses(b)) == 3
    capsys.readouterr()
    res = run(builtin, b, "--max_steps", "6", "--batch_size", "8", "--resume", "auto", "--workers",
              "1", "--decode", decode)
    assert res["step"] == 6
    # (--workers, --resume and --stop_at change nothing the run computes: not listed)
    assert f"resumed from {b / 'ckpt_0000003.pt'} at step 3\n" in capsys.readouterr().out
    events = [r for r in map(json.loads, open(b / "log.jsonl")) if "event" in r]
    assert events == [dict(step=3, event="resumed",
                           message=f"resumed from {b / 'ckpt_0000003.pt'} at step 3")]
    # resumed at its end: nothing to train, and it says so (not a loss of nan)
    again = run(builtin, b, "--max_steps", "6", "--batch_size", "8", "--resume", "auto",
                "--decode", decode)
    assert again["step"] == 6 and again["checkpoint"] == str(b / "ckpt_0000006.pt")
    assert "is at step 6, and this run stops at step 6: nothing to train" in (
        capsys.readouterr().out)
    assert losses(a) == losses(b)  # (and nothing was logged)
    # bit for bit on CPU, step by step (the data crosses an epoch boundary)
    assert losses(a) == losses(b)
    wa, wb = weights(a / "ckpt_0000006.pt"), weights(b / "ckpt_0000006.pt")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_a_resume_on_a_set_that_changed_says_so(builtin, tmp_path, capsys):
    # (the same --data, other clips: the epochs and the data order are no longer the run's)
    import shutil
    copy = tmp_path / "set"
    shutil.copytree(builtin, copy)
    run(str(copy), tmp_path / "o", "--max_steps", "1", "--batch_size", "8")
    rows = open(copy / "train.csv").read().splitlines()
    (copy / "train.csv").write_text("\n".join(rows[:17]) + "\n")  # 16 clips: 2 steps per epoch
    capsys.readouterr()
    run(str(copy), tmp_path / "o", "--max_steps", "2", "--batch_size", "8", "--resume", "auto")
    assert "; changed since, applying from here: --max_steps 1 -> 2, steps per epoch 3 -> 2\n" in (
        capsys.readouterr().out)


def test_a_log_line_holds_the_mean_loss_of_its_steps(builtin, tmp_path):
    # (one step's loss is noise: a run is judged by the mean since the last line, as MAE's logger)
    every, fours = tmp_path / "every", tmp_path / "fours"
    run(builtin, every, "--max_steps", "6", "--batch_size", "8")
    res = run(builtin, fours, "--max_steps", "6", "--batch_size", "8", "--log_every", "4")
    one = losses(every)
    assert len(one) == 6 and len(set(one)) == 6
    assert losses(fours) == pytest.approx([sum(one[:4]) / 4, sum(one[4:]) / 2], rel=1e-6)
    assert res["loss"] == pytest.approx(sum(one[4:]) / 2, rel=1e-6)  # the final line's, as printed


def test_resume_refuses_another_model_but_takes_another_kernel_backend(builtin, tmp_path,
                                                                      capsys):
    run(builtin, tmp_path, "--max_steps", "1", "--batch_size", "8", "--kernels", "torch")
    with pytest.raises(SystemExit, match="another model config"):
        run(builtin, tmp_path, "--max_steps", "2", "--batch_size", "8", "--resume", "auto",
            "--encoder", "early")
    # the backend is the resuming run's choice, not part of the model
    capsys.readouterr()
    res = run(builtin, tmp_path, "--max_steps", "2", "--batch_size", "8", "--resume", "auto",
              "--kernels", "auto")
    assert res["step"] == 2
    # a training flag changed on resuming applies from there on, and is said
    assert "at step 1; changed since, applying from here: --max_steps 1 -> 2\n" in (
        capsys.readouterr().out)


def test_auto_precision_is_bf16_only_on_a_gpu_that_has_it(monkeypatch):
    # (a T4 or a V100 only emulates bf16, slowly: fp32 there unless --precision bf16 is asked for)
    import warnings
    cuda = torch.device("cuda", 0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (an autocast for CUDA made on a machine without one)
        for cap, bf16 in (((7, 0), False), ((7, 5), False), ((8, 0), True), ((9, 0), True)):
            monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None, c=cap: c)
            assert isinstance(train.autocast_ctx("auto", cuda), torch.autocast) == bf16, cap
        assert isinstance(train.autocast_ctx("bf16", cuda), torch.autocast)
    assert not isinstance(train.autocast_ctx("auto", torch.device("cpu")), torch.autocast)


def test_killed_while_saving_leaves_the_previous_checkpoint(tmp_path):
    script = textwrap.dedent(f"""
        import os, signal, sys, torch
        sys.path.insert(0, {ROOT!r})
        import train
        train.save_checkpoint({str(tmp_path)!r}, dict(w=torch.ones(10), step=1), 1, keep=3)
        real_save = torch.save
        def dying_save(obj, f):
            f.write(b"half a checkpoint")
            f.flush()
            os.kill(os.getpid(), signal.SIGKILL)  # the power goes out mid-write
        torch.save = dying_save
        train.save_checkpoint({str(tmp_path)!r}, dict(w=torch.zeros(10), step=2), 2, keep=3)
    """)
    p = subprocess.run([sys.executable, "-c", script], capture_output=True)
    assert p.returncode == -9
    assert open(tmp_path / "latest").read() == "ckpt_0000001.pt"
    ck = torch.load(train.find_checkpoint("auto", str(tmp_path)), weights_only=True)
    assert ck["step"] == 1 and torch.equal(ck["w"], torch.ones(10))
    assert not os.path.exists(tmp_path / "ckpt_0000002.pt")


def test_keeps_the_last_k_checkpoints(tmp_path):
    for s in range(1, 6):
        train.save_checkpoint(str(tmp_path), dict(step=s), s, keep=2)
    assert sorted(os.path.basename(p) for p in glob.glob(str(tmp_path / "ckpt_*.pt"))) == [
        "ckpt_0000004.pt", "ckpt_0000005.pt"]


def _poison_at(step_to_poison):
    def hook(step, batch):
        if step == step_to_poison:
            batch = dict(batch)
            batch["a"] = batch["a"].clone()
            batch["a"][0, 3, 5] = float("nan")
        return batch
    return hook


def test_nan_stops_with_the_step_and_keeps_the_good_checkpoint(builtin, tmp_path):
    with pytest.raises(
        SystemExit,
        match=r"step 3: non-finite loss nan .*last good checkpoint is .*ckpt_0000003.pt"):
        run(builtin, tmp_path, "--max_steps", "6", "--batch_size", "8", "--save_every", "1",
            hooks={"batch": _poison_at(3)})
    assert open(tmp_path / "latest").read() == "ckpt_0000003.pt"
    assert not os.path.exists(tmp_path / "ckpt_0000004.pt")
    ck = torch.load(tmp_path / "ckpt_0000003.pt", weights_only=True)
    assert ck["step"] == 3 and all(torch.isfinite(v).all() for v in ck["model"].values())
    events = [json.loads(x) for x in open(tmp_path / "log.jsonl") if "non-finite" in x]
    assert events and events[0]["step"] == 3


def test_nan_steps_can_be_skipped(builtin, tmp_path):
    res = run(builtin, tmp_path, "--max_steps", "5", "--batch_size", "8", "--max_bad_steps", "1",
              hooks={"batch": _poison_at(2)})
    assert res["step"] == 5 and math.isfinite(res["loss"]) and res["last"]["skipped_steps"] == 1
    assert all(torch.isfinite(v).all() for v in weights(res["checkpoint"]).values())


def test_gradient_accumulation_equals_the_full_batch(builtin, tmp_path):
    one = run(builtin, tmp_path / "one", "--max_steps", "2", "--batch_size", "8")
    acc = run(builtin, tmp_path / "acc", "--max_steps", "2", "--batch_size", "8", "--grad_accum",
              "2")
    w1, w2 = weights(one["checkpoint"]), weights(acc["checkpoint"])
    assert all(torch.allclose(w1[k], w2[k], atol=1e-5) for k in w1)
    assert losses(tmp_path / "one") == pytest.approx(losses(tmp_path / "acc"), rel=1e-5)


def test_bench_mode_reports_speed(capsys, tmp_path):
    res = train.main([*TINY, "--bench", "--bench_steps", "2", "--batch_size", "4", "--out_dir",
                      str(tmp_path / "bench")])
    assert res["clips_per_s"] > 0 and res["device"] == "cpu" and res["gflops_fwd_per_clip"] > 0
    *_, said, last = capsys.readouterr().out.strip().splitlines()
    assert json.loads(last)["micro_batch"] == 4  # (for scripts) and a line for people:
    assert said.startswith("cpu: ") and "a step of 4 clips x 1 ranks" in said and \
        said.endswith("MFU: no known peak for this device")
    assert not os.path.exists(tmp_path / "bench")  # (a measurement writes no run folder)


def test_bench_steps_what_training_steps(monkeypatch):
    # --bench times the training step's work: the same optimizer (AdamW, fused: the first GPU
    # report's bench stepped the slower unfused one) and the gradient norm
    made, clipped = [], []
    opt, clip = train.optimizer, train.clip_grads  # (what kernels/bench.py step_speed calls)
    monkeypatch.setattr(train, "optimizer", lambda *a: made.append(opt(*a)) or made[-1])
    monkeypatch.setattr(train, "clip_grads", lambda *a: clipped.append(1) or clip(*a))
    train.main([*TINY, "--bench", "--bench_steps", "2", "--batch_size", "4"])
    assert len(made) == 1 and made[0].defaults["fused"] and len(clipped) == 3 + 2  # (3 warm-up)


def test_bench_profile_says_where_the_time_goes(capsys):
    # --profile N: N more steps under torch.profiler, each kind's share of the time (on a CPU, of
    # the ops' own CPU time), in a line and in the result
    res = train.main([*TINY, "--bench", "--bench_steps", "1", "--batch_size", "4", "--profile",
                      "2"])
    p = res["profile"]
    assert p["steps"] == 2 and sum(p["share"].values()) == pytest.approx(1.0)
    assert p["share"]["matmul"] > 0 and p["share"]["attention"] > 0 and "busy" not in p
    said = capsys.readouterr().out.strip().splitlines()[-2]
    assert said.startswith("where 2 profiled steps' CPU time goes: ") and "matmul" in said
    # the kinds, by the names kernels have on a GPU (cuBLAS, cuBLASLt, SDPA's flash, efficient and
    # cuDNN backends, ours, Inductor's, the fused AdamW, copies)
    kind = {n: next((k for k, pat in bench.KINDS if re.search(pat, n, re.I)), "other") for n in (
        "sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64_warpgroupsize1x1_kernel",
        "nvjet_tst_128x256_64x4_1x2_h_bz_coopA_NNT", "triton_tem_fused_addmm_gelu_3",
        "void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<64, 128, 64, 4> >",
        "fmha_cutlassB_bf16_aligned_64x64_k64_sm80",
        "cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_3_64x64x64_4x1x1",
        "_attn_bwd_dkdv", "_loss_bwd", "_gather_kernel", "_assemble_kernel",
        "triton_per_fused_add_native_layer_norm_0",
        "void at::native::(anonymous namespace)::multi_tensor_apply_kernel<FusedAdamMathFunctor>",
        "Memcpy HtoD (Pinned -> Device)", "void at::native::vectorized_elementwise_kernel<4, "
        "at::native::GeluCUDAKernelImpl>")}
    assert list(kind.values()) == (
        ["matmul"] * 3 + ["attention"] * 4 + ["gather, assembly, loss (ours)"] * 3
        + ["fused by torch.compile", "optimizer", "copies", "other"])
    # on CUDA: how busy the device was, the union of the kernels' intervals over their span
    ev = [SimpleNamespace(device_type=DeviceType.CUDA, name=n, time_range=SimpleNamespace(
        start=a, end=b)) for n, a, b in [("gemm", 0, 4), ("_attn_fwd", 2, 6), ("gemm", 8, 10)]]
    prof = SimpleNamespace(events=lambda: ev)

    class Profile:
        def __init__(self, **kw):
            pass

        def __enter__(self):
            return prof

        def __exit__(self, *a):
            return False
    import torch.profiler
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.profiler, "profile", Profile)
        mp.setattr(torch.cuda, "synchronize", lambda *a: None)
        p = bench.profile_steps(lambda: None, 1, torch.device("cuda"))
    assert p["busy"] == pytest.approx(8 / 10)  # (0-6 and 8-10 of 0-10)
    assert p["share"]["matmul"] == pytest.approx(6 / 10) and p["share"]["attention"] == 0.4
    assert p["top"] == [("gemm", 0.6, 2, None, None), ("_attn_fwd", 0.4, 1, None, None)]
    # a profiler that fails (no CUPTI, say) leaves the timing standing, and says so in one line

    def broken(**kw):
        raise RuntimeError("CUPTI_ERROR_INSUFFICIENT_PRIVILEGES\nmore")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.profiler, "profile", broken)
        res = train.main([*TINY, "--bench", "--bench_steps", "1", "--batch_size", "4",
                          "--profile", "1"])
    assert res["clips_per_s"] > 0 and "CUPTI_ERROR" in res["profile"]["note"]
    assert "--profile: the profiler failed (CUPTI_ERROR" in capsys.readouterr().out


# -----------------------------------------------------------------------------
# two processes on CPU (gloo): DDP, FSDP and MAViL (whose contrast takes its negatives from every
# rank) equal one process with the same global batch; one job runs the three (a job may call
# train.main more than once) and MAViL's contrast alone


def two_ranks_job(runs, apart, nce):
    import torch.distributed as dist
    # MAViL's contrast alone first: this rank's rows against every rank's y (rank r holds rows r,
    # r + 2, ...); the loss of each rank and the gradient each rank's y gets
    dist.init_process_group("gloo")
    r, W = dist.get_rank(), dist.get_world_size()
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(8, 16, generator=g), torch.randn(8, 16, generator=g)
    lx, ly = x[r::W].clone().requires_grad_(), y[r::W].clone().requires_grad_()
    loss = avmae.info_nce(lx, ly, 0.1)
    loss.backward()
    got = [torch.zeros(1) for _ in range(W)]
    dist.all_gather(got, loss.detach().reshape(1))
    gy = [torch.zeros_like(ly.grad) for _ in range(W)]
    dist.all_gather(gy, ly.grad)
    if r == 0:
        torch.save(dict(loss=torch.stack(got).mean(), gy=gy), nce)
    dist.destroy_process_group()
    for name, args in runs:
        train.print0("=== " + name)
        train.main(args)
    # an --out_dir on each node's own disk: rank 1's holds no checkpoint, rank 0's the ddp run's
    try:
        train.main(apart[r])
    except SystemExit as e:
        print(f"APART {e.code}")


@pytest.mark.slow(9)
def test_two_processes_equal_one(builtin, tmp_path):
    from conftest import ranks
    # name: (the run's flags, what two processes add: 2 ranks x 2 accumulated x 2 = 8)
    runs = {"ddp": (["--max_steps", "3"], ["--grad_accum", "2"]),
            "fsdp": (["--max_steps", "3"], ["--grad_accum", "2", "--fsdp"]),
            "mavil": (["--variant", "mavil", "--max_steps", "2"], [])}
    args = {n: [*TINY, "--data", builtin, "--batch_size", "8", *a] for n, (a, _) in runs.items()}
    apart = [[*args["ddp"], "--grad_accum", "2", "--resume", "auto", "--max_steps", "4",
              "--out_dir", str(tmp_path / d)] for d in ("two/ddp", "empty")]
    # a run stopped on one process and resumed on two (a job that grows, or a node lost and the
    # job restarted on fewer) continues the same run
    grow = tmp_path / "two" / "grow"
    train.main([*args["ddp"], "--stop_at", "1", "--out_dir", str(grow)])
    jobs = [(n, [*args[n], *two, "--out_dir", str(tmp_path / "two" / n)])
            for n, (_, two) in runs.items()] + [
        ("grow", [*args["ddp"], "--grad_accum", "2", "--resume", "auto", "--out_dir", str(grow)])]
    codes, out = ranks(lambda: two_ranks_job(jobs, apart, str(tmp_path / "nce.pt")))
    assert codes == [0, 0], out[-3000:]
    stdout = dict(zip(runs, out.split("=== ")[1:]))
    # ranks that would resume from different steps stop, every one, saying why
    for r in (0, 1):
        assert (f"APART rank {r}: the ranks would resume from different steps (step 0 on rank(s) "
                f"1; step 3 on rank(s) 0): --out_dir") in out, out[-2000:]
    for name in runs:
        two = tmp_path / "two" / name
        one = train.main([*args[name], "--out_dir", str(tmp_path / "one" / name)])
        w1, w2 = weights(one["checkpoint"]), weights(two / os.path.basename(one["checkpoint"]))
        assert set(w1) == set(w2), name
        assert all(torch.allclose(w1[k], w2[k], atol=1e-6) for k in w1), name
        assert losses(tmp_path / "one" / name) == pytest.approx(losses(two), rel=1e-4), name
    w1 = weights(tmp_path / "one" / "ddp" / "ckpt_0000003.pt")
    w2 = weights(grow / "ckpt_0000003.pt")
    assert all(torch.allclose(w1[k], w2[k], atol=1e-6) for k in w1), "grow"
    assert losses(tmp_path / "one" / "ddp") == pytest.approx(losses(grow), rel=1e-4)
    assert all("global batch 8 = 2 ranks x 2 x 2" in stdout[n] for n in ("ddp", "fsdp"))
    assert "2 ranks in sync: True" in stdout["ddp"]
    # the contrast's negatives are the global batch: one process with all 8 rows (in the ranks'
    # order) has the ranks' mean loss, and its y's gradient is the sum of the ranks' over 2
    res = torch.load(tmp_path / "nce.pt")
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(8, 16, generator=g), torch.randn(8, 16, generator=g).requires_grad_()
    order = torch.cat([torch.arange(0, 8, 2), torch.arange(1, 8, 2)])
    loss = avmae.info_nce(x[order], y[order], 0.1)
    loss.backward()
    assert torch.allclose(res["loss"], loss, atol=1e-6)  # (local negatives alone: another loss)
    assert torch.allclose(torch.cat(res["gy"]) / 2, y.grad[order], atol=1e-6)


def test_each_script_has_one_flat_config_that_holds_what_the_loader_takes():
    import dataclasses

    import data
    import finetune
    # every flag of a script is declared in its own dataclass (or the model's), none inherited
    for c in (train.TrainConfig, finetune.FinetuneConfig):
        assert c.__bases__ == (object,)
        names = {f.name for f in dataclasses.fields(c)}
        assert set(c.__annotations__) == names
        # what both scripts pass to the loader as it is: a flag of each, each with its own default
        assert {f.name for f in dataclasses.fields(data.LoadOptions)} <= names
    assert train.TrainConfig().video_aug == "none" and finetune.FinetuneConfig().video_aug == \
        "finetune"


READS = ("item", "tolist", "__bool__", "__float__", "__int__", "cpu", "numpy")


@pytest.mark.parametrize("script", ["train", "finetune"])
def test_nothing_waits_for_the_device_before_the_optimizer_step(script, builtin, tmp_path,
                                                                 monkeypatch):
    # A host read of a tensor (item, tolist, bool(), float(), .cpu(), ...) waits for the device
    # to finish all its queued work. Between a step's batch and its optimizer step there is none
    # (a non-finite step is skipped by the fused AdamW on the device); after it, one read of the
    # step's figures. (On a GPU, test_kernels_gpu.py holds the same with set_sync_debug_mode.)
    import data
    import finetune
    events, quiet = [], []
    for name in READS:
        def counted(self, *a, _real=getattr(torch.Tensor, name), _name=name, **k):
            if not quiet:
                events.append(_name)
            return _real(self, *a, **k)
        monkeypatch.setattr(torch.Tensor, name, counted)
    order = data.EpochSampler.__iter__  # (the sampler's CPU permutation: read on the host)
    monkeypatch.setattr(data.EpochSampler, "__iter__", lambda self: quiet.append(1) or iter(
        [list(order(self)), quiet.clear()][0]))
    step = torch.optim.AdamW.step
    monkeypatch.setattr(torch.optim.AdamW, "step",
                        lambda self, *a, **k: events.append("step") or step(self, *a, **k))
    # the batch is in hand: a loader worker (its own process) read it; from here, the step's work
    batch = lambda s, b: events.append("batch") or b  # noqa: E731
    common = ["--data", builtin, "--workers", "1", "--log_every", "1000", "--max_steps", "4"]
    if script == "train":
        run(builtin, tmp_path, *common, "--batch_size", "8", "--grad_accum", "2",
            hooks={"batch": batch})
    else:
        mix = finetune.mixup
        monkeypatch.setattr(finetune, "mixup", lambda b, *a, **k: mix(batch(0, b), *a, **k))
        finetune.main(["--preset", "quick", "--num_frames", "4", "--image_size", "32",
                       "--audio_frames", "64", "--batch_size", "8", "--eval_every", "1000",
                       "--out_dir", str(tmp_path), *common])
    steps = " ".join(events).split("step")
    assert len(steps) == 4 + 1
    # the set-up, then each step's: [its one read after it,] its batches and nothing else
    for i, between in enumerate(steps[:-1]):  # (the last step logs and saves)
        reads = between.split()
        reads = reads[reads.index("batch"):] if i == 0 else reads
        assert reads[:i > 0] == ["tolist"] * (i > 0) and set(reads[i > 0:]) == {"batch"}, reads


def test_compile_takes_a_mode(monkeypatch):
    import finetune
    modes = []
    monkeypatch.setattr(torch, "compile", lambda model, mode=None: modes.append(mode) or model)
    for parse in (train.parse_args, finetune.parse_args):
        for flags, want in ((["--compile"], None), (["--compile", "max-autotune-no-cudagraphs"],
                                                    "max-autotune-no-cudagraphs"), ([], "off")):
            cfg = parse(flags)
            cfg = cfg[-1] if isinstance(cfg, tuple) else cfg
            lin = torch.nn.Linear(2, 2)
            assert train.compiled(lin, cfg) is lin
            assert modes.pop() == want if want != "off" else not modes
    assert train.compiled(lin, SimpleNamespace(compile=True)) is lin and modes == [None]  # (an
    # older run's checkpoint says True)


def test_checkpointed_blocks_give_the_same_run(builtin, tmp_path, monkeypatch):
    # activation checkpointing recomputes each block's forward in the backward: the same losses
    # and weights, bit for bit (the recomputation draws the same dropout / drop-path)
    import torch.utils.checkpoint as ckpt
    calls = []
    real = ckpt.checkpoint
    monkeypatch.setattr(ckpt, "checkpoint", lambda *a, **k: calls.append(1) or real(*a, **k))
    plain = run(builtin, tmp_path / "plain", "--max_steps", "2", "--batch_size", "8")
    assert not calls
    saved = run(builtin, tmp_path / "ckpt", "--max_steps", "2", "--batch_size", "8",
                "--checkpoint_blocks")
    assert calls and losses(tmp_path / "plain") == losses(tmp_path / "ckpt")
    w1, w2 = weights(plain["checkpoint"]), weights(saved["checkpoint"])
    assert all(torch.equal(w1[k], w2[k]) for k in w1)


def _png_size(path):
    import struct
    head = open(path, "rb").read(24)
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", head[16:24])  # (width, height)


def test_every_run_draws_its_curves_and_can_write_tensorboard_scalars(builtin, tmp_path,
                                                                      monkeypatch, capsys):
    import finetune
    pytest.importorskip("matplotlib", reason="curves.png is drawn with matplotlib (.ci/run "
                        "installs it)")
    pre = run(builtin, tmp_path / "pre", "--max_steps", "3", "--batch_size", "8")
    w_pre, _ = _png_size(tmp_path / "pre" / "curves.png")  # (loss and lr)
    ft = ["--preset", "quick", "--data", builtin, "--init", pre["checkpoint"], "--workers", "0",
          "--num_frames", "4", "--image_size", "32", "--audio_frames", "64", "--batch_size", "8",
          "--max_steps", "6", "--eval_every", "1", "--kernels", "torch"]
    # TensorBoard, where it is installed (here a stand-in that records what it is given)
    scalars = []

    class Writer:
        def __init__(self, path):
            scalars.append(("dir", path))

        def add_scalar(self, k, v, step):
            scalars.append((k, step))

        def flush(self):
            pass
    board = SimpleNamespace(SummaryWriter=Writer)
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", board)
    finetune.main([*ft, "--out_dir", str(tmp_path / "ft"), "--tensorboard", str(tmp_path / "tb")])
    w_ft, _ = _png_size(tmp_path / "ft" / "curves.png")  # (loss, lr and the evaluations)
    assert w_ft > w_pre * 1.3
    assert scalars[0] == ("dir", str(tmp_path / "tb")) and ("loss", 6) in scalars
    assert ("eval/label_top1", 6) in scalars and ("eval/train_top1", 3) in scalars
    # without TensorBoard: one line at the start; without matplotlib: one line, no picture
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    with pytest.raises(SystemExit, match="TensorBoard is not installed: pip install tensorboard"):
        finetune.main([*ft, "--out_dir", str(tmp_path / "no_tb"), "--tensorboard", "tb"])
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    train.SAID.discard("matplotlib")
    capsys.readouterr()
    run(builtin, tmp_path / "bare", "--max_steps", "2", "--batch_size", "8", "--save_every", "1")
    said = [x for x in capsys.readouterr().out.splitlines() if "curves.png" in x]
    assert len(said) == 1 and "pip install matplotlib" in said[0]
    assert not os.path.exists(tmp_path / "bare" / "curves.png")
