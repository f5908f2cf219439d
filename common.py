"""Small helpers shared by the five model scripts: CLI, device, data, checkpoints, logging, EMA.

Everything that is about one model family lives in that family's script; this file holds only what
at least two scripts need. Read a model script first and come here when it calls something.
"""
import argparse
import contextlib
import copy
import dataclasses
import functools
import json
import math
import os
import pickle
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn


# ----------------------------------------------------------------------------- errors and the CLI

class UsageError(Exception):
    """Bad input from the user: printed as one line, exit code 2, nothing overwritten."""


def entry(main):
    """Decorate a script's main(argv): a UsageError becomes one line on stderr and exit code 2."""
    @functools.wraps(main)
    def wrapped(argv=None):
        try:
            return main(argv)
        except UsageError as e:
            print(f"error: {e}", file=sys.stderr)
            raise SystemExit(2)
    return wrapped


def opt(default, help, choices=None, runtime=False):
    """A Config field with its --help text. runtime=True marks a knob that may differ between the run
    that wrote a checkpoint and the run that reads it (steps, sampling options...); every other field
    must match, or the checkpoint would be read into a different model."""
    return dataclasses.field(default=default, metadata=dict(help=help, choices=choices, runtime=runtime))


@dataclasses.dataclass
class TrainConfig:
    """The knobs every script has; each script subclasses it and may redeclare a field for its own default."""
    dataset: str = opt("mnist", "mnist | fashion-mnist | cifar10 | a folder of images")
    data_dir: str = opt("./data", "where the datasets live (MNIST in <data-dir>/MNIST/raw/)", runtime=True)
    out: str = opt("", "output folder (default runs/<script>-<dataset>)", runtime=True)
    device: str = opt("auto", "auto | cuda | mps | cpu", runtime=True)
    precision: str = opt("auto", "auto: bf16 autocast on CUDA, fp32 elsewhere; bf16: also on the CPU (fast only with "
                         "AMX or AVX512-BF16); fp32", choices=["auto", "bf16", "fp32"], runtime=True)
    compile: bool = opt(False, "torch.compile the model (CUDA)", runtime=True)
    seed: int = opt(0, "random seed", runtime=True)
    batch_size: int = opt(128, "images per training step", runtime=True)
    lr: float = opt(2e-4, "learning rate", runtime=True)
    steps: int = opt(10000, "training steps", runtime=True)
    log_every: int = opt(100, "steps between progress lines", runtime=True)
    sample_every: int = opt(2000, "steps between sample grids", runtime=True)
    ckpt_every: int = opt(2000, "steps between checkpoints", runtime=True)
    resume: bool = opt(False, "continue the run in --out from its checkpoint", runtime=True)
    sample: bool = opt(False, "only sample from the checkpoint in --out", runtime=True)
    num_samples: int = opt(64, "images to draw with --sample", runtime=True)


def parse_config(cls, argv=None):
    """Build an argparse parser from a Config dataclass (--batch-size 64 and --batch-size=64 both work)."""
    p = argparse.ArgumentParser(description=sys.modules[cls.__module__].__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in dataclasses.fields(cls):
        name, meta = "--" + f.name.replace("_", "-"), f.metadata
        help = f"{meta.get('help', '')} (default: {f.default})"
        if f.type in (bool, "bool"):
            p.add_argument(name, action=argparse.BooleanOptionalAction, default=f.default, help=help)
        else:
            kind = {"int": int, "float": float, "str": str}.get(f.type, f.type)
            p.add_argument(name, type=kind, default=f.default, choices=meta.get("choices"), help=help)
    return cls(**vars(p.parse_args(argv)))


# ----------------------------------------------------------------------------- device and precision

def get_device(name="auto"):
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda was asked for but no CUDA GPU is visible; use --device cpu")
    if name not in ("cuda", "mps", "cpu"):
        raise UsageError(f"unknown --device {name!r}: use auto, cuda, mps or cpu")
    if name == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # TF32 matmuls and convs: ~free speed, fp32 range
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True  # fixed input shapes, so let cuDNN pick the fastest kernels
    return torch.device(name)


def autocast(device, precision):
    """bf16 autocast (same exponent range as fp32, so no loss scaling is needed): by default on CUDA only; on the
    CPU only when asked for, because only CPUs with bf16 units (AMX, AVX512-BF16) run it faster than fp32."""
    if device.type in ("cuda", "cpu") and (precision == "bf16" or (precision == "auto" and device.type == "cuda")):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def maybe_compile(model, cfg):
    return torch.compile(model) if cfg.compile else model


def seed_everything(seed):
    torch.manual_seed(seed)  # seeds the CPU and every CUDA device
    np.random.seed(seed)


# ----------------------------------------------------------------------------- data

DATASETS = ("mnist", "fashion-mnist", "cifar10")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


def dataset_name(dataset):
    """A short name for output folders: the dataset, or the folder's last part."""
    return dataset if dataset in DATASETS else Path(dataset).name or "folder"


def load_dataset(dataset, data_dir, split="train", device="cpu"):
    """Return (x, y): x is one uint8 tensor N x C x H x W on `device`, y the int64 labels (or None).

    Holding the whole (small) dataset on the device lets a training step draw its batch by indexing,
    with no DataLoader in the hot loop.
    """
    if dataset in ("mnist", "fashion-mnist"):
        x, y = _load_mnist(dataset, data_dir, split)
    elif dataset == "cifar10":
        x, y = _load_cifar10(data_dir, split)
    elif Path(dataset).is_dir():
        x, y = _load_folder(Path(dataset), split)
    else:
        raise UsageError(f"unknown dataset {dataset!r}: use mnist, fashion-mnist, cifar10 or a folder of images")
    return x.to(device), (y.to(device) if y is not None else None)


@contextlib.contextmanager
def _no_leftovers(root):
    """If a download fails, remove the folders it created, so nothing is left half-written."""
    existed = {p for p in [root, *root.rglob("*")]} if root.exists() else set()
    try:
        yield
    except Exception:
        if root.exists():
            for p in sorted(root.rglob("*"), key=lambda p: -len(p.parts)) + [root]:
                if p not in existed:
                    shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
        raise


def _load_mnist(dataset, data_dir, split):
    import torchvision  # imported here: only the data loaders need it
    cls, folder = ((torchvision.datasets.MNIST, "MNIST") if dataset == "mnist"
                   else (torchvision.datasets.FashionMNIST, "FashionMNIST"))
    raw = Path(data_dir) / folder / "raw"
    try:
        with _no_leftovers(Path(data_dir)):
            ds = cls(data_dir, train=(split == "train"), download=True)
    except Exception as e:
        raise UsageError(f"{dataset} is not in {raw}/ and could not be downloaded ({type(e).__name__}); put the "
                         f"four raw IDX files (train-images-idx3-ubyte ...) in {raw}/") from None
    return ds.data.unsqueeze(1).contiguous(), ds.targets.long()


def _load_cifar10(data_dir, split):
    """Read the python-pickle batches ourselves (torchvision is used only to download them)."""
    root = Path(data_dir) / "cifar-10-batches-py"
    if not root.is_dir():
        import torchvision
        try:
            with _no_leftovers(Path(data_dir)):
                torchvision.datasets.CIFAR10(data_dir, download=True)
        except Exception as e:
            raise UsageError(f"cifar10 is not in {root}/ and could not be downloaded ({type(e).__name__}); "
                             f"unpack cifar-10-python.tar.gz into {data_dir}/") from None
    names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    xs, ys = [], []
    for name in names:
        with open(root / name, "rb") as f:
            batch = pickle.load(f, encoding="latin1")
        xs.append(np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
        ys.append(np.asarray(batch["labels"], dtype=np.int64))
    return torch.from_numpy(np.concatenate(xs)), torch.from_numpy(np.concatenate(ys))


def _load_folder(folder, split):
    """Every image file in a folder, all of one size; every 10th (sorted by name) is the test split."""
    from PIL import Image
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if len(files) < 2:
        raise UsageError(f"{folder} holds fewer than 2 images ({', '.join(IMAGE_SUFFIXES)}); add images or pick another --dataset")
    files = [f for i, f in enumerate(files) if (i % 10 == 9) == (split == "test")]
    images = [Image.open(f) for f in files]
    mode = "L" if all(im.mode in ("L", "1") for im in images) else "RGB"
    sizes = {im.size for im in images}
    if len(sizes) > 1:
        raise UsageError(f"images in {folder} have {len(sizes)} different sizes {sorted(sizes)[:3]}; resize them to one size first")
    x = np.stack([np.asarray(im.convert(mode)) for im in images])
    x = x[:, None] if mode == "L" else x.transpose(0, 3, 1, 2)
    return torch.from_numpy(np.ascontiguousarray(x)), None


def random_batch(x, batch_size, generator, y=None):
    """Draw a batch by indexing with a seeded generator (i.i.d. draws, so resuming is exact)."""
    idx = torch.randint(len(x), (batch_size,), device=x.device, generator=generator)
    return (x[idx], y[idx]) if y is not None else x[idx]


def data_generator(device, seed):
    return torch.Generator(device=device).manual_seed(seed)


def binarize(x_uint8, generator=None):
    """Stochastic binarization: pixel ~ Bernoulli(intensity/255). Used for training on binarized MNIST."""
    return torch.bernoulli(x_uint8.float() / 255, generator=generator)


def fixed_binarization(x_uint8, seed=0):
    """One seeded binarization of a whole split, the same in every run, so test NLLs are comparable."""
    g = torch.Generator().manual_seed(seed)
    return torch.bernoulli(x_uint8.cpu().float() / 255, generator=g).to(x_uint8.device)


def to_signed(x_uint8):
    """uint8 {0..255} -> float [-1, 1], the range DDPM and the GAN work in."""
    return x_uint8.float() / 127.5 - 1


def save_grid(images, path, nrow=None):
    """Save a batch of images in [0, 1] as one PNG grid (square by default)."""
    import torchvision.utils as vutils
    nrow = nrow or max(1, int(math.sqrt(len(images))))
    vutils.save_image(images.float().clamp(0, 1).cpu(), str(path), nrow=nrow, padding=1, pad_value=1.0)


# ----------------------------------------------------------------------------- runs, checkpoints, logs

def out_dir(cfg, script):
    return Path(cfg.out or f"runs/{script}-{dataset_name(cfg.dataset)}")


def start_run(cfg, script):
    """Make the output folder for a fresh run, refusing to overwrite an earlier run's checkpoint."""
    out = out_dir(cfg, script)
    if (out / "ckpt.pt").exists() and not cfg.resume:
        raise UsageError(f"{out} already holds a run; pass --resume to continue it, or --out to start a new one")
    if cfg.resume and not (out / "ckpt.pt").exists():
        raise UsageError(f"--resume: no checkpoint at {out / 'ckpt.pt'}; train without --resume first")
    out.mkdir(parents=True, exist_ok=True)
    if not cfg.resume:
        atomic_write_text(out / "config.json", json.dumps(dataclasses.asdict(cfg), indent=2))
    return out


def atomic_write_text(path, text):
    tmp = Path(str(path) + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def save_checkpoint(path, script, cfg, step, **state):
    """Write model/optimizer/EMA state dicts, step, config and RNG state; temp file then rename, so a crash
    mid-write never leaves a broken checkpoint in place of a good one."""
    ckpt = dict(script=script, config=dataclasses.asdict(cfg), step=step,
                rng_cpu=torch.get_rng_state(),
                rng_cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
                **{k: (v.get_state() if isinstance(v, torch.Generator) else v.state_dict()) for k, v in state.items()})
    tmp = Path(str(path) + ".tmp")
    torch.save(ckpt, tmp)
    os.replace(tmp, path)


def load_checkpoint(path, script, cfg, **state):
    """Load a checkpoint written by `script` into the given objects (modules, optimizers, generators) and
    restore the RNGs; return its step. Refuses a checkpoint of another script or another model config."""
    path = Path(path)
    if not path.exists():
        raise UsageError(f"no checkpoint at {path}; train first (or point --out at the run)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UsageError(f"{path} is not a readable checkpoint ({type(e).__name__}); delete it or pick another --out") from None
    if ckpt.get("script") != script:
        raise UsageError(f"{path} was written by {ckpt.get('script', 'another program')}.py, not {script}.py; point --out at a {script} run")
    runtime = {f.name for f in dataclasses.fields(cfg) if f.metadata.get("runtime")}
    saved, now = ckpt["config"], dataclasses.asdict(cfg)
    diff = [k for k in now if k not in runtime and saved.get(k) != now[k]]
    if diff:
        flags = ", ".join(f"--{k.replace('_', '-')} {saved.get(k)!r} (now {now[k]!r})" for k in diff)
        raise UsageError(f"{path} was trained with {flags}; pass the same options, or another --out")
    for k, obj in state.items():
        if isinstance(obj, torch.Generator):
            obj.set_state(ckpt[k])
        else:
            obj.load_state_dict(ckpt[k])
    torch.set_rng_state(ckpt["rng_cpu"])
    if torch.cuda.is_available() and ckpt["rng_cuda"]:
        torch.cuda.set_rng_state_all(ckpt["rng_cuda"])
    return ckpt["step"]


class Logger:
    """Appends one JSON line per log to log.jsonl and prints a progress line with img/s and ETA."""

    def __init__(self, out, total_steps, start_step=0):
        self.path, self.total = Path(out) / "log.jsonl", total_steps
        self.last_step, self.last_time, self.images = start_step, time.time(), 0

    def count(self, n_images):
        self.images += n_images

    def log(self, step, **figures):
        now = time.time()
        img_s = self.images / max(now - self.last_time, 1e-9)
        steps_s = (step - self.last_step) / max(now - self.last_time, 1e-9)
        eta = (self.total - step) / max(steps_s, 1e-9)
        figures = {k: float(v) for k, v in figures.items()}
        with open(self.path, "a") as f:
            f.write(json.dumps(dict(step=step, img_per_s=round(img_s, 1), **figures)) + "\n")
        figs = " | ".join(f"{k} {v:.4g}" for k, v in figures.items())
        print(f"step {step:>6}/{self.total} | {figs} | {img_s:,.0f} img/s | ETA {format_seconds(eta)}", flush=True)
        self.last_step, self.last_time, self.images = step, now, 0


def format_seconds(s):
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def check_finite(loss, step):
    if not torch.isfinite(loss):
        raise UsageError(f"the loss became {loss.item()} at step {step}; lower --lr (the last checkpoint was kept)")


# ----------------------------------------------------------------------------- EMA of weights

def make_ema(model):
    """A frozen copy of the model whose weights track an exponential moving average of the model's."""
    ema = copy.deepcopy(model).eval()
    ema.requires_grad_(False)
    return ema


@torch.no_grad()
def ema_update(ema, model, decay, step):
    """theta_ema <- d * theta_ema + (1 - d) * theta. The decay ramps up as (1+step)/(10+step), so a short run's
    average is not dominated by its random initialization."""
    d = min(decay, (1 + step) / (10 + step))
    ema_p, model_p = list(ema.parameters()), list(model.parameters())
    torch._foreach_lerp_(ema_p, model_p, 1 - d)
    for b_ema, b in zip(ema.buffers(), model.buffers()):
        b_ema.copy_(b)  # buffers (BatchNorm statistics, masks) are copied, not averaged


# ----------------------------------------------------------------------------- autoregressive pixel models
# PixelCNN and PixelRNN both start with a 7x7 mask-A convolution, end with 1x1 mask-B convolutions, and
# read the same per-pixel distributions off their output, so those pieces live here.

class MaskedConv2d(nn.Conv2d):
    """A convolution that sees only pixels before the centre in raster order (van den Oord et al. 2016).

    Mask A (first layer) also hides the centre pixel itself; mask B (later layers) lets a feature see the
    centre, which holds only information from earlier pixels after a mask-A layer. With colour
    (`colors` = 3) the channels are split into R, G, B thirds and, at the centre, R sees nothing of the
    pixel (A) or only R features (B), G sees R (A) or R, G (B), and B sees R, G (A) or R, G, B (B).
    A 5x5 kernel, mask A / mask B (1 = used, 0 = masked):

        1 1 1 1 1      1 1 1 1 1
        1 1 1 1 1      1 1 1 1 1
        1 1 0 0 0      1 1 1 0 0
        0 0 0 0 0      0 0 0 0 0
        0 0 0 0 0      0 0 0 0 0

    The mask is a buffer multiplied into the weight on every forward pass, so the optimizer can never
    move a masked weight away from zero in effect.
    """

    def __init__(self, in_ch, out_ch, kernel_size, mask_type, colors=1, **kwargs):
        kh, kw = (kernel_size, kernel_size) if isinstance(kernel_size, int) else kernel_size
        super().__init__(in_ch, out_ch, (kh, kw), padding=(kh // 2, kw // 2), **kwargs)
        assert mask_type in ("A", "B") and in_ch % colors == 0 and out_ch % colors == 0
        mask = torch.ones_like(self.weight)  # out_ch x in_ch x kh x kw
        mask[:, :, kh // 2, kw // 2:] = 0  # the centre row, from the centre rightwards
        mask[:, :, kh // 2 + 1:] = 0  # every row below the centre
        group_out = torch.arange(out_ch) * colors // out_ch  # colour of each output channel: 0=R, 1=G, 2=B
        group_in = torch.arange(in_ch) * colors // in_ch
        sees = group_out[:, None] > group_in[None, :] if mask_type == "A" else group_out[:, None] >= group_in[None, :]
        mask[:, :, kh // 2, kw // 2] = sees.float()  # the centre pixel: only earlier colours (A) or up to its own (B)
        self.register_buffer("mask", mask)

    def forward(self, x):
        return nn.functional.conv2d(x, self.weight * self.mask, self.bias, self.stride, self.padding, self.dilation)


def pixel_levels(binary):
    """Output values per sub-pixel: 1 Bernoulli logit for binarized data, 256 softmax logits for 8-bit."""
    return 1 if binary else 256


def pixel_logits(out, colors, binary):
    """Reshape a network output of colors*levels channels to B x C x levels x H x W (levels = 1 or 256).
    The channel layout matches MaskedConv2d's colour groups: R's logits first, then G's, then B's."""
    b, _, h, w = out.shape
    return out.view(b, colors, pixel_levels(binary), h, w)


def pixel_nll(logits, x, binary):
    """-log p(x) = -sum_i log p(x_i | x_<i), in nats per image (a B-vector).

    `x` holds the targets: 0/1 floats for binarized data, uint8 levels 0..255 for 8-bit data. The network
    sees x only through masked layers, so the sum over pixels is exactly the chain rule."""
    if binary:
        nll = nn.functional.binary_cross_entropy_with_logits(logits[:, :, 0], x.float(), reduction="none")
    else:
        nll = nn.functional.cross_entropy(logits.transpose(1, 2), x.long(), reduction="none")  # B x C x H x W
    return nll.flatten(1).sum(1)


def sample_pixel(logits, binary, generator=None):
    """Draw one value per sub-pixel from B x C x levels [x ...] logits (0/1 floats, or levels 0..255)."""
    if binary:
        return torch.bernoulli(torch.sigmoid(logits[:, :, 0].float()), generator=generator)
    probs = torch.softmax(logits.float().movedim(2, -1), -1)
    return torch.multinomial(probs.reshape(-1, probs.shape[-1]), 1, generator=generator).view(probs.shape[:-1]).float()


def nats_to_bits_per_dim(nats_per_image, dims):
    return nats_per_image / (dims * math.log(2))
