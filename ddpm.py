"""DDPM: denoising diffusion probabilistic models (Ho et al. 2020; learned variance from Nichol & Dhariwal 2021).

A fixed forward process adds Gaussian noise to an image over T steps until nothing but noise is left;
a U-Net learns the reverse process, one small denoising step at a time, and sampling runs it from pure
noise back to an image. Training is a variational bound, like the VAE's, whose terms are Gaussian KLs
with closed forms; in practice the bound's denoising terms reduce to predicting the noise that was added.

    forward   q(x_t | x_{t-1}) = N(x_t; sqrt(1 - beta_t) x_{t-1}, beta_t I)
              q(x_t | x_0)     = N(x_t; sqrt(alpha_bar_t) x_0, (1 - alpha_bar_t) I),  alpha_bar_t = prod_s (1 - beta_s)
    reverse   p(x_{t-1} | x_t) = N(x_{t-1}; mu_theta(x_t, t), Sigma_theta(x_t, t))
    loss      L = D_KL(q(x_T|x_0) || p(x_T))                           L_T, prior matching (regularization)
                + sum_{t>1} D_KL(q(x_{t-1}|x_t,x_0) || p(x_{t-1}|x_t))   L_{t-1}, denoising
                - log p(x_0 | x_1)                                       L_0, reconstruction
              L_simple = E_{t, x_0, eps} || eps - eps_theta(sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps, t) ||^2

Run:
    python ddpm.py --dataset mnist                      # the default model, sized for one GPU
    python ddpm.py --dataset mnist --sample             # 64 samples from runs/ddpm-mnist/ckpt.pt
    python ddpm.py --dataset mnist --sample --sampler ddim --sample-steps 50
    python ddpm.py --dataset mnist --eval --eval-n 1000 # the bound in bits/dim, with its three parts
    python ddpm.py --dataset mnist --device cpu --channels 32 --num-res-blocks 1 --dropout 0 --batch-size 32 \\
        --lr 1e-3 --warmup 200 --ema-decay 0.995 --sampler ddim --sample-every 1000 --steps 4000 --out runs/ddpm-cpu
                                                        # quick CPU run: recognisable digits in 13 min on 2 cores
"""
import dataclasses
import math
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange
from tqdm import tqdm

import common


@dataclasses.dataclass
class Config(common.TrainConfig):
    steps: int = common.opt(20000, "training steps", runtime=True)
    lr: float = common.opt(2e-4, "peak learning rate (Adam)", runtime=True)
    warmup: int = common.opt(500, "steps of linear learning-rate warm-up", runtime=True)
    grad_clip: float = common.opt(1.0, "clip the gradient norm to this", runtime=True)
    ema_decay: float = common.opt(0.999, "EMA decay of the weights used for sampling and --eval", runtime=True)
    # the diffusion
    timesteps: int = common.opt(1000, "T, the number of diffusion steps")
    schedule: str = common.opt("linear", "beta schedule", choices=["linear", "sigmoid", "quadratic", "cosine"])
    variance: str = common.opt("fixed-large", "Sigma_theta: beta_t (fixed-large), beta-tilde_t (fixed-small), or learned",
                               choices=["fixed-large", "fixed-small", "learned"])
    vlb_weight: float = common.opt(0.001, "lambda in L_hybrid = L_simple + lambda L_vlb (learned variance only)")
    # the U-Net
    channels: int = common.opt(64, "U-Net base width (a multiple of 8)")
    channel_mults: str = common.opt("1,2,2", "width multiplier per resolution; each level after the first halves H and W")
    num_res_blocks: int = common.opt(2, "residual blocks per resolution")
    dropout: float = common.opt(0.1, "dropout in the residual blocks")
    # sampling and evaluation
    sampler: str = common.opt("ancestral", "ancestral (all T steps) or ddim", choices=["ancestral", "ddim"], runtime=True)
    sample_steps: int = common.opt(50, "DDIM steps", runtime=True)
    eta: float = common.opt(0.0, "DDIM noise: 0 is deterministic, 1 matches the ancestral sampler's variance", runtime=True)
    eval: bool = common.opt(False, "compute the variational bound (bits/dim) on test images with the checkpoint", runtime=True)
    eval_n: int = common.opt(1000, "test images for --eval", runtime=True)


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
        q, k, v = rearrange(self.qkv(self.norm(x)), "b (three heads d) h w -> three b heads (h w) d", three=3, heads=self.heads)
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
    """eps_theta(x_t, t): predicts the noise in x_t (and, with learned variance, the interpolation v)."""

    def __init__(self, img_channels, ch, mults, num_res_blocks, dropout, learn_var):
        super().__init__()
        t_dim = 4 * ch
        self.time_embed = nn.Sequential(nn.Linear(ch, t_dim), nn.SiLU(), nn.Linear(t_dim, t_dim))
        self.stem = nn.Conv2d(img_channels, ch, 3, padding=1)
        widths, lowest = [ch * m for m in mults], len(mults) - 1
        self.down, skips, c = nn.ModuleList(), [ch], ch
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
            for _ in range(num_res_blocks + 1):  # one more than on the way down: it takes the Downsample's skip
                self.up.append(Block(c + skips.pop(), w, t_dim, dropout, attn=level == lowest))
                c = w
            if level != 0:
                self.up.append(Upsample(c))
        self.head = nn.Sequential(norm(c), nn.SiLU(), nn.Conv2d(c, img_channels * (2 if learn_var else 1), 3, padding=1))
        nn.init.zeros_(self.head[-1].weight)  # predict eps = 0 at first: the loss starts at 1, not at a random value
        self.ch = ch

    def forward(self, x, t):
        t_emb = self.time_embed(timestep_embedding(t, self.ch))
        h = self.stem(x)
        hs = [h]
        for m in self.down:
            h = m(h, t_emb)
            hs.append(h)
        for m in self.mid:
            h = m(h, t_emb)
        for m in self.up:
            h = m(h) if isinstance(m, Upsample) else m(torch.cat([h, hs.pop()], dim=1), t_emb)
        return self.head(h)


def build_model(cfg, img_channels, size):
    mults = [int(m) for m in cfg.channel_mults.split(",")]
    halvings = 2 ** (len(mults) - 1)
    if size[0] % halvings or size[1] % halvings:
        raise common.UsageError(f"{size[0]}x{size[1]} images cannot be halved {len(mults) - 1} times (--channel-mults "
                                f"{cfg.channel_mults}); use fewer levels, e.g. --channel-mults 1,2,2 for 28x28 or 32x32")
    if cfg.channels % 8:
        raise common.UsageError(f"--channels {cfg.channels} must be a multiple of 8 (GroupNorm uses 8 groups)")
    return UNet(img_channels, cfg.channels, mults, cfg.num_res_blocks, cfg.dropout, cfg.variance == "learned")


# ----------------------------------------------------------------------------- the diffusion: schedules and formulas

def make_betas(schedule, T):
    """beta_1 .. beta_T. linear is Ho et al.'s 1e-4 .. 0.02 at T = 1000, scaled by 1000/T so that any T adds
    about the same total noise; sigmoid and quadratic span the same range; cosine is Nichol & Dhariwal's."""
    scale = 1000 / T
    lo, hi = 1e-4 * scale, 0.02 * scale
    if schedule == "linear":
        return torch.linspace(lo, hi, T, dtype=torch.float64)
    if schedule == "quadratic":
        return torch.linspace(lo ** 0.5, hi ** 0.5, T, dtype=torch.float64) ** 2
    if schedule == "sigmoid":
        return torch.sigmoid(torch.linspace(-6, 6, T, dtype=torch.float64)) * (hi - lo) + lo
    if schedule == "cosine":  # alpha_bar(t) = cos^2((t/T + s) / (1 + s) * pi/2), beta_t = 1 - alpha_bar_t / alpha_bar_{t-1}
        s = 0.008
        f = torch.cos((torch.arange(T + 1, dtype=torch.float64) / T + s) / (1 + s) * math.pi / 2) ** 2
        return (1 - f[1:] / f[:-1]).clamp(max=0.999)  # the clip keeps the last steps from being singular
    raise ValueError(schedule)


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
    return a[t].float()[:, None, None, None]


class Diffusion:
    """The fixed forward process and the Gaussian algebra of the reverse one. Index t = 0 .. T-1 in code is
    step t+1 in the paper, so betas[0] is beta_1 and alpha_bar[t] = prod_{s <= t} (1 - betas[s])."""

    def __init__(self, cfg, device):
        self.T, self.variance, self.vlb_weight = cfg.timesteps, cfg.variance, cfg.vlb_weight
        b = make_betas(cfg.schedule, cfg.timesteps)  # float64 for the products, as in Ho et al.'s code
        ab = torch.cumprod(1 - b, 0)
        ab_prev = torch.cat([torch.ones(1, dtype=b.dtype), ab[:-1]])
        # posterior q(x_{t-1} | x_t, x_0) = N(coef_x0 x_0 + coef_xt x_t, beta_tilde_t), Ho et al. eq. (6)-(7)
        beta_tilde = b * (1 - ab_prev) / (1 - ab)
        log_beta_tilde = torch.log(torch.cat([beta_tilde[1:2], beta_tilde[1:]]))  # beta_tilde_1 = 0: use beta_tilde_2
        tensors = dict(betas=b, alpha_bar=ab, alpha_bar_prev=ab_prev, beta_tilde=beta_tilde,
                       log_beta_tilde=log_beta_tilde, log_betas=torch.log(torch.cat([beta_tilde[1:2], b[1:]])),
                       coef_x0=b * ab_prev.sqrt() / (1 - ab), coef_xt=(1 - ab_prev) * (1 - b).sqrt() / (1 - ab))
        for name, v in tensors.items():
            setattr(self, name, v.to(device))

    def q_sample(self, x0, t, eps):
        """x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps: one jump instead of t noising steps."""
        return extract(self.alpha_bar, t).sqrt() * x0 + (1 - extract(self.alpha_bar, t)).sqrt() * eps

    def q_posterior(self, x0, x_t, t):
        """Mean and log-variance of q(x_{t-1} | x_t, x_0)."""
        return extract(self.coef_x0, t) * x0 + extract(self.coef_xt, t) * x_t, extract(self.log_beta_tilde, t)

    def predict_x0(self, x_t, t, eps):
        """Invert q_sample: x_0 = (x_t - sqrt(1 - alpha_bar_t) eps) / sqrt(alpha_bar_t)."""
        return (x_t - (1 - extract(self.alpha_bar, t)).sqrt() * eps) / extract(self.alpha_bar, t).sqrt()

    def p_mean_logvar(self, out, x_t, t, clip=True):
        """p(x_{t-1} | x_t) from the network output: the mean via the predicted x_0 in the posterior's formula
        (clipped to the data range while sampling), the log-variance fixed or learned."""
        eps, v = out.chunk(2, dim=1) if self.variance == "learned" else (out, None)
        x0 = self.predict_x0(x_t, t, eps)
        if clip:
            x0 = x0.clamp(-1, 1)
        mean, _ = self.q_posterior(x0, x_t, t)
        if self.variance == "fixed-small":
            logvar = extract(self.log_beta_tilde, t).expand_as(x_t)
        elif self.variance == "fixed-large":
            logvar = extract(self.log_betas, t).expand_as(x_t)
        else:  # Nichol & Dhariwal eq. (15): Sigma = exp(v log beta_t + (1 - v) log beta_tilde_t), v mapped from [-1, 1]
            frac = (v + 1) / 2
            logvar = frac * extract(self.log_betas, t) + (1 - frac) * extract(self.log_beta_tilde, t)
        return mean, logvar, x0

    def vlb_term(self, out, x0, x_t, t, clip=False):
        """L_{t-1} = KL(q(x_{t-1}|x_t,x_0) || p(x_{t-1}|x_t)) for t > 0, and L_0 = -log p(x_0|x_1) at t = 0;
        in bits per dimension, one value per image."""
        true_mean, true_logvar = self.q_posterior(x0, x_t, t)
        mean, logvar, _ = self.p_mean_logvar(out, x_t, t, clip)
        kl = normal_kl(true_mean, true_logvar, mean, logvar).flatten(1).mean(1)
        nll = -discretized_gaussian_log_likelihood(x0, mean, 0.5 * logvar).flatten(1).mean(1)
        return torch.where(t == 0, nll, kl) / math.log(2)

    def prior_term(self, x0):
        """L_T = KL(q(x_T | x_0) || N(0, I)) in bits per dimension: no parameters, near 0 when alpha_bar_T ~ 0."""
        t = torch.full((len(x0),), self.T - 1, device=x0.device)
        mean, logvar = extract(self.alpha_bar, t).sqrt() * x0, torch.log(1 - extract(self.alpha_bar, t))
        return normal_kl(mean, logvar.expand_as(x0), torch.zeros_like(x0), torch.zeros_like(x0)).flatten(1).mean(1) / math.log(2)

    def loss(self, model, x0):
        """L_simple (Ho et al. eq. 14) at a uniformly drawn t; with learned variance the hybrid
        L_simple + lambda L_vlb, where the vlb term sees the mean through a stop-gradient so it trains only Sigma."""
        t = torch.randint(0, self.T, (len(x0),), device=x0.device)
        eps = torch.randn_like(x0)
        out = model(self.q_sample(x0, t, eps), t).float()
        eps_pred = out[:, :x0.shape[1]]
        l_simple = F.mse_loss(eps_pred, eps)
        if self.variance != "learned":
            return l_simple, dict(loss=l_simple.item())
        frozen = torch.cat([eps_pred.detach(), out[:, x0.shape[1]:]], dim=1)  # stop-gradient on the mean
        # L_vlb = sum_t L_t, estimated by T * L_t at the drawn t
        l_vlb = self.T * self.vlb_term(frozen, x0, self.q_sample(x0, t, eps), t).mean()
        loss = l_simple + self.vlb_weight * l_vlb
        return loss, dict(loss=loss.item(), l_simple=l_simple.item(), l_vlb=l_vlb.item())

    # ------------------------------------------------------------------------- samplers

    def ddim_step(self, x_t, t, t_prev, x0, eps, eta):
        """Song et al. eq. (12): x_prev = sqrt(ab_prev) x0 + sqrt(1 - ab_prev - sigma^2) eps + sigma z, with
        sigma = eta sqrt((1 - ab_prev) / (1 - ab_t)) sqrt(1 - ab_t / ab_prev). Returns (mean, sigma)."""
        ab = extract(self.alpha_bar, t)
        ab_prev = extract(self.alpha_bar, t_prev) if t_prev[0] >= 0 else torch.ones_like(ab)
        sigma = eta * ((1 - ab_prev) / (1 - ab) * (1 - ab / ab_prev)).sqrt()
        return ab_prev.sqrt() * x0 + (1 - ab_prev - sigma ** 2).clamp(min=0).sqrt() * eps, sigma

    @torch.no_grad()
    def sample(self, model, shape, sampler="ancestral", steps=50, eta=0.0, frames=0, progress=False, seed=0):
        """Run the reverse process from x_T ~ N(0, I). Returns x_0 in [-1, 1] and `frames` snapshots of the way.
        Its own seeded generator: every grid of a run starts from the same x_T, and training's RNG is untouched."""
        device = self.betas.device
        g = torch.Generator(device).manual_seed(seed)
        noise = lambda: torch.randn(shape, device=device, generator=g)
        x = noise()
        ts = list(range(self.T - 1, -1, -1)) if sampler == "ancestral" else \
            torch.linspace(self.T - 1, 0, steps).round().long().tolist()
        keep = set(torch.linspace(0, len(ts) - 1, frames).round().long().tolist()) if frames else set()
        snapshots = [x] if frames else []
        for i, t_int in enumerate(tqdm(ts, desc=f"sampling ({sampler})", leave=False, disable=not progress)):
            t = torch.full((shape[0],), t_int, device=device, dtype=torch.long)
            out = model(x, t).float()
            if sampler == "ancestral":  # x_{t-1} = mu_theta + Sigma^(1/2) z, no noise at the last step
                mean, logvar, _ = self.p_mean_logvar(out, x, t)
                x = mean + (t_int > 0) * torch.exp(0.5 * logvar) * noise()
            else:
                _, _, x0 = self.p_mean_logvar(out, x, t)
                eps = (x - extract(self.alpha_bar, t).sqrt() * x0) / (1 - extract(self.alpha_bar, t)).sqrt()  # eps of the clipped x0
                t_prev = torch.full_like(t, ts[i + 1] if i + 1 < len(ts) else -1)
                mean, sigma = self.ddim_step(x, t, t_prev, x0, eps, eta)
                x = mean + sigma * noise()
            if i in keep:
                snapshots.append(x)
        return x.clamp(-1, 1), snapshots

    @torch.no_grad()
    def bound(self, model, x0):
        """The whole variational bound, term by term, in bits/dim per image: (L_T, sum L_{t-1}, L_0)."""
        prior, denoise, recon = self.prior_term(x0), torch.zeros(len(x0), device=x0.device), None
        for t_int in range(self.T):
            t = torch.full((len(x0),), t_int, device=x0.device, dtype=torch.long)
            x_t = self.q_sample(x0, t, torch.randn_like(x0))
            term = self.vlb_term(model(x_t, t).float(), x0, x_t, t, clip=True)
            if t_int == 0:
                recon = term
            else:
                denoise += term
        return prior, denoise, recon


# ----------------------------------------------------------------------------- pictures, training, sampling, eval

def to_unit(x):
    return (x + 1) / 2


def process_strip(rows):
    """Rows of snapshots (a list of B x C x H x W) -> one grid with a row per image and a column per snapshot."""
    return torch.stack(rows, dim=1).flatten(0, 1)


def setup(cfg, device, split="train"):
    x, _ = common.load_dataset(cfg.dataset, cfg.data_dir, split, device)
    model = build_model(cfg, x.shape[1], x.shape[2:]).to(device)
    return x, model, Diffusion(cfg, device)


def train(cfg):
    device = common.get_device(cfg.device)
    common.seed_everything(cfg.seed)
    out = common.start_run(cfg, "ddpm")
    x_train, model, diffusion = setup(cfg, device)
    ema = common.make_ema(model)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    gen = common.data_generator(device, cfg.seed)
    step = common.load_checkpoint(out / "ckpt.pt", "ddpm", cfg, model=model, ema=ema, opt=opt, gen=gen) if cfg.resume else 0
    n_params = sum(p.numel() for p in model.parameters())
    print(f"ddpm: {n_params / 1e6:.2f}M parameters, {len(x_train)} training images {tuple(x_train.shape[1:])}, {device}")
    forward_model = common.maybe_compile(model, cfg)
    shape = (cfg.num_samples, *x_train.shape[1:])
    if step == 0:  # the forward process x_0 -> x_T, once per run
        x0 = common.to_signed(x_train[:8])
        ts = torch.linspace(0, cfg.timesteps - 1, 10).round().long().to(device)
        cols = [x0] + [diffusion.q_sample(x0, t.repeat(8), torch.randn_like(x0)) for t in ts]
        common.save_grid(to_unit(process_strip(cols)), out / "forward_process.png", nrow=len(cols))
    log = common.Logger(out, cfg.steps, step)
    save = lambda: common.save_checkpoint(out / "ckpt.pt", "ddpm", cfg, step, model=model, ema=ema, opt=opt, gen=gen)
    try:
        while step < cfg.steps:
            x0 = common.to_signed(common.random_batch(x_train, cfg.batch_size, gen))
            for g in opt.param_groups:  # linear warm-up: large early updates would undo the zero-initialised layers
                g["lr"] = cfg.lr * min(1.0, (step + 1) / cfg.warmup)
            with common.autocast(device, cfg.precision):
                loss, figures = diffusion.loss(forward_model, x0)
            common.check_finite(loss, step)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            figures["grad_norm"] = nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip).item()
            opt.step()
            common.ema_update(ema, model, cfg.ema_decay, step)
            step += 1
            log.count(cfg.batch_size)
            if step % cfg.log_every == 0 or step == cfg.steps:
                log.log(step, **figures)
            if step % cfg.sample_every == 0 or step == cfg.steps:
                with common.autocast(device, cfg.precision):
                    x, frames = diffusion.sample(ema, shape, cfg.sampler, cfg.sample_steps, cfg.eta, frames=10, seed=cfg.seed)
                common.save_grid(to_unit(x), out / f"samples_{step}.png")
                if step == cfg.steps:  # the reverse process x_T -> x_0 for 8 samples, once per run
                    common.save_grid(to_unit(process_strip([f[:8].clamp(-1, 1) for f in frames])),
                                     out / "reverse_process.png", nrow=len(frames))
            if step % cfg.ckpt_every == 0 or step == cfg.steps:
                save()
    except KeyboardInterrupt:
        save()
        print(f"interrupted: checkpoint saved at step {step}")
        raise SystemExit(130)
    print(f"done: {out}")


def load_for_inference(cfg):
    device = common.get_device(cfg.device)
    x_test, model, diffusion = setup(cfg, device, "test")
    ema = common.make_ema(model)
    out = common.out_dir(cfg, "ddpm")
    common.load_checkpoint(out / "ckpt.pt", "ddpm", cfg, model=model, ema=ema)
    common.seed_everything(cfg.seed)  # after loading, which restores the training run's RNG state
    return device, x_test, ema, diffusion, out


def sample_from_checkpoint(cfg):
    device, x_test, ema, diffusion, out = load_for_inference(cfg)
    start, chunks = time.time(), []
    for n in range(0, cfg.num_samples, 500):  # bounded memory for any --num-samples
        shape = (min(500, cfg.num_samples - n), *x_test.shape[1:])
        with common.autocast(device, cfg.precision):
            x = diffusion.sample(ema, shape, cfg.sampler, cfg.sample_steps, cfg.eta, progress=True, seed=cfg.seed + n)[0]
        chunks.append(to_unit(x).float())
    samples = torch.cat(chunks).cpu()
    common.save_grid(samples[:256], out / "samples.png")
    torch.save(samples, out / "samples.pt")
    print(f"{len(samples)} samples ({cfg.sampler}) in {time.time() - start:.1f}s -> {out}/samples.png, samples.pt")


def evaluate(cfg):
    """The bound on test images: -log p(x_0) <= L_T + sum_t L_{t-1} + L_0, in bits/dim (T network passes per image)."""
    device, x_test, ema, diffusion, out = load_for_inference(cfg)
    x_test = x_test[:cfg.eval_n]
    parts = torch.zeros(3)
    for i in tqdm(range(0, len(x_test), cfg.batch_size), desc="eval"):
        x0 = common.to_signed(x_test[i:i + cfg.batch_size])
        parts += torch.stack([p.sum().cpu() for p in diffusion.bound(ema, x0)])
    prior, denoise, recon = (parts / len(x_test)).tolist()
    print(f"variational bound on {len(x_test)} test images of {cfg.dataset} (bits/dim)")
    print(f"  L_T      prior matching   {prior:8.4f}")
    print(f"  L_t-1    denoising        {denoise:8.4f}")
    print(f"  L_0      reconstruction   {recon:8.4f}")
    print(f"  NLL <=   total            {prior + denoise + recon:8.4f}")


@common.entry
def main(argv=None):
    cfg = common.parse_config(Config, argv)
    if cfg.sample:
        sample_from_checkpoint(cfg)
    elif cfg.eval:
        evaluate(cfg)
    else:
        train(cfg)


if __name__ == "__main__":
    main()
