#include "crc32c.h"

#include <array>
#include <cstring>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define EOQ_X86 1
#endif

namespace eoq {
namespace {

constexpr uint32_t kPoly = 0x82F63B78u;  // bit-reversed Castagnoli polynomial

std::array<uint32_t, 256> make_table() {
  std::array<uint32_t, 256> t{};
  for (uint32_t i = 0; i < 256; ++i) {
    uint32_t c = i;
    for (int k = 0; k < 8; ++k) c = (c >> 1) ^ ((c & 1u) ? kPoly : 0u);
    t[i] = c;
  }
  return t;
}

const std::array<uint32_t, 256>& table() {
  static const std::array<uint32_t, 256> t = make_table();
  return t;
}

#ifdef EOQ_X86
// The crc32 instruction has a latency of about 3 cycles and a throughput of one per cycle,
// so one dependent chain runs at a third of its speed. Long inputs are therefore cut into
// runs of three adjacent blocks of kBlock bytes, checksummed as three independent chains
// and joined: the CRC register after A || B (|B| = kBlock) is shift(register after A) xor
// (register after B started from 0), where shift(r) = the register after kBlock zero bytes
// from r, a GF(2)-linear map applied here by four byte-indexed tables. The result is
// bit-for-bit the one-chain CRC.
constexpr size_t kBlock = 4096;
constexpr size_t kShortBlock = 256;

struct ShiftTable {
  uint32_t t[4][256];
};

__attribute__((target("sse4.2"))) ShiftTable make_shift(size_t zeros) {
  uint32_t basis[32];
  for (int b = 0; b < 32; ++b) {
    uint64_t c = 1u << b;
    for (size_t k = 0; k < zeros / 8; ++k) c = _mm_crc32_u64(c, 0);
    basis[b] = static_cast<uint32_t>(c);
  }
  ShiftTable s;
  for (int i = 0; i < 4; ++i)
    for (uint32_t v = 0; v < 256; ++v) {
      uint32_t r = 0;
      for (int b = 0; b < 8; ++b)
        if (v >> b & 1) r ^= basis[8 * i + b];
      s.t[i][v] = r;
    }
  return s;
}

inline uint32_t shift(const ShiftTable& s, uint32_t c) {
  return s.t[0][c & 0xFF] ^ s.t[1][(c >> 8) & 0xFF] ^ s.t[2][(c >> 16) & 0xFF] ^ s.t[3][c >> 24];
}

const ShiftTable& long_shift() {
  static const ShiftTable s = make_shift(kBlock);
  return s;
}

const ShiftTable& short_shift() {
  static const ShiftTable s = make_shift(kShortBlock);
  return s;
}

// Three chains over runs of 3 * block bytes while they last; returns the register.
__attribute__((target("sse4.2"))) inline uint64_t crc_runs(uint64_t c, const uint8_t*& p, size_t& n, size_t block,
                                                          const ShiftTable& sh) {
  while (n >= 3 * block) {
    uint64_t c1 = 0, c2 = 0;
    for (size_t k = 0; k < block; k += 8) {
      uint64_t v0, v1, v2;
      std::memcpy(&v0, p + k, 8);
      std::memcpy(&v1, p + block + k, 8);
      std::memcpy(&v2, p + 2 * block + k, 8);
      c = _mm_crc32_u64(c, v0);
      c1 = _mm_crc32_u64(c1, v1);
      c2 = _mm_crc32_u64(c2, v2);
    }
    c = shift(sh, shift(sh, static_cast<uint32_t>(c)) ^ static_cast<uint32_t>(c1)) ^ static_cast<uint32_t>(c2);
    p += 3 * block;
    n -= 3 * block;
  }
  return c;
}

__attribute__((target("sse4.2"))) uint32_t crc32c_hw(const uint8_t* p, size_t n, uint32_t prev) {
  uint64_t c = ~prev;  // the register after the previous bytes (init 0xFFFFFFFF when prev = 0)
  if (n >= 3 * kBlock) c = crc_runs(c, p, n, kBlock, long_shift());
  if (n >= 3 * kShortBlock) c = crc_runs(c, p, n, kShortBlock, short_shift());
  for (; n >= 8; n -= 8, p += 8) {
    uint64_t v;
    std::memcpy(&v, p, 8);
    c = _mm_crc32_u64(c, v);
  }
  uint32_t c32 = static_cast<uint32_t>(c);
  for (; n > 0; --n, ++p) c32 = _mm_crc32_u8(c32, *p);
  return c32 ^ 0xFFFFFFFFu;
}

bool have_sse42() {
  static const bool ok = __builtin_cpu_supports("sse4.2");
  return ok;
}
#endif

}  // namespace

uint32_t crc32c_portable(const uint8_t* p, size_t n, uint32_t prev) {
  const auto& t = table();
  uint32_t c = ~prev;
  for (size_t i = 0; i < n; ++i) c = t[(c ^ p[i]) & 0xFFu] ^ (c >> 8);
  return c ^ 0xFFFFFFFFu;
}

uint32_t crc32c(const uint8_t* p, size_t n, uint32_t prev) {
#ifdef EOQ_X86
  if (have_sse42()) return crc32c_hw(p, n, prev);
#endif
  return crc32c_portable(p, n, prev);
}

}  // namespace eoq
