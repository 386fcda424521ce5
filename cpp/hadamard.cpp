#include "hadamard.h"

#include <ATen/Parallel.h>

#include <cmath>
#include <string>

#include "errors.h"

namespace eoq {
namespace {

uint64_t mix64(uint64_t z) {  // the output function of splitmix64
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

}  // namespace

void fwht(float* x, int64_t n) {
  for (int64_t h = 1; h < n; h *= 2)
    for (int64_t i = 0; i < n; i += 2 * h)
      for (int64_t j = i; j < i + h; ++j) {
        const float a = x[j], b = x[j + h];
        x[j] = a + b;
        x[j + h] = a - b;
      }
}

float hadamard_scale(int64_t block) { return static_cast<float>(1.0 / std::sqrt(static_cast<double>(block))); }

std::vector<float> hadamard_signs(int64_t n, uint64_t seed) {
  std::vector<float> s(n);
  for (int64_t j = 0; j < n; ++j)
    s[j] = (mix64(seed + static_cast<uint64_t>(j + 1) * 0x9E3779B97F4A7C15ull) >> 63) ? -1.f : 1.f;
  return s;
}

void hadamard_inplace(float* x, int64_t count, int64_t block, const float* signs, bool inverse) {
  if (block < 1 || block > (1 << 24) || (block & (block - 1)))
    throw InvalidInput("hadamard: block must be a power of two, got " + std::to_string(block));
  const float scale = hadamard_scale(block);
  const int64_t grain = std::max<int64_t>(1, 16384 / block);
  at::parallel_for(0, count, grain, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      float* v = x + b * block;
      if (signs && !inverse)
        for (int64_t j = 0; j < block; ++j) v[j] *= signs[j];
      fwht(v, block);
      for (int64_t j = 0; j < block; ++j) v[j] *= (signs && inverse) ? scale * signs[j] : scale;
    }
  });
}

}  // namespace eoq
