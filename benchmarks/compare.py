"""The five families on one scale: for each README quick run (the bare command on a CPU), its training time,
its own likelihood figure, the quality of 1,000 of its samples (benchmarks/quality.py, with the floors) and the
time to draw them. Writes benchmarks/compare.md (one table) and assets/compare.png (a row of samples each).

    python benchmarks/compare.py     # trains the runs that are missing first (five 10-minute runs, about 65 min)

It uses the README's run folders (runs/pixelrnn-mnist, ...): a run you already made is measured as it is.
What it runs, in order, for each family and only where the result is not there yet:
    python <script>.py [--dataset mnist]             the quick run; its time and steps: log.jsonl's last line
    python <script>.py --eval [...]                  the likelihood, into eval.json (pixelcnn/pixelrnn: by the run)
    python <script>.py --sample --num-samples 1000   always; the wall time of this command is the sampling figure
"""
import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch
import torchvision.utils as vutils

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import quality  # noqa: E402  (it puts the project root on sys.path too)
import common  # noqa: E402

# family, its quick-run command, the --eval flags (None: the run writes eval.json itself; no figure for the GAN),
# the eval.json key of its likelihood figure and how the table names it
FAMILIES = [
    ("pixelrnn", ["pixelrnn.py"], None, "exact NLL (nats/image)", "{:.2f} nats, exact"),
    ("pixelcnn", ["pixelcnn.py"], None, "exact NLL (nats/image)", "{:.2f} nats, exact"),
    ("vae", ["vae.py"], ["--eval"], "IW NLL -log p(x) (nats/image)", "{:.2f} nats, IW bound (k = 1000)"),
    ("gan", ["gan.py"], None, None, "none (no density)"),
    ("ddpm", ["ddpm.py", "--dataset", "mnist"], ["--eval", "--eval-n", "100"], "NLL <=   total (bits/dim)",
     "{:.2f} bits/dim, bound (8-bit data, {n} images)"),
]


def run(cmd):
    """Run a script from the project root; its output goes to ours; a failure stops everything."""
    print("$ python " + " ".join(cmd), flush=True)
    start = time.perf_counter()
    if subprocess.run([sys.executable, *cmd], cwd=ROOT).returncode != 0:
        raise common.UsageError(f"`python {' '.join(cmd)}` failed (its output is above); fix that and run again")
    return time.perf_counter() - start


def measure(family, cmd, eval_flags, key, fmt, n, model, test_feats, real_feats):
    out = ROOT / "runs" / f"{family}-mnist"
    if not (out / "ckpt.pt").exists():
        run(cmd)
    logged = [r for r in common.read_log(out / "log.jsonl") if "wall_s" in r]
    if not logged:
        raise common.UsageError(f"{out}/log.jsonl has no wall_s (a run made before it was logged): move {out} "
                                f"away and run again to retrain it")
    if key and not (out / "eval.json").exists():
        run([cmd[0], *eval_flags])
    result = json.loads((out / "eval.json").read_text()) if key else {}
    likelihood = fmt.format(result[key], n=result.get("n", result.get("images"))) if key else fmt  # n: images scored
    sample_s = run([cmd[0], "--sample", "--num-samples", str(n)])
    samples = quality.read_samples(out / "samples.pt")
    row = quality.score(model, samples[:n], test_feats, real_feats)
    return dict(family=family, train_min=logged[-1]["wall_s"] / 60, steps=logged[-1]["step"], likelihood=likelihood,
                sample_s=sample_s, **row), samples


def table(rows, floors, n):
    head = ("| family | quick run: min (steps) | likelihood (its own measure) | FD | precision | recall | class entropy "
            f"| {n:,} samples (s) |\n|---|---|---|---|---|---|---|---|\n")
    body = "".join(f"| {r['family']} | {r['train_min']:.1f} ({r['steps']:,}) | {r['likelihood']} | {r['fd']:.1f} "
                   f"| {r['precision']:.2f} | {r['recall']:.2f} | {r['class_entropy']:.2f} | {r['sample_s']:.0f} |\n"
                   for r in rows)
    floor = "".join(f"| *{name}* | | | {r['fd']:.1f} | {r['precision']:.2f} | {r['recall']:.2f} "
                    f"| {r['class_entropy']:.2f} | |\n" for name, r in floors.items())
    return head + body + floor


def figure(samples, path, per_row=12):
    """One row of samples per family, named on the left."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(len(samples), 1, figsize=(per_row * 0.6, len(samples) * 0.75))
    for ax, (name, x) in zip(axes, samples.items()):
        ax.imshow(vutils.make_grid(x[:per_row], nrow=per_row, padding=1, pad_value=1.0)[0], cmap="gray", vmin=0, vmax=1)
        ax.set_yticks([]), ax.set_xticks([])
        ax.set_ylabel(name, rotation=0, ha="right", va="center")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def cpu_name():
    lines = Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []
    return next((l.split(":", 1)[1].strip() for l in lines if l.startswith("model name")), platform.processor())


@common.entry
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=1000, help="samples per family, and images per floor set")
    p.add_argument("--classifier", default=str(quality.CLASSIFIER))
    args = p.parse_args(argv)
    torch.set_num_threads(2)
    model, data = quality.mnist_classifier(Path(args.classifier), torch.device("cpu"))
    test_feats, real_feats = quality.reference(model, data, args.n)
    rows, samples = [], {"MNIST test": data[2][:args.n]}
    for family, cmd, eval_flags, key, fmt in FAMILIES:
        row, samples[family] = measure(family, cmd, eval_flags, key, fmt, args.n, model, test_feats, real_feats)
        rows.append(row)
        quality.print_row(family, row)
    floors = {name: quality.score(model, x, test_feats, real_feats) for name, x in quality.floors(data, args.n).items()}
    grey, binarized = quality.accuracy(model, data)
    text = (f"`python benchmarks/compare.py` on {cpu_name()}, {torch.get_num_threads()} threads, torch "
            f"{torch.__version__}; N = {args.n} for every sample figure; the classifier's test accuracy {grey:.2%} "
            f"(grey), {binarized:.2%} (binarized).\n\n" + table(rows, floors, args.n))
    (ROOT / "benchmarks" / "compare.md").write_text(text)
    (ROOT / "benchmarks" / "compare.json").write_text(json.dumps(dict(rows=rows, floors=floors), indent=1))
    figure(samples, ROOT / "assets" / "compare.png")
    print(text + "\nwrote benchmarks/compare.md, benchmarks/compare.json, assets/compare.png")


if __name__ == "__main__":
    main()
