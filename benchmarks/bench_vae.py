"""Speed of vae.py: training images/s at the MLP size of the PyTorch example VAE (784-400-20, batch 128), the cost
of the importance-weighted evaluation, and (with --reference) the same training loop of that example.

    python benchmarks/bench_vae.py --device cpu
    python benchmarks/bench_vae.py --device cpu --reference /tmp/vae_ref/main.py   # a copy of examples vae/main.py

The reference is timed over one training epoch (60,000 images through its DataLoader of PIL images), called
as its own train(1) in a subprocess; our loop is timed over the same 469 steps of 128 images. Timings on a
shared machine vary: run it under `flock /tmp/cpu-measure.lock` and report the load.
"""
import argparse
import json
import math
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import common  # noqa: E402
import vae  # noqa: E402

REFERENCE_RUNNER = textwrap.dedent("""
    import os, sys, time
    folder = os.path.dirname(sys.argv[1])
    os.chdir(folder)  # the example reads ../data and writes results/ next to itself
    sys.path.insert(0, folder)
    sys.argv = ["main.py", "--epochs", "1", "--no-cuda", "--log-interval", "1000000"]
    import torch
    torch.set_num_threads(THREADS)
    import main  # builds its DataLoaders and model; the epoch loop runs only under __main__
    t = time.time()
    main.train(1)
    print("REFERENCE_EPOCH_S", time.time() - t, len(main.train_loader.dataset))
""")


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def training_speed(device, steps, batch_size, hidden=400, layers=1, z_dim=20):
    """Images/s of vae.py's training step (batch drawn by indexing a uint8 tensor, stochastic binarization)."""
    try:
        x, _ = common.load_dataset("mnist", ROOT / "data", "train", device)
    except common.UsageError:  # no MNIST here: random digits have the same shape and cost
        x = torch.randint(0, 256, (60000, 1, 28, 28), dtype=torch.uint8, device=device)
    mcfg = vae.ModelConfig(arch="mlp", hidden=hidden, layers=layers, z_dim=z_dim)
    model = vae.build_model(mcfg, (1, 28, 28)).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    rng = torch.Generator(device).manual_seed(0)  # the batches and their binarizations, as run.rng in vae.train

    def step():  # as in vae.train: batch, binarization, loss, backward, gradient norm, the finiteness check, the update
        idx = torch.randint(len(x), (batch_size,), device=device, generator=rng)  # common.Run.batch
        batch = common.binarize(x[idx], rng)
        loss, _ = vae.loss_fn(model, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.get_total_norm([p.grad for p in model.parameters()])
        if not (math.isfinite(float(loss.detach())) and math.isfinite(float(grad_norm))):  # run.check reads both, too
            raise SystemExit("the loss or the gradient became non-finite")
        opt.step()
    for _ in range(20):  # warm-up: allocator, kernels
        step()
    sync(device)
    t = time.time()
    for _ in range(steps):
        step()
    sync(device)
    return steps * batch_size / (time.time() - t)


def iw_cost(device, n_images, k, chunk, hidden=400, layers=1, z_dim=20):
    """Seconds per test image for the ELBO + IW estimate with K samples, and the extrapolation to 10,000."""
    mcfg = vae.ModelConfig(arch="mlp", hidden=hidden, layers=layers, z_dim=z_dim)
    model = vae.build_model(mcfg, (1, 28, 28)).to(device).eval()
    x = torch.bernoulli(torch.full((n_images, 1, 28, 28), 0.13, device=device))
    per_batch = max(1, chunk // k)
    rng = torch.Generator(device).manual_seed(0)
    vae.elbo_and_iw(model, x[:per_batch], k, chunk, rng)  # warm-up
    sync(device)
    t = time.time()
    for i in range(0, n_images, per_batch):
        vae.elbo_and_iw(model, x[i:i + per_batch], k, chunk, rng)
    sync(device)
    return (time.time() - t) / n_images


def format_seconds(s):
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def reference_speed(path, threads):
    runner = REFERENCE_RUNNER.replace("THREADS", str(threads))
    out = subprocess.run([sys.executable, "-c", runner, str(Path(path).resolve())], capture_output=True, text=True)
    for line in out.stdout.splitlines():
        if line.startswith("REFERENCE_EPOCH_S"):
            _, seconds, n = line.split()
            return float(n) / float(seconds), float(seconds)
    raise SystemExit(f"the reference did not run:\n{out.stderr[-2000:]}")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=2, help="CPU threads (both sides)")
    p.add_argument("--steps", type=int, default=469, help="timed training steps (469 x 128 = one MNIST epoch)")
    p.add_argument("--iw-images", type=int, default=64)
    p.add_argument("--iw-samples", type=int, default=1000)
    p.add_argument("--hidden", type=int, default=400, help="MLP width (the comparison with the reference needs 400)")
    p.add_argument("--layers", type=int, default=1)
    p.add_argument("--z-dim", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--reference", default="", help="path to a copy of pytorch/examples vae/main.py")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    device = common.get_device(args.device)
    size = "-".join(map(str, [784] + [args.hidden] * args.layers + [args.z_dim]))
    result = dict(device=str(device), threads=args.threads, model=f"mlp {size}", batch=args.batch_size)
    img_s = training_speed(device, args.steps, args.batch_size, args.hidden, args.layers, args.z_dim)
    result["train_img_s"] = round(img_s, 1)
    print(f"vae.py training, {size}, batch {args.batch_size}: {result['train_img_s']:,.0f} img/s", flush=True)
    for chunk in (4096, 16384):
        s = iw_cost(device, args.iw_images, args.iw_samples, chunk, args.hidden, args.layers, args.z_dim)
        result[f"iw_s_per_image_chunk{chunk}"] = round(s, 5)
        print(f"IW eval, K={args.iw_samples}, chunk {chunk}: {s * 1000:.1f} ms/image, "
              f"{format_seconds(s * 10000)} for the 10,000 test images", flush=True)
    if args.reference:
        img_s, seconds = reference_speed(args.reference, args.threads)
        result.update(reference_img_s=round(img_s, 1), reference_epoch_s=round(seconds, 1),
                      ratio=round(result["train_img_s"] / img_s, 2))
        print(f"pytorch/examples vae/main.py: one epoch in {seconds:.1f} s = {img_s:,.0f} img/s; "
              f"vae.py is {result['ratio']:.2f}x", flush=True)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
