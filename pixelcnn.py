"""PixelCNN: an image as a product of per-pixel conditionals, computed in one pass by masked convolutions.

Fix an order of the pixels (raster: row by row, left to right; inside a colour pixel R, then G, then B)
and write the likelihood of an image exactly with the chain rule (van den Oord et al. 2016, "Pixel
Recurrent Neural Networks", eq. 1-2):

    p(x) = prod_{i=1}^{n^2} p(x_i | x_1, ..., x_{i-1})
    p(x_i | x_<i) = p(x_i,R | x_<i) p(x_i,G | x_<i, x_i,R) p(x_i,B | x_<i, x_i,R, x_i,G)

A convolutional network outputs all the conditionals at once if no output can see its own sub-pixel or a
later one: masked convolutions (mask A in the first layer hides the centre pixel, mask B in later layers
keeps it; see MaskedConv2d). Training is exact maximum likelihood, all conditionals in parallel; sampling
is slow: one network pass per sub-pixel, H x W x C in all (the cached sampler, the default, computes each
pass at the new position only, from caches of every layer's input). The deck says PixelCNN, trained in
parallel, is faster and "also performs better": faster to train, yes; better likelihood, no (the PixelRNN paper
reports CIFAR-10 NLLs of PixelCNN 3.14 bits/dim, Row LSTM 3.07, Diagonal BiLSTM 3.00). Each conditional is a
Bernoulli for binarized images (1 channel) and a 256-way softmax for 8-bit colour. Binarized here means
common.binarize: a fresh Bernoulli(intensity / 255) draw for every training batch, one seeded draw of the test set;
the papers' MNIST figures are on another, fixed binarization, so they are not directly comparable with ours.
Stacked 3x3 masked layers miss a wedge up and to the right of each pixel (the blind spot; --receptive-field
pictures it).

The gated PixelCNN (van den Oord et al. 2016, "Conditional Image Generation with PixelCNN Decoders")
removes the blind spot with a vertical stack (every row above, full width) feeding a horizontal stack (the
row so far), uses gated units, and conditions on a label h through a learned bias in every layer (eq. 4):

    y = tanh(W_{k,f} * x + V_{k,f}^T h) . sigmoid(W_{k,g} * x + V_{k,g}^T h)

    python pixelcnn.py                      # the recipe for the device: quick on a CPU (minutes), full on a GPU
    python pixelcnn.py --eval               # exact NLL on the whole test set -> eval.json
    python pixelcnn.py --sample             # samples.png, samples.pt (timed)
    python pixelcnn.py --complete           # completion.png: the bottom half of test images
    python pixelcnn.py --preset full --arch gated --conditional --out runs/pixelcnn-cond   # gated, class-conditional
    python pixelcnn.py --out runs/pixelcnn-cond --sample --label 3   # threes, from the conditional run
    python pixelcnn.py --receptive-field --channels 48 --layers 12   # -> runs/pixelcnn-mnist/receptive_field.png
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
    arch: str = common.opt("plain", "plain PixelCNN or gated PixelCNN (no blind spot)", choices=["plain", "gated"])
    channels: int = common.opt(128, "feature maps per layer (2h in the paper's residual block; a multiple of "
                               "2 x colours)", "[2, inf)")
    layers: int = common.opt(12, "residual blocks (plain) or gated layers after the first (gated)", "[1, inf)")


@dataclasses.dataclass
class Config(common.RunConfig):
    steps: int = common.opt(20000, "training steps", "[1, inf)")
    lr: float = common.opt(1e-3, "Adam learning rate (decays to 0 on a cosine)", "(0, inf)")
    grad_clip: float = common.opt(1.0, "clip the gradient norm to this", "(0, inf)")
    sample_every: int = common.opt(5000, "steps between sample grids", "[1, inf)")
    ckpt_every: int = common.opt(2000, "steps between checkpoints", "[1, inf)")
    label: int = common.opt(-1, "class to sample from a --conditional model (--sample, the grids of a run, "
                            "--complete); -1: classes 0..9 in turn (--complete: the test images' own)", "[-1, 9]")
    fast: bool = common.opt(True, "sample with caches of every layer's input, computing each new sub-pixel's "
                            "position only (--no-fast: the whole image every pass; the same images)")
    eval_n: int = common.opt(0, "test images for --eval and the end-of-run NLL (0 = all)", "[0, inf)")
    complete: bool = common.opt(False, "sample the bottom half of test images given their top half",
                                mode="checkpoint")
    receptive_field: bool = common.opt(False, "picture d(output pixel)/d(input) of untrained plain and gated nets "
                                       "of these model flags in --out (no data, no checkpoint)", mode="alone")


PRESETS = {  # the recipe of a bare command, quick on a CPU, full on a CUDA GPU (--preset); a flag you give always wins
    "full": dict(about="the full model, 128 channels and 12 blocks for 20k steps of 128, sized for one GPU",
                 options={}),
    "quick": dict(about="the quick run, a gated PixelCNN (no blind spot) of 24 channels and 17 gated layers (the 7x7 "
                        "mask-A one, then --layers 16 3x3 ones: each pixel sees 20 rows up), batches of 32 for 10 "
                        "minutes of training (--max-minutes 10; at most 12,000 steps), then the exact test NLL",
                  # deep and narrow: 17 layers of 24 channels reach 20 rows up where 7 of 32 reached 10, so samples
                  # hold whole digits (benchmarks/RESULTS.md, issue 22)
                  options=dict(arch="gated", channels=24, layers=16, max_minutes=10.0, steps=12000, batch_size=32,
                               lr=3e-3, sample_every=100000, num_samples=16)),
}


# ----------------------------------------------------------------------------- masked convolutions and pixel values
# The same code, letter for letter, in pixelcnn.py and pixelrnn.py, so that each script stands alone;
# tests/test_pixelrnn.py keeps the two copies equal in behaviour.

class MaskedConv2d(nn.Conv2d):
    """A convolution that sees only pixels before the centre in raster order (van den Oord et al. 2016).

    Mask A (first layer) also hides the centre pixel itself; mask B (later layers) lets a feature see the
    centre, which holds only information from earlier pixels after a mask-A layer. With colour (`colors` = 3)
    the channels are split into R, G, B thirds, and at the centre R sees nothing of the pixel (A) or only R
    features (B), G sees R (A) or R, G (B), and B sees R, G (A) or R, G, B (B). Kernel sizes are rows x columns,
    as everywhere in this project. A 5x5 kernel, mask A / mask B (1 = used, 0 = masked):

        1 1 1 1 1      1 1 1 1 1
        1 1 1 1 1      1 1 1 1 1
        1 1 0 0 0      1 1 1 0 0
        0 0 0 0 0      0 0 0 0 0
        0 0 0 0 0      0 0 0 0 0

    The mask is a buffer multiplied into the weight on every forward pass, so the optimizer can never
    move a masked weight away from zero in effect.
    """

    def __init__(self, in_ch, out_ch, kernel_size, mask_type, colors=1, **kwargs):
        kh, kw = (kernel_size, kernel_size) if isinstance(kernel_size, int) else kernel_size
        super().__init__(in_ch, out_ch, (kh, kw), padding=(kh // 2, kw // 2), **kwargs)
        assert mask_type in ("A", "B") and in_ch % colors == 0 and out_ch % colors == 0
        mask = torch.ones_like(self.weight)  # out_ch x in_ch x kh x kw
        mask[:, :, kh // 2, kw // 2:] = 0  # the centre row, from the centre rightwards
        mask[:, :, kh // 2 + 1:] = 0  # every row below the centre
        # the colour of each channel: of n channels, channel c is in third c * colors // n (0 = R, 1 = G, 2 = B)
        group_out = torch.arange(out_ch) * colors // out_ch
        group_in = torch.arange(in_ch) * colors // in_ch
        # at the centre, output colour o reads input colour i if i comes before o (A), or before or at o (B)
        sees = group_out[:, None] > group_in[None, :] if mask_type == "A" else group_out[:, None] >= group_in[None, :]
        mask[:, :, kh // 2, kw // 2] = sees.float()
        self.register_buffer("mask", mask)

    def forward(self, x):
        return F.conv2d(x, self.weight * self.mask, self.bias, self.stride, self.padding, self.dilation)


def pixel_levels(binary):
    """Output values per sub-pixel: 1 Bernoulli logit for binarized data, 256 softmax logits for 8-bit."""
    return 1 if binary else 256


def pixel_logits(net_out, colors, binary):
    """Reshape a network output of colors*levels channels to B x C x levels x H x W (levels = 1 or 256).
    The channel layout matches MaskedConv2d's colour groups: R's logits first, then G's, then B's."""
    b, _, h, w = net_out.shape
    return net_out.view(b, colors, pixel_levels(binary), h, w)


def pixel_nll(logits, x, binary):
    """-log p(x) = -sum_i log p(x_i | x_<i), in nats per image (a B-vector).

    `x` holds the targets: 0/1 floats for binarized data, levels 0..255 for 8-bit data. The network
    sees x only through masked layers, so the sum over sub-pixels is exactly the chain rule."""
    if binary:
        nll = F.binary_cross_entropy_with_logits(logits[:, :, 0], x.to(logits.dtype), reduction="none")
    else:
        nll = F.cross_entropy(logits.transpose(1, 2), x.long(), reduction="none")  # B x C x H x W
    return nll.flatten(1).sum(1)


def sample_pixel(logits, binary, rng):
    """Sample one value per sub-pixel from B x C x levels [x ...] logits (0/1 floats, or levels 0..255)."""
    if binary:
        return torch.bernoulli(torch.sigmoid(logits[:, :, 0].float()), generator=rng)
    probs = torch.softmax(logits.float().movedim(2, -1), -1)
    return torch.multinomial(probs.reshape(-1, probs.shape[-1]), 1, generator=rng).view(probs.shape[:-1]).float()


def scale_input(x, binary):
    """Pixel values (0/1, or levels 0..255) -> [-1, 1], so that the zero padding means "no pixel", not black."""
    return x * 2 - 1 if binary else x / 127.5 - 1


def levels_to_unit(x, binary):
    """Pixel values (0/1, or levels 0..255) -> [0, 1], the range of pictures and samples.pt."""
    return x.float() if binary else x.float() / 255


# ----------------------------------------------------------------------------- the plain PixelCNN

class ResidualBlock(nn.Module):
    """The PixelCNN residual block (van den Oord et al. 2016a, fig. 5): ReLU, 1x1 (2h -> h), ReLU, 3x3 (h -> h),
    ReLU, 1x1 (h -> 2h), all mask B, added to its input. With --conditional, a label embedding is added inside."""

    def __init__(self, ch, colors, conditional):
        super().__init__()
        self.conv1 = MaskedConv2d(ch, ch // 2, 1, "B", colors)
        self.conv2 = MaskedConv2d(ch // 2, ch // 2, 3, "B", colors)
        self.conv3 = MaskedConv2d(ch // 2, ch, 1, "B", colors)
        self.embed = nn.Embedding(common.NUM_CLASSES, ch // 2) if conditional else None

    def forward(self, x, y):
        return self.expand(x, self.conv2(self.reduce(x, y)))

    def reduce(self, x, y):
        """ReLU, 1x1 (2h -> h), the label, ReLU: the input of the 3x3 conv (what the cached sampler keeps)."""
        h = self.conv1(F.relu(x))
        if self.embed is not None:
            # a per-channel bias per class: the label is no pixel, so any layer may see it
            h = h + self.embed(y)[:, :, None, None]
        return F.relu(h)

    def expand(self, x, h):
        """ReLU, 1x1 (h -> 2h) of the 3x3 conv's output, added to the block's input."""
        return x + self.conv3(F.relu(h))


def output_head(ch, colors, levels):
    """Two 1x1 mask-B layers: ch features -> colors * levels logits per position (R's first, then G's, then B's)."""
    return nn.Sequential(nn.ReLU(), MaskedConv2d(ch, ch, 1, "B", colors), nn.ReLU(),
                         MaskedConv2d(ch, colors * levels, 1, "B", colors))


class PixelCNN(nn.Module):
    """7x7 mask-A conv, `layers` residual blocks of mask-B convs, 1x1 mask-B output layers."""

    def __init__(self, colors, binary, ch, layers, conditional):
        super().__init__()
        self.colors, self.binary = colors, binary
        self.stem = MaskedConv2d(colors, ch, 7, "A", colors)
        self.blocks = nn.ModuleList(ResidualBlock(ch, colors, conditional) for _ in range(layers))
        self.head = output_head(ch, colors, pixel_levels(binary))

    def forward(self, x, y=None):
        h = self.stem(scale_input(x, self.binary))
        for block in self.blocks:
            h = block(h, y)
        return self.head(h)


# ----------------------------------------------------------------------------- the gated PixelCNN

def gate(x, colors):
    """tanh(W_f * x) . sigmoid(W_g * x). The 2k input channels are split inside each colour group
    (R: f then g, G: f then g, ...), so the k outputs keep MaskedConv2d's R|G|B channel groups."""
    f, g = x.unflatten(1, (colors, 2, -1)).unbind(2)
    return (torch.tanh(f) * torch.sigmoid(g)).flatten(1, 2)


def down_shift(x):
    """Move features one row down (zeros enter at the top): row i then holds what row i-1 computed.

    The vertical stack reaches the horizontal one only through this shift because its row i has seen row i of the
    image in full, pixel (i, j) and the pixels right of it included, which the conditional at (i, j) must not see.
    Shifted, position (i, j) gets the vertical features of row i-1, which saw rows <= i-1 only, all of them before
    (i, j); the horizontal stack adds row i left of j. Together: every earlier pixel, no blind spot, no leak."""
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
        self.embed = nn.Embedding(common.NUM_CLASSES, 4 * ch) if conditional else None  # V_f^T y, V_g^T y, both stacks

    def forward(self, v, h, y):
        k = self.k
        # The vertical kernel, (k//2 + 1) rows x k columns, is padded by hand: k//2 columns left and right keep the
        # width, each output centred on its column as a k-wide conv is; k//2 rows on top and none below make output
        # row i read input rows i-k//2 .. i, the rows above and its own row, never a row below (a "same" padding of
        # k//2 top and bottom would let it see row i + 1).
        v_pre = self.v_conv(F.pad(v, (k // 2, k // 2, k // 2, 0)))  # F.pad's order: left, right, top, bottom
        h_pre = self.h_conv(h) + self.v_to_h(down_shift(v_pre))  # v reaches h one row late: see down_shift
        return self.vertical(v_pre, y), self.horizontal(h, h_pre, y)

    def label_bias(self, y):
        """V_v^T y and V_h^T y, the label's biases of the two stacks (zeros without --conditional)."""
        return self.embed(y)[:, :, None, None].chunk(2, dim=1) if self.embed is not None else (0, 0)

    def vertical(self, v_pre, y):
        """v' = gate(V * v + V_v^T y), from v_pre = V * v."""
        return gate(v_pre + self.label_bias(y)[0], self.colors)

    def horizontal(self, h, h_pre, y):
        """h' = h + 1x1(gate(h_pre + V_h^T y)) (no h + in the first layer), h_pre = H * h + 1x1(down_shift(V * v))."""
        h_new = self.h_out(gate(h_pre + self.label_bias(y)[1], self.colors))
        return h + h_new if self.residual else h_new


class GatedPixelCNN(nn.Module):
    """A 7x7 gated layer with mask A, `layers` 3x3 gated layers with mask B, 1x1 mask-B output layers."""

    def __init__(self, colors, binary, ch, layers, conditional):
        super().__init__()
        self.colors, self.binary = colors, binary
        self.layers = nn.ModuleList([GatedLayer(colors, ch, 7, "A", colors, conditional)] +
                                    [GatedLayer(ch, ch, 3, "B", colors, conditional) for _ in range(layers)])
        self.head = output_head(ch, colors, pixel_levels(binary))

    def forward(self, x, y=None):
        v = h = scale_input(x, self.binary)
        for layer in self.layers:
            v, h = layer(v, h, y)
        return self.head(h)


def build_model(mcfg, shape):
    """The network for images of `shape` (C x H x W; C = 1 binarized or 3 colour); any H and W."""
    colors, m = shape[0], 2 * shape[0]
    # the project's rule: 1-channel images are binarized (a Bernoulli per pixel); colour keeps 256 levels (a softmax)
    binary = colors == 1
    if mcfg.channels % m:
        why = "even (the residual blocks halve it)" if colors == 1 else \
            f"a multiple of {m} with colour images (halved in the blocks, then split into R, G, B groups)"
        below, above = mcfg.channels // m * m, mcfg.channels // m * m + m
        raise common.UsageError(f"--channels {mcfg.channels} must be {why}; try --channels "
                                + (f"{below} or {above}" if below else f"{above}"))
    net = PixelCNN if mcfg.arch == "plain" else GatedPixelCNN
    return net(colors, binary, mcfg.channels, mcfg.layers, mcfg.conditional)


# ----------------------------------------------------------------------------- the loss: the exact NLL

def logits(model, x, y=None):
    """B x C x levels x H x W: the parameters of p(x_i | x_<i) for every sub-pixel i at once. The levels (1 or 256,
    build_model's choice) are read off the output, so `model` may be wrapped (DDP, torch.compile)."""
    out = model(x, y).float()
    return pixel_logits(out, x.shape[1], binary=out.shape[1] == x.shape[1])  # one logit per sub-pixel: binarized


def nll(model, x, y=None):
    """-log p(x) = -sum_i log p(x_i | x_1 .. x_{i-1}) in nats per image: exact, one network pass."""
    per_level = logits(model, x, y)
    return pixel_nll(per_level, x, binary=per_level.shape[2] == 1)


def loss_fn(model, x, y=None):
    """Maximum likelihood: the batch's mean exact NLL (nats per image). The figures are detached tensors (read only
    on the log cadence): nll, and for 8-bit colour bits_per_dim = nats / (C H W ln 2)."""
    loss = nll(model, x, y).mean()
    figures = dict(nll=loss.detach())
    if x.shape[1] != 1:  # colour (1-channel images are binarized): also in bits per sub-pixel, as the papers report
        figures["bits_per_dim"] = loss.detach() / (x[0].numel() * math.log(2))
    return loss, figures


# ----------------------------------------------------------------------------- the samplers

@torch.no_grad()
def sample_rows(model, x, y, rng, start_row=0, fast=True, progress=False):
    """Fill rows start_row.. of x (B x C x H x W pixel values) in raster order, sub-pixel by sub-pixel:
    x_i ~ p(x_i | x_1 .. x_{i-1}); the rows above start_row are given (completion). The naive sampler, the
    reference (fast=False), runs the network on the whole image for every sub-pixel, H x W x C passes in all;
    fast=True is the cached sampler below: the same logits, the same random numbers in the same order, so the
    same images."""
    if fast:
        return sample_cached(model, x, y, rng, start_row, progress)
    x = x.clone()
    b, c, h, w = x.shape
    for r in tqdm(range(start_row, h), desc="sampling rows", leave=False, disable=not progress):
        for col in range(w):
            for ch in range(c):  # R, then G (seeing R), then B (seeing R, G)
                pixel = logits(model, x, y)[:, ch:ch + 1, :, r, col]  # B x 1 x levels
                x[:, ch, r, col] = sample_pixel(pixel, model.binary, rng)[:, 0]
    return x


@torch.no_grad()
def sample(model, n, shape, y, rng, fast=True, progress=False):
    """n fresh images of `shape` (C x H x W), as pixel values, for the labels y (None: unconditional): every row of
    an empty canvas filled by sample_rows, with the random numbers of `rng`."""
    canvas = torch.zeros(n, *shape, device=next(model.parameters()).device)
    return sample_rows(model, canvas, y, rng, fast=fast, progress=progress)


# ----------------------------------------------------------------------------- the cached sampler
# Ramachandran et al. 2017, "Fast Generation for Convolutional Autoregressive Models". Each layer keeps a cache of its
# whole input map. Cache coordinates are image coordinates + PAD: pixel (r, c) is entry (r + PAD, c + PAD), and the
# k-wide patch a kernel centred on (r, c) reads is entries r + PAD - k//2 .. r + PAD + k//2 (and so on for columns).
# The padding is zeros because the whole-image pass pads with zeros (MaskedConv2d's padding, the vertical conv's
# F.pad): a patch at the border then holds the very numbers the whole-image convolution sums there. Entries not yet
# computed are zeros too, and no kernel uses them: the masks give every later position a zero weight, and the
# vertical stack reads a row only once it is complete.

PAD = 3  # every cache is zero padded by 3 (the 7x7 kernels' reach) on all sides: pixel (r, c) is at (r + 3, c + 3)


def zero_cache(image, channels):
    """A layer's input map before anything is computed: zeros (padding included) of the padded image's size."""
    return image.new_zeros(image.shape[0], channels, *image.shape[2:])


def conv_at(conv, cache, r, c):
    """A MaskedConv2d's output at (r, c) alone, B x out x 1 x 1: its masked kernel on the patch of its input cache
    (padded by PAD) centred there, the sum the whole-map convolution computes there."""
    kh, kw = conv.kernel_size
    patch = cache[:, :, r + PAD - kh // 2:r + PAD + kh // 2 + 1, c + PAD - kw // 2:c + PAD + kw // 2 + 1]
    return F.conv2d(patch, conv.weight * conv.mask, conv.bias)


class CachedPixelCNN:
    """The plain PixelCNN at one position: the 7x7 stem and each block's 3x3 conv read caches of their input
    maps; every other layer is 1x1, position by position."""

    def __init__(self, model, image, y):
        self.model, self.image, self.y = model, image, y  # image: the stem's input
        self.maps = [zero_cache(image, block.conv2.in_channels) for block in model.blocks]  # each 3x3 conv's input

    def new_row(self, r):
        pass  # every layer is computed position by position

    def features_at(self, r, c):
        """The last block's output at (r, c), B x ch x 1 x 1. In layer order: the stem's 7x7 patch of the image at
        (r, c); then per block its 3x3 conv's input at (r, c), written into that block's cache first (mask B reads
        the centre), then the 3x3 patch around (r, c) of the cache and the block's output."""
        h = conv_at(self.model.stem, self.image, r, c)
        for block, cache in zip(self.model.blocks, self.maps):
            cache[:, :, r + PAD, c + PAD] = block.reduce(h, self.y)[:, :, 0, 0]  # this and later 3x3 patches read it
            h = block.expand(h, conv_at(block.conv2, cache, r, c))
        return h


class CachedGatedPixelCNN:
    """The gated PixelCNN: the vertical stack row by row, the horizontal stack position by position. Vertical
    outputs at row i see input rows <= i (full width) and reach the horizontal stack only down-shifted, in row
    i + 1: so once row r - 1 is complete, new_row(r) computes every layer's V * v at row r - 1. The horizontal
    convs are 1 x k, on row r only."""

    def __init__(self, model, image, y):
        self.model, self.y = model, y
        ch = [layer.h_out.out_channels for layer in model.layers]
        self.v = [image] + [zero_cache(image, n) for n in ch]  # v[l]: layer l's vertical input (the last one unread)
        self.h = [image] + [zero_cache(image, n) for n in ch]  # h[l]: layer l's horizontal input (the last one unread)

    def new_row(self, r):
        """Called once before row r's positions, when row r - 1 is complete. For each layer l in order (layer l + 1
        reads what layer l writes): V * v at row r - 1, from rows r-1-k//2 .. r-1 of v[l]'s cache and columns
        -k//2 .. W-1+k//2 (the padded width the whole-image pass sees); its gated output into row r - 1 of v[l + 1];
        and self.above[l] = 1x1(down_shift(V * v)) at row r, which every position of row r adds to its horizontal
        input. Row 0 gets the zero row down_shift brings in."""
        self.above = []
        for layer, v, v_next in zip(self.model.layers, self.v, self.v[1:]):
            k, w = layer.k, v.shape[3] - 2 * PAD
            if r == 0:
                v_pre = v.new_zeros(v.shape[0], layer.v_conv.out_channels, 1, w)  # the zero row down_shift brings in
            else:
                rows = v[:, :, r - 1 + PAD - k // 2:r + PAD, PAD - k // 2:PAD + w + k // 2]  # rows r-1-k//2 .. r-1
                v_pre = layer.v_conv(rows)  # 1 x W: row r - 1 of V * v, as the whole-image pass has it
                v_next[:, :, r - 1 + PAD, PAD:PAD + w] = layer.vertical(v_pre, self.y)[:, :, 0]  # later rows read it
            self.above.append(layer.v_to_h(v_pre))

    def features_at(self, r, c):
        """The last layer's h at (r, c), B x ch x 1 x 1. For each layer l in order: H * h on the 1 x k patch of
        h[l]'s cache around (r, c) (its mask keeps columns < c and the colours drawn before), plus above[l] at
        column c, gated; the result goes into h[l + 1] at (r, c), where layer l + 1's patch reads it next."""
        h = None  # the input of layer 0's residual, which it has not (mask A)
        for layer, cache, h_next, above in zip(self.model.layers, self.h, self.h[1:], self.above):
            h = layer.horizontal(h, conv_at(layer.h_conv, cache, r, c) + above[:, :, :, c:c + 1], self.y)
            h_next[:, :, r + PAD, c + PAD] = h[:, :, 0, 0]  # the next layer's 1 x k patches at (r, c) and on read it
        return h


def sample_cached(model, x, y, rng, start_row, progress):
    """The naive sampler's loop over caches. An output at (r, c) needs each layer's input only at positions up to
    (r, c) in raster order, all computed by then: so each new sub-pixel computes every layer at (r, c) alone, from
    patches of the caches, writing each result into the next layer's cache. A pixel costs one position's work, not
    H x W's. The order: new_row(r) once per row, then per position and per colour features_at(r, c) (again for each
    colour: G's logits see the R just drawn), the 1x1 head, a draw, and the drawn value into the image cache."""
    x = x.clone()
    b, c, h, w = x.shape
    image = F.pad(scale_input(x, model.binary), (PAD,) * 4)  # the network's input, kept equal to that of x
    net = (CachedPixelCNN if isinstance(model, PixelCNN) else CachedGatedPixelCNN)(model, image, y)
    for r in range(start_row):  # the given rows go through the caches as drawn ones do, nothing drawn
        net.new_row(r)
        for col in range(w):
            net.features_at(r, col)
    for r in tqdm(range(start_row, h), desc="sampling rows", leave=False, disable=not progress):
        net.new_row(r)
        for col in range(w):
            for ch in range(c):  # R, then G, then B: (r, col) recomputed each time, with the colours drawn so far
                out = model.head(net.features_at(r, col)).float()  # B x C*levels x 1 x 1, as logits() computes it
                pixel = pixel_logits(out, c, model.binary)[:, ch:ch + 1, :, 0, 0]  # B x 1 x levels
                x[:, ch, r, col] = sample_pixel(pixel, model.binary, rng)[:, 0]
                image[:, ch, r + PAD, col + PAD] = scale_input(x[:, ch, r, col], model.binary)  # later steps see it
    return x


# ----------------------------------------------------------------------------- the family's measure: the exact NLL

@torch.no_grad()
def mean_nll(model, x, y=None, batch=500, progress=False):
    """The mean exact NLL (nats per image) of all of x (pixel values), `batch` images per network pass so that
    memory stays bounded for any number of them; 0 for no images."""
    total = 0.0
    for i in tqdm(range(0, len(x), batch), desc="exact NLL", unit="batch", leave=False, disable=not progress):
        total += nll(model, x[i:i + batch], None if y is None else y[i:i + batch]).sum().item()
    return total / max(len(x), 1)


# ----------------------------------------------------------------------------- pictures

def sample_grid(model, cfg, shape, step):
    """samples_<step>.png in --out: min(--num-samples, 64) fresh images (a row per class for a --conditional
    model), from a generator of their own seeded by --seed: every grid of a run draws the same random numbers, and
    the training run's own never move."""
    n, device = min(cfg.num_samples, 64), next(model.parameters()).device
    y = common.class_labels(cfg, n, device)
    x = sample(model.eval(), n, shape, y, torch.Generator(device).manual_seed(cfg.seed), cfg.fast, progress=True)
    common.save_grid(levels_to_unit(x, model.binary), Path(cfg.out) / f"samples_{step}.png", labels=y)


def receptive_field(model, shape, pixel, channel=0):
    """|d logits(sub-pixel `channel` at `pixel`) / d x| for a random input: C x H x W, zero wherever the
    output cannot depend on the input."""
    x = (torch.rand(1, *shape) * (1 if model.binary else 255)).requires_grad_()
    y = torch.zeros(1, dtype=torch.long)
    logits(model, x, y)[0, channel, :, pixel[0], pixel[1]].sum().backward()
    return x.grad[0].abs()


# ----------------------------------------------------------------------------- training

def train(cfg):
    run = common.Run(cfg, "pixelcnn")  # the device, the seeds, torchrun (common.py): nothing is written yet
    x_train, y_train = common.load_split(cfg, "train", run.device)  # y_train: None unless --conditional
    x_test, y_test = common.load_split(cfg, "test", run.device)  # for the end-of-run NLL: missing test data stops here
    model = build_model(cfg.model, tuple(x_train.shape[1:])).to(run.device)  # bad sizes stop here too
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    run.start(dict(model=model, opt=opt), lambda step: sample_grid(model, cfg, x_train.shape[1:], step))
    net = run.wrap(model)  # the model as the step calls it: DDP under torchrun, compiled with --compile
    for step in run:
        x, y = run.batch(x_train, y_train)  # y: the labels of a --conditional model, else None
        # 1-channel images: a fresh binarization of every batch (the run's generator); colour: the levels 0..255
        x = common.binarize(x, run.rng) if model.binary else x.float()
        for group in opt.param_groups:  # cosine decay of the learning rate to 0 over the run
            group["lr"] = cfg.lr * 0.5 * (1 + math.cos(math.pi * run.progress))
        with run.autocast():
            loss, figures = loss_fn(net, x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        figures["grad_norm"] = nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        run.check(loss=loss, grad_norm=figures["grad_norm"])  # a NaN stops the run here, before the update
        opt.step()
        run.log(figures)
    run.finish(final=lambda: report_test_nll(cfg, model, x_test, y_test))  # the exact test NLL, split over the ranks


# ----------------------------------------------------------------------------- the modes

def load_for_inference(cfg):
    """The trained network in --out, on its device, in eval mode, and the test split (x uint8, y or None)."""
    device = common.get_device(cfg.device)
    x_test, y_test = common.load_split(cfg, "test", device)
    model = build_model(cfg.model, tuple(x_test.shape[1:])).to(device)
    common.load_checkpoint(Path(cfg.out) / "ckpt.pt", "pixelcnn", model=model)
    return model.eval(), x_test, y_test


def report_test_nll(cfg, model, x_test, y_test):
    """The exact NLL of the first --eval-n test images (all by default), printed and written to eval.json; under
    torchrun each rank scores its share. 1-channel images in the test set's one fixed binarization."""
    n = min(cfg.eval_n or len(x_test), len(x_test))
    x = common.binarize(x_test[:n]) if model.binary else x_test[:n].float()  # no generator: the fixed binarization
    part, start = common.shard(n), time.time()  # this rank's share
    mine = mean_nll(model.eval(), x[part.start:part.stop], None if y_test is None else y_test[part.start:part.stop],
                    progress=common.is_main())
    value = common.reduce_over_ranks(mine * len(part)) / n  # the ranks' sums, over all n images
    seconds = time.time() - start
    rows = {"exact NLL (nats/image)": value}
    if not model.binary:
        rows["bits/dim"] = value / (x_test[0].numel() * math.log(2))  # nats per image -> bits per sub-pixel
    kind = "binarized with a fixed seed" if model.binary else "8-bit"
    return common.report(cfg.out, f"pixelcnn: {n} {cfg.model.dataset} test images ({kind}), {n / seconds:,.0f} img/s",
                         rows, images=n)


def evaluate(cfg):
    model, x_test, y_test = load_for_inference(cfg)
    return report_test_nll(cfg, model, x_test, y_test)


def sample_from_checkpoint(cfg):
    model, x_test, _ = load_for_inference(cfg)
    start, part = time.time(), common.shard(cfg.num_samples)  # under torchrun each rank draws its share
    rng = torch.Generator(x_test.device).manual_seed(common.rank_seed(cfg.seed))  # rank r: its own numbers
    y = common.class_labels(cfg, len(part), x_test.device, part.start)  # image i: class i mod 10, or --label
    x = sample(model, len(part), x_test.shape[1:], y, rng, cfg.fast, progress=True)
    x = common.gather_cat(levels_to_unit(x, model.binary).cpu())
    seconds = time.time() - start
    common.save_samples(cfg, x)
    common.say(f"{len(x)} samples in {seconds:.1f}s ({x[0].numel()} sub-pixels in turn, "
               f"{'cached' if cfg.fast else 'naive'} sampler) -> {cfg.out}/samples.png, samples.pt")


def complete(cfg, n=8, k=4):
    """Rows: the top half of a test image (bottom hidden), k completions sampled from p(bottom | top), the original.
    A --conditional model completes with each image's own label, or with --label."""
    if not common.is_main():  # a small job: under torchrun, rank 0 does it alone
        return
    model, x_test, y_test = load_for_inference(cfg)
    device = x_test.device
    x = common.binarize(x_test[:n]) if model.binary else x_test[:n].float()  # the test set's fixed binarization
    n = len(x)
    y = common.class_labels(cfg, n * k, device)  # None for an unconditional model
    if y is not None and cfg.label < 0:
        y = y_test[:n].repeat_interleave(k)  # each test image's own class
    half = x.shape[2] // 2
    given = x.clone()
    given[:, :, half:] = 0
    rng = torch.Generator(device).manual_seed(cfg.seed)
    start = time.time()
    filled = sample_rows(model, given.repeat_interleave(k, 0), y, rng, start_row=half, fast=cfg.fast, progress=True)
    seconds = time.time() - start
    shown = given.clone()
    shown[:, :, half:] = 0.5 * (1 if model.binary else 255)  # grey: the hidden half
    rows = torch.cat([shown[:, None], filled.view(n, k, *x.shape[1:]), x[:, None]], 1).flatten(0, 1)
    common.save_grid(levels_to_unit(rows, model.binary), Path(cfg.out) / "completion.png", nrow=k + 2)
    print(f"{n * k} completions of {n} test images in {seconds:.1f}s -> {cfg.out}/completion.png")


def receptive_field_picture(cfg, size=28, zoom=6):
    """Untrained plain and gated nets of the model flags (--channels, --layers), side by side, for a 1-channel
    size x size image: the picture is about structure, so it needs no data and no checkpoint.
    White: log |gradient| (scaled from the smallest non-zero one to the largest); red: the output pixel;
    blue: earlier pixels the output cannot see (the blind spot, with enough layers)."""
    if not common.is_main():  # a small job: under torchrun, rank 0 does it alone
        return
    torch.manual_seed(cfg.seed)  # the untrained weights and the random input
    shape = (1, size, size)
    models = {arch: build_model(dataclasses.replace(cfg.model, arch=arch), shape) for arch in ("plain", "gated")}
    pixel, panels = (size // 2, size // 2), []
    for arch, model in models.items():
        g = receptive_field(model, shape, pixel)[0]
        lo = g[g > 0].min()
        img = (torch.log(g.clamp(min=lo) / lo) / torch.log(g.max() / lo)).expand(3, -1, -1).clone()
        img[:, g == 0] = 0
        earlier = (torch.arange(size * size) < pixel[0] * size + pixel[1]).view(size, size)
        img[2][(g == 0) & earlier] = 0.8  # blind spot: blue
        img[:, pixel[0], pixel[1]] = torch.tensor([1.0, 0, 0])
        panels.append(img.repeat_interleave(zoom, 1).repeat_interleave(zoom, 2))
        print(f"{arch}: {int(((g == 0) & earlier).sum())} of {int(earlier.sum())} earlier pixels in the blind spot")
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    common.save_grid(torch.stack(panels), out / "receptive_field.png", nrow=2)
    print(f"-> {out}/receptive_field.png")


@common.entry
def main(argv=None):
    cfg = common.parse_args(ModelConfig, Config, "pixelcnn", argv, PRESETS)
    if cfg.plot:
        common.plot_curves(cfg.out)
    elif cfg.sample:
        sample_from_checkpoint(cfg)
    elif cfg.eval:
        return evaluate(cfg)
    elif cfg.complete:
        complete(cfg)
    elif cfg.receptive_field:
        receptive_field_picture(cfg)
    else:
        train(cfg)


if __name__ == "__main__":
    main()
