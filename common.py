"""Infrastructure shared by the five model scripts: the CLI, the device and torchrun, data, pictures, checkpoints, and
class Run, the machinery of a training run that lets each train() read as its loop. No model layer and no loss lives
here: those are in the script that teaches them. Read a model script first, and come here when it calls something."""
import argparse
import contextlib
import copy
import dataclasses
import difflib
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
NUM_CLASSES = 10  # mnist, fashion-mnist and cifar10 all have ten classes


# ----------------------------------------------------------------------------- errors and the CLI

class UsageError(Exception):
    """Bad input from the user: printed as one line, exit code 2, nothing written."""


def entry(main):
    """Decorate a script's main(argv): bad input, the file system's refusal (a full disk, a folder that cannot be
    made) and a step too big for memory each become one line on stderr and exit code 2. Any other error is a bug."""
    @functools.wraps(main)
    def wrapped(argv=None):
        try:
            result = main(argv)
        except (UsageError, OSError, RuntimeError) as e:
            line = str(e)
            if isinstance(e, RuntimeError) and not ("out of memory" in line or "can't allocate memory" in line):
                raise  # a bug: its traceback
            if isinstance(e, OSError):  # the file system's refusal: a full disk, a folder that cannot be made
                line = f"{e.strerror or e}: {e.filename or '?'}; free space on its disk, or pick another --out"
            elif isinstance(e, RuntimeError):  # out of memory: CUDA's, MPS's or the CPU allocator's message
                line = f"out of memory ({line.splitlines()[0][:150]}); lower --batch-size or the model's size"
            sys.stderr.write(f"error{f' (rank {rank()} of {world()})' if world() > 1 else ''}: {line}\n")  # 1 write
            raise SystemExit(2)  # torchrun then stops the other ranks (they share stderr: print's 2 writes interleave)
        if distributed():  # under torchrun: every rank is done before the process group is taken down
            dist.barrier()
            dist.destroy_process_group()
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(0)  # at once: gloo's threads, torn down at interpreter exit, can abort the process (seen 1 in 14)
        return result
    return wrapped


def opt(default, help, valid=None, choices=None, mode=None):
    """A Config field and its --help: `valid`, a number's range ("[1, inf)", "(0, 1]"); `mode`, a switch that does
    something else than train: "checkpoint" (reads the run in --out), "folder" (its files), "alone" (neither)."""
    return dataclasses.field(default=default, metadata=dict(help=help, valid=valid, choices=choices, mode=mode))


@dataclasses.dataclass
class ModelConfig:
    """What defines a model. Stored in its checkpoint, so that --sample, --eval and --resume need none of it."""
    dataset: str = opt("mnist", "mnist | fashion-mnist | cifar10 | a folder of images")
    conditional: bool = opt(False, "learn p(x | class) from the labels (mnist, fashion-mnist, cifar10): see --label")


@dataclasses.dataclass
class RunConfig:
    """What one run may change: each script subclasses it and may redeclare a field for its own default."""
    data_dir: str = opt("./data", "where the datasets live (MNIST in <data-dir>/MNIST/raw/)")
    out: str = opt("", "output folder (default runs/<script>-<dataset>)")
    device: str = opt("auto", "auto | cuda | mps | cpu", choices=["auto", "cuda", "mps", "cpu"])
    precision: str = opt("auto", "auto: bf16 autocast on CUDA and on a CPU with bf16 units (Intel AMX, AVX512-BF16), "
                         "else fp32; bf16; fp32", choices=["auto", "bf16", "fp32"])
    compile: bool = opt(False, "torch.compile the model (CUDA)")
    seed: int = opt(0, "random seed", "[0, inf)")
    batch_size: int = opt(128, "images per training step", "[1, inf)")
    lr: float = opt(2e-4, "learning rate", "(0, inf)")
    steps: int = opt(10000, "training steps", "[1, inf)")
    max_minutes: float = opt(0.0, "end training after these minutes (over resumes), as if --steps were met there; "
                             "the schedules and grids follow the clock (0: no limit)", "[0, inf)")
    log_every: int = opt(100, "steps between progress lines", "[1, inf)")
    sample_every: int = opt(2000, "steps between sample grids", "[1, inf)")
    ckpt_every: int = opt(2000, "steps between checkpoints", "[1, inf)")
    num_samples: int = opt(64, "images to draw with --sample (and in the grids of a run)", "[1, inf)")
    label: int = opt(-1, "the class a --conditional model draws (--sample, grids); -1: a row per class", "[-1, 9]")
    resume: bool = opt(False, "continue the run in --out from its checkpoint", mode="checkpoint")
    sample: bool = opt(False, "only sample from the checkpoint in --out", mode="checkpoint")
    eval: bool = opt(False, "only evaluate the checkpoint in --out on the test set", mode="checkpoint")
    preset: str = opt("auto", "a new run's recipe: full (sized for one GPU), quick (minutes on a CPU), auto (full on "
                      "a CUDA GPU, quick elsewhere); a flag you give overrides it", choices=["auto", "full", "quick"])
    plot: bool = opt(False, "only redraw curves.png from log.jsonl in --out", mode="folder")
    recipe: str = dataclasses.field(default="", metadata=dict(cli=False))  # the line saying which preset, and why
    model: ModelConfig = dataclasses.field(default=None, metadata=dict(cli=False))  # filled in by parse_args


class Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse's own errors (an unknown flag, "abc" for a number): one line, exit 2
        typo = message.split("arguments: ")[-1].split("=")[0].split()[0] if "unrecognized" in message else ""
        near = [o for o in self._option_string_actions if o.startswith(typo)] or difflib.get_close_matches(
            typo, self._option_string_actions, n=1) if typo.startswith("--") else []  # name the nearest flags
        raise UsageError(message + (f" (did you mean {' or '.join(sorted(near)[:3])}?)" if near else ""))


def flag(name):
    return "--" + name.replace("_", "-")


def parse_flags(model_cls, run_cls, argv=None):
    """The command line's (run, model) flags as dicts; a flag is never guessed from its first letters."""
    parser = Parser(description=sys.modules[run_cls.__module__].__doc__, allow_abbrev=False,
                    formatter_class=argparse.RawDescriptionHelpFormatter, argument_default=argparse.SUPPRESS)
    for cls, title in [(model_cls, "model options (stored in the checkpoint)"), (run_cls, "run options")]:
        group = parser.add_argument_group(title)
        for f in [f for f in dataclasses.fields(cls) if f.metadata.get("cli", True)]:
            meta = f.metadata
            help = f"{meta['help']} (default: {f.default}" + (f"; in {meta['valid']})" if meta["valid"] else ")")
            kind = dict(type={"int": int, "float": float, "str": str}.get(f.type, f.type), choices=meta["choices"])
            boolean = dict(action=argparse.BooleanOptionalAction)  # --compile / --no-compile
            group.add_argument(flag(f.name), help=help, **(boolean if f.type in (bool, "bool") else kind))
    given, names = vars(parser.parse_args(argv)), {f.name for f in dataclasses.fields(model_cls)}
    return {k: v for k, v in given.items() if k not in names}, {k: v for k, v in given.items() if k in names}


def check_ranges(*configs):
    """Refuse a number outside its interval, e.g. "[0, 1)" for 0 <= value < 1 (a flag, a recipe or a checkpoint's)."""
    for cfg in configs:
        for f in [f for f in dataclasses.fields(cfg) if f.metadata.get("valid")]:
            valid, value = f.metadata["valid"], getattr(cfg, f.name)
            lo, hi = (float(s) for s in valid[1:-1].split(","))
            ok = math.isfinite(value) and (value >= lo if valid[0] == "[" else value > lo)
            if not (ok and (value <= hi if valid[-1] == "]" else value < hi)):
                raise UsageError(f"{flag(f.name)} {value}: must be in {valid}")


def parse_args(model_cls, run_cls, script, argv=None, presets=None):
    """The run config (with .model) of this command, from three layers, each overriding the one before: the defaults;
    a new run's recipe from `presets` (--preset), or the options of the run in --out (--resume, --sample...); flags."""
    run_flags, model_flags = parse_flags(model_cls, run_cls, argv)
    cfg = run_cls(**run_flags)
    modes = {f.name: f.metadata.get("mode") for f in dataclasses.fields(cfg) if f.metadata.get("mode")
             and getattr(cfg, f.name)}
    if len(modes) > 1:
        raise UsageError(f"{' and '.join(map(flag, modes))} cannot go together; pick one")
    mode, dataset = next(iter(modes.values()), None), model_flags.get("dataset", "mnist")
    device = get_device(cfg.device).type  # under torchrun, every rank joins its group here, whatever the mode
    out = run_flags.setdefault("out", cfg.out or f"runs/{script}-{Path(dataset).name or dataset}")
    model, run = model_flags, run_flags
    if mode == "checkpoint":  # --resume, --sample, --eval...: the options come from the run
        ckpt = read_checkpoint(Path(out) / "ckpt.pt", script)
        model = ckpt["model_config"]
        for k, v in model_flags.items():
            if model.get(k) != v:
                raise UsageError(f"{out} holds a model trained with {flag(k)} {model.get(k)} (now {v}); "
                                 f"drop {flag(k)}, or pick another --out")
        fresh = {"out", "device", "compile", "model"}  # run options a mode reading the run does not take from it
        keep = {f.name for f in dataclasses.fields(run_cls) if not f.metadata.get("mode")} - fresh
        run = {k: v for k, v in ckpt["run_config"].items() if k in keep} | run_flags
    elif mode != "folder":  # a new run (or a picture of untrained nets): the recipe of the device at hand
        name = cfg.preset if cfg.preset != "auto" else "full" if device == "cuda" else "quick"
        why = "a CUDA GPU is here" if device == "cuda" else f"no CUDA GPU here, device {device}"
        recipe = (presets or {}).get(name, dict(about="", options={}))
        line = (f"recipe {name} ({why if cfg.preset == 'auto' else f'--preset {name}'}): {recipe['about']}. --preset "
                f"{dict(full='quick', quick='full')[name]} picks the other; a flag you give overrides either")
        names = {f.name for f in dataclasses.fields(model_cls)}
        model = {k: v for k, v in recipe["options"].items() if k in names} | model_flags
        run = {k: v for k, v in recipe["options"].items() if k not in names} | run_flags | dict(preset=name,
                                                                                                  recipe=line)
    cfg = run_cls(**run)
    cfg.model = model_cls(**model)
    check_ranges(cfg, cfg.model)  # a recipe's values and a checkpoint's are held to the same ranges as flags
    if cfg.label >= 0 and not cfg.model.conditional:  # in every mode, --eval's included
        raise UsageError(f"--label {cfg.label} needs a model trained with --conditional; {out} is not: drop --label")
    return cfg


# ----------------------------------------------------------------------------- device, precision, torchrun
# Started with plain `python`, a script is one process and the torchrun helpers do nothing. Started by torchrun (which
# sets RANK, WORLD_SIZE, LOCAL_RANK), it joins the process group and DDP averages each step's gradients over the ranks.

def get_device(name="auto"):
    """The torch.device of --device (joining torchrun's process group, if started by torchrun)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available() or name == "mps" and not torch.backends.mps.is_available():
        gpu = dict(cuda="no CUDA GPU is visible", mps="this machine has no Apple GPU")[name]
        raise UsageError(f"--device {name} was asked for but {gpu}; use --device cpu")
    device, torchrun = torch.device(name), int(os.environ.get("WORLD_SIZE", "1")) > 1
    if name == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed input shapes, so let cuDNN pick the fastest kernels
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False  # fp32, unless Run trains
        if torchrun:  # one GPU per process
            device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
            torch.cuda.set_device(device)
    if torchrun and not distributed():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")  # NCCL between GPUs, gloo on CPUs
    return device


def autocast(device, precision):
    """bf16 autocast (fp32's exponent range: no loss scaling), by default where it pays: CUDA, a CPU with bf16 units."""
    units = device.type == "cuda" or device.type == "cpu" and any(getattr(torch.cpu, f"_is_{k}_supported", bool)()
                                                                  for k in ("amx_tile", "avx512_bf16"))  # or False
    if precision == "bf16" and device.type in ("cuda", "cpu") or precision == "auto" and units:
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def distributed():
    return dist.is_available() and dist.is_initialized()


def rank():  # torchrun's RANK and WORLD_SIZE, also before the process group is joined (a flag's error line)
    return dist.get_rank() if distributed() else int(os.environ.get("RANK", "0"))


def world():
    return dist.get_world_size() if distributed() else int(os.environ.get("WORLD_SIZE", "1"))


def is_main():
    """Rank 0 writes the logs, pictures, checkpoints and eval.json; the other ranks only compute."""
    return rank() == 0


def say(*args):
    """print on rank 0 only: under torchrun every rank runs the same lines."""
    if is_main():
        print(*args, flush=True)


def rank_seed(seed):
    """This process's seed: rank r of a torchrun job draws its own numbers, from seed + 7919 r (rank 0 from seed)."""
    return seed + 7919 * rank()


def reduce_over_ranks(value, op="sum"):
    """A float or tensor summed (or its "max") over the ranks: a total of shards, or a decision taken together."""
    if not distributed():
        return value
    nccl = dist.get_backend() == "nccl"  # NCCL reduces GPU tensors only, gloo CPU tensors
    t = torch.as_tensor(value, dtype=torch.float64).to(f"cuda:{torch.cuda.current_device()}" if nccl else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    return t.item() if t.dim() == 0 else t.cpu()


def shard(n):
    """This rank's contiguous share of range(n): an evaluation or a sampler split over the ranks."""
    per = math.ceil(n / world())
    return range(min(n, rank() * per), min(n, (rank() + 1) * per))


def gather_cat(x):
    """Every rank's CPU tensor, concatenated in rank order, on every rank (the shards of a sampler)."""
    if not distributed():
        return x
    parts = [None] * world()
    dist.all_gather_object(parts, x.cpu())
    return torch.cat(parts)


# ----------------------------------------------------------------------------- data

def load_dataset(dataset, data_dir, split="train", device="cpu"):
    """(x uint8 N x C x H x W, y int64 labels or None) on `device`, whole: batches are drawn by indexing, no loader."""
    if dataset in ("mnist", "fashion-mnist"):
        import torchvision  # imported here: only the data loaders need it
        cls = torchvision.datasets.MNIST if dataset == "mnist" else torchvision.datasets.FashionMNIST
        raw = Path(data_dir) / cls.__name__ / "raw"
        ds = download(cls, data_dir, f"{dataset} is not in {raw}/", f"put the four raw IDX files "
                      f"(train-images-idx3-ubyte ...) in {raw}/", train=(split == "train"))
        x, y = ds.data.unsqueeze(1).contiguous(), ds.targets.long()
    elif dataset == "cifar10":  # the python-pickle batches, read here (torchvision only downloads them)
        root = Path(data_dir) / "cifar-10-batches-py"
        if not root.is_dir():
            import torchvision
            download(torchvision.datasets.CIFAR10, data_dir, f"cifar10 is not in {root}/",
                     f"unpack cifar-10-python.tar.gz into {data_dir}/")
        batches = []
        for name in [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]:
            with open(root / name, "rb") as f:
                batches.append(pickle.load(f, encoding="latin1"))
        x = torch.from_numpy(np.concatenate([np.asarray(b["data"], np.uint8) for b in batches])).view(-1, 3, 32, 32)
        y = torch.from_numpy(np.concatenate([np.asarray(b["labels"], dtype=np.int64) for b in batches]))
    elif Path(dataset).is_dir():
        x, y = load_folder(Path(dataset), split), None
    else:
        raise UsageError(f"unknown --dataset {dataset!r}: use mnist, fashion-mnist, cifar10 or a folder of images")
    return x.to(device), (y.to(device) if y is not None else None)


def download(dataset_class, data_dir, missing, fix, **kwargs):
    """torchvision's dataset, downloaded if missing; offline, what the attempt made goes and one line says why."""
    root = Path(data_dir)
    before = {root, *root.rglob("*")} if root.exists() else set()
    try:
        return dataset_class(str(root), download=True, **kwargs)
    except Exception as e:
        for p in sorted({root, *root.rglob("*")} - before if root.exists() else (), key=lambda p: -len(p.parts)):
            p.rmdir() if p.is_dir() else p.unlink()  # deepest first, so each folder is empty when it goes
        raise UsageError(f"{missing} and could not be downloaded ({type(e).__name__}); {fix}") from None


def load_folder(folder, split):
    """Every image file in a folder, all of one size, as uint8 N x C x H x W; every 10th (by name) is the test split."""
    from PIL import Image, UnidentifiedImageError
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".bmp", ".webp"))
    if len(files) < 10:
        raise UsageError(f"--dataset {folder} holds {len(files)} images (png, jpg, bmp, webp); it needs at least 10 "
                         f"(every 10th is the test split): add images or pick another --dataset")
    images = []
    for f in [f for i, f in enumerate(files) if (i % 10 == 9) == (split == "test")]:
        try:
            images.append(Image.open(f))
        except (UnidentifiedImageError, OSError):
            raise UsageError(f"{f} is not an image that PIL can read; remove it from --dataset {folder}") from None
    if len(sizes := {im.size for im in images}) > 1:
        raise UsageError(f"images in {folder} have {len(sizes)} sizes {sorted(sizes)[:3]}; resize them to one first")
    mode = "L" if all(im.mode in ("L", "1") for im in images) else "RGB"
    x = np.stack([np.asarray(im.convert(mode)) for im in images])
    return torch.from_numpy(np.ascontiguousarray(x[:, None] if mode == "L" else x.transpose(0, 3, 1, 2)))


def load_split(cfg, split, device):
    """(x uint8, y or None) of --dataset: the labels only for a --conditional model, which cannot do without them."""
    x, y = load_dataset(cfg.model.dataset, cfg.data_dir, split, device)
    if cfg.model.conditional and y is None:
        raise UsageError(f"--conditional needs class labels, and the folder {cfg.model.dataset} has none: drop it")
    return x, (y if cfg.model.conditional else None)


def class_labels(cfg, n, device, start=0):
    """The classes of images start..start+n-1: None (unconditional), all --label, or image i of class i mod 10."""
    if not cfg.model.conditional:
        return None
    labels = torch.arange(start, start + n, device=device) % NUM_CLASSES  # image i: class i mod 10 (any share is even)
    return labels.fill_(cfg.label) if cfg.label >= 0 else labels


def binarize(x_uint8, rng=None):
    """Grey images as binary ones, pixel ~ Bernoulli(intensity / 255): afresh for each training batch, drawn by the
    run's generator rng ("dynamic" binarization, as in Burda et al. 2016), and for a test set (rng None) once, from a
    generator seeded 0 on the CPU, the same in every run on any device. The PixelRNN/PixelCNN papers report on one
    fixed binarized MNIST, which torchvision does not offer: their figures are on other binary images than ours."""
    rng = torch.Generator().manual_seed(0) if rng is None else rng
    return torch.bernoulli(x_uint8.to(rng.device).float() / 255, generator=rng).to(x_uint8.device)


def uint8_to_signed(x_uint8):
    """{0..255} -> [-1, 1], the range DDPM, the GAN and the colour VAE work in."""
    return x_uint8.float() / 127.5 - 1


# ----------------------------------------------------------------------------- pictures, samples, results

def signed_to_unit(x):
    """[-1, 1] -> [0, 1], the range of pictures and samples.pt."""
    return (x + 1) / 2


def save_grid(images, path, nrow=None, labels=None):
    """Images in [0, 1] as one PNG grid: square, or given several classes a row per class (as long as the rarest)."""
    import torchvision.utils as vutils
    if labels is not None and len(labels.unique()) > 1:
        labels = labels.cpu()
        nrow = min(int((labels == c).sum()) for c in labels.unique())
        images = torch.cat([images[labels == c][:nrow] for c in labels.unique()])
    nrow = nrow or max(1, int(math.sqrt(len(images))))
    vutils.save_image(images.float().clamp(0, 1).cpu(), str(path), nrow=nrow, padding=1, pad_value=1.0)


def save_samples(cfg, x):
    """--sample's files (rank 0): samples.pt (N x C x H x W in [0, 1]), samples.png (256), labels.pt (conditional)."""
    labels = class_labels(cfg, len(x), "cpu")  # the order every sampler draws the classes in
    if is_main():
        save_grid(x[:256], Path(cfg.out) / "samples.png", labels=None if labels is None else labels[:256])
        torch.save(x, Path(cfg.out) / "samples.pt")
    if is_main() and labels is not None:
        torch.save(labels, Path(cfg.out) / "labels.pt")


def report(out, title, rows, **extra):
    """An evaluation's result: a two-column table on screen, and eval.json in the run folder (rows and `extra`)."""
    result = dict(extra, **rows)
    if is_main():
        print(title + "".join(f"\n  {name:{max(map(len, rows))}s} {value:10.4f}" for name, value in rows.items()))
        atomic_write(Path(out) / "eval.json", json.dumps(result, indent=2))
    return result


# ----------------------------------------------------------------------------- checkpoints

def atomic_write(path, data):
    """Text or a checkpoint to a temporary file, then renamed: a crash mid-write never leaves a broken file."""
    tmp = Path(f"{path}.tmp")
    try:
        tmp.write_text(data) if isinstance(data, str) else torch.save(data, tmp)
    except (OSError, RuntimeError) as e:  # a full disk (torch.save says RuntimeError): no partial file stays behind
        tmp.unlink(missing_ok=True)
        free = shutil.disk_usage(tmp.parent).free / 2**20
        need = f", about {Path(path).stat().st_size / 2**20:.2f} MiB needed" if Path(path).exists() else ""  # its size
        raise UsageError(f"could not write {path} ({type(e).__name__}; {free:,.2f} MiB free on its disk{need}): make "
                         f"room or pick another --out; the {Path(path).name} there before, if any, was kept") from None
    os.replace(tmp, path)


def lock_folder(out, resume):
    """--out made and locked by this process, so that a second run into it is refused; the OS frees the lock when the
    process ends, even by kill -9. Returns the lock's open file (POSIX: on Windows a folder goes unlocked)."""
    out.mkdir(parents=True, exist_ok=True)  # an OSError (a file in the way, no permission) is one line, by entry()
    lock = open(out / "run.lock", "a+")
    with contextlib.suppress(ImportError):
        import fcntl
        try:
            fcntl.lockf(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise UsageError(f"{out} is in use by the run of process {(out / 'run.lock').read_text().strip()}; wait "
                             f"for it to end or pick another --out") from None
    lock.truncate(0), lock.write(f"{os.getpid()}\n"), lock.flush()  # the holder, named to a second run
    if not resume and (out / "ckpt.pt").exists():  # looked for again under the lock: two starts at once
        raise UsageError(f"{out} already holds a run; pass --resume to continue it, or --out to start a new one")
    return lock


def rng_state(generator):
    """The random state a step starts from: the data generator's, the CPU's and CUDA's."""
    return dict(rng_data=generator.get_state(), rng_cpu=torch.get_rng_state(),
                rng_cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [])


def save_checkpoint(path, script, cfg, step, rng, **modules):
    """The modules' state dicts, the step, both configs, every rank's random state `rng`; never non-finite weights."""
    for k, m in modules.items():
        if isinstance(m, torch.nn.Module) and not all(torch.isfinite(p).all() for p in m.parameters()):
            raise UsageError(f"{k} has non-finite weights at step {step}; not saved, the last checkpoint was kept: "
                             f"lower --lr")
    rngs = [None] * world() if distributed() else [rng]
    if distributed():  # every rank's random state, so that --resume restores each rank's own
        dist.all_gather_object(rngs, rng)
    configs = dict(model_config=dataclasses.asdict(cfg.model), run_config=dataclasses.asdict(cfg) | dict(model=None))
    if is_main():
        atomic_write(path, dict(script=script, format=CHECKPOINT_FORMAT, step=step, rng=rngs, **configs,
                                **{k: v.state_dict() for k, v in modules.items()}))


def read_checkpoint(path, script):
    """The checkpoint as a dict, or one line why not; weights_only=True: tensors and plain values, never code."""
    if not path.exists():
        raise UsageError(f"no checkpoint at {path}; train first (or point --out at the run)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UsageError(f"{path} is not a readable checkpoint ({type(e).__name__}); delete it or pick another "
                         f"--out") from None
    if not isinstance(ckpt, dict) or "script" not in ckpt:
        raise UsageError(f"{path} is not a checkpoint of this project; pick another --out")
    if ckpt["script"] != script:
        raise UsageError(f"{path} was written by {ckpt['script']}.py, not {script}.py; point --out at a {script} run")
    if ckpt.get("format") != CHECKPOINT_FORMAT:
        raise UsageError(f"{path} was written by an older {script}.py (checkpoint format {ckpt.get('format', 1)}, "
                         f"now {CHECKPOINT_FORMAT}); train again, or use the version of {script}.py that wrote it")
    return ckpt


def load_checkpoint(path, script, generator=None, **modules):
    """Load a checkpoint into `modules` and, for --resume, its random state into `generator` and torch's; its step."""
    ckpt = read_checkpoint(Path(path), script)
    for k, m in modules.items():
        m.load_state_dict(ckpt[k])
    if generator is not None:
        if len(ckpt["rng"]) != world():
            raise UsageError(f"{path} was trained by {len(ckpt['rng'])} process(es), this run has {world()}; resume "
                             f"with {len(ckpt['rng'])} (torchrun --nproc_per_node), so that it continues exactly")
        rng = ckpt["rng"][rank()]
        generator.set_state(rng["rng_data"])
        torch.set_rng_state(rng["rng_cpu"])
        if torch.cuda.is_available() and rng["rng_cuda"]:
            torch.cuda.set_rng_state_all(rng["rng_cuda"])
    return ckpt["step"]


# ----------------------------------------------------------------------------- the training run

class Run:
    """The machinery of a training run, once for the five scripts, so that train() reads as its loop: Run(cfg, script),
    the data and model on run.device, run.start(state), `for step in run:` a batch, the loss, backward, run.check(...),
    the update, run.log(figures); run.finish(). Its promises (tests/test_harness.py): a checkpoint holds finite weights
    and the random state its next step starts from, so --resume goes on bit for bit; Ctrl-C saves and exits 130; one
    run at a time in a folder; under torchrun each rank draws its own share, all stop together, rank 0 alone writes."""

    def __init__(self, cfg, script):
        self.cfg, self.script, self.out = cfg, script, Path(cfg.out)
        self.device = get_device(cfg.device)
        torch.manual_seed(rank_seed(cfg.seed))  # the CPU's and every GPU's generator: the weights' initialization
        self.rng = torch.Generator(self.device).manual_seed(rank_seed(cfg.seed))  # the batches (and binarizations)
        if cfg.batch_size % world():  # --batch-size is the step's, so that --lr means the same on any number of ranks
            raise UsageError(f"--batch-size {cfg.batch_size} does not split over {world()} processes; use a multiple")
        self.batch_size = cfg.batch_size // world()
        self.budget, self.total = 60 * cfg.max_minutes, cfg.steps  # seconds (0: no time budget); --steps as given
        self.progress = 0.0  # the share of the run done, by steps or by --max-minutes' clock: what a schedule reads
        self.autocast = functools.partial(autocast, self.device, cfg.precision)  # `with run.autocast():` the forward
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True  # training on a GPU: TF32

    def start(self, state, sample_grid=None):
        """A new run makes --out and config.json; --resume loads the checkpoint into `state` (models, optimizers, EMA)
        and the generators. sample_grid(step) draws a grid step's pictures, maybe returning figures for its line."""
        cfg, self.state, self.sample_grid = self.cfg, state, sample_grid
        self.lock = lock_folder(self.out, cfg.resume) if is_main() else None  # held open (locked) while the run lives
        self.step = load_checkpoint(self.out / "ckpt.pt", self.script, self.rng, **state) if cfg.resume else 0
        if self.step >= cfg.steps:
            raise UsageError(f"{cfg.out} is already at step {self.step}; pass --steps above {self.step} to train on")
        if is_main() and not cfg.resume:
            print(cfg.recipe or f"{self.script}: a new run in {cfg.out}")
            config = dict(model=dataclasses.asdict(cfg.model), run=dataclasses.asdict(cfg) | dict(model=None))
            atomic_write(self.out / "config.json", json.dumps(config, indent=2))
        self.first, self.saved = self.step, self.step if cfg.resume else None  # the step of the last checkpoint
        self.wall_before, self.log_path = 0.0, self.out / "log.jsonl"  # wall_before: earlier processes' seconds
        if is_main() and self.log_path.exists():  # the lines past the checkpoint (logged before a crash) go
            kept = [r for r in read_log(self.log_path) if r.get("step", 0) <= self.step]
            atomic_write(self.log_path, "".join(json.dumps(r) + "\n" for r in kept))
            self.wall_before = max([r.get("wall_s", 0.0) for r in kept], default=0.0)
        self.started, self.last_time, self.last_step, self.images = time.time(), time.time(), self.step, 0
        say(f"{self.script}: " + ", ".join(f"{k} {sum(p.numel() for p in m.parameters()):,}" for k, m in state.items()
            if k != "ema" and hasattr(m, "parameters")) + f" parameters; {self.device}; from step {self.step}")

    def wrap(self, model):
        """The model as a step calls it: in DDP under torchrun (gradients averaged), then compiled with --compile."""
        model = torch.nn.parallel.DistributedDataParallel(model) if distributed() else model
        return torch.compile(model) if self.cfg.compile else model

    def __iter__(self):
        """Yield the step under way (the updates done so far) until --steps, Ctrl-C, or the time budget (log() ends the
        run there, as if --steps were reached), noting first the random state that step starts from."""
        self.interrupted, self.progress = False, self.share()
        previous = signal.signal(signal.SIGINT, self.ctrl_c)
        try:
            while self.step < self.cfg.steps and not reduce_over_ranks(self.interrupted, "max"):  # Ctrl-C on any rank
                self.rng_at_start = rng_state(self.rng)
                yield self.step
            self.interrupted = self.step < self.cfg.steps
        finally:
            signal.signal(signal.SIGINT, previous)

    def share(self):
        """The share of the run done: step / --steps, or with --max-minutes the share of its minutes spent (over
        resumes) if that is more. A learning-rate schedule and the grids read it: on a slower CPU they follow the
        clock, and a run of fewer steps still cools down and draws its grids."""
        if not self.budget:
            return self.step / self.total
        spent = reduce_over_ranks(self.wall_before + time.time() - self.started, "max")  # one clock for all ranks
        return min(1.0, max(self.step / self.total, spent / self.budget))

    def ctrl_c(self, signum, frame):
        """Ctrl-C lets the step under way finish (half an update is no weights at all), finish() saves; twice: quit."""
        if self.interrupted:
            raise KeyboardInterrupt
        self.interrupted = True
        print("\nCtrl-C: finishing this step, then saving (Ctrl-C again: quit without saving)", flush=True)

    def batch(self, x, y=None):
        """This process's share of the step's images (and labels, or None), drawn i.i.d. by run.rng (checkpointed)."""
        idx = torch.randint(len(x), (self.batch_size,), device=x.device, generator=self.rng)
        return x[idx], None if y is None else y[idx]

    def check(self, **figures):
        """Before an update: stop if a figure (the loss, the gradient's norm) is not finite, so no checkpoint holds what
        the update would give; then on the --ckpt-every cadence (once a step) save the weights that gave them. With
        no figures, the checkpoint alone (gan.py: before a forward pass moves BatchNorm's running statistics)."""
        for name, v in figures.items():
            if not math.isfinite(v := float(v.detach() if torch.is_tensor(v) else v)):
                kept = (f"the checkpoint holds step {self.saved}: lower --lr and --resume" if self.saved is not None
                        else "no checkpoint was saved yet: lower --lr and start again")
                raise UsageError(f"the {name} became {v} at step {self.step + 1}, before its update; {kept}")
        if self.step > self.first and self.step % self.cfg.ckpt_every == 0 and self.saved != self.step:
            self.save(self.rng_at_start)

    def save(self, rng):
        """ckpt.pt: the weights after self.step updates, and `rng`, the random state the next step starts from."""
        save_checkpoint(self.out / "ckpt.pt", self.script, self.cfg, self.step, rng, **self.state)
        self.saved = self.step

    def log(self, figures):
        """The step is done; on rank 0 and their cadence: the grid (its figures join the line), the line, curves.png."""
        self.step, self.images = self.step + 1, self.images + self.cfg.batch_size
        before, self.progress = self.progress, self.share()
        if self.progress >= 1 and self.step < self.cfg.steps:  # --max-minutes spent: this step is the last
            self.cfg.steps = self.step
            say(f"--max-minutes {self.cfg.max_minutes:g} spent at step {self.step} of --steps {self.total}: training "
                f"ends here (to train on: --resume --steps {self.total} --max-minutes <more>)")
        if last := self.step == self.cfg.steps:  # saved before the last grid: a sampler that fails loses no step
            self.save(rng_state(self.rng))
        due = lambda share: int(share * self.total / self.cfg.sample_every + 1e-9)  # grids due by a share of the run
        grid = is_main() and self.sample_grid is not None and (last or due(self.progress) > due(before))
        if grid:
            started, modes = time.time(), [(m, m.training) for m in self.state.values() if hasattr(m, "training")]
            figures = figures | (run_safely("the sample grid", lambda: self.sample_grid(self.step)) or {})
            for m, training in modes:  # a grid may switch a network to eval mode: training goes on as it was
                m.train(training)
            self.last_time += time.time() - started  # img/s counts the training steps alone
        if is_main() and (self.step % self.cfg.log_every == 0 or grid or last):
            now, figures = time.time(), {k: float(v) for k, v in figures.items()}
            img_s = self.images / max(now - self.last_time, 1e-9)
            eta = (self.cfg.steps - self.step) * (now - self.last_time) / (self.step - self.last_step)
            eta = int(min(eta, (1 - self.progress) * self.budget) if self.budget else eta)  # the budget's end if sooner
            with open(self.log_path, "a") as f:
                wall = round(self.wall_before + now - self.started, 1)  # the whole run's seconds, over resumes
                f.write(json.dumps(dict(step=self.step, img_per_s=round(img_s, 1), wall_s=wall, **figures)) + "\n")
            print(f"step {self.step:>6}/{self.cfg.steps} | " + " | ".join(f"{k} {v:.4g}" for k, v in figures.items())
                  + f" | {img_s:,.0f} img/s | ETA {eta // 3600}h{eta % 3600 // 60:02d}m{eta % 60:02d}s", flush=True)
            self.last_step, self.last_time, self.images = self.step, now, 0
        if grid:
            run_safely("curves.png", lambda: plot_curves(self.out))  # from log.jsonl, this step's line included

    def finish(self, final=None):
        """The last checkpoint (exit 130 after Ctrl-C), then final(), the family's measure on test data if any."""
        if self.saved != self.step:  # Ctrl-C's step (the last step saved in log())
            self.save(rng_state(self.rng))
        if self.interrupted:
            say(f"interrupted: checkpoint saved at step {self.step}; --resume continues from there")
            raise SystemExit(130)
        if final is not None:  # on every rank (an evaluation is split over them), in full fp32 like --eval
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
            run_safely("the evaluation on test data", final)
        say(f"done: {self.out}")


def run_safely(what, fn):
    """A picture or evaluation during training: a failure is one warning line, and the run's steps go on."""
    try:
        return fn()
    except Exception as e:  # any error of a picture or a measure; Ctrl-C and exits still pass
        print(f"warning: {what} failed ({type(e).__name__}: {str(e).splitlines()[0][:200]}); training goes on")


def read_log(path):
    """The records of a log.jsonl; a line cut short by a crash mid-write is skipped."""
    records = []
    for line in Path(path).read_text().splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            records.append(json.loads(line))
    return records


def plot_curves(out):
    """curves.png in `out`: each figure of log.jsonl (the losses, the family's own measure) against the step, a panel
    each, three to a row; non-finite values are left out. Drawn with every grid of a run, and by --plot for any run.
    Returns the panels drawn, {figure: [(step, value), ...]}."""
    records = read_log(Path(out) / "log.jsonl") if (Path(out) / "log.jsonl").exists() else []
    names = [k for k in dict.fromkeys(k for r in records for k in r) if k not in ("step", "img_per_s", "wall_s")]
    if not names:
        raise UsageError(f"no log.jsonl with figures in {out}; point --out at a run that trained --log-every steps")
    panels = {k: [(r["step"], r[k]) for r in records if isinstance(r.get(k), (int, float)) and math.isfinite(r[k])]
              for k in names}
    from matplotlib.figure import Figure  # drawn straight to a file: no pyplot, no display
    cols, rows = min(3, len(panels)), math.ceil(len(panels) / 3)
    fig = Figure(figsize=(4.2 * cols, 2.8 * rows))
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax, (name, points) in zip(axes.flat, panels.items()):
        ax.plot(*zip(*points), marker="." if len(points) < 30 else None, linewidth=1) if points else None
        ax.set(title=name, xlabel="step")
        ax.grid(alpha=0.3)
    for ax in axes.flat[len(panels):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(Path(out) / "curves.tmp.png", dpi=80)
    os.replace(Path(out) / "curves.tmp.png", Path(out) / "curves.png")
    return panels


# ----------------------------------------------------------------------------- EMA of weights

def make_ema(model):
    """A frozen copy of the model whose weights track an exponential moving average of the model's."""
    return copy.deepcopy(model).eval().requires_grad_(False)


@torch.no_grad()
def ema_update(ema, model, decay, step):
    """theta_ema <- d theta_ema + (1 - d) theta, d ramped up as (1+step)/(10+step): a short run forgets its init."""
    d = min(decay, (1 + step) / (10 + step))
    torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1 - d)
    for b_ema, b in zip(ema.buffers(), model.buffers()):
        b_ema.copy_(b)  # buffers (BatchNorm statistics, masks) are copied, not averaged
