"""Speed of pixelrnn.py: training images/s, exact-NLL evaluation images/s and the time to sample a batch
pixel by pixel, for the Row LSTM and the Diagonal BiLSTM, next to pixelcnn.py (plain) at about the same
number of parameters, on binarized 28x28 MNIST-shaped input.

    python benchmarks/bench_pixelrnn.py --device cpu                          # the README's quick CPU size
    python benchmarks/bench_pixelrnn.py --device cpu --hidden 48 --layers 7 --head 96   # the default model
    python benchmarks/bench_pixelrnn.py --device cuda --batch-size 64
    python benchmarks/bench_pixelrnn.py --sampling --layers 2    # plain vs carried sampler, 16, 64, 1000 images

Timings on a shared machine vary: run it under `flock /tmp/cpu-measure.lock` and report the load
(`uptime`). Set OMP_NUM_THREADS to choose the CPU threads.
"""
import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import common  # noqa: E402
import pixelrnn  # noqa: E402

try:
    import pixelcnn  # noqa: E402
except ImportError:  # benchmark pixelrnn alone where pixelcnn.py is absent
    pixelcnn = None


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, repeats):
    fn()  # warm-up (allocations, cuDNN autotuning)
    sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync(device)
    return (time.perf_counter() - start) / repeats


def params(model):
    return sum(p.numel() for p in model.parameters())


def pixelcnn_like(n_target, device):
    """A plain PixelCNN (1 residual block and up) whose parameter count is closest to n_target."""
    best = None
    for layers in (1, 2, 3, 4):
        for ch in range(8, 257, 4):
            model = pixelcnn.build_model(pixelcnn.ModelConfig(channels=ch, layers=layers), (1, 28, 28))
            if best is None or abs(params(model) - n_target) < abs(params(best[0]) - n_target):
                best = (model, f"pixelcnn plain, {layers} block(s), {ch} channels")
    return best[0].to(device), best[1]


def measure(name, model, nll_fn, sample_fn, x, args, device):
    opt = torch.optim.Adam(model.parameters(), 1e-3)

    def train_step():
        loss = nll_fn(model, x[:args.batch_size]).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def eval_pass():
        with torch.no_grad():
            nll_fn(model, x)

    train_s = timed(train_step, device, args.steps)
    eval_s = timed(eval_pass, device, 2)
    model.eval()
    start = time.perf_counter()
    sample_fn(model, torch.zeros(args.sample_n, 1, 28, 28, device=device))
    sync(device)
    sample_s = time.perf_counter() - start
    model.train()
    return dict(model=name, params=params(model), train_img_s=round(args.batch_size / train_s, 1),
                eval_img_s=round(len(x) / eval_s, 1), sample_s=round(sample_s, 1), sample_n=args.sample_n)


def sampling(args, device):
    """Plain vs carried sampler on the quick recipe's Diagonal BiLSTM (untrained, biases perturbed so that the
    probabilities are not all 1/2). The plain sampler runs the network on rows 0..r for each sub-pixel of row r,
    so its cost per row grows linearly with r: above --plain-up-to images it is timed on row 0 alone (a 1-row
    image) and on row H-1 alone (start_row = H-1), and the whole image is estimated as H x their mean. The
    carried sampler is timed whole; equality is checked on the rows both drew (row 27 alone when estimated)."""
    torch.manual_seed(0)
    model = pixelrnn.build_model(pixelrnn.ModelConfig(arch="diag", hidden=args.hidden, layers=args.layers,
                                                      head=args.head), (1, 28, 28)).to(device).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))

    def run(v, start_row, fast):
        start = time.perf_counter()
        out = pixelrnn.sample_rows(model, v, None, torch.Generator(device).manual_seed(0), start_row, fast=fast)
        sync(device)
        return out, time.perf_counter() - start

    for n in args.sizes:
        v = torch.zeros(n, 1, 28, 28, device=device)
        fast, fast_s = run(v, 0, True)
        if n <= args.plain_up_to:
            plain, plain_s = run(v, 0, False)
            how, differ = "timed whole", (plain != fast).sum().item()
        else:
            first_s = run(v[:, :, :1], 0, False)[1]
            last, last_s = run(fast, 27, False)  # the last row, given the carried sampler's rows above
            plain_s = 28 * (first_s + last_s) / 2
            how = f"estimated from row 0 ({first_s:.1f} s) and row 27 ({last_s:.1f} s)"
            differ = (last != run(fast, 27, True)[0]).sum().item()  # both from the same rows above and numbers
        print(f"sampling {n:5d} images: plain {plain_s:8.1f} s ({how}), carried {fast_s:6.1f} s, "
              f"{plain_s / fast_s:6.1f}x, {differ} pixels differ", flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--hidden", type=int, default=16)
    p.add_argument("--layers", type=int, default=1)
    p.add_argument("--head", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--eval-batch", type=int, default=256)
    p.add_argument("--steps", type=int, default=5, help="timed training steps")
    p.add_argument("--sample-n", type=int, default=4, help="images sampled pixel by pixel")
    p.add_argument("--sampling", action="store_true", help="time the plain and the carried sampler instead")
    p.add_argument("--sizes", type=int, nargs="+", default=[16, 64, 1000], help="--sampling: images per batch")
    p.add_argument("--plain-up-to", type=int, default=16, help="--sampling: time the plain sampler whole up to this "
                   "many images, estimate it from two rows above")
    args = p.parse_args()
    device = common.get_device(args.device)
    if args.sampling:
        return sampling(args, device)
    torch.manual_seed(0)
    x = (torch.rand(args.eval_batch, 1, 28, 28, device=device) < 0.13).float()  # MNIST's ink density
    print(f"device {device}, {torch.get_num_threads()} threads (OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}), "
          f"load {os.getloadavg()[0]:.1f}", flush=True)
    rows = []
    for arch in ("row", "diag"):
        mcfg = pixelrnn.ModelConfig(arch=arch, hidden=args.hidden, layers=args.layers, head=args.head)
        model = pixelrnn.build_model(mcfg, (1, 28, 28)).to(device)
        rows.append(measure(f"pixelrnn {arch}, {args.layers} layer(s), h={args.hidden}", model, pixelrnn.nll,
                            lambda m, v: pixelrnn.sample_rows(m, v, None, torch.Generator(device).manual_seed(0)),
                            x, args, device))
        print(json.dumps(rows[-1]), flush=True)
    if pixelcnn is not None:
        model, name = pixelcnn_like(rows[-1]["params"], device)
        rows.append(measure(name, model, pixelcnn.nll,
                            lambda m, v: pixelcnn.sample_rows(m, v, None, torch.Generator(device).manual_seed(0)),
                            x, args, device))
        print(json.dumps(rows[-1]), flush=True)
    print(f"\n| model | parameters | train img/s (batch {args.batch_size}) | NLL eval img/s | "
          f"sampling {args.sample_n} images (s) |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['params']:,} | {r['train_img_s']} | {r['eval_img_s']} | {r['sample_s']} |")
    print(f"load after: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
