"""The five scripts on one GPU, in a fixed budget of minutes: what a user with one GPU should expect.

    python benchmarks/gpu.py                              # one CUDA GPU, 8 minutes in all -> benchmarks/gpu.json
    python benchmarks/gpu.py --device cpu --minutes 1     # the same path on the CPU, tiny (the tests keep it working)

It drives the scripts themselves (their full recipe, as a bare command on a GPU takes it, through main()), each run
in a folder under --work, and measures:
  - speed: images per second of training (log.jsonl's img/s after the first line) in fp32 (TF32 on a GPU) and in bf16
    autocast, and with --compile in bf16 if the budget leaves room for its compilation; the peak GPU memory
    (torch.cuda.max_memory_allocated) of each;
  - sampling: seconds per 1,000 samples with each script's --sample and its default sampler (DDPM: ancestral, all T
    steps; the pixel models: the cached and the carried sampler), timed on --sample-n images and scaled to 1,000;
  - time to quality: DDPM's and the GAN's full recipes trained for a fixed share of the budget, then
    --quality-n samples scored by benchmarks/quality.py's classifier (FD, precision, recall, class entropy).
The budget is split before anything runs (speed 45%, sampling 15%, quality 35%: DDPM 25, the GAN 10); a part that
no longer fits in what is left is skipped and marked so. On the CPU the runs use --batch-size 8, --sample-n 2 and a
DDIM-10 sampler for DDPM, and their figures only show that the path works.
"""
import argparse
import contextlib
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
import common  # noqa: E402
import quality  # noqa: E402

FAMILIES = ["ddpm", "vae", "gan", "pixelcnn", "pixelrnn"]
COMPILED = ["ddpm", "vae", "gan", "pixelcnn"]  # pixelrnn's recurrence is a Python loop over rows: no graph to compile
QUIET = {"pixelcnn": ["--eval-n", "32"], "pixelrnn": ["--eval-n", "32"],  # a short end-of-run NLL in the speed runs
         "ddpm": ["--sampler", "ddim", "--sample-steps", "2"]}  # a cheap last grid; --sample times the real sampler


class Budget:
    """--minutes, divided before anything runs into parts that end at fixed times; a run starts only if its slice and
    the overhead seen so far (start-up, the last grid, the end-of-run NLL) fit before its part's end."""

    def __init__(self, minutes, shares):
        self.start, self.total, self.overhead = time.time(), 60 * minutes, 5.0
        ends = [sum(shares[:i + 1]) for i in range(len(shares))]
        self.ends = {name: self.start + 60 * minutes * end for name, end in zip(["speed", "sampling", "ddpm", "gan"], ends)}

    def fits(self, part, seconds):
        return time.time() + seconds + self.overhead <= self.ends[part]

    def until(self, part):
        """The seconds a run of this part may train: what is left of it, less the overhead."""
        return self.ends[part] - time.time() - self.overhead

    def note(self, wall, trained):
        self.overhead = max(self.overhead, wall - trained)


def script_run(family, argv, log):
    """main() of a script, its output into the file `log`; (seconds, peak GPU bytes or None, the error line or None)."""
    module = __import__(family)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    start, error = time.time(), None
    with open(log, "w") as f, contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
        try:
            module.main([str(a) for a in argv])
        except SystemExit as e:  # a UsageError's one line (exit 2), or Ctrl-C (130)
            error = f"exit {e.code}: see {log}"
    peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None
    return time.time() - start, peak, error


def train(args, family, out, seconds, *flags):
    """A new run of the family's full recipe for `seconds` of training (Run's time budget), into `out`."""
    shutil.rmtree(out, ignore_errors=True)
    argv = ["--preset", "full", "--device", args.device, "--data-dir", args.data_dir, "--out", out, "--steps", 10**7,
            "--max-minutes", seconds / 60, "--log-every", 10, "--sample-every", 10**7, "--ckpt-every", 10**7,
            "--num-samples", 1 if args.device == "cpu" else 4, *args.batch, *flags]
    wall, peak, error = script_run(family, argv, out.parent / f"{out.name}.log")
    lines = common.read_log(out / "log.jsonl") if (out / "log.jsonl").exists() else []
    speeds = [r["img_per_s"] for r in lines[1:]] or [r["img_per_s"] for r in lines]  # the first line holds warm-up
    return dict(steps=lines[-1]["step"] if lines else 0, img_per_s=round(statistics.median(speeds), 1) if speeds
                else None, peak_gb=None if peak is None else round(peak / 2**30, 2), wall_s=round(wall, 1),
                first_line_s=lines[0]["wall_s"] if lines else None, error=error)


def sample_time(args, family, out, n):
    """Seconds per 1,000 samples of --sample from the run in `out` with the family's default sampler."""
    sampler = ["--sampler", "ancestral"] if family == "ddpm" and args.device != "cpu" else \
        ["--sampler", "ddim", "--sample-steps", "10"] if family == "ddpm" else []
    wall, _, error = script_run(family, ["--out", out, "--sample", "--num-samples", n, "--device", args.device,
                                         "--data-dir", args.data_dir, *sampler], out.parent / f"{out.name}-sample.log")
    return dict(n=n, sampler=" ".join(sampler[1:]) or "the default", s_per_1000=round(wall * 1000 / n, 1),
                error=error)


def score(args, out, classifier, reference):
    """benchmarks/quality.py's figures of the samples.pt in `out`, against the test set's features."""
    samples = torch.load(out / "samples.pt", weights_only=True).to(reference[0].device)
    return quality.score(classifier, samples, reference[0], reference[1][:len(samples)])


def classifier_and_reference(args, device, n):
    """quality.py's classifier (the cached one, else trained here on --data-dir) and the test set's features."""
    x, y = common.load_dataset("mnist", args.data_dir, "train", device)
    x_test, y_test = common.load_dataset("mnist", args.data_dir, "test", device)
    data = (x.float() / 255, y, x_test.float() / 255, y_test)
    if Path(args.classifier).exists():
        model = quality.Classifier().to(device)
        model.load_state_dict(torch.load(args.classifier, map_location=device, weights_only=True))
    else:  # 2 epochs, as quality.py trains it; on the CPU's smoke run a few steps
        model = quality.fit_classifier(data[0], data[1], 2 * len(x) // 128 if device.type == "cuda" else 20)
    return model.eval(), quality.reference(model.eval(), data, n)


def table(result):
    lines = [f"{result['device']} | torch {result['torch']} | CUDA {result['cuda']} | budget {result['minutes']} min, "
             f"used {result['used_s']:.0f} s", "", "speed (img/s of training, peak GPU memory):"]
    for name, r in result["speed"].items():
        lines.append(f"  {name:28s} " + (r.get("skipped") or r.get("error") or
                     f"{r['img_per_s']} img/s over {r['steps']} steps, peak memory {r['peak_gb'] or '-'} GB, "
                     f"first line after {r['first_line_s']} s"))
    lines.append("sampling (seconds per 1,000 samples, --sample):")
    for name, r in result["sampling"].items():
        lines.append(f"  {name:28s} " + (r.get("skipped") or r.get("error") or
                     f"{r['s_per_1000']} s ({r['sampler']}, timed on {r['n']})"))
    lines.append("time to quality (trained for a share of the budget, then scored):")
    for name, r in result["quality"].items():
        lines.append(f"  {name:28s} " + (r.get("skipped") or r.get("error") or
                     f"{r['train']['steps']} steps in {r['train']['wall_s']} s: N {r['score']['n']}, FD "
                     f"{r['score']['fd']}, precision {r['score']['precision']}, recall {r['score']['recall']}"))
    return "\n".join(lines)


@common.entry
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--minutes", type=float, default=8.0, help="the whole budget, every part included")
    p.add_argument("--data-dir", default=str(ROOT / "data"), help="where MNIST is (MNIST/raw/)")
    p.add_argument("--work", default=str(ROOT / "runs" / "gpu"), help="the runs' folders (emptied first)")
    p.add_argument("--json", default=str(ROOT / "benchmarks" / "gpu.json"), help="every figure, written here")
    p.add_argument("--families", default=",".join(FAMILIES))
    p.add_argument("--sample-n", type=int, default=0, help="images timed by --sample (default 1000; CPU: 2)")
    p.add_argument("--quality-n", type=int, default=0, help="samples scored (default 1000; CPU: 16)")
    p.add_argument("--classifier", default=str(ROOT / "runs" / "mnist-classifier.pt"))
    args = p.parse_args(argv)
    families = [f for f in args.families.split(",") if f]
    if not families or set(families) - set(FAMILIES):
        raise common.UsageError(f"--families {args.families}: pick from {','.join(FAMILIES)}")
    if not args.minutes > 0:
        raise common.UsageError(f"--minutes {args.minutes}: must be above 0")
    device = common.get_device(args.device)  # one line, no traceback, when --device cuda finds no GPU
    cpu = device.type == "cpu"
    args.batch = ["--batch-size", 8] if cpu else []  # the full recipes' batches would take the CPU's whole budget
    args.sample_n, args.quality_n = args.sample_n or (2 if cpu else 1000), args.quality_n or (16 if cpu else 1000)
    common.load_dataset("mnist", args.data_dir, "test")  # missing data: one line now, not a failed run later
    work, budget = Path(args.work), Budget(args.minutes, [0.45, 0.15, 0.25, 0.10])
    work.mkdir(parents=True, exist_ok=True)
    result = dict(device=torch.cuda.get_device_name() if not cpu else "cpu", torch=torch.__version__,
                  cuda=torch.version.cuda, minutes=args.minutes, speed={}, sampling={}, quality={})

    configs = [(f, "fp32", False) for f in families] + [(f, "bf16", False) for f in families]
    compiled = [(f, "bf16", True) for f in families if f in COMPILED and not cpu]
    slice_s = 0.45 * budget.total / (len(configs) + 3 * len(compiled)) / 2  # half for training, half for overheads
    for family, precision, compile_ in configs + compiled:  # the compiled runs last: their compile may not fit
        name, seconds = f"{family} {precision}" + " --compile" * compile_, slice_s * (3 if compile_ else 1)
        if not budget.fits("speed", seconds):
            result["speed"][name] = dict(skipped="skipped: no room left in the budget")
            continue
        flags = ["--precision", precision, *(["--compile"] if compile_ else []), *QUIET.get(family, [])]
        result["speed"][name] = train(args, family, work / name.replace(" ", "-"), seconds, *flags)
        budget.note(result["speed"][name]["wall_s"], seconds)

    for family in families:
        out = work / f"{family}-fp32"
        if not (out / "ckpt.pt").exists() or not budget.fits("sampling", 0):
            result["sampling"][family] = dict(skipped="skipped: no room left in the budget, or no run to sample from")
            continue
        result["sampling"][family] = sample_time(args, family, out, args.sample_n)

    classifier, reference = classifier_and_reference(args, device, args.quality_n)
    for family in ("ddpm", "gan"):
        per_sample = result["sampling"].get(family, {}).get("s_per_1000") or 0.0
        seconds = budget.until(family) - per_sample * args.quality_n / 1000  # training: what sampling leaves
        if family not in families or seconds < 1:
            result["quality"][family] = dict(skipped="skipped: no room left in the budget")
            continue
        out = work / f"{family}-quality"
        run = train(args, family, out, seconds, *QUIET.get(family, []))
        drawn = sample_time(args, family, out, args.quality_n)
        result["quality"][family] = dict(train=run, sampling=drawn, score=score(args, out, classifier, reference))

    result["used_s"] = round(time.time() - budget.start, 1)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=1))
    print(table(result))
    print(f"-> {args.json}")
    return result


if __name__ == "__main__":
    main()
