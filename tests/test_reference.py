"""The quick recipe, held bit-equal: the first 50 pretraining losses of `train.py --preset quick`
on the built-in set (CPU, fp32, one thread) and a short finetuning from that checkpoint. A change
that means to change results regenerates the fixture (`python tests/test_reference.py`) and says
why in its commit; a refactor must leave it alone. Bit-equal holds on the machine kind and versions
that recorded it (matmul kernels differ by CPU and library); elsewhere the figures agree to 1e-5
relative (drift seen between two CPUs: 1e-7)."""
import json
import math
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data  # noqa: E402
import finetune  # noqa: E402
import train  # noqa: E402

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "quick_reference.json")
STEPS = 50


def run(tmp: str) -> dict:
    """The quick preset's first STEPS steps (its schedule: --stop_at, not --max_steps), then 40
    finetuning steps from that checkpoint, evaluated."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # (reductions in another order round otherwise)
    try:
        root = data.make_builtin(os.path.join(tmp, "builtin"))
        pre = os.path.join(tmp, "pre")
        res = train.main(["--preset", "quick", "--data", root, "--out_dir", pre, "--workers", "0",
                          "--stop_at", str(STEPS), "--log_every", "1", "--picture_every", "0",
                          "--kernels", "torch", "--precision", "fp32"])
        losses = [json.loads(line)["loss"] for line in open(os.path.join(pre, "log.jsonl"))
                  if '"loss"' in line]
        ft = finetune.main(["--preset", "quick", "--data", root, "--init", res["checkpoint"],
                            "--out_dir", os.path.join(tmp, "ft"), "--workers", "0",
                            "--max_steps", "40", "--kernels", "torch", "--precision", "fp32"])
        ft_losses = [json.loads(line)["loss"] for line in open(os.path.join(tmp, "ft",
                                                                            "log.jsonl"))
                     if '"loss"' in line]
    finally:
        torch.set_num_threads(threads)
    metrics = {k: v for k, v in ft.items() if isinstance(v, (int, float))}
    return dict(pretrain_losses=losses, finetune_losses=ft_losses, finetune_metrics=metrics,
                machine=machine())


def machine() -> dict:
    """What the last bits of a float result depend on."""
    import platform

    import numpy
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                if line.startswith("model name")), platform.processor()) \
        if os.path.exists("/proc/cpuinfo") else platform.processor()
    return dict(cpu=cpu, capability=torch.backends.cpu.get_cpu_capability(),
                torch=torch.__version__, numpy=numpy.__version__)


def same(a, b, exact: bool) -> bool:
    if isinstance(a, list):
        return len(a) == len(b) and all(same(x, y, exact) for x, y in zip(a, b))
    if math.isnan(a) or b is None or math.isnan(b):
        return b is not None and math.isnan(a) and math.isnan(b)
    return a == b if exact else abs(a - b) <= 1e-5 * max(abs(a), abs(b))


@pytest.mark.slow(40)
def test_the_quick_recipe_is_bit_equal_to_its_reference(tmp_path):
    want = json.load(open(FIXTURE))
    got = run(str(tmp_path))
    assert len(got["pretrain_losses"]) == STEPS
    exact = want.get("machine") == got["machine"]
    for key in ("pretrain_losses", "finetune_losses"):
        assert same(want[key], got[key], exact), (key, exact, want[key], got[key])
    off = {k: (v, got["finetune_metrics"].get(k)) for k, v in want["finetune_metrics"].items()
           if not same(v, got["finetune_metrics"].get(k), exact)}
    assert not off, (exact, off)


if __name__ == "__main__":  # regenerate the fixture
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        out = run(tmp)
    with open(FIXTURE, "w") as f:
        json.dump(out, f, indent=1)
    print(f"wrote {FIXTURE}: {len(out['pretrain_losses'])} pretraining losses, "
          f"{out['finetune_metrics']}")
