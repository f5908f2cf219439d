"""Bad input, the same promise for all five scripts: one line on stderr that names the flag or the file, exit code 2,
and nothing written: a run folder that exists is byte-identical afterwards, and a new --out is not created."""
import importlib

import pytest
import torch

import common
from conftest import folder_snapshot

SCRIPTS = ["ddpm", "vae", "gan", "pixelcnn", "pixelrnn"]
TINY = {  # a model small enough that a two-step run takes a second or two
    "ddpm": ["--channels", "8", "--channel-mults", "1,2", "--num-res-blocks", "1", "--timesteps", "50",
             "--sampler", "ddim", "--sample-steps", "2"],
    "vae": ["--arch", "mlp", "--hidden", "16", "--z-dim", "2"],
    "gan": ["--g-channels", "4", "--d-channels", "4", "--z-dim", "8"],
    "pixelcnn": ["--channels", "8", "--layers", "1"],
    "pixelrnn": ["--layers", "1", "--hidden", "4", "--head", "8"],
}
RUN = ["--max-minutes", "0", "--steps", "2", "--batch-size", "4", "--log-every", "1", "--sample-every", "2",
       "--ckpt-every", "2", "--num-samples", "4", "--device", "cpu"]  # --max-minutes 0: its steps, on any clock


@pytest.fixture(scope="module")
def runs(data_dir, tmp_path_factory):
    """One finished tiny run per script, made once: {script: its folder}."""
    root = tmp_path_factory.mktemp("runs")
    for script in SCRIPTS:
        importlib.import_module(script).main(TINY[script] + RUN + ["--data-dir", str(data_dir), "--out", str(root / script)])
    return root


def refuses(script, argv, words, capsys, folder=None):
    """Run `script argv`: exit 2, one line on stderr holding every one of `words`, `folder` unchanged."""
    before = folder_snapshot(folder) if folder is not None and folder.exists() else None
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        importlib.import_module(script).main(argv)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2, err
    assert err.startswith("error: ") and "\n" not in err, err
    for w in words:
        assert w in err, (w, err)
    if folder is not None:
        assert (folder_snapshot(folder) if folder.exists() else None) == before
    return err


# ----------------------------------------------------------------------------- flags, checked before anything is written

NUMBERS = [  # (script or None for all, flag, value): each outside its declared range
    (None, "--batch-size", "-1"), (None, "--batch-size", "0"), (None, "--lr", "nan"), (None, "--lr", "0"),
    (None, "--steps", "0"), (None, "--steps", "-3"), (None, "--ckpt-every", "0"), (None, "--log-every", "0"),
    (None, "--num-samples", "0"), (None, "--label", "10"), (None, "--label", "-2"), (None, "--seed", "-1"),
    (None, "--max-minutes", "-1"),
    ("ddpm", "--warmup", "0"), ("ddpm", "--timesteps", "0"), ("ddpm", "--timesteps", "1"), ("ddpm", "--dropout", "2"),
    ("ddpm", "--channels", "0"),
    ("ddpm", "--num-res-blocks", "-1"), ("ddpm", "--ema-decay", "nan"), ("ddpm", "--guidance", "-1"),
    ("ddpm", "--p-uncond", "1"),
    ("vae", "--z-dim", "0"), ("vae", "--hidden", "0"), ("vae", "--layers", "-1"), ("vae", "--iw-samples", "0"),
    ("vae", "--eval-chunk", "0"), ("vae", "--channels", "0"), ("vae", "--blocks", "-1"),
    ("gan", "--ema-decay", "nan"), ("gan", "--g-channels", "0"), ("gan", "--d-channels", "-2"), ("gan", "--z-dim", "0"),
    ("gan", "--d-steps", "0"),
    ("pixelcnn", "--layers", "0"), ("pixelcnn", "--channels", "0"),
    ("pixelrnn", "--layers", "0"), ("pixelrnn", "--hidden", "0"), ("pixelrnn", "--head", "-1"),
]
CASES = [(s, f, v) for script, f, v in NUMBERS for s in ([script] if script else SCRIPTS)]


@pytest.mark.parametrize("script,flag,value", CASES, ids=[f"{s}{f}={v}" for s, f, v in CASES])
def test_a_number_outside_its_range(script, flag, value, tmp_path, capsys):
    out = tmp_path / "new"
    refuses(script, TINY[script] + RUN + [flag, value, "--out", str(out)], [flag, value, "must be in"], capsys)
    assert not out.exists()


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_flag_is_never_guessed_from_its_first_letters(script, tmp_path, capsys):
    """argparse would read --ckpt 2 as --ckpt-every 2: refused, with the flag it may have meant."""
    out = tmp_path / "new"
    refuses(script, TINY[script] + RUN + ["--ckpt", "2", "--out", str(out)], ["--ckpt 2", "did you mean --ckpt-every"],
            capsys)
    assert not out.exists()


@pytest.mark.parametrize("script", SCRIPTS)
def test_data_errors(script, data_dir, tmp_path, capsys):
    out = tmp_path / "new"
    refuses(script, RUN + ["--dataset", "imagenet-42", "--out", str(out)], ["--dataset", "imagenet-42"], capsys)
    refuses(script, RUN + ["--data-dir", str(tmp_path / "empty"), "--out", str(out)], ["MNIST/raw"], capsys)
    few = tmp_path / "few"
    few.mkdir()
    from PIL import Image
    for i in range(5):
        Image.new("L", (28, 28), i * 40).save(few / f"{i}.png")
    refuses(script, TINY[script] + RUN + ["--dataset", str(few), "--out", str(out)], [str(few), "at least 10"], capsys)
    for i in range(5, 12):
        Image.new("L", (28, 28), i * 20).save(few / f"{i}.png")
    (few / "broken.png").write_bytes(b"not a png")
    refuses(script, TINY[script] + RUN + ["--dataset", str(few), "--out", str(out)], ["broken.png"], capsys)
    assert not out.exists() and not (tmp_path / "empty").exists()


@pytest.mark.parametrize("script", SCRIPTS)
def test_conditional_needs_a_dataset_with_labels(script, tmp_path, capsys):
    folder, out = tmp_path / "faces", tmp_path / "new"
    folder.mkdir()
    from PIL import Image
    for i in range(12):
        Image.new("L", (28, 28), i * 20).save(folder / f"{i}.png")
    refuses(script, TINY[script] + RUN + ["--dataset", str(folder), "--conditional", "--out", str(out)],
            ["--conditional", "needs class labels", str(folder)], capsys)
    assert not out.exists()


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_label_for_an_unconditional_model(script, runs, data_dir, tmp_path, capsys):
    run, out = runs / script, tmp_path / "new"
    refuses(script, ["--out", str(run), "--sample", "--label", "3"], ["--label 3", "--conditional", "drop --label"],
            capsys, run)
    refuses(script, TINY[script] + RUN + ["--data-dir", str(data_dir), "--label", "3", "--out", str(out)],
            ["--label 3", "--conditional"], capsys)
    assert not out.exists()
    if script == "ddpm":  # guidance mixes in the null class, which only a conditional model has
        refuses(script, ["--out", str(run), "--sample", "--guidance", "2"], ["--guidance 2", "--conditional"], capsys, run)


def test_more_ddim_steps_than_diffusion_steps(runs, data_dir, tmp_path, capsys):
    """DDIM takes a subset of the T steps: 51 of TINY's T = 50 are refused, for --sample and for a new run."""
    refuses("ddpm", ["--out", str(runs / "ddpm"), "--sample", "--sample-steps", "51"], ["--sample-steps 51", "T = 50"],
            capsys, runs / "ddpm")
    out = tmp_path / "new"
    refuses("ddpm", TINY["ddpm"] + RUN + ["--data-dir", str(data_dir), "--sample-steps", "51", "--out", str(out)],
            ["--sample-steps 51", "use at most 50"], capsys)
    assert not out.exists()


@pytest.mark.parametrize("script", SCRIPTS)
def test_an_out_that_cannot_be_made(script, data_dir, tmp_path, capsys):
    """A file, a folder under a file, and a folder the system refuses (/sys: not writable even by root, where
    chmod stops nobody): one line naming --out and the system's reason."""
    file = tmp_path / "file"
    file.write_text("x")
    argv = TINY[script] + RUN + ["--data-dir", str(data_dir)]
    refuses(script, argv + ["--out", str(file)], ["File exists", "pick another --out"], capsys)
    refuses(script, argv + ["--out", str(file / "run")], ["Not a directory", "pick another --out"], capsys)
    refuses(script, argv + ["--out", "/sys/no-such-folder/run"], ["not permitted: /sys/no-such-folder", "pick another --out"], capsys)
    assert file.read_text() == "x"


@pytest.mark.parametrize("script", SCRIPTS)
def test_two_modes_at_once(script, runs, capsys):
    refuses(script, ["--out", str(runs / script), "--sample", "--eval"], ["--sample", "--eval"], capsys, runs / script)


# ----------------------------------------------------------------------------- runs and checkpoints

@pytest.mark.parametrize("script", SCRIPTS)
def test_a_finished_run_is_never_overwritten(script, runs, data_dir, capsys):
    run = runs / script
    argv = TINY[script] + RUN + ["--data-dir", str(data_dir), "--out", str(run)]
    refuses(script, argv, [str(run), "--resume"], capsys, run)  # a new run into it
    refuses(script, argv + ["--resume"], ["already at step 2", "--steps"], capsys, run)  # nothing left to train
    refuses(script, argv + ["--resume", "--steps", "4", "--dataset", "fashion-mnist"], ["--dataset", "mnist"], capsys, run)


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_model_flag_that_disagrees_with_the_checkpoint(script, runs, data_dir, capsys):
    run = runs / script
    flag_, value = TINY[script][0], TINY[script][1]
    other = str(int(value) * 2) if value.isdigit() else "conv"
    err = refuses(script, ["--out", str(run), "--sample", flag_, other], [flag_, value, other], capsys, run)
    assert "drop" in err


@pytest.mark.parametrize("script", SCRIPTS)
def test_checkpoints_that_cannot_be_used(script, runs, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    ckpt = run / "ckpt.pt"
    refuses(script, ["--out", str(run), "--sample"], ["no checkpoint", str(ckpt)], capsys, run)
    other = "vae" if script != "vae" else "gan"
    ckpt.write_bytes((runs / other / "ckpt.pt").read_bytes())
    refuses(script, ["--out", str(run), "--sample"], [f"written by {other}.py"], capsys, run)
    ckpt.write_bytes((runs / script / "ckpt.pt").read_bytes()[:1000])
    refuses(script, ["--out", str(run), "--sample"], ["not a readable checkpoint"], capsys, run)
    torch.save([1, 2, 3], ckpt)
    refuses(script, ["--out", str(run), "--sample"], ["not a checkpoint of this project"], capsys, run)
    old = torch.load(runs / script / "ckpt.pt", weights_only=True)
    old.pop("format")
    torch.save(old, ckpt)
    refuses(script, ["--out", str(run), "--sample"], ["older", "format 1"], capsys, run)


def test_a_malicious_pickle_is_refused_and_never_run(runs, tmp_path, capsys):
    class Boom:
        def __reduce__(self):
            return (print, ("pwned",))
    run = tmp_path / "run"
    run.mkdir()
    torch.save({"x": Boom()}, run / "ckpt.pt")
    with pytest.raises(SystemExit) as e:
        importlib.import_module("ddpm").main(["--out", str(run), "--sample"])
    captured = capsys.readouterr()
    assert e.value.code == 2 and "not a readable checkpoint" in captured.err and "pwned" not in captured.out


# ----------------------------------------------------------------------------- recipes and curves

@pytest.mark.parametrize("script", SCRIPTS)
def test_each_recipe_sets_real_options_within_their_ranges(script, tmp_path, monkeypatch):
    module = importlib.import_module(script)
    assert set(module.PRESETS) == {"full", "quick"} and module.PRESETS["full"]["options"] == {}  # full: the defaults
    for name, recipe in module.PRESETS.items():
        argv = ["--preset", name, "--out", str(tmp_path / name)]
        cfg = common.parse_args(module.ModelConfig, module.Config, script, argv, module.PRESETS)
        for k, v in recipe["options"].items():
            assert (getattr(cfg.model, k) if hasattr(cfg.model, k) else getattr(cfg, k)) == v, k
    monkeypatch.chdir(tmp_path)  # the bare command's --out is runs/<script>-mnist here, not a run of the user's
    cfg = common.parse_args(module.ModelConfig, module.Config, script, ["--device", "cpu"], module.PRESETS)
    assert cfg.preset == "quick" and cfg.recipe.startswith("recipe quick (no CUDA GPU here")  # the bare command here


@pytest.mark.parametrize("script", SCRIPTS)
def test_plot_redraws_the_curves_of_a_run(script, runs, tmp_path, capsys):
    """--plot draws curves.png again from log.jsonl: a panel for every figure the run logged, three to a row."""
    run = runs / script
    assert (run / "curves.png").exists()  # written with the run's sample grid
    (run / "curves.png").unlink()
    importlib.import_module(script).main(["--out", str(run), "--plot"])
    logged = {k for r in common.read_log(run / "log.jsonl") for k in r} - {"step", "img_per_s", "wall_s"}
    from PIL import Image
    width, height = Image.open(run / "curves.png").size
    assert len(logged) >= 2 and (width, height) == (336 * min(3, len(logged)), 224 * -(-len(logged) // 3))
    (tmp_path / "empty").mkdir()
    refuses(script, ["--out", str(tmp_path / "empty"), "--plot"], ["no log.jsonl with figures in"], capsys, tmp_path / "empty")
