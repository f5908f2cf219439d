"""gan.py measured: training speed, and the ratio to pytorch/examples dcgan/main.py. Sample quality, for every
family alike, is benchmarks/quality.py.

    python benchmarks/bench_gan.py speed --device cpu
    # --reference: a copy of pytorch/examples dcgan/main.py
    python benchmarks/bench_gan.py speed --device cpu --reference /tmp/dcgan_ref/main.py

Speed is images/s of real data through full iterations of Algorithm 1 with k = 1 (one D update on a batch of
real and a batch of fake images, one G update), timed over `--steps` iterations after a warm-up. The reference
is run as it is (it resizes MNIST to 64x64, its only size, and feeds it through a 2-worker DataLoader; it
reuses the D step's fakes for the G step, where gan.py draws fresh z as Algorithm 1 does): its per-iteration
lines are timestamped as they arrive. Timings on a shared machine vary: run under `flock /tmp/cpu-measure.lock`.
"""
import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import common  # noqa: E402
import gan  # noqa: E402


# ----------------------------------------------------------------------------- speed

def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def training_speed(device, steps, batch_size, g_channels, d_channels):
    """Real images/s through gan.py's training iteration (k D steps, 1 G step, the EMA update)."""
    try:
        x, _ = common.load_dataset("mnist", ROOT / "data", "train", device)
    except common.UsageError:  # no MNIST here: random digits have the same shape and cost
        x = torch.randint(0, 256, (60000, 1, 28, 28), dtype=torch.uint8, device=device)
    cfg, mcfg = gan.Config(batch_size=batch_size), gan.ModelConfig(g_channels=g_channels, d_channels=d_channels)
    G, D = (m.to(device) for m in gan.build_model(mcfg, (1, 28, 28)))
    ema = common.make_ema(G)
    opt_g, opt_d = (torch.optim.Adam(m.parameters(), lr=2e-4, betas=(0.5, 0.999)) for m in (G, D))
    data_rng = torch.Generator(device).manual_seed(0)

    def draw_real():  # a real pair (x, y): a batch of images in [-1, 1], no labels
        idx = torch.randint(len(x), (batch_size,), device=device, generator=data_rng)
        return common.uint8_to_signed(x[idx]), None

    def draw_noise():  # a noise pair (z, y): z ~ N(0, I), no classes
        return torch.randn(batch_size, mcfg.z_dim, device=device), None

    def check(**figures):  # as run.check in training: each loss read on the CPU before its update (a GPU sync)
        assert all(math.isfinite(float(v)) for v in figures.values())
    amp = lambda: common.autocast(device, "auto")  # the scripts' default: bf16 on CUDA, fp32 on the CPU

    def step(i):
        gan.train_iteration(G, D, opt_g, opt_d, draw_real, draw_noise, cfg, check, amp)
        common.ema_update(ema, G, 0.999, i)
    for i in range(5):  # warm-up: allocator, kernels
        step(i)
    sync(device)
    t = time.time()
    for i in range(steps):
        step(i)
    sync(device)
    return steps * batch_size / (time.time() - t)


def reference_speed(path, steps, warmup=2):
    """Run pytorch/examples dcgan/main.py unchanged on MNIST and time its per-iteration lines."""
    cmd = [sys.executable, str(Path(path).resolve()), "--dataset", "mnist", "--dataroot", str(ROOT / "data"),
           "--niter", "1", "--outf", "/tmp/dcgan_ref_out", "--manualSeed", "0"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    times, tail = [], []
    try:
        for line in proc.stdout:
            tail = (tail + [line])[-20:]
            if line.startswith("[0/1]["):  # one line per iteration of batch 64
                times.append(time.time())
                if len(times) == warmup + steps + 1:
                    break
    finally:
        proc.kill()
        proc.wait()
    if len(times) < warmup + steps + 1:
        raise SystemExit("the reference did not run:\n" + "".join(tail))
    return steps * 64 / (times[-1] - times[warmup])


def speed(args):
    torch.set_num_threads(args.threads)
    device = common.get_device(args.device)
    result = dict(device=str(device), threads=args.threads, steps=args.steps, ref_steps=args.ref_steps,
                  load_before=open("/proc/loadavg").read().split()[0])
    for name, gc, dc, bs in (("readme-cpu g32 d32 b64", 32, 32, 64), ("dcgan-width g64 d64 b64", 64, 64, 64)):
        result[name] = round(training_speed(device, args.steps, bs, gc, dc), 1)
        print(f"gan.py training, 28x28, {name}: {result[name]:,.1f} img/s", flush=True)
    if args.reference:
        ref = reference_speed(args.reference, args.ref_steps)
        result.update(reference_64x64_img_s=round(ref, 1), ratio=round(result["dcgan-width g64 d64 b64"] / ref, 2))
        print(f"pytorch/examples dcgan/main.py (64x64, ngf=ndf=64, batch 64): {ref:,.1f} img/s; "
              f"gan.py at the same widths and batch on 28x28 is {result['ratio']:.2f}x", flush=True)
    result["load_after"] = open("/proc/loadavg").read().split()[0]
    print(json.dumps(result))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["speed"])
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--steps", type=int, default=50, help="speed: timed iterations of gan.py")
    p.add_argument("--ref-steps", type=int, default=10,
                   help="speed: timed iterations of the reference (64x64 is slow on a CPU)")
    p.add_argument("--reference", default="", help="speed: path to a copy of pytorch/examples dcgan/main.py")
    args = p.parse_args()
    speed(args)


if __name__ == "__main__":
    main()
