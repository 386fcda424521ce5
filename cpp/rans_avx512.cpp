// AVX-512 (F, BW, VL, VBMI2) rANS chunk decoder and group encoder: the 32 lanes are two
// 16-lane vectors. Same bytes as the scalar coder in rans.cpp; chosen at run time there.
#include <immintrin.h>

#include "rans_internal.h"

#define EOQ_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512vbmi2,popcnt,bmi2")))

namespace eoq {
namespace rans {
namespace {

// One decode step of 16 lanes: pop a symbol per lane, renormalise from the words at w.
template <bool kPacked>
EOQ_AVX512 inline __m512i dec_step(__m512i x, const DecodeTable& t, __m128i sb, const uint8_t* w, size_t& rp,
                                   uint8_t* out) {
  const __m512i slot = _mm512_and_si512(x, _mm512_set1_epi32(static_cast<int>(t.mask)));
  __m512i s, f, b;
  if (kPacked) {
    const __m512i e = _mm512_i32gather_epi32(slot, t.packed.data(), 4);
    s = _mm512_srli_epi32(e, 24);
    f = _mm512_add_epi32(_mm512_and_si512(e, _mm512_set1_epi32(0xFFF)), _mm512_set1_epi32(1));
    b = _mm512_and_si512(_mm512_srli_epi32(e, 12), _mm512_set1_epi32(0xFFF));
  } else {
    const __m512i e = _mm512_i32gather_epi32(slot, t.info.data(), 4);
    s = _mm512_i32gather_epi32(slot, t.sym.data(), 1);  // sym is padded by 4 bytes
    f = _mm512_and_si512(e, _mm512_set1_epi32(0xFFFF));
    b = _mm512_srli_epi32(e, 16);
  }
  x = _mm512_add_epi32(_mm512_mullo_epi32(f, _mm512_srl_epi32(x, sb)), b);
  const __mmask16 need = _mm512_cmplt_epu32_mask(x, _mm512_set1_epi32(static_cast<int>(kL)));
  __m512i wv = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + 2 * rp)));
  wv = _mm512_maskz_expand_epi32(need, wv);
  x = _mm512_mask_or_epi32(x, need, _mm512_slli_epi32(x, 16), wv);
  rp += static_cast<size_t>(__builtin_popcount(need));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(out), _mm512_cvtepi32_epi8(s));
  return x;
}

template <bool kPacked>
EOQ_AVX512 void decode_chunk_avx512_impl(const DecodeTable& t, const uint8_t* payload, size_t bytes, uint32_t m,
                                         uint8_t* out) {
  alignas(64) uint32_t x[kLanes];
  load_states(payload, x);
  const uint8_t* w = payload + 4 * kLanes;
  const size_t n_words = (bytes - 4 * kLanes) / 2;
  size_t rp = 0;
  const __m128i sb = _mm_cvtsi32_si128(t.scale_bits);
  __m512i x0 = _mm512_load_si512(x), x1 = _mm512_load_si512(x + 16);
  uint32_t i = 0;
  // A group reads at most kLanes words and its loads touch only [rp, rp + kLanes).
  for (; i + kLanes <= m && n_words - rp >= kLanes; i += kLanes) {
    x0 = dec_step<kPacked>(x0, t, sb, w, rp, out + i);
    x1 = dec_step<kPacked>(x1, t, sb, w, rp, out + i + 16);
  }
  _mm512_store_si512(x, x0);
  _mm512_store_si512(x + 16, x1);
  decode_tail(t, x, w, n_words, rp, i, m, out);
}

// One encode step of 16 lanes (sym: 16 symbol bytes); returns the renormalisation mask
// and the low words of the states before the push.
// Alphabets of at most 32 symbols look the model up in registers (two-table permutes)
// instead of gathering it from memory.
struct SmallModel {
  __m512i mult[2], thr[2], cc[2];
};

template <bool kSmall>
EOQ_AVX512 inline __m512i enc_step(__m512i x, const EncTable& t, const SmallModel& sm, const uint8_t* sym,
                                   __mmask16& need, __m256i& words) {
  const __m512i s = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(sym)));
  __m512i mult, thr, cc;
  if (kSmall) {  // every symbol is < 32 here
    mult = _mm512_permutex2var_epi32(sm.mult[0], s, sm.mult[1]);
    thr = _mm512_permutex2var_epi32(sm.thr[0], s, sm.thr[1]);
    cc = _mm512_permutex2var_epi32(sm.cc[0], s, sm.cc[1]);
  } else {
    mult = _mm512_i32gather_epi32(s, t.mult.data(), 4);
    thr = _mm512_i32gather_epi32(s, t.thr.data(), 4);
    cc = _mm512_i32gather_epi32(s, t.cc.data(), 4);
  }
  need = _mm512_cmpgt_epu32_mask(_mm512_srli_epi32(x, 16), _mm512_and_si512(thr, _mm512_set1_epi32(0xFFFF)));
  words = _mm512_cvtepi32_epi16(x);
  x = _mm512_mask_srli_epi32(x, need, x, 16);
  const __m512i ev = _mm512_mul_epu32(x, mult);
  const __m512i od = _mm512_mul_epu32(_mm512_srli_epi64(x, 32), _mm512_srli_epi64(mult, 32));
  const __m512i tq = _mm512_mask_mov_epi32(_mm512_srli_epi64(ev, 32), 0xAAAA, od);
  const __m512i sh1 = _mm512_srli_epi32(thr, 24);
  const __m512i sh2 = _mm512_and_si512(_mm512_srli_epi32(thr, 16), _mm512_set1_epi32(0xFF));
  const __m512i q = _mm512_srlv_epi32(_mm512_add_epi32(tq, _mm512_srlv_epi32(_mm512_sub_epi32(x, tq), sh1)), sh2);
  x = _mm512_add_epi32(_mm512_add_epi32(x, _mm512_and_si512(cc, _mm512_set1_epi32(0xFFFF))),
                       _mm512_mullo_epi32(q, _mm512_srli_epi32(cc, 16)));
  return x;
}

EOQ_AVX512 inline void emit(__mmask16 need, __m256i words, uint16_t* out, size_t& pos) {
  const unsigned c = static_cast<unsigned>(__builtin_popcount(need));
  pos -= c;
  _mm256_mask_storeu_epi16(out + pos, static_cast<__mmask16>((1u << c) - 1), _mm256_maskz_compress_epi16(need, words));
}

template <bool kSmall>
EOQ_AVX512 void encode_groups_avx512_impl(const EncTable& t, const uint8_t* sym, uint32_t n_groups, uint32_t* x,
                                          uint16_t* words, size_t* pos) {
  SmallModel sm;
  for (int h = 0; h < 2; ++h) {  // the tables have 256 entries, zero past the alphabet
    sm.mult[h] = _mm512_loadu_si512(t.mult.data() + 16 * h);
    sm.thr[h] = _mm512_loadu_si512(t.thr.data() + 16 * h);
    sm.cc[h] = _mm512_loadu_si512(t.cc.data() + 16 * h);
  }
  __m512i x0 = _mm512_loadu_si512(x), x1 = _mm512_loadu_si512(x + 16);
  size_t p = *pos;
  for (uint32_t g = n_groups; g-- > 0;) {
    const uint8_t* s = sym + static_cast<size_t>(g) * kLanes;
    __mmask16 n0, n1;
    __m256i w0, w1;
    x1 = enc_step<kSmall>(x1, t, sm, s + 16, n1, w1);
    x0 = enc_step<kSmall>(x0, t, sm, s, n0, w0);
    emit(n1, w1, words, p);  // lanes 16..31 lie after lanes 0..15 in the stream
    emit(n0, w0, words, p);
  }
  _mm512_storeu_si512(x, x0);
  _mm512_storeu_si512(x + 16, x1);
  *pos = p;
}

}  // namespace

void decode_chunk_avx512(const DecodeTable& t, const uint8_t* payload, size_t bytes, uint32_t m, uint8_t* out) {
  if (!t.packed.empty())
    decode_chunk_avx512_impl<true>(t, payload, bytes, m, out);
  else
    decode_chunk_avx512_impl<false>(t, payload, bytes, m, out);
}

void encode_groups_avx512(const EncTable& t, const uint8_t* sym, uint32_t n_groups, uint32_t* x, uint16_t* words,
                          size_t* pos) {
  if (t.sym.size() <= 32)
    encode_groups_avx512_impl<true>(t, sym, n_groups, x, words, pos);
  else
    encode_groups_avx512_impl<false>(t, sym, n_groups, x, words, pos);
}

}  // namespace rans
}  // namespace eoq
