#include "gptq.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "errors.h"

// Built with -ffp-contract=off (CMakeLists.txt): see gptq.h, "Order of operations".

#if defined(__x86_64__)
#define EOQ_GPTQ_X86 1
#define EOQ_GPTQ_AVX2 __attribute__((target("avx2")))
#define EOQ_GPTQ_AVX512 __attribute__((target("avx512f")))
#endif
#define EOQ_GPTQ_INLINE inline __attribute__((always_inline))

namespace eoq {
namespace {

constexpr int64_t kTileRows = 16;  // see gptq.h, "Constants"

// GCC/Clang generic vectors: the same source lowers to SSE, AVX2 or AVX-512 instructions in
// a function compiled for that target. Every lane does the IEEE operation the scalar code
// does, so every width gives the same bits.
typedef float vf4 __attribute__((vector_size(16)));
typedef float vf8 __attribute__((vector_size(32)));
typedef float vf16 __attribute__((vector_size(64)));

// Register micro-tiles of the panel update: R rows x C vectors of W floats (gptq.h,
// "Constants"); CW = C * W columns per packed chunk.
struct Baseline {
  using V = vf4;
  static constexpr int W = 4, R = 4, C = 2, CW = C * W;
};
struct Avx2 {
  using V = vf8;
  static constexpr int W = 8, R = 4, C = 2, CW = C * W;
};
struct Avx512 {
  using V = vf16;
  static constexpr int W = 16, R = 4, C = 4, CW = C * W;
};

template <class V>
EOQ_GPTQ_INLINE void vload(V& v, const float* p) {
  __builtin_memcpy(&v, p, sizeof(V));
}
template <class V>
EOQ_GPTQ_INLINE void vstore(float* p, const V& v) {
  __builtin_memcpy(p, &v, sizeof(V));
}

struct Problem {
  const float* w;
  int64_t rows, n;
  const float* u;
  const float* scale;
  int64_t group, n_groups;
  const float* levels;
  int64_t n_levels;
  int64_t qmin, qmax;
  int64_t block;
  int32_t* codes;
  float* xhat;
};

// Q of gptq.h for the updated value x with scale s. Returns false when x / s is not finite.
EOQ_GPTQ_INLINE bool quantize(const Problem& p, float x, float s, int32_t* code, float* q) {
  const float v = x / s;
  if (!std::isfinite(v)) return false;
  if (!p.levels) {
    double c = std::nearbyint(v);  // exact: an integer-valued float widens exactly
    c = c < static_cast<double>(p.qmin) ? static_cast<double>(p.qmin) : c;
    c = c > static_cast<double>(p.qmax) ? static_cast<double>(p.qmax) : c;
    *code = static_cast<int32_t>(c);
    *q = static_cast<float>(*code) * s;
    return true;
  }
  const float* L = p.levels;
  const int64_t nl = p.n_levels;
  // The distances |v - L[i]|, each rounded, are non-increasing up to the first level >= v
  // and non-decreasing from there (rounding is monotone), so the nearest level is one of the
  // two around v; the first minimum (torch.argmin) may sit further left on a plateau of
  // equal rounded distances, hence the walk.
  const int64_t i = std::lower_bound(L, L + nl, v) - L;
  int64_t c;
  if (i == nl)
    c = nl - 1;
  else if (i == 0)
    c = 0;
  else
    c = std::fabs(v - L[i - 1]) <= std::fabs(v - L[i]) ? i - 1 : i;
  while (c > 0 && std::fabs(v - L[c - 1]) == std::fabs(v - L[c])) --c;
  *code = static_cast<int32_t>(c);
  *q = L[c] * s;
  return true;
}

// x[k] -= e * u[k] for k in [0, len): the intra-block update of one row.
template <class V, int W>
EOQ_GPTQ_INLINE void axpy_sub(float* x, const float* u, float e, int64_t len) {
  int64_t k = 0;
  for (; k + W <= len; k += W) {
    V a, b;
    vload(a, x + k);
    vload(b, u + k);
    a = a - b * e;
    vstore(x + k, a);
  }
  for (; k < len; ++k) x[k] = x[k] - u[k] * e;
}

// The panel update for RR rows (X: first row, stride n; E: their errors, stride ldE) on CW =
// C * W columns from k: x[r][k'] -= E[r][jj] * P[jj][k' - k] for jj = 0 .. nj-1 in order, with
// the RR x C accumulators held in registers across the jj loop. P: the U panel's rows for
// these columns, row stride ldP (packed: ldP = CW, contiguous; or U itself: ldP = n).
template <class V, int W, int RR, int C>
EOQ_GPTQ_INLINE void panel_chunk(float* X, int64_t n, const float* E, int64_t ldE, const float* P, int64_t ldP,
                                 int64_t nj, int64_t k) {
  V acc[RR][C];
  for (int r = 0; r < RR; ++r)
    for (int c = 0; c < C; ++c) vload(acc[r][c], X + r * n + k + c * W);
  for (int64_t jj = 0; jj < nj; ++jj) {
    V uv[C];
    for (int c = 0; c < C; ++c) vload(uv[c], P + jj * ldP + c * W);
    for (int r = 0; r < RR; ++r) {
      const float e = E[r * ldE + jj];
      for (int c = 0; c < C; ++c) acc[r][c] = acc[r][c] - uv[c] * e;
    }
  }
  for (int r = 0; r < RR; ++r)
    for (int c = 0; c < C; ++c) vstore(X + r * n + k + c * W, acc[r][c]);
}

// One block [i1, i2) for the tile of T rows from r0: quantize its columns with the
// immediate intra-block updates, then feed the block's errors to columns [i2, n) through the
// packed panel (packed: chunk q holds U[i1 .. i2-1][i2 + q CW .. + CW] contiguously;
// the < CW columns left at the end are read from U directly). xhat's rows are the working
// copy: column j holds the updated value until it is quantized, then the quantized one.
// E: T x block errors. fail[r]: the first column where row r went non-finite (-1: none).
template <class K>
EOQ_GPTQ_INLINE void block_tile(const Problem& p, int64_t i1, int64_t i2, const float* packed, int64_t r0, int64_t T,
                                float* E, int64_t* fail) {
  using V = typename K::V;
  constexpr int W = K::W, R = K::R, C = K::C;
  constexpr int64_t CW = K::CW;
  const int64_t n = p.n, nj = i2 - i1, ldE = p.block;
  float* X = p.xhat + r0 * n;
  for (int64_t j = i1; j < i2; ++j) {
    const float* uj = p.u + j * n;
    const float d = uj[j];
    const int64_t g = j / p.group;
    for (int64_t t = 0; t < T; ++t) {
      const int64_t r = r0 + t;
      float* x = X + t * n;
      const float s = p.scale[r * p.n_groups + g];
      const float xv = x[j];
      float q = 0.f;
      int32_t code = 0;
      const bool ok = std::isfinite(xv) && quantize(p, xv, s, &code, &q);
      float e = ok ? (xv - q) / d : 0.f;
      if (!ok || !std::isfinite(e)) {
        if (fail[r] < 0) fail[r] = j;
        e = 0.f;  // keep going with finite numbers; the call throws afterwards
      }
      x[j] = q;
      p.codes[r * n + j] = code;
      E[t * ldE + (j - i1)] = e;
      axpy_sub<V, W>(x + j + 1, uj + j + 1, e, i2 - j - 1);
    }
  }
  const int64_t chunks = (n - i2) / CW;
  for (int64_t q = 0; q < chunks; ++q) {
    const float* P = packed + q * nj * CW;
    const int64_t k = i2 + q * CW;
    int64_t r = 0;
    for (; r + R <= T; r += R) panel_chunk<V, W, R, C>(X + r * n, n, E + r * ldE, ldE, P, CW, nj, k);
    for (; r < T; ++r) panel_chunk<V, W, 1, C>(X + r * n, n, E + r * ldE, ldE, P, CW, nj, k);
  }
  int64_t k = i2 + chunks * CW;
  const float* U = p.u + i1 * n;
  for (; k + W <= n; k += W)
    for (int64_t r = 0; r < T; ++r) panel_chunk<V, W, 1, 1>(X + r * n, n, E + r * ldE, ldE, U + k, n, nj, k);
  if (k < n)
    for (int64_t r = 0; r < T; ++r) {
      float* x = X + r * n;
      for (int64_t jj = 0; jj < nj; ++jj) {
        const float e = E[r * ldE + jj];
        const float* uj = U + jj * n;
        for (int64_t kk = k; kk < n; ++kk) x[kk] = x[kk] - uj[kk] * e;
      }
    }
}

// Tiles [t0, t1) of kTileRows rows through block [i1, i2).
using BlockFn = void (*)(const Problem&, int64_t i1, int64_t i2, const float* packed, int64_t t0, int64_t t1, float* E,
                         int64_t* fail);

template <class K>
EOQ_GPTQ_INLINE void block_tiles(const Problem& p, int64_t i1, int64_t i2, const float* packed, int64_t t0, int64_t t1,
                                 float* E, int64_t* fail) {
  for (int64_t t = t0; t < t1; ++t) {
    const int64_t r0 = t * kTileRows;
    block_tile<K>(p, i1, i2, packed, r0, std::min(kTileRows, p.rows - r0), E, fail);
  }
}

void blocks_baseline(const Problem& p, int64_t i1, int64_t i2, const float* packed, int64_t t0, int64_t t1, float* E,
                     int64_t* fail) {
  block_tiles<Baseline>(p, i1, i2, packed, t0, t1, E, fail);
}

#if EOQ_GPTQ_X86
EOQ_GPTQ_AVX2 void blocks_avx2(const Problem& p, int64_t i1, int64_t i2, const float* packed, int64_t t0, int64_t t1,
                               float* E, int64_t* fail) {
  block_tiles<Avx2>(p, i1, i2, packed, t0, t1, E, fail);
}
EOQ_GPTQ_AVX512 void blocks_avx512(const Problem& p, int64_t i1, int64_t i2, const float* packed, int64_t t0,
                                   int64_t t1, float* E, int64_t* fail) {
  block_tiles<Avx512>(p, i1, i2, packed, t0, t1, E, fail);
}
#endif

struct Kernel {
  const char* name;
  BlockFn fn;
  int64_t chunk;  // CW: the packed panel's chunk width
};

Kernel pick_kernel() {
  bool avx2 = false, avx512 = false;
#if EOQ_GPTQ_X86
  __builtin_cpu_init();
  avx2 = __builtin_cpu_supports("avx2");
  avx512 = __builtin_cpu_supports("avx512f");
#endif
  const char* env = std::getenv("EOQ_GPTQ_KERNEL");
  const std::string want = env ? env : "";
  if (!want.empty() && want != "baseline" && want != "avx2" && want != "avx512")
    throw InvalidInput("EOQ_GPTQ_KERNEL must be baseline, avx2 or avx512, got '" + want + "'");
  if ((want == "avx512" && !avx512) || (want == "avx2" && !avx2))
    throw InvalidInput("EOQ_GPTQ_KERNEL=" + want + ": this CPU does not support it");
#if EOQ_GPTQ_X86
  if (want == "avx512" || (want.empty() && avx512)) return {"avx512", blocks_avx512, Avx512::CW};
  if (want == "avx2" || (want.empty() && avx2)) return {"avx2", blocks_avx2, Avx2::CW};
#endif
  return {"baseline", blocks_baseline, Baseline::CW};
}

std::string at_rc(int64_t r, int64_t c) { return "[" + std::to_string(r) + ", " + std::to_string(c) + "]"; }

void check(const Problem& p) {
  if (p.rows < 0 || p.n < 0) throw InvalidInput("gptq: negative shape");
  if (p.group < 1) throw InvalidInput("gptq: group must be >= 1, got " + std::to_string(p.group));
  if (p.block < 1) throw InvalidInput("gptq: block must be >= 1, got " + std::to_string(p.block));
  constexpr int64_t lo = std::numeric_limits<int32_t>::min(), hi = std::numeric_limits<int32_t>::max();
  if (p.levels) {
    if (p.n_levels < 1 || p.n_levels > hi) throw InvalidInput("gptq: levels must hold 1 .. 2^31-1 values");
    for (int64_t i = 0; i < p.n_levels; ++i) {
      if (!std::isfinite(p.levels[i]))
        throw InvalidInput("gptq: levels must be finite, levels[" + std::to_string(i) + "] is not");
      if (i > 0 && !(p.levels[i] > p.levels[i - 1]))
        throw InvalidInput("gptq: levels must be strictly increasing, levels[" + std::to_string(i) +
                           "] = " + std::to_string(p.levels[i]) + " follows " + std::to_string(p.levels[i - 1]));
    }
  } else if (p.qmin < lo || p.qmax > hi || p.qmin > p.qmax) {
    throw InvalidInput("gptq: need int32 qmin <= qmax, got qmin = " + std::to_string(p.qmin) +
                       ", qmax = " + std::to_string(p.qmax));
  }
  for (int64_t j = 0; j < p.n; ++j) {
    const float* uj = p.u + j * p.n;
    if (!(std::isfinite(uj[j]) && uj[j] > 0.f))
      throw InvalidInput("gptq: U's diagonal must be finite and > 0, U" + at_rc(j, j) + " = " + std::to_string(uj[j]) +
                         " (a dead input column must be fixed before the factorization: "
                         "eoq.feedback.inverse_cholesky)");
    for (int64_t k = j + 1; k < p.n; ++k)
      if (!std::isfinite(uj[k])) throw InvalidInput("gptq: U must be finite, U" + at_rc(j, k) + " is not");
  }
  for (int64_t i = 0; i < p.rows * p.n_groups; ++i)
    if (!(std::isfinite(p.scale[i]) && p.scale[i] != 0.f))
      throw InvalidInput("gptq: scales must be finite and non-zero, scale" + at_rc(i / p.n_groups, i % p.n_groups) +
                         " = " + std::to_string(p.scale[i]));
  for (int64_t i = 0; i < p.rows * p.n; ++i)
    if (!std::isfinite(p.w[i])) throw InvalidInput("gptq: w must be finite, w" + at_rc(i / p.n, i % p.n) + " is not");
}

}  // namespace

const char* gptq_kernel_name() { return pick_kernel().name; }

void gptq_quantize(const float* w, int64_t rows, int64_t n, const float* u, const float* scale, int64_t group,
                   const float* levels, int64_t n_levels, int64_t qmin, int64_t qmax, int64_t block, int32_t* codes,
                   float* xhat) {
  Problem p{w, rows, n, u, scale, group, 0, levels, n_levels, qmin, qmax, block, codes, xhat};
  if (group >= 1 && n >= 0) p.n_groups = n / group + (n % group != 0);
  check(p);
  const Kernel kernel = pick_kernel();
  if (rows == 0 || n == 0) return;
  p.block = std::min(block, n);  // a wider block changes nothing but the buffer sizes
  const int64_t tiles = (rows + kTileRows - 1) / kTileRows, cw = kernel.chunk;
  // Grains: ~64 KiB of floats per task for the copies, one tile of rows for the work.
  at::parallel_for(0, rows, std::max<int64_t>(1, 16384 / n), [&](int64_t r0, int64_t r1) {
    std::memcpy(xhat + r0 * n, w + r0 * n, sizeof(float) * (r1 - r0) * n);
  });
  std::vector<int64_t> fail(rows, -1);
  std::vector<float> packed(p.block * ((n - std::min(p.block, n)) / cw) * cw);
  for (int64_t i1 = 0; i1 < n; i1 += p.block) {
    const int64_t i2 = std::min(i1 + p.block, n), nj = i2 - i1, chunks = (n - i2) / cw;
    float* P = packed.data();
    at::parallel_for(0, chunks, std::max<int64_t>(1, 16384 / (nj * cw)), [&](int64_t q0, int64_t q1) {
      for (int64_t q = q0; q < q1; ++q)
        for (int64_t j = i1; j < i2; ++j)
          std::memcpy(P + (q * nj + (j - i1)) * cw, u + j * n + i2 + q * cw, sizeof(float) * cw);
    });
    at::parallel_for(0, tiles, 1, [&](int64_t t0, int64_t t1) {
      std::vector<float> E(kTileRows * p.block);
      kernel.fn(p, i1, i2, P, t0, t1, E.data(), fail.data());
    });
  }
  for (int64_t r = 0; r < rows; ++r)
    if (fail[r] >= 0)
      throw InvalidInput("gptq: row " + std::to_string(r) + " became non-finite at column " + std::to_string(fail[r]) +
                         " (the updated value, its ratio to the scale or its fed-back error overflowed float32): "
                         "the feedback diverged; U must be the upper Cholesky factor of a damped inverse covariance "
                         "(eoq.feedback.inverse_cholesky) and the scales must not be tiny");
}

}  // namespace eoq
