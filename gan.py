r"""GAN: a generator and a discriminator trained against each other (Goodfellow et al. 2014), here as a DCGAN.

The generator G maps noise z ~ N(0, I) to an image and never sees a density: it learns only through the
discriminator D, which outputs the probability that its input is a real image rather than one of G's. The
two play a minimax game, D ascending and G descending the same value function:

    min_G max_D  V(D, G) = E_{x~p_data} log D(x) + E_{z~p(z)} log(1 - D(G(z)))

Algorithm 1 of the paper alternates k discriminator steps with one generator step; in practice G ascends
log D(G(z)) instead of descending log(1 - D(G(z))) (the "non-saturating" loss, same fixed point, strong
gradients early on). The networks follow Radford et al. 2016 ("Unsupervised Representation Learning with
Deep Convolutional Generative Adversarial Networks"): transposed convolutions, BatchNorm and ReLU in G,
strided convolutions and LeakyReLU in D, Adam(2e-4, beta1 0.5), weights drawn from N(0, 0.02).

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
    "quick": dict(about="the quick run, DCGAN 32/32 channels for 12k steps of 64: 7-8 min on 2 CPU cores",
                options=dict(g_channels=32, d_channels=32, batch_size=64, steps=12000, sample_every=2000)),
}


# ----------------------------------------------------------------------------- the two networks

def dcgan_init(m):
    """Radford et al.: every conv weight ~ N(0, 0.02); BatchNorm scale ~ N(1, 0.02), shift 0."""
    if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
        nn.init.normal_(m.weight, 0.0, 0.02)
    elif isinstance(m, nn.BatchNorm2d):
        nn.init.normal_(m.weight, 1.0, 0.02)
        nn.init.zeros_(m.bias)


class Generator(nn.Module):
    """z -> image: a 1x1 "image" of z_dim channels, upsampled by transposed convolutions. The first layer's
    kernel is the quarter image size, so one network shape serves 28x28 (7 -> 14 -> 28) and 32x32 (8 -> 16 -> 32).
    conditional: (z, y) -> image, with conditional BatchNorm: every BatchNorm's output is scaled and shifted per class,
    h (1 + gamma_y) + beta_y (gamma, beta learned, zero at first: G starts as the unconditional one)."""

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
        # [gamma_y, beta_y] for the two BatchNorms (4ch and 2ch channels), zero at first
        self.embed = nn.ModuleList(nn.Embedding(common.NUM_CLASSES, 2 * c) for c in (4 * ch, 2 * ch)) if conditional else None
        for e in self.embed or []:
            nn.init.zeros_(e.weight)

    def forward(self, z, y=None):
        h = z[:, :, None, None]  # B x z_dim -> B x z_dim x 1 x 1
        class_norms = iter(self.embed or [])
        for layer in self.net:
            h = layer(h)
            if self.embed is not None and isinstance(layer, nn.BatchNorm2d):  # conditional BatchNorm
                gamma, beta = next(class_norms)(y)[:, :, None, None].chunk(2, 1)
                h = h * (1 + gamma) + beta  # h (1 + gamma_y) + beta_y
        return h


class Discriminator(nn.Module):
    """image -> logit l, with D(x) = sigmoid(l): strided convolutions instead of pooling, LeakyReLU(0.2), no
    BatchNorm on the first layer (Radford et al.), and no sigmoid at the end, so the losses can use log-sigmoid.
    conditional: (image, y) -> logit, the projection discriminator l = psi(phi(x)) + embed(y)^T phi(x), where
    phi(x) is every feature before the last layer (2ch x H/4 x W/4) and psi that last layer. psi is linear here, so
    the projection gives each class its own last-layer kernel, w + embed(y): the class enters only at the end."""

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


def build_models(mcfg, shape):
    """(G, D) for images of `shape` (C, H, W)."""
    c, h, w = shape
    if h % 4 or w % 4 or min(h, w) < 8:
        raise common.UsageError(f"{h}x{w} images: the DCGAN halves each side twice, so use sides that are multiples of 4 "
                                f"(28x28 MNIST, 32x32 CIFAR-10); resize the images first")
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

def as_args(batch):
    """A network's inputs: x (or z), or for a conditional model the pair (x, y) (or (z, y)), as D(x, y) and G(z, y)
    take them; returns the tuple of arguments, (x,) or (x, y)."""
    return batch if isinstance(batch, tuple) else (batch,)


def d_step(G, D, opt_d, x_real, z, step=0, amp=contextlib.nullcontext):
    """One step of gradient ascent on V for D; G only makes the fakes, under no_grad, so it cannot change.
    A conditional model passes (x, y) and (z, y) pairs: each fake is judged as the class it was made for."""
    real, noise = as_args(x_real), as_args(z)
    with torch.no_grad(), amp():
        fake = G(*noise)
    with amp():  # real and fake in separate passes, so each BatchNorm batch is all real or all fake (DCGAN)
        real_logit, fake_logit = D(*real).float(), D(fake, *noise[1:]).float()  # noise[1:]: (y,), or ()
    loss = d_loss(real_logit, fake_logit)
    opt_d.zero_grad(set_to_none=True)
    loss.backward()
    common.check_finite(step, d_loss=loss)  # before the update: D never takes a non-finite step
    opt_d.step()
    return dict(d_loss=loss.detach(), D_x=torch.sigmoid(real_logit).mean().detach(),
                D_G_z=torch.sigmoid(fake_logit).mean().detach())


def g_step(G, D, opt_g, z, kind, step=0, amp=contextlib.nullcontext):
    """One step of G on its loss; the gradient flows through D to G(z), but D's weights are frozen for it.
    z, or (z, y) for a conditional model: D judges G(z, y) as class y."""
    noise = as_args(z)
    D.requires_grad_(False)  # no gradient for D's weights: D's optimizer will not see this step, and it is cheaper
    try:
        with amp():
            fake_logit = D(G(*noise), *noise[1:]).float()
        loss = g_loss(fake_logit, kind)
        opt_g.zero_grad(set_to_none=True)
        loss.backward()
    finally:
        D.requires_grad_(True)
    common.check_finite(step, g_loss=loss)
    opt_g.step()
    return dict(g_loss=loss.detach())


def train_iteration(G, D, opt_g, opt_d, real_batch, noise, cfg, step=0, amp=contextlib.nullcontext):
    """Algorithm 1 of Goodfellow et al.: k times (fresh x and z each time) update D; then fresh z, update G.
    `real_batch()` draws x from the data, `noise()` draws z ~ p(z); for a conditional model, (x, y) with the images'
    labels, and (z, y) with the classes of the fakes to make."""
    for _ in range(cfg.d_steps):
        figures = d_step(G, D, opt_d, real_batch(), noise(), step, amp)
    # the G step goes through D's own module, not its DDP wrapper: D's weights are frozen there, and a DDP forward
    # would wait for gradients of D that never come
    figures.update(g_step(G, common.unwrap(D), opt_g, noise(), cfg.g_loss, step, amp))
    return figures


# ----------------------------------------------------------------------------- the sampler: x = G(z), z ~ N(0, I)

@torch.no_grad()
def generate(G, z, y=None, batch=500):
    """G(z) (G(z, y): a conditional model, classes y) in [0, 1], in eval mode (BatchNorm uses its running
    statistics, so an image does not depend on the others in its batch), in chunks of `batch`."""
    was_training = G.training
    G.eval()
    chunk = lambda i: (z[i:i + batch],) if y is None else (z[i:i + batch], y[i:i + batch])
    x = torch.cat([common.signed_to_unit(G(*chunk(i))).float() for i in range(0, len(z), batch)])
    G.train(was_training)
    return x


def fixed_noise(n, z_dim, seed, device):
    """The same z for every grid of a run (and for --sample), from its own generator: training's RNG is untouched."""
    return torch.randn(n, z_dim, generator=torch.Generator().manual_seed(seed)).to(device)


# ----------------------------------------------------------------------------- evaluation: the game's value on test images

@torch.no_grad()
def game_value(G, D, x_test, batch_size, seed, y_test=None):
    """V(D, G) = E log D(x) + E log(1 - D(G(z))) on the test images and as many fakes, with the means of D(x) and
    D(G(z)) and both generator losses. The networks run as in training (BatchNorm on batches all real or all fake,
    with their own statistics), so the figures compare with log.jsonl's; z comes from a generator seeded by `seed`.
    A conditional model gets the test labels y_test: D(x, y) on the images, D(G(z, y), y) on fakes of their classes."""
    rng = torch.Generator().manual_seed(seed)
    log_d_real, log_1m_d_fake, log_d_fake, d_real, d_fake = [], [], [], [], []
    for i in range(0, len(x_test), batch_size):
        x = common.uint8_to_signed(x_test[i:i + batch_size])
        z = torch.randn(len(x), G.z_dim, generator=rng).to(x.device)
        y = () if y_test is None else (y_test[i:i + batch_size],)  # the labels, as an argument list
        real_logit, fake_logit = D(x, *y).float(), D(G(z, *y), *y).float()
        log_d_real.append(F.logsigmoid(real_logit))  # log D(x)
        log_1m_d_fake.append(F.logsigmoid(-fake_logit))  # log(1 - D(G(z)))
        log_d_fake.append(F.logsigmoid(fake_logit))  # log D(G(z))
        d_real.append(torch.sigmoid(real_logit))
        d_fake.append(torch.sigmoid(fake_logit))
    mean = lambda parts: torch.cat(parts).mean().item()
    return {"V(D, G) = E log D(x) + E log(1 - D(G(z)))  (-log 4 at the optimum)": mean(log_d_real) + mean(log_1m_d_fake),
            "mean D(x) on test images  (1/2 at the optimum)": mean(d_real),
            "mean D(G(z))  (1/2 at the optimum)": mean(d_fake),
            "G loss, non-saturating: -E log D(G(z))": -mean(log_d_fake),
            "G loss, minimax: E log(1 - D(G(z)))": mean(log_1m_d_fake)}


def load_networks(cfg, *keys):
    """The test split (uint8, labels) and the networks stored under `keys` ("G", "D", "ema") in the run in --out."""
    device = common.get_device(cfg.device)
    x_test, y_test = common.load_dataset(cfg.model.dataset, cfg.data_dir, "test", device)
    shape = tuple(x_test.shape[1:])
    nets = {k: build_models(cfg.model, shape)[k == "D"].to(device) for k in keys}  # "ema" is a G with other weights
    common.load_checkpoint(Path(cfg.out) / "ckpt.pt", "gan", **nets)
    return x_test, y_test, nets


def load_for_inference(cfg):
    """(the generator that samples: G, or the EMA of its weights with --ema; the test images as uint8; their labels)
    from the run in --out."""
    key = "ema" if cfg.ema else "G"
    x_test, y_test, nets = load_networks(cfg, key)
    return nets[key].eval(), x_test, y_test


def evaluate(cfg):
    """The game's value and D's verdicts on the test set (a GAN has no likelihood to report)."""
    x_test, y_test, nets = load_networks(cfg, "G", "D")
    y = y_test if cfg.model.conditional else None  # a conditional model: the test images' labels, and fakes of them
    rows = game_value(nets["G"], nets["D"], x_test, cfg.batch_size, cfg.seed, y)
    of = " with their labels y, as many samples of G(z, y)" if y is not None else " and as many samples of G"
    return common.report(cfg.out, f"{len(x_test)} test images of {cfg.model.dataset}{of}", rows, n=len(x_test))


# ----------------------------------------------------------------------------- training

def train(cfg):
    device = common.get_device(cfg.device)
    common.seed_everything(cfg.seed)
    x_train, y_train = common.load_split(cfg, "train", device)  # stays uint8; y: labels, a conditional model only
    G, D = (m.to(device) for m in build_models(cfg.model, tuple(x_train.shape[1:])))  # bad sizes stop here
    y_fixed = common.class_labels(cfg, cfg.num_samples, device)  # the grids' classes; so does a --label it cannot take
    ema = common.make_ema(G)
    opt_g = torch.optim.Adam(G.parameters(), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))
    opt_d = torch.optim.Adam(D.parameters(), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))
    data_rng = common.data_generator(device, cfg.seed)
    batch_size = common.per_rank_batch(cfg.batch_size)  # this process's share of the step's --batch-size images
    out = common.start_run(cfg)
    nets = dict(G=G, D=D, opt_g=opt_g, opt_d=opt_d, ema=ema)
    step = common.load_checkpoint(out / "ckpt.pt", "gan", data_rng, **nets) if cfg.resume else 0
    common.check_resume(cfg, step)
    n_g, n_d = (sum(p.numel() for p in m.parameters()) for m in (G, D))
    common.say(f"gan: G {n_g / 1e6:.2f}M, D {n_d / 1e6:.2f}M parameters, {len(x_train)} training images "
          f"{tuple(x_train.shape[1:])}, {device}, k = {cfg.d_steps}, {cfg.g_loss} G loss"
          f"{', conditional on the class' * cfg.model.conditional}")
    # Under torchrun both networks are DDP-wrapped: their gradients are averaged over the ranks. BatchNorm stays
    # per rank (each normalizes its own share of the batch; SyncBatchNorm would cost a collective per layer), and
    # the EMA of G is updated on every rank from the same averaged weights, so it is the same everywhere.
    G_fwd, D_fwd = (common.ddp(common.maybe_compile(m, cfg)) for m in (G, D))
    # Real images in [-1, 1], and z ~ N(0, I) from torch's generator (--resume restores it). A conditional model gets
    # (x, y) with the images' labels, and (z, y) with the fakes' classes drawn uniformly, not copied from a real batch:
    # G trains on the equal shares of classes that --sample asks of it (mnist, fashion-mnist and cifar10 are balanced,
    # so this is near p_data(y) too), and a fresh (z, y) per step stays Algorithm 1's fresh z, independent of the data.
    def real_batch():
        batch = common.random_batch(x_train, batch_size, data_rng, y_train)
        return common.uint8_to_signed(batch) if y_train is None else (common.uint8_to_signed(batch[0]), batch[1])

    def noise():
        z = torch.randn(batch_size, cfg.model.z_dim, device=device)
        return z if y_train is None else (z, torch.randint(common.NUM_CLASSES, (batch_size,), device=device))

    amp = lambda: common.autocast(device, cfg.precision)
    z_fixed = fixed_noise(cfg.num_samples, cfg.model.z_dim, cfg.seed, device)
    start, log = step, common.Logger(out, cfg.steps, step)
    save = lambda rng: common.save_checkpoint(out / "ckpt.pt", "gan", cfg, step, rng, **nets)
    with common.CtrlC() as ctrl_c:
        while step < cfg.steps and not ctrl_c.stopping():
            rng = common.rng_state(data_rng)  # where this iteration starts: its checkpoint resumes here
            if step > start and step % cfg.ckpt_every == 0:
                save(rng)  # the weights of `step`, before this iteration's k + 1 updates
            figures = train_iteration(G_fwd, D_fwd, opt_g, opt_d, real_batch, noise, cfg, step, amp)
            common.ema_update(ema, G, cfg.ema_decay, step)
            step += 1
            log.count(cfg.batch_size)  # real images per step; each also costs k D passes on fakes and 1 G pass
            if step % cfg.log_every == 0 or step == cfg.steps:
                log.log(step, **figures)
            if (step % cfg.sample_every == 0 or step == cfg.steps) and common.is_main():  # the same z in every grid of the run
                common.run_safely("the sample grid", lambda: common.save_grid(
                    generate(ema if cfg.ema else G, z_fixed, y_fixed), out / f"samples_{step}.png", labels=y_fixed))
                common.run_safely("curves.png", lambda: common.plot_curves(out))  # from log.jsonl, this step included
    save(common.rng_state(data_rng))  # the end of the run, or the step under way when Ctrl-C came
    ctrl_c.exit_if_requested(step)
    common.say(f"done: {out}; --sample draws samples and the latent pictures")


# ----------------------------------------------------------------------------- the other modes: samples and latent pictures

def interpolation(G, z, rows=8, cols=10, y=None):
    """Each row walks in a straight line from one z to another, z_t = (1 - t) z_a + t z_b (Radford et al. Fig. 4):
    a smooth walk in z that gives smooth changes in the image means G has not memorised isolated images. A
    conditional model keeps row r's class y[r] all along: the walk changes the style, not the class."""
    za, zb = z[:rows], z[rows:2 * rows]
    t = torch.linspace(0, 1, cols, device=z.device)[None, :, None]
    return generate(G, ((1 - t) * za[:, None] + t * zb[:, None]).flatten(0, 1),
                    None if y is None else y[:rows].repeat_interleave(cols))


def ink(x):
    """Ink mass: the mean intensity of an image in [0, 1] (for MNIST, how thick the strokes are)."""
    return x.flatten(1).mean(1)


def ink_direction(G, z, frac=0.1, y=None):
    """Latent vector arithmetic (Radford et al. Sec. 6.3): mean z of the thickest samples minus mean z of the thinnest,
    by ink mass, the averaged-z version of 'smiling woman - neutral woman' (a conditional model: of the classes y)."""
    order = ink(generate(G, z, y)).argsort()
    k = max(1, int(len(z) * frac))
    return z[order[-k:]].mean(0) - z[order[:k]].mean(0)


def arithmetic(G, z_base, direction, alphas=(-1.5, -1, -0.5, 0, 0.5, 1, 1.5), y=None):
    """Rows: z + a * direction for each base z (column a = 0 is the sample itself; a conditional model: row r of class
    y[r]). Returns the grid and the mean ink mass of each column, the measurable check that the direction does what
    its name says."""
    a = torch.tensor(alphas, device=z_base.device)[None, :, None]
    y = None if y is None else y.repeat_interleave(len(alphas))
    x = generate(G, (z_base[:, None] + a * direction).flatten(0, 1), y)
    return x, ink(x).view(len(z_base), len(alphas)).mean(0)


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
    samples = generate(G, fixed_noise(cfg.num_samples, cfg.model.z_dim, cfg.seed, device), labels).cpu()
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
