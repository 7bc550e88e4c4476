"""
Gather the visible tokens: out[b, k] = x[b, ids[b, k]] (+ pos[ids[b, k]]).

A memory-bound copy: each program moves BLOCK_K rows of C features. x is (B, N, C) tokens or
patches, or an (N, C) table shared by the batch (a batch stride of 0). The backward is the scatter
dx[b, ids[b, k]] = dout[b, k]; every row of ids is a slice of a permutation, so no two programs
write the same row and no atomics are needed. A table's gradient (positions) is that scatter summed
over the batch. Twin: avmae.gather_tokens.
"""
import torch
import triton
import triton.language as tl
from torch.library import triton_op

from . import INTERPRET, wrap_triton


def _blocks(C: int):
    return (16, 32) if INTERPRET else (32, min(triton.next_power_of_2(C), 256))


@triton.jit
def _gather_kernel(x_ptr, ids_ptr, pos_ptr, out_ptr, K, C, stride_xb, stride_xn, stride_ib,
                   stride_pn, stride_ob, stride_ok, HAS_POS: tl.constexpr, BLOCK_K: tl.constexpr,
                   BLOCK_C: tl.constexpr):
    b, kb = tl.program_id(0), tl.program_id(1)
    rk = kb * BLOCK_K + tl.arange(0, BLOCK_K)
    ok_k = rk < K
    rows = tl.load(ids_ptr + b * stride_ib + rk, mask=ok_k, other=0).to(tl.int64)
    for c0 in range(0, C, BLOCK_C):
        rc = c0 + tl.arange(0, BLOCK_C)
        m = ok_k[:, None] & (rc < C)[None, :]
        v = tl.load(x_ptr + b * stride_xb + rows[:, None] * stride_xn + rc[None, :], mask=m,
                    other=0.0)
        if HAS_POS:
            v = v.to(tl.float32) + tl.load(pos_ptr + rows[:, None] * stride_pn + rc[None, :],
                                           mask=m, other=0.0).to(tl.float32)
        tl.store(out_ptr + b * stride_ob + rk[:, None] * stride_ok + rc[None, :],
                 v.to(out_ptr.dtype.element_ty), mask=m)


@triton.jit
def _scatter_kernel(g_ptr, ids_ptr, dx_ptr, K, C, stride_gb, stride_gk, stride_ib, stride_db,
                    stride_dn, BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr):
    b, kb = tl.program_id(0), tl.program_id(1)
    rk = kb * BLOCK_K + tl.arange(0, BLOCK_K)
    ok_k = rk < K
    rows = tl.load(ids_ptr + b * stride_ib + rk, mask=ok_k, other=0).to(tl.int64)
    for c0 in range(0, C, BLOCK_C):
        rc = c0 + tl.arange(0, BLOCK_C)
        m = ok_k[:, None] & (rc < C)[None, :]
        g = tl.load(g_ptr + b * stride_gb + rk[:, None] * stride_gk + rc[None, :], mask=m,
                    other=0.0)
        tl.store(dx_ptr + b * stride_db + rows[:, None] * stride_dn + rc[None, :],
                 g.to(dx_ptr.dtype.element_ty), mask=m)


def _check(x, ids, pos):
    assert ids.dim() == 2 and ids.dtype == torch.int64, "ids: (B, K) int64"
    assert x.dim() in (2, 3) and x.stride(-1) == 1, "x: (B, N, C) or (N, C), last dim contiguous"
    assert x.device == ids.device
    if pos is not None:
        assert pos.dim() == 2 and pos.shape[1] == x.shape[-1] and pos.stride(-1) == 1, "pos: (N, C)"


@triton_op("avmae::gather", mutates_args=())
def _gather(x: torch.Tensor, ids: torch.Tensor, pos: torch.Tensor | None) -> torch.Tensor:
    _check(x, ids, pos)
    B, K = ids.shape
    C = x.shape[-1]
    dtype = x.dtype if pos is None else torch.promote_types(x.dtype, pos.dtype)
    out = torch.empty(B, K, C, device=x.device, dtype=dtype)
    BK, BC = _blocks(C)
    sxb, sxn = (0, x.stride(0)) if x.dim() == 2 else (x.stride(0), x.stride(1))
    p = pos if pos is not None else x
    wrap_triton(_gather_kernel)[(B, triton.cdiv(K, BK))](
        x, ids, p, out, K, C, sxb, sxn, ids.stride(0), p.stride(0), out.stride(0), out.stride(1),
        HAS_POS=pos is not None, BLOCK_K=BK, BLOCK_C=BC)
    return out


@triton_op("avmae::scatter", mutates_args=())
def _scatter(g: torch.Tensor, ids: torch.Tensor, n: int) -> torch.Tensor:
    """(B, K, C) -> (B, n, C): g's rows at ids, zeros elsewhere (fp32)."""
    B, K = ids.shape
    C = g.shape[-1]
    g = g if g.stride(-1) == 1 else g.contiguous()
    dx = torch.zeros(B, n, C, device=g.device, dtype=torch.float32)
    BK, BC = _blocks(C)
    wrap_triton(_scatter_kernel)[(B, triton.cdiv(K, BK))](
        g, ids, dx, K, C, g.stride(0), g.stride(1), ids.stride(0), dx.stride(0), dx.stride(1),
        BLOCK_K=BK, BLOCK_C=BC)
    return dx


def _setup(ctx, inputs, output):
    x, ids, pos = inputs
    ctx.save_for_backward(ids)
    ctx.x_shape, ctx.x_dtype, ctx.has_pos = x.shape, x.dtype, pos is not None
    ctx.pos_dtype = pos.dtype if pos is not None else None


def _backward(ctx, g):
    (ids,) = ctx.saved_tensors
    if not (ctx.needs_input_grad[0] or ctx.needs_input_grad[2]):
        return None, None, None
    n = ctx.x_shape[-2]
    full = _scatter(g, ids, n)  # (B, n, C)
    dx = None
    if ctx.needs_input_grad[0]:  # (an unbatched x got the sum over the batch)
        dx = (full.sum(0) if len(ctx.x_shape) == 2 else full).to(ctx.x_dtype)
    dpos = full.sum(0).to(ctx.pos_dtype) if ctx.has_pos and ctx.needs_input_grad[2] else None
    return dx, None, dpos


_gather.register_autograd(_backward, setup_context=_setup)


def gather_tokens(x: torch.Tensor, ids: torch.Tensor,
                  add: torch.Tensor | None = None) -> torch.Tensor:
    """Same contract as avmae.gather_tokens."""
    return _gather(x, ids, add)
