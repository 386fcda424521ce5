// CRC32C (Castagnoli, reflected polynomial 0x82F63B78), init 0xFFFFFFFF, final xor
// 0xFFFFFFFF: the checksum of iSCSI/ext4, check value crc32c("123456789") = 0xE3069283.
// Chosen over CRC32 because x86 has an instruction for it (SSE4.2 `crc32`), so the
// per-chunk check of decoded symbols costs far less than decoding them.
#pragma once
#include <cstddef>
#include <cstdint>

namespace eoq {

// Checksum of n bytes. Uses the SSE4.2 instruction when the CPU has it, a table otherwise;
// both give the same value.
uint32_t crc32c(const uint8_t* data, size_t n);

// The table version alone, so tests can compare the two paths.
uint32_t crc32c_portable(const uint8_t* data, size_t n);

}  // namespace eoq
