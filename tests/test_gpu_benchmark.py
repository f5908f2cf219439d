"""benchmarks/gpu.py, kept working without a GPU: its CPU path in a tiny budget, and one line when no GPU is there."""
import json
import sys

import pytest
import torch

from conftest import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
import gpu  # noqa: E402


def test_the_cpu_path_measures_within_its_budget_and_writes_every_figure(data_dir, tmp_path, capsys):
    """Half a minute for the GAN and DDPM: speed runs, sampling and time to quality, each measured or marked skipped;
    the JSON and the table hold them all, and the whole run keeps to its budget (plus one run's overrun at most)."""
    out = tmp_path / "gpu.json"
    result = gpu.main(["--device", "cpu", "--minutes", "0.5", "--families", "gan,ddpm", "--data-dir", str(data_dir),
                       "--work", str(tmp_path / "work"), "--json", str(out)])
    assert json.loads(out.read_text()) == result and result["device"] == "cpu"
    assert set(result["speed"]) == {"gan fp32", "ddpm fp32", "gan bf16", "ddpm bf16"}  # no --compile on the CPU
    assert set(result["sampling"]) == {"gan", "ddpm"} and set(result["quality"]) == {"ddpm", "gan"}
    measured = [r for r in result["speed"].values() if "skipped" not in r]
    assert measured and all(r["img_per_s"] > 0 and r["steps"] >= 1 and r["error"] is None for r in measured)
    for r in result["sampling"].values():
        assert "skipped" in r or (r["s_per_1000"] > 0 and r["n"] == 2)
    for r in result["quality"].values():
        assert "skipped" in r or (r["score"]["n"] == 16 and r["score"]["fd"] >= 0)
    assert result["used_s"] < 30 + 45  # the budget, and at most one run's overrun on a busy machine
    table = capsys.readouterr().out
    assert "speed (img/s of training" in table and "time to quality" in table and str(out) in table


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is here")
def test_asking_for_a_gpu_where_there_is_none_is_one_line(capsys):
    with pytest.raises(SystemExit) as e:
        gpu.main(["--device", "cuda"])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and err.startswith("error: --device cuda") and "\n" not in err
