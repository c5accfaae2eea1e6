// Ternary kernels: int8 activation quantization and ternary GEMV/GEMM in three styles.
//
// "i2" (like bitnet.cpp's I2_S): weights stored as 2-bit codes t + 1 in {0, 1, 2}, decoded with shifts
// and masks and multiplied with int8 activations (VNNI dpbusd or maddubs); sum((t + 1) a) - sum(a)
// gives sum(t a). "lut" (like TL1): two weights form a 4-bit index into a 16-entry table of
// pre-summed activation pairs, looked up 32 rows at a time with byte shuffles. "tiled": the i2 codes
// interleaved 16 output rows at a time, so that one decoded vector holds 4 inputs of 16 rows (what
// dpbusd sums per int32 lane): it is multiplied by one broadcast activation word per batch row and
// the sums land in the rows' own lanes, without horizontal reductions; each decoded weight vector is
// reused for up to 8 batch rows held in registers (the small-M GEMM of batched decoding). With AMX,
// batches of 8 rows or more multiply whole tiles: the tiled layout decoded is the weight tile.
//
// Every kernel computes the exact int32 sum(t * a) and then out = float(acc) * (act_scale * w_scale)
// (+ bias), in that order, which is what the PyTorch reference computes.
#pragma once

#include <cstdint>

namespace bitnet158 {

// kAmx: AVX-512 VNNI, and AMX-INT8's tile multiply for the tiled style's batches.
enum class Isa : int { kPortable = 0, kAvx2 = 1, kAvx512 = 2, kNeon = 3, kAmx = 4 };
inline bool has_avx512(Isa isa) { return isa == Isa::kAvx512 || isa == Isa::kAmx; }

const char* isa_name(Isa isa);
Isa detected_isa();
Isa active_isa();
// Picks the ISA to use (never more than the machine has); returns the one in effect.
Isa set_isa(Isa wanted);

enum class Style : int { kI2 = 0, kLut = 1, kTiled = 2 };

// i2 layout: row n holds padded_k(K) / 4 bytes; in each 128-value block b, byte j holds the codes of
// k = 128 b + 32 s + j in bits 2s..2s+1 (s = 0..3). K is padded with zero weights to a multiple of 256.
int64_t i2_padded_k(int64_t k);
int64_t i2_bytes(int64_t n, int64_t k);
// lut layout: tiles of 32 rows (N padded with zero rows); per tile, per chunk of two k-pairs, 32 bytes:
// byte 16h + j holds the index 3 (t0 + 1) + (t1 + 1) of pair 2q + h for row j (low nibble) and row
// j + 16 (high nibble). K is padded with zero weights to a multiple of 4.
int64_t lut_bytes(int64_t n, int64_t k);
// tiled layout: tiles of 16 rows (N padded with zero rows), per tile padded_k / 16 blocks of 64 bytes
// (K padded with zero weights to a multiple of 16, no more than i2_padded_k); in block q of tile t,
// byte 4 c + j holds the codes of row 16 t + c at k = 16 q + 4 s + j in bits 2s..2s+1 (s = 0..3).
int64_t tiled_bytes(int64_t n, int64_t k);

// From transformers' packed layout (uint8 [ceil(N / 4), K], see bitnet158.packing).
void repack_i2(const uint8_t* packed, int64_t n, int64_t k, uint8_t* out);
void repack_lut(const uint8_t* packed, int64_t n, int64_t k, uint8_t* out);
void repack_tiled(const uint8_t* packed, int64_t n, int64_t k, uint8_t* out);

// Per-row absmax int8 quantization of x [m, k] (row stride ldx): codes [m, kp] (zero past k),
// scales [m] = absmax / 127, sums [m] = sum of the codes.
void quantize_rows(const float* x, int64_t m, int64_t k, int64_t ldx, int8_t* codes, int64_t kp, float* scales,
                   int32_t* sums);

struct Epilogue {
  const float* act_scales = nullptr;  // [m]
  const float* w_scales = nullptr;    // [1] or [n]
  bool per_row_scale = false;
  const float* bias = nullptr;  // [n] or null
  float* out = nullptr;         // [m, ldo] float results, or null
  int32_t* out_i32 = nullptr;   // [m, ldo] raw sums, or null
  int64_t ldo = 0;
};

// acts: codes [m, kp] with kp = i2_padded_k(k) from quantize_rows, and their sums.
void ternary_gemm(Style style, const int8_t* codes, const int32_t* sums, int64_t m, int64_t k, const uint8_t* w,
                  int64_t n, const Epilogue& epilogue);

}  // namespace bitnet158
