"""Tests of pixelcnn.py: causality of the masks and of the whole networks, the blind spot, normalisation,
learning on toy data, conditioning, the fast sampler against the naive one, and the script's CLI."""
import itertools
import json

import pytest
import torch

import common
import pixelcnn as P


def dependencies(f, shape, binary):
    """D[i, j] = (d f(x)_i / d x_j != 0) for one random input, sub-pixels in raster-then-channel order.
    f maps a 1 x C x H x W input to 1 x C x K x H x W (K values per sub-pixel, summed)."""
    c, h, w = shape
    x = (torch.rand(1, *shape) * (1 if binary else 255)).requires_grad_()
    out = f(x)
    rows = []
    for r, col, ch in itertools.product(range(h), range(w), range(c)):
        g, = torch.autograd.grad(out[0, ch, :, r, col].sum(), x, retain_graph=True)
        rows.append(g[0].permute(1, 2, 0).flatten() != 0)  # input j in the same (row, column, channel) order
    return torch.stack(rows)


def net(arch, colors, ch=12, layers=3, conditional=False):
    torch.manual_seed(0)
    return (P.PixelCNN if arch == "plain" else P.GatedPixelCNN)(colors, ch, layers, conditional)


@pytest.mark.parametrize("mask", ["A", "B"])
@pytest.mark.parametrize("colors", [1, 3])
def test_masked_conv_alone_is_causal(mask, colors):
    torch.manual_seed(0)
    conv = common.MaskedConv2d(colors, colors, 5, mask, colors)  # output channel k predicts sub-pixel k
    d = dependencies(lambda x: conv(x)[:, :, None], (colors, 5, 5), binary=False)
    assert not d.triu(1).any()  # no output sees a later sub-pixel
    assert d.diagonal().all() if mask == "B" else not d.diagonal().any()  # B sees its own sub-pixel, A never
    assert d.tril(-1).any()


@pytest.mark.parametrize("arch", ["plain", "gated"])
@pytest.mark.parametrize("colors", [1, 3])
@pytest.mark.parametrize("conditional", [False, True])
def test_whole_network_is_causal(arch, colors, conditional):
    """d output_i / d x_j = 0 exactly for every j >= i (raster order, R -> G -> B inside a pixel)."""
    model = net(arch, colors, layers=2, conditional=conditional)
    y = torch.tensor([3]) if conditional else None
    d = dependencies(lambda x: P.logits(model, x, y), (colors, 6, 6), model.binary)
    assert not d.triu().any()


@pytest.mark.parametrize("colors", [1, 3])
def test_gated_sees_every_earlier_pixel_plain_has_a_blind_spot(colors):
    shape = (colors, 6, 6)
    gated = net("gated", colors, ch=48, layers=3)  # wide: no output loses an input to dead ReLUs by chance
    d = dependencies(lambda x: P.logits(gated, x), shape, gated.binary)
    earlier = torch.ones_like(d).tril(-1)  # earlier[i, j]: j comes before i
    assert d[earlier].all()  # every earlier sub-pixel reaches every output
    plain = net("plain", colors, ch=48, layers=3)
    d = dependencies(lambda x: P.logits(plain, x), shape, plain.binary)
    index = lambda r, c: (r * 6 + c) * colors
    for r, c in [(1, 0), (4, 1), (5, 1)]:  # the pixel one row up and four to the right is always missed
        assert not d[index(r, c), index(r - 1, c + 4)]
        assert d[index(r, c), index(r - 1, c + 3)]  # ... while three to the right is seen (the 7x7 stem)


@pytest.mark.parametrize("arch", ["plain", "gated"])
@pytest.mark.parametrize("layers", [1, 3])
def test_rows_above_is_the_receptive_field_height(arch, layers):
    """The fast sampler relies on it: an output in row r sees exactly the input rows r - rows_above .. r."""
    model = net(arch, 1, ch=24, layers=layers)
    g = P.receptive_field(model, (1, 16, 9), (15, 4))[0]
    assert 15 - int(g.sum(1).nonzero().min()) == model.rows_above


@pytest.mark.parametrize("arch,conditional", [("plain", False), ("gated", False), ("gated", True)])
def test_probabilities_of_all_2x2_binary_images_sum_to_one(arch, conditional):
    model = net(arch, 1, conditional=conditional)
    x = torch.tensor(list(itertools.product([0.0, 1.0], repeat=4))).view(16, 1, 2, 2)
    y = torch.full((16,), 3) if conditional else None
    p = torch.exp(-P.nll(model, x, y).double())
    assert p.sum().item() == pytest.approx(1.0, abs=1e-5)


def test_nll_is_the_chain_rule_of_the_sampler_conditionals():
    """-log p(x) from one pass equals -sum_i log p(x_i | x_<i) read off pass i of the sampler (8-bit, colour)."""
    model = net("plain", 3)
    x = torch.randint(0, 256, (2, 3, 3, 3)).float()
    total = torch.zeros(2)
    for r, c, ch in itertools.product(range(3), range(3), range(3)):
        order = torch.arange(27).view(3, 3, 3).permute(2, 0, 1)  # raster-then-channel index of each sub-pixel
        seen = x * (order < (r * 3 + c) * 3 + ch)  # the sampler's input at step i: x_<i, zeros after
        logp = torch.log_softmax(P.logits(model, seen)[:, ch, :, r, c], -1)
        total -= logp.gather(1, x[:, ch, r, c].long()[:, None])[:, 0]
    assert torch.allclose(P.nll(model, x), total, atol=1e-3)


def stripes(n, size, gen, labels=None):
    """Binary stripes of period 2..4 at a random phase: horizontal for label 0, vertical for label 1."""
    labels = torch.randint(0, 2, (n,), generator=gen) if labels is None else labels
    period = torch.randint(2, 5, (n, 1, 1), generator=gen)
    phase = torch.randint(0, 4, (n, 1, 1), generator=gen)
    k = torch.arange(size)
    horizontal = ((k[None, :, None] + phase) % period < period / 2).expand(n, size, size)
    x = torch.where(labels[:, None, None] == 0, horizontal, horizontal.transpose(1, 2))
    return x.float()[:, None], labels


def fit(model, steps, conditional=False, size=8, lr=1e-2):
    gen = torch.Generator().manual_seed(0)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(steps):
        x, y = stripes(32, size, gen)
        loss, _ = P.loss_fn(model, x, y if conditional else None)
        opt.zero_grad()
        loss.backward()
        opt.step()
    x, y = stripes(256, size, gen)
    return P.test_nll(model, x, y if conditional else None)


def test_short_run_on_stripes_beats_the_uniform_model_by_far():
    uniform = 64 * torch.log(torch.tensor(2.0)).item()  # -log 2^-64 for an 8x8 binary image: 44.4 nats
    value = fit(net("plain", 1, ch=24, layers=2), 100)
    assert value < 0.2 * uniform  # the data hold ~4 bits: orientation, period, phase


def test_conditional_samples_follow_the_label():
    """Label 0 means horizontal stripes, label 1 vertical: samples drawn for each label must follow it."""
    model = net("gated", 1, ch=24, layers=2, conditional=True)
    fit(model, 100, conditional=True)
    y = torch.tensor([0] * 8 + [1] * 8)
    x = P.sample(model.eval(), torch.zeros(16, 1, 8, 8), y, generator=torch.Generator().manual_seed(1))[:, 0]
    rows_constant = (x == x[:, :, :1]).flatten(1).float().mean(1)  # horizontal stripes: every row is one value
    cols_constant = (x == x[:, :1, :]).flatten(1).float().mean(1)
    follows = torch.where(y == 0, rows_constant > cols_constant, cols_constant > rows_constant)
    assert follows.float().mean() >= 0.9


@pytest.mark.parametrize("arch,colors,conditional,start_row", [
    ("plain", 1, False, 0), ("gated", 1, True, 0), ("plain", 3, False, 0), ("gated", 3, False, 0), ("plain", 1, False, 5)])
def test_fast_sampler_gives_exactly_the_naive_samples(arch, colors, conditional, start_row):
    model = net(arch, colors, layers=1, conditional=conditional).eval()
    shape = (2, colors, 7, 4)
    x0 = torch.randint(0, 2 if colors == 1 else 256, shape).float()  # rows < start_row are kept (completion)
    y = torch.tensor([1, 2]) if conditional else None
    draw = lambda fast: P.sample(model, x0, y, start_row, fast, torch.Generator().manual_seed(0))
    naive, fast = draw(False), draw(True)
    assert torch.equal(naive, fast)
    assert torch.equal(fast[:, :, :start_row], x0[:, :, :start_row])


# ----------------------------------------------------------------------------- the script

TINY = ["--device", "cpu", "--channels", "12", "--layers", "1", "--batch-size", "8", "--eval-n", "16",
        "--num-samples", "2", "--log-every", "1"]


def run(args, data_dir, out):
    return P.main(TINY + ["--data-dir", str(data_dir), "--out", str(out)] + args)


def test_smoke_train_sample_eval(data_dir, tmp_path, capsys):
    out = tmp_path / "run"
    run(["--steps", "3"], data_dir, out)
    for name in ("config.json", "log.jsonl", "ckpt.pt", "samples_3.png"):
        assert (out / name).exists()
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3]
    assert all(torch.isfinite(torch.tensor(v)) for r in log for v in r.values())
    assert 0 < log[-1]["test_nll"] < 784 * 0.7  # below uniform (784 ln 2 = 543 nats) already: most pixels are 0
    run(["--sample"], data_dir, out)
    x = torch.load(out / "samples.pt")
    assert x.shape == (2, 1, 28, 28) and set(x.unique().tolist()) <= {0.0, 1.0}
    value = run(["--eval"], data_dir, out)
    assert value == pytest.approx(log[-1]["test_nll"], rel=1e-4) and "nats/image" in capsys.readouterr().out


@pytest.fixture(scope="module")
def small_mnist(tmp_path_factory):
    """Fake MNIST of 8x8 digits in the real IDX format (sampling 28x28 images would dominate the test time)."""
    from conftest import fake_digits, write_idx
    root = tmp_path_factory.mktemp("small")
    write_idx(root / "MNIST" / "raw", "train", *fake_digits(64, seed=0, size=8))
    write_idx(root / "MNIST" / "raw", "t10k", *fake_digits(16, seed=1, size=8))
    return root


def test_resume_and_completion(small_mnist, tmp_path, capsys):
    out = tmp_path / "run"
    run(["--steps", "2"], small_mnist, out)
    run(["--steps", "4", "--resume"], small_mnist, out)
    assert [json.loads(r)["step"] for r in (out / "log.jsonl").read_text().splitlines()] == [1, 2, 3, 4]
    run(["--steps", "4", "--complete"], small_mnist, out)
    assert (out / "completion.png").exists() and "completions of 8 test images" in capsys.readouterr().out


def test_conditional_gated_sample_with_label(small_mnist, tmp_path):
    out = tmp_path / "cond"
    run(["--steps", "2", "--arch", "gated", "--conditional"], small_mnist, out)
    run(["--steps", "2", "--arch", "gated", "--conditional", "--sample", "--label", "3"], small_mnist, out)
    assert torch.load(out / "samples.pt").shape == (2, 1, 8, 8)


def test_colour_8bit_run_reports_bits_per_dim(tmp_path, capsys):
    from PIL import Image
    folder = tmp_path / "rgb"
    folder.mkdir()
    for i in range(20):  # a folder of 8x8 RGB images: every 10th is the test split
        Image.fromarray(torch.randint(0, 256, (8, 8, 3), dtype=torch.uint8).numpy()).save(folder / f"{i:02d}.png")
    out, args = tmp_path / "colour", ["--dataset", str(folder), "--steps", "2"]
    run(args, None, out)
    run(args + ["--eval"], None, out)
    assert "bits/dim" in capsys.readouterr().out
    run(args + ["--sample"], None, out)
    x = torch.load(out / "samples.pt")
    assert x.shape == (2, 3, 8, 8) and 0 <= x.min() and x.max() <= 1


def test_receptive_field_picture(tmp_path, capsys):
    run(["--receptive-field", "--layers", "12", "--channels", "48"], None, tmp_path)
    assert (tmp_path / "receptive_field.png").exists()
    text = capsys.readouterr().out
    assert "gated: 0 of" in text and "plain: 0 of" not in text


def exits_2(args, data_dir, out, capsys, words):
    with pytest.raises(SystemExit) as e:
        run(args, data_dir, out)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error:") and err.count("\n") == 1 and words in err


def test_bad_input_exits_2_with_one_line(data_dir, small_mnist, tmp_path, capsys, monkeypatch):
    out = tmp_path / "bad"
    exits_2(["--dataset", "nope"], data_dir, out, capsys, "unknown dataset")
    exits_2(["--resume"], small_mnist, out, capsys, "no checkpoint")
    exits_2(["--dataset", "cifar10", "--channels", "8"], data_dir, out, capsys, "multiple of 6")
    run(["--steps", "1"], small_mnist, out)
    exits_2(["--sample", "--label", "3"], small_mnist, out, capsys, "--conditional")
    exits_2(["--sample", "--channels", "24"], small_mnist, out, capsys, "--channels 12")
    exits_2(["--steps", "1"], small_mnist, out, capsys, "already holds a run")
    other = tmp_path / "other"
    other.mkdir()
    torch.save(dict(script="vae"), other / "ckpt.pt")
    exits_2(["--eval"], small_mnist, other, capsys, "vae.py")
    good = (out / "ckpt.pt").read_bytes()
    monkeypatch.setattr(P, "loss_fn", lambda *a: (torch.tensor(float("nan"), requires_grad=True), {}))
    exits_2(["--steps", "3", "--resume"], small_mnist, out, capsys, "lower --lr")
    assert (out / "ckpt.pt").read_bytes() == good  # the good checkpoint is kept


def test_conditional_needs_labels_and_a_valid_label(small_mnist, tmp_path, capsys):
    from PIL import Image
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(12):
        Image.new("L", (8, 8), i * 20).save(folder / f"{i:02d}.png")
    exits_2(["--dataset", str(folder), "--conditional"], small_mnist, tmp_path / "a", capsys, "class labels")
    out = tmp_path / "b"
    run(["--steps", "1", "--conditional"], small_mnist, out)
    exits_2(["--conditional", "--sample", "--label", "12"], small_mnist, out, capsys, "0..9")
