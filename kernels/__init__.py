"""
Triton kernels for the steps avmae.py routes through its ops table (issue 5, SPEC 10):

  gather.py    visible-token gather (+ positions), backward = scatter        avmae.gather_tokens
  assemble.py  decoder input: [visible | mask] and MAE's unshuffle            avmae.assemble / unshuffle
  attention.py fused non-causal attention, FlashAttention-2 forward/backward  avmae.attention
  loss.py      masked reconstruction MSE (+ per-patch target normalisation)   avmae.recon_loss
  bench.py     each kernel against its twin (and attention against SDPA's backends)

Each file: the @triton.jit kernel(s), a launcher with shape and dtype asserts, a torch.library.triton_op
with a hand-written backward (so torch.compile traces it without graph breaks), and the plain-torch
twin in avmae.py it must equal (tests/test_kernels.py holds them equal, forward and backward).

`ops(cpu_interpreter)` is the table the model uses for --kernels auto (False: kernels for CUDA
tensors, the twins elsewhere) and --kernels triton (True: also on CPU tensors when the Triton
interpreter was asked for, TRITON_INTERPRET=1 before triton is imported). Without triton installed
every op is its twin.
"""
import os

import avmae

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
try:
    import triton  # noqa: F401
    HAVE_TRITON = True
except ImportError:  # e.g. a CPU-only torch on aarch64: the twins run everything
    HAVE_TRITON = False

if HAVE_TRITON:
    from . import assemble, attention, gather, loss
    FAST = dict(gather=gather.gather_tokens, assemble=assemble.assemble, unshuffle=assemble.unshuffle,
                attention=attention.attention, loss=loss.recon_loss)


def _pick(fast, twin, cpu_interpreter: bool):
    def op(x, *args):  # the first argument's device decides (a trace-time constant for torch.compile)
        return fast(x, *args) if x.is_cuda or (cpu_interpreter and INTERPRET) else twin(x, *args)
    op.__name__, op.__doc__ = fast.__name__, fast.__doc__
    return op


def ops(cpu_interpreter: bool = False) -> dict:
    if not HAVE_TRITON:
        return dict(avmae.OPS_TORCH)
    return {k: _pick(FAST[k], avmae.OPS_TORCH[k], cpu_interpreter) for k in FAST}
