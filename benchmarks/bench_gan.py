"""gan.py measured: training speed (and the ratio to pytorch/examples dcgan/main.py), and sample quality and
diversity on MNIST without a network (no Inception weights): a small CNN classifier trained here on real MNIST
gives each sample a class (histogram: are all ten digits there, mode collapse or not) and a feature vector
(a Frechet distance between samples and test images in its 128-d feature space, as FID does with Inception).

    python benchmarks/bench_gan.py speed --device cpu
    python benchmarks/bench_gan.py speed --device cpu --reference /tmp/dcgan_ref/main.py  # a copy of pytorch/examples dcgan/main.py
    python gan.py --sample --num-samples 10000           # from the run of `python gan.py` (runs/gan-mnist)
    python benchmarks/bench_gan.py quality runs/gan-mnist/samples.pt

Speed is images/s of real data through full iterations of Algorithm 1 with k = 1 (one D update on a batch of
real and a batch of fake images, one G update), timed over `--steps` iterations after a warm-up. The reference
is run as it is (it resizes MNIST to 64x64, its only size, and feeds it through a 2-worker DataLoader; it
reuses the D step's fakes for the G step, where gan.py draws fresh z as Algorithm 1 does): its per-iteration
lines are timestamped as they arrive. Timings on a shared machine vary: run under `flock /tmp/cpu-measure.lock`.
"""
import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

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
    G, D = (m.to(device) for m in gan.build_models(mcfg, (1, 28, 28)))
    ema = common.make_ema(G)
    opt_g, opt_d = (torch.optim.Adam(m.parameters(), lr=2e-4, betas=(0.5, 0.999)) for m in (G, D))
    data_rng = common.data_generator(device, 0)
    real = lambda: common.uint8_to_signed(common.random_batch(x, batch_size, data_rng))
    noise = lambda: torch.randn(batch_size, mcfg.z_dim, device=device)
    amp = lambda: common.autocast(device, "auto")  # the scripts' default: bf16 on CUDA, fp32 on the CPU

    def step(i):
        gan.train_iteration(G, D, opt_g, opt_d, real, noise, cfg, i, amp)
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
    result = dict(device=str(device), threads=args.threads, steps=args.steps, ref_steps=args.ref_steps, load_before=open("/proc/loadavg").read().split()[0])
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


# ----------------------------------------------------------------------------- quality: a classifier of our own

class Classifier(nn.Module):
    """A small MNIST CNN: 28x28 -> 32 x 14x14 -> 64 x 7x7 -> 128 features -> 10 logits."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),   # B x 32 x 14 x 14
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # B x 64 x 7 x 7
            nn.Flatten(), nn.Linear(64 * 49, 128), nn.ReLU())             # B x 128: the space of the Frechet distance
        self.head = nn.Linear(128, 10)

    def forward(self, x):
        return self.head(self.features(x))


def train_classifier(path, device, epochs=2):
    """Train on real MNIST (images in [0, 1]) once and cache it; return it and its test accuracy."""
    x, y = common.load_dataset("mnist", ROOT / "data", "train", device)
    x_test, y_test = common.load_dataset("mnist", ROOT / "data", "test", device)
    model = Classifier().to(device)
    if path.exists():
        model.load_state_dict(torch.load(path, weights_only=True))
    else:
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        data_rng = common.data_generator(device, 0)
        for _ in range(epochs * len(x) // 128):
            xb, yb = common.random_batch(x, 128, data_rng, y)
            loss = F.cross_entropy(model(xb.float() / 255), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(model.state_dict(), path)
    model.eval()
    acc = (predict(model, x_test.float() / 255)[0].argmax(1) == y_test).float().mean().item()
    return model, acc, x.float() / 255, x_test.float() / 255


@torch.no_grad()
def predict(model, x, batch=1000):
    """(softmax probabilities, 128-d features) for images in [0, 1]."""
    feats = torch.cat([model.features(x[i:i + batch]) for i in range(0, len(x), batch)])
    return torch.softmax(model.head(feats), 1), feats


def frechet_distance(f1, f2):
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)) between Gaussians fitted to two feature sets (FID's formula);
    Tr (S1 S2)^(1/2) = sum sqrt(eig(S1^(1/2) S2 S1^(1/2))), a symmetric matrix, so eigh is exact and stable."""
    f1, f2 = f1.double(), f2.double()
    mu1, mu2, s1, s2 = f1.mean(0), f2.mean(0), torch.cov(f1.T), torch.cov(f2.T)
    w, v = torch.linalg.eigh(s1)
    s1_half = v @ torch.diag(w.clamp(min=0).sqrt()) @ v.T
    tr_sqrt = torch.linalg.eigvalsh(s1_half @ s2 @ s1_half).clamp(min=0).sqrt().sum()
    return ((mu1 - mu2) ** 2).sum().item() + (s1.trace() + s2.trace() - 2 * tr_sqrt).item()


def describe(name, probs, feats, test_feats):
    counts = torch.bincount(probs.argmax(1), minlength=10)
    frac = counts.float() / len(probs)
    entropy = -(frac * frac.clamp(min=1e-12).log()).sum().item()
    row = dict(name=name, n=len(probs), class_counts=counts.tolist(), min_class_frac=round(frac.min().item(), 4),
               class_entropy_over_log10=round(entropy / torch.log(torch.tensor(10.0)).item(), 4),
               mean_max_prob=round(probs.max(1).values.mean().item(), 4),
               frechet_distance=round(frechet_distance(feats, test_feats), 3))
    print(f"{name:>26}: n {row['n']}, classes {row['class_counts']}, smallest class {row['min_class_frac']:.1%}, "
          f"H/log10 {row['class_entropy_over_log10']:.3f}, mean max p {row['mean_max_prob']:.3f}, FD {row['frechet_distance']:.2f}")
    return row


def quality(args):
    torch.set_num_threads(args.threads)
    device = common.get_device(args.device)
    model, acc, x_train, x_test = train_classifier(Path(args.classifier), device)
    print(f"classifier: test accuracy {acc:.2%} ({args.classifier})")
    test_probs, test_feats = predict(model, x_test)
    rows = [describe("real train images (floor)", *predict(model, x_train[:len(x_test)]), test_feats)]
    for path in args.samples:
        s = torch.load(path, weights_only=True).to(device).float()
        if s.shape[1:] != (1, 28, 28) or s.min() < 0 or s.max() > 1:
            raise SystemExit(f"{path}: expected N x 1 x 28 x 28 in [0, 1] (gan.py --sample writes that), got {tuple(s.shape)}")
        rows.append(describe(str(path), *predict(model, s), test_feats))
    print(json.dumps(dict(classifier_test_acc=round(acc, 4), rows=rows)))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["speed", "quality"])
    p.add_argument("samples", nargs="*", help="quality: samples.pt files from gan.py --sample")
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--steps", type=int, default=50, help="speed: timed iterations of gan.py")
    p.add_argument("--ref-steps", type=int, default=10, help="speed: timed iterations of the reference (64x64 is slow on a CPU)")
    p.add_argument("--reference", default="", help="speed: path to a copy of pytorch/examples dcgan/main.py")
    p.add_argument("--classifier", default=str(ROOT / "runs" / "mnist-classifier.pt"), help="quality: cached classifier")
    args = p.parse_args()
    speed(args) if args.what == "speed" else quality(args)


if __name__ == "__main__":
    main()
