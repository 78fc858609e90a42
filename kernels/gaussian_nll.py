"""Per-sample Gaussian negative log-likelihood (Eq. 11, per-pixel learned log sigma), fused forward + backward.

Forward. For one sample x of D elements (every non-batch dimension, flattened) and decoder outputs mu, log_sigma
of the same shape, sigma = exp(log_sigma):

    l_i = 0.5 * ((x_i - mu_i) / sigma_i)**2 + log_sigma_i + 0.5 * log(2*pi)        # Eq. 11, per element
    nll = sum_i l_i                                                               # nats per sample, (N,)

The paper drops the constant 0.5 * log(2*pi); we keep it, as common.gaussian_nll does, so that fixed-sigma and
learned-sigma runs are comparable. Sums are accumulated in fp32 whatever the input dtype (fp32, bf16, fp16).

Backward. With g the upstream gradient of that sample's nll and inv_var_i = exp(-2 * log_sigma_i):

    dl/dmu_i        = -(x_i - mu_i) * inv_var_i            -> grad_mu_i        = g * dl/dmu_i
    dl/dlog_sigma_i = 1 - (x_i - mu_i)**2 * inv_var_i      -> grad_log_sigma_i = g * dl/dlog_sigma_i

computed in fp32 from the saved inputs alone (nothing else is kept between forward and backward) and written in
the input dtype. x is data: the kernels give it no gradient. If x does require one, dl/dx = -dl/dmu is formed in
PyTorch from grad_mu.

Broadcast log_sigma. The fused path is written for a per-pixel log_sigma of the same shape as mu (LV-VAE, Eq. 11).
A log_sigma that broadcasts to x (a learned scalar, Eq. 10, or one value per channel) is expanded to x's shape
and materialised in x's memory layout before the kernels run, and autograd sums grad_log_sigma back to log_sigma's
shape through that expand. This costs one tensor of x's size in each direction; a scalar-sigma kernel would avoid
it, but LS-VAE is not the model this kernel is for.

Layout. The kernels read element i of sample n at offset n * D + i, so they are right for any layout in which each
sample's D elements fill one dense block (batch stride D) and x, mean, log_sigma share strides: NCHW-contiguous,
channels_last, or any other order of the non-batch dimensions. Such inputs go in as they are; anything else is
copied into x's layout first (into channels_last or NCHW, whichever x's strides suggest, if x itself is not dense
that way), and the gradients come back in that layout, so a channels_last model gets channels_last gradients.

torch.compile. The two launchers are custom ops (vae::gaussian_nll_fwd, vae::gaussian_nll_bwd) with fake
functions that give the real outputs' shapes, dtypes and strides, and the backward is registered on the forward op,
so a compiled model calls the kernels without a graph break. Nothing in them syncs with the host, so CUDA graphs
(mode="reduce-overhead") can capture them. The layout check runs inside the ops, on the tensors the compiled graph
actually passes (Inductor keeps a custom op's input strides exactly only from torch 2.8; before, only their order).

Host time. An eager call pays its Python on every call, and a GPU that finishes first waits for it. So an eager call
(gaussian_nll outside torch.compile) runs the same two launchers through a plain torch.autograd.Function instead of
the custom ops, whose dispatch layers cost more than the rest of the wrapper; torch.compile still sees the custom
ops. The launch configuration is plain integer arithmetic, and the common layout is recognised with one check.
bench/bench_nll_host.py measures it (results/bench_nll_host_cpu.md).

Reduction. Both grids are (samples, chunks of the flattened row); samples go on axis 0, the one CUDA lets pass
65535. Each forward program writes the fp32 sum of its chunk to a (N, chunks) buffer and a torch .sum(1) finishes
the job (a two-level reduction), rather than atomic_add into an (N,) output: float atomics add in whatever order
the programs finish, so the same inputs could give results that differ in the last bits from run to run, which
breaks seeded reruns. The buffer holds one float per BLOCK_SIZE elements, and atomics would need a zeroed output,
i.e. a second launch anyway.

Not fused yet: the discretized likelihood (Gaussian mass of each 1/256 bin of 8-bit pixels) remains to be done.

Tests: tests/test_gaussian_nll.py (kernels against the reference on CPU with TRITON_INTERPRET=1, opcheck of the
custom ops, torch.compile(fullgraph=True), channels_last).
Benchmark: python bench/bench_nll.py (writes results/bench_nll.md).
"""

import math
import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # Triton is optional: without it gaussian_nll runs the PyTorch reference
    triton = None
TRITON_AVAILABLE = triton is not None

HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)
TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # dtypes the kernels take; fp32 accumulation
# Launch configuration, set by bench/bench_nll.py --sweep at the CelebA shape on an H200 (results/bench_nll.md,
# 2026-11-28) under bench/NOTES.md's rule: the best fp32 configuration, 8,192 elements with 16 warps (0.390 ms
# forward + backward at N = 4,096), beat the old 2,048 with 8 (0.398 and 0.398 timed twice) by more than the spread.
# bf16 there: 0.210 against 0.205 ms, 3% slower. MNIST's rows (784 elements) keep 1,024 with 4 warps, not swept.
MAX_BLOCK_SIZE = 8192  # elements of one row per program; a row longer than this is split into chunks
NUM_WARPS = None  # warps per program; None: 4 up to 1,024 elements, 8 up to 4,096, else 16


# --- reference ---


def gaussian_nll_reference(x, mean, log_sigma):
    """Eq. 11 in plain PyTorch: x, mean (N, ...), log_sigma broadcastable to them -> (N,) nats per sample.

    Computed in fp32 (bf16/fp16 inputs are upcast; float64 stays float64, for gradcheck).
    """
    compute_dtype = torch.promote_types(x.dtype, torch.float32)
    x, mean, log_sigma = x.to(compute_dtype), mean.to(compute_dtype), log_sigma.to(compute_dtype)
    nll = 0.5 * ((x - mean) * torch.exp(-log_sigma)) ** 2 + log_sigma + HALF_LOG_2PI  # (N, ...)
    return nll.reshape(nll.shape[0], -1).sum(1)


# --- Triton kernels ---

if TRITON_AVAILABLE:

    @triton.jit
    def _gaussian_nll_forward_kernel(
        x_ptr,  # (N, D) data, each row one dense block (see Layout), fp32/bf16/fp16
        mean_ptr,  # (N, D) decoder mean, same dtype and strides
        log_sigma_ptr,  # (N, D) decoder log sigma, same dtype and strides
        partial_sum_ptr,  # (N, num_chunks) fp32 output: the NLL summed over each chunk
        row_size,  # D, elements per sample
        num_chunks,  # chunks per row, cdiv(D, BLOCK_SIZE)
        HALF_LOG_2PI: tl.constexpr,  # 0.5 * log(2*pi)
        BLOCK_SIZE: tl.constexpr,  # elements per chunk, a power of two
    ):
        row = tl.program_id(0)
        chunk = tl.program_id(1)
        offsets = chunk * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
        mask = offsets < row_size  # the last chunk of a row is usually partial
        row_start = row.to(tl.int64) * row_size  # int64: N * D may pass 2**31
        x = tl.load(x_ptr + row_start + offsets, mask=mask, other=0.0).to(tl.float32)
        mean = tl.load(mean_ptr + row_start + offsets, mask=mask, other=0.0).to(tl.float32)
        log_sigma = tl.load(log_sigma_ptr + row_start + offsets, mask=mask, other=0.0).to(tl.float32)
        # Eq. 11: nll = 0.5 * ((x - mean) / sigma)**2 + log_sigma + 0.5 * log(2*pi)
        z = (x - mean) * tl.exp(-log_sigma)
        nll = tl.where(mask, 0.5 * z * z + log_sigma + HALF_LOG_2PI, 0.0)
        tl.store(partial_sum_ptr + row * num_chunks + chunk, tl.sum(nll, axis=0))

    @triton.jit
    def _gaussian_nll_backward_kernel(
        x_ptr,  # (N, D) data, each row one dense block (see Layout), fp32/bf16/fp16
        mean_ptr,  # (N, D) decoder mean, same dtype and strides
        log_sigma_ptr,  # (N, D) decoder log sigma, same dtype and strides
        grad_nll_ptr,  # (N,) fp32 upstream gradient, one per sample
        grad_mean_ptr,  # (N, D) output, input dtype, same strides
        grad_log_sigma_ptr,  # (N, D) output, input dtype, same strides
        row_size,  # D, elements per sample
        BLOCK_SIZE: tl.constexpr,  # elements per chunk, a power of two
    ):
        row = tl.program_id(0)
        chunk = tl.program_id(1)
        offsets = chunk * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
        mask = offsets < row_size
        row_start = row.to(tl.int64) * row_size
        x = tl.load(x_ptr + row_start + offsets, mask=mask, other=0.0).to(tl.float32)
        mean = tl.load(mean_ptr + row_start + offsets, mask=mask, other=0.0).to(tl.float32)
        log_sigma = tl.load(log_sigma_ptr + row_start + offsets, mask=mask, other=0.0).to(tl.float32)
        grad_nll = tl.load(grad_nll_ptr + row)
        diff = x - mean
        inv_var = tl.exp(-2.0 * log_sigma)  # 1 / sigma**2
        grad_mean = -diff * inv_var * grad_nll  # dl/dmu = -(x - mu) / sigma**2
        grad_log_sigma = (1.0 - diff * diff * inv_var) * grad_nll  # dl/dlog_sigma = 1 - (x - mu)**2 / sigma**2
        tl.store(grad_mean_ptr + row_start + offsets, grad_mean.to(grad_mean_ptr.dtype.element_ty), mask=mask)
        tl.store(
            grad_log_sigma_ptr + row_start + offsets, grad_log_sigma.to(grad_log_sigma_ptr.dtype.element_ty), mask=mask
        )


# --- memory layout ---


def _is_sample_dense(tensor):
    """True when each sample's D elements fill one dense block of memory and the samples follow one another (batch
    stride D): contiguous, channels_last, or any other order of the non-batch dimensions. Length-1 dims never count."""
    expected_stride = 1
    for stride, size in sorted((stride, size) for stride, size in zip(tensor.stride(), tensor.shape) if size > 1):
        if stride != expected_stride:  # a gap or an overlap
            return False
        expected_stride *= size
    return tensor.shape[0] == 1 or tensor.stride(0) * tensor.shape[0] == expected_stride  # batch outermost


def _strides_that_matter(tensor):
    """Strides of the dimensions longer than 1, the only ones that place elements: equal for two tensors of one
    shape means each element sits at the same offset in both."""
    return [stride for stride, size in zip(tensor.stride(), tensor.shape) if size > 1]


def _empty_in_kernel_layout(x):
    """Uninitialised, of x's shape and dtype, in the layout the kernels run in: x's own if sample-dense, else the
    dense one its strides suggest (channels_last for a strided channels_last view), else NCHW."""
    empty = torch.empty_like(x)  # preserve_format: x's exact strides if x is dense, else its suggested memory format
    return empty if _is_sample_dense(empty) else torch.empty_like(x, memory_format=torch.contiguous_format)


def _in_kernel_layout(x, mean, log_sigma):
    """x, mean, log_sigma of one shape and any strides -> the same values in one sample-dense layout, x's if it has
    one. Only what is not in that layout yet is copied: nothing for NCHW or channels_last inputs that agree."""
    if not _is_sample_dense(x):
        x = _empty_in_kernel_layout(x).copy_(x)
    elif x.stride() == mean.stride() == log_sigma.stride():
        return x, mean, log_sigma  # the usual case: nothing more to compare (host time)
    layout = _strides_that_matter(x)
    mean, log_sigma = (
        t if _strides_that_matter(t) == layout else torch.empty_like(x).copy_(t)  # e.g. a broadcast log_sigma
        for t in (mean, log_sigma)
    )
    return x, mean, log_sigma


# --- launchers, registered as custom ops ---


def _launch_config(row_size):
    """Block size (the next power of two of D, at most MAX_BLOCK_SIZE), chunks per row and warps."""
    # Plain integer arithmetic: triton.next_power_of_2 and triton.cdiv are @jit functions, ~10 us a call from Python.
    block_size = min(MAX_BLOCK_SIZE, 1 << max(row_size - 1, 0).bit_length())
    num_warps = NUM_WARPS or (4 if block_size <= 1024 else 8 if block_size <= 4096 else 16)
    return block_size, -(-row_size // block_size), num_warps


def _forward_impl(x: torch.Tensor, mean: torch.Tensor, log_sigma: torch.Tensor) -> torch.Tensor:
    """x, mean, log_sigma: (N, ...) of one shape, dtype and device, any strides -> (N,) fp32 nats per sample."""
    x, mean, log_sigma = _in_kernel_layout(x, mean, log_sigma)
    num_samples, row_size = x.shape[0], math.prod(x.shape[1:])
    block_size, num_chunks, num_warps = _launch_config(row_size)
    partial_sums = torch.empty(num_samples, num_chunks, dtype=torch.float32, device=x.device)  # (N, chunks)
    _gaussian_nll_forward_kernel[(num_samples, num_chunks)](
        x, mean, log_sigma, partial_sums, row_size, num_chunks,
        HALF_LOG_2PI=HALF_LOG_2PI, BLOCK_SIZE=block_size, num_warps=num_warps,
    )
    return partial_sums.sum(1)  # second level of the reduction: (N, chunks) -> (N,), a fixed order


_forward_launch = torch.library.custom_op("vae::gaussian_nll_fwd", _forward_impl, mutates_args=())


@_forward_launch.register_fake
def _forward_fake(x, mean, log_sigma):
    return x.new_empty(x.shape[0], dtype=torch.float32)  # (N,), as partial_sums.sum(1)


def _backward_impl(
    x: torch.Tensor, mean: torch.Tensor, log_sigma: torch.Tensor, grad_nll: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Saved inputs (N, ...) and the upstream gradient (N,) -> grad_mean, grad_log_sigma, each (N, ...) in x's dtype
    and in the kernels' layout (x's own when it is sample-dense)."""
    # A loss.sum() hands back a stride-0 expanded gradient: make it a real (N,) fp32 array.
    grad_nll = grad_nll.to(torch.float32).contiguous()
    x, mean, log_sigma = _in_kernel_layout(x, mean, log_sigma)
    num_samples, row_size = x.shape[0], math.prod(x.shape[1:])
    block_size, num_chunks, num_warps = _launch_config(row_size)
    grad_mean, grad_log_sigma = _empty_in_kernel_layout(x), _empty_in_kernel_layout(x)  # (N, ...) each
    _gaussian_nll_backward_kernel[(num_samples, num_chunks)](
        x, mean, log_sigma, grad_nll, grad_mean, grad_log_sigma, row_size,
        BLOCK_SIZE=block_size, num_warps=num_warps,
    )
    return grad_mean, grad_log_sigma


_backward_launch = torch.library.custom_op("vae::gaussian_nll_bwd", _backward_impl, mutates_args=())


@_backward_launch.register_fake
def _backward_fake(x, mean, log_sigma, grad_nll):
    return _empty_in_kernel_layout(x), _empty_in_kernel_layout(x)  # the strides the real launcher returns


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)  # x, mean, log_sigma: the backward recomputes everything else from them


def _backward(ctx, grad_nll, launch=_backward_launch):
    grad_mean, grad_log_sigma = launch(*ctx.saved_tensors, grad_nll)
    grad_x = -grad_mean if ctx.needs_input_grad[0] else None  # dl/dx = -dl/dmu; x is usually data
    return grad_x, grad_mean, grad_log_sigma


_forward_launch.register_autograd(_backward, setup_context=_setup_context)


class _EagerGaussianNLL(torch.autograd.Function):
    """The same launchers and the same backward for eager calls, without the custom ops' dispatch layers (their
    autograd wrapper, redispatch and dynamo guard), which take ~40% more host time a forward + backward (Host time)."""

    @staticmethod
    def forward(ctx, x, mean, log_sigma):
        _setup_context(ctx, (x, mean, log_sigma), None)
        return _forward_impl(x, mean, log_sigma)

    @staticmethod
    def backward(ctx, grad_nll):
        return _backward(ctx, grad_nll, launch=_backward_impl)


# --- public function ---


def _check_inputs(x, mean, log_sigma, backend):
    if backend not in ("auto", "triton", "torch"):
        raise ValueError(f"backend must be 'auto', 'triton' or 'torch', not {backend!r}")
    if x.ndim == 0:
        raise ValueError("x must be (N, ...) with a batch dimension first, not a 0-d tensor")
    if mean.shape != x.shape:
        raise ValueError(f"mean has shape {tuple(mean.shape)} but x has {tuple(x.shape)}; they must be equal")
    try:  # torch.broadcast_shapes costs ~30 us: only for a log_sigma of another shape
        broadcast_shape = x.shape if log_sigma.shape == x.shape else torch.broadcast_shapes(log_sigma.shape, x.shape)
    except RuntimeError:
        broadcast_shape = None
    if broadcast_shape != x.shape:
        raise ValueError(f"log_sigma of shape {tuple(log_sigma.shape)} does not broadcast to x's {tuple(x.shape)}")
    if not (x.dtype == mean.dtype == log_sigma.dtype) or not x.is_floating_point():
        raise ValueError(
            f"x, mean, log_sigma must share one floating dtype, got {x.dtype}, {mean.dtype}, {log_sigma.dtype}; "
            "cast them (e.g. under autocast, log_sigma.to(mean.dtype))"
        )
    if not (x.device == mean.device == log_sigma.device):
        raise ValueError(f"x, mean, log_sigma must be on one device, got {x.device}, {mean.device}, {log_sigma.device}")


def gaussian_nll(x, mean, log_sigma, backend="auto"):
    """Eq. 11 per sample: x, mean (N, ...), log_sigma of the same shape or broadcastable to it -> (N,) fp32 nats.

    fp32/bf16/fp16 inputs give fp32 sums; float64 inputs run the reference and give float64.
    backend: "auto" (Triton for CUDA tensors when Triton imports, else PyTorch), "triton" or "torch".
    The Triton path reads NCHW or channels_last inputs in place when their strides agree, returns gradients in that
    layout, and runs inside torch.compile (fullgraph=True) as two custom ops.
    """
    _check_inputs(x, mean, log_sigma, backend)

    # The one place where the path is chosen. backend="triton" on CPU tensors runs the kernels in Triton's
    # interpreter (TRITON_INTERPRET=1 set before this module is imported): slow, for tests only.
    if backend == "triton":
        if not TRITON_AVAILABLE:
            raise RuntimeError("backend='triton' but triton is not installed (pip install triton, Linux only); "
                               "use backend='auto' or 'torch'")
        if not x.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError(f"backend='triton' needs CUDA tensors (got {x.device}), or TRITON_INTERPRET=1 set "
                             "before import to run the kernels on the CPU; use backend='auto' otherwise")
        if x.dtype not in TRITON_DTYPES:
            raise ValueError(f"the Triton kernels take {TRITON_DTYPES}, not {x.dtype}; use backend='torch'")
    use_triton = backend == "triton" or (
        backend == "auto" and TRITON_AVAILABLE and x.is_cuda and x.dtype in TRITON_DTYPES
    )
    if not use_triton:
        return gaussian_nll_reference(x, mean, log_sigma)

    # A broadcast log_sigma goes in as a stride-0 view; the launchers materialise it in x's layout, and autograd sums
    # its gradient back through this expand. Traced by torch.compile: the custom ops; called eagerly: the same
    # launchers through a plain autograd.Function, with less host time (see Host time).
    log_sigma = log_sigma.expand(x.shape)
    if torch.compiler.is_compiling():
        return _forward_launch(x, mean, log_sigma)
    return _EagerGaussianNLL.apply(x, mean, log_sigma)
