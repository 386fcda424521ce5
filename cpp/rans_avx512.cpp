// AVX-512 (F, BW, VL, VBMI, VBMI2) rANS group decoder and encoder: the 32 lanes are two
// 16-lane vectors. Same bytes as the scalar coder in rans.cpp; chosen at run time there.
// The decoder runs up to kBatch chunks side by side, and for alphabets of <= 64 symbols
// finds each slot's symbol by a binary search over the cumulative frequencies held in
// registers instead of gathering it from the slot table.
#include <immintrin.h>

#include <algorithm>

#include "rans_internal.h"

#define EOQ_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512vbmi,avx512vbmi2,popcnt,bmi2")))

namespace eoq {
namespace rans {
namespace {

// Renormalises 16 lanes, reading the words at w + 2 * rp in lane order.
EOQ_AVX512 inline __m512i renorm(__m512i x, const uint8_t* w, size_t& rp) {
  const __mmask16 need = _mm512_cmplt_epu32_mask(x, _mm512_set1_epi32(static_cast<int>(kL)));
  __m512i wv = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + 2 * rp)));
  wv = _mm512_maskz_expand_epi32(need, wv);
  rp += static_cast<size_t>(__builtin_popcount(need));
  return _mm512_mask_or_epi32(x, need, _mm512_slli_epi32(x, 16), wv);
}

// ---- any alphabet: the model from memory by gathers ----

// base[idx] (32 bits from byte offset sizeof(T) * idx). A gather merges into its
// destination register, so it waits for whatever that register held; left to itself the
// compiler picks one holding the previous step's result, which chains the independent
// lanes' gathers one after another. Gathering into a freshly zeroed register avoids that.
// (The intrinsics give the compiler the choice of register, hence the asm. The table is
// not written while decoding, so the asm needs no memory clobber.)
template <class T>
EOQ_AVX512 inline __m512i gather(__m512i idx, const T* base) {
  static_assert(sizeof(T) == 1 || sizeof(T) == 4, "gather scale");
  __m512i r;
  __mmask16 all;
  if (sizeof(T) == 4)
    asm("vpxord %[r], %[r], %[r]\n\tkxnorw %[m], %[m], %[m]\n\tvpgatherdd (%[b],%[i],4), %[r]%{%[m]%}"
        : [r] "=&v"(r), [m] "=&Yk"(all)
        : [b] "r"(base), [i] "v"(idx));
  else
    asm("vpxord %[r], %[r], %[r]\n\tkxnorw %[m], %[m], %[m]\n\tvpgatherdd (%[b],%[i],1), %[r]%{%[m]%}"
        : [r] "=&v"(r), [m] "=&Yk"(all)
        : [b] "r"(base), [i] "v"(idx));
  return r;
}

// One decode step of 16 lanes: pop a symbol per lane, renormalise from the words at w.
// (Table pointers are passed by value: a byte store could alias a DecodeTable's fields.)
template <bool kPacked>
EOQ_AVX512 inline __m512i dec_step(__m512i x, const uint32_t* info, const uint8_t* sym, __m512i mask, __m128i sb,
                                   const uint8_t* w, size_t& rp, uint8_t* out) {
  const __m512i slot = _mm512_and_si512(x, mask);
  __m512i s, f, b;
  if (kPacked) {
    const __m512i e = gather(slot, info);
    s = _mm512_srli_epi32(e, 24);
    f = _mm512_add_epi32(_mm512_and_si512(e, _mm512_set1_epi32(0xFFF)), _mm512_set1_epi32(1));
    b = _mm512_and_si512(_mm512_srli_epi32(e, 12), _mm512_set1_epi32(0xFFF));
  } else {
    const __m512i e = gather(slot, info);
    s = gather(slot, sym);  // sym is padded by 4 bytes
    f = _mm512_and_si512(e, _mm512_set1_epi32(0xFFFF));
    b = _mm512_srli_epi32(e, 16);
  }
  x = _mm512_add_epi32(_mm512_mullo_epi32(f, _mm512_srl_epi32(x, sb)), b);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(out), _mm512_cvtepi32_epi8(s));
  return renorm(x, w, rp);
}

// The states of N chunks held in registers while their common whole groups are decoded.
template <int N>
struct Lanes {
  __m512i x[N][2];
  size_t rp[N];
  const uint8_t* w[N];
  uint8_t* out[N];
};

// Loads the N chunks' states, calls group(lanes, g) for every whole group g they all still
// have (common_groups), advances the cursors, and stores the states back: the loop every
// AVX-512 group decoder shares; `group` decodes group g of each chunk.
template <int N, class Group>
EOQ_AVX512 inline __attribute__((always_inline)) void over_common_groups(ChunkCursor* const* c, const Group& group) {
  Lanes<N> l;
  #pragma GCC unroll 4
  for (int j = 0; j < N; ++j) {
    l.x[j][0] = _mm512_load_si512(c[j]->x);
    l.x[j][1] = _mm512_load_si512(c[j]->x + 16);
    l.rp[j] = c[j]->rp;
    l.w[j] = c[j]->w;
  }
  for (uint32_t k; (k = common_groups<N>(c)) > 0;) {
    #pragma GCC unroll 4
    for (int j = 0; j < N; ++j) l.out[j] = c[j]->out + c[j]->i;
    for (uint32_t g = 0; g < k; ++g) group(l, g);
    #pragma GCC unroll 4
    for (int j = 0; j < N; ++j) {
      c[j]->i += k * kLanes;
      c[j]->rp = l.rp[j];
    }
  }
  #pragma GCC unroll 4
  for (int j = 0; j < N; ++j) {
    _mm512_store_si512(c[j]->x, l.x[j][0]);
    _mm512_store_si512(c[j]->x + 16, l.x[j][1]);
  }
}

template <bool kPacked, int N>
EOQ_AVX512 void gather_groups(const DecodeTable& t, ChunkCursor* const* c) {
  const __m128i sb = _mm_cvtsi32_si128(t.scale_bits);
  const __m512i mask = _mm512_set1_epi32(static_cast<int>(t.mask));
  const uint32_t* info = kPacked ? t.packed.data() : t.info.data();
  const uint8_t* sym = t.sym.data();
  over_common_groups<N>(c, [&](Lanes<N>& l, uint32_t g) EOQ_AVX512 {
    #pragma GCC unroll 4
    for (int h = 0; h < 2; ++h)
      #pragma GCC unroll 4
      for (int j = 0; j < N; ++j)
        l.x[j][h] = dec_step<kPacked>(l.x[j][h], info, sym, mask, sb, l.w[j], l.rp[j], l.out[j] + g * kLanes + 16 * h);
  });
}

// ---- alphabets of <= 64 symbols: the model in registers, binary search ----

// The 16-bit tables of DecodeTable in registers. With kSteps <= 5 (alphabet <= 32) every
// index is < 32 and one register per table does.
template <int kSteps>
struct SearchModel {
  static constexpr int kRegs = kSteps <= 5 ? 1 : 2;
  __m512i cum[2], freq[2];
  __m512i next[kSteps > 1 ? kSteps - 1 : 1][2];  // next[k][s] = cum16[s + 2^k] (0xFFFF past 63)
  __m512i top;                                   // cum16[2^(kSteps-1)] in every lane
  __m512i mask;                                  // the slot mask in every 16-bit lane

  EOQ_AVX512 explicit SearchModel(const DecodeTable& t) {
    alignas(64) uint16_t nx[64];
    for (int r = 0; r < 2; ++r) {
      cum[r] = _mm512_load_si512(t.cum16 + 32 * r);
      freq[r] = _mm512_load_si512(t.freq16 + 32 * r);
    }
    for (int k = 0; k + 1 < kSteps; ++k) {
      for (int s = 0; s < 64; ++s) nx[s] = s + (1 << k) < 64 ? t.cum16[s + (1 << k)] : 0xFFFF;
      next[k][0] = _mm512_load_si512(nx);
      next[k][1] = _mm512_load_si512(nx + 32);
    }
    top = _mm512_set1_epi16(static_cast<short>(kSteps > 0 ? t.cum16[(1 << kSteps) >> 1] : 0));
    mask = _mm512_set1_epi16(static_cast<short>(t.mask));
  }
  // tab[idx] for 16-bit lanes of idx
  EOQ_AVX512 static inline __m512i lookup(const __m512i* tab, __m512i idx) {
    return kRegs == 1 ? _mm512_permutexvar_epi16(idx, tab[0]) : _mm512_permutex2var_epi16(tab[0], idx, tab[1]);
  }
};

// One group of 32 symbols (lanes 0..15 in x0, 16..31 in x1). The two vectors' slots share
// one vector of 32 16-bit lanes (lane 2j: x0[j], 2j + 1: x1[j]) for the search and lookups.
template <int kSteps>
EOQ_AVX512 inline void small_group(__m512i& x0, __m512i& x1, const SearchModel<kSteps>& sm, __m128i sb,
                                   const uint8_t* w, size_t& rp, uint8_t* out) {
  using M = SearchModel<kSteps>;
  const __m512i slot = _mm512_and_si512(_mm512_mask_blend_epi16(0xAAAAAAAAu, x0, _mm512_slli_epi32(x1, 16)), sm.mask);
  // s = the largest symbol with cum16[s] <= slot, one bit at a time from the top
  __m512i s = _mm512_setzero_si512();
  if (kSteps > 0)
    s = _mm512_maskz_mov_epi16(_mm512_cmple_epu16_mask(sm.top, slot), _mm512_set1_epi16(static_cast<short>((1 << kSteps) >> 1)));
  for (int k = kSteps - 2; k >= 0; --k) {
    const __mmask32 up = _mm512_cmple_epu16_mask(M::lookup(sm.next[k], s), slot);
    s = _mm512_mask_add_epi16(s, up, s, _mm512_set1_epi16(static_cast<short>(1 << k)));
  }
  const __m512i f = M::lookup(sm.freq, s);
  const __m512i b = _mm512_sub_epi16(slot, M::lookup(sm.cum, s));
  const __m512i lo = _mm512_set1_epi32(0xFFFF);
  x0 = _mm512_add_epi32(_mm512_mullo_epi32(_mm512_and_si512(f, lo), _mm512_srl_epi32(x0, sb)), _mm512_and_si512(b, lo));
  x1 = _mm512_add_epi32(_mm512_mullo_epi32(_mm512_srli_epi32(f, 16), _mm512_srl_epi32(x1, sb)), _mm512_srli_epi32(b, 16));
  // symbols: the low bytes of the even 16-bit lanes, then of the odd ones
  const __m512i order = _mm512_set_epi8(0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
                                        0, 0, 0, 0, 0, 62, 58, 54, 50, 46, 42, 38, 34, 30, 26, 22, 18, 14, 10, 6, 2,
                                        60, 56, 52, 48, 44, 40, 36, 32, 28, 24, 20, 16, 12, 8, 4, 0);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(out), _mm512_castsi512_si256(_mm512_permutexvar_epi8(order, s)));
  x0 = renorm(x0, w, rp);
  x1 = renorm(x1, w, rp);
}

template <int kSteps, int N>
EOQ_AVX512 void small_groups(const DecodeTable& t, ChunkCursor* const* c) {
  const SearchModel<kSteps> sm(t);
  const __m128i sb = _mm_cvtsi32_si128(t.scale_bits);
  over_common_groups<N>(c, [&](Lanes<N>& l, uint32_t g) EOQ_AVX512 {
    #pragma GCC unroll 4
    for (int j = 0; j < N; ++j) small_group<kSteps>(l.x[j][0], l.x[j][1], sm, sb, l.w[j], l.rp[j], l.out[j] + g * kLanes);
  });
}

// Runs Impl<N> on act[0..N) for N = m.
template <template <int> class Impl>
EOQ_AVX512 void run_n(const DecodeTable& t, ChunkCursor* const* act, int m) {
  static_assert(kBatch == 4, "run_n covers 1..4 chunks");
  switch (m) {
    case 1: return Impl<1>::run(t, act);
    case 2: return Impl<2>::run(t, act);
    case 3: return Impl<3>::run(t, act);
    default: return Impl<4>::run(t, act);
  }
}

template <bool kPacked>
struct Gather {
  template <int N>
  struct Impl {
    EOQ_AVX512 static void run(const DecodeTable& t, ChunkCursor* const* c) { gather_groups<kPacked, N>(t, c); }
  };
};

template <int kSteps>
struct Small {
  template <int N>
  struct Impl {
    EOQ_AVX512 static void run(const DecodeTable& t, ChunkCursor* const* c) { small_groups<kSteps, N>(t, c); }
  };
};

template <class Path>
EOQ_AVX512 void decode_with(const DecodeTable& t, ChunkCursor* const* c, int n) {
  for_active_chunks(c, n, [&](ChunkCursor* const* act, int m) { run_n<Path::template Impl>(t, act, m); });
}

// One encode step of 16 lanes (sym: 16 symbol bytes); returns the renormalisation mask
// and the low words of the states before the push.
// Alphabets of at most 32 (kSmall = 1) or 64 (kSmall = 2) symbols look the model up in
// registers (two-table permutes, blended on bit 5 of the symbol for 64) instead of
// gathering it from memory (kSmall = 0).
struct SmallModel {
  __m512i mult[4], thr[4], cc[4];
};

template <int kSmall>
EOQ_AVX512 inline __m512i lookup(const __m512i* tab, __m512i s, __mmask16 upper) {
  const __m512i lo = _mm512_permutex2var_epi32(tab[0], s, tab[1]);
  if (kSmall == 1) return lo;
  return _mm512_mask_mov_epi32(lo, upper, _mm512_permutex2var_epi32(tab[2], s, tab[3]));
}

template <int kSmall>
EOQ_AVX512 inline __m512i enc_step(__m512i x, const EncTable& t, const SmallModel& sm, const uint8_t* sym,
                                   __mmask16& need, __m256i& words) {
  const __m512i s = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(sym)));
  __m512i mult, thr, cc;
  if (kSmall) {
    const __mmask16 upper = _mm512_test_epi32_mask(s, _mm512_set1_epi32(32));
    mult = lookup<kSmall>(sm.mult, s, upper);
    thr = lookup<kSmall>(sm.thr, s, upper);
    cc = lookup<kSmall>(sm.cc, s, upper);
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

template <int kSmall>
EOQ_AVX512 void encode_groups_avx512_impl(const EncTable& t, const uint8_t* sym, uint32_t n_groups, uint32_t* x,
                                          uint16_t* words, size_t* pos) {
  SmallModel sm;
  for (int h = 0; h < 4; ++h) {  // the tables have 256 entries, zero past the alphabet
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

void decode_groups_avx512(const DecodeTable& t, ChunkCursor* const* c, int n) {
  switch (t.search_steps) {
    case 0: return decode_with<Small<0>>(t, c, n);
    case 1: return decode_with<Small<1>>(t, c, n);
    case 2: return decode_with<Small<2>>(t, c, n);
    case 3: return decode_with<Small<3>>(t, c, n);
    case 4: return decode_with<Small<4>>(t, c, n);
    case 5: return decode_with<Small<5>>(t, c, n);
    case 6: return decode_with<Small<6>>(t, c, n);
    default:
      if (!t.packed.empty()) return decode_with<Gather<true>>(t, c, n);
      return decode_with<Gather<false>>(t, c, n);
  }
}

void encode_groups_avx512(const EncTable& t, const uint8_t* sym, uint32_t n_groups, uint32_t* x, uint16_t* words,
                          size_t* pos) {
  if (t.sym.size() <= 32)
    encode_groups_avx512_impl<1>(t, sym, n_groups, x, words, pos);
  else if (t.sym.size() <= 64)
    encode_groups_avx512_impl<2>(t, sym, n_groups, x, words, pos);
  else
    encode_groups_avx512_impl<0>(t, sym, n_groups, x, words, pos);
}

}  // namespace rans
}  // namespace eoq
