"""PixelCNN speed: training img/s, exact-NLL evaluation img/s, and sampling time for 16 and 64 images with
the naive sampler (the whole image every pass) and the fast one (only the rows an output can see).

    flock /tmp/cpu-measure.lock python benchmarks/bench_pixelcnn.py --device cpu --channels 48 --layers 4
    python benchmarks/bench_pixelcnn.py --device cuda --channels 128 --layers 12   # the default model

Random binarized 28x28 inputs: speed does not depend on the weights. Sampling the same random numbers
with both samplers must give the same images; the script checks that as it goes.
"""
import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402
import pixelcnn as P  # noqa: E402


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device):
    sync(device)
    start = time.time()
    result = fn()
    sync(device)
    return time.time() - start, result


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cpu")
    p.add_argument("--arch", default="plain", choices=["plain", "gated"])
    p.add_argument("--channels", type=int, default=48)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--train-steps", type=int, default=10)
    p.add_argument("--eval-images", type=int, default=1000)
    p.add_argument("--sample-sizes", default="16,64")
    p.add_argument("--rows", type=int, default=28, help="sample only this many rows (cost grows linearly)")
    args = p.parse_args()
    device = common.get_device(args.device)
    torch.manual_seed(0)
    mcfg = P.ModelConfig(arch=args.arch, channels=args.channels, layers=args.layers)
    model = P.build_model(mcfg, (1, 28, 28)).to(device)
    print(f"pixelcnn {args.arch}, {args.channels} channels, {args.layers} layers, {device}, "
          f"{torch.get_num_threads()} threads, {sum(p.numel() for p in model.parameters()):,} parameters")

    opt = torch.optim.Adam(model.parameters(), 1e-3)
    x = torch.bernoulli(torch.full((args.batch_size, 1, 28, 28), 0.15, device=device))

    def train_step():
        loss, _ = P.loss_fn(model, x)
        opt.zero_grad()
        loss.backward()
        opt.step()
    for _ in range(2):
        train_step()  # warm-up
    t, _ = timed(lambda: [train_step() for _ in range(args.train_steps)], device)
    print(f"training: {args.train_steps * args.batch_size / t:8.1f} img/s (batch {args.batch_size})")

    model.eval()
    x_eval = torch.bernoulli(torch.full((args.eval_images, 1, 28, 28), 0.15, device=device))
    t, _ = timed(lambda: P.mean_nll(model, x_eval), device)
    print(f"exact NLL: {args.eval_images / t:8.1f} img/s ({args.eval_images} images; the 10,000 test images take "
          f"{10000 * t / args.eval_images:.0f} s)")

    for n in [int(s) for s in args.sample_sizes.split(",")]:
        times, images = {}, {}
        for fast in (False, True):
            start = torch.zeros(n, 1, 28, 28, device=device)
            start_row = 28 - args.rows  # rows above it stay 0: the cost of the last `rows` rows only
            rng = torch.Generator(device).manual_seed(0)
            times[fast], images[fast] = timed(lambda: P.sample(model, start, None, rng, start_row, fast), device)
        scale = 28 / args.rows
        print(f"sampling {n:3d} images: naive {times[False] * scale:7.1f} s, fast {times[True] * scale:7.1f} s, "
              f"speed-up {times[False] / times[True]:4.2f}x, same images: {torch.equal(images[False], images[True])}"
              + (f" (timed on the last {args.rows} rows, scaled to 28)" if args.rows != 28 else ""))


if __name__ == "__main__":
    main()
