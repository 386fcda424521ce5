// Symmetric block absmax quantisation (EOQ Q-k), the generalisation of ggml's Q4_0/Q8_0.
//
// A weight matrix [rows, cols] is cut along the input dimension (cols) into blocks of
// `block` values; the last block of a row may be shorter (ragged tail). Each block stores
// one fp16 scale d and `bits`-bit codes:
//     m     = the block's value of largest magnitude (sign kept, first one on ties)
//     d     = fp16(m / -2^(bits-1))
//     q_i   = clamp(rint(x_i / d), -2^(bits-1), 2^(bits-1) - 1)     (x / d as x * (1/d))
//     code  = q + 2^(bits-1)  in [0, 2^bits)                           (non-negative uint8)
//     x'_i  = (code - 2^(bits-1)) * d
// The extreme value lands exactly on -2^(bits-1), so all 2^bits levels are used.
// Storage: bits + 16/block bits per weight (Q4 at block 32: 4.5 bpw).
//
// With per-input-channel importance w_c >= 0, the scale is instead searched as in ggml's
// make_qx_quants: for 19 trial scales -(2^(bits-1) + 0.1 t) / m, t = -9..9, round the
// block, fit d by weighted least squares sum(w x q) / sum(w q^2), round d to fp16,
// requantise with it, and keep the candidate (plain absmax included) with the least
// sum(w (x - x')^2); ties keep the earlier candidate.
#pragma once
#include <c10/util/Half.h>

#include <cstdint>

namespace eoq {

// Throws InvalidInput for bits outside 2..8, block outside 16..256, a non-finite weight
// or a scale that overflows fp16.
void absmax_quantize(const float* w, int64_t rows, int64_t cols, int bits, int block, const float* importance,
                     uint8_t* codes, c10::Half* scales);

void absmax_dequantize(const uint8_t* codes, const c10::Half* scales, int64_t rows, int64_t cols, int bits,
                       int block, float* out);

}  // namespace eoq
