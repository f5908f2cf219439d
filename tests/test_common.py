"""Tests of the shared infrastructure: the CLI and its checks, data loading and its errors, checkpoints, logs,
Ctrl-C, EMA."""
import dataclasses
import json
import os
import signal

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


@pytest.mark.parametrize("value,valid,ok", [
    (0, "[0, 1)", True), (1, "[0, 1)", False), (0, "(0, inf)", False), (1e9, "(0, inf)", True),
    (float("nan"), "[0, 1]", False), (float("inf"), "[1, inf)", False), (-1, "[-1, 9]", True), (10, "[-1, 9]", False)])
def test_ranges_in_interval_notation(value, valid, ok):
    if ok:
        common.check_range("--x", value, valid)
    else:
        with pytest.raises(common.UsageError, match=r"--x .*must be in"):
            common.check_range("--x", value, valid)


@pytest.mark.parametrize("argv,words", [
    (["--width", "0"], "--width 0: must be in [1, inf)"), (["--rate", "1"], "--rate 1.0: must be in [0, 1)"),
    (["--steps", "-1"], "--steps -1"), (["--batch-size", "abc"], "invalid int value"),
    (["--no-such-flag"], "unrecognized arguments"), (["--sample", "--eval"], "--sample and --eval cannot go together")])
def test_bad_flags_are_one_usage_error(argv, words):
    with pytest.raises(common.UsageError) as e:
        parse(*argv)
    assert words in str(e.value)


def test_the_checkpoint_supplies_the_model_options(tmp_path):
    out = tmp_path / "run"
    cfg = parse("--width", "3", "--out", str(out))
    common.start_run(cfg)
    common.save_checkpoint(out / "ckpt.pt", "toy", cfg, 5, common.rng_state(torch.Generator()), model=nn.Linear(2, 2))
    assert json.loads((out / "config.json").read_text())["model"]["width"] == 3
    assert parse("--out", str(out), "--sample").model.width == 3  # no model flag needed
    assert parse("--out", str(out), "--sample", "--width", "3").model.width == 3  # an agreeing one is fine
    with pytest.raises(common.UsageError, match=r"--width 3 \(now 4\); drop --width"):
        parse("--out", str(out), "--sample", "--width", "4")
    with pytest.raises(common.UsageError, match="already holds a run; pass --resume"):
        parse("--out", str(out))
    with pytest.raises(common.UsageError, match="written by toy.py, not vae.py"):
        common.parse_args(Model, Run, "vae", ["--out", str(out), "--eval"])
    with pytest.raises(common.UsageError, match="no checkpoint at"):
        parse("--out", str(tmp_path / "none"), "--resume")


def test_resume_and_sample_take_the_run_options_of_the_run_and_flags_override_them(tmp_path):
    """A run trained with --lr 0.25 --rate 0.1 resumes with them (README's `--resume --steps N` must not fall back
    to the defaults); a flag given again wins; --out, --device and --compile are never taken from the run."""
    out = tmp_path / "run"
    cfg = parse("--lr", "0.25", "--rate", "0.1", "--device", "cpu", "--compile", "--out", str(out))
    common.start_run(cfg)
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
    common.start_run(preset("--device", "cpu", "--out", str(tmp_path / "r")))
    assert capsys.readouterr().out.splitlines()[0].startswith("recipe quick")


def test_bad_presets_and_devices_are_one_usage_error(tmp_path):
    with pytest.raises(common.UsageError, match="--preset: invalid choice: 'huge'"):
        preset("--preset", "huge")
    if not torch.cuda.is_available():
        with pytest.raises(common.UsageError, match="--device cuda .* use --device cpu"):
            preset("--device", "cuda", "--out", str(tmp_path / "r"))
    assert not (tmp_path / "r").exists()


def test_plot_draws_every_logged_figure_from_log_jsonl(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    lines = [dict(step=s, img_per_s=100.0, loss=1 / s, grad_norm=0.5) for s in range(1, 50)]
    lines[-1]["test_nll"] = 0.3  # a figure logged on some steps only
    (out / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines) + '{"step": 50, "lo')  # a cut line
    path = common.plot_curves(out)
    from PIL import Image
    image = Image.open(path)
    assert path == out / "curves.png" and image.size[0] > 600 and image.size[1] > 150  # three panels in a row
    assert sorted(p.name for p in out.iterdir()) == ["curves.png", "log.jsonl"]  # no temporary file left behind


def test_plot_without_a_log_is_one_usage_error_and_writes_nothing(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(common.UsageError, match="no log.jsonl in"):
        common.plot_curves(tmp_path / "empty")
    assert list((tmp_path / "empty").iterdir()) == []
    (tmp_path / "empty" / "log.jsonl").write_text("")
    with pytest.raises(common.UsageError, match="holds no logged figures"):
        common.plot_curves(tmp_path / "empty")


def test_precision_bf16_only_by_default_on_cuda_and_on_the_cpu_when_asked():
    layer, x, cpu = nn.Linear(4, 4), torch.randn(2, 4), torch.device("cpu")
    for precision, dtype in [("auto", torch.float32), ("fp32", torch.float32), ("bf16", torch.bfloat16)]:
        with common.autocast(cpu, precision):
            assert layer(x).dtype == dtype, precision


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


def test_binary_rule_and_binarizations():
    assert common.is_binary(1) and not common.is_binary(3)
    x = torch.full((1000,), 64, dtype=torch.uint8)
    b = common.binarize(x)
    assert set(b.unique().tolist()) <= {0.0, 1.0} and abs(b.mean().item() - 64 / 255) < 0.05
    assert torch.equal(common.fixed_binarization(x, seed=3), common.fixed_binarization(x, seed=3))
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
    with pytest.raises(common.UsageError, match="the loss became nan at step 8"):
        common.check_finite(7, loss=torch.tensor(float("nan")), grad_norm=1.0)
    common.check_finite(7, loss=torch.tensor(1.0), grad_norm=torch.tensor(2.0))


def test_logger_keeps_one_line_per_step_after_a_resume(tmp_path):
    log = common.Logger(tmp_path, 10)
    for step in (2, 4, 6):
        log.log(step, loss=1.0)
    common.Logger(tmp_path, 10, start_step=4)  # the checkpoint was at step 4; step 6 was logged before a crash
    assert [json.loads(s)["step"] for s in (tmp_path / "log.jsonl").read_text().splitlines()] == [2, 4]


def test_logger_wall_time_adds_up_over_resumes(tmp_path, monkeypatch):
    """wall_s (benchmarks/compare.py's training time) counts each process's seconds once, from the kept lines."""
    clock = iter([100.0, 130.0, 160.0, 500.0, 510.0])  # process 1: starts at 100; process 2: starts at 500
    monkeypatch.setattr(common.time, "time", lambda: next(clock))
    log = common.Logger(tmp_path, 10)
    log.log(2, loss=1.0)  # 30 s in
    log.log(4, loss=1.0)  # 60 s in; the crash comes before a checkpoint at 4, the checkpoint is at 2
    log = common.Logger(tmp_path, 10, start_step=2)
    log.log(3, loss=1.0)  # 10 s more
    assert [r["wall_s"] for r in common.read_log(tmp_path / "log.jsonl")] == [30.0, 40.0]


def test_logger_eta_is_the_sooner_of_the_steps_and_the_time_budget(tmp_path, monkeypatch, capsys):
    """At 1 step/s with 100 steps left the ETA is 1m40s; a 60 s budget (--max-minutes 1) with 10 s gone leaves 50 s."""
    clock = iter([0.0, 10.0, 0.0, 10.0])
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    monkeypatch.setattr(common.time, "time", lambda: next(clock))
    common.Logger(tmp_path / "a", 110).log(10, loss=1.0)
    assert capsys.readouterr().out.rstrip().endswith("ETA 1m40s")
    common.Logger(tmp_path / "b", 110, max_seconds=60.0).log(10, loss=1.0)
    assert capsys.readouterr().out.rstrip().endswith("ETA 0m50s")


def test_ctrl_c_first_asks_then_stops(capsys):
    with common.CtrlC() as ctrl_c:
        os.kill(os.getpid(), signal.SIGINT)
        assert ctrl_c.requested
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
        with pytest.raises(SystemExit) as e:
            ctrl_c.exit_if_requested(5)
    assert e.value.code == 130 and "step 5" in capsys.readouterr().out
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


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
