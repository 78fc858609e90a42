"""Forward + backward time, bandwidth and peak extra memory of the per-sample Gaussian NLL (Eq. 11), three ways.

Eager PyTorch (kernels.gaussian_nll.gaussian_nll_reference), torch.compile of that same function, and the fused
Triton kernels (kernels/gaussian_nll.py), on MNIST (1x28x28) and CelebA (3x64x64) shapes with a per-pixel
log_sigma, batches 64 to 4096, fp32 and bf16. Needs a CUDA device; without one it writes a file saying that the
GPU figures are still to be measured, and exits 0. Writes results/bench_nll.md.

    python bench/bench_nll.py
    python bench/bench_nll.py --datasets celeba --batch-sizes 256 4096 --dtypes bf16 --iters 50
"""

import argparse
import os
import platform
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from kernels.gaussian_nll import TRITON_AVAILABLE, gaussian_nll, gaussian_nll_reference  # noqa: E402

IMAGE_SHAPES = {"mnist": (1, 28, 28), "celeba": (3, 64, 64)}  # (C, H, W)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
METHODS = ["eager", "compile", "triton"]

parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
parser.add_argument("--datasets", nargs="+", choices=list(IMAGE_SHAPES), default=list(IMAGE_SHAPES),
                    help="image shapes: mnist 1x28x28, celeba 3x64x64 (default both)")
parser.add_argument("--batch-sizes", type=int, nargs="+", default=[64, 256, 1024, 4096],
                    help="batch sizes N, in samples (default 64 256 1024 4096)")
parser.add_argument("--dtypes", nargs="+", choices=list(DTYPES), default=list(DTYPES),
                    help="dtype of x, mean and log_sigma; sums are fp32 in every method (default fp32 bf16)")
parser.add_argument("--methods", nargs="+", choices=METHODS, default=METHODS,
                    help="eager: the PyTorch reference; compile: torch.compile of it; triton: the fused kernels "
                         "(default all three)")
parser.add_argument("--warmup", type=int, default=10,
                    help="untimed forward+backward calls before timing, which include compilation (default 10)")
parser.add_argument("--iters", type=int, default=100, help="timed forward+backward calls per row (default 100)")
parser.add_argument("--copy-mib", type=int, default=1024,
                    help="size in MiB of the tensor copied device-to-device to measure copy bandwidth (default 1024)")
parser.add_argument("--out", default="results/bench_nll.md",
                    help="where the Markdown table goes (default results/bench_nll.md)")
args = parser.parse_args()


def write_report(lines):
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        f.write("\n".join(lines) + "\n")
    print(f"wrote {args.out}")


def cpu_name():
    names = [line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")] \
        if os.path.exists("/proc/cpuinfo") else []
    return names[0] if names else platform.processor() or platform.machine()


TITLE = "# Gaussian NLL (Eq. 11): forward + backward, eager vs torch.compile vs Triton"
COMMAND = f"Command: `python {' '.join(sys.argv)}`"

if not torch.cuda.is_available():
    write_report([
        TITLE,
        "",
        COMMAND,
        "",
        "**The GPU figures are still to be measured.** This run found no CUDA device "
        f"(hardware: {cpu_name()}; torch {torch.__version__}), so nothing was timed and this file holds no numbers. "
        "Run `python bench/bench_nll.py` on a machine with a CUDA GPU to write the table: forward+backward time, "
        "achieved bandwidth beside the device-to-device copy bandwidth, and peak extra memory, for "
        f"{', '.join(args.datasets)} x batches {', '.join(map(str, args.batch_sizes))} x {', '.join(args.dtypes)} "
        f"x {', '.join(args.methods)}.",
    ])
    print("no CUDA device: the GPU figures are still to be measured")
    sys.exit(0)

device = torch.device("cuda")
methods = list(args.methods)
notes = []
if not TRITON_AVAILABLE:  # torch.compile's CUDA backend generates Triton code too
    methods = [method for method in methods if method == "eager"]
    notes.append("Triton is not installed here: the compile and triton rows were skipped.")


# --- timing and memory ---


def time_ms(step):
    """Mean wall time of one call on the GPU, by CUDA events around args.iters calls after args.warmup calls."""
    for _ in range(args.warmup):
        step()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(args.iters):
        step()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / args.iters


def peak_extra_mib(step):
    """Peak memory allocated during one call, above what was allocated before it (inputs excluded)."""
    torch.cuda.synchronize()
    baseline = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - baseline) / 2**20


def copy_bandwidth_gbs():
    """Device-to-device copy bandwidth: a large tensor .copy_ reads and writes its bytes once each."""
    source = torch.empty(args.copy_mib * 2**20, dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    milliseconds = time_ms(lambda: target.copy_(source))
    del source, target
    return 2 * args.copy_mib * 2**20 / (milliseconds * 1e-3) / 1e9


def loss_function(method):
    if method == "eager":
        return gaussian_nll_reference
    if method == "compile":
        torch._dynamo.reset()  # a fresh compile per shape and dtype, never the dynamic-shape fallback
        return torch.compile(gaussian_nll_reference, dynamic=False)
    return lambda x, mean, log_sigma: gaussian_nll(x, mean, log_sigma, backend="triton")


# --- measurements ---

copy_gbs = copy_bandwidth_gbs()
print(f"device-to-device copy: {copy_gbs:.0f} GB/s", flush=True)
rows = []
for dataset in args.datasets:
    for batch_size in args.batch_sizes:
        for dtype_name in args.dtypes:
            shape = (batch_size,) + IMAGE_SHAPES[dataset]  # (N, C, H, W)
            generator = torch.Generator(device).manual_seed(0)
            x = torch.rand(shape, generator=generator, device=device)  # pixels in [0, 1]
            mean = x + 0.1 * torch.randn(shape, generator=generator, device=device)
            log_sigma = -4 * torch.rand(shape, generator=generator, device=device)  # sigma in [0.018, 1]
            x, mean, log_sigma = (t.to(DTYPES[dtype_name]) for t in (x, mean, log_sigma))
            mean.requires_grad_(), log_sigma.requires_grad_()
            upstream = torch.ones(batch_size, device=device)  # (N,) d loss / d nll, as for loss = nll.sum()
            # Bytes of the fused forward+backward: the forward reads x, mean, log_sigma; the backward reads them
            # again and writes grad_mean and grad_log_sigma: 8 tensors of N*D elements. The (N,) fp32 output,
            # its gradient and the per-chunk partial sums are under 0.1% and left out. Every method is credited
            # with these same bytes, so the column reads as useful bytes per second.
            moved_bytes = 8 * x.numel() * x.element_size()
            gradient_mib = 2 * x.numel() * x.element_size() / 2**20  # grad_mean + grad_log_sigma, any method
            reference_nll = gaussian_nll_reference(x, mean, log_sigma).detach()
            for method in methods:
                function = loss_function(method)

                def step():
                    nll = function(x, mean, log_sigma)
                    return torch.autograd.grad(nll, (mean, log_sigma), upstream)

                milliseconds = time_ms(step)
                extra_mib = peak_extra_mib(step)
                nll = function(x, mean, log_sigma).detach()
                relative_diff = ((nll - reference_nll).abs().max() / reference_nll.abs().max()).item()
                bandwidth_gbs = moved_bytes / (milliseconds * 1e-3) / 1e9
                rows.append(
                    f"| {dataset} | {batch_size} | {dtype_name} | {method} | {milliseconds:.4f} | {bandwidth_gbs:.0f} "
                    f"| {100 * bandwidth_gbs / copy_gbs:.0f}% | {extra_mib:.1f} | {gradient_mib:.1f} "
                    f"| {relative_diff:.1e} |"
                )
                print(rows[-1], flush=True)
            del x, mean, log_sigma, upstream, reference_nll

# --- report ---

properties = torch.cuda.get_device_properties(device)
triton_version = "not installed"
if TRITON_AVAILABLE:
    import triton

    triton_version = triton.__version__
write_report([
    TITLE,
    "",
    COMMAND,
    "",
    f"Hardware: {properties.name} ({properties.total_memory / 2**30:.0f} GiB), host CPU {cpu_name()}; "
    f"torch {torch.__version__}, CUDA {torch.version.cuda}, triton {triton_version}.",
    "",
    f"Device-to-device copy bandwidth, measured in this run: **{copy_gbs:.0f} GB/s** "
    f"(a {args.copy_mib} MiB tensor `.copy_`, counted as read + write).",
    "",
    "Each row: x, mean and a per-pixel log_sigma of shape (N, C, H, W) in the given dtype; one call computes the "
    "(N,) per-sample NLL and its gradients with respect to mean and log_sigma (`torch.autograd.grad`, upstream "
    f"gradient 1). Time: CUDA events over {args.iters} calls after {args.warmup} warm-up calls (compilation "
    "included in the warm-up). GB/s: 8 N·D·itemsize bytes (the fused kernels read x, mean, log_sigma in the "
    "forward and again in the backward, and write the two gradients) divided by the time; every method is "
    "credited with these same bytes. Peak extra: `torch.cuda.max_memory_allocated()` during one call minus "
    "the memory allocated before it; it includes the two returned gradients (column 'gradients'), which every "
    "method must allocate. Last column: max |nll - eager| / max |eager| of the forward.",
    *([""] + notes if notes else []),
    "",
    "| data | N | dtype | method | fwd+bwd ms | GB/s | of copy BW | peak extra MiB | gradients MiB "
    "| fwd rel. diff. vs eager |",
    "|---|---|---|---|---|---|---|---|---|---|",
    *rows,
])
