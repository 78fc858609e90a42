"""MNIST and CelebA with fixed, learned-scalar and learned per-pixel sigma (Sec. 4.3, App. B): Table 2, Figs. 5, 11-18.

    python train_images.py --dataset mnist --sigma learned             # LV-VAE, per-pixel sigma (Eq. 11)
    python train_images.py --dataset mnist --sigma fixed --epochs 10   # F-VAE, sigma = 1/sqrt(2): the MSE loss
    python train_images.py --dataset celeba --sigma learned --data-dir data/celeba
    python train_images.py --resume runs/<run>/ckpt.pt --epochs 20     # continue a run exactly where it stopped
    torchrun --nproc_per_node 4 train_images.py --dataset celeba --data-dir data/celeba   # 4 GPUs, DDP
    tensorboard --logdir runs

Data are pixel / 255 in [0, 1]. The continuous Gaussian density of such data is unbounded as sigma -> 0 (a per-pixel
sigma heads there on MNIST's constant background), so learned log sigma has a soft floor (common.MIN_LOG_SIGMA,
sigma >= 0.0025) and every continuous figure is reported with it; `--likelihood discretized` integrates the Gaussian
over each pixel's bin instead, a bounded likelihood under which sigma has no reason to run away.
Evaluation on the test split, in two conventions: the paper's Table 2 (bits per pixel of the continuous density of
[0, 1] data, log sigma and all constants included; higher is better) and the literature's (bits per dimension of the
8-bit data, lower is better: -log2 P(pixels) under the discretized likelihood, or its bound log2(255) - log2 p(x~)
under uniform dequantization x~ = (pixel + u - 1/2) / 255); each as a one-sample ELBO and an IWAE-k bound.

Under torchrun (RANK, WORLD_SIZE and LOCAL_RANK set) each process trains a DistributedDataParallel replica, NCCL on
GPUs and gloo on the CPU: it takes its slice of every global batch of --batch-size x processes images and its share
of the test images; rank 0 alone logs and writes checkpoints, figures and tables. Fail safe: a NaN or Inf in the loss
or the gradients stops the run before the update with one line, and the last checkpoint stays as it was; SIGINT or
SIGTERM finishes the current step, saves a checkpoint that --resume continues exactly, and exits with 128 + signal.
Fast path (--fast, on by default on CUDA): the uint8 images live on the device and batches are drawn there,
channels_last, bf16 autocast for the networks with the decoder's output layer, the NLL, the KL and every reduction in
fp32, torch.compile (CUDA graphs on one GPU), the fused NLL kernel, fused Adam, and a NaN guard without a host sync
per step (fused Adam skips the bad update on the device; the host reads the record every --log-every steps). The
final evaluation is always fp32 eager. --fast off is the plain fp32 eager path, the reference the fast path is
tested against.
Test-only hooks, inert unless set: VAE_INJECT_NAN_AT_STEP=N poisons step N's batch with NaN (N:gradients poisons its
gradients instead); VAE_SIGNAL_AT_STEP=N makes the process send itself SIGTERM during step N.
"""

import argparse
import contextlib
import datetime
import json
import math
import os
import random
import signal
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from kernels.gaussian_nll import TRITON_AVAILABLE
from kernels.gaussian_nll import gaussian_nll as fused_gaussian_nll
from common import (
    ConvVAE,
    DataError,
    FixedSigma,
    LearnedPerDimSigma,
    LearnedScalarSigma,
    OptimalSigma,
    bits_per_dim,
    dequantized_bits_per_dim,
    discretized_gaussian_nll,
    elbo_terms,
    gaussian_nll,
    hardware,
    iwae_bound,
    load_celeba,
    load_checkpoint,
    load_mnist,
    log_sigma_stats,
    make_writer,
    pick_device,
    run_name,
    save_checkpoint,
)

ARCHITECTURES = {  # App. B: MNIST 3 convs + 4 residual blocks, latent 256; CelebA 4 convs + 5 blocks, latent 2048
    "mnist": dict(channels=1, size=28, widths=(32, 64, 64), strides=(2, 2, 1), blocks=4, latent_dim=256),
    "celeba": dict(channels=3, size=64, widths=(64, 128, 256, 256), strides=(2, 2, 2, 2), blocks=5, latent_dim=2048),
}
# The paper's Table 2 (ELBO, bits per pixel, "accounting for the log sigma term"), quoted beside ours, never among them.
PAPER_TABLE2 = {("mnist", "fixed"): "0.06", ("mnist", "learned"): "4.89",
                ("celeba", "fixed"): "5.52", ("celeba", "learned"): "57.51"}
SIGMA_NAMES = {"fixed": "F-VAE", "learned-scalar": "LS-VAE", "learned": "LV-VAE", "optimal": "sigma-VAE"}
CHECKPOINT_KEYS = ["model", "obs", "optimizer", "epoch", "step", "args", "data_rng", "torch_rng"]  # what --resume needs

parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawTextHelpFormatter)
parser.add_argument("--dataset", choices=ARCHITECTURES, default="mnist", help="default mnist")
parser.add_argument("--data-dir", help="folder with the dataset's own files (default data/<dataset>): MNIST's four "
                    "IDX files (.gz or raw); CelebA's img_align_celeba/ and list_eval_partition.txt")
parser.add_argument("--download", action="store_true", help="MNIST only: fetch missing IDX files (checksummed)")
parser.add_argument("--celeba-images", default="img_align_celeba",
                    help="CelebA image folder inside --data-dir (default img_align_celeba); a folder of smaller "
                    "images of the same aspect ratio works too")
parser.add_argument("--sigma", choices=SIGMA_NAMES, default="learned",
                    help="fixed: F-VAE; learned-scalar: LS-VAE (Eq. 10); learned: per-pixel LV-VAE (Eq. 11, default); "
                    "optimal: sigma-VAE, sigma^2 = batch MSE")
parser.add_argument("--sigma-value", type=float, help="with --sigma fixed: sigma on [0, 1] data (default 1/sqrt(2))")
parser.add_argument("--likelihood", choices=["continuous", "discretized"], default="continuous",
                    help="continuous Gaussian density (default) or Gaussian integrated over each 1/255 pixel bin")
parser.add_argument("--nll-kernel", choices=["auto", "triton", "torch"], default="auto",
                    help="continuous likelihood: the fused Triton kernel (kernels/gaussian_nll.py) or eager PyTorch; "
                    "auto (default): Triton on CUDA when it imports, PyTorch otherwise")
parser.add_argument("--fast", choices=["auto", "on", "off"], default="auto",
                    help="the fast path (device-resident data, channels_last, bf16 autocast with the loss in fp32, "
                    "torch.compile, fused Adam, no sync per step); auto (default): on for CUDA, off on the CPU")
parser.add_argument("--compile", choices=["auto", "none", "default", "reduce-overhead"], default="auto",
                    help="with the fast path: torch.compile mode of the training step; auto (default): reduce-overhead "
                    "(CUDA graphs) on one GPU, default under torchrun and on the CPU; none: eager")
parser.add_argument("--eval-every", type=int, default=1, help="epochs between test ELBO, figures and checkpoint "
                    "(default 1; the last epoch always has them; a signal saves whenever it comes)")
parser.add_argument("--epochs", type=int, default=10, help="passes over the training images (default 10)")
parser.add_argument("--batch-size", type=int, default=128, help="images per step and process (default 128); under "
                    "torchrun the global batch is this x processes")
parser.add_argument("--lr", type=float, default=3e-4, help="Adam learning rate (default 3e-4)")
parser.add_argument("--seed", type=int, default=0, help="seeds weights, batches and noise (default 0)")
parser.add_argument("--max-train-images", type=int, help="use only the first N training images (short runs)")
parser.add_argument("--eval-images", type=int, default=10000, help="test images for the ELBO each epoch and at the "
                    "end (default 10000, all of MNIST's)")
parser.add_argument("--iwae-k", type=int, default=100, help="importance samples of the final IWAE bound (default 100)")
parser.add_argument("--iwae-images", type=int, default=1000, help="test images for the final IWAE bound (default 1000)")
parser.add_argument("--log-every", type=int, default=50, help="steps between logged training lines (default 50)")
parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="default auto: cuda if present")
parser.add_argument("--logdir", default="runs", help="TensorBoard and checkpoint folder (default runs)")
parser.add_argument("--out", default="results/images", help="table2.md, runs.jsonl and figures (default results/images)")
parser.add_argument("--resume", help="a run's ckpt.pt: continue it; only --epochs, --device, --out, --fast, "
                    "--compile and --eval-every may change")


def parse_args(argv=None):
    args = parser.parse_args(argv)
    if args.resume:
        defaults = vars(parser.parse_args([]))
        changed = [key for key, value in vars(args).items() if value != defaults[key]]
        extra = sorted(set(changed) - {"resume", "epochs", "device", "out", "fast", "compile", "eval_every"})
        if extra:
            parser.error(f"--resume continues the run with its own settings; drop {', '.join('--' + e.replace('_', '-') for e in extra)}")
        return args
    if args.sigma_value is not None and args.sigma != "fixed":
        parser.error("--sigma-value goes with --sigma fixed only")
    if args.sigma_value is not None and args.sigma_value <= 0:
        parser.error("--sigma-value must be > 0")
    if args.nll_kernel == "triton" and args.likelihood == "discretized":
        parser.error("--nll-kernel triton fuses the continuous likelihood only; drop it or use --likelihood continuous")
    if args.nll_kernel == "triton" and not TRITON_AVAILABLE:
        parser.error("--nll-kernel triton but triton is not installed (Linux: pip install triton); use auto or torch")
    if args.download and args.dataset != "mnist":
        parser.error("--download fetches MNIST only; download CelebA yourself into --data-dir")
    if args.compile != "auto" and args.fast == "off":
        parser.error(f"--compile {args.compile} goes with the fast path; drop it or use --fast on")
    if args.fast == "on" and args.device == "cpu" and args.compile == "reduce-overhead":
        parser.error("--compile reduce-overhead records CUDA graphs; on the CPU use --compile default or none")
    for key in ["epochs", "batch_size", "eval_images", "iwae_k", "iwae_images", "log_every", "eval_every"]:
        if getattr(args, key) < 1:
            parser.error(f"--{key.replace('_', '-')} must be >= 1")
    if args.max_train_images is not None and args.max_train_images < args.batch_size:
        parser.error("--max-train-images must be at least --batch-size")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but no CUDA device is visible; use --device cpu or auto")
    args.data_dir = args.data_dir or f"data/{args.dataset}"
    args.sigma_value = args.sigma_value or (1 / math.sqrt(2) if args.sigma == "fixed" else None)
    return args


# --- helpers ---


def init_distributed(args):
    """(rank, world_size, local_rank, device). Under torchrun: join the process group, NCCL on GPUs, gloo on the CPU."""
    device = pick_device(args.device)
    if not all(key in os.environ for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK")):
        return 0, 1, 0, device
    rank, world_size, local_rank = (int(os.environ[key]) for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise SystemExit(f"error: LOCAL_RANK {local_rank} but {torch.cuda.device_count()} CUDA devices are "
                             "visible; use one process per GPU (--nproc_per_node) or --device cpu")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    # An hour, not the default 10 (NCCL) or 30 (gloo) minutes: the first CelebA run decodes every JPEG on local rank 0
    # while the other ranks wait at a barrier.
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=datetime.timedelta(hours=1))
    return rank, world_size, local_rank, device


class ELBO(torch.nn.Module):
    """The VAE and its observation model as one module whose forward is `elbo_terms`: what DDP wraps and syncs and
    torch.compile compiles. x: uint8 pixels (made pixel / 255 here, where a compiled step fuses it) or floats in
    [0, 1]. bf16: the networks under bf16 autocast; their outputs, the NLL and the KL stay fp32 (ConvVAE)."""

    def __init__(self, model, obs, nll, bf16=False):
        super().__init__()
        self.model, self.obs, self.nll, self.bf16 = model, obs, nll, bf16

    def forward(self, x, eps):
        if x.dtype == torch.uint8:
            x = to_unit(x, x.device)
        with torch.autocast(x.device.type, torch.bfloat16, enabled=self.bf16):
            return elbo_terms(self.model, self.obs, x, eps, event_dims=3, nll=self.nll)


def fast_path(args, device):
    return args.fast == "on" or (args.fast == "auto" and device.type == "cuda")


def compile_mode(args, device, world_size=1):
    """torch.compile's mode for the training step, or None: eager."""
    if not fast_path(args, device) or args.compile == "none":
        return None
    if args.compile == "auto":  # CUDA graphs pay where launches dominate: one GPU, small batches
        return "reduce-overhead" if device.type == "cuda" and world_size == 1 else "default"
    return args.compile


def build_training(args, device, world_size=1):
    """model, obs, the training ELBO module (DDP-wrapped under torchrun, compiled on the fast path) and Adam
    (fused on the fast path)."""
    fast = fast_path(args, device)
    model, obs = make_model(args)
    model, obs = model.to(device), obs.to(device)
    if fast:
        model = model.to(memory_format=torch.channels_last)
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = True
    parameters = list(model.parameters()) + list(obs.parameters())
    optimizer = torch.optim.Adam(parameters, lr=args.lr, fused=True if fast else None)
    train_elbo = ELBO(model, obs, likelihood(args, device), bf16=fast)
    if world_size > 1:  # averages the gradients over the ranks in backward(), i.e. over the global batch
        train_elbo = DistributedDataParallel(train_elbo, device_ids=[device] if device.type == "cuda" else None)
    mode = compile_mode(args, device, world_size)
    if mode is not None:
        train_elbo = torch.compile(train_elbo, mode=mode)
    return model, obs, train_elbo, optimizer


def training_batch(pixels, index, fast):
    """uint8 pixels[index] for the training step; on the fast path pixels and index are on the device already."""
    x = pixels[index]
    return x.contiguous(memory_format=torch.channels_last) if fast else x


def forward_backward(train_elbo, optimizer, x, eps, mode):
    """One step's loss (nats per image, averaged over the batch) and gradients; returns loss, recon_nll, kl, log_sigma."""
    if mode == "reduce-overhead":
        torch.compiler.cudagraph_mark_step_begin()  # the last step's graph outputs may be overwritten from here on
    recon_nll, kl, elbo, (_, log_sigma) = train_elbo(x, eps)
    loss = -elbo.mean()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    return loss, recon_nll, kl, log_sigma


class AsyncGuard:
    """The fast path's NaN guard, with no host sync per step. The first step whose loss or gradient norm is not finite
    is recorded on the device, and fused Adam skips its update and every later one (its found_inf argument), so the
    weights stay those from before it; `first_bad()` (a sync) reads the record, every --log-every steps and before any
    checkpoint is saved."""

    def __init__(self, optimizer, step, device):
        self.optimizer = optimizer
        self.step = torch.full((), step, dtype=torch.int64, device=device)
        self.record = torch.zeros(2, dtype=torch.int64, device=device)  # (first bad step, 1 loss / 2 gradients), 0: none
        optimizer.found_inf = torch.zeros((), device=device)

    def update(self, loss, grad_norm):
        self.step.add_(1)
        loss_finite = loss.detach().isfinite()
        new = ~(loss_finite & grad_norm.isfinite()) & (self.record[0] == 0)
        self.record.copy_(torch.where(new, torch.stack([self.step, torch.where(loss_finite, 2, 1)]), self.record))
        self.optimizer.found_inf.copy_(self.record[0] > 0)  # read by fused Adam on the device

    def first_bad(self):
        """(step, "loss" or "gradients") of the first non-finite step, or None."""
        step, what = self.record.tolist()
        return (step, "loss" if what == 1 else "gradients") if step else None


def max_over_ranks(values):
    """A 1-D tensor -> its elementwise maximum over all ranks under torchrun (a collective), as a list."""
    if dist.is_initialized():
        dist.all_reduce(values, op=dist.ReduceOp.MAX)
    return values.tolist()


def stop_together(error, device):
    """Stop every rank if any failed (error: its one line, or None): a rank that exits alone leaves the others hanging
    in their next collective. The ranks that failed print their line, the others exit quietly with status 1."""
    [failed] = max_over_ranks(torch.tensor([float(error is not None)], device=device))
    if failed:
        raise SystemExit(1 if error is None else error)


def likely_fix(args):
    """What most often makes this setting's loss or gradients non-finite, and the flag that changes it."""
    lower_lr = f"lower --lr (now {args.lr:g})"
    if args.sigma == "fixed":
        return f"{lower_lr}, or raise --sigma-value (now {args.sigma_value:.3g}): gradients grow as 1/sigma^2"
    if args.likelihood == "continuous":
        return (f"{lower_lr}, or use --likelihood discretized: the continuous density grows without bound as sigma "
                "falls towards its floor (sigma >= 0.0025)")
    return lower_lr


def load_split(args, split):
    if args.dataset == "mnist":
        return load_mnist(args.data_dir, split, download=args.download)
    return load_celeba(args.data_dir, {"train": "train", "test": "test"}[split], ARCHITECTURES["celeba"]["size"],
                       images_dir=args.celeba_images)


def make_model(args):
    arch = ARCHITECTURES[args.dataset]
    shape = (1, 1, 1)  # one sigma for all pixels
    obs = {"fixed": lambda: FixedSigma(args.sigma_value), "learned-scalar": lambda: LearnedScalarSigma(shape),
           "learned": lambda: LearnedPerDimSigma(dim=1), "optimal": lambda: OptimalSigma(shape)}[args.sigma]()
    model = ConvVAE(arch["channels"], arch["size"], arch["widths"], arch["strides"], arch["blocks"],
                    arch["latent_dim"], obs.decoder_outputs_per_dim)
    return model, obs


def likelihood(args, device=None):
    """The per-image NLL: discretized, or continuous through the fused Triton kernel (CUDA) or eager PyTorch."""
    if args.likelihood == "discretized":
        return discretized_gaussian_nll
    if args.nll_kernel == "torch" or device is None or device.type != "cuda" or not TRITON_AVAILABLE:
        return gaussian_nll
    # kernels/gaussian_nll.py sums every non-batch dimension: event_dims is all of them for images
    return lambda x, mean, log_sigma, event_dims: fused_gaussian_nll(x, mean, log_sigma.to(mean.dtype), backend="triton")


def to_unit(pixels, device):
    return pixels.to(device, non_blocking=True).float() / 255  # (B, C, H, W) in [0, 1]


@torch.no_grad()
def evaluate(model, obs, test_pixels, args, device, k=1, images=None, generator=None, bf16=False):
    """Test-split bounds in both conventions. k = 1: the one-sample ELBO; k > 1: the IWAE-k bound. bf16: the networks
    under bf16 autocast (the fast path's per-epoch figures; ConvVAE keeps the output layer and the bounds in fp32).

    Under torchrun each rank evaluates its share of the images and the sums are all-reduced: every rank returns the
    same figures, those of all the images.
    """
    model.eval(), obs.eval()
    nll, pixels = likelihood(args, device), test_pixels[: images or len(test_pixels)]
    dims, n = pixels[0].numel(), len(pixels)
    rank, world_size = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    sums = torch.zeros(2, dtype=torch.float64, device=device)  # table2, eight_bit; read once at the end (one sync)
    batch = max(1, args.batch_size * 4 // k)
    bound = lambda data: iwae_bound(model, obs, data, k, generator, 3, nll) if k > 1 else \
        elbo_terms(model, obs, data, event_dims=3, nll=nll)[2]
    with torch.autocast(device.type, torch.bfloat16, enabled=bf16):
        for part in pixels[rank * n // world_size : (rank + 1) * n // world_size].split(batch):
            x = to_unit(part, device)
            if args.likelihood == "continuous":
                sums[0] += bound(x).sum()  # log p(x) bound, x = pixel / 255
                u = torch.rand(x.shape, generator=generator, device=device) if generator is not None else \
                    torch.rand_like(x)
                sums[1] += bound(x + (u - 0.5) / 255).sum()  # dequantized
            else:
                sums[1] += bound(x).sum()  # log P(pixels)
    model.train(), obs.train()
    if world_size > 1:
        dist.all_reduce(sums)
    sums = dict(zip(["table2", "eight_bit"], sums.tolist()))
    if args.likelihood == "continuous":
        return {"nats_per_image": sums["table2"] / n,
                "table2_bits_per_pixel": bits_per_dim(sums["table2"] / n, dims),
                "bits_per_dim_8bit": dequantized_bits_per_dim(sums["eight_bit"] / n, dims, bin_width=1 / 255)}
    # the discretized likelihood is a probability of 8-bit values, not a density on [0, 1]: no Table-2 figure
    return {"nats_per_image": sums["eight_bit"] / n, "table2_bits_per_pixel": None,
            "bits_per_dim_8bit": -bits_per_dim(sums["eight_bit"] / n, dims)}


def image_grid(images, rows):
    """(N, C, H, W) in [0, 1] -> uint8 (rows*H, cols*W, C) with 1-pixel gaps, for PNG and TensorBoard."""
    images = images.clamp(0, 1).cpu()
    n, c, h, w = images.shape
    cols = math.ceil(n / rows)
    grid = torch.ones(c, rows * (h + 1) - 1, cols * (w + 1) - 1)
    for i, image in enumerate(images):
        r, col = divmod(i, cols)
        grid[:, r * (h + 1) : r * (h + 1) + h, col * (w + 1) : col * (w + 1) + w] = image
    return (grid.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()


def save_png(array, path):
    Image.fromarray(array.squeeze(-1) if array.shape[-1] == 1 else array).save(path)


@torch.no_grad()
def figures(model, obs, test_pixels, args, device, generator):
    """Reconstructions (originals on top, means of p(x|z) below; Figs. 5a-b, 11, 12, 15, 16) and generations (means
    of p(x|z), z ~ p(z), above samples of p(x|z) for the same z; Figs. 5c-d, 13, 14, 17, 18)."""
    model.eval(), obs.eval()
    x = to_unit(test_pixels[:16], device)
    mu, _ = model.encode(x)
    recon_mean, _ = obs(model.decode(mu), x)
    z = torch.randn(16, model.latent_dim, generator=generator, device=device)
    gen_mean, gen_log_sigma = obs(model.decode(z), x)
    gen_sample = gen_mean + gen_log_sigma.exp() * torch.randn(gen_mean.shape, generator=generator, device=device)
    model.train(), obs.train()
    return image_grid(torch.cat([x, recon_mean]), 4), image_grid(torch.cat([gen_mean, gen_sample]), 4)


def paper_value(run):
    """The paper's Table 2 number for this run's setting: F-VAE with the MSE's sigma = 1/sqrt(2), or LV-VAE."""
    mse = run["sigma"] == "fixed" and abs(run["sigma_value"] - 1 / math.sqrt(2)) < 1e-9
    if run["likelihood"] != "continuous" or not (mse or run["sigma"] == "learned"):
        return "not in the paper"
    return PAPER_TABLE2[run["dataset"], run["sigma"]]


def write_table2(out):
    """results/images/table2.md from every finished run recorded in runs.jsonl."""
    with open(os.path.join(out, "runs.jsonl")) as f:
        runs = [json.loads(line) for line in f if line.strip()]
    fmt = lambda v: "n/a" if v is None else f"{v:.3f}"
    lines = [
        "# Table 2: ELBO on the test split, every run made (written by train_images.py from runs.jsonl)",
        "",
        "Table-2 convention: bits per pixel of the continuous density of pixel/255 in [0, 1], log sigma and all "
        "Gaussian constants included, higher is better (the paper's unit). 8-bit convention: bits per dimension of "
        "the 8-bit data, lower is better (the literature's): -log2 P(pixels) under the discretized likelihood, or "
        "its upper bound log2(255) - log2 p(x~) under uniform dequantization for continuous runs. ELBO: one sample "
        "per test image; IWAE-k: importance-weighted bound on the first test images. Learned log sigma has the soft "
        "floor sigma >= 0.0025 (log sigma >= -6): continuous per-pixel figures measure how far sigma fell to it.",
        "",
        "Which convention is the paper's? With every constant included, sigma^2 = 1/2 (the MSE) caps the density at "
        "-0.5 log2(pi) = -0.83 bits/pixel, so the paper's F-VAE MNIST value, +0.06, cannot include them all. Its "
        "Table 1 leaves out the Gaussian constant 0.5 log(2 pi) per dimension (see results/2d); the column 'no 0.5 "
        "log 2pi' adds 0.5 log2(2 pi) = 1.326 bits to our Table-2 figure to show that convention, the closest to the "
        "paper's. It caps sigma^2 = 1/2 at +0.5 bits/pixel.",
        "",
        "| dataset | setting | likelihood | epochs | train images | ELBO, Table-2 bits/pixel | IWAE-k, Table-2 "
        "bits/pixel | ELBO, Table-2 bits/pixel, no 0.5 log 2pi | ELBO, 8-bit bits/dim | IWAE-k, 8-bit bits/dim "
        "| k, images | final sigma | wall time | hardware | the paper's Table 2 value (paper's number) | command |",
        "|" + "---|" * 16,
    ]
    for run in runs:
        final, iwae = run["final"], run["iwae"]
        setting = SIGMA_NAMES[run["sigma"]] + (f" (sigma={run['sigma_value']:.3g})" if run["sigma"] == "fixed" else "")
        table2 = final["table2_bits_per_pixel"]
        without_2pi = None if table2 is None else table2 + 0.5 * math.log2(2 * math.pi)
        lines.append(
            f"| {run['dataset']} | {setting} | {run['likelihood']} "
            f"| {run['epochs']} | {run['train_images']} | {fmt(final['table2_bits_per_pixel'])} "
            f"| {fmt(iwae['table2_bits_per_pixel'])} | {fmt(without_2pi)} | {fmt(final['bits_per_dim_8bit'])} "
            f"| {fmt(iwae['bits_per_dim_8bit'])} | {run['iwae_k']}, {run['iwae_images']} | {run['sigma_summary']} "
            f"| {run['wall_minutes']:.1f} min | {run['hardware']} "
            f"| {paper_value(run)} "
            f"| `{run['command']}` |")
    with open(os.path.join(out, "table2.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


# --- main ---


def main(args):
    rank, world_size, local_rank, device = init_distributed(args)
    launcher = "python" if world_size == 1 else \
        f"torchrun --nnodes {world_size // int(os.environ.get('LOCAL_WORLD_SIZE', world_size))} " \
        f"--nproc_per_node {os.environ.get('LOCAL_WORLD_SIZE', world_size)}"
    command = f"{launcher} {' '.join(sys.argv)}"
    state, error = None, None
    if args.resume:
        try:
            state = load_checkpoint(args.resume)
        except SystemExit as failure:  # its one line
            error = failure.code
        missing = [key for key in CHECKPOINT_KEYS if key not in state] if isinstance(state, dict) else ["model"]
        if error is None and missing:
            error = f"error: {args.resume} is not a train_images.py checkpoint (it has no {missing[0]}); start " \
                "without --resume"
        stop_together(error, device)
        saved = argparse.Namespace(**state["args"])
        for key in ("epochs", "device", "out", "resume", "fast", "compile", "eval_every"):
            setattr(saved, key, getattr(args, key))
        args = saved
    random.seed(args.seed), np.random.seed(args.seed), torch.manual_seed(args.seed)

    # --- data ---
    # Local rank 0 of each machine reads first (it may download MNIST or build CelebA's cache), the others after it.
    for turn in range(2 if world_size > 1 else 1):
        if (local_rank == 0) == (turn == 0):
            try:
                train_pixels, test_pixels = load_split(args, "train"), load_split(args, "test")
            except DataError as failure:
                error = str(failure)
        stop_together(error, device)
    train_pixels = train_pixels[: args.max_train_images]
    args.eval_images = min(args.eval_images, len(test_pixels))
    args.iwae_images = min(args.iwae_images, len(test_pixels))

    # --- model ---
    fast = fast_path(args, device)
    if fast:  # resident on the device as uint8: 47 MB for MNIST, 2 GB for CelebA's 162,770 training faces
        train_pixels, test_pixels = train_pixels.to(device), test_pixels.to(device)
    model, obs, train_elbo, optimizer = build_training(args, device, world_size)
    parameters = list(model.parameters()) + list(obs.parameters())
    data_generator = torch.Generator().manual_seed(args.seed)
    start_epoch, step, position, run_dir, last_checkpoint = 0, 0, 0, None, None
    if state is not None:
        try:
            model.load_state_dict(state["model"]), obs.load_state_dict(state["obs"])
            implementation = [(group["fused"], group["foreach"]) for group in optimizer.param_groups]
            optimizer.load_state_dict(state["optimizer"])
            for group, (fused, foreach) in zip(optimizer.param_groups, implementation):
                group["fused"], group["foreach"] = fused, foreach  # this run's Adam, not the saved run's: the fast
                # and eager paths continue each other's checkpoints. load_state_dict placed Adam's step counts by
                # the saved run's implementation and kept its moments' memory layout; fused Adam needs the step
                # counts on the parameters' device (plain Adam reads them on the CPU) and moments laid out as the
                # parameters are (channels_last on the fast path).
                for parameter in group["params"]:
                    moments = optimizer.state.get(parameter, {})
                    if "step" in moments:
                        moments["step"] = moments["step"].to(parameter.device if fused else "cpu", torch.float32)
                    for key in ("exp_avg", "exp_avg_sq"):
                        if key in moments:
                            moments[key] = torch.empty_like(parameter).copy_(moments[key])
        except (RuntimeError, KeyError, ValueError) as error:
            raise SystemExit(f"error: {args.resume} does not match this model ({str(error).splitlines()[0]}); "
                             "start without --resume")
        start_epoch, step, run_dir = state["epoch"], state["step"], os.path.dirname(os.path.abspath(args.resume))
        position, last_checkpoint = state.get("position", 0), f"{args.resume} (step {step})"
        data_generator.set_state(state["data_rng"])
        torch.set_rng_state(state["torch_rng"])
        if device.type == "cuda" and state.get("cuda_rng") is not None:
            torch.cuda.set_rng_state(state["cuda_rng"])
    # A signal only sets a flag: the loop finishes its step, saves a checkpoint and exits (stop_and_exit).
    # Set before DDP's first collective, so that once rank 0 has said it started, every rank has its handlers.
    signals_received = []
    for name in (signal.SIGINT, signal.SIGTERM):
        signal.signal(name, lambda number, frame: signals_received.append(number))
    nll = likelihood(args, device)
    mode = compile_mode(args, device, world_size)
    guard = AsyncGuard(optimizer, step, device) if fast and world_size == 1 else None
    writer = None
    if rank == 0:
        run_dir = run_dir or os.path.join(args.logdir, run_name("train_images", args.dataset, args.sigma, args.seed))
        os.makedirs(run_dir, exist_ok=True)
        writer = make_writer(run_dir, args)
        nll_path = "discretized (PyTorch)" if args.likelihood == "discretized" else \
            "continuous, fused Triton kernel" if nll is not gaussian_nll else "continuous, PyTorch"
        path = "fp32 eager" if not fast else "fast path (device-resident uint8 data, channels_last, bf16 autocast, " \
            f"torch.compile {mode or 'off'}, fused Adam)"
        processes = "" if world_size == 1 else \
            f", {world_size} processes ({dist.get_backend()}), global batch {args.batch_size * world_size}"
        print(f"train_images: {args.dataset} ({len(train_pixels)} train, {len(test_pixels)} test images), "
              f"{SIGMA_NAMES[args.sigma]}, likelihood {nll_path}, {sum(p.numel() for p in model.parameters()):,} "
              f"parameters, {path}, on {hardware(device)}{processes}; run {run_dir}")
        if state is not None and state.get("world_size", 1) != world_size:
            print(f"train_images: note: {args.resume} was written by {state.get('world_size', 1)} processes, this run "
                  f"has {world_size}: the global batch changes, so the run continues but not as it would have")
    checkpoint_path = os.path.join(run_dir, "ckpt.pt") if rank == 0 else None

    def save(epoch, position, data_rng, test):
        """ckpt.pt (rank 0): resuming from it draws epoch `epoch`'s order from data_rng and skips `position` images."""
        save_checkpoint(checkpoint_path, {
            "model": model.state_dict(), "obs": obs.state_dict(), "optimizer": optimizer.state_dict(),
            "epoch": epoch, "position": position, "step": step, "world_size": world_size,
            "args": {k: v for k, v in vars(args).items() if k != "resume"},
            "data_rng": data_rng, "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state() if device.type == "cuda" else None, "test": test,
            "wall_seconds": seconds_before + time.time() - started,
        })
        return f"{checkpoint_path} (step {step})"

    def check_finite(bad, epoch):
        """Stop with one line if a step's loss or gradients were not finite. bad: (step, "loss" or "gradients") or None."""
        if bad is None:
            return
        if writer is not None:
            writer.close()
        skipped = "the update was skipped" if guard is None else "its update and every later one were skipped"
        raise SystemExit(
            f"error: non-finite {bad[1]} at step {bad[0]} (epoch {epoch + 1}, {SIGMA_NAMES[args.sigma]}, "
            f"{args.likelihood} likelihood); {skipped} and nothing saved, the last good checkpoint is "
            f"{last_checkpoint or 'none: no epoch had finished'}; likely fix: {likely_fix(args)}" if rank == 0 else 1)

    def stop_and_exit(signum, where):
        """After a SIGINT or SIGTERM, once the checkpoint is saved: one line from rank 0, every rank exits together."""
        if writer is not None:
            writer.close()
        if world_size > 1:
            dist.barrier()
        if rank == 0:
            print(f"train_images: {signal.Signals(signum).name} received; stopped {where}, saved {last_checkpoint}; "
                  f"continue with: {launcher} {sys.argv[0]} --resume {checkpoint_path} --epochs {args.epochs} "
                  f"--out {args.out}", file=sys.stderr)
        raise SystemExit(128 + signum)

    nan_step, _, nan_target = os.environ.get("VAE_INJECT_NAN_AT_STEP", "").partition(":")  # test-only hooks
    signal_step = os.environ.get("VAE_SIGNAL_AT_STEP")
    # Each rank evaluates a different share of the test images, drawing different amounts of noise: under torchrun
    # that happens on a fork of the RNG, so that the training noise stays in step across ranks.
    rng_fork = (lambda: torch.random.fork_rng(devices=[device] if device.type == "cuda" else [])) \
        if world_size > 1 else contextlib.nullcontext

    # --- training loop ---
    started, seconds_before = time.time(), state.get("wall_seconds", 0.0) if state else 0.0
    dims, test = train_pixels[0].numel(), state.get("test") if state else None
    for epoch in range(start_epoch, args.epochs):
        epoch_data_rng = data_generator.get_state()
        order = torch.randperm(len(train_pixels), generator=data_generator)
        # Global batches of batch_size x world_size images, one order on every rank (same seed); rank r takes slice r
        # of each, so the shards are disjoint and equal. The last len % world_size images sit this epoch out.
        order = order[: len(order) - len(order) % world_size].to(train_pixels.device)
        global_batch_size = args.batch_size * world_size
        # After a stop in an epoch's last step nothing remains, and split() would still give one empty batch.
        remaining = order[position:].split(global_batch_size) if position < len(order) else []
        progress = tqdm(remaining, desc=f"epoch {epoch + 1}/{args.epochs}", unit="batch",
                        initial=math.ceil(position / global_batch_size),
                        total=math.ceil(len(order) / global_batch_size), mininterval=2, file=sys.stdout,
                        disable=rank != 0)
        epoch_started, batches = time.time(), 0
        for global_batch in progress:
            x = training_batch(train_pixels, global_batch.view(world_size, -1)[rank], fast).to(device)  # uint8
            # The global batch's reparametrisation noise, drawn on every rank, each taking its rows: the ranks' RNGs
            # stay in step (one RNG state in the checkpoint resumes them all); one process draws what randn_like did.
            eps = torch.randn(len(global_batch), model.latent_dim, device=device).view(world_size, len(x), -1)[rank]
            if nan_step == str(step + 1) and nan_target != "gradients":
                x = x.float() * float("nan")
            loss, recon_nll, kl, log_sigma = forward_backward(train_elbo, optimizer, x, eps, mode)
            if nan_step == str(step + 1) and nan_target == "gradients":
                parameters[0].grad.view(-1)[0] = float("nan")
            if signal_step == str(step + 1):
                os.kill(os.getpid(), signal.SIGTERM)
            # One reduction and one sync a step: is the loss finite, is the gradient norm finite, was a signal received
            # (on any rank: every rank must stop at the same step or the next all-reduce would hang).
            grad_norm = torch.nn.utils.get_total_norm([p.grad for p in parameters if p.grad is not None])
            if guard is not None:  # fast path, one process: recorded on the device, read every --log-every steps
                guard.update(loss, grad_norm)
                signum = max(signals_received, default=0)
                if (step + 1) % args.log_every == 0 or signum:
                    check_finite(guard.first_bad(), epoch)
            else:
                signum = torch.tensor(float(max(signals_received, default=0)), device=device)
                bad_loss, bad_gradients, signum = max_over_ranks(
                    torch.stack([(~loss.detach().isfinite()).float(), (~grad_norm.isfinite()).float(), signum]))
                if bad_loss or bad_gradients:
                    check_finite((step + 1, "loss" if bad_loss else "gradients"), epoch)
            optimizer.step()
            step, batches, position = step + 1, batches + 1, position + len(global_batch)
            if rank == 0 and step % args.log_every == 0:
                images_per_second = global_batch_size * batches / max(time.time() - epoch_started, 1e-9)
                writer.add_scalar("train/elbo", -loss.item(), step)  # rank 0's share of the global batch
                writer.add_scalar("train/recon_nll", recon_nll.mean().item(), step)
                writer.add_scalar("train/kl", kl.mean().item(), step)
                writer.add_scalar("train/elbo_bits_per_dim", bits_per_dim(-loss.item(), dims), step)
                writer.add_scalar("charts/images_per_sec", images_per_second, step)
                log_sigma_stats(writer, "train", log_sigma, step)
                progress.set_postfix_str(f"elbo {-loss.item():.1f} kl {kl.mean().item():.1f} "
                                         f"sigma {log_sigma.exp().mean().item():.3g} {images_per_second:.0f} img/s")
            if signum:
                if rank == 0:
                    last_checkpoint = save(epoch, position, epoch_data_rng, test)
                stop_and_exit(int(signum), f"after step {step} (epoch {epoch + 1}, {position} of {len(order)} images)")
        position = 0
        if guard is not None:
            check_finite(guard.first_bad(), epoch)
        [signum] = max_over_ranks(torch.tensor([float(max(signals_received, default=0))], device=device))
        if (epoch + 1) % args.eval_every and epoch + 1 < args.epochs:  # no evaluation, figures or checkpoint
            if signum:
                if rank == 0:
                    last_checkpoint = save(epoch + 1, 0, data_generator.get_state(), test)
                stop_and_exit(int(signum), f"after epoch {epoch + 1}")
            continue
        with rng_fork():
            test = evaluate(model, obs, test_pixels, args, device, images=args.eval_images, bf16=fast)
        if rank == 0:
            for key, value in test.items():
                if value is not None:
                    writer.add_scalar(f"eval/{key}", value, step)
            recon_grid, generation_grid = figures(model, obs, test_pixels, args, device,
                                                  torch.Generator(device).manual_seed(0))
            writer.add_image("eval/reconstructions", recon_grid, step, dataformats="HWC")
            writer.add_image("eval/generations_means_then_samples", generation_grid, step, dataformats="HWC")
            print(f"epoch {epoch + 1}: test ELBO {test['nats_per_image']:.2f} nats/image, "
                  f"8-bit {test['bits_per_dim_8bit']:.3f} bits/dim")
            last_checkpoint = save(epoch + 1, 0, data_generator.get_state(), test)
        [signum] = max_over_ranks(torch.tensor([float(max(signals_received, default=0))], device=device))
        if signum:
            stop_and_exit(int(signum), f"after epoch {epoch + 1}")
    wall_seconds = seconds_before + time.time() - started

    # --- final evaluation, Table 2 and figures ---
    generator = torch.Generator(device).manual_seed(1 + rank)
    final = evaluate(model, obs, test_pixels, args, device, images=args.eval_images, generator=generator)
    iwae = evaluate(model, obs, test_pixels, args, device, k=args.iwae_k, images=args.iwae_images, generator=generator)
    if rank != 0:
        return
    writer.close()
    with torch.no_grad():
        model.eval(), obs.eval()
        x = to_unit(test_pixels[:256], device)
        _, log_sigma = obs(model.decode(model.encode(x)[0]), x)
        model.train(), obs.train()
    sigma = log_sigma.exp()
    sigma_summary = f"{sigma.mean().item():.4g}" if sigma.numel() == 1 else \
        f"per pixel: median {sigma.median().item():.3g}, min {sigma.min().item():.3g}, max {sigma.max().item():.3g}"
    os.makedirs(args.out, exist_ok=True)
    name = f"{args.dataset}_{args.sigma}_{args.likelihood}"
    recon_grid, generation_grid = figures(model, obs, test_pixels, args, device, torch.Generator(device).manual_seed(0))
    save_png(recon_grid, os.path.join(args.out, f"{name}_reconstructions.png"))
    save_png(generation_grid, os.path.join(args.out, f"{name}_generations.png"))
    record = dict(dataset=args.dataset, sigma=args.sigma, sigma_value=args.sigma_value, likelihood=args.likelihood,
                  epochs=args.epochs, train_images=len(train_pixels), final=final, iwae=iwae, iwae_k=args.iwae_k,
                  iwae_images=args.iwae_images, sigma_summary=sigma_summary, wall_minutes=wall_seconds / 60,
                  hardware=hardware(device) if world_size == 1 else f"{world_size} x {hardware(device)}",
                  processes=world_size, command=command, run_dir=run_dir)
    with open(os.path.join(args.out, "runs.jsonl"), "a") as f:
        f.write(json.dumps(record) + "\n")
    write_table2(args.out)
    print(f"final: {json.dumps(final)}\nIWAE-{args.iwae_k}: {json.dumps(iwae)}\nwrote {args.out}/table2.md, "
          f"{name}_reconstructions.png, {name}_generations.png")


if __name__ == "__main__":
    try:
        main(parse_args())
    except SystemExit as error:
        # Under torchrun every rank may fail alike (bad data, bad checkpoint): the others than rank 0 name their rank.
        if isinstance(error.code, str) and int(os.environ.get("RANK", 0)) > 0:
            raise SystemExit(f"[rank {os.environ['RANK']}] {error.code}")
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
