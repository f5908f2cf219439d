"""The full recipes, known to run: a bare command on a CUDA GPU takes `full` (the model sized for one GPU), and no
test would run that model otherwise. Each script's full model, exactly as the recipe resolves it, trains 2 steps of
2 images on the CPU, saves, reloads and samples 2 images (8x8 digits, so that the pixel samplers finish at once)."""
import importlib
import json
import math

import pytest
import torch

import common

SCRIPTS = ["ddpm", "vae", "gan", "pixelcnn", "pixelrnn"]
FAST_SAMPLER = {"ddpm": ["--sampler", "ddim", "--sample-steps", "2"]}  # 2 DDIM steps, not the full 1000-step chain


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_bare_command_on_cuda_takes_the_full_recipe(script, tmp_path, monkeypatch):
    module = importlib.import_module(script)
    parse = lambda *argv: common.parse_args(module.ModelConfig, module.Config, script, ["--out", str(tmp_path), *argv],
                                            module.PRESETS)
    full = parse("--preset", "full", "--device", "cpu")
    monkeypatch.setattr(common, "get_device", lambda name="auto": torch.device("cuda"))  # as if a GPU were here
    bare = parse()
    assert bare.preset == "full" and bare.model == full.model and bare.model == module.ModelConfig()
    assert {k: v for k, v in vars(bare).items() if k not in ("recipe", "device")} == \
           {k: v for k, v in vars(full).items() if k not in ("recipe", "device")}


@pytest.mark.parametrize("script", SCRIPTS)
def test_the_full_recipe_trains_saves_reloads_and_samples(script, small_mnist, tmp_path):
    module, out = importlib.import_module(script), tmp_path / "full"
    module.main(["--preset", "full", "--steps", "2", "--batch-size", "2", "--log-every", "1", "--num-samples", "2",
                 "--device", "cpu", "--data-dir", str(small_mnist), "--out", str(out), *FAST_SAMPLER.get(script, [])])
    config = json.loads((out / "config.json").read_text())
    assert config["run"]["preset"] == "full" and config["model"] == vars(module.ModelConfig())  # the defaults
    lines = common.read_log(out / "log.jsonl")
    assert [r["step"] for r in lines] == [1, 2]
    assert all(math.isfinite(v) for r in lines for k, v in r.items() if k not in ("step", "wall_s", "img_per_s"))
    saved = torch.load(out / "ckpt.pt", weights_only=True)
    assert saved["step"] == 2 and saved["model_config"] == config["model"]
    module.main(["--out", str(out), "--sample", "--num-samples", "2", "--data-dir", str(small_mnist),
                 "--device", "cpu"])
    samples = torch.load(out / "samples.pt")
    assert samples.shape == (2, 1, 8, 8) and samples.min() >= 0 and samples.max() <= 1
