#include "code_histogram.h"

#include <ATen/Parallel.h>

#include <atomic>
#include <cmath>
#include <mutex>
#include <string>
#include <vector>

#include "errors.h"

namespace eoq {
namespace {

// 1.5 * 2^23: adding it to a float below 2^22 in magnitude leaves only the integer part's
// bits, rounded half to even by the FPU's default mode; subtracting it gives rint(v). Unlike
// std::nearbyint (a libm call on baseline x86-64, which this module is built for) it
// vectorises. The caller keeps |v| < 2^22 (code_range).
constexpr float kRound = 12582912.0f;
constexpr float kRoundLimit = 4194304.0f;  // 2^22
constexpr int kLanes = 8;                  // independent partial sums: a fixed order, and no add-latency chain
constexpr int kSubHistograms = 4;          // neighbouring values often share a bin: spread the increments

}  // namespace


void code_range(float xmin, float xmax, float step, int64_t* qmin, int64_t* span) {
  if (!(step > 0.f) || !std::isfinite(step)) throw InvalidInput("code_histogram: step must be positive and finite");
  if (!std::isfinite(xmin) || !std::isfinite(xmax) || xmin > xmax)
    throw InvalidInput("code_histogram: the range of x must be finite with xmin <= xmax");
  const double lo = std::nearbyint(xmin / step), hi = std::nearbyint(xmax / step);
  // Checked in double before any conversion: a tiny step gives codes beyond int64.
  if (!(hi - lo + 1 <= static_cast<double>(kMaxHistogramSpan)))
    throw InvalidInput("code_histogram: the codes would span more than " + std::to_string(kMaxHistogramSpan) +
                       " levels at this step");
  if (!(std::fabs(lo) < kRoundLimit && std::fabs(hi) < kRoundLimit))
    throw InvalidInput("code_histogram: codes beyond 2^22 in magnitude at this step (x / step too large)");
  *qmin = static_cast<int64_t>(lo);
  *span = static_cast<int64_t>(hi - lo) + 1;
}

namespace {

// One row: its codes into q (as floats), its squared error summed in kLanes fixed lanes.
double round_row(const float* row, int64_t cols, float step, float* q) {
  double lane[kLanes] = {0};
  int64_t c = 0;
  for (; c + kLanes <= cols; c += kLanes)
    for (int l = 0; l < kLanes; ++l) {
      const float v = (row[c + l] / step + kRound) - kRound;
      q[c + l] = v;
      const float d = v * step - row[c + l];
      lane[l] += static_cast<double>(d * d);
    }
  for (; c < cols; ++c) {
    const float v = (row[c] / step + kRound) - kRound;
    q[c] = v;
    const float d = v * step - row[c];
    lane[c % kLanes] += static_cast<double>(d * d);
  }
  double e = 0;
  for (int l = 0; l < kLanes; ++l) e += lane[l];
  return e;
}

}  // namespace

void code_histogram(const float* x, int64_t rows, int64_t cols, float step, int64_t qmin, int64_t span,
                    int64_t* hist, double* row_err) {
  for (int64_t j = 0; j < span; ++j) hist[j] = 0;
  // Floats that compare below / above every valid code; a NaN fails both comparisons.
  const float lo = static_cast<float>(qmin) - 0.5f, hi = static_cast<float>(qmin + span - 1) + 0.5f;
  std::mutex merge;
  std::atomic<bool> bad{false};
  // Each task keeps its own counts (span <= 2^20 int64s) and adds them in once at the end.
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(cols, 1));
  at::parallel_for(0, rows, grain, [&](int64_t r0, int64_t r1) {
    std::vector<int64_t> local(static_cast<size_t>(span) * kSubHistograms, 0);
    std::vector<float> q(static_cast<size_t>(cols));
    bool out_of_range = false;
    for (int64_t r = r0; r < r1; ++r) {
      const double e = round_row(x + r * cols, cols, step, q.data());
      if (row_err) row_err[r] = e;
      for (int64_t c = 0; c < cols; ++c) {
        const float v = q[c];
        if (!(v > lo && v < hi)) {  // NaN or beyond the range: counted as an error below
          out_of_range = true;
          continue;
        }
        ++local[static_cast<size_t>((static_cast<int64_t>(v) - qmin) * kSubHistograms + (c % kSubHistograms))];
      }
    }
    if (out_of_range) bad.store(true, std::memory_order_relaxed);
    std::lock_guard<std::mutex> lock(merge);
    for (int64_t j = 0; j < span; ++j)
      for (int k = 0; k < kSubHistograms; ++k) hist[j] += local[static_cast<size_t>(j * kSubHistograms + k)];
  });
  if (bad.load()) throw InvalidInput("code_histogram: x holds a NaN or a value outside the given range");
}

}  // namespace eoq

namespace eoq {

void recon_sums(const float* x, const float* q, const float* row_step, int64_t rows, int64_t cols, int top,
                double* sums) {
  const int64_t width = 3 * int64_t{top} + 1;
  std::vector<double> per_row(static_cast<size_t>(rows * width), 0.0);
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(cols, 1));
  at::parallel_for(0, rows, grain, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      double* out = per_row.data() + r * width;
      const double s = row_step[r], w = s * s, inv = 1.0 / s;  // a multiply per value, not a division
      const float* xr = x + r * cols;
      const float* qr = q + r * cols;
      double before = 0;
      for (int64_t c = 0; c < cols; ++c) {
        const double t = static_cast<double>(xr[c]) * inv, qc = qr[c];
        before += (t - qc) * (t - qc);
        const double m = std::fabs(qc);
        if (m >= 1 && m <= top) {
          double* cell = out + 3 * (static_cast<int64_t>(m) - 1);
          cell[0] += 1;
          cell[1] += qc > 0 ? t : -t;  // t sign(q)
          cell[2] += t * t;
        }
      }
      for (int64_t k = 0; k + 1 < width; ++k) out[k] *= w;  // w is the row's constant: applied once
      out[width - 1] = w * before;
    }
  });
  // added to what sums holds, row after row: a tensor taken in row chunks, each call adding
  // onto the last one's sums, gives the very additions (and bits) one call on all rows gives
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t k = 0; k < width; ++k) sums[k] += per_row[static_cast<size_t>(r * width + k)];
}

}  // namespace eoq
