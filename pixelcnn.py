"""PixelCNN: an image as a product of per-pixel conditionals, computed in one pass by masked convolutions.

Fix an order of the pixels (raster: row by row, left to right; inside a colour pixel R, then G, then B)
and write the likelihood of an image exactly with the chain rule (product rule), as the deck does:

    p(x) = p(x_1, x_2, ..., x_n) = prod_{i=1}^{n} p(x_i | x_1, ..., x_{i-1})

A convolutional network outputs all n conditionals at once if no output can see its own pixel or a later
one: masked convolutions (van den Oord et al. 2016, "Pixel Recurrent Neural Networks"). Training is exact
maximum likelihood (all conditionals in parallel); sampling is slow: H x W x C network passes, one per
sub-pixel. The gated PixelCNN (van den Oord et al. 2016, "Conditional Image Generation with PixelCNN
Decoders") splits the network into a vertical and a horizontal stack to remove the plain PixelCNN's blind
spot, uses gated units y = tanh(W_f * x + V_f h) . sigmoid(W_g * x + V_g h), and conditions on a label h.

The masks (common.MaskedConv2d; 1 = weight used), 7x7 in the first layer, 3x3 later:

    mask A (first layer)      mask B (later layers)     with colour, at the centre only:
    1 1 1 1 1 1 1                                        A: R sees -, G sees R, B sees R G
    1 1 1 1 1 1 1             1 1 1                      B: R sees R, G sees R G, B sees R G B
    1 1 1 1 1 1 1             1 1 0
    1 1 1 0 0 0 0             0 0 0
    0 0 0 0 0 0 0
    0 0 0 0 0 0 0          (mask B keeps the centre: after a mask-A layer the centre
    0 0 0 0 0 0 0           position holds only information about earlier pixels)

Stacked 3x3 mask-B layers grow a receptive field that misses a wedge up and to the right of each pixel
(the blind spot; --receptive-field draws it). The gated net's vertical stack sees every row above, full
width, and reaches the horizontal stack shifted down by one row; the horizontal stack sees the row so far.

    python pixelcnn.py                                   # plain PixelCNN on binarized MNIST, sized for one GPU
    python pixelcnn.py --arch gated --conditional        # gated, class-conditional
    python pixelcnn.py --device cpu --precision bf16 --channels 64 --layers 6 --steps 6300 --batch-size 32 \
        --lr 3e-3 --sample-every 100000 --num-samples 16 --out runs/pixelcnn-cpu   # quick CPU run: 89.3 nats, 9 min
  then, with the model flags of that run (--channels 64 --layers 6; the checkpoint refuses others):
    python pixelcnn.py --out runs/pixelcnn-cpu ... --eval       # exact NLL on the whole test set (nats/image)
    python pixelcnn.py --out runs/pixelcnn-cpu ... --sample     # samples.png, samples.pt (timed)
    python pixelcnn.py --out runs/pixelcnn-cpu ... --complete   # complete the bottom half of test images
    python pixelcnn.py --out runs/pixelcnn-cond ... --sample --label 3   # (a --conditional run) draws threes
    python pixelcnn.py --receptive-field --channels 48 --layers 12       # the blind spot, plain vs gated
"""
import dataclasses
import math
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import common
from common import MaskedConv2d

NUM_CLASSES = 10


@dataclasses.dataclass
class Config(common.TrainConfig):
    steps: int = common.opt(20000, "training steps", runtime=True)
    lr: float = common.opt(1e-3, "Adam learning rate (decays to 0 on a cosine)", runtime=True)
    grad_clip: float = common.opt(1.0, "clip the gradient norm to this", runtime=True)
    sample_every: int = common.opt(5000, "steps between sample grids", runtime=True)
    ckpt_every: int = common.opt(2000, "steps between checkpoints", runtime=True)
    # the network
    arch: str = common.opt("plain", "plain PixelCNN or gated PixelCNN (no blind spot)", choices=["plain", "gated"])
    channels: int = common.opt(128, "feature maps per layer (2h in the paper's residual block; a multiple of 2 x colours)")
    layers: int = common.opt(12, "residual blocks (plain) or gated layers after the first (gated)")
    conditional: bool = common.opt(False, "condition on the class label (a label embedding added in every layer)")
    # sampling and evaluation
    label: int = common.opt(-1, "--sample with --conditional: draw this class (-1: classes 0..9 in turn)", runtime=True)
    fast: bool = common.opt(True, "sample by running the network only on the rows that can still change (--no-fast: whole image)", runtime=True)
    eval: bool = common.opt(False, "exact NLL of the checkpoint in --out on the test set", runtime=True)
    eval_n: int = common.opt(0, "test images for --eval and the end-of-training NLL (0 = all)", runtime=True)
    complete: bool = common.opt(False, "sample the bottom half of test images given their top half", runtime=True)
    receptive_field: bool = common.opt(False, "draw d(output pixel)/d(input) for the plain and gated nets", runtime=True)


# ----------------------------------------------------------------------------- the plain PixelCNN

class ResidualBlock(nn.Module):
    """The PixelCNN residual block (van den Oord et al. 2016a, fig. 5): ReLU, 1x1 (2h -> h), ReLU, 3x3 (h -> h),
    ReLU, 1x1 (h -> 2h), all mask B, added to its input. With --conditional, a label embedding is added inside."""

    def __init__(self, ch, colors, conditional):
        super().__init__()
        self.conv1 = MaskedConv2d(ch, ch // 2, 1, "B", colors)
        self.conv2 = MaskedConv2d(ch // 2, ch // 2, 3, "B", colors)
        self.conv3 = MaskedConv2d(ch // 2, ch, 1, "B", colors)
        self.embed = nn.Embedding(NUM_CLASSES, ch // 2) if conditional else None

    def forward(self, x, y):
        h = self.conv1(F.relu(x))
        if self.embed is not None:
            h = h + self.embed(y)[:, :, None, None]  # a per-channel bias per class: the label is no pixel, any layer may see it
        return x + self.conv3(F.relu(self.conv2(F.relu(h))))


def output_head(ch, colors, levels):
    """Two 1x1 mask-B layers: ch features -> colors * levels logits per position (R's first, then G's, then B's)."""
    return nn.Sequential(nn.ReLU(), MaskedConv2d(ch, ch, 1, "B", colors), nn.ReLU(),
                         MaskedConv2d(ch, colors * levels, 1, "B", colors))


class PixelCNN(nn.Module):
    """7x7 mask-A conv, `layers` residual blocks of mask-B convs, 1x1 mask-B output layers."""

    def __init__(self, colors, ch, layers, conditional):
        super().__init__()
        self.colors, self.binary = colors, colors == 1  # 1 channel: binarized (Bernoulli); 3: 8-bit (256-way softmax)
        self.stem = MaskedConv2d(colors, ch, 7, "A", colors)
        self.blocks = nn.ModuleList(ResidualBlock(ch, colors, conditional) for _ in range(layers))
        self.head = output_head(ch, colors, common.pixel_levels(self.binary))
        self.rows_above = 7 // 2 + layers * (3 // 2)  # how far up an output's receptive field reaches (fast sampler)

    def forward(self, x, y=None):
        h = self.stem(scale_input(x, self.binary))
        for block in self.blocks:
            h = block(h, y)
        return self.head(h)


def scale_input(x, binary):
    """Pixel values (0/1, or levels 0..255) -> [-1, 1], so that the zero padding means "no pixel", not black."""
    return x * 2 - 1 if binary else x / 127.5 - 1


# ----------------------------------------------------------------------------- the gated PixelCNN

def gate(x, colors):
    """tanh(W_f * x) . sigmoid(W_g * x). The 2k input channels are split inside each colour group
    (R: f then g, G: f then g, ...), so the k outputs keep MaskedConv2d's R|G|B channel groups."""
    f, g = x.unflatten(1, (colors, 2, -1)).unbind(2)
    return (torch.tanh(f) * torch.sigmoid(g)).flatten(1, 2)


def down_shift(x):
    """Move features one row down (zeros enter at the top): row i then holds what row i-1 computed."""
    return F.pad(x, (0, 0, 1, 0))[:, :, :-1]


class GatedLayer(nn.Module):
    """One layer of both stacks (van den Oord et al. 2016b, fig. 2).

    vertical:   v' = gate(V * v),  V a (k//2 + 1) x k conv over rows i - k//2 .. i (its own row too, full width)
    horizontal: h' = h + 1x1(gate(H * h + 1x1(down_shift(V * v))))  with H a 1 x k mask A/B conv (row i, left part)
    v never reaches the output except shifted down one row, so it may see its own row: no blind spot, no leak.
    """

    def __init__(self, c_in, ch, k, mask, colors, conditional):
        super().__init__()
        self.k, self.colors, self.residual = k, colors, mask == "B"  # the first (mask A) layer changes the width
        self.v_conv = nn.Conv2d(c_in, 2 * ch, (k // 2 + 1, k))  # padded by hand in forward: rows above only
        self.v_to_h = nn.Conv2d(2 * ch, 2 * ch, 1)  # unmasked: after the shift it holds only rows above
        self.h_conv = MaskedConv2d(c_in, 2 * ch, (1, k), mask, colors)
        self.h_out = MaskedConv2d(ch, ch, 1, "B", colors)
        self.embed = nn.Embedding(NUM_CLASSES, 4 * ch) if conditional else None  # V_f^T y, V_g^T y for both stacks

    def forward(self, v, h, y):
        k = self.k
        v_pre = self.v_conv(F.pad(v, (k // 2, k // 2, k // 2, 0)))  # output row i sees input rows i-k//2 .. i
        h_pre = self.h_conv(h) + self.v_to_h(down_shift(v_pre))
        if self.embed is not None:
            cv, ch_ = self.embed(y)[:, :, None, None].chunk(2, dim=1)
            v_pre, h_pre = v_pre + cv, h_pre + ch_
        h_new = self.h_out(gate(h_pre, self.colors))
        return gate(v_pre, self.colors), (h + h_new if self.residual else h_new)


class GatedPixelCNN(nn.Module):
    """A 7x7 gated layer with mask A, `layers` 3x3 gated layers with mask B, 1x1 mask-B output layers."""

    def __init__(self, colors, ch, layers, conditional):
        super().__init__()
        self.colors, self.binary = colors, colors == 1
        self.layers = nn.ModuleList([GatedLayer(colors, ch, 7, "A", colors, conditional)] +
                                    [GatedLayer(ch, ch, 3, "B", colors, conditional) for _ in range(layers)])
        self.head = output_head(ch, colors, common.pixel_levels(self.binary))
        self.rows_above = 7 // 2 + layers * (3 // 2) + 1  # + 1 for the down-shift into the horizontal stack

    def forward(self, x, y=None):
        v = h = scale_input(x, self.binary)
        for layer in self.layers:
            v, h = layer(v, h, y)
        return self.head(h)


def build_model(cfg, colors):
    if cfg.channels % (2 * colors):
        raise common.UsageError(f"--channels {cfg.channels} must be a multiple of {2 * colors} "
                                f"(halved in the blocks, split into {colors} colour group(s)); try 24, 48 or 96")
    if cfg.layers < 1:
        raise common.UsageError("--layers must be at least 1")
    net = PixelCNN if cfg.arch == "plain" else GatedPixelCNN
    return net(colors, cfg.channels, cfg.layers, cfg.conditional)


# ----------------------------------------------------------------------------- likelihood and sampling

def logits(model, x, y=None):
    """B x C x levels x H x W: the parameters of p(x_i | x_<i) for every sub-pixel i at once."""
    return common.pixel_logits(model(x, y).float(), model.colors, model.binary)


def nll(model, x, y=None):
    """-log p(x) = -sum_i log p(x_i | x_1 .. x_{i-1}) in nats per image: exact, one network pass."""
    return common.pixel_nll(logits(model, x, y), x, model.binary)


def loss_fn(model, x, y=None):
    per_image = nll(model, x, y)
    figures = dict(nll=per_image.mean().item())
    if not model.binary:
        figures["bits_per_dim"] = common.nats_to_bits_per_dim(figures["nll"], x[0].numel())
    return per_image.mean(), figures


@torch.no_grad()
def test_nll(model, x, y=None, batch=500):
    """Mean exact NLL (nats/image) over all of x."""
    total = 0.0
    for i in range(0, len(x), batch):
        total += nll(model, x[i:i + batch], None if y is None else y[i:i + batch]).sum().item()
    return total / len(x)


@torch.no_grad()
def sample(model, x, y=None, start_row=0, fast=True, generator=None, progress=False):
    """Fill rows start_row.. of x (B x C x H x W pixel values) in raster order, sub-pixel by sub-pixel:
    x_i ~ p(x_i | x_1 .. x_{i-1}), one network pass per sub-pixel (H x W x C passes in all).

    fast: an output in row r depends only on input rows r - rows_above .. r, so the network runs on that
    window instead of the whole image. Each layer's wrong values at the window's top edge (zero padding
    instead of the rows above) move down one layer at a time and never reach row r: the logits, and so
    the samples for the same random numbers, are those of the whole-image pass."""
    x = x.clone()
    b, c, h, w = x.shape
    for r in tqdm(range(start_row, h), desc="sampling rows", leave=False, disable=not progress):
        top, bottom = (max(0, r - model.rows_above), r + 1) if fast else (0, h)  # rows below r cannot matter yet
        for col in range(w):
            for ch in range(c):  # R, then G (seeing R), then B (seeing R, G)
                out = logits(model, x[:, :, top:bottom], y)[:, ch:ch + 1, :, r - top, col]  # B x 1 x levels
                x[:, ch, r, col] = common.sample_pixel(out, model.binary, generator)[:, 0]
    return x


def receptive_field(model, shape, pixel, channel=0):
    """|d logits(sub-pixel `channel` at `pixel`) / d x| for a random input: C x H x W, zero wherever the
    output cannot depend on the input."""
    x = (torch.rand(1, *shape) * (1 if model.binary else 255)).requires_grad_()
    y = torch.zeros(1, dtype=torch.long)
    out = logits(model, x, y)[0, channel, :, pixel[0], pixel[1]]
    out.sum().backward()
    return x.grad[0].abs()


def receptive_field_picture(cfg, path, size=28, zoom=6):
    """Plain and gated nets of this config side by side (untrained: the picture is about structure).
    White: log |gradient| (scaled from the smallest non-zero one to the largest); red: the output pixel;
    blue: earlier pixels the output cannot see (the blind spot, with enough layers)."""
    torch.manual_seed(cfg.seed)
    pixel, panels = (size // 2, size // 2), []
    for arch in ("plain", "gated"):
        model = build_model(dataclasses.replace(cfg, arch=arch), 1)
        g = receptive_field(model, (1, size, size), pixel)[0]
        lo = g[g > 0].min()
        img = (torch.log(g.clamp(min=lo) / lo) / torch.log(g.max() / lo)).expand(3, -1, -1).clone()
        img[:, g == 0] = 0
        earlier = (torch.arange(size * size) < pixel[0] * size + pixel[1]).view(size, size)
        img[2][(g == 0) & earlier] = 0.8  # blind spot: blue
        img[:, pixel[0], pixel[1]] = torch.tensor([1.0, 0, 0])
        panels.append(img.repeat_interleave(zoom, 1).repeat_interleave(zoom, 2))
        print(f"{arch}: {int(((g == 0) & earlier).sum())} of {int(earlier.sum())} earlier pixels in the blind spot")
    common.save_grid(torch.stack(panels), path, nrow=2)


# ----------------------------------------------------------------------------- data, training, sampling, eval

def prepare(x_uint8, binary, generator=None, fixed=False):
    """uint8 images -> model values: binarized (stochastic for training, one fixed seeded draw for the test
    set, so test NLLs are comparable between runs), or levels 0..255 as floats for 8-bit data."""
    if not binary:
        return x_uint8.float()
    return common.fixed_binarization(x_uint8) if fixed else common.binarize(x_uint8, generator)


def load_split(cfg, split, device):
    x, y = common.load_dataset(cfg.dataset, cfg.data_dir, split, device)
    if x.shape[1] not in (1, 3):
        raise common.UsageError(f"{x.shape[1]}-channel images: pixelcnn takes 1 (binarized) or 3 (8-bit colour)")
    if cfg.conditional and y is None:
        raise common.UsageError(f"--conditional needs class labels and {cfg.dataset} has none; drop --conditional")
    return x, (y if cfg.conditional else None)


def report(value, dims, binary):
    return f"{value:.2f} nats/image" + ("" if binary else f" = {common.nats_to_bits_per_dim(value, dims):.4f} bits/dim")


def train(cfg):
    device = common.get_device(cfg.device)
    common.seed_everything(cfg.seed)
    out = common.start_run(cfg, "pixelcnn")
    x_train, y_train = load_split(cfg, "train", device)
    model = build_model(cfg, x_train.shape[1]).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    gen = common.data_generator(device, cfg.seed)
    step = common.load_checkpoint(out / "ckpt.pt", "pixelcnn", cfg, model=model, opt=opt, gen=gen) if cfg.resume else 0
    print(f"pixelcnn ({cfg.arch}): {sum(p.numel() for p in model.parameters()):,} parameters, "
          f"{len(x_train)} training images {tuple(x_train.shape[1:])}, {device}")
    forward_model = common.maybe_compile(model, cfg)
    log = common.Logger(out, cfg.steps, step)
    save = lambda: common.save_checkpoint(out / "ckpt.pt", "pixelcnn", cfg, step, model=model, opt=opt, gen=gen)
    try:
        while step < cfg.steps:
            for group in opt.param_groups:  # cosine decay of the learning rate to 0 over the run
                group["lr"] = cfg.lr * 0.5 * (1 + math.cos(math.pi * step / cfg.steps))
            batch = common.random_batch(x_train, cfg.batch_size, gen, y_train)
            x, y = batch if y_train is not None else (batch, None)
            x = prepare(x, model.binary, gen)
            with common.autocast(device, cfg.precision):
                loss, figures = loss_fn(forward_model, x, y)
            common.check_finite(loss, step)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            figures["grad_norm"] = nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip).item()
            opt.step()
            step += 1
            log.count(cfg.batch_size)
            if step == cfg.steps:  # the measure of the family: exact NLL on the test set
                figures["test_nll"] = evaluate_model(cfg, model, device)
            if step % cfg.log_every == 0 or step == cfg.steps:
                log.log(step, **figures)
            if step % cfg.sample_every == 0 or step == cfg.steps:
                x_s = draw(cfg, model, min(cfg.num_samples, 64), x_train.shape[1:], device)
                common.save_grid(to_unit(x_s, model.binary), out / f"samples_{step}.png")
                model.train()
            if step % cfg.ckpt_every == 0 or step == cfg.steps:
                save()
    except KeyboardInterrupt:
        save()
        print(f"interrupted: checkpoint saved at step {step}")
        raise SystemExit(130)
    print(f"done: {out}")


def to_unit(x, binary):
    return x if binary else x / 255


def class_labels(cfg, n, device):
    if not cfg.conditional:
        if cfg.label >= 0:
            raise common.UsageError("--label needs a model trained with --conditional")
        return None
    if cfg.label >= NUM_CLASSES:
        raise common.UsageError(f"--label {cfg.label}: use 0..{NUM_CLASSES - 1} (or -1 for all classes in turn)")
    return torch.full((n,), cfg.label, device=device) if cfg.label >= 0 else torch.arange(n, device=device) % NUM_CLASSES


def draw(cfg, model, n, shape, device, progress=False):
    """n fresh samples (pixel values), from a seeded generator so that every grid of a run uses the same noise."""
    model.eval()
    y = class_labels(cfg, n, device)
    g = torch.Generator(device).manual_seed(cfg.seed)
    return sample(model, torch.zeros(n, *shape, device=device), y, fast=cfg.fast, generator=g, progress=progress)


@torch.no_grad()
def evaluate_model(cfg, model, device):
    model.eval()
    x, y = load_split(cfg, "test", device)
    n = cfg.eval_n or len(x)
    value = test_nll(model, prepare(x[:n], model.binary, fixed=True), None if y is None else y[:n])
    model.train()
    return value


def load_for_inference(cfg):
    device = common.get_device(cfg.device)
    x_test, y_test = load_split(cfg, "test", device)
    model = build_model(cfg, x_test.shape[1]).to(device)
    out = common.out_dir(cfg, "pixelcnn")
    common.load_checkpoint(out / "ckpt.pt", "pixelcnn", cfg, model=model)
    model.eval()
    return device, model, out, x_test, y_test


def sample_from_checkpoint(cfg):
    device, model, out, x_test, _ = load_for_inference(cfg)
    start = time.time()
    x = to_unit(draw(cfg, model, cfg.num_samples, x_test.shape[1:], device, progress=True), model.binary).cpu()
    seconds = time.time() - start
    common.save_grid(x[:256], out / "samples.png")
    torch.save(x, out / "samples.pt")
    passes = x[0].numel()
    print(f"{len(x)} samples in {seconds:.1f}s ({passes} network passes, {'fast' if cfg.fast else 'naive'} sampler) "
          f"-> {out}/samples.png, samples.pt")


def complete(cfg, n=8, k=4):
    """Rows: the top half of a test image (bottom hidden), k completions sampled from p(bottom | top), the original."""
    device, model, out, x_test, y_test = load_for_inference(cfg)
    x = prepare(x_test[:n], model.binary, fixed=True)
    y = None if y_test is None else y_test[:n].repeat_interleave(k)
    half = x.shape[2] // 2
    given = x.clone()
    given[:, :, half:] = 0
    g = torch.Generator(device).manual_seed(cfg.seed)
    start = time.time()
    filled = sample(model, given.repeat_interleave(k, 0), y, start_row=half, fast=cfg.fast, generator=g, progress=True)
    seconds = time.time() - start
    shown = given.clone()
    shown[:, :, half:] = 0.5 * (1 if model.binary else 255)  # grey: the hidden half
    rows = torch.cat([shown[:, None], filled.view(n, k, *x.shape[1:]), x[:, None]], 1).flatten(0, 1)
    common.save_grid(to_unit(rows, model.binary), out / "completion.png", nrow=k + 2)
    print(f"{n * k} completions of {n} test images in {seconds:.1f}s -> {out}/completion.png")


def evaluate(cfg):
    device, model, out, x_test, y_test = load_for_inference(cfg)
    n = cfg.eval_n or len(x_test)
    start = time.time()
    value = test_nll(model, prepare(x_test[:n], model.binary, fixed=True), None if y_test is None else y_test[:n])
    seconds = time.time() - start
    kind = "fixed seeded binarization" if model.binary else "8-bit"
    print(f"exact test NLL on {n} {cfg.dataset} images ({kind}): {report(value, x_test[0].numel(), model.binary)} "
          f"({n / seconds:,.0f} img/s)")
    return value


@common.entry
def main(argv=None):
    cfg = common.parse_config(Config, argv)
    if cfg.receptive_field:
        out = common.out_dir(cfg, "pixelcnn")
        out.mkdir(parents=True, exist_ok=True)
        receptive_field_picture(cfg, out / "receptive_field.png")
    elif cfg.sample:
        sample_from_checkpoint(cfg)
    elif cfg.complete:
        complete(cfg)
    elif cfg.eval:
        return evaluate(cfg)
    else:
        train(cfg)


if __name__ == "__main__":
    main()
