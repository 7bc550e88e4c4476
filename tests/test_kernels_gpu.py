"""kernels/ on a GPU: bf16 at the paper's shapes, the whole model step with kernels against the
twins, and the compiled training step. Skipped without CUDA.
Run alone: python -m pytest -q tests/test_kernels_gpu.py (where there is a GPU, conftest asks for no
interpreter; TRITON_INTERPRET=1 set by hand skips these).
Attention runs in the first configuration that fits, not autotuned (a compile and a timing of every
configuration at each of the 60-odd cases would take minutes): kernels/bench.py --report checks the
autotuned kernel against SDPA at every length it times."""
import os

import pytest
import torch
import torch.nn.functional as F

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1",
    reason="needs a CUDA GPU, and Triton compiling for it (TRITON_INTERPRET unset)")

if torch.cuda.is_available():
    import avmae
    import kernels

DEV = "cuda"
BF16 = dict(atol=2e-2, rtol=2e-2)


@pytest.fixture(autouse=True)
def _first_config(monkeypatch):
    monkeypatch.setattr(kernels.attention, "AUTOTUNE", False)


def rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)).item()


LENGTHS = [157, 200, 357, 400, 1568, 1968, 3136]
ATTENTION_CASES = (  # every length at head dim 64 in the three dtypes, packed; the other head dims
    # at two lengths; the other forms (three views, dq by atomics, the TMA forward) in bf16
    [(N, 64, dt, "packed") for N in LENGTHS for dt in ("bf16", "fp16", "fp32")]
    + [(N, d, dt, "packed") for N in (157, 1968) for d in (32, 128) for dt in ("bf16", "fp16",
                                                                               "fp32")]
    + [(N, 64, "bf16", form) for N in LENGTHS for form in ("qkv", "atomic_dq", "tma")])


@pytest.mark.parametrize("N,d,dt,form", ATTENTION_CASES)
def test_attention_paper_lengths(N, d, dt, form, monkeypatch):
    dtype = dict(bf16=torch.bfloat16, fp16=torch.float16, fp32=torch.float32)[dt]
    monkeypatch.setattr(kernels.attention, "DQ_ATOMIC", form == "atomic_dq")
    monkeypatch.setattr(kernels.attention, "FWD_TMA", form == "tma")
    torch.manual_seed(0)
    H = 768 // 64
    qkv = torch.randn(2, N, 3, H, d, device=DEV, dtype=dtype, requires_grad=True)
    q, k, v = qkv.permute(2, 0, 3, 1, 4)
    y = kernels.FAST["attention"](*((q, k, v) if form == "qkv" else (qkv,)))
    ref = F.scaled_dot_product_attention(*(t.double() for t in (q, k, v)))
    g = torch.randn_like(ref)
    (dy,) = torch.autograd.grad(y, qkv, g.to(dtype))
    (dr,) = torch.autograd.grad(ref, qkv, g)
    # as close to a float64 reference as torch's own SDPA in the same dtype
    y_sdpa = F.scaled_dot_product_attention(q, k, v)
    (d_sdpa,) = torch.autograd.grad(y_sdpa, qkv, g.to(dtype))
    assert rel_err(y, ref) <= max(2 * rel_err(y_sdpa, ref), 1e-5)
    assert rel_err(dy, dr) <= max(2 * rel_err(d_sdpa, dr), 1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gather_assemble_loss_paper_shapes(dtype):
    torch.manual_seed(0)
    B, N, K, P = 8, 1568, 157, 1536
    perm = torch.stack([torch.randperm(N, device=DEV) for _ in range(B)])
    keep, drop = perm[:, :K].contiguous(), perm[:, K:].contiguous()
    patches = torch.randn(B, N, P, device=DEV, dtype=dtype)
    assert torch.equal(kernels.FAST["gather"](patches, keep), avmae.gather_tokens(patches, keep))
    x = torch.randn(B, K, 384, device=DEV, dtype=dtype, requires_grad=True)
    tok = torch.randn(384, device=DEV, requires_grad=True)
    pos = avmae.sincos_1d(N, 384).to(DEV)
    for name, args in [("assemble", (x, pos, tok, pos, keep, drop)),
                       ("unshuffle", (x, tok, pos, keep, drop))]:
        y, r = kernels.FAST[name](*args), getattr(avmae, name)(*args)
        torch.testing.assert_close(y, r)
        g = torch.randn_like(r)
        for a, b in zip(torch.autograd.grad(y, (x, tok), g), torch.autograd.grad(r, (x, tok), g)):
            torch.testing.assert_close(a, b, atol=1e-2, rtol=1e-3)
    pred = torch.randn(B, N - K, P, device=DEV, dtype=dtype, requires_grad=True)
    for norm in (False, True):
        y, r = kernels.FAST["loss"](pred, patches, drop, norm), avmae.recon_loss(pred, patches,
                                                                                 drop, norm)
        torch.testing.assert_close(y, r, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(torch.autograd.grad(y, pred)[0], torch.autograd.grad(r, pred)[0],
                                   **BF16)


def _pair(B, **kw):
    """ViT-B with every kernel (--kernels triton: 'auto' may pick none on a GPU not yet measured)
    and its twin (same weights), a paper-shaped batch and its masks."""
    torch.manual_seed(0)
    cfg = avmae.make_config("base", **kw)
    fast = avmae.AVMAE(avmae.AVMAEConfig(**{**cfg.__dict__, "kernels": "triton"})).to(DEV)
    twin = avmae.AVMAE(avmae.AVMAEConfig(**{**cfg.__dict__, "kernels": "torch"})).to(DEV)
    twin.load_state_dict(fast.state_dict())
    x = dict(a=torch.randn(B, 800, 128, device=DEV), v=torch.rand(B, 3, 16, 224, 224,
                                                                  device=DEV) * 2 - 1)
    return fast, twin, x, fast.sample_masks(B, DEV)


@pytest.mark.parametrize("kw", [dict(), dict(decoder_layout="unshuffle"),
                                dict(encoder="early", objective="inpaint_both")])
def test_vit_b_step_with_kernels_equals_twins_in_bf16(kw):
    fast, twin, x, masks = _pair(4, **kw)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        of, ot = fast(**x, masks=masks), twin(**x, masks=masks)
    assert abs(of["loss"].item() - ot["loss"].item()) < 1e-2 * ot["loss"].item()
    of["loss"].backward()
    ot["loss"].backward()
    for (n, pf), pt in zip(fast.named_parameters(), twin.parameters()):
        assert rel_err(pf.grad, pt.grad) < 5e-2, n


@pytest.mark.parametrize("kw", [dict(), dict(decoder_layout="unshuffle")])
def test_compiled_step_has_no_graph_breaks(kw):
    # (ViT-B cut to 3 encoder layers, 2 of them joint, and 1 decoder layer: a graph break does not
    # depend on the depth, and the compile takes seconds where the full depth's takes a minute)
    fast, twin, x, masks = _pair(2, depth=3, dec_depth=1, **kw)
    step = torch.compile(fast, fullgraph=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = step(**x, masks=masks)["loss"]
        ref = twin(**x, masks=masks)["loss"]
    loss.backward()
    ref.backward()
    assert abs(loss.item() - ref.item()) < 1e-2 * ref.item()
    for (n, pf), pt in zip(fast.named_parameters(), twin.parameters()):  # the compiled backward
        assert pf.grad is not None and rel_err(pf.grad, pt.grad) < 5e-2, n


@pytest.mark.parametrize("script", ["train", "finetune"])
def test_a_training_step_waits_for_nothing_before_its_optimizer_step(script, tmp_path,
                                                                     monkeypatch):
    # torch raises at any synchronising call (a read, a pageable copy) between a step's batch and
    # the end of its optimizer step (tests/test_train.py counts the same reads on a CPU)
    import data
    import finetune
    import train
    root = data.make_builtin(str(tmp_path / "builtin"))
    step = torch.optim.AdamW.step

    def stepped(self, *a, **k):
        out = step(self, *a, **k)
        torch.cuda.set_sync_debug_mode(0)
        return out
    monkeypatch.setattr(torch.optim.AdamW, "step", stepped)

    def batch(s, b):
        torch.cuda.set_sync_debug_mode("error")
        return b
    tiny = ["--preset", "quick", "--num_frames", "4", "--image_size", "32", "--audio_frames",
            "64", "--data", root, "--workers", "1", "--max_steps", "3", "--batch_size", "8",
            "--out_dir", str(tmp_path / script)]
    try:
        if script == "train":
            train.main([*tiny, "--grad_accum", "2"], hooks={"batch": batch})
        else:
            mix = finetune.mixup
            monkeypatch.setattr(finetune, "mixup", lambda b, *a, **k: mix(batch(0, b), *a, **k))
            finetune.main(tiny)
    finally:
        torch.cuda.set_sync_debug_mode(0)
