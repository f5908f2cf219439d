"""DDPM: denoising diffusion probabilistic models (Ho et al. 2020; learned variance from Nichol & Dhariwal 2021).

A fixed forward process adds Gaussian noise to an image over T steps until nothing but noise is left;
a U-Net learns the reverse process, one small denoising step at a time, and sampling runs it from pure
noise back to an image. Training is a variational bound, like the VAE's, whose terms are Gaussian KLs
with closed forms; in practice the bound's denoising terms reduce to predicting the noise that was added.

    forward   q(x_t | x_{t-1}) = N(x_t; sqrt(1 - beta_t) x_{t-1}, beta_t I)
              q(x_t | x_0)     = N(x_t; sqrt(alpha_bar_t) x_0, (1 - alpha_bar_t) I),  alpha_bar_t = prod_s (1 - beta_s)
    reverse   p_theta(x_{0:T}) = p(x_T) prod_t p_theta(x_{t-1} | x_t), p_theta(x_{t-1}|x_t) = N(mu_theta, Sigma_theta)
              (the deck writes this product with q(x_{t-1} | x_t): it is p_theta's, the learned steps that undo q's)
    loss      L = D_KL(q(x_T|x_0) || p(x_T))                           L_T, prior matching (regularization)
                + sum_{t>1} D_KL(q(x_{t-1}|x_t,x_0) || p(x_{t-1}|x_t))   L_{t-1}, denoising
                - log p(x_0 | x_1)                                       L_0, reconstruction
              (Ho et al. eq. 5, the deck's second line; its first line carries the VAE's z-notation over and is not
              this model's bound)
              L_simple = E_{t, x_0, eps} || eps - eps_theta(sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps, t) ||^2

With --conditional the U-Net also sees a class y (an embedding added to the time embedding), and in training y is
replaced by a null class with probability p_uncond, so one network learns both p(x | y) and p(x). Sampling can then
trade diversity for fidelity with classifier-free guidance (Ho & Salimans 2022), w = --guidance:
    eps~(x_t, t, y) = (1 + w) eps_theta(x_t, t, y) - w eps_theta(x_t, t, null)

Run:
    python ddpm.py --dataset mnist          # the recipe for the device: quick on a CPU, full on a GPU
    python ddpm.py --sample                 # from runs/ddpm-mnist: no model flag, the checkpoint has them
    python ddpm.py --eval --eval-n 200      # the bound in bits/dim and its three parts
    python ddpm.py --preset full --out runs/ddpm-full   # the 6.5M-parameter U-Net on any device
    python ddpm.py --conditional --out runs/ddpm-cond   # learns p(x | class) and p(x), for guidance
    python ddpm.py --out runs/ddpm-cond --sample --label 7 --guidance 3   # sevens, guided with w = 3
"""
import dataclasses
import math
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange
from tqdm import tqdm

import common

NULL_CLASS = common.NUM_CLASSES  # the label of "no label": the classes are 0..9, so the null class is 10


@dataclasses.dataclass
class ModelConfig(common.ModelConfig):
    # the diffusion
    timesteps: int = common.opt(1000, "T, the number of diffusion steps (L_0 needs beta-tilde_2: T >= 2)", "[2, inf)")
    schedule: str = common.opt("linear", "beta schedule", choices=["linear", "sigmoid", "quadratic", "cosine"])
    variance: str = common.opt("fixed-large", "Sigma_theta: beta_t (fixed-large), beta-tilde_t (fixed-small), or "
                               "learned", choices=["fixed-large", "fixed-small", "learned"])
    # the U-Net
    channels: int = common.opt(64, "U-Net base width (a multiple of 8)", "[8, inf)")
    channel_mults: str = common.opt("1,2,2", "width multiplier per resolution; each level after the first halves H, W")
    num_res_blocks: int = common.opt(2, "residual blocks per resolution", "[1, inf)")
    dropout: float = common.opt(0.1, "dropout in the residual blocks", "[0, 1)")
    p_uncond: float = common.opt(0.1, "with --conditional, the probability that a training label is replaced by the "
                                 "null class, so that the network also learns p(x) for --guidance", "[0, 1)")


@dataclasses.dataclass
class Config(common.RunConfig):
    steps: int = common.opt(20000, "training steps", "[1, inf)")
    lr: float = common.opt(2e-4, "peak learning rate (Adam)", "(0, inf)")
    warmup: int = common.opt(500, "steps of linear learning-rate warm-up", "[1, inf)")
    grad_clip: float = common.opt(1.0, "clip the gradient norm to this", "(0, inf)")
    ema_decay: float = common.opt(0.999, "EMA decay of the weights used for sampling and --eval", "[0, 1]")
    vlb_weight: float = common.opt(0.001, "lambda in L_hybrid = L_simple + lambda L_vlb (learned variance)", "[0, inf)")
    sampler: str = common.opt("ancestral", "ancestral (Algorithm 2, all T steps) or ddim", choices=["ancestral",
                                                                                                     "ddim"])
    sample_steps: int = common.opt(50, "DDIM steps", "[1, inf)")
    eta: float = common.opt(0.0, "DDIM noise: 0 is deterministic; 1 gives sigma_t^2 = beta-tilde_t, the posterior "
                            "(fixed-small) variance, not the default ancestral sampler's fixed-large beta_t", "[0, 1]")
    eval_n: int = common.opt(1000, "test images for --eval", "[1, inf)")
    guidance: float = common.opt(0.0, "classifier-free guidance weight w of a --conditional model: eps = (1 + w) "
                                 "eps(x, y) - w eps(x, null); 0 samples p(x | y) itself, larger w gives more typical "
                                 "images of the class", "[0, inf)")


PRESETS = {  # the recipe of a bare command, quick on a CPU, full on a CUDA GPU (--preset); a flag you give always wins
    "full": dict(about="the full model, a 6.5M-parameter U-Net for 20k steps of 128, sized for one GPU", options={}),
    "quick": dict(about="the quick run, a 1.1M-parameter U-Net, batches of 32 for 10 minutes of training "
                        "(--max-minutes 10; at most 12,000 steps)",
                  options=dict(channels=32, num_res_blocks=1, dropout=0.0, batch_size=32, lr=1e-3, warmup=200,
                               ema_decay=0.995, sampler="ddim", max_minutes=10.0, steps=12000, sample_every=3000)),
}


# ----------------------------------------------------------------------------- the diffusion: schedule, q, posterior

def make_betas(schedule, T):
    """beta_1 .. beta_T. linear is Ho et al.'s 1e-4 .. 0.02 at T = 1000, scaled by 1000/T so that any T adds
    about the same total noise; sigmoid and quadratic span the same range; cosine is Nichol & Dhariwal's."""
    scale = 1000 / T
    lo, hi = 1e-4 * scale, 0.02 * scale
    if schedule == "linear":
        betas = torch.linspace(lo, hi, T, dtype=torch.float64)
    elif schedule == "quadratic":
        betas = torch.linspace(lo ** 0.5, hi ** 0.5, T, dtype=torch.float64) ** 2
    elif schedule == "sigmoid":
        betas = torch.sigmoid(torch.linspace(-6, 6, T, dtype=torch.float64)) * (hi - lo) + lo
    else:  # cosine (Nichol & Dhariwal eq. 17): alpha_bar_t = f(t) / f(0), f(t) = cos^2((t/T + s) / (1 + s) * pi/2)
        s = 0.008
        f = torch.cos((torch.arange(T + 1, dtype=torch.float64) / T + s) / (1 + s) * math.pi / 2) ** 2
        # beta_t = 1 - alpha_bar_t / alpha_bar_{t-1} = 1 - f(t) / f(t-1): the f(0) of both cancels
        betas = (1 - f[1:] / f[:-1]).clamp(max=0.999)  # the paper's clip keeps the last steps from being singular
    if not ((betas > 0) & (betas < 1)).all():  # beta_t = 1 would make alpha_bar_T = 0 and the posterior divide by 0
        raise common.UsageError(f"--timesteps {T} with --schedule {schedule} gives beta_T = {betas.max().item():.3g}, "
                                f"but every beta must be in (0, 1): use --timesteps 21 or more, or --schedule cosine")
    return betas


def normal_kl(mean1, logvar1, mean2, logvar2):
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) per dimension, in closed form."""
    return 0.5 * (-1 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def discretized_gaussian_log_likelihood(x, mean, log_std):
    """log p(x_0 | x_1) for 8-bit data in [-1, 1]: the Gaussian's mass over each pixel's bin of width 2/255,
    with the end bins stretched to -inf and +inf so that the 256 bins hold all of the mass."""
    cdf = lambda v: torch.special.ndtr((v - mean) * torch.exp(-log_std))
    upper = torch.where(x > 0.999, torch.ones_like(x), cdf(x + 1 / 255))
    lower = torch.where(x < -0.999, torch.zeros_like(x), cdf(x - 1 / 255))
    return torch.log((upper - lower).clamp(min=1e-12))


def extract(a, t):
    """a[t] reshaped to broadcast over B x C x H x W."""
    return a[t][:, None, None, None]


class Diffusion:
    """The fixed forward process and the Gaussian algebra of the reverse one. Index t = 0 .. T-1 in code is
    step t+1 in the paper, so betas[0] is beta_1 and alpha_bar[t] = prod_{s <= t} (1 - betas[s])."""

    def __init__(self, mcfg, device):
        self.T, self.variance = mcfg.timesteps, mcfg.variance
        # Every coefficient below is a function of the schedule alone, so all are computed once, in float64 (as in
        # Ho et al.'s code: alpha_bar is a product of up to 1000 numbers near 1), and stored in float32:
        #   alpha_bar, alpha_bar_prev    q(x_t | x_0) (q_sample, predict_x0) and DDIM's steps
        #   beta_tilde, coef_x0, coef_xt  the posterior q(x_{t-1} | x_t, x_0) = N(coef_x0 x_0 + coef_xt x_t, beta_tilde)
        #   log_beta_tilde, log_sigma2_large, log_betas   log Sigma of the reverse step: fixed-small, fixed-large, and
        #                                                 the two ends between which the learned variance lies
        betas = make_betas(mcfg.schedule, mcfg.timesteps)
        alphas = 1 - betas                                               # alpha_t = 1 - beta_t
        alpha_bar = torch.cumprod(alphas, 0)                             # alpha_bar_t = prod_{s<=t} alpha_s
        alpha_bar_prev = torch.cat([torch.ones(1, dtype=betas.dtype), alpha_bar[:-1]])  # alpha_bar_{t-1}; _0 = 1
        beta_tilde = betas * (1 - alpha_bar_prev) / (1 - alpha_bar)      # posterior variance, eq. (7)
        # beta-tilde_1 = 0 (given x_1, x_0's posterior is sharp because alpha_bar_0 = 1), so its log is -inf: like Ho
        # et al.'s code, the logs below use beta-tilde_2 at t = 1 for both fixed variances (a finite L_0)
        log_tilde = torch.log(torch.cat([beta_tilde[1:2], beta_tilde[1:]]))
        f32 = lambda v: v.float().to(device)
        self.betas, self.alphas, self.alpha_bar = f32(betas), f32(alphas), f32(alpha_bar)
        self.alpha_bar_prev = f32(alpha_bar_prev)
        self.beta_tilde, self.log_beta_tilde = f32(beta_tilde), f32(log_tilde)
        self.log_sigma2_large = f32(torch.cat([log_tilde[:1], torch.log(betas[1:])]))  # fixed-large: Sigma_t = beta_t
        self.log_betas = f32(torch.log(betas))  # log beta_t, the learned variance's upper end, beta_1 included
        self.coef_x0 = f32(betas * alpha_bar_prev.sqrt() / (1 - alpha_bar))  # posterior mean = coef_x0 x_0
        self.coef_xt = f32((1 - alpha_bar_prev) * alphas.sqrt() / (1 - alpha_bar))  #       + coef_xt x_t, eq. (7)

    def q_sample(self, x0, t, eps):
        """x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps: one jump instead of t noising steps."""
        return extract(self.alpha_bar, t).sqrt() * x0 + (1 - extract(self.alpha_bar, t)).sqrt() * eps

    def q_posterior(self, x0, x_t, t):
        """Mean and log-variance of q(x_{t-1} | x_t, x_0)."""
        return extract(self.coef_x0, t) * x0 + extract(self.coef_xt, t) * x_t, extract(self.log_beta_tilde, t)

    def predict_x0(self, x_t, t, eps):
        """Invert q_sample: x_0 = (x_t - sqrt(1 - alpha_bar_t) eps) / sqrt(alpha_bar_t)."""
        return (x_t - (1 - extract(self.alpha_bar, t)).sqrt() * eps) / extract(self.alpha_bar, t).sqrt()

    def p_mean_logvar(self, net_out, x_t, t, clip=True):
        """p(x_{t-1} | x_t) from the network output: (mean, log-variance, predicted x_0).

        The mean of Algorithm 2, mu = 1/sqrt(alpha_t) (x_t - beta_t / sqrt(1 - alpha_bar_t) eps), is the posterior
        mean at the predicted x_0. While sampling (clip=True), that x_0 is first clipped to the data range [-1, 1]
        (as Ho et al.'s code does), so the mean is the posterior mean at the clipped x_0, which equals Algorithm 2's
        wherever nothing is clipped."""
        eps, v = net_out.chunk(2, dim=1) if self.variance == "learned" else (net_out, None)
        x0 = self.predict_x0(x_t, t, eps)
        if clip:
            x0 = x0.clamp(-1, 1)
            mean, _ = self.q_posterior(x0, x_t, t)
        else:  # Algorithm 2, line 4
            noise_part = extract(self.betas, t) / (1 - extract(self.alpha_bar, t)).sqrt() * eps
            mean = (x_t - noise_part) / extract(self.alphas, t).sqrt()
        if self.variance == "fixed-small":
            logvar = extract(self.log_beta_tilde, t).expand_as(x_t)
        elif self.variance == "fixed-large":
            logvar = extract(self.log_sigma2_large, t).expand_as(x_t)
        else:  # Nichol & Dhariwal eq. (15): Sigma = exp(v log beta_t + (1 - v) log beta_tilde_t), v mapped from [-1, 1]
            frac = (v + 1) / 2
            logvar = frac * extract(self.log_betas, t) + (1 - frac) * extract(self.log_beta_tilde, t)
        return mean, logvar, x0

    def vlb_term(self, net_out, x0, x_t, t, clip=False):
        """The bound's term of code index t (paper step t + 1), in bits per dimension, one value per image:
        L_{t-1} = KL(q(x_{t-1}|x_t,x_0) || p(x_{t-1}|x_t)) for paper t >= 2 (code t >= 1), and the reconstruction
        L_0 = -log p(x_0|x_1) for paper t = 1 (code t = 0)."""
        true_mean, true_logvar = self.q_posterior(x0, x_t, t)
        mean, logvar, _ = self.p_mean_logvar(net_out, x_t, t, clip)
        kl = normal_kl(true_mean, true_logvar, mean, logvar).flatten(1).mean(1)
        nll = -discretized_gaussian_log_likelihood(x0, mean, 0.5 * logvar).flatten(1).mean(1)
        return torch.where(t == 0, nll, kl) / math.log(2)

    def prior_term(self, x0):
        """L_T = KL(q(x_T | x_0) || N(0, I)) in bits per dimension: no parameters, near 0 when alpha_bar_T ~ 0."""
        t = torch.full((len(x0),), self.T - 1, device=x0.device)
        mean, logvar = extract(self.alpha_bar, t).sqrt() * x0, torch.log(1 - extract(self.alpha_bar, t))
        kl = normal_kl(mean, logvar.expand_as(x0), torch.zeros_like(x0), torch.zeros_like(x0))
        return kl.flatten(1).mean(1) / math.log(2)


# ----------------------------------------------------------------------------- the U-Net eps_theta(x_t, t)

def timestep_embedding(t, dim):
    """Sinusoidal embedding of the step t (as the Transformer's positions): sin/cos at geometric frequencies."""
    freqs = torch.exp(-math.log(10000) * torch.arange(dim // 2, device=t.device) / (dim // 2))
    angles = t.float()[:, None] * freqs[None]
    return torch.cat([angles.sin(), angles.cos()], dim=1)


def norm(c):
    return nn.GroupNorm(8, c)  # GroupNorm, not BatchNorm: it does not depend on the batch, nor on train/eval mode


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, with the time embedding added in between, and a skip connection."""

    def __init__(self, c_in, c_out, t_dim, dropout):
        super().__init__()
        self.conv1 = nn.Sequential(norm(c_in), nn.SiLU(), nn.Conv2d(c_in, c_out, 3, padding=1))
        self.time = nn.Linear(t_dim, c_out)
        self.conv2 = nn.Sequential(norm(c_out), nn.SiLU(), nn.Dropout(dropout), nn.Conv2d(c_out, c_out, 3, padding=1))
        nn.init.zeros_(self.conv2[-1].weight)  # start as the identity: a deep U-Net then trains from step one
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x, t_emb):
        h = self.conv1(x) + self.time(F.silu(t_emb))[:, :, None, None]  # every channel learns its shift per t
        return self.skip(x) + self.conv2(h)


class Attention(nn.Module):
    """Multi-head self-attention over all H*W positions (used at the lowest resolution, where it is cheap)."""

    def __init__(self, c, heads=4):
        super().__init__()
        self.heads, self.norm = heads, norm(c)
        self.qkv, self.proj = nn.Conv2d(c, 3 * c, 1), nn.Conv2d(c, c, 1)
        nn.init.zeros_(self.proj.weight)

    def forward(self, x):
        h, w = x.shape[-2:]
        q, k, v = rearrange(self.qkv(self.norm(x)), "b (three heads d) h w -> three b heads (h w) d", three=3,
                            heads=self.heads)
        o = F.scaled_dot_product_attention(q, k, v)
        return x + self.proj(rearrange(o, "b heads (h w) d -> b (heads d) h w", h=h, w=w))


class Block(nn.Module):
    """One U-Net stage: a residual block, then self-attention at the lowest resolution."""

    def __init__(self, c_in, c_out, t_dim, dropout, attn):
        super().__init__()
        self.res, self.attn = ResBlock(c_in, c_out, t_dim, dropout), Attention(c_out) if attn else nn.Identity()

    def forward(self, x, t_emb):
        return self.attn(self.res(x, t_emb))


class Downsample(nn.Conv2d):
    def __init__(self, c):
        super().__init__(c, c, 3, stride=2, padding=1)  # 28 -> 14 -> 7, 32 -> 16 -> 8

    def forward(self, x, t_emb=None):
        return super().forward(x)


class Upsample(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class UNet(nn.Module):
    """eps_theta(x_t, t) or, conditional, eps_theta(x_t, t, y): predicts the noise in x_t (and, with learned variance,
    the interpolation v).

    The skips: every map the way down makes (the stem's, each block's, each Downsample's) is kept, and the way up
    concatenates them back in reverse order, one per block. A level of the way down makes num_res_blocks maps plus
    its Downsample's (the first level: plus the stem's instead), so each level of the way up has num_res_blocks + 1
    blocks, one per skip, and the channels each block takes are its input's plus that skip's."""

    def __init__(self, img_channels, ch, mults, num_res_blocks, dropout, learn_var, conditional=False):
        super().__init__()
        t_dim = 4 * ch
        self.time_embed = nn.Sequential(nn.Linear(ch, t_dim), nn.SiLU(), nn.Linear(t_dim, t_dim))
        # the classes 0..9 and the null class 10 (the label dropped): a vector each, added to the time embedding,
        # so every residual block shifts its channels by class as it does by t
        self.class_embed = nn.Embedding(common.NUM_CLASSES + 1, t_dim) if conditional else None
        self.stem = nn.Conv2d(img_channels, ch, 3, padding=1)
        widths, lowest = [ch * m for m in mults], len(mults) - 1
        self.down, skips, c = nn.ModuleList(), [ch], ch  # skips: the channels of each kept map, the stem's first
        for level, w in enumerate(widths):
            for _ in range(num_res_blocks):
                self.down.append(Block(c, w, t_dim, dropout, attn=level == lowest))
                c = w
                skips.append(c)
            if level != lowest:
                self.down.append(Downsample(c))
                skips.append(c)
        self.mid = nn.ModuleList([Block(c, c, t_dim, dropout, attn=True), Block(c, c, t_dim, dropout, attn=False)])
        self.up = nn.ModuleList()
        for level, w in reversed(list(enumerate(widths))):
            for _ in range(num_res_blocks + 1):  # one block per skip of this level (see the docstring)
                self.up.append(Block(c + skips.pop(), w, t_dim, dropout, attn=level == lowest))
                c = w
            if level != 0:
                self.up.append(Upsample(c))
        out = img_channels * (2 if learn_var else 1)  # eps, and with learned variance v
        self.head = nn.Sequential(norm(c), nn.SiLU(), nn.Conv2d(c, out, 3, padding=1))
        nn.init.zeros_(self.head[-1].weight)  # predict eps = 0 at first: the loss starts at 1, not at a random value
        self.ch = ch

    def forward(self, x, t, y=None):
        t_emb = self.time_embed(timestep_embedding(t, self.ch))
        if self.class_embed is not None:  # no label given (y None): the null class, p(x) itself
            t_emb = t_emb + self.class_embed(torch.full_like(t, NULL_CLASS) if y is None else y)
        h = self.stem(x)
        hs = [h]  # the maps the way up takes back, in the order of `skips` above
        for m in self.down:
            h = m(h, t_emb)
            hs.append(h)
        for m in self.mid:
            h = m(h, t_emb)
        for m in self.up:
            h = m(h) if isinstance(m, Upsample) else m(torch.cat([h, hs.pop()], dim=1), t_emb)
        return self.head(h)


def build_model(mcfg, shape):
    """The U-Net for images of `shape` (C, H, W); sizes it cannot take stop with one line."""
    try:
        mults = [int(m) for m in mcfg.channel_mults.split(",")]
    except ValueError:
        mults = []
    if not mults or min(mults) < 1:
        raise common.UsageError(f"--channel-mults {mcfg.channel_mults!r}: give positive integers separated by commas, "
                                f"e.g. 1,2,2")
    levels = len(mults) - 1
    if shape[1] % 2 ** levels or shape[2] % 2 ** levels:
        raise common.UsageError(f"{shape[1]}x{shape[2]} images cannot be halved {levels} times (--channel-mults "
                                f"{mcfg.channel_mults}); give --channel-mults fewer numbers")
    if mcfg.channels % 8:
        raise common.UsageError(f"--channels {mcfg.channels} must be a multiple of 8 (GroupNorm uses 8 groups)")
    return UNet(shape[0], mcfg.channels, mults, mcfg.num_res_blocks, mcfg.dropout, mcfg.variance == "learned",
                mcfg.conditional)


# ----------------------------------------------------------------------------- the loss

def loss_fn(diffusion, model, x0, y=None, vlb_weight=0.0, p_uncond=0.0):
    """Algorithm 1: t ~ Uniform, eps ~ N(0, I), a gradient step on ||eps - eps_theta(x_t, t)||^2 (L_simple, eq. 14).
    With learned variance, Nichol & Dhariwal's hybrid L_simple + lambda L_vlb, lambda = --vlb-weight (0.001 in the
    paper): L_vlb is large and noisy next to L_simple, and a small lambda keeps it from swamping the mean's signal.
    With labels y, each is dropped to the null class with probability p_uncond (Ho & Salimans, Algorithm 1), so the
    same network learns eps(x_t, t, y) and eps(x_t, t, null). Returns (loss, figures)."""
    t = torch.randint(0, diffusion.T, (len(x0),), device=x0.device)
    eps = torch.randn_like(x0)
    x_t = diffusion.q_sample(x0, t, eps)
    if y is not None:
        y = torch.where(torch.rand(len(y), device=y.device) < p_uncond, NULL_CLASS, y)
    net_out = model(x_t, t, y).float()
    eps_pred = net_out[:, :x0.shape[1]]
    l_simple = F.mse_loss(eps_pred, eps)
    if diffusion.variance != "learned":
        return l_simple, dict(loss=l_simple.detach())
    # the stop-gradient: L_vlb sees the mean through a detached eps, so it trains Sigma only and the mean is L_simple's
    frozen = torch.cat([eps_pred.detach(), net_out[:, x0.shape[1]:]], dim=1)
    l_vlb = diffusion.T * diffusion.vlb_term(frozen, x0, x_t, t).mean()  # sum_t L_t, estimated by T L_t at a drawn t
    loss = l_simple + vlb_weight * l_vlb
    return loss, dict(loss=loss.detach(), l_simple=l_simple.detach(), l_vlb=l_vlb.detach())


# ----------------------------------------------------------------------------- the samplers

def guided(model, x, t, y=None, w=0.0):
    """The network output the samplers use: eps_theta(x_t, t), or for labels y classifier-free guidance
    (Ho & Salimans 2022, eq. 6), the conditional and the null-class pass in one batch:
        eps~ = (1 + w) eps_theta(x_t, t, y) - w eps_theta(x_t, t, null)
    w = 0 is the conditional model alone, one pass. A learned variance v is the conditional pass's: guidance moves
    the mean (through eps) and leaves Sigma as the model of p(x | y) gives it."""
    if y is None or w == 0:
        return model(x, t, y).float()
    out = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, torch.full_like(y, NULL_CLASS)])).float()
    cond, uncond = out.chunk(2)
    c = x.shape[1]  # the first C channels are eps, the rest (learned variance) v
    return torch.cat([(1 + w) * cond[:, :c] - w * uncond[:, :c], cond[:, c:]], dim=1)


@torch.no_grad()
def sample_ancestral(diffusion, model, shape, rng, y=None, w=0.0, frames=0, progress=False):
    """Algorithm 2: x_T ~ N(0, I); for t = T .. 1: x_{t-1} = mu_theta(x_t, t) + sigma_t z, z ~ N(0, I) (z = 0 at
    the last step); with labels y, eps guided with weight w. Returns x_0 in [-1, 1] and `frames` snapshots along
    the way (x_T first)."""
    device = diffusion.betas.device
    x = torch.randn(shape, device=device, generator=rng)
    keep = set(torch.linspace(0, diffusion.T - 1, frames).round().long().tolist()) if frames else set()
    snapshots = [x] if frames else []
    for i, t_int in enumerate(tqdm(range(diffusion.T - 1, -1, -1), desc="sampling (ancestral)", leave=False,
                                   disable=not progress)):
        t = torch.full((shape[0],), t_int, device=device, dtype=torch.long)
        mean, logvar, _ = diffusion.p_mean_logvar(guided(model, x, t, y, w), x, t)
        z = torch.randn(shape, device=device, generator=rng) if t_int > 0 else torch.zeros_like(x)
        x = mean + torch.exp(0.5 * logvar) * z
        if i in keep:
            snapshots.append(x)
    return x.clamp(-1, 1), snapshots


def ddim_step(ab, ab_prev, x0, eps, eta):
    """One DDIM step from alpha_bar_t = ab to alpha_bar_prev = ab_prev: (the mean of x_prev, sigma)."""
    sigma = eta * ((1 - ab_prev) / (1 - ab) * (1 - ab / ab_prev)).sqrt()
    return ab_prev.sqrt() * x0 + (1 - ab_prev - sigma ** 2).clamp(min=0).sqrt() * eps, sigma


@torch.no_grad()
def sample_ddim(diffusion, model, shape, steps, eta, rng, y=None, w=0.0, frames=0, progress=False):
    """DDIM (Song et al. 2021, eq. 12) on `steps` of the T steps (with labels y, eps guided with weight w):
        x_prev = sqrt(ab_prev) x0 + sqrt(1 - ab_prev - sigma^2) eps + sigma z,
        sigma = eta sqrt((1 - ab_prev) / (1 - ab_t)) sqrt(1 - ab_t / ab_prev)  (eta = 0: deterministic)."""
    device = diffusion.betas.device
    x = torch.randn(shape, device=device, generator=rng)
    ts = torch.linspace(diffusion.T - 1, 0, steps).round().long().tolist()
    keep = set(torch.linspace(0, len(ts) - 1, frames).round().long().tolist()) if frames else set()
    snapshots = [x] if frames else []
    for i, t_int in enumerate(tqdm(ts, desc="sampling (ddim)", leave=False, disable=not progress)):
        t = torch.full((shape[0],), t_int, device=device, dtype=torch.long)
        _, _, x0 = diffusion.p_mean_logvar(guided(model, x, t, y, w), x, t)  # the clipped x_0
        ab = extract(diffusion.alpha_bar, t)
        eps = (x - ab.sqrt() * x0) / (1 - ab).sqrt()  # the eps that goes with the clipped x_0
        last = i + 1 == len(ts)  # the last step goes to alpha_bar = 1: x_0 itself
        ab_prev = torch.ones_like(ab) if last else extract(diffusion.alpha_bar, torch.full_like(t, ts[i + 1]))
        mean, sigma = ddim_step(ab, ab_prev, x0, eps, eta)
        x = mean + sigma * torch.randn(shape, device=device, generator=rng)
        if i in keep:
            snapshots.append(x)
    return x.clamp(-1, 1), snapshots


def sample(diffusion, model, shape, cfg, seed, y=None, w=None, frames=0, progress=False):
    """Fresh samples in [-1, 1] (and `frames` snapshots) from the sampler that --sampler names, for labels y (None:
    unconditional) guided with w (default --guidance), from a generator of their own seeded by `seed`: every grid
    of a run starts from the same x_T, and the training run's random numbers are untouched."""
    rng = torch.Generator(diffusion.betas.device).manual_seed(seed)
    w = cfg.guidance if w is None else w
    if cfg.sampler == "ancestral":
        return sample_ancestral(diffusion, model, shape, rng, y, w, frames, progress)
    return sample_ddim(diffusion, model, shape, cfg.sample_steps, cfg.eta, rng, y, w, frames, progress)


def check_sampling(cfg):
    """Sampler settings the model cannot take, refused before anything runs: --guidance mixes in the null class,
    which only a --conditional model has learned; DDIM's steps are a subset of the T steps."""
    if cfg.guidance > 0 and not cfg.model.conditional:
        raise common.UsageError(f"--guidance {cfg.guidance} needs a model trained with --conditional, and "
                                f"{cfg.out} is not: drop --guidance, or train with --conditional")
    if cfg.sampler == "ddim" and cfg.sample_steps > cfg.model.timesteps:
        raise common.UsageError(f"--sample-steps {cfg.sample_steps} is more than T = {cfg.model.timesteps} "
                                f"(--timesteps): DDIM takes a subset of the T steps; use at most {cfg.model.timesteps}")


# ----------------------------------------------------------------------------- the family's measure: the bound

@torch.no_grad()
def bound(diffusion, model, x0, rng=None, y=None):
    """The whole variational bound on -log p(x_0), term by term, in bits/dim per image: (L_T, sum_t L_{t-1}, L_0),
    one network pass per step t; with labels y, the bound on -log p(x_0 | y)."""
    prior, denoise, recon = diffusion.prior_term(x0), torch.zeros(len(x0), device=x0.device), None
    for t_int in range(diffusion.T):
        t = torch.full((len(x0),), t_int, device=x0.device, dtype=torch.long)
        x_t = diffusion.q_sample(x0, t, torch.randn(x0.shape, device=x0.device, generator=rng))
        term = diffusion.vlb_term(model(x_t, t, y).float(), x0, x_t, t, clip=True)
        if t_int == 0:
            recon = term
        else:
            denoise += term
    return prior, denoise, recon


# ----------------------------------------------------------------------------- pictures

def strip(columns):
    """Columns of snapshots (a list of B x C x H x W in [-1, 1]) -> one grid: a row per image, a column per snapshot."""
    return common.signed_to_unit(torch.stack(columns, dim=1).flatten(0, 1).clamp(-1, 1))


def forward_process_picture(diffusion, x0, path, seed):
    """x_0 -> x_T for a few training images: q(x_t | x_0) at ten t from 0 to T-1."""
    rng = torch.Generator(x0.device).manual_seed(seed)
    ts = torch.linspace(0, diffusion.T - 1, 10).round().long().to(x0.device)
    cols = [x0] + [diffusion.q_sample(x0, t.repeat(len(x0)), torch.randn(x0.shape, device=x0.device, generator=rng))
                   for t in ts]
    common.save_grid(strip(cols), path, nrow=len(cols))


GUIDANCE_WEIGHTS = (0, 1, 3, 7)  # the columns of guidance.png


def guidance_picture(diffusion, ema, cfg, shape, path):
    """guidance.png: a row per class (or ten rows of --label), a column per guidance weight w in GUIDANCE_WEIGHTS,
    each row from one x_T for every w: what guidance does to the same start."""
    y = common.class_labels(cfg, common.NUM_CLASSES, diffusion.betas.device)
    columns = [sample(diffusion, ema, (len(y), *shape), cfg, cfg.seed, y, w)[0] for w in GUIDANCE_WEIGHTS]
    common.save_grid(strip(columns), path, nrow=len(columns))


def sample_grid(diffusion, ema, cfg, x0, step):
    """The pictures of a grid step of the run: samples_<step>.png from the EMA weights (a row per class for a
    --conditional model) and forward_process.png of the training images x0; at the end of the run also
    reverse_process.png, x_T -> x_0 for 8 of the samples, and for a conditional model guidance.png."""
    out, shape = Path(cfg.out), (cfg.num_samples, *x0.shape[1:])
    y = common.class_labels(cfg, shape[0], x0.device)
    x, frames = sample(diffusion, ema, shape, cfg, cfg.seed, y, frames=10, progress=True)
    common.save_grid(common.signed_to_unit(x), out / f"samples_{step}.png", labels=y)
    forward_process_picture(diffusion, x0, out / "forward_process.png", cfg.seed)
    if step == cfg.steps:
        common.save_grid(strip([f[:8] for f in frames]), out / "reverse_process.png", nrow=len(frames))
        if y is not None:
            guidance_picture(diffusion, ema, cfg, shape[1:], out / "guidance.png")


# ----------------------------------------------------------------------------- training

def train(cfg):
    run = common.Run(cfg, "ddpm")  # the device, the seeds, torchrun (common.py): nothing is written yet
    x_train, y_train = common.load_split(cfg, "train", run.device)  # y_train: None unless --conditional
    diffusion = Diffusion(cfg.model, run.device)  # a bad schedule stops here, before anything is written
    model = build_model(cfg.model, tuple(x_train.shape[1:])).to(run.device)
    check_sampling(cfg)
    ema, opt = common.make_ema(model), torch.optim.Adam(model.parameters(), lr=cfg.lr)
    shown = common.uint8_to_signed(x_train[:8])  # the training images of forward_process.png
    run.start(dict(model=model, ema=ema, opt=opt), lambda step: sample_grid(diffusion, ema, cfg, shown, step))
    net = run.wrap(model)  # the model as the step calls it: DDP under torchrun, compiled with --compile
    for step in run:
        x0, y = run.batch(x_train, y_train)  # y: the labels of a --conditional model, else None
        x0 = common.uint8_to_signed(x0)  # [-1, 1], the scale the schedule's noise is sized for
        for group in opt.param_groups:  # linear warm-up: large early updates would undo the zero-initialised layers
            group["lr"] = cfg.lr * min(1.0, (step + 1) / cfg.warmup)
        with run.autocast():
            loss, figures = loss_fn(diffusion, net, x0, y, cfg.vlb_weight, cfg.model.p_uncond)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        figures["grad_norm"] = nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        run.check(loss=loss, grad_norm=figures["grad_norm"])  # a NaN stops the run here, before the update
        opt.step()
        common.ema_update(ema, model, cfg.ema_decay, step)
        run.log(figures)
    run.finish()


# ----------------------------------------------------------------------------- the modes

def load_for_inference(cfg):
    """(the EMA U-Net that samples and evaluates, the test images as uint8, their labels or None) from the run in
    --out; a --guidance the model cannot take stops here."""
    device = common.get_device(cfg.device)
    check_sampling(cfg)
    x_test, y_test = common.load_split(cfg, "test", device)
    ema = build_model(cfg.model, tuple(x_test.shape[1:])).to(device).eval()
    common.load_checkpoint(Path(cfg.out) / "ckpt.pt", "ddpm", ema=ema)
    return ema, x_test, y_test


def evaluate(cfg):
    """The bound on test images: -log p(x_0) <= L_T + sum_t L_{t-1} + L_0, in bits/dim (T network passes per image)."""
    ema, x_test, y_test = load_for_inference(cfg)
    diffusion = Diffusion(cfg.model, x_test.device)
    x_test = x_test[:cfg.eval_n]
    part = common.shard(len(x_test))  # under torchrun: each rank its share
    rng = torch.Generator(x_test.device).manual_seed(common.rank_seed(cfg.seed))
    parts = torch.zeros(3, dtype=torch.float64)
    for i in tqdm(range(part.start, part.stop, cfg.batch_size), desc="the bound", disable=not common.is_main()):
        j = min(i + cfg.batch_size, part.stop)
        y = None if y_test is None else y_test[i:j]  # a conditional model: the bound on -log p(x | y), true labels
        terms = bound(diffusion, ema, common.uint8_to_signed(x_test[i:j]), rng, y)
        parts += torch.stack([p.sum().cpu() for p in terms]).double()
    prior, denoise, recon = (common.reduce_over_ranks(parts) / len(x_test)).tolist()
    rows = {"L_T      prior matching (bits/dim)": prior, "L_t-1    denoising (bits/dim)": denoise,
            "L_0      reconstruction (bits/dim)": recon, "NLL <=   total (bits/dim)": prior + denoise + recon}
    given = " given their labels, -log p(x | y)" if y_test is not None else ""
    return common.report(cfg.out, f"variational bound on {len(x_test)} test images of {cfg.model.dataset}{given}", rows,
                         n=len(x_test))


def sample_from_checkpoint(cfg):
    ema, x_test, _ = load_for_inference(cfg)
    diffusion = Diffusion(cfg.model, x_test.device)
    start, chunks, part = time.time(), [], common.shard(cfg.num_samples)  # under torchrun: each rank its share
    for n in range(part.start, part.stop, 500):  # bounded memory for any --num-samples; chunk n starts from seed + n
        shape = (min(500, part.stop - n), *x_test.shape[1:])
        y = common.class_labels(cfg, shape[0], x_test.device, start=n)  # image i: class i mod 10, or --label
        with common.autocast(x_test.device, cfg.precision):
            x, _ = sample(diffusion, ema, shape, cfg, cfg.seed + n, y, progress=True)
        chunks.append(common.signed_to_unit(x).float())
    samples = common.gather_cat(torch.cat(chunks).cpu() if chunks else torch.zeros(0, *x_test.shape[1:]))
    common.save_samples(cfg, samples)
    w = f", guidance w = {cfg.guidance:g}" if cfg.model.conditional else ""
    common.say(f"{len(samples)} samples ({cfg.sampler}{w}) in {time.time() - start:.1f}s -> {cfg.out}/samples.png, "
               f"samples.pt")


@common.entry
def main(argv=None):
    cfg = common.parse_args(ModelConfig, Config, "ddpm", argv, PRESETS)
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
