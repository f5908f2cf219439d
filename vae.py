r"""Variational autoencoder: an autoencoder made generative by making its code z a random variable.

The decoder defines p_theta(x) = integral p(z) p_theta(x|z) dz with the prior p(z) = N(0, I); that
integral is intractable, so an encoder q_phi(z|x) = N(mu, diag sigma^2) approximates the posterior and both
are trained on the evidence lower bound (Kingma & Welling 2014, "Auto-Encoding Variational Bayes"):

    log p(x) = E_q[log p(x|z)] - KL(q(z|x) || p(z)) + KL(q(z|x) || p(z|x))
            >= E_q[log p(x|z)] - KL(q(z|x) || p(z))                        = ELBO
    z = mu + sigma * eps, eps ~ N(0, I)        (the reparameterization: the gradient reaches mu and sigma)

The last KL cannot be computed; --eval estimates log p(x) itself by importance sampling (Burda et al. 2016,
"Importance Weighted Autoencoders"), log p(x) ~ log 1/K sum_k p(x, z_k) / q(z_k|x), and shows the gap.
1-channel images are binarized (a Bernoulli decoder); colour images keep 8 bits (a discretized logistic).
The pictures show p(x|z) at its mode, its most probable image (binary data: each pixel 0 or 1, as sharp as the
data), or with --show mean at its mean (grey where the decoder is unsure: the blur VAE samples are known for).

--conditional makes it a model of p(x|y) for the class y: the one-hot y goes into the encoder q(z|x,y) and the
decoder p(x|z,y), and the prior stays p(z) = N(0, I). That is the generative model of Kingma, Rezende, Mohamed &
Welling 2014 ("Semi-Supervised Learning with Deep Generative Models", M2: p(z) = N(0, I), p_theta(x|y,z),
q_phi(z|y,x)), here with y always given. (Sohn, Lee & Yan 2015's CVAE learns a prior conditioned on its input, here
p(z|y); they note it can be relaxed to p(z), which is this model.)

    log p(x|y) >= E_q(z|x,y)[log p(x|z,y)] - KL(q(z|x,y) || p(z))

With p(z) = N(0, I) the KL stays in closed form and sampling stays "z from the prior", now decoded with the class
asked for. y is given, so z need not carry the class: it is left with the style (slant, thickness), and --label
picks the class.

    python vae.py                           # the recipe for the device: quick on a CPU (an MLP), full on a GPU (conv)
    python vae.py --eval                    # ELBO, IW log p(x), gap (no model flag: the checkpoint has them)
    python vae.py --sample                  # samples, reconstructions, interpolation
    python vae.py --sample --show mean      # the same, decoded to p(x|z)'s means
    python vae.py --z-dim 2 --steps 10000 --out runs/vae-z2
    python vae.py --out runs/vae-z2 --sample   # also the decoded manifold and the test codes by label
    python vae.py --conditional --out runs/vae-cond        # p(x|y); --eval reports -log p(x|y)
    python vae.py --out runs/vae-cond --sample --label 7   # sevens (no --label: one row per class)
"""
import dataclasses
import math
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import common


@dataclasses.dataclass
class ModelConfig(common.ModelConfig):
    arch: str = common.opt("conv", "encoder/decoder: mlp (784-hidden-z) or conv", choices=["mlp", "conv"])
    z_dim: int = common.opt(32, "latent size (2 for the manifold and latent-scatter pictures)", "[1, inf)")
    hidden: int = common.opt(400, "mlp: hidden units per layer (400 as in the PyTorch VAE example, 784-400-20; "
                             "Kingma & Welling 2014 used 500 on MNIST)", "[1, inf)")
    layers: int = common.opt(1, "mlp: hidden layers in the encoder and in the decoder", "[1, inf)")
    channels: int = common.opt(64, "conv: channels at full/2 resolution (twice as many at full/4)", "[1, inf)")
    blocks: int = common.opt(2, "conv: residual blocks at each resolution", "[1, inf)")


@dataclasses.dataclass
class Config(common.RunConfig):
    lr: float = common.opt(1e-3, "Adam learning rate (decays to 0 on a cosine)", "(0, inf)")
    steps: int = common.opt(100000, "training steps", "[1, inf)")
    sample_every: int = common.opt(5000, "steps between sample grids and a test-ELBO figure", "[1, inf)")
    ckpt_every: int = common.opt(5000, "steps between checkpoints", "[1, inf)")
    beta: float = common.opt(1.0, "weight of KL(q(z|x) || p(z)) in the loss (beta-VAE; 1 = the ELBO)", "[0, inf)")
    iw_samples: int = common.opt(1000, "--eval: importance samples K per test image (5000 in the papers)", "[1, inf)")
    eval_n: int = common.opt(0, "--eval: only the first N test images (0 = all)", "[0, inf)")
    eval_chunk: int = common.opt(4096, "--eval: decoder evaluations per chunk (bounds memory)", "[1, inf)")
    show: str = common.opt("mode", "what the pictures and samples show of p(x|z): mode, its most probable image "
                           "(binary data: sharp 0/1 pixels), or mean (binary data: grey where the decoder is unsure)",
                           choices=["mode", "mean"])


PRESETS = {  # the recipe of a bare command, quick on a CPU, full on a CUDA GPU (--preset); a flag you give always wins
    "full": dict(about="the full model, a conv VAE for 100k steps of 128, sized for one GPU", options={}),
    "quick": dict(about="the quick run, an MLP 784-512-512-32, batches of 256 for 10 minutes of training "
                        "(--max-minutes 10; at most 80k steps)",
                options=dict(arch="mlp", hidden=512, layers=2, max_minutes=10.0, steps=80000, sample_every=10000,
                             batch_size=256, lr=1.5e-3)),
}


# ----------------------------------------------------------------------------- the mathematics: p(x|z), z ~ q, the KL
# The likelihoods p_theta(x|z) the decoder's output defines, the reparameterized draw z ~ q_phi(z|x), and the KL of
# q_phi(z|x) to the prior in closed form: the three pieces of the ELBO, used by VAE.forward and loss_fn below.

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


def reparameterize(mu, logvar, eps=None, rng=None):
    """z = mu + sigma * eps, eps ~ N(0, I) (drawn from `rng`, or torch's global generator if None). Sampling
    z ~ N(mu, sigma^2) directly would cut the graph (a draw has no derivative with respect to its parameters);
    written this way all randomness sits in eps, which does not depend on phi, and z is a smooth function of
    (mu, logvar): dz/dmu = 1, dz/dlogvar = sigma * eps / 2."""
    if eps is None:
        eps = torch.randn(mu.shape, generator=rng, device=mu.device, dtype=mu.dtype)
    return mu + torch.exp(0.5 * logvar) * eps  # sigma = exp(logvar / 2)


def kl_to_prior(mu, logvar):
    """KL(N(mu, diag sigma^2) || N(0, I)) = -1/2 sum_j (1 + log sigma_j^2 - mu_j^2 - sigma_j^2), per image."""
    return -0.5 * (1 + logvar - mu.pow(2) - logvar.exp()).sum(1)


# ----------------------------------------------------------------------------- encoders and decoders

def with_label(v, y):
    """v with the one-hot label y appended (a conditional model; y None: v as it is): 10 more features of a vector
    B x n, or 10 constant planes of an image B x C x H x W. One-hot rather than an embedding: it feeds a linear layer,
    and W [v; onehot(y)] = W_v v + (column y of W_y), so the layer learns a class embedding of its own width anyway.
    y may also be rows of class weights, as the interpolation uses."""
    if y is None:
        return v
    y = (y if y.is_floating_point() else F.one_hot(y, common.NUM_CLASSES)).to(v.dtype)
    if v.dim() == 4:
        y = y[:, :, None, None].expand(-1, -1, *v.shape[2:])
    return torch.cat([v, y], 1)


def mlp(sizes):
    """Linear layers with ELU between them (none after the last). ELU, not ReLU: it has no dead units and a smooth
    gradient, and with the quick CPU run's MLP it gave an IW NLL 2.5 nats better, 87.16 against ReLU's 89.70 (2,000
    test images, K = 500; runs of about 5 minutes, ReLU's the longer): benchmarks/RESULTS.md, "ELU instead of ReLU"."""
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


def conv_encoder(c, h, w, ch, blocks, n_out):
    """x (B x c x h x w) -> two stride-2 convs (h/4 x w/4) with residual blocks -> linear -> `n_out` numbers."""
    return nn.Sequential(
        nn.Conv2d(c, ch, 4, 2, 1), *[ResBlock(ch) for _ in range(blocks)], nn.ReLU(),
        nn.Conv2d(ch, 2 * ch, 4, 2, 1), *[ResBlock(2 * ch) for _ in range(blocks)], nn.ReLU(),
        nn.Flatten(), nn.Linear(2 * ch * (h // 4) * (w // 4), n_out))


def conv_decoder(z_dim, c_out, h, w, ch, blocks):
    """z -> linear to 2ch x h/4 x w/4 -> two stride-2 transposed convs with residual blocks -> c_out x h x w."""
    return nn.Sequential(
        nn.Linear(z_dim, 2 * ch * (h // 4) * (w // 4)), nn.Unflatten(1, (2 * ch, h // 4, w // 4)),
        *[ResBlock(2 * ch) for _ in range(blocks)], nn.ReLU(),
        nn.ConvTranspose2d(2 * ch, ch, 4, 2, 1), *[ResBlock(ch) for _ in range(blocks)], nn.ReLU(),
        nn.ConvTranspose2d(ch, c_out, 4, 2, 1))


class VAE(nn.Module):
    """q_phi(z|x) = N(mu, diag exp(logvar)), p(z) = N(0, I), and p_theta(x|z): Bernoulli for binarized images
    (binary=True), discretized logistic for 8-bit colour images. A conditional model (Kingma et al. 2014's M2, with
    y given) has q(z|x,y) and p(x|z,y): the one-hot y joins the encoder's input (mlp: 10 more inputs; conv: 10 more
    planes) and the decoder's (10 more inputs beside z); the prior stays N(0, I). No layer behaves differently in
    train and eval mode, so evaluating during training needs no mode switch."""

    def __init__(self, mcfg, shape, binary):
        super().__init__()
        c, h, w = shape
        self.shape, self.z_dim, self.binary, self.arch = shape, mcfg.z_dim, binary, mcfg.arch
        self.conditional = mcfg.conditional
        k = 1 if binary else 2  # decoder numbers per sub-pixel: a logit, or a (mean, log-scale) pair
        d = c * h * w
        n_y = common.NUM_CLASSES if mcfg.conditional else 0  # the one-hot label's share of each input
        if mcfg.arch == "mlp":
            sizes = [mcfg.hidden] * mcfg.layers
            self.encoder = nn.Sequential(nn.Flatten(), mlp([d + n_y, *sizes, 2 * mcfg.z_dim]))
            self.decoder = nn.Sequential(mlp([mcfg.z_dim + n_y, *sizes, k * d]), nn.Unflatten(1, (k * c, h, w)))
        else:
            self.encoder = conv_encoder(c + n_y, h, w, mcfg.channels, mcfg.blocks, 2 * mcfg.z_dim)
            self.decoder = conv_decoder(mcfg.z_dim + n_y, k * c, h, w, mcfg.channels, mcfg.blocks)

    def encode(self, x, y=None):
        """x (and its label y, a conditional model) -> (mu, logvar) of q(z|x) (or q(z|x,y)); x in {0, 1} (binary)
        or [-1, 1] (colour)."""
        if self.arch == "mlp":
            x = x.flatten(1)  # the label joins the 784 pixels as 10 more inputs, not 10 more planes of 784
        mu, logvar = self.encoder(with_label(x, y)).chunk(2, dim=1)
        return mu, logvar

    def decode(self, z, y=None):
        """z (and the label y, a conditional model) -> the decoder's output, the parameters of p(x|z) (or p(x|z,y))."""
        return self.decoder(with_label(z, y))

    def forward(self, x, y=None):
        """The training pass: (mu, logvar) of q(z|x,y), and log p(x|z,y) for one z ~ q(z|x,y) drawn by
        `reparameterize` (above; y None for an unconditional model). The loss goes through forward() alone, so that
        DDP can average its gradients."""
        mu, logvar = self.encode(x, y)
        # z ~ q_phi(z|x), the encoder's approximation: the deck's "z is sampled from p(z|x)" in training means this
        # q_phi, for the true posterior p(z|x) cannot be computed. Drawn from the global generator: --resume restores
        # it, and evaluations, which draw from generators of their own, leave it alone.
        z = reparameterize(mu, logvar)
        return mu, logvar, self.log_px_given_z(self.decode(z, y), x)

    def log_px_given_z(self, net_out, x):
        """log p_theta(x|z) in nats per image, from the decoder's output (logits, or means and log-scales)."""
        if self.binary:
            return bernoulli_log_prob(net_out, x)
        mean, log_scale = net_out.chunk(2, dim=-3)
        # log s >= -7, as in PixelCNN++'s code: s >= e^-7 ~ 0.0009, a quarter of a bin's half-width 1/255, where a bin
        # centred on the mean already holds 97% of the mass (log 0.973 = -0.03 nats), so the bound barely limits a
        # good fit; without it nothing stops s collapsing to 0: the gradients grow as 1/s, and once 1/s overflows,
        # inf * 0 gives NaN
        return discretized_logistic_log_prob(mean, log_scale.clamp(min=-7), x)

    def image(self, net_out, show="mode"):
        """What a picture shows of p(x|z), in [0, 1]. Binary data: the mean p = sigmoid(logit) of each pixel, or the
        mode, the most probable image, 1 where p > 1/2 (logit > 0): a draw from p(z) decoded to its mode is as sharp
        as the data, where the mean of an unsure pixel is grey. Colour: the logistic means (a logistic's mode is its
        mean)."""
        if self.binary:
            return (net_out > 0).to(net_out.dtype) if show == "mode" else torch.sigmoid(net_out)
        return common.signed_to_unit(net_out.chunk(2, dim=-3)[0].clamp(-1, 1))


def build_model(mcfg, shape):
    """The VAE for images of `shape` (C, H, W). Its likelihood follows the project's rule for binarized data (as in
    pixelcnn.py and pixelrnn.py): 1 channel -> binarized images and a Bernoulli; 3 channels -> 8 bits and a
    discretized logistic."""
    c, h, w = shape
    if mcfg.arch == "conv" and (h % 4 or w % 4):
        raise common.UsageError(f"--arch conv needs height and width divisible by 4, not {h}x{w}; use --arch mlp")
    return VAE(mcfg, shape, binary=c == 1)


# ----------------------------------------------------------------------------- the loss: negative ELBO

def loss_fn(model, x, beta=1.0, y=None):
    """Negative ELBO = reconstruction -E_q[log p(x|z)] (one z per image) + beta * KL(q(z|x) || p(z)); for a
    conditional model (labels y), -log p(x|y) <= -E_q(z|x,y)[log p(x|z,y)] + KL(q(z|x,y) || p(z)). Returns (loss,
    figures); on 8-bit colour data the figures also give the bound in bits per sub-pixel, the unit papers report."""
    mu, logvar, log_px_z = model(x, y)  # z = mu + sigma * eps inside, one z per image
    rec = -log_px_z.float()  # one-sample estimate of -E_q[log p(x|z)]
    kl = kl_to_prior(mu.float(), logvar.float())
    loss = (rec + beta * kl).mean()
    figures = dict(loss=loss, rec=rec.mean(), kl=kl.mean(), neg_elbo=(rec + kl).mean())
    if x.shape[1] != 1:  # colour, not binarized (build_model's rule): nats per image / (C H W ln 2) = bits/dim
        figures["bits_per_dim"] = figures["neg_elbo"] / (x[0].numel() * math.log(2))
    return loss, {k: v.detach() for k, v in figures.items()}


# ----------------------------------------------------------------------------- the sampler

@torch.no_grad()
def sample(model, n, rng, y=None, show="mode"):
    """Fresh images: z ~ p(z) = N(0, I), drawn from `rng` (on any device: a CPU generator gives the same samples on
    every device), decoded by p(x|z) (p(x|z,y): a conditional model, labels y) to its mode or mean (VAE.image),
    n x C x H x W in [0, 1]."""
    z = torch.randn(n, model.z_dim, generator=rng, device=rng.device)
    return model.image(model.decode(z.to(next(model.parameters()).device), y), show)


# ----------------------------------------------------------------------------- the measure: ELBO and IW log p(x)

def log_normal(z, mu, logvar):
    """log N(z; mu, diag exp(logvar)), summed over the last dimension."""
    return -0.5 * (math.log(2 * math.pi) + logvar + (z - mu).pow(2) / logvar.exp()).sum(-1)


@torch.no_grad()
def elbo_and_iw(model, x, k, chunk=4096, rng=None, y=None):
    """For each image: (ELBO, IW estimate of log p(x)) with K samples z_k ~ q(z|x) (Burda et al. 2016):
        ELBO  ~ 1/K sum_k log p(x|z_k) - KL(q(z|x) || p(z))        (closed-form KL)
        log p(x) ~ log 1/K sum_k w_k,  w_k = p(x|z_k) p(z_k) / q(z_k|x)
    For a conditional model, given the labels y, the same with every distribution conditioned on y but p(z):
    bounds on log p(x|y), w_k = p(x|z_k,y) p(z_k) / q(z_k|x,y).
    Each sample costs one decoder pass per image, and all K x B at once would hold K x B decoded images (at K = 1000,
    a thousand times a batch): so the K samples are drawn from `rng` in chunks of at most `chunk` decoder passes."""
    mu, logvar = model.encode(x, y)  # one encoder pass: q(z|x) is the same for all K samples
    b, per = len(x), max(1, chunk // len(x))  # per: samples per image in a chunk, per x B <= chunk (or 1)
    log_w, log_px_z = [], []
    for start in range(0, k, per):
        n = min(per, k - start)
        # expand: mu and logvar seen as n x B x z, the same numbers for the n samples without copying them
        z = reparameterize(mu.expand(n, -1, -1), logvar.expand(n, -1, -1), rng=rng)  # n x B x z
        y_n = None if y is None else y.repeat(n)  # z.flatten(0, 1) is sample-major: image i's label at i, B + i, ...
        net_out = model.decode(z.flatten(0, 1), y_n).unflatten(0, (n, b))  # n x B x C x H x W
        lpxz = model.log_px_given_z(net_out, x).float()  # x broadcasts over the n samples: n x B
        log_pz = log_normal(z, torch.zeros_like(z), torch.zeros_like(z))
        log_w.append(lpxz + log_pz - log_normal(z, mu, logvar))  # log p(x|z) + log p(z) - log q(z|x)
        log_px_z.append(lpxz)
    log_w, log_px_z = torch.cat(log_w), torch.cat(log_px_z)  # K x B
    elbo = log_px_z.mean(0) - kl_to_prior(mu.float(), logvar.float())
    # log 1/K sum_k w_k = logsumexp_k(log w_k) - log K, the log of the mean weight. The w_k themselves would underflow
    # (log w_k is about -90 nats for an MNIST image, far lower for a colour one; float32 stops at e^-103): logsumexp
    # takes out the largest log w_k first, m + log sum_k exp(log w_k - m): the largest term is e^0 = 1, so the sum
    # neither underflows to 0 nor overflows
    iw = torch.logsumexp(log_w, 0) - math.log(k)
    return elbo, iw


@torch.no_grad()
def mean_neg_elbo(model, x, rng, batch=500, y=None):
    """Mean negative ELBO over images (and labels y) with one z each from `rng` (the test figure logged in training)."""
    total = 0.0
    for i in range(0, len(x), batch):
        elbo, _ = elbo_and_iw(model, x[i:i + batch], 1, rng=rng, y=None if y is None else y[i:i + batch])
        total -= float(elbo.sum())
    return total / len(x)


# ----------------------------------------------------------------------------- pictures

PALETTE = torch.tensor([[31, 119, 180], [255, 127, 14], [44, 160, 44], [214, 39, 40], [148, 103, 189],
                        [140, 86, 75], [227, 119, 194], [127, 127, 127], [188, 189, 34], [23, 190, 207]]) / 255


@torch.no_grad()
def reconstructions(model, x, y=None, rows=4, cols=8, show="mode"):
    """Rows of test inputs, each over its reconstruction (the decoder's mode or mean at z = mu; a conditional model
    encodes and decodes with the images' true labels y)."""
    cols = min(cols, len(x))
    x = x[:cols * min(rows, len(x) // cols)]
    y = None if y is None else y[:len(x)]
    rec = model.image(model.decode(model.encode(x, y)[0], y), show)
    inputs = x if model.binary else common.signed_to_unit(x)
    return torch.stack([inputs.unflatten(0, (-1, cols)), rec.unflatten(0, (-1, cols))], 1).flatten(0, 2), cols


@torch.no_grad()
def interpolation(model, x, y=None, pairs=8, steps=10, show="mode"):
    """Decode z = (1 - t) mu_a + t mu_b, t from 0 to 1, between the posterior means of pairs of test images. A
    conditional model's decoder takes (z, one-hot y): the line runs through both, y = (1 - t) y_a + t y_b, so each
    end is that image's reconstruction with its true label, and between them the class fades from a's to b's."""
    pairs = max(1, min(pairs, len(x) // 2))
    y = None if y is None else F.one_hot(y[:2 * pairs], common.NUM_CLASSES).float()
    mu = model.encode(x[:2 * pairs], y)[0]
    t = torch.linspace(0, 1, steps, device=mu.device)[None, :, None]
    line = lambda v: ((1 - t) * v[0::2, None] + t * v[1::2, None]).flatten(0, 1)  # pairs x steps, flattened
    return model.image(model.decode(line(mu), None if y is None else line(y)), show)


@torch.no_grad()
def manifold(model, n=20, label=None, show="mode"):
    """z_dim = 2: decode a grid of prior quantiles z = Phi^-1(p), p in (0.05 .. 0.95), like Kingma & Welling fig. 4.
    A conditional model draws it for one class, `label`; with no label, row c decodes the grid's z1 quantiles at
    z2 = 0 with class c, so each column holds one z: y sets the class, z the style."""
    q = torch.distributions.Normal(0.0, 1.0).icdf(torch.linspace(0.05, 0.95, n))
    y = None if label is None else torch.full((n * n,), label)
    if label is None and model.conditional:
        z = torch.stack([q, torch.zeros(n)], -1).repeat(common.NUM_CLASSES, 1)  # 10 rows of n columns
        y = torch.arange(common.NUM_CLASSES).repeat_interleave(n)
    else:
        z = torch.stack(torch.meshgrid(q.flip(0), q, indexing="ij")[::-1], -1).flatten(0, 1)  # rows: z2 high to low
    device = next(model.parameters()).device
    return model.image(model.decode(z.to(device), None if y is None else y.to(device)), show)


@torch.no_grad()
def latent_scatter(model, x, y, size=400, lim=4.0):
    """z_dim = 2: the posterior means of test images as dots coloured by label, drawn into a 3 x size x size image,
    with the colours' key (colour_key) beside it when there are labels.
    A conditional model encodes with the labels, q(z|x,y): y is given, z need not hold the class, and the colours
    mix."""
    chunk = lambda i: (x[i:i + 1000], y[i:i + 1000]) if model.conditional else (x[i:i + 1000],)
    mu = torch.cat([model.encode(*chunk(i))[0] for i in range(0, len(x), 1000)]).cpu()
    pix = ((mu.clamp(-lim, lim) + lim) / (2 * lim) * (size - 3)).long()  # z in [-lim, lim] -> pixel, 1 px margin
    img = torch.ones(3, size, size)
    colors = PALETTE[y.cpu() % 10] if y is not None else PALETTE[:1].expand(len(mu), 3)  # folders have no labels
    for dy in (0, 1, 2):  # 3 x 3 dots
        for dx in (0, 1, 2):
            img[:, size - 1 - pix[:, 1] - dy, pix[:, 0] + dx] = colors.T  # image rows go down, z2 goes up
    return img if y is None else torch.cat([img, colour_key(x, y, model.binary, size)], 2)


def colour_key(x, y, binary, size):
    """The key of latent_scatter's colours, a column beside it: for each class, its first test image framed in the
    class's colour (pictures, not digits in a font, so it reads for any labelled dataset)."""
    cell = size // common.NUM_CLASSES
    key = torch.ones(3, size, cell)
    for c in range(common.NUM_CLASSES):
        if not (y == c).any():  # a small test set (a toy one, say) may lack a class: no cell for it
            continue
        image = x[y == c][:1].float().cpu()
        image = image if binary else common.signed_to_unit(image)  # {0, 1} or [-1, 1] -> [0, 1]
        framed = PALETTE[c][:, None, None].repeat(1, cell, cell)  # the frame: 3 px of the class's colour
        framed[:, 3:-3, 3:-3] = F.interpolate(image, size=(cell - 6, cell - 6), mode="bilinear")[0].expand(3, -1, -1)
        key[:, c * cell:(c + 1) * cell] = framed
    return key


def sample_grid(model, cfg, x_test, y_test, step):
    """The picture of a grid step of the run, samples_<step>.png: the same z in every grid (a generator seeded by
    --seed), a row per class for a --conditional model. Returns that step's figure for the log line: the mean negative
    ELBO of the fixed test images x_test (labels y_test, or None), with one z each from a seeded generator of its own.
    Neither draw touches the training run's random numbers."""
    y = common.class_labels(cfg, cfg.num_samples, x_test.device)  # None, or the classes of the grid's rows
    x = sample(model, cfg.num_samples, torch.Generator().manual_seed(cfg.seed), y, cfg.show)
    common.save_grid(x, Path(cfg.out) / f"samples_{step}.png", labels=y)
    rng = torch.Generator(x_test.device).manual_seed(cfg.seed)
    return dict(test_neg_elbo=mean_neg_elbo(model, x_test, rng, y=y_test))


# ----------------------------------------------------------------------------- training

def train(cfg):
    run = common.Run(cfg, "vae")  # the device, the seeds, torchrun (common.py): nothing is written yet
    x_train, y_train = common.load_split(cfg, "train", run.device)  # y_train: None unless --conditional
    x_test, y_test = common.load_split(cfg, "test", run.device)
    model = build_model(cfg.model, tuple(x_train.shape[1:])).to(run.device)  # bad sizes stop here: nothing written
    x_test = model_view(model, x_test[:1000])  # the log's test ELBO: 1000 fixed test images
    y_test = None if y_test is None else y_test[:1000]
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    run.start(dict(model=model, opt=opt), lambda step: sample_grid(model, cfg, x_test, y_test, step))
    net = run.wrap(model)  # the model as the step calls it: DDP under torchrun, compiled with --compile
    for step in run:
        x, y = run.batch(x_train, y_train)  # y: the labels of a --conditional model, else None
        # a fresh stochastic binarization of every batch (1 channel), or 8 bits scaled to [-1, 1] (colour)
        x = common.binarize(x, run.rng) if model.binary else common.uint8_to_signed(x)
        for group in opt.param_groups:  # cosine decay of the learning rate to 0 over the run
            group["lr"] = cfg.lr * 0.5 * (1 + math.cos(math.pi * run.progress))
        with run.autocast():
            loss, figures = loss_fn(net, x, cfg.beta, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        figures["grad_norm"] = nn.utils.get_total_norm([p.grad for p in model.parameters()])  # not clipped
        run.check(loss=loss, grad_norm=figures["grad_norm"])  # a NaN stops the run here, before the update
        opt.step()
        run.log(figures)
    run.finish()


# ----------------------------------------------------------------------------- the modes

def model_view(model, x_uint8):
    """Test images as the model sees them: one fixed binarization, the same in every run (binary), or [-1, 1]
    (colour). Training batches are binarized afresh each step instead (train)."""
    return common.binarize(x_uint8) if model.binary else common.uint8_to_signed(x_uint8)


def load_for_inference(cfg):
    """(the trained VAE in eval mode, the test images as uint8, their labels or None) from the run in --out. The labels
    come even for an unconditional model: latents.png colours the codes by them."""
    device = common.get_device(cfg.device)
    x_test, y_test = common.load_dataset(cfg.model.dataset, cfg.data_dir, "test", device)
    model = build_model(cfg.model, tuple(x_test.shape[1:])).to(device).eval()
    common.load_checkpoint(Path(cfg.out) / "ckpt.pt", "vae", model=model)
    return model, x_test, y_test


def evaluate(cfg):
    """On the test set: -ELBO, the IW estimate of -log p(x) with K = --iw-samples, and their gap, which estimates
    KL(q(z|x) || p(z|x)); in nats per image (and bits/dim on colour data). A conditional model is evaluated with the
    test labels y: the bounds are on log p(x|y), and the rows say so."""
    model, x_test, y_test = load_for_inference(cfg)
    x = model_view(model, x_test[:cfg.eval_n or None])
    y = y_test[:len(x)] if model.conditional else None
    part = common.shard(len(x))  # under torchrun: each rank its share of the images
    rng = torch.Generator(x.device).manual_seed(common.rank_seed(cfg.seed))  # rank r: its own z
    per_batch = max(1, cfg.eval_chunk // cfg.iw_samples)  # images per call: about --eval-chunk decoder evaluations
    sums = torch.zeros(2, dtype=torch.float64)  # sum of the ELBOs, sum of the IW estimates, over this rank's share
    for i in tqdm(range(part.start, part.stop, per_batch), desc=f"ELBO and IW log p(x), K={cfg.iw_samples}",
                  unit="batch", disable=not common.is_main()):
        j = min(i + per_batch, part.stop)
        e, w = elbo_and_iw(model, x[i:j], cfg.iw_samples, cfg.eval_chunk, rng, None if y is None else y[i:j])
        sums += torch.stack([e.double().sum(), w.double().sum()]).cpu()
    neg_elbo, iw_nll = (-common.reduce_over_ranks(sums) / len(x)).tolist()
    given = ("x|y", "x,y") if model.conditional else ("x", "x")  # a conditional model: given its label, p(x|y)
    rows = {"negative ELBO (nats/image)": neg_elbo, f"IW NLL -log p({given[0]}) (nats/image)": iw_nll,
            f"gap KL(q(z|{given[1]}) || p(z|{given[1]})), IW estimate (nats/image)": neg_elbo - iw_nll}
    if not model.binary:  # 8-bit colour: also in bits per sub-pixel, the unit papers report
        dims = math.prod(model.shape)
        rows |= {k.replace("nats/image", "bits/dim"): v / (dims * math.log(2)) for k, v in rows.items()}
    title = (f"{len(x)} test images of {cfg.model.dataset}{' and their labels y' if y is not None else ''}, "
             f"K = {cfg.iw_samples} importance samples per image")
    return common.report(cfg.out, title, rows, n=len(x), iw_samples=cfg.iw_samples)


def sample_from_checkpoint(cfg):
    """samples.png (the first 256) and samples.pt from the prior (and labels.pt: a conditional model, of the classes
    --label asks for); reconstructions.png and interpolation.png of test images; with z_dim 2 also manifold.png and
    latents.png."""
    if not common.is_main():  # a small job: under torchrun, rank 0 does it alone
        return
    model, x_test, y_test = load_for_inference(cfg)
    out, x = Path(cfg.out), model_view(model, x_test)
    labels = common.class_labels(cfg, cfg.num_samples, x.device)  # None (unconditional), or the classes to draw
    y = y_test if model.conditional else None  # the true labels, for the pictures of test images
    start, rng = time.time(), torch.Generator().manual_seed(cfg.seed)
    samples = torch.cat([sample(model, min(1000, cfg.num_samples - i), rng,
                                 None if labels is None else labels[i:i + 1000], cfg.show).float().cpu()
                         for i in range(0, cfg.num_samples, 1000)])  # bounded memory for any --num-samples
    seconds = time.time() - start
    common.save_samples(cfg, samples)
    grid, cols = reconstructions(model, x, y, show=cfg.show)
    common.save_grid(grid, out / "reconstructions.png", nrow=cols)
    common.save_grid(interpolation(model, x, y, show=cfg.show), out / "interpolation.png", nrow=10)
    names = ["samples.png", f"samples.pt {tuple(samples.shape)}"] + (["labels.pt"] if y is not None else [])
    names += ["reconstructions.png", "interpolation.png"]
    if cfg.model.z_dim == 2:
        label = cfg.label if cfg.label >= 0 else None
        common.save_grid(manifold(model, label=label, show=cfg.show), out / "manifold.png", nrow=20)
        common.save_grid(latent_scatter(model, x, y_test)[None], out / "latents.png", nrow=1)
        names += ["manifold.png", "latents.png"]
    print(f"{len(samples)} samples in {seconds:.2f}s; wrote {', '.join(names)} in {out}")


@common.entry
def main(argv=None):
    cfg = common.parse_args(ModelConfig, Config, "vae", argv, PRESETS)
    if cfg.plot:
        common.plot_curves(cfg.out)
    elif cfg.sample:
        sample_from_checkpoint(cfg)
    elif cfg.eval:
        return evaluate(cfg)
    else:
        train(cfg)


if __name__ == "__main__":
    main()
