"""The promises of a training run (common.Run), kept once for all five scripts and tested here once, looped over
them: Ctrl-C then --resume is the run in one go, bit for bit; a diverging step is never applied, the message says
what the checkpoint holds, and --resume goes on; a failing picture costs no trained step; one run at a time in a
folder; a full disk or a step too big for memory is one line, exit 2, and nothing lost. Tiny models on 8x8 digits."""
import importlib
import itertools
import json
import os
import signal
import subprocess
import sys

import pytest
import torch
from pathlib import Path

import common
from conftest import ROOT, sigint_at
from test_cli import TINY  # a model small enough that a step takes milliseconds

SCRIPTS = ["ddpm", "vae", "gan", "pixelcnn", "pixelrnn"]
RUN = ["--max-minutes", "0", "--batch-size", "8", "--log-every", "1", "--sample-every", "100", "--ckpt-every", "2",
       "--num-samples", "4", "--device", "cpu", "--precision", "fp32"]
LOSS = {"ddpm": "loss_fn", "vae": "loss_fn", "gan": "g_loss", "pixelcnn": "loss_fn", "pixelrnn": "loss_fn"}


def train(script, data_dir, out, *args):
    return importlib.import_module(script).main([*TINY[script], *RUN, "--data-dir", str(data_dir), "--out", str(out),
                                                 *map(str, args)])


def ckpt(out):
    return torch.load(out / "ckpt.pt", weights_only=True)


def tensors(state):
    """Every tensor in a checkpoint's state dicts (models, EMA, optimizers), by its path: what resuming must restore."""
    if torch.is_tensor(state):
        return {"": state}
    items = state.items() if isinstance(state, dict) else enumerate(state) if isinstance(state, (list, tuple)) else []
    return {f"{k}/{p}": t for k, v in items for p, t in tensors(v).items()}


def same_state(a, b):
    """Two checkpoints whose models, EMA and optimizer states are equal bit for bit (their random states may differ:
    a run saved at its end has drawn on)."""
    keep = lambda c: tensors({k: v for k, v in c.items() if k not in ("rng", "run_config")})
    ta, tb = keep(a), keep(b)
    return ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


def logged_steps(out):
    return [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines()]


def nan_on_call(monkeypatch, module, name, n):
    """Make module.name (a loss) return nan from its n-th call on: a diverging run."""
    real, calls = getattr(module, name), []

    def diverging(*args, **kwargs):
        calls.append(1)
        value = real(*args, **kwargs)
        nan = float("nan") if len(calls) >= n else 1.0
        return (value[0] * nan, *value[1:]) if isinstance(value, tuple) else value * nan
    monkeypatch.setattr(module, name, diverging)


@pytest.fixture(scope="module")
def one_go(small_mnist, tmp_path_factory):
    """one_go(script): the folder of the script's tiny run of 6 steps in one go, trained once."""
    root = tmp_path_factory.mktemp("one-go")

    def folder(script):
        if not (root / script / "ckpt.pt").exists():
            train(script, small_mnist, root / script, "--steps", 6)
        return root / script
    return folder


@pytest.mark.parametrize("script", SCRIPTS)
def test_ctrl_c_then_resume_is_the_run_in_one_go(script, one_go, small_mnist, tmp_path, monkeypatch, capsys):
    """Ctrl-C during step 3 of 6: the step finishes, the checkpoint holds step 3, exit 130; --resume then ends where
    the run in one go ends, every weight and optimizer state bit for bit, and log.jsonl has one line per step."""
    out = tmp_path / "run"
    sigint_at(monkeypatch, 3)
    with pytest.raises(SystemExit) as e:
        train(script, small_mnist, out, "--steps", 6)
    assert e.value.code == 130 and ckpt(out)["step"] == 3
    assert "interrupted: checkpoint saved at step 3" in capsys.readouterr().out
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the run put Python's handler back
    monkeypatch.undo()
    train(script, small_mnist, out, "--steps", 6, "--resume")
    assert ckpt(out)["step"] == 6 and same_state(ckpt(out), ckpt(one_go(script)))
    assert logged_steps(out) == [1, 2, 3, 4, 5, 6]


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_diverging_step_is_never_applied_and_resume_goes_on(script, one_go, small_mnist, tmp_path, monkeypatch,
                                                               capsys):
    """The loss turns nan at the 4th step (step index 3): exit 2 before its update, one line that names the last
    checkpoint (--ckpt-every 1): step 2, whose weights gave a finite loss; for the GAN step 3, saved after the D loss
    of iteration 3 was found finite, before its G loss. --resume with the loss healed ends as the run in one go."""
    module, out = importlib.import_module(script), tmp_path / "nan"
    nan_on_call(monkeypatch, module, LOSS[script], 4)
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        train(script, small_mnist, out, "--steps", 6, "--ckpt-every", 1)
    err, saved = capsys.readouterr().err.strip(), 3 if script == "gan" else 2
    assert e.value.code == 2 and "\n" not in err and "became nan at step 4, before its update" in err, err
    assert f"the checkpoint holds step {saved}: lower --lr and --resume" in err
    assert ckpt(out)["step"] == saved and all(torch.isfinite(t).all() for t in tensors(ckpt(out)).values()
                                               if t.is_floating_point())
    monkeypatch.undo()
    train(script, small_mnist, out, "--steps", 6, "--resume")
    assert same_state(ckpt(out), ckpt(one_go(script))) and logged_steps(out) == [1, 2, 3, 4, 5, 6]


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_run_that_diverges_before_its_first_checkpoint_says_so_and_may_start_again(script, small_mnist, tmp_path,
                                                                                     monkeypatch, capsys):
    module, out = importlib.import_module(script), tmp_path / "nan"
    nan_on_call(monkeypatch, module, LOSS[script], 1)
    with pytest.raises(SystemExit) as e:
        train(script, small_mnist, out, "--steps", 4)
    err = capsys.readouterr().err
    assert e.value.code == 2 and "no checkpoint was saved yet: lower --lr and start again" in err, err
    assert not (out / "ckpt.pt").exists()
    monkeypatch.undo()
    train(script, small_mnist, out, "--steps", 2)  # the same folder: a new run
    assert ckpt(out)["step"] == 2


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_failing_picture_costs_no_trained_step(script, one_go, small_mnist, tmp_path, monkeypatch, capsys):
    """sample_grid raises at every grid step (here 2, 4, 6): one warning line each, and the run trains on to the
    weights of the run in one go."""
    def out_of_memory(*args, **kwargs):
        raise RuntimeError("out of memory\nmore detail")
    monkeypatch.setattr(importlib.import_module(script), "sample_grid", out_of_memory)
    out = tmp_path / "run"
    train(script, small_mnist, out, "--steps", 6, "--sample-every", 2)
    printed = capsys.readouterr().out
    assert printed.count("warning: the sample grid failed (RuntimeError: out of memory); training goes on") == 3
    assert same_state(ckpt(out), ckpt(one_go(script))) and logged_steps(out) == [1, 2, 3, 4, 5, 6]


@pytest.mark.parametrize("script", SCRIPTS)
def test_the_grids_and_curves_change_no_weight(script, one_go, small_mnist, tmp_path):
    """A grid at every step (its samplers draw from generators of their own, and any eval mode is undone) ends with
    the weights of the run that drew one grid; every grid step has its picture and curves.png."""
    out = tmp_path / "run"
    train(script, small_mnist, out, "--steps", 6, "--sample-every", 1)
    assert same_state(ckpt(out), ckpt(one_go(script)))
    assert all((out / f"samples_{s}.png").exists() for s in range(1, 7)) and (out / "curves.png").exists()


def budget_run(module, argv, monkeypatch, now, seconds_per_step, stop_at=None):
    """A Run of `module`'s options whose steps take `seconds_per_step` on a clock we hold (now[0]), with a grid
    recorder; the steps (and progress) it made, its grid steps. stop_at: a crash after that step (no finish())."""
    monkeypatch.setattr(common.time, "time", lambda: now[0])
    run = common.Run(common.parse_args(module.ModelConfig, module.Config, module.__name__, argv), module.__name__)
    grids, progress = [], []
    run.start(dict(model=torch.nn.Linear(1, 1)), lambda step: grids.append(step))
    for step in run:
        progress.append(run.progress)
        now[0] += seconds_per_step
        run.check(loss=1.0)
        run.log(dict(loss=1.0))
        if step + 1 == stop_at:
            break
    return run, progress, grids


def test_the_time_budget_ends_the_run_and_the_schedule_and_grids_follow_the_clock(small_mnist, tmp_path, monkeypatch,
                                                                                  capsys):
    """--max-minutes 2 with --steps 1000 on a CPU that makes a step in 10 s: the run ends at step 12, when the
    minutes are spent, says so, and saves it; run.progress, which the learning-rate schedules read, follows the clock
    (step / 1000 would be 0.012 at the end), and the grids meant for every quarter of the run (--sample-every 250)
    come at each quarter of the minutes. --resume (with more minutes) counts the minutes already spent."""
    module, out, now = importlib.import_module("pixelrnn"), tmp_path / "r", [0.0]
    argv = [*TINY["pixelrnn"], *RUN, "--steps", "1000", "--max-minutes", "2", "--sample-every", "250", "--out",
            str(out), "--data-dir", str(small_mnist)]
    run, progress, grids = budget_run(module, argv, monkeypatch, now, 10.0)
    assert run.step == 12 == len(progress) and progress == pytest.approx([i / 12 for i in range(12)]), progress
    assert grids == [3, 6, 9, 12] and logged_steps(out)[-1] == 12 == ckpt(out)["step"]  # the last step: saved
    assert "--max-minutes 2 spent at step 12 of --steps 1000: training ends here" in capsys.readouterr().out
    run.finish()
    monkeypatch.undo()
    resumed, progress, grids = budget_run(module, [*argv, "--resume", "--max-minutes", "4"], monkeypatch, now, 10.0)
    assert progress[0] == pytest.approx(0.5) and resumed.step == 24 and grids == [18, 24]  # 2 of 4 minutes spent at its start


def test_without_a_budget_the_run_is_its_steps_whatever_the_clock(small_mnist, tmp_path, monkeypatch):
    """--max-minutes 0 (the tests' runs): --steps steps however slow they are, progress = step / --steps, a grid
    every --sample-every steps: a fixed-length, reproducible run."""
    module, now = importlib.import_module("vae"), [0.0]
    argv = [*TINY["vae"], *RUN, "--steps", "8", "--max-minutes", "0", "--sample-every", "3", "--out",
            str(tmp_path / "r"), "--data-dir", str(small_mnist)]
    run, progress, grids = budget_run(module, argv, monkeypatch, now, 3600.0)
    assert run.step == 8 and progress == pytest.approx([i / 8 for i in range(8)]) and grids == [3, 6, 8]


def test_wall_time_adds_up_over_resumes_and_lines_past_the_checkpoint_go(small_mnist, tmp_path, monkeypatch):
    """wall_s (benchmarks/compare.py's training time) counts each process's seconds once; --resume drops the lines
    logged after the checkpoint (before a crash), so log.jsonl has one line per step."""
    module, out = importlib.import_module("vae"), tmp_path / "r"
    argv = [*TINY["vae"], *RUN, "--steps", "4", "--out", str(out), "--data-dir", str(small_mnist)]
    model, clock = torch.nn.Linear(1, 1), itertools.count(100.0, 10.0)  # each reading 10 s on
    monkeypatch.setattr(common.time, "time", lambda: next(clock))
    run = common.Run(common.parse_args(module.ModelConfig, module.Config, "vae", argv), "vae")
    run.start(dict(model=model))
    for step in run:
        run.check(loss=1.0)  # the checkpoint of step 2 (--ckpt-every 2)
        run.log(dict(loss=1.0))
        if step == 2:
            break  # a crash after step 3 was logged: the checkpoint holds step 2
    assert logged_steps(out) == [1, 2, 3] and ckpt(out)["step"] == 2
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the loop left: Python's handler is back
    resumed = common.Run(common.parse_args(module.ModelConfig, module.Config, "vae", [*argv, "--resume"]), "vae")
    resumed.start(dict(model=model))
    for step in resumed:
        resumed.log(dict(loss=1.0))
    logged = common.read_log(out / "log.jsonl")
    assert [r["step"] for r in logged] == [1, 2, 3, 4]
    assert logged[1]["wall_s"] < logged[2]["wall_s"] < logged[1]["wall_s"] + 60  # on from step 2's, not from 0


def refused(script, small_mnist, out, *args, capsys):
    """Train `script` into `out`, expecting exit 2: its one line."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        train(script, small_mnist, out, *args)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and err.startswith("error: ") and "\n" not in err, err
    return err


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_second_run_into_a_folder_in_use_is_refused(script, one_go, small_mnist, tmp_path, monkeypatch, capsys):
    """Another process holds the folder's lock (a run under way): the second start gets one line naming the folder
    and that process, exit 2, and writes nothing; once the holder is killed (kill -9: no clean-up) the folder is
    free, and --resume goes on to end as the run in one go."""
    out = tmp_path / "run"
    sigint_at(monkeypatch, 2)
    with pytest.raises(SystemExit):
        train(script, small_mnist, out, "--steps", 6)  # a run of 6 steps, stopped at step 2
    monkeypatch.undo()
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, os, sys, time\nf = open(sys.argv[1], 'a+')\n"
                               "fcntl.lockf(f, fcntl.LOCK_EX)\nf.truncate(0), f.write(f'{os.getpid()}\\n'), f.flush()\n"
                               "print('held', flush=True)\ntime.sleep(60)", str(out / "run.lock")],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        before = {p.name: p.read_bytes() for p in out.iterdir()}
        err = refused(script, small_mnist, out, "--steps", 6, "--resume", capsys=capsys)
        assert f"{out} is in use by the run of process {holder.pid}; wait for it to end" in err, err
        assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    finally:
        holder.kill()
        holder.wait()
    train(script, small_mnist, out, "--steps", 6, "--resume")
    assert same_state(ckpt(out), ckpt(one_go(script))) and logged_steps(out) == [1, 2, 3, 4, 5, 6]


def test_the_same_command_started_twice_at_once_trains_once(small_mnist, tmp_path):
    """Two processes of one command into one new folder (--ckpt-every 1): one trains, the other is refused in one
    line, exit 2 (the folder is in use, or by then holds a run), and log.jsonl has each step once."""
    out = tmp_path / "run"
    argv = [*TINY["ddpm"], *RUN, "--steps", "40", "--ckpt-every", "1", "--data-dir", str(small_mnist), "--out", str(out)]
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable, str(ROOT / "ddpm.py"), *argv], env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = sorted((p.wait(timeout=300), p.stderr.read().strip()) for p in procs)
    assert [code for code, _ in results] == [0, 2], results
    assert "in use by the run of process" in results[1][1] or "already holds a run" in results[1][1], results
    assert logged_steps(out) == list(range(1, 41)) and ckpt(out)["step"] == 40


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_full_disk_is_one_line_and_the_last_checkpoint_is_kept(script, one_go, small_mnist, tmp_path, monkeypatch,
                                                                  capsys):
    """The disk fills while step 4's checkpoint is written (torch.save has written part of it, then fails as it
    does on a full disk, with a RuntimeError): one line naming the file and the free space, exit 2, no partial
    ckpt.pt.tmp left to keep the disk full, the checkpoint of step 2 intact; with room again, --resume ends as the
    run in one go."""
    out, real_save, saves = tmp_path / "run", torch.save, []

    def disk_full(obj, f, *args, **kwargs):
        if str(f).endswith("ckpt.pt.tmp") and saves.append(f) is None and len(saves) == 1:
            return real_save(obj, f, *args, **kwargs)  # step 2's checkpoint
        Path(f).write_bytes(b"PK\x03\x04 part of a checkpoint")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")
    monkeypatch.setattr(torch, "save", disk_full)
    err = refused(script, small_mnist, out, "--steps", 6, capsys=capsys)
    assert f"could not write {out / 'ckpt.pt'} (RuntimeError;" in err and "MiB free on its disk, about" in err, err
    assert "MiB needed): make room or pick another --out" in err, err
    assert not (out / "ckpt.pt.tmp").exists()
    monkeypatch.setattr(torch, "save", real_save)
    assert ckpt(out)["step"] == 2
    train(script, small_mnist, out, "--steps", 6, "--resume")
    assert same_state(ckpt(out), ckpt(one_go(script))) and logged_steps(out) == [1, 2, 3, 4, 5, 6]


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_step_too_big_for_memory_says_what_to_lower(script, small_mnist, tmp_path, monkeypatch, capsys):
    """The first step runs out of memory (the CPU allocator's message): one line that says to lower --batch-size,
    exit 2, no checkpoint; the same folder then takes the run again."""
    def out_of_memory(*args, **kwargs):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate memory: you "
                           "tried to allocate 68719476736 bytes. Error code 12 (Cannot allocate memory)")
    monkeypatch.setattr(importlib.import_module(script), LOSS[script], out_of_memory)
    out = tmp_path / "run"
    err = refused(script, small_mnist, out, "--steps", 2, capsys=capsys)
    assert "out of memory" in err and "can't allocate memory" in err and "lower --batch-size" in err, err
    assert not (out / "ckpt.pt").exists()
    monkeypatch.undo()
    train(script, small_mnist, out, "--steps", 2)
    assert ckpt(out)["step"] == 2 and logged_steps(out) == [1, 2]


@pytest.mark.parametrize("script", SCRIPTS)
def test_the_last_step_is_saved_before_the_last_grid(script, one_go, small_mnist, tmp_path, monkeypatch):
    """A run stopped while it draws its last grid (a second Ctrl-C, which no warning absorbs) keeps every step: the
    checkpoint holds the last one, equal to the run in one go."""
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(importlib.import_module(script), "sample_grid", interrupted)
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        train(script, small_mnist, out, "--steps", 6)
    assert ckpt(out)["step"] == 6 and same_state(ckpt(out), ckpt(one_go(script)))
