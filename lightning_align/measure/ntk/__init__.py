"""Empirical neural tangent kernel: the kernel, its spectrum and summaries (Day, Kahn & Roberts; Noci et al.).

The empirical NTK of a model ``f`` on inputs ``x_1..x_n`` is

    ``K[i, j, a, b] = <∂f_a(x_i)/∂θ, ∂f_b(x_j)/∂θ>``   (``c`` outputs per sample, ``θ`` the parameters)

and, with ``trace_outputs=True``, the ``(n, n)`` kernel ``Σ_a K[i, j, a, a]``. Flattened to
``(n·c, n·c)`` (row index ``i·c + a``) it is ``J Jᵀ`` with ``J`` the ``(n·c, P)`` Jacobian, so its top
eigenvalue is the stiffest direction of function space that gradient descent moves along.

How it is computed (faster than the ``vmap(jacrev)`` + einsum recipe of the PyTorch NTK tutorial):

- **Structured layers** (``nn.Linear``, ``nn.Conv2d`` with ``groups=1``): the per-sample gradient of a
  weight is ``Σ_t g_t x_tᵀ`` (``x`` the layer input, ``g`` the gradient at its output, ``t`` over tokens or
  conv patches), so its kernel is ``Σ_{s,t} (x_is·x_jt)(g_ias·g_jbt)``: an input Gram times an
  output-gradient Gram, never the ``(n·c, P)`` Jacobian (the trick of nngeometry and neural-tangents).
  For long token sequences the per-sample gradients are formed instead when that is cheaper.
- **Every other parameter** (norm scales, embeddings, attention internals, weights shared between
  modules): per-sample Jacobians by ``torch.func`` and a contraction.

Both come from one ``vmap(jacrev)`` pass over samples that differentiates with respect to the generic
parameters and to zero "probes" added to each structured layer's output; no weight gradient is formed. A
forward that ``vmap`` cannot run (it branches on values: Hugging Face's attention-mask construction, routed
mixtures of experts) gets the same factors one sample at a time through plain autograd (:mod:`.unbatched`).

Assumption: no operation mixes samples (BatchNorm must use running statistics, i.e. ``eval()``), and the
function is deterministic (no active dropout). Both are checked, with a clear error.

Matrix-free eigenvalues (``solver="lanczos"``) use ``K v = J (Jᵀ v)`` with the forward linearised once
per measurement: the forward runs once with its graph kept, ``Jᵀc`` is a backward on it and ``J u`` a
backward through the graph of a symbolic ``Jᵀc`` (built once, the "double-vjp" trick), so that a product
costs two backward passes and never re-runs the forward (``torch.func.linearize`` gives the same
products but traces the model at every measurement, ~25 products' worth on the example GPT). The trace
then comes matrix-free as well: Hutch++, the exact trace of the kernel on the Lanczos basis plus
Hutchinson on its complement, one VJP per sample (``z·Kz = ‖Λ^½ Jᵀz‖²``), with its standard error.
Memory is that of the kept graphs (~2-3 training steps' activations on the probe) plus the basis
``O(m·n·c)``, never the kernel; :func:`ntk_spectrum` estimates both paths' memory from a one-sample run
before building anything and refuses what exceeds ``max_memory_gb``, naming the argument.

The package, one idea per module: :mod:`.kernel` (the kernel, its product and trace), :mod:`.spectrum` (top
eigenpairs, exact or matrix-free), :mod:`.summary` (summaries and comparisons of kernels), and the internals
:mod:`.inspection` (what a model and its inputs allow), :mod:`.plan` (which parameter takes which path, memory
estimates, Jacobian factors; :mod:`.unbatched` when ``vmap`` cannot run the forward), :mod:`.contraction`
(factors into kernel blocks) and :mod:`.operator` (the matrix-free operator and the Hutch++ trace).
"""

from lightning_align.measure.ntk.inspection import check_sample_independent
from lightning_align.measure.ntk.kernel import empirical_ntk, flatten_kernel, ntk_matvec, ntk_trace
from lightning_align.measure.ntk.plan import _Plan as _Plan  # benchmarks and tests build plans directly
from lightning_align.measure.ntk.spectrum import MAX_EXACT_SIZE, MAX_MEMORY_GB, NTKSpectrumResult, Solver, ntk_eigs, ntk_spectrum
from lightning_align.measure.ntk.summary import NTKSummary, kernel_distance, kernel_target_alignment, ntk_summary

__all__ = [
    "MAX_EXACT_SIZE",
    "MAX_MEMORY_GB",
    "NTKSpectrumResult",
    "NTKSummary",
    "Solver",
    "check_sample_independent",
    "empirical_ntk",
    "flatten_kernel",
    "kernel_distance",
    "kernel_target_alignment",
    "ntk_eigs",
    "ntk_matvec",
    "ntk_spectrum",
    "ntk_summary",
    "ntk_trace",
]
