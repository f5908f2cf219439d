"""gan.py: the losses against their formulas, the deck's saturation argument, Algorithm 1's alternation,
a toy game that G must win, the latent pictures, and the script end to end."""
import json
import math
import types

import pytest
import torch
import torch.nn as nn

import common
import gan

MODEL = ["--g-channels", "4", "--d-channels", "4", "--z-dim", "8"]
RUN = ["--max-minutes", "0", "--batch-size", "8", "--num-samples", "4", "--log-every", "1", "--device", "cpu"]


def run(data_dir, out, *args, model=MODEL):
    """Train (or --resume) a tiny run: the model flags, then the run flags, then `args` (later flags win)."""
    return gan.main(["--data-dir", str(data_dir), "--out", str(out), *model, *RUN, *args])


def mode(data_dir, out, *args):
    """--sample / --eval: no model flag, the checkpoint has them."""
    return gan.main(["--data-dir", str(data_dir), "--out", str(out), "--device", "cpu", *args])


def ckpt(out):
    return torch.load(out / "ckpt.pt", weights_only=True)


def logged(out):
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def logit(p):
    p = torch.as_tensor(p, dtype=torch.float64)
    return torch.log(p) - torch.log1p(-p)  # D = sigmoid(l)  <=>  l = log(D / (1 - D))


# ----------------------------------------------------------------------------- the losses

def test_losses_equal_their_formulas_on_known_D_outputs():
    d_real = torch.tensor([0.9, 0.6, 0.99], dtype=torch.float64)
    d_fake = torch.tensor([0.1, 0.3, 0.001], dtype=torch.float64)
    lr, lf = logit(d_real), logit(d_fake)
    v = torch.log(d_real).mean() + torch.log(1 - d_fake).mean()  # V(D, G) = E log D(x) + E log(1 - D(G(z)))
    assert gan.d_loss(lr, lf).item() == pytest.approx(-v.item(), rel=1e-12)
    assert gan.g_loss(lf, "minimax").item() == pytest.approx(torch.log(1 - d_fake).mean().item(), rel=1e-12)
    assert gan.g_loss(lf, "non-saturating").item() == pytest.approx(-torch.log(d_fake).mean().item(), rel=1e-12)


def test_losses_are_finite_where_sigmoid_saturates():
    """From logits: D(x) = sigmoid(-200) is 0 in float32, yet -log D(x) must come out as 200, not inf."""
    l = torch.tensor([-200.0, 200.0])
    assert gan.d_loss(l[:1], l[1:]).item() == pytest.approx(400.0)  # -log sigmoid(-200) - log(1 - sigmoid(200))
    assert gan.g_loss(l[:1], "non-saturating").item() == pytest.approx(200.0)
    assert gan.g_loss(l[1:], "minimax").item() == pytest.approx(-200.0)


def grad_wrt_logit(d_fake, kind):
    l = logit(d_fake).requires_grad_()
    gan.g_loss(l, kind).backward()
    return l.grad * len(l)  # per sample: the loss is a mean


def test_saturating_loss_is_flat_where_D_rejects_fakes_and_non_saturating_is_steep():
    """The deck's figure: early on D(G(z)) ~ 0. d/dl log(1 - sigmoid(l)) = -D(G(z)) ~ 0 (no signal for G), while
    d/dl -log sigmoid(l) = -(1 - D(G(z))) ~ -1. Near D(G(z)) ~ 1 the roles swap."""
    bad = torch.tensor([1e-4, 1e-3, 1e-2])
    g_mm, g_ns = grad_wrt_logit(bad, "minimax"), grad_wrt_logit(bad, "non-saturating")
    assert torch.allclose(g_mm, -bad.double(), rtol=1e-6) and g_mm.abs().max() <= 0.01
    assert torch.allclose(g_ns, -(1 - bad.double()), rtol=1e-6) and g_ns.abs().min() >= 0.99
    good = torch.tensor([0.99])
    assert grad_wrt_logit(good, "minimax").abs().item() > 0.98
    assert grad_wrt_logit(good, "non-saturating").abs().item() < 0.02
    # both push the logit up (a negative gradient that G descends), only at very different speeds
    assert (g_mm < 0).all() and (g_ns < 0).all()


# ----------------------------------------------------------------------------- the networks

@pytest.mark.parametrize("size,channels", [((28, 28), 1), ((32, 32), 3), ((32, 32), 1), ((28, 28), 3)])
def test_shapes_and_ranges(size, channels):
    G, D = gan.build_model(gan.ModelConfig(z_dim=10, g_channels=4, d_channels=4), (channels, *size))
    x = G(torch.randn(5, 10))
    assert x.shape == (5, channels, *size) and x.min() >= -1 and x.max() <= 1
    assert D(x).shape == (5,)


def test_sizes_the_model_cannot_take_are_refused():
    with pytest.raises(common.UsageError, match="multiples of 4"):
        gan.build_model(gan.ModelConfig(), (1, 30, 30))


def test_dcgan_init():
    G, D = gan.build_model(gan.ModelConfig(g_channels=32, d_channels=32), (1, 28, 28))
    w = torch.cat([m.weight.flatten() for m in G.modules() if isinstance(m, nn.ConvTranspose2d)])
    assert w.mean().abs() < 2e-3 and abs(w.std().item() - 0.02) < 1e-3
    bn = [m for m in D.modules() if isinstance(m, nn.BatchNorm2d)][0]
    assert abs(bn.weight.mean().item() - 1) < 0.01 and (bn.bias == 0).all()


# ----------------------------------------------------------------------------- Algorithm 1

def tiny_game(seed=0):
    torch.manual_seed(seed)
    cfg = gan.Config(batch_size=8)
    G, D = gan.build_model(gan.ModelConfig(z_dim=8, g_channels=4, d_channels=4), (1, 28, 28))
    opts = [torch.optim.Adam(m.parameters(), lr=1e-2, betas=(0.5, 0.999)) for m in (G, D)]
    return cfg, G, D, *opts


def snapshot(m):
    return [p.detach().clone() for p in m.parameters()]


def same(m, snap):
    return all(torch.equal(p, q) for p, q in zip(m.parameters(), snap))


def test_a_D_step_changes_no_G_parameter_and_a_G_step_no_D_parameter():
    cfg, G, D, opt_g, opt_d = tiny_game()
    x, z = torch.rand(8, 1, 28, 28) * 2 - 1, torch.randn(8, 8)
    g0, d0 = snapshot(G), snapshot(D)
    gan.d_step(G, D, opt_d, (x, None), (z, None))  # a real pair (x, y) and a noise pair (z, y), y None: unconditional
    assert same(G, g0) and not same(D, d0)
    assert all(p.grad is None for p in G.parameters())  # not even a gradient reached G
    g0, d0, d_grads = snapshot(G), snapshot(D), [p.grad.clone() for p in D.parameters()]
    gan.g_step(G, D, opt_g, (z, None), "non-saturating")
    assert same(D, d0) and not same(G, g0)
    assert all(torch.equal(p.grad, g) for p, g in zip(D.parameters(), d_grads))  # D's weights were frozen: no new grad
    assert all(p.requires_grad for p in D.parameters())  # and unfrozen afterwards


def test_each_step_checks_its_loss_after_backward_and_before_its_update():
    """check(**figures) (train passes run.check, the NaN guard) sees D's loss, then G's, while the weights are still
    those the loss was computed with; a check that raises leaves them so."""
    cfg, G, D, opt_g, opt_d = tiny_game()
    real, noise = (torch.rand(8, 1, 28, 28) * 2 - 1, None), (torch.randn(8, 8), None)
    seen, g0, d0 = [], snapshot(G), snapshot(D)

    def check(**figures):
        (name, loss), = figures.items()
        seen.append((name, loss.item(), same(G, g0) and same(D, d0)))
    figures = gan.d_step(G, D, opt_d, real, noise, check)
    g0, d0 = snapshot(G), snapshot(D)
    figures |= gan.g_step(G, D, opt_g, noise, "minimax", check)
    assert seen == [("d_loss", figures["d_loss"].item(), True), ("g_loss", figures["g_loss"].item(), True)]

    def diverged(**figures):
        raise common.UsageError("nan")
    g0, d0 = snapshot(G), snapshot(D)
    for step in (lambda: gan.d_step(G, D, opt_d, real, noise, diverged),
                 lambda: gan.g_step(G, D, opt_g, noise, "minimax", diverged)):
        with pytest.raises(common.UsageError):
            step()
    assert same(G, g0) and same(D, d0) and all(p.requires_grad for p in D.parameters())


def test_d_steps_k_gives_k_D_updates_per_G_update(data_dir, tmp_path):
    out = tmp_path / "k3"
    run(data_dir, out, "--d-steps", "3", "--steps", "2")
    adam_steps = lambda opt: {int(s["step"]) for s in opt["state"].values()}  # Adam counts its own updates
    assert adam_steps(ckpt(out)["opt_d"]) == {6} and adam_steps(ckpt(out)["opt_g"]) == {2}


class Unconditional(nn.Module):
    """A network called as gan.py calls G and D, net(input, y), for a model without classes (y is None)."""

    def __init__(self, *layers):
        super().__init__()
        self.net = nn.Sequential(*layers)

    def forward(self, inputs, y=None):
        assert y is None
        return self.net(inputs)


def test_on_toy_2d_data_G_moves_to_the_data():
    """2-D data ~ N((3, -2), 0.3^2 I); small MLPs; G starts near the origin and must bring its samples to the data
    within 300 steps."""
    torch.manual_seed(0)
    target = torch.tensor([3.0, -2.0])
    G = Unconditional(nn.Linear(4, 32), nn.ReLU(), nn.Linear(32, 2))
    D = Unconditional(nn.Linear(2, 32), nn.LeakyReLU(0.2), nn.Linear(32, 1), nn.Flatten(0))
    opt_g, opt_d = (torch.optim.Adam(m.parameters(), lr=2e-3, betas=(0.5, 0.999)) for m in (G, D))
    cfg = types.SimpleNamespace(d_steps=1, g_loss="non-saturating")
    draw_real = lambda: (target + 0.3 * torch.randn(64, 2), None)  # a real pair (x, y), no classes
    draw_noise = lambda: (torch.randn(64, 4), None)  # a noise pair (z, y)
    dist = lambda: (G(torch.randn(2000, 4)).detach().mean(0) - target).norm().item()
    start = dist()
    for _ in range(300):
        figures = gan.train_iteration(G, D, opt_g, opt_d, draw_real, draw_noise, cfg)
    assert start > 3 and dist() < 0.6, (start, dist())  # the game oscillates, so the bound leaves it some room
    assert 0.2 < figures["D_x"] < 0.8  # near the equilibrium D cannot tell the two apart (D = 1/2)


# ----------------------------------------------------------------------------- the latent pictures

class InkG(nn.Module):
    """A stand-in generator whose image brightness is set by z_0 alone: tanh(z_0) everywhere."""

    def forward(self, z, y=None):
        return torch.tanh(z[:, :1, None, None]).expand(len(z), 1, 4, 4)


def test_ink_direction_finds_the_latent_that_sets_ink_and_arithmetic_adds_it():
    torch.manual_seed(0)
    z = torch.randn(2000, 6)
    d = gan.ink_direction(InkG(), z)
    assert d[0] > 2 and d[1:].abs().max() < 0.3 * d[0]  # thick minus thin: along z_0, the only latent that matters
    _, col_ink = gan.arithmetic(InkG(), torch.randn(8, 6), d)
    assert (col_ink[1:] > col_ink[:-1]).all()  # more of the direction, more ink, column by column


def test_interpolation_starts_and_ends_at_the_two_samples():
    G = InkG()
    z = torch.randn(16, 6)
    x = gan.interpolation(G, z, rows=8, cols=5).view(8, 5, 1, 4, 4)
    assert torch.allclose(x[:, 0], gan.sample(G, z[:8])) and torch.allclose(x[:, -1], gan.sample(G, z[8:16]))


# ----------------------------------------------------------------------------- the script end to end

def test_train_sample_and_eval_need_no_model_flags(data_dir, tmp_path, capsys):
    out = tmp_path / "run"
    run(data_dir, out, "--steps", "3", "--sample-every", "2", "--ckpt-every", "2")
    for f in ("config.json", "log.jsonl", "ckpt.pt", "samples_2.png", "samples_3.png"):
        assert (out / f).exists(), f
    logs = logged(out)
    assert [r["step"] for r in logs] == [1, 2, 3]
    for r in logs:
        assert all(math.isfinite(r[k]) for k in ("d_loss", "g_loss", "D_x", "D_G_z")) and 0 < r["D_x"] < 1
    assert ckpt(out)["model_config"] == dict(dataset="mnist", conditional=False, z_dim=8, g_channels=4, d_channels=4)

    capsys.readouterr()
    mode(data_dir, out, "--sample", "--num-samples", "6")
    text = capsys.readouterr().out
    samples = torch.load(out / "samples.pt")
    assert samples.shape == (6, 1, 28, 28) and samples.min() >= 0 and samples.max() <= 1 and "6 samples" in text
    for f in ("samples.png", "interpolation.png", "arithmetic.png"):
        assert (out / f).exists(), f
    mode(data_dir, out, "--sample", "--num-samples", "6")  # the fixed noise of --seed: the same samples
    assert torch.equal(torch.load(out / "samples.pt"), samples)
    mode(data_dir, out, "--sample", "--num-samples", "6", "--ema")  # the EMA of G after 3 steps: other weights
    assert not torch.equal(torch.load(out / "samples.pt"), samples)

    result = mode(data_dir, out, "--eval")
    assert result == json.loads((out / "eval.json").read_text()) and result["n"] == 64
    assert result == mode(data_dir, out, "--eval")  # seeded z: the same figures again


def test_eval_computes_the_value_of_the_game(data_dir, tmp_path):
    """game_value against V(D, G) written out by hand for a G and a D whose outputs are known: D gives every real
    image the logit 2 and every fake the logit -1 (a constant net), whatever G makes."""
    class ConstD(nn.Module):
        def forward(self, x, y=None):  # real images lie in [-1, 1] with some pixel above 0.99; G's fakes are all -1
            return torch.where(x.flatten(1).amax(1) > 0, 2.0, -1.0)

    class BlankG(nn.Module):
        z_dim = 3

        def forward(self, z, y=None):
            return -torch.ones(len(z), 1, 28, 28)

    x, _ = common.load_dataset("mnist", data_dir, "test")
    rows = gan.game_value(BlankG(), ConstD(), common.uint8_to_signed(x), 10, seed=0)
    d_real, d_fake = torch.sigmoid(torch.tensor(2.0)), torch.sigmoid(torch.tensor(-1.0))
    v = math.log(d_real) + math.log(1 - d_fake)
    values = list(rows.values())
    assert values[0] == pytest.approx(v, rel=1e-6)
    assert values[1] == pytest.approx(d_real.item()) and values[2] == pytest.approx(d_fake.item())
    assert values[3] == pytest.approx(-math.log(d_fake)) and values[4] == pytest.approx(math.log(1 - d_fake))


def test_cifar_32x32_rgb_trains_and_samples(data_dir, tmp_path):
    out = tmp_path / "c"
    run(data_dir, out, "--steps", "2", "--g-loss", "minimax", model=[*MODEL, "--dataset", "cifar10"])
    mode(data_dir, out, "--sample", "--num-samples", "5")
    assert torch.load(out / "samples.pt").shape == (5, 3, 32, 32)


# ----------------------------------------------------------------------------- the conditional GAN (--conditional)

def halves(n, rng):
    """8x8 images in [-1, 1] whose class decides the picture: class 0 has the left half on, class 1 the right half."""
    y = torch.randint(0, 2, (n,), generator=rng)
    left = (torch.arange(8) < 4).float().expand(n, 1, 8, 8)
    x = torch.where(y[:, None, None, None] == 0, left, 1 - left)
    return x * 2 - 1 + 0.1 * torch.randn(x.shape, generator=rng), y


@pytest.mark.usefixtures("one_thread")  # conftest.py: a second thread only waits here
def test_conditional_samples_draw_the_asked_for_class():
    """Trained on `halves` by Algorithm 1 with (x, y) and (z, y) pairs, G(z, 0) (G(z, 1)) must draw the left (right)
    half brighter: the label, through G's conditional BatchNorm and D's projection, sets the class."""
    torch.manual_seed(0)
    G, D = gan.build_model(gan.ModelConfig(z_dim=8, g_channels=8, d_channels=8, conditional=True), (1, 8, 8))
    opt_g, opt_d = (torch.optim.Adam(m.parameters(), lr=2e-3, betas=(0.5, 0.999)) for m in (G, D))
    cfg, rng = types.SimpleNamespace(d_steps=1, g_loss="non-saturating"), torch.Generator().manual_seed(0)
    draw_real = lambda: halves(64, rng)  # a real pair (x, y): images and their classes
    draw_noise = lambda: (torch.randn(64, 8), torch.randint(0, 2, (64,)))  # a noise pair (z, y): the fakes' classes
    for _ in range(300):
        gan.train_iteration(G, D, opt_g, opt_d, draw_real, draw_noise, cfg)
    z = torch.randn(64, 8, generator=torch.Generator().manual_seed(1))
    for label in (0, 1):
        x = gan.sample(G, z, torch.full((64,), label))
        left_brighter = x[..., :4].mean((1, 2, 3)) > x[..., 4:].mean((1, 2, 3))
        assert (left_brighter == (label == 0)).float().mean() >= 0.9, label


def test_projection_discriminator_adds_embed_y_dot_phi_x():
    """l(x, y) = psi(phi(x)) + embed(y)^T phi(x), with phi(x) the input of D's last layer and psi(phi(x)) its output
    (read by a hook, not by D's own code): so l(x, y) - l(x, y') = (embed(y) - embed(y'))^T phi(x)."""
    torch.manual_seed(0)
    G, D = gan.build_model(gan.ModelConfig(z_dim=8, g_channels=4, d_channels=4, conditional=True), (1, 28, 28))
    nn.init.normal_(D.embed.weight)  # zero at first; any weights must do
    for e in G.embed:  # so are G's class scales and shifts
        nn.init.normal_(e.weight)
    D.eval()
    seen = []
    D.net[-1].register_forward_hook(lambda m, inputs, output: seen.append((inputs[0].flatten(1), output.flatten())))
    x, y, y2 = torch.rand(6, 1, 28, 28) * 2 - 1, torch.tensor([0, 1, 2, 3, 4, 9]), torch.tensor([5, 5, 7, 8, 0, 9])
    l1, l2 = D(x, y).double(), D(x, y2).double()
    (phi, psi), _ = seen
    phi, e = phi.double(), D.embed.weight.double()
    torch.testing.assert_close(l1, psi.double() + (e[y] * phi).sum(1))
    torch.testing.assert_close(l1 - l2, ((e[y] - e[y2]) * phi).sum(1))
    assert (l1 - l2)[:5].abs().min() > 1e-3 and (l1 - l2)[5] == 0  # only the label changed, and only where it did
    assert G(torch.randn(6, 8), y).shape == (6, 1, 28, 28)
    assert not torch.equal(G.eval()(torch.zeros(2, 8), y[:2]), G(torch.zeros(2, 8), y2[:2]))  # G(z, y) reads y


def test_conditional_batchnorm_scales_and_shifts_each_class():
    """After each of G's two BatchNorms, h (1 + gamma_y) + beta_y: read by hooks, class by class."""
    torch.manual_seed(0)
    G, _ = gan.build_model(gan.ModelConfig(z_dim=8, g_channels=4, d_channels=4, conditional=True), (1, 28, 28))
    for e in G.embed:
        nn.init.normal_(e.weight)
    G.eval()
    norms = [m for m in G.net if isinstance(m, nn.BatchNorm2d)]
    outs, ins = [], []
    for norm in norms:
        norm.register_forward_hook(lambda m, i, o: outs.append(o.clone()))
        relu = G.net[list(G.net).index(norm) + 1]  # the next layer (an in-place ReLU): what it is given, before it acts
        relu.register_forward_pre_hook(lambda m, i: ins.append(i[0].clone()))
    y = torch.tensor([0, 3, 9])
    G(torch.randn(3, 8), y)
    assert len(norms) == len(G.embed) == len(outs) == len(ins) == 2
    for embed, out, seen in zip(G.embed, outs, ins):
        gamma, beta = embed.weight[y].chunk(2, 1)
        torch.testing.assert_close(seen, out * (1 + gamma[:, :, None, None]) + beta[:, :, None, None])


@pytest.mark.usefixtures("one_thread")  # conftest.py: a second thread only waits here
def test_conditional_run_samples_the_asked_for_class(data_dir, tmp_path):
    out = tmp_path / "cond"
    run(data_dir, out, "--steps", "2", "--conditional")
    assert ckpt(out)["model_config"]["conditional"] is True
    mode(data_dir, out, "--sample", "--num-samples", "12", "--label", "3")
    threes = torch.load(out / "samples.pt")
    assert threes.shape == (12, 1, 28, 28) and torch.equal(torch.load(out / "labels.pt"), torch.full((12,), 3))
    for f in ("samples.png", "interpolation.png", "arithmetic.png"):
        assert (out / f).exists(), f
    mode(data_dir, out, "--sample", "--num-samples", "20")
    every = torch.load(out / "samples.pt")
    assert torch.equal(torch.load(out / "labels.pt"), torch.arange(20) % 10)
    assert torch.equal(every[3], threes[3]) and not torch.equal(every[4], threes[4])  # the same z, the class asked
    from PIL import Image
    assert Image.open(out / "samples.png").size == (2 * 29 + 1, 10 * 29 + 1)  # one row per class, 2 images each
    result = mode(data_dir, out, "--eval")
    assert result == json.loads((out / "eval.json").read_text()) and result["n"] == 64
