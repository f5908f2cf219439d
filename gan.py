r"""GAN: a generator and a discriminator trained against each other (Goodfellow et al. 2014), here as a DCGAN.

The generator G maps noise z ~ N(0, I) to an image and never sees a density: it learns only through the
discriminator D, which outputs the probability that its input is a real image rather than one of G's. The
two play a minimax game, D ascending and G descending the same value function:

    min_G max_D  V(D, G) = E_{x~p_data} log D(x) + E_{z~p(z)} log(1 - D(G(z)))

Algorithm 1 of the paper alternates k discriminator steps with one generator step; in practice G ascends
log D(G(z)) instead of descending log(1 - D(G(z))) (the "non-saturating" loss, same fixed point, strong
gradients early on). The networks follow Radford et al. 2016 ("Unsupervised Representation Learning with
Deep Convolutional Generative Adversarial Networks"): transposed convolutions, BatchNorm and ReLU in G,
strided convolutions, BatchNorm (not on D's input) and LeakyReLU(0.2) in D, Adam(2e-4, beta1 0.5), and the
convolutions' weights drawn from N(0, 0.02).

--conditional makes it a class-conditional GAN (Mirza & Osindero 2014, "Conditional Generative Adversarial Nets"),
in the form of Miyato & Koyama 2018 ("cGANs with Projection Discriminator"). G(z, y) takes the class through
conditional BatchNorm: after each BatchNorm, a learned per-class scale and shift, h <- h (1 + gamma_y) + beta_y.
(Feeding an embedding of y beside z, the simplest form, drew one image per class on MNIST here: G learned to amplify
the class input until z no longer mattered; the BatchNorm that follows then normalizes z's share away.) D is the
projection discriminator: with phi(x) D's features and psi its last, linear layer,

    D(x, y) = sigmoid(l),   l(x, y) = psi(phi(x)) + embed(y)^T phi(x)

Why not simply concatenate y to D's input: the optimal D's logit is the log density ratio log p_data(x, y) /
p_G(x, y) = log p_data(x)/p_G(x) + log p_data(y|x)/p_G(y|x), and when both p(y|x) are log-linear in phi(x)
(softmax classifiers on D's features) the second term is (v_y^data - v_y^G)^T phi(x) plus a term in x alone (their
normalizers), which psi(phi(x)) absorbs: embed(y)^T phi(x). Miyato & Koyama derive the projection from this form, and
it gave clearly better class fidelity than feeding y in with the image; it is also one line. The losses and
Algorithm 1 are unchanged: every D(.) above becomes D(., y), every G(z) becomes G(z, y).

    python gan.py                           # the recipe for the device: quick on a CPU (7 min), full on a GPU
    python gan.py --sample --num-samples 10000   # samples.pt, latent interpolation, latent arithmetic
    python gan.py --eval                    # V(D, G) and D's verdicts on the test set
    python gan.py --g-loss minimax --out runs/gan-minimax   # the saturating loss of the minimax game, to compare
    python gan.py --conditional --out runs/gan-cond        # G(z, y) and a projection D(x, y)
    python gan.py --out runs/gan-cond --sample --label 7   # sevens (no --label: one row per class)
    python benchmarks/quality.py score runs/gan-mnist/samples.pt   # FD, precision/recall, classes
"""
import contextlib
import dataclasses
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import common


@dataclasses.dataclass
class ModelConfig(common.ModelConfig):
    z_dim: int = common.opt(100, "size of the noise z", "[1, inf)")
    g_channels: int = common.opt(64, "generator width (ngf): its layers have 4x, 2x this many channels", "[1, inf)")
    d_channels: int = common.opt(64, "discriminator width (ndf): its layers have 1x, 2x this many channels", "[1, inf)")


@dataclasses.dataclass
class Config(common.RunConfig):
    steps: int = common.opt(20000, "generator updates (each after --d-steps discriminator updates)", "[1, inf)")
    sample_every: int = common.opt(1000, "steps between grids of the fixed noise batch", "[1, inf)")
    ckpt_every: int = common.opt(1000, "steps between checkpoints", "[1, inf)")
    lr: float = common.opt(2e-4, "Adam learning rate of G and D (Radford et al.)", "(0, inf)")
    beta1: float = common.opt(0.5, "Adam beta1 (0.5, not 0.9: momentum makes the game oscillate)", "[0, 1)")
    beta2: float = common.opt(0.999, "Adam beta2", "[0, 1)")
    d_steps: int = common.opt(1, "k: discriminator updates per generator update (Algorithm 1)", "[1, inf)")
    g_loss: str = common.opt("non-saturating", "generator loss: -log D(G(z)), or the minimax log(1 - D(G(z)))",
                             choices=["non-saturating", "minimax"])
    ema: bool = common.opt(False, "draw pictures and --sample from the EMA of G's weights (always tracked)")
    ema_decay: float = common.opt(0.999, "decay of the EMA of G's weights", "[0, 1]")


PRESETS = {  # the recipe of a bare command, quick on a CPU, full on a CUDA GPU (--preset); a flag you give always wins
    "full": dict(about="the full model, DCGAN 64/64 channels for 20k steps of 128, sized for one GPU", options={}),
    "quick": dict(about="the quick run, DCGAN 32/32 channels, batches of 64 for 10 minutes of training "
                        "(--max-minutes 10; at most 30k steps)",
                options=dict(g_channels=32, d_channels=32, batch_size=64, max_minutes=10.0, steps=30000,
                             sample_every=5000)),
}


# ----------------------------------------------------------------------------- the two networks

def dcgan_init(m):
    """Every conv weight ~ N(0, 0.02), as Radford et al. write ("All weights were initialized from a zero-centered
    Normal distribution with standard deviation 0.02"). The paper says nothing of BatchNorm's parameters: its scale
    ~ N(1, 0.02) and shift 0 come from the DCGAN reference code (soumith/dcgan.torch main.lua,
    m.weight:normal(1.0, 0.02); pytorch/examples dcgan/main.py, torch.nn.init.normal_(m.weight, 1.0, 0.02))."""
    if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
        nn.init.normal_(m.weight, 0.0, 0.02)
    elif isinstance(m, nn.BatchNorm2d):
        nn.init.normal_(m.weight, 1.0, 0.02)
        nn.init.zeros_(m.bias)


class Generator(nn.Module):
    """(z, y) -> image: a 1x1 "image" of z_dim channels, upsampled by transposed convolutions. The first layer's
    kernel is the quarter image size, so one network shape serves 28x28 (7 -> 14 -> 28) and 32x32 (8 -> 16 -> 32).
    y is None for an unconditional model. A conditional one has conditional BatchNorm: after each of the two
    BatchNorms, h (1 + gamma_y) + beta_y, a scale and shift of the class y (gamma, beta learned, zero at first: G
    starts as the unconditional one)."""

    def __init__(self, z_dim, ch, img_channels, size, conditional=False):
        super().__init__()
        h4, w4 = size[0] // 4, size[1] // 4
        self.net = nn.Sequential(
            nn.ConvTranspose2d(z_dim, 4 * ch, (h4, w4), 1, 0, bias=False),  # B x 4ch x H/4 x W/4 (7x7 or 8x8)
            nn.BatchNorm2d(4 * ch), nn.ReLU(True),                        # no bias: BatchNorm's shift replaces it
            nn.ConvTranspose2d(4 * ch, 2 * ch, 4, 2, 1, bias=False),      # B x 2ch x H/2 x W/2 (14 or 16)
            nn.BatchNorm2d(2 * ch), nn.ReLU(True),
            nn.ConvTranspose2d(2 * ch, img_channels, 4, 2, 1, bias=False),  # B x C x H x W (28 or 32)
            nn.Tanh(),                                                    # in [-1, 1], the range of the data
        )
        self.z_dim = z_dim
        self.apply(dcgan_init)
        # embed[i](y) = [gamma_y, beta_y] of the i-th BatchNorm (4ch, then 2ch channels), zero at first
        self.embed = nn.ModuleList(nn.Embedding(common.NUM_CLASSES, 2 * c) for c in (4 * ch, 2 * ch)) \
            if conditional else None
        for e in self.embed or []:
            nn.init.zeros_(e.weight)

    def class_scale_shift(self, h, i, y):
        """The class part of conditional BatchNorm i: h (1 + gamma_y) + beta_y; h itself for an unconditional G."""
        if self.embed is None:
            return h
        gamma, beta = self.embed[i](y)[:, :, None, None].chunk(2, 1)  # each B x channels x 1 x 1
        return h * (1 + gamma) + beta

    def forward(self, z, y=None):
        up1, norm1, relu1, up2, norm2, relu2, up3, tanh = self.net  # the layers of self.net, in order
        h = norm1(up1(z[:, :, None, None]))  # B x z_dim -> B x z_dim x 1 x 1 -> B x 4ch x H/4 x W/4
        h = relu1(self.class_scale_shift(h, 0, y))  # conditional BatchNorm 1 (without classes: plain BatchNorm)
        h = norm2(up2(h))  # B x 2ch x H/2 x W/2
        h = relu2(self.class_scale_shift(h, 1, y))  # conditional BatchNorm 2
        return tanh(up3(h))  # B x C x H x W


class Discriminator(nn.Module):
    """(image, y) -> logit l, with D(x) = sigmoid(l): strided convolutions instead of pooling, LeakyReLU(0.2), no
    BatchNorm on the first layer (Radford et al.), and no sigmoid at the end, so the losses can use log-sigmoid.
    y is None for an unconditional model. A conditional one is the projection discriminator
    l = psi(phi(x)) + embed(y)^T phi(x), where phi(x) is every feature before the last layer (2ch x H/4 x W/4) and
    psi that last layer. psi is linear here, so the projection gives each class its own last-layer kernel,
    w + embed(y): the class enters only at the end."""

    def __init__(self, ch, img_channels, size, conditional=False):
        super().__init__()
        h4, w4 = size[0] // 4, size[1] // 4
        self.net = nn.Sequential(
            nn.Conv2d(img_channels, ch, 4, 2, 1, bias=False),  # B x ch x H/2 x W/2 (14 or 16)
            nn.LeakyReLU(0.2, True),
            nn.Conv2d(ch, 2 * ch, 4, 2, 1, bias=False),        # B x 2ch x H/4 x W/4 (7 or 8)
            nn.BatchNorm2d(2 * ch), nn.LeakyReLU(0.2, True),
            nn.Conv2d(2 * ch, 1, (h4, w4), 1, 0),              # B x 1 x 1 x 1: one logit per image
        )
        self.apply(dcgan_init)
        self.embed = nn.Embedding(common.NUM_CLASSES, 2 * ch * h4 * w4) if conditional else None
        if conditional:  # zero at first: D starts as the unconditional one, and the class term grows from the data
            nn.init.zeros_(self.embed.weight)

    def forward(self, x, y=None):
        phi = self.net[:-1](x)  # phi(x): B x 2ch x H/4 x W/4
        logit = self.net[-1](phi).flatten()  # psi(phi(x)): B
        if self.embed is not None:
            logit = logit + (self.embed(y) * phi.flatten(1)).sum(1)  # + embed(y)^T phi(x)
        return logit


def build_model(mcfg, shape):
    """(G, D) for images of `shape` (C, H, W)."""
    c, h, w = shape
    if h % 4 or w % 4 or min(h, w) < 8:
        raise common.UsageError(f"{h}x{w} images: the DCGAN halves each side twice, so use sides that are multiples "
                                f"of 4 (28x28 MNIST, 32x32 CIFAR-10); resize the images first")
    return (Generator(mcfg.z_dim, mcfg.g_channels, c, (h, w), mcfg.conditional),
            Discriminator(mcfg.d_channels, c, (h, w), mcfg.conditional))


# ----------------------------------------------------------------------------- the losses, from logits
# With D = sigmoid(l):  log D = log sigmoid(l) = -softplus(-l),  log(1 - D) = log sigmoid(-l) = -softplus(l).
# F.logsigmoid computes both without forming D, so neither log(0) nor 1 - 1 = 0 in float can occur.

def d_loss(real_logit, fake_logit):
    """-V(D, G) = -[E log D(x) + E log(1 - D(G(z)))]: D ascends V by descending this."""
    return -(F.logsigmoid(real_logit).mean() + F.logsigmoid(-fake_logit).mean())


def g_loss(fake_logit, kind):
    """What G descends. minimax: E log(1 - D(G(z))), the second term of V as it stands. non-saturating:
    -E log D(G(z)). Early on D rejects G's samples, D(G(z)) ~ 0, and there log(1 - x) is flat (slope -1)
    while log x is steep (slope 1/x): with respect to the logit, d/dl log(1 - sigmoid(l)) = -D(G(z)) -> 0
    but d/dl -log sigmoid(l) = -(1 - D(G(z))) -> -1, so only the non-saturating loss still teaches a bad G."""
    if kind == "minimax":
        return F.logsigmoid(-fake_logit).mean()
    return -F.logsigmoid(fake_logit).mean()


# ----------------------------------------------------------------------------- Algorithm 1, one step at a time
# A batch is a pair: real (x, y), x a batch of images in [-1, 1]; noise (z, y), z ~ N(0, I). y holds the classes
# (of the images; of the fakes to make), or is None for an unconditional model. The networks take the pair as it
# comes, D(x, y) and G(z, y): a conditional D judges each fake as the class it was made for.
# check(**figures) is called with the loss after backward() and before the optimizer's step: train passes run.check
# (common.py), which stops the run if the loss is not finite, so that no update from it is ever applied.

def no_check(**figures):
    """The default check: none (the tests and benchmarks that call the steps directly)."""


def d_step(G, D, opt_d, real, noise, check=no_check, amp=contextlib.nullcontext):
    """One step of gradient ascent on V for D, on the real pair (x, y) and fakes G(z, y) of the noise pair (z, y);
    G only makes the fakes, under no_grad, so it cannot change."""
    (x, y_real), (z, y_fake) = real, noise
    with torch.no_grad(), amp():
        fake = G(z, y_fake)
    with amp():  # real and fake in separate passes, so each BatchNorm batch is all real or all fake (DCGAN)
        real_logit, fake_logit = D(x, y_real).float(), D(fake, y_fake).float()
    loss = d_loss(real_logit, fake_logit)
    opt_d.zero_grad(set_to_none=True)
    loss.backward()
    check(d_loss=loss)  # before the update: D never takes a non-finite step
    opt_d.step()
    return dict(d_loss=loss.detach(), D_x=torch.sigmoid(real_logit).mean().detach(),
                D_G_z=torch.sigmoid(fake_logit).mean().detach())


def g_step(G, D, opt_g, noise, kind, check=no_check, amp=contextlib.nullcontext):
    """One step of G on its loss for the noise pair (z, y): D judges G(z, y) as class y; the gradient flows through
    D to G(z, y), but D's weights are frozen for it."""
    z, y = noise
    D.requires_grad_(False)  # no gradient for D's weights: D's optimizer will not see this step, and it is cheaper
    try:
        with amp():
            fake_logit = D(G(z, y), y).float()
        loss = g_loss(fake_logit, kind)
        opt_g.zero_grad(set_to_none=True)
        loss.backward()
    finally:
        D.requires_grad_(True)
    check(g_loss=loss)  # before the update: G never takes a non-finite step
    opt_g.step()
    return dict(g_loss=loss.detach())


def train_iteration(G, D, opt_g, opt_d, draw_real, draw_noise, cfg, check=no_check, amp=contextlib.nullcontext,
                    D_module=None):
    """Algorithm 1 of Goodfellow et al.: k = cfg.d_steps times (fresh x and z each time) update D; then fresh z,
    update G (cfg.g_loss: its loss). draw_real() returns a real pair (x, y): a batch of training images in [-1, 1]
    and their labels; draw_noise() returns a noise pair (z, y): z ~ N(0, I), B x z_dim, and the classes of the fakes
    to make; y is None in both for an unconditional model. D_module is D itself where D is a wrapper of it (DDP,
    torch.compile): the G step judges with it (default: D)."""
    for _ in range(cfg.d_steps):
        figures = d_step(G, D, opt_d, draw_real(), draw_noise(), check, amp)
    # the G step goes through D's own module, not its DDP wrapper: D's weights are frozen there, and a DDP forward
    # would wait for gradients of D that never come
    figures.update(g_step(G, D if D_module is None else D_module, opt_g, draw_noise(), cfg.g_loss, check, amp))
    return figures


# ----------------------------------------------------------------------------- the sampler: x = G(z, y), z ~ N(0, I)

@torch.no_grad()
def sample(G, z, y=None, batch=500):
    """Fresh images G(z, y) in [0, 1] (y: the classes of a conditional G, else None), in eval mode (BatchNorm uses its
    running statistics, so an image does not depend on the others in its batch), in chunks of `batch`."""
    was_training = G.training
    G.eval()
    x = torch.cat([common.signed_to_unit(G(z[i:i + batch], None if y is None else y[i:i + batch])).float()
                   for i in range(0, len(z), batch)])
    G.train(was_training)
    return x


def fixed_noise(n, z_dim, seed, device):
    """The same z for every grid of a run (and for --sample), from its own generator: training's RNG is untouched."""
    return torch.randn(n, z_dim, generator=torch.Generator().manual_seed(seed)).to(device)


# ----------------------------------------------------------------------------- the family's measure: the game's value

@torch.no_grad()
def game_value(G, D, x_test, batch_size, seed, y_test=None):
    """V(D, G) = E log D(x) + E log(1 - D(G(z))) on the test images x_test (in [-1, 1]) and as many fakes, with the
    means of D(x) and D(G(z)) and both generator losses. The networks run as in training (BatchNorm on batches all
    real or all fake, with their own statistics), so the figures compare with log.jsonl's; z comes from a generator
    seeded by `seed`. A conditional model gets the test labels y_test: D(x, y) on the images, D(G(z, y), y) on fakes
    of their classes."""
    rng = torch.Generator().manual_seed(seed)
    log_d_real, log_1m_d_fake, log_d_fake, d_real, d_fake = [], [], [], [], []
    for i in range(0, len(x_test), batch_size):
        x = x_test[i:i + batch_size]
        z = torch.randn(len(x), G.z_dim, generator=rng).to(x.device)
        y = None if y_test is None else y_test[i:i + batch_size]
        real_logit, fake_logit = D(x, y).float(), D(G(z, y), y).float()
        log_d_real.append(F.logsigmoid(real_logit))  # log D(x)
        log_1m_d_fake.append(F.logsigmoid(-fake_logit))  # log(1 - D(G(z)))
        log_d_fake.append(F.logsigmoid(fake_logit))  # log D(G(z))
        d_real.append(torch.sigmoid(real_logit))
        d_fake.append(torch.sigmoid(fake_logit))
    mean = lambda parts: torch.cat(parts).mean().item()
    value = mean(log_d_real) + mean(log_1m_d_fake)  # V(D, G)
    return {"V(D, G) = E log D(x) + E log(1 - D(G(z)))  (-log 4 at the optimum)": value,
            "mean D(x) on test images  (1/2 at the optimum)": mean(d_real),
            "mean D(G(z))  (1/2 at the optimum)": mean(d_fake),
            "G loss, non-saturating: -E log D(G(z))": -mean(log_d_fake),
            "G loss, minimax: E log(1 - D(G(z)))": mean(log_1m_d_fake)}


# ----------------------------------------------------------------------------- pictures: the grids and the latent space

def interpolation(G, z, rows=8, cols=10, y=None):
    """Each row walks in a straight line from one z to another, z_t = (1 - t) z_a + t z_b (Radford et al. Fig. 4):
    a smooth walk in z that gives smooth changes in the image means G has not memorised isolated images. A
    conditional model keeps row r's class y[r] all along: the walk changes the style, not the class."""
    za, zb = z[:rows], z[rows:2 * rows]
    t = torch.linspace(0, 1, cols, device=z.device)[None, :, None]
    return sample(G, ((1 - t) * za[:, None] + t * zb[:, None]).flatten(0, 1),
                  None if y is None else y[:rows].repeat_interleave(cols))


def ink(x):
    """Ink mass: the mean intensity of an image in [0, 1] (for MNIST, how thick the strokes are)."""
    return x.flatten(1).mean(1)


def ink_direction(G, z, frac=0.1, y=None):
    """Latent vector arithmetic (Radford et al. Sec. 6.3): mean z of the thickest samples minus mean z of the thinnest,
    by ink mass, the averaged-z version of 'smiling woman - neutral woman' (a conditional model: of the classes y)."""
    order = ink(sample(G, z, y)).argsort()
    k = max(1, int(len(z) * frac))
    return z[order[-k:]].mean(0) - z[order[:k]].mean(0)


def arithmetic(G, z_base, direction, alphas=(-1.5, -1, -0.5, 0, 0.5, 1, 1.5), y=None):
    """Rows: z + a * direction for each base z (column a = 0 is the sample itself; a conditional model: row r of class
    y[r]). Returns the grid and the mean ink mass of each column, the measurable check that the direction does what
    its name says."""
    a = torch.tensor(alphas, device=z_base.device)[None, :, None]
    y = None if y is None else y.repeat_interleave(len(alphas))
    x = sample(G, (z_base[:, None] + a * direction).flatten(0, 1), y)
    return x, ink(x).view(len(z_base), len(alphas)).mean(0)


def sample_grid(G_or_ema, cfg, z_fixed, y_fixed, step):
    """samples_<step>.png of a grid step of the run: the run's fixed noise z_fixed (and classes y_fixed, a row per
    class) through G, or the EMA of G's weights with --ema; the same z at every grid step, so the grids show the same
    samples as training goes on."""
    common.save_grid(sample(G_or_ema, z_fixed, y_fixed), Path(cfg.out) / f"samples_{step}.png", labels=y_fixed)


# ----------------------------------------------------------------------------- training

def train(cfg):
    run = common.Run(cfg, "gan")  # the device, the seeds, torchrun (common.py): nothing is written yet
    x_train, y_train = common.load_split(cfg, "train", run.device)  # stays uint8; y_train: None unless --conditional
    G, D = (m.to(run.device) for m in build_model(cfg.model, tuple(x_train.shape[1:])))  # bad sizes stop here
    ema = common.make_ema(G)
    opt_g = torch.optim.Adam(G.parameters(), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))
    opt_d = torch.optim.Adam(D.parameters(), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))
    z_fixed = fixed_noise(cfg.num_samples, cfg.model.z_dim, cfg.seed, run.device)  # the same z in every grid
    y_fixed = common.class_labels(cfg, cfg.num_samples, run.device)  # the grids' classes (None: unconditional)
    run.start(dict(G=G, D=D, opt_g=opt_g, opt_d=opt_d, ema=ema),
              lambda step: sample_grid(ema if cfg.ema else G, cfg, z_fixed, y_fixed, step))
    # Under torchrun both networks are in DDP: their gradients are averaged over the ranks. BatchNorm stays per rank
    # (each normalizes its own share of the batch; SyncBatchNorm would cost a collective per layer), and the EMA of G
    # is updated on every rank from the same averaged weights, so it is the same everywhere. The G step judges with
    # the plain D (train_iteration's D_module): with --compile, an uncompiled D there.
    G_net, D_net = run.wrap(G), run.wrap(D)

    def draw_real():  # a real pair (x, y): training images in [-1, 1] and their labels (None: unconditional)
        x, y = run.batch(x_train, y_train)
        return common.uint8_to_signed(x), y

    # A noise pair (z, y): z ~ N(0, I) from torch's generator (--resume restores it) and, for a conditional model,
    # the fakes' classes drawn uniformly, not copied from a real batch: G trains on the equal shares of classes that
    # --sample asks of it (mnist, fashion-mnist and cifar10 are balanced, so this is near p_data(y) too), and a fresh
    # (z, y) per step stays Algorithm 1's fresh z, independent of the data.
    def draw_noise():
        z = torch.randn(run.batch_size, cfg.model.z_dim, device=run.device)
        return z, None if y_train is None else torch.randint(common.NUM_CLASSES, (run.batch_size,), device=run.device)

    for step in run:
        # the checkpoint on its cadence, before a forward pass moves BatchNorm's running statistics (no loss yet to
        # check: the D and G steps check theirs before their updates)
        run.check()
        figures = train_iteration(G_net, D_net, opt_g, opt_d, draw_real, draw_noise, cfg, run.check, run.autocast,
                                  D_module=D)
        common.ema_update(ema, G, cfg.ema_decay, step)
        run.log(figures)  # img/s counts the real images; a step also costs k D passes on fakes and 1 G pass
    run.finish()


# ----------------------------------------------------------------------------- the modes

def load_networks(cfg, *keys):
    """The test split (uint8, labels or None) and the networks stored under `keys` ("G", "D", "ema") in the run in
    --out."""
    device = common.get_device(cfg.device)
    x_test, y_test = common.load_split(cfg, "test", device)  # y_test: None unless --conditional
    which = dict(G=0, ema=0, D=1)  # of build_model's (G, D): the EMA is a G with other weights
    nets = {k: build_model(cfg.model, tuple(x_test.shape[1:]))[which[k]].to(device) for k in keys}
    common.load_checkpoint(Path(cfg.out) / "ckpt.pt", "gan", **nets)
    return x_test, y_test, nets


def load_for_inference(cfg):
    """(the generator that samples: G, or the EMA of its weights with --ema; the test images as uint8; their labels
    or None) from the run in --out."""
    key = "ema" if cfg.ema else "G"
    x_test, y_test, nets = load_networks(cfg, key)
    return nets[key].eval(), x_test, y_test


def evaluate(cfg):
    """The game's value and D's verdicts on the test set (a GAN has no likelihood to report)."""
    x_test, y_test, nets = load_networks(cfg, "G", "D")  # y_test: a conditional model's labels, and fakes of them
    rows = game_value(nets["G"], nets["D"], common.uint8_to_signed(x_test), cfg.batch_size, cfg.seed, y_test)
    of = " with their labels y, as many samples of G(z, y)" if y_test is not None else " and as many samples of G"
    return common.report(cfg.out, f"{len(x_test)} test images of {cfg.model.dataset}{of}", rows, n=len(x_test))


def sample_from_checkpoint(cfg):
    """samples.png (the first 256) and samples.pt (N x C x H x W in [0, 1]) from the fixed noise of --seed (and
    labels.pt: a conditional model, of the classes --label asks for), then interpolation.png and arithmetic.png from
    z's seeded by --seed + 1 (a conditional model: row r of class r mod 10, or all --label)."""
    if not common.is_main():  # a small job: under torchrun, rank 0 does it alone
        return
    G, _, _ = load_for_inference(cfg)
    out, device = Path(cfg.out), next(G.parameters()).device
    labels = common.class_labels(cfg, cfg.num_samples, device)  # None (unconditional), or the classes to draw
    start = time.time()
    samples = sample(G, fixed_noise(cfg.num_samples, cfg.model.z_dim, cfg.seed, device), labels).cpu()
    seconds = time.time() - start
    common.save_samples(cfg, samples)
    z = fixed_noise(1024, cfg.model.z_dim, cfg.seed + 1, device)
    rows = common.class_labels(cfg, 8, device)  # the rows' classes (None: an unconditional model)
    common.save_grid(interpolation(G, z, y=rows), out / "interpolation.png", nrow=10)
    # the direction is found on other samples than the rows it is applied to
    direction = ink_direction(G, z[16:], y=common.class_labels(cfg, len(z) - 16, device, start=16))
    grid, col_ink = arithmetic(G, z[:8], direction, y=rows)
    common.save_grid(grid, out / "arithmetic.png", nrow=len(col_ink))
    print("latent arithmetic, z + a (z_thick - z_thin): mean ink per column a = -1.5 .. 1.5: "
          + " ".join(f"{v:.3f}" for v in col_ink.tolist()))
    print(f"{len(samples)} samples in {seconds:.2f}s; wrote samples.png, samples.pt {tuple(samples.shape)}, "
          f"{'labels.pt, ' if labels is not None else ''}interpolation.png, arithmetic.png in {out}")


@common.entry
def main(argv=None):
    cfg = common.parse_args(ModelConfig, Config, "gan", argv, PRESETS)
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
