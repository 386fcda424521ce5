#include "absmax.h"

#include <ATen/Parallel.h>

#include <cmath>
#include <string>
#include <vector>

#include "errors.h"

namespace eoq {
namespace {

struct Block {
  const float* x;
  const float* w;  // importance of each value, or nullptr
  int n;
};

// Rounds d to fp16 and quantises the block with it; returns the (weighted) squared error.
double quantize_with(const Block& b, float d, int nmax, c10::Half* d16_out, uint8_t* codes) {
  const c10::Half d16(d);
  const float dq = static_cast<float>(d16);
  const float id = dq != 0.f ? 1.f / dq : 0.f;
  double err = 0;
  for (int i = 0; i < b.n; ++i) {
    float q = std::nearbyint(b.x[i] * id);
    q = std::fmin(std::fmax(q, static_cast<float>(-nmax)), static_cast<float>(nmax - 1));
    codes[i] = static_cast<uint8_t>(static_cast<int>(q) + nmax);
    const double r = static_cast<double>(b.x[i]) - static_cast<double>(q * dq);
    err += (b.w ? b.w[i] : 1.0) * r * r;
  }
  *d16_out = d16;
  return err;
}

void quantize_block(const Block& b, int nmax, c10::Half* scale, uint8_t* codes, uint8_t* trial) {
  float m = 0.f;
  for (int i = 0; i < b.n; ++i)
    if (std::fabs(b.x[i]) > std::fabs(m)) m = b.x[i];
  if (m == 0.f) {
    quantize_with(b, 0.f, nmax, scale, codes);
    return;
  }
  double best = quantize_with(b, m / static_cast<float>(-nmax), nmax, scale, codes);
  if (!b.w) return;
  for (int t = -9; t <= 9; ++t) {
    const float iscale = -(static_cast<float>(nmax) + 0.1f * t) / m;
    double sumlx = 0, suml2 = 0;
    for (int i = 0; i < b.n; ++i) {
      float q = std::nearbyint(iscale * b.x[i]);
      q = std::fmin(std::fmax(q, static_cast<float>(-nmax)), static_cast<float>(nmax - 1));
      sumlx += static_cast<double>(b.w[i]) * b.x[i] * q;
      suml2 += static_cast<double>(b.w[i]) * q * q;
    }
    if (suml2 <= 0) continue;
    c10::Half d16;
    const double err = quantize_with(b, static_cast<float>(sumlx / suml2), nmax, &d16, trial);
    if (err < best) {
      best = err;
      *scale = d16;
      for (int i = 0; i < b.n; ++i) codes[i] = trial[i];
    }
  }
}

void check(int bits, int block) {
  if (bits < 2 || bits > 8) throw InvalidInput("absmax: bits must be in 2..8, got " + std::to_string(bits));
  if (block < 16 || block > 256) throw InvalidInput("absmax: block must be in 16..256, got " + std::to_string(block));
}

}  // namespace

void absmax_quantize(const float* w, int64_t rows, int64_t cols, int bits, int block, const float* importance,
                     uint8_t* codes, c10::Half* scales) {
  check(bits, block);
  const int nmax = 1 << (bits - 1);
  const int64_t nb = (cols + block - 1) / block;
  std::vector<int64_t> bad_row(rows, -1);  // first failing column per row, checked after the loop
  std::vector<char> overflow(rows, 0);
  at::parallel_for(0, rows, 16, [&](int64_t r0, int64_t r1) {
    std::vector<uint8_t> trial(block);
    for (int64_t r = r0; r < r1; ++r) {
      const float* x = w + r * cols;
      for (int64_t c = 0; c < cols; ++c)
        if (!std::isfinite(x[c])) {
          bad_row[r] = c;
          break;
        }
      if (bad_row[r] >= 0) continue;
      for (int64_t k = 0; k < nb; ++k) {
        const int64_t c0 = k * block;
        const Block b{x + c0, importance ? importance + c0 : nullptr,
                      static_cast<int>(std::min<int64_t>(block, cols - c0))};
        c10::Half* s = scales + r * nb + k;
        quantize_block(b, nmax, s, codes + r * cols + c0, trial.data());
        if (!std::isfinite(static_cast<float>(*s))) overflow[r] = 1;
      }
    }
  });
  for (int64_t r = 0; r < rows; ++r) {
    if (bad_row[r] >= 0)
      throw InvalidInput("absmax: non-finite weight at [" + std::to_string(r) + ", " + std::to_string(bad_row[r]) + "]");
    if (overflow[r]) throw InvalidInput("absmax: a block scale of row " + std::to_string(r) + " overflows fp16");
  }
}

void absmax_dequantize(const uint8_t* codes, const c10::Half* scales, int64_t rows, int64_t cols, int bits,
                       int block, float* out) {
  check(bits, block);
  const int nmax = 1 << (bits - 1);
  const int64_t nb = (cols + block - 1) / block;
  at::parallel_for(0, rows, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r)
      for (int64_t c = 0; c < cols; ++c) {
        const float d = static_cast<float>(scales[r * nb + c / block]);
        out[r * cols + c] = static_cast<float>(static_cast<int>(codes[r * cols + c]) - nmax) * d;
      }
  });
}

}  // namespace eoq
