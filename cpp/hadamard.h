// Orthonormal Walsh-Hadamard transform on contiguous blocks of 2^k values.
//
// H_B (Sylvester order, B = 2^k) scaled by 1/sqrt(B) is symmetric and orthogonal, so it
// is its own inverse. With random signs D = diag(s), s_j in {-1, +1}, the forward
// transform is y = H D x / sqrt(B) and the inverse x = D H y / sqrt(B); the same signs
// serve every block of a tensor. Signs come from the seed through splitmix64, so any
// implementation can rebuild them (docs/FORMAT.md):
//     s_j = -1 if bit 63 of mix(seed + (j + 1) * 0x9E3779B97F4A7C15) else +1
// Cost: B log2 B additions a block, done in float32 with one final scaling.
#pragma once
#include <cstdint>
#include <vector>

namespace eoq {

std::vector<float> hadamard_signs(int64_t n, uint64_t seed);

// The unnormalised Walsh-Hadamard butterflies on n = 2^k floats, in place: stages h = 1, 2,
// 4, ... in that order, each butterfly (a, b) -> (a + b, a - b). This is the reference that
// every faster transform (dequant.cpp's AVX2 one) must match bit for bit: an output's
// rounding depends only on the stage order, not on the order of butterflies within a stage.
void fwht(float* x, int64_t n);

// The 1/sqrt(block) factor of the orthonormal transform, as a float (exactly what
// hadamard_inplace multiplies by, so that other kernels can reproduce it).
float hadamard_scale(int64_t block);

// Transforms x in place: `count` blocks of `block` floats. signs: nullptr or `block` values.
// Throws InvalidInput if block is not a power of two in [1, 2^24].
void hadamard_inplace(float* x, int64_t count, int64_t block, const float* signs, bool inverse);

}  // namespace eoq
