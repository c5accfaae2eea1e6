// The decode step: embedding, then per layer RMSNorm -> fused qkv (ternary) -> RoPE -> attention over
// the KV cache -> sub-norm -> o_proj (ternary) -> residual -> RMSNorm -> fused gate/up (ternary) ->
// relu² or SiLU gate -> sub-norm -> down (ternary) -> residual; final RMSNorm and the lm_head.
// It computes what bitnet158.model.bitnet computes, with activations in float32 whatever the model's
// dtype (embeddings, lm_head and the KV cache may be bfloat16). Each row of a step is one token of a
// sequence at its own place in the cache, so a step can also carry a prompt's tokens (several rows of
// one sequence) next to other sequences' decoding. Scratch buffers live in the decoder and grow with
// the largest step: later steps allocate nothing.
#include "decode.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <memory>
#include <mutex>
#include <vector>

#include "kernels.h"
#include "threadpool.h"

#if defined(__x86_64__) || defined(__i386__)
#define BITNET158_X86 1
#include <immintrin.h>
#endif

#if defined(__GNUC__) && !defined(__clang__)
// GCC 12's AVX-512 headers trip -Wuninitialized on their own _mm512_undefined_* helpers.
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

namespace bitnet158 {

std::mutex& kernel_lock();  // module.cpp: every native entry point holds it

namespace {

enum DType { kF32 = 0, kBF16 = 1 };

inline float bf16_to_f32(uint16_t v) {
  uint32_t bits = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

inline uint16_t f32_to_bf16(float f) {  // round to nearest even, like torch's .to(bfloat16)
  uint32_t bits;
  std::memcpy(&bits, &f, 4);
  if ((bits & 0x7fffffff) > 0x7f800000) return static_cast<uint16_t>((bits >> 16) | 0x40);  // NaN stays NaN
  bits += 0x7fff + ((bits >> 16) & 1);
  return static_cast<uint16_t>(bits >> 16);
}

// ---- dot products and axpy, float32 or bfloat16 on the right-hand side -------------------------
//
// The lm_head (a [vocab, hidden] GEMV, the largest weight of a small model) reads its rows R at a time:
// R independent accumulator chains, and while one group of R rows is summed the next group is
// prefetched, so the memory system always has requests in flight. With several inputs (a batch), the
// AVX-512 kernel multiplies each group by a few inputs at once, so that a loaded weight vector feeds
// several FMAs. Each ISA has a table of kernels (`DotKernels`) picked at run time by active_isa();
// bfloat16 becomes float32 by a 16-bit shift. Every kernel sums each (input, row) pair in the same
// order, however many inputs and rows it takes at once: a row's logits do not depend on its batch.

constexpr int kHeadRows = 4;  // lm_head rows per pass

// out[r] = a . b_r for the R rows b_r = b + r * stride (elements), each n long. `ahead` is where the
// rows of the next pass start: the kernel prefetches it (a hint only; it may equal b on the last pass).
using RowsFn = void (*)(const float* a, const void* b, const void* ahead, int64_t stride, int64_t n, float* out);
// out[i * ldo + r] = x_i . b_r for the `batch` inputs x_i = x + i * ldx and kHeadRows rows b_r (as RowsFn).
using HeadFn = void (*)(const float* x, int64_t batch, int64_t ldx, const void* b, const void* ahead, int64_t stride,
                        int64_t n, float* out, int64_t ldo);
using AxpyFn = void (*)(float alpha, const void* x, float* y, int64_t n);  // y += alpha * x
// Attention's weighted sum of values: out_g += p[g * ldp + k] * v_k for the `heads` heads g and the `count`
// values v_k = v + k * n, each element summed value by value, one FMA each (as axpy, value after value).
using AttendFn = void (*)(const float* p, int64_t ldp, int64_t heads, const void* v, int64_t count, int64_t n,
                          float* out);
// Attention scores: s[g * lds + k] = q_g . key_k for the `group` queries q_g = q + g * n and the `count` keys
// key_k = keys + k * n. Each score is summed in an order that depends only on n, not on where the key is.
using ScoresFn = void (*)(const float* q, int64_t group, const void* keys, int64_t count, int64_t n, float* s,
                          int64_t lds);
// s[g * lds + k] for k < count becomes softmax_k(scale * s[g * lds + k]), for each of the `group` rows.
using SoftmaxFn = void (*)(float* s, int64_t group, int64_t lds, int64_t count, float scale);

struct DotKernels {
  HeadFn head[2];    // kHeadRows rows for a batch, by DType
  RowsFn single[2];  // one row
  AttendFn attend[2];
  ScoresFn scores[2];
  SoftmaxFn softmax;
};


// A HeadFn that runs a RowsFn input by input.
template <RowsFn Rows>
void head_by_input(const float* x, int64_t batch, int64_t ldx, const void* b, const void* ahead, int64_t stride,
                   int64_t n, float* out, int64_t ldo) {
  float sums[kHeadRows];
  for (int64_t i = 0; i < batch; ++i) {
    Rows(x + i * ldx, b, ahead, stride, n, sums);
    for (int r = 0; r < kHeadRows; ++r) out[i * ldo + r] = sums[r];
  }
}

template <DType T>
inline float element(const void* b, int64_t i) {
  if (T == kF32) return static_cast<const float*>(b)[i];
  return bf16_to_f32(static_cast<const uint16_t*>(b)[i]);
}

template <DType T>
inline const void* advance(const void* b, int64_t elements) {
  return static_cast<const char*>(b) + elements * (T == kF32 ? 4 : 2);
}

template <DType T>
float dot_portable(const float* a, const void* b, int64_t n) {
  float partial[8] = {0};  // eight independent chains, which the compiler can keep in SSE registers
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int j = 0; j < 8; ++j) partial[j] += a[i + j] * element<T>(b, i + j);
  for (; i < n; ++i) partial[0] += a[i] * element<T>(b, i);
  float total = 0;
  for (float p : partial) total += p;
  return total;
}

template <DType T, int R>
void rows_portable(const float* a, const void* b, const void*, int64_t stride, int64_t n, float* out) {
  for (int r = 0; r < R; ++r) out[r] = dot_portable<T>(a, advance<T>(b, r * stride), n);
}

template <DType T>
void axpy_portable(float alpha, const void* x, float* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] += alpha * element<T>(x, i);
}

template <DType T, AxpyFn Axpy>
void attend_by_axpy(const float* p, int64_t ldp, int64_t heads, const void* v, int64_t count, int64_t n, float* out) {
  for (int64_t k = 0; k < count; ++k)
    for (int64_t g = 0; g < heads; ++g) Axpy(p[g * ldp + k], advance<T>(v, k * n), out + g * n, n);
}

// Scores through the lm_head's kernels: kHeadRows keys times all queries at a time, then the rest one by one.
template <DType T, HeadFn Head, RowsFn Single>
void scores_by_rows(const float* q, int64_t group, const void* keys, int64_t count, int64_t n, float* s, int64_t lds) {
  int64_t k = 0;
  for (; k + kHeadRows <= count; k += kHeadRows) {
    const void* rows = advance<T>(keys, k * n);
    Head(q, group, n, rows, rows, n, n, s + k, lds);
  }
  for (; k < count; ++k)
    for (int64_t g = 0; g < group; ++g) {
      const void* row = advance<T>(keys, k * n);
      Single(q + g * n, row, row, 0, n, s + g * lds + k);
    }
}

void softmax_portable(float* s, int64_t group, int64_t lds, int64_t count, float scale) {
  for (int64_t g = 0; g < group; ++g, s += lds) {
    float top = -INFINITY, total = 0;
    for (int64_t k = 0; k < count; ++k) top = std::max(top, s[k] *= scale);
    for (int64_t k = 0; k < count; ++k) total += s[k] = std::exp(s[k] - top);
    for (int64_t k = 0; k < count; ++k) s[k] /= total;
  }
}

constexpr DotKernels kPortable = {{head_by_input<rows_portable<kF32, kHeadRows>>,
                                   head_by_input<rows_portable<kBF16, kHeadRows>>},
                                  {rows_portable<kF32, 1>, rows_portable<kBF16, 1>},
                                  {attend_by_axpy<kF32, axpy_portable<kF32>>, attend_by_axpy<kBF16, axpy_portable<kBF16>>},
                                  {scores_by_rows<kF32, head_by_input<rows_portable<kF32, kHeadRows>>, rows_portable<kF32, 1>>,
                                   scores_by_rows<kBF16, head_by_input<rows_portable<kBF16, kHeadRows>>, rows_portable<kBF16, 1>>},
                                  softmax_portable};

#if defined(BITNET158_X86)
// Per-ISA code is compiled for its instruction set inside these regions (as in kernels.cpp) and only
// called after the runtime CPU check, so the extension itself runs on any x86-64.
#if defined(__clang__)
#define BEGIN_TARGET_AVX2 _Pragma("clang attribute push(__attribute__((target(\"avx2,fma\"))), apply_to = function)")
#define BEGIN_TARGET_AVX512 \
  _Pragma("clang attribute push(__attribute__((target(\"avx512f,avx512bw,avx512vl,avx2,fma\"))), apply_to = function)")
#define END_TARGET _Pragma("clang attribute pop")
#else
#define BEGIN_TARGET_AVX2 _Pragma("GCC push_options") _Pragma("GCC target(\"avx2,fma\")")
#define BEGIN_TARGET_AVX512 _Pragma("GCC push_options") _Pragma("GCC target(\"avx512f,avx512bw,avx512vl,avx2,fma\")")
#define END_TARGET _Pragma("GCC pop_options")
#endif

BEGIN_TARGET_AVX2
template <DType T>
inline __m256 load8(const void* b, int64_t i) {
  if (T == kF32) return _mm256_loadu_ps(static_cast<const float*>(b) + i);
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(b) + i));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

inline float sum8(__m256 s) {
  __m128 q = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
  q = _mm_add_ps(q, _mm_movehl_ps(q, q));
  q = _mm_add_ss(q, _mm_movehdup_ps(q));
  return _mm_cvtss_f32(q);
}

template <DType T, int R>
void rows_avx2(const float* a, const void* b, const void* ahead, int64_t stride, int64_t n, float* out) {
  const char* row[R];
  const char* next[R];
  for (int r = 0; r < R; ++r) {
    row[r] = static_cast<const char*>(advance<T>(b, r * stride));
    next[r] = static_cast<const char*>(advance<T>(ahead, r * stride));
  }
  __m256 acc[R][2];  // two chains per row hide the FMA latency
  for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m256 a0 = _mm256_loadu_ps(a + i), a1 = _mm256_loadu_ps(a + i + 8);
    for (int r = 0; r < R; ++r) {
      // 16 elements are 32 (bf16) or 64 (f32) bytes: at most one new cache line per row and step
      _mm_prefetch(static_cast<const char*>(advance<T>(next[r], i)), _MM_HINT_T0);
      acc[r][0] = _mm256_fmadd_ps(a0, load8<T>(row[r], i), acc[r][0]);
      acc[r][1] = _mm256_fmadd_ps(a1, load8<T>(row[r], i + 8), acc[r][1]);
    }
  }
  for (; i + 8 <= n; i += 8) {
    const __m256 a0 = _mm256_loadu_ps(a + i);
    for (int r = 0; r < R; ++r) acc[r][0] = _mm256_fmadd_ps(a0, load8<T>(row[r], i), acc[r][0]);
  }
  for (int r = 0; r < R; ++r) {
    float total = sum8(_mm256_add_ps(acc[r][0], acc[r][1]));
    for (int64_t k = i; k < n; ++k) total += a[k] * element<T>(row[r], k);
    out[r] = total;
  }
}

template <DType T>
void axpy_avx2(float alpha, const void* x, float* y, int64_t n) {
  const __m256 va = _mm256_set1_ps(alpha);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(y + i, _mm256_fmadd_ps(va, load8<T>(x, i), _mm256_loadu_ps(y + i)));
  for (; i < n; ++i) y[i] += alpha * element<T>(x, i);
}
END_TARGET

BEGIN_TARGET_AVX512
template <DType T>
inline __m512 load16(const void* b, int64_t i) {
  if (T == kF32) return _mm512_loadu_ps(static_cast<const float*>(b) + i);
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(static_cast<const uint16_t*>(b) + i));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

// The first min(count, 16) lanes.
inline __mmask16 lanes(int64_t count) {
  return count >= 16 ? static_cast<__mmask16>(0xffff) : static_cast<__mmask16>((1u << count) - 1);
}

// The first `count` (< 16) elements from i, zeros after: the tail without a scalar loop.
template <DType T>
inline __m512 load16_masked(const void* b, int64_t i, __mmask16 mask) {
  if (T == kF32) return _mm512_maskz_loadu_ps(mask, static_cast<const float*>(b) + i);
  const __m256i h = _mm256_maskz_loadu_epi16(mask, static_cast<const uint16_t*>(b) + i);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

// out[i * ldo + r] = x_i . b_r for B inputs x_i = x + i * ldx and R rows: each weight vector loaded
// serves B inputs.
template <DType T, int R, int B>
void rows_avx512_batch(const float* x, int64_t ldx, const void* b, const void* ahead, int64_t stride, int64_t n,
                       float* out, int64_t ldo) {
  const char* row[R];
  const char* next[R];
  for (int r = 0; r < R; ++r) {
    row[r] = static_cast<const char*>(advance<T>(b, r * stride));
    next[r] = static_cast<const char*>(advance<T>(ahead, r * stride));
  }
  __m512 acc[B][R][2];  // two chains per pair hide the FMA latency
  for (int i = 0; i < B; ++i)
    for (int r = 0; r < R; ++r) acc[i][r][0] = acc[i][r][1] = _mm512_setzero_ps();
  constexpr int kStep = T == kF32 ? 16 : 32;  // one 64-byte cache line of each row per step
  int64_t k = 0;
  for (; k + kStep <= n; k += kStep) {
    for (int r = 0; r < R; ++r) _mm_prefetch(static_cast<const char*>(advance<T>(next[r], k)), _MM_HINT_T0);
    for (int h = 0; h < kStep; h += 16) {
      __m512 va[B];
      for (int i = 0; i < B; ++i) va[i] = _mm512_loadu_ps(x + i * ldx + k + h);
      for (int r = 0; r < R; ++r) {
        const __m512 w = load16<T>(row[r], k + h);
        for (int i = 0; i < B; ++i) acc[i][r][h / 16] = _mm512_fmadd_ps(va[i], w, acc[i][r][h / 16]);
      }
    }
  }
  for (; k + 16 <= n; k += 16)
    for (int r = 0; r < R; ++r) {
      const __m512 w = load16<T>(row[r], k);
      for (int i = 0; i < B; ++i) acc[i][r][0] = _mm512_fmadd_ps(_mm512_loadu_ps(x + i * ldx + k), w, acc[i][r][0]);
    }
  if (k < n) {
    const __mmask16 mask = lanes(n - k);
    for (int r = 0; r < R; ++r) {
      const __m512 w = load16_masked<T>(row[r], k, mask);
      for (int i = 0; i < B; ++i)
        acc[i][r][1] = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(mask, x + i * ldx + k), w, acc[i][r][1]);
    }
  }
  for (int i = 0; i < B; ++i)
    for (int r = 0; r < R; ++r) out[i * ldo + r] = _mm512_reduce_add_ps(_mm512_add_ps(acc[i][r][0], acc[i][r][1]));
}

template <DType T, int R>
void rows_avx512(const float* a, const void* b, const void* ahead, int64_t stride, int64_t n, float* out) {
  rows_avx512_batch<T, R, 1>(a, 0, b, ahead, stride, n, out, 0);
}

template <DType T>
void head_avx512(const float* x, int64_t batch, int64_t ldx, const void* b, const void* ahead, int64_t stride,
                 int64_t n, float* out, int64_t ldo) {
  constexpr int kInputs = T == kF32 ? 4 : 2;  // the accumulators (kInputs x kHeadRows x 1 or 2 chains) fill 16 registers
  int64_t i = 0;
  for (; i + kInputs <= batch; i += kInputs)
    rows_avx512_batch<T, kHeadRows, kInputs>(x + i * ldx, ldx, b, ahead, stride, n, out + i * ldo, ldo);
  for (; i < batch; ++i) rows_avx512_batch<T, kHeadRows, 1>(x + i * ldx, ldx, b, ahead, stride, n, out + i * ldo, ldo);
}

template <DType T>
void axpy_avx512(float alpha, const void* x, float* y, int64_t n) {
  const __m512 va = _mm512_set1_ps(alpha);
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) _mm512_storeu_ps(y + i, _mm512_fmadd_ps(va, load16<T>(x, i), _mm512_loadu_ps(y + i)));
  if (i < n) {
    const __mmask16 mask = lanes(n - i);
    const __m512 y0 = _mm512_maskz_loadu_ps(mask, y + i);
    _mm512_mask_storeu_ps(y + i, mask, _mm512_fmadd_ps(va, load16_masked<T>(x, i, mask), y0));
  }
}

// Blocks of 4 heads x 64 columns stay in 16 registers while every value passes; the rest (heads past a
// multiple of 4, columns past a multiple of 64) goes value by value through axpy, which sums each
// element in the same order.
template <DType T>
void attend_avx512(const float* p, int64_t ldp, int64_t heads, const void* v, int64_t count, int64_t n, float* out) {
  const int64_t full_heads = heads / 4 * 4, full_cols = n / 64 * 64;
  for (int64_t g0 = 0; g0 < full_heads; g0 += 4)
    for (int64_t c = 0; c < full_cols; c += 64) {
      __m512 acc[4][4];
      for (int g = 0; g < 4; ++g)
        for (int i = 0; i < 4; ++i) acc[g][i] = _mm512_loadu_ps(out + (g0 + g) * n + c + 16 * i);
      for (int64_t k = 0; k < count; ++k) {
        const void* row = advance<T>(v, k * n + c);
        const __m512 x[4] = {load16<T>(row, 0), load16<T>(row, 16), load16<T>(row, 32), load16<T>(row, 48)};
        for (int g = 0; g < 4; ++g) {
          const __m512 weight = _mm512_set1_ps(p[(g0 + g) * ldp + k]);
          for (int i = 0; i < 4; ++i) acc[g][i] = _mm512_fmadd_ps(weight, x[i], acc[g][i]);
        }
      }
      for (int g = 0; g < 4; ++g)
        for (int i = 0; i < 4; ++i) _mm512_storeu_ps(out + (g0 + g) * n + c + 16 * i, acc[g][i]);
    }
  for (int64_t k = 0; k < count; ++k)
    for (int64_t g = 0; g < heads; ++g) {
      const void* row = advance<T>(v, k * n);
      if (g < full_heads) {  // the columns past the blocks
        if (full_cols < n) axpy_avx512<T>(p[g * ldp + k], advance<T>(row, full_cols), out + g * n + full_cols, n - full_cols);
      } else {
        axpy_avx512<T>(p[g * ldp + k], row, out + g * n, n);
      }
    }
}

// r[j] = the sum of the 16 lanes of a[j]: one vector of 16 sums from a tree of 15 shuffle-and-add steps,
// where one horizontal sum each would take 16 (each a chain of 4).
inline __m512 sum_lanes16(const __m512 (&a)[16]) {
  __m512 t[8], u[4];
  for (int k = 0; k < 8; ++k)  // in each 128-bit block: pairs of lanes of a[2k] and a[2k + 1]
    t[k] = _mm512_add_ps(_mm512_unpacklo_ps(a[2 * k], a[2 * k + 1]), _mm512_unpackhi_ps(a[2 * k], a[2 * k + 1]));
  for (int k = 0; k < 4; ++k)  // in each 128-bit block: the block's sums of a[4k .. 4k + 3]
    u[k] = _mm512_add_ps(_mm512_shuffle_ps(t[2 * k], t[2 * k + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                         _mm512_shuffle_ps(t[2 * k], t[2 * k + 1], _MM_SHUFFLE(3, 2, 3, 2)));
  const __m512 w01 = _mm512_add_ps(_mm512_shuffle_f32x4(u[0], u[1], _MM_SHUFFLE(1, 0, 1, 0)),
                                   _mm512_shuffle_f32x4(u[0], u[1], _MM_SHUFFLE(3, 2, 3, 2)));
  const __m512 w23 = _mm512_add_ps(_mm512_shuffle_f32x4(u[2], u[3], _MM_SHUFFLE(1, 0, 1, 0)),
                                   _mm512_shuffle_f32x4(u[2], u[3], _MM_SHUFFLE(3, 2, 3, 2)));
  return _mm512_add_ps(_mm512_shuffle_f32x4(w01, w23, _MM_SHUFFLE(2, 0, 2, 0)),
                       _mm512_shuffle_f32x4(w01, w23, _MM_SHUFFLE(3, 1, 3, 1)));
}

// Scores of one query against keys [begin, count), 16 keys at a time: 16 accumulators, each a chain over the
// head's 16-wide chunks (the last one masked), summed by one tree.
template <DType T>
void query_scores_avx512(const float* q, const void* keys, int64_t begin, int64_t count, int64_t n, float* s) {
  const int64_t chunks = (n + 15) / 16;
  for (int64_t k0 = begin; k0 < count; k0 += 16) {
    const int64_t block = std::min<int64_t>(16, count - k0);
    __m512 acc[16];
    for (int j = 0; j < 16; ++j) acc[j] = _mm512_setzero_ps();
    for (int64_t c = 0; c < chunks; ++c) {
      const __mmask16 mask = lanes(n - 16 * c);
      const __m512 qc = _mm512_maskz_loadu_ps(mask, q + 16 * c);
      for (int j = 0; j < 16; ++j)
        if (j < block) acc[j] = _mm512_fmadd_ps(qc, load16_masked<T>(keys, (k0 + j) * n + 16 * c, mask), acc[j]);
    }
    _mm512_mask_storeu_ps(s + k0, lanes(block), sum_lanes16(acc));
  }
}

// Blocks of 4 queries x 4 keys (each key read once for the 4 queries), the rest one query at a time. Every
// score is the same chain over chunks and the same tree, wherever it is computed.
template <DType T>
void scores_avx512(const float* q, int64_t group, const void* keys, int64_t count, int64_t n, float* s, int64_t lds) {
  const int64_t chunks = (n + 15) / 16;
  int64_t g0 = 0;
  for (; g0 + 4 <= group; g0 += 4) {
    int64_t k0 = 0;
    for (; k0 + 4 <= count; k0 += 4) {
      __m512 acc[16];  // acc[4 g + i]: query g0 + g, key k0 + i
      for (int j = 0; j < 16; ++j) acc[j] = _mm512_setzero_ps();
      for (int64_t c = 0; c < chunks; ++c) {
        const __mmask16 mask = lanes(n - 16 * c);
        __m512 qc[4];
        for (int g = 0; g < 4; ++g) qc[g] = _mm512_maskz_loadu_ps(mask, q + (g0 + g) * n + 16 * c);
        for (int i = 0; i < 4; ++i) {
          const __m512 kc = load16_masked<T>(keys, (k0 + i) * n + 16 * c, mask);
          for (int g = 0; g < 4; ++g) acc[4 * g + i] = _mm512_fmadd_ps(qc[g], kc, acc[4 * g + i]);
        }
      }
      const __m512 sums = sum_lanes16(acc);
      _mm_storeu_ps(s + g0 * lds + k0, _mm512_extractf32x4_ps(sums, 0));
      _mm_storeu_ps(s + (g0 + 1) * lds + k0, _mm512_extractf32x4_ps(sums, 1));
      _mm_storeu_ps(s + (g0 + 2) * lds + k0, _mm512_extractf32x4_ps(sums, 2));
      _mm_storeu_ps(s + (g0 + 3) * lds + k0, _mm512_extractf32x4_ps(sums, 3));
    }
    for (int64_t g = g0; g < g0 + 4; ++g) query_scores_avx512<T>(q + g * n, keys, k0, count, n, s + g * lds);
  }
  for (; g0 < group; ++g0) query_scores_avx512<T>(q + g0 * n, keys, 0, count, n, s + g0 * lds);
}

// exp(x) for x <= 0 (Cephes' polynomial, within about 1 ulp): e^r * 2^n with |r| <= ln 2 / 2.
inline __m512 exp_nonpositive(__m512 x) {
  x = _mm512_max_ps(_mm512_set1_ps(-104.0f), x);  // below, exp is 0 in float32 (n stays small); NaN stays NaN
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);  // ln 2 in two parts: r stays exact
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 y = _mm512_set1_ps(1.9875691500e-4f);
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.3981999507e-3f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(8.3334519073e-3f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(4.1665795894e-2f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.6666665459e-1f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(5.0000001201e-1f));
  y = _mm512_fmadd_ps(y, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  return _mm512_scalef_ps(y, n);
}

// The exponentials 16 at a time; their total in the portable kernel's order (one after another), since
// summing them in another order changes greedy tokens near ties compared with the PyTorch path.
void softmax_avx512(float* s, int64_t group, int64_t lds, int64_t count, float scale) {
  const __m512 factor = _mm512_set1_ps(scale);
  for (int64_t g = 0; g < group; ++g, s += lds) {
    __m512 top = _mm512_set1_ps(-INFINITY);
    for (int64_t k = 0; k < count; k += 16) {
      const __mmask16 mask = lanes(count - k);
      const __m512 x = _mm512_mul_ps(_mm512_maskz_loadu_ps(mask, s + k), factor);
      _mm512_mask_storeu_ps(s + k, mask, x);
      top = _mm512_mask_max_ps(top, mask, top, x);
    }
    const __m512 shift = _mm512_set1_ps(_mm512_reduce_max_ps(top));
    for (int64_t k = 0; k < count; k += 16) {
      const __mmask16 mask = lanes(count - k);
      _mm512_mask_storeu_ps(s + k, mask, exp_nonpositive(_mm512_sub_ps(_mm512_maskz_loadu_ps(mask, s + k), shift)));
    }
    float total = 0;
    for (int64_t k = 0; k < count; ++k) total += s[k];
    const __m512 sum = _mm512_set1_ps(total);
    for (int64_t k = 0; k < count; k += 16) {
      const __mmask16 mask = lanes(count - k);
      _mm512_mask_storeu_ps(s + k, mask, _mm512_div_ps(_mm512_maskz_loadu_ps(mask, s + k), sum));
    }
  }
}
END_TARGET

constexpr DotKernels kAvx2 = {{head_by_input<rows_avx2<kF32, kHeadRows>>, head_by_input<rows_avx2<kBF16, kHeadRows>>},
                              {rows_avx2<kF32, 1>, rows_avx2<kBF16, 1>},
                              {attend_by_axpy<kF32, axpy_avx2<kF32>>, attend_by_axpy<kBF16, axpy_avx2<kBF16>>},
                              {scores_by_rows<kF32, head_by_input<rows_avx2<kF32, kHeadRows>>, rows_avx2<kF32, 1>>,
                               scores_by_rows<kBF16, head_by_input<rows_avx2<kBF16, kHeadRows>>, rows_avx2<kBF16, 1>>},
                              softmax_portable};
constexpr DotKernels kAvx512 = {{head_avx512<kF32>, head_avx512<kBF16>},
                                {rows_avx512<kF32, 1>, rows_avx512<kBF16, 1>},
                                {attend_avx512<kF32>, attend_avx512<kBF16>},
                                {scores_avx512<kF32>, scores_avx512<kBF16>},
                                softmax_avx512};
#endif

// The kernels of the instruction set in use (BITNET158_CPU_ISA / set_isa may lower it at any time).
inline const DotKernels& kernels() {
#if defined(BITNET158_X86)
  if (has_avx512(active_isa())) return kAvx512;
  if (active_isa() == Isa::kAvx2) return kAvx2;
#endif
  return kPortable;
}

inline float dot(const float* a, const void* b, DType dtype, int64_t n) {
  float out;
  kernels().single[dtype](a, b, b, 0, n, &out);
  return out;
}


inline const void* offset(const void* base, DType dtype, int64_t elements) {
  return static_cast<const char*>(base) + elements * (dtype == kF32 ? 4 : 2);
}

// ---- the decoder -------------------------------------------------------------------------------

struct Ternary {
  Style style;
  const uint8_t* weight;  // in the style's layout
  const float* scales;    // [1] or [out]
  int64_t scales_len, out, in;
};

struct Layer {
  const float *input_norm, *attn_sub_norm, *post_norm, *ffn_sub_norm;  // float32 copies
  Ternary qkv, o, gate_up, down;
};

struct Decoder {
  int64_t hidden, heads, kv_heads, head_dim, intermediate, vocab;
  float eps;
  bool relu2;
  DType embed_dtype, head_dtype;
  const void* embed;    // [vocab, hidden]
  const void* lm_head;  // [vocab, hidden]
  const float* final_norm;
  const float* inv_freq;  // [head_dim / 2]
  std::vector<Layer> layers;
  // scratch, sized for `batch` rows
  int64_t batch = 0;
  std::vector<float> x, h, qkv, attn, gate_up, act, scales, trig;
  std::vector<float> scores;  // attention scores, [query heads per key/value head, max_len] per pool thread
  std::vector<int8_t> codes;
  std::vector<int32_t> sums;
};

void ensure_batch(Decoder& d, int64_t batch, int64_t max_len) {
  const int64_t q = d.heads * d.head_dim, kv = d.kv_heads * d.head_dim;
  if (batch > d.batch) {
    d.batch = batch;
    d.x.resize(batch * d.hidden);
    d.h.resize(batch * std::max(d.hidden, q));
    d.qkv.resize(batch * (q + 2 * kv));
    d.attn.resize(batch * q);
    d.gate_up.resize(batch * 2 * d.intermediate);
    d.act.resize(batch * d.intermediate);
    d.scales.resize(batch);
    d.trig.resize(batch * d.head_dim);
    d.sums.resize(batch);
    d.codes.resize(batch * i2_padded_k(std::max(std::max(d.hidden, q), d.intermediate)));
  }
  const int64_t scores = pool().threads() * (d.heads / d.kv_heads) * max_len;
  if (static_cast<int64_t>(d.scores.size()) < scores) d.scores.resize(scores);
}

void rms_norm(const float* x, const float* weight, int64_t n, float eps, float* out) {
  const float sum = dot(x, x, kF32, n);
  const float r = 1.0f / std::sqrt(sum / static_cast<float>(n) + eps);
  for (int64_t i = 0; i < n; ++i) out[i] = weight[i] * (x[i] * r);
}

// BitLinear in two parts: each row's input is quantized (in a row phase, see `for_rows`), then one
// GEMM gives out [batch, t.out] for all rows.
void quantize_input(Decoder& d, const Ternary& t, const float* in, int64_t b) {
  const int64_t kp = i2_padded_k(t.in);
  quantize_rows(in, 1, t.in, t.in, d.codes.data() + b * kp, kp, d.scales.data() + b, d.sums.data() + b);
}

void ternary(Decoder& d, const Ternary& t, int64_t batch, float* out) {
  Epilogue e;
  e.act_scales = d.scales.data();
  e.w_scales = t.scales;
  e.per_row_scale = t.scales_len > 1;
  e.out = out;
  e.ldo = t.out;
  ternary_gemm(t.style, d.codes.data(), d.sums.data(), batch, t.in, t.weight, t.out, e);
}

struct KV {
  void* keys;
  void* values;  // [layers, rows, kv_heads, max_len, head_dim]
  DType dtype;
  int64_t rows, max_len;
};

// Where one sequence of the batch lives in the KV cache: a KVCache row of left-padded sequences, or
// a SlotCache slot with its own length.
struct Place {
  int64_t row;       // its cache row
  int64_t length;    // keys it holds: the new token's key and value go to this position
  int64_t first;     // its first visible key (past the left padding); the new key is always visible
  int64_t position;  // the new token's rotary position
};

inline int64_t kv_index(const KV& kv, const Decoder& d, int64_t layer, const Place& place, int64_t kv_head, int64_t key) {
  return (((layer * kv.rows + place.row) * d.kv_heads + kv_head) * kv.max_len + key) * d.head_dim;
}

void store_kv(void* base, DType dtype, int64_t index, const float* src, int64_t n) {
  if (dtype == kF32) {
    std::memcpy(static_cast<float*>(base) + index, src, n * 4);
  } else {
    uint16_t* dst = static_cast<uint16_t*>(base) + index;
    for (int64_t i = 0; i < n; ++i) dst[i] = f32_to_bf16(src[i]);
  }
}

// rotate x [head_dim] by angles pos * inv_freq, pairing i with i + head_dim / 2 (as apply_rotary does)
void rope(float* x, const float* cos, const float* sin, int64_t half) {
  for (int64_t i = 0; i < half; ++i) {
    const float a = x[i], b = x[i + half];
    x[i] = a * cos[i] - b * sin[i];
    x[i + half] = b * cos[i] + a * sin[i];
  }
}

// act = relu(gate)² * up, or silu(gate) * up. The relu clears negative gates through their sign bit: a
// branch on each gate's sign is mispredicted half the time, and a float comparison keeps the compiler
// from vectorizing the loop (it might trap).
void gated(const float* gate, const float* up, int64_t n, bool relu2, float* act) {
  if (relu2) {
    for (int64_t i = 0; i < n; ++i) {
      int32_t bits;
      std::memcpy(&bits, gate + i, 4);
      bits &= ~(bits >> 31);  // arithmetic shift: all ones for a negative gate
      float r;
      std::memcpy(&r, &bits, 4);
      act[i] = r * r * up[i];
    }
    return;
  }
  for (int64_t i = 0; i < n; ++i) act[i] = gate[i] / (1.0f + std::exp(-gate[i])) * up[i];
}

struct AttentionJob {
  Decoder* d;
  const KV* kv;
  int64_t layer, batch;
  const Place* places;
};

// Tasks [begin, end) of the batch's (row, key/value head) pairs. The query heads that share a key/value
// head go together: their keys stay in cache while the group's scores are taken, and each value is read
// once for all of them. Every score and output is summed in the order of a head on its own.
void attention_rows(void* p, int64_t begin, int64_t end, int thread) {
  auto& j = *static_cast<AttentionJob*>(p);
  Decoder& d = *j.d;
  const DotKernels& k = kernels();
  const DType dtype = j.kv->dtype;
  const int64_t q_size = d.heads * d.head_dim, kv_size = d.kv_heads * d.head_dim, qkv_size = q_size + 2 * kv_size;
  const int64_t group = d.heads / d.kv_heads, hd = d.head_dim, max_len = j.kv->max_len;
  const float scale = 1.0f / std::sqrt(static_cast<float>(hd));
  float* scores = d.scores.data() + thread * group * max_len;  // [group, max_len]
  for (int64_t task = begin; task < end; ++task) {
    const int64_t b = task / d.kv_heads, kv_head = task % d.kv_heads;
    const Place& place = j.places[b];
    const float* q = d.qkv.data() + b * qkv_size + kv_head * group * hd;  // the group's query heads
    const int64_t base = kv_index(*j.kv, d, j.layer, place, kv_head, 0);
    // Visible: the sequence's own keys from its first real token up to the new one (a pad query sees itself).
    const int64_t count = place.length + 1 - place.first;
    k.scores[dtype](q, group, offset(j.kv->keys, dtype, base + place.first * hd), count, hd, scores + place.first,
                    max_len);
    k.softmax(scores + place.first, group, max_len, count, scale);
    float* out = d.attn.data() + b * q_size + kv_head * group * hd;
    std::fill(out, out + group * hd, 0.0f);
    k.attend[dtype](scores + place.first, max_len, group, offset(j.kv->values, dtype, base + place.first * hd),
                    count, hd, out);
  }
}

struct HeadJob {
  const Decoder* d;
  int64_t batch;
  const float* x;  // [batch, hidden], normed
  float* logits;   // [batch, vocab]
};

// A chunk [begin, end) of vocabulary rows (begin a multiple of kHeadRows), kHeadRows at a time (the
// rest one by one): every group is multiplied by all `batch` inputs while its rows are in cache.
void lm_head_rows(void* p, int64_t begin, int64_t end, int) {
  auto& j = *static_cast<HeadJob*>(p);
  const Decoder& d = *j.d;
  const DotKernels& k = kernels();
  const HeadFn head = k.head[d.head_dtype];
  const RowsFn single = k.single[d.head_dtype];
  int64_t v = begin;
  for (; v + kHeadRows <= end; v += kHeadRows) {
    const void* group = offset(d.lm_head, d.head_dtype, v * d.hidden);
    // prefetch the next group, or this one again on the last pass (never past the chunk)
    const void* ahead = v + 2 * kHeadRows <= end ? offset(group, d.head_dtype, kHeadRows * d.hidden) : group;
    head(j.x, j.batch, d.hidden, group, ahead, d.hidden, d.hidden, j.logits + v, d.vocab);
  }
  for (; v < end; ++v) {
    const void* row = offset(d.lm_head, d.head_dtype, v * d.hidden);
    for (int64_t b = 0; b < j.batch; ++b) single(j.x + b * d.hidden, row, row, 0, d.hidden, j.logits + b * d.vocab + v);
  }
}

// A chunk size for `count` items: about 8 chunks per thread (so that a thread the OS does not run
// leaves little to the others), a multiple of `unit`.
int64_t grain(int64_t count, int64_t unit) {
  const int64_t chunks = 8 * pool().threads(), size = (count + chunks - 1) / chunks;
  return std::max(unit, (size + unit - 1) / unit * unit);
}

void lm_head(const Decoder& d, const float* x, int64_t batch, float* logits) {
  HeadJob head{&d, batch, x, logits};
  pool().parallel_for(d.vocab, grain(d.vocab, kHeadRows), lm_head_rows, &head);
}

// fn(b) for every row b of the batch, spread over the pool's threads (in one piece for small batches):
// the per-row work between the GEMMs (norms, quantization, RoPE, the gate), which depends on no other row.
template <typename Fn>
void for_rows(int64_t batch, const Fn& fn) {
  pool().parallel_for(
      batch, grain(batch, 4),
      [](void* p, int64_t begin, int64_t end, int) {
        for (int64_t b = begin; b < end; ++b) (*static_cast<const Fn*>(p))(b);
      },
      const_cast<Fn*>(&fn));
}

// Logits [n_out, vocab] for the rows `outputs` (every row if null) of the batch.
void step(Decoder& d, const int64_t* ids, int64_t batch, const Place* places, const KV& kv, const int64_t* outputs,
          int64_t n_out, float* logits) {
  ensure_batch(d, batch, kv.max_len);
  const int64_t D = d.hidden, hd = d.head_dim, half = hd / 2;
  const int64_t q_size = d.heads * hd, kv_size = d.kv_heads * hd, qkv_size = q_size + 2 * kv_size;
  const int64_t I = d.intermediate;
  float* x = d.x.data();
  float* h = d.h.data();
  float* cos_ = d.trig.data();
  float* sin_ = d.trig.data() + batch * half;
  int64_t keys = 0;  // keys the attention reads, to decide whether it is worth the threads
  for (int64_t b = 0; b < batch; ++b) keys += places[b].length + 1 - places[b].first;
  // The embedding and the cos/sin of each row's position.
  for_rows(batch, [&](int64_t b) {
    const void* row = offset(d.embed, d.embed_dtype, ids[b] * D);
    for (int64_t i = 0; i < D; ++i)
      x[b * D + i] = d.embed_dtype == kF32 ? static_cast<const float*>(row)[i] : bf16_to_f32(static_cast<const uint16_t*>(row)[i]);
    const float pos = static_cast<float>(places[b].position);
    for (int64_t i = 0; i < half; ++i) {
      const float angle = pos * d.inv_freq[i];
      cos_[b * half + i] = std::cos(angle);
      sin_[b * half + i] = std::sin(angle);
    }
  });

  const int64_t layers = static_cast<int64_t>(d.layers.size());
  for (int64_t l = 0; l < layers; ++l) {
    const Layer& layer = d.layers[l];
    for_rows(batch, [&](int64_t b) {
      if (l > 0)
        for (int64_t i = 0; i < D; ++i) x[b * D + i] += d.attn[b * D + i];  // the previous layer's down_proj
      rms_norm(x + b * D, layer.input_norm, D, d.eps, h + b * D);
      quantize_input(d, layer.qkv, h + b * D, b);
    });
    ternary(d, layer.qkv, batch, d.qkv.data());
    for_rows(batch, [&](int64_t b) {
      float* row = d.qkv.data() + b * qkv_size;
      for (int64_t head = 0; head < d.heads + d.kv_heads; ++head) rope(row + head * hd, cos_ + b * half, sin_ + b * half, half);
      for (int64_t g = 0; g < d.kv_heads; ++g) {
        const int64_t index = kv_index(kv, d, l, places[b], g, places[b].length);
        store_kv(kv.keys, kv.dtype, index, row + q_size + g * hd, hd);
        store_kv(kv.values, kv.dtype, index, row + q_size + kv_size + g * hd, hd);
      }
    });
    AttentionJob job{&d, &kv, l, batch, places};
    if (keys * d.heads * hd > 1 << 16)
      pool().parallel_for(batch * d.kv_heads, grain(batch * d.kv_heads, 1), attention_rows, &job);
    else
      attention_rows(&job, 0, batch * d.kv_heads, 0);
    for_rows(batch, [&](int64_t b) {
      rms_norm(d.attn.data() + b * q_size, layer.attn_sub_norm, q_size, d.eps, h + b * q_size);
      quantize_input(d, layer.o, h + b * q_size, b);
    });
    ternary(d, layer.o, batch, d.attn.data());  // attn is free again: o_proj's output

    for_rows(batch, [&](int64_t b) {
      for (int64_t i = 0; i < D; ++i) x[b * D + i] += d.attn[b * D + i];
      rms_norm(x + b * D, layer.post_norm, D, d.eps, h + b * D);
      quantize_input(d, layer.gate_up, h + b * D, b);
    });
    ternary(d, layer.gate_up, batch, d.gate_up.data());
    for_rows(batch, [&](int64_t b) {
      const float* gate = d.gate_up.data() + b * 2 * I;
      const float* up = gate + I;
      float* act = d.act.data() + b * I;
      gated(gate, up, I, d.relu2, act);
      rms_norm(act, layer.ffn_sub_norm, I, d.eps, act);
      quantize_input(d, layer.down, act, b);
    });
    ternary(d, layer.down, batch, d.attn.data());
  }
  for_rows(n_out, [&](int64_t i) {
    const int64_t b = outputs ? outputs[i] : i;
    float* row = h + i * D;
    for (int64_t k = 0; k < D; ++k) row[k] = layers > 0 ? x[b * D + k] + d.attn[b * D + k] : x[b * D + k];
    rms_norm(row, d.final_norm, D, d.eps, row);
  });
  lm_head(d, h, n_out, logits);
}

template <typename T>
T* ptr(long long address) {
  return reinterpret_cast<T*>(static_cast<uintptr_t>(address));
}

bool parse_ternary(PyObject* item, Ternary* t) {
  int style;
  long long weight, scales;
  if (!PyArg_ParseTuple(item, "iLLLLL", &style, &weight, &scales, &t->scales_len, &t->out, &t->in)) return false;
  t->style = static_cast<Style>(style);
  t->weight = ptr<const uint8_t>(weight);
  t->scales = ptr<const float>(scales);
  return true;
}

void destroy(PyObject* capsule) { delete static_cast<Decoder*>(PyCapsule_GetPointer(capsule, "bitnet158.Decoder")); }

}  // namespace
}  // namespace bitnet158

using namespace bitnet158;

// decoder_new((hidden, heads, kv_heads, head_dim, intermediate, vocab, eps, relu2, embed_dtype, head_dtype),
//             (embed, lm_head, final_norm, inv_freq),
//             [((input_norm, attn_sub_norm, post_norm, ffn_sub_norm), qkv, o, gate_up, down), ...])
// where each ternary is (style, weight, scales, scales_len, out, in); all pointers as ints.
PyObject* py_decoder_new(PyObject*, PyObject* args) {
  PyObject *config, *globals, *layers;
  if (!PyArg_ParseTuple(args, "OOO!", &config, &globals, &PyList_Type, &layers)) return nullptr;
  auto d = std::make_unique<Decoder>();
  int relu2, embed_dtype, head_dtype;
  long long embed, lm_head, final_norm, inv_freq;
  if (!PyArg_ParseTuple(config, "LLLLLLfpii", &d->hidden, &d->heads, &d->kv_heads, &d->head_dim, &d->intermediate,
                        &d->vocab, &d->eps, &relu2, &embed_dtype, &head_dtype) ||
      !PyArg_ParseTuple(globals, "LLLL", &embed, &lm_head, &final_norm, &inv_freq))
    return nullptr;
  d->relu2 = relu2;
  d->embed_dtype = static_cast<DType>(embed_dtype);
  d->head_dtype = static_cast<DType>(head_dtype);
  d->embed = ptr<const void>(embed);
  d->lm_head = ptr<const void>(lm_head);
  d->final_norm = ptr<const float>(final_norm);
  d->inv_freq = ptr<const float>(inv_freq);
  for (Py_ssize_t i = 0; i < PyList_GET_SIZE(layers); ++i) {
    PyObject *norms, *qkv, *o, *gate_up, *down;
    long long n0, n1, n2, n3;
    Layer layer;
    if (!PyArg_ParseTuple(PyList_GET_ITEM(layers, i), "OOOOO", &norms, &qkv, &o, &gate_up, &down) ||
        !PyArg_ParseTuple(norms, "LLLL", &n0, &n1, &n2, &n3) || !parse_ternary(qkv, &layer.qkv) ||
        !parse_ternary(o, &layer.o) || !parse_ternary(gate_up, &layer.gate_up) || !parse_ternary(down, &layer.down))
      return nullptr;
    layer.input_norm = ptr<const float>(n0);
    layer.attn_sub_norm = ptr<const float>(n1);
    layer.post_norm = ptr<const float>(n2);
    layer.ffn_sub_norm = ptr<const float>(n3);
    d->layers.push_back(layer);
  }
  return PyCapsule_New(d.release(), "bitnet158.Decoder", destroy);
}

// decoder_lm_head(decoder, x, batch, logits): logits [batch, vocab] = x [batch, hidden] times the lm_head,
// the last part of a step on its own (benchmarks time it, tests check its kernels).
PyObject* py_decoder_lm_head(PyObject*, PyObject* args) {
  PyObject* capsule;
  long long x, batch, logits;
  if (!PyArg_ParseTuple(args, "OLLL", &capsule, &x, &batch, &logits)) return nullptr;
  auto* d = static_cast<Decoder*>(PyCapsule_GetPointer(capsule, "bitnet158.Decoder"));
  if (d == nullptr) return nullptr;
  Py_BEGIN_ALLOW_THREADS {
    std::lock_guard<std::mutex> lock(kernel_lock());
    lm_head(*d, ptr<const float>(x), batch, ptr<float>(logits));
  }
  Py_END_ALLOW_THREADS Py_RETURN_NONE;
}

// decoder_step(decoder, ids, batch, places, keys, values, kv_dtype, kv_rows, max_len, outputs, n_out, logits):
// one new token per row; places is int64 [batch, 4]: each row's cache row, keys held (its token's
// position), first visible key and rotary position. Rows may share a cache row at consecutive
// positions (a prompt chunk): every row's key and value are stored before any row attends. Logits
// [n_out, vocab] for the rows listed in outputs (int64 [n_out]; 0 for every row, n_out = batch).
PyObject* py_decoder_step(PyObject*, PyObject* args) {
  PyObject* capsule;
  long long ids, batch, places, keys, values, kv_rows, max_len, outputs, n_out, logits;
  int kv_dtype;
  if (!PyArg_ParseTuple(args, "OLLLLLiLLLLL", &capsule, &ids, &batch, &places, &keys, &values, &kv_dtype, &kv_rows,
                        &max_len, &outputs, &n_out, &logits))
    return nullptr;
  auto* d = static_cast<Decoder*>(PyCapsule_GetPointer(capsule, "bitnet158.Decoder"));
  if (d == nullptr) return nullptr;
  const int64_t* tokens = ptr<const int64_t>(ids);
  for (long long b = 0; b < batch; ++b)
    if (tokens[b] < 0 || tokens[b] >= d->vocab)
      return PyErr_Format(PyExc_IndexError, "token id %lld is outside the vocabulary of %lld", static_cast<long long>(tokens[b]),
                          static_cast<long long>(d->vocab));
  const Place* rows = ptr<const Place>(places);
  for (long long b = 0; b < batch; ++b) {
    const Place& p = rows[b];
    if (p.row < 0 || p.row >= kv_rows || p.length < 0 || p.length >= max_len || p.first < 0 || p.first > p.length ||
        p.position < 0)
      return PyErr_Format(PyExc_ValueError, "sequence %lld: row %lld, length %lld, first key %lld, position %lld do "
                          "not fit a KV cache of %lld rows of %lld", b, static_cast<long long>(p.row),
                          static_cast<long long>(p.length), static_cast<long long>(p.first),
                          static_cast<long long>(p.position), kv_rows, max_len);
  }
  const int64_t* wanted = ptr<const int64_t>(outputs);
  if (!wanted && n_out != batch) return PyErr_Format(PyExc_ValueError, "%lld outputs of %lld rows", n_out, batch);
  for (long long i = 0; wanted && i < n_out; ++i)
    if (wanted[i] < 0 || wanted[i] >= batch)
      return PyErr_Format(PyExc_IndexError, "output row %lld of %lld rows", static_cast<long long>(wanted[i]), batch);
  KV kv{ptr<void>(keys), ptr<void>(values), static_cast<DType>(kv_dtype), kv_rows, max_len};
  Py_BEGIN_ALLOW_THREADS {
    std::lock_guard<std::mutex> lock(kernel_lock());
    step(*d, ptr<const int64_t>(ids), batch, rows, kv, wanted, n_out, ptr<float>(logits));
  }
  Py_END_ALLOW_THREADS Py_RETURN_NONE;
}
