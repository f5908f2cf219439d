"""Training speed of each quick recipe in fp32 and in bf16 autocast on this CPU, side by side: the figures that
--precision auto stands on (bf16 on a CPU with bf16 units, Intel AMX or AVX512-BF16; fp32 elsewhere).

    python benchmarks/precision.py                    # the five scripts, 70 s in each precision (about 12 min)
    python benchmarks/precision.py --scripts ddpm gan --seconds 40

Each run is the script's quick recipe (--preset quick, no grid, no checkpoint) in a temporary folder, stopped
after --seconds, the two precisions one after the other; its figure is the median img/s of its progress lines
after the first (which holds the start-up). Run it on an idle machine: a second job on the cores changes both.
"""
import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ["ddpm", "vae", "gan", "pixelcnn", "pixelrnn"]


def speed(script, precision, seconds, data_dir):
    """Median img/s of `seconds` of the script's quick-recipe training in `precision`, and the steps it made."""
    with tempfile.TemporaryDirectory() as out:
        cmd = [sys.executable, f"{script}.py", "--preset", "quick", "--precision", precision, "--out", out,
               "--data-dir", data_dir, "--max-minutes", "0", "--log-every", "20", "--sample-every", "100000000",
               "--ckpt-every", "100000000"]
        try:  # stopped from outside, so that no end-of-run measure runs
            subprocess.run(cmd, cwd=ROOT, timeout=seconds, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            pass
        log = Path(out) / "log.jsonl"
        lines = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    if len(lines) < 2:
        raise SystemExit(f"error: {script}.py logged {len(lines)} progress lines in {seconds} s; give more --seconds")
    return statistics.median(r["img_per_s"] for r in lines[1:]), lines[-1]["step"]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scripts", nargs="+", default=SCRIPTS, choices=SCRIPTS)
    p.add_argument("--seconds", type=float, default=70.0, help="training time of each run (start-up included)")
    p.add_argument("--data-dir", default="./data")
    args = p.parse_args(argv)
    units = [k for k in ("amx_tile", "avx512_bf16") if getattr(torch.cpu, f"_is_{k}_supported", bool)()]
    print(f"CPU bf16 units: {', '.join(units) or 'none'}; torch {torch.__version__}")
    print("| script | fp32 img/s | bf16 img/s | bf16 / fp32 |\n|---|---|---|---|")
    rows = {}
    for script in args.scripts:
        (fp32, _), (bf16, _) = (speed(script, p, args.seconds, args.data_dir) for p in ("fp32", "bf16"))
        rows[script] = dict(fp32=fp32, bf16=bf16)
        print(f"| {script} | {fp32:,.0f} | {bf16:,.0f} | {bf16 / fp32:.2f} |", flush=True)
    return rows


if __name__ == "__main__":
    main()
