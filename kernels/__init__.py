"""
Triton kernels for the steps avmae.py asks for by name, and the policy that picks, per op, the
kernel or its plain-torch twin (the twins live in avmae.py: they are the readable definitions).

  file         what                                               twin in avmae.py
  gather.py    visible-token gather (+ positions), bwd = scatter   gather_tokens
  assemble.py  decoder input: [visible | mask], MAE's unshuffle    assemble / unshuffle
  attention.py fused non-causal attention, FlashAttention-2        attention
  loss.py      masked reconstruction MSE (+ per-patch norm)        recon_loss
  bench.py     each kernel against its twin (and attention against SDPA's backends), the training
               step, the loader (python kernels/bench.py -h)

Each kernel file: the @triton.jit kernel(s), a launcher with shape and dtype asserts, a
torch.library.triton_op with a hand-written backward (so torch.compile traces it without graph
breaks). tests/test_kernels.py holds each equal to its twin, forward and backward.

select(choice, twins) makes the op set: 'torch' (the twins), 'triton' (every kernel on the inputs
it supports, on CUDA tensors, and on CPU tensors under the Triton interpreter), 'auto' (a kernel
only on a GPU where MEASURED_FASTER lists it). This package never imports the model: imports run one
way, avmae -> kernels. INTERPRET: the
interpreter was asked for (TRITON_INTERPRET=1 before triton is imported), so kernels run on CPU
tensors. Without triton every op is its twin.
"""
import os

from torch.library import wrap_triton as _torch_wrap

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
try:  # (at once, not on first use: TRITON_INTERPRET is read when triton.jit decorates)
    import triton  # noqa: F401
    HAVE_TRITON = True
except ImportError:  # e.g. a CPU-only torch on aarch64: the twins run everything
    HAVE_TRITON = False

# GPUs (a name substring) on which a kernel was measured no slower than its twin, per op
# (`python kernels/bench.py --report` on that GPU prints the entry its figures support, eager and
# compiled); "attention/64": attention at head dim 64 only. The H200's entry is from its report
# (torch 2.11, Triton 3.6; docs/kernels.md): the unshuffle and the loss beat their compiled twins
# 2.2x and 1.3-1.5x; gather, assembly and attention did not.
MEASURED_FASTER: dict = {"NVIDIA H200": ("unshuffle", "loss")}


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


def pick(fast, twin, on_cpu: bool, supports=None, head_dims=None):
    """One op: the kernel where the inputs allow (CUDA tensors, or CPU ones under the interpreter;
    what `supports` takes; a listed head dim), else the twin. The inputs decide, so under
    torch.compile the choice is a trace-time constant."""
    def op(x, *args):
        use = (x.is_cuda or on_cpu) and (supports is None or supports(x, *args)) and (
            head_dims is None or x.shape[-1] in head_dims)
        return fast(x, *args) if use else twin(x, *args)
    op.__name__, op.__doc__ = twin.__name__, twin.__doc__
    return op


def select(choice: str, twins: dict, device=None) -> dict:
    """The op set behind --kernels: {name: op} over the twins' names. Chosen at run time, never
    part of what a checkpoint holds."""
    if choice not in ("auto", "triton", "torch"):
        raise ValueError(f"kernels={choice!r} is not one of auto, triton, torch")
    if choice == "torch":
        return twins
    fast, supports = FAST, SUPPORTS
    if choice == "auto":
        import torch
        gpu = torch.cuda.get_device_name(device) if torch.cuda.is_available() else ""
        listed = [op for k, ops in MEASURED_FASTER.items() if k in gpu for op in ops]
    else:
        listed = list(fast)
    ops = {}
    for name, twin in twins.items():
        dims = {int(op.split("/")[1]) for op in listed if op.startswith(name + "/")}
        if name not in fast or (name not in listed and not dims):
            ops[name] = twin
        else:
            ops[name] = pick(fast[name], twin, choice == "triton" and INTERPRET,
                             supports.get(name), None if name in listed else dims)
    return ops


FAST, SUPPORTS = {}, {}  # op -> kernel; op -> which inputs the kernel takes
if HAVE_TRITON:
    from . import assemble, attention, gather, loss
    FAST = dict(gather=gather.gather_tokens, assemble=assemble.assemble,
                unshuffle=assemble.unshuffle, attention=attention.attention, loss=loss.recon_loss)
    SUPPORTS = dict(attention=attention.supports)
