// Dense fixed-width bit packing: k-bit codes (k = 1..8) laid LSB-first in a little-endian
// bit stream, code i in bits [i*k, (i+1)*k). n codes take ceil(n*k/8) bytes, so eight
// 5-bit codes take exactly 5 bytes. Padding bits of the last byte are zero and checked.
#pragma once
#include <cstdint>

namespace eoq {

// ceil(n * k / 8) without forming n * k, which wraps for n near 2^64 / k (a wrapped size
// let an empty buffer pass the length check of an absurd n).
inline uint64_t packed_size(uint64_t n, int k) {
  const uint64_t kk = static_cast<uint64_t>(k);
  return (n / 8) * kk + ((n % 8) * kk + 7) / 8;
}

// Throws InvalidInput if k is out of range or a code does not fit in k bits.
void pack_bits(const uint8_t* codes, uint64_t n, int k, uint8_t* out);

// Throws CorruptStream if the padding bits of the last byte are not zero.
void unpack_bits(const uint8_t* packed, uint64_t n, int k, uint8_t* out);

}  // namespace eoq
