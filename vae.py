r"""Variational autoencoder: an autoencoder made generative by making its code z a random variable.

The decoder defines p_theta(x) = integral p(z) p_theta(x|z) dz with the prior p(z) = N(0, I); that
integral is intractable, so an encoder q_phi(z|x) = N(mu, diag sigma^2) approximates the posterior and both
are trained on the evidence lower bound (Kingma & Welling 2014, "Auto-Encoding Variational Bayes"):

    log p(x) = E_q[log p(x|z)] - KL(q(z|x) || p(z)) + KL(q(z|x) || p(z|x))
            >= E_q[log p(x|z)] - KL(q(z|x) || p(z))                        = ELBO

The last KL cannot be computed; --eval estimates log p(x) itself by importance sampling (Burda et al. 2016,
"Importance Weighted Autoencoders"), log p(x) ~ log 1/K sum_k p(x, z_k) / q(z_k|x), and shows the gap.

    python vae.py                                   # the conv VAE, sized for one GPU
    python vae.py --arch mlp --hidden 512 --layers 2 --steps 45000 --batch-size 256 --lr 1.5e-3 \
        --device cpu --out runs/vae-cpu             # the quick CPU run in README: 85.9 nats, 8 min on 2 cores
    python vae.py --arch mlp --hidden 512 --layers 2 --out runs/vae-cpu --eval         # ELBO, IW log p(x), gap
    python vae.py --arch mlp --hidden 512 --layers 2 --out runs/vae-cpu --sample       # samples, reconstructions,
                                                    # interpolations (and with --z-dim 2 the manifold and latents)
"""
import dataclasses
import json
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import common


@dataclasses.dataclass
class Config(common.TrainConfig):
    lr: float = common.opt(1e-3, "Adam learning rate (decays to 0 on a cosine)", runtime=True)
    steps: int = common.opt(100000, "training steps", runtime=True)
    sample_every: int = common.opt(5000, "steps between sample grids and a test-ELBO line", runtime=True)
    ckpt_every: int = common.opt(5000, "steps between checkpoints", runtime=True)
    arch: str = common.opt("conv", "encoder/decoder: mlp (784-hidden-z) or conv", choices=["mlp", "conv"])
    z_dim: int = common.opt(32, "latent size (2 for the manifold and latent-scatter pictures)")
    hidden: int = common.opt(400, "mlp: hidden units per layer (784-400-z is the classic)")
    layers: int = common.opt(1, "mlp: hidden layers in the encoder and in the decoder")
    channels: int = common.opt(64, "conv: channels at full/2 resolution (twice as many at full/4)")
    blocks: int = common.opt(2, "conv: residual blocks at each resolution")
    beta: float = common.opt(1.0, "weight of KL(q(z|x) || p(z)) in the loss (beta-VAE; 1 = the ELBO)", runtime=True)
    eval: bool = common.opt(False, "evaluate the checkpoint in --out on the test set", runtime=True)
    iw_samples: int = common.opt(1000, "--eval: importance samples K per test image (5000 in the papers)", runtime=True)
    eval_n: int = common.opt(0, "--eval: only the first N test images (0 = all)", runtime=True)
    eval_chunk: int = common.opt(4096, "--eval: decoder evaluations per chunk (bounds memory)", runtime=True)


# ----------------------------------------------------------------------------- likelihoods p(x|z)

def bernoulli_log_prob(logits, x):
    """log p(x|z) = sum_i x_i log p_i + (1 - x_i) log(1 - p_i), p_i = sigmoid(logit_i), x_i in {0, 1}: nats per
    image (sums the last three dims, so a stack of K decoder outputs broadcasts against one x).
    With log sigmoid(l) = l - softplus(l) and log(1 - sigmoid(l)) = -softplus(l) this is x l - softplus(l)."""
    return (x * logits - F.softplus(logits)).flatten(-3).sum(-1)


def discretized_logistic_log_prob(mean, log_scale, x):
    """log p(x|z) for 8-bit data scaled to [-1, 1]: each sub-pixel's logistic(mean, s) integrated over its bin
    of width 2/255, P(x) = sigmoid((x + 1/255 - mean)/s) - sigmoid((x - 1/255 - mean)/s), with the edge bins
    reaching to -inf and +inf so the 256 probabilities sum to one (PixelCNN++, Salimans et al. 2017)."""
    inv_s = torch.exp(-log_scale)
    plus, minus = inv_s * (x + 1 / 255 - mean), inv_s * (x - 1 / 255 - mean)
    log_cdf_plus = F.logsigmoid(plus)  # level 0 (x = -1): log P(X <= x + half a bin)
    log_one_minus_cdf_minus = F.logsigmoid(-minus)  # level 255 (x = 1): log P(X > x - half a bin)
    # other levels: sigmoid(a) - sigmoid(b) = sigmoid(a) sigmoid(-b) (1 - e^(b - a)), exact and stable in logs
    log_mid = log_cdf_plus + log_one_minus_cdf_minus + torch.log((-torch.expm1(minus - plus)).clamp(min=1e-12))
    log_p = torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_minus, log_mid))
    return log_p.flatten(-3).sum(-1)


# ----------------------------------------------------------------------------- encoders and decoders

def mlp(sizes):
    """Linear layers with ELU between them (none after the last). ELU, not ReLU: it has no dead units and a
    smooth gradient, and on the quick CPU recipe it gave a 2.5-nat better IW NLL in the same time (README)."""
    layers = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers += [nn.Linear(a, b)] + ([nn.ELU()] if i < len(sizes) - 2 else [])
    return nn.Sequential(*layers)


class ResBlock(nn.Module):
    def __init__(self, ch):
        super().__init__()
        self.net = nn.Sequential(nn.ReLU(), nn.Conv2d(ch, ch, 3, padding=1), nn.ReLU(), nn.Conv2d(ch, ch, 3, padding=1))

    def forward(self, x):
        return x + self.net(x)


def conv_encoder(c, h, w, ch, blocks, out):
    """x (B x c x h x w) -> two stride-2 convs (h/4 x w/4) with residual blocks -> linear -> `out` numbers."""
    return nn.Sequential(
        nn.Conv2d(c, ch, 4, 2, 1), *[ResBlock(ch) for _ in range(blocks)], nn.ReLU(),
        nn.Conv2d(ch, 2 * ch, 4, 2, 1), *[ResBlock(2 * ch) for _ in range(blocks)], nn.ReLU(),
        nn.Flatten(), nn.Linear(2 * ch * (h // 4) * (w // 4), out))


def conv_decoder(z_dim, c_out, h, w, ch, blocks):
    """z -> linear to 2ch x h/4 x w/4 -> two stride-2 transposed convs with residual blocks -> c_out x h x w."""
    return nn.Sequential(
        nn.Linear(z_dim, 2 * ch * (h // 4) * (w // 4)), nn.Unflatten(1, (2 * ch, h // 4, w // 4)),
        *[ResBlock(2 * ch) for _ in range(blocks)], nn.ReLU(),
        nn.ConvTranspose2d(2 * ch, ch, 4, 2, 1), *[ResBlock(ch) for _ in range(blocks)], nn.ReLU(),
        nn.ConvTranspose2d(ch, c_out, 4, 2, 1))


class VAE(nn.Module):
    """q_phi(z|x) = N(mu, diag exp(logvar)), p(z) = N(0, I), and p_theta(x|z): Bernoulli for binarized 1-channel
    images, discretized logistic for 8-bit colour images."""

    def __init__(self, cfg, shape):
        super().__init__()
        c, h, w = shape
        self.shape, self.z_dim, self.binary = shape, cfg.z_dim, c == 1
        k = 1 if self.binary else 2  # decoder numbers per sub-pixel: a logit, or a (mean, log-scale) pair
        d = c * h * w
        if cfg.arch == "mlp":
            sizes = [cfg.hidden] * cfg.layers
            self.encoder = nn.Sequential(nn.Flatten(), mlp([d, *sizes, 2 * cfg.z_dim]))
            self.decoder = nn.Sequential(mlp([cfg.z_dim, *sizes, k * d]), nn.Unflatten(1, (k * c, h, w)))
        else:
            if h % 4 or w % 4:
                raise common.UsageError(f"--arch conv needs height and width divisible by 4, not {h}x{w}; use --arch mlp")
            self.encoder = conv_encoder(c, h, w, cfg.channels, cfg.blocks, 2 * cfg.z_dim)
            self.decoder = conv_decoder(cfg.z_dim, k * c, h, w, cfg.channels, cfg.blocks)

    def encode(self, x):
        """x -> (mu, logvar) of q(z|x); x in {0, 1} (binary) or [-1, 1] (colour)."""
        mu, logvar = self.encoder(x).chunk(2, dim=1)
        return mu, logvar

    def log_px_given_z(self, out, x):
        """log p_theta(x|z) in nats per image, from the decoder output `out`."""
        if self.binary:
            return bernoulli_log_prob(out, x)
        mean, log_scale = out.chunk(2, dim=-3)
        return discretized_logistic_log_prob(mean, log_scale.clamp(min=-7), x)  # s >= e^-7: no zero-width logistic

    def mean_image(self, out):
        """The decoder's mean image in [0, 1]: the Bernoulli means sigmoid(logits), or the logistic means."""
        return torch.sigmoid(out) if self.binary else (out.chunk(2, dim=-3)[0].clamp(-1, 1) + 1) / 2


# ----------------------------------------------------------------------------- the loss: negative ELBO

def reparameterize(mu, logvar, eps=None):
    """z = mu + sigma * eps, eps ~ N(0, I). Sampling z ~ N(mu, sigma^2) directly would cut the graph (a draw has
    no derivative with respect to its parameters); written this way all randomness sits in eps, which does not
    depend on phi, and z is a smooth function of (mu, logvar): dz/dmu = 1, dz/dlogvar = sigma * eps / 2."""
    eps = torch.randn_like(mu) if eps is None else eps
    return mu + torch.exp(0.5 * logvar) * eps  # sigma = exp(logvar / 2)


def kl_to_prior(mu, logvar):
    """KL(N(mu, diag sigma^2) || N(0, I)) = -1/2 sum_j (1 + log sigma_j^2 - mu_j^2 - sigma_j^2), per image."""
    return -0.5 * (1 + logvar - mu.pow(2) - logvar.exp()).sum(1)


def prepare(model, x_uint8, generator=None):
    """uint8 images -> what the model sees: stochastic binarization (1 channel, training), or [-1, 1] (colour)."""
    return common.binarize(x_uint8, generator) if model.binary else common.to_signed(x_uint8)


def loss_fn(model, x, beta=1.0):
    """Negative ELBO = reconstruction -E_q[log p(x|z)] (one z per image) + beta * KL(q(z|x) || p(z))."""
    mu, logvar = model.encode(x)
    z = reparameterize(mu, logvar)
    rec = -model.log_px_given_z(model.decoder(z), x).float()  # one-sample estimate of -E_q[log p(x|z)]
    kl = kl_to_prior(mu.float(), logvar.float())
    loss = (rec + beta * kl).mean()
    return loss, dict(loss=loss.detach(), rec=rec.mean().detach(), kl=kl.mean().detach(), neg_elbo=(rec + kl).mean().detach())


# ----------------------------------------------------------------------------- evaluation: ELBO and IW log p(x)

def log_normal(z, mu, logvar):
    """log N(z; mu, diag exp(logvar)), summed over the last dimension."""
    return -0.5 * (math.log(2 * math.pi) + logvar + (z - mu).pow(2) / logvar.exp()).sum(-1)


@torch.no_grad()
def elbo_and_iw(model, x, k, chunk=4096):
    """For each image: (ELBO, IW estimate of log p(x)) with K samples z_k ~ q(z|x) (Burda et al. 2016):
        ELBO  ~ 1/K sum_k log p(x|z_k) - KL(q(z|x) || p(z))        (closed-form KL)
        log p(x) ~ log 1/K sum_k w_k,  w_k = p(x|z_k) p(z_k) / q(z_k|x)
    The K samples are drawn in chunks of at most `chunk` decoder evaluations, so memory stays bounded."""
    mu, logvar = model.encode(x)
    b, per = len(x), max(1, chunk // len(x))  # samples per image in one chunk
    log_w, log_px_z = [], []
    for start in range(0, k, per):
        n = min(per, k - start)
        z = reparameterize(mu.unsqueeze(0).expand(n, -1, -1), logvar.unsqueeze(0).expand(n, -1, -1))  # n x B x z
        out = model.decoder(z.flatten(0, 1)).unflatten(0, (n, b))  # n x B x C x H x W
        lpxz = model.log_px_given_z(out, x).float()  # x broadcasts over the n samples: n x B
        log_pz = log_normal(z, torch.zeros_like(z), torch.zeros_like(z))
        log_w.append(lpxz + log_pz - log_normal(z, mu, logvar))  # log p(x|z) + log p(z) - log q(z|x)
        log_px_z.append(lpxz)
    log_w, log_px_z = torch.cat(log_w), torch.cat(log_px_z)  # K x B
    elbo = log_px_z.mean(0) - kl_to_prior(mu.float(), logvar.float())
    iw = torch.logsumexp(log_w, 0) - math.log(k)  # log of the mean weight, computed without overflow
    return elbo, iw


@torch.no_grad()
def test_elbo(model, x_test, batch=500):
    """Mean negative ELBO over test images with one z each (cheap progress figure during training)."""
    return sum(float(-elbo_and_iw(model, x_test[i:i + batch], 1)[0].sum()) for i in range(0, len(x_test), batch)) / len(x_test)


def evaluate(cfg):
    device = common.get_device(cfg.device)
    model, out, x_test, _ = load_model(cfg, device)
    if cfg.eval_n:
        x_test = x_test[:cfg.eval_n]
    torch.manual_seed(cfg.seed)
    per_image = max(1, min(len(x_test), cfg.eval_chunk // min(cfg.iw_samples, cfg.eval_chunk)))  # images per batch
    elbo, iw = [], []
    for i in tqdm(range(0, len(x_test), per_image), desc=f"ELBO and IW log p(x), K={cfg.iw_samples}", unit="batch"):
        e, w = elbo_and_iw(model, x_test[i:i + per_image], cfg.iw_samples, cfg.eval_chunk)
        elbo.append(e)
        iw.append(w)
    elbo, iw = torch.cat(elbo).mean().item(), torch.cat(iw).mean().item()
    dims = math.prod(model.shape)
    rows = [("negative ELBO  -E_q[log p(x|z)] + KL(q||p(z))", -elbo),
            (f"IW NLL  -log p(x), K={cfg.iw_samples}", -iw),
            ("gap = KL(q(z|x) || p(z|x)) (IW estimate)", iw - elbo)]
    unit = "nats/image" if model.binary else "nats/image   bits/dim"
    print(f"test set: {len(x_test)} images of {cfg.dataset}, checkpoint {out / 'ckpt.pt'}")
    print(f"{'':48s} {unit}")
    for name, v in rows:
        print(f"{name:48s} {v:10.3f}" + ("" if model.binary else f"   {common.nats_to_bits_per_dim(v, dims):8.4f}"))
    result = dict(n=len(x_test), iw_samples=cfg.iw_samples, neg_elbo=-elbo, iw_nll=-iw, gap=iw - elbo)
    common.atomic_write_text(out / "eval.json", json.dumps(result, indent=2))
    return result


# ----------------------------------------------------------------------------- pictures

PALETTE = torch.tensor([[31, 119, 180], [255, 127, 14], [44, 160, 44], [214, 39, 40], [148, 103, 189],
                        [140, 86, 75], [227, 119, 194], [127, 127, 127], [188, 189, 34], [23, 190, 207]]) / 255


@torch.no_grad()
def sample_prior(model, n, generator=None):
    """x ~ p(x|z), z ~ p(z) = N(0, I); returns the Bernoulli (or logistic) means, N x C x H x W in [0, 1]."""
    z = torch.randn(n, model.z_dim, generator=generator, device=generator.device if generator else "cpu")
    return model.mean_image(model.decoder(z.to(next(model.parameters()).device)))


@torch.no_grad()
def reconstructions(model, x, rows=4, cols=8):
    """Rows of test inputs, each over its reconstruction (the decoder's mean at z = mu)."""
    cols = min(cols, len(x))
    x = x[:cols * min(rows, len(x) // cols)]
    rec = model.mean_image(model.decoder(model.encode(x)[0]))
    show = x if model.binary else (x + 1) / 2
    return torch.stack([show.unflatten(0, (-1, cols)), rec.unflatten(0, (-1, cols))], 1).flatten(0, 2), cols


@torch.no_grad()
def interpolation(model, x, pairs=8, steps=10):
    """Decode z = (1 - t) mu_a + t mu_b, t from 0 to 1, between the posterior means of pairs of test images."""
    pairs = max(1, min(pairs, len(x) // 2))
    mu = model.encode(x[:2 * pairs])[0]
    t = torch.linspace(0, 1, steps, device=mu.device)[None, :, None]
    z = (1 - t) * mu[0::2, None] + t * mu[1::2, None]  # pairs x steps x z
    return model.mean_image(model.decoder(z.flatten(0, 1)))


@torch.no_grad()
def manifold(model, n=20):
    """z_dim = 2: decode a grid of prior quantiles z = Phi^-1(p), p in (0.05 .. 0.95), like Kingma & Welling fig. 4."""
    q = torch.distributions.Normal(0.0, 1.0).icdf(torch.linspace(0.05, 0.95, n))
    z = torch.stack(torch.meshgrid(q.flip(0), q, indexing="ij")[::-1], -1).flatten(0, 1)  # rows: z2 high to low
    return model.mean_image(model.decoder(z.to(next(model.parameters()).device)))


@torch.no_grad()
def latent_scatter(model, x, y, size=400, lim=4.0):
    """z_dim = 2: the posterior means of test images as dots coloured by label, drawn into a 3 x size x size image."""
    mu = torch.cat([model.encode(x[i:i + 1000])[0] for i in range(0, len(x), 1000)]).cpu()
    pix = ((mu.clamp(-lim, lim) + lim) / (2 * lim) * (size - 3)).long()  # z in [-lim, lim] -> pixel, 1 px margin
    img = torch.ones(3, size, size)
    colors = PALETTE[y.cpu() % 10] if y is not None else PALETTE[:1].expand(len(mu), 3)  # folders have no labels
    for dy in (0, 1, 2):  # 3 x 3 dots
        for dx in (0, 1, 2):
            img[:, size - 1 - pix[:, 1] - dy, pix[:, 0] + dx] = colors.T  # image rows go down, z2 goes up
    return img


def load_model(cfg, device):
    out = common.out_dir(cfg, "vae")
    x_test, y_test = common.load_dataset(cfg.dataset, cfg.data_dir, "test", device)
    model = VAE(cfg, tuple(x_test.shape[1:])).to(device)
    common.load_checkpoint(out / "ckpt.pt", "vae", cfg, model=model)
    model.eval()
    # the test set: one fixed seeded binarization (the same in every run), or [-1, 1] colour
    x_test = common.fixed_binarization(x_test) if model.binary else common.to_signed(x_test)
    return model, out, x_test, y_test


def sample_from_checkpoint(cfg):
    device = common.get_device(cfg.device)
    model, out, x_test, y_test = load_model(cfg, device)
    gen = common.data_generator("cpu", cfg.seed)
    samples = sample_prior(model, cfg.num_samples, gen).cpu()
    common.save_grid(samples, out / "samples.png")
    torch.save(samples, out / "samples.pt")
    grid, cols = reconstructions(model, x_test)
    common.save_grid(grid, out / "reconstructions.png", nrow=cols)
    common.save_grid(interpolation(model, x_test), out / "interpolation.png", nrow=10)
    if cfg.z_dim == 2:
        common.save_grid(manifold(model), out / "manifold.png", nrow=20)
        common.save_grid(latent_scatter(model, x_test, y_test)[None], out / "latents.png", nrow=1)
    print(f"wrote samples.png, samples.pt ({tuple(samples.shape)}), reconstructions.png, interpolation.png"
          + (", manifold.png, latents.png" if cfg.z_dim == 2 else "") + f" in {out}")


# ----------------------------------------------------------------------------- training

def train(cfg):
    device = common.get_device(cfg.device)
    common.seed_everything(cfg.seed)
    out = common.start_run(cfg, "vae")
    x, _ = common.load_dataset(cfg.dataset, cfg.data_dir, "train", device)
    x_test, _ = common.load_dataset(cfg.dataset, cfg.data_dir, "test", device)
    model = VAE(cfg, tuple(x.shape[1:])).to(device)
    x_test = (common.fixed_binarization(x_test) if model.binary else common.to_signed(x_test))[:1000]
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    gen = common.data_generator(device, cfg.seed)
    step = common.load_checkpoint(out / "ckpt.pt", "vae", cfg, model=model, opt=opt, gen=gen) if cfg.resume else 0
    step_loss = torch.compile(loss_fn) if cfg.compile else loss_fn  # compiling the function keeps state_dict keys
    log = common.Logger(out, cfg.steps, step)
    save = lambda: common.save_checkpoint(out / "ckpt.pt", "vae", cfg, step, model=model, opt=opt, gen=gen)
    print(f"vae: {sum(p.numel() for p in model.parameters()):,} parameters, {cfg.arch}, z {cfg.z_dim}, {device}")
    try:
        while step < cfg.steps:
            rng_at_step = gen.get_state(), torch.get_rng_state()  # so a Ctrl-C mid-step saves the step's start
            for group in opt.param_groups:  # cosine decay of the learning rate to 0 over the run
                group["lr"] = cfg.lr * 0.5 * (1 + math.cos(math.pi * step / cfg.steps))
            batch = prepare(model, common.random_batch(x, cfg.batch_size, gen), gen)
            with common.autocast(device, cfg.precision):
                loss, figures = step_loss(model, batch, cfg.beta)
            common.check_finite(loss, step)
            if not model.binary:  # 8-bit colour: the bound also in bits per sub-pixel, the unit papers report
                figures["bits_per_dim"] = common.nats_to_bits_per_dim(figures["neg_elbo"], math.prod(model.shape))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            log.count(cfg.batch_size)
            if step % cfg.sample_every == 0 or step == cfg.steps:
                model.eval()
                figures["test_neg_elbo"] = test_elbo(model, x_test)  # 1000 fixed test images, one z each
                common.save_grid(sample_prior(model, 64, common.data_generator("cpu", 0)), out / f"samples_{step}.png")
                model.train()
            if step % cfg.log_every == 0 or "test_neg_elbo" in figures:
                log.log(step, **figures)
            if step % cfg.ckpt_every == 0 or step == cfg.steps:
                save()
    except KeyboardInterrupt:
        gen.set_state(rng_at_step[0])  # the unfinished step is dropped: rewind the RNGs it drew from
        torch.set_rng_state(rng_at_step[1])
        save()
        print(f"interrupted: checkpoint saved at step {step}")
        raise SystemExit(130)


@common.entry
def main(argv=None):
    cfg = common.parse_config(Config, argv)
    if cfg.sample:
        sample_from_checkpoint(cfg)
    elif cfg.eval:
        return evaluate(cfg)
    else:
        train(cfg)


if __name__ == "__main__":
    main()
