// One pass of a uniform quantizer over a float32 matrix: the histogram of its integer codes
// and each row's squared error. This is the inner loop of every rate search in eoq: ecsq's
// step search (the rate is the codes' order-0 entropy, read off the histogram) and the
// rate-distortion curves of the bit allocation (eoq.allocate: 32 steps per tensor). Done in
// torch it costs five full-size temporaries per step (the codes, an int64 copy for bincount,
// a uint8 copy, the error, its square); here it costs one read of x.
//
// For a step s (a float32: torch divides a float32 tensor by a Python float in float32):
//     q        = rint(x / s)            round half to even, as torch.round
//     hist[j]  = #{ q == qmin + j }      j in [0, span), qmin = rint(xmin / s), span = rint(xmax / s) - qmin + 1
//     err[r]   = sum_c (q * s - x)^2     the products and differences in float32 (as the torch
//                                        reference computes them), the sum in float64
// Rounding is monotone, so with xmin / xmax the true extremes of x, qmin and qmax are the
// extremes of q and every code lands in the histogram. A code outside it (x holds a NaN or
// a value beyond the given range) is an error, not a silent miscount.
//
// Speed: rint by the 1.5 * 2^23 trick (vectorises; std::nearbyint is a libm call on the
// baseline x86-64 this module is built for), so codes must stay below 2^22 in magnitude
// (code_range checks); the codes of a row are rounded into a buffer first, then counted into
// four interleaved histograms (a peaked distribution hits one bin over and over, and
// back-to-back increments of one counter wait on each other).
//
// Determinism: the counts are integers (their sum does not depend on how rows are split
// across threads) and each row's error is summed by one thread in 8 fixed lanes (column
// c into lane c % 8, the lanes added in order), so both are the same at any thread count.
// The error's last bits differ from torch's own sum, whose order depends on its
// vectorisation: tests compare within 1e-12 relative.
#pragma once
#include <cstdint>

namespace eoq {

// The largest span accepted: ecsq's codes span fewer than 2^16 levels (its step floor); a
// little room above that for callers that probe, never a histogram sized by a wild step.
constexpr int64_t kMaxHistogramSpan = int64_t{1} << 20;

// (qmin, span) for a step and the range of x; throws InvalidInput for a step that is not
// positive and finite, a range that is not finite, or a span above kMaxHistogramSpan.
void code_range(float xmin, float xmax, float step, int64_t* qmin, int64_t* span);

// hist: span int64 counts (zeroed here); row_err: rows doubles, or nullptr to skip them.
// Throws InvalidInput when a code falls outside [qmin, qmin + span).
void code_histogram(const float* x, int64_t rows, int64_t cols, float step, int64_t qmin, int64_t span,
                    int64_t* hist, double* row_err);

}  // namespace eoq

namespace eoq {

// The sums ecsq's fitted reconstruction needs (methods/ecsq.py fit_recon), in one pass:
// for codes q (integer-valued floats) of x with a step per row s_r, t = x * (1 / s_r) and
// w = s_r^2 (the error in the weight's scale), per cell m = |q| in 1..top:
//     sums[3 (m-1) + 0] = sum w          sums[3 (m-1) + 1] = sum w t sign(q)
//     sums[3 (m-1) + 2] = sum w t^2
// and sums[3 top] = sum over every value of w (t - q)^2 (the midpoints' error). All in
// float64; each row is summed in column order by one thread, the rows then added in row
// order, so the sums are the same at any thread count. The rows' sums are *added* to what
// `sums` holds (zeros for one call; the last chunk's sums when a tensor comes in row chunks).
void recon_sums(const float* x, const float* q, const float* row_step, int64_t rows, int64_t cols, int top,
                double* sums);

}  // namespace eoq
