// Pieces shared by the scalar and SIMD rANS chunk coders (see rans.h for the coder).
#pragma once
#include <cstddef>
#include <cstdint>
#include <cstring>
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
};

DecodeTable make_decode_table(const Header& h);

// Decodes the m symbols of one chunk from payload (kLanes u32 initial states, then u16
// words). Throws CorruptStream when the words run out, are left over, or a final state
// differs from kL. Every implementation writes the same symbols and accepts the same streams.
using ChunkDecoder = void (*)(const DecodeTable& t, const uint8_t* payload, size_t bytes,
                              uint32_t m, uint8_t* out);

void decode_chunk_scalar(const DecodeTable& t, const uint8_t* payload, size_t bytes, uint32_t m,
                         uint8_t* out);
void decode_chunk_avx2(const DecodeTable& t, const uint8_t* payload, size_t bytes, uint32_t m,
                       uint8_t* out);
void decode_chunk_avx512(const DecodeTable& t, const uint8_t* payload, size_t bytes, uint32_t m,
                         uint8_t* out);

// Loads and checks the kLanes initial states of a chunk (bytes >= 4 * kLanes: parse checked it).
inline void load_states(const uint8_t* payload, uint32_t* x) {
  std::memcpy(x, payload, 4 * kLanes);
  for (int j = 0; j < kLanes; ++j)
    if (x[j] < kL) throw CorruptStream("initial state below 2^16");
}

// Decodes symbols i..m-1 one at a time, every read checked, then checks that all n_words
// words were consumed and every final state is kL. The SIMD decoders end with this.
inline void decode_tail(const DecodeTable& t, uint32_t* x, const uint8_t* w, size_t n_words, size_t rp,
                        uint32_t i, uint32_t m, uint8_t* out) {
  const int sb = t.scale_bits;
  const uint32_t mask = t.mask;
  const uint32_t* info = t.info.data();
  const uint8_t* sym = t.sym.data();
  for (; i < m; ++i) {
    uint32_t& s = x[i % kLanes];
    const uint32_t slot = s & mask, e = info[slot];
    out[i] = sym[slot];
    s = (e & 0xFFFFu) * (s >> sb) + (e >> 16);
    if (s < kL) {
      if (rp >= n_words) throw CorruptStream("chunk payload ends before its last symbol");
      uint16_t word;
      std::memcpy(&word, w + 2 * rp, 2);
      s = (s << 16) | word;
      ++rp;
    }
  }
  if (rp != n_words) throw CorruptStream("chunk payload has unread words");
  for (int j = 0; j < kLanes; ++j)
    if (x[j] != kL) throw CorruptStream("final state check failed");
}

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
