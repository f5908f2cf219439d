"""benchmarks/precision.py, kept working: one script's quick recipe, a few seconds in each precision."""
import sys

from conftest import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
import precision  # noqa: E402


def test_both_precisions_are_timed_and_tabled(data_dir, capsys):
    rows = precision.main(["--scripts", "vae", "--seconds", "8", "--data-dir", str(data_dir)])
    assert set(rows) == {"vae"} and rows["vae"]["fp32"] > 0 and rows["vae"]["bf16"] > 0
    printed = capsys.readouterr().out
    assert "CPU bf16 units:" in printed and printed.count("| vae |") == 1
