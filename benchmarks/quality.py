"""One sample-quality measure for all five families, on MNIST, without downloaded weights.

A small CNN classifier, trained here on real MNIST (seeded), gives every image a class and a 128-d feature
vector. On N samples it reports, against the MNIST test set:

    FD        the Frechet distance between Gaussians fitted to the features of the samples and of the whole test set
              (FID's formula, in this classifier's feature space): ||mu_s - mu_t||^2 + Tr(S_s + S_t - 2 (S_s S_t)^(1/2))
    precision the fraction of samples inside the test images' feature manifold, recall the fraction of N test
              images inside the samples' (k-nearest-neighbour balls, Kynkaanniemi et al. 2019, k = 3)
    classes   the histogram of predicted classes and its entropy over log 10 (1 = all ten digits equally often)
    asked     for the samples of a --conditional model (labels.pt beside samples.pt): the fraction classified as the
              class they were drawn for (chance: 0.1; the classifier itself gets about 0.99 of real test digits)

The figures depend on N (FD is biased upward at small N), so compare only at one N, next to the floors:
real training images (the best any model can do), the same stochastically binarized (the best for a model
that draws 0/1 pixels: pixelcnn, pixelrnn), blurred (what a blurry model gets) and a single class (a
collapsed model). The classifier is trained on grey and binarized digits alike, so both kinds are in its domain.

    python benchmarks/quality.py floors                       # trains the classifier once (runs/mnist-classifier.pt)
    python benchmarks/quality.py score runs/gan-mnist/samples.pt runs/vae-mnist/samples.png
"""
import argparse
import json
import math
import sys
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision.transforms.functional as TF
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import common  # noqa: E402

CLASSIFIER = ROOT / "runs" / "mnist-classifier.pt"


# ----------------------------------------------------------------------------- the classifier

class Classifier(nn.Module):
    """A small MNIST CNN: 28x28 -> 32 x 14x14 -> 64 x 7x7 -> 128 features -> 10 logits."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),   # B x 32 x 14 x 14
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # B x 64 x 7 x 7
            nn.Flatten(), nn.Linear(64 * 49, 128), nn.ReLU())             # B x 128: the space of every figure
        self.head = nn.Linear(128, 10)

    def forward(self, x):
        return self.head(self.features(x))


def binarize(x, seed):
    """Images in [0, 1] -> 0/1 pixels drawn with those probabilities (how the AR models see MNIST)."""
    return torch.bernoulli(x, generator=torch.Generator(x.device).manual_seed(seed))


def fit_classifier(x, y, steps, seed=0, batch=128):
    """Adam on cross-entropy; each batch binarized with probability 1/2, so 0/1 samples are not out of domain."""
    torch.manual_seed(seed)  # the initial weights
    model, rng = Classifier().to(x.device), torch.Generator(x.device).manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(steps):
        i = torch.randint(0, len(x), (batch,), generator=rng, device=x.device)
        xb = x[i]
        if torch.rand((), generator=rng, device=x.device) < 0.5:
            xb = torch.bernoulli(xb, generator=rng)
        loss = F.cross_entropy(model(xb), y[i])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return model.eval()


def load_mnist(device):
    """(train x in [0, 1], train y, test x, test y) from data/MNIST."""
    x, y = common.load_dataset("mnist", ROOT / "data", "train", device)
    x_test, y_test = common.load_dataset("mnist", ROOT / "data", "test", device)
    return x.float() / 255, y, x_test.float() / 255, y_test


def mnist_classifier(path, device, epochs=2):
    """The cached classifier, trained first if `path` does not exist (2 epochs: about a CPU-minute)."""
    x, y, x_test, y_test = load_mnist(device)
    if path.exists():
        model = Classifier().to(device)
        model.load_state_dict(torch.load(path, map_location=device, weights_only=True))
        model.eval()
    else:
        model = fit_classifier(x, y, epochs * len(x) // 128)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(model.state_dict(), path)
    data = (x, y, x_test, y_test)
    print("classifier ({}): test accuracy {:.2%} grey, {:.2%} binarized".format(path, *accuracy(model, data)))
    return model, data


def accuracy(model, data):
    """Test accuracy on the grey test images and on the same binarized."""
    x_test, y_test = data[2], data[3]
    acc = lambda images: (predict(model, images)[0].argmax(1) == y_test).float().mean().item()
    return acc(x_test), acc(binarize(x_test, 1))


@torch.no_grad()
def predict(model, x, batch=1000):
    """(softmax probabilities, 128-d features) of images in [0, 1]."""
    feats = torch.cat([model.features(x[i:i + batch]) for i in range(0, len(x), batch)])
    return torch.softmax(model.head(feats), 1), feats


# ----------------------------------------------------------------------------- the figures

def frechet_distance(f1, f2):
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)) between Gaussians fitted to two feature sets;
    Tr (S1 S2)^(1/2) = sum sqrt(eig(S1^(1/2) S2 S1^(1/2))), a symmetric matrix, so eigh is exact and stable."""
    f1, f2 = f1.double(), f2.double()
    mu1, mu2, s1, s2 = f1.mean(0), f2.mean(0), torch.cov(f1.T), torch.cov(f2.T)
    w, v = torch.linalg.eigh(s1)
    s1_half = v @ torch.diag(w.clamp(min=0).sqrt()) @ v.T
    tr_sqrt = torch.linalg.eigvalsh(s1_half @ s2 @ s1_half).clamp(min=0).sqrt().sum()
    return ((mu1 - mu2) ** 2).sum().item() + (s1.trace() + s2.trace() - 2 * tr_sqrt).item()


def in_manifold(points, support, k):
    """For each point: is it within some support point's k-NN radius (the distance from that support point to
    its k-th nearest other support point)? The manifold estimate of Kynkaanniemi et al. (2019)."""
    d_support = torch.cdist(support, support)
    radius = d_support.kthvalue(k + 1, dim=1).values  # k + 1: the nearest is the point itself, at 0
    return (torch.cdist(points, support) <= radius[None]).any(1)


def precision_recall(fake, real, k=3):
    """precision: samples that look real; recall: real images the samples cover. Equal-sized sets."""
    fake, real = fake.double(), real.double()
    return in_manifold(fake, real, k).float().mean().item(), in_manifold(real, fake, k).float().mean().item()


def class_entropy(counts):
    """H(class histogram) / log 10: 1 when all ten classes are equally frequent, 0 for a single class."""
    p = counts.double() / counts.sum()
    return -(p * p.clamp(min=1e-12).log()).sum().item() / math.log(10) + 0.0  # + 0.0: no -0.0


def score(model, images, test_feats, real_feats, labels=None):
    """Every figure for one set of N images in [0, 1]; real_feats: N test images' features (precision/recall)."""
    probs, feats = predict(model, images)
    counts = torch.bincount(probs.argmax(1), minlength=10)
    precision, recall = precision_recall(feats, real_feats)
    row = dict(n=len(images), fd=round(frechet_distance(feats, test_feats), 2), precision=round(precision, 3),
               recall=round(recall, 3), class_entropy=round(class_entropy(counts), 3), classes=counts.tolist())
    if labels is not None:  # a conditional model's samples: how often the classifier sees the class asked for
        row["asked"] = round((probs.argmax(1).cpu() == labels.cpu()).float().mean().item(), 3)
    return row


def print_row(name, row):
    asked = f" | asked class {row['asked']:.3f}" if "asked" in row else ""
    print(f"{name:>34}: N {row['n']} | FD {row['fd']:7.2f} | precision {row['precision']:.3f} | recall "
          f"{row['recall']:.3f} | class entropy {row['class_entropy']:.3f}{asked} | classes {row['classes']}")


# ----------------------------------------------------------------------------- inputs

def read_samples(path, size=28):
    """samples.pt (N x 1 x H x W in [0, 1], as every script's --sample writes it) or a PNG grid made by
    common.save_grid (cells of size x size, 1-pixel white borders)."""
    path = Path(path)
    if not path.is_file():
        raise common.UsageError(f"{path}: no such file; make samples with a script's --sample first")
    if path.suffix == ".png":
        grid = TF.pil_to_tensor(Image.open(path).convert("L")).float() / 255  # 1 x H x W
        rows, cols = (grid.shape[1] - 1) // (size + 1), (grid.shape[2] - 1) // (size + 1)
        x = torch.stack([grid[:, 1 + i * (size + 1):1 + i * (size + 1) + size, 1 + j * (size + 1):1 + j * (size + 1) + size]
                         for i in range(rows) for j in range(cols)])
    else:
        x = torch.load(path, map_location="cpu", weights_only=True).float()
    if x.dim() != 4 or x.shape[1:] != (1, size, size) or x.min() < 0 or x.max() > 1:
        raise common.UsageError(f"{path}: expected N x 1 x {size} x {size} images in [0, 1] (MNIST samples), "
                                f"got {tuple(x.shape)} in [{x.min():.3g}, {x.max():.3g}]")
    return x


def read_labels(path):
    """The classes the samples in `path` were drawn for: labels.pt beside a samples.pt (a --conditional model's
    --sample writes it), else None."""
    labels = Path(path).with_name("labels.pt")
    return torch.load(labels, weights_only=True) if Path(path).suffix == ".pt" and labels.is_file() else None


def floors(data, n, seed=0):
    """The calibration sets: N real training images as they are, binarized, blurred, and of one class (7)."""
    x, y = data[0], data[1]
    idx = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:n].to(x.device)
    real = x[idx]
    sevens = x[y == 7][:n]
    return {"real training images (floor)": real,
            "real, binarized (0/1 floor)": binarize(real, seed),
            "real, blurred (sigma 1)": TF.gaussian_blur(real, kernel_size=7, sigma=1.0),
            "real, one class (7)": sevens}


def reference(model, data, n, seed=0):
    """Features of the whole test set (FD) and of N test images (precision and recall)."""
    x_test = data[2]
    test_feats = predict(model, x_test)[1]
    idx = torch.randperm(len(x_test), generator=torch.Generator().manual_seed(seed + 1))[:n].to(x_test.device)
    return test_feats, test_feats[idx]


@common.entry
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["floors", "score"])
    p.add_argument("samples", nargs="*", help="score: samples.pt files or PNG grids")
    p.add_argument("--n", type=int, default=1000, help="images per set (the first N of each file)")
    p.add_argument("--classifier", default=str(CLASSIFIER), help="the cached classifier (trained if absent)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", default="", help="also write the rows to this file")
    args = p.parse_args(argv)
    if args.what == "score" and not args.samples:
        raise common.UsageError("score needs samples.pt files or PNG grids: python benchmarks/quality.py score runs/gan-mnist/samples.pt")
    torch.set_num_threads(args.threads)
    model, data = mnist_classifier(Path(args.classifier), torch.device("cpu"))
    test_feats, real_feats = reference(model, data, args.n)
    sets = floors(data, args.n) if args.what == "floors" else {s: read_samples(s)[:args.n] for s in args.samples}
    labels = {} if args.what == "floors" else {s: read_labels(s) for s in args.samples}
    rows = {}
    for name, images in sets.items():
        if len(images) < args.n:
            raise common.UsageError(f"{name}: {len(images)} images, fewer than --n {args.n}; draw more or lower --n")
        asked = labels.get(name)
        rows[name] = score(model, images, test_feats, real_feats, None if asked is None else asked[:args.n])
        print_row(name, rows[name])
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
