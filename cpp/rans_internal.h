// Pieces shared by the scalar and SIMD rANS chunk coders (see rans.h for the coder).
#pragma once
#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "errors.h"
#include "rans.h"

static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__, "EOQR streams are little-endian; port the loads");

namespace eoq {
namespace rans {

// One entry per slot of [0, 2^scale_bits): the decoder's whole model.
struct DecodeTable {
  int scale_bits = 0;
  uint32_t mask = 0;
  std::vector<uint32_t> info;    // freq | (slot - cum) << 16: x = freq * (x >> scale) + (slot - cum)
  std::vector<uint8_t> sym;      // the symbol owning the slot; 4 bytes of padding after the
                                 // last slot so a 32-bit gather at any slot stays in bounds
  std::vector<uint32_t> packed;  // scale_bits <= 12 only (else empty), one gather per lane:
                                 // (freq - 1) | (slot - cum) << 12 | sym << 24
  // Alphabets of at most 64 symbols also get the model as two 64-entry u16 tables, for
  // decoders that find a slot's symbol by a binary search in registers instead of a gather:
  // the symbol owning slot is the largest s with cum16[s] <= slot (cum16 is 0xFFFF past the
  // alphabet; a symbol of frequency 0 shares its cum with the next one, and the last symbol
  // has frequency >= 1, so the largest such s has slot in [cum, cum + freq)).
  int search_steps = -1;         // ceil(log2(alphabet)) when alphabet <= 64, else -1 (no tables)
  alignas(64) uint16_t cum16[64] = {};
  alignas(64) uint16_t freq16[64] = {};
};

DecodeTable make_decode_table(const Header& h);

// A chunk being decoded: its states, words and position. A chunk is decoded in three
// steps: start_chunk (loads and checks the initial states), a GroupDecoder (whole groups
// of kLanes symbols while at least kLanes words remain; no checks needed, never throws),
// and finish_chunk (the rest one symbol at a time with every read checked, then the
// word-count and final-state checks). Every step is a function of the chunk alone, so
// decoding two chunks side by side gives the same result as decoding them one by one.
struct ChunkCursor {
  alignas(64) uint32_t x[kLanes];
  const uint8_t* w = nullptr;  // the chunk's u16 words
  size_t n_words = 0;
  size_t rp = 0;               // words read
  uint32_t i = 0;              // symbols decoded
  uint32_t m = 0;              // symbols in the chunk
  uint8_t* out = nullptr;      // the chunk's m output symbols
};

// Loads and checks the kLanes initial states of a chunk (bytes >= 4 * kLanes: parse checked it).
inline void start_chunk(ChunkCursor& c, const uint8_t* payload, size_t bytes, uint32_t m, uint8_t* out) {
  std::memcpy(c.x, payload, 4 * kLanes);
  for (int j = 0; j < kLanes; ++j)
    if (c.x[j] < kL) throw CorruptStream("initial state below 2^16");
  c.w = payload + 4 * kLanes;
  c.n_words = (bytes - 4 * kLanes) / 2;
  c.rp = 0;
  c.i = 0;
  c.m = m;
  c.out = out;
}

// Whole groups a chunk can still decode with no bounds check: each group reads at most
// kLanes words, so while this is > 0 the next group's word loads stay in [rp, rp + kLanes)
// inside the payload. Running k <= safe_groups(c) groups and asking again stops at exactly
// the group where "i + kLanes <= m and n_words - rp >= kLanes" first fails.
inline uint32_t safe_groups(const ChunkCursor& c) {
  const size_t by_words = (c.n_words - c.rp) / kLanes;
  const uint32_t by_syms = (c.m - c.i) / kLanes;
  return by_words < by_syms ? static_cast<uint32_t>(by_words) : by_syms;
}

// Decodes the whole groups of the n <= kBatch chunks c[0..n), side by side (several
// chunks' table lookups in flight at once hide their latency), as far as safe_groups
// allows; on return safe_groups is 0 for every one. Every implementation leaves the same
// states, positions and output symbols as the scalar one.
constexpr int kBatch = 4;
using GroupDecoder = void (*)(const DecodeTable& t, ChunkCursor* const* c, int n);

// Calls run(act, m) on the m chunks of c[0..n) that have whole groups left, again and again
// until none has; run must decode until one of its chunks has none left.
template <class Run>
inline void for_active_chunks(ChunkCursor* const* c, int n, Run&& run) {
  ChunkCursor* act[kBatch];
  int m = 0;
  for (int k = 0; k < n; ++k)
    if (safe_groups(*c[k]) > 0) act[m++] = c[k];
  while (m > 0) {
    run(act, m);
    int r = 0;
    for (int k = 0; k < m; ++k)
      if (safe_groups(*act[k]) > 0) act[r++] = act[k];
    m = r;
  }
}

// Groups all of the chunks c[0..N) can still take side by side.
template <int N>
inline uint32_t common_groups(ChunkCursor* const* c) {
  uint32_t k = safe_groups(*c[0]);
  for (int j = 1; j < N; ++j) k = std::min(k, safe_groups(*c[j]));
  return k;
}

void decode_groups_scalar(const DecodeTable& t, ChunkCursor* const* c, int n);
void decode_groups_avx2(const DecodeTable& t, ChunkCursor* const* c, int n);
void decode_groups_avx512(const DecodeTable& t, ChunkCursor* const* c, int n);

// Decodes the remaining symbols (up to c.m) one at a time, every read checked; throws
// CorruptStream when the words run out. No end-of-chunk checks: finish_chunk adds them, and
// a prefix decode (ChunkDecoder::decode_prefix) stops here.
inline void decode_tail_checked(const DecodeTable& t, ChunkCursor& c) {
  const int sb = t.scale_bits;
  const uint32_t mask = t.mask;
  const uint32_t* info = t.info.data();
  const uint8_t* sym = t.sym.data();
  uint32_t* x = c.x;
  size_t rp = c.rp;
  for (uint32_t i = c.i; i < c.m; ++i) {
    uint32_t& s = x[i % kLanes];
    const uint32_t slot = s & mask, e = info[slot];
    c.out[i] = sym[slot];
    s = (e & 0xFFFFu) * (s >> sb) + (e >> 16);
    if (s < kL) {
      if (rp >= c.n_words) throw CorruptStream("chunk payload ends before its last symbol");
      uint16_t word;
      std::memcpy(&word, c.w + 2 * rp, 2);
      s = (s << 16) | word;
      ++rp;
    }
  }
  c.i = c.m;
  c.rp = rp;
}

// Decodes the remaining symbols one at a time, every read checked, then checks that all
// n_words words were consumed and every final state is kL. Throws CorruptStream when the
// words run out, are left over, or a final state differs from kL.
inline void finish_chunk(const DecodeTable& t, ChunkCursor& c) {
  decode_tail_checked(t, c);
  if (c.rp != c.n_words) throw CorruptStream("chunk payload has unread words");
  for (int j = 0; j < kLanes; ++j)
    if (c.x[j] != kL) throw CorruptStream("final state check failed");
}

// Decodes chunks of a parsed stream into memory the caller chooses, a few at a time: what
// decode() runs over the whole stream, and what the fused dequantizer (dequant.cpp) runs
// into a small reused buffer, so that the codes of a large tensor never exist in full.
// Every check of the format applies to decode_chunks; see decode_prefix for the exception.
class ChunkDecoder {
 public:
  // h must come from parse(stream, len) and outlive the decoder.
  ChunkDecoder(const uint8_t* stream, size_t len, const Header& h);

  uint32_t n_chunks() const { return h_.n_chunks; }
  uint64_t chunk_begin(uint32_t c) const { return static_cast<uint64_t>(c) * h_.chunk_size; }
  uint32_t chunk_len(uint32_t c) const {
    return static_cast<uint32_t>(std::min<uint64_t>(h_.n_symbols - chunk_begin(c), h_.chunk_size));
  }

  // Decodes chunks [c0, c0 + n), n <= kBatch, side by side (independent chains hide the
  // table lookups' latency) into out, back to back: chunk c0 + k at out + k * chunk_size.
  // Each chunk gets every check (initial states, word count, final states, CRC32C of its
  // symbols); a failure is recorded in err[k] (empty when the chunk is valid), never thrown,
  // so parallel callers can report the first failing chunk deterministically.
  void decode_chunks(uint32_t c0, int n, uint8_t* out, std::string* err) const;

  // The first m <= chunk_len(c) symbols of chunk c, with every read bounds-checked but none
  // of the end-of-chunk checks (they need the whole chunk). For a row of a tensor that
  // starts in one chunk and ends in the next: the caller must also decode chunk c in full
  // with decode_chunks, whose checks stand for this prefix too (rANS decodes in order, so
  // the prefix is exactly the first m symbols that decode gives, and a prefix that fails
  // here fails there). Returns false when an initial state is invalid or the words run out.
  bool decode_prefix(uint32_t c, uint32_t m, uint8_t* out) const;

 private:
  const uint8_t* stream_;
  const Header& h_;
  DecodeTable table_;
  GroupDecoder groups_;
  std::vector<uint64_t> offset_;  // byte offset of each chunk's payload
};

// ---- encoder ---------------------------------------------------------------------------

struct EncSymbol {
  uint64_t x_max;  // renormalise before the push while x >= x_max
  uint32_t mult;   // exact x / freq = (t + ((x - t) >> sh1)) >> sh2, t = mulhi(x, mult)
  uint32_t sh1, sh2;
  uint32_t cum;
  uint32_t cmpl;   // M - freq: x' = x + cum + q * (M - freq)
};

struct EncTable {
  int scale_bits = 0;
  std::vector<EncSymbol> sym;  // scalar coder
  // The same model as 32-bit arrays for SIMD gathers (256 entries, unused symbols zero):
  std::vector<uint32_t> mult;  // EncSymbol::mult
  std::vector<uint32_t> thr;   // (x_max >> 16) - 1 | sh2 << 16 | sh1 << 24: renormalise iff (x >> 16) > low half
  std::vector<uint32_t> cc;    // cum | cmpl << 16
};

// Pushes the symbols of n_groups whole groups of kLanes (sym[0 .. kLanes * n_groups)),
// last group first, onto the states x; each emitted word goes to words[--*pos] in the
// scalar coder's order. words must have 8 spare entries below the lowest word written.
using GroupEncoder = void (*)(const EncTable& t, const uint8_t* sym, uint32_t n_groups, uint32_t* x,
                              uint16_t* words, size_t* pos);

void encode_groups_avx2(const EncTable& t, const uint8_t* sym, uint32_t n_groups, uint32_t* x,
                        uint16_t* words, size_t* pos);
void encode_groups_avx512(const EncTable& t, const uint8_t* sym, uint32_t n_groups, uint32_t* x,
                          uint16_t* words, size_t* pos);

}  // namespace rans
}  // namespace eoq
