"""Tests of the shared helpers: CLI parsing, data loading and its errors, checkpoints, EMA."""
import dataclasses

import pytest
import torch
import torch.nn as nn

import common


@dataclasses.dataclass
class Cfg(common.TrainConfig):
    width: int = common.opt(8, "a model knob")
    flag: bool = common.opt(False, "a switch")


def test_cli_accepts_both_forms():
    cfg = common.parse_config(Cfg, ["--batch-size", "7", "--lr=0.5", "--flag", "--width=3"])
    assert (cfg.batch_size, cfg.lr, cfg.flag, cfg.width) == (7, 0.5, True, 3)
    assert common.parse_config(Cfg, []).batch_size == 128


def test_precision_bf16_only_by_default_on_cuda_and_on_the_cpu_when_asked():
    layer, x, cpu = nn.Linear(4, 4), torch.randn(2, 4), torch.device("cpu")
    assert common.parse_config(Cfg, []).precision == "auto"
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


def test_unknown_dataset():
    with pytest.raises(common.UsageError, match="unknown dataset"):
        common.load_dataset("imagenet-42", "./data", "train")


def test_binarizations():
    x = torch.full((1000,), 64, dtype=torch.uint8)
    b = common.binarize(x)
    assert set(b.unique().tolist()) <= {0.0, 1.0} and abs(b.mean().item() - 64 / 255) < 0.05
    assert torch.equal(common.fixed_binarization(x, seed=3), common.fixed_binarization(x, seed=3))


def test_checkpoint_roundtrip_and_refusals(tmp_path):
    cfg = Cfg()
    model = nn.Linear(3, 2)
    gen = torch.Generator().manual_seed(5)
    common.save_checkpoint(tmp_path / "ckpt.pt", "toy", cfg, 42, model=model, gen=gen)
    assert not (tmp_path / "ckpt.pt.tmp").exists()
    other = nn.Linear(3, 2)
    assert common.load_checkpoint(tmp_path / "ckpt.pt", "toy", Cfg(steps=9), model=other, gen=torch.Generator()) == 42
    assert torch.equal(other.weight, model.weight)
    with pytest.raises(common.UsageError, match="written by toy.py, not vae.py"):
        common.load_checkpoint(tmp_path / "ckpt.pt", "vae", cfg, model=other)
    with pytest.raises(common.UsageError, match="--width 8"):
        common.load_checkpoint(tmp_path / "ckpt.pt", "toy", Cfg(width=4), model=other)


def test_start_run_refuses_to_overwrite(tmp_path):
    cfg = Cfg(out=str(tmp_path / "run"))
    out = common.start_run(cfg, "toy")
    (out / "ckpt.pt").write_bytes(b"x")
    with pytest.raises(common.UsageError, match="already holds a run"):
        common.start_run(cfg, "toy")


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


@pytest.mark.parametrize("mask_type", ["A", "B"])
@pytest.mark.parametrize("colors", [1, 3])
def test_masked_conv_is_causal_in_raster_and_channel_order(mask_type, colors):
    """d out[c, i] / d in[c', j] is exactly 0 for every input (j, c') at or after (i, c) in raster-then-colour
    order (mask B allows the same sub-pixel's own feature, c' == c, at j == i)."""
    torch.manual_seed(0)
    conv = common.MaskedConv2d(colors, colors, 5, mask_type, colors=colors)
    with torch.no_grad():
        conv.weight.fill_(1.0)  # all ones, so "not masked" shows up as a non-zero gradient
    h = w = 5
    x = torch.randn(1, colors, h, w, requires_grad=True)
    i, j = 2, 2
    for c in range(colors):
        grad, = torch.autograd.grad(conv(x)[0, c, i, j], x)
        for cc in range(colors):
            for r in range(h):
                for s in range(w):
                    later = (r, s) > (i, j) or ((r, s) == (i, j) and (cc > c if mask_type == "B" else cc >= c))
                    near = abs(r - i) <= 2 and abs(s - j) <= 2
                    assert (grad[0, cc, r, s] == 0) == (later or not near), (c, cc, r, s)


def test_pixel_nll_is_the_chain_rule_sum():
    logits = torch.randn(2, 3, 256, 4, 4)
    x = torch.randint(0, 256, (2, 3, 4, 4))
    want = -torch.log_softmax(logits, 2).gather(2, x[:, :, None]).flatten(1).sum(1)
    assert torch.allclose(common.pixel_nll(logits, x, binary=False), want, atol=1e-4)
    blog = torch.randn(2, 1, 1, 4, 4)
    xb = torch.randint(0, 2, (2, 1, 4, 4)).float()
    p = torch.sigmoid(blog[:, :, 0])
    want_b = -(xb * p.log() + (1 - xb) * (1 - p).log()).flatten(1).sum(1)
    assert torch.allclose(common.pixel_nll(blog, xb, binary=True), want_b, atol=1e-4)
