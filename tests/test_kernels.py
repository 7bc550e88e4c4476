"""kernels/: every Triton kernel equals its torch twin, forward and backward, here on the CPU
through Triton's interpreter (fp32 and fp16; the interpreter's bf16 is broken) at ragged shapes. The
bf16 checks at the paper's shapes are in test_kernels_gpu.py and need a GPU."""
import json
import math
import re
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import avmae
import kernels
from conftest import REFUSED, tiny_batch, tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = pytest.mark.skipif(
    not (kernels.HAVE_TRITON and kernels.INTERPRET),
    reason=REFUSED or "needs triton and TRITON_INTERPRET=1 set before it is imported (conftest "
    "does where there is no GPU)")
FAST = kernels.FAST if kernels.HAVE_TRITON else {}
TOL = {torch.float32: 1e-5, torch.float16: 2e-3}


def grads(y, inputs, g):
    return torch.autograd.grad(y, [t for t in inputs if t.requires_grad], g)


def close(a, b, tol):
    assert a.dtype == b.dtype and a.shape == b.shape
    assert (a.float() - b.float()).abs().max().item() <= tol * max(1.0,
                                                                   b.float().abs().max().item())


def _perm_ids(B, N, K, seed=0):
    g = torch.Generator().manual_seed(seed)
    perm = torch.stack([torch.randperm(N, generator=g) for _ in range(B)])
    return perm[:, :K].contiguous(), perm[:, K:].contiguous()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("B,N,C,K", [(3, 37, 40, 11), (2, 50, 96, 5)])
def test_gather(dtype, B, N, C, K):
    keep, _ = _perm_ids(B, N, K)
    x = torch.randn(B, N, C, dtype=dtype, requires_grad=True)
    # positions stay fp32: the output is promoted, as in torch
    table = torch.randn(N, C, requires_grad=True)
    for args in [(x, keep), (x, keep, table), (table, keep)]:
        y, r = FAST["gather"](*args), avmae.gather_tokens(*args)
        close(y, r, 0)  # a copy (and one add) is exact
        g = torch.randn_like(r)
        for a, b in zip(grads(y, args, g), grads(r, args, g)):
            close(a, b, TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("B,N,K,D", [(3, 37, 11, 24), (2, 64, 7, 40)])
def test_assemble_and_unshuffle(dtype, B, N, K, D):
    keep, drop = _perm_ids(B, N, K)
    x = torch.randn(B, K, D, dtype=dtype, requires_grad=True)
    tok = torch.randn(D, requires_grad=True)
    pos = torch.randn(N, D, requires_grad=True)  # learned positions: their gradient is checked too
    # inpainting: context positions from another table
    other = torch.randn(N + 5, D, requires_grad=True)
    cases = [("assemble", (x, pos, tok, pos, keep, drop)),
             ("assemble", (x, other, tok, pos, keep, drop)),
             ("unshuffle", (x, tok, pos, keep, drop))]
    for name, args in cases:
        y, r = FAST[name](*args), getattr(avmae, name)(*args)
        close(y, r, 1e-6)
        g = torch.randn_like(r)
        for a, b in zip(grads(y, args, g), grads(r, args, g)):
            close(a, b, 1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("norm_pix", [False, True])
@pytest.mark.parametrize("P", [48, 100])
def test_recon_loss(dtype, norm_pix, P):
    B, N, K = 3, 30, 9
    _, drop = _perm_ids(B, N, K)
    pred = torch.randn(B, N - K, P, dtype=dtype, requires_grad=True)
    patches = (torch.randn(B, N, P) * 3 + 1).to(dtype)
    y, r = FAST["loss"](pred, patches, drop, norm_pix), avmae.recon_loss(pred, patches, drop,
                                                                         norm_pix)
    assert y.dtype == r.dtype == torch.float32
    close(y, r, 1e-5)
    close(torch.autograd.grad(y, pred)[0], torch.autograd.grad(r, pred)[0], TOL[dtype])


def _qkv(B, N, H, d, dtype, seed=0):
    """q, k, v as the model makes them: strided views of one (B, N, 3, H, d) projection."""
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(B, N, 3, H, d, generator=g).to(dtype).requires_grad_()
    return qkv, qkv.permute(2, 0, 3, 1, 4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("N,d", [(17, 32), (40, 64), (33, 16), (9, 128)])
def test_attention(dtype, N, d):
    qkv, (q, k, v) = _qkv(2, N, 3, d, dtype)
    ref = F.scaled_dot_product_attention(*(t.float() for t in (q, k, v)))  # in fp32
    g = torch.randn_like(ref)
    (dr,) = torch.autograd.grad(ref, qkv, g)
    # the model's packed qkv (one packed gradient), and at one shape separate (B, H, N, d) views
    # of it (the same kernels with other strides: the interpreter's time goes to the other shapes)
    for args in [(qkv,), (q, k, v)][:2 if N == 40 else 1]:
        y = FAST["attention"](*args)
        assert y.shape == ref.shape and y.dtype == dtype
        close(y.float(), ref, TOL[dtype])
        (dy,) = torch.autograd.grad(y, qkv, g.to(dtype))
        close(dy.float(), dr.float(), 4 * TOL[dtype])
        # the output is laid out (B, N, H, d): the model's transpose-reshape needs no copy
        assert y.transpose(1, 2).is_contiguous()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_attention_forward_through_tensor_descriptors(dtype, monkeypatch):
    # the option for Hopper's TMA loads: the same output and log-sum-exp as the pointer loads, the
    # ragged last blocks zero-filled by the descriptor; a view that is not 16-byte aligned falls
    # back to the pointer loads
    qkv, (q, k, v) = _qkv(2, 40, 3, 32, dtype)
    ref = kernels.attention._attention_qkv(qkv)
    monkeypatch.setattr(kernels.attention, "FWD_TMA", True)
    import triton.language as tl
    if not hasattr(tl, "make_tensor_descriptor"):  # (the kernel then falls back by itself)
        pytest.skip("this Triton has no tensor descriptors")
    assert kernels.attention._tma_ok(q, k, v)
    got = kernels.attention._attention_qkv(qkv)
    # bit-equal in fp16; in fp32 within an ulp or two: the interpreter's tl.dot is numpy's matmul,
    # and OpenBLAS may sum the descriptor's transposed K tile in another order (seen on an AMD EPYC)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-6 if dtype == torch.float32 else 0,
                                   atol=1e-6 if dtype == torch.float32 else 0)
    close(got[0].float(), F.scaled_dot_product_attention(q.float(), k.float(), v.float()),
          TOL[dtype])
    odd = torch.randn(2, 3, 17, 32 + 1).to(dtype)[..., 1:]  # rows of 33 elements
    assert not kernels.attention._tma_ok(odd, odd, odd)
    close(FAST["attention"](odd, odd, odd).float(),
          F.scaled_dot_product_attention(*(odd.float(),) * 3), TOL[dtype])


def _hard_case(kind, dtype, B=2, H=2, N=40, d=32):
    g = torch.Generator().manual_seed(3)
    if kind == "peaked":  # scores ~ 36 sqrt(d) / sqrt(d): the online max must hold
        q, k, v = (torch.randn(B, H, N, d, generator=g) * s for s in (6.0, 6.0, 1.0))
    else:  # every score about -160 (lse ~ -225 in log2 units): a zero-filled key past N scores 0,
        # and its unmasked p = 2^225 overflows (inf * 0 = nan in dq)
        u = F.normalize(torch.randn(d, generator=g), dim=0) * 30.0
        k = u + 0.1 * torch.randn(B, H, N, d, generator=g)
        q, v = -u + 0.1 * torch.randn(B, H, N, d, generator=g), torch.randn(B, H, N, d, generator=g)
    return tuple(t.to(dtype).requires_grad_() for t in (q, k, v)), g


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("kind", ["peaked", "far"])
@pytest.mark.parametrize("atomic", [False, True], ids=["split", "atomic_dq"])
# the far case overflows in the rows past N, which are computed and never stored (the interpreter
# runs numpy, which says so)
@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning",
                            "ignore:invalid value encountered:RuntimeWarning")
def test_attention_hard_cases(dtype, kind, atomic, monkeypatch):
    """A peaked softmax, and scores so negative that an unmasked padded key overflows; q / k / v
    gradients each on its own, the rows of the ragged last block by max-abs, and the saved
    log-sum-exp (log2 units); both backward forms (split, and dq by atomics)."""
    monkeypatch.setattr(kernels.attention, "DQ_ATOMIC", atomic)
    B, H, N, d = 2, 2, 40, 32
    (q, k, v), g = _hard_case(kind, dtype, B, H, N, d)
    y, lse = kernels.attention._attention(q, k, v)
    qf, kf, vf = (t.detach().float().requires_grad_() for t in (q, k, v))
    ref = F.scaled_dot_product_attention(qf, kf, vf)
    scores = qf @ kf.transpose(-1, -2) / d ** 0.5
    if kind == "peaked":
        assert torch.softmax(scores, -1).amax(-1).mean() > 0.9  # really peaked
    else:
        assert scores.max() < -100
    # scores of size 160 carry fp32 rounding of ~2e-5 into the softmax: 4x the tolerance there
    tol = TOL[dtype] * (1 if kind == "peaked" else 4)
    close(y.float(), ref, tol)
    tail = slice(32, N)  # the rows past the last whole block of 32 (and of 16)
    assert (y.float()[:, :, tail] - ref[:, :, tail]).abs().max() <= tol * max(
        1.0, ref.abs().max().item())
    close(lse.view(B, H, N) * math.log(2), torch.logsumexp(scores, -1).detach(), tol * 10)
    dout = torch.randn(B, H, N, d, generator=g)
    got = torch.autograd.grad(y, (q, k, v), dout.to(dtype))
    want = torch.autograd.grad(ref, (qf, kf, vf), dout)
    for name, a, b in zip("qkv", got, want):  # each gradient on its own scale
        assert torch.isfinite(a).all(), f"d{name}"
        assert (a.float() - b).abs().max() <= 8 * tol * max(1.0, b.abs().max().item()), f"d{name}"


def test_attention_kernels_write_whole_buffers_never_views(monkeypatch):
    # torch.compile's Inductor copies a view that a user kernel writes into a buffer of its own and
    # back; for the three slot views of one packed dqkv, torch 2.11's copy read past its source (an
    # illegal memory access in the compiled training step on an H200). So every tensor an attention
    # kernel writes (the output, the log-sum-exp, delta, the packed gradient, the atomic dq) is a
    # whole buffer, and the kernels find the slots by stride. Both entry points, both backwards.
    written = dict(_attn_fwd={"O", "LSE"}, _attn_bwd_delta={"DELTA"},
                   _attn_bwd_dkdv={"DQKV", "DQACC"}, _attn_bwd_dq={"DQKV"})
    seen = []
    real = kernels.attention.wrap_triton

    def recording(kernel):
        jit = kernel.fn if hasattr(kernel, "configs") else kernel  # (an Autotuner's kernel)

        class Launch:
            def __getitem__(self, grid):
                def run(*args, **kw):
                    seen.extend((jit.fn.__name__, n, a._base is None and a.storage_offset() == 0)
                                for n, a in zip(jit.arg_names, args)
                                if n in written[jit.fn.__name__])
                    return real(kernel)[grid](*args, **kw)
                return run
        return Launch()
    monkeypatch.setattr(kernels.attention, "wrap_triton", recording)
    for atomic in (False, True):
        monkeypatch.setattr(kernels.attention, "DQ_ATOMIC", atomic)
        qkv = torch.randn(2, 37, 3, 2, 16, requires_grad=True)
        q, k, v = (torch.randn(2, 2, 37, 16, requires_grad=True) for _ in range(3))
        for out, inputs in ((kernels.attention.attention(qkv), (qkv,)),
                            (kernels.attention.attention(q, k, v), (q, k, v))):
            got = torch.autograd.grad(out.square().sum(), inputs)
            twins = [t.detach().requires_grad_() for t in inputs]
            want = torch.autograd.grad(avmae.attention(*twins).square().sum(), twins)
            for a, b in zip(got, want):  # (the slots found by stride: still the right gradients)
                close(a, b, TOL[torch.float32])
    assert {(k, n) for k, n, _ in seen} == {(k, n) for k, ns in written.items() for n in ns}
    assert all(whole for *_, whole in seen), [(k, n) for k, n, whole in seen if not whole]


@pytest.mark.parametrize("variant", [
    dict(), dict(encoder="early", objective="inpaint_v"), dict(decoder_layout="unshuffle",
                                                               norm_pix_loss=True),
    dict(encoder="mid", decoder="separate", objective="inpaint_both", inpaint_layout="masked",
         pos_embed="learned"),
], ids=["mid-shared", "early-inpaint_v", "unshuffle-normpix", "inpaint_both-masked-learned"])
@pytest.mark.slow(3)
def test_model_step_with_kernels_equals_the_twins(variant):
    # two encoder layers (one joint in mid fusion), one decoder layer and two heads (of 32) take
    # every path that four layers, two and four heads do; the interpreter's time goes with the
    # layers and the heads (4 -> 2 heads: 25 s -> 11 s for the four cases)
    small = dict(depth=2, joint_layers=1, dec_depth=1, heads=2, dec_heads=2)
    fast, twin = (avmae.AVMAE(tiny_config(kernels=k, **small, **variant))
                  for k in ("triton", "torch"))
    twin.load_state_dict(fast.state_dict())
    x = tiny_batch(fast.cfg)
    masks = fast.sample_masks(2)
    of, ot = fast(**x, masks=masks), twin(**x, masks=masks)
    assert set(of) == set(ot)
    for k in of:
        if of[k].is_floating_point():
            assert torch.allclose(of[k], ot[k], atol=1e-5, rtol=1e-4), k
    of["loss"].backward()
    ot["loss"].backward()
    for (n, pf), pt in zip(fast.named_parameters(), twin.parameters()):
        assert torch.allclose(pf.grad, pt.grad, atol=1e-5, rtol=1e-3), n


def test_backend_is_chosen_per_op_and_unsupported_inputs_go_to_the_twin(monkeypatch):
    calls = []
    monkeypatch.setitem(kernels.FAST, "attention",
                        lambda *a: calls.append(1) or avmae.attention(*a))
    q = torch.randn(1, 2, 5, 16)
    avmae.get_ops("auto")["attention"](q, q, q)  # nothing measured faster here: SDPA
    assert calls == [] and avmae.get_ops("auto")["gather"] is avmae.gather_tokens
    avmae.get_ops("triton")["attention"](q, q, q)  # the interpreter runs it on CPU tensors
    assert calls == [1]
    q48 = torch.randn(1, 2, 5, 48)  # a head dim the kernel does not take: the twin, no assert
    out = avmae.get_ops("triton")["attention"](q48, q48, q48)
    assert calls == [1] and torch.allclose(out, avmae.attention(q48, q48, q48))
    # "measured faster on every GPU"
    monkeypatch.setitem(kernels.MEASURED_FASTER, "", ("attention",))
    assert avmae.get_ops("auto")["gather"] is avmae.gather_tokens
    avmae.get_ops("auto")["attention"](q, q, q)  # a CPU tensor without 'triton': still the twin
    assert calls == [1]
    # "measured faster at head dim 16 only": other head dims go to the twin (a kernel that runs on
    # these CPU tensors stands in for a GPU)
    monkeypatch.setitem(kernels.MEASURED_FASTER, "", ("attention/16",))
    assert avmae.get_ops("auto")["attention"] is not avmae.attention
    op = kernels.pick(kernels.FAST["attention"], avmae.attention, True, kernels.SUPPORTS[
        "attention"], {16})
    q32 = torch.randn(1, 2, 5, 32)
    op(q, q, q), op(q32, q32, q32), op(torch.randn(1, 5, 3, 2, 16))  # (the packed form: 16)
    assert calls == [1, 1, 1]


def test_auto_on_an_h200_takes_the_kernels_measured_faster_there(monkeypatch):
    # the H200 report: unshuffle and loss beat their compiled twins; gather, assembly and
    # attention lost. A GPU without an entry (an H100 is not an H200) keeps every twin
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for gpu, fast in [("NVIDIA H200", {"unshuffle", "loss"}), ("NVIDIA H100 80GB HBM3", set())]:
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None, g=gpu: g)
        ops = avmae.get_ops("auto")
        assert {k for k, op in ops.items() if op is not avmae.OPS_TORCH[k]} == fast, gpu
    assert avmae.get_ops("auto")["attention"] is avmae.attention


def test_importing_kernels_does_not_import_the_model():
    # kernels/ stands below the model: it imports torch and triton, never the project's scripts
    # (read from the source: a fresh interpreter importing torch costs seconds)
    import ast
    ours = {"avmae", "data", "train", "finetune"}
    for name in sorted(os.listdir(os.path.join(ROOT, "kernels"))):
        if name.endswith(".py") and name != "bench.py":  # (bench.py is a script: it times models)
            tree = ast.parse(open(os.path.join(ROOT, "kernels", name)).read())
            found = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import)
                     for a in n.names}
            found |= {(n.module or "").split(".")[0] for n in ast.walk(tree)
                      if isinstance(n, ast.ImportFrom) and not n.level}
            assert not found & ours, (name, found & ours)


COMPILE_CHECK = """
import sys
sys.path[:0] = [ROOT, ROOT + "/tests"]
import torch, avmae, kernels
from conftest import REFUSED, tiny_batch, tiny_config
from torch._functorch.aot_autograd import aot_module_simplified
avmae.get_ops = lambda name: kernels.FAST  # every step through its Triton kernel, even on a CPU
backwards = []
for mod, name in [(kernels.attention, "_attention_qkv_bwd"), (kernels.loss, "_loss_backward_op"),
                  (kernels.gather, "_scatter")]:
    real = getattr(mod, name)
    setattr(mod, name, lambda *a, _real=real, _n=name: backwards.append(_n) or _real(*a))
# (two encoder layers, one joint, and one decoder layer take every path: less to trace)
model = avmae.AVMAE(tiny_config(norm_pix_loss=True, depth=2, joint_layers=1, dec_depth=1))
x, masks = tiny_batch(model.cfg), model.sample_masks(2)
graphs = {}

class Traced(Exception):
    pass

def forward_compiler(gm, example_inputs):  # the kernels cannot launch on a CPU: stop once traced
    graphs["aot_forward"] = gm
    def run(*args):
        raise Traced
    return run

def backend(gm, example_inputs):
    graphs["dynamo"] = gm
    return aot_module_simplified(gm, example_inputs, fw_compiler=forward_compiler,
                                 bw_compiler=lambda g, e: g)

step = torch.compile(lambda a, v: model(a=a, v=v, masks=masks)["loss"], backend=backend,
                     fullgraph=True)
try:
    step(x["a"], x["v"])
except Traced:
    pass
ops = sorted({str(n.target) for n in graphs["dynamo"].graph.nodes
              if str(n.target).startswith("avmae.")})
wrapped = sum("triton_kernel_wrapper" in str(n.target) for n in graphs["aot_forward"].graph.nodes)
print("OPS", ops, "WRAPPED", wrapped, "BACKWARDS", sorted(set(backwards)))
"""


@pytest.mark.slow(20)
def test_training_step_compiles_without_graph_breaks():
    # torch.compile(fullgraph=True) raises at the first graph break. Dynamo must see each kernel as
    # one op (torch.library.triton_op) and AOT autograd must trace their hand-written backwards into
    # the joint graph. Fake-tensor tracing cannot go through the interpreter, so this runs without
    # it, in a fresh process, up to the point where the traced kernels would launch (which needs a
    # GPU: test_kernels_gpu.py runs the compiled step there, both decoder layouts). Without a GPU
    # driver, Triton's mutation analysis falls back to "every argument may be written", which trips
    # AOT's partitioner on the unshuffle layout's graph; the default layout is checked here.
    import os
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    p = subprocess.run([sys.executable, "-c", f"ROOT = {root!r}\n" + COMPILE_CHECK],
                       capture_output=True, text=True, env=env, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    line = next(x for x in p.stdout.splitlines() if x.startswith("OPS"))
    for op in ("avmae.attention_qkv.default", "avmae.gather.default", "avmae.recon_loss.default",
               "avmae.assemble.default"):
        assert op in line
    assert int(line.split("WRAPPED ")[1].split()[0]) > 10
    for bw in ("_attention_qkv_bwd", "_loss_backward_op"):
        assert bw in line.split("BACKWARDS")[1]


@pytest.mark.slow(22)
def test_bench_report_dry_run_and_kernel_rows(tmp_path):
    # the one GPU report command, run on a CPU: the twins at small shapes, saying it is not a GPU
    # figure; run as .ci/gpu runs it (that script is run once, on a GPU lent for minutes: a broken
    # step must show here first), each step's status in its log; its steps' time limits are a
    # GPU's (the jpeg step's 35 s), so they get 8 times as long on a loaded CPU
    out = tmp_path / "out"
    env = {**os.environ, "PYTHON": sys.executable, "STEPS": "report jpeg", "TRITON_INTERPRET": "0",
           "SLACK": "8"}
    p = subprocess.run(["bash", ".ci/gpu", str(out)], cwd=ROOT, capture_output=True, text=True,
                       timeout=540, env=env)
    assert p.returncode == 0, (p.stdout + p.stderr)[-3000:]
    log = (out / "sitting.log").read_text()
    assert "=== report: ok" in log and "=== nvJPEG against libjpeg-turbo: ok" in log, log[-3000:]
    assert "=== GPU tests" not in log and "=== NCCL" not in log  # (not among STEPS)
    text = (out / "bench.md").read_text()
    assert "not a GPU figure" in text and "Device: **CPU**" in text
    assert "next to no work (B = H = 1, N = 16)" in text and " µs" in text  # (per-call floors)
    # 3 lengths x 2 passes, and SDPA's error at each length (ours is not run without a GPU or the
    # interpreter)
    lines = text.splitlines()
    assert sum(x.startswith(("| 17 | 2 |", "| 40 | 2 |", "| 64 | 2 |")) for x in lines) == 6
    sdpa = ("| 17 | SDPA |", "| 40 | SDPA |", "| 64 | SDPA |")
    assert sum(x.startswith(sdpa) for x in lines) == 3
    for row in ("| gather fp32 patches", "| assemble ", "| unshuffle ", "| loss fwd+bwd ",
                "| torch | eager |"):
        assert row in text, row
    # each step row profiled (on a CPU by op name: its matmuls are aten::addmm and the like)
    prof = text.split("Where the step's CPU")[1].splitlines()
    head = prof[2].split(" | ")
    cells = next(x for x in prof if x.startswith("| torch | eager |")).split(" | ")
    assert float(cells[head.index("matmul")].rstrip("%")) > 0
    # under the interpreter the kernels themselves are timed, every memory row with a figure of ours
    sys.path.insert(0, os.path.join(ROOT, "kernels"))
    import bench
    bench.REPS = 1
    rows = bench.bench_memory("cpu", 2, small=True)
    assert [r[0].split()[0] for r in rows] == ["gather", "assemble", "unshuffle", "loss", "loss"]
    assert all(r[1] is not None and r[1] > 0 and r[2] > 0 for r in rows)


def test_autotuning_drops_the_configurations_that_overflow_shared_memory():
    # the sm_90 compiler's figures for fp32 at head dim 128 (python kernels/bench.py --compile 90):
    # these three need 278-303 KB of the 227 KB a block may have; (64, 64, 3 stages) needs 214 KB
    A = kernels.attention
    fix = dict(HEAD_DIM=128, IS_FP32=True)
    dq = A._pruner("N", "M")(A._configs([(128, 32, 4, 5), (32, 64, 4, 5), (64, 32, 4, 4)]), fix)
    dkdv = A._pruner("M", "N")(A._configs([(32, 128, 4, 5), (64, 64, 4, 3), (16, 64, 4, 5)]), fix)
    assert [(c.kwargs["BLOCK_M"], c.num_stages) for c in dq] == [(64, 4)]
    assert [(c.kwargs["BLOCK_M"], c.num_stages) for c in dkdv] == [(64, 3), (16, 5)]
    # bf16 at head dim 64 keeps them all
    bf16 = dict(HEAD_DIM=64, IS_FP32=False)
    assert len(A._pruner("N", "M")(A._configs([(128, 32, 4, 5), (32, 64, 4, 5)]), bf16)) == 2


@pytest.mark.slow(10)
def test_every_kernel_compiles_for_an_h100_without_one(tmp_path):
    # The interpreter runs the kernels' arithmetic, not the GPU compiler: a tl.dot shape or dtype
    # the tensor cores refuse, or a configuration over the shared memory of a block, only shows
    # there. Triton's compiler and ptxas run on any machine, so every kernel is compiled for
    # sm_90 here in every autotuning configuration it may pick (bf16, head dim 64; the full set:
    # python kernels/bench.py --compile 90).
    out = tmp_path / "sm90.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    p = subprocess.run([sys.executable, "kernels/bench.py", "--compile", "90", "--smoke", "--json",
                        str(out)], cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert p.returncode == 0, (p.stdout + p.stderr)[-3000:]
    rows = json.loads(out.read_text())
    assert all(err == "" and 0 <= shared <= 232448 for *_, shared, err in rows)
    names = {r[0] for r in rows}
    assert {"attention fwd", "attention dq", "attention dkdv", "attention dkdv atomic dq",
            "gather", "scatter", "assemble raster=True", "loss bwd norm=True"} <= names
    # each configuration of the GPU's autotuning list (here the interpreter's list has one)
    assert len({r[2] for r in rows if r[0] == "attention fwd"}) >= 4


def test_the_report_suggests_a_kernel_only_where_it_was_no_slower(monkeypatch):
    # --kernels auto takes the entry the GPU report prints: a memory kernel only if no slower than
    # its twin eager and compiled, attention only if one of our forms is no slower than SDPA's
    # best backend at every length (made-up figures; GB/s and TFLOP/s)
    sys.path.insert(0, os.path.join(ROOT, "kernels"))
    import bench
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H100 80GB HBM3")
    memory = [("gather fp32", 2000, 1500, 1900, .6), ("assemble x", 1800, 1000, 1900, .5),
              ("unshuffle x", 1800, 1000, None, .5), ("loss fwd+bwd a", 1500, 900, 1400, .4),
              ("loss fwd+bwd b", 1500, 900, 1600, .4)]
    fast = [(157, 12, "fwd+bwd", {"ours": 330, "ours, dq by atomics": 340, "flash": 320}),
            (1968, 6, "fwd+bwd", {"ours": 400, "flash": 390, "cudnn": 380})]
    entry = bench.suggest("cuda", memory, fast)
    assert entry == "`{'NVIDIA H100 80GB HBM3': ('gather', 'unshuffle', 'attention/64')}`"
    # slower than SDPA at one length as it runs by default; with dq by atomics no slower anywhere:
    # not in the entry (the option is off by default), but said
    slow = [(157, 12, "fwd+bwd", {"ours": 300, "ours, dq by atomics": 340, "flash": 320}),
            (1968, 6, "fwd+bwd", {"ours": 400, "ours, dq by atomics": 410, "flash": 405})]
    entry = bench.suggest("cuda", memory, slow)
    assert entry.split("`")[1] == "{'NVIDIA H100 80GB HBM3': ('gather', 'unshuffle')}"
    assert "with an option on: `ours, dq by atomics`" in entry
    assert bench.suggest("cpu", memory, fast).startswith("none")
    # fast but less accurate than twice SDPA's own error in the same dtype: not suggested
    checks = [(157, "ours", 3e-3, 4e-3), (157, "SDPA", 3e-3, 4e-3), (1968, "ours", 3e-3, 9e-3),
              (1968, "SDPA", 3e-3, 4e-3)]
    assert "attention" not in bench.suggest("cuda", memory, fast, checks)
    checks[2] = (1968, "ours", 3e-3, 7e-3)
    assert "attention/64" in bench.suggest("cuda", memory, fast, checks)


@pytest.mark.slow(4)
def test_the_report_keeps_each_section_as_it_ends(tmp_path, monkeypatch):
    # a report stopped by a time limit (or a crash) in its last section keeps the sections done
    sys.path.insert(0, os.path.join(ROOT, "kernels"))
    import bench

    def stopped(*a):
        raise RuntimeError("stopped")
    monkeypatch.setattr(bench, "bench_step", stopped)
    monkeypatch.setattr(bench, "bench_memory", lambda *a: [("gather fp32 patches", 1, 2, 3, .5)])
    monkeypatch.setattr(bench, "REPS", 1)
    # (one form at one length: the interpreter is slow)
    monkeypatch.setattr(bench, "OURS", {"": (False, False)})
    monkeypatch.setattr(bench, "SMALL_LENGTHS", ((), (17,)))
    out = tmp_path / "bench.md"
    with pytest.raises(RuntimeError, match="stopped"):
        bench.main(["--report", str(out), "--smoke", "--json", str(tmp_path / "b.json")])
    text = out.read_text()
    assert "| gather fp32 patches" in text and "| 17 | 2 | fwd+bwd |" in text
    assert "| 17 | ours |" in text and "| 17 | SDPA |" in text  # the autotuned kernel, checked
    assert "Seconds per section" in text and "attention" in text.split("Seconds per section")[1]
    assert json.loads((tmp_path / "b.json").read_text())["checks"]


def test_attention_is_timed_twice_in_both_orders_on_a_busy_gpu_and_keeps_its_best(monkeypatch):
    # the first GPU report timed each backend once, ours always first, just after its autotuning
    # had left the GPU idle: at the short lengths that favours whoever comes later. Now: every
    # backend runs once, the GPU is kept busy, then two rounds in opposite orders, best kept
    sys.path.insert(0, os.path.join(ROOT, "kernels"))
    import bench
    monkeypatch.setattr(bench, "SMALL_LENGTHS", ((17,), (40,)))
    monkeypatch.setattr(bench, "OURS", {"": (False, False)})
    calls, spins = [], []
    monkeypatch.setattr(bench, "spin", lambda *a: spins.append(len(calls)))
    ours = bench.run_ours("cpu") and "attention" in kernels.FAST  # (under the interpreter)
    per_round = 2 * (2 if ours else 1)  # (forward, forward + backward) x backends

    def timeit(fn, reps=None):  # the first round 2 s a call, the second 1 s: the best is 1 s
        fn()
        calls.append(1)
        return 2.0 if len(calls) - spins[-1] <= per_round else 1.0
    monkeypatch.setattr(bench, "timeit", timeit)
    rows, checks, floors = bench.bench_attention("cpu", 2, small=True)
    names = list(rows[1][3])  # the backends timed (math on a CPU, and ours if interpreted)
    assert len(names) * 2 == per_round
    assert spins == [0, 2 * per_round] and len(calls) == 4 * per_round + len(floors)
    fl = 4 * 2 * 2 * 17 * 17 * 32  # (B, H, N, N, d at the small shapes)
    for name in names:  # the better of its two rounds, whichever came first
        assert rows[0][3][name] == pytest.approx(fl / 1e12)
        assert rows[1][3][name] == pytest.approx(3.5 * fl / 1e12)
    assert set(floors) == set(names) and all(v > 0 for v in floors.values())


@pytest.mark.slow(2)
def test_the_report_times_each_distinct_kernel_set_once_and_says_graph_breaks(monkeypatch):
    sys.path.insert(0, os.path.join(ROOT, "kernels"))
    import bench
    import train
    timed = []

    def fake_bench(model, mcfg, tcfg, d, micro):
        timed.append(mcfg.kernels)
        return dict(clips_per_s=10.0 * len(timed), mfu=None, peak_mem_gb=None)
    monkeypatch.setattr(bench, "step_speed", fake_bench)
    seen = []
    rows, graphs = bench.bench_step("cpu", small=True, on_row=lambda r, g: seen.append(len(r)))
    # with no measured entry for this machine 'auto' is 'torch': reported, not timed again
    assert timed == ["torch", "triton"]
    assert seen == [1, 3]  # the rows so far, after each timing (the report saves them)
    assert [r[0] for r in rows] == ["torch", "auto (= torch: the same ops here)", "triton"]
    assert rows[1][2] == rows[0][2] == 10.0
    # a compile with fullgraph=True that fails is said, and the step timed without it
    calls = []

    def breaks(model, *a):
        calls.append(type(model).__name__)
        if len(calls) == 1:
            raise RuntimeError("graph break in user code\nmore")
        return dict(clips_per_s=1.0)
    monkeypatch.setattr(bench, "step_speed", breaks)
    graphs = []
    model = avmae.AVMAE(tiny_config())
    r = bench._bench_one(train, model, None, None, "cpu", 2, True, "auto", graphs)
    assert r["clips_per_s"] == 1.0 and calls == ["OptimizedModule"] * 2
    assert graphs == ["auto: fullgraph=True failed (RuntimeError: graph break in user code)"]


def test_the_report_times_the_compiled_steps_alone_when_asked(monkeypatch):
    # `--only step --modes compiled [--backends ...]`: the short GPU call after a fix to a
    # compiled path times each kernel set compiled (or the ones named), and no eager step; a CPU
    # compiles none (the GPU is faked here: the model stays on the CPU and each kernel set is its
    # own)
    sys.path.insert(0, os.path.join(ROOT, "kernels"))
    import bench
    timed = []

    def fake_bench(model, mcfg, tcfg, d, micro):
        timed.append((mcfg.kernels, type(model).__name__))
        return dict(clips_per_s=1.0, mfu=None, peak_mem_gb=None)
    monkeypatch.setattr(bench, "step_speed", fake_bench)
    monkeypatch.setattr(torch.nn.Module, "to", lambda self, *a, **k: self)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    twins = avmae.get_ops("torch")  # (each set its own: the twins under another name)
    monkeypatch.setattr(avmae, "get_ops", lambda name, dev=None: {**twins, "set": name})
    rows, _ = bench.bench_step("cuda", small=True, modes=("compiled",))
    assert timed == [(k, "OptimizedModule") for k in ("torch", "auto", "triton")]
    assert [r[:2] for r in rows] == [(k, "compiled") for k in ("torch", "auto", "triton")]
    timed.clear()  # (`--backends triton`: the one kernel set a fix touched)
    assert [r[:2] for r in bench.bench_step("cuda", small=True, modes=("compiled",),
                                            backends=("triton",))[0]] == [("triton", "compiled")]
    assert timed == [("triton", "OptimizedModule")]
    timed.clear()
    rows, _ = bench.bench_step("cuda", small=True)  # (the full report: eager, then compiled)
    assert [m for _, m in timed] == ["AVMAE", "OptimizedModule"] * 3
    timed.clear()
    assert bench.bench_step("cpu", small=True, modes=("compiled",))[0] == [] and timed == []
    # its report holds the step section alone, not the empty tables of the sections not run
    text = bench.markdown("cpu", dict(steps=rows, seconds=dict(step=1.0)), small=True)
    assert "| torch | compiled | 1.00 |" in text and "## Attention" not in text
    assert "## Memory" not in text and "MEASURED_FASTER" not in text


def test_without_autotuning_the_first_configuration_that_fits_runs(monkeypatch):
    # AUTOTUNE off (the GPU tests): one configuration, so no compile-and-time of each
    A = kernels.attention
    cfgs = A._configs([(128, 64, 8, 3), (64, 64, 4, 3), (32, 64, 4, 4)])
    big = dict(HEAD_DIM=128, IS_FP32=False)  # (128, 64) is too big a tile at head dim 128
    assert len(A._pruner("N", "M")(cfgs, big)) == 2
    monkeypatch.setattr(A, "AUTOTUNE", False)
    assert [c.kwargs["BLOCK_M"] for c in A._pruner("N", "M")(cfgs, big)] == [64]


@pytest.mark.slow(10)
def test_bench_user_errors_are_one_line(tmp_path, capsys):
    # each a SystemExit with one line (what python prints to stderr, exit status 1) ...
    sys.path.insert(0, os.path.join(ROOT, "kernels"))
    import bench
    os.makedirs(tmp_path / "src" / "models")
    (tmp_path / "src" / "models" / "cav_mae.py").write_text("")
    for flag, args in [("--cavmae", ["--cavmae", str(tmp_path / "missing")]),
                       ("--site", ["--cavmae", str(tmp_path), "--site", str(tmp_path)]),
                       # an output that cannot be written is said before anything is measured
                       ("--report", ["--report", str(tmp_path / "src" / "models" / "cav_mae.py"
                                                     / "bench.md")]),
                       ("--json", ["--json", str(tmp_path / "src" / "models" / "cav_mae.py"
                                                 / "rows.json")])]:
        with pytest.raises(SystemExit) as e:
            bench.main(args)
        assert isinstance(e.value.code, str) and "\n" not in e.value.code, e.value.code
        assert flag in e.value.code
    # argparse's (exit status 2): a number it cannot take, a flag without the one it goes with
    for args, says in ((["--batch", "0"], "argument --batch: 0: must be 1 or more"),
                       (["--compile", "75"], "argument --compile: 75: must be 80 or more"),
                       (["--site", str(tmp_path)], "--site goes with --cavmae")):
        with pytest.raises(SystemExit) as e:
            bench.main(args)
        assert e.value.code == 2, args
        err = capsys.readouterr().err.strip()
        assert says in err and "\n" not in err, err
    # ... and from the command line: the interpreter asked for before triton is imported
    p = subprocess.run([sys.executable, "kernels/bench.py", "--compile", "90"], cwd=ROOT,
                       capture_output=True, text=True, timeout=120,
                       env={**os.environ, "TRITON_INTERPRET": "1"})
    assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr
    assert len(p.stderr.strip().splitlines()) == 1 and "--compile" in p.stderr


def test_kernels_launch_under_a_torch_whose_wrap_triton_refuses_the_interpreter(monkeypatch):
    # torch < 2.13's wrap_triton takes only JITFunctions, and the interpreter's kernels are not:
    # the launch then goes to the kernel as it is (nothing is traced on a CPU); without the
    # interpreter the refusal stands
    def refuses(kernel):
        raise RuntimeError("wrap_triton only works on functions annotated with triton.jit")
    monkeypatch.setattr(kernels, "_torch_wrap", refuses)
    x, ids = torch.randn(2, 9, 16), torch.stack([torch.randperm(9)[:4] for _ in range(2)])
    assert torch.equal(FAST["gather"](x, ids), avmae.gather_tokens(x, ids))
    monkeypatch.setattr(kernels, "INTERPRET", False)
    with pytest.raises(RuntimeError, match="only works"):
        kernels.wrap_triton(kernels.gather._gather_kernel)


@pytest.mark.parametrize("kw", [dict(), dict(encoder="mid", decoder="shared")])
def test_the_compiled_step_gives_the_eager_loss_and_gradients(kw):
    # torch.compile's graphs (Dynamo's capture, AOT autograd's joint forward and backward, run as
    # traced: "aot_eager" generates no code) against the eager step, every gradient (on a GPU,
    # test_kernels_gpu.py holds Inductor's compiled step, kernels included, to the twins)
    from conftest import tiny_batch, tiny_config
    cfg = tiny_config(kernels="torch", **kw)
    torch.manual_seed(0)
    eager = avmae.AVMAE(cfg)
    compiled = avmae.AVMAE(cfg)
    compiled.load_state_dict(eager.state_dict())
    x = tiny_batch(cfg)
    masks = eager.sample_masks(2, generator=torch.Generator().manual_seed(1))
    want = eager(**x, masks=masks)["loss"]
    got = torch.compile(compiled, backend="aot_eager", fullgraph=True)(**x, masks=masks)["loss"]
    want.backward()
    got.backward()
    assert torch.allclose(got, want, rtol=1e-5)
    for (n, p), q in zip(compiled.named_parameters(), eager.parameters()):
        assert (p.grad is None) == (q.grad is None), n
        assert p.grad is None or torch.allclose(p.grad, q.grad, rtol=1e-4, atol=1e-6), n


def test_bench_profile_writes_the_top_kernels_and_the_attention_op_at_each_length(tmp_path):
    # a profiled step: its 30 biggest kernels (a CPU: ops), each with its share of the step and
    # TFLOP/s (matmuls, attention, from the shapes) or GB/s, and which attention op ran at each
    # sequence length (the tiny step: the encoder's visible tokens, the decoder's full sequences)
    p = subprocess.run([sys.executable, "kernels/bench.py", "--profile", "--modes", "eager",
                        "--backends", "torch", "--report", str(tmp_path / "p.md"), "--json",
                        str(tmp_path / "p.json")], cwd=ROOT,
                       capture_output=True, text=True, timeout=300,
                       env={**os.environ, "TRITON_INTERPRET": "0"})
    assert p.returncode == 0, p.stderr[-3000:]
    text = (tmp_path / "p.md").read_text()
    assert "## Memory kernels" not in text  # (the step alone)
    table = text.split("Top 30 op (CPU)s of the step (--kernels torch, eager)")[1].split(
        "\n\n")[1].splitlines()[2:]
    rows = [[c.strip() for c in r.strip("|").split("|")] for r in table]
    shares = [float(r[1].rstrip("%")) for r in rows]
    assert len(rows) == 30 and shares == sorted(shares, reverse=True) and sum(shares) <= 100.05
    mm = next(r for r in rows if r[0] == "`aten::mm`")
    assert mm[3] != "-" and mm[4] == "-"  # (a matmul: TFLOP/s)
    top = json.load(open(tmp_path / "p.json"))["steps"][0][5]["top"]
    assert next(r for r in top if r[0] == "aten::mm")[3] > 0
    assert all(r[4] == "-" for r in rows if r[0].startswith(("`aten::view", "`aten::t`")))
    line = next(x for x in text.splitlines() if x.startswith("Attention by sequence length"))
    model = avmae.AVMAE(avmae.make_config("tiny", num_frames=4, image_size=32, patch_size=16,
                                          audio_frames=64, mel_bins=32, encoder="mid",
                                          decoder="shared"))
    keep = {m: k.shape[1] for m, (k, _) in model.sample_masks(2).items()}
    # each modality's visible tokens alone, then both (mid fusion), and the shared decoder over
    # each modality's full sequence
    want = {keep["a"], keep["v"], keep["a"] + keep["v"],
            *(math.prod(p.grid) for p in model.patches.values())}
    ran = dict(x.split(": ") for x in line.split("or ours): ")[1].split("; "))
    assert {int(n) for n in ran} == want and set(ran.values()) == {"sdpa flash_attention_for_cpu"}


def test_the_gpu_sitting_fits_a_lease_and_writes_at_most_8_files(tmp_path):
    # .ci/gpu's default steps, in the order a sitting runs them, within 540 s (a rerun still
    # fits a 15-minute lease, its start included); a dry run of two of them on the CPU: each
    # step's seconds in the log, its figures in OUT, the rest in OUT/rest.tgz
    script = open(os.path.join(ROOT, ".ci", "gpu")).read()
    assert "STEPS=${STEPS:-env torch triton feed batch128 attention}" in script
    assert "BUDGET=${SITTING_S:-540}" in script
    out = tmp_path / "out"
    tiny = "--size tiny --num_frames 4 --image_size 32 --audio_frames 64 --compile off"
    env = {**os.environ, "PYTHON": sys.executable, "STEPS": "env batch128", "TRITON_INTERPRET": "0",
           "SLACK": "8", "BATCH_ARGS": tiny}
    p = subprocess.run(["bash", ".ci/gpu", str(out)], cwd=ROOT, capture_output=True, text=True,
                       timeout=300, env=env)
    assert p.returncode == 0, (p.stdout + p.stderr)[-3000:]
    assert sorted(os.listdir(out)) == ["batch128.md", "env.md", "rest.tgz", "sitting.log"]
    log = (out / "sitting.log").read_text()
    assert re.search(r"=== the machine, a GEMM, SDPA's picks: ok after \d+ s", log)
    assert re.search(r"=== batch 128 and CUDA graphs: ok after \d+ s", log)
    assert "GEMM 512^3 float32: " in (out / "env.md").read_text()
    rows = (out / "batch128.md").read_text().splitlines()
    assert rows[2].startswith("| --batch_size 128 --compile | ") and "reduce-overhead" in rows[3]
    import tarfile
    assert {"./env.json", "./batch128.jsonl"} <= set(tarfile.open(out / "rest.tgz").getnames())


def test_the_profile_counts_bytes_by_each_inputs_dtype():
    # GB/s of an elementwise op: its inputs read and an output of the first's size written, each
    # at its own dtype's width (bf16: 2 bytes; a Python scalar: nothing)
    sys.path.insert(0, os.path.join(ROOT, "kernels"))
    import bench
    from torch.profiler import ProfilerActivity, profile
    a = torch.randn(64, 64).bfloat16()
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as p:
        a * 2
        a.float() + 1
    work = {e.name: bench._op_work(e) for e in p.events() if e.name in ("aten::mul", "aten::add")}
    assert work == {"aten::mul": (0, 2 * 64 * 64 * 2), "aten::add": (0, 2 * 64 * 64 * 4)}
