// Chunked, 32-way interleaved rANS for byte symbols ("EOQR" streams).
//
// The coder
// ---------
// rANS (Duda's range asymmetric numeral systems, in the byte-wise form popularised by
// Fabian Giesen's ryg_rans) keeps the whole coder state in one integer x. A symbol s of
// normalised frequency f_s and cumulative start c_s (frequencies sum to M = 2^scale_bits)
// is pushed with
//     x' = (x / f_s) * M + (x mod f_s) + c_s
// and popped with
//     slot = x' mod M,  s = the symbol whose [c_s, c_s + f_s) holds slot,
//     x    = f_s * (x' / M) + slot - c_s.
// Each push grows x by about log2(M / f_s) bits, which is the ideal code length of s
// under the model, so the stream is within a hair of n*H once the table is good.
//
// Renormalisation: states live in [L, 2^32) with L = 2^16 and move 16 bits at a time.
// Before pushing s the encoder emits the low 16 bits while x >= f_s * 2^(32-scale_bits)
// (the push would otherwise overflow 32 bits); after popping, the decoder reads 16 bits
// while x < L. Because scale_bits <= 16, one 16-bit step always suffices: after a
// pop x >= f_s * 2^(16 - scale_bits) >= 1, so a single read restores x >= L.
// "At most one read per symbol" is what makes the
// decoder branch-free and SIMD-friendly, and it is why L is 2^16 and not 2^23 as in
// rans_byte.h.
//
// Traps, and what this file does about them
// - LIFO: rANS decodes in the reverse order of encoding. The encoder walks the chunk
//   backwards and writes words from the end of its buffer towards the front, so the
//   decoder reads forwards.
// - Interleaving: 32 independent states, symbol i of a chunk on lane i mod 32. The
//   decoder processes lanes in order 0..31 and a lane that renormalises reads the next
//   word; the encoder (walking backwards) emits in exactly the mirrored order. SIMD
//   decoders must read words in lane order to produce the same stream.
// - A symbol that occurs must never get frequency 0 (it could not be coded); the
//   normaliser guarantees f_s >= 1 for every symbol with a non-zero count.
// - Division: the encoder divides by f_s for every symbol. Exact division by an
//   invariant integer uses a multiply-high (Granlund-Montgomery), exact for every 32-bit x.
// - Corruption: a decoder cannot fail on its own (every slot decodes to some symbol),
//   so corruption is caught by checks, all bounds-checked before any read: a header
//   CRC32C, chunk sizes that must add up to the stream length exactly, initial states in
//   [L, 2^32), every chunk consuming exactly its words, every final state equal to L
//   (the encoder's initial state), and a CRC32C of each chunk's decoded symbols.
//
// SIMD paths: rans_avx2.cpp (four 8-lane vectors) and rans_avx512.cpp (two 16-lane vectors;
// F/BW/VL/VBMI/VBMI2) decode with table gathers, or on AVX-512 for alphabets of <= 64
// symbols with a binary search over the cumulative frequencies held in registers, and encode
// with gathers (or, for alphabets of <= 32 symbols on AVX-512, in-register permutes); the
// best one this CPU supports is picked at run time (EOQ_RANS_DECODER=scalar|avx2|avx512,
// read once, forces one for both coding directions; naming one the CPU lacks is an error).
// Every path writes and accepts exactly the scalar coder's bytes, checks the words remaining
// before each run of whole 32-symbol groups (each group reads at most 32 words), and decodes
// the rest with the checked scalar tail.
//
// Chunks (64Ki..1Mi symbols, a multiple of 32) share one frequency table and are
// coded independently, so encoding and decoding run in parallel over chunks; the
// bytes do not depend on the number of threads. Each thread decodes its chunks a few at a
// time side by side (independent chains hide the lookup latency); every chunk's result,
// and every error, is the same as decoding it alone. Byte layout: docs/FORMAT.md.
#pragma once
#include <cstddef>
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

namespace eoq {
namespace rans {

constexpr uint8_t kMagic[4] = {'E', 'O', 'Q', 'R'};
constexpr uint8_t kVersion = 1;
constexpr int kLanes = 32;                  // interleaved states per chunk
constexpr uint32_t kL = 1u << 16;           // lower bound of a normalised state
constexpr int kMinScaleBits = 10;           // >= 256 slots: every byte value can get f >= 1
constexpr int kMaxScaleBits = 15;           // f <= 2^15 fits the u16 frequency table
constexpr int kDefaultScaleBits = 12;       // 4096 slots: table fits L1, model error ~0.1 %
constexpr uint32_t kMinChunk = 1u << 16;    // below this the 128-byte state flush costs > 0.2 %
constexpr uint32_t kMaxChunk = 1u << 20;    // above this too few chunks to feed the cores
constexpr uint32_t kDefaultChunk = 1u << 18;

struct Header {
  int scale_bits = kDefaultScaleBits;
  uint64_t n_symbols = 0;
  uint32_t chunk_size = kDefaultChunk;
  uint32_t n_chunks = 0;
  uint32_t alphabet = 0;                    // symbols 0..alphabet-1 have table entries
  std::vector<uint32_t> freq;               // alphabet entries
  std::vector<uint32_t> chunk_bytes;        // payload size of each chunk
  std::vector<uint32_t> chunk_crc;          // CRC32C of each chunk's decoded symbols
  size_t header_bytes = 0;                  // offset of the first payload
};

// Normalise symbol counts to frequencies summing to 2^scale_bits, f >= 1 wherever
// count > 0, chosen greedily to minimise the coded size sum(count * log2(M / f)).
std::vector<uint32_t> normalize_freqs(const std::vector<uint64_t>& counts, int scale_bits);

// The stream goes into a buffer the caller allocates once its size is known (so the
// bindings can hand out a tensor's memory); returns that size.
using Allocator = std::function<uint8_t*(size_t)>;
size_t encode(const uint8_t* symbols, uint64_t n, int scale_bits, uint32_t chunk_size, const Allocator& alloc);

// Validates the header (layout, CRC, table, chunk index, total length) without decoding.
Header parse(const uint8_t* stream, size_t len);

// Decodes a parsed stream into out[0..n_symbols); throws CorruptStream on any mismatch.
void decode(const uint8_t* stream, size_t len, const Header& h, uint8_t* out);

// Which coder `decode` and `encode` use on this CPU ("scalar", "avx2" or "avx512"): for tests
// and benchmarks. Throws InvalidInput if EOQ_RANS_DECODER names a path this CPU lacks.
std::string decoder_name();

}  // namespace rans
}  // namespace eoq
