"""
Decoder assembly, the "unshuffle" (AV-MAE Sec. 3.3), in the two layouts the model can use:

  assemble, [visible | mask] (VideoMAE):
      out[b, k]     = x_vis[b, k] + pos_vis[ids_vis[b, k]]      (k < K)
      out[b, K + j] = mask_token  + pos_mask[ids_mask[b, j]]
  unshuffle, raster order (MAE):
      out[b, n]     = (x_vis[b, k] if n = ids_keep[b, k] else mask_token) + pos[n]

One pass writes the whole decoder input: no concatenation, no separate gather of the positions, no
argsort for ids_restore (unshuffle writes each slot to its raster row, which the ids already name).
Backward, by hand: the visible tokens' gradient is a slice (assemble) or a gather (unshuffle), the
mask token's a sum, a learned table's a scatter-add over the batch.
Twins: avmae.assemble / unshuffle.
"""
import torch
import triton
import triton.language as tl
from torch.library import triton_op

from . import INTERPRET, wrap_triton
from .gather import _gather


def _blocks(D: int):
    return (16, 32) if INTERPRET else (32, min(triton.next_power_of_2(D), 256))


@triton.jit
def _assemble_kernel(x_ptr, pv_ptr, tok_ptr, pm_ptr, iv_ptr, im_ptr, out_ptr, K, M, D, stride_xb,
                     stride_xk, stride_pv, stride_pm, stride_ivb, stride_imb, stride_ob, stride_on,
                     RASTER: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """Slots r < K are visible tokens, r >= K mask tokens. RASTER: write slot r to row ids[r] and
    add pos[ids[r]] (unshuffle); else write it to row r (assemble)."""
    b, rb = tl.program_id(0), tl.program_id(1)
    r = rb * BLOCK_R + tl.arange(0, BLOCK_R)
    vis = r < K
    msk = (r >= K) & (r < K + M)
    iv = tl.load(iv_ptr + b * stride_ivb + r, mask=vis, other=0).to(tl.int64)
    im = tl.load(im_ptr + b * stride_imb + (r - K), mask=msk, other=0).to(tl.int64)
    row = tl.where(vis, iv, im)
    dest = row if RASTER else r.to(tl.int64)
    for d0 in range(0, D, BLOCK_D):
        rd = d0 + tl.arange(0, BLOCK_D)
        okd = (rd < D)[None, :]
        xv = tl.load(x_ptr + b * stride_xb + r[:, None] * stride_xk + rd[None, :],
                     mask=vis[:, None] & okd, other=0.0)
        tok = tl.load(tok_ptr + rd, mask=rd < D, other=0.0)
        pv = tl.load(pv_ptr + iv[:, None] * stride_pv + rd[None, :], mask=vis[:, None] & okd,
                     other=0.0)
        pm = tl.load(pm_ptr + im[:, None] * stride_pm + rd[None, :], mask=msk[:, None] & okd,
                     other=0.0)
        val = tl.where(vis[:, None], xv.to(tl.float32) + pv.to(tl.float32),
                       tok[None, :].to(tl.float32) + pm.to(tl.float32))
        tl.store(out_ptr + b * stride_ob + dest[:, None] * stride_on + rd[None, :],
                 val.to(out_ptr.dtype.element_ty), mask=(vis | msk)[:, None] & okd)


def _launch(x_vis, pos_vis, tok, pos_mask, ids_vis, ids_mask, raster: bool):
    B, K, D = x_vis.shape
    M = ids_mask.shape[1]
    assert ids_vis.shape == (B, K) and ids_mask.shape[0] == B
    assert ids_vis.dtype == ids_mask.dtype == torch.int64
    assert tok.shape == (D,) and pos_vis.shape[1] == pos_mask.shape[1] == D
    assert all(t.stride(-1) == 1 for t in (x_vis, pos_vis, pos_mask, tok))
    dtype = torch.promote_types(torch.promote_types(x_vis.dtype, pos_vis.dtype),
                                torch.promote_types(tok.dtype, pos_mask.dtype))
    out = torch.empty(B, K + M, D, device=x_vis.device, dtype=dtype)
    BR, BD = _blocks(D)
    grid = (B, triton.cdiv(K + M, BR))
    wrap_triton(_assemble_kernel)[grid](
        x_vis, pos_vis, tok, pos_mask, ids_vis, ids_mask, out, K, M, D,
        x_vis.stride(0), x_vis.stride(1), pos_vis.stride(0), pos_mask.stride(0),
        ids_vis.stride(0), ids_mask.stride(0), out.stride(0), out.stride(1),
        RASTER=raster, BLOCK_R=BR, BLOCK_D=BD)
    return out


@triton_op("avmae::assemble", mutates_args=())
def _assemble(x_vis: torch.Tensor, pos_vis: torch.Tensor, mask_token: torch.Tensor,
              pos_mask: torch.Tensor, ids_vis: torch.Tensor,
              ids_mask: torch.Tensor) -> torch.Tensor:
    return _launch(x_vis, pos_vis, mask_token, pos_mask, ids_vis, ids_mask, raster=False)


@triton_op("avmae::unshuffle", mutates_args=())
def _unshuffle(x_vis: torch.Tensor, mask_token: torch.Tensor, pos: torch.Tensor,
               ids_keep: torch.Tensor, ids_mask: torch.Tensor) -> torch.Tensor:
    assert ids_keep.shape[1] + ids_mask.shape[1] == pos.shape[0], \
        "keep + mask must cover every position"
    return _launch(x_vis, pos, mask_token, pos, ids_keep, ids_mask, raster=True)


def _table_grad(g_rows, ids, n, dtype):
    """Scatter-add of (B, R, D) row gradients into an (n, D) table (learned positions only)."""
    out = torch.zeros(n, g_rows.shape[-1], device=g_rows.device, dtype=torch.float32)
    return out.index_add_(0, ids.reshape(-1), g_rows.reshape(-1,
                                                             g_rows.shape[-1]).float()).to(dtype)


def _assemble_setup(ctx, inputs, output):
    x_vis, pos_vis, tok, pos_mask, ids_vis, ids_mask = inputs
    ctx.save_for_backward(ids_vis, ids_mask)
    ctx.meta = (x_vis.dtype, tok.dtype, pos_vis.shape[0], pos_vis.dtype, pos_mask.shape[0],
                pos_mask.dtype)


def _assemble_backward(ctx, g):
    ids_vis, ids_mask = ctx.saved_tensors
    x_dtype, tok_dtype, n_vis, pv_dtype, n_mask, pm_dtype = ctx.meta
    K = ids_vis.shape[1]
    # (a table passed as both pos_vis and pos_mask gets both parts, summed by autograd)
    need = ctx.needs_input_grad
    dx = g[:, :K].to(x_dtype) if need[0] else None
    dtok = g[:, K:].sum((0, 1), dtype=torch.float32).to(tok_dtype) if need[2] else None
    dpv = _table_grad(g[:, :K], ids_vis, n_vis, pv_dtype) if need[1] else None
    dpm = _table_grad(g[:, K:], ids_mask, n_mask, pm_dtype) if need[3] else None
    return dx, dpv, dtok, dpm, None, None


def _unshuffle_setup(ctx, inputs, output):
    x_vis, tok, pos, ids_keep, ids_mask = inputs
    ctx.save_for_backward(ids_keep, ids_mask)
    ctx.meta = (x_vis.dtype, tok.dtype, pos.dtype)


def _unshuffle_backward(ctx, g):
    ids_keep, ids_mask = ctx.saved_tensors
    x_dtype, tok_dtype, pos_dtype = ctx.meta
    need = ctx.needs_input_grad
    dx = _gather(g, ids_keep, None).to(x_dtype) if need[0] else None
    dtok = _gather(g, ids_mask,
                   None).sum((0, 1), dtype=torch.float32).to(tok_dtype) if need[1] else None
    dpos = g.sum(0, dtype=torch.float32).to(pos_dtype) if need[2] else None
    return dx, dtok, dpos, None, None


_assemble.register_autograd(_assemble_backward, setup_context=_assemble_setup)
_unshuffle.register_autograd(_unshuffle_backward, setup_context=_unshuffle_setup)


def assemble(x_vis, pos_vis, mask_token, pos_mask, ids_vis, ids_mask):
    """Same contract as avmae.assemble."""
    return _assemble(x_vis, pos_vis, mask_token, pos_mask, ids_vis, ids_mask)


def unshuffle(x_vis, mask_token, pos, ids_keep, ids_mask):
    """Same contract as avmae.unshuffle."""
    return _unshuffle(x_vis, mask_token, pos, ids_keep, ids_mask)
