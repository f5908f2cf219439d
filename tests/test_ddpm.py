"""ddpm.py: the forward and reverse formulas, the bound's terms, the samplers, and the script end to end."""
import json
import math

import pytest
import torch

import common
import ddpm

TINY = ["--max-minutes", "0", "--channels", "8", "--channel-mults", "1,2", "--num-res-blocks", "1", "--timesteps", "30",
        "--sample-steps", "5", "--batch-size", "8", "--num-samples", "4", "--log-every", "1", "--device", "cpu"]
SCHEDULES = ["linear", "sigmoid", "quadratic", "cosine"]


def diffusion(T=1000, schedule="linear", variance="fixed-small"):
    return ddpm.Diffusion(ddpm.ModelConfig(timesteps=T, schedule=schedule, variance=variance), "cpu")


# ----------------------------------------------------------------------------- the forward process

@pytest.mark.parametrize("schedule", SCHEDULES)
def test_schedules_are_increasing_in_0_1_and_end_in_noise(schedule):
    for T in (1000, 100):
        b = ddpm.make_betas(schedule, T)
        assert b.shape == (T,) and (b > 0).all() and (b < 1).all()
        assert (b[1:] >= b[:-1]).all() and b[-1] > b[0]
        assert torch.cumprod(1 - b, 0)[-1] < 1e-2  # alpha_bar_T ~ 0: x_T is (almost) pure noise


@pytest.mark.parametrize("T", [1000, 100])
def test_the_schedules_ends_are_the_papers(T):
    """linear and quadratic run from beta_1 = 1e-4 to beta_T = 0.02 at T = 1000 (Ho et al.), both scaled by 1000/T;
    sigmoid spans sigmoid(-6) .. sigmoid(6) of that range; cosine is alpha_bar_t = f(t) / f(0) (Nichol & Dhariwal
    eq. 17), its last beta clipped to 0.999."""
    lo, hi = 1e-4 * 1000 / T, 0.02 * 1000 / T
    for schedule in ("linear", "quadratic"):
        b = ddpm.make_betas(schedule, T)
        assert (b[0].item(), b[-1].item()) == (pytest.approx(lo, rel=1e-9), pytest.approx(hi, rel=1e-9))
    b, sig = ddpm.make_betas("sigmoid", T), lambda v: 1 / (1 + math.exp(-v))
    assert b[0].item() == pytest.approx(lo + sig(-6) * (hi - lo))
    assert b[-1].item() == pytest.approx(lo + sig(6) * (hi - lo))
    f = lambda t: math.cos((t / T + 0.008) / 1.008 * math.pi / 2) ** 2
    alpha_bar = torch.cumprod(1 - ddpm.make_betas("cosine", T), 0)
    for t in (1, T // 2, T - 2):
        assert alpha_bar[t - 1].item() == pytest.approx(f(t) / f(0), rel=1e-9)
    assert ddpm.make_betas("cosine", T)[-1].item() == 0.999


def test_a_schedule_with_a_beta_of_1_or_more_is_refused():
    """With the 1000/T scaling, beta_T reaches 1 at T = 20 (alpha_bar_T = 0, the posterior divides by zero)."""
    for schedule in ("linear", "quadratic"):
        with pytest.raises(common.UsageError, match="--timesteps 20 .* every beta must be in \\(0, 1\\)"):
            ddpm.make_betas(schedule, 20)
        assert ddpm.make_betas(schedule, 21).max() < 1
    assert ddpm.make_betas("cosine", 5).max() < 1  # cosine's betas are clipped below 1 for any T


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_closed_form_q_xt_x0_equals_t_single_steps(schedule):
    """Mean and variance of t steps of q(x_t | x_{t-1}) = N(sqrt(1-beta_t) x_{t-1}, beta_t) equal
    q(x_t | x_0) = N(sqrt(alpha_bar_t) x_0, 1 - alpha_bar_t), exactly (recursion) and by Monte Carlo."""
    d, betas = diffusion(100, schedule), ddpm.make_betas(schedule, 100)
    coef, var = torch.tensor(1.0, dtype=torch.float64), torch.tensor(0.0, dtype=torch.float64)
    for t in range(100):  # mean coefficient and variance of x_t given x_0, one step at a time (float64)
        coef, var = (1 - betas[t]).sqrt() * coef, (1 - betas[t]) * var + betas[t]
        assert coef == pytest.approx(d.alpha_bar[t].sqrt().item(), rel=1e-6)  # stored in float32
        assert var == pytest.approx(1 - d.alpha_bar[t].item(), rel=1e-5, abs=1e-7)
    torch.manual_seed(0)
    x0, t = torch.full((200_000, 1, 1, 1), 0.7), 30
    x = x0.clone()
    for s in range(t + 1):
        x = (1 - d.betas[s]).sqrt() * x + d.betas[s].sqrt() * torch.randn_like(x)
    jump = d.q_sample(x0, torch.full((len(x0),), t), torch.randn_like(x0))
    assert x.mean().item() == pytest.approx(jump.mean().item(), abs=0.01)
    assert x.var().item() == pytest.approx(jump.var().item(), rel=0.02)


@pytest.mark.parametrize("t", [1, 10, 500, 999])
def test_posterior_equals_bayes_rule_on_a_grid(t):
    """q(x_{t-1} | x_t, x_0) is proportional to q(x_t | x_{t-1}) q(x_{t-1} | x_0); integrate it on a grid."""
    d = diffusion()
    x0 = 0.3
    x_t = d.alpha_bar[t].sqrt().item() * x0 - 0.8 * (1 - d.alpha_bar[t]).sqrt().item()  # a typical x_t for this x_0
    b, ab_prev = d.betas[t].item(), d.alpha_bar_prev[t].item()
    sd_prior = math.sqrt(1 - ab_prev)
    lo, hi = min(x_t, math.sqrt(ab_prev) * x0) - 10 * sd_prior, max(x_t, math.sqrt(ab_prev) * x0) + 10 * sd_prior
    grid = torch.linspace(lo, hi, 400_001, dtype=torch.float64)
    log_w = -(x_t - math.sqrt(1 - b) * grid) ** 2 / (2 * b) - (grid - math.sqrt(ab_prev) * x0) ** 2 / (2 * sd_prior ** 2)
    w = torch.softmax(log_w, 0)
    mean_num = (w * grid).sum().item()
    var_num = (w * (grid - mean_num) ** 2).sum().item()
    mean, logvar = d.q_posterior(torch.tensor([[[[x0]]]]), torch.tensor([[[[x_t]]]]), torch.tensor([t]))
    assert mean.item() == pytest.approx(mean_num, rel=1e-4, abs=1e-6)
    assert math.exp(logvar.item()) == pytest.approx(var_num, rel=1e-3)
    assert d.beta_tilde[t].item() == pytest.approx(var_num, rel=1e-3)


# ----------------------------------------------------------------------------- the terms of the bound

def test_gaussian_kl_equals_torch_distributions():
    torch.manual_seed(0)
    m1, m2, lv1, lv2 = torch.randn(4, 1000)
    want = torch.distributions.kl_divergence(torch.distributions.Normal(m1, (0.5 * lv1).exp()),
                                             torch.distributions.Normal(m2, (0.5 * lv2).exp()))
    assert torch.allclose(ddpm.normal_kl(m1, lv1, m2, lv2), want, atol=1e-5)


@pytest.mark.parametrize("mean,std", [(0.0, 0.01), (0.3, 0.2), (-0.95, 0.001), (1.2, 1.0)])
def test_discretized_gaussian_sums_to_one_over_256_bins(mean, std):
    x = torch.arange(256, dtype=torch.float64) / 127.5 - 1
    logp = ddpm.discretized_gaussian_log_likelihood(x, torch.tensor(mean, dtype=torch.float64),
                                                    torch.tensor(math.log(std), dtype=torch.float64))
    assert logp.exp().sum().item() == pytest.approx(1.0, abs=1e-9)


def test_learned_variance_interpolates_between_beta_and_beta_tilde():
    d = diffusion(variance="learned")
    t = torch.tensor([0, 5, 500])
    x = torch.zeros(3, 1, 1, 1)
    for v, want in ((1.0, torch.log(ddpm.make_betas("linear", 1000)[t])), (-1.0, d.log_beta_tilde[t])):
        out = torch.cat([x, torch.full_like(x, v)], dim=1)
        assert torch.allclose(d.p_mean_logvar(out, x, t)[1].flatten(), want.float())


def test_the_learned_variance_at_t_1_moves_with_v():
    """Both ends of the interpolation were log beta-tilde_2 at t = 1, so v had no effect and no gradient there."""
    d = diffusion(variance="learned")
    v = torch.zeros(1, 1, 1, 1, requires_grad=True)
    x, t = torch.zeros(1, 1, 1, 1), torch.tensor([0])
    logvar = d.p_mean_logvar(torch.cat([x, v], dim=1), x, t)[1]
    logvar.sum().backward()
    assert v.grad.abs().item() > 0.1


def test_algorithm_2_mean_is_the_posterior_mean_at_the_predicted_x0():
    """mu = 1/sqrt(alpha_t) (x_t - beta_t / sqrt(1 - alpha_bar_t) eps) equals q(x_{t-1} | x_t, x_0-hat)'s mean."""
    d = diffusion()
    torch.manual_seed(0)
    x_t, eps, t = torch.randn(6, 1, 3, 3), torch.randn(6, 1, 3, 3), torch.tensor([1, 2, 10, 100, 500, 999])
    mean_alg2 = d.p_mean_logvar(eps, x_t, t, clip=False)[0]
    mean_posterior = d.q_posterior(d.predict_x0(x_t, t, eps), x_t, t)[0]
    assert torch.allclose(mean_alg2, mean_posterior, atol=1e-4)


def test_sampling_clips_the_predicted_x0_to_the_data_range():
    """clip=True: the mean is the posterior mean at clamp(x0-hat, -1, 1). Where x0-hat lies in [-1, 1] that is
    Algorithm 2's mean; where it does not (x_t = 3 with eps = -1 predicts x0-hat > 1), it is another, nearer the
    data."""
    d = diffusion()
    t = torch.tensor([10, 10, 300, 300])
    x_t = torch.tensor([3.0, 0.1, -3.0, 0.2]).view(4, 1, 1, 1)
    eps = torch.tensor([-1.0, 0.0, 1.0, 0.1]).view(4, 1, 1, 1)
    x0_hat = d.predict_x0(x_t, t, eps).flatten()
    outside = x0_hat.abs() > 1
    assert outside.tolist() == [True, False, True, False]
    clipped, plain = d.p_mean_logvar(eps, x_t, t)[0].flatten(), d.p_mean_logvar(eps, x_t, t, clip=False)[0].flatten()
    want = d.q_posterior(x0_hat.clamp(-1, 1).view(4, 1, 1, 1), x_t, t)[0].flatten()
    assert torch.allclose(clipped, want, atol=1e-6)
    assert torch.allclose(clipped[~outside], plain[~outside], atol=1e-5)
    assert ((clipped - plain)[outside].abs() > 1e-3).all()
    assert (clipped[outside].sign() == x0_hat[outside].sign()).all()
    assert (clipped[outside].abs() < plain[outside].abs()).all()


def oracle(d, c):
    """The ideal eps_theta when the data is the single image x_0 = c: eps = (x_t - sqrt(ab) c) / sqrt(1 - ab)."""
    return lambda x_t, t, y=None: (x_t - ddpm.extract(d.alpha_bar, t).sqrt() * c) / (1 - ddpm.extract(d.alpha_bar, t)).sqrt()


def test_oracle_model_makes_every_denoising_kl_zero():
    """With the ideal eps the reverse step equals the posterior: L_{t-1} = 0 for t > 1, and L_0 is the mass of
    N(x_0, sigma_1^2) in x_0's own bin of width 2/255, which erf gives independently."""
    d = diffusion(200)
    c = torch.full((3, 1, 4, 4), 191 / 127.5 - 1)  # an 8-bit level, so it sits at a bin's centre
    prior, denoise, recon = ddpm.bound(d, oracle(d, c), c, torch.Generator().manual_seed(0))
    assert prior.max() < 1e-4 and denoise.abs().max() < 1e-5
    sigma = math.exp(0.5 * d.log_beta_tilde[0].item())
    want = -math.log2(math.erf(1 / 255 / (sigma * math.sqrt(2))))
    assert recon.tolist() == pytest.approx([want] * 3, rel=1e-4)


@pytest.mark.parametrize("sampler", ["ancestral", "ddim"])
def test_samplers_recover_the_point_mass_with_the_oracle(sampler):
    d = diffusion(200)
    c = torch.linspace(-0.9, 0.9, 16).view(1, 1, 4, 4)
    rng = torch.Generator().manual_seed(0)
    if sampler == "ancestral":
        x, frames = ddpm.sample_ancestral(d, oracle(d, c), (5, 1, 4, 4), rng, frames=4)
    else:
        x, frames = ddpm.sample_ddim(d, oracle(d, c), (5, 1, 4, 4), 20, 0.0, rng, frames=4)
    assert torch.allclose(x, c.expand(5, -1, -1, -1), atol=1e-4)
    assert len(frames) == 5 and frames[0].std() > 0.5  # x_T is noise, x_0 is the data


def test_ddim_with_eta_1_over_all_steps_is_the_ancestral_step():
    """sigma_t^2 = beta_tilde_t (the fixed-small variance) and the mean is the posterior mean."""
    d = diffusion()
    torch.manual_seed(0)
    x0, eps = torch.randn(2, 4, 1, 1, 1)
    for t_int in (1, 50, 999):
        t = torch.tensor([t_int])
        x_t = d.q_sample(x0, t, eps)
        mean, sigma = ddpm.ddim_step(ddpm.extract(d.alpha_bar, t), ddpm.extract(d.alpha_bar, t - 1), x0, eps, eta=1.0)
        # rel 1e-3: in float32, 1 - ab_t / ab_prev cancels to ~4 digits when both are near 1 (t = 1)
        assert (sigma ** 2).item() == pytest.approx(d.beta_tilde[t_int].item(), rel=1e-3)
        assert torch.allclose(mean, d.q_posterior(x0, x_t, t)[0], atol=1e-5)


def test_hybrid_loss_trains_the_variance_but_not_the_mean_through_l_vlb():
    """The stop-gradient: the eps half of the output gets the same gradient with or without L_vlb."""
    grads = {}
    for w in (0.0, 1.0):
        d = ddpm.Diffusion(ddpm.ModelConfig(timesteps=50, variance="learned"), "cpu")
        torch.manual_seed(1)  # the same output, data, t and eps for both weights
        out = torch.randn(4, 2, 6, 6, requires_grad=True)
        loss, figures = ddpm.loss_fn(d, lambda x_t, t, y=None: out * 1.0, torch.rand(4, 1, 6, 6) * 2 - 1, vlb_weight=w)
        loss.backward()
        grads[w] = out.grad
        assert {"l_simple", "l_vlb"} <= figures.keys()
    assert torch.allclose(grads[0.0][:, :1], grads[1.0][:, :1])
    assert grads[0.0][:, 1:].abs().max() == 0 and grads[1.0][:, 1:].abs().max() > 0


def test_short_overfit_lowers_the_loss():
    """Eight 14x14 images, a tiny U-Net, 150 Adam steps: L_simple falls from 1.0 (the zero-initialised head)
    to below 0.2 (it reaches about 0.07)."""
    torch.manual_seed(0)
    from conftest import fake_digits
    x0 = torch.nn.functional.avg_pool2d(common.uint8_to_signed(torch.from_numpy(fake_digits(8, seed=3)[0])[:, None]), 2)
    mcfg = ddpm.ModelConfig(timesteps=100, channels=16, channel_mults="1,2", num_res_blocks=1, dropout=0.0)
    d, model = ddpm.Diffusion(mcfg, "cpu"), ddpm.build_model(mcfg, (1, 14, 14))
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    losses = []
    for _ in range(150):
        loss, _ = ddpm.loss_fn(d, model, x0)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(1.0, abs=0.15)
    assert sum(losses[-20:]) / 20 < 0.2


@pytest.mark.parametrize("size", [(28, 28), (32, 32)])
@pytest.mark.parametrize("channels", [1, 3])
def test_unet_shapes(size, channels):
    for variance, k in (("fixed-large", 1), ("learned", 2)):
        mcfg = ddpm.ModelConfig(channels=8, channel_mults="1,2,2", num_res_blocks=1, variance=variance)
        model = ddpm.build_model(mcfg, (channels, *size))
        assert model(torch.randn(2, channels, *size), torch.tensor([0, 999])).shape == (2, k * channels, *size)


@pytest.mark.parametrize("mults,words", [("1,2,2,2,2", "cannot be halved 4 times"), ("", "positive integers"),
                                         ("1,x", "positive integers"), ("1,0", "positive integers")])
def test_sizes_the_unet_cannot_take(mults, words):
    with pytest.raises(common.UsageError, match=words):
        ddpm.build_model(ddpm.ModelConfig(channel_mults=mults), (1, 28, 28))
    with pytest.raises(common.UsageError, match="multiple of 8"):
        ddpm.build_model(ddpm.ModelConfig(channels=12), (1, 28, 28))


# ----------------------------------------------------------------------------- class-conditional: label dropout and guidance

def tiny_conditional(seed=0, variance="fixed-small", perturb=False):
    """A conditional U-Net for 8x8 images; perturb=True: random weights everywhere, the zero-initialised layers
    included, so that every output depends on x, t and y."""
    torch.manual_seed(seed)
    mcfg = ddpm.ModelConfig(timesteps=50, channels=16, channel_mults="1,2", num_res_blocks=1, dropout=0.0,
                            variance=variance, conditional=True)
    model = ddpm.build_model(mcfg, (1, 8, 8)).eval()
    for p in model.parameters() if perturb else []:
        p.data.normal_(0, 0.3)
    return ddpm.Diffusion(mcfg, "cpu"), model


def test_label_dropout_replaces_a_label_by_the_null_class_with_probability_p_uncond():
    d, seen = diffusion(50), []
    spy = lambda x_t, t, y: seen.append(y) or torch.zeros_like(x_t)
    y = torch.arange(4000) % 10
    for p in (0.0, 0.1, 1.0):
        seen.clear()
        ddpm.loss_fn(d, spy, torch.zeros(4000, 1, 2, 2), y=y, p_uncond=p)
        dropped = seen[0] == ddpm.NULL_CLASS
        assert torch.equal(seen[0][~dropped], y[~dropped])  # a kept label is the image's own
        assert dropped.float().mean().item() == pytest.approx(p, abs=0.02)


def test_the_null_class_is_a_learned_vector_of_its_own_and_no_label_means_null():
    d, model = tiny_conditional(perturb=True)
    x, t = torch.randn(3, 1, 8, 8), torch.tensor([0, 20, 49])
    null = torch.full((3,), ddpm.NULL_CLASS)
    assert model.class_embed.num_embeddings == 11
    assert torch.equal(model(x, t), model(x, t, null))
    assert not torch.allclose(model(x, t, torch.tensor([1, 2, 3])), model(x, t, null))


@pytest.mark.parametrize("variance", ["fixed-small", "learned"])
def test_guidance_is_one_plus_w_conditional_minus_w_unconditional(variance):
    """eps~ = (1 + w) eps(x, y) - w eps(x, null), computed here with two separate passes; Sigma (v) is the
    conditional pass's."""
    _, model = tiny_conditional(variance=variance, perturb=True)
    x, t, y = torch.randn(4, 1, 8, 8), torch.tensor([3, 10, 30, 49]), torch.tensor([0, 7, 7, 9])
    cond, uncond = model(x, t, y), model(x, t, torch.full_like(y, ddpm.NULL_CLASS))
    assert not torch.allclose(cond[:, :1], uncond[:, :1], atol=1e-3)
    for w in (0.0, 1.0, 3.0):
        out = ddpm.guided(model, x, t, y, w)
        assert torch.allclose(out[:, :1], (1 + w) * cond[:, :1] - w * uncond[:, :1], atol=1e-5)
        assert torch.allclose(out[:, 1:], cond[:, 1:], atol=1e-6)


@pytest.mark.parametrize("sampler", ["ancestral", "ddim"])
def test_guidance_0_is_exactly_the_conditional_sampler_and_never_asks_for_the_null_class(sampler):
    """w = 0 samples p(x | y) itself: the same images as a sampler given the conditional model alone (a wrapper
    that fails on the null class), bit for bit; w = 3 draws other images from the same x_T."""
    d, model = tiny_conditional(perturb=True)
    y = torch.tensor([0, 3, 9])

    def conditional_only(x, t, y):
        assert y is not None and (y != ddpm.NULL_CLASS).all()
        return model(x, t, y)
    draw = {"ancestral": lambda m, w: ddpm.sample_ancestral(d, m, (3, 1, 8, 8), torch.Generator().manual_seed(0), y, w),
            "ddim": lambda m, w: ddpm.sample_ddim(d, m, (3, 1, 8, 8), 10, 0.0, torch.Generator().manual_seed(0), y, w)}
    assert torch.equal(draw[sampler](model, 0.0)[0], draw[sampler](conditional_only, 0.0)[0])
    assert not torch.allclose(draw[sampler](model, 3.0)[0], draw[sampler](model, 0.0)[0], atol=1e-3)


def halves(labels):
    """8x8 images in [-1, 1] where the class decides the picture: class 0 has its left half on, class 1 its right."""
    x = -torch.ones(len(labels), 1, 8, 8)
    left = (labels == 0)[:, None, None]
    x[:, 0, :, :4] = torch.where(left, 1.0, -1.0)
    x[:, 0, :, 4:] = torch.where(left, -1.0, 1.0)
    return x


def brighter_half(x):
    """0 where the left half of an 8x8 image is brighter, 1 where the right is."""
    return (x[:, 0, :, 4:].mean((1, 2)) > x[:, 0, :, :4].mean((1, 2))).long()


def test_a_conditional_model_draws_the_class_it_is_asked_for():
    """Trained 200 steps on halves (label dropped with p = 0.1): asked for class 0 or 1, the DDIM sampler draws it
    in at least 90% of 32 images each (chance: 50%), with and without guidance."""
    d, model = tiny_conditional(seed=1)
    opt = torch.optim.Adam(model.train().parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    for _ in range(200):
        y = torch.randint(0, 2, (32,), generator=gen)
        loss, _ = ddpm.loss_fn(d, model, halves(y), y=y, p_uncond=0.1)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    for label in (0, 1):
        y = torch.full((32,), label)
        for w in (0.0, 2.0):
            x, _ = ddpm.sample_ddim(d, model, (32, 1, 8, 8), 20, 0.0, torch.Generator().manual_seed(1), y, w)
            assert (brighter_half(x) == label).float().mean() >= 0.9, (label, w)


# ----------------------------------------------------------------------------- the script end to end

def run(argv, capsys=None):
    ddpm.main([str(a) for a in argv])
    return capsys.readouterr().out if capsys else None


def logged_steps(out):
    return [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines()]


def test_train_then_sample_and_eval_with_no_model_flag(data_dir, tmp_path, capsys):
    out = tmp_path / "run"
    run(["--data-dir", data_dir, "--out", out, *TINY, "--steps", 3, "--sample-every", 2, "--ckpt-every", 2])
    for f in ("config.json", "log.jsonl", "ckpt.pt", "samples_2.png", "samples_3.png", "forward_process.png", "reverse_process.png"):
        assert (out / f).exists(), f
    logs = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logs] == [1, 2, 3] and all(math.isfinite(r["loss"]) for r in logs)

    text = run(["--data-dir", data_dir, "--out", out, "--sample", "--sampler", "ddim", "--sample-steps", 5, "--num-samples", 4], capsys)
    samples = torch.load(out / "samples.pt")
    assert samples.shape == (4, 1, 28, 28) and samples.min() >= 0 and samples.max() <= 1 and "4 samples" in text
    assert (out / "samples.png").exists()

    result = run_eval = ddpm.main(["--data-dir", str(data_dir), "--out", str(out), "--eval", "--eval-n", "8"])
    total = result["NLL <=   total (bits/dim)"]
    assert math.isfinite(total) and total > 0 and json.loads((out / "eval.json").read_text()) == run_eval
    assert total == pytest.approx(sum(v for k, v in result.items() if k.startswith("L_")), rel=1e-6)


def test_learned_variance_and_cifar_train(data_dir, tmp_path):
    run(["--data-dir", data_dir, "--out", tmp_path / "c", *TINY, "--dataset", "cifar10", "--variance", "learned",
         "--steps", 2, "--sample-every", 100])
    assert torch.load(tmp_path / "c" / "ckpt.pt", weights_only=True)["step"] == 2
    assert json.loads((tmp_path / "c" / "config.json").read_text())["model"]["variance"] == "learned"


def test_a_conditional_run_samples_a_class_with_guidance_and_evaluates_p_x_given_y(data_dir, tmp_path, capsys):
    out = tmp_path / "cond"
    run(["--data-dir", data_dir, "--out", out, *TINY, "--steps", 2, "--sample-every", 2, "--conditional",
         "--num-samples", 20, "--sampler", "ddim", "--sample-steps", 3])
    assert json.loads((out / "config.json").read_text())["model"]["conditional"] is True
    assert (out / "guidance.png").exists() and (out / "samples_2.png").exists()
    text = run(["--data-dir", data_dir, "--out", out, "--sample", "--label", 3, "--guidance", 2, "--num-samples", 5], capsys)
    assert "guidance w = 2" in text and torch.equal(torch.load(out / "labels.pt"), torch.full((5,), 3))
    assert torch.load(out / "samples.pt").shape == (5, 1, 28, 28)
    run(["--data-dir", data_dir, "--out", out, "--sample", "--num-samples", 12])  # no --label: the classes in turn
    assert torch.equal(torch.load(out / "labels.pt"), torch.arange(12) % 10)
    text = run(["--data-dir", data_dir, "--out", out, "--eval", "--eval-n", 4], capsys)
    assert "-log p(x | y)" in text
