"""Training speed of a script under 1 and N processes (torchrun: gloo on the CPU, NCCL on GPUs), read from the
img/s of its own log.jsonl (every image of the global batch counted once), median over the log lines after
the first (which holds the warm-up).

    python benchmarks/bench_ddp.py                                  # ddpm's quick recipe, 1 and 2 CPU processes
    python benchmarks/bench_ddp.py --script pixelcnn --nproc 1 2
    python benchmarks/bench_ddp.py --device cuda --nproc 1 2 4      # GPUs: one per process

On a CPU, N processes share the same cores (each gets cores / N threads), so N > 1 is not expected to be faster:
what the CPU run shows is that the job runs and what the communication costs.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(script, nproc, args, device):
    out = Path(tempfile.mkdtemp()) / "run"
    threads = max(1, os.cpu_count() // nproc)
    flags = ["--preset", "quick", "--device", device, "--steps", str(args.steps), "--log-every", str(args.log_every),
             "--sample-every", "1000000000", "--ckpt-every", "1000000000", "--num-samples", "1", "--out", str(out)]
    if script in ("pixelcnn", "pixelrnn"):
        flags += ["--eval-n", "10"]  # the end-of-run NLL on a few images only: this measures training
    launcher = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                     f"--nproc_per_node={nproc}"]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    done = subprocess.run([*launcher, str(ROOT / f"{script}.py"), *flags], capture_output=True, text=True, env=env)
    if done.returncode:
        raise SystemExit(f"{script} with {nproc} process(es) failed:\n{done.stderr[-2000:]}")
    lines = [json.loads(s) for s in (out / "log.jsonl").read_text().splitlines()]
    return statistics.median(r["img_per_s"] for r in lines[1:]), threads


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--script", default="ddpm", choices=["ddpm", "vae", "gan", "pixelcnn", "pixelrnn"])
    p.add_argument("--nproc", type=int, nargs="+", default=[1, 2])
    p.add_argument("--device", default="cpu")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--log-every", type=int, default=20)
    args = p.parse_args()
    print(f"{args.script} quick recipe, {args.steps} steps, {args.device}, load {os.getloadavg()[0]:.2f}", flush=True)
    base = None
    for n in args.nproc:
        img_s, threads = run(args.script, n, args, args.device)
        base = base or img_s
        print(f"{n} process(es) x {threads} thread(s): {img_s:8.1f} img/s  ({img_s / base:.2f}x the first)", flush=True)
    print(f"load after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
