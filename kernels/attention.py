"""
Fused non-causal attention, softmax(q k^T / sqrt(d)) v, FlashAttention-2 style (Dao, 2023).

Forward: a program owns BLOCK_M query rows of one (batch, head) and streams the keys and values in
blocks of BLOCK_N, keeping a running row maximum m, a running denominator l and an unnormalised
output in registers (the "online softmax"): for each block, with c = log2(e) / sqrt(d),
    s = q k^T;  m' = max(m, c rowmax s);  p = 2^(c s - m')   (one fused multiply-add, then exp2)
    l = l 2^(m - m') + rowsum p;   acc = acc 2^(m - m') + p v
and at the end o = acc / l. The N x N score matrix never exists. The row's log-sum-exp
(lse = m + log2 l, in base 2) is kept for the backward. Only the last key block, when N is not a
multiple of BLOCK_N, is masked (keys past N score -inf); the others run without a compare.
Backward (FA2's split, by default without atomics): delta = rowsum(do * o); one kernel owns a block
of keys and accumulates dk, dv over all query blocks; another owns a block of queries and
accumulates dq:
    p = 2^(c s - lse),  dv += p^T do,  dp = do v^T,  ds = p (dp - delta),  dk += ds^T q,  dq += ds k
(dk and dq then times 1 / sqrt(d)). In the dk / dv kernel no mask is needed: query rows past N load
as zeros with lse = +inf, so their p is exactly 0, and key rows past N are never stored. The dq
kernel masks only its last key block. DQ_ATOMIC = True (an option for the benchmark): the dk / dv
kernel also adds ds k into an fp32 dq with atomics, 5 GEMMs and one exp per score block instead of
7 and two, at the price of a run-to-run nondeterministic dq. FWD_TMA = True (also for the
benchmark): the forward loads q, k, v through tensor descriptors, the Tensor Memory Accelerator
on Hopper, which zero-fills rows past N itself (used where the installed Triton has
tl.make_tensor_descriptor and the views are 16-byte aligned).

Any sequence length works. Head dims 16 / 32 / 64 / 128; fp32 / fp16 / bf16 in, fp32 accumulation.
attention(qkv) takes the model's packed (B, N, 3, H, d) projection and its backward writes one
packed dqkv (no stack of three gradients); attention(q, k, v) takes (B, H, N, d) strided views.
The output is laid out (B, N, H, d), so the model's transpose-reshape to (B, N, H*d) is free. Twin:
avmae.attention (torch's scaled_dot_product_attention).
"""
import math

import torch
import triton
import triton.language as tl
from torch.library import triton_op

from . import INTERPRET, wrap_triton

LOG2E = 1.4426950408889634
HOPPER_SMEM = 232448  # bytes of shared memory one block may use on sm_90 (227 KB)
# options (see above), read at each launch (under torch.compile: when the step is traced)
DQ_ATOMIC = False  # dq by atomics inside the dk / dv kernel
FWD_TMA = False    # forward loads through tensor descriptors (Hopper's TMA)
# False: no autotuning, the first configuration that fits (each new length and dtype then costs one
# compilation, not a compile and a timing of every configuration: the GPU tests set it)
AUTOTUNE = True


def _configs(shapes):  # (BLOCK_M, BLOCK_N, num_warps, num_stages)
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
            for bm, bn, w, s in shapes]


if INTERPRET:  # one small configuration: the interpreter runs every program in Python
    _FWD = _DKDV = _DQ = _configs([(16, 16, 4, 1)])
else:  # the backward kernels get their own lists: dk / dv holds two accumulators, dq one
    _FWD = _configs([(128, 64, 8, 3), (128, 128, 8, 2), (64, 64, 4, 3), (128, 32, 4, 4),
                     (64, 128, 4, 3)])
    _DKDV = _configs([(64, 64, 4, 3), (32, 64, 4, 4), (64, 128, 8, 3), (32, 128, 4, 5),
                      (16, 64, 4, 5)])
    _DQ = _configs([(64, 64, 4, 3), (128, 64, 8, 3), (64, 32, 4, 4), (128, 32, 4, 5),
                    (32, 64, 4, 5)])


def _pruner(loop: str, fixed: str):
    """Keeps the configurations whose tiles fit: no big tiles in fp32 or at head dim 128, and
    shared memory within Hopper's 227 KB, estimated as (stages - 1) buffers of the two tiles the
    inner loop streams (BLOCK_`loop` rows each) plus the two held (BLOCK_`fixed` rows), + 10%
    (within 10% of what the compiler allots for sm_90: python kernels/bench.py --compile 90)."""
    def prune(configs, named_args, **kwargs):
        a = {**named_args, **kwargs}
        d, size = a["HEAD_DIM"], 4 if a["IS_FP32"] else 2

        def fits(c):
            rows = lambda x: c.kwargs["BLOCK_" + x]  # noqa: E731
            smem = 2 * d * size * ((c.num_stages - 1) * rows(loop) + rows(fixed))
            small = not (d >= 128 or a["IS_FP32"]) or rows("M") * rows("N") <= 64 * 64
            return small and 1.1 * smem <= HOPPER_SMEM
        kept = [c for c in configs if fits(c)] or configs[-1:]
        return kept if AUTOTUNE else kept[:1]
    return prune


@triton.jit
def _fwd_block(q, m_i, l_i, acc, Kp, Vp, n0, N, qk_scale, skn, svn, rn, rd,
               IS_FP32: tl.constexpr, MASK: tl.constexpr, TMA: tl.constexpr):
    kn = n0 + rn
    if TMA:  # Kp, Vp are tensor descriptors: rows past N arrive as zeros
        k = tl.trans(Kp.load([n0, 0]))
        v = Vp.load([n0, 0])
    elif MASK:
        k = tl.load(Kp + kn[None, :] * skn + rd[:, None], mask=kn[None, :] < N, other=0.0)
        v = tl.load(Vp + kn[:, None] * svn + rd[None, :], mask=kn[:, None] < N, other=0.0)
    else:
        k = tl.load(Kp + kn[None, :] * skn + rd[:, None])
        v = tl.load(Vp + kn[:, None] * svn + rd[None, :])
    s = tl.dot(q, k, input_precision="ieee" if IS_FP32 else "tf32")  # (BLOCK_M, BLOCK_N), raw
    if MASK:
        s = tl.where(kn[None, :] < N, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1) * qk_scale)
    p = tl.math.exp2(s * qk_scale - m_new[:, None])
    alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v,
                                        input_precision="ieee" if IS_FP32 else "tf32")
    return m_new, l_i, acc


@triton.autotune(configs=_FWD, key=["N", "HEAD_DIM", "IS_FP32", "TMA"],
                 prune_configs_by={"early_config_prune": _pruner("N", "M")})
@triton.jit
def _attn_fwd(Q, K, V, O, LSE, qk_scale, N, H, sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sob,
              soh, son, HEAD_DIM: tl.constexpr, IS_FP32: tl.constexpr, TMA: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    qk_scale = tl.cast(qk_scale, tl.float32)  # (torch.compile passes a Python float as fp64)
    pid_m, bh = tl.program_id(0), tl.program_id(1)
    b, h = bh // H, bh % H
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.arange(0, BLOCK_N)
    rd = tl.arange(0, HEAD_DIM)
    Kp, Vp = K + b * skb + h * skh, V + b * svb + h * svh
    if TMA:  # Hopper's tensor-memory loads: one descriptor per (batch, head) slice
        q = tl.make_tensor_descriptor(Q + b * sqb + h * sqh, shape=[N, HEAD_DIM], strides=[sqn, 1],
                                      block_shape=[BLOCK_M, HEAD_DIM]).load([pid_m * BLOCK_M, 0])
        Kp = tl.make_tensor_descriptor(Kp, shape=[N, HEAD_DIM], strides=[skn, 1],
                                       block_shape=[BLOCK_N, HEAD_DIM])
        Vp = tl.make_tensor_descriptor(Vp, shape=[N, HEAD_DIM], strides=[svn, 1],
                                       block_shape=[BLOCK_N, HEAD_DIM])
    else:
        q = tl.load(Q + b * sqb + h * sqh + rm[:, None] * sqn + rd[None, :],
                    mask=rm[:, None] < N, other=0.0)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    n_full = N // BLOCK_N * BLOCK_N
    for n0 in range(0, n_full, BLOCK_N):
        m_i, l_i, acc = _fwd_block(q, m_i, l_i, acc, Kp, Vp, n0, N, qk_scale, skn, svn, rn, rd,
                                   IS_FP32, False, TMA)
    if n_full < N:
        m_i, l_i, acc = _fwd_block(q, m_i, l_i, acc, Kp, Vp, n_full, N, qk_scale, skn, svn, rn,
                                   rd, IS_FP32, True, TMA)
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


@triton.autotune(configs=_DKDV, key=["N", "HEAD_DIM", "IS_FP32", "DQ_ATOMIC"],
                 prune_configs_by={"early_config_prune": _pruner("M", "N")},
                 reset_to_zero=["DQACC"])
@triton.jit
def _attn_bwd_dkdv(Q, K, V, DO, LSE, DELTA, DQKV, DQACC, qk_scale, sm_scale, N, H, sqb, sqh,
                   sqn, skb, skh, skn, svb, svh, svn, sdb, sdh, sdn, sgb, sgh, sgn, sgj,
                   HEAD_DIM: tl.constexpr, IS_FP32: tl.constexpr, DQ_ATOMIC: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    qk_scale = tl.cast(qk_scale, tl.float32)  # (as in _attn_fwd)
    sm_scale = tl.cast(sm_scale, tl.float32)
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
    Qp, DOp = Q + b * sqb + h * sqh, DO + b * sdb + h * sdh
    dk = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    for m0 in range(0, N, BLOCK_M):
        qm = m0 + rm
        okm = qm < N
        q = tl.load(Qp + qm[:, None] * sqn + rd[None, :], mask=okm[:, None], other=0.0)
        do = tl.load(DOp + qm[:, None] * sdn + rd[None, :], mask=okm[:, None], other=0.0)
        # rows past N: lse = +inf makes their p exactly 0, so no compare on the scores
        lse = tl.load(LSE + bh * N + qm, mask=okm, other=float("inf"))
        delta = tl.load(DELTA + bh * N + qm, mask=okm, other=0.0)
        st = tl.dot(k, tl.trans(q), input_precision=prec)  # (BLOCK_N, BLOCK_M) = s^T, raw
        pt = tl.math.exp2(st * qk_scale - lse[None, :])
        dv += tl.dot(pt.to(do.dtype), do, input_precision=prec)
        dpt = tl.dot(v, tl.trans(do), input_precision=prec)  # (BLOCK_N, BLOCK_M) = dp^T
        dst = pt * (dpt - delta[None, :])
        dk += tl.dot(dst.to(q.dtype), q, input_precision=prec)
        if DQ_ATOMIC:  # key rows past N (k = 0) add nothing, but their p may overflow (0 * inf)
            dst = tl.where(kn[:, None] < N, dst, 0.0)
            dq = tl.dot(tl.trans(dst.to(k.dtype)), k, input_precision=prec) * sm_scale
            tl.atomic_add(DQACC + (bh * N + qm[:, None]) * HEAD_DIM + rd[None, :], dq,
                          mask=okm[:, None], sem="relaxed")
    g = DQKV + b * sgb + h * sgh + kn[:, None] * sgn + rd[None, :]  # dk in slot 1, dv in slot 2
    tl.store(g + sgj, (dk * sm_scale).to(DQKV.dtype.element_ty), mask=kn[:, None] < N)
    tl.store(g + 2 * sgj, dv.to(DQKV.dtype.element_ty), mask=kn[:, None] < N)


@triton.jit
def _dq_block(q, do, lse, delta, dq, Kp, Vp, n0, N, qk_scale, skn, svn, rn, rd,
              IS_FP32: tl.constexpr, MASK: tl.constexpr):
    kn = n0 + rn
    prec: tl.constexpr = "ieee" if IS_FP32 else "tf32"
    if MASK:
        k = tl.load(Kp + kn[:, None] * skn + rd[None, :], mask=kn[:, None] < N, other=0.0)
        v = tl.load(Vp + kn[:, None] * svn + rd[None, :], mask=kn[:, None] < N, other=0.0)
    else:
        k = tl.load(Kp + kn[:, None] * skn + rd[None, :])
        v = tl.load(Vp + kn[:, None] * svn + rd[None, :])
    s = tl.dot(q, tl.trans(k), input_precision=prec)
    p = tl.math.exp2(s * qk_scale - lse[:, None])
    if MASK:  # a zero key row adds nothing, but its p could overflow (0 * inf)
        p = tl.where(kn[None, :] < N, p, 0.0)
    dp = tl.dot(do, tl.trans(v), input_precision=prec)
    ds = p * (dp - delta[:, None])
    return dq + tl.dot(ds.to(k.dtype), k, input_precision=prec)


@triton.autotune(configs=_DQ, key=["N", "HEAD_DIM", "IS_FP32"],
                 prune_configs_by={"early_config_prune": _pruner("N", "M")})
@triton.jit
def _attn_bwd_dq(Q, K, V, DO, LSE, DELTA, DQKV, qk_scale, sm_scale, N, H, sqb, sqh, sqn, skb, skh,
                 skn, svb, svh, svn, sdb, sdh, sdn, sgb, sgh, sgn, HEAD_DIM: tl.constexpr,
                 IS_FP32: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    qk_scale = tl.cast(qk_scale, tl.float32)  # (as in _attn_fwd)
    sm_scale = tl.cast(sm_scale, tl.float32)
    pid_m, bh = tl.program_id(0), tl.program_id(1)
    b, h = bh // H, bh % H
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.arange(0, BLOCK_N)
    rd = tl.arange(0, HEAD_DIM)
    okm = rm < N
    q = tl.load(Q + b * sqb + h * sqh + rm[:, None] * sqn + rd[None, :], mask=okm[:, None],
                other=0.0)
    do = tl.load(DO + b * sdb + h * sdh + rm[:, None] * sdn + rd[None, :], mask=okm[:, None],
                 other=0.0)
    lse = tl.load(LSE + bh * N + rm, mask=okm, other=0.0)
    delta = tl.load(DELTA + bh * N + rm, mask=okm, other=0.0)
    Kp, Vp = K + b * skb + h * skh, V + b * svb + h * svh
    dq = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    n_full = N // BLOCK_N * BLOCK_N
    for n0 in range(0, n_full, BLOCK_N):
        dq = _dq_block(q, do, lse, delta, dq, Kp, Vp, n0, N, qk_scale, skn, svn, rn, rd,
                       IS_FP32, False)
    if n_full < N:
        dq = _dq_block(q, do, lse, delta, dq, Kp, Vp, n_full, N, qk_scale, skn, svn, rn, rd,
                       IS_FP32, True)
    tl.store(DQKV + b * sgb + h * sgh + rm[:, None] * sgn + rd[None, :],  # dq: slot 0
             (dq * sm_scale).to(DQKV.dtype.element_ty), mask=okm[:, None])


def _strides(t):  # (B, H, N, d) -> batch, head, row strides (the last dim must be contiguous)
    assert t.stride(-1) == 1, "the head dimension must be contiguous"
    return t.stride(0), t.stride(1), t.stride(2)


def supports(q, k=None, v=None) -> bool:
    """The inputs this kernel takes: a packed (B, N, 3, H, d) qkv, or (B, H, N, d) q, k, v of one
    shape; fp32 / fp16 / bf16; head dim 16, 32, 64 or 128, contiguous along it. Anything else runs
    on the twin (SDPA)."""
    ts = (q,) if k is None else (q, k, v)
    shape_ok = (q.dim() == 5 and q.shape[2] == 3) if k is None else \
        (q.dim() == 4 and q.shape == k.shape == v.shape)
    return (shape_ok and all(t.dtype == q.dtype for t in ts)
            and q.dtype in (torch.float32, torch.float16, torch.bfloat16)
            and q.shape[-1] in (16, 32, 64, 128) and all(t.stride(-1) == 1 for t in ts))


def _unpack(qkv):  # (B, N, 3, H, d) -> three (B, H, N, d) views
    assert qkv.dim() == 5 and qkv.shape[2] == 3, "qkv: (B, N, 3, H, d)"
    return qkv.permute(2, 0, 3, 1, 4).unbind(0)


def _tma_ok(*ts):  # a descriptor's base and row strides must be 16-byte aligned
    return all((t.storage_offset() * t.element_size()) % 16 == 0 and all(
        (st * t.element_size()) % 16 == 0 for st in t.stride()[:-1]) for t in ts)


def _forward(q, k, v):
    assert supports(q, k, v), (f"not an input this kernel takes (see supports): {q.shape} "
                               f"{q.dtype}, strides {q.stride()}")
    B, H, N, d = q.shape
    o = torch.empty(B, N, H, d, device=q.device, dtype=q.dtype)  # (whole: see _backward_packed)
    lse = torch.empty(B * H, N, device=q.device, dtype=torch.float32)
    tma = FWD_TMA and hasattr(tl, "make_tensor_descriptor") and _tma_ok(q, k, v)
    if tma:  # device-side descriptors need a scratch allocation
        triton.set_allocator(lambda size, align, stream: torch.empty(size, device=q.device,
                                                                     dtype=torch.int8))
    grid = lambda meta: (triton.cdiv(N, meta["BLOCK_M"]), B * H)  # noqa: E731
    wrap_triton(_attn_fwd)[grid](q, k, v, o, lse, LOG2E / math.sqrt(d), N, H, *_strides(q),
                                 *_strides(k), *_strides(v), *_strides(o.transpose(1, 2)),
                                 HEAD_DIM=d, IS_FP32=q.dtype == torch.float32, TMA=tma)
    return o.transpose(1, 2), lse


def _backward_packed(do, q, k, v, o, lse):
    """The gradients as one packed (B, N, 3, H, d) dqkv. Each kernel is handed the whole buffer,
    never a view of it: torch.compile's Inductor copies a view that a kernel writes into a buffer
    of its own and back, and for these slot views of one buffer (torch 2.11) the copy read past
    its source, an illegal memory access in the compiled training step (pytorch/pytorch#161115,
    #192219). Whole buffers make no copies at all; the kernels find each slot by stride (sgj)."""
    B, H, N, d = q.shape
    dqkv = torch.empty(B, N, 3, H, d, device=q.device, dtype=q.dtype)
    grads = dqkv.stride(0), dqkv.stride(3), dqkv.stride(1)  # batch, head, row (as _strides)
    do = do if do.stride(-1) == 1 else do.contiguous()
    delta = torch.empty(B * H, N, device=q.device, dtype=torch.float32)
    wrap_triton(_attn_bwd_delta)[(triton.cdiv(N, 64), B * H)](o, do, delta, N, H, *_strides(o),
                                                              *_strides(do), HEAD_DIM=d, BLOCK_M=64)
    fp32, atomic = q.dtype == torch.float32, DQ_ATOMIC
    # (without atomics a one-element stand-in: the autotuner zeroes this argument between trials)
    dq_acc = torch.zeros(B * H * N * d if atomic else 1, device=q.device, dtype=torch.float32)
    args = (LOG2E / math.sqrt(d), 1.0 / math.sqrt(d), N, H, *_strides(q), *_strides(k),
            *_strides(v), *_strides(do))
    wrap_triton(_attn_bwd_dkdv)[lambda meta: (triton.cdiv(N, meta["BLOCK_N"]), B * H)](
        q, k, v, do, lse, delta, dqkv, dq_acc, *args, *grads, dqkv.stride(2), HEAD_DIM=d,
        IS_FP32=fp32, DQ_ATOMIC=atomic)
    if atomic:
        dqkv[:, :, 0] = dq_acc.view(B, H, N, d).transpose(1, 2)
    else:
        wrap_triton(_attn_bwd_dq)[lambda meta: (triton.cdiv(N, meta["BLOCK_M"]), B * H)](
            q, k, v, do, lse, delta, dqkv, *args, *grads, HEAD_DIM=d, IS_FP32=fp32)
    return dqkv


@triton_op("avmae::attention", mutates_args=())
def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor,
                                                                           torch.Tensor]:
    return _forward(q, k, v)


@triton_op("avmae::attention_bwd", mutates_args=())
def _attention_bwd(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   o: torch.Tensor,
                   lse: torch.Tensor) -> torch.Tensor:
    return _backward_packed(do, q, k, v, o, lse)  # (one tensor: an op's outputs may not alias)


@triton_op("avmae::attention_qkv", mutates_args=())
def _attention_qkv(qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return _forward(*_unpack(qkv))


@triton_op("avmae::attention_qkv_bwd", mutates_args=())
def _attention_qkv_bwd(do: torch.Tensor, qkv: torch.Tensor, o: torch.Tensor,
                       lse: torch.Tensor) -> torch.Tensor:
    return _backward_packed(do, *_unpack(qkv), o, lse)


def _setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs, *output)


def _backward(ctx, do, dlse):
    return _unpack(_attention_bwd(do, *ctx.saved_tensors))


def _backward_qkv(ctx, do, dlse):
    return _attention_qkv_bwd(do, *ctx.saved_tensors)


_attention.register_autograd(_backward, setup_context=_setup)
_attention_qkv.register_autograd(_backward_qkv, setup_context=_setup)


def attention(q: torch.Tensor, k: torch.Tensor | None = None,
              v: torch.Tensor | None = None) -> torch.Tensor:
    """Same contract as avmae.attention: a packed (B, N, 3, H, d) qkv alone, or q, k, v."""
    return (_attention_qkv(q) if k is None else _attention(q, k, v))[0]
