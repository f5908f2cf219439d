"""PixelCNN speed: training img/s, exact-NLL evaluation img/s, and sampling time for 16, 64 and 1000 images
with the naive sampler (the whole image every pass) and the fast one (caches of every layer's input, one
position computed per sub-pixel).

    flock /tmp/cpu-measure.lock python benchmarks/bench_pixelcnn.py --device cpu --channels 48 --layers 4
    python benchmarks/bench_pixelcnn.py --device cuda --channels 128 --layers 12   # the default model

Random binarized 28x28 inputs: speed does not depend on the weights. Sampling the same random numbers
with both samplers must give the same images; the script counts the pixels where they differ. The naive
sampler costs the same for every row (it runs the whole image every pass), so above --naive-up-to images it
is timed on its first --naive-rows rows and scaled to 28, and the images are compared on those rows.
"""
import argparse
import itertools
import sys
import time
from pathlib import Path

from unittest import mock

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
    p.add_argument("--sizes", type=int, nargs="+", default=[16, 64, 1000], help="numbers of images to sample")
    p.add_argument("--naive-up-to", type=int, default=64, help="more images than this: the naive sampler is timed "
                   "on its first --naive-rows rows only")
    p.add_argument("--naive-rows", type=int, default=2)
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

    for n in args.sizes:
        sample = lambda fast: P.sample(model, n, (1, 28, 28), None, torch.Generator(device).manual_seed(0), fast)
        t_fast, fast = timed(lambda: sample(True), device)
        rows = 28 if n <= args.naive_up_to else args.naive_rows
        first_rows = lambda it, **kwargs: itertools.islice(it, rows)  # in place of the sampler's tqdm over the rows
        with mock.patch.object(P, "tqdm", first_rows):  # so the naive sampler stops after `rows` rows
            t_naive, naive = timed(lambda: sample(False), device)
        t_naive *= 28 / rows  # every row costs the same: H x W x C whole-image passes over 28 rows
        differ = int((naive[:, :, :rows] != fast[:, :, :rows]).sum())
        print(f"sampling {n:4d} images: naive {t_naive:8.1f} s, fast {t_fast:6.2f} s, "
              f"speed-up {t_naive / t_fast:6.1f}x, "
              f"{differ} of {naive[:, :, :rows].numel()} pixels differ" +
              ("" if rows == 28 else f" (naive: an estimate from its first {rows} rows, compared on those)"))


if __name__ == "__main__":
    main()
