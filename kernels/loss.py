"""
Masked reconstruction loss (Eq. 1): mean over the M predicted tokens and P features of
(pred[b, m] - t[b, m])^2, t = patches[b, ids[b, m]], optionally normalised per patch (MAE's
norm_pix_loss: (t - mean) / sqrt(var + 1e-6), unbiased var).

Fused: the target rows are gathered, normalised and compared in registers; the forward writes one
partial sum per row, the backward recomputes the target and writes d pred = 2 (pred - t) / (B M P).
Nothing of size (B, M, P) is materialised but the gradient. Twin: avmae.recon_loss.
"""
import torch
import triton
import triton.language as tl
from torch.library import triton_op

from . import wrap_triton


@triton.jit
def _target(patch_ptr, ids_ptr, b, m, stride_pb, stride_pn, stride_ib, rp, okp, P,
            NORM: tl.constexpr):
    row = tl.load(ids_ptr + b * stride_ib + m).to(tl.int64)
    t = tl.load(patch_ptr + b * stride_pb + row * stride_pn + rp, mask=okp,
                other=0.0).to(tl.float32)
    if NORM:
        mean = tl.sum(t, axis=0) / P
        var = tl.sum(tl.where(okp, (t - mean) * (t - mean), 0.0), axis=0) / (P - 1)
        t = (t - mean) / tl.sqrt(var + 1e-6)
    return t


@triton.jit
def _loss_fwd(pred_ptr, patch_ptr, ids_ptr, rows_ptr, M, P, stride_qb, stride_qm, stride_pb,
              stride_pn, stride_ib, NORM: tl.constexpr, BLOCK_P: tl.constexpr):
    i = tl.program_id(0)  # one (b, m) row per program
    b, m = i // M, i % M
    rp = tl.arange(0, BLOCK_P)
    okp = rp < P
    t = _target(patch_ptr, ids_ptr, b, m, stride_pb, stride_pn, stride_ib, rp, okp, P, NORM)
    q = tl.load(pred_ptr + b * stride_qb + m * stride_qm + rp, mask=okp, other=0.0).to(tl.float32)
    d = tl.where(okp, q - t, 0.0)
    tl.store(rows_ptr + i, tl.sum(d * d, axis=0))


@triton.jit
def _loss_bwd(pred_ptr, patch_ptr, ids_ptr, grad_ptr, dpred_ptr, M, P, scale, stride_qb, stride_qm,
              stride_pb, stride_pn, stride_ib, NORM: tl.constexpr, BLOCK_P: tl.constexpr):
    scale = tl.cast(scale, tl.float32)  # (torch.compile passes a Python float as fp64)
    i = tl.program_id(0)
    b, m = i // M, i % M
    rp = tl.arange(0, BLOCK_P)
    okp = rp < P
    t = _target(patch_ptr, ids_ptr, b, m, stride_pb, stride_pn, stride_ib, rp, okp, P, NORM)
    q = tl.load(pred_ptr + b * stride_qb + m * stride_qm + rp, mask=okp, other=0.0).to(tl.float32)
    g = tl.load(grad_ptr).to(tl.float32)
    tl.store(dpred_ptr + i * P + rp, (2.0 * scale * g * (q - t)).to(dpred_ptr.dtype.element_ty),
             mask=okp)


def _check(pred, patches, ids):
    B, M, P = pred.shape
    assert ids.shape == (B, M) and ids.dtype == torch.int64, "ids: (B, M) int64"
    assert patches.dim() == 3 and patches.shape[0] == B and patches.shape[2] == P, \
        "patches: (B, N, P)"
    assert pred.stride(-1) == 1 and patches.stride(-1) == 1


@triton_op("avmae::recon_loss", mutates_args=())
def _loss(pred: torch.Tensor, patches: torch.Tensor, ids: torch.Tensor,
          norm_pix: bool) -> torch.Tensor:
    _check(pred, patches, ids)
    B, M, P = pred.shape
    rows = torch.empty(B * M, device=pred.device, dtype=torch.float32)
    wrap_triton(_loss_fwd)[(B * M,)](pred, patches, ids, rows, M, P, pred.stride(0), pred.stride(1),
                                     patches.stride(0), patches.stride(1), ids.stride(0),
                                     NORM=norm_pix, BLOCK_P=triton.next_power_of_2(P))
    return rows.sum() / (B * M * P)


@triton_op("avmae::recon_loss_bwd", mutates_args=())
def _loss_backward_op(grad: torch.Tensor, pred: torch.Tensor, patches: torch.Tensor,
                      ids: torch.Tensor, norm_pix: bool) -> torch.Tensor:
    B, M, P = pred.shape
    dpred = torch.empty(B, M, P, device=pred.device, dtype=pred.dtype)
    wrap_triton(_loss_bwd)[(B * M,)](pred, patches, ids, grad, dpred, M, P, 1.0 / (B * M * P),
                                     pred.stride(0), pred.stride(1), patches.stride(0),
                                     patches.stride(1), ids.stride(0), NORM=norm_pix,
                                     BLOCK_P=triton.next_power_of_2(P))
    return dpred


def _setup(ctx, inputs, output):
    pred, patches, ids, norm_pix = inputs
    ctx.save_for_backward(pred, patches, ids)
    ctx.norm_pix = norm_pix


def _backward(ctx, g):
    pred, patches, ids = ctx.saved_tensors
    return _loss_backward_op(g.float().contiguous(), pred, patches, ids,
                             ctx.norm_pix), None, None, None


_loss.register_autograd(_backward, setup_context=_setup)


def recon_loss(pred: torch.Tensor, patches: torch.Tensor, ids: torch.Tensor,
               norm_pix: bool) -> torch.Tensor:
    """Same contract as avmae.recon_loss (the target patches get no gradient, as there)."""
    return _loss(pred, patches.detach(), ids, norm_pix)
