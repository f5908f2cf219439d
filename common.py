"""Infrastructure shared by the five model scripts: the CLI, device and precision, data, runs, checkpoints, logs, EMA.

No model layer and no loss lives here: those are in the script that teaches them. Read a model script first
and come here when it calls something.
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
import signal
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

CHECKPOINT_FORMAT = 2  # 2: the model options and the run options are stored apart


# ----------------------------------------------------------------------------- errors and the CLI

class UsageError(Exception):
    """Bad input from the user: printed as one line, exit code 2, nothing written."""


def entry(main):
    """Decorate a script's main(argv): a UsageError becomes one line on stderr and exit code 2."""
    @functools.wraps(main)
    def wrapped(argv=None):
        try:
            result = main(argv)
        except UsageError as e:
            where = f" (rank {rank()} of {world()})" if world() > 1 else ""
            print(f"error{where}: {e}", file=sys.stderr)
            raise SystemExit(2)  # under torchrun, torchrun then stops the other ranks
        if distributed():  # under torchrun: every rank is done before the process group is taken down
            dist.barrier()
            dist.destroy_process_group()
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(0)  # at once: gloo's threads, torn down at interpreter exit, can abort the process (seen 1 in 14)
        return result
    return wrapped


def opt(default, help, valid=None, choices=None, mode=None):
    """A Config field with its --help text. `valid` is the range of a number in interval notation ("[1, inf)",
    "(0, inf)", "[0, 1)"); `mode` marks a switch that picks what the script does instead of training: "checkpoint"
    (it reads the run in --out) or "alone" (it does not)."""
    return dataclasses.field(default=default, metadata=dict(help=help, valid=valid, choices=choices, mode=mode))


@dataclasses.dataclass
class ModelConfig:
    """What defines a model. Stored in its checkpoint, so that --sample, --eval and --resume need none of it."""
    dataset: str = opt("mnist", "mnist | fashion-mnist | cifar10 | a folder of images")
    conditional: bool = opt(False, "learn p(x | class) from the labels (mnist, fashion-mnist, cifar10), so that --label "
                            "picks the class to draw")


@dataclasses.dataclass
class RunConfig:
    """What one run may change: each script subclasses it and may redeclare a field for its own default."""
    data_dir: str = opt("./data", "where the datasets live (MNIST in <data-dir>/MNIST/raw/)")
    out: str = opt("", "output folder (default runs/<script>-<dataset>)")
    device: str = opt("auto", "auto | cuda | mps | cpu", choices=["auto", "cuda", "mps", "cpu"])
    precision: str = opt("auto", "auto: bf16 autocast on CUDA, fp32 elsewhere; bf16: also on the CPU (fast only with "
                         "AMX or AVX512-BF16); fp32", choices=["auto", "bf16", "fp32"])
    compile: bool = opt(False, "torch.compile the model (CUDA)")
    seed: int = opt(0, "random seed")
    batch_size: int = opt(128, "images per training step", "[1, inf)")
    lr: float = opt(2e-4, "learning rate", "(0, inf)")
    steps: int = opt(10000, "training steps", "[1, inf)")
    log_every: int = opt(100, "steps between progress lines", "[1, inf)")
    sample_every: int = opt(2000, "steps between sample grids", "[1, inf)")
    ckpt_every: int = opt(2000, "steps between checkpoints", "[1, inf)")
    num_samples: int = opt(64, "images to draw with --sample (and in the grids of a run)", "[1, inf)")
    label: int = opt(-1, "the class a --conditional model draws (--sample and the grids of a run); -1: every class, "
                     "one row each", "[-1, 9]")
    resume: bool = opt(False, "continue the run in --out from its checkpoint", mode="checkpoint")
    sample: bool = opt(False, "only sample from the checkpoint in --out", mode="checkpoint")
    eval: bool = opt(False, "only evaluate the checkpoint in --out on the test set", mode="checkpoint")
    preset: str = opt("auto", "the recipe of a new run: full (the model sized for one GPU), quick (a run of minutes on a "
                      "CPU), auto (full on a CUDA GPU, quick elsewhere); a flag you give overrides it",
                      choices=["auto", "full", "quick"])
    plot: bool = opt(False, "only redraw curves.png from log.jsonl in --out", mode="folder")
    recipe: str = dataclasses.field(default="", metadata=dict(cli=False))  # the line saying which preset, and why
    model: ModelConfig = dataclasses.field(default=None, metadata=dict(cli=False))  # filled in by parse_args


def check_range(flag, value, valid):
    """Refuse a number outside its interval, e.g. valid = "[0, 1)" for 0 <= value < 1."""
    lo, hi = (s.strip() for s in valid[1:-1].split(","))
    ok = math.isfinite(value) and (value >= float(lo) if valid[0] == "[" else value > float(lo))
    ok = ok and (value <= float(hi) if valid[-1] == "]" else value < float(hi))
    if not ok:
        raise UsageError(f"{flag} {value}: must be in {valid}")


class Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse's own errors (an unknown flag, "abc" for a number): one line, exit 2
        raise UsageError(message)


def parse_flags(model_cls, run_cls, argv=None):
    """The CLI generated from the two Config dataclasses (--batch-size 64 and --batch-size=64 both work), every
    number checked against its range. Returns the flags on the command line: (run options, model options), dicts."""
    parser = Parser(description=sys.modules[run_cls.__module__].__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for cls, title in [(model_cls, "model options (stored in the checkpoint)"), (run_cls, "run options")]:
        group = parser.add_argument_group(title)
        for f in dataclasses.fields(cls):
            if f.metadata.get("cli", True):
                add_flag(group, f)
    given = vars(parser.parse_args(argv))  # only the flags on the command line: every default is SUPPRESS
    model_names = {f.name for f in dataclasses.fields(model_cls)}
    run_flags = {k: v for k, v in given.items() if k not in model_names}
    model_flags = {k: v for k, v in given.items() if k in model_names}
    check_ranges(run_cls(**run_flags))
    check_ranges(model_cls(**model_flags))
    return run_flags, model_flags


def check_ranges(cfg):
    for f in dataclasses.fields(cfg):
        if f.metadata.get("valid") is not None:
            check_range(flag(f.name), getattr(cfg, f.name), f.metadata["valid"])


FRESH = ("out", "device", "compile")  # run options a mode that reads a run does not take from it


def parse_args(model_cls, run_cls, script, argv=None, presets=None):
    """The config of this command, from three layers, each overriding the one before:
    - the defaults of the dataclasses;
    - for a new run, the recipe of `presets` for the device at hand (--preset); for --resume, --sample, --eval...,
      the options of the run in --out (its model options, which no flag may contradict, and its run options);
    - the flags on the command line.
    Returns the run config with `.model` set."""
    run_flags, model_flags = parse_flags(model_cls, run_cls, argv)
    cfg = run_cls(**run_flags)
    modes = {f.name: f.metadata["mode"] for f in dataclasses.fields(cfg) if f.metadata.get("mode") and getattr(cfg, f.name)}
    if len(modes) > 1:
        raise UsageError(f"{' and '.join(map(flag, modes))} cannot go together; pick one")
    out = run_flags.setdefault("out", cfg.out or f"runs/{script}-{dataset_name(model_flags.get('dataset', model_cls.dataset))}")
    check_out_folder(Path(out))
    if "checkpoint" in modes.values():  # --resume, --sample, --eval...: the options come from the run
        ckpt = read_checkpoint(Path(out) / "ckpt.pt", script)
        saved = ckpt["model_config"]
        for k, v in model_flags.items():
            if saved.get(k) != v:
                raise UsageError(f"{out} holds a model trained with {flag(k)} {saved.get(k)} (now {v}); "
                                 f"drop {flag(k)}, or pick another --out")
        mode_names = {f.name for f in dataclasses.fields(run_cls) if f.metadata.get("mode")}
        run_names = {f.name for f in dataclasses.fields(run_cls)} - mode_names - set(FRESH) - {"model"}
        model, run = saved, {k: v for k, v in ckpt["run_config"].items() if k in run_names} | run_flags
    elif "folder" in modes.values():  # --plot: only the folder's log
        model, run = model_flags, run_flags
    else:
        if (Path(out) / "ckpt.pt").exists() and not modes:
            raise UsageError(f"{out} already holds a run; pass --resume to continue it, or --out to start a new one")
        name, recipe, line = pick_preset(presets or {}, cfg)
        model_names = {f.name for f in dataclasses.fields(model_cls)}
        model = {k: v for k, v in recipe.items() if k in model_names} | model_flags
        run = {k: v for k, v in recipe.items() if k not in model_names} | run_flags | dict(preset=name, recipe=line)
    cfg = run_cls(**run)
    cfg.model = model_cls(**model)
    check_ranges(cfg)  # a recipe's values and a checkpoint's are held to the same ranges as flags
    check_ranges(cfg.model)
    check_label(cfg)  # in every mode, --eval's included
    return cfg


def pick_preset(presets, cfg):
    """(name, overrides, the line that says which recipe was taken and why): --preset, or for auto the device's
    recipe: "full" on a CUDA GPU, "quick" elsewhere (a CPU or an Apple GPU)."""
    if cfg.preset != "auto":
        name, why = cfg.preset, f"--preset {cfg.preset}"
    else:
        device = get_device(cfg.device).type
        name = "full" if device == "cuda" else "quick"
        why = "a CUDA GPU is here" if name == "full" else f"no CUDA GPU here, device {device}"
    if name not in presets:
        return name, {}, ""
    other = "quick" if name == "full" else "full"
    return name, presets[name]["options"], (f"recipe {name} ({why}): {presets[name]['about']}. --preset {other} "
                                            f"picks the other; a flag you give overrides either")


def flag(name):
    return "--" + name.replace("_", "-")


def add_flag(group, f):
    meta, valid = f.metadata, f.metadata.get("valid")
    help = f"{meta['help']} (default: {f.default}" + (f"; in {valid})" if valid else ")")
    if f.type in (bool, "bool"):
        group.add_argument(flag(f.name), action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=help)
    else:
        kind = {"int": int, "float": float, "str": str}.get(f.type, f.type)
        group.add_argument(flag(f.name), type=kind, default=argparse.SUPPRESS, choices=meta.get("choices"), help=help)


def check_out_folder(out):
    for p in [out, *out.parents]:
        if p.exists() and not p.is_dir():
            raise UsageError(f"--out {out}: {p} is a file, not a folder; pick another --out")


# ----------------------------------------------------------------------------- device and precision

def get_device(name="auto"):
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda was asked for but no CUDA GPU is visible; use --device cpu")
    if name == "mps" and not torch.backends.mps.is_available():
        raise UsageError("--device mps was asked for but this machine has no Apple GPU; use --device cpu")
    device = torch.device(name)
    if name == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # TF32 matmuls and convs: ~free speed, fp32 range
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True  # fixed input shapes, so let cuDNN pick the fastest kernels
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # under torchrun: one GPU per process
            device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
            torch.cuda.set_device(device)
    join_process_group(device)
    return device


# ----------------------------------------------------------------------------- several processes: torchrun and DDP
# Started with plain `python`, a script is one process and none of this does anything. Started by torchrun (which
# sets RANK, WORLD_SIZE, LOCAL_RANK and the rendezvous), it joins the process group and DistributedDataParallel
# averages the gradients of every step over the processes.

def join_process_group(device):
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not distributed():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")  # NCCL between GPUs, gloo on CPUs


def distributed():
    return dist.is_available() and dist.is_initialized()


def rank():
    return dist.get_rank() if distributed() else 0


def world():
    return dist.get_world_size() if distributed() else 1


def is_main():
    """Rank 0 writes the logs, pictures, checkpoints and eval.json; the other ranks only compute."""
    return rank() == 0


def ddp(model):
    """The model wrapped in DistributedDataParallel under torchrun (its gradients averaged over the ranks in
    backward()), or the model itself. Only call the wrapper; read attributes from the model."""
    return torch.nn.parallel.DistributedDataParallel(model) if distributed() else model


def unwrap(model):
    """The model inside a DDP wrapper (or the model itself)."""
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def say(*args):
    """print on rank 0 only: under torchrun every rank runs the same lines."""
    if is_main():
        print(*args, flush=True)


def per_rank_batch(batch_size):
    """--batch-size is the global batch of a step, the same for any number of processes (so is --lr's meaning):
    each of N ranks draws batch_size / N images."""
    if batch_size % world():
        raise UsageError(f"--batch-size {batch_size} does not split over {world()} processes; use a multiple of {world()}")
    return batch_size // world()


def max_over_ranks(value):
    """The largest of the ranks' values, on every rank: so that all ranks take the same decision (Ctrl-C, a clock)."""
    if not distributed():
        return value
    t = torch.tensor([float(value)], dtype=torch.float64, device=collective_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


def collective_device():
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def shard(n):
    """This rank's contiguous share of range(n): an evaluation or a sampler split over the ranks."""
    per = math.ceil(n / world())
    return range(min(n, rank() * per), min(n, (rank() + 1) * per))


def sum_over_ranks(value):
    """A float or a tensor summed over the ranks (the parts of a total computed on each rank's shard)."""
    if not distributed():
        return value
    t = torch.as_tensor(value, dtype=torch.float64).to(collective_device())
    dist.all_reduce(t)
    return t.item() if t.dim() == 0 else t.cpu()


def gather_cat(x):
    """Every rank's CPU tensor, concatenated in rank order, on every rank (the shards of a sampler)."""
    if not distributed():
        return x
    parts = [None] * world()
    dist.all_gather_object(parts, x.cpu())
    return torch.cat(parts)


def autocast(device, precision):
    """bf16 autocast (same exponent range as fp32, so no loss scaling is needed): by default on CUDA only; on the
    CPU only when asked for, because only CPUs with bf16 units (AMX, AVX512-BF16) run it faster than fp32."""
    if device.type in ("cuda", "cpu") and (precision == "bf16" or (precision == "auto" and device.type == "cuda")):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def maybe_compile(model, cfg):
    return torch.compile(model) if cfg.compile else model


def rank_seed(seed):
    """The seed of this process: rank r of a torchrun job draws from seed + 7919 r, its own numbers; rank 0 (and
    a plain `python` run) from seed itself."""
    return seed + 7919 * rank()


def seed_everything(seed):
    torch.manual_seed(rank_seed(seed))  # seeds the CPU and every CUDA device
    np.random.seed(rank_seed(seed))


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
        raise UsageError(f"unknown --dataset {dataset!r}: use mnist, fashion-mnist, cifar10 or a folder of images")
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
    xs, ys = [], []
    for name in [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]:
        with open(root / name, "rb") as f:
            batch = pickle.load(f, encoding="latin1")
        xs.append(np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
        ys.append(np.asarray(batch["labels"], dtype=np.int64))
    return torch.from_numpy(np.concatenate(xs)), torch.from_numpy(np.concatenate(ys))


def _load_folder(folder, split):
    """Every image file in a folder, all of one size; every 10th (sorted by name) is the test split."""
    from PIL import Image, UnidentifiedImageError
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if len(files) < 10:
        raise UsageError(f"--dataset {folder} holds {len(files)} images ({', '.join(IMAGE_SUFFIXES)}); it needs at "
                         f"least 10 (every 10th is the test split): add images or pick another --dataset")
    files = [f for i, f in enumerate(files) if (i % 10 == 9) == (split == "test")]
    images = []
    for f in files:
        try:
            images.append(Image.open(f))
        except (UnidentifiedImageError, OSError):
            raise UsageError(f"{f} is not an image that PIL can read; remove it from --dataset {folder}") from None
    mode = "L" if all(im.mode in ("L", "1") for im in images) else "RGB"
    sizes = {im.size for im in images}
    if len(sizes) > 1:
        raise UsageError(f"images in {folder} have {len(sizes)} different sizes {sorted(sizes)[:3]}; resize them to one size first")
    x = np.stack([np.asarray(im.convert(mode)) for im in images])
    x = x[:, None] if mode == "L" else x.transpose(0, 3, 1, 2)
    return torch.from_numpy(np.ascontiguousarray(x)), None


def load_split(cfg, split, device):
    """(x uint8, y or None) of --dataset: the labels only for a --conditional model, which cannot do without them."""
    x, y = load_dataset(cfg.model.dataset, cfg.data_dir, split, device)
    if cfg.model.conditional and y is None:
        raise UsageError(f"--conditional needs class labels and the folder {cfg.model.dataset} has none; drop "
                         f"--conditional, or use mnist, fashion-mnist or cifar10")
    return x, (y if cfg.model.conditional else None)


NUM_CLASSES = 10  # mnist, fashion-mnist and cifar10 all have ten classes


def check_label(cfg):
    if cfg.label >= 0 and not cfg.model.conditional:
        raise UsageError(f"--label {cfg.label} needs a model trained with --conditional, and {cfg.out or 'this one'} "
                         f"is not: drop --label, or train with --conditional")


def class_labels(cfg, n, device, start=0):
    """The classes of images start .. start+n-1 to draw: None for an unconditional model (which refuses --label), all
    --label K, or with no --label the ten classes in turn (image i is class i mod 10, so any share is balanced)."""
    if not cfg.model.conditional:
        check_label(cfg)
        return None
    if cfg.label >= 0:
        return torch.full((n,), cfg.label, dtype=torch.long, device=device)
    return torch.arange(start, start + n, device=device) % NUM_CLASSES


def random_batch(x, batch_size, generator, y=None):
    """Draw a batch by indexing with a seeded generator (i.i.d. draws, so resuming is exact)."""
    idx = torch.randint(len(x), (batch_size,), device=x.device, generator=generator)
    return (x[idx], y[idx]) if y is not None else x[idx]


def data_generator(device, seed):
    """The generator of a run's batches (and binarizations): each rank of a torchrun job has its own."""
    return torch.Generator(device=device).manual_seed(rank_seed(seed))


def is_binary(channels):
    """The one rule for binarized data (vae, pixelcnn, pixelrnn): 1-channel images are binarized, as in the papers'
    binarized MNIST; 3-channel images keep their 256 levels per sub-pixel."""
    return channels == 1


def binarize(x_uint8, generator=None):
    """Stochastic binarization: pixel ~ Bernoulli(intensity/255), a fresh draw every training step."""
    return torch.bernoulli(x_uint8.float() / 255, generator=generator)


def fixed_binarization(x_uint8, seed=0):
    """One seeded binarization of a whole test split, the same in every run, so test NLLs are comparable."""
    g = torch.Generator().manual_seed(seed)
    return torch.bernoulli(x_uint8.cpu().float() / 255, generator=g).to(x_uint8.device)


def uint8_to_signed(x_uint8):
    """{0..255} -> [-1, 1], the range DDPM, the GAN and the colour VAE work in."""
    return x_uint8.float() / 127.5 - 1


def signed_to_unit(x):
    """[-1, 1] -> [0, 1], the range of pictures and samples.pt."""
    return (x + 1) / 2


def save_grid(images, path, nrow=None, labels=None):
    """Save a batch of images in [0, 1] as one PNG grid: square by default; given the images' classes (of a
    --conditional model, more than one class), one row per class, as many columns as the rarest class has images."""
    import torchvision.utils as vutils
    if labels is not None and len(labels.unique()) > 1:
        labels = labels.cpu()
        classes = labels.unique()
        nrow = min(int((labels == c).sum()) for c in classes)
        images = torch.cat([images[labels == c][:nrow] for c in classes])
    nrow = nrow or max(1, int(math.sqrt(len(images))))
    vutils.save_image(images.float().clamp(0, 1).cpu(), str(path), nrow=nrow, padding=1, pad_value=1.0)


def save_samples(cfg, x):
    """The files of --sample in --out (rank 0 writes them): samples.pt, N x C x H x W in [0, 1]; samples.png, the first
    256 (one row per class for a --conditional model); and for a conditional model labels.pt, each image's class."""
    if not is_main():
        return
    labels = class_labels(cfg, len(x), "cpu")  # the order every sampler draws the classes in
    save_grid(x[:256], Path(cfg.out) / "samples.png", labels=None if labels is None else labels[:256])
    torch.save(x, Path(cfg.out) / "samples.pt")
    if labels is not None:
        torch.save(labels, Path(cfg.out) / "labels.pt")


def nats_to_bits_per_dim(nats_per_image, dims):
    return nats_per_image / (dims * math.log(2))


# ----------------------------------------------------------------------------- runs and checkpoints

def start_run(cfg):
    """Make --out for a new run (called after the data and the model were built, so bad input writes nothing)."""
    out = Path(cfg.out)
    if not cfg.resume and is_main():
        if cfg.recipe:
            print(cfg.recipe)
        out.mkdir(parents=True, exist_ok=True)
        config = dict(model=dataclasses.asdict(cfg.model), run=dataclasses.asdict(cfg) | dict(model=None))
        atomic_write_text(out / "config.json", json.dumps(config, indent=2))
    return out


def atomic_write_text(path, text):
    tmp = Path(str(path) + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def rng_state(generator):
    """The random state a step starts from: the data generator's, the CPU's and CUDA's."""
    return dict(rng_data=generator.get_state(), rng_cpu=torch.get_rng_state(),
                rng_cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [])


def save_checkpoint(path, script, cfg, step, rng, **modules):
    """Write the state dicts of `modules` (models, optimizers), the step, both configs and the RNG state the next
    step starts from; temp file then rename, so a crash mid-write never leaves a broken checkpoint in place of a
    good one. Non-finite weights are never written."""
    state = {k: v.state_dict() for k, v in modules.items()}
    for k, m in modules.items():
        if isinstance(m, torch.nn.Module) and not all(torch.isfinite(p).all() for p in m.parameters()):
            raise UsageError(f"{k} has non-finite weights at step {step}; not saved, the last checkpoint was kept: lower --lr")
    rngs = [rng]
    if distributed():  # every rank's random state, so that --resume restores each rank's own
        rngs = [None] * world()
        dist.all_gather_object(rngs, rng)
    if not is_main():
        return
    ckpt = dict(script=script, format=CHECKPOINT_FORMAT, step=step, model_config=dataclasses.asdict(cfg.model),
                run_config=dataclasses.asdict(cfg) | dict(model=None), rng=rngs, **state)
    tmp = Path(str(path) + ".tmp")
    torch.save(ckpt, tmp)
    os.replace(tmp, path)


def read_checkpoint(path, script):
    """The checkpoint as a dict, refused with one line if it is missing, unreadable, or not a `script` checkpoint
    of this format."""
    if not path.exists():
        raise UsageError(f"no checkpoint at {path}; train first (or point --out at the run)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UsageError(f"{path} is not a readable checkpoint ({type(e).__name__}); delete it or pick another --out") from None
    if not isinstance(ckpt, dict) or "script" not in ckpt:
        raise UsageError(f"{path} is not a checkpoint of this project; pick another --out")
    if ckpt["script"] != script:
        raise UsageError(f"{path} was written by {ckpt['script']}.py, not {script}.py; point --out at a {script} run")
    if ckpt.get("format") != CHECKPOINT_FORMAT:
        raise UsageError(f"{path} was written by an older {script}.py (checkpoint format {ckpt.get('format', 1)}, now "
                         f"{CHECKPOINT_FORMAT}); train again, or use the version of {script}.py that wrote it")
    return ckpt


def load_checkpoint(path, script, generator=None, **modules):
    """Load a checkpoint into `modules` (models, optimizers) and, for --resume, restore the RNGs the next step
    starts from into `generator` and torch's own; return its step."""
    ckpt = read_checkpoint(Path(path), script)
    for k, m in modules.items():
        m.load_state_dict(ckpt[k])
    if generator is not None:
        if len(ckpt["rng"]) != world():
            raise UsageError(f"{path} was trained by {len(ckpt['rng'])} process(es), this run has {world()}; resume with "
                             f"{len(ckpt['rng'])} (torchrun --nproc_per_node), so that it continues exactly")
        rng = ckpt["rng"][rank()]
        generator.set_state(rng["rng_data"])
        torch.set_rng_state(rng["rng_cpu"])
        if torch.cuda.is_available() and rng["rng_cuda"]:
            torch.cuda.set_rng_state_all(rng["rng_cuda"])
    return ckpt["step"]


def check_resume(cfg, step):
    if cfg.resume and step >= cfg.steps:
        raise UsageError(f"{cfg.out} is already at step {step}; pass --steps above {step} to train on")


def check_finite(step, **figures):
    """Stop before a step with a non-finite loss or gradient is applied, so no checkpoint ever holds its weights."""
    for name, v in figures.items():
        v = float(v.detach()) if isinstance(v, torch.Tensor) else float(v)
        if not math.isfinite(v):
            raise UsageError(f"the {name} became {v} at step {step + 1}; the checkpoint holds the last finite "
                             f"weights: lower --lr and --resume")


class CtrlC:
    """Ctrl-C while training: the step under way is finished (a half-applied update would be neither the old weights
    nor the new), then the loop ends, the caller saves a checkpoint, and exit_if_requested exits 130. A second Ctrl-C
    stops at once, keeping the last checkpoint."""

    def __init__(self):
        self.requested = False

    def __enter__(self):
        self.previous = signal.signal(signal.SIGINT, self.handle)
        return self

    def handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\nCtrl-C: finishing this step, then saving a checkpoint (Ctrl-C again to quit without saving)", flush=True)

    def __exit__(self, *exc):
        signal.signal(signal.SIGINT, self.previous)

    def stopping(self):
        """True once Ctrl-C came to this process or, under torchrun, to any: every rank ends at the same step."""
        self.requested = bool(max_over_ranks(self.requested))
        return self.requested

    def exit_if_requested(self, step):
        """After the checkpoint of `step` was saved: exit 130 if Ctrl-C ended the loop."""
        if self.requested:
            say(f"interrupted: checkpoint saved at step {step}; --resume continues from there")
            raise SystemExit(130)


class Logger:
    """Appends one JSON line per log to log.jsonl and prints a progress line with img/s and ETA. Each line has
    wall_s, the seconds the run has taken so far (sample grids included, summed over resumes). On --resume it
    first drops the lines past the checkpoint's step (logged before a crash), so log.jsonl has one line per step.
    max_seconds: a wall-clock budget of this process (pixelrnn's --max-minutes) that ends the run before
    total_steps; the ETA is then the sooner of the two ends."""

    def __init__(self, out, total_steps, start_step=0, max_seconds=0.0):
        self.path, self.total, self.max_seconds = Path(out) / "log.jsonl", total_steps, max_seconds
        self.last_step, self.last_time, self.images = start_step, time.time(), 0
        self.wall_before = 0.0  # seconds spent by earlier processes of this run (--resume)
        if self.path.exists() and is_main():
            records = [r for r in read_log(self.path) if r.get("step", 0) <= start_step]
            atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in records))
            self.wall_before = max([r.get("wall_s", 0.0) for r in records], default=0.0)
        self.start_time = self.last_time

    def count(self, n_images):
        self.images += n_images

    def log(self, step, **figures):
        if not is_main():
            return
        now = time.time()
        img_s = self.images / max(now - self.last_time, 1e-9)
        steps_s = (step - self.last_step) / max(now - self.last_time, 1e-9)
        eta = (self.total - step) / max(steps_s, 1e-9)
        if self.max_seconds:  # the budget ends the run first: the quick pixelrnn run stops at 11 min, not 100k steps
            eta = min(eta, max(self.max_seconds - (now - self.start_time), 0.0))
        figures = {k: float(v.detach()) if isinstance(v, torch.Tensor) else float(v) for k, v in figures.items()}
        with open(self.path, "a") as f:
            wall = round(self.wall_before + now - self.start_time, 1)
            f.write(json.dumps(dict(step=step, img_per_s=round(img_s, 1), wall_s=wall, **figures)) + "\n")
        figs = " | ".join(f"{k} {v:.4g}" for k, v in figures.items())
        print(f"step {step:>6}/{self.total} | {figs} | {img_s:,.0f} img/s | ETA {format_seconds(eta)}", flush=True)
        self.last_step, self.last_time, self.images = step, now, 0


def read_log(path):
    """The records of a log.jsonl; a line cut short by a crash mid-write is skipped."""
    records = []
    for line in Path(path).read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return records


def plot_curves(out):
    """curves.png in `out`: every figure of log.jsonl (the losses, the family's own measure) against the step, one
    panel each. Written with every sample grid of a run, and by --plot for any run."""
    path = Path(out) / "log.jsonl"
    if not is_main():
        return None
    if not path.exists():
        raise UsageError(f"no log.jsonl in {out}; point --out at a run folder, or train one there first")
    records = read_log(path)
    names = [k for k in dict.fromkeys(k for r in records for k in r) if k not in ("step", "img_per_s", "wall_s")]
    if not names:
        raise UsageError(f"{path} holds no logged figures yet; train for at least --log-every steps")
    import matplotlib
    matplotlib.use("Agg")  # no display needed: the picture goes to a file
    import matplotlib.pyplot as plt
    cols = min(3, len(names))
    fig, axes = plt.subplots(math.ceil(len(names) / cols), cols, figsize=(4.2 * cols, 2.8 * math.ceil(len(names) / cols)),
                             squeeze=False)
    for ax, name in zip(axes.flat, names):
        points = [(r["step"], r[name]) for r in records if isinstance(r.get(name), (int, float)) and math.isfinite(r[name])]
        if points:
            ax.plot(*zip(*points), marker="." if len(points) < 30 else None, linewidth=1)
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    for ax in axes.flat[len(names):]:
        ax.axis("off")
    fig.tight_layout()
    tmp = Path(out) / "curves.tmp.png"
    fig.savefig(tmp, dpi=80)
    plt.close(fig)
    os.replace(tmp, Path(out) / "curves.png")
    return Path(out) / "curves.png"


def format_seconds(s):
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def report(out, title, rows, **extra):
    """--eval's result: a two-column table on screen, and eval.json in the run folder (rows and `extra`)."""
    result = dict(extra, **rows)
    if not is_main():
        return result
    print(title)
    width = max(map(len, rows))
    for name, value in rows.items():
        print(f"  {name:{width}s} {value:10.4f}")
    atomic_write_text(Path(out) / "eval.json", json.dumps(result, indent=2))
    return result


def run_safely(what, fn):
    """Pictures and evaluations during training: a failure there is reported in one line and the run goes on,
    so it never costs the trained steps."""
    try:
        return fn()
    except (RuntimeError, ValueError, OSError, UsageError) as e:
        print(f"warning: {what} failed ({type(e).__name__}: {str(e).splitlines()[0][:200]}); training goes on")


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
    torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1 - d)
    for b_ema, b in zip(ema.buffers(), model.buffers()):
        b_ema.copy_(b)  # buffers (BatchNorm statistics, masks) are copied, not averaged
