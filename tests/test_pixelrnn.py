"""Tests of pixelrnn.py: skew, causality of every layer and of the whole network (grey and colour, with and without
a class), the receptive fields the paper describes, normalization on tiny images, the samplers, a short toy run,
class-conditional samples, the CLI, and the copies of MaskedConv2d and the pixel helpers in pixelcnn.py and
pixelrnn.py, equal in behaviour. Ctrl-C and resume, divergence and failing pictures: tests/test_harness.py."""
import itertools
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

import pixelcnn
import pixelrnn as P


def raster(t):
    """1 x C x H x W -> a vector in raster order, colour fastest: the order of the chain rule."""
    return t[0].permute(1, 2, 0).reshape(-1)


def below(J, diagonal):
    """The entries of J on and below the given diagonal (0: j <= i, -1: j < i)."""
    return torch.tril(torch.ones_like(J, dtype=torch.bool), diagonal)


def jacobian(f, x):
    """J[i, j] = d f(x)_i / d x_j, both in raster order (f maps 1 x C x H x W to 1 x C x H x W)."""
    x = x.clone().requires_grad_(True)
    y = raster(f(x))
    return torch.stack([raster(torch.autograd.grad(y[i], x, retain_graph=True)[0]) for i in range(len(y))])


def network_jacobian(model, colors, H, W, seed=0, y=None):
    torch.manual_seed(seed)
    model = model.double()
    levels = torch.randn(model.output[-1].out_channels // colors, dtype=torch.float64)  # mix a pixel's logits
    return jacobian(lambda x: (model(x, y) * levels[:, None, None]).sum(2),
                    torch.rand(1, colors, H, W, dtype=torch.float64))


def layer_jacobian(layer, colors, ch_in, h, H, W):
    """A layer's Jacobian between colour groups: the input is each colour's value lifted to its ch_in/colors
    features, the output each colour's h/colors features mixed at random."""
    torch.manual_seed(1)
    layer = layer.double()
    lift = torch.randn(ch_in, dtype=torch.float64)[None, :, None, None]
    mix = torch.randn(h, dtype=torch.float64)[None, :, None, None]
    f = lambda x: (layer(x.repeat_interleave(ch_in // colors, 1) * lift) * mix).view(1, colors, -1, H, W).sum(2)
    return jacobian(f, torch.rand(1, colors, H, W, dtype=torch.float64))


def row_lstm_field(field_in, H, W):
    """The Row LSTM's receptive field from its input's: S(r, c) = in(r, c) | in(r, c-1) | S(r-1, c-1..c+1)
    (K^is sees the pixel and its left neighbour, K^ss three states of the row above). Fields are H x W x ...
    boolean tensors: field[r, c] = the set of image pixels position (r, c) depends on."""
    S = torch.zeros_like(field_in)
    for r, c in itertools.product(range(H), range(W)):
        S[r, c] = field_in[r, c] | (field_in[r, c - 1] if c else False)
        if r:
            S[r, c] |= S[r - 1, max(c - 1, 0):c + 2].any(0)
    return S


# ----------------------------------------------------------------------------- skew

def test_skew_shifts_row_r_right_by_r_and_unskew_inverts_it():
    x = torch.randn(2, 3, 4, 6)
    s = P.skew(x)
    assert s.shape == (2, 3, 4, 9)
    for r in range(4):
        assert torch.equal(s[:, :, r, r:r + 6], x[:, :, r])
        assert s[:, :, r, :r].abs().sum() == 0 and s[:, :, r, r + 6:].abs().sum() == 0  # zeros around it
    assert torch.equal(P.unskew(s, 6), x)
    assert torch.equal(P.unskew(P.skew(x.transpose(2, 3)), 4), x.transpose(2, 3))  # H > W too


# ----------------------------------------------------------------------------- causality and receptive fields

@pytest.mark.parametrize("colors", [1, 3])
@pytest.mark.parametrize("arch", ["row", "diag"])
def test_layer_is_mask_b_causal(arch, colors):
    """One recurrent layer maps features to features like a mask-B convolution: the output of colour X at
    pixel i depends on no later pixel and, at pixel i, on no colour after X (strict upper triangle zero)."""
    h, H, W = 6, 4, 5
    layer = P.RowLSTM(2 * h, h, colors) if arch == "row" else P.DiagonalBiLSTM(2 * h, h, colors)
    J = layer_jacobian(layer, colors, 2 * h, h, H, W)
    assert torch.triu(J, 1).abs().max() == 0
    if arch == "diag":  # a Diagonal BiLSTM layer sees its whole causal context, itself included
        assert (J[below(J, 0)] != 0).all()
    elif colors == 1:  # a Row LSTM layer sees exactly the triangle above the pixel
        eye = torch.eye(H * W, dtype=torch.bool).view(H, W, H * W)
        assert torch.equal(J != 0, row_lstm_field(eye, H, W).view(H * W, H * W))


@pytest.mark.parametrize("conditional", [False, True])
@pytest.mark.parametrize("colors", [1, 3])
@pytest.mark.parametrize("arch", ["row", "diag"])
def test_network_is_causal(arch, colors, conditional):
    """p(x_i | x_<i) (or p(x_i | x_<i, y)): the logits of sub-pixel i have an exactly zero gradient w.r.t. every
    input j >= i. The class bias is the same at every position, so it cannot carry a pixel forward."""
    model = P.PixelRNN(arch, colors, colors == 1, 6, 2, 48, conditional)
    J = network_jacobian(model, colors, 4, 5, y=torch.tensor([3]) if conditional else None)
    assert torch.triu(J).abs().max() == 0


@pytest.mark.parametrize("colors", [1, 3])
def test_diagonal_bilstm_network_reaches_every_earlier_pixel(colors):
    # wide enough that no pixel's few same-colour features are all cut by the ReLUs at this initialization
    J = network_jacobian(P.PixelRNN("diag", colors, colors == 1, 12, 1, 48), colors, 4, 7)
    assert (J[below(J, -1)] != 0).all()


def test_row_lstm_network_sees_the_triangle_and_misses_the_rest():
    """Predict the whole Row LSTM network's field from its parts (the 7x7 mask-A window on the right-padded
    map, then per block: field |= Row LSTM field) and compare with the gradient's nonzero pattern."""
    H, W, L = 6, 9, 1
    J = network_jacobian(P.PixelRNN("row", 1, True, 6, L, 48), 1, H, W)
    Wp = W + 3  # the network pads 3 columns on the right
    field = torch.zeros(H, Wp, H, W, dtype=torch.bool)
    for r, c, dr, dc in itertools.product(range(H), range(Wp), range(-3, 1), range(-3, 4)):
        if (dr < 0 or dc < 0) and 0 <= r + dr < H and 0 <= c + dc < W:  # mask A: rows above, or left in the row
            field[r, c, r + dr, c + dc] = True
    for _ in range(L):
        field = field | row_lstm_field(field, H, Wp)
    predicted = field[:, :W].reshape(H * W, H * W)
    assert torch.equal(J != 0, predicted)
    missed = torch.tril(~predicted, -1).view(H, W, H, W)
    assert missed[H - 1, 0, H - 2, W - 1]  # the far right of the row above
    assert missed[H - 1, W - 1, H - 1, 0]  # the far left of its own row
    assert not missed[H - 1, W // 2, H - 2, W // 2 + 1]  # inside the triangle


def test_cropped_rows_give_the_same_logits():
    """The sampler runs the network on rows 0..r only; causality says the logits of those rows do not change."""
    for arch in ("row", "diag"):
        torch.manual_seed(0)
        model = P.PixelRNN(arch, 3, False, 6, 2, 12).double()
        x = torch.rand(2, 3, 5, 6, dtype=torch.float64)
        assert torch.allclose(model(x)[..., :3, :], model(x[:, :, :3]), atol=1e-12)


# ----------------------------------------------------------------------------- the likelihood

@pytest.mark.parametrize("arch", ["row", "diag"])
def test_probabilities_of_all_2x2_binary_images_sum_to_one(arch):
    torch.manual_seed(0)
    model = P.PixelRNN(arch, 1, True, 4, 2, 8).double()
    images = torch.tensor(list(itertools.product([0.0, 1.0], repeat=4)), dtype=torch.float64).view(16, 1, 2, 2)
    p = torch.exp(-P.nll(model, images))  # pixel_nll casts the targets to the logits' float64: double precise
    assert abs(p.sum().item() - 1) < 1e-12 and len(set(p.tolist())) > 8  # normalized, and not uniform


def test_probabilities_of_all_1x2_8bit_images_sum_to_one():
    torch.manual_seed(0)
    model = P.PixelRNN("diag", 1, False, 4, 1, 8).double()
    a, b = torch.meshgrid(torch.arange(256), torch.arange(256), indexing="ij")
    images = torch.stack([a, b], -1).view(-1, 1, 1, 2).to(torch.uint8)
    log_p = torch.cat([-P.nll(model, images[i:i + 8192]) for i in range(0, len(images), 8192)])
    assert abs(torch.logsumexp(log_p, 0).item()) < 1e-9


# ----------------------------------------------------------------------------- the CLI

TINY = ["--max-minutes", "0", "--hidden", "3", "--layers", "1", "--head", "6", "--batch-size", "8", "--log-every", "1",
        "--ckpt-every", "2", "--num-samples", "2", "--device", "cpu"]


def read_log(out):
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def read_eval(out):
    return json.loads((out / "eval.json").read_text())


def test_smoke_resume_eval_on_binarized_mnist(data_dir, tmp_path):
    """28x28 sampling costs 784 network passes, too slow for a test: no grids here (the colour test samples)."""
    out = tmp_path / "run"
    args = ["--data-dir", str(data_dir), "--out", str(out), "--arch", "row", "--sample-every", "1000", *TINY]
    P.main(args + ["--steps", "2"])
    for name in ("config.json", "log.jsonl", "ckpt.pt", "eval.json"):
        assert (out / name).exists()
    P.main(args + ["--steps", "4", "--resume"])
    result = P.main(["--data-dir", str(data_dir), "--out", str(out), "--eval"])  # no model flag: the checkpoint's
    assert [e["step"] for e in read_log(out)] == [1, 2, 3, 4]
    assert all(math.isfinite(e["nll_nats"]) and e["bits_per_dim"] == pytest.approx(e["nll_nats"] / (784 * math.log(2)))
               for e in read_log(out))
    assert result == read_eval(out) and result["images"] == 64 and math.isfinite(result["exact NLL (nats/image)"])
    nats, bits = result["exact NLL (nats/image)"], result["exact NLL (bits/dim)"]
    assert bits == pytest.approx(nats / (784 * math.log(2)))


def test_colour_folder_trains_samples_and_completes(tmp_path):
    """8-bit colour data (a folder of 4x4 RGB images): 256-way softmax, bits/dim, Diagonal BiLSTM."""
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(40):
        Image.new("RGB", (4, 4), (i * 6, 255 - i * 6, 7 * i)).save(folder / f"{i:02d}.png")
    out = tmp_path / "run"
    P.main(["--dataset", str(folder), "--out", str(out), "--sample-every", "1000", *TINY, "--steps", "2"])
    assert (out / "samples_2.png").exists() and read_eval(out)["exact NLL (bits/dim)"] > 0
    P.main(["--out", str(out), "--sample", "--num-samples", "2"])
    s = torch.load(out / "samples.pt")
    assert s.shape == (2, 3, 4, 4) and torch.equal(s * 255, (s * 255).round()) and 0 <= s.min() and s.max() <= 1
    P.main(["--out", str(out), "--complete"])
    grid = torch.load(out / "completion.pt")  # 4 test images: originals, occluded, 3 x 4 completions
    assert grid.shape == (20, 3, 4, 4) and (out / "completion.png").exists()
    assert torch.equal(grid[8:, :, :2], grid[:4, :, :2].repeat(3, 1, 1, 1))  # the top half is kept


def test_a_grey_folder_is_binarized_like_mnist(tmp_path):
    """The one rule for binarized data: 1-channel images get a Bernoulli output, whatever the dataset is called."""
    folder = tmp_path / "grey"
    folder.mkdir()
    for i in range(20):
        Image.new("L", (4, 4), i * 12).save(folder / f"{i:02d}.png")
    P.main(["--dataset", str(folder), "--out", str(tmp_path / "run"), "--sample-every", "1000", *TINY, "--steps", "1"])
    state = torch.load(tmp_path / "run" / "ckpt.pt", weights_only=True)["model"]
    assert state["output.3.weight"].shape[0] == 1  # one logit per pixel, not 256


# ----------------------------------------------------------------------------- the copies shared with pixelcnn.py

def twin_convs(kernel, mask, colors, seed=0):
    """The same MaskedConv2d from each script, with the same (random) weight and bias; each keeps its own mask."""
    torch.manual_seed(seed)
    ours = P.MaskedConv2d(2 * colors, 3 * colors, kernel, mask, colors).double()
    theirs = pixelcnn.MaskedConv2d(2 * colors, 3 * colors, kernel, mask, colors).double()
    with torch.no_grad():
        theirs.weight.copy_(ours.weight)
        theirs.bias.copy_(ours.bias)
    return ours, theirs


@pytest.mark.parametrize("kernel", [1, 3, 5, 7, (1, 3), (3, 1)])
@pytest.mark.parametrize("mask", ["A", "B"])
@pytest.mark.parametrize("colors", [1, 3])
def test_the_masked_convolutions_of_both_scripts_compute_the_same(kernel, mask, colors):
    """pixelrnn.py keeps its own copy of MaskedConv2d, so that it stands alone: the same masks, and with the same
    weights the same outputs on the same input, at every position (and conv_at's, at a few)."""
    ours, theirs = twin_convs(kernel, mask, colors)
    assert torch.equal(ours.mask, theirs.mask)
    x = torch.randn(2, 2 * colors, 6, 5, dtype=torch.float64)
    assert torch.equal(ours(x), theirs(x)) and ours(x).shape == (2, 3 * colors, 6, 5)
    cache = torch.nn.functional.pad(x, (P.PAD,) * 4)  # the carried and cached samplers' input caches
    assert P.PAD == pixelcnn.PAD == 3
    for r, c in [(0, 0), (2, 3), (5, 4), (5, 0)]:
        at = P.conv_at(ours, cache, r, c)
        assert torch.equal(at, pixelcnn.conv_at(theirs, cache, r, c))
        assert torch.allclose(at[:, :, 0, 0], ours(x)[:, :, r, c], atol=1e-12)  # the whole map's value there


@pytest.mark.parametrize("binary", [True, False])
@pytest.mark.parametrize("colors", [1, 3])
def test_the_pixel_helpers_of_both_scripts_compute_the_same(binary, colors):
    """pixel_levels, pixel_logits, pixel_nll, sample_pixel (the same values from the same seeded generator),
    scale_input and levels_to_unit of the two scripts, on the same inputs."""
    torch.manual_seed(colors)
    levels = P.pixel_levels(binary)
    assert levels == pixelcnn.pixel_levels(binary) == (1 if binary else 256)
    out = 3 * torch.randn(4, colors * levels, 3, 5)  # a network's output
    logits = P.pixel_logits(out, colors, binary)
    assert torch.equal(logits, pixelcnn.pixel_logits(out, colors, binary)) and logits.shape == (4, colors, levels, 3, 5)
    x = (torch.rand(4, colors, 3, 5) < 0.5).float() if binary else torch.randint(0, 256, (4, colors, 3, 5))
    nll = P.pixel_nll(logits, x, binary)
    assert torch.equal(nll, pixelcnn.pixel_nll(logits, x, binary)) and nll.shape == (4,)
    if binary:  # -log sigmoid(+-logit), summed over the sub-pixels: the Bernoulli NLL written out
        expected = -torch.nn.functional.logsigmoid(torch.where(x == 1, 1.0, -1.0) * logits[:, :, 0])
    else:  # -log softmax at the target level
        expected = -torch.log_softmax(logits, 2).gather(2, x.long()[:, :, None])[:, :, 0]
    assert torch.allclose(nll, expected.flatten(1).sum(1), atol=1e-4)
    ours, theirs = (m.sample_pixel(logits, binary, torch.Generator().manual_seed(5)) for m in (P, pixelcnn))
    assert torch.equal(ours, theirs) and ours.shape == x.shape and set(ours.unique().tolist()) <= set(range(256))
    for values in (x.float(), x.to(torch.float64)):
        assert torch.equal(P.scale_input(values, binary), pixelcnn.scale_input(values, binary))
        assert P.scale_input(values, binary).dtype == values.dtype  # the dtype is x's
        assert torch.equal(P.levels_to_unit(values, binary), pixelcnn.levels_to_unit(values, binary))
    ends = torch.tensor([0.0, 1.0]) if binary else torch.tensor([0.0, 255.0])
    assert torch.equal(P.scale_input(ends, binary), torch.tensor([-1.0, 1.0]))  # [-1, 1]
    assert torch.equal(P.levels_to_unit(ends, binary), torch.tensor([0.0, 1.0]))  # [0, 1]


def test_sampler_draws_from_the_model(tmp_path):
    """Pixel-by-pixel samples of 2x2 binary images have the frequencies exp(-NLL) that the model assigns."""
    torch.manual_seed(0)
    model = P.PixelRNN("diag", 1, True, 4, 1, 8)
    images = torch.tensor(list(itertools.product([0.0, 1.0], repeat=4))).view(16, 1, 2, 2)
    p = torch.exp(-P.nll(model, images)).detach()
    n = 20000
    v = P.sample(model, n, (1, 2, 2), None, torch.Generator().manual_seed(0))
    counts = torch.bincount((v.view(n, 4) * torch.tensor([8.0, 4, 2, 1])).sum(1).long(), minlength=16)
    assert (counts / n - p).abs().max() < 4 * (p * (1 - p) / n).sqrt().max()  # within 4 standard errors


@pytest.mark.parametrize("arch", ["row", "diag"])
@pytest.mark.parametrize("colors", [1, 3])
@pytest.mark.parametrize("start_row,conditional", [(0, False), (4, False), (2, True)])
def test_carried_sampler_draws_from_the_plain_samplers_logits(arch, colors, start_row, conditional, monkeypatch):
    """sample_rows(fast=True), sample_carried, gives exactly the plain sampler's images for the same random
    numbers, and every logit it draws from is the plain sampler's (to float rounding): a wrong carried state would
    show here even where a random net's near-1/2 probabilities let the images agree by luck. Biases are large, so
    that caches matter; a conditional net draws three classes, its label embeddings perturbed too, so a class bias
    left out shows."""
    torch.manual_seed(colors)
    model = P.PixelRNN(arch, colors, colors == 1, 6, 2, 12, conditional).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.5 * torch.randn_like(p))
    y = torch.tensor([1, 2, 7]) if conditional else None
    given = P.sample(model, 3, (colors, 9, 7), y, torch.Generator().manual_seed(9), fast=False)
    drawn, plain_sample_pixel = {True: [], False: []}, P.sample_pixel
    for fast in (False, True):
        monkeypatch.setattr(P, "sample_pixel",
                            lambda l, b, g, fast=fast: drawn[fast].append(l) or plain_sample_pixel(l, b, g))
        images = P.sample_rows(model, given, y, torch.Generator().manual_seed(1), start_row, fast=fast)
        drawn[fast].append(images)
    assert torch.equal(drawn[True].pop(), drawn[False].pop())  # the images
    assert len(drawn[True]) == len(drawn[False]) == (9 - start_row) * 7 * colors  # one draw per sub-pixel
    for fast_logits, plain_logits in zip(drawn[True], drawn[False]):
        assert fast_logits.shape == plain_logits.shape
        assert torch.allclose(fast_logits, plain_logits, atol=1e-5, rtol=1e-5)


def halves(y, size=6):
    """Toy images that the class decides: class 0 has its left half on, class 1 its right half."""
    x = torch.zeros(len(y), 1, size, size)
    x[y == 0, :, :, :size // 2] = 1
    x[y == 1, :, :, size // 2:] = 1
    return x


@pytest.mark.parametrize("arch", ["row", "diag"])
def test_conditional_samples_follow_the_label(arch):
    """The class is the model's only clue to the first pixel, so a model that ignored it would draw either half
    about as often; after 50 steps both samplers must draw the asked-for half for nearly every image."""
    torch.manual_seed(0)
    model = P.PixelRNN(arch, 1, True, 8, 1, 16, conditional=True)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    rng = torch.Generator().manual_seed(0)
    for _ in range(50):
        y = torch.randint(0, 2, (32,), generator=rng)
        loss = P.nll(model, halves(y), y).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    y = torch.tensor([0] * 10 + [1] * 10)
    for fast in (True, False):
        x = P.sample(model.eval(), 20, (1, 6, 6), y, torch.Generator().manual_seed(1), fast=fast)
        left, right = x[:, 0, :, :3].mean((1, 2)), x[:, 0, :, 3:].mean((1, 2))
        assert torch.where(y == 0, left > right, right > left).float().mean() >= 0.9


def test_toy_run_beats_the_uniform_model(data_dir, tmp_path):
    """A short run on the fake digits: test NLL far below the uniform model's 784 ln 2 = 543 nats."""
    out = tmp_path / "toy"
    P.main(["--data-dir", str(data_dir), "--out", str(out), "--arch", "row", "--hidden", "8", "--layers", "1",
            "--head", "16", "--batch-size", "16", "--lr", "1e-2", "--steps", "20", "--log-every", "10",
            "--sample-every", "1000", "--ckpt-every", "1000", "--num-samples", "1", "--device", "cpu"])
    assert read_eval(out)["exact NLL (nats/image)"] < 0.5 * 784 * math.log(2)


def test_conditional_run_draws_one_row_per_class_and_the_asked_for_label(small_mnist, tmp_path, capsys):
    out = tmp_path / "cond"
    args = ["--data-dir", str(small_mnist), "--out", str(out)]
    P.main(args + ["--conditional", "--sample-every", "1000", *TINY, "--num-samples", "20", "--steps", "2"])
    assert Image.open(out / "samples_2.png").size == (2 * 9 + 1, 10 * 9 + 1)  # 10 rows (classes) of 2 (8x8, padding 1)
    assert "test NLL -log p(x | y), given the test labels y," in capsys.readouterr().out
    assert P.main(args + ["--eval"]) == read_eval(out) and read_eval(out)["images"] == 16
    P.main(args + ["--sample", "--label", "3", "--num-samples", "3"])
    assert torch.load(out / "samples.pt").shape == (3, 1, 8, 8)
    assert torch.equal(torch.load(out / "labels.pt"), torch.full((3,), 3))
    P.main(args + ["--complete"])  # each test image's own class
    assert torch.load(out / "completion.pt").shape == (40, 1, 8, 8)  # 8 originals, 8 occluded, 3 x 8 completions


def test_receptive_field_picture_shows_the_two_fields(tmp_path):
    """The PNG's two panels: the Diagonal BiLSTM sees exactly the earlier pixels; the Row LSTM sees some of them only
    (its triangle), and both panels are the gradients that receptive_field() computes."""
    P.main(["--receptive-field", "--out", str(tmp_path), "--hidden", "3", "--layers", "2", "--head", "6"])
    img = np.asarray(Image.open(tmp_path / "receptive_field.png").convert("RGB")).astype(int)
    r, c, zoom, side = 28 * 2 // 3, 14, 6, 28 * 6
    earlier = (torch.arange(28 * 28) < r * 28 + c).view(28, 28)
    for k, arch in enumerate(["row", "diag"]):
        panel = img[1:1 + side, 1 + k * (side + 1):1 + k * (side + 1) + side]
        centres = torch.from_numpy(panel[zoom // 2::zoom, zoom // 2::zoom])  # one value per image pixel
        seen = (centres[..., 1] > 127)  # white (seen) or black (not); the output pixel is red, its green is 0
        assert tuple(centres[r, c]) == (255, 0, 0)
        torch.manual_seed(0)
        field = P.receptive_field(P.build_model(P.ModelConfig(arch=arch, hidden=3, layers=2, head=6), (1, 28, 28)),
                                  (1, 28, 28), r, c) > 0
        assert torch.equal(seen, field)
        assert not (seen & ~earlier).any()  # never the future
        assert (seen == earlier).all() if arch == "diag" else (earlier & ~seen).sum() > 50
