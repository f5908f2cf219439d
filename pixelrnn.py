"""PixelRNN: Row LSTM and Diagonal BiLSTM (van den Oord, Kalchbrenner & Kavukcuoglu 2016, sections 3.1-3.4).

An image is a sequence of pixels in raster order (row by row, R then G then B within a pixel), and its
likelihood is the chain rule: each sub-pixel gets a distribution given every one before it. PixelRNN
computes those conditionals with two-dimensional LSTMs whose recurrence runs over rows (Row LSTM) or over
diagonals (Diagonal BiLSTM) and whose input connections are masked, so the likelihood is exact and one
forward pass scores a whole image; sampling has to go pixel by pixel.

    p(x) = prod_{i=1}^{n^2} p(x_i | x_1, ..., x_{i-1}),
    p(x_i | x_<i) = p(x_{i,R} | x_<i) p(x_{i,G} | x_<i, x_{i,R}) p(x_{i,B} | x_<i, x_{i,R}, x_{i,G})
    [o_i, f_i, i_i, g_i] = sigma(K^ss (*) h_{i-1} + K^is (*) x_i)       (sigma = sigmoid for o, f, i; tanh for g)
    c_i = f_i . c_{i-1} + i_i . g_i,      h_i = o_i . tanh(c_i)                       (paper eq. 3)

1-channel images are binarized as common.binarize does (a fresh Bernoulli draw per training batch, one seeded draw
of the test set), 3-channel ones keep 256 levels; the paper's MNIST figure (79.20 nats, Diagonal BiLSTM) is on
another, fixed binarization, so it is not the same test set as ours.

With --conditional the model learns p(x | y) for a class y, as the conditional gated PixelCNN does (van den Oord
et al. 2016, "Conditional Image Generation with PixelCNN Decoders", eq. 4): every LSTM layer adds a learned bias of
the class (y one-hot) to its input-to-state gates. The class is no pixel, so every position may see it.

    [o_i, f_i, i_i, g_i] = sigma(K^ss (*) h_{i-1} + K^is (*) x_i + V^T y)

Run:
    python pixelrnn.py                      # quick on a CPU (10 min of training, then samples, test NLL), full on a GPU
    python pixelrnn.py --arch row --out runs/pixelrnn-row   # Row LSTM
    python pixelrnn.py --eval               # exact NLL on the whole test set (nats/image, bits/dim)
    python pixelrnn.py --sample             # samples.png, samples.pt
    python pixelrnn.py --complete           # complete the bottom half of test images
    python pixelrnn.py --conditional --out runs/pixelrnn-cond          # p(x | class), from the labels
    python pixelrnn.py --out runs/pixelrnn-cond --sample --label 7     # sevens, from the conditional run
    python pixelrnn.py --receptive-field --layers 2 --hidden 6 --head 12    # Row LSTM triangle vs Diagonal BiLSTM
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
    arch: str = common.opt("diag", "recurrent layer: diag (Diagonal BiLSTM) or row (Row LSTM)",
                           choices=["diag", "row"])
    layers: int = common.opt(7, "recurrent layers (each a residual block)", "[1, inf)")
    hidden: int = common.opt(48, "h, LSTM state size; the residual stream has 2h features (a multiple of 3 for "
                             "colour)", "[1, inf)")
    head: int = common.opt(96, "width of the 1x1 mask-B output convolutions (a multiple of 3 for colour)", "[1, inf)")


@dataclasses.dataclass
class Config(common.RunConfig):
    steps: int = common.opt(40000, "training steps", "[1, inf)")
    batch_size: int = common.opt(64, "images per training step", "[1, inf)")
    lr: float = common.opt(1e-3, "peak learning rate (Adam), decayed to 0 on a cosine", "(0, inf)")
    grad_clip: float = common.opt(1.0, "clip the gradient norm to this", "(0, inf)")
    sample_every: int = common.opt(2000, "steps between sample grids (each costs H*W*C network passes)", "[1, inf)")
    eval_n: int = common.opt(0, "test images for the NLL (0 = the whole test set)", "[0, inf)")
    label: int = common.opt(-1, "the class a --conditional model draws (--sample, the grids of a run, --complete); -1: "
                            "every class, one row each (--complete: each test image's own)", "[-1, 9]")
    fast: bool = common.opt(True, "sample with the recurrent states carried from pixel to pixel (--no-fast: the "
                            "network on every row so far for each sub-pixel; the same images)")
    complete: bool = common.opt(False, "complete the bottom half of test images with the checkpoint", mode="checkpoint")
    receptive_field: bool = common.opt(False, "draw both layers' receptive fields (untrained weights)", mode="alone")


PRESETS = {  # the recipe of a bare command, quick on a CPU, full on a CUDA GPU (--preset); a flag you give always wins
    "full": dict(about="the full model, 7 Diagonal BiLSTM layers with h = 48 for 40k steps of 64, sized for one GPU",
                 options={}),
    "quick": dict(about="the quick run, 2 Diagonal BiLSTM layers with h = 16, batches of 32 for 10 minutes of training "
                        "(--max-minutes 10; at most 100k steps), then 16 samples and the exact NLL of the test set",
                  # lr 4e-3, not 2e-3: in its ~1,600 steps a larger step learns more (test NLL 87.6 against 88.8 nats)
                  options=dict(layers=2, hidden=16, head=32, batch_size=32, lr=4e-3, steps=100000, max_minutes=10.0,
                               precision="fp32",  # its small matmuls gain nothing from a CPU's bf16 units
                               log_every=50, ckpt_every=500, sample_every=1000000, num_samples=16)),
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


# ----------------------------------------------------------------------------- the recurrence of eq. (3)

def lstm_scan(x_gates, w_ss, b_ss, before, after):
    """Run the LSTM of eq. (3) along the first axis of x_gates (T x 4 x N x L x h: T rows or diagonals, the
    gates o, f, i, g, N images, L positions per step), all N*L positions of one step in one batched update.

    K^is (*) x is precomputed for the whole map (x_gates); K^ss (*) h_{t-1} is a 1-d convolution over the
    previous step's states: position l sees positions l-before .. l+after of step t-1 (zero padded).
    The gate axis comes first so that each gate is a contiguous block: elementwise ops on strided slices
    of a 4h-wide last axis run ~25x slower on the CPU."""
    T, _, N, L, h_dim = x_gates.shape
    if x_gates.dtype in (torch.bfloat16, torch.float16):
        x_gates = x_gates.float()  # the cell state adds up over up to 2W-1 steps: keep it in fp32 under autocast
    h = c = x_gates.new_zeros(N, L, h_dim)
    hs = []
    for x_t in x_gates.unbind(0):  # not x_gates[t]: indexing's backward would write a full-size zero tensor per step
        padded = F.pad(h, (0, 0, before, after))  # pad along L
        neighbours = torch.cat([padded[:, k:k + L] for k in range(before + after + 1)], dim=2)  # N x L x k*h
        h, c = lstm_cell(x_t, neighbours, w_ss, b_ss, c)
        hs.append(h)
    return torch.stack(hs)  # T x N x L x h


def lstm_cell(x_t, neighbours, w_ss, b_ss, c):
    """One update of eq. (3) for N x L positions: x_t = K^is (*) x (4 x N x L x h), neighbours = the previous
    step's states that K^ss reads (N x L x k*h), c = the cell state they carry on. Returns the new (h, c)."""
    z = x_t + torch.matmul(neighbours, w_ss.to(x_t.dtype)) + b_ss  # K^is (*) x_t + K^ss (*) h_{t-1}: 4 x N x L x h
    o, f, i = torch.sigmoid(z[:3]).unbind(0)
    g = torch.tanh(z[3])
    c = f * c + i * g  # c_t = f_t . c_{t-1} + i_t . g_t
    return o * torch.tanh(c), c  # h_t = o_t . tanh(c_t)


class StateToState(nn.Module):
    """K^ss: a convolution of width k over the previous step's h features (unmasked: every state it reads
    belongs to an earlier row or diagonal, so to pixels that are wholly in the past). One k*h x h matrix
    per gate; forget-gate bias 1, so the cell starts out remembering."""

    def __init__(self, h, k):
        super().__init__()
        self.w = nn.Parameter(torch.empty(4, 1, k * h, h).uniform_(-(k * h) ** -0.5, (k * h) ** -0.5))
        self.b = nn.Parameter(torch.zeros(4, 1, 1, h).index_fill_(0, torch.tensor([1]), 1.0))


def class_bias(embed, y):
    """V^T y, the learned bias of class y for the 4h gates (B x 4h x 1 x 1), or 0 for an unconditional model (no
    embedding). An nn.Embedding row is exactly V^T y for one-hot y; it is the same at every position."""
    return 0 if embed is None else embed(y)[:, :, None, None]


def scan_layout(gates, colors, steps_axis):
    """Masked convs give 4h channels colour-major ([R: o f i g][G: o f i g][B: ...]), so each gate channel
    has the colour of the state channel it feeds. B x 4h x H x W -> steps x 4 x B x positions x h, the
    steps being rows (steps_axis=2) or columns (3), and h colour-major like the state itself."""
    b, c4, H, W = gates.shape
    # the view's axes: 0 image, 1 colour (R, G, B), 2 gate (o f i g), 3 feature within the colour (h / colors of
    # them), 4 row, 5 column. The permutation puts the steps first (4, rows; or 5, columns), then the gate (2), the
    # image (0), the positions along a step (5 or 4), and last colour then feature (1, 3), side by side, so that
    # the reshape merges them into h features, colour-major: feature j of colour k is state channel k h/colors + j
    g = gates.view(b, colors, 4, c4 // (4 * colors), H, W)
    g = g.permute(4, 2, 0, 5, 1, 3) if steps_axis == 2 else g.permute(5, 2, 0, 4, 1, 3)
    return g.reshape(g.shape[0], 4, b, g.shape[3], c4 // 4)


class RowLSTM(nn.Module):
    """Section 3.1: rows from the top, one LSTM update per row for all its pixels at once. K^is is a 1 x k
    (rows x columns, as everywhere in this project; the paper's "k x 1" counts along the row) mask-B convolution
    along the row (the pixel to the left and the pixel itself, computed for the whole map); K^ss a 1 x k
    convolution over the row above's states, so h at (r, c) sees a triangle above it.
    The deck calls this a generation order ("pixels generated left to right"): it is the order the states are
    computed in, a row at a time; pixels are generated in raster order with either layer (sample_rows)."""

    def __init__(self, ch_in, h, colors, conditional=False, k=3):
        super().__init__()
        self.colors, self.k = colors, k
        self.input_to_state = MaskedConv2d(ch_in, 4 * h, (1, k), "B", colors)
        self.state_to_state = StateToState(h, k)
        self.embed = nn.Embedding(common.NUM_CLASSES, 4 * h) if conditional else None  # V

    def forward(self, x, y=None):  # B x ch_in x H x W (and the classes, B) -> B x h x H x W
        x_is = self.input_to_state(x) + class_bias(self.embed, y)  # K^is (*) x + V^T y
        gates = scan_layout(x_is, self.colors, 2)  # rows x 4 x B x W x h
        ss = self.state_to_state
        return lstm_scan(gates, ss.w, ss.b, self.k // 2, self.k // 2).permute(1, 3, 0, 2)


def skew(x):
    """B x C x H x W -> B x C x H x (W+H-1), row r shifted right by r, so every diagonal of the image is a
    column. Done by padding each row to W+H and re-reading the flat buffer in rows one shorter: row r of the
    new view starts at r (W+H-1) = r (W+H) - r, r entries before image row r begins in the buffer. Those r
    entries are the last of the H zeros that end row r-1 (r < H), so row r comes out shifted right by r, zeros
    before it and H-1-r zeros after it."""
    b, c, H, W = x.shape
    flat = F.pad(x, (0, H)).flatten(2)  # B x C x H*(W+H)
    return flat[:, :, :H * (W + H - 1)].view(b, c, H, W + H - 1)


def unskew(x, W):
    """The inverse of skew: B x C x H x (W+H-1) -> B x C x H x W. Re-read in rows one longer, row r starts r
    entries later in the buffer: at pixel 0 of skewed row r, which skew put r columns in."""
    b, c, H, L = x.shape
    flat = F.pad(x.flatten(2), (0, H))  # H*L + H = H*(L+1): re-read in rows one longer
    return flat.view(b, c, H, L + 1)[:, :, :, :W]


class DiagonalLSTM(nn.Module):
    """One direction of section 3.2: on the skewed map, K^is is a 1x1 mask-B convolution and K^ss a 2x1
    convolution (rows x columns, as the paper counts it too: 2 rows, 1 column) over the previous column, rows
    r-1 and r, i.e. over the pixels above and to the left of (r, c) in the image; one LSTM update per column
    (diagonal). h at (r, c) sees every (r' <= r, c' <= c)."""

    def __init__(self, ch_in, h, colors, conditional=False):
        super().__init__()
        self.colors = colors
        self.input_to_state = MaskedConv2d(ch_in, 4 * h, 1, "B", colors)
        self.state_to_state = StateToState(h, 2)
        self.embed = nn.Embedding(common.NUM_CLASSES, 4 * h) if conditional else None  # V

    def forward(self, x, y=None):
        # a 1x1 convolution acts per position, so convolving then skewing equals convolving the skewed map; the class
        # bias goes in before the skew, on the image's cells only (the skewed map's padding keeps K^is = 0)
        x_is = self.input_to_state(x) + class_bias(self.embed, y)  # K^is (*) x + V^T y
        gates = scan_layout(skew(x_is), self.colors, 3)  # columns x 4 x B x H x h
        hs = lstm_scan(gates, self.state_to_state.w, self.state_to_state.b, 1, 0)
        return unskew(hs.permute(1, 3, 2, 0), x.shape[3])


class DiagonalBiLSTM(nn.Module):
    """Both directions: the second runs on the left-right mirrored map (so it sees up and to the right),
    and its output is shifted down one row before the two are added; without the shift it would see the
    pixels to the right in the same row, which are still in the future.
    The deck calls this a generation order ("diagonally from the top left"): it is the order the states are
    computed in, a diagonal at a time; pixels are generated in raster order with either layer (sample_rows)."""

    def __init__(self, ch_in, h, colors, conditional=False):
        super().__init__()
        self.forward_dir, self.backward_dir = (DiagonalLSTM(ch_in, h, colors, conditional) for _ in range(2))

    def forward(self, x, y=None):
        right_to_left = self.backward_dir(x.flip(3), y).flip(3)
        return self.forward_dir(x, y) + F.pad(right_to_left, (0, 0, 1, 0))[:, :, :-1]  # shift down by one row


class ResidualBlock(nn.Module):
    """Figure 5: 2h features in, an LSTM layer to h, a 1x1 mask-B convolution back up to 2h, plus the input."""

    def __init__(self, arch, h, colors, conditional):
        super().__init__()
        self.lstm = (RowLSTM if arch == "row" else DiagonalBiLSTM)(2 * h, h, colors, conditional)
        self.up = MaskedConv2d(h, 2 * h, 1, "B", colors)

    def forward(self, x, y):
        return x + self.up(self.lstm(x, y))


class PixelRNN(nn.Module):
    """7x7 mask-A convolution, residual LSTM layers, ReLU + 1x1 mask-B convolutions to the per-pixel logits
    (B x C x levels x H x W: 1 Bernoulli logit for binarized data, 256 softmax logits for 8-bit). Its input is the
    image in [-1, 1] (scale_input). A conditional network takes the images' classes y too (a B-vector), which
    every LSTM layer adds to its gates."""

    def __init__(self, arch, colors, binary, hidden, layers, head, conditional=False):
        super().__init__()
        self.colors, self.binary = colors, binary
        self.input = MaskedConv2d(colors, 2 * hidden, 7, "A", colors)
        self.blocks = nn.ModuleList(ResidualBlock(arch, hidden, colors, conditional) for _ in range(layers))
        self.output = nn.Sequential(nn.ReLU(), MaskedConv2d(2 * hidden, head, 1, "B", colors), nn.ReLU(),
                                    MaskedConv2d(head, colors * pixel_levels(binary), 1, "B", colors))

    def forward(self, x, y=None):
        # Pad 3 zero columns on the right (the 7x7 kernel's half-width). A mask-A feature never holds its own
        # pixel, so the last pixel of a row would otherwise live only in features of the next row, 1-3 columns
        # from its right end: pixel (r, c) with c < W-4 could never see (r-1, W-1), even with a Diagonal BiLSTM.
        # The padded columns come after the row and before the next one, so they carry it to every later pixel.
        W = x.shape[3]
        h = self.input(F.pad(x, (0, 3)))
        for block in self.blocks:
            h = block(h, y)
        return pixel_logits(self.output(h[..., :W]).contiguous(), self.colors, self.binary)


def build_model(mcfg, shape):
    """The PixelRNN for images of `shape` (C, H, W): binarized (Bernoulli) for 1 channel, 8-bit (256-way) for 3."""
    colors = shape[0]
    binary = colors == 1  # the project's rule: 1-channel images are binarized, 3-channel ones keep 256 levels
    for name in ("hidden", "head"):
        value = getattr(mcfg, name)
        if value % colors:
            raise common.UsageError(f"--{name} {value} must be a multiple of {colors} with {colors}-channel images "
                                    f"(the R, G, B feature groups); try --{name} {value // colors * colors or colors} "
                                    f"or {(value // colors + 1) * colors}")
    return PixelRNN(mcfg.arch, colors, binary, mcfg.hidden, mcfg.layers, mcfg.head, mcfg.conditional)


# ----------------------------------------------------------------------------- the loss: the exact NLL

def nll(model, v, y=None):
    """-log p(x) in nats per image (a B-vector): one forward pass, the chain rule summed over all sub-pixels; for a
    conditional model -log p(x | y), y the images' classes. v: pixel values (0/1, or levels 0..255)."""
    # `model` may be wrapped: DDP keeps the PixelRNN in .module, torch.compile's wrapper passes .binary through
    binary = getattr(model, "module", model).binary
    x = scale_input(v.to(next(model.parameters()).dtype), binary)  # the network's input, in [-1, 1]
    logits = model(x, y)
    return pixel_nll(logits if logits.dtype == torch.float64 else logits.float(), v, binary)  # fp32 under bf16


def loss_fn(model, x, y=None):
    """The exact NLL of the batch x (pixel values) as the loss, per sub-pixel so that --lr means the same for any
    image size; the figures: nats per image and bits per dimension."""
    nats = nll(model, x, y).mean()  # -log p(x), the batch's mean
    dims = x[0].numel()  # C x H x W sub-pixels
    figures = dict(nll_nats=nats.detach(), bits_per_dim=nats.detach() / (dims * math.log(2)))  # bits = nats / ln 2
    return nats / dims, figures


# ----------------------------------------------------------------------------- sampling

@torch.no_grad()
def sample_rows(model, v, y, rng, start_row=0, fast=True, progress=False):
    """Fill rows start_row.. of v (B x C x H x W pixel values) one sub-pixel at a time, in raster order:
    x_i ~ p(x_i | x_<i), or p(x_i | x_<i, y) for a conditional model (y: the B classes to draw; None without).
    The plain sampler (fast=False), the reference, runs the network on rows 0..r for every sub-pixel of row r (it
    is causal, so rows below cannot matter); fast=True carries the recurrent state instead (sample_carried,
    below): the same logits, so the same images for the same random numbers."""
    if fast:
        return sample_carried(model, v, y, rng, start_row, progress)
    v, binary = v.clone(), model.binary
    for r in tqdm(range(start_row, v.shape[2]), desc="sampling rows", leave=False, disable=not progress):
        for c in range(v.shape[3]):
            for ch in range(v.shape[1]):  # R, then G given R, then B given R and G
                x = scale_input(v[:, :, :r + 1].to(model.input.weight.dtype), binary)  # rows 0..r, in [-1, 1]
                logits = model(x, y)[:, ch:ch + 1, :, r, c]
                v[:, ch:ch + 1, r, c] = sample_pixel(logits, binary, rng)
    return v


@torch.no_grad()
def sample(model, n, shape, y, rng, fast=True, progress=False):
    """n fresh images (pixel values, n x C x H x W for shape C x H x W): every row of an empty canvas drawn,
    x ~ p(x), or x ~ p(x | y) for the classes y (None: unconditional), with the random numbers of rng."""
    canvas = torch.zeros(n, *shape, device=model.input.weight.device)
    return sample_rows(model, canvas, y, rng, 0, fast, progress)


# ----------------------------------------------------------------------------- sampling with the state carried
# The carried sampler keeps a cache of each convolution's input map (the stem's, each Row LSTM's K^is), which
# conv_at reads, and the LSTM states, in arrays of their own layouts, given where each is made.

PAD = 3  # every cache is zero padded by 3 (the 7x7 kernels' reach) on all sides: pixel (r, c) is at (r + 3, c + 3)


def conv_at(conv, cache, r, c):
    """A MaskedConv2d's output at (r, c) alone, B x out x 1 x 1: its masked kernel on the patch of its input cache
    (padded by PAD) centred there, the sum the whole-map convolution computes there."""
    kh, kw = conv.kernel_size
    patch = cache[:, :, r + PAD - kh // 2:r + PAD + kh // 2 + 1, c + PAD - kw // 2:c + PAD + kw // 2 + 1]
    return F.conv2d(patch, conv.weight * conv.mask, conv.bias)


def gates_at(x_is, colors):
    """K^is (*) x at one position, B x 4h x 1 x 1 -> lstm_scan's layout 4 x B x 1 x h (in fp32 there too)."""
    g = scan_layout(x_is, colors, 2)[0]
    return g.float() if g.dtype in (torch.bfloat16, torch.float16) else g


class RowLSTMState:
    """A Row LSTM layer carried down the image. h at (r, c) needs K^is on row r (its input at c-1, c: kept in a
    cache), the row above's h at c-1..c+1 and its cell state at c (kept): one cell update per new position."""

    def __init__(self, lstm, n, H, Wp, dtype, y):
        self.lstm, h, k = lstm, lstm.state_to_state.w.shape[-1], lstm.k
        self.bias = class_bias(lstm.embed, y)  # V^T y, the same at every position
        state = torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype  # as lstm_scan keeps it
        w = lstm.state_to_state.w
        self.x = w.new_zeros(n, lstm.input_to_state.in_channels, H + 2 * PAD, Wp + 2 * PAD, dtype=dtype)  # the cache
        # h of (r, c) at [r + 1, c + k//2]: row -1 and the k//2 columns beside the map stay zero, as lstm_scan pads
        self.h = self.x.new_zeros(n, H + 1, Wp + 2 * (k // 2), h, dtype=state)
        self.c = self.x.new_zeros(n, H + 1, Wp, h, dtype=state)  # the cell state of (r, c) at [r + 1, c]

    def begin_row(self, r):
        pass

    def at(self, x, r, c):
        """The layer's LSTM output at (r, c), B x h x 1 x 1, from its input there (B x 2h x 1 x 1)."""
        self.x[:, :, r + PAD, c + PAD] = x[:, :, 0, 0]  # K^is at (r, c + 1) reads it too
        x_is = conv_at(self.lstm.input_to_state, self.x, r, c) + self.bias  # K^is (*) x + V^T y
        x_t = gates_at(x_is, self.lstm.colors)
        k, n = self.lstm.k, x.shape[0]
        above = self.h[:, r, c:c + k].reshape(n, 1, -1)  # row r - 1 at c - k//2 .. c + k//2: K^ss's neighbours
        ss = self.lstm.state_to_state
        h, cell = lstm_cell(x_t, above, ss.w, ss.b, self.c[:, r, c][:, None])  # the cell carried down column c
        self.h[:, r + 1, c + k // 2], self.c[:, r + 1, c] = h[:, 0], cell[:, 0]
        return h.permute(0, 2, 1)[..., None]

    def end_row(self, r):
        pass


class DiagonalBiLSTMState:
    """A Diagonal BiLSTM layer carried down the image. The forward direction's state at (r, c) needs (r-1, c),
    (r, c-1) and K^is at (r, c): one cell update per new position. The backward direction's state at (r, c)
    needs (r-1, c) and (r, c+1), so the whole row to its right; it reaches the output only shifted down a row, so
    once row r is complete one right-to-left sweep computes its states, which row r + 1 reads.

    The columns. In image coordinates, row r of the skewed map (shifted right by r) holds the columns c = -r ..
    Wp - 1 + (H - 1 - r): before the image, cells c = -r .. -1, whose K^is is zero but whose states are not (the
    gate biases, the recurrence), and (r, 0) reads (r, -1); so begin_row computes them, one per skewed column left
    of the image. Cells c < -r lie outside the skewed map: zero, as lstm_scan's state starts. Cells c >= Wp feed
    only cells c' >= Wp and are skipped. States of (r, c) are stored at [r + 1, c + H]: the + 1 keeps row -1 (zero)
    at index 0, the + H makes every column from -H on an index >= 0. The backward direction runs on the mirrored
    map, where image column c is column Wp - 1 - c, so its state of (r, c) is at [r + 1, Wp - 1 - c + H]."""

    def __init__(self, bilstm, n, H, Wp, dtype, y):
        self.fwd, self.bwd, self.H, self.Wp = bilstm.forward_dir, bilstm.backward_dir, H, Wp
        self.bias = [class_bias(self.fwd.embed, y), class_bias(self.bwd.embed, y)]  # V^T y of each direction
        h, w = self.fwd.state_to_state.w.shape[-1], self.fwd.state_to_state.w
        state = torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype  # as lstm_scan keeps it
        # [direction][r + 1, c + H], columns c = -H .. Wp - 1: row -1 and the cells c < -r are never written: zero
        self.h = [w.new_zeros(n, H + 1, H + Wp, h, dtype=state) for _ in range(2)]
        self.c = [w.new_zeros(n, H + 1, H + Wp, h, dtype=state) for _ in range(2)]
        self.row = w.new_zeros(n, self.fwd.input_to_state.in_channels, 1, Wp, dtype=dtype)  # the input along row r

    def cell(self, d, lstm, x_t, r, c):
        """Direction d's state at (r, c) of its own map (the backward one's is mirrored) from its K^ss neighbours,
        the previous skewed column's rows r-1 and r: (r-1, c) at [r, c + H] and (r, c-1) at [r + 1, c - 1 + H]."""
        hs, cs, j = self.h[d], self.c[d], c + self.H
        neighbours = torch.cat([hs[:, r, j], hs[:, r + 1, j - 1]], 1)[:, None]  # lstm_scan's order: row r-1, then r
        ss = lstm.state_to_state
        h, cell = lstm_cell(x_t, neighbours, ss.w, ss.b, cs[:, r + 1, j - 1][:, None])  # the cell from (r, c-1)
        hs[:, r + 1, j], cs[:, r + 1, j] = h[:, 0], cell[:, 0]
        return h

    def begin_row(self, r):
        zero = self.h[0].new_zeros(4, self.row.shape[0], 1, self.h[0].shape[-1])
        for c in range(-r, 0):  # the forward map's cells left of the image in row r (K^is = 0 there), left to right
            self.cell(0, self.fwd, zero, r, c)

    def at(self, x, r, c):
        self.row[:, :, 0, c] = x[:, :, 0, 0]  # the backward sweep of row r reads it
        h = self.cell(0, self.fwd, gates_at(self.fwd.input_to_state(x) + self.bias[0], self.fwd.colors), r, c)
        # the backward state of (r - 1, c), mirrored column Wp - 1 - c, row index (r - 1) + 1: the shift down a row
        below = self.h[1][:, r, self.Wp - 1 - c + self.H]
        return (h + below[:, None]).permute(0, 2, 1)[..., None]

    def end_row(self, r):
        x_is = self.bwd.input_to_state(self.row.flip(3)) + self.bias[1]  # K^is (*) x + V^T y on row r, mirrored
        zero = self.h[1].new_zeros(4, x_is.shape[0], 1, self.h[1].shape[-1])
        for m in range(-r, self.Wp):  # mirrored columns -r .. Wp - 1 (as begin_row's), right to left in the image
            self.cell(1, self.bwd, zero if m < 0 else gates_at(x_is[..., m:m + 1], self.bwd.colors), r, m)


def sample_carried(model, v, y, rng, start_row, progress):
    """The plain sampler's loop with every layer's state carried from pixel to pixel: for each new sub-pixel
    the stem (a 7x7 patch of the input), each layer's LSTM cell and the 1x1 convolutions run at (r, c) alone,
    H*W positions of work for an image instead of the plain sampler's (H*W)^2 / 2. The layers run on W + 3
    columns (PixelRNN.forward's padding): those 3 are computed when their row is complete."""
    v, binary = v.clone(), model.binary
    n, C, H, W = v.shape
    Wp, dtype = W + 3, model.input.weight.dtype
    # the stem's input as forward() pads it (3 zero columns on the right: Wp columns), then PAD on every side
    image = F.pad(scale_input(v.to(dtype), binary), (PAD, PAD + 3, PAD, PAD))
    layers = [(RowLSTMState if isinstance(b.lstm, RowLSTM) else DiagonalBiLSTMState)(b.lstm, n, H, Wp, dtype, y)
              for b in model.blocks]

    def features_at(r, c):
        """The last block's output at (r, c); every layer's state there is updated."""
        h = conv_at(model.input, image, r, c)
        for block, state in zip(model.blocks, layers):
            h = h + block.up(state.at(h, r, c))  # the residual block, at one position
        return h

    def fill_row(r, draw):
        for state in layers:
            state.begin_row(r)
        for c in range(Wp):
            for ch in range(C if draw and c < W else 0):  # R, then G, then B: (r, c) recomputed with each one drawn
                logits = pixel_logits(model.output(features_at(r, c)), C, binary)[:, ch:ch + 1, :, 0, 0]
                v[:, ch:ch + 1, r, c] = sample_pixel(logits, binary, rng)
                image[:, ch, r + PAD, c + PAD] = scale_input(v[:, ch, r, c].to(dtype), binary)  # later ones see it
            if not (draw and c < W):
                features_at(r, c)  # a given pixel or a padding column: the states move on, nothing is drawn
        for state in layers:
            state.end_row(r)

    for r in range(start_row):  # the given rows (completion) go through the states first
        fill_row(r, draw=False)
    for r in tqdm(range(start_row, H), desc="sampling rows", leave=False, disable=not progress):
        fill_row(r, draw=True)
    return v


# ----------------------------------------------------------------------------- pictures

def receptive_field(model, shape, r, c):
    """|d logits(r, c) / d input|, summed over channels: nonzero exactly where the output pixel looks."""
    x = torch.rand(1, *shape, dtype=torch.float64, requires_grad=True)
    model.double()(x, torch.zeros(1, dtype=torch.long))[:, :, :, r, c].sum().backward()  # class 0, if it takes one
    return x.grad.abs().sum(1)[0]


def sample_grid(model, cfg, shape, step):
    """samples_<step>.png of a run: min(--num-samples, 64) samples (a row per class for a --conditional model) from
    a generator of their own seeded by --seed, so every grid starts from the same numbers and training's are
    untouched."""
    n, device = min(cfg.num_samples, 64), model.input.weight.device
    y = common.class_labels(cfg, n, device)
    v = sample(model.eval(), n, shape, y, torch.Generator(device).manual_seed(cfg.seed), cfg.fast, progress=True)
    common.save_grid(levels_to_unit(v, model.binary), Path(cfg.out) / f"samples_{step}.png", labels=y)


# ----------------------------------------------------------------------------- training

def train(cfg):
    run = common.Run(cfg, "pixelrnn")  # the device, the seeds, torchrun (common.py): nothing is written yet
    x_train, y_train = common.load_split(cfg, "train", run.device)  # y_train: None unless --conditional
    x_test, y_test = common.load_split(cfg, "test", run.device)  # for the exact test NLL at the end of the run
    model = build_model(cfg.model, tuple(x_train.shape[1:])).to(run.device)  # bad sizes stop here: nothing written
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    run.start(dict(model=model, opt=opt), lambda step: sample_grid(model, cfg, tuple(x_train.shape[1:]), step))
    net = run.wrap(model)  # the model as the step calls it: DDP under torchrun, compiled with --compile
    for step in run:
        x, y = run.batch(x_train, y_train)  # y: the labels of a --conditional model, else None
        if model.binary:
            x = common.binarize(x, run.rng)  # a fresh Bernoulli draw of every pixel, every step
        for group in opt.param_groups:  # a cosine from --lr to 0 over the run: its steps, or its --max-minutes
            group["lr"] = cfg.lr * 0.5 * (1 + math.cos(math.pi * run.progress))
        with run.autocast():
            loss, figures = loss_fn(net, x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        figures["grad_norm"] = nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        run.check(loss=loss, grad_norm=figures["grad_norm"])  # a NaN stops the run here, before the update
        opt.step()
        run.log(figures)
    run.finish(final=lambda: report_nll(cfg, model, x_test, y_test))  # the exact test NLL, split over the ranks


# ----------------------------------------------------------------------------- the modes

def load_for_inference(cfg):
    """(the trained model in eval mode, the test images as uint8, their labels or None) from the run in --out."""
    device = common.get_device(cfg.device)
    x_test, y_test = common.load_split(cfg, "test", device)  # the labels only for a --conditional model
    model = build_model(cfg.model, tuple(x_test.shape[1:])).to(device)
    common.load_checkpoint(Path(cfg.out) / "ckpt.pt", "pixelrnn", model=model)
    return model.eval(), x_test, y_test


def eval_pixels(x_uint8, binary):
    """The test images as the model sees them: one fixed seeded binarization (the same in every run, so test NLLs
    are comparable), or the 8-bit levels."""
    return common.binarize(x_uint8) if binary else x_uint8


@torch.no_grad()
def mean_nll(model, x_uint8, batch_size, y=None):
    """Exact NLL in nats per image, averaged over the given test images (given their classes y, for a conditional
    model); under torchrun each rank scores its share."""
    v_all, part = eval_pixels(x_uint8, model.binary), common.shard(len(x_uint8))
    batches = [slice(i, min(i + batch_size, part.stop)) for i in range(part.start, part.stop, batch_size)]
    total = sum(nll(model, v_all[b], None if y is None else y[b]).sum().item()
                for b in tqdm(batches, desc="exact NLL", leave=False))
    return common.reduce_over_ranks(total) / len(v_all)


def report_nll(cfg, model, x_test, y_test):
    """The exact NLL of the first --eval-n test images (all by default), as a table and eval.json: -log p(x), or
    -log p(x | y) given the test labels y. The end of a training run and --eval both call it."""
    n = cfg.eval_n or len(x_test)
    x_test, y_test = x_test[:n], None if y_test is None else y_test[:n]
    start = time.time()
    nats = mean_nll(model.eval(), x_test, 4 * cfg.batch_size, y_test)
    rows = {"exact NLL (nats/image)": nats, "exact NLL (bits/dim)": nats / (x_test[0].numel() * math.log(2))}
    given = " -log p(x | y), given the test labels y," if y_test is not None else ""
    title = (f"test NLL{given} on {len(x_test)} images of {cfg.model.dataset} "
             f"({'fixed binarization' if model.binary else '8-bit'}, {time.time() - start:.1f}s)")
    return common.report(cfg.out, title, rows, images=len(x_test))


def evaluate(cfg):
    model, x_test, y_test = load_for_inference(cfg)
    return report_nll(cfg, model, x_test, y_test)


def sample_from_checkpoint(cfg):
    model, x_test, _ = load_for_inference(cfg)
    start, part = time.time(), common.shard(cfg.num_samples)  # under torchrun each rank draws its share
    y = common.class_labels(cfg, len(part), x_test.device, part.start)  # of images part.start..: gathered, all N's
    rng = torch.Generator(x_test.device).manual_seed(common.rank_seed(cfg.seed))  # rank r: numbers of its own
    v = sample(model, len(part), x_test.shape[1:], y, rng, fast=cfg.fast, progress=True)
    samples = common.gather_cat(levels_to_unit(v, model.binary).cpu())
    common.save_samples(cfg, samples)
    common.say(f"{len(samples)} samples in {time.time() - start:.1f}s -> {cfg.out}/samples.png, samples.pt"
               f"{', labels.pt' if y is not None else ''}")


def complete(cfg, n=8, draws=3):
    """Rows of the grid: originals, the top halves the model is given, then `draws` completions each. A conditional
    model completes each image given its own class, or --label."""
    if not common.is_main():  # a small job: under torchrun, rank 0 does it alone
        return
    model, x_test, y_test = load_for_inference(cfg)
    v = eval_pixels(x_test[:n], model.binary).float()
    y = common.class_labels(cfg, len(v) * draws, v.device)  # None for an unconditional model
    if y is not None and cfg.label < 0:
        y = y_test[:n].repeat(draws)  # each test image's own class, in the order of v.repeat below
    H = v.shape[2]
    occluded = v.clone()
    occluded[:, :, H // 2:] = 0.5 if model.binary else 127.5  # grey where the model must fill in
    rng = torch.Generator(v.device).manual_seed(common.rank_seed(cfg.seed))  # rank 0's: cfg.seed
    filled = sample_rows(model, v.repeat(draws, 1, 1, 1), y, rng, start_row=H // 2, fast=cfg.fast, progress=True)
    grid = levels_to_unit(torch.cat([v, occluded, filled]), model.binary).cpu()
    common.save_grid(grid, Path(cfg.out) / "completion.png", nrow=len(v))
    torch.save(grid, Path(cfg.out) / "completion.pt")
    print(f"completed the bottom half of {len(v)} test images ({draws} draws each) -> {cfg.out}/completion.png")


def receptive_field_picture(cfg, size=(1, 28, 28)):
    """Untrained Row LSTM and Diagonal BiLSTM networks of this config; white where the gradient of the red
    output pixel with respect to the input is nonzero. The structure, not the weights, sets the field."""
    if not common.is_main():  # a small job: under torchrun, rank 0 does it alone
        return
    r, c = size[1] * 2 // 3, size[2] // 2
    panels = []
    for arch in ("row", "diag"):
        torch.manual_seed(cfg.seed)
        model = build_model(dataclasses.replace(cfg.model, arch=arch), size)  # bad sizes stop before --out is made
        seen = (receptive_field(model, size, r, c) > 0).float()
        rgb = seen.expand(3, *seen.shape).clone()
        rgb[:, r, c] = torch.tensor([1.0, 0, 0], dtype=rgb.dtype)
        panels.append(rgb)
    zoomed = F.interpolate(torch.stack(panels), scale_factor=6, mode="nearest")  # pixels big enough to count
    Path(cfg.out).mkdir(parents=True, exist_ok=True)
    common.save_grid(zoomed, Path(cfg.out) / "receptive_field.png", nrow=2)
    print(f"receptive fields of output pixel {(r, c)} (left: Row LSTM, right: Diagonal BiLSTM; {cfg.model.layers} "
          f"layers) -> {cfg.out}/receptive_field.png")


@common.entry
def main(argv=None):
    cfg = common.parse_args(ModelConfig, Config, "pixelrnn", argv, PRESETS)
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
