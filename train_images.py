"""MNIST and CelebA with fixed, learned-scalar and learned per-pixel sigma (Sec. 4.3, App. B): Table 2, Figs. 5, 11-18.

    python train_images.py --dataset mnist --sigma learned             # LV-VAE, per-pixel sigma (Eq. 11)
    python train_images.py --dataset mnist --sigma fixed --epochs 10   # F-VAE, sigma = 1/sqrt(2): the MSE loss
    python train_images.py --sigma fixed --sigma-value 0.5 --kl-weight 4   # beta-VAE: sigma = 1 in disguise (Sec. 3.2)
    python train_images.py --sigma learned --lv-warmup 234             # LV-VAE after 234 steps of LS-VAE (ours)
    python train_images.py --sigma learned --lv-warmup 234 --lv-warmup-sigma optimal   # ... after sigma-VAE (ours)
    python train_images.py --dataset celeba --sigma learned --data-dir data/celeba
    python train_images.py --resume runs/<run>/ckpt.pt --epochs 20     # continue a run exactly where it stopped
    python train_images.py --epochs 1000 --eval-every 25 --out results/images   # a Table 2 row, recorded
    python train_images.py --dataset celeba --data-dir data/celeba --valid-images 10000   # + early stopping
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

One training path. The uint8 images live on the training device and each batch is drawn there by index. Every flag
runs the same step: --dtype bf16 runs the networks under bf16 autocast (the decoder's output layer, the NLL, the KL
and every reduction stay fp32), --compile compiles the step (reduce-overhead: CUDA graphs; whole-step: the step
and its Adam update as one CUDA graph), Adam is the fused kernel, and the NaN guard reads nothing back to the host
per step. Defaults by device: bf16 and whole-step on one GPU, fp32 eager on the CPU; `--dtype fp32 --compile
none` is the reference the others are tested against, and the final evaluation is always fp32 eager. Each epoch
drops its last partial batch (MNIST: 60,000 = 468 x 128 + 96), so that every step has one shape and torch.compile
compiles once.
A run writes into runs/<run>/: TensorBoard events, ckpt.pt, and table2.md, runs.jsonl and the figures; `--out`
sends the last three elsewhere (`--out results/images` records a Table 2 row).

Under torchrun (RANK, WORLD_SIZE and LOCAL_RANK set) each process trains a DistributedDataParallel replica, NCCL on
GPUs and gloo on the CPU: it takes its slice of every global batch of --batch-size x processes images and its share
of the test images; rank 0 alone logs and writes. Fail safe: the first step with a NaN or Inf in the loss or the
gradients is skipped with every later one, the run stops with one line at the next log point, and the last
checkpoint stays as it was; SIGINT or SIGTERM finishes the current step, saves a checkpoint that --resume continues
exactly, and exits with 128 + signal.
"""

import argparse
import copy
import datetime
import json
import math
import os
import random
import re
import signal
import statistics
import sys
import time

try:
    import fcntl  # POSIX: serialises the Table 2 records of runs that finish at the same moment
except ImportError:  # Windows: two runs finishing together may each rewrite table2.md without the other's row
    fcntl = None

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from common import (
    MIN_LOG_SIGMA,
    ConvVAE,
    CUDAGraphStep,
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
    inverse_soft_floor,
    iwae_bound,
    load_celeba,
    load_checkpoint,
    load_mnist,
    log_sigma_stats,
    make_writer,
    pick_device,
    run_name,
    save_checkpoint,
    save_figure,
    soft_floor,
    writable_folder,
    write_file_atomically,
)
from kernels.gaussian_nll import TRITON_AVAILABLE
from kernels.gaussian_nll import gaussian_nll as fused_gaussian_nll

ARCHITECTURES = {  # App. B: MNIST 3 convs + 4 residual blocks, latent 256; CelebA 4 convs + 5 blocks, latent 2048
    "mnist": dict(channels=1, size=28, widths=(32, 64, 64), strides=(2, 2, 1), blocks=4, latent_dim=256),
    "celeba": dict(channels=3, size=64, widths=(64, 128, 256, 256), strides=(2, 2, 2, 2), blocks=5, latent_dim=2048),
}
# The paper's Table 2 (ELBO, bits per pixel, "accounting for the log sigma term"), quoted beside ours, never among them.
PAPER_TABLE2 = {("mnist", "fixed"): "0.06", ("mnist", "learned"): "4.89",
                ("celeba", "fixed"): "5.52", ("celeba", "learned"): "57.51"}
SIGMA_NAMES = {"fixed": "F-VAE", "learned-scalar": "LS-VAE", "learned": "LV-VAE", "optimal": "sigma-VAE"}
CHECKPOINT_KEYS = ["model", "obs", "optimizer", "epoch", "step", "args", "data_rng", "torch_rng"]  # what --resume needs
FIGURE_TAGS = ["originals", "reconstructions", "generated_means", "generated_samples"]
RESUMABLE = ["epochs", "device", "dtype", "compile", "eval_every", "log_every", "out", "data_dir", "cache_dir"]
ROOT = os.path.dirname(os.path.abspath(__file__))

parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawTextHelpFormatter)
parser.add_argument("--dataset", choices=ARCHITECTURES, default="mnist", help="default mnist")
parser.add_argument("--data-dir", help="folder with the dataset's own files (default data/<dataset>): MNIST's four "
                    "IDX files (.gz or raw); CelebA's img_align_celeba/ and list_eval_partition.txt")
parser.add_argument("--cache-dir", help="CelebA: where the decoded images are cached (default --data-dir); for a "
                    "shared or read-only dataset folder")
parser.add_argument("--download", action="store_true", help="MNIST only: fetch missing IDX files (checksummed)")
parser.add_argument("--celeba-images", default="img_align_celeba",
                    help="CelebA image folder inside --data-dir (default img_align_celeba); a folder of smaller "
                    "images of the same aspect ratio works too")
parser.add_argument("--celeba-extra-train", metavar="FOLDER",
                    help="CelebA: a second image folder inside --data-dir whose training-split images join the "
                    "training set after --celeba-images' own, e.g. img_align_celeba_89x109 (the offline copy's 10,000 "
                    "half-size faces); an image in both folders is taken once, from --celeba-images; the test images "
                    "come from --celeba-images alone")
parser.add_argument("--sigma", choices=SIGMA_NAMES, default="learned",
                    help="fixed: F-VAE; learned-scalar: LS-VAE (Eq. 10); learned: per-pixel LV-VAE (Eq. 11, default); "
                    "optimal: sigma-VAE, sigma^2 = batch MSE in training, the training set's MSE in evaluation")
parser.add_argument("--sigma-value", type=float, help="with --sigma fixed: sigma on [0, 1] data (default 1/sqrt(2))")
parser.add_argument("--lv-warmup", type=int, default=0, help="with --sigma learned: train as LS-VAE (or sigma-VAE: "
                    "--lv-warmup-sigma) for this many steps, then hand over to the per-pixel sigma head (ours, not "
                    "the paper's; default 0: the paper's LV-VAE from scratch)")
parser.add_argument("--lv-warmup-sigma", choices=["learned-scalar", "optimal"], default="learned-scalar",
                    help="with --lv-warmup: the warm phase's scalar sigma: LS-VAE's learned one, from sigma = 1 "
                    "(default), or sigma-VAE's, sigma^2 = the batch's MSE; the head starts from it at the hand-over")
parser.add_argument("--lv-fresh-adam", action="store_true", help="with --lv-warmup: at the hand-over, restart Adam's "
                    "state (moments and step count) of the decoder's output layer, so that the sigma head's first "
                    "updates are bias-corrected (~lr) rather than up to 2.7 lr after a hand-over at step 175, 6.3 lr "
                    "at step 2,345 (default: keep it)")
parser.add_argument("--lv-handover-sigma", choices=["warm", "mse"], default="warm",
                    help="with --lv-warmup: where the per-pixel head starts at the hand-over: warm, the warm phase's "
                    "own sigma (default), or mse, sigma^2 = the training images' MSE, sigma-VAE's value, after an "
                    "LS-VAE phase (an ablation: the LS-VAE phase with the sigma-VAE phase's start)")
parser.add_argument("--kl-weight", type=float, default=1.0,
                    help="lambda on the KL term of the training loss, -E log p(x|z) + lambda KL (a beta-VAE); 1 "
                    "(default): the ELBO, the paper's. With --sigma fixed it is sigma in disguise (Sec. 3.2): the loss "
                    "is lambda times that of sigma x sqrt(lambda) with lambda = 1, which Adam trains alike (tested). "
                    "Evaluation reports the ELBO (lambda = 1) of the model as it is")
parser.add_argument("--likelihood", choices=["continuous", "discretized"], default="continuous",
                    help="continuous Gaussian density (default) or Gaussian integrated over each 1/255 pixel bin")
parser.add_argument("--nll-kernel", choices=["auto", "triton", "torch"], default="auto",
                    help="continuous likelihood: the fused Triton kernel (kernels/gaussian_nll.py) or PyTorch; "
                    "auto (default): PyTorch inside a compiled step (Inductor fuses it with its neighbours: faster on "
                    "MNIST, tied on CelebA on an H200, results/bench_train_ablations.md), Triton in an eager step on "
                    "CUDA")
parser.add_argument("--dtype", choices=["auto", "fp32", "bf16"], default="auto",
                    help="the networks' precision in training: bf16 autocast (the output layer, NLL, KL and sums stay "
                    "fp32) or fp32; auto (default): bf16 on CUDA, fp32 on the CPU")
parser.add_argument("--compile", choices=["auto", "none", "default", "reduce-overhead", "whole-step"], default="auto",
                    help="torch.compile mode of the training step; auto (default): whole-step on one GPU, default "
                    "under torchrun on GPUs, none on the CPU. whole-step (one GPU): compile default, and the whole "
                    "step (forward, backward, NaN guard, Adam) replayed as one CUDA graph; reduce-overhead: CUDA "
                    "graphs of the compiled forward and backward only")
parser.add_argument("--epochs", type=int, default=10, help="passes over the training images (default 10)")
parser.add_argument("--batch-size", type=int, default=128, help="images per step and process (default 128); under "
                    "torchrun the global batch is this x processes")
parser.add_argument("--lr", type=float, default=3e-4, help="Adam learning rate (default 3e-4)")
parser.add_argument("--seed", type=int, default=0, help="seeds weights, batches and noise (default 0)")
parser.add_argument("--max-train-images", type=int, help="use only the first N training images (short runs)")
parser.add_argument("--eval-every", type=int, default=1, help="epochs between test ELBO, figures and checkpoint "
                    "(default 1; the last epoch always has them; a signal saves whenever it comes)")
parser.add_argument("--eval-images", type=int, help="test images for the ELBO each evaluated epoch and at the end "
                    "(default all test images, at most 10,000)")
parser.add_argument("--iwae-k", type=int, default=100, help="importance samples of the final IWAE bound (default 100)")
parser.add_argument("--iwae-images", type=int, help="test images for the final IWAE bound (default 1,000, at most "
                    "--eval-images)")
parser.add_argument("--valid-images", type=int, help="early stopping, ours: with every evaluation also the one-sample "
                    "ELBO of this many validation images, and the weights where it was highest kept (in ckpt.pt); at "
                    "the end their test bounds, in fp32, beside the last epoch's. CelebA: the first N of the split "
                    "file's validation images; MNIST, which has none: the last N of its training images, held out "
                    "of training (before --max-train-images). Default: none")
parser.add_argument("--log-every", type=int, default=50, help="steps between logged training lines and TensorBoard "
                    "points (default 50; the first step and each epoch's last are always logged)")
parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="default auto: cuda if present")
parser.add_argument("--logdir", default="runs", help="TensorBoard, checkpoint and run folder (default runs)")
parser.add_argument("--out", help="table2.md, runs.jsonl and figures (default: the run's folder; results/images "
                    "records the run in the committed Table 2)")
parser.add_argument("--resume", help="a run's ckpt.pt: continue it; only " + ", ".join(
    "--" + key.replace("_", "-") for key in RESUMABLE) + " may change")


def parse_args(argv=None):
    args = parser.parse_args(argv)
    if args.resume:
        defaults = vars(parser.parse_args([]))
        changed = [key for key, value in vars(args).items() if value != defaults[key]]
        extra = sorted(set(changed) - {"resume", *RESUMABLE})
        if extra:
            flags = ", ".join("--" + key.replace("_", "-") for key in extra)
            parser.error(f"--resume continues the run with its own settings; drop {flags}")
        return args
    if args.sigma_value is not None and args.sigma != "fixed":
        parser.error("--sigma-value goes with --sigma fixed only")
    if args.sigma_value is not None and args.sigma_value <= 0:
        parser.error("--sigma-value must be > 0")
    if not 0 < args.kl_weight < math.inf:
        parser.error("--kl-weight must be a finite number > 0 (1: the ELBO)")
    if args.lv_warmup and args.sigma != "learned":
        parser.error("--lv-warmup goes with --sigma learned only (it hands LS-VAE over to the per-pixel head)")
    if args.lv_warmup < 0:
        parser.error("--lv-warmup must be >= 0")
    if args.lv_warmup_sigma != "learned-scalar" and not args.lv_warmup:
        parser.error("--lv-warmup-sigma is the warm start's phase before the hand-over; add --lv-warmup N or drop it")
    if args.lv_fresh_adam and not args.lv_warmup:
        parser.error("--lv-fresh-adam restarts Adam at the warm start's hand-over; add --lv-warmup N or drop it")
    if args.lv_handover_sigma != "warm" and not args.lv_warmup:
        parser.error("--lv-handover-sigma is where the warm start's head starts; add --lv-warmup N or drop it")
    if args.lv_handover_sigma == "mse" and args.lv_warmup_sigma == "optimal":
        parser.error("--lv-handover-sigma mse is what --lv-warmup-sigma optimal does already; drop one of them")
    if args.nll_kernel == "triton" and args.likelihood == "discretized":
        parser.error("--nll-kernel triton fuses the continuous likelihood only; drop it or use --likelihood continuous")
    if args.nll_kernel == "triton" and not TRITON_AVAILABLE:
        parser.error("--nll-kernel triton but triton is not installed (Linux: pip install triton); use auto or torch")
    if args.download and args.dataset != "mnist":
        parser.error("--download fetches MNIST only; download CelebA yourself into --data-dir")
    if args.celeba_extra_train and args.dataset != "celeba":
        parser.error("--celeba-extra-train adds CelebA training images; add --dataset celeba or drop it")
    if args.celeba_extra_train and os.path.normpath(args.celeba_extra_train) == os.path.normpath(args.celeba_images):
        parser.error("--celeba-extra-train names the --celeba-images folder itself; name another folder or drop it")
    if args.device == "cpu" and args.compile in ("reduce-overhead", "whole-step"):
        parser.error(f"--compile {args.compile} records CUDA graphs; on the CPU use --compile default or none")
    for key in ["epochs", "batch_size", "eval_images", "iwae_k", "iwae_images", "log_every", "eval_every",
                "valid_images"]:
        if getattr(args, key) is not None and getattr(args, key) < 1:
            parser.error(f"--{key.replace('_', '-')} must be >= 1")
    if args.max_train_images is not None and args.max_train_images < args.batch_size:
        parser.error("--max-train-images must be at least --batch-size")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but no CUDA device is visible; use --device cpu or auto")
    args.data_dir = args.data_dir or f"data/{args.dataset}"
    args.sigma_value = args.sigma_value or (1 / math.sqrt(2) if args.sigma == "fixed" else None)
    return args


# --- distributed training ---


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


# --- data and model ---


def load_split(args, split):
    if args.dataset == "mnist":
        return load_mnist(args.data_dir, split, download=args.download)
    size = ARCHITECTURES["celeba"]["size"]
    images, names = load_celeba(args.data_dir, split, size, images_dir=args.celeba_images, cache_dir=args.cache_dir,
                                return_names=True)
    if split != "train" or not args.celeba_extra_train:
        return images
    # A second pool of training faces (e.g. half-size copies): appended, so --max-train-images takes the first folder's
    extra, extra_names = load_celeba(args.data_dir, "train", size, images_dir=args.celeba_extra_train,
                                     cache_dir=args.cache_dir, return_names=True)
    known = set(names)
    new = [i for i, name in enumerate(extra_names) if name not in known]
    print(f"celeba: {len(new)} training images of {args.celeba_extra_train} join the {len(images)} of "
          f"{args.celeba_images}: {len(images) + len(new)} ({len(extra_names) - len(new)} in both, taken once)")
    return torch.cat([images, extra[new]])


class WarmStartSigma(torch.nn.Module):
    """LV-VAE with a warm start (ours, not the paper's; the README says why: the fold). The decoder outputs (mean, raw
    log sigma) per pixel as for LV-VAE (Eq. 11), but until the hand-over log sigma is one scalar and the per-pixel
    head gets exactly zero gradient. The scalar (--lv-warmup-sigma): LS-VAE's, learned from sigma = 1 (Eq. 10), or
    sigma-VAE's, sigma^2 = the batch's MSE. hand_over() sets the head's weights to 0 and its bias to the scalar's raw
    log sigma (sigma-VAE: of its running MSE, which the training loop sets to the training images' MSE just before):
    soft_floor(head) is then that log sigma for every z and pixel, so the model is the same just before and after
    (its ELBO too for LS-VAE; for sigma-VAE up to the batch's MSE against the training images'), and from then on
    the per-pixel head learns. --lv-handover-sigma mse (an ablation) starts the head of an LS-VAE phase at the
    training images' MSE instead, as sigma-VAE's does: the mean is LS-VAE's, sigma at the hand-over sigma-VAE's."""

    decoder_outputs_per_dim = 2

    def __init__(self, floor=MIN_LOG_SIGMA, warm="learned-scalar"):
        super().__init__()
        self.floor = floor
        self.scalar = LearnedScalarSigma((1, 1, 1), floor=floor) if warm == "learned-scalar" else \
            OptimalSigma((1, 1, 1), floor=floor)  # the warm phase
        self.register_buffer("handed_over", torch.zeros((), dtype=torch.bool))  # a tensor: no recompile when it flips

    def forward(self, decoder_out, x=None):
        mean, raw_log_sigma = decoder_out.chunk(2, dim=1)
        per_pixel = soft_floor(raw_log_sigma, self.floor)  # Eq. 11, after the hand-over
        scalar = self.scalar(mean, x)[1]  # Eq. 10 (or sigma-VAE's) before it
        return mean, torch.where(self.handed_over, per_pixel, scalar.expand_as(per_pixel))

    @torch.no_grad()
    def hand_over(self, output_layer, log_sigma=None):
        """output_layer: the decoder's last ConvTranspose2d; its output channels C..2C are the raw log sigma.
        log_sigma: where the head starts instead of the scalar (--lv-handover-sigma mse); the model then changes.
        Returns the log sigma the head starts at (its bias through the soft floor)."""
        channels = output_layer.out_channels // 2
        output_layer.weight[:, channels:].zero_()  # (in, out, kH, kW): out channels C..2C
        if log_sigma is None and isinstance(self.scalar, LearnedScalarSigma):
            output_layer.bias[channels:].copy_(self.scalar.raw_log_sigma.reshape(()))
        else:  # sigma-VAE's log sigma is clamped at the floor, where the soft floor has no inverse
            log_sigma = self.scalar.log_sigma.item() if log_sigma is None else log_sigma
            output_layer.bias[channels:].fill_(inverse_soft_floor(max(log_sigma, self.floor + 1e-3), self.floor))
        self.handed_over.fill_(True)
        return soft_floor(output_layer.bias[channels], self.floor).item()


def make_model(args):
    arch = ARCHITECTURES[args.dataset]
    shape = (1, 1, 1)  # one sigma for all pixels
    learned = (lambda: WarmStartSigma(warm=getattr(args, "lv_warmup_sigma", "learned-scalar"))) \
        if getattr(args, "lv_warmup", 0) else (lambda: LearnedPerDimSigma(dim=1))
    obs = {"fixed": lambda: FixedSigma(args.sigma_value), "learned-scalar": lambda: LearnedScalarSigma(shape),
           "learned": learned, "optimal": lambda: OptimalSigma(shape)}[args.sigma]()
    model = ConvVAE(arch["channels"], arch["size"], arch["widths"], arch["strides"], arch["blocks"],
                    arch["latent_dim"], obs.decoder_outputs_per_dim)
    return model, obs


def likelihood(args, device=None, compiled=False):
    """The per-image NLL: discretized, or continuous through the fused Triton kernel (CUDA) or PyTorch. compiled:
    for a step that torch.compile compiles, where --nll-kernel auto leaves the NLL to Inductor."""
    if args.likelihood == "discretized":
        return discretized_gaussian_nll
    torch_nll = args.nll_kernel == "torch" or args.nll_kernel == "auto" and compiled
    if torch_nll or device is None or device.type != "cuda" or not TRITON_AVAILABLE:
        return gaussian_nll
    # kernels/gaussian_nll.py sums every non-batch dimension: event_dims is all of them for images
    return lambda x, mean, log_sigma, event_dims: fused_gaussian_nll(x, mean, log_sigma.to(mean.dtype),
                                                                     backend="triton")


def resolve_defaults(args, device, world_size):
    """--dtype auto and --compile auto by device: bf16 and the whole step as one CUDA graph on one GPU (decided by
    bench/NOTES.md's rule: on an H200, 2.5x reduce-overhead's images/s on MNIST and 1.45x on CelebA,
    results/bench_train.md); fp32 eager on the CPU."""
    if args.dtype == "auto":
        args.dtype = "bf16" if device.type == "cuda" else "fp32"
    if args.compile == "auto":
        args.compile = "none" if device.type != "cuda" else "whole-step" if world_size == 1 else "default"
    if args.compile == "whole-step" and world_size > 1:
        raise SystemExit("error: --compile whole-step records one process's step; under torchrun use --compile "
                         "default or reduce-overhead")
    if device.type != "cuda" and args.compile in ("reduce-overhead", "whole-step"):
        raise SystemExit(f"error: --compile {args.compile} records CUDA graphs, and this run is on the CPU; "
                         "use --compile default or none")


class ELBO(torch.nn.Module):
    """The VAE and its observation model as one module whose forward is `elbo_terms`: what DDP wraps and syncs and
    torch.compile compiles. x: uint8 pixels, made pixel / 255 here (where a compiled step fuses it). bf16: the
    networks under bf16 autocast; their outputs, the NLL and the KL stay fp32 (ConvVAE). kl_weight (--kl-weight):
    the third output is then the objective -recon_nll - kl_weight * kl that training maximises, not the ELBO."""

    def __init__(self, model, obs, nll, bf16, memory_format, kl_weight=1.0):
        super().__init__()
        self.model, self.obs, self.nll, self.bf16, self.memory_format = model, obs, nll, bf16, memory_format
        self.kl_weight = kl_weight

    def forward(self, pixels, eps):
        x = (pixels.float() / 255).contiguous(memory_format=self.memory_format)
        with torch.autocast(x.device.type, torch.bfloat16, enabled=self.bf16):
            recon_nll, kl, elbo, out = elbo_terms(self.model, self.obs, x, eps, event_dims=3, nll=self.nll)
        # Sec. 3.2: with a fixed sigma, weighting the KL by lambda is the ELBO of sigma x sqrt(lambda), times lambda
        return recon_nll, kl, elbo if self.kl_weight == 1 else -recon_nll - self.kl_weight * kl, out


def build(args, device, world_size=1):
    """model, obs, the training step's module (DDP-wrapped under torchrun, compiled unless --compile none) and fused
    Adam. args.dtype and args.compile must be resolved (resolve_defaults)."""
    model, obs = make_model(args)
    model, obs = model.to(device), obs.to(device)
    memory_format = torch.contiguous_format
    if device.type == "cuda":
        # channels_last: cuDNN's fast layout for these convolutions. TF32 off: where fp32 is asked for (the decoder's
        # output layer, the fp32 reference) it is fp32, not cuDNN's default TF32, which rounds to 2**-11.
        memory_format = torch.channels_last
        model = model.to(memory_format=memory_format)
        torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32 = True, False
    optimizer = torch.optim.Adam([*model.parameters(), *obs.parameters()], lr=args.lr, fused=True,
                                 capturable=args.compile == "whole-step")  # step counts on the GPU, read there
    step_module = ELBO(model, obs, likelihood(args, device, args.compile != "none"), args.dtype == "bf16",
                       memory_format, getattr(args, "kl_weight", 1.0))
    if world_size > 1:  # averages the gradients over the ranks in backward(), i.e. over the global batch
        step_module = DistributedDataParallel(step_module, device_ids=[device] if device.type == "cuda" else None)
    if args.compile != "none":
        step_module = torch.compile(step_module, mode="default" if args.compile == "whole-step" else args.compile)
    return model, obs, step_module, optimizer


def load_optimizer(optimizer, saved):
    """Adam's state from a checkpoint, placed for this run's fused Adam: step counts on the parameters' device,
    moments in the parameters' layout (channels_last on CUDA), whatever device or layout wrote them."""
    capturable = optimizer.defaults["capturable"]
    optimizer.load_state_dict(saved)
    for group in optimizer.param_groups:  # a checkpoint of another Adam implementation or mode continues here
        group["fused"], group["foreach"], group["capturable"] = True, None, capturable
        for parameter in group["params"]:
            moments = optimizer.state.get(parameter, {})
            for key, value in moments.items():
                moments[key] = value.to(parameter.device, torch.float32) if key == "step" else \
                    torch.empty_like(parameter).copy_(value)


@torch.no_grad()
def restart_adam(optimizer, parameters):
    """--lv-fresh-adam: Adam's state of `parameters` becomes a fresh Adam's, moments and step count 0, in place (a
    CUDA graph reads these tensors). Adam keeps one step count per tensor, so without this the sigma head, whose
    moments are still 0 at the hand-over (step t), shares the output layer's count: under a steady gradient its k-th
    update is lr (1 - 0.9**k) / (1 - 0.9**(t+k)) * sqrt((1 - 0.999**(t+k)) / (1 - 0.999**k)) rather than a fresh
    head's lr, at most 2.7 lr (k = 13) for t = 175 and 6.3 lr (k = 12) for t = 2,345. The layer's mean half restarts
    too: its first updates are lr sign(g), as for any fresh Adam."""
    for parameter in parameters:
        for value in optimizer.state[parameter].values():
            value.zero_()


class NanGuard:
    """The NaN guard, with no host sync per step. The first step whose loss or gradient norm is not finite is recorded
    on the device, and fused Adam skips its update and every later one (its found_inf argument, as under AMP), so the
    weights stay those from before it. Under torchrun the flags are all-reduced (no host sync on NCCL) and every rank
    skips alike. read() (a sync) gives (step, "loss" or "gradients") of that step, or None."""

    def __init__(self, optimizer, step, device):
        self.parameters = [p for group in optimizer.param_groups for p in group["params"]]
        self.step = torch.full((), step, dtype=torch.int64, device=device)
        self.record = torch.zeros(2, dtype=torch.int64, device=device)  # (first bad step, 1 loss/2 gradients); 0: none
        self.found_inf = optimizer.found_inf = torch.zeros((), device=device)  # read by fused Adam on the device

    def update(self, loss):
        self.step.add_(1)
        grad_norm = torch.nn.utils.get_total_norm([p.grad for p in self.parameters if p.grad is not None])
        bad = torch.stack([~loss.detach().isfinite(), ~grad_norm.isfinite()]).to(torch.int64)  # (loss, gradients)
        if dist.is_initialized():
            dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        new = (bad.amax() > 0) & (self.record[0] == 0)
        self.record.copy_(torch.where(new, torch.stack([self.step, torch.where(bad[0] > 0, 1, 2)]), self.record))
        self.found_inf.copy_(self.record[0] > 0)

    def read(self):
        step, what = self.record.tolist()
        return (step, "loss" if what == 1 else "gradients") if step else None


def train_step(step_module, optimizer, guard, pixels, eps, cuda_graphs):
    """One step: the ELBO's forward and backward (of the KL-weighted objective under --kl-weight), the NaN guard, Adam.
    Returns (loss, recon_nll, kl, mean log sigma) of the batch, nats per image, as one tensor on the device: nothing
    here waits for the device."""
    if cuda_graphs:
        torch.compiler.cudagraph_mark_step_begin()  # the last step's graph outputs may be overwritten from here on
    recon_nll, kl, objective, (_, log_sigma) = step_module(pixels, eps)
    loss = -objective.mean()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    guard.update(loss)
    optimizer.step()
    return torch.stack([loss, recon_nll.mean(), kl.mean(), log_sigma.float().mean()]).detach()


class WholeStepGraph:
    """--compile whole-step: train_step recorded once as one CUDA graph and replayed (common.CUDAGraphStep), so that
    the host launches one graph a step instead of the step's hundreds of kernels and Python's work around each (what
    bounds the small MNIST model). The forward and backward are torch.compile's (default mode); the NaN guard and
    fused Adam (capturable) are inside the graph. Three eager warm-up steps come first. Called like train_step; the
    terms it returns are overwritten by the next step."""

    def __init__(self):
        self.graphed = None

    def __call__(self, step_module, optimizer, guard, pixels, eps, cuda_graphs=False):
        if self.graphed is None:
            self.graphed = CUDAGraphStep(lambda p, e: train_step(step_module, optimizer, guard, p, e, False),
                                         before_record=lambda: optimizer.zero_grad(set_to_none=True))
        return self.graphed(pixels, eps)


def step_function(args):
    """What runs one training step for these (resolved) args: train_step, or a WholeStepGraph."""
    return WholeStepGraph() if args.compile == "whole-step" else train_step


def likely_fix(args):
    """What most often makes this setting's loss or gradients non-finite, and the flag that changes it."""
    lower_lr = f"lower --lr (now {args.lr:g})"
    if args.sigma == "fixed":
        return f"{lower_lr}, or raise --sigma-value (now {args.sigma_value:.3g}): gradients grow as 1/sigma^2"
    if args.likelihood == "continuous":
        return (f"{lower_lr}, or use --likelihood discretized: the continuous density grows without bound as sigma "
                "falls towards its floor (sigma >= 0.0025)")
    return lower_lr


# --- evaluation, figures, Table 2 ---


def to_unit(pixels, device):
    return pixels.to(device, non_blocking=True).float() / 255  # (B, C, H, W) in [0, 1]


def my_share(tensor):
    """This rank's contiguous share of a tensor's rows under torchrun, all of it otherwise."""
    rank, world_size = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    return tensor[rank * len(tensor) // world_size : (rank + 1) * len(tensor) // world_size]


def set_optimal_sigma(model, obs, train_pixels, args, device):
    """sigma-VAE in evaluation (and at the hand-over of its warm start, obs = WarmStartSigma.scalar): sigma^2 = the
    mean squared error of the model's reconstructions (z ~ q(z|x), as in training) over the training images, the
    model's own maximum-likelihood sigma, not a running average that lags."""
    obs.running_mse.fill_(training_mse(model, train_pixels, args, device))


@torch.no_grad()
def training_mse(model, train_pixels, args, device):
    """The mean squared error of the model's reconstructions, z ~ q(z|x), over the training images (all ranks')."""
    model.eval()
    sums = torch.zeros(2, dtype=torch.float64, device=device)  # (squared error, count)
    for part in my_share(train_pixels).split(args.batch_size * 4):
        x = to_unit(part, device)
        mu, log_std = model.encode(x)
        mean = model.decode(mu + log_std.exp() * torch.randn_like(mu))[:, : x.shape[1]]  # (a warm start's: + log sigma)
        sums += torch.stack([((x - mean) ** 2).sum().double(), torch.tensor(float(x.numel()), device=device)])
    if dist.is_initialized():
        dist.all_reduce(sums)
    model.train()
    return (sums[0] / sums[1]).item()


def hand_over(args, model, obs, optimizer, train_pixels, device):
    """The warm start's hand-over (--lv-warmup), once, between two steps: the model does not change (WarmStartSigma)
    unless --lv-handover-sigma mse moves the head's start.
    A sigma-VAE warm phase first sets its sigma to the training images' MSE, not its lagging running average
    (momentum 0.99); --lv-handover-sigma mse starts the head there after an LS-VAE phase; --lv-fresh-adam then
    restarts the output layer's Adam state."""
    warm_log_sigma, log_sigma = obs.scalar.log_sigma.item(), None
    if args.lv_warmup_sigma == "optimal":
        set_optimal_sigma(model, obs.scalar, train_pixels, args, device)
    elif args.lv_handover_sigma == "mse":
        log_sigma = 0.5 * math.log(training_mse(model, train_pixels, args, device))
    start = obs.hand_over(model.decoder[-1], log_sigma)
    if not dist.is_initialized() or dist.get_rank() == 0:
        warm = "LS-VAE's learned" if isinstance(obs.scalar, LearnedScalarSigma) else "sigma-VAE's running (lagging)"
        print(f"hand-over: {warm} log sigma {warm_log_sigma:.3f}, the per-pixel head starts at {start:.3f}")
    if args.lv_fresh_adam:
        restart_adam(optimizer, model.decoder[-1].parameters())


@torch.no_grad()
def evaluate(model, obs, test_pixels, args, device, k=1, images=None, generator=None, bf16=False, desc=None):
    """Test-split bounds in both conventions. k = 1: the one-sample ELBO; k > 1: the IWAE-k bound. bf16: the networks
    under bf16 autocast (the per-epoch figures; ConvVAE keeps the output layer and the bounds in fp32). desc: the label
    of a progress bar (rank 0). generator: every random number of the bounds comes from it (None: the global RNG).
    Under torchrun each rank evaluates its share and the sums are all-reduced."""
    model.eval(), obs.eval()
    nll, pixels = likelihood(args, device), test_pixels[: images or len(test_pixels)]
    dims, n = pixels[0].numel(), len(pixels)
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # table2, eight_bit, KL, log sigma; one sync at the end

    def bound(data, terms=False):
        if k > 1:
            return iwae_bound(model, obs, data, k, generator, 3, nll)
        eps = None if generator is None else torch.randn(len(data), model.latent_dim, generator=generator,
                                                         device=device)
        _, kl, elbo, (_, log_sigma) = elbo_terms(model, obs, data, event_dims=3, nll=nll, eps=eps)
        if terms:  # the bound's parts, by which a gap splits: the code's KL and the log sigma of Eq. 11's sum
            sums[2] += kl.sum()
            sums[3] += log_sigma.expand_as(data).sum()
        return elbo

    batches = my_share(pixels).split(max(1, args.batch_size * 4 // k))
    quiet = desc is None or (dist.is_initialized() and dist.get_rank() > 0)
    with torch.autocast(device.type, torch.bfloat16, enabled=bf16):
        for part in tqdm(batches, desc=desc, unit="batch", mininterval=2, leave=False, disable=quiet, file=sys.stdout):
            x = to_unit(part, device)
            if args.likelihood == "continuous":
                sums[0] += bound(x, terms=True).sum()  # log p(x) bound, x = pixel / 255
                u = torch.rand(x.shape, generator=generator, device=device) if generator is not None else \
                    torch.rand_like(x)
                sums[1] += bound(x + (u - 0.5) / 255).sum()  # dequantized
            else:
                sums[1] += bound(x, terms=True).sum()  # log P(pixels)
    model.train(), obs.train()
    if dist.is_initialized():
        dist.all_reduce(sums)
    sums = dict(zip(["table2", "eight_bit", "kl", "log_sigma"], sums.tolist()))
    # One-sample ELBO only: the KL (nats/image) and the mean log sigma over pixels. Continuous likelihood:
    # -ELBO = KL + dims (mean log sigma + 1/2 log 2 pi) + the sum of (x - mean)^2 / 2 sigma^2 (Eq. 11).
    terms = {"kl_nats_per_image": sums["kl"] / n, "mean_log_sigma": sums["log_sigma"] / (n * dims)} if k == 1 else {}
    if args.likelihood == "continuous":
        return {"nats_per_image": sums["table2"] / n,
                "table2_bits_per_pixel": bits_per_dim(sums["table2"] / n, dims),
                "bits_per_dim_8bit": dequantized_bits_per_dim(sums["eight_bit"] / n, dims, bin_width=1 / 255), **terms}
    # the discretized likelihood is a probability of 8-bit values, not a density on [0, 1]: no Table-2 figure
    return {"nats_per_image": sums["eight_bit"] / n, "table2_bits_per_pixel": None,
            "bits_per_dim_8bit": -bits_per_dim(sums["eight_bit"] / n, dims), **terms}


def image_grid(images, rows):
    """(N, C, H, W) in [0, 1] -> uint8 (rows*H, cols*W, C) with 1-pixel gaps, for PNG and TensorBoard."""
    images = images.clamp(0, 1).float().cpu()
    n, c, h, w = images.shape
    cols = math.ceil(n / rows)
    grid = torch.ones(c, rows * (h + 1) - 1, cols * (w + 1) - 1)
    for i, image in enumerate(images):
        r, col = divmod(i, cols)
        grid[:, r * (h + 1) : r * (h + 1) + h, col * (w + 1) : col * (w + 1) + w] = image
    return (grid.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()


@torch.no_grad()
def figures(model, obs, test_pixels, device, generator):
    """Four labelled 4x4 grids: test images and their reconstructions (means of p(x|z), z = the encoder's mean; Figs.
    5a-b, 11, 12, 15, 16); means of p(x|z), z ~ p(z), and samples of p(x|z) for the same z (Figs. 5c-d, 13, 14, 17,
    18). Also the log sigma of the reconstructions, for the histogram."""
    model.eval(), obs.eval()
    x = to_unit(test_pixels[:16], device)
    mu, _ = model.encode(x)
    recon_mean, recon_log_sigma = obs(model.decode(mu), x)
    z = torch.randn(16, model.latent_dim, generator=generator, device=device)
    gen_mean, gen_log_sigma = obs(model.decode(z), x)
    gen_sample = gen_mean + gen_log_sigma.exp() * torch.randn(gen_mean.shape, generator=generator, device=device)
    model.train(), obs.train()
    grids = {"test images": x, "reconstructions (means)": recon_mean, "generated means, z ~ p(z)": gen_mean,
             "samples of p(x|z), same z": gen_sample}  # label: images; TensorBoard tags, in order: FIGURE_TAGS
    return {label: image_grid(images, 4) for label, images in grids.items()}, recon_log_sigma


def save_grids(grids, path, title, command):
    """The grids side by side, scaled up, each under its label, with the command in the footer and the metadata."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(grids), figsize=(3.6 * len(grids), 4.2))
    for ax, (label, grid) in zip(axes, grids.items()):
        ax.imshow(grid[..., 0] if grid.shape[-1] == 1 else grid, cmap="gray", vmin=0, vmax=255, interpolation="nearest")
        ax.set_title(label, fontsize=10)
        ax.axis("off")
    fig.suptitle(title, fontsize=11)
    save_figure(fig, path, command)


def inside_repository(path):
    """A path inside the repository, relative to its root; any other path as it is."""
    return os.path.relpath(path, ROOT) if os.path.commonpath([ROOT, os.path.abspath(path)]) == ROOT else path


def command_line(launcher, argv):
    """The command as typed, with paths inside the repository made relative to it: it reruns from the repository's
    root on any machine."""
    def relative(arg):
        key, equals, value = arg.partition("=") if arg.startswith("--") else ("", "", arg)
        return key + equals + (inside_repository(value) if os.path.isabs(value) else value)

    return " ".join([launcher, inside_repository(os.path.abspath(argv[0])), *map(relative, argv[1:])])


def setting_name(run):
    """Table 2's name of a run's setting (run: a record or vars(args)): F-VAE (sigma=0.707), LS-VAE, LV-VAE, LV-VAE,
    warm start (N steps[ of sigma-VAE][, head at the MSE's sigma][, fresh Adam]), sigma-VAE[, + FOLDER faces][, KL
    weight L][, N held out] (MNIST's --valid-images, taken from its training images). Runs recorded before
    --lv-fresh-adam, --lv-warmup-sigma, --lv-handover-sigma, --celeba-extra-train, --valid-images and --kl-weight
    existed had none of them."""
    name = SIGMA_NAMES[run["sigma"]] + (f" (sigma={run['sigma_value']:.3g})" if run["sigma"] == "fixed" else "")
    if run.get("lv_warmup"):
        warm = " of sigma-VAE" if run.get("lv_warmup_sigma") == "optimal" else ""
        warm += ", head at the MSE's sigma" if run.get("lv_handover_sigma") == "mse" else ""
        name += f", warm start ({run['lv_warmup']} steps{warm}{', fresh Adam' if run.get('lv_fresh_adam') else ''})"
    name += f", + {run['celeba_extra_train']} faces" if run.get("celeba_extra_train") else ""
    name += f", KL weight {run['kl_weight']:g}" if run.get("kl_weight", 1) != 1 else ""
    held_out = run.get("valid_images") and run["dataset"] == "mnist"
    return name + (f", {run['valid_images']} held out" if held_out else "")


def mse_sigma(run):
    """Whether a run is F-VAE with the MSE's sigma = 1/sqrt(2) (the default --sigma-value)."""
    return run["sigma"] == "fixed" and abs(run["sigma_value"] - 1 / math.sqrt(2)) < 1e-9


def paper_value(run):
    """The paper's Table 2 number for this run's setting: F-VAE with the MSE's sigma = 1/sqrt(2), or LV-VAE."""
    mse = mse_sigma(run)
    if run["likelihood"] != "continuous" or run.get("lv_warmup") or run.get("kl_weight", 1) != 1 \
            or not (mse or run["sigma"] == "learned"):
        return "not in the paper"
    return PAPER_TABLE2[run["dataset"], run["sigma"]]


def run_seed(run):
    """A recorded run's --seed; for runs recorded before the seed was, read from its run folder (…__seed3__…)."""
    if "seed" in run:
        return run["seed"]
    found = re.search(r"__seed(\d+)__", run.get("run_dir", ""))
    return int(found.group(1)) if found else None


def run_batch(run):
    """A recorded run's global batch, images a step over all processes; for runs recorded before it was, read from its
    command (--batch-size, default 128, which it has always been) and its process count."""
    if "batch_size" in run:
        return run["batch_size"]
    found = re.search(r"--batch-size[ =](\d+)", run["command"])
    return (int(found.group(1)) if found else 128) * run.get("processes", 1)


def fmt(value):
    """A table cell: three decimals, or n/a for what was not measured."""
    return "n/a" if value is None else f"{value:.3f}"


def train_gap(run):
    """A recorded run's (or its selected epoch's) one-sample ELBO on training images minus its test ELBO, nats/image
    (None if not measured)."""
    return run["final_train"]["nats_per_image"] - run["final"]["nats_per_image"] if "final_train" in run else None


FIGURE_KINDS = ["reconstructions", "generations"]


def figure_stem(run):
    """A run's figures are <stem>_reconstructions.png and <stem>_generations.png: named by dataset, sigma (and F-VAE's
    --sigma-value, unless 1/sqrt(2)), likelihood, epochs, --kl-weight, --valid-images and seed (none for seed 0), so
    that a run of another length, sigma or seed keeps the others' figures. They are the last epoch's model's, with or
    without --valid-images."""
    seed = run_seed(run)
    warm = ("_warmstart" + ("-optimal" if run.get("lv_warmup_sigma") == "optimal" else "")
            + ("-msehead" if run.get("lv_handover_sigma") == "mse" else "")
            + ("-freshadam" if run.get("lv_fresh_adam") else "")) if run.get("lv_warmup") else ""
    extra = f"_plus-{os.path.basename(os.path.normpath(run['celeba_extra_train']))}" \
        if run.get("celeba_extra_train") else ""
    valid = f"_valid{run['valid_images']}" if run.get("valid_images") else ""
    kl_weight = f"_kl{run['kl_weight']:g}" if run.get("kl_weight", 1) != 1 else ""
    fixed = f"{run['sigma_value']:g}" if run["sigma"] == "fixed" and not mse_sigma(run) else ""  # F-VAE's sigma
    return f"{run['dataset']}_{run['sigma']}{fixed}{warm}_{run['likelihood']}_" \
        f"{run['epochs']}ep{extra}{kl_weight}{valid}" + (f"_seed{seed}" if seed else "")


def figure_cell(run, out):
    """Table 2's cell for a run's figures in <out>: their common name, or n/a where they are not there (a run
    recorded before figures were named by epochs, whose figures a later run of the same setting replaced)."""
    stem = figure_stem(run)
    found = all(os.path.exists(os.path.join(out, f"{stem}_{kind}.png")) for kind in FIGURE_KINDS)
    return f"`{stem}_{{{','.join(FIGURE_KINDS)}}}.png`" if found else "n/a"


def over_seeds(runs):
    """Table 2's rows run with several seeds: for each command that differs only in --seed, the last run of each
    seed, and the mean, sample standard deviation and range over them of each bound, PSNR and the gap."""
    groups = {}
    for run in runs:
        groups.setdefault(re.sub(r" --seed[ =]\S+", "", run["command"]), {})[run_seed(run)] = run  # the last run counts
    lines = []
    for command, by_seed in groups.items():
        if len(by_seed) < 2:
            continue
        seeded = [by_seed[seed] for seed in sorted(by_seed, key=lambda seed: -1 if seed is None else seed)]
        values = {
            "elbo": [run["final"]["table2_bits_per_pixel"] for run in seeded],
            "iwae": [run["iwae"]["table2_bits_per_pixel"] for run in seeded],
            "elbo_8bit": [run["final"]["bits_per_dim_8bit"] for run in seeded],
            "iwae_8bit": [run["iwae"]["bits_per_dim_8bit"] for run in seeded],
            "nats": [run["final"]["nats_per_image"] for run in seeded],
            "psnr": [run.get("psnr_db") for run in seeded],
            "gap": [train_gap(run) for run in seeded],
        }
        spread = lambda v: "n/a" if None in v else \
            f"{statistics.mean(v):.3f} ± {statistics.stdev(v):.3f} [{min(v):.3f}, {max(v):.3f}]"
        run = seeded[0]
        lines.append(f"| {run['dataset']} | {setting_name(run)} | {run['likelihood']} | {run['epochs']} "
                     f"| {run_batch(run)} | {', '.join(str(run_seed(r)) for r in seeded)} | "
                     + " | ".join(spread(v) for v in values.values()) + f" | `{command}` |")
    if not lines:
        return []
    return [
        "",
        "## Over seeds",
        "",
        ("Rows whose commands differ only in --seed (no --seed: seed 0), the last run of each seed: mean ± sample "
         "standard deviation over the seeds [min, max]. A difference between two settings is a finding only where it "
         "stands out of this spread. Units as above; ELBO in nats per image, higher is better."),
        "",
        ("| dataset | setting | likelihood | epochs | batch | seeds | ELBO, Table-2 bits/pixel "
         "| IWAE-k, Table-2 bits/pixel "
         "| ELBO, 8-bit bits/dim | IWAE-k, 8-bit bits/dim | ELBO, nats/image | reconstruction PSNR, dB "
         "| gap, nats/image | command, without --seed |"),
        "|" + "---|" * 14,
        *lines,
    ]


def selected_on_validation(runs):
    """Table 2's runs with --valid-images: the epoch whose validation ELBO was highest and the test bounds of its
    weights beside the last epoch's (the main table's)."""
    lines = []
    for run in runs:
        if "selected" not in run:
            continue
        chosen = run["selected"]
        pair = lambda bound, key: f"{fmt(chosen[bound][key])} ({fmt(run[bound][key])})"
        lines.append(
            f"| {run['dataset']} | {setting_name(run)} | {run['likelihood']} | {run_seed(run)} | {run['epochs']} "
            f"| {run['valid_images']} | {chosen['epoch']} of {len(chosen['curve'])} evaluated "
            f"| {fmt(chosen['valid']['nats_per_image'])} "
            f"| {pair('final', 'table2_bits_per_pixel')} | {pair('iwae', 'table2_bits_per_pixel')} "
            f"| {pair('final', 'bits_per_dim_8bit')} | {pair('iwae', 'bits_per_dim_8bit')} "
            f"| {fmt(train_gap(chosen))} ({fmt(train_gap(run))}) | `{run['command']}` |")
    if not lines:
        return []
    return [
        "",
        "## Selected on validation (--valid-images; ours)",
        "",
        ("Early stopping by the validation ELBO: at every evaluated epoch the run also took the one-sample ELBO of its "
         "validation images (CelebA: the split file's; MNIST: the last N training images, held out of training), "
         "and kept the weights where it was highest. Each cell: the test bound of those weights, then in brackets the "
         "last epoch's (the main table's), drawn with the same noise, so that the two differ by the weights alone. "
         "Validation ELBO in nats per image (bf16 on a GPU, as every per-epoch evaluation); other units as above."),
        "",
        ("| dataset | setting | likelihood | seed | epochs | validation images | selected epoch "
         "| validation ELBO there, nats/image | ELBO, Table-2 bits/pixel | IWAE-k, Table-2 bits/pixel "
         "| ELBO, 8-bit bits/dim | IWAE-k, 8-bit bits/dim | gap, nats/image | command |"),
        "|" + "---|" * 14,
        *lines,
    ]


def write_table2(out):
    """<out>/table2.md from every finished run recorded in <out>/runs.jsonl."""
    with open(os.path.join(out, "runs.jsonl")) as f:
        runs = [json.loads(line) for line in f if line.strip()]
    lines = [
        "# Table 2: ELBO on the test split, every run made (written by train_images.py from runs.jsonl)",
        "",
        "Table-2 convention: bits per pixel of the continuous density of pixel/255 in [0, 1], log sigma and all "
        "Gaussian constants included, higher is better (the paper's unit). 8-bit convention: bits per dimension of "
        "the 8-bit data, lower is better (the literature's): -log2 P(pixels) under the discretized likelihood, or "
        "its upper bound log2(255) - log2 p(x~) under uniform dequantization for continuous runs. ELBO: one sample "
        "per test image; IWAE-k: importance-weighted bound on the first test images. Learned log sigma has the soft "
        "floor sigma >= 0.0025 (log sigma >= -6): continuous per-pixel figures measure how far sigma fell to it. "
        "sigma-VAE is evaluated with sigma^2 = its final model's mean squared error on the training images (runs "
        "recorded before 2026-11-27 used a running average of the batch MSE, which lags the model). Batch: images a "
        "step over all processes (the CPU rows' 128; on a GPU Table 2's MNIST rows use 512). Wall time: the "
        "whole run, final evaluation included (training alone in brackets, where recorded). Gap: the same one-sample "
        "ELBO on as many training images as test images, minus the test ELBO: how much better the model fits the "
        "images it trained on (n/a: recorded before the gap was measured). Reconstruction PSNR: of the means of "
        "p(x|z), z = the encoder's mean, clipped to [0, 1], on the first 256 test images (App. B.1: LV-VAE 'more "
        "closely matches all the details'). Sigma on edges / elsewhere: for a per-pixel sigma of those "
        "reconstructions, its geometric mean on the pixels where the test image differs from a 4-neighbour by more "
        "than 0.25, over its geometric mean on the others (App. B.1: 'LV-VAE retains larger sigma values at the "
        "frontier between the black and white regions'); n/a for a scalar sigma and for runs recorded before these "
        "were measured. Under the discretized likelihood, sigma on a pixel at 0 or 255 is no sharpness: its bin is "
        "open-ended, so any sigma gives it a probability near 1 once the mean lies a few sigma beyond the bin's edge, "
        "and its final sigma and edge ratio compare such pixels with the rest. Figures: the run's reconstructions and "
        "generations beside this table, named by setting, epochs and seed (n/a: recorded before figures were named "
        "by epochs, and replaced since by a later run of the same setting).",
        "",
        "Which convention is the paper's? With every constant included, sigma^2 = 1/2 (the MSE) caps the density at "
        "-0.5 log2(pi) = -0.83 bits/pixel, so the paper's F-VAE MNIST value, +0.06, cannot include them all. Its "
        "Table 1 leaves out the Gaussian constant 0.5 log(2 pi) per dimension (see results/2d); the column 'no 0.5 "
        "log 2pi' adds 0.5 log2(2 pi) = 1.326 bits to our Table-2 figure to show that convention, the closest to the "
        "paper's. It caps sigma^2 = 1/2 at +0.5 bits/pixel. On CelebA a pixel here is one of the 3 x 64 x 64 colour "
        "values; the paper does not say whether its CelebA figures count an RGB triple as one pixel, which would make "
        "them three times ours for the same model (its 57.51 would be 19.2 bits per value, still a sigma far below "
        "the floor, and its F-VAE 5.52 would be 1.84, still above the +0.5 that sigma^2 = 1/2 allows).",
        "",
        "| dataset | setting | likelihood | seed | epochs | train images | batch | ELBO, Table-2 bits/pixel "
        "| IWAE-k, Table-2 "
        "bits/pixel | ELBO, Table-2 bits/pixel, no 0.5 log 2pi | ELBO, 8-bit bits/dim | IWAE-k, 8-bit bits/dim "
        "| gap: ELBO on training images - test ELBO, nats/image | k, images | final sigma | reconstruction PSNR, dB "
        "| sigma on edges / elsewhere | wall time | hardware | the paper's Table 2 value (paper's number) | figures "
        "| command |",
        "|" + "---|" * 22,
    ]
    for run in runs:
        final, iwae = run["final"], run["iwae"]
        setting = setting_name(run)
        table2 = final["table2_bits_per_pixel"]
        without_2pi = None if table2 is None else table2 + 0.5 * math.log2(2 * math.pi)
        wall = f"{run['wall_minutes']:.1f} min" + (f" ({run['train_minutes']:.1f})" if "train_minutes" in run else "")
        lines.append(
            f"| {run['dataset']} | {setting} | {run['likelihood']} | {run_seed(run)} "
            f"| {run['epochs']} | {run['train_images']} | {run_batch(run)} | {fmt(final['table2_bits_per_pixel'])} "
            f"| {fmt(iwae['table2_bits_per_pixel'])} | {fmt(without_2pi)} | {fmt(final['bits_per_dim_8bit'])} "
            f"| {fmt(iwae['bits_per_dim_8bit'])} | {fmt(train_gap(run))} | {run['iwae_k']}, {run['iwae_images']} "
            f"| {run['sigma_summary']} | {fmt(run.get('psnr_db'))} | {fmt(run.get('edge_sigma_ratio'))} "
            f"| {wall} | {run['hardware']} | {paper_value(run)} | {figure_cell(run, out)} | `{run['command']}` |")
    lines += over_seeds(runs) + selected_on_validation(runs)
    write_file_atomically(os.path.join(out, "table2.md"), lambda f: f.write(("\n".join(lines) + "\n").encode()))


def with_test_hooks(step_fn, step, parameters):
    """Test-only faults, inert unless set: VAE_INJECT_NAN_AT_STEP=N makes step N's noise NaN (N:gradients poisons a
    gradient instead); VAE_SIGNAL_AT_STEP=N makes the process send itself SIGTERM during step N."""
    nan_step, _, nan_target = os.environ.get("VAE_INJECT_NAN_AT_STEP", "").partition(":")
    signal_step = os.environ.get("VAE_SIGNAL_AT_STEP", "")
    if not (nan_step or signal_step):
        return step_fn
    steps = [step]

    def hooked(step_module, optimizer, guard, pixels, eps, cuda_graphs):
        steps[0] += 1
        hook = None
        if str(steps[0]) == nan_step and nan_target == "gradients":
            hook = parameters[0].register_hook(lambda grad: grad * float("nan"))
        elif str(steps[0]) == nan_step:
            eps = eps * float("nan")
        terms = step_fn(step_module, optimizer, guard, pixels, eps, cuda_graphs)
        if hook is not None:
            hook.remove()
        if str(steps[0]) == signal_step:
            os.kill(os.getpid(), signal.SIGTERM)
        return terms

    return hooked


# --- the run's set-up and record ---


def read_resume(args, device):
    """(checkpoint, its run's settings except what this command gives: device, dtype and compile follow this
    machine). A file that is not a good checkpoint stops every rank with one line."""
    state, error = None, None
    try:
        state = load_checkpoint(args.resume)
    except SystemExit as failure:  # its one line
        error = failure.code
    missing = [key for key in CHECKPOINT_KEYS if key not in state] if isinstance(state, dict) else ["model"]
    if error is None and missing:
        error = f"error: {args.resume} is not a train_images.py checkpoint (it has no {missing[0]}); start without " \
            "--resume"
    stop_together(error, device)
    defaults = vars(parser.parse_args([]))
    given = {key: getattr(args, key) for key in RESUMABLE if getattr(args, key) != defaults[key]}
    return state, argparse.Namespace(**{**defaults, **state["args"], "device": args.device, "dtype": "auto",
                                        "compile": "auto", **given, "resume": args.resume})


def load_data(args, local_rank, world_size, device):
    """Training, validation (None without --valid-images) and test images, uint8 on the training device. Local rank 0
    of each machine reads first (it may download MNIST or build CelebA's cache), the others after it."""
    error, valid_pixels = None, None
    for turn in range(2 if world_size > 1 else 1):
        if (local_rank == 0) == (turn == 0):
            try:
                train_pixels, test_pixels = load_split(args, "train"), load_split(args, "test")
                if args.valid_images and args.dataset == "mnist":  # no validation split: the last training images
                    if args.valid_images > len(train_pixels) - args.batch_size * world_size:
                        raise DataError(f"error: --valid-images {args.valid_images} leaves fewer than one global "
                                        f"batch of MNIST's {len(train_pixels)} training images; lower it")
                    train_pixels, valid_pixels = train_pixels.split(len(train_pixels) - args.valid_images)
                elif args.valid_images:
                    try:
                        valid_pixels = load_split(args, "valid")[: args.valid_images]
                    except DataError as failure:
                        raise DataError(f"{failure}; or drop --valid-images")
            except DataError as failure:
                error = str(failure)
        stop_together(error, device)
    valid_pixels = None if valid_pixels is None else valid_pixels.to(device)
    return train_pixels[: args.max_train_images].to(device), valid_pixels, test_pixels.to(device)


def restore(state, args, model, obs, optimizer, data_generator, device):
    """Weights, Adam and the RNGs from a checkpoint; returns its (epoch, step, position, wall_seconds, test)."""
    try:
        model.load_state_dict(state["model"]), obs.load_state_dict(state["obs"])
        load_optimizer(optimizer, state["optimizer"])
    except (RuntimeError, KeyError, ValueError) as failure:
        raise SystemExit(f"error: {args.resume} does not match this model ({str(failure).splitlines()[0]}); "
                         "start without --resume")
    data_generator.set_state(state["data_rng"])
    torch.set_rng_state(state["torch_rng"])
    if device.type == "cuda" and state.get("cuda_rng") is not None:
        torch.cuda.set_rng_state(state["cuda_rng"])
    return state["epoch"], state["step"], state.get("position", 0), state.get("wall_seconds", 0.0), state.get("test")


def announce(args, model, train_pixels, test_pixels, steps_per_epoch, eval_images, iwae_images, world_size, device,
             run_dir, valid_pixels=None):
    """The start-up lines: what trains on what, how, and what the evaluation will cost."""
    kernel = lambda compiled: "PyTorch" if likelihood(args, device, compiled) is gaussian_nll else "fused Triton kernel"
    nll_path = "discretized" if args.likelihood == "discretized" else \
        f"continuous, {kernel(args.compile != 'none')} in training, {kernel(False)} in evaluation"
    processes = "" if world_size == 1 else f", {world_size} processes ({dist.get_backend()})"
    print(f"train_images: {args.dataset} ({len(train_pixels)} train, {len(test_pixels)} test images), "
          f"{setting_name(vars(args))}, likelihood {nll_path}, "
          f"{sum(p.numel() for p in model.parameters()):,} parameters, {args.dtype}, compile {args.compile}, "
          f"{steps_per_epoch} steps of {args.batch_size * world_size} an epoch{processes}, on {hardware(device)}; "
          f"run {run_dir}")
    total = args.epochs * steps_per_epoch
    if args.lv_warmup >= total > 0:  # the hand-over comes after step lv_warmup: the head would never train
        print(f"train_images: warning: --lv-warmup {args.lv_warmup} is not below this run's {total} steps "
              f"({args.epochs} epochs of {steps_per_epoch}): the per-pixel sigma head never trains, so this is a "
              f"{SIGMA_NAMES[args.lv_warmup_sigma]} run under the warm start's name; lower --lv-warmup or raise "
              "--epochs")
    twice = ", each bound also dequantized" if args.likelihood == "continuous" else ""
    print(f"train_images: evaluation every {args.eval_every} epoch(s): the ELBO of {eval_images} test images and as "
          f"many training images; at the end, in fp32: the same, and IWAE-{args.iwae_k} of {iwae_images} test images "
          f"({args.iwae_k * iwae_images:,} decoder passes{twice}); --eval-images and --iwae-images change this")
    if valid_pixels is not None:
        where = "the last training images, held out" if args.dataset == "mnist" else "the split file's"
        print(f"train_images: early stopping: each evaluation also takes the ELBO of {len(valid_pixels)} validation "
              f"images ({where}) and keeps the weights where it is highest; their test bounds come at the end")


def evaluate_selected(selection, model, obs, last, pixels, args, device, eval_images, iwae_images):
    """--valid-images: the final bounds (test ELBO, IWAE, training-image ELBO; fp32) of the weights with the highest
    validation ELBO, drawn with the same noise as the last epoch's `last` (final, iwae, seen), so the two differ by
    the weights alone; `last` itself where the best epoch is the last. Returns the record's "selected" entry."""
    best = selection["best"]
    bounds = last
    if best["epoch"] != args.epochs:
        best_model, best_obs = copy.deepcopy(model), copy.deepcopy(obs)
        best_model.load_state_dict(best["model"]), best_obs.load_state_dict(best["obs"])
        (test_pixels, train_pixels), rank = pixels, dist.get_rank() if dist.is_initialized() else 0
        generator = torch.Generator(device).manual_seed(1 + rank)  # as for the last epoch's bounds
        bounds = (evaluate(best_model, best_obs, test_pixels, args, device, images=eval_images, generator=generator,
                           desc=f"selected epoch {best['epoch']}: final ELBO"),
                  evaluate(best_model, best_obs, test_pixels, args, device, k=args.iwae_k, images=iwae_images,
                           generator=generator, desc=f"selected epoch {best['epoch']}: IWAE-{args.iwae_k}"),
                  evaluate(best_model, best_obs, train_pixels, args, device, images=eval_images, generator=generator,
                           desc=f"selected epoch {best['epoch']}: final ELBO, training images"))
    return {"epoch": best["epoch"], "step": best["step"], "valid": best["valid"], "curve": selection["curve"],
            **dict(zip(["final", "iwae", "final_train"], bounds))}


def append_run(out, record):
    """One line in <out>/runs.jsonl, and table2.md rewritten from it; runs finishing together (Table 2 rows trained
    side by side) take turns, so that neither loses the other's row."""
    with open(os.path.join(out, "runs.jsonl"), "a") as f:
        if fcntl:
            fcntl.flock(f, fcntl.LOCK_EX)  # released when f closes
        f.write(json.dumps(record) + "\n")
        f.flush()
        write_table2(out)


def edge_pixels(x, jump=0.25):
    """(B, C, H, W) images in [0, 1] -> bool mask of the pixels that differ from a 4-neighbour by more than `jump`: the
    frontiers between dark and bright regions (App. B.1)."""
    edges = torch.zeros_like(x, dtype=torch.bool)
    across, down = (x[..., :, 1:] - x[..., :, :-1]).abs() > jump, (x[..., 1:, :] - x[..., :-1, :]).abs() > jump
    edges[..., :, 1:] |= across
    edges[..., :, :-1] |= across
    edges[..., 1:, :] |= down
    edges[..., :-1, :] |= down
    return edges


def reconstruction_measures(x, mean, log_sigma):
    """The paper's qualitative claims of App. B.1 as numbers, on test images x and their reconstructions (mean and
    log sigma of p(x|z), z = the encoder's mean): PSNR in dB of the means clipped to [0, 1] (how closely they match
    the details), and for a per-pixel sigma the ratio of its geometric mean on edge pixels to that elsewhere ("LV-VAE
    retains larger sigma values at the frontier between the black and white regions"); None for a scalar sigma."""
    squared_error = ((mean.clamp(0, 1) - x) ** 2).mean().item()
    psnr_db = -10 * math.log10(squared_error) if squared_error > 0 else math.inf
    if log_sigma.shape != x.shape:
        return psnr_db, None
    edges = edge_pixels(x)
    return psnr_db, math.exp((log_sigma[edges].mean() - log_sigma[~edges].mean()).item())


def record_run(args, model, obs, test_pixels, final, iwae, record, out, device):
    """The final figures, one line in <out>/runs.jsonl and <out>/table2.md rewritten from it (rank 0)."""
    with torch.no_grad():
        model.eval(), obs.eval()
        x = to_unit(test_pixels[:256], device)
        mean, log_sigma = obs(model.decode(model.encode(x)[0]), x)  # the reconstructions
        sigma = log_sigma.exp()
        model.train(), obs.train()
    psnr_db, edge_sigma_ratio = reconstruction_measures(x, mean, log_sigma)
    sigma_summary = f"{sigma.mean().item():.4g}" if sigma.numel() == 1 else \
        f"per pixel: median {sigma.median().item():.3g}, min {sigma.min().item():.3g}, max {sigma.max().item():.3g}"
    record.update(dataset=args.dataset, sigma=args.sigma, sigma_value=args.sigma_value, lv_warmup=args.lv_warmup,
                  lv_fresh_adam=args.lv_fresh_adam, lv_warmup_sigma=args.lv_warmup_sigma,
                  lv_handover_sigma=args.lv_handover_sigma, celeba_extra_train=args.celeba_extra_train,
                  kl_weight=args.kl_weight,
                  likelihood=args.likelihood, seed=args.seed,
                  epochs=args.epochs, final=final, iwae=iwae, iwae_k=args.iwae_k, dtype=args.dtype,
                  compile=args.compile, sigma_summary=sigma_summary + (" (sqrt of the training MSE)"
                                                                       if args.sigma == "optimal" else ""),
                  psnr_db=psnr_db, edge_sigma_ratio=edge_sigma_ratio)
    os.makedirs(out, exist_ok=True)
    name = figure_stem(record)
    grids = list(figures(model, obs, test_pixels, device, torch.Generator(device).manual_seed(0))[0].items())
    title = f"{args.dataset}, {setting_name(vars(args))}, {args.likelihood} " \
        f"likelihood, {args.epochs} epoch(s)"
    for kind, part in zip(FIGURE_KINDS, [grids[:2], grids[2:]]):
        save_grids(dict(part), os.path.join(out, f"{name}_{kind}.png"), title, record["command"])
    append_run(out, record)
    print(f"final: {json.dumps(final)}\nIWAE-{args.iwae_k}: {json.dumps(iwae)}\nwrote {out}/table2.md, "
          + ", ".join(f"{name}_{kind}.png" for kind in FIGURE_KINDS))


# --- main ---


def main(args):
    # --- arguments and resume ---
    rank, world_size, local_rank, device = init_distributed(args)
    launcher = "python" if world_size == 1 else \
        f"torchrun --nnodes {world_size // int(os.environ.get('LOCAL_WORLD_SIZE', world_size))} " \
        f"--nproc_per_node {os.environ.get('LOCAL_WORLD_SIZE', world_size)}"
    command = command_line(launcher, sys.argv)
    state = None
    if args.resume:
        state, args = read_resume(args, device)
    resolve_defaults(args, device, world_size)
    random.seed(args.seed), np.random.seed(args.seed), torch.manual_seed(args.seed)
    run_dir = os.path.dirname(os.path.abspath(args.resume)) if args.resume else \
        os.path.join(args.logdir, run_name("train_images", args.dataset, args.sigma, args.seed))
    error = None
    if rank == 0:  # the folders rank 0 writes, checked before the data and the training, not when the run ends
        try:
            for flag, folder in [("--out", args.out), ("--logdir" if state is None else "--resume's folder", run_dir)]:
                if folder:
                    writable_folder(folder, flag)
        except SystemExit as stop:
            error = stop.code
    stop_together(error, device)

    # --- data ---
    train_pixels, valid_pixels, test_pixels = load_data(args, local_rank, world_size, device)
    global_batch = args.batch_size * world_size
    steps_per_epoch = len(train_pixels) // global_batch  # the last partial batch sits each epoch out
    if steps_per_epoch == 0:
        raise SystemExit(f"error: {len(train_pixels)} training images make no global batch of {global_batch}; "
                         "lower --batch-size")
    eval_images = min(args.eval_images or 10000, len(test_pixels))
    iwae_images = min(args.iwae_images or 1000, eval_images)

    # --- model, optimizer, state ---
    model, obs, step_module, optimizer = build(args, device, world_size)
    data_generator = torch.Generator().manual_seed(args.seed)
    start_epoch, step, position, seconds_before, test = 0, 0, 0, 0.0, None
    # --valid-images: every evaluated epoch's validation ELBO and the weights where it was highest (on the CPU)
    selection = None if valid_pixels is None else {"curve": [], "best": None}
    curves = []  # every evaluated epoch: [epoch, test, training-image, validation (or None) ELBO in nats/image]
    if state is not None:
        start_epoch, step, position, seconds_before, test = restore(state, args, model, obs, optimizer,
                                                                    data_generator, device)
        selection, curves = state.get("selection", selection), state.get("curves", curves)
    checkpoint_path, last_checkpoint = os.path.join(run_dir, "ckpt.pt"), state and f"{args.resume} (step {step})"
    guard = NanGuard(optimizer, step, device)
    step_fn = with_test_hooks(step_function(args), step, list(model.parameters()))
    signals_received = []  # a signal only sets this; the loop finishes its step, saves and exits
    for name in (signal.SIGINT, signal.SIGTERM):
        signal.signal(name, lambda number, frame: signals_received.append(number))
    if world_size > 1:  # once rank 0 says it started, every rank has its handlers
        dist.barrier()
    writer = None
    if rank == 0:
        os.makedirs(run_dir, exist_ok=True)
        writer = make_writer(run_dir, args)
        announce(args, model, train_pixels, test_pixels, steps_per_epoch, eval_images, iwae_images, world_size,
                 device, run_dir, valid_pixels)

    def save(epoch, position, data_rng):
        """ckpt.pt (rank 0): resuming from it draws epoch `epoch`'s order from data_rng and skips `position` images."""
        if rank == 0:
            save_checkpoint(checkpoint_path, {
                "model": model.state_dict(), "obs": obs.state_dict(), "optimizer": optimizer.state_dict(),
                "epoch": epoch, "position": position, "step": step, "world_size": world_size,
                "args": {k: v for k, v in vars(args).items() if k != "resume"},
                "data_rng": data_rng, "torch_rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state() if device.type == "cuda" else None, "test": test,
                "selection": selection, "curves": curves, "wall_seconds": seconds_before + time.time() - started})
        return f"{checkpoint_path} (step {step})"

    def sync(epoch, where, position, data_rng):
        """The host reads the guard (a sync) and every rank's signals (a collective): after a non-finite step, stop
        with one line; after a signal, save and exit with 128 + signal."""
        bad = guard.read()
        if bad is not None:
            raise SystemExit(
                f"error: non-finite {bad[1]} at step {bad[0]} (epoch {epoch + 1}, {SIGMA_NAMES[args.sigma]}, "
                f"{args.likelihood} likelihood); its update and every later one were skipped and nothing saved, the "
                f"last good checkpoint is {last_checkpoint or 'none: no epoch had finished'}; likely fix: "
                f"{likely_fix(args)}" if rank == 0 else 1)
        [signum] = max_over_ranks(torch.tensor([float(max(signals_received, default=0))], device=device))
        if signum:
            saved = save(epoch, position, data_rng)
            if world_size > 1:
                dist.barrier()
            if rank == 0:
                print(f"train_images: {signal.Signals(int(signum)).name} received; stopped after {where}, saved "
                      f"{saved}; continue with: {launcher} {sys.argv[0]} --resume {checkpoint_path} --epochs "
                      f"{args.epochs}" + (f" --out {args.out}" if args.out else ""), file=sys.stderr)
            raise SystemExit(128 + int(signum))

    # --- training loop ---
    started, first_step = time.time(), step
    meter, logged = torch.zeros(4, device=device), (step, time.time())  # sums of train_step's terms since `logged`
    for epoch in range(start_epoch, args.epochs):
        epoch_data_rng = data_generator.get_state()
        order = torch.randperm(len(train_pixels), generator=data_generator)[: steps_per_epoch * global_batch]
        order = order.to(device).view(steps_per_epoch, world_size, args.batch_size)  # global batches, rank slices
        for batch in range(position // global_batch, steps_per_epoch):
            # The global batch's noise is drawn on every rank, each taking its rows: the RNGs stay in step.
            eps = torch.randn(world_size, args.batch_size, model.latent_dim, device=device)[rank]
            meter += step_fn(step_module, optimizer, guard, train_pixels[order[batch, rank]], eps,
                             args.compile == "reduce-overhead")
            step, position = step + 1, position + global_batch
            if step == args.lv_warmup:
                hand_over(args, model, obs, optimizer, train_pixels, device)
            log_now = step % args.log_every == 0 or step == first_step + 1 or batch == steps_per_epoch - 1
            if log_now or (world_size == 1 and signals_received):  # one process may stop at any step, ranks at logs
                sync(epoch, f"step {step} (epoch {epoch + 1}, {position} of {steps_per_epoch * global_batch} images)",
                     position, epoch_data_rng)
            if log_now:
                loss, recon_nll, kl, log_sigma = (meter / (step - logged[0])).tolist()  # means since the last log
                elbo = -recon_nll - kl  # -loss, unless --kl-weight weights the KL
                images_per_second = (step - logged[0]) * global_batch / max(time.time() - logged[1], 1e-9)
                meter.zero_()
                logged = step, time.time()
                if rank == 0:
                    for key, value in [("elbo", elbo), ("recon_nll", recon_nll), ("kl", kl),
                                       ("log_sigma_mean", log_sigma), ("charts/images_per_sec", images_per_second)] \
                            + [("objective", -loss)] * (args.kl_weight != 1):  # what --kl-weight maximises
                        writer.add_scalar(key if "/" in key else f"train/{key}", value, step)  # rank 0's share
                    print(f"epoch {epoch + 1} step {step}: elbo {elbo:.1f} kl {kl:.1f} log sigma {log_sigma:.2f} "
                          f"{images_per_second:,.0f} img/s", flush=True)
        position = 0
        if (epoch + 1) % args.eval_every == 0 or epoch + 1 == args.epochs:  # evaluation, figures, checkpoint
            # Evaluation draws from the global RNGs: fork them, so that how often a run evaluates leaves its training
            # noise as it was (tested), and under torchrun the ranks, which draw different evaluation noise, stay in
            # step
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                if args.sigma == "optimal":
                    set_optimal_sigma(model, obs, train_pixels, args, device)
                test = evaluate(model, obs, test_pixels, args, device, images=eval_images, bf16=args.dtype == "bf16",
                                desc=f"evaluating epoch {epoch + 1}")
                seen = evaluate(model, obs, train_pixels, args, device, images=eval_images, bf16=args.dtype == "bf16",
                                generator=torch.Generator(device).manual_seed(1 + rank),  # training noise untouched
                                desc=f"evaluating epoch {epoch + 1}, training images")
                valid = None if selection is None else evaluate(
                    model, obs, valid_pixels, args, device, bf16=args.dtype == "bf16",
                    generator=torch.Generator(device).manual_seed(2 + rank), desc=f"evaluating epoch {epoch + 1}, "
                    "validation images")
            curves.append([epoch + 1, test["nats_per_image"], seen["nats_per_image"],
                           valid and valid["nats_per_image"]])
            if valid is not None:  # the same value on every rank (all-reduced): they keep the same weights
                selection["curve"].append([epoch + 1, valid["nats_per_image"]])
                best = selection["best"]
                if best is None or valid["nats_per_image"] > best["valid"]["nats_per_image"]:
                    on_cpu = lambda module: {key: value.detach().to("cpu", copy=True)
                                             for key, value in module.state_dict().items()}
                    selection["best"] = {"epoch": epoch + 1, "step": step, "valid": valid, "model": on_cpu(model),
                                         "obs": on_cpu(obs)}
            if rank == 0:
                for prefix, values in [("eval", test), ("eval_train", seen), ("eval_valid", valid or {})]:
                    for key, value in values.items():
                        if value is not None:
                            writer.add_scalar(f"{prefix}/{key}", value, step)
                grids, log_sigma = figures(model, obs, test_pixels, device, torch.Generator(device).manual_seed(0))
                for tag, grid in zip(FIGURE_TAGS, grids.values()):
                    writer.add_image(f"eval/{tag}", grid, step, dataformats="HWC")
                log_sigma_stats(writer, "eval", log_sigma, step)
                print(f"epoch {epoch + 1}: test ELBO {test['nats_per_image']:.2f} nats/image (on as many training "
                      f"images: {seen['nats_per_image']:.2f}), 8-bit {test['bits_per_dim_8bit']:.3f} bits/dim"
                      + ("" if valid is None else f"; validation ELBO {valid['nats_per_image']:.2f} (best: epoch "
                         f"{selection['best']['epoch']})"))
            last_checkpoint = save(epoch + 1, 0, data_generator.get_state())
        sync(epoch + 1, f"epoch {epoch + 1}", 0, data_generator.get_state())
    train_seconds = seconds_before + time.time() - started

    # --- final evaluation, in fp32: Table 2 and figures; sigma-VAE's sigma was set from this model at its last epoch
    generator = torch.Generator(device).manual_seed(1 + rank)
    final = evaluate(model, obs, test_pixels, args, device, images=eval_images, generator=generator, desc="final ELBO")
    iwae = evaluate(model, obs, test_pixels, args, device, k=args.iwae_k, images=iwae_images, generator=generator,
                    desc=f"final IWAE-{args.iwae_k}")
    seen = evaluate(model, obs, train_pixels, args, device, images=eval_images, generator=generator,
                    desc="final ELBO, training images")  # the same bound on as many training images: the gap
    selected = None if selection is None else evaluate_selected(
        selection, model, obs, (final, iwae, seen), (test_pixels, train_pixels), args, device, eval_images, iwae_images)
    if rank == 0:
        writer.close()
        record = dict(train_images=len(train_pixels), iwae_images=iwae_images, train_minutes=train_seconds / 60,
                      wall_minutes=(seconds_before + time.time() - started) / 60, processes=world_size,
                      batch_size=args.batch_size * world_size,
                      hardware=hardware(device) if world_size == 1 else f"{world_size} x {hardware(device)}",
                      command=command, run_dir=inside_repository(run_dir), final_train=seen, curves=curves,
                      **({} if selected is None else {"valid_images": len(valid_pixels), "selected": selected}))
        record_run(args, model, obs, test_pixels, final, iwae, record, args.out or run_dir, device)
    if world_size > 1:
        # The ranks leave together, once rank 0 has written the record. A rank that reached interpreter shutdown
        # straight after its last all-reduce aborted (SIGABRT) in ~2% of 2-process CPU runs, failing the job and
        # stopping rank 0 however far it had got: gloo's worker thread frees that all-reduce's tensors late and needs
        # the GIL to do so, and the process group outlives destroy_process_group once DDP has held it, so its threads
        # run into the shutdown.
        dist.barrier()


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
