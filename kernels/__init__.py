"""
Triton kernels for the steps avmae.py routes through its ops table :

  file         what                                             twin in avmae.py
  gather.py    visible-token gather (+ positions), bwd = scatter  gather_tokens
  assemble.py  decoder input: [visible | mask], MAE's unshuffle   assemble / unshuffle
  attention.py fused non-causal attention, FlashAttention-2       attention
  loss.py      masked reconstruction MSE (+ per-patch norm)       recon_loss
  bench.py     each kernel against its twin (and attention against SDPA's backends)

Each file: the @triton.jit kernel(s), a launcher with shape and dtype asserts, a
torch.library.triton_op with a hand-written backward (so torch.compile traces it without graph
breaks), and the plain-torch twin in avmae.py it must equal (tests/test_kernels.py holds them equal,
forward and backward).

avmae.get_ops chooses between these and the twins (this package never imports the model: imports run
one way, avmae -> kernels). FAST holds the kernels, SUPPORTS a predicate per kernel for the inputs
it takes (any other input goes to the twin). INTERPRET: the Triton interpreter was asked for
(TRITON_INTERPRET=1 before triton is imported), so kernels can run on CPU tensors. Without triton
installed FAST is empty and every op is its twin.
"""
import os

from torch.library import wrap_triton as _torch_wrap

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
try:
    import triton  # noqa: F401
    HAVE_TRITON = True
except ImportError:  # e.g. a CPU-only torch on aarch64: the twins run everything
    HAVE_TRITON = False


def wrap_triton(kernel):
    """torch.library.wrap_triton(kernel): the launch as one op that torch.compile traces. Under the
    interpreter torch < 2.13 refuses the kernel (it is not a JITFunction there), and nothing is
    traced on a CPU anyway: the kernel then launches as it is."""
    try:
        return _torch_wrap(kernel)
    except RuntimeError:
        if INTERPRET:
            return kernel
        raise


FAST, SUPPORTS = {}, {}
if HAVE_TRITON:
    from . import assemble, attention, gather, loss
    FAST = dict(gather=gather.gather_tokens, assemble=assemble.assemble,
                unshuffle=assemble.unshuffle, attention=attention.attention, loss=loss.recon_loss)
    SUPPORTS = dict(attention=attention.supports)
