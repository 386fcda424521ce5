#include "lloyd_max.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <string>

#include "errors.h"

namespace eoq {
namespace {

// Cumulative integrals of p, x p, x^2 p on a uniform grid, normalised to total mass 1,
// and of p^(1/3), the high-rate optimal point density (Panter-Dite), for the start.
struct Moments {
  double lo, h;
  std::vector<double> P, M1, M2, P3;

  // Linear interpolation of a cumulative table at t (clamped to the grid).
  double at(const std::vector<double>& F, double t) const {
    const double u = (t - lo) / h;
    if (u <= 0) return F.front();
    const double last = static_cast<double>(F.size() - 1);
    if (u >= last) return F.back();
    const size_t i = static_cast<size_t>(u);
    const double f = u - static_cast<double>(i);
    return F[i] + f * (F[i + 1] - F[i]);
  }
};

Moments sample(Density d, int64_t dim, int64_t grid) {
  double r;
  if (d == Density::kGaussian)
    r = 10.0;
  else
    r = std::min(1.0, 12.0 / std::sqrt(static_cast<double>(dim)));
  Moments m;
  m.lo = -r;
  m.h = 2 * r / static_cast<double>(grid - 1);
  std::vector<double> logp(grid);
  for (int64_t i = 0; i < grid; ++i) {
    const double x = m.lo + m.h * static_cast<double>(i);
    if (d == Density::kGaussian)
      logp[i] = -0.5 * x * x;
    else
      logp[i] = (std::fabs(x) >= 1.0) ? -INFINITY : 0.5 * static_cast<double>(dim - 3) * std::log1p(-x * x);
  }
  const double top = *std::max_element(logp.begin(), logp.end());
  m.P.assign(grid, 0);
  m.M1.assign(grid, 0);
  m.M2.assign(grid, 0);
  m.P3.assign(grid, 0);
  double prev_p = std::exp(logp[0] - top);
  for (int64_t i = 1; i < grid; ++i) {
    const double x0 = m.lo + m.h * static_cast<double>(i - 1), x1 = x0 + m.h;
    const double p1 = std::exp(logp[i] - top);
    m.P[i] = m.P[i - 1] + 0.5 * m.h * (prev_p + p1);
    m.M1[i] = m.M1[i - 1] + 0.5 * m.h * (x0 * prev_p + x1 * p1);
    m.M2[i] = m.M2[i - 1] + 0.5 * m.h * (x0 * x0 * prev_p + x1 * x1 * p1);
    m.P3[i] = m.P3[i - 1] + 0.5 * m.h * (std::cbrt(prev_p) + std::cbrt(p1));
    prev_p = p1;
  }
  const double total = m.P.back(), total3 = m.P3.back();
  for (int64_t i = 0; i < grid; ++i) {
    m.P3[i] /= total3;
    m.P[i] /= total;
    m.M1[i] /= total;
    m.M2[i] /= total;
  }
  return m;
}

// The point t with F(t) = q for a cumulative table F, refined linearly inside its cell.
double quantile(const Moments& m, const std::vector<double>& F, double q) {
  const auto it = std::lower_bound(F.begin(), F.end(), q);
  if (it == F.begin()) return m.lo;
  if (it == F.end()) return m.lo + m.h * static_cast<double>(F.size() - 1);
  const size_t i = static_cast<size_t>(it - F.begin());
  const double f = (q - F[i - 1]) / std::max(F[i] - F[i - 1], 1e-300);
  return m.lo + m.h * (static_cast<double>(i - 1) + f);
}

}  // namespace

LloydMax lloyd_max(Density d, int bits, int64_t dim, int64_t grid, int iters, double tol) {
  if (bits < 1 || bits > 8) throw InvalidInput("lloyd_max: bits must be in 1..8, got " + std::to_string(bits));
  const int K = 1 << bits;
  if (grid < 4 * K + 1) throw InvalidInput("lloyd_max: grid must have at least 4 * 2^bits + 1 points");
  if (d == Density::kSphere && dim < 3) throw InvalidInput("lloyd_max: the sphere law needs dim >= 3");
  if (iters < 1) throw InvalidInput("lloyd_max: iters must be >= 1");
  const Moments m = sample(d, dim, grid);
  const double hi = m.lo + m.h * static_cast<double>(grid - 1);

  LloydMax out;
  std::vector<double>& c = out.centroids;
  std::vector<double>& b = out.boundaries;
  c.resize(K);
  b.resize(K - 1);
  for (int i = 0; i < K; ++i) c[i] = quantile(m, m.P3, (i + 0.5) / K);
  for (out.iterations = 0; out.iterations < iters;) {
    ++out.iterations;
    for (int i = 0; i + 1 < K; ++i) b[i] = 0.5 * (c[i] + c[i + 1]);
    double moved = 0;
    for (int i = 0; i < K; ++i) {
      const double a = i ? b[i - 1] : m.lo, z = i + 1 < K ? b[i] : hi;
      const double mass = m.at(m.P, z) - m.at(m.P, a);
      if (mass <= 0) continue;
      const double ci = (m.at(m.M1, z) - m.at(m.M1, a)) / mass;
      moved = std::max(moved, std::fabs(ci - c[i]));
      c[i] = ci;
    }
    if (moved <= tol) break;
  }
  for (int i = 0; i + 1 < K; ++i) b[i] = 0.5 * (c[i] + c[i + 1]);
  out.mse = 0;
  for (int i = 0; i < K; ++i) {
    const double a = i ? b[i - 1] : m.lo, z = i + 1 < K ? b[i] : hi;
    const double P = m.at(m.P, z) - m.at(m.P, a);
    const double M1 = m.at(m.M1, z) - m.at(m.M1, a);
    const double M2 = m.at(m.M2, z) - m.at(m.M2, a);
    out.mse += M2 - 2 * c[i] * M1 + c[i] * c[i] * P;
  }
  return out;
}

void codebook_quantize(const float* x, int64_t n, const float* boundaries, int nb, uint8_t* codes) {
  at::parallel_for(0, n, 1 << 14, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      if (!std::isfinite(x[i])) {
        codes[i] = 0;
        continue;
      }
      codes[i] = static_cast<uint8_t>(std::upper_bound(boundaries, boundaries + nb, x[i]) - boundaries);
    }
  });
  for (int64_t i = 0; i < n; ++i)
    if (!std::isfinite(x[i])) throw InvalidInput("codebook_quantize: non-finite value at index " + std::to_string(i));
}

}  // namespace eoq
