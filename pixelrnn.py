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

Run:
    python pixelrnn.py                                  # Diagonal BiLSTM on binarized MNIST, sized for one GPU
    python pixelrnn.py --arch row                       # Row LSTM
    python pixelrnn.py --eval                           # exact NLL on the whole test set (nats/image, bits/dim)
    python pixelrnn.py --sample                         # 64 samples from runs/pixelrnn-mnist/ckpt.pt
    python pixelrnn.py --complete                       # complete the bottom half of test images
    python pixelrnn.py --receptive-field                # gradient picture: Row LSTM triangle vs Diagonal BiLSTM
README.md gives a quick CPU command.
"""
import dataclasses
import math
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import common
from common import MaskedConv2d


@dataclasses.dataclass
class Config(common.TrainConfig):
    steps: int = common.opt(40000, "training steps", runtime=True)
    batch_size: int = common.opt(64, "images per training step", runtime=True)
    lr: float = common.opt(1e-3, "peak learning rate (Adam), decayed to 0 on a cosine", runtime=True)
    grad_clip: float = common.opt(1.0, "clip the gradient norm to this", runtime=True)
    sample_every: int = common.opt(2000, "steps between sample grids (0 = none; each costs H*W*C network passes)", runtime=True)
    max_minutes: float = common.opt(0.0, "stop training after this many minutes, whatever --steps says (0 = no limit)", runtime=True)
    arch: str = common.opt("diag", "recurrent layer: diag (Diagonal BiLSTM) or row (Row LSTM)", choices=["diag", "row"])
    layers: int = common.opt(7, "recurrent layers (each a residual block)")
    hidden: int = common.opt(48, "h, LSTM state size; the residual stream has 2h features (a multiple of 3 for colour)")
    head: int = common.opt(96, "width of the 1x1 mask-B output convolutions")
    eval: bool = common.opt(False, "exact NLL of the checkpoint on the test set", runtime=True)
    eval_n: int = common.opt(0, "test images for the NLL (0 = the whole test set)", runtime=True)
    complete: bool = common.opt(False, "complete the bottom half of test images with the checkpoint", runtime=True)
    receptive_field: bool = common.opt(False, "draw both layers' receptive fields (untrained weights)", runtime=True)


# ----------------------------------------------------------------------------- the recurrence, one batched step per row or column

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
    for x_t in x_gates.unbind(0):  # unbind, not x_gates[t]: indexing's backward would write a full-size zero tensor per step
        padded = F.pad(h, (0, 0, before, after))  # pad along L
        neighbours = torch.cat([padded[:, k:k + L] for k in range(before + after + 1)], dim=2)  # N x L x k*h
        z = x_t + torch.matmul(neighbours, w_ss.to(x_t.dtype)) + b_ss  # K^is (*) x_t + K^ss (*) h_{t-1}: 4 x N x L x h
        o, f, i = torch.sigmoid(z[:3]).unbind(0)
        g = torch.tanh(z[3])
        c = f * c + i * g  # c_t = f_t . c_{t-1} + i_t . g_t
        h = o * torch.tanh(c)  # h_t = o_t . tanh(c_t)
        hs.append(h)
    return torch.stack(hs)  # T x N x L x h


class StateToState(nn.Module):
    """K^ss: a convolution of width k over the previous step's h features (unmasked: every state it reads
    belongs to an earlier row or diagonal, so to pixels that are wholly in the past). One k*h x h matrix
    per gate; forget-gate bias 1, so the cell starts out remembering."""

    def __init__(self, h, k):
        super().__init__()
        self.w = nn.Parameter(torch.empty(4, 1, k * h, h).uniform_(-(k * h) ** -0.5, (k * h) ** -0.5))
        self.b = nn.Parameter(torch.zeros(4, 1, 1, h).index_fill_(0, torch.tensor([1]), 1.0))


def scan_layout(gates, colors, steps_axis):
    """Masked convs give 4h channels colour-major ([R: o f i g][G: o f i g][B: ...]), so each gate channel
    has the colour of the state channel it feeds. B x 4h x H x W -> steps x 4 x B x positions x h, the
    steps being rows (steps_axis=2) or columns (3), and h colour-major like the state itself."""
    b, c4, H, W = gates.shape
    g = gates.view(b, colors, 4, c4 // (4 * colors), H, W)
    g = g.permute(4, 2, 0, 5, 1, 3) if steps_axis == 2 else g.permute(5, 2, 0, 4, 1, 3)
    return g.reshape(g.shape[0], 4, b, g.shape[3], c4 // 4)


class RowLSTM(nn.Module):
    """Section 3.1: rows from the top, one LSTM update per row for all its pixels at once. K^is is a k x 1
    mask-B convolution along the row (the pixel to the left and the pixel itself, computed for the whole
    map); K^ss a k x 1 convolution over the row above's states, so h at (r, c) sees a triangle above it."""

    def __init__(self, ch_in, h, colors, k=3):
        super().__init__()
        self.colors, self.k = colors, k
        self.input_to_state = MaskedConv2d(ch_in, 4 * h, (1, k), "B", colors)
        self.state_to_state = StateToState(h, k)

    def forward(self, x):  # B x ch_in x H x W -> B x h x H x W
        gates = scan_layout(self.input_to_state(x), self.colors, 2)  # rows x 4 x B x W x h
        ss = self.state_to_state
        return lstm_scan(gates, ss.w, ss.b, self.k // 2, self.k // 2).permute(1, 3, 0, 2)


def skew(x):
    """B x C x H x W -> B x C x H x (W+H-1), row r shifted right by r, so every diagonal of the image is a
    column. Done by padding each row to W+H and re-reading the flat buffer in rows one shorter."""
    b, c, H, W = x.shape
    flat = F.pad(x, (0, H)).flatten(2)  # B x C x H*(W+H)
    return flat[:, :, :H * (W + H - 1)].view(b, c, H, W + H - 1)


def unskew(x, W):
    """The inverse of skew: B x C x H x (W+H-1) -> B x C x H x W."""
    b, c, H, L = x.shape
    flat = F.pad(x.flatten(2), (0, H))  # H*L + H = H*(L+1): re-read in rows one longer
    return flat.view(b, c, H, L + 1)[:, :, :, :W]


class DiagonalLSTM(nn.Module):
    """One direction of section 3.2: on the skewed map, K^is is a 1x1 mask-B convolution and K^ss a 2x1
    convolution over the previous column (rows r-1 and r), i.e. over the pixels above and to the left of
    (r, c) in the image; one LSTM update per column (diagonal). h at (r, c) sees every (r' <= r, c' <= c)."""

    def __init__(self, ch_in, h, colors):
        super().__init__()
        self.colors = colors
        self.input_to_state = MaskedConv2d(ch_in, 4 * h, 1, "B", colors)
        self.state_to_state = StateToState(h, 2)

    def forward(self, x):
        # a 1x1 convolution acts per position, so convolving then skewing equals convolving the skewed map
        gates = scan_layout(skew(self.input_to_state(x)), self.colors, 3)  # columns x 4 x B x H x h
        hs = lstm_scan(gates, self.state_to_state.w, self.state_to_state.b, 1, 0)
        return unskew(hs.permute(1, 3, 2, 0), x.shape[3])


class DiagonalBiLSTM(nn.Module):
    """Both directions: the second runs on the left-right mirrored map (so it sees up and to the right),
    and its output is shifted down one row before the two are added; without the shift it would see the
    pixels to the right in the same row, which are still in the future."""

    def __init__(self, ch_in, h, colors):
        super().__init__()
        self.forward_dir, self.backward_dir = DiagonalLSTM(ch_in, h, colors), DiagonalLSTM(ch_in, h, colors)

    def forward(self, x):
        right_to_left = self.backward_dir(x.flip(3)).flip(3)
        return self.forward_dir(x) + F.pad(right_to_left, (0, 0, 1, 0))[:, :, :-1]  # shift down by one row


class ResidualBlock(nn.Module):
    """Figure 5: 2h features in, an LSTM layer to h, a 1x1 mask-B convolution back up to 2h, plus the input."""

    def __init__(self, arch, h, colors):
        super().__init__()
        self.lstm = (RowLSTM if arch == "row" else DiagonalBiLSTM)(2 * h, h, colors)
        self.up = MaskedConv2d(h, 2 * h, 1, "B", colors)

    def forward(self, x):
        return x + self.up(self.lstm(x))


class PixelRNN(nn.Module):
    """7x7 mask-A convolution, residual LSTM layers, ReLU + 1x1 mask-B convolutions to the per-pixel logits
    (B x C x levels x H x W: 1 Bernoulli logit for binarized data, 256 softmax logits for 8-bit)."""

    def __init__(self, arch, colors, binary, hidden, layers, head):
        super().__init__()
        self.colors, self.binary = colors, binary
        self.input = MaskedConv2d(colors, 2 * hidden, 7, "A", colors)
        self.blocks = nn.ModuleList(ResidualBlock(arch, hidden, colors) for _ in range(layers))
        self.output = nn.Sequential(nn.ReLU(), MaskedConv2d(2 * hidden, head, 1, "B", colors), nn.ReLU(),
                                    MaskedConv2d(head, colors * common.pixel_levels(binary), 1, "B", colors))

    def forward(self, x):
        # Pad 3 zero columns on the right (the 7x7 kernel's half-width). A mask-A feature never holds its own
        # pixel, so the last pixel of a row would otherwise live only in features of the next row, 1-3 columns
        # from its right end: pixel (r, c) with c < W-4 could never see (r-1, W-1), even with a Diagonal BiLSTM.
        # The padded columns come after the row and before the next one, so they carry it to every later pixel.
        W = x.shape[3]
        h = self.input(F.pad(x, (0, 3)))
        for block in self.blocks:
            h = block(h)
        return common.pixel_logits(self.output(h[..., :W]).contiguous(), self.colors, self.binary)


def build_model(cfg, colors, binary):
    for name in ("hidden", "head"):
        if getattr(cfg, name) % colors or getattr(cfg, name) < 1:
            raise common.UsageError(f"--{name} {getattr(cfg, name)} must be a positive multiple of {colors} (the R, G, B "
                                    f"feature groups); try --{name} {max(colors, getattr(cfg, name) // colors * colors)}")
    return PixelRNN(cfg.arch, colors, binary, cfg.hidden, cfg.layers, cfg.head)


# ----------------------------------------------------------------------------- data, likelihood, sampling

def is_binary(cfg, x):
    """Binarized pixels for MNIST-like 1-channel data (the papers' setting); 256-way 8-bit pixels otherwise."""
    return cfg.dataset in ("mnist", "fashion-mnist") and x.shape[1] == 1


def net_input(v, binary, dtype=torch.float32):
    """Pixel values (0/1, or levels 0..255) -> [-1, 1], so that zero padding means "no pixel", not black."""
    return v.to(dtype) * 2 - 1 if binary else v.to(dtype) / 127.5 - 1


def nll(model, v, binary):
    """-log p(x) in nats per image (a B-vector): one forward pass, the chain rule summed over all sub-pixels."""
    logits = model(net_input(v, binary, model.input.weight.dtype))
    return common.pixel_nll(logits if logits.dtype == torch.float64 else logits.float(), v, binary)  # fp32 under bf16


@torch.no_grad()
def sample(model, v, binary, start_row=0, generator=None):
    """Fill rows start_row.. of v (B x C x H x W pixel values) one sub-pixel at a time, in raster order. The
    network is causal, so the logits of row r depend only on rows <= r: it runs on v[:, :, :r+1]."""
    v = v.clone()
    for r in range(start_row, v.shape[2]):
        for c in range(v.shape[3]):
            for ch in range(v.shape[1]):  # R, then G given R, then B given R and G
                logits = model(net_input(v[:, :, :r + 1], binary, model.input.weight.dtype))[:, ch:ch + 1, :, r, c]
                v[:, ch:ch + 1, r, c] = common.sample_pixel(logits, binary, generator)
    return v


def to_unit(v, binary):
    return v.float() if binary else v.float() / 255


@torch.no_grad()
def test_nll(model, x_test, binary, batch_size):
    """Exact NLL over the given test images: binarized data uses the one fixed seeded binarization."""
    v_all = common.fixed_binarization(x_test, seed=0) if binary else x_test
    total = sum(nll(model, v_all[i:i + batch_size], binary).sum().item() for i in range(0, len(v_all), batch_size))
    nats = total / len(v_all)
    return nats, common.nats_to_bits_per_dim(nats, x_test[0].numel())


def receptive_field(model, shape, r, c):
    """|d logits(r, c) / d input|, summed over channels: nonzero exactly where the output pixel looks."""
    x = torch.rand(1, *shape, dtype=torch.float64, requires_grad=True)
    model.double()(x)[:, :, :, r, c].sum().backward()
    return x.grad.abs().sum(1)[0]


# ----------------------------------------------------------------------------- training and the other modes

def setup(cfg, split):
    device = common.get_device(cfg.device)
    x, _ = common.load_dataset(cfg.dataset, cfg.data_dir, split, device)
    binary = is_binary(cfg, x)
    return device, x, binary, build_model(cfg, x.shape[1], binary).to(device)


def save_samples(model, shape, binary, n, path, seed):
    g = torch.Generator(model.input.weight.device).manual_seed(seed)  # its own generator: training's RNG untouched
    v = sample(model.eval(), torch.zeros(n, *shape, device=model.input.weight.device), binary, generator=g)
    model.train()
    common.save_grid(to_unit(v, binary), path)
    return v


def learning_rate(cfg, step, minutes):
    """Cosine decay from --lr to 0 over the run, measured in steps, or in minutes when --max-minutes ends the
    run first (then it depends on the machine's speed, so such a run is not exactly reproducible)."""
    progress = step / cfg.steps
    if cfg.max_minutes:
        progress = max(progress, minutes / cfg.max_minutes)
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def train(cfg):
    common.seed_everything(cfg.seed)
    out = common.start_run(cfg, "pixelrnn")
    device, x_train, binary, model = setup(cfg, "train")
    x_test, _ = common.load_dataset(cfg.dataset, cfg.data_dir, "test", device)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    gen = common.data_generator(device, cfg.seed)
    step = common.load_checkpoint(out / "ckpt.pt", "pixelrnn", cfg, model=model, opt=opt, gen=gen) if cfg.resume else 0
    dims = x_train[0].numel()
    print(f"pixelrnn ({cfg.arch}): {sum(p.numel() for p in model.parameters()) / 1e6:.3f}M parameters, "
          f"{len(x_train)} training images {tuple(x_train.shape[1:])}, {'binarized' if binary else '8-bit'}, {device}")
    forward_model = common.maybe_compile(model, cfg)
    log = common.Logger(out, cfg.steps, step)
    save = lambda: common.save_checkpoint(out / "ckpt.pt", "pixelrnn", cfg, step, model=model, opt=opt, gen=gen)
    start = time.time()
    try:
        while step < cfg.steps:
            minutes = (time.time() - start) / 60
            if cfg.max_minutes and minutes > cfg.max_minutes:  # a wall-clock budget: end as if --steps were reached now
                cfg.steps = step + 1
            for group in opt.param_groups:
                group["lr"] = learning_rate(cfg, step, minutes)
            batch = common.random_batch(x_train, cfg.batch_size, gen)
            v = common.binarize(batch, gen) if binary else batch  # a fresh stochastic binarization every step
            with common.autocast(device, cfg.precision):
                nats = nll(forward_model, v, binary).mean()
            loss = nats / dims  # per sub-pixel: the same scale for any image size
            common.check_finite(loss, step)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            step += 1
            log.count(cfg.batch_size)
            if step % cfg.log_every == 0 or step == cfg.steps:
                log.log(step, nll_nats=nats.item(), bits_per_dim=common.nats_to_bits_per_dim(nats.item(), dims),
                        grad_norm=grad_norm.item())
            if cfg.sample_every and (step % cfg.sample_every == 0 or step == cfg.steps):  # 0: no grids
                save_samples(model, x_train.shape[1:], binary, min(cfg.num_samples, 64), out / f"samples_{step}.png", cfg.seed)
            if step % cfg.ckpt_every == 0 or step == cfg.steps:
                save()
    except KeyboardInterrupt:
        save()
        print(f"interrupted: checkpoint saved at step {step}")
        raise SystemExit(130)
    evaluate(cfg, model.eval(), x_test, binary, out)


def load_for_inference(cfg):
    device, x_test, binary, model = setup(cfg, "test")
    out = common.out_dir(cfg, "pixelrnn")
    common.load_checkpoint(out / "ckpt.pt", "pixelrnn", cfg, model=model)
    common.seed_everything(cfg.seed)  # after loading, which restores the training run's RNG state
    return x_test, binary, model.eval(), out


def evaluate(cfg, model, x_test, binary, out):
    x_test = x_test[:cfg.eval_n] if cfg.eval_n else x_test
    start = time.time()
    nats, bpd = test_nll(model, x_test, binary, 4 * cfg.batch_size)
    print(f"test NLL on {len(x_test)} images of {cfg.dataset}: {nats:.2f} nats/image, {bpd:.4f} bits/dim "
          f"({time.time() - start:.1f}s)")
    with open(out / "log.jsonl", "a") as f:
        f.write(f'{{"test_images": {len(x_test)}, "test_nll_nats": {nats:.4f}, "test_bits_per_dim": {bpd:.5f}}}\n')
    return nats, bpd


def sample_from_checkpoint(cfg):
    x_test, binary, model, out = load_for_inference(cfg)
    start = time.time()
    g = torch.Generator(x_test.device).manual_seed(cfg.seed)
    v = sample(model, torch.zeros(cfg.num_samples, *x_test.shape[1:], device=x_test.device), binary, generator=g)
    samples = to_unit(v, binary).cpu()
    common.save_grid(samples[:256], out / "samples.png")
    torch.save(samples, out / "samples.pt")
    print(f"{len(samples)} samples in {time.time() - start:.1f}s -> {out}/samples.png, samples.pt")


def complete_from_checkpoint(cfg, n=8, draws=3):
    """Rows of the grid: originals, the top halves the model is given, then `draws` completions each."""
    x_test, binary, model, out = load_for_inference(cfg)
    v = common.fixed_binarization(x_test[:n], seed=0) if binary else x_test[:n].float()
    H = v.shape[2]
    occluded = v.clone()
    occluded[:, :, H // 2:] = 0.5 if binary else 127.5  # grey where the model must fill in
    g = torch.Generator(v.device).manual_seed(cfg.seed)
    filled = sample(model, v.repeat(draws, 1, 1, 1), binary, start_row=H // 2, generator=g)
    grid = to_unit(torch.cat([v, occluded, filled]), binary).cpu()
    common.save_grid(grid, out / "completion.png", nrow=n)
    torch.save(grid, out / "completion.pt")
    print(f"completed the bottom half of {n} test images ({draws} draws each) -> {out}/completion.png")


def receptive_field_picture(cfg, size=(1, 28, 28)):
    """Untrained Row LSTM and Diagonal BiLSTM networks of this config; white where the gradient of the red
    output pixel with respect to the input is nonzero. The structure, not the weights, sets the field."""
    out = common.out_dir(cfg, "pixelrnn")
    out.mkdir(parents=True, exist_ok=True)
    r, c = size[1] * 2 // 3, size[2] // 2
    panels = []
    for arch in ("row", "diag"):
        torch.manual_seed(cfg.seed)
        model = build_model(dataclasses.replace(cfg, arch=arch), size[0], True)
        seen = (receptive_field(model, size, r, c) > 0).float()
        rgb = seen.expand(3, *seen.shape).clone()
        rgb[:, r, c] = torch.tensor([1.0, 0, 0], dtype=rgb.dtype)
        panels.append(rgb)
    zoomed = F.interpolate(torch.stack(panels), scale_factor=6, mode="nearest")  # pixels big enough to count
    common.save_grid(zoomed, out / "receptive_field.png", nrow=2)
    print(f"receptive fields of output pixel {(r, c)} (left: Row LSTM, right: Diagonal BiLSTM; {cfg.layers} layers) "
          f"-> {out}/receptive_field.png")


@common.entry
def main(argv=None):
    cfg = common.parse_config(Config, argv)
    if cfg.sample:
        sample_from_checkpoint(cfg)
    elif cfg.eval:
        x_test, binary, model, out = load_for_inference(cfg)
        evaluate(cfg, model, x_test, binary, out)
    elif cfg.complete:
        complete_from_checkpoint(cfg)
    elif cfg.receptive_field:
        receptive_field_picture(cfg)
    else:
        train(cfg)


if __name__ == "__main__":
    main()
