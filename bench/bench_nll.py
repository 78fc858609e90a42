"""Forward + backward time, bandwidth and peak extra memory of the per-sample Gaussian NLL (Eq. 11), three ways.

Eager PyTorch (kernels.gaussian_nll.gaussian_nll_reference), torch.compile of that same function, and the fused
Triton kernels (kernels/gaussian_nll.py), on MNIST (1x28x28) and CelebA (3x64x64) shapes with a per-pixel
log_sigma, batches 64 to 4096, fp32 and bf16. Two timings per row, both by triton.testing.do_bench (median, the L2
cache flushed before every call): the call as Python launches it, and the call replayed from a CUDA graph, which
leaves out the host's launch gaps (what a training step under CUDA graphs pays). Needs a CUDA device and Triton;
without them it writes a file saying that the GPU figures are still to be measured, and exits 0. Writes
results/bench_nll.md.

    python bench/bench_nll.py
    python bench/bench_nll.py --datasets celeba --batch-sizes 256 4096 --dtypes bf16 --rep-ms 50
    python bench/bench_nll.py --batch-sizes 4096 --sweep        # + the kernels' block sizes and warps
"""

import argparse
import math
import os
import platform
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import kernels.gaussian_nll as nll_module  # noqa: E402
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
parser.add_argument("--warmup-ms", type=int, default=25,
                    help="do_bench's warm-up, in ms, after one untimed call that compiles (default 25)")
parser.add_argument("--rep-ms", type=int, default=100, help="do_bench's timed repetitions, in ms (default 100)")
parser.add_argument("--copy-mib", type=int, default=1024,
                    help="size in MiB of the tensor copied device-to-device to measure copy bandwidth (default 1024)")
parser.add_argument("--sweep", action="store_true",
                    help="then time the Triton kernels' launch configurations (block size x warps) at the CelebA "
                         "shape and the largest N, to choose kernels/gaussian_nll.py's MAX_BLOCK_SIZE and NUM_WARPS")
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

if not torch.cuda.is_available() or not TRITON_AVAILABLE:
    write_report([
        TITLE,
        "",
        COMMAND,
        "",
        "**The GPU figures are still to be measured.** This run found no CUDA device or no Triton "
        f"(hardware: {cpu_name()}; torch {torch.__version__}), so nothing was timed and this file holds no numbers. "
        "Run `python bench/bench_nll.py` on a machine with a CUDA GPU to write the table: forward+backward time, "
        "achieved bandwidth beside the device-to-device copy bandwidth, and peak extra memory, for "
        f"{', '.join(args.datasets)} x batches {', '.join(map(str, args.batch_sizes))} x {', '.join(args.dtypes)} "
        f"x {', '.join(args.methods)}.",
    ])
    print("no CUDA device or no Triton: the GPU figures are still to be measured")
    sys.exit(0)

device = torch.device("cuda")
methods = list(args.methods)
notes = []


# --- timing and memory ---


def time_ms(step):
    """(ms per call, ms per call replayed from a CUDA graph or None where the call cannot be captured): do_bench's
    median, the L2 cache flushed before each call."""
    import triton.testing

    step()  # compiles, if it will
    launched = triton.testing.do_bench(step, warmup=args.warmup_ms, rep=args.rep_ms, return_mode="median")
    try:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm up off the default stream, as capture needs
            for _ in range(3):
                step()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step()
        replayed = triton.testing.do_bench(graph.replay, warmup=args.warmup_ms, rep=args.rep_ms, return_mode="median")
    except Exception as error:  # a capture failure is a finding, not the end of the benchmark
        notes.append(f"CUDA graph capture failed once: {type(error).__name__}: {str(error).splitlines()[0][:200]}")
        replayed = None
    return launched, replayed


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
    # random bytes, never zeros or an untouched allocation: the memory system may move those faster than data
    source = torch.randint(0, 256, (args.copy_mib * 2**20,), dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    milliseconds, _ = time_ms(lambda: target.copy_(source))
    del source, target
    return 2 * args.copy_mib * 2**20 / (milliseconds * 1e-3) / 1e9


def loss_function(method):
    if method == "eager":
        return gaussian_nll_reference
    if method == "compile":
        torch._dynamo.reset()  # a fresh compile per shape and dtype, never the dynamic-shape fallback
        return torch.compile(gaussian_nll_reference, dynamic=False)
    return lambda x, mean, log_sigma: gaussian_nll(x, mean, log_sigma, backend="triton")


def nll_inputs(shape, dtype_name):
    """x, mean, log_sigma of shape (N, C, H, W) in the dtype, seeded, mean and log_sigma requiring gradients, and
    the (N,) upstream gradient of loss = nll.sum()."""
    generator = torch.Generator(device).manual_seed(0)
    x = torch.rand(shape, generator=generator, device=device)  # pixels in [0, 1]
    mean = x + 0.1 * torch.randn(shape, generator=generator, device=device)
    log_sigma = -4 * torch.rand(shape, generator=generator, device=device)  # sigma in [0.018, 1]
    x, mean, log_sigma = (t.to(DTYPES[dtype_name]) for t in (x, mean, log_sigma))
    mean.requires_grad_(), log_sigma.requires_grad_()
    return x, mean, log_sigma, torch.ones(shape[0], device=device)


# --- report ---


def targets():
    """The kernel's targets at the CelebA shape and the largest N, fp32 and bf16, by the CUDA-graph times."""
    lines, n = [], max(args.batch_sizes)
    for dtype_name in args.dtypes:
        ms = {method: timings.get(("celeba", n, dtype_name, method)) for method in METHODS}
        if None in ms.values():
            continue
        moved_bytes = 8 * n * math.prod(IMAGE_SHAPES["celeba"]) * DTYPES[dtype_name].itemsize
        share = moved_bytes / (ms["triton"] * 1e-3) / 1e9 / copy_gbs
        lines.append(f"- CelebA, N = {n}, {dtype_name}: Triton {ms['eager'] / ms['triton']:.2f}x eager (target >= 3), "
                     f"{ms['compile'] / ms['triton']:.2f}x torch.compile (target >= 1.3), {100 * share:.0f}% of the "
                     "copy bandwidth (target >= 75%)")
    return ["Targets, from the CUDA-graph times:", "", *lines, ""] if lines else []


def sweep(report):
    """The Triton kernels' fwd+bwd time by launch configuration, CelebA shape, largest N, replayed from a CUDA
    graph: the figures by which to set MAX_BLOCK_SIZE and NUM_WARPS (the defaults are marked, and timed again last:
    the spread of two timings of one configuration). The file is rewritten after every row, so a time box keeps
    what ran."""
    n, lines = max(args.batch_sizes), []
    default = (nll_module.MAX_BLOCK_SIZE, nll_module.NUM_WARPS)
    row_elements = math.prod(IMAGE_SHAPES["celeba"])  # (C, H, W): one sample's row
    default_warps = nll_module._launch_config(row_elements)[2] if default[1] is None else default[1]
    section = lambda: ["", f"## Launch configurations of the Triton kernels (CelebA, N = {n})", "",
                       "Forward + backward by MAX_BLOCK_SIZE (elements of a row per program) and NUM_WARPS; bandwidth "
                       "share from the CUDA-graph time (the launched time where capture failed). The default "
                       "configuration is timed first in its place and again after the others: the difference between "
                       "the two is the run-to-run spread, below which two configurations do not differ.", "",
                       "| dtype | block | warps | launched ms | CUDA graph ms | of copy BW |",
                       "|---|---|---|---|---|---|", *lines]
    for dtype_name in args.dtypes:
        x, mean, log_sigma, upstream = nll_inputs((n,) + IMAGE_SHAPES["celeba"], dtype_name)
        moved_bytes = 8 * x.numel() * x.element_size()
        configs = [(block, warps) for block in [1024, 2048, 4096, 8192] for warps in [4, 8, 16]]
        for i, (block_size, num_warps) in enumerate(configs + [(default[0], default_warps)]):
            again = i == len(configs)  # the last row of this dtype: the default again
            nll_module.MAX_BLOCK_SIZE, nll_module.NUM_WARPS = block_size, num_warps
            step = lambda: torch.autograd.grad(gaussian_nll(x, mean, log_sigma, backend="triton"),
                                               (mean, log_sigma), upstream)
            mark = (" (default, again)" if again else " (default)") \
                if (block_size, num_warps) == (default[0], default_warps) else ""
            try:
                launched, replayed = time_ms(step)
                share = moved_bytes / ((replayed or launched) * 1e-3) / 1e9 / copy_gbs
                lines.append(f"| {dtype_name} | {block_size} | {num_warps}{mark} | {launched:.4f} | "
                             f"{'n/a' if replayed is None else f'{replayed:.4f}'} | {100 * share:.0f}% |")
            except Exception as error:  # e.g. too many registers: a finding
                lines.append(f"| {dtype_name} | {block_size} | {num_warps}{mark} | failed: {type(error).__name__} "
                             "| | |")
            print(lines[-1], flush=True)
            write_report(report + section())
        del x, mean, log_sigma
    nll_module.MAX_BLOCK_SIZE, nll_module.NUM_WARPS = default


import triton  # noqa: E402  (present: checked at the top)

properties = torch.cuda.get_device_properties(device)


def main_report():
    """The file's header and main table, from the rows timed so far."""
    return [
        TITLE,
        "",
        COMMAND,
        "",
        f"Hardware: {properties.name} ({properties.total_memory / 2**30:.0f} GiB), host CPU {cpu_name()}; "
        f"torch {torch.__version__}, CUDA {torch.version.cuda}, triton {triton.__version__}.",
        "",
        f"Device-to-device copy bandwidth, measured in this run: **{copy_gbs:.0f} GB/s** "
        f"(a {args.copy_mib} MiB tensor `.copy_`, counted as read + write).",
        "",
        "Each row: x, mean and a per-pixel log_sigma of shape (N, C, H, W) in the given dtype; one call computes the "
        "(N,) per-sample NLL and its gradients with respect to mean and log_sigma (`torch.autograd.grad`, upstream "
        "gradient 1). Times: `triton.testing.do_bench`, median over "
        f"{args.rep_ms} ms of calls after {args.warmup_ms} ms of warm-up (and one call that compiles), the L2 cache "
        "flushed before every call; 'launched' is the call as Python launches it, host gaps between its kernels "
        "included, 'CUDA graph' the same call captured once and replayed, GPU time alone. GB/s: 8 N·D·itemsize bytes "
        "(the fused kernels read x, mean, log_sigma in the forward and again in the backward, and write the two "
        "gradients) divided by the time; every method is credited with these same bytes. Peak extra: "
        "`torch.cuda.max_memory_allocated()` during one call minus the memory allocated before it; it includes the two "
        "returned gradients (column 'gradients'), which every method must allocate. Last column: max |nll - eager| / "
        "max |eager| of the forward.",
        *([""] + sorted(set(notes)) if notes else []),
        "",
        *targets(),
        "| data | N | dtype | method | launched: fwd+bwd ms | GB/s | of copy BW | CUDA graph: fwd+bwd ms | GB/s "
        "| of copy BW | peak extra MiB | gradients MiB | fwd rel. diff. vs eager |",
        "|" + "---|" * 13,
        *rows,
    ]


# --- measurements ---

copy_gbs = copy_bandwidth_gbs()
print(f"device-to-device copy: {copy_gbs:.0f} GB/s", flush=True)
rows, timings = [], {}  # timings: (dataset, N, dtype, method) -> ms, the CUDA-graph time where there is one
for dataset in args.datasets:
    for batch_size in args.batch_sizes:
        for dtype_name in args.dtypes:
            x, mean, log_sigma, upstream = nll_inputs((batch_size,) + IMAGE_SHAPES[dataset], dtype_name)
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

                launched, replayed = time_ms(step)
                timings[dataset, batch_size, dtype_name, method] = replayed or launched
                extra_mib = peak_extra_mib(step)
                nll = function(x, mean, log_sigma).detach()
                relative_diff = ((nll - reference_nll).abs().max() / reference_nll.abs().max()).item()
                cells = []
                for milliseconds in (launched, replayed):
                    bandwidth_gbs = moved_bytes / (milliseconds * 1e-3) / 1e9 if milliseconds else None
                    cells.append("n/a | n/a | n/a" if milliseconds is None else
                                 f"{milliseconds:.4f} | {bandwidth_gbs:.0f} | {100 * bandwidth_gbs / copy_gbs:.0f}%")
                rows.append(f"| {dataset} | {batch_size} | {dtype_name} | {method} | {' | '.join(cells)} "
                            f"| {extra_mib:.1f} | {gradient_mib:.1f} | {relative_diff:.1e} |")
                print(rows[-1], flush=True)
                write_report(main_report())  # after every row: a time box keeps what ran
            del x, mean, log_sigma, upstream, reference_nll

write_report(main_report())
if args.sweep:
    sweep(main_report())
