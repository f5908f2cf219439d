"""Draw a 7: how often each family's --conditional quick run draws the class it is asked for, and what
classifier-free guidance does to DDPM's. For each family, where the result is not there yet:

    python <script>.py --conditional --out runs/<family>-cond    the README quick run, conditional (its time: wall_s)
    python <script>.py --out runs/<family>-cond --sample --num-samples N          the ten classes in turn
    python ddpm.py --out runs/ddpm-cond --sample --num-samples N --guidance w     for w = 0, 1, 3, 7

and benchmarks/quality.py scores the samples: the fraction the MNIST classifier puts in the class they were drawn
for (chance 0.1), and FD, precision, recall as in benchmarks/compare.py (at this N; compare only at one N).
Writes benchmarks/conditional.md and .json, assets/conditional.png (a row per class, a panel per family) and
assets/ddpm_guidance.png (the ddpm run's guidance.png: a row per class, a column per w, one x_T per row).

    python benchmarks/conditional.py          # trains the missing runs first (about an hour on 2 CPU cores)
"""
import argparse
import json
import shutil
import sys
from pathlib import Path

import torch
import torchvision.utils as vutils

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import compare  # noqa: E402  (it puts the project root and benchmarks/ on sys.path)
import quality  # noqa: E402
import common  # noqa: E402

FAMILIES = ["pixelrnn", "pixelcnn", "vae", "gan", "ddpm"]
GUIDANCE = [0, 1, 3, 7]  # ddpm's weights w, as in its guidance.png


def measure(family, n, w, model, test_feats, real_feats):
    """Draw n samples from runs/<family>-cond (guided with w for ddpm) and score them; (row, samples, labels)."""
    out = ROOT / "runs" / f"{family}-cond"
    if not (out / "ckpt.pt").exists():
        compare.run([f"{family}.py", "--conditional", "--out", str(out.relative_to(ROOT))])
    wall = [r["wall_s"] for r in common.read_log(out / "log.jsonl") if "wall_s" in r]
    guided = ["--guidance", str(w)] if w is not None else []
    sample_s = compare.run([f"{family}.py", "--out", str(out.relative_to(ROOT)), "--sample", "--num-samples", str(n), *guided])
    samples, labels = quality.read_samples(out / "samples.pt"), quality.read_labels(out / "samples.pt")
    if w is not None:  # keep each weight's samples: the next --sample overwrites samples.pt
        shutil.copy(out / "samples.pt", out / f"samples_w{w}.pt")
    row = quality.score(model, samples[:n], test_feats, real_feats, labels[:n])
    name = family if w is None else f"{family}, w = {w}"
    return dict(family=name, train_min=wall[-1] / 60, sample_s=sample_s, **row)


def panel(family):
    """(samples, labels) of a family's conditional run for the figure (ddpm: unguided, w = 0), or None."""
    out = ROOT / "runs" / f"{family}-cond"
    path = out / ("samples_w0.pt" if family == "ddpm" else "samples.pt")
    if not path.exists() or not (out / "labels.pt").exists():
        return None
    return quality.read_samples(path), torch.load(out / "labels.pt", weights_only=True)


def table(rows):
    """The quality figures only: the runs' and samplers' times are in the .json (the unconditional runs' times, taken
    on a quiet machine, are benchmarks/compare.md's; the label adds one embedding)."""
    head = "| family | asked class | FD | precision | recall | class entropy |\n|---|---|---|---|---|---|\n"
    return head + "".join(f"| {r['family']} | {r['asked']:.2f} | {r['fd']:.1f} | {r['precision']:.2f} | "
                          f"{r['recall']:.2f} | {r['class_entropy']:.2f} |\n" for r in rows)


def by_class(x, labels, per_class):
    """The first per_class samples of each class, class 0 first: a grid with a row per class."""
    return torch.cat([x[labels == c][:per_class] for c in range(common.NUM_CLASSES)])


def figure(panels, path, per_class=6):
    """A panel per family: a row per class 0..9, per_class samples each."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(panels), figsize=(2.1 * len(panels), 3.8))
    for ax, (name, (x, labels)) in zip(axes, panels.items()):
        grid = vutils.make_grid(by_class(x, labels, per_class), nrow=per_class, padding=1, pad_value=1.0)
        ax.imshow(grid[0], cmap="gray", vmin=0, vmax=1)
        ax.set_xticks([]), ax.set_yticks([])
        ax.set_title(name, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


@common.entry
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=500, help="samples per family and guidance weight")
    p.add_argument("--families", default=",".join(FAMILIES), help="comma-separated, from " + ",".join(FAMILIES))
    p.add_argument("--classifier", default=str(quality.CLASSIFIER))
    args = p.parse_args(argv)
    families = args.families.split(",")
    if not set(families) <= set(FAMILIES):
        raise common.UsageError(f"--families {args.families}: pick from {','.join(FAMILIES)}")
    torch.set_num_threads(2)
    model, data = quality.mnist_classifier(Path(args.classifier), torch.device("cpu"))
    test_feats, real_feats = quality.reference(model, data, args.n)
    saved = ROOT / "benchmarks" / "conditional.json"  # rows measured before: a family measured now replaces its own
    rows = {r["family"]: r for r in (json.loads(saved.read_text()) if saved.exists() else [])}
    for family in families:
        for w in GUIDANCE if family == "ddpm" else [None]:
            row = measure(family, args.n, w, model, test_feats, real_feats)
            rows[row["family"]] = row
            quality.print_row(row["family"], row)
    rows = sorted(rows.values(), key=lambda r: FAMILIES.index(r["family"].split(",")[0]))
    panels = {f: p for f in FAMILIES if (p := panel(f)) is not None}
    grey, _ = quality.accuracy(model, data)
    text = (f"`python benchmarks/conditional.py` on {compare.cpu_name()}, {torch.get_num_threads()} threads, torch "
            f"{torch.__version__}; N = {args.n} samples per row (each row measured when its family was last given to "
            f"--families), the ten classes in turn; asked class: the fraction "
            f"the classifier puts in the class asked for (chance 0.10; on real test digits it is right {grey:.1%}).\n\n"
            + table(rows))
    (ROOT / "benchmarks" / "conditional.md").write_text(text)
    saved.write_text(json.dumps(rows, indent=1))
    figure(panels, ROOT / "assets" / "conditional.png")
    if (ROOT / "runs" / "ddpm-cond" / "guidance.png").exists():
        shutil.copy(ROOT / "runs" / "ddpm-cond" / "guidance.png", ROOT / "assets" / "ddpm_guidance.png")
    print(text + "\nwrote benchmarks/conditional.md, benchmarks/conditional.json, assets/conditional.png")


if __name__ == "__main__":
    main()
