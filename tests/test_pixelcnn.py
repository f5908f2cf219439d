"""Tests of pixelcnn.py: causality of the masks and of the whole networks, the blind spot, normalisation, the chain
rule, learning on toy data, conditioning, the fast sampler against the naive one, and the script's runs and modes.
(Bad input common to the five scripts is tested in test_cli.py; Ctrl-C and resume, a NaN loss and a failing grid in
test_harness.py.)"""
import collections
import itertools
import json
import math

import pytest
import torch

import common
import pixelcnn as P
from conftest import same_weights


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


def net(arch, colors, ch=12, layers=3, conditional=False, seed=0):
    torch.manual_seed(seed)
    return P.build_model(P.ModelConfig(arch=arch, channels=ch, layers=layers, conditional=conditional), (colors, 8, 8))


# ----------------------------------------------------------------------------- masks and causality

@pytest.mark.parametrize("kernel", [1, 3, 5, 7, (1, 3)])
@pytest.mark.parametrize("colors", [1, 3])
@pytest.mark.parametrize("mask_type", ["A", "B"])
def test_masked_conv_is_causal_in_raster_and_channel_order(mask_type, colors, kernel):
    """Every output channel against every input position and channel: d out[o, centre] / d in[c, r, s] is non-zero
    exactly when (r, s) is inside the kernel and before the centre in raster order, or at the centre with an input
    colour before the output's (mask A) or up to it (mask B). Two input and three output channels per colour, so
    the colour groups are tested too."""
    kh, kw = (kernel, kernel) if isinstance(kernel, int) else kernel
    conv = P.MaskedConv2d(2 * colors, 3 * colors, kernel, mask_type, colors)
    with torch.no_grad():
        conv.weight.fill_(1.0)  # all ones, so "not masked" shows up as a non-zero gradient
    h, w = kh + 4, kw + 4  # a border outside the kernel's reach
    i, j = h // 2, w // 2
    x = torch.randn(1, 2 * colors, h, w, requires_grad=True)
    colour_in, colour_out = torch.arange(2 * colors) // 2, torch.arange(3 * colors) // 3
    for o in range(3 * colors):
        grad, = torch.autograd.grad(conv(x)[0, o, i, j], x)
        for c, r, s in itertools.product(range(2 * colors), range(h), range(w)):
            inside = abs(r - i) <= kh // 2 and abs(s - j) <= kw // 2
            at_centre_sees = colour_in[c] < colour_out[o] if mask_type == "A" else colour_in[c] <= colour_out[o]
            seen = inside and ((r, s) < (i, j) or ((r, s) == (i, j) and bool(at_centre_sees)))
            assert (grad[0, c, r, s] != 0) == seen, (o, c, r, s)


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


# ----------------------------------------------------------------------------- the likelihood

@pytest.mark.parametrize("arch,conditional", [("plain", False), ("gated", False), ("gated", True)])
def test_probabilities_of_all_2x2_binary_images_sum_to_one(arch, conditional):
    model = net(arch, 1, conditional=conditional)
    x = torch.tensor(list(itertools.product([0.0, 1.0], repeat=4))).view(16, 1, 2, 2)
    y = torch.full((16,), 3) if conditional else None
    p = torch.exp(-P.nll(model, x, y).double())
    assert p.sum().item() == pytest.approx(1.0, abs=1e-5)


def test_pixel_nll_is_the_chain_rule_sum():
    logits = torch.randn(2, 3, 256, 4, 4)
    x = torch.randint(0, 256, (2, 3, 4, 4))
    want = -torch.log_softmax(logits, 2).gather(2, x[:, :, None]).flatten(1).sum(1)
    assert torch.allclose(P.pixel_nll(logits, x, binary=False), want, atol=1e-4)
    blog = torch.randn(2, 1, 1, 4, 4)
    xb = torch.randint(0, 2, (2, 1, 4, 4)).float()
    p = torch.sigmoid(blog[:, :, 0])
    want_b = -(xb * p.log() + (1 - xb) * (1 - p).log()).flatten(1).sum(1)
    assert torch.allclose(P.pixel_nll(blog, xb, binary=True), want_b, atol=1e-4)


@pytest.mark.parametrize("colors", [1, 3])
def test_the_loss_is_the_mean_nll_and_bits_per_dim_its_share_per_sub_pixel(colors):
    """loss = mean_b -log p(x_b) in nats; for colour, bits_per_dim = nats / (C H W ln 2); figures detached."""
    model = net("gated", colors)
    x = torch.randint(0, 2 if colors == 1 else 256, (3, colors, 5, 4)).float()
    loss, figures = P.loss_fn(model, x)
    assert torch.allclose(loss, P.nll(model, x).mean()) and loss.requires_grad
    assert not figures["nll"].requires_grad and figures["nll"] == loss.detach()
    if colors == 1:
        assert figures.keys() == {"nll"}
    else:
        assert figures["bits_per_dim"].item() == pytest.approx(loss.item() / (3 * 5 * 4 * math.log(2)), rel=1e-6)


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


# ----------------------------------------------------------------------------- learning and sampling

def stripes(n, size, rng, labels=None):
    """Binary stripes of period 2..4 at a random phase 0..3: horizontal for label 0, vertical for label 1."""
    labels = torch.randint(0, 2, (n,), generator=rng) if labels is None else labels
    period = torch.randint(2, 5, (n, 1, 1), generator=rng)
    phase = torch.randint(0, 4, (n, 1, 1), generator=rng)
    k = torch.arange(size)
    horizontal = ((k[None, :, None] + phase) % period < period / 2).expand(n, size, size)
    x = torch.where(labels[:, None, None] == 0, horizontal, horizontal.transpose(1, 2))
    return x.float()[:, None], labels


def stripes_entropy(size):
    """The entropy (nats) of one stripes image: its 2 x 3 x 4 equally likely (label, period, phase) choices,
    counted by the distinct images they make (period 2 at phase 0 and 2 is one image, ...). About 2.8 nats."""
    k = torch.arange(size)
    images = collections.Counter()
    for label, period, phase in itertools.product([0, 1], [2, 3, 4], range(4)):
        h = ((k[:, None] + phase) % period < period / 2).expand(size, size)
        images[(h if label == 0 else h.T).numpy().tobytes()] += 1 / 24
    return -sum(p * math.log(p) for p in images.values())


def fit(model, steps, conditional=False, size=8, lr=1e-2):
    rng = torch.Generator().manual_seed(0)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(steps):
        x, y = stripes(32, size, rng)
        loss, _ = P.loss_fn(model, x, y if conditional else None)
        opt.zero_grad()
        loss.backward()
        opt.step()
    x, y = stripes(256, size, rng)
    return P.mean_nll(model, x, y if conditional else None)


def test_short_run_on_stripes_comes_near_the_entropy_of_the_data():
    """-log 2^-64 = 44.4 nats for the uniform model of an 8x8 binary image; the data hold about 2.8 nats. The test
    NLL (a cross-entropy, so never below the entropy on average) must come within 1.5 nats of it."""
    entropy = stripes_entropy(8)
    assert 2 < entropy < 3
    value = fit(net("plain", 1, ch=24, layers=2), 100)
    assert entropy - 0.3 < value < entropy + 1.5


def test_conditional_samples_follow_the_label():
    """Label 0 means horizontal stripes, label 1 vertical: samples drawn for each label must follow it."""
    model = net("gated", 1, ch=24, layers=2, conditional=True)
    fit(model, 100, conditional=True)
    y = torch.tensor([0] * 8 + [1] * 8)
    x = P.sample(model.eval(), 16, (1, 8, 8), y, torch.Generator().manual_seed(1))[:, 0]
    rows_constant = (x == x[:, :, :1]).flatten(1).float().mean(1)  # horizontal stripes: every row is one value
    cols_constant = (x == x[:, :1, :]).flatten(1).float().mean(1)
    follows = torch.where(y == 0, rows_constant > cols_constant, cols_constant > rows_constant)
    assert follows.float().mean() >= 0.9


@pytest.mark.parametrize("arch,colors,conditional,start_row", [
    ("plain", 1, False, 0), ("gated", 1, True, 0), ("plain", 3, False, 0), ("gated", 3, False, 0),
    ("plain", 1, False, 5), ("gated", 3, True, 0), ("gated", 1, False, 5)])
def test_fast_sampler_gives_exactly_the_naive_samples(arch, colors, conditional, start_row):
    model = net(arch, colors, layers=1, conditional=conditional).eval()
    shape = (2, colors, 7, 4)
    x0 = torch.randint(0, 2 if colors == 1 else 256, shape).float()  # rows < start_row are kept (completion)
    y = torch.tensor([1, 2]) if conditional else None
    sample = lambda fast: P.sample_rows(model, x0, y, torch.Generator().manual_seed(0), start_row, fast)
    naive, fast = sample(False), sample(True)
    assert torch.equal(naive, fast)
    assert torch.equal(fast[:, :, :start_row], x0[:, :, :start_row])


def sampled_with_logits(monkeypatch, model, x0, y, start_row, fast):
    """The images, and every logits tensor the sampler hands to sample_pixel, in order (one per sub-pixel)."""
    seen, draw = [], P.sample_pixel

    def recording(logits, binary, rng):
        seen.append(logits.clone())
        return draw(logits, binary, rng)
    monkeypatch.setattr(P, "sample_pixel", recording)
    x = P.sample_rows(model, x0, y, torch.Generator().manual_seed(0), start_row, fast)
    monkeypatch.setattr(P, "sample_pixel", draw)
    return x, torch.stack(seen)


def three_layer_net_with_big_biases(arch, colors, conditional):
    """Biases of size ~1, not the small defaults: a wrong padding value or a stale cache entry then moves the logits."""
    model = net(arch, colors, layers=3, conditional=conditional).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_()
    return model


@pytest.mark.parametrize("arch", ["plain", "gated"])
@pytest.mark.parametrize("colors", [1, 3])
@pytest.mark.parametrize("conditional,start_row", [(False, 0), (True, 3)])
def test_fast_sampler_draws_from_the_naive_logits(monkeypatch, arch, colors, conditional, start_row):
    """Every sub-pixel's logits, not only the images: a random net's outputs are near p = 1/2 whatever the context,
    so samples from wrong logits often agree by luck. Three layers, so every cache feeds another."""
    model = three_layer_net_with_big_biases(arch, colors, conditional)
    x0 = torch.randint(0, 2 if colors == 1 else 256, (2, colors, 7, 6)).float()
    y = torch.tensor([1, 2]) if conditional else None
    (naive, naive_logits), (fast, fast_logits) = (sampled_with_logits(monkeypatch, model, x0, y, start_row, fast)
                                                  for fast in (False, True))
    assert torch.equal(naive, fast)
    assert fast_logits.shape[:3] == ((7 - start_row) * 6 * colors, 2, 1)  # one B x 1 x levels draw per sub-pixel
    assert torch.allclose(naive_logits, fast_logits, rtol=0, atol=1e-5)  # float rounding only (a few 1e-7 here)


@pytest.mark.parametrize("arch", ["plain", "gated"])
def test_fast_sampler_under_bf16_autocast_matches_the_naive_one(monkeypatch, arch):
    """Sampling inside torch.autocast (the script samples in fp32, but a caller may wrap it): the fast sampler
    computes each layer in the dtype autocast gives the whole-image pass (its fp32 caches hold the bf16 values
    exactly). Measured: identical logits; fp32 layers would move them by 2e-3 on average."""
    model = three_layer_net_with_big_biases(arch, 3, True)
    x0 = torch.zeros(2, 3, 7, 6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        (naive, naive_logits), (fast, fast_logits) = (sampled_with_logits(monkeypatch, model, x0, torch.tensor([1, 2]),
                                                                          0, fast) for fast in (False, True))
    assert torch.equal(naive, fast) and fast.dtype == torch.float32
    assert (naive_logits - fast_logits).abs().mean() < 1e-4  # room for a rare bf16 rounding step, none for fp32 layers


# ----------------------------------------------------------------------------- the script

MODEL = ["--channels", "12", "--layers", "1"]
RUN = ["--max-minutes", "0", "--device", "cpu", "--batch-size", "8", "--eval-n", "16", "--num-samples", "2",
       "--log-every", "1"]


def run(args, data_dir, out):
    return P.main(MODEL + RUN + ["--data-dir", str(data_dir), "--out", str(out)] + args)


def log_steps(out):
    return [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines()]


def test_train_then_sample_eval_complete_with_no_model_flags(small_mnist, tmp_path, capsys):
    out = tmp_path / "run"
    run(["--steps", "3"], small_mnist, out)
    for name in ("config.json", "log.jsonl", "ckpt.pt", "samples_3.png", "eval.json"):
        assert (out / name).exists()
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3]
    assert all(math.isfinite(v) for r in log for v in r.values())
    end_of_run = json.loads((out / "eval.json").read_text())
    assert end_of_run["images"] == 16 and "exact NLL (nats/image)" in capsys.readouterr().out
    (out / "eval.json").unlink()
    only = ["--device", "cpu", "--data-dir", str(small_mnist), "--out", str(out)]  # no model flag
    result = P.main(only + ["--eval"])
    assert result == json.loads((out / "eval.json").read_text())
    assert result["exact NLL (nats/image)"] == pytest.approx(end_of_run["exact NLL (nats/image)"], rel=1e-5)
    assert result["images"] == 16  # --eval-n is a run option: --eval without it takes the whole (16-image) test set
    P.main(only + ["--sample", "--num-samples", "3"])
    x = torch.load(out / "samples.pt")
    assert x.shape == (3, 1, 8, 8) and set(x.unique().tolist()) <= {0.0, 1.0}
    assert (out / "samples.png").exists() and "3 samples in" in capsys.readouterr().out
    P.main(only + ["--complete"])
    assert (out / "completion.png").exists() and "32 completions of 8 test images" in capsys.readouterr().out


def test_the_end_of_run_nll_beats_every_model_that_ignores_context(data_dir, tmp_path):
    """On the fake 28x28 digits the uniform model's 784 ln 2 = 543 nats is no bar: the best model that ignores
    context, each pixel an independent Bernoulli of its mean over the training set, scores the sum of their
    entropies (214 nats). 60 steps of the tiny net must beat it: it has learned to use the pixels before."""
    x = common.load_dataset("mnist", data_dir, "train")[0].double() / 255
    p = x.mean(0).clamp(1e-6, 1 - 1e-6)
    context_free = float(-(p * p.log() + (1 - p) * (1 - p).log()).sum())
    assert 150 < context_free < 0.5 * 784 * math.log(2)
    out = tmp_path / "run"
    run(["--steps", "60", "--lr", "1e-2", "--sample-every", "1000", "--log-every", "20"], data_dir, out)
    assert json.loads((out / "eval.json").read_text())["exact NLL (nats/image)"] < context_free


def test_a_model_flag_that_disagrees_with_the_checkpoint_names_it(small_mnist, tmp_path, capsys):
    out = tmp_path / "run"
    run(["--steps", "1"], small_mnist, out)
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        P.main(["--out", str(out), "--data-dir", str(small_mnist), "--sample", "--channels", "24"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and "--channels 12" in err and "(now 24)" in err


def test_sampling_during_training_leaves_the_training_rng_alone(small_mnist, tmp_path):
    run(["--steps", "4", "--sample-every", "1"], small_mnist, tmp_path / "a")
    run(["--steps", "4", "--sample-every", "1000"], small_mnist, tmp_path / "b")
    assert same_weights(tmp_path / "a" / "ckpt.pt", tmp_path / "b" / "ckpt.pt")
    a, b = (torch.load(tmp_path / run / "ckpt.pt", weights_only=True)["rng"][0] for run in "ab")
    assert torch.equal(a["rng_data"], b["rng_data"]) and torch.equal(a["rng_cpu"], b["rng_cpu"])  # torch's own RNG too


def test_a_failing_end_of_run_nll_costs_no_trained_steps(small_mnist, tmp_path, monkeypatch, capsys):
    """The exact test NLL is run.finish's final(): if it fails, one warning, and the trained steps are kept.
    (A failing sample grid, Ctrl-C and resume, and a NaN loss: tests/test_harness.py, for all five scripts.)"""
    def broken(*a, **k):
        raise RuntimeError("out of memory")
    monkeypatch.setattr(P, "mean_nll", broken)
    out = tmp_path / "run"
    run(["--steps", "3"], small_mnist, out)
    text = capsys.readouterr().out
    assert "warning: the evaluation on test data failed" in text and "done:" in text
    assert torch.load(out / "ckpt.pt", weights_only=True)["step"] == 3 and log_steps(out) == [1, 2, 3]


def test_conditional_gated_sample_with_label(small_mnist, tmp_path):
    out = tmp_path / "cond"
    run(["--steps", "2", "--arch", "gated", "--conditional"], small_mnist, out)
    P.main(["--device", "cpu", "--data-dir", str(small_mnist), "--out", str(out), "--sample", "--label", "3",
            "--num-samples", "2"])
    assert torch.load(out / "samples.pt").shape == (2, 1, 8, 8)


def test_colour_8bit_run_reports_bits_per_dim(tmp_path, capsys):
    from PIL import Image
    folder = tmp_path / "rgb"
    folder.mkdir()
    for i in range(20):  # a folder of 8x8 RGB images: every 10th is the test split
        Image.fromarray(torch.randint(0, 256, (8, 8, 3), dtype=torch.uint8).numpy()).save(folder / f"{i:02d}.png")
    out = tmp_path / "colour"
    run(["--dataset", str(folder), "--steps", "2"], None, out)
    only = ["--device", "cpu", "--out", str(out)]
    result = P.main(only + ["--eval"])
    assert result["bits/dim"] == pytest.approx(result["exact NLL (nats/image)"] / (192 * math.log(2)))
    assert 7 < result["bits/dim"] < 9  # 8 bits/dim is the uniform model; a 2-step model is still near it
    P.main(only + ["--sample", "--num-samples", "2"])
    x = torch.load(out / "samples.pt")
    assert x.shape == (2, 3, 8, 8) and 0 <= x.min() and x.max() <= 1


def test_receptive_field_needs_no_data_and_no_checkpoint(tmp_path, capsys):
    out = tmp_path / "pictures"
    P.main(["--receptive-field", "--layers", "12", "--channels", "48", "--data-dir", str(tmp_path / "none"),
            "--out", str(out)])
    assert sorted(p.name for p in out.iterdir()) == ["receptive_field.png"]
    assert not (tmp_path / "none").exists()
    text = capsys.readouterr().out
    assert "gated: 0 of" in text and "plain: 0 of" not in text
