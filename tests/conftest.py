import os
import signal
import sys

import pytest
import torch  # (torch does not import triton)


def _interpreter_refused() -> str:
    """Why this machine's Triton interpreter cannot run the kernels, or ''. Triton < 3.7 calls int()
    on one-element arrays, which NumPy >= 2.4 refuses (triton-lang/triton#9171)."""
    from importlib.metadata import PackageNotFoundError, version
    try:
        t, n = version("triton"), version("numpy")
    except PackageNotFoundError:
        return ""
    major = lambda v: tuple(int(x) for x in v.split(".")[:2])  # noqa: E731
    if major(t) < (3, 7) and major(n) >= (2, 4):
        return (f"triton {t}'s interpreter fails under numpy {n} (triton-lang/triton#9171): "
                f"pip install 'numpy<2.4' or 'triton>=3.7' to run the kernel tests on a CPU")
    return ""


# Without a GPU the kernel tests run Triton's interpreter on the CPU; it must be asked for before
# triton is imported. Only models built with kernels='triton' use it: the default ('auto') runs the
# torch twins on CPU. With a GPU, Triton compiles for it (tests/test_kernels_gpu.py; the
# interpreter's tests skip, saying so), unless TRITON_INTERPRET is set either way.
REFUSED = "" if torch.cuda.is_available() else _interpreter_refused()
os.environ.setdefault("TRITON_INTERPRET", "0" if torch.cuda.is_available() or REFUSED else "1")

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# one thread per test process when pytest-xdist runs several (-n 2 on 2 cores), else two
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else min(2, os.cpu_count() or 1))

import avmae  # noqa: E402

# a CPU-sized model: 4 frames of 32x32 in 2x8x8 tubelets (32 video tokens), 64 x 32 log-mel in 8x8
# patches (32 audio tokens); the same code as the paper model, other numbers.
TINY_INPUTS = dict(num_frames=4, image_size=32, patch_size=8, audio_frames=64, mel_bins=32,
                   audio_patch_t=8, audio_patch_f=8)


def tiny_config(**overrides):
    return avmae.make_config("tiny", **{**TINY_INPUTS, **overrides})


def tiny_batch(cfg, B=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = {}
    if "a" in cfg.modalities:
        x["a"] = torch.randn(B, cfg.audio_frames, cfg.mel_bins, generator=g)
    if "v" in cfg.modalities:
        x["v"] = torch.rand(B, cfg.in_chans, cfg.num_frames, cfg.image_size, cfg.image_size,
                            generator=g) * 2 - 1
    return x


def ranks(body, world: int = 2, timeout: float = 300.0) -> tuple:
    """Runs body() on `world` ranks of one job, each in a process forked from this one, with the
    environment torchrun gives a rank (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT, and
    the store held by the launcher, TORCHELASTIC_USE_AGENT_STORE).
    torch and the project are then imported already: a torchrun job's start-up (its agent and
    every rank import torch) is most of a small job's time on 2 cores. test_faults.py still runs
    torchrun itself where its own part is tested (a restart). As torchrun does, the first rank
    that fails ends the others. Returns ([exit code per rank], the ranks' output, rank 0's
    first); a SystemExit's code as Python gives it (a message: 1)."""
    import tempfile
    import time
    # the job's rendezvous store, held here for its whole length as torchrun's agent holds it (a
    # rank 0 that hosted it closed it between one process group and the next, and a rank 1 still
    # on its way in read "Connection was likely closed")
    store = torch.distributed.TCPStore("127.0.0.1", 0, world, is_master=True,
                                       wait_for_workers=False)
    port = store.port
    logs = [tempfile.TemporaryFile("w+") for _ in range(world)]
    pids = []
    for r in range(world):
        pid = os.fork()
        if pid == 0:  # the rank: its output into its log, and never back into pytest
            code = 1
            try:
                os.dup2(logs[r].fileno(), 1)
                os.dup2(logs[r].fileno(), 2)
                sys.stdout = sys.stderr = open(1, "w", buffering=1, closefd=False)
                os.environ.update(RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE=str(world),
                                  LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                                  MASTER_PORT=str(port), TORCHELASTIC_USE_AGENT_STORE="True")
                torch.set_num_threads(1)
                body()
                code = 0
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else 0 if e.code is None else (
                    print(e.code) or 1)
            except BaseException:
                import traceback
                traceback.print_exc()
            finally:
                sys.stdout.flush()
                os._exit(code)
        pids.append(pid)
    codes, end = [None] * world, time.time() + timeout
    while None in codes:
        for i, pid in enumerate(pids):
            if codes[i] is None:
                done, status = os.waitpid(pid, os.WNOHANG)
                codes[i] = os.waitstatus_to_exitcode(status) if done else None
        if None in codes and (any(codes) or time.time() > end):
            for pid, code in zip(pids, codes):
                if code is None:
                    os.kill(pid, signal.SIGKILL)
        time.sleep(0.02)
    del store
    out = []
    for f in logs:
        f.seek(0)
        out.append(f.read())
        f.close()
    assert time.time() <= end, f"the ranks ran past {timeout} s: {''.join(out)[-3000:]}"
    return codes, "".join(out)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _own_folder(tmp_path, monkeypatch):
    """Every test runs in its own tmp dir: the defaults a command falls back on (data/builtin,
    out/quick, ...) are then the test's, never what a user's run left in the checkout."""
    monkeypatch.chdir(tmp_path)


@pytest.fixture(scope="session")
def builtin(tmp_path_factory):
    """A small built-in data set (32 clips), made once per test session."""
    import data
    return data.make_builtin(str(tmp_path_factory.mktemp("bi") / "builtin"), n_train=24, n_test=8)


def pytest_configure(config):
    # torchvision 0.29 deprecates its JPEG codec (README: Known differences); one note is enough
    config.addinivalue_line("filterwarnings",
                            "ignore:The image decoding and encoding capabilities of TorchVision")
    config.addinivalue_line("markers", "slow(seconds): about that long on 2 cores; run first "
                            "(-m 'not slow' leaves them out)")
    # pytest-xdist hands each process one test at a time, in the order below, not a run of them
    if getattr(config.option, "maxschedchunk", 0) is None:
        config.option.maxschedchunk = 1


def pytest_collection_modifyitems(items):
    """The longest tests first, as their marks estimate: with -n 2 the two processes then end
    together (one started last would keep a core idle for its whole length). The rest keep the
    files' order."""
    def seconds(item):
        mark = item.get_closest_marker("slow")
        return mark.args[0] if mark else 0
    items.sort(key=seconds, reverse=True)
