#include "bitpack.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>
#include <string>

#include "errors.h"

namespace eoq {
namespace {

// Eight codes make k whole bytes, so groups of 8 are independent units of work.
constexpr int64_t kGroupsPerTask = 4096;

void check_k(int k) {
  if (k < 1 || k > 8) throw InvalidInput("bit width must be in 1..8, got " + std::to_string(k));
}

inline void pack_group(const uint8_t* c, int cnt, int k, uint8_t* out) {
  uint64_t v = 0;
  for (int j = 0; j < cnt; ++j) v |= static_cast<uint64_t>(c[j]) << (j * k);
  const int nbytes = (cnt * k + 7) / 8;
  for (int b = 0; b < nbytes; ++b) out[b] = static_cast<uint8_t>(v >> (8 * b));
}

inline void unpack_group(const uint8_t* p, int cnt, int k, uint8_t* out) {
  const int nbytes = (cnt * k + 7) / 8;
  uint64_t v = 0;
  for (int b = 0; b < nbytes; ++b) v |= static_cast<uint64_t>(p[b]) << (8 * b);
  const uint64_t mask = (1u << k) - 1;
  for (int j = 0; j < cnt; ++j) out[j] = static_cast<uint8_t>((v >> (j * k)) & mask);
}

}  // namespace

void pack_bits(const uint8_t* codes, uint64_t n, int k, uint8_t* out) {
  check_k(k);
  const uint8_t limit = static_cast<uint8_t>((1u << k) - 1);
  for (uint64_t i = 0; i < n; ++i)
    if (codes[i] > limit)
      throw InvalidInput("pack_bits: code " + std::to_string(codes[i]) + " at index " + std::to_string(i) +
                         " does not fit in " + std::to_string(k) + " bits");
  const int64_t groups = static_cast<int64_t>((n + 7) / 8);
  at::parallel_for(0, groups, kGroupsPerTask, [&](int64_t b, int64_t e) {
    for (int64_t g = b; g < e; ++g) {
      const int cnt = static_cast<int>(std::min<uint64_t>(8, n - 8 * static_cast<uint64_t>(g)));
      pack_group(codes + 8 * g, cnt, k, out + g * k);
    }
  });
}

void unpack_bits(const uint8_t* packed, uint64_t n, int k, uint8_t* out) {
  check_k(k);
  const uint64_t bits = n * static_cast<uint64_t>(k);
  if (bits % 8 && (packed[bits / 8] >> (bits % 8)) != 0)
    throw CorruptStream("unpack_bits: padding bits of the last byte are not zero");
  const int64_t groups = static_cast<int64_t>((n + 7) / 8);
  at::parallel_for(0, groups, kGroupsPerTask, [&](int64_t b, int64_t e) {
    for (int64_t g = b; g < e; ++g) {
      const int cnt = static_cast<int>(std::min<uint64_t>(8, n - 8 * static_cast<uint64_t>(g)));
      unpack_group(packed + g * k, cnt, k, out + 8 * g);
    }
  });
}

}  // namespace eoq
