// CRC32C (Castagnoli, reflected polynomial 0x82F63B78), init 0xFFFFFFFF, final xor
// 0xFFFFFFFF: the checksum of iSCSI/ext4, check value crc32c("123456789") = 0xE3069283.
// Chosen over CRC32 because x86 has an instruction for it (SSE4.2 `crc32`), so the
// per-chunk check of decoded symbols costs far less than decoding them.
#pragma once
#include <cstddef>
#include <cstdint>

namespace eoq {

// Checksum of n bytes. Uses the SSE4.2 instruction when the CPU has it, a table otherwise;
// both give the same value. `prev` is the CRC32C of the bytes before these (0 for none),
// so crc32c(b, m, crc32c(a, n)) == crc32c(a || b): the register is ~prev on entry, which
// is the standard "extend" (a checksum can be built up piece by piece, e.g. tensor by
// tensor, with no copy into one buffer).
uint32_t crc32c(const uint8_t* data, size_t n, uint32_t prev = 0);

// The table version alone, so tests can compare the two paths.
uint32_t crc32c_portable(const uint8_t* data, size_t n, uint32_t prev = 0);

}  // namespace eoq
