"""Tests of vae.py: training/resume/sampling/eval through main() on the fake data, bad input, and the
mathematics: the closed-form KL, the reparameterization gradient, the likelihoods, and the importance-weighted
estimate of log p(x) against the ELBO and against an exact log p(x) computed by quadrature."""
import json
import math

import pytest
import torch

import common
import vae

TINY = ["--arch", "mlp", "--hidden", "32", "--z-dim", "4", "--batch-size", "16", "--log-every", "2",
        "--sample-every", "3", "--ckpt-every", "3", "--device", "cpu"]


@pytest.fixture(autouse=True)
def one_thread():
    """These models are too small to gain from a second thread, and on a busy shared CPU every op of a 2-thread
    run waits at a barrier for the descheduled thread (seen: 10x slower); restore the setting afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def run(data_dir, out, *args):
    return vae.main(["--data-dir", str(data_dir), "--out", str(out), *TINY, *args])


def logged(out):
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


# ----------------------------------------------------------------------------- through main()

def test_smoke_writes_files_and_finite_figures(data_dir, tmp_path):
    out = tmp_path / "run"
    run(data_dir, out, "--steps", "6")
    for name in ("config.json", "log.jsonl", "ckpt.pt", "samples_3.png", "samples_6.png"):
        assert (out / name).exists(), name
    lines = logged(out)
    assert lines[-1]["step"] == 6 and all(math.isfinite(v) for line in lines for v in line.values())
    assert {"rec", "kl", "neg_elbo", "test_neg_elbo"} <= set(lines[-1])  # both parts of the loss are logged


def test_conv_on_colour_data_reports_bits_per_dim(data_dir, tmp_path, capsys):
    out = tmp_path / "cifar"
    args = ["--dataset", "cifar10", "--arch", "conv", "--channels", "8", "--blocks", "1"]
    run(data_dir, out, *args, "--steps", "3")
    result = run(data_dir, out, *args, "--eval", "--iw-samples", "4", "--eval-n", "8")
    assert result["n"] == 8 and math.isfinite(result["iw_nll"]) and "bits/dim" in capsys.readouterr().out


def test_resume_is_exact(data_dir, tmp_path, monkeypatch):
    """A run interrupted (Ctrl-C) at step 3 and resumed ends with the same weights as an uninterrupted run."""
    run(data_dir, tmp_path / "straight", "--steps", "6")
    calls, real_loss = [0], vae.loss_fn

    def interrupt_at_step_4(*a, **k):
        calls[0] += 1
        if calls[0] == 4:
            raise KeyboardInterrupt
        return real_loss(*a, **k)
    monkeypatch.setattr(vae, "loss_fn", interrupt_at_step_4)
    with pytest.raises(SystemExit) as e:
        run(data_dir, tmp_path / "resumed", "--steps", "6")
    assert e.value.code == 130
    monkeypatch.setattr(vae, "loss_fn", real_loss)
    run(data_dir, tmp_path / "resumed", "--steps", "6", "--resume")
    a = torch.load(tmp_path / "straight" / "ckpt.pt", weights_only=True)
    b = torch.load(tmp_path / "resumed" / "ckpt.pt", weights_only=True)
    assert a["step"] == b["step"] == 6
    for k in a["model"]:
        torch.testing.assert_close(a["model"][k], b["model"][k], rtol=1e-5, atol=1e-6)


def test_sample_and_pictures(data_dir, tmp_path):
    out = tmp_path / "z2"
    run(data_dir, out, "--steps", "3", "--z-dim", "2")
    run(data_dir, out, "--z-dim", "2", "--sample", "--num-samples", "10")
    s = torch.load(out / "samples.pt", weights_only=True)
    assert s.shape == (10, 1, 28, 28) and s.min() >= 0 and s.max() <= 1
    for name in ("samples.png", "reconstructions.png", "interpolation.png", "manifold.png", "latents.png"):
        assert (out / name).exists(), name


def test_training_on_toy_digits_beats_a_stated_bound(data_dir, tmp_path):
    """On the fake strokes, 250 steps take the test negative ELBO from ~543 nats (784 ln 2, a coin per pixel)
    to below 150; eval's three figures are consistent: -ELBO >= IW NLL, and the gap is their difference."""
    out = tmp_path / "learn"
    run(data_dir, out, "--steps", "250", "--hidden", "64", "--lr", "3e-3", "--sample-every", "250", "--ckpt-every", "250")
    assert logged(out)[-1]["test_neg_elbo"] < 150
    r = run(data_dir, out, "--steps", "250", "--hidden", "64", "--lr", "3e-3", "--eval", "--iw-samples", "50")
    assert r["n"] == 64 and r["iw_nll"] < r["neg_elbo"] and r["gap"] == pytest.approx(r["neg_elbo"] - r["iw_nll"])


def expect_usage_error(capsys, argv, words):
    with pytest.raises(SystemExit) as e:
        vae.main(argv)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1 and words in err, err


def test_bad_input_exits_2_with_one_line(data_dir, tmp_path, capsys):
    base = ["--data-dir", str(data_dir), *TINY]
    expect_usage_error(capsys, [*base, "--dataset", "imagenet-42", "--out", str(tmp_path / "a")], "unknown dataset")
    run(data_dir, tmp_path / "good", "--steps", "3")
    good = (tmp_path / "good" / "ckpt.pt").read_bytes()
    expect_usage_error(capsys, [*base, "--out", str(tmp_path / "good"), "--steps", "3"], "--resume")  # no overwrite
    expect_usage_error(capsys, [*base, "--out", str(tmp_path / "good"), "--z-dim", "5", "--eval"], "--z-dim")
    assert (tmp_path / "good" / "ckpt.pt").read_bytes() == good
    other = tmp_path / "other"
    other.mkdir()
    torch.save(dict(script="ddpm", config={}), other / "ckpt.pt")
    expect_usage_error(capsys, [*base, "--out", str(other), "--sample"], "ddpm.py")
    expect_usage_error(capsys, [*base, "--out", str(tmp_path / "nan"), "--lr", "1e12", "--steps", "50"], "lower --lr")
    from PIL import Image
    odd = tmp_path / "odd"
    odd.mkdir()
    for i in range(20):
        Image.new("RGB", (30, 30), (i * 10, 0, 0)).save(odd / f"{i:02d}.png")
    expect_usage_error(capsys, [*base, "--dataset", str(odd), "--arch", "conv", "--out", str(tmp_path / "c")], "divisible by 4")


# ----------------------------------------------------------------------------- the mathematics

def test_closed_form_kl_matches_torch_distributions_and_monte_carlo():
    torch.manual_seed(0)
    mu, logvar = torch.randn(5, 3), torch.randn(5, 3)
    kl = vae.kl_to_prior(mu, logvar)
    q, p = torch.distributions.Normal(mu, (0.5 * logvar).exp()), torch.distributions.Normal(0.0, 1.0)
    torch.testing.assert_close(kl, torch.distributions.kl_divergence(q, p).sum(1))
    z = q.sample((200000,))  # KL = E_q[log q(z) - log p(z)]
    mc = (q.log_prob(z) - p.log_prob(z)).sum(-1).mean(0)
    torch.testing.assert_close(mc, kl, atol=0.03, rtol=0.01)


def test_gradient_reaches_mu_and_logvar_through_z():
    mu, logvar, eps = torch.randn(4, 3, requires_grad=True), torch.randn(4, 3, requires_grad=True), torch.randn(4, 3)
    z = vae.reparameterize(mu, logvar, eps)
    z.pow(2).sum().backward()  # d(z^2)/dz = 2z; dz/dmu = 1, dz/dlogvar = sigma eps / 2
    sigma = (0.5 * logvar).exp().detach()
    torch.testing.assert_close(mu.grad, 2 * z.detach())
    torch.testing.assert_close(logvar.grad, 2 * z.detach() * sigma * eps / 2)
    assert mu.grad.abs().min() > 0 and logvar.grad.abs().min() > 0


def test_bernoulli_log_prob_is_minus_bce():
    logits, x = torch.randn(3, 1, 4, 4) * 5, torch.randint(0, 2, (3, 1, 4, 4)).float()
    bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, x, reduction="none").flatten(1).sum(1)
    torch.testing.assert_close(vae.bernoulli_log_prob(logits, x), -bce)


@pytest.mark.parametrize("mean,log_scale", [(0.0, -2.0), (0.9, -5.0), (-1.2, 0.5), (0.3, -7.0)])
def test_discretized_logistic_sums_to_one_over_256_levels(mean, log_scale):
    x = (torch.arange(256.0) / 127.5 - 1).view(256, 1, 1, 1)  # every level, one sub-pixel each
    log_p = vae.discretized_logistic_log_prob(torch.full_like(x, mean), torch.full_like(x, log_scale), x)
    assert torch.logsumexp(log_p.double(), 0).exp().item() == pytest.approx(1.0, abs=1e-4)


def tiny_vae(seed=0):
    """z_dim 1, 2x2 binary images, no hidden layer: logits = w z + b, mu/logvar linear in x."""
    torch.manual_seed(seed)
    model = vae.VAE(vae.Config(arch="mlp", z_dim=1, layers=0), (1, 2, 2))
    with torch.no_grad():
        model.decoder[0][0].weight.copy_(torch.tensor([[3.0], [-2.0], [1.5], [0.5]]))
        model.decoder[0][0].bias.copy_(torch.tensor([0.5, -1.0, 0.0, 1.0]))
    return model


def exact_log_px(model, x):
    """log p(x) = log integral N(z; 0, 1) p(x|z) dz by the trapezoid rule on z in [-12, 12]."""
    z = torch.linspace(-12, 12, 24001, dtype=torch.float64)[:, None]
    dec = model.decoder[0][0]
    logits = (z @ dec.weight.double().T + dec.bias.double()).view(-1, 1, 2, 2)
    log_joint = vae.bernoulli_log_prob(logits[:, None], x.double()) - 0.5 * (z ** 2 + math.log(2 * math.pi))  # Z x B
    return torch.logsumexp(log_joint, 0) + math.log(z[1, 0] - z[0, 0])


def all_images():
    return torch.tensor([[(i >> j) & 1 for j in range(4)] for i in range(16)], dtype=torch.float32).view(16, 1, 2, 2)


def test_exact_log_px_is_a_distribution():
    """The quadrature is right: p(x) over all 16 binary 2x2 images sums to one."""
    assert exact_log_px(tiny_vae(), all_images()).exp().sum().item() == pytest.approx(1.0, abs=1e-6)


def test_iw_estimate_converges_to_exact_log_px():
    model, x = tiny_vae(), all_images()
    exact = exact_log_px(model, x).float()
    torch.manual_seed(1)
    _, iw = vae.elbo_and_iw(model, x, 20000, chunk=16 * 5000)
    torch.testing.assert_close(iw, exact, atol=0.02, rtol=0)


def test_elbo_below_iw_and_iw_grows_with_k():
    """E[IW_K] does not decrease in K (Burda et al. thm 1), IW_1 is an unbiased ELBO, and log p(x) is above all."""
    model, x = tiny_vae(), all_images()
    exact = exact_log_px(model, x).float().mean()
    torch.manual_seed(2)
    many = x.repeat(2000, 1, 1, 1)  # each image 2000 times: the means below average the estimator over 2000 draws
    mean_iw = {}
    for k in (1, 5, 50):
        elbo, iw = vae.elbo_and_iw(model, many, k, chunk=2 ** 20)
        mean_iw[k], elbo = iw.mean(), elbo.mean()
    assert elbo < mean_iw[5] < mean_iw[50] <= exact + 0.01
    assert mean_iw[1] == pytest.approx(elbo.item(), abs=0.03)  # IW with K = 1 estimates the ELBO itself
    assert mean_iw[1] < mean_iw[5]


def test_latent_scatter_puts_a_dot_where_the_code_is(monkeypatch):
    model = vae.VAE(vae.Config(arch="mlp", z_dim=2, hidden=8), (1, 28, 28))
    monkeypatch.setattr(model, "encode", lambda x: (torch.tensor([[0.0, 0.0], [4.0, 4.0]]), None))
    img = vae.latent_scatter(model, torch.zeros(2, 1, 28, 28), torch.tensor([3, 0]), size=101, lim=4.0)
    torch.testing.assert_close(img[:, 50, 49], vae.PALETTE[3])  # z = (0, 0): the middle
    torch.testing.assert_close(img[:, 0, 99], vae.PALETTE[0])  # z = (4, 4): the top-right corner
    assert (img == 1).all(0).float().mean() > 0.99  # the rest is white
