"""Several processes: every script under torchrun with two CPU processes (gloo), as a cluster would start it.
One log and one checkpoint per run, resumable by the same number of processes and sampled by one; DDP's gradient
average equal to one process with the whole batch; the split NLL evaluation equal to one process's; a rank that
fails stops the job with its one line instead of hanging."""
import importlib
import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT
from test_cli import RUN, TINY

SCRIPTS = ["ddpm", "vae", "gan", "pixelcnn", "pixelrnn"]


def torchrun(argv, nproc=2, timeout=240):
    """`torchrun --standalone --nproc_per_node=nproc argv...` (as `python -m torch.distributed.run`)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))  # 2 processes on 2 cores: a thread each
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *map(str, argv)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)


def ckpt(out):
    return torch.load(out / "ckpt.pt", weights_only=True)


@pytest.mark.parametrize("script", SCRIPTS)
def test_two_processes_train_one_log_and_checkpoint_resume_and_one_samples(script, data_dir, tmp_path):
    out = tmp_path / "run"
    args = [ROOT / f"{script}.py", *TINY[script], *RUN, "--data-dir", data_dir, "--out", out]
    done = torchrun(args)
    assert done.returncode == 0, done.stderr[-3000:]
    saved = ckpt(out)
    assert saved["step"] == 2 and len(saved["rng"]) == 2  # each rank's random state, for an exact --resume
    assert not torch.equal(saved["rng"][0]["rng_data"], saved["rng"][1]["rng_data"])  # the ranks drew other batches
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2]  # rank 0 alone writes: one line per step, not two
    assert done.stdout.count("done: ") == 1
    assert sorted(p.name for p in out.glob("*.tmp")) == []

    resumed = torchrun([*args, "--resume", "--steps", "3"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert ckpt(out)["step"] == 3 and [json.loads(s)["step"] for s in (out / "log.jsonl").read_text().splitlines()] == [1, 2, 3]

    module = importlib.import_module(script)  # one process reads the same run
    module.main(["--out", str(out), "--sample", "--data-dir", str(data_dir), "--num-samples", "3"])
    assert torch.load(out / "samples.pt").shape[0] == 3
    with pytest.raises(SystemExit) as e:  # a changed number of processes cannot continue exactly: refused
        module.main(["--out", str(out), "--data-dir", str(data_dir), "--resume", "--steps", "4"])
    assert e.value.code == 2


DDP_CHECK = """
import sys
import torch
import common

common.get_device("cpu")  # joins the process group under torchrun
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))  # no BatchNorm
forward = torch.nn.parallel.DistributedDataParallel(model) if common.distributed() else model
opt = torch.optim.SGD(model.parameters(), lr=0.1)
data = torch.Generator().manual_seed(1)
for step in range(5):
    x, y = torch.randn(8, 4, generator=data), torch.randn(8, 1, generator=data)  # the step's whole batch of 8
    mine = common.shard(8)  # this rank's 8 / world images
    loss = (forward(x[mine.start:mine.stop]) - y[mine.start:mine.stop]).pow(2).mean()
    opt.zero_grad()
    loss.backward()  # under DDP: the gradient averaged over the ranks
    opt.step()
if common.is_main():
    torch.save(model.state_dict(), sys.argv[1])
if common.distributed():  # as common.entry ends a torchrun process
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
    sys.stdout.flush()
    import os
    os._exit(0)
"""


def test_ddp_averages_the_gradients_as_one_process_with_the_whole_batch(tmp_path):
    script = tmp_path / "ddp_check.py"
    script.write_text(DDP_CHECK)
    two = torchrun([script, tmp_path / "two.pt"])
    assert two.returncode == 0, two.stderr[-3000:]
    one = subprocess.run([sys.executable, script, tmp_path / "one.pt"], capture_output=True, text=True,
                         env=dict(os.environ, PYTHONPATH=str(ROOT)), timeout=120)
    assert one.returncode == 0, one.stderr[-3000:]
    a, b = (torch.load(tmp_path / f"{n}.pt") for n in ("one", "two"))
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    assert not torch.equal(a["0.weight"], torch.nn.Linear(4, 16).weight)  # and the weights did move


def test_the_split_nll_evaluation_equals_one_process(data_dir, tmp_path):
    out = tmp_path / "run"
    import pixelcnn
    pixelcnn.main([*TINY["pixelcnn"], *RUN, "--data-dir", str(data_dir), "--out", str(out)])
    one = pixelcnn.main(["--out", str(out), "--eval", "--data-dir", str(data_dir)])
    two = torchrun([ROOT / "pixelcnn.py", "--out", out, "--eval", "--data-dir", data_dir])
    assert two.returncode == 0, two.stderr[-3000:]
    split = json.loads((out / "eval.json").read_text())
    assert split["images"] == one["images"] == 64
    assert split["exact NLL (nats/image)"] == pytest.approx(one["exact NLL (nats/image)"], rel=1e-6)
    assert two.stdout.count("exact NLL") == 1  # rank 0 alone prints the table


def test_a_rank_that_fails_stops_the_job_with_its_line(data_dir, tmp_path):
    """Rank 1 is given a data folder that does not exist: the job must end (not hang) with that rank's one line."""
    wrapper = tmp_path / "one_bad_rank.py"
    wrapper.write_text(
        "import os, runpy, sys\n"
        f"if os.environ['RANK'] == '1':\n    sys.argv += ['--data-dir', {str(tmp_path / 'missing')!r}]\n"
        f"runpy.run_path({str(ROOT / 'ddpm.py')!r}, run_name='__main__')\n")
    done = torchrun([wrapper, *TINY["ddpm"], *RUN, "--data-dir", data_dir, "--out", tmp_path / "run"], timeout=120)
    assert done.returncode != 0
    lines = [line for line in done.stderr.splitlines() if line.startswith("error")]
    assert len(lines) == 1 and lines[0].startswith("error (rank 1 of 2): mnist is not in"), done.stderr[-3000:]
    assert not (tmp_path / "missing").exists()


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_conditional_run_under_two_processes_samples_the_classes_in_turn(script, data_dir, tmp_path):
    """--conditional trains under DDP (the labels travel with each rank's batch; DDPM's label dropout and the
    projection D inside the DDP forward), and --sample split over two ranks gathers all N images with labels.pt
    naming image i's class, i mod 10 (each rank draws the classes of its own share: class_labels(start=part.start))."""
    out = tmp_path / "run"
    done = torchrun([ROOT / f"{script}.py", *TINY[script], *RUN, "--data-dir", data_dir, "--out", out, "--conditional"])
    assert done.returncode == 0, done.stderr[-3000:]
    assert ckpt(out)["model_config"]["conditional"] is True
    sampled = torchrun([ROOT / f"{script}.py", "--out", out, "--data-dir", data_dir, "--sample", "--num-samples", 13])
    assert sampled.returncode == 0, sampled.stderr[-3000:]
    assert torch.load(out / "samples.pt").shape[0] == 13
    assert torch.equal(torch.load(out / "labels.pt"), torch.arange(13) % 10)


def test_a_flag_refused_under_torchrun_names_its_rank(tmp_path):
    """argparse's refusal comes before the process group is joined: the rank comes from torchrun's environment."""
    done = torchrun([ROOT / "vae.py", "--no-such-flag", "--out", tmp_path / "run"], timeout=120)
    lines = sorted(line for line in done.stderr.splitlines() if line.startswith("error"))
    assert done.returncode != 0 and len(lines) == 2, done.stderr[-3000:]
    assert lines[0].startswith("error (rank 0 of 2): unrecognized arguments: --no-such-flag")
    assert lines[1].startswith("error (rank 1 of 2): unrecognized arguments: --no-such-flag")
    assert not (tmp_path / "run").exists()
