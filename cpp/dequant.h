// Fused ecsq dequantization: from the stored codes (an EOQR rANS stream, or plain codes) to
// the final weight in bf16 / fp16 / fp32, in one pass over a few rANS chunks at a time.
//
// What it computes is the reference path of eoq (python/eoq/methods/ecsq.py `dequantize`,
// quantized.py `QuantizedTensor.dequantize`; docs/FORMAT.md "Dequantization"), bit for bit:
//     x[r, j] = (float(level[r, j]) + float(offset)) * step[r / group_rows]     (float32)
//               level = code, or (code << low_bits) | low when low bits are stored; with
//               fitted reconstruction points the value float(level) + float(offset) is
//               replaced by sign(v) * recon[|v| - 1] for the levels v with 1 <= |v| <= n_recon
//     y[r]    = inverse seeded Hadamard of x[r] in blocks of `block`: fwht (hadamard.cpp's
//               butterflies, same stage order), then * (hadamard_scale(block) * sign[j])
//     w[r, c] = y[r, c] / awq[c]  (c < cols: padded columns are cropped; no awq: w = y)
//     out     = w rounded to the output type, round-to-nearest-even (torch's float ->
//               bfloat16 / float16 casts)
// Each of these is one IEEE float32 operation in a fixed order, so the SIMD path (AVX2,
// chosen at run time) gives the same bits as the scalar one and as torch. The file is
// compiled with -ffp-contract=off: a fused multiply-add would round once where the
// reference rounds twice.
//
// Why fused: the reference decodes a whole tensor's codes into fresh memory, then runs five
// more passes over float32 copies of it. Here each thread decodes kBatch rANS chunks into a
// small reused buffer (no page faults, stays in L2), and every row that starts in those
// chunks goes from codes to its output row through one float buffer of `block` values in
// L1. Chunks (chunk_size symbols) do not align with rows (padded values): a row that starts
// in the thread's last chunk and ends in the next is finished from a prefix decode of that
// next chunk (rans::ChunkDecoder::decode_prefix), which the next chunk's own full decode
// (by whichever thread owns it) checks. Rows are split by the chunk they start in, so every
// output row is written by exactly one thread, with the same values whatever the split:
// the bytes do not depend on the number of threads.
//
// Non-finite output is outside the bit-for-bit contract (NaN payloads differ between
// torch's own scalar and vector casts); eoq.fused only calls this when no intermediate can
// overflow float32.
#pragma once
#include <cstddef>
#include <cstdint>
#include <string>

#include "rans.h"

namespace eoq {

enum class OutType { kFloat32, kFloat16, kBFloat16 };

struct EcsqParams {
  int64_t rows = 0, cols = 0;   // the weight, [rows, cols]
  int64_t padded = 0;           // codes per row: cols rounded up to a multiple of block
  int64_t block = 0;            // rotation block, a power of two in [16, 2^16]
  uint64_t seed = 0;            // Hadamard sign seed
  int64_t offset = 0;           // code + offset is the integer quantization level
  const float* steps = nullptr; // n_steps values; row r uses steps[r / group_rows]
  int64_t n_steps = 0;
  int64_t group_rows = 1;
  const float* awq = nullptr;   // cols divisors, or nullptr
  int low_bits = 0;             // 0..8: the raw low bits of each level (ecsq.py "Codes past 8 bits")
  const uint8_t* low = nullptr; // rows * padded values of low_bits bits, packed LSB-first
                                // (bitpack.h); a row starts on a byte (padded % 16 == 0)
  int n_recon = 0;              // 0..8 fitted reconstruction points (never with low bits):
  const float* recon = nullptr; // level v with 1 <= |v| <= n_recon is sign(v) * recon[|v| - 1]
  OutType out_type = OutType::kFloat32;
  void* out = nullptr;          // rows * cols values of out_type, row-major
};

// Throws InvalidInput unless the parameters are consistent (the limits above, n_steps ==
// ceil(rows / group_rows), offset + (256 << low_bits) - 1 within int32, steps present, low
// present exactly when low_bits > 0); `out` is not looked
// at, so callers can check the parameters before allocating the output.
void ecsq_check(const EcsqParams& p);

// From a parsed EOQR stream of rows * padded codes (row-major). Throws CorruptStream when
// the stream's count differs (before anything is decoded) or a chunk fails any check; the
// output is then partly written.
void ecsq_dequantize_rans(const uint8_t* stream, size_t len, const rans::Header& h, const EcsqParams& p);

// From plain codes, rows * padded uint8 (e.g. unpacked fixed-rate codes).
void ecsq_dequantize_codes(const uint8_t* codes, const EcsqParams& p);

// The row kernel this CPU uses ("scalar" or "avx2"); EOQ_DEQUANT_KERNEL=scalar|avx2 (read
// once) forces one; naming one the CPU lacks is an InvalidInput error.
std::string dequant_kernel_name();

// The float -> 16-bit roundings the kernels use (torch's, round-to-nearest-even), exposed
// for tests.
uint16_t float_to_bf16(float f);
uint16_t float_to_fp16(float f);

}  // namespace eoq
