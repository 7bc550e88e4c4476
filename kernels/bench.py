"""
Every kernel against its torch twin (and attention against every SDPA backend) at the training
shapes, and the ViT-B training step on each backend, in one run, as one markdown report:

  python kernels/bench.py --report bench.md      # on a GPU (.ci/gpu gives it 270 s)
  python kernels/bench.py --report bench.md      # on a CPU: the twins at small shapes (a dry run)
  TRITON_INTERPRET=1 python kernels/bench.py --smoke   # tiny shapes through the interpreter

Shapes (AV-MAE ViT-B, batch 64 per GPU = 512 over 8): attention with head dim 64 at the encoder's
visible lengths (157, 200, 357, 400; 12 heads) and the decoder's full sequences (1568, 1968; its 6
heads), forward and forward+backward through torch.autograd.grad with a fixed random dO, TFLOP/s
counted as 4 B H N^2 d forward and 2.5x that backward. Memory kernels in GB/s against the GPU's HBM
peak: the gather of fp32 patches (the model patchifies in fp32), the decoder assembly reading K
visible tokens and writing N, the loss reading predictions and targets and writing the gradient.
The step: mid fusion S = 2, shared decoder, bf16 autocast, AdamW, with --kernels torch / auto /
triton, eager and compiled: clips/s, MFU and peak memory; and torch.compile(fullgraph=True).
"""
import argparse
import contextlib
import json
import math
import os
import re
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import avmae  # noqa: E402
import data  # noqa: E402
import kernels  # noqa: E402

HBM = [("H100 PCIe", 2.0e12), ("H100", 3.35e12), ("H200", 4.8e12), ("GH200", 4.0e12),
       ("A100", 2.0e12), ("L40S", 0.864e12), ("L4", 0.3e12), ("A10", 0.6e12), ("V100", 0.9e12)]
ENCODER_LENGTHS, DECODER_LENGTHS = (157, 200, 357, 400), (1568, 1968)
SMALL_LENGTHS = (17, 40), (64,)  # (--smoke and the CPU: encoder, decoder)
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


def spin(seconds=0.5):
    """Keeps the GPU busy for a moment (bf16 matrix products), so that what is timed next runs at
    the clocks a training run holds: an idle GPU (while the CPU compiles and autotunes) drops them,
    and a 10 ms warm-up does not bring them back."""
    if not torch.cuda.is_available():
        return
    a = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        for _ in range(10):
            a @ a
        torch.cuda.synchronize()


def hbm_peak():
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((p for k, p in HBM if k in name), None)


def run_ours(dev) -> bool:  # the kernels run on CUDA, or on the CPU under the interpreter
    return dev == "cuda" or kernels.INTERPRET


def bench_memory(dev, B, small):
    """Rows (what, ours GB/s, twin GB/s, twin under torch.compile GB/s (on a GPU), fraction of
    HBM peak)."""
    N, K, P, D = (64, 8, 96, 64) if small else (1568, 157, 1536, 384)
    perm = torch.stack([torch.randperm(N, device=dev) for _ in range(B)])
    keep, drop = perm[:, :K].contiguous(), perm[:, K:].contiguous()
    M, f32, act = N - K, 4, 2 if dev == "cuda" else 4
    act_dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    patches = torch.randn(B, N, P, device=dev)  # fp32, as the model patchifies
    x = torch.randn(B, K, D, device=dev, dtype=act_dtype)
    tok, pos = torch.randn(D, device=dev, dtype=act_dtype), torch.randn(N, D, device=dev,
                                                                        dtype=act_dtype)
    pred = torch.randn(B, M, P, device=dev, dtype=act_dtype, requires_grad=True)
    cases = [  # (what, name, args, bytes moved)
        (f"gather fp32 patches {B}x{K} of {N}x{P}", "gather", (patches, keep),
         2 * B * K * P * f32 + keep.numel() * 8),
        (f"assemble {B}x(K={K} -> N={N})x{D}", "assemble", (x, pos, tok, pos, keep, drop),
         (B * K + B * N + N) * D * act),
        (f"unshuffle {B}x(K={K} -> N={N})x{D}", "unshuffle", (x, tok, pos, keep, drop),
         (B * K + B * N + N) * D * act),
    ]
    rows = []
    for what, name, args, moved in cases:
        ours = timeit(lambda: kernels.FAST[name](*args)) if run_ours(dev) else None
        twin = timeit(lambda: avmae.OPS_TORCH[name](*args))
        fused = _compiled(avmae.OPS_TORCH[name], dev)
        comp = timeit(lambda: fused(*args)) if fused else None
        rows.append((what, ours and moved / ours / 1e9, moved / twin / 1e9,
                     comp and moved / comp / 1e9,
                     ours and hbm_peak() and moved / ours / hbm_peak()))
    for norm in (False, True):
        moved = B * M * P * (2 * act + f32)  # read predictions and targets, write the gradient

        def step(fn):
            (g,) = torch.autograd.grad(fn(pred, patches, drop, norm), pred)
            return g
        ours = timeit(lambda: step(kernels.FAST["loss"])) if run_ours(dev) else None
        twin = timeit(lambda: step(avmae.recon_loss))
        fused = _compiled(avmae.recon_loss, dev)
        comp = timeit(lambda: step(fused)) if fused else None
        rows.append((f"loss fwd+bwd {B}x{M}x{P} norm_pix={norm}", ours and moved / ours / 1e9,
                     moved / twin / 1e9, comp and moved / comp / 1e9,
                     ours and hbm_peak() and moved / ours / hbm_peak()))
    return rows


def _compiled(fn, dev):  # the twin as torch.compile fuses it (on a GPU only: a CPU compile is slow)
    return torch.compile(fn, dynamic=False) if dev == "cuda" else None


def suggest(dev, memory, attention, checks=()) -> str:
    """The kernels.MEASURED_FASTER entry these figures support: a memory kernel where it was
    no slower than its twin, eager and compiled; attention at head dim 64 where ours, as it runs
    by default, was no slower than SDPA's best backend (forward + backward) at every length and
    no less accurate than twice SDPA's own error; and which of our attention options, if any,
    would have been."""
    if dev != "cuda" or not memory or not attention:
        return "none (needs the memory and attention figures of a GPU run)"
    ops = []
    for name in ("gather", "assemble", "unshuffle", "loss"):
        rs = [r for r in memory if r[0].split()[0] == name]
        if all(r[1] is not None and r[1] >= r[2] and (r[3] is None or r[1] >= r[3]) for r in rs):
            ops.append(name)
    fb = [r for *_, what, r in attention if what == "fwd+bwd"]

    sdpa_err = {N: (o, g) for N, what, o, g in checks if what == "SDPA"}

    def wins(form):
        accurate = all(o <= 2 * sdpa_err[N][0] + 1e-6 and g <= 2 * sdpa_err[N][1] + 1e-6
                       for N, what, o, g in checks if what == "ours" + form)
        return accurate and all(r.get("ours" + form, 0) >= max(
            v for k, v in r.items() if not k.startswith("ours")) for r in fb)
    if wins(""):
        ops.append("attention/64")
    better = [f"`ours{x}`" for x in OURS if x and wins(x)]
    gpu = torch.cuda.get_device_name()
    return f"`{{{gpu!r}: {tuple(ops)!r}}}`" + (
        f" (no slower than SDPA at every length with an option on: {', '.join(better)})"
        if better and not wins("") else "")


def bench_attention(dev, B, small):
    """Rows (N, heads, pass, {backend: TFLOP/s}) for ours and every SDPA backend that runs, and
    checks (N, form, relative error of the output, of dqkv) of ours as autotuned, and of SDPA's
    default in the same dtype, against SDPA in a wider dtype (fp32 for bf16, fp64 for fp32), and
    floors {backend: microseconds of a forward + backward with next to no work (B = H = 1,
    N = 16)}: what a call costs before any arithmetic (its launches and the Python around them).
    At each length every backend runs once first (our autotuning), then the GPU is kept busy for
    a moment, and the backends are timed twice, in one order and then the other, each keeping
    its best: no backend is timed on a GPU cooled by another's compiling, or always first."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    d = 32 if small else 64
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    enc, dec = SMALL_LENGTHS if small else (ENCODER_LENGTHS, DECODER_LENGTHS)
    shapes = [(n, 2 if small else 12) for n in enc] + [(n, 2 if small else 6) for n in dec]
    backends = dict(flash=SDPBackend.FLASH_ATTENTION, efficient=SDPBackend.EFFICIENT_ATTENTION,
                    cudnn=SDPBackend.CUDNN_ATTENTION, math=SDPBackend.MATH) if dev == "cuda" else \
        dict(math=SDPBackend.MATH)
    rows, checks = [], []
    for N, H in shapes:
        # the model's packed projection: ours takes it whole, SDPA its three views
        qkv = torch.randn(B, N, 3, H, d, device=dev, dtype=dtype, requires_grad=True)
        dout = torch.randn(B, H, N, d, device=dev, dtype=dtype)  # a fixed random dO
        fl = 4 * B * H * N * N * d
        fns = {}
        if run_ours(dev) and "attention" in kernels.FAST:  # (name: DQ_ATOMIC, FWD_TMA)
            fns.update({f"ours{x}": (kernels.FAST["attention"], opt) for x, opt in OURS.items()})
        for name, be in backends.items():
            fns[name] = ((lambda be: lambda qkv: _sdpa(qkv, be, sdpa_kernel))(be), (False, False))
        wide = qkv.detach().to(torch.float32 if dtype != torch.float32 else torch.float64)
        wide.requires_grad_(True)
        ref = _sdpa(wide, None, sdpa_kernel)
        (ref_grad,) = torch.autograd.grad(ref, wide, dout.to(wide.dtype))
        fwd, fb, runs = {}, {}, {}
        for name, (fn, opt) in fns.items():  # once each (autotuning ours), and ours checked
            try:
                with _options(*opt):
                    y = fn(qkv)
                    (g,) = torch.autograd.grad(y, qkv, dout)
                runs[name] = fn, opt
                if name.startswith("ours"):
                    checks.append((N, name, _rel(y, ref), _rel(g, ref_grad)))
            except RuntimeError:  # a backend that does not take this shape / dtype / GPU
                continue
        spin()
        for order in (list(runs), list(runs)[::-1]):
            for name in order:
                fn, (atomic, tma) = runs[name]
                with _options(atomic, tma):
                    if not atomic:  # (the same forward as ours)
                        fwd[name] = max(fwd.get(name, 0), fl / timeit(lambda: fn(qkv)) / 1e12)
                    t = timeit(lambda: torch.autograd.grad(fn(qkv), qkv, dout))
                    fb[name] = max(fb.get(name, 0), 3.5 * fl / t / 1e12)
        y = _sdpa(qkv, None, sdpa_kernel)  # SDPA's own choice in this dtype: the yardstick
        (g,) = torch.autograd.grad(y, qkv, dout)
        checks.append((N, "SDPA", _rel(y, ref), _rel(g, ref_grad)))
        rows += [(N, H, "fwd", fwd), (N, H, "fwd+bwd", fb)]
    tiny = torch.randn(1, 16, 3, 1, d, device=dev, dtype=dtype, requires_grad=True)
    tiny_do = torch.ones(1, 1, 16, d, device=dev, dtype=dtype)
    floors = {}
    for name, (fn, opt) in fns.items():
        with _options(*opt):
            try:
                fn(tiny)
                floors[name] = 1e6 * timeit(lambda: torch.autograd.grad(fn(tiny), tiny, tiny_do))
            except RuntimeError:
                continue
    return rows, checks, floors


@contextlib.contextmanager
def _options(atomic, tma):  # our kernel's options for a while (attention.DQ_ATOMIC, FWD_TMA)
    kernels.attention.DQ_ATOMIC, kernels.attention.FWD_TMA = atomic, tma
    try:
        yield
    finally:
        kernels.attention.DQ_ATOMIC = kernels.attention.FWD_TMA = False


def _rel(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


# our kernel's options as columns: (kernels.attention.DQ_ATOMIC, FWD_TMA)
OURS = {"": (False, False), ", dq by atomics": (True, False), ", TMA forward": (False, True)}


def _sdpa(qkv, backend, sdpa_kernel):  # backend None: SDPA's own choice
    with sdpa_kernel([backend]) if backend is not None else contextlib.nullcontext():
        return F.scaled_dot_product_attention(*qkv.permute(2, 0, 3, 1, 4))


def calibrate(dev, small) -> list:
    """A sitting's first lines: the machine and versions, a large bf16 GEMM's TFLOP/s against
    the card's dense peak (what MFU is counted against: a card that reaches less shows it here),
    and the attention op SDPA picks at each of the step's lengths (one forward + backward each,
    under the profiler)."""
    import importlib.metadata
    import importlib.util
    import train
    from torch.profiler import ProfilerActivity, profile
    name = torch.cuda.get_device_name() if dev == "cuda" else "cpu"
    out = [f"- device: {name}; torch {torch.__version__} (CUDA {torch.version.cuda}); triton "
           f"{importlib.metadata.version('triton') if importlib.util.find_spec('triton') else '-'}"
           f"; {os.cpu_count()} cores"]
    n, dtype = (512, torch.float32) if small else (8192, torch.bfloat16)
    a, b = torch.randn(n, n, device=dev, dtype=dtype), torch.randn(n, n, device=dev, dtype=dtype)
    s = timeit(lambda: a @ b, reps=5 if small else 20)
    peak = train.peak_flops(torch.device(dev))
    of = f", {2 * n ** 3 / s / peak:.0%} of its {peak / 1e12:.0f} dense" if peak else ""
    out.append(f"- GEMM {n}^3 {str(dtype)[6:]}: {2 * n ** 3 / s / 1e12:.1f} TFLOP/s{of}")
    d, picks = (32, {}) if small else (64, {})
    for N in sum(SMALL_LENGTHS if small else (ENCODER_LENGTHS, DECODER_LENGTHS), ()):
        q = torch.randn(2 if small else 64, 4 if small else 12, N, d, device=dev,
                        dtype=torch.bfloat16 if dev == "cuda" else torch.float32,
                        requires_grad=True)
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            F.scaled_dot_product_attention(q, q, q).sum().backward()
        picks[N] = ", ".join(attention_by_length(prof.events()).get(N, ["?"]))
    out.append("- SDPA's own pick by sequence length: "
               + "; ".join(f"{N}: {v}" for N, v in picks.items()))
    return out


def bench_step(dev, small, on_row=None, modes=("eager", "compiled"),
               backends=("torch", "auto", "triton")):
    """The ViT-B paper configuration's training step per backend, in each of `modes`: eager, and
    compiled on a GPU (with fullgraph=True: a graph break fails the compile, which is then
    retried without it and reported). Returns the rows and what the compiles said. A backend
    that resolves to the same ops as one already timed ('auto' on a GPU with no measured entry is
    'torch') is not timed again. on_row(rows, graphs) after each row (a time limit in a later
    compile keeps them)."""
    import train
    base = dict(num_frames=4, image_size=32, patch_size=16, audio_frames=64,
                mel_bins=32) if small else {}
    size, micro = ("tiny", 2) if small else ("base", 64)
    rows, backends = [], [b for b in backends if run_ours(dev) or b == "torch"]
    timed, graphs = {}, []
    for backend in backends:
        ops = avmae.get_ops(backend, dev)
        same = next((b for b, o in timed.items() if o == ops), None)
        if same:
            rows += [(f"{backend} (= {same}: the same ops here)", *r[1:]) for r in rows
                     if r[0] == same]
            continue
        timed[backend] = ops
        # (compiling on a CPU: not a GPU figure)
        for compiled in [m == "compiled" for m in modes if dev == "cuda" or m == "eager"]:
            torch.manual_seed(0)
            model_cfg = avmae.make_config(size, encoder="mid", decoder="shared", kernels=backend,
                                          **base)
            # (then a few steps under torch.profiler: where the device time goes)
            cfg = train.TrainConfig(bench=True, bench_steps=1 if small else 20, batch_size=micro,
                                    precision="bf16" if dev == "cuda" else "fp32",
                                    profile=1 if small else 3)
            model = avmae.AVMAE(model_cfg).to(dev)
            mode = "compiled" if compiled else "eager"
            try:
                r = _bench_one(train, model, model_cfg, cfg, dev, micro, compiled, backend, graphs)
                rows.append((backend, mode, r["clips_per_s"], r["mfu"], r["peak_mem_gb"],
                             r.get("profile")))
            # (a compiler missing on a CPU machine, say): reported, not fatal
            except Exception as e:
                rows.append((backend, mode, None, None, f"{type(e).__name__}", None))
            del model
            if dev == "cuda":
                torch.cuda.empty_cache()
            if on_row:
                on_row(rows, "; ".join(graphs))
    return rows, "; ".join(graphs) or "not compiled here (a CPU)"


def _bench_one(train, model, model_cfg, cfg, dev, micro, compiled, backend, graphs):
    d = train.Dist(device=torch.device(dev))
    if not compiled:
        return step_speed(model, model_cfg, cfg, d, micro)
    try:
        r = step_speed(torch.compile(model, fullgraph=True), model_cfg, cfg, d, micro)
        graphs.append(f"{backend}: one graph (fullgraph=True)")
        return r
    except Exception as e:  # a graph break (or another compile error): said, then without
        graphs.append(f"{backend}: fullgraph=True failed ({type(e).__name__}: "
                      f"{str(e).strip().splitlines()[0][:160]})")
        torch._dynamo.reset()
        return step_speed(torch.compile(model), model_cfg, cfg, d, micro)


def step_speed(model, model_cfg, cfg, d, micro: int):
    """train.py --bench: steps on synthetic batches held in memory: the model's speed without the
    data pipeline;
    with cfg.profile, where a step's device time goes (profile_steps)."""
    import train
    raw = train.unwrap(model)
    opt = train.optimizer(raw, cfg, 1e-4)  # (and the gradient norm: a step's work)
    x = {}
    if "a" in model_cfg.modalities:
        x["a"] = torch.randn(micro, model_cfg.audio_frames, model_cfg.mel_bins, device=d.device)
    if "v" in model_cfg.modalities:
        x["v"] = torch.rand(micro, 3, model_cfg.num_frames, model_cfg.image_size,
                            model_cfg.image_size,
                            device=d.device) * 2 - 1
    sync = torch.cuda.synchronize if d.device.type == "cuda" else (lambda: None)
    if d.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()

    def step():
        with train.autocast_ctx(cfg.precision, d.device):
            loss = model(**x, masks=raw.sample_masks(micro, d.device))["loss"]
        loss.backward()
        train.clip_grads(model, cfg)
        opt.step()
        opt.zero_grad(set_to_none=True)
    times = []
    for i in range(3 + cfg.bench_steps):
        sync()
        t0 = time.perf_counter()
        step()
        sync()
        if i >= 3:
            times.append(time.perf_counter() - t0)
    dt = float(np.median(times))
    fl = raw.flops()
    clips = micro * d.world / dt
    peak = train.peak_flops(d.device)
    res = dict(
        step_s=dt, clips_per_s=clips, tflops_per_gpu=clips * fl["train"] / d.world / 1e12,
        mfu=(clips * fl["train"] / (peak * d.world)) if peak else None,
        peak_mem_gb=torch.cuda.max_memory_allocated() / 1e9 if d.device.type == "cuda" else None,
        gflops_fwd_per_clip=fl["forward"] / 1e9, micro_batch=micro, world=d.world,
        device=torch.cuda.get_device_name(d.device) if d.device.type == "cuda" else "cpu")
    train.print0(f"{res['device']}: {clips:.2f} clips/s ({dt * 1e3:.0f} ms a step of {micro} "
                 "clips x "
                 f"{d.world} ranks), {res['tflops_per_gpu']:.2f} TFLOP/s per device, "
                 + (f"MFU {res['mfu']:.1%}" if peak else "MFU: no known peak for this device")
                 + (f", peak memory {res['peak_mem_gb']:.1f} GB" if res["peak_mem_gb"] else ""))
    if cfg.profile:
        try:  # (the timing above stands whatever the profiler does)
            res["profile"] = profile_steps(step, cfg.profile, d.device)
        except RuntimeError as e:
            res["profile"] = dict(share={}, steps=cfg.profile, note=f"the profiler failed "
                                  f"({str(e).strip().splitlines()[0][:160]})")
        train.print0(profile_line(res["profile"]))
    train.print0(json.dumps(res))  # (the same, for scripts: the last line)
    return res


# what a profiled step's device time goes to, by kernel name (on a CPU: by op name), the first
# pattern that matches; the names are cuBLAS's / CUTLASS's, SDPA's backends', ours, Inductor's
KINDS = (("attention", r"attn|attention|flash|fmha|sdp|mha"),
         ("matmul", r"gemm|xmma|cutlass|nvjet|cublas|wgmma|^triton_tem_fused_(add)?b?mm"
                    r"|^aten::(mm|addmm|bmm|baddbmm)$"),
         ("optimizer", r"optimizer|adam|multi_tensor|foreach"),
         ("gather, assembly, loss (ours)", r"^_(gather|scatter|assemble|loss)_"),
         ("fused by torch.compile", r"^triton_"),
         ("copies", r"memcpy|memset|copy|catarray|index|gather|scatter|^aten::cat$"))


def profile_steps(step, n: int, device: torch.device) -> dict:
    """Run step() n times under torch.profiler. Returns each KINDS' share of the device time
    ('other': the rest: norms, activations, additions outside a compiled graph, ...) and, on
    CUDA, how busy the device was from the first kernel's start to the last one's end (the gaps:
    launches the CPU had not made yet, waits for the host). On a CPU: the ops' own CPU time."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile
    cuda = device.type == "cuda"
    if not cuda:  # (a CUDA build without a GPU: Kineto's error about counting GPUs, and its
        os.environ.setdefault("KINETO_LOG_LEVEL", "6")  # start / stop lines, say nothing here)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=acts, record_shapes=True, with_flops=True) as prof:
        for _ in range(n):
            step()
        if cuda:
            torch.cuda.synchronize(device)
    spans, by = [], {k: 0.0 for k, _ in KINDS + (("other", ""),)}
    for e in prof.events():
        if cuda and e.device_type == DeviceType.CUDA:
            t = (e.time_range.start, e.time_range.end)
        elif not cuda and e.device_type == DeviceType.CPU and e.self_cpu_time_total > 0:
            t = (0.0, e.self_cpu_time_total)
        else:
            continue
        spans.append(t)
        kind = next((k for k, pat in KINDS if re.search(pat, e.name, re.I)), "other")
        by[kind] += t[1] - t[0]
    if not spans:
        return dict(share={}, steps=n, note="the profiler recorded no kernels (no CUPTI?)")
    total = sum(by.values())
    out = dict(share={k: v / total for k, v in by.items()}, steps=n,
               top=top_kernels(prof.events(), cuda, total), attention=attention_by_length(
                   prof.events()))
    if cuda:
        busy, end = 0.0, -math.inf  # the union of the kernels' intervals
        for a, b in sorted(spans):
            busy += max(0.0, b - max(a, end))
            end = max(end, b)
        out["busy"] = busy / (end - min(a for a, _ in spans))
    return out


VIEWS = (r"aten::(view|reshape|_reshape_alias|as_strided|t|transpose|permute|expand|slice|select|"
         r"unsqueeze|squeeze|alias|detach|unflatten|flatten|split|chunk|unbind|narrow|"
         r"empty\w*|_unsafe_view|lift_fresh|resolve_conj|resolve_neg)$")


# bytes per element of the profiler's input dtype names (C++ type names); 4 where not known
ITEM_BYTES = {"float": 4, "double": 8, "c10::BFloat16": 2, "c10::Half": 2, "long int": 8,
              "int": 4, "short int": 2, "signed char": 1, "unsigned char": 1, "bool": 1}


def _op_work(e) -> tuple:
    """(FLOPs, bytes) of one profiled op: the profiler's FLOP count (matmuls), attention's from
    its shapes (4 B H N^2 d forward, 2.5x that backward), else the bytes of its inputs and an
    output the size of the first (elementwise and copy ops)."""
    if e.flops:
        return e.flops, 0
    n, at = attention_length(e)
    if n:
        B, H, N, d = at
        return 4 * B * H * N * N * d * (2.5 if "backward" in e.name else 1), 0
    if re.match(VIEWS, e.name):  # (a view moves no bytes)
        return 0, 0
    dtypes = getattr(e, "input_dtypes", None) or []
    moved = [math.prod(s) * ITEM_BYTES.get(t, 4) for s, t in
             zip(e.input_shapes or [], list(dtypes) + [""] * len(e.input_shapes or [])) if s]
    return 0, sum(moved) + (moved[0] if moved else 0)


def attention_length(e) -> tuple:
    """(sequence length, (B, H, N, d)) of an attention op (SDPA's backends, ours), or (0, None)."""
    shapes = getattr(e, "input_shapes", None) or []
    if not shapes or not shapes[0]:
        return 0, None
    if re.match(r"aten::_scaled_dot_product_\w+|aten::_flash_attention|aten::_efficient_attention",
                e.name) and len(shapes[0]) == 4:
        return shapes[0][2], tuple(shapes[0])
    if "attention_qkv" in e.name and len(shapes[0]) == 5:  # ours: (B, N, 3, H, d)
        B, N, _, H, d = shapes[0]
        return N, (B, H, N, d)
    return 0, None


def top_kernels(events, cuda: bool, total: float, n: int = 30) -> list:
    """The n kernels (on a CPU: ops) that take the most of the profiled time: (name, share of
    the time, calls, TFLOP/s or None, GB/s or None), the work of each kernel from the op that
    launched it (_op_work, shared out by time among the kernels it launched)."""
    from torch.autograd import DeviceType
    rows = {}  # name: [time, calls, FLOPs, bytes]
    for e in events:
        if cuda and e.device_type == DeviceType.CUDA:  # (the time: the kernels themselves)
            r = rows.setdefault(e.name, [0.0, 0, 0.0, 0.0])
            r[0] += e.time_range.end - e.time_range.start
            r[1] += 1
        if e.device_type != DeviceType.CPU:
            continue
        flops, nbytes = _op_work(e)
        if cuda:  # (the work: the op's, shared out among the kernels it launched)
            spans = [(k.name, k.duration) for k in e.kernels]
        elif e.self_cpu_time_total > 0:
            spans = [(e.name, e.self_cpu_time_total)]
            r = rows.setdefault(e.name, [0.0, 0, 0.0, 0.0])
            r[0] += e.self_cpu_time_total
            r[1] += 1
        else:
            spans = []
        busy = sum(t for _, t in spans) or 1
        for name, t in spans:
            r = rows.setdefault(name, [0.0, 0, 0.0, 0.0])
            r[2] += flops * t / busy
            r[3] += nbytes * t / busy
    out = []
    for name, (t, calls, flops, nbytes) in sorted(rows.items(), key=lambda kv: -kv[1][0])[:n]:
        s = max(t, 1e-3) / 1e6  # (the profiler's microseconds)
        out.append((name, t / total, calls, flops / s / 1e12 if flops else None,
                    nbytes / s / 1e9 if nbytes and not flops else None))
    return out


def attention_by_length(events) -> dict:
    """{sequence length: the attention ops that ran at it (SDPA's backend, or ours)}."""
    seen = {}
    for e in events:
        N, _ = attention_length(e)
        if N and "backward" not in e.name:
            name = e.name.replace("aten::_scaled_dot_product_", "sdpa ").replace("avmae::", "")
            seen.setdefault(N, set()).add(name)
    return {N: sorted(v) for N, v in sorted(seen.items())}


def profile_line(p: dict) -> str:
    if "note" in p:
        return f"--profile: {p['note']}"
    shares = ", ".join(f"{k} {v:.0%}" for k, v in p["share"].items() if v >= 0.005)
    busy = f"; the device busy {p['busy']:.0%} of the time" if "busy" in p else ""
    return (f"where {p['steps']} profiled steps' {'device' if 'busy' in p else 'CPU'} time goes: "
            f"{shares}{busy} (under the profiler)")


# shared memory a block may use, bytes (opt-in maximum), per compute capability
SMEM = {80: 166912, 86: 101376, 89: 101376, 90: kernels.attention.HOPPER_SMEM, 100: 232448}


def compile_check(cc: int, full: bool = True) -> list:
    """Compiles every kernel, in every autotuning configuration it may pick, for a CUDA GPU of
    compute capability cc (90: H100 / H200) without one: Triton's compiler and ptxas run on any
    machine. Catches what the interpreter cannot (a tl.dot shape or dtype the GPU does not take,
    shared memory over the GPU's limit) before a GPU is at hand. Rows (kernel, case, config,
    shared memory bytes or None, error or ""). full=False: bf16 and head dim 64 only."""
    import triton
    from triton.backends.compiler import GPUTarget
    from kernels import assemble, attention, gather, loss
    cases = []  # (name, kernel, pointer dtypes, constexprs, configs)
    for dt in ("bf16", "fp16", "fp32") if full else ("bf16",):
        fp32 = dt == "fp32"
        for d in (32, 64, 128) if full else (64,):
            fix = dict(HEAD_DIM=d, IS_FP32=fp32)
            io = dict(Q=dt, K=dt, V=dt, O=dt, DO=dt, DQKV=dt, LSE="fp32",
                      DELTA="fp32", DQACC="fp32")
            cases += [(f"attention fwd{' tma' if t else ''}", attention._attn_fwd, io,
                       {**fix, "TMA": t}, attention._FWD) for t in (False, True)]
            cases += [("attention delta", attention._attn_bwd_delta, io,
                       dict(HEAD_DIM=d, BLOCK_M=64), [triton.Config({})]),
                      ("attention dq", attention._attn_bwd_dq, io, fix, attention._DQ)]
            cases += [(f"attention dkdv{' atomic dq' if a else ''}", attention._attn_bwd_dkdv, io,
                       {**fix, "DQ_ATOMIC": a}, attention._DKDV) for a in (False, True)]
        C = 384  # the decoder's width; patches 1536 wide
        bk, bc = gather._blocks(C)
        one = [triton.Config({})]
        cases += [
            ("gather", gather._gather_kernel, dict(x_ptr="fp32", ids_ptr="i64", pos_ptr=dt,
                                                   out_ptr=dt), dict(HAS_POS=True, BLOCK_K=bk,
                                                                     BLOCK_C=bc), one),
            ("scatter", gather._scatter_kernel, dict(g_ptr=dt, ids_ptr="i64", dx_ptr="fp32"),
             dict(BLOCK_K=bk, BLOCK_C=bc), one)]
        br, bd = assemble._blocks(C)
        cases += [(f"assemble raster={r}", assemble._assemble_kernel,
                   dict(x_ptr=dt, pv_ptr=dt, tok_ptr=dt, pm_ptr=dt, iv_ptr="i64", im_ptr="i64",
                        out_ptr=dt), dict(RASTER=r, BLOCK_R=br, BLOCK_D=bd), one)
                  for r in (False, True)]
        lp = dict(pred_ptr=dt, patch_ptr="fp32", ids_ptr="i64", rows_ptr="fp32",
                  grad_ptr="fp32", dpred_ptr=dt)
        cases += [(f"loss {w} norm={n}", k, lp, dict(NORM=n, BLOCK_P=2048), one)
                  for w, k in (("fwd", loss._loss_fwd), ("bwd", loss._loss_bwd))
                  for n in (False, True)]
    rows = []
    for name, kernel, ptrs, fix, configs in cases:
        jit = kernel.fn if hasattr(kernel, "configs") else kernel
        if hasattr(kernel, "configs") and "HEAD_DIM" in fix:  # the kernel's own pruning
            configs = kernel.early_config_prune(configs, fix)
        for cfg in configs:
            consts = {**fix, **cfg.kwargs}
            # (a float argument as torch.compile's Inductor types a Python float: fp64, where a
            # plain launch gives fp32; the kernels cast it to fp32 first, so both compile alike)
            sig = {p.name: "constexpr" if p.is_constexpr else "*" + ptrs[p.name]
                   if p.name in ptrs else "fp64" if "scale" in p.name else "i32"
                   for p in jit.params}
            what = ", ".join(f"{k}={v}" for k, v in cfg.kwargs.items()) + \
                f" w{cfg.num_warps} s{cfg.num_stages}"
            case = ", ".join(f"{k}={v}" for k, v in fix.items() if not k.startswith("BLOCK")) + \
                f" {[v for v in ptrs.values() if v not in ('fp32', 'i64')][:1] or ['fp32']}"
            try:
                c = triton.compile(triton.compiler.ASTSource(fn=jit, signature=sig,
                                                             constexprs=consts),
                                   target=GPUTarget("cuda", cc, 32),
                                   options=dict(num_warps=cfg.num_warps,
                                                num_stages=cfg.num_stages))
                shared, err, limit = c.metadata.shared, "", SMEM.get(cc, SMEM[90])
                if shared > limit:
                    err = f"shared memory {shared} B over the {limit} B of sm_{cc}"
            except Exception as e:  # the compiler's message, first line
                shared, err = None, f"{type(e).__name__}: {str(e).strip().splitlines()[0][:200]}"
            rows.append((name, case, what, shared, err))
    return rows


def markdown(dev, res, small) -> str:
    import triton
    memory, attention, checks, steps = (res.get(k, []) for k in ("memory", "attention", "checks",
                                                                 "steps"))
    name = torch.cuda.get_device_name() if dev == "cuda" else "CPU"
    out = ["# kernels/bench.py report", "",
           f"Device: **{name}**; torch {torch.__version__}, triton {triton.__version__}, "
           f"{'bf16' if dev == 'cuda' else 'fp32'}." + (
               "" if dev == "cuda" else " **A dry run on a CPU at small shapes: not a GPU "
               "figure.**")]
    if "calibrate" in res:
        out += ["", "## The machine", "", *res["calibrate"]]
    if "attention" in res:  # (the sections run: --only runs one)
        out += [
            "", "## Attention (TFLOP/s)", "",
            "The TMA column: " + ("loads through tensor descriptors." if hasattr(
                triton.language, "make_tensor_descriptor") else "this Triton has no tensor "
                "descriptors, so it repeats the pointer loads."), "",
            "| N | heads | pass | " + " | ".join(f"ours{x}" for x in OURS) + " | "
            + " | ".join(_backends(attention)) + " | ours (best) / best SDPA |",
            "|---|---|---|" + "---|" * (len(OURS) + len(_backends(attention))) + "---|"]
        for N, H, what, r in attention:
            sdpa = {k: v for k, v in r.items() if not k.startswith("ours")}
            best = max(sdpa.values()) if sdpa else None
            ours = max((v for k, v in r.items() if k.startswith("ours")), default=None)
            ratio = f"{ours / best:.2f}" if ours and best else "-"
            cells = [str(N), str(H), what] + [_f(r.get(f"ours{x}")) for x in OURS]
            cells += [_f(r.get(b)) for b in _backends(attention)] + [ratio]
            out.append("| " + " | ".join(cells) + " |")
        floors = ", ".join(f"{k} {v:.0f} µs" for k, v in res.get("floors", {}).items())
        if floors:
            out += ["", "Forward + backward with next to no work (B = H = 1, N = 16), what a call "
                    f"costs before any arithmetic: {floors}."]
        out += ["", "Error against SDPA in a wider dtype (relative, 2-norm), ours as autotuned "
                "beside SDPA's own choice in the same dtype:", "", "| N | what | output | dqkv |",
                "|---|---|---|---|"]
        out += [f"| {N} | {what} | {o:.1e} | {g:.1e} |" for N, what, o, g in checks]
    if "memory" in res:
        out += ["", "## Memory kernels (GB/s)", "",
                "| what | ours | twin | twin, compiled | ours, fraction of HBM peak |",
                "|---|---|---|---|---|"]
        out += [f"| {w} | {_f(o)} | {_f(t)} | {_f(c)} | {'-' if not p else f'{100 * p:.0f}%'} |"
                for w, o, t, c, p in memory]
    if "steps" in res:
        title = "Training step (tiny, small shapes)" if small else \
            "ViT-B training step (mid fusion S = 2, shared decoder, batch 64, bf16)"
        out += ["", f"## {title}", "", "| --kernels | mode | clips/s | MFU | peak memory (GB) |",
                "|---|---|---|---|---|"]
        out += [f"| {b} | {m} | {_f(c)} | {'-' if mfu is None else f'{100 * mfu:.1f}%'} | "
                f"{mem if isinstance(mem, str) else _f(mem)} |" for b, m, c, mfu, mem, *_ in steps]
        out += ["", f"torch.compile of the training step: {res.get('fullgraph', 'not run')}"]
        out += profiles(steps, dev, res.get("top", False))
    if "memory" in res or "attention" in res:
        out += ["", "kernels.MEASURED_FASTER entry these figures support: "
                f"{suggest(dev, memory, attention, checks)}"]
    out += ["", "Seconds per section (with compiling and autotuning): " + ", ".join(
                f"{k} {v:.0f}" for k, v in res.get("seconds", {}).items()) + ".", ""]
    return "\n".join(out)


def profiles(steps, dev, top: bool = False) -> list:
    """The step rows' torch.profiler figures as a table: each kind's share of the device time
    (KINDS, by kernel name), and how busy the device was; with `top` (--profile), each row's top
    kernels and the attention op that ran at each sequence length."""
    got = [(b, m, p) for b, m, *_, p in steps if p and p.get("share")]
    if not got:
        return []
    kinds = [k for k, _ in KINDS] + ["other"]
    what = "device" if dev == "cuda" else "CPU (a dry run: op names, not kernels)"
    out = ["", f"Where the step's {what} time goes (torch.profiler, {got[0][2]['steps']} steps "
           "after the timing; by kernel name, the first kind whose pattern matches: "
           "`kernels/bench.py KINDS`):", "",
           "| --kernels | mode | " + " | ".join(kinds) + " | device busy |",
           "|---|---|" + "---|" * (len(kinds) + 1)]
    for b, m, p in got:
        busy = f"{p['busy']:.0%}" if "busy" in p else "-"
        out.append(f"| {b} | {m} | " + " | ".join(f"{p['share'].get(k, 0):.0%}" for k in kinds)
                   + f" | {busy} |")
    for b, m, p in got if top else ():
        unit = "kernel" if dev == "cuda" else "op (CPU)"
        out += ["", f"Top {len(p['top'])} {unit}s of the step (--kernels {b}, {m}): share of the "
                "profiled time, calls, and TFLOP/s (matmuls, attention) or GB/s (the rest: inputs "
                "read and an output written) from the op that launched each:", "",
                f"| {unit} | share | calls | TFLOP/s | GB/s |", "|---|---|---|---|---|"]
        out += [f"| `{name[:70]}` | {share:.1%} | {calls} | {_f(tf)} | {_f(gb)} |"
                for name, share, calls, tf, gb in p["top"]]
        out += ["", "Attention by sequence length (which op ran: SDPA's backend, or ours): "
                + "; ".join(f"{N}: {', '.join(v)}" for N, v in p["attention"].items())]
    return out


def _backends(attention):
    seen = []
    for *_, r in attention:
        seen += [k for k in r if not k.startswith("ours") and k not in seen]
    return seen


def _f(x):
    return "-" if x is None else f"{x:.1f}" if x >= 10 else f"{x:.2f}"


def bench_cavmae(repo: str, site: str | None, dev: str, B: int, reps: int) -> dict:
    """Our --variant cavmae against the authors' model (src/models/cav_mae.py of a CAV-MAE checkout,
    with the timm their users install in `site`) at the published shapes: 1024 x 128 audio, one 224
    RGB frame, 75% masking, 512 x 8 x 16 decoder, loss with contrast 0.01. One training step each
    (forward, backward, AdamW) on the same inputs, fp32 on a CPU, bf16 autocast on a GPU."""
    import io

    import numpy as np
    import train
    if not os.path.isfile(os.path.join(repo, "src", "models", "cav_mae.py")):
        sys.exit(f"--cavmae {repo}: no src/models/cav_mae.py there (give a CAV-MAE checkout, or a "
                 f"folder holding its src/)")
    if site and not os.path.isdir(os.path.join(site, "timm")):
        sys.exit(f"--site {site}: no timm there (pip install --no-deps --target {site} "
                 f"timm==0.4.5)")
    sys.path[:0] = ([site] if site else []) + [os.path.join(repo, "src")]
    np.float = float  # their pos_embed.py uses an alias numpy 1.24 removed (the model is untouched)
    with contextlib.redirect_stdout(io.StringIO()):
        from models.cav_mae import CAVMAE
        theirs = CAVMAE(audio_length=1024, norm_pix_loss=True).to(dev)
    model_cfg, _ = train.parse_args(["--variant", "cavmae", "--size", "base", "--kernels", "auto"])
    ours = avmae.AVMAE(model_cfg).to(dev)
    g = torch.Generator().manual_seed(0)
    a, v = torch.randn(B, 1024, 128, generator=g).to(dev), torch.rand(B, 3, 224, 224,
                                                                      generator=g).to(dev)
    steps = {"ours": lambda: ours(a=a, v=v.unsqueeze(2))["loss"],
             "authors": lambda: theirs(a, v, 0.75, 0.75, mae_loss_weight=1.0,
                                       contrast_loss_weight=0.01)[0]}
    rows = {}
    for name, model in (("ours", ours), ("authors", theirs)):
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

        def step():
            with torch.autocast(dev, torch.bfloat16, enabled=dev == "cuda"):
                loss = steps[name]()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        step()
        trained = sum(p.numel() for p in model.parameters() if p.grad is not None)
        rows[name] = dict(seconds=timeit(step, reps),
                          trainable=sum(p.numel() for p in model.parameters() if p.requires_grad),
                          trained=trained)
    for r in rows.values():
        r["clips_per_s"] = B / r["seconds"]
    rows["ratio"] = rows["ours"]["clips_per_s"] / rows["authors"]["clips_per_s"]
    return rows


def writable(path: str, flag: str) -> str:
    """An output file's folder made and the file opened once, before minutes of measuring: or
    one line saying why it cannot be written."""
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        open(path, "a").close()
    except OSError as e:
        sys.exit(f"{flag} {path}: cannot write there ({e.strerror}: {e.filename})")
    return path


def loader_speed(args):
    """Loader clips/s (and per core), beside what AV-MAE pretraining needs per second at the same
    shapes on a GPU (its FLOPs per training clip at a given MFU): data or model, which is slower?"""
    import train
    peak = next((p for k, p in train.PEAK_BF16 if k in args.gpu), None)
    if peak is None:
        raise SystemExit(f"--gpu {args.gpu}: no known peak; one of "
                         f"{', '.join(k for k, _ in train.PEAK_BF16)}")
    try:  # (the model whose need is printed beside the rate: refused before the measurement)
        model = avmae.AVMAE(avmae.make_config(args.size, num_frames=args.num_frames,
                                              image_size=args.image_size,
                                              audio_frames=args.audio_frames))
    except ValueError as e:
        raise SystemExit(f"bench --size {args.size}: {e}")
    cfg = data.DataConfig(root=args.root, split=args.split, num_frames=args.num_frames,
                          frame_stride=args.frame_stride, image_size=args.image_size,
                          audio_frames=args.audio_frames, decode=args.decode,
                          video_aug=args.video_aug)
    loader = data.make_loader(cfg, args.batch_size, args.workers)
    if len(loader) == 0:
        raise ValueError(f"{args.root}: {len(loader.dataset)} clips in {args.split}, fewer than "
                         f"--batch_size {args.batch_size}")
    on_gpu = args.decode == "gpu" and torch.cuda.is_available()
    gpu = data.GPUDecoder(loader.dataset) if on_gpu else None
    # the clock starts once 2 batches are in (the workers' start-up); then --batches are timed
    n, t0, i = 0, None, 0
    while i < args.batches + 2:  # as many epochs as it takes
        for batch in loader:
            if gpu:
                batch = gpu(batch)
                torch.cuda.synchronize()
            i += 1
            if i == 2:
                t0 = time.time()
            elif i > 2:
                n += len(batch["id"])
            if i == args.batches + 2:
                break
    rate = n / (time.time() - t0)
    what = {"cpu": "CPU decode", "gpu": "GPU decode" if on_gpu else
            "the worker side of --decode gpu (no CUDA here: JPEG bytes, samples and draws; the "
            "decode, log-mel and augmentation on the device are not counted)"}[args.decode]
    print(f"{rate:.1f} clips/s, {rate / max(1, args.workers):.1f} per worker core ({args.workers} "
          f"workers; {what}; {args.num_frames} x {args.image_size}^2 frames at stride "
          f"{args.frame_stride:g}, video_aug {args.video_aug}, {args.audio_frames} log-mel "
          f"frames, batch {args.batch_size})")
    per_clip = model.flops()["train"]
    need = peak * args.mfu / per_clip
    cores = args.cores or max(1, args.workers)  # (0 workers: the main process's core)
    verdict = "data-bound" if rate / max(1, args.workers) * cores < need else "model-bound"
    print(f"AV-MAE pretraining, ViT-{args.size}, these shapes: {per_clip / 1e9:.0f} GFLOP per "
          f"training clip; one {args.gpu} at {args.mfu:.0%} MFU needs {need:.0f} clips/s; "
          f"{cores} cores at this rate give {rate / max(1, args.workers) * cores:.0f}: "
          f"{verdict}")




def loader_main(argv):
    """`python kernels/bench.py loader ...`: the loader's clips/s on a prepared set."""
    pn = data.Parser(prog="bench.py loader", description=loader_speed.__doc__)
    pn.add_argument("--root", default="data/builtin")
    pn.add_argument("--split", default="train")
    pn.add_argument("--workers", type=data.at_least(0), default=data.cores_per_rank())
    pn.add_argument("--batch_size", type=data.at_least(1), default=32)
    pn.add_argument("--batches", type=data.at_least(1), default=20)
    pn.add_argument("--num_frames", type=data.at_least(1), default=16)
    pn.add_argument("--frame_stride", type=data.above_zero(), default=4)
    pn.add_argument("--image_size", type=data.at_least(16), default=224)
    pn.add_argument("--audio_frames", type=data.at_least(16), default=800)
    pn.add_argument("--decode", choices=["cpu", "gpu"], default="cpu")
    pn.add_argument("--video_aug", choices=["none", "finetune", "rrc"], default="none",
                    help="none: pretraining's crop; finetune: finetuning's jitter, flip and colour")
    pn.add_argument("--size", default="base", choices=list(avmae.SIZES),
                    help="the model whose need is printed beside")
    pn.add_argument("--gpu", default="H100", help="whose bf16 peak sets the need")
    pn.add_argument("--mfu", type=data.above_zero(1), default=0.45)
    pn.add_argument("--cores", type=data.at_least(0), default=0, help="cores per GPU to scale to "
                    "(16: an H100 node's share); default: --workers")
    args = pn.parse_args(argv)
    try:
        loader_speed(args)
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"{e} (the loader bench measures a prepared set: --root)")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["loader"]:
        return loader_main(argv[1:])
    p = data.Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--report", default="bench.md", help="the markdown report to write")
    p.add_argument("--only", choices=["calibrate", "memory", "attention", "step"])
    p.add_argument("--batch", type=data.at_least(1), default=64, help="clips per GPU (512 over 8)")
    p.add_argument("--smoke", action="store_true",
                   help="tiny shapes and one repetition (a check that it runs)")
    p.add_argument("--json", help="also write the rows here")
    p.add_argument("--modes", nargs="+", choices=["eager", "compiled"],
                   default=["eager", "compiled"], help="the training step's modes (compiled: on "
                   "a GPU only; after a fix to a compiled path, `--only step --modes compiled`)")
    p.add_argument("--backends", nargs="+", choices=["torch", "auto", "triton"],
                   default=["torch", "auto", "triton"], help="the training step's kernel sets "
                   "(after a fix to one: `--only step --modes compiled --backends triton`)")
    p.add_argument("--profile", action="store_true", help="the training step's rows only "
                   "(unless --only says otherwise), each with its top 30 kernels (share of the "
                   "step, TFLOP/s or GB/s) and the attention op that ran at each length")
    p.add_argument("--cavmae", metavar="REPO", help="time --variant cavmae against the authors' "
                   "model in this CAV-MAE checkout (nothing else is run)")
    p.add_argument("--site",
                   help="with --cavmae: a folder holding the timm they pin (pip install --target)")
    p.add_argument("--compile", type=data.at_least(80), metavar="CC", help="compile every kernel "
                   "and config for compute capability CC (90: H100; the kernels' bf16 tensor-core "
                   "dots need 80 or more) without a GPU; nothing else is run")
    a = p.parse_args(argv)
    if a.site and not a.cavmae:
        p.error("--site goes with --cavmae (the timm that the authors' model code imports)")
    if a.json:
        writable(a.json, "--json")
    if not (a.compile or a.cavmae):
        writable(a.report, "--report")
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    if a.compile:
        if kernels.INTERPRET:
            sys.exit("--compile: unset TRITON_INTERPRET (it compiles for the GPU, not the CPU)")
        rows = compile_check(a.compile, full=not a.smoke)
        bad = [r for r in rows if r[4]]
        for r in rows:
            print(f"{r[0]:<26} {r[1]:<40} {r[2]:<36} {'-' if r[3] is None else r[3]:>7} B  "
                  f"{r[4] or 'ok'}")
        print(f"{len(rows) - len(bad)} of {len(rows)} compiled for sm_{a.compile}")
        if a.json:
            with open(a.json, "w") as f:
                json.dump(rows, f, indent=1)
        sys.exit(1 if bad else 0)
    if a.cavmae:
        B = 4 if dev == "cpu" and a.batch == 64 else a.batch
        rows = bench_cavmae(a.cavmae, a.site, dev, B, 3 if dev == "cpu" else 20)
        name = torch.cuda.get_device_name() if dev == "cuda" else "cpu"
        o, t = rows["ours"], rows["authors"]
        print(f"CAV-MAE base, batch {B}, {name}, torch {torch.__version__}: ours "
              f"{o['clips_per_s']:.2f} clips/s, authors' {t['clips_per_s']:.2f} clips/s, ratio "
              f"{rows['ratio']:.2f}x; trainable parameters: ours {o['trainable']:,}, authors' "
              f"{t['trainable']:,} ({t['trained']:,} with a gradient)")
        return rows
    small = a.smoke or dev == "cpu"
    global REPS
    REPS = 2 if small else REPS
    B = 2 if small else a.batch
    print(f"device: {torch.cuda.get_device_name() if dev == 'cuda' else 'cpu'}; "
          f"{'kernels and twins' if run_ours(dev) else 'twins only (no GPU, no interpreter)'}",
          flush=True)
    res = dict(seconds={}, top=a.profile)
    a.only = a.only or ("step" if a.profile else None)

    def save():  # after each section: a run stopped at a time limit keeps what it measured
        text = markdown(dev, res, small)
        with open(a.report, "w") as f:
            f.write(text)
        if a.json:
            with open(a.json, "w") as f:
                json.dump(res, f, indent=1, default=str)
        return text

    def step_row(rows, graphs):  # each step row as it comes
        res.update(steps=rows, fullgraph=graphs or "not compiled yet")
        save()
    sections = dict(calibrate=lambda: dict(calibrate=calibrate(dev, small)),
                    memory=lambda: dict(memory=bench_memory(dev, B, small)),
                    attention=lambda: dict(zip(("attention", "checks", "floors"),
                                               bench_attention(dev, B, small))),
                    step=lambda: dict(zip(("steps", "fullgraph"),
                                          bench_step(dev, small, step_row, a.modes,
                                                     a.backends))))
    for name, fn in sections.items():
        if a.only == name or a.only is None and name != "calibrate":
            t0 = time.perf_counter()
            res.update(fn())
            res["seconds"][name] = time.perf_counter() - t0
            print(f"{name}: {res['seconds'][name]:.0f} s", flush=True)
            save()
    print(save())
    return res


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:  # (a --report keeps the sections it finished)
        sys.exit("bench.py: stopped by Ctrl-C")
