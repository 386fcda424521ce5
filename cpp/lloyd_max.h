// Lloyd-Max scalar quantisers for a density, found numerically on a grid.
//
// A K = 2^bits level quantiser with boundaries b_1 < ... < b_{K-1} (b_0 = lo, b_K = hi)
// and centroids c_0 < ... < c_{K-1} is MSE-optimal only if each boundary is the midpoint
// of its neighbouring centroids and each centroid is the conditional mean of its cell.
// Lloyd's algorithm alternates those two conditions. The density is sampled on `grid`
// points over [lo, hi]; the cumulative integrals of p, x p and x^2 p (trapezoid rule)
// give each cell's mass, mean and distortion by linear interpolation at the boundaries,
// so one iteration costs O(K log grid). Lloyd's iteration is slow to move many levels
// far, so it starts from the high-rate optimum (Panter-Dite: level density ~ p^(1/3),
// levels at the (i + 1/2) / K quantiles of that law), already close at every width;
// iteration stops when no centroid moves by more than tol.
//
// Densities:
//  - Gaussian: N(0, 1) on [-10, 10] (tail mass beyond is < 2e-23).
//  - Sphere coordinate: one coordinate of a uniformly random unit vector in `dim`
//    dimensions, p(x) ~ (1 - x^2)^((dim - 3) / 2) on [-1, 1] (a Beta((d-1)/2, (d-1)/2)
//    law stretched to [-1, 1]); the grid covers [-r, r], r = min(1, 12 / sqrt(dim)),
//    where the density lives (its standard deviation is 1/sqrt(dim)).
#pragma once
#include <cstdint>
#include <vector>

namespace eoq {

enum class Density { kGaussian, kSphere };

struct LloydMax {
  std::vector<double> centroids;   // 2^bits, increasing
  std::vector<double> boundaries;  // 2^bits - 1, increasing
  double mse = 0;                  // expected squared error under the density
  int iterations = 0;
};

// Throws InvalidInput for bits outside 1..8, grid < 2^(bits+2)+1, dim < 3 for the sphere law.
LloydMax lloyd_max(Density d, int bits, int64_t dim, int64_t grid, int iters, double tol);

// codes[i] = number of boundaries <= x[i] (the nearest centroid; ties go up).
// Throws InvalidInput on a non-finite value.
void codebook_quantize(const float* x, int64_t n, const float* boundaries, int nb, uint8_t* codes);

}  // namespace eoq
