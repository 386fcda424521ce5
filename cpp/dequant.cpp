#include "dequant.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <vector>

#include "errors.h"
#include "hadamard.h"
#include "rans_internal.h"

#if defined(__x86_64__)
#include <immintrin.h>
#define EOQ_DQ_X86 1
#define EOQ_DQ_AVX2 __attribute__((target("avx2,f16c")))
#endif

namespace eoq {

// ---- roundings ---------------------------------------------------------------------------

// c10::BFloat16's round_to_nearest_even: add half an ulp of bf16 (minus one when the kept
// bit is even, so ties go to even), truncate. NaN becomes the canonical 0x7FC0, as there.
uint16_t float_to_bf16(float f) {
  if (std::isnan(f)) return 0x7FC0;
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return static_cast<uint16_t>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

// c10::Half's conversion (fp16_ieee_from_fp32_value of the FP16 library): the float
// arithmetic does the rounding (to nearest even, subnormals and overflow to inf included),
// which is why this file must not contract the multiply-add into an FMA.
uint16_t float_to_fp16(float f) {
  const float scale_to_inf = 0x1.0p+112f, scale_to_zero = 0x1.0p-110f;
  float base = (std::fabs(f) * scale_to_inf) * scale_to_zero;
  uint32_t w;
  std::memcpy(&w, &f, 4);
  const uint32_t shl1_w = w + w, sign = w & 0x80000000u;
  uint32_t bias = shl1_w & 0xFF000000u;
  if (bias < 0x71000000u) bias = 0x71000000u;
  const uint32_t bias_bits = (bias >> 1) + 0x07800000u;
  float bias_f;
  std::memcpy(&bias_f, &bias_bits, 4);
  base = bias_f + base;
  uint32_t b;
  std::memcpy(&b, &base, 4);
  const uint32_t nonsign = ((b >> 13) & 0x00007C00u) + (b & 0x00000FFFu);
  return static_cast<uint16_t>((sign >> 16) | (shl1_w > 0xFF000000u ? 0x7E00u : nonsign));
}

namespace {

// Everything a row needs that does not depend on the row.
struct Ctx {
  const EcsqParams* p;
  float off;                 // float(offset): torch adds the int offset to float codes this way
  std::vector<float> mult;   // hadamard_scale(block) * sign[j], as hadamard_inplace forms it
  std::vector<float> lut;    // with fitted reconstruction: the value of each of the 256 codes
};

// How a row's codes become values: code + offset; (code << low_bits | low) + offset; lut[code].
enum Mode { kPlain = 0, kWide = 1, kLut = 2 };

using RowFn = void (*)(const Ctx& k, int64_t r, const uint8_t* q, float* buf);

template <OutType T>
inline void store1(void* out, int64_t i, float y) {
  if (T == OutType::kFloat32)
    static_cast<float*>(out)[i] = y;
  else if (T == OutType::kBFloat16)
    static_cast<uint16_t*>(out)[i] = float_to_bf16(y);
  else
    static_cast<uint16_t*>(out)[i] = float_to_fp16(y);
}

inline float step_of(const EcsqParams& p, int64_t r) { return p.steps[r / p.group_rows]; }

static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__, "the low-bit reader assumes a little-endian CPU");

// The packed low bits of row r: padded % 16 == 0, so every row (and every group of 8 values
// in it) starts on a whole byte.
inline const uint8_t* low_row(const EcsqParams& p, int64_t r) { return p.low + r * p.padded / 8 * p.low_bits; }

// The k bytes at p as a little-endian word (k = 1..8). A byte loop: compilers turn it into
// a few loads, where memcpy of a run-time size 3, 5, 6 or 7 became a call per 8 values.
inline uint64_t load_le(const uint8_t* p, int k) {
  uint64_t u = 0;
  for (int i = 0; i < k; ++i) u |= static_cast<uint64_t>(p[i]) << (8 * i);
  return u;
}

// The levels of the 8 values starting at j (j % 8 == 0) of a row: (code << k) | low. Their
// low bits fill exactly k bytes (LSB-first), read as one little-endian word.
inline void levels8(const uint8_t* q, const uint8_t* low, int k, int64_t j, int32_t* out) {
  const uint64_t u = load_le(low + j / 8 * k, k);
  const uint32_t mask = (1u << k) - 1;
  for (int i = 0; i < 8; ++i)
    out[i] = static_cast<int32_t>((static_cast<uint32_t>(q[j + i]) << k) | (static_cast<uint32_t>(u >> (i * k)) & mask));
}

// The obvious row: the reference's operations one value at a time (fwht is hadamard.cpp's).
template <OutType T, bool kAwq, int kMode>
void row_scalar(const Ctx& k, int64_t r, const uint8_t* q, float* buf) {
  const EcsqParams& p = *k.p;
  const int64_t B = p.block;
  const float step = step_of(p, r);
  const uint8_t* low = kMode == kWide ? low_row(p, r) : nullptr;
  // Blocks that lie wholly in the padding are cropped by the reference: skip them. Blocks
  // are transformed independently, so the kept columns do not depend on them.
  for (int64_t b0 = 0; b0 < p.cols; b0 += B) {
    if (kMode == kLut) {
      for (int64_t j = 0; j < B; ++j) buf[j] = k.lut[q[b0 + j]] * step;
    } else if (kMode == kWide) {
      int32_t lv[8];
      for (int64_t j = 0; j < B; j += 8) {
        levels8(q, low, p.low_bits, b0 + j, lv);
        for (int i = 0; i < 8; ++i) buf[j + i] = (static_cast<float>(lv[i]) + k.off) * step;
      }
    } else {
      for (int64_t j = 0; j < B; ++j) buf[j] = (static_cast<float>(q[b0 + j]) + k.off) * step;
    }
    fwht(buf, B);
    const int64_t n = std::min(B, p.cols - b0);
    for (int64_t j = 0; j < n; ++j) {
      float y = buf[j] * k.mult[j];
      if (kAwq) y = y / p.awq[b0 + j];
      store1<T>(p.out, r * p.cols + b0 + j, y);
    }
  }
}

#ifdef EOQ_DQ_X86

// Stages h = 1, 2, 4 of the butterflies inside one vector of 8 values. Each output lane is
// partner + (own value, negated in the lanes that take the difference): for a pair (a, b)
// the first lane gets b + a = a + b and the second a + (-b), which IEEE defines as a - b,
// so the bits are those of hadamard.cpp's fwht.
EOQ_DQ_AVX2 inline __m256 fwht8(__m256 v) {
  const __m256 neg1 = _mm256_castsi256_ps(_mm256_setr_epi32(0, INT_MIN, 0, INT_MIN, 0, INT_MIN, 0, INT_MIN));
  const __m256 neg2 = _mm256_castsi256_ps(_mm256_setr_epi32(0, 0, INT_MIN, INT_MIN, 0, 0, INT_MIN, INT_MIN));
  const __m256 neg4 = _mm256_castsi256_ps(_mm256_setr_epi32(0, 0, 0, 0, INT_MIN, INT_MIN, INT_MIN, INT_MIN));
  v = _mm256_add_ps(_mm256_permute_ps(v, 0xB1), _mm256_xor_ps(v, neg1));            // lanes 2i <-> 2i+1
  v = _mm256_add_ps(_mm256_permute_ps(v, 0x4E), _mm256_xor_ps(v, neg2));            // i <-> i+2 in each half
  v = _mm256_add_ps(_mm256_permute2f128_ps(v, v, 0x01), _mm256_xor_ps(v, neg4));    // halves
  return v;
}

// 8 values rounded and stored; bf16 by the integer rounding of float_to_bf16, fp16 by the
// F16C instruction (IEEE round-to-nearest-even, as torch's vectorised cast and as
// float_to_fp16). NaN lanes are not special-cased (float_to_bf16 maps every NaN to 0x7FC0,
// this keeps the top bits): non-finite output is outside the contract (dequant.h).
template <OutType T>
EOQ_DQ_AVX2 inline void store8(void* out, int64_t i, __m256 y) {
  if (T == OutType::kFloat32) {
    _mm256_storeu_ps(static_cast<float*>(out) + i, y);
  } else if (T == OutType::kFloat16) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(static_cast<uint16_t*>(out) + i),
                     _mm256_cvtps_ph(y, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  } else {
    const __m256i u = _mm256_castps_si256(y);
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    const __m256i t = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7FFF)), lsb), 16);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(static_cast<uint16_t*>(out) + i),
                     _mm_packus_epi32(_mm256_castsi256_si128(t), _mm256_extracti128_si256(t, 1)));
  }
}

// Where one block's transformed values go: value j (< n, the block's kept columns) is
// multiplied by mult[j] (scale * sign), divided by awq[j], rounded and stored at out[base + j].
struct Sink {
  const float* mult;
  const float* awq;  // already offset to the block's first column
  void* out;
  int64_t base, n;
};

template <OutType T, bool kAwq>
EOQ_DQ_AVX2 inline void emit(const Sink& s, __m256 v, int64_t j) {
  if (j + 8 <= s.n) {
    __m256 y = _mm256_mul_ps(v, _mm256_loadu_ps(s.mult + j));
    if (kAwq) y = _mm256_div_ps(y, _mm256_loadu_ps(s.awq + j));
    store8<T>(s.out, s.base + j, y);
  } else if (j < s.n) {  // the cropped block's ragged end
    alignas(32) float t[8];
    _mm256_store_ps(t, v);
    for (int64_t i = j; i < s.n; ++i) {
      float y = t[i - j] * s.mult[i];
      if (kAwq) y = y / s.awq[i];
      store1<T>(s.out, s.base + i, y);
    }
  }
}

// 8 codes -> (code + offset) * step, then butterfly stages 1, 2, 4.
EOQ_DQ_AVX2 inline __m256 dq8(__m256 off, __m256 step, const uint8_t* c) {
  const __m256i v = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(c)));
  return fwht8(_mm256_mul_ps(_mm256_add_ps(_mm256_cvtepi32_ps(v), off), step));
}

// The same for the 8 values of row q at j, in any Mode (wide: levels (code << k) | low).
template <int kMode>
EOQ_DQ_AVX2 inline __m256 dq8_at(__m256 off, __m256 step, const uint8_t* q, const uint8_t* low, int k, int64_t j,
                                 const float* lut) {
  if (kMode == kPlain) return dq8(off, step, q + j);
  if (kMode == kLut) {
    const __m256i c = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(q + j)));
    return fwht8(_mm256_mul_ps(_mm256_i32gather_ps(lut, c, 4), step));
  }
  // levels8 in registers: the 8 fields of k bits lie in one little-endian word u (k whole
  // bytes); lane i takes u >> (i * k) (two 4-lane 64-bit shifts, whose low halves are then
  // put in lane order), masked, or-ed with the high part code << k.
  const uint64_t u = load_le(low + j / 8 * k, k);
  const __m256i uu = _mm256_set1_epi64x(static_cast<long long>(u));
  const long long kk = k;
  const __m256i a = _mm256_srlv_epi64(uu, _mm256_setr_epi64x(0, kk, 2 * kk, 3 * kk));
  const __m256i b = _mm256_srlv_epi64(uu, _mm256_setr_epi64x(4 * kk, 5 * kk, 6 * kk, 7 * kk));
  const __m256i ab = _mm256_blend_epi32(a, _mm256_slli_epi64(b, 32), 0xAA);  // a0 b0 a1 b1 a2 b2 a3 b3
  const __m256i lo = _mm256_and_si256(_mm256_permutevar8x32_epi32(ab, _mm256_setr_epi32(0, 2, 4, 6, 1, 3, 5, 7)),
                                      _mm256_set1_epi32((1 << k) - 1));
  const __m256i hi = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(q + j)));
  const __m256i v = _mm256_or_si256(_mm256_sll_epi32(hi, _mm_cvtsi32_si128(k)), lo);
  return fwht8(_mm256_mul_ps(_mm256_add_ps(_mm256_cvtepi32_ps(v), off), step));
}

// One butterfly stage h over whole vectors of a block of n values in x.
EOQ_DQ_AVX2 inline void stage2(float* x, int64_t n, int64_t h) {
  for (int64_t i = 0; i < n; i += 2 * h)
    for (int64_t j = i; j < i + h; j += 8) {
      const __m256 a = _mm256_loadu_ps(x + j), b = _mm256_loadu_ps(x + j + h);
      _mm256_storeu_ps(x + j, _mm256_add_ps(a, b));
      _mm256_storeu_ps(x + j + h, _mm256_sub_ps(a, b));
    }
}

// Stages h and 2h in one pass (the same butterflies in the same stage order; half the
// loads and stores).
EOQ_DQ_AVX2 inline void stage4(float* x, int64_t n, int64_t h) {
  for (int64_t i = 0; i < n; i += 4 * h)
    for (int64_t j = i; j < i + h; j += 8) {
      const __m256 x0 = _mm256_loadu_ps(x + j), x1 = _mm256_loadu_ps(x + j + h);
      const __m256 x2 = _mm256_loadu_ps(x + j + 2 * h), x3 = _mm256_loadu_ps(x + j + 3 * h);
      const __m256 a0 = _mm256_add_ps(x0, x1), a1 = _mm256_sub_ps(x0, x1);  // stage h
      const __m256 a2 = _mm256_add_ps(x2, x3), a3 = _mm256_sub_ps(x2, x3);
      _mm256_storeu_ps(x + j, _mm256_add_ps(a0, a2));                        // stage 2h
      _mm256_storeu_ps(x + j + 2 * h, _mm256_sub_ps(a0, a2));
      _mm256_storeu_ps(x + j + h, _mm256_add_ps(a1, a3));
      _mm256_storeu_ps(x + j + 3 * h, _mm256_sub_ps(a1, a3));
    }
}

// The row in as few passes over the block buffer as the stages allow: (1) codes -> values
// and stages 1..16 in registers, 32 values at a time; (2) the middle stages two at a time;
// (3) the last one or two stages straight into the output. Stage order and every operation
// are the reference's.
template <OutType T, bool kAwq, int kMode>
EOQ_DQ_AVX2 void row_avx2(const Ctx& k, int64_t r, const uint8_t* q, float* buf) {
  const EcsqParams& p = *k.p;
  const uint8_t* low = kMode == kWide ? low_row(p, r) : nullptr;
  const float* lut = kMode == kLut ? k.lut.data() : nullptr;
  const int lb = p.low_bits;
  const int64_t B = p.block, cols = p.cols;
  const __m256 off = _mm256_set1_ps(k.off), step = _mm256_set1_ps(step_of(p, r));
  int log2b = 0;
  while ((int64_t(1) << log2b) < B) ++log2b;
  const int rest = log2b - 5;                 // stages h = 32 .. B/2 (B >= 64)
  const int last = rest >= 2 ? 2 : rest;      // fused with the output
  for (int64_t b0 = 0; b0 < cols; b0 += B) {  // blocks wholly in the padding: cropped
    const Sink s{k.mult.data(), p.awq ? p.awq + b0 : nullptr, p.out, r * cols + b0, std::min(B, cols - b0)};
    if (B == 16) {
      const __m256 v0 = dq8_at<kMode>(off, step, q, low, lb, b0, lut);
      const __m256 v1 = dq8_at<kMode>(off, step, q, low, lb, b0 + 8, lut);
      emit<T, kAwq>(s, _mm256_add_ps(v0, v1), 0);
      emit<T, kAwq>(s, _mm256_sub_ps(v0, v1), 8);
      continue;
    }
    for (int64_t j = 0; j < B; j += 32) {
      const int64_t i = b0 + j;
      const __m256 v0 = dq8_at<kMode>(off, step, q, low, lb, i, lut), v1 = dq8_at<kMode>(off, step, q, low, lb, i + 8, lut);
      const __m256 v2 = dq8_at<kMode>(off, step, q, low, lb, i + 16, lut);
      const __m256 v3 = dq8_at<kMode>(off, step, q, low, lb, i + 24, lut);
      const __m256 a0 = _mm256_add_ps(v0, v1), a1 = _mm256_sub_ps(v0, v1);  // stage 8
      const __m256 a2 = _mm256_add_ps(v2, v3), a3 = _mm256_sub_ps(v2, v3);
      const __m256 y0 = _mm256_add_ps(a0, a2), y2 = _mm256_sub_ps(a0, a2);  // stage 16
      const __m256 y1 = _mm256_add_ps(a1, a3), y3 = _mm256_sub_ps(a1, a3);
      if (B == 32) {
        emit<T, kAwq>(s, y0, 0);
        emit<T, kAwq>(s, y1, 8);
        emit<T, kAwq>(s, y2, 16);
        emit<T, kAwq>(s, y3, 24);
      } else {
        _mm256_storeu_ps(buf + j, y0);
        _mm256_storeu_ps(buf + j + 8, y1);
        _mm256_storeu_ps(buf + j + 16, y2);
        _mm256_storeu_ps(buf + j + 24, y3);
      }
    }
    if (B == 32) continue;
    int64_t h = 32;
    int mid = rest - last;
    for (; mid >= 2; mid -= 2, h *= 4) stage4(buf, B, h);
    if (mid == 1) {
      stage2(buf, B, h);
      h *= 2;
    }
    if (last == 2) {  // h = B / 4: stages h and 2h, then out
      for (int64_t j = 0; j < h; j += 8) {
        const __m256 x0 = _mm256_loadu_ps(buf + j), x1 = _mm256_loadu_ps(buf + j + h);
        const __m256 x2 = _mm256_loadu_ps(buf + j + 2 * h), x3 = _mm256_loadu_ps(buf + j + 3 * h);
        const __m256 a0 = _mm256_add_ps(x0, x1), a1 = _mm256_sub_ps(x0, x1);
        const __m256 a2 = _mm256_add_ps(x2, x3), a3 = _mm256_sub_ps(x2, x3);
        emit<T, kAwq>(s, _mm256_add_ps(a0, a2), j);
        emit<T, kAwq>(s, _mm256_add_ps(a1, a3), j + h);
        emit<T, kAwq>(s, _mm256_sub_ps(a0, a2), j + 2 * h);
        emit<T, kAwq>(s, _mm256_sub_ps(a1, a3), j + 3 * h);
      }
    } else {  // h = B / 2
      for (int64_t j = 0; j < h; j += 8) {
        const __m256 a = _mm256_loadu_ps(buf + j), b = _mm256_loadu_ps(buf + j + h);
        emit<T, kAwq>(s, _mm256_add_ps(a, b), j);
        emit<T, kAwq>(s, _mm256_sub_ps(a, b), j + h);
      }
    }
  }
}

bool cpu_has_avx2() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c");
}

#else
bool cpu_has_avx2() { return false; }
#endif

struct Kernel {
  const char* name;
  bool avx2;
};

Kernel choose_kernel() {
  const bool has = cpu_has_avx2();
  const char* env = std::getenv("EOQ_DEQUANT_KERNEL");
  if (env && *env) {
    const std::string want(env);
    if (want == "scalar") return {"scalar", false};
    if (want == "avx2") {
      if (has) return {"avx2", true};
      throw InvalidInput("EOQ_DEQUANT_KERNEL=avx2: this CPU does not support it");
    }
    throw InvalidInput("EOQ_DEQUANT_KERNEL=" + want + ": expected scalar or avx2");
  }
  return has ? Kernel{"avx2", true} : Kernel{"scalar", false};
}

const Kernel& kernel() {
  static const Kernel k = choose_kernel();  // a throw leaves it unset: every call reports it
  return k;
}

template <OutType T, int kMode>
RowFn pick_row_w(bool awq, bool avx2) {
#ifdef EOQ_DQ_X86
  if (avx2) return awq ? row_avx2<T, true, kMode> : row_avx2<T, false, kMode>;
#endif
  (void)avx2;
  return awq ? row_scalar<T, true, kMode> : row_scalar<T, false, kMode>;
}

template <OutType T>
RowFn pick_row_t(bool awq, bool avx2, int mode) {
  if (mode == kWide) return pick_row_w<T, kWide>(awq, avx2);
  if (mode == kLut) return pick_row_w<T, kLut>(awq, avx2);
  return pick_row_w<T, kPlain>(awq, avx2);
}

RowFn pick_row(const EcsqParams& p) {
  const bool avx2 = kernel().avx2, awq = p.awq != nullptr;
  const int mode = p.low_bits > 0 ? kWide : p.n_recon > 0 ? kLut : kPlain;
  switch (p.out_type) {
    case OutType::kFloat32:
      return pick_row_t<OutType::kFloat32>(awq, avx2, mode);
    case OutType::kFloat16:
      return pick_row_t<OutType::kFloat16>(awq, avx2, mode);
    case OutType::kBFloat16:
      return pick_row_t<OutType::kBFloat16>(awq, avx2, mode);
  }
  throw InvalidInput("ecsq_dequantize: unknown output type");
}

Ctx make_ctx(const EcsqParams& p) {
  Ctx k;
  k.p = &p;
  k.off = static_cast<float>(p.offset);
  const std::vector<float> signs = hadamard_signs(p.block, p.seed);
  const float scale = hadamard_scale(p.block);
  k.mult.resize(p.block);
  for (int64_t j = 0; j < p.block; ++j) k.mult[j] = scale * signs[j];
  if (p.n_recon > 0) {  // the value of code c: float(c) + float(offset), or the fitted one
    k.lut.resize(256);
    for (int c = 0; c < 256; ++c) {
      const int64_t v = c + p.offset;
      const int64_t m = v < 0 ? -v : v;
      k.lut[c] = (m >= 1 && m <= p.n_recon) ? (v < 0 ? -p.recon[m - 1] : p.recon[m - 1])
                                            : static_cast<float>(c) + k.off;
    }
  }
  return k;
}

// The float buffer of one block, per thread, reused (block <= 2^16 floats).
float* block_buffer(int64_t block) {
  thread_local std::vector<float> buf;
  if (static_cast<int64_t>(buf.size()) < block) buf.resize(block);
  return buf.data();
}

}  // namespace

void ecsq_check(const EcsqParams& p) {
  auto need = [](bool ok, const std::string& msg) {
    if (!ok) throw InvalidInput("ecsq_dequantize: " + msg);
  };
  need(p.rows >= 0 && p.cols >= 0, "rows and cols must be non-negative");
  need(p.block >= 16 && p.block <= (1 << 16) && (p.block & (p.block - 1)) == 0,
       "rotation block must be a power of two in [16, 65536], got " + std::to_string(p.block));
  need(p.padded >= p.cols && p.padded % p.block == 0,
       "padded_cols " + std::to_string(p.padded) + " must be >= cols " + std::to_string(p.cols) +
           " and a multiple of the block " + std::to_string(p.block));
  need(p.padded <= (int64_t(1) << 40) && p.rows <= (int64_t(1) << 40) &&
           (p.padded == 0 || p.rows <= (int64_t(1) << 50) / p.padded),
       "too many values");
  need(p.group_rows >= 1, "group_rows must be >= 1");
  const int64_t n_steps = p.rows == 0 ? 0 : (p.rows - 1) / p.group_rows + 1;
  need(p.n_steps == std::max<int64_t>(n_steps, 1) && p.steps != nullptr,
       std::to_string(p.n_steps) + " steps given, " + std::to_string(p.rows) + " rows in groups of " +
           std::to_string(p.group_rows) + " need " + std::to_string(std::max<int64_t>(n_steps, 1)));
  need(p.low_bits >= 0 && p.low_bits <= 8, "low_bits must be in [0, 8], got " + std::to_string(p.low_bits));
  need((p.low_bits > 0) == (p.low != nullptr), "the low bits must be given exactly when low_bits > 0");
  need(p.n_recon >= 0 && p.n_recon <= 8 && (p.n_recon > 0) == (p.recon != nullptr) && !(p.n_recon && p.low_bits),
       "reconstruction points: 0..8 of them, given exactly when n_recon > 0, and never with low bits");
  need(p.offset >= INT32_MIN && p.offset <= int64_t(INT32_MAX) - ((int64_t(256) << p.low_bits) - 1),
       "offset " + std::to_string(p.offset) + " out of range");
}

namespace {
void check_all(const EcsqParams& p) {
  ecsq_check(p);
  if (p.out == nullptr && p.rows > 0 && p.cols > 0) throw InvalidInput("ecsq_dequantize: no output");
}
}  // namespace

void ecsq_dequantize_rans(const uint8_t* stream, size_t len, const rans::Header& h, const EcsqParams& p) {
  check_all(p);
  const uint64_t n = static_cast<uint64_t>(p.rows) * static_cast<uint64_t>(p.padded);
  if (h.n_symbols != n)
    throw CorruptStream("rANS stream declares " + std::to_string(h.n_symbols) + " symbols, expected " +
                        std::to_string(n) + " (" + std::to_string(p.rows) + " x " + std::to_string(p.padded) + ")");
  if (n == 0) return;
  const Ctx k = make_ctx(p);
  const RowFn row = pick_row(p);
  const rans::ChunkDecoder dec(stream, len, h);
  const uint64_t C = h.chunk_size, P = static_cast<uint64_t>(p.padded), rows = static_cast<uint64_t>(p.rows);
  std::vector<std::string> error(h.n_chunks);
  std::vector<char> prefix_failed(h.n_chunks, 0);
  at::parallel_for(0, h.n_chunks, 1, [&](int64_t b, int64_t e) {
    thread_local std::vector<uint8_t> codes;  // reused: no page faults, stays in cache
    float* buf = block_buffer(p.block);
    for (int64_t c0 = b; c0 < e; c0 += rans::kBatch) {
      const int nb = static_cast<int>(std::min<int64_t>(rans::kBatch, e - c0));
      const uint64_t lo = dec.chunk_begin(static_cast<uint32_t>(c0));
      const uint64_t hi = std::min<uint64_t>(n, dec.chunk_begin(static_cast<uint32_t>(c0 + nb)));
      // Rows that start in [lo, hi) are this batch's; they may end past hi.
      const uint64_t r_lo = (lo + P - 1) / P, r_hi = std::min<uint64_t>(rows, (hi + P - 1) / P);
      const uint64_t need = std::max(hi, r_hi * P);
      if (codes.size() < need - lo) codes.resize(need - lo);
      dec.decode_chunks(static_cast<uint32_t>(c0), nb, codes.data(), &error[c0]);
      bool ok = true;
      for (int j = 0; j < nb; ++j) ok = ok && error[c0 + j].empty();
      for (uint64_t pos = hi; ok && pos < need;) {  // the next chunks' first symbols
        const uint32_t c = static_cast<uint32_t>(pos / C);
        const uint32_t m = static_cast<uint32_t>(std::min<uint64_t>(dec.chunk_len(c), need - pos));
        if (!dec.decode_prefix(c, m, codes.data() + (pos - lo))) {
          ok = false;
          prefix_failed[c0] = 1;
        }
        pos += m;
      }
      if (!ok) continue;  // the failing chunk reports its error below
      for (uint64_t r = r_lo; r < r_hi; ++r) row(k, static_cast<int64_t>(r), codes.data() + (r * P - lo), buf);
    }
  });
  for (uint32_t c = 0; c < h.n_chunks; ++c)
    if (!error[c].empty())
      throw CorruptStream("rANS chunk " + std::to_string(c) + " of " + std::to_string(h.n_chunks) + ": " + error[c]);
  // A failed prefix is a failure of the chunk's own full decode, reported above; this is a
  // guard should that ever not hold.
  for (uint32_t c = 0; c < h.n_chunks; ++c)
    if (prefix_failed[c]) throw CorruptStream("rANS stream: a chunk's first symbols do not decode");
}

void ecsq_dequantize_codes(const uint8_t* codes, const EcsqParams& p) {
  check_all(p);
  if (p.rows == 0 || p.cols == 0) return;
  const Ctx k = make_ctx(p);
  const RowFn row = pick_row(p);
  const int64_t grain = std::max<int64_t>(1, 65536 / p.padded);
  at::parallel_for(0, p.rows, grain, [&](int64_t b, int64_t e) {
    float* buf = block_buffer(p.block);
    for (int64_t r = b; r < e; ++r) row(k, r, codes + r * p.padded, buf);
  });
}

std::string dequant_kernel_name() { return kernel().name; }

}  // namespace eoq
