// AVX2 rANS chunk decoder and group encoder: the 32 lanes are four 8-lane vectors.
// Same bytes as the scalar coder in rans.cpp; chosen at run time there.
#include <immintrin.h>

#include <algorithm>
#include <array>

#include "rans_internal.h"

#define EOQ_AVX2 __attribute__((target("avx2,popcnt")))


namespace eoq {
namespace rans {
namespace {

// kExpand[mask][j]: index of the word lane j takes when the lanes in mask each read the
// next word in lane order (= number of mask bits below j).
// kCompressTop[mask]: permutation putting the lanes in mask, in lane order, at the top of
// the vector (lanes 8 - popcount(mask) .. 7); the lanes below are don't-care.
struct Luts {
  alignas(64) uint8_t expand[256][8];
  alignas(64) uint8_t compress_top[256][8];
  Luts() {
    for (int mk = 0; mk < 256; ++mk) {
      int c = 0;
      for (int j = 0; j < 8; ++j) {
        expand[mk][j] = static_cast<uint8_t>(c);
        if (mk >> j & 1) ++c;
      }
      for (int j = 0; j < 8; ++j) compress_top[mk][j] = 0;
      int k = 8 - c;
      for (int j = 0; j < 8; ++j)
        if (mk >> j & 1) compress_top[mk][k++] = static_cast<uint8_t>(j);
    }
  }
};
const Luts kLut;

EOQ_AVX2 inline __m256i lut8(const uint8_t (*tab)[8], int mk) {
  return _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(tab[mk])));
}

// base[idx] (32 bits from byte offset sizeof(T) * idx). A gather merges into its
// destination register and so waits for whatever that register held; the compiler tends
// to pick one written late in the previous step, which chains the four vectors' gathers.
// Gathering into a freshly zeroed register (with a fresh all-ones mask) avoids that. The
// table is not written while decoding, so the asm needs no memory clobber.
template <class T>
EOQ_AVX2 inline __m256i gather(__m256i idx, const T* base) {
  static_assert(sizeof(T) == 1 || sizeof(T) == 4, "gather scale");
  __m256i r, all;
  if (sizeof(T) == 4)
    asm("vpxor %[r], %[r], %[r]\n\tvpcmpeqd %[m], %[m], %[m]\n\tvpgatherdd %[m], (%[b],%[i],4), %[r]"
        : [r] "=&x"(r), [m] "=&x"(all)
        : [b] "r"(base), [i] "x"(idx));
  else
    asm("vpxor %[r], %[r], %[r]\n\tvpcmpeqd %[m], %[m], %[m]\n\tvpgatherdd %[m], (%[b],%[i],1), %[r]"
        : [r] "=&x"(r), [m] "=&x"(all)
        : [b] "r"(base), [i] "x"(idx));
  return r;
}

// One decode step of 8 lanes; returns the symbols in the low byte of each 32-bit lane.
template <bool kPacked>
EOQ_AVX2 inline __m256i dec_step(__m256i& x, const DecodeTable& t, __m128i sb, const uint8_t* w, size_t& rp) {
  const __m256i slot = _mm256_and_si256(x, _mm256_set1_epi32(static_cast<int>(t.mask)));
  __m256i s, f, b;
  if (kPacked) {
    const __m256i e = gather(slot, t.packed.data());
    s = _mm256_srli_epi32(e, 24);
    f = _mm256_add_epi32(_mm256_and_si256(e, _mm256_set1_epi32(0xFFF)), _mm256_set1_epi32(1));
    b = _mm256_and_si256(_mm256_srli_epi32(e, 12), _mm256_set1_epi32(0xFFF));
  } else {
    const __m256i e = gather(slot, t.info.data());
    s = _mm256_and_si256(gather(slot, t.sym.data()), _mm256_set1_epi32(0xFF));  // sym is padded by 4 bytes
    f = _mm256_and_si256(e, _mm256_set1_epi32(0xFFFF));
    b = _mm256_srli_epi32(e, 16);
  }
  x = _mm256_add_epi32(_mm256_mullo_epi32(f, _mm256_srl_epi32(x, sb)), b);
  const __m256i need = _mm256_cmpeq_epi32(_mm256_srli_epi32(x, 16), _mm256_setzero_si256());
  const int mk = _mm256_movemask_ps(_mm256_castsi256_ps(need));
  __m256i wv = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + 2 * rp)));
  wv = _mm256_permutevar8x32_epi32(wv, lut8(kLut.expand, mk));
  x = _mm256_blendv_epi8(x, _mm256_or_si256(_mm256_slli_epi32(x, 16), wv), need);
  rp += static_cast<size_t>(__builtin_popcount(mk));
  return s;
}

// One group of 32 symbols of one chunk (states x0..x3), its symbols stored to out.
template <bool kPacked>
EOQ_AVX2 inline void dec_group(__m256i& x0, __m256i& x1, __m256i& x2, __m256i& x3, const DecodeTable& t, __m128i sb,
                               const uint8_t* w, size_t& rp, uint8_t* out) {
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  const __m256i s0 = dec_step<kPacked>(x0, t, sb, w, rp);
  const __m256i s1 = dec_step<kPacked>(x1, t, sb, w, rp);
  const __m256i s2 = dec_step<kPacked>(x2, t, sb, w, rp);
  const __m256i s3 = dec_step<kPacked>(x3, t, sb, w, rp);
  const __m256i p = _mm256_packus_epi16(_mm256_packus_epi32(s0, s1), _mm256_packus_epi32(s2, s3));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(out), _mm256_permutevar8x32_epi32(p, order));
}

EOQ_AVX2 inline void load4(const uint32_t* x, __m256i* v) {
  for (int k = 0; k < 4; ++k) v[k] = _mm256_load_si256(reinterpret_cast<const __m256i*>(x + 8 * k));
}
EOQ_AVX2 inline void store4(uint32_t* x, const __m256i* v) {
  for (int k = 0; k < 4; ++k) _mm256_store_si256(reinterpret_cast<__m256i*>(x + 8 * k), v[k]);
}

// Whole groups of N chunks side by side, until one of them has none left.
template <bool kPacked, int N>
EOQ_AVX2 void decode_groups_n(const DecodeTable& t, ChunkCursor* const* c) {
  const __m128i sb = _mm_cvtsi32_si128(t.scale_bits);
  __m256i x[N][4];
  size_t rp[N];
  for (int j = 0; j < N; ++j) {
    load4(c[j]->x, x[j]);
    rp[j] = c[j]->rp;
  }
  for (uint32_t k; (k = common_groups<N>(c)) > 0;) {
    for (uint32_t g = 0; g < k; ++g)
      for (int j = 0; j < N; ++j)
        dec_group<kPacked>(x[j][0], x[j][1], x[j][2], x[j][3], t, sb, c[j]->w, rp[j], c[j]->out + c[j]->i + g * kLanes);
    for (int j = 0; j < N; ++j) {
      c[j]->i += k * kLanes;
      c[j]->rp = rp[j];
    }
  }
  for (int j = 0; j < N; ++j) store4(c[j]->x, x[j]);
}

// One chunk at a time: its four 8-lane states already take a quarter of the 16 ymm
// registers, and two chunks side by side spill (measured: half the speed).
template <bool kPacked>
EOQ_AVX2 void decode_groups_impl(const DecodeTable& t, ChunkCursor* const* c, int n) {
  for (int j = 0; j < n; ++j) decode_groups_n<kPacked, 1>(t, c + j);
}

// One encode step of 8 lanes (sym: 8 symbol bytes); returns the new states, the
// renormalisation mask and the states before the push.
EOQ_AVX2 inline __m256i enc_step(__m256i x, const EncTable& t, const uint8_t* sym, int& need, __m256i& old) {
  const __m256i s = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(sym)));
  const __m256i mult = _mm256_i32gather_epi32(reinterpret_cast<const int*>(t.mult.data()), s, 4);
  const __m256i thr = _mm256_i32gather_epi32(reinterpret_cast<const int*>(t.thr.data()), s, 4);
  const __m256i cc = _mm256_i32gather_epi32(reinterpret_cast<const int*>(t.cc.data()), s, 4);
  // both sides < 2^16, so the signed compare is exact
  const __m256i nv = _mm256_cmpgt_epi32(_mm256_srli_epi32(x, 16), _mm256_and_si256(thr, _mm256_set1_epi32(0xFFFF)));
  need = _mm256_movemask_ps(_mm256_castsi256_ps(nv));
  old = x;
  x = _mm256_blendv_epi8(x, _mm256_srli_epi32(x, 16), nv);
  const __m256i ev = _mm256_mul_epu32(x, mult);
  const __m256i od = _mm256_mul_epu32(_mm256_srli_epi64(x, 32), _mm256_srli_epi64(mult, 32));
  const __m256i tq = _mm256_blend_epi32(_mm256_srli_epi64(ev, 32), od, 0xAA);
  const __m256i sh1 = _mm256_srli_epi32(thr, 24);
  const __m256i sh2 = _mm256_and_si256(_mm256_srli_epi32(thr, 16), _mm256_set1_epi32(0xFF));
  const __m256i q = _mm256_srlv_epi32(_mm256_add_epi32(tq, _mm256_srlv_epi32(_mm256_sub_epi32(x, tq), sh1)), sh2);
  return _mm256_add_epi32(_mm256_add_epi32(x, _mm256_and_si256(cc, _mm256_set1_epi32(0xFFFF))),
                          _mm256_mullo_epi32(q, _mm256_srli_epi32(cc, 16)));
}

// Writes the low words of the lanes in need, in lane order, to out[pos - popcount .. pos):
// a full 8-word store ending at pos whose lower part is overwritten by the next emit.
EOQ_AVX2 inline void emit(int need, __m256i old, uint16_t* out, size_t& pos) {
  __m256i v = _mm256_permutevar8x32_epi32(old, lut8(kLut.compress_top, need));
  v = _mm256_and_si256(v, _mm256_set1_epi32(0xFFFF));
  v = _mm256_permute4x64_epi64(_mm256_packus_epi32(v, v), 0x08);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(out + pos - 8), _mm256_castsi256_si128(v));
  pos -= static_cast<size_t>(__builtin_popcount(need));
}

}  // namespace

void decode_groups_avx2(const DecodeTable& t, ChunkCursor* const* c, int n) {
  if (!t.packed.empty())
    decode_groups_impl<true>(t, c, n);
  else
    decode_groups_impl<false>(t, c, n);
}

EOQ_AVX2 void encode_groups_avx2(const EncTable& t, const uint8_t* sym, uint32_t n_groups, uint32_t* x,
                                 uint16_t* words, size_t* pos) {
  __m256i x0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x));
  __m256i x1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + 8));
  __m256i x2 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + 16));
  __m256i x3 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + 24));
  size_t p = *pos;
  for (uint32_t g = n_groups; g-- > 0;) {
    const uint8_t* s = sym + static_cast<size_t>(g) * kLanes;
    int n0, n1, n2, n3;
    __m256i o0, o1, o2, o3;
    x3 = enc_step(x3, t, s + 24, n3, o3);
    x2 = enc_step(x2, t, s + 16, n2, o2);
    x1 = enc_step(x1, t, s + 8, n1, o1);
    x0 = enc_step(x0, t, s, n0, o0);
    emit(n3, o3, words, p);  // highest lanes first: the stream holds lane 0's word first
    emit(n2, o2, words, p);
    emit(n1, o1, words, p);
    emit(n0, o0, words, p);
  }
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(x), x0);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(x + 8), x1);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(x + 16), x2);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(x + 24), x3);
  *pos = p;
}

}  // namespace rans
}  // namespace eoq
