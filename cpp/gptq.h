// GPTQ error feedback: quantize the rows of a Linear weight column by column, feeding each
// column's rounding error forward onto the columns not yet quantized, so that the *output*
// error over the calibration inputs is small rather than the weight error.
//
// The problem
// -----------
// A Linear layer computes y = W a. With the input covariance H = sum_t a_t a_t^T (n x n,
// n = in_features, summed or averaged over calibration tokens), quantizing W to W^ costs
//     D = sum_t |(W - W^) a_t|^2 = trace((W - W^) H (W - W^)^T) = sum_r e_r H e_r^T,
// a sum over rows r of a quadratic form in that row's error e_r alone. H is shared, but no
// term couples two rows, so every row is its own problem: rows are independent, which is
// what this kernel parallelises over. (GPTQ, Frantar et al. 2022, arXiv:2210.17323.)
//
// The algorithm (per row x, a copy of the weight row that is updated in place)
//     for j = 0 .. n-1:
//         xhat_j = Q(x_j)                          the quantizer below, on the *updated* x_j
//         e_j    = (x_j - xhat_j) / U[j][j]
//         x_k   -= e_j * U[j][k]     for k > j     feedback onto the columns not yet quantized
// where U is the upper-triangular Cholesky factor of H^-1 (H^-1 = U^T U, U[j][j] > 0).
// Once column j is fixed, the best change of the columns not yet quantized (the least-squares
// re-solve given the error committed) is row j of U times e_j: the OBS update of GPTQ in its
// Cholesky form, as in AutoGPTQ's fasterquant. Only the upper triangle of U is ever read.
//
// Lazy block updates (GPTQ section 3, "lazy batch updates"): columns are taken in blocks of
// `block`, the whole weight one block at a time (one parallel loop over tiles of rows per
// block). Within the block each column's error is applied to the block's later columns at
// once; the block's errors reach the columns after it in one panel update per tile, which
// reads U[block rows][after the block] from a copy packed chunk by chunk (contiguous, made
// once per block and shared by every tile), so U streams through the caches in order. That
// is only a loop order: see "Order of operations".
//
// The quantizer Q (the same for every method; the arguments choose it)
//  - s = scale[r][j / group]  (float32 [rows, ceil(n / group)]; group = n: one scale a row).
//    Finite and non-zero; a negative scale is allowed (absmax's signed scales, whose sign
//    orients the asymmetric range [qmin, qmax]): the formulas below hold as written.
//  - uniform grid (levels == nullptr):
//        code = clamp(nearbyint(x / s), qmin, qmax),   xhat = float(code) * s
//    nearbyint in the default rounding mode rounds half to even, as torch.round does.
//  - codebook (levels: n_levels strictly increasing finite floats):
//        code = the index of the level nearest to x / s, ties to the lower index (torch's
//               argmin of |x / s - levels|: the first minimum), xhat = levels[code] * s.
//    qmin and qmax are ignored.
// Outputs: codes int32 (the integer, or the level index) and xhat, the quantized values.
// Note that xhat is the reconstruction of the *updated* row: code * s (or levels[code] * s)
// exactly, never the original weight rounded.
//
// Order of operations, and why the result is bit-reproducible
// -------------------------------------------------------------
// All arithmetic is float32, every operation rounded on its own: x_k receives its updates
// from j = 0, 1, ..., k-1 in increasing j, each as t = e_j * U[j][k] (one rounding) then
// x_k = x_k - t (one rounding). This is the only sequence the kernel ever executes for an
// element, whether the update comes from inside the block or from the panel, whatever the
// block, the tile of rows, the thread split or the SIMD width (every SIMD lane computes the
// same IEEE operations as the scalar tail). Hence:
//  - the output is byte-identical for any thread count, tile, block and instruction set
//    (AVX-512, AVX2 or the baseline; EOQ_GPTQ_KERNEL=baseline|avx2|avx512, read at each
//    call, forces one: naming one the CPU lacks is an error);
//  - a straightforward torch loop that does the same elementwise operations
//    (eoq.feedback.gptq_reference) reproduces it bit for bit.
// Traps: the file is compiled with -ffp-contract=off (an FMA would round t and the
// subtraction once, and AVX-512 code would then differ from the baseline and from torch),
// never with -ffast-math (reassociation), and the panel update is *not* a matmul
// E @ U[block, rest] as in AutoGPTQ: a BLAS sums the block's products in an order that
// depends on the library and the thread count. Summing sequentially costs nothing extra
// here (one multiply and one subtract per update either way).
// Accuracy: float32 accumulation over up to n terms adds a relative error of about
// sqrt(n) * 2^-24 to x_k, far below any quantization step worth feeding back (n = 14336:
// ~1e-5 of |x|, against steps of ~1e-1 of |x| at 4 bits).
//
// Other traps
//  - Ties: values x / s that fall exactly halfway occur (synthetic or already-quantized
//    weights); both quantizers break them deterministically as described above.
//  - x / s is a true division, never a multiplication by 1 / s (which rounds differently);
//    a code 0 reconstructs as +0 (float(code) * s), never -0, whatever the sign of x.
//  - Dead columns: an input column that never sees a non-zero input has H[j][j] = 0, and H
//    is singular. The kernel needs U[j][j] > 0 (it divides by it) and checks it; the
//    factorization (eoq.feedback.inverse_cholesky) gives dead columns a unit diagonal and
//    no coupling, so they are plainly rounded and feed nothing back, and damps H.
//  - Divergence: a U that is not the factor of a damped inverse covariance can blow the
//    updated values up. Every x_j, x_j / s and e_j is checked to be finite; a failure is
//    recorded per row and, after the parallel loop, reported for the first failing row
//    (so the error does not depend on the threads), as InvalidInput.
//  - The scale of H does not matter: H -> c H scales U by c^-1/2 and e by c^1/2, products
//    unchanged. inverse_cholesky normalises H to a unit mean diagonal so U stays near 1.
//
// Constants (gptq.cpp)
//  - kTileRows = 16: rows that go through a block together. Each chunk of packed U, fetched
//    into L1 from L2 or L3, serves the tile's 16 rows before the next chunk: 16 updates per
//    float of U fetched. Larger tiles would leave too few of them to share among threads on
//    small weights (576 rows: 36 tiles).
//  - Register micro-tiles of the panel update, R rows x CW columns held in registers while
//    a chunk's block rows of U stream past: AVX-512 4 x 64 (16 accumulators of 32 zmm
//    registers, 4 U vectors), AVX2 4 x 16 (8 of 16 ymm), baseline (SSE2 on x86-64) 4 x 8 (8 of
//    16 xmm). A packed chunk is block x CW floats (32 KiB for AVX-512 at block 128: inside a
//    48 KiB L1), re-read from L1 by each group of R rows. On AVX-512, 4 x 64 measured faster
//    than 8 x 32 and 16 x 16 (fewer broadcasts of the error per U vector loaded).
//  - block = 128 (default, the caller's choice): GPTQ's lazy-update width. It changes the
//    speed only, never the result; 128 keeps the intra-block triangle (block^2 / 2 updates
//    a row per block, done one column at a time) small against the panel, and the packed
//    chunk inside L1.
// Cost: rows * n^2 / 2 multiply-subtract pairs (rows * n^2 flops), plus rows * n
// quantizations. Measured numbers are in python/eoq/feedback.py's docstring.
#pragma once
#include <cstdint>

namespace eoq {

// Quantizes `rows` x `n` float32 weights w (row-major, unmodified) with error feedback
// through u (n x n row-major; only its upper triangle is read). scale: rows x
// ceil(n / group) floats. levels: nullptr (uniform grid, codes in [qmin, qmax]) or n_levels
// sorted levels (codes are indices). block: columns per lazy update (>= 1; speed only).
// Writes codes (rows x n int32) and xhat (rows x n float32). Throws InvalidInput for an
// invalid argument (group or block < 1, qmin > qmax or outside int32, levels not strictly
// increasing and finite, w not finite, scale not finite or 0, U's upper triangle not
// finite or its diagonal not > 0) before any work, and for a value that becomes non-finite
// during the feedback (after the loop, the first such row). Parallel over tiles of rows
// (at::parallel_for); byte-identical output for any thread count.
void gptq_quantize(const float* w, int64_t rows, int64_t n, const float* u, const float* scale, int64_t group,
                   const float* levels, int64_t n_levels, int64_t qmin, int64_t qmax, int64_t block, int32_t* codes,
                   float* xhat);

// The instruction set gptq_quantize uses on this CPU now ("avx512", "avx2" or "baseline";
// EOQ_GPTQ_KERNEL overrides). Throws InvalidInput if the override names one the CPU lacks.
const char* gptq_kernel_name();

}  // namespace eoq
