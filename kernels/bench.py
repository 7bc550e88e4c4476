"""
Each kernel against its torch twin at the paper's shapes, in one run, as ratios :

  python kernels/bench.py                 # everything (needs a GPU)
  python kernels/bench.py --only attention
  TRITON_INTERPRET=1 python kernels/bench.py --smoke   # tiny shapes on the CPU: the script runs

Memory-bound kernels (gather, assembly, loss) report GB/s and the fraction of the GPU's HBM peak;
attention reports TFLOP/s (forward 4 B H N^2 d; backward 2.5x that) against torch's SDPA with each
backend it has (flash, efficient, cuDNN); `e2e` times the ViT-B training step with the kernels and
without (the twins, in both decoder layouts).
"""
import argparse
import json
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import avmae  # noqa: E402
import kernels  # noqa: E402

HBM = [("H100 PCIe", 2.0e12), ("H100", 3.35e12), ("H200", 4.8e12), ("GH200", 4.0e12), ("A100", 2.0e12),
       ("L40S", 0.864e12), ("L4", 0.3e12), ("A10", 0.6e12), ("V100", 0.9e12)]


REPS = 20


def timeit(fn, reps=None):
    """Median seconds per call (CUDA events on a GPU; wall clock on the CPU)."""
    reps = reps or REPS
    if torch.cuda.is_available():
        from triton.testing import do_bench
        return do_bench(fn, warmup=10, rep=max(20, reps * 5), return_mode="median") / 1e3
    fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return sorted(ts)[len(ts) // 2]


def hbm_peak():
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((p for k, p in HBM if k in name), None)


def report(rows, name, ours, twin, unit, amount, peak=None):
    r = dict(kernel=name, ours_s=ours, twin_s=twin, speedup=twin / ours, unit=unit,
             ours=amount / ours / (1e9 if unit == "GB/s" else 1e12), twin=amount / twin / (1e9 if unit == "GB/s" else 1e12))
    if peak:
        r["fraction_of_peak"] = amount / ours / peak
    rows.append(r)
    frac = f", {100 * r['fraction_of_peak']:.0f}% of HBM peak" if peak else ""
    print(f"{name:34s} ours {r['ours']:8.1f} {unit} | twin {r['twin']:8.1f} {unit} | x{r['speedup']:.2f}{frac}", flush=True)


def bench_memory(rows, dev, dtype, B, smoke):
    N, K, P, D = (64, 8, 96, 64) if smoke else (1568, 157, 1536, 384)
    el = torch.tensor([], dtype=dtype).element_size()
    perm = torch.stack([torch.randperm(N, device=dev) for _ in range(B)])
    keep, drop = perm[:, :K].contiguous(), perm[:, K:].contiguous()
    M = N - K
    patches = torch.randn(B, N, P, device=dev, dtype=dtype)
    f, t = kernels.FAST["gather"], avmae.gather_tokens
    report(rows, f"gather visible patches {B}x{K}x{P}", timeit(lambda: f(patches, keep)), timeit(lambda: t(patches, keep)),
           "GB/s", 2 * B * K * P * el + keep.numel() * 8, hbm_peak())
    x = torch.randn(B, K, D, device=dev, dtype=dtype)
    tok = torch.randn(D, device=dev, dtype=dtype)
    pos = torch.randn(N, D, device=dev, dtype=dtype)
    moved = (B * K * D + 2 * B * N * D + B * N * D) * el  # read visible + positions (cached mostly), write
    for name in ("assemble", "unshuffle"):
        args = (x, pos, tok, pos, keep, drop) if name == "assemble" else (x, tok, pos, keep, drop)
        f, t = kernels.FAST[name], getattr(avmae, name)
        report(rows, f"{name} {B}x{N}x{D}", timeit(lambda: f(*args)), timeit(lambda: t(*args)), "GB/s", moved, hbm_peak())
    pred = torch.randn(B, M, P, device=dev, dtype=dtype, requires_grad=True)
    for norm in (False, True):
        f, t = kernels.FAST["loss"], avmae.recon_loss
        report(rows, f"loss fwd+bwd {B}x{M}x{P} norm={norm}",
               timeit(lambda: f(pred, patches, drop, norm).backward()), timeit(lambda: t(pred, patches, drop, norm).backward()),
               "GB/s", 4 * B * M * P * el, hbm_peak())


def bench_attention(rows, dev, dtype, B, smoke):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    H, d = (2, 32) if smoke else (12, 64)
    lengths = [17, 40] if smoke else [157, 200, 357, 400, 1568, 1968, 3136]
    backends = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
                "cudnn": SDPBackend.CUDNN_ATTENTION} if dev == "cuda" else {"math": SDPBackend.MATH}
    for N in lengths:
        b = max(1, B * 4096 // max(N, 1)) if not smoke else B  # similar work per length
        qkv = torch.randn(b, N, 3, H, d, device=dev, dtype=dtype, requires_grad=True)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        fl_f = 4 * b * H * N * N * d
        ours_f = timeit(lambda: kernels.FAST["attention"](q, k, v))
        ours_fb = timeit(lambda: kernels.FAST["attention"](q, k, v).sum().backward())
        best = {}
        for name, be in backends.items():
            try:
                with sdpa_kernel([be]):
                    tf = timeit(lambda: F.scaled_dot_product_attention(q, k, v))
                    tfb = timeit(lambda: F.scaled_dot_product_attention(q, k, v).sum().backward())
                best[name] = (tf, tfb)
            except RuntimeError:  # backend not available for this shape / dtype / GPU
                continue
        for what, ours, fl, idx in (("fwd", ours_f, fl_f, 0), ("fwd+bwd", ours_fb, 3.5 * fl_f, 1)):
            if not best:
                continue
            name, t = min(((n, v[idx]) for n, v in best.items()), key=lambda x: x[1])
            report(rows, f"attention {what} N={N} (vs SDPA {name})", ours, t, "TFLOP/s", fl)


def bench_e2e(rows, dev, smoke):
    import train
    base = dict(num_frames=4, image_size=32, patch_size=16, audio_frames=64, mel_bins=32) if smoke else {}
    size, micro = ("tiny", 2) if smoke else ("base", 64)
    res = {}
    for label, kw in [("kernels", dict(kernels="auto" if dev == "cuda" else "triton")),
                      ("twins", dict(kernels="torch")), ("twins+unshuffle", dict(kernels="torch", decoder_layout="unshuffle"))]:
        torch.manual_seed(0)
        mcfg = avmae.make_config(size, **base, **kw)
        tcfg = train.TrainConfig(bench=True, bench_steps=1 if smoke else 20, batch_size=micro)
        d = train.Dist(device=torch.device(dev))
        res[label] = train.bench(avmae.AVMAE(mcfg).to(dev), mcfg, tcfg, d, micro)
    for other in ("twins", "twins+unshuffle"):
        rows.append(dict(kernel=f"e2e step vs {other}", speedup=res[other]["step_s"] / res["kernels"]["step_s"],
                         ours_clips_per_s=res["kernels"]["clips_per_s"], twin_clips_per_s=res[other]["clips_per_s"]))
        print(f"ViT-B step, kernels vs {other}: x{rows[-1]['speedup']:.2f} "
              f"({res['kernels']['clips_per_s']:.0f} vs {res[other]['clips_per_s']:.0f} clips/s)", flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", choices=["memory", "attention", "e2e"])
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--batch", type=int, default=64, help="clips per GPU (512 over 8 GPUs)")
    p.add_argument("--smoke", action="store_true", help="tiny shapes, any device (under TRITON_INTERPRET=1 on a CPU)")
    p.add_argument("--json", help="also write the rows here")
    a = p.parse_args()
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    if dev == "cpu" and not (a.smoke and kernels.INTERPRET):
        sys.exit("kernels/bench.py needs a GPU (or --smoke with TRITON_INTERPRET=1 to check that it runs)")
    dtype = getattr(torch, a.dtype) if dev == "cuda" else torch.float32
    global REPS
    REPS = 2 if a.smoke else REPS
    B = 2 if a.smoke else a.batch
    print(f"device: {torch.cuda.get_device_name() if dev == 'cuda' else 'cpu (interpreter)'}, dtype {dtype}", flush=True)
    rows = []
    if a.only in (None, "memory"):
        bench_memory(rows, dev, dtype, B, a.smoke)
    if a.only in (None, "attention"):
        bench_attention(rows, dev, dtype, B, a.smoke)
    if a.only in (None, "e2e"):
        bench_e2e(rows, dev, a.smoke)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
