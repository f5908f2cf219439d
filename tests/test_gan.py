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

TINY = ["--g-channels", "4", "--d-channels", "4", "--z-dim", "8", "--batch-size", "8", "--num-samples", "4",
        "--log-every", "1", "--device", "cpu"]


def logit(p):
    p = torch.as_tensor(p, dtype=torch.float64)
    return torch.log(p) - torch.log1p(-p)  # D = sigmoid(l)  <=>  l = log(D / (1 - D))


# ----------------------------------------------------------------------------- the losses

def test_losses_equal_their_formulas_on_known_D_outputs():
    d_real, d_fake = torch.tensor([0.9, 0.6, 0.99], dtype=torch.float64), torch.tensor([0.1, 0.3, 0.001], dtype=torch.float64)
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
    assert grad_wrt_logit(good, "minimax").abs().item() > 0.98 and grad_wrt_logit(good, "non-saturating").abs().item() < 0.02
    # both push the logit up (a negative gradient that G descends), only at very different speeds
    assert (g_mm < 0).all() and (g_ns < 0).all()


# ----------------------------------------------------------------------------- the networks

@pytest.mark.parametrize("size,channels", [((28, 28), 1), ((32, 32), 3), ((32, 32), 1), ((28, 28), 3)])
def test_shapes_and_ranges(size, channels):
    G, D = gan.build_models(gan.Config(z_dim=10, g_channels=4, d_channels=4), channels, size)
    x = G(torch.randn(5, 10))
    assert x.shape == (5, channels, *size) and x.min() >= -1 and x.max() <= 1
    assert D(x).shape == (5,)


def test_sizes_the_model_cannot_take_are_refused():
    with pytest.raises(common.UsageError, match="multiples of 4"):
        gan.build_models(gan.Config(), 1, (30, 30))


def test_dcgan_init():
    G, D = gan.build_models(gan.Config(g_channels=32, d_channels=32), 1, (28, 28))
    w = torch.cat([m.weight.flatten() for m in G.modules() if isinstance(m, nn.ConvTranspose2d)])
    assert w.mean().abs() < 2e-3 and abs(w.std().item() - 0.02) < 1e-3
    bn = [m for m in D.modules() if isinstance(m, nn.BatchNorm2d)][0]
    assert abs(bn.weight.mean().item() - 1) < 0.01 and (bn.bias == 0).all()


# ----------------------------------------------------------------------------- Algorithm 1

def tiny_game(seed=0):
    torch.manual_seed(seed)
    cfg = gan.Config(z_dim=8, g_channels=4, d_channels=4, batch_size=8)
    G, D = gan.build_models(cfg, 1, (28, 28))
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
    gan.d_step(G, D, opt_d, x, z)
    assert same(G, g0) and not same(D, d0)
    assert all(p.grad is None for p in G.parameters())  # not even a gradient reached G
    g0, d0, d_grads = snapshot(G), snapshot(D), [p.grad.clone() for p in D.parameters()]
    gan.g_step(G, D, opt_g, z, "non-saturating")
    assert same(D, d0) and not same(G, g0)
    assert all(torch.equal(p.grad, g) for p, g in zip(D.parameters(), d_grads))  # D's weights were frozen: no new grad
    assert all(p.requires_grad for p in D.parameters())  # and unfrozen afterwards


def test_d_steps_k_gives_k_D_updates_per_G_update(data_dir, tmp_path):
    out = tmp_path / "k3"
    run(["--data-dir", data_dir, "--out", out, *TINY, "--d-steps", 3, "--steps", 2, "--sample-every", 100])
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    adam_steps = lambda opt: {int(s["step"]) for s in opt["state"].values()}  # Adam counts its own updates
    assert adam_steps(ckpt["opt_d"]) == {6} and adam_steps(ckpt["opt_g"]) == {2}


def test_on_toy_2d_data_G_moves_to_the_data():
    """2-D data ~ N((3, -2), 0.3^2 I); small MLPs; G starts near the origin and must bring its samples to the data
    within 300 steps."""
    torch.manual_seed(0)
    target = torch.tensor([3.0, -2.0])
    G = nn.Sequential(nn.Linear(4, 32), nn.ReLU(), nn.Linear(32, 2))
    D = nn.Sequential(nn.Linear(2, 32), nn.LeakyReLU(0.2), nn.Linear(32, 1), nn.Flatten(0))
    opt_g, opt_d = (torch.optim.Adam(m.parameters(), lr=2e-3, betas=(0.5, 0.999)) for m in (G, D))
    cfg = types.SimpleNamespace(batch_size=64, z_dim=4, d_steps=1, g_loss="non-saturating")
    real = lambda: target + 0.3 * torch.randn(64, 2)
    dist = lambda: (G(torch.randn(2000, 4)).detach().mean(0) - target).norm().item()
    start = dist()
    for _ in range(300):
        figures = gan.train_iteration(G, D, opt_g, opt_d, real, cfg)
    assert start > 3 and dist() < 0.6, (start, dist())  # the game oscillates, so the bound leaves it some room
    assert 0.2 < figures["D_x"] < 0.8  # near the equilibrium D cannot tell the two apart (D = 1/2)


# ----------------------------------------------------------------------------- the latent pictures

class InkG(nn.Module):
    """A stand-in generator whose image brightness is set by z_0 alone: tanh(z_0) everywhere."""

    def forward(self, z):
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
    assert torch.allclose(x[:, 0], gan.generate(G, z[:8])) and torch.allclose(x[:, -1], gan.generate(G, z[8:16]))


# ----------------------------------------------------------------------------- the script end to end

def run(argv, capsys=None):
    gan.main([str(a) for a in argv])
    return capsys.readouterr().out if capsys else None


def test_train_resume_sample(data_dir, tmp_path, capsys):
    out = tmp_path / "run"
    args = ["--data-dir", data_dir, "--out", out, *TINY]
    run([*args, "--steps", 3, "--sample-every", 2, "--ckpt-every", 2])
    for f in ("config.json", "log.jsonl", "ckpt.pt", "samples_2.png", "samples_3.png", "interpolation.png", "arithmetic.png"):
        assert (out / f).exists(), f
    logs = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logs] == [1, 2, 3]
    for r in logs:
        assert all(math.isfinite(r[k]) for k in ("d_loss", "g_loss", "D_x", "D_G_z")) and 0 < r["D_x"] < 1

    run([*args, "--steps", 5, "--resume", "--ema"])
    assert torch.load(out / "ckpt.pt", weights_only=True)["step"] == 5

    text = run([*args, "--sample", "--num-samples", 6], capsys)
    samples = torch.load(out / "samples.pt")
    assert samples.shape == (6, 1, 28, 28) and samples.min() >= 0 and samples.max() <= 1 and "6 samples" in text
    assert (out / "samples.png").exists() and "mean ink per column" in text


def test_resume_is_exact(data_dir, tmp_path):
    """Four steps straight equal two steps, a stop, and two more with --resume (G, D and both optimizers)."""
    args = ["--data-dir", data_dir, *TINY, "--sample-every", 100, "--ckpt-every", 2]
    run([*args, "--out", tmp_path / "a", "--steps", 4])
    run([*args, "--out", tmp_path / "b", "--steps", 2])
    run([*args, "--out", tmp_path / "b", "--steps", 4, "--resume"])
    a, b = (torch.load(tmp_path / r / "ckpt.pt", weights_only=True) for r in ("a", "b"))
    for net in ("G", "D", "ema"):
        for k in a[net]:
            assert torch.equal(a[net][k], b[net][k]), (net, k)


def test_cifar_32x32_rgb_trains_and_samples(data_dir, tmp_path):
    args = ["--data-dir", data_dir, "--out", tmp_path / "c", *TINY, "--dataset", "cifar10", "--g-loss", "minimax"]
    run([*args, "--steps", 2, "--sample-every", 100])
    run([*args, "--sample"])
    assert torch.load(tmp_path / "c" / "samples.pt").shape == (4, 3, 32, 32)


@pytest.mark.parametrize("argv,message", [
    (["--dataset", "imagenet-42"], "unknown dataset"),
    (["--dataset", "mnist", "--data-dir", "{tmp}/empty"], "MNIST/raw"),
    (["--d-steps", "0"], "at least 1"),
    (["--sample"], "no checkpoint"),
    (["--resume"], "no checkpoint"),
])
def test_bad_input_is_one_line_and_exit_2(argv, message, data_dir, tmp_path, capsys):
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    with pytest.raises(SystemExit) as e:
        run(["--data-dir", data_dir, "--out", tmp_path / "x", *TINY, "--steps", 1, *argv])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and message in err and len(err.splitlines()) == 1


def test_refuses_another_config_another_scripts_checkpoint_and_an_existing_run(data_dir, tmp_path, capsys):
    out = tmp_path / "r"
    run(["--data-dir", data_dir, "--out", out, *TINY, "--steps", 1])
    for extra in (["--sample", "--g-channels", "8"], ["--steps", 1]):
        with pytest.raises(SystemExit) as e:
            run(["--data-dir", data_dir, "--out", out, *TINY, *extra])
        assert e.value.code == 2
    other = tmp_path / "o"
    other.mkdir()
    common.save_checkpoint(other / "ckpt.pt", "vae", gan.Config(), 1, model=nn.Linear(1, 1))
    with pytest.raises(SystemExit):
        run(["--data-dir", data_dir, "--out", other, *TINY, "--sample"])
    err = capsys.readouterr().err
    assert "--g-channels 4" in err and "already holds a run" in err and "written by vae.py, not gan.py" in err


def test_nan_loss_stops_with_one_line_and_keeps_the_checkpoint(data_dir, tmp_path, capsys, monkeypatch):
    out = tmp_path / "n"
    run(["--data-dir", data_dir, "--out", out, *TINY, "--steps", 2, "--sample-every", 100])
    before = (out / "ckpt.pt").read_bytes()
    monkeypatch.setattr(gan, "g_loss", lambda logit, kind: logit.mean() * float("nan"))
    with pytest.raises(SystemExit) as e:
        run(["--data-dir", data_dir, "--out", out, *TINY, "--steps", 4, "--resume"])
    assert e.value.code == 2 and "lower --lr" in capsys.readouterr().err
    assert (out / "ckpt.pt").read_bytes() == before
