"""Speed of ddpm.py: training img/s and seconds to sample 64 (and 16) images, ancestral and DDIM.

    python benchmarks/bench_ddpm.py                        # CPU: the default model and a 2.5M one
    python benchmarks/bench_ddpm.py --device cuda          # GPU: fp32 and bf16, with and without --compile
    PYTHONPATH=<dir with denoising-diffusion-pytorch> python benchmarks/bench_ddpm.py --anchor

--anchor also times the PyPI package denoising-diffusion-pytorch (Unet(dim=32, dim_mults=(1, 2, 4)),
2.6M parameters) on the same data shape, batch and device, and prints the ratio. It is not a requirement of
this project: pip install denoising-diffusion-pytorch (with its own needs) to run it.
Timings take the median of --repeats runs after --warmup steps. Random data: speed does not depend on it.
"""
import argparse
import dataclasses
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402
import ddpm  # noqa: E402

MODELS = {"default (64ch, 1-2-2, 2 blocks)": dict(), "2.5M (48ch, 1-2-2, 1 block)": dict(channels=48, num_res_blocks=1)}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, repeats):
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def train_step_fn(loss_fn, params, device, precision, batch):
    opt = torch.optim.Adam(params, lr=1e-4)

    def step():
        with common.autocast(device, precision):
            loss = loss_fn(batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def bench_ours(name, overrides, args, device, precision, compile_):
    mcfg = ddpm.ModelConfig(**overrides)
    cfg = ddpm.Config(precision=precision, compile=compile_, sampler="ddim", sample_steps=50, model=mcfg)
    model = ddpm.build_model(mcfg, (1, 28, 28)).to(device)
    d = ddpm.Diffusion(mcfg, device)
    fwd = torch.compile(model) if compile_ else model
    batch = torch.rand(args.batch_size, 1, 28, 28, device=device) * 2 - 1
    step = train_step_fn(lambda x: ddpm.loss_fn(d, fwd, x)[0], model.parameters(), device, precision, batch)
    for _ in range(args.warmup):
        step()
    sec = timed(lambda: [step() for _ in range(args.steps)], device, args.repeats) / args.steps
    n_params = sum(p.numel() for p in model.parameters()) / 1e6
    label = f"{name} {precision}{' compile' if compile_ else ''}"
    print(f"{label:46s} {n_params:5.2f}M  train {args.batch_size / sec:8.1f} img/s", flush=True)
    model.eval()
    ancestral = dataclasses.replace(cfg, sampler="ancestral")
    with torch.no_grad(), common.autocast(device, precision):
        for n in args.sample_sizes:
            ddim = timed(lambda: ddpm.sample(d, fwd, (n, 1, 28, 28), cfg, seed=0), device, 1)
            line = f"{'':46s}        sample {n:3d}: DDIM-50 {ddim:7.2f} s"
            if args.ancestral:
                line += f"  ancestral-1000 {timed(lambda: ddpm.sample(d, fwd, (n, 1, 28, 28), ancestral, seed=0), device, 1):7.1f} s"
            print(line, flush=True)
    return args.batch_size / sec, n_params


def bench_anchor(args, device):
    from denoising_diffusion_pytorch import GaussianDiffusion, Unet
    unet = Unet(dim=32, dim_mults=(1, 2, 4), channels=1)
    gd = GaussianDiffusion(unet, image_size=28, timesteps=1000, sampling_timesteps=50).to(device)
    batch = torch.rand(args.batch_size, 1, 28, 28, device=device)  # it takes [0, 1] and rescales itself
    step = train_step_fn(gd, gd.parameters(), device, "fp32", batch)
    for _ in range(args.warmup):
        step()
    sec = timed(lambda: [step() for _ in range(args.steps)], device, args.repeats) / args.steps
    n_params = sum(p.numel() for p in unet.parameters()) / 1e6
    print(f"{'denoising-diffusion-pytorch Unet(32, 1-2-4) fp32':46s} {n_params:5.2f}M  train {args.batch_size / sec:8.1f} img/s", flush=True)
    gd.eval()
    with torch.no_grad():
        for n in args.sample_sizes:
            print(f"{'':46s}        sample {n:3d}: DDIM-50 {timed(lambda: gd.sample(batch_size=n), device, 1):7.2f} s", flush=True)
    return args.batch_size / sec


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--steps", type=int, default=5, help="training steps per timed repeat")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--sample-sizes", type=int, nargs="+", default=[16, 64])
    p.add_argument("--ancestral", action="store_true", help="also time the 1000-step ancestral sampler")
    p.add_argument("--anchor", action="store_true", help="also time denoising-diffusion-pytorch")
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    args = p.parse_args()
    device = common.get_device(args.device)
    torch.manual_seed(0)
    print(f"device {device}, torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch_size}")
    variants = [("fp32", False)] + ([("bf16", False), ("fp32", True), ("bf16", True)] if device.type == "cuda" else [])
    ours = {}
    for name in args.models:
        for precision, compile_ in variants:
            ours[name, precision, compile_] = bench_ours(name, MODELS[name], args, device, precision, compile_)
    if args.anchor:
        anchor = bench_anchor(args, device)
        for (name, precision, compile_), (img_s, n_params) in ours.items():
            print(f"ratio {name} {precision}{' compile' if compile_ else ''} / anchor fp32: {img_s / anchor:.2f}x")


if __name__ == "__main__":
    main()
