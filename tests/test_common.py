"""Tests of the shared infrastructure: the CLI and its checks, data loading and its errors, checkpoints, logs,
Ctrl-C, EMA."""
import dataclasses
import json
import os
import signal

import numpy as np
import pytest
import torch
import torch.nn as nn

import common


@dataclasses.dataclass
class Model(common.ModelConfig):
    width: int = common.opt(8, "a model knob", "[1, inf)")


@dataclasses.dataclass
class Run(common.RunConfig):
    rate: float = common.opt(0.5, "a run knob in [0, 1)", "[0, 1)")


def parse(*argv):
    return common.parse_args(Model, Run, "toy", list(argv))


def test_cli_accepts_both_forms_and_splits_model_from_run_options(tmp_path):
    cfg = parse("--batch-size", "7", "--lr=0.5", "--compile", "--width=3", "--out", str(tmp_path / "a"))
    assert (cfg.batch_size, cfg.lr, cfg.compile, cfg.model.width) == (7, 0.5, True, 3)
    assert not hasattr(cfg, "width") and not hasattr(cfg.model, "lr")
    assert parse().batch_size == 128 and parse().out == "runs/toy-mnist"


@pytest.mark.parametrize("flag,value,ok", [
    ("--rate", "0", True), ("--rate", "1", False), ("--rate", "0.999", True), ("--lr", "0", False),
    ("--lr", "1e9", True), ("--rate", "nan", False), ("--lr", "inf", False), ("--width", "1", True),
    ("--label", "-1", True), ("--label", "10", False), ("--seed", "-1", False)])
def test_ranges_in_interval_notation(flag, value, ok):
    """[0, 1) holds 0 but not 1, (0, inf) not 0, [-1, 9] both ends; nan and inf are in no range."""
    if ok:
        parse(flag, value)
    else:
        with pytest.raises(common.UsageError, match=rf"{flag} .*must be in"):
            parse(flag, value)


@pytest.mark.parametrize("argv,words", [
    (["--width", "0"], "--width 0: must be in [1, inf)"), (["--rate", "1"], "--rate 1.0: must be in [0, 1)"),
    (["--steps", "-1"], "--steps -1"), (["--batch-size", "abc"], "invalid int value"),
    (["--no-such-flag"], "unrecognized arguments"), (["--sample", "--eval"], "--sample and --eval cannot go together"),
    (["--ckpt", "2"], "unrecognized arguments: --ckpt 2 (did you mean --ckpt-every?)"),  # never guessed from a prefix
    (["--batch=4"], "unrecognized arguments: --batch=4 (did you mean --batch-size?)")])
def test_bad_flags_are_one_usage_error(argv, words):
    with pytest.raises(common.UsageError) as e:
        parse(*argv)
    assert words in str(e.value)


def test_the_checkpoint_supplies_the_model_options(tmp_path):
    out = tmp_path / "run"
    cfg = parse("--width", "3", "--out", str(out), "--device", "cpu")
    common.Run(cfg, "toy").start(dict(model=nn.Linear(2, 2)))  # --out and config.json
    common.save_checkpoint(out / "ckpt.pt", "toy", cfg, 5, common.rng_state(torch.Generator()), model=nn.Linear(2, 2))
    assert json.loads((out / "config.json").read_text())["model"]["width"] == 3
    assert parse("--out", str(out), "--sample").model.width == 3  # no model flag needed
    assert parse("--out", str(out), "--sample", "--width", "3").model.width == 3  # an agreeing one is fine
    with pytest.raises(common.UsageError, match=r"--width 3 \(now 4\); drop --width"):
        parse("--out", str(out), "--sample", "--width", "4")
    with pytest.raises(common.UsageError, match="already holds a run; pass --resume"):  # looked for under the lock
        common.Run(parse("--out", str(out), "--device", "cpu"), "toy").start(dict(model=nn.Linear(2, 2)))
    with pytest.raises(common.UsageError, match="written by toy.py, not vae.py"):
        common.parse_args(Model, Run, "vae", ["--out", str(out), "--eval"])
    with pytest.raises(common.UsageError, match="no checkpoint at"):
        parse("--out", str(tmp_path / "none"), "--resume")


def test_resume_and_sample_take_the_run_options_of_the_run_and_flags_override_them(tmp_path):
    """A run trained with --lr 0.25 --rate 0.1 resumes with them (README's `--resume --steps N` must not fall back
    to the defaults); a flag given again wins; --out, --device and --compile are never taken from the run."""
    out = tmp_path / "run"
    cfg = parse("--lr", "0.25", "--rate", "0.1", "--device", "cpu", "--compile", "--out", str(out))
    out.mkdir()
    common.save_checkpoint(out / "ckpt.pt", "toy", cfg, 5, common.rng_state(torch.Generator()), model=nn.Linear(2, 2))
    resumed = parse("--out", str(out), "--resume", "--steps", "9")
    assert (resumed.lr, resumed.rate, resumed.steps, resumed.resume) == (0.25, 0.1, 9, True)
    assert (resumed.device, resumed.compile) == ("auto", False)
    assert parse("--out", str(out), "--sample", "--lr", "0.5").lr == 0.5


PRESETS = {"full": dict(about="big", options={}),
           "quick": dict(about="small, 2 minutes", options=dict(width=2, steps=30, rate=0.25))}


def preset(*argv):
    return common.parse_args(Model, Run, "toy", list(argv), PRESETS)


def test_the_recipe_follows_the_device_and_a_flag_overrides_it(monkeypatch):
    cpu = preset("--device", "cpu")
    assert (cpu.model.width, cpu.steps, cpu.rate, cpu.preset) == (2, 30, 0.25, "quick")  # the table, model and run options
    assert cpu.recipe.startswith("recipe quick (no CUDA GPU here, device cpu): small, 2 minutes. --preset full")
    mixed = preset("--device", "cpu", "--width", "5", "--steps", "7")
    assert (mixed.model.width, mixed.steps, mixed.rate) == (5, 7, 0.25)  # the flags given win, the rest is the table's
    full = preset("--device", "cpu", "--preset", "full")
    assert (full.model.width, full.steps, full.rate, full.preset) == (8, 10000, 0.5, "full")  # the dataclass defaults
    monkeypatch.setattr(common, "get_device", lambda name: torch.device("cuda"))  # as if a CUDA GPU were here
    gpu = preset()
    assert (gpu.model.width, gpu.steps, gpu.preset) == (8, 10000, "full") and "a CUDA GPU is here" in gpu.recipe
    assert preset("--preset", "quick").model.width == 2  # asked for by name, on any device


def test_the_first_line_of_a_run_names_the_recipe(tmp_path, capsys):
    common.Run(preset("--device", "cpu", "--out", str(tmp_path / "r")), "toy").start(dict(model=nn.Linear(1, 1)))
    assert capsys.readouterr().out.splitlines()[0].startswith("recipe quick")


def test_bad_presets_and_devices_are_one_usage_error(tmp_path):
    with pytest.raises(common.UsageError, match="--preset: invalid choice: 'huge'"):
        preset("--preset", "huge")
    if not torch.cuda.is_available():
        with pytest.raises(common.UsageError, match="--device cuda .* use --device cpu"):
            preset("--device", "cuda", "--out", str(tmp_path / "r"))
    assert not (tmp_path / "r").exists()


def test_plot_draws_every_logged_figure_from_log_jsonl(tmp_path):
    """A panel per figure, three to a row, in the order the figures first appear; a figure logged on some steps only
    has those points; a non-finite value and a line cut short by a crash are left out."""
    out = tmp_path / "run"
    out.mkdir()
    lines = [dict(step=s, img_per_s=100.0, wall_s=s, loss=1 / s, grad_norm=0.5) for s in range(1, 50)]
    lines[9]["loss"] = float("inf")  # json writes Infinity
    lines[-1]["test_nll"] = 0.3  # a figure of the grid steps only
    lines[-2]["bits_per_dim"] = 2.0
    (out / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines) + '{"step": 50, "lo')
    panels = common.plot_curves(out)
    assert list(panels) == ["loss", "grad_norm", "bits_per_dim", "test_nll"]
    assert panels["test_nll"] == [(49, 0.3)] and len(panels["loss"]) == 48 and (10, float("inf")) not in panels["loss"]
    assert panels["loss"][:2] == [(1, 1.0), (2, 0.5)]
    from PIL import Image
    image = np.asarray(Image.open(out / "curves.png").convert("L"))
    assert image.shape == (2 * 224, 3 * 336)  # 4 panels: two rows of 4.2 x 2.8 inches at 80 dpi
    drawn = image < 128  # the lines and the text
    assert drawn[:224, :336].mean() > 0.01 and drawn[224:, :336].mean() > 0.01  # the first and the fourth panel
    assert drawn[224:, 336 + 20:].mean() < 0.001  # the fifth and sixth cells stay empty
    assert sorted(p.name for p in out.iterdir()) == ["curves.png", "log.jsonl"]  # no temporary file left behind


def test_plot_without_a_log_is_one_usage_error_and_writes_nothing(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(common.UsageError, match="no log.jsonl with figures in"):
        common.plot_curves(tmp_path / "empty")
    assert list((tmp_path / "empty").iterdir()) == []
    (tmp_path / "empty" / "log.jsonl").write_text("")
    with pytest.raises(common.UsageError, match="no log.jsonl with figures in"):
        common.plot_curves(tmp_path / "empty")


@pytest.mark.parametrize("units", [(), ("amx_tile",), ("avx512_bf16",), ("amx_tile", "avx512_bf16")])
def test_precision_auto_is_bf16_on_a_cpu_with_bf16_units_and_fp32_without(units, monkeypatch):
    """--precision auto on a CPU: bf16 autocast where torch.cpu finds AMX or AVX512-BF16, fp32 without (or where
    torch.cpu's private checks are absent); fp32 and bf16 as asked on any CPU."""
    layer, x, cpu = nn.Linear(4, 4), torch.randn(2, 4), torch.device("cpu")
    for kind in ("amx_tile", "avx512_bf16"):
        monkeypatch.setattr(torch.cpu, f"_is_{kind}_supported", lambda kind=kind: kind in units, raising=False)
    auto = torch.bfloat16 if units else torch.float32
    for precision, dtype in [("auto", auto), ("fp32", torch.float32), ("bf16", torch.bfloat16)]:
        with common.autocast(cpu, precision):
            assert layer(x).dtype == dtype, precision
    monkeypatch.delattr(torch.cpu, "_is_amx_tile_supported")
    monkeypatch.delattr(torch.cpu, "_is_avx512_bf16_supported")
    with common.autocast(cpu, "auto"):
        assert layer(x).dtype == torch.float32


def test_mnist_loads_as_one_uint8_tensor(data_dir):
    x, y = common.load_dataset("mnist", data_dir, "train")
    assert x.dtype == torch.uint8 and x.shape == (256, 1, 28, 28) and y.shape == (256,)
    xt, _ = common.load_dataset("mnist", data_dir, "test")
    assert xt.shape == (64, 1, 28, 28)


def test_cifar10_loads(data_dir):
    x, y = common.load_dataset("cifar10", data_dir, "train")
    assert x.shape == (65, 3, 32, 32) and x.dtype == torch.uint8 and len(y) == 65


def test_folder_loads_and_splits(tmp_path):
    from PIL import Image
    for i in range(20):
        Image.new("RGB", (16, 16), (i * 10, 0, 0)).save(tmp_path / f"{i:02d}.png")
    x, y = common.load_dataset(str(tmp_path), None, "train")
    xt, _ = common.load_dataset(str(tmp_path), None, "test")
    assert x.shape == (18, 3, 16, 16) and xt.shape == (2, 3, 16, 16) and y is None


def test_missing_mnist_says_where_to_put_it_and_leaves_nothing(tmp_path):
    with pytest.raises(common.UsageError, match="MNIST/raw"):
        common.load_dataset("mnist", tmp_path / "nowhere", "train")
    assert not (tmp_path / "nowhere").exists()


def test_binarizations():
    """Bernoulli(intensity / 255): the training draw follows its generator (a resumed run redoes it), the test set's
    is one fixed draw, the same on every call."""
    x = torch.full((4000,), 64, dtype=torch.uint8)
    b = common.binarize(x, torch.Generator().manual_seed(1))
    assert set(b.unique().tolist()) == {0.0, 1.0} and abs(b.mean().item() - 64 / 255) < 0.03
    assert torch.equal(b, common.binarize(x, torch.Generator().manual_seed(1)))
    assert not torch.equal(b, common.binarize(x, torch.Generator().manual_seed(2)))
    fixed = common.binarize(x)  # no generator: the test set's one draw
    assert torch.equal(fixed, common.binarize(x)) and torch.equal(common.binarize(x[:10]), fixed[:10])
    assert common.uint8_to_signed(torch.tensor([0, 255], dtype=torch.uint8)).tolist() == [-1, 1]
    assert common.signed_to_unit(torch.tensor([-1.0, 1.0])).tolist() == [0, 1]


def test_checkpoint_roundtrip_restores_weights_and_rngs(tmp_path):
    cfg = parse("--out", str(tmp_path))
    model, data_rng = nn.Linear(3, 2), torch.Generator().manual_seed(5)
    torch.manual_seed(1)
    rng = common.rng_state(data_rng)
    want = torch.rand(3), torch.rand(3, generator=data_rng)
    common.save_checkpoint(tmp_path / "ckpt.pt", "toy", cfg, 42, rng, model=model)
    assert not (tmp_path / "ckpt.pt.tmp").exists()
    other, other_rng = nn.Linear(3, 2), torch.Generator()
    assert common.load_checkpoint(tmp_path / "ckpt.pt", "toy", other_rng, model=other) == 42
    assert torch.equal(other.weight, model.weight)
    assert torch.equal(torch.rand(3), want[0]) and torch.equal(torch.rand(3, generator=other_rng), want[1])


def test_non_finite_weights_are_never_saved(tmp_path):
    cfg, model = parse("--out", str(tmp_path)), nn.Linear(3, 2)
    with torch.no_grad():
        model.weight[0, 0] = float("nan")
    with pytest.raises(common.UsageError, match="non-finite weights at step 3"):
        common.save_checkpoint(tmp_path / "ckpt.pt", "toy", cfg, 3, common.rng_state(torch.Generator()), model=model)
    assert not (tmp_path / "ckpt.pt").exists()


def test_ctrl_c_first_asks_then_stops(tmp_path, capsys):
    """The first Ctrl-C lets the step finish and ends the loop; a second one inside the step quits at once; the
    finished step is saved and the run exits 130; Python's own handler is back."""
    run = common.Run(parse("--out", str(tmp_path / "r"), "--device", "cpu", "--steps", "5"), "toy")
    run.start(dict(model=nn.Linear(1, 1)))
    for step in run:
        os.kill(os.getpid(), signal.SIGINT)
        assert run.interrupted
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
        run.log({})
    assert run.step == 1 and signal.getsignal(signal.SIGINT) is signal.default_int_handler
    with pytest.raises(SystemExit) as e:
        run.finish()
    assert e.value.code == 130 and "checkpoint saved at step 1" in capsys.readouterr().out
    assert torch.load(tmp_path / "r" / "ckpt.pt", weights_only=True)["step"] == 1


def test_report_prints_and_writes_eval_json(tmp_path, capsys):
    result = common.report(tmp_path, "the title", {"nll": 80.5}, n=10)
    assert result == {"n": 10, "nll": 80.5} and json.loads((tmp_path / "eval.json").read_text()) == result
    assert "80.5000" in capsys.readouterr().out


def test_run_safely_reports_and_goes_on(capsys):
    def boom():
        raise RuntimeError("no memory\nsecond line")
    assert common.run_safely("the grid", boom) is None
    assert "warning: the grid failed (RuntimeError: no memory)" in capsys.readouterr().out


def test_ema_tracks_the_average():
    model = nn.Linear(1, 1, bias=False)
    ema = common.make_ema(model)
    with torch.no_grad():
        model.weight.fill_(1.0)
        ema.weight.fill_(0.0)
    common.ema_update(ema, model, decay=0.9, step=10**6)
    assert ema.weight.item() == pytest.approx(0.1)
    common.ema_update(ema, model, decay=0.9, step=0)  # warm-up: d = 1/10
    assert ema.weight.item() == pytest.approx(0.1 * 0.1 + 0.9)


def test_entry_turns_usage_error_into_exit_2(capsys):
    @common.entry
    def main(argv=None):
        raise common.UsageError("do this instead")
    with pytest.raises(SystemExit) as e:
        main([])
    assert e.value.code == 2 and capsys.readouterr().err.strip() == "error: do this instead"
