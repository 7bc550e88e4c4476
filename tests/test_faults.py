"""Faults a cluster run meets: a scheduler's signal, a dying rank, a stuck rank, a full disk, a
damaged checkpoint, data that disappears or a loader worker that dies; finetune.py as safe as
train.py."""
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import data
import finetune
import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--preset", "quick", "--num_frames", "4", "--image_size", "32", "--patch_size", "16",
        "--audio_frames", "64", "--mel_bins", "32", "--workers", "0", "--log_every", "1",
        "--picture_every", "0", "--batch_size", "8", "--kernels", "torch", "--blr", "1.5e-3"]
FT_TINY = ["--preset", "quick", "--num_frames", "4", "--image_size", "32", "--audio_frames", "64",
           "--workers", "0", "--batch_size", "8", "--views", "1", "--kernels", "torch",
           "--log_every", "1"]


def weights(path):
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


def same(a, b):
    wa, wb = weights(a), weights(b)
    return set(wa) == set(wb) and all(torch.equal(wa[k], wb[k]) for k in wa)


def signal_at(step_to_signal, sig=signal.SIGTERM):
    def hook(step, batch):
        if step == step_to_signal:
            os.kill(os.getpid(), sig)
        return batch
    return hook


# -----------------------------------------------------------------------------
# preemption: SIGTERM / SIGUSR1 -> finish the step, checkpoint, exit 75; --resume auto is exact


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_preempted_run_checkpoints_exits_75_and_resumes_exactly(builtin, tmp_path, capsys, sig):
    args = [*TINY, "--data", builtin, "--max_steps", "6", "--save_every", "100"]
    full = train.main([*args, "--out_dir", str(tmp_path / "full")])
    with pytest.raises(SystemExit) as e:
        train.main([*args, "--out_dir", str(tmp_path / "cut")], hooks={"batch": signal_at(2, sig)})
    assert e.value.code == train.EXIT_PREEMPTED
    err = capsys.readouterr().err
    assert f"stopped at step 3 on {sig.name}" in err and "--resume auto to continue" in err
    # the step in flight finished
    assert sorted(f for f in os.listdir(tmp_path / "cut") if f.startswith("ckpt"))[:1] == [
        "ckpt_0000003.pt"]
    res = train.main([*args, "--out_dir", str(tmp_path / "cut"), "--resume", "auto"])
    assert res["step"] == 6 and same(full["checkpoint"], res["checkpoint"])


@pytest.mark.slow(11)
@pytest.mark.parametrize("sig", ["TERM", "INT"])
def test_a_signal_to_every_process_of_the_job_still_checkpoints(builtin, tmp_path, capfd, sig):
    # a scheduler's preemption (SLURM, scancel) signals every process of the job, the loader's
    # workers too, and Ctrl-C every process in the terminal's foreground; killed by it, a worker
    # failed the run in its last step ("DataLoader worker is killed by signal"), with no
    # checkpoint. The workers leave the stop to the main process.
    import multiprocessing

    workers = []

    def everyone(step, batch):
        if step == 2:  # (both workers have delivered a batch: they are set up)
            workers.extend(multiprocessing.active_children())
            # sent by another process, as a scheduler's is
            subprocess.run(["kill", f"-{sig}", str(os.getpid()), *[str(p.pid) for p in workers]],
                           check=True)
        if step == 3:  # (the batches of these steps were on their way: the workers must live on)
            time.sleep(0.5)
            assert len(workers) == 2 and all(p.exitcode is None for p in workers), workers
        return batch
    args = [*TINY, "--data", builtin, "--max_steps", "6", "--workers", "2"]
    with pytest.raises(SystemExit) as e:
        train.main([*args, "--out_dir", str(tmp_path)], hooks={"batch": everyone})
    err = capfd.readouterr().err
    if sig == "INT":  # (the first Ctrl-C: said at once, by the main process only; exit 130)
        assert e.value.code == train.EXIT_INTERRUPTED, e.value.code
        assert err.count("Ctrl-C: stopping after this step") == 1, err
        assert "stopped at step 3 on Ctrl-C" in err
    else:
        assert e.value.code == train.EXIT_PREEMPTED, e.value.code
        assert "stopped at step 3 on SIGTERM" in err
    assert train.load_checkpoint(str(tmp_path / "ckpt_0000003.pt"), "--resume")["step"] == 3
    # the run's end ended its workers, with the exception's traceback still held (left to the
    # garbage collector, each took 5 s: a notebook or a job that runs on waited 10 s)
    assert [p.exitcode for p in workers] == [0, 0]
    if sig == "INT":
        return
    # a SIGTERM from the worker's own main process (the loader's terminate(), at exit) still ends
    # it: a worker that ignored that one would hang the main process's exit
    loader = data.make_loader(data.DataConfig(root=builtin, num_frames=4, image_size=32,
                                              audio_frames=64, mel_bins=32), 2, workers=1)
    it = iter(loader)
    next(it)
    worker = it._workers[0]
    for sig in (signal.SIGHUP, signal.SIGINT, signal.SIGUSR1):  # (a closed terminal's, ...)
        os.kill(worker.pid, sig)
    time.sleep(0.3)
    assert worker.exitcode is None and len(next(it)["a"]) == 2  # (not killed: it still works)
    worker.terminate()
    worker.join(timeout=10)
    assert worker.exitcode == 0  # (0: the loader does not report it as a worker that died)
    del it


def read_until_3_steps(p, fd: int, log) -> bytes:
    """What a reader of the run's output (a terminal, tee) reads until 3 steps are logged."""
    import select
    shown, t0 = b"", time.time()
    while time.time() - t0 < 90 and p.poll() is None:
        if select.select([fd], [], [], 0.2)[0]:
            shown += os.read(fd, 65536)
        if log.exists() and sum('"loss"' in line for line in open(log)) >= 3:
            break
    assert p.poll() is None, shown.decode(errors="replace")[-2000:]
    return shown


def stopped_with_its_checkpoint(out, signal_name: str):
    """The run's last log line is its stop, naming a checkpoint at that step, which loads."""
    last = json.loads(open(out / "log.jsonl").read().splitlines()[-1])
    step = last["step"]
    assert last["event"] == "stopped" and f"on {signal_name}" in last["message"], last
    assert 3 <= step < 400 and f"ckpt_{step:07d}.pt" in last["message"]
    assert train.load_checkpoint(str(out / f"ckpt_{step:07d}.pt"), "--resume")["step"] == step
    assert not [f for f in os.listdir(out) if f.endswith(".tmp")]


@pytest.mark.slow(12)
def test_a_closed_terminal_checkpoints_and_says_so_in_the_log(builtin, tmp_path):
    # an ssh connection that drops hangs up the run's terminal: the kernel sends SIGHUP to the
    # session's leader, the login shell passes it on to its jobs (here: sent to the run's process
    # group, its loader's workers too), and from then on every write to the terminal fails (EIO).
    # Killed by the SIGHUP (or ended by a failed write of its progress bar) the run lost every step
    # since its last checkpoint; it must checkpoint at the step and say so where it still can.
    import fcntl
    import termios
    out = tmp_path / "o"
    master, slave = os.openpty()
    cmd = [sys.executable, "train.py", *TINY, "--data", builtin, "--max_steps", "400",
           "--workers", "2", "--save_every", "1000", "--out_dir", str(out)]
    # (its own session, the pty its controlling terminal: as a login shell's job)
    p = subprocess.Popen(cmd, cwd=ROOT, stdin=slave, stdout=slave, stderr=slave,
                         start_new_session=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                         preexec_fn=lambda: fcntl.ioctl(0, termios.TIOCSCTTY, 0))
    os.close(slave)
    try:
        shown = read_until_3_steps(p, master, out / "log.jsonl")
    finally:
        os.close(master)  # the hang-up: the kernel signals the session's leader
    os.killpg(p.pid, signal.SIGHUP)  # (the shell's, to the whole job)
    assert p.wait(timeout=60) == train.EXIT_PREEMPTED, shown.decode(errors="replace")[-2000:]
    stopped_with_its_checkpoint(out, "SIGHUP")


@pytest.mark.slow(8)
def test_ctrl_c_under_tee_still_checkpoints(builtin, tmp_path):
    # `train.py 2>&1 | tee log`, then Ctrl-C: the terminal's SIGINT stops tee too, and the run's
    # next write (its progress bar's) met a pipe without a reader: BrokenPipeError, exit 1, no
    # checkpoint. Here the reader goes (the pipe's read end closed), then the SIGINT comes.
    out = tmp_path / "o"
    cmd = [sys.executable, "train.py", *TINY, "--data", builtin, "--max_steps", "400",
           "--save_every", "1000", "--out_dir", str(out)]
    p = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    read_until_3_steps(p, p.stdout.fileno(), out / "log.jsonl")
    p.stdout.close()  # tee, gone
    p.send_signal(signal.SIGINT)
    assert p.wait(timeout=60) == train.EXIT_INTERRUPTED
    stopped_with_its_checkpoint(out, "Ctrl-C")


def test_an_out_dir_in_use_by_another_run_is_one_line(builtin, tmp_path):
    # the same command started twice, or --resume auto on a run that is still going, wrote one
    # run's checkpoints among the other's: rank 0 holds its --out_dir while it runs (an flock)
    out = tmp_path / "o"
    out.mkdir()
    hold = ("import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT); "
            "fcntl.flock(fd, fcntl.LOCK_EX); os.write(fd, b'4242'); print('held', flush=True); "
            "time.sleep(60)")
    other = subprocess.Popen([sys.executable, "-c", hold, str(out / ".lock")],
                             stdout=subprocess.PIPE, text=True)
    args = [*TINY, "--data", builtin, "--max_steps", "1", "--out_dir", str(out)]
    try:
        assert other.stdout.readline() == "held\n"
        with pytest.raises(SystemExit, match=r"another run is writing there \(pid 4242\): wait "):
            train.main(args)
    finally:
        other.kill()
        other.wait()
    assert train.main(args)["step"] == 1  # (free again)
    # released when a run ends: the same process goes on with it at once
    assert train.main([*args, "--max_steps", "2", "--resume", "auto"])["step"] == 2


def test_a_second_ctrl_c_stops_at_once_in_one_line(builtin, tmp_path, capsys):
    # the first Ctrl-C asks for a checkpointed stop, the second stops at once: one line, exit 130,
    # the last checkpoint intact; the handlers are put back
    def twice(step, batch):
        if step == 3:
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)
        return batch
    before = signal.getsignal(signal.SIGINT)
    args = [*TINY, "--data", builtin, "--max_steps", "6", "--save_every", "2"]
    with pytest.raises(SystemExit) as e:
        train.command_line(lambda: train.main([*args, "--out_dir", str(tmp_path)],
                                              hooks={"batch": twice}))
    assert e.value.code == train.EXIT_INTERRUPTED
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1] == train.CTRL_C_AGAIN and "Traceback" not in err
    assert sorted(f for f in os.listdir(tmp_path) if f.startswith("ckpt")) == ["ckpt_0000002.pt"]
    assert train.load_checkpoint(str(tmp_path / "ckpt_0000002.pt"), "--resume")["step"] == 2
    assert signal.getsignal(signal.SIGINT) is before


def test_under_torchrun_one_ctrl_c_arrives_twice_and_is_one_press(monkeypatch):
    # the terminal's SIGINT and torchrun's forward of it: one press, not the second, which would
    # stop the rank without its checkpoint
    now = [100.0]
    monkeypatch.setattr(time, "monotonic", lambda: now[0])
    monkeypatch.setenv("RANK", "1")  # (rank 0 would say it on stderr)
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job")
    p = train.Preemption()
    p._ask(signal.SIGINT, None)
    now[0] += 0.3
    p._ask(signal.SIGINT, None)  # (forwarded)
    assert p.signal == "Ctrl-C"
    now[0] += 5
    with pytest.raises(KeyboardInterrupt):  # a second press
        p._ask(signal.SIGINT, None)
    monkeypatch.delenv("TORCHELASTIC_RUN_ID")  # without torchrun nothing forwards: the second
    p = train.Preemption()
    p._ask(signal.SIGINT, None)
    with pytest.raises(KeyboardInterrupt):
        p._ask(signal.SIGINT, None)


def test_a_second_ctrl_c_while_saving_leaves_no_half_file(tmp_path, monkeypatch):
    # (a half-written ViT-L checkpoint is gigabytes of disk)
    train.save_checkpoint(str(tmp_path), dict(w=torch.ones(3)), 1, keep=3)
    real = torch.save

    def interrupted(obj, f, *a, **k):
        real(obj, f, *a, **k)
        raise KeyboardInterrupt
    monkeypatch.setattr(torch, "save", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train.save_checkpoint(str(tmp_path), dict(w=torch.zeros(3)), 2, keep=3)
    assert sorted(os.listdir(tmp_path)) == ["ckpt_0000001.pt", "latest"]
    assert open(tmp_path / "latest").read() == "ckpt_0000001.pt"


def test_a_second_signal_while_saving_does_not_corrupt_the_checkpoint(builtin, tmp_path,
                                                                      monkeypatch):
    real = torch.save

    def save_and_signal(obj, f, *a, **k):
        os.kill(os.getpid(), signal.SIGTERM)  # the scheduler insists, mid-save
        return real(obj, f, *a, **k)
    monkeypatch.setattr(torch, "save", save_and_signal)
    with pytest.raises(SystemExit) as e:
        train.main([*TINY, "--data", builtin, "--max_steps", "6", "--out_dir", str(tmp_path)],
                   hooks={"batch": signal_at(1)})
    assert e.value.code == train.EXIT_PREEMPTED
    # intact: checksum and all
    ck = train.load_checkpoint(str(tmp_path / "ckpt_0000002.pt"), "--resume")
    assert ck["step"] == 2 and open(tmp_path / "latest").read() == "ckpt_0000002.pt"


# ----------------------------------------------------------------------------- a rank dies
# (SIGKILL) under torchrun --max-restarts: the job restarts from the latest checkpoint by itself;
# a rank hangs: the others stop naming it instead of waiting for hours

DYING = """
import os, signal, sys
sys.path.insert(0, {root!r})
import train
rank, restart = int(os.environ["RANK"]), int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
def hook(step, batch):
    if step == 3 and rank == 1 and restart == 0:
        os.kill(os.getpid(), signal.SIGKILL)
    return batch
train.main(sys.argv[1:], hooks={{"batch": hook}})
"""


@pytest.mark.slow(35)
def test_a_killed_rank_restarts_from_the_latest_checkpoint(builtin, tmp_path):
    # (torchrun itself: its restart is what is tested)
    args = [*TINY, "--data", builtin, "--max_steps", "6", "--save_every", "2"]
    (tmp_path / "job.py").write_text(DYING.format(root=ROOT))
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                        "--nproc_per_node=2", "--max-restarts=1", str(tmp_path / "job.py"), *args,
                        "--out_dir", str(tmp_path / "two")], cwd=ROOT, capture_output=True,
                       text=True, timeout=120,
                       env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"})
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    assert "torchrun restart 1: continuing from the newest intact checkpoint" in p.stdout
    # the same weights as one process with the same global batch (2 processes equal 1:
    # test_train.py)
    one = train.main([*args, "--out_dir", str(tmp_path / "one")])
    w1, w2 = weights(one["checkpoint"]), weights(tmp_path / "two" / "ckpt_0000006.pt")
    # (up to float summation order: one Adam step of lr 4.7e-5 moves a weight by about that much,
    # so a lost or repeated step is far outside 1e-5)
    assert all(torch.allclose(w1[k], w2[k], atol=1e-5) for k in w1)


@pytest.mark.slow(12)
def test_a_stuck_rank_stops_the_others_with_its_name(builtin, tmp_path):
    # (then it finds the others gone; a job's ranks here are forked: conftest.ranks)
    from conftest import ranks

    def stuck(step, batch):
        if step == 2 and os.environ["RANK"] == "1":
            time.sleep(12)
        return batch
    args = [*TINY, "--data", builtin, "--max_steps", "6", "--dist_timeout", "4", "--out_dir",
            str(tmp_path / "o")]
    t0 = time.time()
    codes, out = ranks(lambda: train.main(args, hooks={"batch": stuck}), timeout=100)
    assert codes[0] != 0 and time.time() - t0 < 40
    assert ("rank 0, step 2: a collective failed or timed out (--dist_timeout 4 s); "
            "rank(s) 1 did not answer") in out, out[-3000:]


# -----------------------------------------------------------------------------
# a full disk: the previous checkpoint and `latest` stay, the run says so and retries (or stops)


def test_a_full_disk_keeps_the_last_checkpoint_and_retries_or_stops(builtin, tmp_path, monkeypatch,
                                                                    capsys):
    real, calls = torch.save, []

    def full_disk(obj, f, *a, **k):
        calls.append(obj["step"])
        if obj["step"] == 4:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(obj, f, *a, **k)
    monkeypatch.setattr(torch, "save", full_disk)
    args = [*TINY, "--data", builtin, "--max_steps", "6", "--save_every", "2"]
    res = train.main([*args, "--out_dir", str(tmp_path / "retry")])
    err = capsys.readouterr().err
    assert "ckpt_0000004.pt: not written (ENOSPC: No space left on device)" in err
    assert "next save tries again" in err
    assert res["step"] == 6 and calls == [
        2, 4, 6] and not os.path.exists(tmp_path / "retry" / "ckpt_0000004.pt.tmp")
    with pytest.raises(SystemExit, match="ENOSPC.*previous checkpoint and `latest` are intact"):
        train.main([*args, "--out_dir", str(tmp_path / "stop"), "--on_save_error", "stop"])
    assert open(tmp_path / "stop" / "latest").read() == "ckpt_0000002.pt"
    assert train.load_checkpoint(str(tmp_path / "stop" / "ckpt_0000002.pt"), "x")["step"] == 2


def test_a_full_disk_costs_log_lines_and_pictures_not_the_run(builtin, tmp_path, capsys):
    # a disk that fills up fails the log and the pictures too, not only the checkpoints: those
    # lines and files are lost, said once each, and the run goes on; finetuning's final results,
    # if lost, are written by the same command with --resume auto
    out = tmp_path / "pre"
    for name in ("log.jsonl", "recon_latest.png"):  # (a folder there: every write fails)
        (out / name).mkdir(parents=True)
    res = train.main([*TINY, "--data", builtin, "--max_steps", "4", "--picture_every", "2",
                      "--out_dir", str(out)])
    assert res["step"] == 4 and os.path.exists(out / "ckpt_0000004.pt")
    err = capsys.readouterr().err
    assert err.count(f"{out / 'log.jsonl'}: not written (EISDIR: Is a directory); the run") == 1
    assert err.count(f"{out / 'recon_latest.png'}: not written") == 1
    ft = tmp_path / "ft"
    (ft / "metrics.json").mkdir(parents=True)
    args = [*FT_TINY, "--data", builtin, "--max_steps", "4", "--out_dir", str(ft)]
    with pytest.raises(SystemExit, match=r"not all written \(.*metrics.json\); the final "
                                         r"checkpoint is .*ckpt_0000004.pt: with space again"):
        finetune.main(args)
    (ft / "metrics.json").rmdir()
    res = finetune.main([*args, "--resume", "auto"])
    assert json.load(open(ft / "metrics.json")) == res


def test_out_of_memory_is_one_line_with_what_to_change(builtin, tmp_path, monkeypatch):
    # the commonest failure of a first GPU run: a batch too large for the card
    def oom(*a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has "
                                     "a total capacity of 23.6 GiB of which ...")

    def at_step_2(step, batch):
        return oom() if step == 2 else batch
    args = [*TINY, "--data", builtin, "--max_steps", "4", "--save_every", "1"]
    with pytest.raises(SystemExit) as e:
        train.main([*args, "--out_dir", str(tmp_path / "pre")], hooks={"batch": at_step_2})
    assert e.value.code == (f"rank 0, step 2: out of CPU memory (Tried to allocate 2.00 GiB) at 8 "
                            "clips per micro-step on this rank: raise --grad_accum (the same "
                            "global batch and results in smaller micro-steps), lower --batch_size, "
                            "or add --fsdp. The last good checkpoint is "
                            f"{tmp_path / 'pre' / 'ckpt_0000002.pt'}")
    import kernels.bench
    monkeypatch.setattr(kernels.bench, "step_speed", oom)  # (train.py --bench runs it)
    with pytest.raises(SystemExit, match=r"step 0: out of CPU memory \(Tried to allocate 2.00 "
                                         r"GiB\) at 8 clips .*: lower --batch_size, raise"):
        train.main([*TINY, "--bench", "--out_dir", str(tmp_path / "bench")])
    monkeypatch.setattr(finetune, "mixup", oom)
    with pytest.raises(SystemExit, match=r"step 0: out of CPU memory \(Tried to allocate 2.00 "
                                         r"GiB\) at 8 clips per micro-step on this rank: lower "
                                         r"--batch_size \(--blr scales"):
        finetune.main([*FT_TINY, "--data", builtin, "--max_steps", "2",
                       "--out_dir", str(tmp_path / "ft")])


# -----------------------------------------------------------------------------
# a damaged checkpoint is found on load; --resume auto takes the newest intact one and says so


def test_damaged_checkpoints_are_found_and_passed_over(builtin, tmp_path, capsys):
    args = [*TINY, "--data", builtin, "--max_steps", "4", "--save_every", "1", "--keep_last", "4"]
    train.main([*args, "--out_dir", str(tmp_path)])
    # truncated: the newest file cut in half
    newest = tmp_path / "ckpt_0000004.pt"
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])
    # bit flips in a tensor: one weight changed, saved with the old checksum (a flip the zip does
    # not see)
    ck = torch.load(tmp_path / "ckpt_0000003.pt", weights_only=True)
    ck["model"]["patch_embed.a.weight"].view(-1)[0] += 1e-3
    torch.save(ck, tmp_path / "ckpt_0000003.pt")
    for path, why in ((newest, "not a readable checkpoint"), (tmp_path / "ckpt_0000003.pt",
                                                              "damaged")):
        with pytest.raises(train.BadCheckpoint, match=why):
            train.load_checkpoint(str(path), "--resume")
    # raw bytes flipped in the middle of the file are found too (by the zip's or our checksum)
    raw = bytearray((tmp_path / "ckpt_0000002.pt").read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    (tmp_path / "ckpt_0000002.pt").write_bytes(bytes(raw))
    with pytest.raises(train.BadCheckpoint):
        train.load_checkpoint(str(tmp_path / "ckpt_0000002.pt"), "--resume")
    res = train.main([*args, "--out_dir", str(tmp_path), "--resume", "auto", "--max_steps", "5"])
    out = capsys.readouterr().out
    assert "ckpt_0000004.pt: not a readable checkpoint" in out and "resumed from" in out
    assert "ckpt_0000001.pt" in out
    assert res["step"] == 5


# -----------------------------------------------------------------------------
# finetune.py: exact resume, the shared non-finite policy, preemption, the final eval after a resume


def test_finetune_resumes_exactly_and_reports_at_the_end(builtin, tmp_path, capsys):
    args = [*FT_TINY, "--data", builtin, "--max_steps", "6", "--save_every", "100"]
    full = finetune.main([*args, "--out_dir", str(tmp_path / "full")])
    cut = finetune.main([*args, "--out_dir", str(tmp_path / "cut"), "--stop_at", "3"])
    assert cut == {} and os.path.exists(tmp_path / "cut" / "ckpt_0000003.pt")
    again = finetune.main([*args, "--out_dir", str(tmp_path / "cut"), "--resume", "auto"])
    assert again == full  # bit-identical metrics
    assert same(tmp_path / "full" / "ckpt_0000006.pt", tmp_path / "cut" / "ckpt_0000006.pt")
    # resumed when already finished: the evaluation is written all the same
    os.remove(tmp_path / "cut" / "metrics.json")
    done = finetune.main([*args, "--out_dir", str(tmp_path / "cut"), "--resume", "auto"])
    assert done == full  # (the last epoch's training figures too, saved with the evaluation)
    assert json.load(open(tmp_path / "cut" / "metrics.json"))
    out = capsys.readouterr()
    # is it learning: train next to test at each eval
    assert "epoch 2: train top-1" in out.out + out.err
    assert f"resumed from {tmp_path / 'cut' / 'ckpt_0000003.pt'} at step 3\n" in out.out


def test_a_stop_asked_for_during_an_evaluation_checkpoints_first(builtin, tmp_path, monkeypatch):
    # a scheduler's grace time is seconds; a whole test set may take minutes: the evaluation is
    # left, the checkpoint written; resumed at the end, the run evaluates then, as if never stopped
    args = [*FT_TINY, "--data", builtin, "--max_steps", "6", "--save_every", "100"]
    full = finetune.main([*args, "--out_dir", str(tmp_path / "full")])
    real = finetune.evaluate

    def signalled(*a, **k):
        os.kill(os.getpid(), signal.SIGTERM)
        return real(*a, **k)
    monkeypatch.setattr(finetune, "evaluate", signalled)
    with pytest.raises(SystemExit) as e:
        finetune.main([*args, "--out_dir", str(tmp_path / "cut")])
    assert e.value.code == train.EXIT_PREEMPTED
    assert os.path.exists(tmp_path / "cut" / "ckpt_0000006.pt")
    assert not os.path.exists(tmp_path / "cut" / "metrics.json")
    monkeypatch.setattr(finetune, "evaluate", real)
    assert finetune.main([*args, "--out_dir", str(tmp_path / "cut"), "--resume", "auto"]) == full


def test_finetune_non_finite_policy_and_preemption(builtin, tmp_path, monkeypatch):
    real = finetune.mixup

    def poisoned(batch, *a, **k):  # the second step's inputs are NaN
        batch, t = real(batch, *a, **k)
        poisoned.calls += 1
        return ({**batch, "a": batch["a"] * float("nan")} if poisoned.calls == 2 else batch), t
    poisoned.calls = 0
    monkeypatch.setattr(finetune, "mixup", poisoned)
    args = [*FT_TINY, "--data", builtin, "--max_steps", "4", "--modality", "audio"]
    with pytest.raises(SystemExit, match="step 1: non-finite loss"):
        finetune.main([*args, "--out_dir", str(tmp_path / "a")])
    poisoned.calls = 0
    res = finetune.main([*args, "--out_dir", str(tmp_path / "b"), "--max_bad_steps", "1"])
    assert res["step"] == 4
    monkeypatch.setattr(finetune, "mixup", real)

    import multiprocessing
    workers = []

    def stop_at_2(batch, *a, **k):
        if stop_at_2.calls == 1:
            workers.extend(multiprocessing.active_children())
            os.kill(os.getpid(), signal.SIGTERM)
        stop_at_2.calls += 1
        return real(batch, *a, **k)
    stop_at_2.calls = 0
    monkeypatch.setattr(finetune, "mixup", stop_at_2)
    with pytest.raises(SystemExit) as e:
        finetune.main([*args, "--out_dir", str(tmp_path / "c"), "--workers", "2"])
    assert e.value.code == train.EXIT_PREEMPTED
    assert os.path.exists(tmp_path / "c" / "ckpt_0000002.pt")
    # the stopped run's loader workers ended with it (not at a later garbage collection)
    assert len(workers) == 2 and [p.exitcode for p in workers] == [0, 0]


# ----------------------------------------------------------------------------- data at run time: a
#   clip that disappears is replaced and counted; a vanished folder stops the run in one line; a
#   loader worker that dies is reported with the clips it was reading


def test_data_faults_during_a_run(builtin, tmp_path):
    root = str(tmp_path / "set")
    shutil.copytree(builtin, root)
    clips = sorted(c for c in os.listdir(os.path.join(root, "clips")) if c.startswith("train"))

    def lose_clips(step, batch):
        if step == 0:
            for c in clips[:6]:
                shutil.rmtree(os.path.join(root, "clips", c))
        return batch
    res = train.main([*TINY, "--data", root, "--max_steps", "6", "--out_dir", str(tmp_path / "a")],
                     hooks={"batch": lose_clips})
    assert res["step"] == 6 and res["last"]["bad_clips"] > 0

    def lose_folder(step, batch):
        if step == 1:
            os.rename(root, root + ".gone")
        return batch
    with pytest.raises(SystemExit, match="the data folder is gone"):
        train.main([*TINY, "--data", root, "--max_steps", "6", "--out_dir", str(tmp_path / "b")],
                   hooks={"batch": lose_folder})


def test_clip_after_clip_unusable_is_one_line_in_training_and_in_evaluation(builtin, tmp_path):
    # a set without sound (prepare --allow_silent) in audiovisual training, and a test split whose
    # clips are all damaged: one line, with loader workers or without (before: "a data loader
    # worker died ... out of memory?" with workers, a traceback without; a traceback in evaluation)
    import soundfile as sf
    root = str(tmp_path / "set")
    shutil.copytree(builtin, root)
    for split, n in (("train", 12), ("test", 12)):
        path = os.path.join(root, f"{split}.csv")
        lines = open(path).read().splitlines(keepends=True)
        open(path, "w").write("".join(lines[:1 + n]))
        for line in lines[1:1 + n]:
            flac = os.path.join(root, "clips", line.split(",")[0], "audio.flac")
            if split == "train":
                sf.write(flac, np.zeros(4 * 16000, np.int16), 16000)
            else:
                open(flac, "wb").write(b"not a flac file")
    for workers in ("0", "2"):
        with pytest.raises(SystemExit) as e:
            train.main([*TINY, "--data", root, "--max_steps", "2", "--workers", workers,
                        "--out_dir", str(tmp_path / f"w{workers}")])
        line = str(e.value.code)
        assert line.startswith(f"{root}: 10 clips in a row could not be used, from train_"), line
        assert line.endswith("audio.flac is silent); training skips silent clips: a "
                                          "set without sound trains video-only (train.py "
                                          "--modalities v, finetune.py --modality video)")
    train_ok = str(tmp_path / "ok")  # sound again in training, the test split still damaged
    shutil.copytree(builtin, train_ok)
    shutil.copy(os.path.join(root, "test.csv"), train_ok)
    for line in open(os.path.join(root, "test.csv")).read().splitlines()[1:]:
        shutil.copy(os.path.join(root, "clips", line.split(",")[0], "audio.flac"),
                    os.path.join(train_ok, "clips", line.split(",")[0], "audio.flac"))
    with pytest.raises(SystemExit) as e:
        finetune.main([*FT_TINY, "--data", train_ok, "--modality", "audio", "--max_steps", "1",
                       "--out_dir", str(tmp_path / "ft")])
    assert str(e.value.code).startswith(f"{train_ok}: 10 clips in a row could not be used, from "
                                        "test_") and "\n" not in str(e.value.code)


def test_a_dead_loader_worker_is_named_with_its_clip(builtin, tmp_path, monkeypatch):
    real = data.AVDataset._load

    def oom(self, j, *rest):
        if j == self.target and torch.utils.data.get_worker_info() is not None:
            os.kill(os.getpid(), signal.SIGKILL)  # what the kernel's OOM killer does
        return real(self, j, *rest)
    monkeypatch.setattr(data.AVDataset, "_load", oom)
    monkeypatch.setattr(data.AVDataset, "target", 5, raising=False)
    args = [*TINY, "--data", builtin, "--max_steps", "6", "--workers", "1", "--out_dir",
            str(tmp_path)]
    with pytest.raises(SystemExit, match=r"a data loader worker died .* while reading train_"):
        train.main(args)


def test_a_checkpoint_of_the_old_decoder_layout_says_so_in_one_line(tmp_path):
    import avmae
    import train
    from conftest import tiny_config
    state = avmae.AVMAE(tiny_config()).state_dict()
    old = {("dec_embed." + k[len("decoder.embed."):] if k.startswith("decoder.embed.") else k): v
           for k, v in state.items()}
    path = str(tmp_path / "old.pt")
    torch.save(dict(model=old, model_config={}), path)
    with pytest.raises(train.BadCheckpoint, match="decoder's parameters moved"):
        train.load_checkpoint(path, "--resume")
    # finetuning reads the encoder
    assert "dec_embed.a.weight" in train.load_checkpoint(path, "--init")["model"]
