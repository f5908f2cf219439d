"""Tests of vae.py: training, sampling and eval through main() on the fake data (Ctrl-C and --resume, a diverging
step and a failing picture are tested once for all five scripts, in test_harness.py); and the mathematics: the
closed-form KL, the reparameterization gradient, the likelihoods, and the importance-weighted estimate of log p(x)
against the ELBO and against an exact log p(x) computed by quadrature."""
import json
import math

import pytest
import torch

import common
import vae

MODEL = ["--arch", "mlp", "--hidden", "32", "--z-dim", "4"]
RUN = ["--max-minutes", "0", "--batch-size", "16", "--log-every", "2", "--sample-every", "3", "--ckpt-every", "3",
       "--device", "cpu"]


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: these models are too small for a second thread


def run(data_dir, out, *args, model=MODEL):
    """Train (or --resume) a tiny run: the model flags, then the run flags, then `args` (later flags win)."""
    return vae.main(["--data-dir", str(data_dir), "--out", str(out), *model, *RUN, *args])


def mode(data_dir, out, *args):
    """--sample / --eval / ...: no model flag, the checkpoint has them."""
    return vae.main(["--data-dir", str(data_dir), "--out", str(out), "--device", "cpu", *args])


def logged(out):
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def ckpt(out):
    return torch.load(out / "ckpt.pt", weights_only=True)


def refused(capsys, argv, *words):
    """main(argv) exits 2 with one line on stderr holding every one of `words`."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        vae.main(argv)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1 and all(w in err for w in words), err
    return err


# ----------------------------------------------------------------------------- training through main()

def test_smoke_writes_files_and_finite_figures(data_dir, tmp_path):
    out = tmp_path / "run"
    run(data_dir, out, "--steps", "6")
    for name in ("config.json", "log.jsonl", "ckpt.pt", "samples_3.png", "samples_6.png"):
        assert (out / name).exists(), name
    lines = logged(out)
    assert [line["step"] for line in lines] == [2, 3, 4, 6]  # --log-every 2, and the --sample-every 3 steps
    assert all(math.isfinite(v) for line in lines for v in line.values())
    assert {"rec", "kl", "neg_elbo", "grad_norm"} <= set(lines[0]) and "test_neg_elbo" not in lines[0]
    assert "test_neg_elbo" in lines[1] and "test_neg_elbo" in lines[-1]  # on the sample steps' lines
    saved = ckpt(out)
    assert saved["step"] == 6 and saved["model_config"]["arch"] == "mlp" and saved["model_config"]["z_dim"] == 4


def test_the_likelihood_follows_the_rule_for_binarized_data(data_dir):
    """1 channel: binarized images and a Bernoulli (a logit per pixel); 3 channels: 8 bits and a discretized logistic
    (a mean and a log-scale per sub-pixel). The test images are seen as {0, 1} or [-1, 1] accordingly."""
    for dataset, shape, channels_out in (("mnist", (1, 28, 28), 1), ("cifar10", (3, 32, 32), 6)):
        x, _ = common.load_dataset(dataset, data_dir, "test")
        model = vae.build_model(vae.ModelConfig(arch="mlp", hidden=8, z_dim=2), tuple(x.shape[1:]))
        assert tuple(x.shape[1:]) == shape and model.binary == (x.shape[1] == 1) == (dataset == "mnist")
        assert model.decoder(torch.zeros(1, 2)).shape == (1, channels_out, *shape[1:])  # a logit, or (mean, log s)
        seen = vae.model_view(model, x)
        assert set(seen.unique().tolist()) <= {0.0, 1.0} if model.binary else (seen.min() >= -1 and seen.max() <= 1)


def test_conv_on_colour_data_reports_bits_per_dim(data_dir, tmp_path, capsys):
    out = tmp_path / "cifar"
    colour = ["--dataset", "cifar10", "--arch", "conv", "--channels", "8", "--blocks", "1"]
    run(data_dir, out, "--steps", "3", model=colour)
    last = logged(out)[-1]  # the bound in bits per sub-pixel: nats per image / (C H W ln 2)
    assert last["bits_per_dim"] == pytest.approx(last["neg_elbo"] / (3 * 32 * 32 * math.log(2)))
    result = mode(data_dir, out, "--eval", "--iw-samples", "4", "--eval-n", "8")
    assert result["n"] == 8 and result["iw_samples"] == 4
    nats, bits = result["IW NLL -log p(x) (nats/image)"], result["IW NLL -log p(x) (bits/dim)"]
    assert math.isfinite(nats) and bits == pytest.approx(nats / (3 * 32 * 32 * math.log(2)))
    assert "bits/dim" in capsys.readouterr().out


def test_sample_and_eval_need_no_model_flags(data_dir, tmp_path):
    out = tmp_path / "z2"
    run(data_dir, out, "--steps", "3", model=["--arch", "mlp", "--hidden", "16", "--z-dim", "2"])
    mode(data_dir, out, "--sample", "--num-samples", "10")
    s = torch.load(out / "samples.pt", weights_only=True)
    assert s.shape == (10, 1, 28, 28) and s.dtype == torch.float32 and s.min() >= 0 and s.max() <= 1
    for name in ("samples.png", "reconstructions.png", "interpolation.png", "manifold.png", "latents.png"):
        assert (out / name).exists(), name
    mode(data_dir, out, "--sample", "--num-samples", "10")  # the sampler's own seeded generator: the same samples
    assert torch.equal(torch.load(out / "samples.pt", weights_only=True), s)
    result = mode(data_dir, out, "--eval", "--iw-samples", "5")
    assert result == json.loads((out / "eval.json").read_text()) and result["n"] == 64  # the whole fake test set
    assert result == mode(data_dir, out, "--eval", "--iw-samples", "5")  # seeded: the same figures again


def test_a_model_flag_that_disagrees_with_the_checkpoint_is_refused(data_dir, tmp_path, capsys):
    out = tmp_path / "run"
    run(data_dir, out, "--steps", "3")
    before = (out / "ckpt.pt").read_bytes()
    refused(capsys, ["--out", str(out), "--eval", "--z-dim", "5"], "--z-dim 4", "(now 5)", "drop --z-dim")
    resume = ["--data-dir", str(data_dir), "--out", str(out), "--resume", "--steps", "6"]
    refused(capsys, [*resume, "--arch", "conv"], "--arch mlp", "(now conv)")
    assert (out / "ckpt.pt").read_bytes() == before
    assert mode(data_dir, out, "--eval", "--iw-samples", "2", "--z-dim", "4")["n"] == 64  # one that agrees is fine


def test_training_on_toy_digits_beats_a_stated_bound(data_dir, tmp_path):
    """On the fake strokes, 250 steps take the test negative ELBO from ~543 nats (784 ln 2, a coin per pixel)
    to below 150; eval's three figures are consistent: -ELBO >= IW NLL, and the gap is their difference."""
    out = tmp_path / "learn"
    run(data_dir, out, "--steps", "250", "--hidden", "64", "--lr", "3e-3", "--sample-every", "250",
        "--ckpt-every", "250")
    first, last = logged(out)[0], logged(out)[-1]
    assert first["neg_elbo"] > 400 and last["test_neg_elbo"] < 150
    r = mode(data_dir, out, "--eval", "--iw-samples", "50")
    neg_elbo, iw_nll = r["negative ELBO (nats/image)"], r["IW NLL -log p(x) (nats/image)"]
    assert r["n"] == 64 and iw_nll < neg_elbo < 150
    assert r["gap KL(q(z|x) || p(z|x)), IW estimate (nats/image)"] == pytest.approx(neg_elbo - iw_nll)


def test_conv_needs_sizes_divisible_by_4(data_dir, tmp_path, capsys):
    """The one bad input vae.py adds to the common ones (tests/test_cli.py has those)."""
    from PIL import Image
    odd = tmp_path / "odd"
    odd.mkdir()
    for i in range(20):
        Image.new("RGB", (30, 30), (i * 10, 0, 0)).save(odd / f"{i:02d}.png")
    out = tmp_path / "c"
    argv = ["--dataset", str(odd), "--arch", "conv", "--out", str(out), *RUN]
    refused(capsys, argv, "--arch conv", "30x30", "--arch mlp")
    assert not out.exists()


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
    """z_dim 1, 2x2 binary images, no hidden layer (layers=0, which the CLI refuses but the network can be):
    logits = w z + b, mu/logvar linear in x."""
    torch.manual_seed(seed)
    model = vae.build_model(vae.ModelConfig(arch="mlp", z_dim=1, layers=0), (1, 2, 2))
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


def test_the_mode_is_the_most_probable_image_and_the_mean_its_pixel_probabilities():
    """--show mode draws, for each z, the x of largest p(x|z) among all 16 binary 2x2 images; --show mean the
    probabilities p = sigmoid(logit); the same z under both: the mode is the mean thresholded at 1/2."""
    model, x = tiny_vae(), all_images()
    logits = model.decode(torch.randn(6, 1))
    log_p = vae.bernoulli_log_prob(logits[:, None], x[None])  # 6 z x 16 images
    torch.testing.assert_close(model.image(logits, "mode"), x[log_p.argmax(1)])
    torch.testing.assert_close(model.image(logits, "mean"), torch.sigmoid(logits))
    mode, mean = (vae.sample(model, 50, torch.Generator().manual_seed(3), show=s) for s in ("mode", "mean"))
    assert torch.equal(mode, (mean > 0.5).float()) and 0 < mode.mean() < 1


def test_exact_log_px_is_a_distribution():
    """The quadrature is right: p(x) over all 16 binary 2x2 images sums to one."""
    assert exact_log_px(tiny_vae(), all_images()).exp().sum().item() == pytest.approx(1.0, abs=1e-6)


def test_iw_estimate_converges_to_exact_log_px():
    model, x = tiny_vae(), all_images()
    exact = exact_log_px(model, x).float()
    _, iw = vae.elbo_and_iw(model, x, 20000, chunk=16 * 5000, rng=torch.Generator().manual_seed(1))
    torch.testing.assert_close(iw, exact, atol=0.02, rtol=0)


def test_elbo_below_iw_and_iw_grows_with_k():
    """E[IW_K] does not decrease in K (Burda et al. thm 1), IW_1 is an unbiased ELBO, and log p(x) is above all."""
    model, x = tiny_vae(), all_images()
    exact = exact_log_px(model, x).float().mean()
    rng = torch.Generator().manual_seed(2)
    many = x.repeat(2000, 1, 1, 1)  # each image 2000 times: the means below average the estimator over 2000 draws
    mean_iw = {}
    for k in (1, 5, 50):
        elbo, iw = vae.elbo_and_iw(model, many, k, chunk=2 ** 20, rng=rng)
        mean_iw[k], elbo = iw.mean(), elbo.mean()
    assert elbo < mean_iw[5] < mean_iw[50] <= exact + 0.01
    assert mean_iw[1] == pytest.approx(elbo.item(), abs=0.03)  # IW with K = 1 estimates the ELBO itself
    assert mean_iw[1] < mean_iw[5]


def test_a_generator_gives_repeatable_draws_and_leaves_the_global_rng_alone():
    """Evaluations during training draw from their own generator, so the training run's random numbers stay put."""
    model, x = tiny_vae(), all_images()
    mu, logvar = torch.randn(4, 3), torch.randn(4, 3)
    before = torch.get_rng_state()
    z1 = vae.reparameterize(mu, logvar, rng=torch.Generator().manual_seed(7))
    elbo1, iw1 = vae.elbo_and_iw(model, x, 30, chunk=64, rng=torch.Generator().manual_seed(7))
    assert torch.equal(torch.get_rng_state(), before)
    assert torch.equal(z1, vae.reparameterize(mu, logvar, rng=torch.Generator().manual_seed(7)))
    elbo2, iw2 = vae.elbo_and_iw(model, x, 30, chunk=64, rng=torch.Generator().manual_seed(7))
    assert torch.equal(elbo1, elbo2) and torch.equal(iw1, iw2)
    _, iw3 = vae.elbo_and_iw(model, x, 30, chunk=64, rng=torch.Generator().manual_seed(8))
    assert not torch.equal(iw1, iw3)
    eps = torch.randn(mu.shape, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(z1, mu + (0.5 * logvar).exp() * eps)  # z = mu + sigma eps with the generator's eps
    sampled = vae.sample(model, 5, torch.Generator().manual_seed(3))
    assert torch.equal(sampled, vae.sample(model, 5, torch.Generator().manual_seed(3)))
    assert torch.equal(torch.get_rng_state(), before) and sampled.shape == (5, 1, 2, 2)


def test_latent_scatter_puts_a_dot_where_the_code_is(monkeypatch):
    model = vae.build_model(vae.ModelConfig(arch="mlp", z_dim=2, hidden=8), (1, 28, 28))
    monkeypatch.setattr(model, "encode", lambda x: (torch.tensor([[0.0, 0.0], [4.0, 4.0]]), None))
    img = vae.latent_scatter(model, torch.zeros(2, 1, 28, 28), torch.tensor([3, 0]), size=101, lim=4.0)
    torch.testing.assert_close(img[:, 50, 49], vae.PALETTE[3])  # z = (0, 0): the middle
    torch.testing.assert_close(img[:, 0, 99], vae.PALETTE[0])  # z = (4, 4): the top-right corner
    assert (img[:, :, :101] == 1).all(0).float().mean() > 0.99  # the rest is white
    key = img[:, :, 101:]  # 10 cells of 10 px: class c's framed test image in rows 10c .. 10c+9
    torch.testing.assert_close(key[:, 30, 0], vae.PALETTE[3])  # the frame of class 3, whose image is the first
    torch.testing.assert_close(key[:, 34, 4], torch.zeros(3))  # inside it, that (all black) image
    assert (key[:, 10:30] == 1).all()  # classes 1 and 2 have no image: no cell


def test_latent_scatter_key_frames_each_class_image_in_its_colour():
    x = torch.stack([torch.full((1, 28, 28), float(c % 2)) for c in range(10)])  # even classes black, odd white
    key = vae.colour_key(x, torch.arange(10), True, 400)
    for c in range(10):
        torch.testing.assert_close(key[:, 40 * c, 0], vae.PALETTE[c])
        torch.testing.assert_close(key[:, 40 * c + 20, 20], torch.full((3,), float(c % 2)))


# ----------------------------------------------------------------------------- the conditional VAE (--conditional)

def halves(n, rng):
    """8x8 binary images whose class decides the picture: class 0 has the left half on, class 1 the right half;
    5% of the pixels flipped, so z has some noise to describe."""
    y = torch.randint(0, 2, (n,), generator=rng)
    left = (torch.arange(8) < 4).float().expand(n, 1, 8, 8)
    x = torch.where(y[:, None, None, None] == 0, left, 1 - left)
    return (x - (torch.rand(x.shape, generator=rng) < 0.05).float()).abs(), y


def test_conditional_samples_draw_the_asked_for_class():
    """Trained on `halves`, a CVAE sampled with label 0 (then 1) must draw the left (right) half brighter: the
    label, not z, carries the class (an unconditional model would get about half of them right)."""
    torch.manual_seed(0)
    model = vae.build_model(vae.ModelConfig(arch="mlp", hidden=32, z_dim=2, conditional=True), (1, 8, 8))
    opt, rng = torch.optim.Adam(model.parameters(), lr=1e-2), torch.Generator().manual_seed(0)
    for _ in range(200):
        x, y = halves(64, rng)
        loss, _ = vae.loss_fn(model, x, y=y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    for label in (0, 1):
        x = vae.sample(model, 64, torch.Generator().manual_seed(1), torch.full((64,), label))
        left_brighter = x[..., :4].mean((1, 2, 3)) > x[..., 4:].mean((1, 2, 3))
        assert (left_brighter == (label == 0)).float().mean() >= 0.9, label


@pytest.mark.parametrize("arch", ["mlp", "conv"])
def test_both_architectures_take_the_label_in_encoder_and_decoder(arch):
    torch.manual_seed(0)
    model = vae.build_model(vae.ModelConfig(arch=arch, hidden=8, channels=4, blocks=1, z_dim=3, conditional=True),
                            (1, 8, 8))
    x, y, other = torch.randint(0, 2, (4, 1, 8, 8)).float(), torch.tensor([0, 3, 5, 9]), torch.tensor([1, 2, 6, 8])
    assert not torch.equal(model.encode(x, y)[0], model.encode(x, other)[0])  # q(z|x,y)
    z = torch.randn(4, 3)
    assert model.decode(z, y).shape == (4, 1, 8, 8) and not torch.equal(model.decode(z, y), model.decode(z, other))
    loss, figures = vae.loss_fn(model, x, y=y)
    assert math.isfinite(loss.item()) and set(figures) >= {"rec", "kl", "neg_elbo"}


def test_conditional_elbo_is_its_definition_and_the_iw_bound_is_above_it():
    """elbo_and_iw with K = 1 against the CVAE ELBO written out: log p(x|y) >= E_q(z|x,y)[log p(x|z,y)] -
    KL(q(z|x,y) || p(z)) with the same eps; the one-sample IW estimate is log p(x|z,y) + log p(z) - log q(z|x,y); and
    with K = 50 the IW bound on log p(x|y) lies above the ELBO."""
    torch.manual_seed(0)
    model = vae.build_model(vae.ModelConfig(arch="mlp", hidden=8, z_dim=2, conditional=True), (1, 2, 2))
    x, y = all_images(), torch.arange(16) % 10
    elbo, iw = vae.elbo_and_iw(model, x, 1, rng=torch.Generator().manual_seed(5), y=y)
    mu, logvar = model.encoder(torch.cat([x.flatten(1), torch.nn.functional.one_hot(y, 10).float()], 1)).chunk(2, 1)
    z = mu + (0.5 * logvar).exp() * torch.randn((1, 16, 2), generator=torch.Generator().manual_seed(5))[0]
    logits = model.decoder(torch.cat([z, torch.nn.functional.one_hot(y, 10).float()], 1))
    log_px_zy = vae.bernoulli_log_prob(logits, x)
    q, p = torch.distributions.Normal(mu, (0.5 * logvar).exp()), torch.distributions.Normal(0.0, 1.0)
    kl = torch.distributions.kl_divergence(q, p).sum(1)
    torch.testing.assert_close(elbo, log_px_zy - kl)
    torch.testing.assert_close(iw, log_px_zy + p.log_prob(z).sum(1) - q.log_prob(z).sum(1))
    other, _ = vae.elbo_and_iw(model, x, 1, rng=torch.Generator().manual_seed(5), y=(y + 1) % 10)
    assert not torch.allclose(other, elbo)  # the same eps, other labels: another bound
    many = x.repeat(200, 1, 1, 1)
    elbo, iw = vae.elbo_and_iw(model, many, 50, chunk=2 ** 20, rng=torch.Generator().manual_seed(6), y=y.repeat(200))
    assert iw.mean() > elbo.mean()


def test_conditional_run_samples_the_asked_for_class_and_evaluates_log_p_x_given_y(data_dir, tmp_path):
    out = tmp_path / "cond"
    run(data_dir, out, "--steps", "3", "--conditional", model=["--arch", "mlp", "--hidden", "16", "--z-dim", "2"])
    assert ckpt(out)["model_config"]["conditional"] is True
    mode(data_dir, out, "--sample", "--num-samples", "12", "--label", "3")
    threes = torch.load(out / "samples.pt", weights_only=True)
    assert threes.shape == (12, 1, 28, 28) and torch.equal(torch.load(out / "labels.pt"), torch.full((12,), 3))
    for name in ("samples.png", "reconstructions.png", "interpolation.png", "manifold.png", "latents.png"):
        assert (out / name).exists(), name
    mode(data_dir, out, "--sample", "--num-samples", "20")
    every = torch.load(out / "samples.pt", weights_only=True)
    assert torch.equal(torch.load(out / "labels.pt"), torch.arange(20) % 10)
    assert torch.equal(every[3], threes[3]) and not torch.equal(every[4], threes[4])  # the same z, the class asked
    from PIL import Image
    assert Image.open(out / "samples.png").size == (2 * 29 + 1, 10 * 29 + 1)  # one row per class, 2 images each
    result = mode(data_dir, out, "--eval", "--iw-samples", "3")
    assert result == json.loads((out / "eval.json").read_text()) and result["n"] == 64
    assert result["IW NLL -log p(x|y) (nats/image)"] <= result["negative ELBO (nats/image)"] + 1.0
    assert "gap KL(q(z|x,y) || p(z|x,y)), IW estimate (nats/image)" in result
