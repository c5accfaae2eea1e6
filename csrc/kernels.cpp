#include "kernels.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "threadpool.h"

#if defined(__x86_64__) || defined(__i386__)
#define BITNET158_X86 1
#include <cpuid.h>
#include <immintrin.h>
#endif
#if defined(BITNET158_X86) && defined(__linux__)
#define BITNET158_AMX 1  // AMX needs the kernel's leave to use its tile registers: Linux's arch_prctl
#include <sys/syscall.h>
#include <unistd.h>
#endif
#if defined(__aarch64__)
#define BITNET158_NEON 1
#include <arm_neon.h>
#endif

// Per-ISA code is compiled for its instruction set inside these regions and only called after a
// runtime CPU check, so the extension itself runs on any x86-64.
#if defined(__clang__)
#define BEGIN_TARGET_AVX2 _Pragma("clang attribute push(__attribute__((target(\"avx2,fma\"))), apply_to = function)")
#define BEGIN_TARGET_AVX512 \
  _Pragma("clang attribute push(__attribute__((target(\"avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma\"))), apply_to = function)")
#define BEGIN_TARGET_AMX                                                                                             \
  _Pragma("clang attribute push(__attribute__((target(\"avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,amx-tile,amx-int8\"))), apply_to = function)")
#define END_TARGET _Pragma("clang attribute pop")
#else
#define BEGIN_TARGET_AVX2 _Pragma("GCC push_options") _Pragma("GCC target(\"avx2,fma\")")
#define BEGIN_TARGET_AVX512 _Pragma("GCC push_options") _Pragma("GCC target(\"avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma\")")
#define BEGIN_TARGET_AMX \
  _Pragma("GCC push_options") _Pragma("GCC target(\"avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,amx-tile,amx-int8\")")
#define END_TARGET _Pragma("GCC pop_options")
#endif

#if defined(__GNUC__) && !defined(__clang__)
// GCC 12's AVX-512 headers trip -Wuninitialized on their own _mm512_undefined_* helpers.
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

namespace bitnet158 {

// ---------------------------------------------------------------------------------------------
// CPU features

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::kAvx2: return "avx2";
    case Isa::kAvx512: return "avx512-vnni";
    case Isa::kAmx: return "avx512-amx";
    case Isa::kNeon: return "neon";
    default: return "portable";
  }
}

#if defined(BITNET158_AMX)
// Whether the CPU has AMX-INT8 and the kernel lets this process use the tile registers (asking for them:
// Linux gives a process their state only on request).
static bool amx_usable() {
  unsigned eax, ebx, ecx, edx;
  if (!__get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx)) return false;
  const unsigned kAmxTile = 1u << 24, kAmxInt8 = 1u << 25;  // CPUID.(7, 0):EDX
  if ((edx & (kAmxTile | kAmxInt8)) != (kAmxTile | kAmxInt8)) return false;
  const long kReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
  return syscall(SYS_arch_prctl, kReqXcompPerm, kXfeatureXtiledata) == 0;
}
#endif

Isa detected_isa() {
#if defined(BITNET158_X86)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
      __builtin_cpu_supports("avx512vnni")) {
#if defined(BITNET158_AMX)
    if (amx_usable()) return Isa::kAmx;
#endif
    return Isa::kAvx512;
  }
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return Isa::kAvx2;
  return Isa::kPortable;
#elif defined(BITNET158_NEON)
  return Isa::kNeon;  // Advanced SIMD is part of every AArch64 CPU
#else
  return Isa::kPortable;
#endif
}

static Isa g_isa = detected_isa();

Isa active_isa() { return g_isa; }

Isa set_isa(Isa wanted) {
  Isa best = detected_isa();
  bool ok = wanted == Isa::kPortable || wanted == best || (wanted == Isa::kAvx2 && has_avx512(best)) ||
            (wanted == Isa::kAvx512 && best == Isa::kAmx);
  g_isa = ok ? wanted : best;
  return g_isa;
}

// ---------------------------------------------------------------------------------------------
// Layouts

static inline int64_t round_up(int64_t x, int64_t to) { return (x + to - 1) / to * to; }

int64_t i2_padded_k(int64_t k) { return round_up(std::max<int64_t>(k, 1), 256); }
int64_t i2_bytes(int64_t n, int64_t k) { return n * i2_padded_k(k) / 4; }
static inline int64_t lut_padded_k(int64_t k) { return round_up(std::max<int64_t>(k, 1), 4); }
int64_t lut_bytes(int64_t n, int64_t k) { return round_up(n, 32) * lut_padded_k(k) / 4; }
static inline int64_t tiled_padded_k(int64_t k) { return round_up(std::max<int64_t>(k, 1), 16); }
int64_t tiled_bytes(int64_t n, int64_t k) { return round_up(n, 16) * tiled_padded_k(k) / 4; }

// The stored code t + 1 of weight (row, col) in transformers' layout; 1 (a zero weight) past the edges.
static inline uint8_t stored_code(const uint8_t* packed, int64_t n, int64_t k, int64_t row, int64_t col) {
  if (row >= n || col >= k) return 1;
  const int64_t packed_rows = (n + 3) / 4;
  return (packed[(row % packed_rows) * k + col] >> (2 * (row / packed_rows))) & 3;
}

// body(ctx, begin, end) over [0, rows) on the thread pool, in chunks of a multiple of `unit` rows, about
// 8 per thread: small enough that a thread the OS does not run leaves little behind, large enough that
// taking them costs next to nothing.
static void parallel_rows(int64_t rows, int64_t unit, void (*body)(void*, int64_t, int64_t), void* ctx) {
  struct Job {
    void (*body)(void*, int64_t, int64_t);
    void* ctx;
  } job{body, ctx};
  const int64_t chunks = 8 * pool().threads();
  const int64_t grain = std::max(unit, round_up((rows + chunks - 1) / chunks, unit));
  pool().parallel_for(
      rows, grain,
      [](void* p, int64_t begin, int64_t end, int) {
        const auto* j = static_cast<Job*>(p);
        j->body(j->ctx, begin, end);
      },
      &job);
}

struct RepackJob {
  const uint8_t* packed;
  int64_t n, k;
  uint8_t* out;
};

void repack_i2(const uint8_t* packed, int64_t n, int64_t k, uint8_t* out) {
  RepackJob job{packed, n, k, out};
  parallel_rows(n, 16, [](void* p, int64_t begin, int64_t end) {
    auto* j = static_cast<RepackJob*>(p);
    const int64_t kp = i2_padded_k(j->k);
    for (int64_t row = begin; row < end; ++row) {
      uint8_t* dst = j->out + row * (kp / 4);
      for (int64_t block = 0; block < kp / 128; ++block)
        for (int64_t byte = 0; byte < 32; ++byte) {
          uint8_t value = 0;
          for (int s = 0; s < 4; ++s)
            value |= stored_code(j->packed, j->n, j->k, row, block * 128 + s * 32 + byte) << (2 * s);
          dst[block * 32 + byte] = value;
        }
    }
  }, &job);
}

void repack_lut(const uint8_t* packed, int64_t n, int64_t k, uint8_t* out) {
  RepackJob job{packed, n, k, out};
  parallel_rows(round_up(n, 32) / 32, 1, [](void* p, int64_t begin, int64_t end) {
    auto* j = static_cast<RepackJob*>(p);
    const int64_t chunks = lut_padded_k(j->k) / 4;
    for (int64_t tile = begin; tile < end; ++tile) {
      uint8_t* dst = j->out + tile * chunks * 32;
      for (int64_t q = 0; q < chunks; ++q)
        for (int h = 0; h < 2; ++h)
          for (int r = 0; r < 16; ++r) {
            const int64_t col = 4 * q + 2 * h;
            uint8_t nibbles[2];
            for (int half = 0; half < 2; ++half) {
              const int64_t row = tile * 32 + half * 16 + r;
              nibbles[half] = 3 * stored_code(j->packed, j->n, j->k, row, col) +
                              stored_code(j->packed, j->n, j->k, row, col + 1);
            }
            dst[q * 32 + h * 16 + r] = static_cast<uint8_t>(nibbles[0] | (nibbles[1] << 4));
          }
    }
  }, &job);
}

void repack_tiled(const uint8_t* packed, int64_t n, int64_t k, uint8_t* out) {
  RepackJob job{packed, n, k, out};
  parallel_rows(round_up(n, 16) / 16, 1, [](void* p, int64_t begin, int64_t end) {
    auto* j = static_cast<RepackJob*>(p);
    const int64_t blocks = tiled_padded_k(j->k) / 16;
    for (int64_t tile = begin; tile < end; ++tile)
      for (int64_t q = 0; q < blocks; ++q)
        for (int c = 0; c < 16; ++c)
          for (int i = 0; i < 4; ++i) {
            uint8_t value = 0;
            for (int s = 0; s < 4; ++s)
              value |= stored_code(j->packed, j->n, j->k, tile * 16 + c, q * 16 + s * 4 + i) << (2 * s);
            j->out[(tile * blocks + q) * 64 + c * 4 + i] = value;
          }
  }, &job);
}

// ---------------------------------------------------------------------------------------------
// Activation quantization: codes = round_half_even(x * (127 / max(absmax, 1e-5))), as PyTorch computes it:
// its `int / tensor` is a reciprocal and a product, two roundings, which decide ties like x * inv = 34.5.

static constexpr float kScaleEps = 1e-5f;

static void quantize_row_portable(const float* x, int64_t k, int8_t* codes, float* scale, int32_t* sum) {
  float absmax = 0.0f;
  for (int64_t i = 0; i < k; ++i) absmax = std::max(absmax, std::fabs(x[i]));
  absmax = std::max(absmax, kScaleEps);
  const float inv = (1.0f / absmax) * 127.0f;  // PyTorch's `127 / t` is `t.reciprocal() * 127`
  int32_t total = 0;
  for (int64_t i = 0; i < k; ++i) {
    float q = std::nearbyint(x[i] * inv);  // the default rounding mode rounds half to even, like torch.round
    q = std::min(std::max(q, -128.0f), 127.0f);
    codes[i] = static_cast<int8_t>(q);
    total += codes[i];
  }
  *scale = absmax / 127.0f;
  *sum = total;
}

#if defined(BITNET158_X86)
BEGIN_TARGET_AVX2
static void quantize_row_avx2(const float* x, int64_t k, int8_t* codes, float* scale, int32_t* sum) {
  const __m256 sign = _mm256_set1_ps(-0.0f);
  __m256 vmax = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= k; i += 8) vmax = _mm256_max_ps(vmax, _mm256_andnot_ps(sign, _mm256_loadu_ps(x + i)));
  float lanes[8];
  _mm256_storeu_ps(lanes, vmax);
  float absmax = 0.0f;
  for (float lane : lanes) absmax = std::max(absmax, lane);
  for (; i < k; ++i) absmax = std::max(absmax, std::fabs(x[i]));
  absmax = std::max(absmax, kScaleEps);
  const float inv = (1.0f / absmax) * 127.0f;  // PyTorch's `127 / t` is `t.reciprocal() * 127`
  const __m256 vinv = _mm256_set1_ps(inv), lo = _mm256_set1_ps(-128.0f), hi = _mm256_set1_ps(127.0f);
  __m256i vsum = _mm256_setzero_si256();
  for (i = 0; i + 8 <= k; i += 8) {
    __m256 q = _mm256_round_ps(_mm256_mul_ps(_mm256_loadu_ps(x + i), vinv), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256i qi = _mm256_cvtps_epi32(_mm256_min_ps(_mm256_max_ps(q, lo), hi));
    vsum = _mm256_add_epi32(vsum, qi);
    __m128i packed16 = _mm_packs_epi32(_mm256_castsi256_si128(qi), _mm256_extracti128_si256(qi, 1));
    _mm_storel_epi64(reinterpret_cast<__m128i*>(codes + i), _mm_packs_epi16(packed16, packed16));
  }
  int32_t sums[8];
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(sums), vsum);
  int32_t total = 0;
  for (int32_t s : sums) total += s;
  for (; i < k; ++i) {
    float q = std::min(std::max(std::nearbyint(x[i] * inv), -128.0f), 127.0f);
    codes[i] = static_cast<int8_t>(q);
    total += codes[i];
  }
  *scale = absmax / 127.0f;
  *sum = total;
}
END_TARGET
#endif

void quantize_rows(const float* x, int64_t m, int64_t k, int64_t ldx, int8_t* codes, int64_t kp, float* scales,
                   int32_t* sums) {
  for (int64_t row = 0; row < m; ++row) {
    int8_t* dst = codes + row * kp;
#if defined(BITNET158_X86)
    if (g_isa != Isa::kPortable)
      quantize_row_avx2(x + row * ldx, k, dst, scales + row, sums + row);
    else
#endif
      quantize_row_portable(x + row * ldx, k, dst, scales + row, sums + row);
    std::memset(dst + k, 0, kp - k);
  }
}

// ---------------------------------------------------------------------------------------------
// Shared epilogue

static inline void store(const Epilogue& e, int64_t m, int64_t row, int32_t acc) {
  if (e.out_i32) e.out_i32[m * e.ldo + row] = acc;
  if (e.out) {
    float value = static_cast<float>(acc) * (e.act_scales[m] * e.w_scales[e.per_row_scale ? row : 0]);
    if (e.bias) value += e.bias[row];
    e.out[m * e.ldo + row] = value;
  }
}

struct GemmJob {
  const int8_t* codes;  // [m, kp], natural order (AVX-512 i2: permuted, see below)
  const int32_t* sums;
  const uint8_t* tables;  // lut: [m, chunks * 64]
  int64_t m, k, kp, n;
  const uint8_t* w;
  const Epilogue* e;
};

// ---------------------------------------------------------------------------------------------
// i2 style, portable

static void i2_rows_portable(void* p, int64_t begin, int64_t end) {
  const auto& j = *static_cast<GemmJob*>(p);
  const int64_t row_bytes = j.kp / 4;
  for (int64_t row = begin; row < end; ++row) {
    const uint8_t* w = j.w + row * row_bytes;
    for (int64_t m = 0; m < j.m; ++m) {
      const int8_t* a = j.codes + m * j.kp;
      int32_t acc = 0;
      for (int64_t block = 0; block < j.kp / 128; ++block)
        for (int s = 0; s < 4; ++s)
          for (int byte = 0; byte < 32; ++byte)
            acc += ((w[block * 32 + byte] >> (2 * s)) & 3) * a[block * 128 + s * 32 + byte];
      store(*j.e, m, row, acc - j.sums[m]);
    }
  }
}

#if defined(BITNET158_X86)
// ---------------------------------------------------------------------------------------------
// i2 style, AVX2: one 128-value block (32 bytes) per step, maddubs + madd into int32.

BEGIN_TARGET_AVX2
static inline int32_t hsum256(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4e));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xb1));
  return _mm_cvtsi128_si32(s);
}

template <int MT>
static inline void i2_row_avx2(const uint8_t* w, const int8_t* a, int64_t kp, int32_t* out) {
  const __m256i mask = _mm256_set1_epi8(3), ones = _mm256_set1_epi16(1);
  __m256i acc[MT][2];
  for (int m = 0; m < MT; ++m) acc[m][0] = acc[m][1] = _mm256_setzero_si256();
  for (int64_t block = 0; block < kp / 128; ++block) {
    const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + block * 32));
    const __m256i v[4] = {_mm256_and_si256(x, mask), _mm256_and_si256(_mm256_srli_epi16(x, 2), mask),
                          _mm256_and_si256(_mm256_srli_epi16(x, 4), mask),
                          _mm256_and_si256(_mm256_srli_epi16(x, 6), mask)};
    for (int m = 0; m < MT; ++m)
      for (int s = 0; s < 4; ++s) {
        const __m256i act = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a + m * kp + block * 128 + s * 32));
        // (t + 1) in 0..2 times int8: pair sums stay far inside int16.
        const __m256i pairs = _mm256_maddubs_epi16(v[s], act);
        acc[m][s & 1] = _mm256_add_epi32(acc[m][s & 1], _mm256_madd_epi16(pairs, ones));
      }
  }
  for (int m = 0; m < MT; ++m) out[m] = hsum256(_mm256_add_epi32(acc[m][0], acc[m][1]));
}

template <int MT>
static void i2_tile_avx2(const GemmJob& j, int64_t row, int64_t m0) {
  int32_t acc[MT];
  i2_row_avx2<MT>(j.w + row * (j.kp / 4), j.codes + m0 * j.kp, j.kp, acc);
  for (int m = 0; m < MT; ++m) store(*j.e, m0 + m, row, acc[m] - j.sums[m0 + m]);
}
END_TARGET

// ---------------------------------------------------------------------------------------------
// i2 style, AVX-512 VNNI: 64 bytes (two 128-blocks of one row) per step, dpbusd. The activations
// come permuted so that lane h * 32 + j of step s lines up with k = 256 c + 128 h + 32 s + j.

BEGIN_TARGET_AVX512
static void permute_for_avx512(const int8_t* a, int64_t kp, int8_t* out) {
  for (int64_t c = 0; c < kp / 256; ++c)
    for (int s = 0; s < 4; ++s)
      for (int h = 0; h < 2; ++h) std::memcpy(out + c * 256 + s * 64 + h * 32, a + c * 256 + h * 128 + s * 32, 32);
}

template <int MT>
static inline void i2_row_avx512(const uint8_t* w, const int8_t* a, int64_t kp, int32_t* out) {
  constexpr int NA = 4 / MT;  // independent accumulators per activation row: keeps dpbusd chains short
  const __m512i mask = _mm512_set1_epi8(3);
  __m512i acc[MT][NA];
  for (int m = 0; m < MT; ++m)
    for (int i = 0; i < NA; ++i) acc[m][i] = _mm512_setzero_si512();
  for (int64_t c = 0; c < kp / 256; ++c) {
    const __m512i x = _mm512_loadu_si512(w + c * 64);
    const __m512i v[4] = {_mm512_and_si512(x, mask), _mm512_and_si512(_mm512_srli_epi16(x, 2), mask),
                          _mm512_and_si512(_mm512_srli_epi16(x, 4), mask),
                          _mm512_and_si512(_mm512_srli_epi16(x, 6), mask)};
    for (int m = 0; m < MT; ++m)
      for (int s = 0; s < 4; ++s)
        acc[m][s % NA] = _mm512_dpbusd_epi32(acc[m][s % NA], v[s], _mm512_loadu_si512(a + m * kp + c * 256 + s * 64));
  }
  for (int m = 0; m < MT; ++m) {
    __m512i total = acc[m][0];
    for (int i = 1; i < NA; ++i) total = _mm512_add_epi32(total, acc[m][i]);
    // (not _mm512_reduce_add_epi32: GCC 12's version warns about an uninitialized variable)
    const __m256i half = _mm256_add_epi32(_mm512_castsi512_si256(total), _mm512_extracti64x4_epi64(total, 1));
    out[m] = hsum256(half);
  }
}

template <int MT>
static void i2_tile_avx512(const GemmJob& j, int64_t row, int64_t m0) {
  int32_t acc[MT];
  i2_row_avx512<MT>(j.w + row * (j.kp / 4), j.codes + m0 * j.kp, j.kp, acc);
  for (int m = 0; m < MT; ++m) store(*j.e, m0 + m, row, acc[m] - j.sums[m0 + m]);
}
END_TARGET

// Rows [begin, end) for all activation rows: blocks of 16 weight rows stay in L1 while every group of
// up to 4 activation rows passes over them (the prefill GEMM), and a GEMV is the m = 1 case.
template <void (*T4)(const GemmJob&, int64_t, int64_t), void (*T2)(const GemmJob&, int64_t, int64_t),
          void (*T1)(const GemmJob&, int64_t, int64_t)>
static void i2_rows_simd(void* p, int64_t begin, int64_t end) {
  const auto& j = *static_cast<GemmJob*>(p);
  for (int64_t block = begin; block < end; block += 16) {
    const int64_t block_end = std::min(end, block + 16);
    int64_t m0 = 0;
    for (; m0 + 4 <= j.m; m0 += 4)
      for (int64_t row = block; row < block_end; ++row) T4(j, row, m0);
    for (; m0 + 2 <= j.m; m0 += 2)
      for (int64_t row = block; row < block_end; ++row) T2(j, row, m0);
    for (; m0 < j.m; ++m0)
      for (int64_t row = block; row < block_end; ++row) T1(j, row, m0);
  }
}
#endif  // BITNET158_X86

#if defined(BITNET158_NEON)
// ---------------------------------------------------------------------------------------------
// i2 style, NEON: 16 bytes per step (half of a 128-block), widening multiplies into int32.
static void i2_rows_neon(void* p, int64_t begin, int64_t end) {
  const auto& j = *static_cast<GemmJob*>(p);
  const uint8x16_t mask = vdupq_n_u8(3);
  for (int64_t row = begin; row < end; ++row) {
    const uint8_t* w = j.w + row * (j.kp / 4);
    for (int64_t m = 0; m < j.m; ++m) {
      const int8_t* a = j.codes + m * j.kp;
      int32x4_t acc = vdupq_n_s32(0);
      for (int64_t block = 0; block < j.kp / 128; ++block)
        for (int half = 0; half < 2; ++half) {
          const uint8x16_t x = vld1q_u8(w + block * 32 + half * 16);
          for (int s = 0; s < 4; ++s) {
            const int8x16_t v = vreinterpretq_s8_u8(vandq_u8(vshlq_u8(x, vdupq_n_s8(-2 * s)), mask));
            const int8x16_t act = vld1q_s8(a + block * 128 + s * 32 + half * 16);
            int16x8_t prod = vmull_s8(vget_low_s8(v), vget_low_s8(act));
            prod = vmlal_s8(prod, vget_high_s8(v), vget_high_s8(act));
            acc = vpadalq_s16(acc, prod);
          }
        }
      store(*j.e, m, row, vaddvq_s32(acc) - j.sums[m]);
    }
  }
}
#endif

// ---------------------------------------------------------------------------------------------
// lut style. Per activation row and chunk q of two pairs: 64 bytes of tables, the low bytes of the
// int16 pair sums for pairs 2q and 2q + 1 (16 each), then their high bytes.

static const int8_t kFirst[16] = {-1, -1, -1, 0, 0, 0, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0};
static const int8_t kSecond[16] = {-1, 0, 1, -1, 0, 1, -1, 0, 1, 0, 0, 0, 0, 0, 0, 0};

static void lut_tables_portable(const int8_t* a, int64_t chunks, uint8_t* tables) {
  for (int64_t q = 0; q < chunks; ++q)
    for (int h = 0; h < 2; ++h) {
      const int32_t a0 = a[4 * q + 2 * h], a1 = a[4 * q + 2 * h + 1];
      for (int idx = 0; idx < 16; ++idx) {
        const int16_t value = static_cast<int16_t>(kFirst[idx] * a0 + kSecond[idx] * a1);
        tables[q * 64 + h * 16 + idx] = static_cast<uint8_t>(value & 0xff);
        tables[q * 64 + 32 + h * 16 + idx] = static_cast<uint8_t>((value >> 8) & 0xff);
      }
    }
}

static void lut_tiles_portable(void* p, int64_t begin, int64_t end) {
  const auto& j = *static_cast<GemmJob*>(p);
  const int64_t chunks = lut_padded_k(j.k) / 4;
  for (int64_t tile = begin; tile < end; ++tile) {
    const uint8_t* w = j.w + tile * chunks * 32;
    for (int64_t m = 0; m < j.m; ++m) {
      const uint8_t* t = j.tables + m * chunks * 64;
      int32_t acc[32] = {0};
      for (int64_t q = 0; q < chunks; ++q)
        for (int h = 0; h < 2; ++h)
          for (int r = 0; r < 16; ++r) {
            const uint8_t byte = w[q * 32 + h * 16 + r];
            for (int half = 0; half < 2; ++half) {
              const int idx = half ? byte >> 4 : byte & 15;
              const uint8_t* table = t + q * 64 + h * 16;
              acc[half * 16 + r] += static_cast<int16_t>(table[idx] | (table[32 + idx] << 8));
            }
          }
      for (int r = 0; r < 32; ++r)
        if (tile * 32 + r < j.n) store(*j.e, m, tile * 32 + r, acc[r]);
    }
  }
}

#if defined(BITNET158_X86)
BEGIN_TARGET_AVX2
static void lut_tables_avx2(const int8_t* a, int64_t chunks, uint8_t* tables) {
  const __m256i first = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(kFirst)));
  const __m256i second = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(kSecond)));
  // Gathers the low bytes of the 8 int16 of each 128-bit lane into its first 8 bytes, the high bytes after.
  const __m256i split = _mm256_setr_epi8(0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15,
                                         0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15);
  for (int64_t q = 0; q < chunks; ++q)
    for (int h = 0; h < 2; ++h) {
      const __m256i a0 = _mm256_set1_epi16(a[4 * q + 2 * h]), a1 = _mm256_set1_epi16(a[4 * q + 2 * h + 1]);
      const __m256i values = _mm256_add_epi16(_mm256_sign_epi16(a0, first), _mm256_sign_epi16(a1, second));
      // [lo 0-7, hi 0-7 | lo 8-15, hi 8-15] -> [lo 0-15 | hi 0-15]
      const __m256i bytes = _mm256_permute4x64_epi64(_mm256_shuffle_epi8(values, split), 0xd8);
      _mm_storeu_si128(reinterpret_cast<__m128i*>(tables + q * 64 + h * 16), _mm256_castsi256_si128(bytes));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(tables + q * 64 + 32 + h * 16), _mm256_extracti128_si256(bytes, 1));
    }
}

static inline void lut_flush(__m256i* acc16, __m256i* acc32) {
  for (int g = 0; g < 4; ++g) {
    // Lanes hold the sums of different pairs for the same 8 rows: widen both and add.
    acc32[g] = _mm256_add_epi32(acc32[g], _mm256_cvtepi16_epi32(_mm256_castsi256_si128(acc16[g])));
    acc32[g] = _mm256_add_epi32(acc32[g], _mm256_cvtepi16_epi32(_mm256_extracti128_si256(acc16[g], 1)));
    acc16[g] = _mm256_setzero_si256();
  }
}

static void lut_tiles_avx2(void* p, int64_t begin, int64_t end) {
  const auto& j = *static_cast<GemmJob*>(p);
  const int64_t chunks = lut_padded_k(j.k) / 4;
  const __m256i low = _mm256_set1_epi8(15);
  // |pair sum| <= 256, so an int16 lane holds 127 of them; flush to int32 every 64 chunks.
  constexpr int64_t kFlush = 64;
  for (int64_t tile = begin; tile < end; ++tile) {
    const uint8_t* w = j.w + tile * chunks * 32;
    for (int64_t m = 0; m < j.m; ++m) {
      const uint8_t* t = j.tables + m * chunks * 64;
      __m256i acc16[4], acc32[4];
      for (int g = 0; g < 4; ++g) acc16[g] = acc32[g] = _mm256_setzero_si256();
      for (int64_t q0 = 0; q0 < chunks; q0 += kFlush) {
        const int64_t q1 = std::min(chunks, q0 + kFlush);
        for (int64_t q = q0; q < q1; ++q) {
          const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + q * 32));
          const __m256i lo = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(t + q * 64));
          const __m256i hi = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(t + q * 64 + 32));
          const __m256i ia = _mm256_and_si256(x, low), ib = _mm256_and_si256(_mm256_srli_epi16(x, 4), low);
          const __m256i a_lo = _mm256_shuffle_epi8(lo, ia), a_hi = _mm256_shuffle_epi8(hi, ia);
          const __m256i b_lo = _mm256_shuffle_epi8(lo, ib), b_hi = _mm256_shuffle_epi8(hi, ib);
          acc16[0] = _mm256_add_epi16(acc16[0], _mm256_unpacklo_epi8(a_lo, a_hi));  // rows 0-7
          acc16[1] = _mm256_add_epi16(acc16[1], _mm256_unpackhi_epi8(a_lo, a_hi));  // rows 8-15
          acc16[2] = _mm256_add_epi16(acc16[2], _mm256_unpacklo_epi8(b_lo, b_hi));  // rows 16-23
          acc16[3] = _mm256_add_epi16(acc16[3], _mm256_unpackhi_epi8(b_lo, b_hi));  // rows 24-31
        }
        lut_flush(acc16, acc32);
      }
      int32_t acc[32];
      for (int g = 0; g < 4; ++g) _mm256_storeu_si256(reinterpret_cast<__m256i*>(acc + 8 * g), acc32[g]);
      for (int r = 0; r < 32; ++r)
        if (tile * 32 + r < j.n) store(*j.e, m, tile * 32 + r, acc[r]);
    }
  }
}
END_TARGET
#endif

// ---------------------------------------------------------------------------------------------
// tiled style. Threads split the 16-row tiles; each pass holds the sums of up to R batch rows times
// T tiles in registers while it walks K once, so a decoded weight vector serves R rows.

static void tiled_tiles_portable(void* p, int64_t begin, int64_t end) {
  const auto& j = *static_cast<GemmJob*>(p);
  const int64_t blocks = tiled_padded_k(j.k) / 16;
  for (int64_t tile = begin; tile < end; ++tile) {
    const uint8_t* w = j.w + tile * blocks * 64;
    for (int64_t m = 0; m < j.m; ++m) {
      const int8_t* a = j.codes + m * j.kp;
      int32_t acc[16] = {0};
      for (int64_t q = 0; q < blocks; ++q)
        for (int c = 0; c < 16; ++c)
          for (int s = 0; s < 4; ++s)
            for (int i = 0; i < 4; ++i) acc[c] += ((w[q * 64 + c * 4 + i] >> (2 * s)) & 3) * a[q * 16 + s * 4 + i];
      for (int c = 0; c < 16 && tile * 16 + c < j.n; ++c) store(*j.e, m, tile * 16 + c, acc[c] - j.sums[m]);
    }
  }
}

#if defined(BITNET158_X86)
using TiledFn = void (*)(const GemmJob&, int64_t tile, int64_t m0);

// The activation word of batch row a at k = 16 q + 4 s (4 codes), for a broadcast.
static inline int32_t act_word(const int8_t* a, int64_t q, int s) {
  int32_t word;
  std::memcpy(&word, a + q * 16 + s * 4, 4);
  return word;
}

// Walks the tiles of one thread, T at a time (the last may be single), and its batch rows R at a time.
template <int R, int T>
static void tiled_rows(const GemmJob& j, int64_t begin, int64_t end, const TiledFn (&kernels)[R][T]) {
  for (int64_t tile = begin; tile < end; tile += T) {
    const int64_t tiles = std::min<int64_t>(T, end - tile);
    for (int64_t m0 = 0; m0 < j.m; m0 += R) kernels[std::min<int64_t>(R, j.m - m0) - 1][tiles - 1](j, tile, m0);
  }
}

BEGIN_TARGET_AVX2
// 16 rows as two halves of 8 int32 lanes: maddubs multiplies pairs, madd sums them into the lanes.
template <int R>
static void tiled_block_avx2(const GemmJob& j, int64_t tile, int64_t m0) {
  const int64_t blocks = tiled_padded_k(j.k) / 16;
  const uint8_t* w = j.w + tile * blocks * 64;
  const __m256i mask = _mm256_set1_epi8(3), ones = _mm256_set1_epi16(1);
  __m256i acc[R][2];
  for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_si256();
  for (int64_t q = 0; q < blocks; ++q) {
    const __m256i x[2] = {_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + q * 64)),
                          _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + q * 64 + 32))};
    for (int s = 0; s < 4; ++s) {
      const __m256i v[2] = {_mm256_and_si256(_mm256_srli_epi16(x[0], 2 * s), mask),
                            _mm256_and_si256(_mm256_srli_epi16(x[1], 2 * s), mask)};
      for (int r = 0; r < R; ++r) {
        const __m256i b = _mm256_set1_epi32(act_word(j.codes + (m0 + r) * j.kp, q, s));
        for (int h = 0; h < 2; ++h)  // (t + 1) in 0..2 times int8: pair sums stay far inside int16
          acc[r][h] = _mm256_add_epi32(acc[r][h], _mm256_madd_epi16(_mm256_maddubs_epi16(v[h], b), ones));
      }
    }
  }
  for (int r = 0; r < R; ++r) {
    int32_t sums[16];
    const __m256i total = _mm256_set1_epi32(j.sums[m0 + r]);
    for (int h = 0; h < 2; ++h)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(sums + 8 * h), _mm256_sub_epi32(acc[r][h], total));
    for (int c = 0; c < 16 && tile * 16 + c < j.n; ++c) store(*j.e, m0 + r, tile * 16 + c, sums[c]);
  }
}

static constexpr TiledFn kTiledAvx2[4][1] = {
    {tiled_block_avx2<1>}, {tiled_block_avx2<2>}, {tiled_block_avx2<3>}, {tiled_block_avx2<4>}};

static void tiled_tiles_avx2(void* p, int64_t begin, int64_t end) {
  tiled_rows(*static_cast<GemmJob*>(p), begin, end, kTiledAvx2);
}
END_TARGET

BEGIN_TARGET_AVX512
// The sums of batch row m for rows row0.. row0 + 15 (those below n), through the epilogue, vectorized
// in the order of `store`: float(acc) * (act_scale * w_scale) + bias.
static inline void store16_avx512(const Epilogue& e, int64_t m, int64_t row0, int64_t n, __m512i acc) {
  const __mmask16 rows = n - row0 >= 16 ? static_cast<__mmask16>(0xffff) : static_cast<__mmask16>((1u << (n - row0)) - 1);
  if (e.out_i32) _mm512_mask_storeu_epi32(e.out_i32 + m * e.ldo + row0, rows, acc);
  if (!e.out) return;
  const __m512 scale = e.per_row_scale
                           ? _mm512_mul_ps(_mm512_set1_ps(e.act_scales[m]), _mm512_maskz_loadu_ps(rows, e.w_scales + row0))
                           : _mm512_set1_ps(e.act_scales[m] * e.w_scales[0]);
  __m512 value = _mm512_mul_ps(_mm512_cvtepi32_ps(acc), scale);
  if (e.bias) value = _mm512_add_ps(value, _mm512_maskz_loadu_ps(rows, e.bias + row0));
  _mm512_mask_storeu_ps(e.out + m * e.ldo + row0, rows, value);
}

template <int R, int T>
static void tiled_block_avx512(const GemmJob& j, int64_t tile, int64_t m0) {
  const int64_t blocks = tiled_padded_k(j.k) / 16;
  const uint8_t* w = j.w + tile * blocks * 64;
  const __m512i mask = _mm512_set1_epi8(3);
  __m512i acc[R][T];
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < T; ++t) acc[r][t] = _mm512_setzero_si512();
  for (int64_t q = 0; q < blocks; ++q) {
    __m512i x[T];
    for (int t = 0; t < T; ++t) x[t] = _mm512_loadu_si512(w + (t * blocks + q) * 64);
    for (int s = 0; s < 4; ++s) {
      __m512i v[T];
      for (int t = 0; t < T; ++t) v[t] = _mm512_and_si512(_mm512_srli_epi16(x[t], 2 * s), mask);
      for (int r = 0; r < R; ++r) {
        const __m512i b = _mm512_set1_epi32(act_word(j.codes + (m0 + r) * j.kp, q, s));
        for (int t = 0; t < T; ++t) acc[r][t] = _mm512_dpbusd_epi32(acc[r][t], v[t], b);
      }
    }
  }
  for (int r = 0; r < R; ++r) {
    const __m512i total = _mm512_set1_epi32(j.sums[m0 + r]);
    for (int t = 0; t < T; ++t) store16_avx512(*j.e, m0 + r, (tile + t) * 16, j.n, _mm512_sub_epi32(acc[r][t], total));
  }
}

// 8 rows x 2 tiles: 16 accumulators, 8 decoded vectors and the broadcast fit the 32 registers.
#define TILED_AVX512_ROW(R) {tiled_block_avx512<R, 1>, tiled_block_avx512<R, 2>}
static constexpr TiledFn kTiledAvx512[8][2] = {TILED_AVX512_ROW(1), TILED_AVX512_ROW(2), TILED_AVX512_ROW(3),
                                               TILED_AVX512_ROW(4), TILED_AVX512_ROW(5), TILED_AVX512_ROW(6),
                                               TILED_AVX512_ROW(7), TILED_AVX512_ROW(8)};
#undef TILED_AVX512_ROW

static void tiled_tiles_avx512(void* p, int64_t begin, int64_t end) {
  tiled_rows(*static_cast<GemmJob*>(p), begin, end, kTiledAvx512);
}
END_TARGET

#if defined(BITNET158_AMX)
// ---------------------------------------------------------------------------------------------
// tiled style, AMX. One tile multiply (tdpbsud) sums 16 batch rows x 64 inputs of int8 codes against
// the same 64 inputs of 16 weight rows: the work of 16 dpbusd. The weight tile is the tiled layout
// decoded: block q shifted by 2s holds inputs 16q + 4s .. 16q + 4s + 3 of the 16 rows, which is the
// tile's row 4q + s, so decoding (shifts and masks into a 1 KB buffer) is most of what is left.
// Passes take up to 32 batch rows (two batch tiles) and two weight tiles: 4 sum tiles.

BEGIN_TARGET_AMX
struct TileConfig {  // what ldtilecfg reads (palette 1)
  uint8_t palette = 1, start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t bytes_per_row[16] = {};
  uint8_t rows[16] = {};
};

// Tiles 0-3: the sums of batch tile b and weight tile t (tile 2b + t); 4-5: the batch tiles' codes
// (rows0 and rows1 rows, rows1 = 0 where there is one); 6-7: the weight tiles.
static void amx_configure(int rows0, int rows1) {
  TileConfig config;
  const int rows[8] = {rows0, rows0, rows1, rows1, rows0, rows1, 16, 16};
  for (int tile = 0; tile < 8; ++tile) {
    config.rows[tile] = static_cast<uint8_t>(rows[tile]);
    config.bytes_per_row[tile] = rows[tile] ? 64 : 0;  // unused tiles stay unconfigured
  }
  _tile_loadconfig(&config);
}

// Blocks q0 .. q0 + 3 of a weight tile (zeros past its `blocks`: the codes there are zero) as a tile.
static inline void decode_for_amx(const uint8_t* w, int64_t blocks, int64_t q0, uint8_t* tile) {
  const __m512i mask = _mm512_set1_epi8(3);
  for (int q = 0; q < 4; ++q) {
    const __m512i x = q0 + q < blocks ? _mm512_loadu_si512(w + (q0 + q) * 64) : _mm512_setzero_si512();
    for (int s = 0; s < 4; ++s)
      _mm512_store_si512(tile + (4 * q + s) * 64, _mm512_and_si512(_mm512_srli_epi16(x, 2 * s), mask));
  }
}

// The epilogue of `rows` batch rows from m0 and the 16 weight rows of `tile`.
static void store_amx(const GemmJob& j, const int32_t (&sums)[16][16], int64_t m0, int rows, int64_t tile) {
  for (int r = 0; r < rows; ++r) {
    const __m512i total = _mm512_set1_epi32(j.sums[m0 + r]);
    store16_avx512(*j.e, m0 + r, tile * 16, j.n, _mm512_sub_epi32(_mm512_load_si512(sums[r]), total));
  }
}

// Batch rows m0 .. m0 + rows0 + rows1 (one batch tile, or two) times weight tile `tile` (and tile + 1).
// Tile numbers are immediates: hence the spelled-out tiles.
template <bool TwoBatch, bool TwoTiles>
static void tiled_block_amx(const GemmJob& j, int64_t tile, int64_t m0, int rows0, int rows1) {
  const int64_t blocks = tiled_padded_k(j.k) / 16;
  const uint8_t* w = j.w + tile * blocks * 64;
  const int8_t* a = j.codes + m0 * j.kp;
  // Tile registers are not renamed: a tile load waits for the multiplies that read the register before.
  // So each pass loads all four tiles, then multiplies, then decodes the next pass's weights into the
  // other buffer (the vector units work while the tile unit does).
  alignas(64) uint8_t weights[2][2][16 * 64];  // [pass parity][weight tile]
  _tile_zero(0);
  if (TwoTiles) _tile_zero(1);
  if (TwoBatch) _tile_zero(2);
  if (TwoBatch && TwoTiles) _tile_zero(3);
  decode_for_amx(w, blocks, 0, weights[0][0]);
  if (TwoTiles) decode_for_amx(w + blocks * 64, blocks, 0, weights[0][1]);
  for (int64_t q0 = 0; q0 < blocks; q0 += 4) {  // 64 inputs a pass (the codes are zero past k, up to kp)
    const int64_t pass = q0 / 4;
    _tile_loadd(4, a + 16 * q0, j.kp);
    _tile_loadd(6, weights[pass % 2][0], 64);
    if (TwoTiles) _tile_loadd(7, weights[pass % 2][1], 64);
    if (TwoBatch) _tile_loadd(5, a + 16 * j.kp + 16 * q0, j.kp);
    _tile_dpbsud(0, 4, 6);
    if (TwoTiles) _tile_dpbsud(1, 4, 7);
    if (TwoBatch) _tile_dpbsud(2, 5, 6);
    if (TwoBatch && TwoTiles) _tile_dpbsud(3, 5, 7);
    if (q0 + 4 < blocks) {
      decode_for_amx(w, blocks, q0 + 4, weights[1 - pass % 2][0]);
      if (TwoTiles) decode_for_amx(w + blocks * 64, blocks, q0 + 4, weights[1 - pass % 2][1]);
    }
  }
  alignas(64) int32_t sums[16][16];
  _tile_stored(0, sums, 64);
  store_amx(j, sums, m0, rows0, tile);
  if (TwoTiles) {
    _tile_stored(1, sums, 64);
    store_amx(j, sums, m0, rows0, tile + 1);
  }
  if (TwoBatch) {
    _tile_stored(2, sums, 64);
    store_amx(j, sums, m0 + 16, rows1, tile);
  }
  if (TwoBatch && TwoTiles) {
    _tile_stored(3, sums, 64);
    store_amx(j, sums, m0 + 16, rows1, tile + 1);
  }
}

// Each pass of 32 batch rows walks the thread's tiles two at a time; the tile registers are given back
// at the end, so that the OS does not save and restore them at every switch between jobs.
static void tiled_tiles_amx(void* p, int64_t begin, int64_t end) {
  const auto& j = *static_cast<GemmJob*>(p);
  for (int64_t m0 = 0; m0 < j.m; m0 += 32) {
    const int rows0 = static_cast<int>(std::min<int64_t>(16, j.m - m0));
    const int rows1 = static_cast<int>(std::clamp<int64_t>(j.m - m0 - 16, 0, 16));
    amx_configure(rows0, rows1);
    for (int64_t tile = begin; tile < end; tile += 2) {
      const bool two_tiles = tile + 1 < end;
      if (rows1 && two_tiles) tiled_block_amx<true, true>(j, tile, m0, rows0, rows1);
      else if (rows1) tiled_block_amx<true, false>(j, tile, m0, rows0, rows1);
      else if (two_tiles) tiled_block_amx<false, true>(j, tile, m0, rows0, rows1);
      else tiled_block_amx<false, false>(j, tile, m0, rows0, rows1);
    }
  }
  _tile_release();
}
END_TARGET
#endif  // BITNET158_AMX
#endif  // BITNET158_X86

// ---------------------------------------------------------------------------------------------
// Dispatch. Scratch buffers are reused across calls (callers serialize, see module.cpp).

static std::vector<int8_t> g_permuted;
static std::vector<uint8_t> g_tables;

void ternary_gemm(Style style, const int8_t* codes, const int32_t* sums, int64_t m, int64_t k, const uint8_t* w,
                  int64_t n, const Epilogue& epilogue) {
  GemmJob job{codes, sums, nullptr, m, k, i2_padded_k(k), n, w, &epilogue};
  const Isa isa = g_isa;
  if (m == 0 || n == 0) return;
  if (style == Style::kTiled) {
    const int64_t tiles = round_up(n, 16) / 16;
#if defined(BITNET158_X86)
#if defined(BITNET158_AMX)
    // Below 8 rows a tile multiply is mostly empty and AVX-512 is as fast.
    if (isa == Isa::kAmx && m >= 8) return parallel_rows(tiles, 2, tiled_tiles_amx, &job);
#endif
    if (has_avx512(isa)) return parallel_rows(tiles, 2, tiled_tiles_avx512, &job);  // tiles go in pairs
    if (isa == Isa::kAvx2) return parallel_rows(tiles, 1, tiled_tiles_avx2, &job);
#endif
    return parallel_rows(tiles, 1, tiled_tiles_portable, &job);
  }
  if (style == Style::kLut) {
    const int64_t chunks = lut_padded_k(k) / 4;
    if (g_tables.size() < static_cast<size_t>(m * chunks * 64)) g_tables.resize(m * chunks * 64);
    for (int64_t row = 0; row < m; ++row) {
#if defined(BITNET158_X86)
      if (isa != Isa::kPortable) {
        lut_tables_avx2(codes + row * job.kp, chunks, g_tables.data() + row * chunks * 64);
        continue;
      }
#endif
      lut_tables_portable(codes + row * job.kp, chunks, g_tables.data() + row * chunks * 64);
    }
    job.tables = g_tables.data();
    const int64_t tiles = round_up(n, 32) / 32;
#if defined(BITNET158_X86)
    if (isa != Isa::kPortable) return parallel_rows(tiles, 1, lut_tiles_avx2, &job);
#endif
    return parallel_rows(tiles, 1, lut_tiles_portable, &job);
  }
#if defined(BITNET158_X86)
  if (has_avx512(isa)) {
    if (g_permuted.size() < static_cast<size_t>(m * job.kp)) g_permuted.resize(m * job.kp);
    for (int64_t row = 0; row < m; ++row)
      permute_for_avx512(codes + row * job.kp, job.kp, g_permuted.data() + row * job.kp);
    job.codes = g_permuted.data();
    return parallel_rows(n, 16, i2_rows_simd<i2_tile_avx512<4>, i2_tile_avx512<2>, i2_tile_avx512<1>>, &job);
  }
  if (isa == Isa::kAvx2) return parallel_rows(n, 16, i2_rows_simd<i2_tile_avx2<4>, i2_tile_avx2<2>, i2_tile_avx2<1>>, &job);
#endif
#if defined(BITNET158_NEON)
  if (isa == Isa::kNeon) return parallel_rows(n, 16, i2_rows_neon, &job);
#endif
  parallel_rows(n, 16, i2_rows_portable, &job);
}

}  // namespace bitnet158
