"""
Fused non-causal attention, softmax(q k^T / sqrt(d)) v, FlashAttention-2 style (Dao, 2023).

Forward: a program owns BLOCK_M query rows of one (batch, head) and streams the keys and values in
blocks of BLOCK_N, keeping a running row maximum m, a running denominator l and an unnormalised
output in registers (the "online softmax"): for each block
    s = q k^T * scale * log2(e);  m' = max(m, rowmax s);  p = 2^(s - m')
    l = l 2^(m - m') + rowsum p;   acc = acc 2^(m - m') + p v
and at the end o = acc / l. The N x N score matrix never exists. The row's log-sum-exp
(lse = m + log2 l, in base 2) is kept for the backward.
Backward (FA2's split, no atomics): delta = rowsum(do * o); one kernel owns a block of keys and
accumulates dk, dv over all query blocks; another owns a block of queries and accumulates dq:
    p = 2^(s - lse),  dv += p^T do,  dp = do v^T,  ds = p (dp - delta),  dk += ds^T q,  dq += ds k
(dk and dq then times the softmax scale). Any sequence length works: keys past N score -inf, query
rows past N are neither read nor written. Head dims 32 / 64 / 128; fp32 / fp16 / bf16 in, fp32
accumulation. q, k, v may be strided views (the model's qkv projection split in place); the output
is laid out (B, N, H, d) so the model's transpose-reshape to (B, N, H*d) is free. Twin:
avmae.attention (torch's scaled_dot_product_attention).
"""
import math

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from . import INTERPRET

LOG2E = 1.4426950408889634

if INTERPRET:  # one small configuration: the interpreter runs every program in Python
    _FWD = _BWD = [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16}, num_warps=4, num_stages=1)]
else:
    # (BLOCK_M, BLOCK_N, num_warps, num_stages)
    _FWD = [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
            for bm, bn, w, s in [(128, 64, 8, 3), (128, 128, 8, 2), (64, 64, 4, 3),
                                 (128, 32, 4, 3), (64, 128, 4, 2)]]
    _BWD = [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
            for bm, bn, w, s in [(64, 64, 4, 2), (32, 64, 4, 2), (64, 128, 8, 2),
                                 (128, 64, 8, 2), (32, 32, 4, 2)]]


# big tiles of fp32 or at head dim 128 do not fit in shared memory
def _prune(configs, named_args, **kwargs):
    a = {**named_args, **kwargs}
    big = a["HEAD_DIM"] >= 128 or a["IS_FP32"]
    fits = [c for c in configs if not big or c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] <= 64 * 64]
    return fits or configs[-1:]


@triton.autotune(configs=_FWD, key=["N", "HEAD_DIM", "IS_FP32"],
                 prune_configs_by={"early_config_prune": _prune})
@triton.jit
def _attn_fwd(Q, K, V, O, LSE, qk_scale, N, H, sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sob,
              soh, son, HEAD_DIM: tl.constexpr, IS_FP32: tl.constexpr, BLOCK_M: tl.constexpr,
              BLOCK_N: tl.constexpr):
    pid_m, bh = tl.program_id(0), tl.program_id(1)
    b, h = bh // H, bh % H
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.arange(0, BLOCK_N)
    rd = tl.arange(0, HEAD_DIM)
    q = tl.load(Q + b * sqb + h * sqh + rm[:, None] * sqn + rd[None, :], mask=rm[:, None] < N,
                other=0.0)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    for n0 in range(0, N, BLOCK_N):
        kn = n0 + rn
        k = tl.load(K + b * skb + h * skh + kn[None, :] * skn + rd[:, None], mask=kn[None, :] < N,
                    other=0.0)
        # (BLOCK_M, BLOCK_N)
        s = tl.dot(q, k, input_precision="ieee" if IS_FP32 else "tf32") * qk_scale
        s = tl.where(kn[None, :] < N, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        p = tl.math.exp2(s - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(V + b * svb + h * svh + kn[:, None] * svn + rd[None, :], mask=kn[:, None] < N,
                    other=0.0)
        pv = tl.dot(p.to(v.dtype), v, input_precision="ieee" if IS_FP32 else "tf32")
        acc = acc * alpha[:, None] + pv
        m_i = m_new
    acc = acc / l_i[:, None]
    tl.store(O + b * sob + h * soh + rm[:, None] * son + rd[None, :], acc.to(O.dtype.element_ty),
             mask=rm[:, None] < N)
    tl.store(LSE + bh * N + rm, m_i + tl.math.log2(l_i), mask=rm < N)


@triton.jit
def _attn_bwd_delta(O, DO, DELTA, N, H, sob, soh, son, sdb, sdh, sdn, HEAD_DIM: tl.constexpr,
                    BLOCK_M: tl.constexpr):
    pid_m, bh = tl.program_id(0), tl.program_id(1)
    b, h = bh // H, bh % H
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rd = tl.arange(0, HEAD_DIM)
    o = tl.load(O + b * sob + h * soh + rm[:, None] * son + rd[None, :], mask=rm[:, None] < N,
                other=0.0).to(tl.float32)
    do = tl.load(DO + b * sdb + h * sdh + rm[:, None] * sdn + rd[None, :], mask=rm[:, None] < N,
                 other=0.0).to(tl.float32)
    tl.store(DELTA + bh * N + rm, tl.sum(o * do, axis=1), mask=rm < N)


@triton.autotune(configs=_BWD, key=["N", "HEAD_DIM", "IS_FP32"],
                 prune_configs_by={"early_config_prune": _prune})
@triton.jit
def _attn_bwd_dkdv(Q, K, V, DO, LSE, DELTA, DK, DV, qk_scale, sm_scale, N, H, sqb, sqh, sqn, skb,
                   skh, skn, svb, svh, svn, sdb, sdh, sdn, sgb, sgh, sgn, HEAD_DIM: tl.constexpr,
                   IS_FP32: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_n, bh = tl.program_id(0), tl.program_id(1)
    b, h = bh // H, bh % H
    kn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = tl.arange(0, BLOCK_M)
    rd = tl.arange(0, HEAD_DIM)
    prec: tl.constexpr = "ieee" if IS_FP32 else "tf32"
    k = tl.load(K + b * skb + h * skh + kn[:, None] * skn + rd[None, :], mask=kn[:, None] < N,
                other=0.0)
    v = tl.load(V + b * svb + h * svh + kn[:, None] * svn + rd[None, :], mask=kn[:, None] < N,
                other=0.0)
    dk = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    for m0 in range(0, N, BLOCK_M):
        qm = m0 + rm
        okm = qm < N
        q = tl.load(Q + b * sqb + h * sqh + qm[:, None] * sqn + rd[None, :], mask=okm[:, None],
                    other=0.0)
        do = tl.load(DO + b * sdb + h * sdh + qm[:, None] * sdn + rd[None, :], mask=okm[:, None],
                     other=0.0)
        lse = tl.load(LSE + bh * N + qm, mask=okm, other=0.0)
        delta = tl.load(DELTA + bh * N + qm, mask=okm, other=0.0)
        st = tl.dot(k, tl.trans(q), input_precision=prec) * qk_scale  # (BLOCK_N, BLOCK_M) = s^T
        pt = tl.math.exp2(st - lse[None, :])
        pt = tl.where(okm[None, :] & (kn[:, None] < N), pt, 0.0)
        dv += tl.dot(pt.to(do.dtype), do, input_precision=prec)
        dpt = tl.dot(v, tl.trans(do), input_precision=prec)  # (BLOCK_N, BLOCK_M) = dp^T
        dst = pt * (dpt - delta[None, :])
        dk += tl.dot(dst.to(q.dtype), q, input_precision=prec)
    g = b * sgb + h * sgh + kn[:, None] * sgn + rd[None, :]
    tl.store(DK + g, (dk * sm_scale).to(DK.dtype.element_ty), mask=kn[:, None] < N)
    tl.store(DV + g, dv.to(DV.dtype.element_ty), mask=kn[:, None] < N)


@triton.autotune(configs=_BWD, key=["N", "HEAD_DIM", "IS_FP32"],
                 prune_configs_by={"early_config_prune": _prune})
@triton.jit
def _attn_bwd_dq(Q, K, V, DO, LSE, DELTA, DQ, qk_scale, sm_scale, N, H, sqb, sqh, sqn, skb, skh,
                 skn, svb, svh, svn, sdb, sdh, sdn, sgb, sgh, sgn, HEAD_DIM: tl.constexpr,
                 IS_FP32: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_m, bh = tl.program_id(0), tl.program_id(1)
    b, h = bh // H, bh % H
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.arange(0, BLOCK_N)
    rd = tl.arange(0, HEAD_DIM)
    prec: tl.constexpr = "ieee" if IS_FP32 else "tf32"
    okm = rm < N
    q = tl.load(Q + b * sqb + h * sqh + rm[:, None] * sqn + rd[None, :], mask=okm[:, None],
                other=0.0)
    do = tl.load(DO + b * sdb + h * sdh + rm[:, None] * sdn + rd[None, :], mask=okm[:, None],
                 other=0.0)
    lse = tl.load(LSE + bh * N + rm, mask=okm, other=0.0)
    delta = tl.load(DELTA + bh * N + rm, mask=okm, other=0.0)
    dq = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    for n0 in range(0, N, BLOCK_N):
        kn = n0 + rn
        k = tl.load(K + b * skb + h * skh + kn[:, None] * skn + rd[None, :], mask=kn[:, None] < N,
                    other=0.0)
        v = tl.load(V + b * svb + h * svh + kn[:, None] * svn + rd[None, :], mask=kn[:, None] < N,
                    other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=prec) * qk_scale
        p = tl.math.exp2(s - lse[:, None])
        p = tl.where(okm[:, None] & (kn[None, :] < N), p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=prec)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=prec)
    tl.store(DQ + b * sgb + h * sgh + rm[:, None] * sgn + rd[None, :],
             (dq * sm_scale).to(DQ.dtype.element_ty), mask=okm[:, None])


def _strides(t):  # (B, H, N, d) -> batch, head, row strides (the last dim must be contiguous)
    assert t.stride(-1) == 1, "the head dimension must be contiguous"
    return t.stride(0), t.stride(1), t.stride(2)



def supports(q, k, v) -> bool:
    """The inputs this kernel takes: (B, H, N, d) q, k, v of one shape and dtype (fp32 / fp16 /
    bf16), head dim 16, 32, 64 or 128, contiguous along it. Anything else runs on the twin
    (SDPA)."""
    return (q.dim() == 4 and q.shape == k.shape == v.shape and q.dtype == k.dtype == v.dtype
            and q.dtype in (torch.float32, torch.float16, torch.bfloat16)
            and q.shape[-1] in (16, 32, 64, 128)
            and all(t.stride(-1) == 1 for t in (q, k, v)))

def _check(q, k, v):
    assert q.shape == k.shape == v.shape and q.dim() == 4, "q, k, v: (B, H, N, d), equal shapes"
    assert q.dtype == k.dtype == v.dtype and q.dtype in (torch.float32, torch.float16,
                                                         torch.bfloat16)
    assert q.shape[-1] in (16, 32, 64,
                           128), f"head dim {q.shape[-1]} is not one of 16, 32, 64, 128"


def _empty_bnhd(q):  # (B, H, N, d) view of a (B, N, H, d) buffer
    B, H, N, d = q.shape
    return torch.empty(B, N, H, d, device=q.device, dtype=q.dtype).permute(0, 2, 1, 3)


@triton_op("avmae::attention", mutates_args=())
def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor,
                                                                           torch.Tensor]:
    _check(q, k, v)
    B, H, N, d = q.shape
    o = _empty_bnhd(q)
    lse = torch.empty(B * H, N, device=q.device, dtype=torch.float32)
    grid = lambda meta: (triton.cdiv(N, meta["BLOCK_M"]), B * H)  # noqa: E731
    wrap_triton(_attn_fwd)[grid](q, k, v, o, lse, LOG2E / math.sqrt(d), N, H, *_strides(q),
                                 *_strides(k), *_strides(v), *_strides(o), HEAD_DIM=d,
                                 IS_FP32=q.dtype == torch.float32)
    return o, lse


@triton_op("avmae::attention_bwd", mutates_args=())
def _attention_bwd(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   o: torch.Tensor,
                   lse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    B, H, N, d = q.shape
    do = do if do.stride(-1) == 1 else do.contiguous()
    delta = torch.empty(B * H, N, device=q.device, dtype=torch.float32)
    wrap_triton(_attn_bwd_delta)[(triton.cdiv(N, 64), B * H)](o, do, delta, N, H, *_strides(o),
                                                              *_strides(do), HEAD_DIM=d, BLOCK_M=64)
    dq, dk, dv = _empty_bnhd(q), _empty_bnhd(q), _empty_bnhd(q)
    args = (LOG2E / math.sqrt(d), 1.0 / math.sqrt(d), N, H, *_strides(q), *_strides(k),
            *_strides(v), *_strides(do), *_strides(dq))
    fp32 = q.dtype == torch.float32
    wrap_triton(_attn_bwd_dkdv)[lambda meta: (triton.cdiv(N, meta["BLOCK_N"]), B * H)](
        q, k, v, do, lse, delta, dk, dv, *args, HEAD_DIM=d, IS_FP32=fp32)
    wrap_triton(_attn_bwd_dq)[lambda meta: (triton.cdiv(N, meta["BLOCK_M"]), B * H)](
        q, k, v, do, lse, delta, dq, *args, HEAD_DIM=d, IS_FP32=fp32)
    return dq, dk, dv


def _setup(ctx, inputs, output):
    q, k, v = inputs
    o, lse = output
    ctx.save_for_backward(q, k, v, o, lse)


def _backward(ctx, do, dlse):
    q, k, v, o, lse = ctx.saved_tensors
    dq, dk, dv = _attention_bwd(do, q, k, v, o, lse)
    return dq, dk, dv


_attention.register_autograd(_backward, setup_context=_setup)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Same contract as avmae.attention."""
    return _attention(q, k, v)[0]
