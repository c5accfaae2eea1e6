// The decode step: embedding, then per layer RMSNorm -> fused qkv (ternary) -> RoPE -> attention over
// the KV cache -> sub-norm -> o_proj (ternary) -> residual -> RMSNorm -> fused gate/up (ternary) ->
// relu² or SiLU gate -> sub-norm -> down (ternary) -> residual; final RMSNorm and the lm_head.
// It computes what bitnet158.model.bitnet computes, with activations in float32 whatever the model's
// dtype (embeddings, lm_head and the KV cache may be bfloat16). Scratch buffers live in the decoder
// and are sized on the first step: later steps allocate nothing.
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

float dot_portable(const float* a, const void* b, DType dtype, int64_t n) {
  float partial[8] = {0};
  int64_t i = 0;
  if (dtype == kF32) {
    const float* f = static_cast<const float*>(b);
    for (; i + 8 <= n; i += 8)
      for (int j = 0; j < 8; ++j) partial[j] += a[i + j] * f[i + j];
    for (; i < n; ++i) partial[0] += a[i] * f[i];
  } else {
    const uint16_t* h = static_cast<const uint16_t*>(b);
    for (; i + 8 <= n; i += 8)
      for (int j = 0; j < 8; ++j) partial[j] += a[i + j] * bf16_to_f32(h[i + j]);
    for (; i < n; ++i) partial[0] += a[i] * bf16_to_f32(h[i]);
  }
  float total = 0;
  for (float p : partial) total += p;
  return total;
}

void axpy_portable(float alpha, const void* x, DType dtype, float* y, int64_t n) {
  if (dtype == kF32) {
    const float* f = static_cast<const float*>(x);
    for (int64_t i = 0; i < n; ++i) y[i] += alpha * f[i];
  } else {
    const uint16_t* h = static_cast<const uint16_t*>(x);
    for (int64_t i = 0; i < n; ++i) y[i] += alpha * bf16_to_f32(h[i]);
  }
}

#if defined(BITNET158_X86)
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#endif
inline __m256 load8(const void* b, DType dtype, int64_t i) {
  if (dtype == kF32) return _mm256_loadu_ps(static_cast<const float*>(b) + i);
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(b) + i));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

float dot_avx2(const float* a, const void* b, DType dtype, int64_t n) {
  __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
  int64_t i = 0;
  for (; i + 32 <= n; i += 32)
    for (int j = 0; j < 4; ++j) acc[j] = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8 * j), load8(b, dtype, i + 8 * j), acc[j]);
  for (; i + 8 <= n; i += 8) acc[0] = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), load8(b, dtype, i), acc[0]);
  __m256 s = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
  __m128 q = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
  q = _mm_add_ps(q, _mm_movehl_ps(q, q));
  q = _mm_add_ss(q, _mm_movehdup_ps(q));
  float total = _mm_cvtss_f32(q);
  for (; i < n; ++i)
    total += a[i] * (dtype == kF32 ? static_cast<const float*>(b)[i] : bf16_to_f32(static_cast<const uint16_t*>(b)[i]));
  return total;
}

void axpy_avx2(float alpha, const void* x, DType dtype, float* y, int64_t n) {
  const __m256 va = _mm256_set1_ps(alpha);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(y + i, _mm256_fmadd_ps(va, load8(x, dtype, i), _mm256_loadu_ps(y + i)));
  for (; i < n; ++i)
    y[i] += alpha * (dtype == kF32 ? static_cast<const float*>(x)[i] : bf16_to_f32(static_cast<const uint16_t*>(x)[i]));
}
#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif
#endif

inline bool simd() { return active_isa() == Isa::kAvx2 || active_isa() == Isa::kAvx512; }

inline float dot(const float* a, const void* b, DType dtype, int64_t n) {
#if defined(BITNET158_X86)
  if (simd()) return dot_avx2(a, b, dtype, n);
#endif
  return dot_portable(a, b, dtype, n);
}

inline void axpy(float alpha, const void* x, DType dtype, float* y, int64_t n) {
#if defined(BITNET158_X86)
  if (simd()) return axpy_avx2(alpha, x, dtype, y, n);
#endif
  axpy_portable(alpha, x, dtype, y, n);
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
  std::vector<float> x, h, qkv, attn, gate_up, act, scores, scales, trig;
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
  if (static_cast<int64_t>(d.scores.size()) < batch * d.heads * max_len) d.scores.resize(batch * d.heads * max_len);
}

void rms_norm(const float* x, const float* weight, int64_t n, float eps, float* out) {
  float sum = 0;
  for (int64_t i = 0; i < n; ++i) sum += x[i] * x[i];
  const float r = 1.0f / std::sqrt(sum / static_cast<float>(n) + eps);
  for (int64_t i = 0; i < n; ++i) out[i] = weight[i] * (x[i] * r);
}

// out [batch, t.out] (row stride ldo) = BitLinear(in [batch, t.in], row stride ldi)
void ternary(Decoder& d, const Ternary& t, const float* in, int64_t ldi, int64_t batch, float* out) {
  const int64_t kp = i2_padded_k(t.in);
  quantize_rows(in, batch, t.in, ldi, d.codes.data(), kp, d.scales.data(), d.sums.data());
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
  void* values;  // [layers, batch, kv_heads, max_len, head_dim]
  DType dtype;
  int64_t max_len;
};

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

struct AttentionJob {
  Decoder* d;
  const KV* kv;
  int64_t layer, batch, length;  // `length` is the new token's slot
  const int64_t* padding;
};

void attention_rows(void* p, int t, int nt) {
  auto& j = *static_cast<AttentionJob*>(p);
  Decoder& d = *j.d;
  const int64_t q_size = d.heads * d.head_dim, kv_size = d.kv_heads * d.head_dim, qkv_size = q_size + 2 * kv_size;
  const int64_t group = d.heads / d.kv_heads, hd = d.head_dim, tasks = j.batch * d.heads;
  const float scale = 1.0f / std::sqrt(static_cast<float>(hd));
  for (int64_t task = tasks * t / nt; task < tasks * (t + 1) / nt; ++task) {
    const int64_t b = task / d.heads, head = task % d.heads, kv_head = head / group;
    const float* q = d.qkv.data() + b * qkv_size + head * hd;
    const int64_t cache_row = ((j.layer * j.batch + b) * d.kv_heads + kv_head) * j.kv->max_len;
    // Visible: the sequence's own slots from its first real token up to the new one (a pad query sees itself).
    const int64_t first = std::min<int64_t>(std::max<int64_t>(j.padding[b], 0), j.length);
    float* scores = d.scores.data() + task * j.kv->max_len;
    float top = -INFINITY;
    for (int64_t slot = first; slot <= j.length; ++slot) {
      scores[slot] = dot(q, offset(j.kv->keys, j.kv->dtype, (cache_row + slot) * hd), j.kv->dtype, hd) * scale;
      top = std::max(top, scores[slot]);
    }
    float total = 0;
    for (int64_t slot = first; slot <= j.length; ++slot) total += scores[slot] = std::exp(scores[slot] - top);
    float* out = d.attn.data() + b * q_size + head * hd;
    std::fill(out, out + hd, 0.0f);
    for (int64_t slot = first; slot <= j.length; ++slot)
      axpy(scores[slot] / total, offset(j.kv->values, j.kv->dtype, (cache_row + slot) * hd), j.kv->dtype, out, hd);
  }
}

struct HeadJob {
  const Decoder* d;
  int64_t batch;
  const float* x;  // [batch, hidden], normed
  float* logits;   // [batch, vocab]
};

void lm_head_rows(void* p, int t, int nt) {
  auto& j = *static_cast<HeadJob*>(p);
  const Decoder& d = *j.d;
  for (int64_t v = d.vocab * t / nt; v < d.vocab * (t + 1) / nt; ++v) {
    const void* row = offset(d.lm_head, d.head_dtype, v * d.hidden);
    for (int64_t b = 0; b < j.batch; ++b) j.logits[b * d.vocab + v] = dot(j.x + b * d.hidden, row, d.head_dtype, d.hidden);
  }
}

void step(Decoder& d, const int64_t* ids, int64_t batch, int64_t length, const int64_t* padding, const KV& kv,
          float* logits) {
  ensure_batch(d, batch, kv.max_len);
  const int64_t D = d.hidden, hd = d.head_dim, half = hd / 2;
  const int64_t q_size = d.heads * hd, kv_size = d.kv_heads * hd, qkv_size = q_size + 2 * kv_size;
  const int64_t I = d.intermediate;
  float* x = d.x.data();
  float* h = d.h.data();
  for (int64_t b = 0; b < batch; ++b) {
    const void* row = offset(d.embed, d.embed_dtype, ids[b] * D);
    for (int64_t i = 0; i < D; ++i)
      x[b * D + i] = d.embed_dtype == kF32 ? static_cast<const float*>(row)[i] : bf16_to_f32(static_cast<const uint16_t*>(row)[i]);
  }
  // cos/sin of each row's position (slot minus left padding)
  float* cos_ = d.trig.data();
  float* sin_ = d.trig.data() + batch * half;
  for (int64_t b = 0; b < batch; ++b) {
    const float pos = static_cast<float>(std::max<int64_t>(length - padding[b], 0));
    for (int64_t i = 0; i < half; ++i) {
      const float angle = pos * d.inv_freq[i];
      cos_[b * half + i] = std::cos(angle);
      sin_[b * half + i] = std::sin(angle);
    }
  }

  for (int64_t l = 0; l < static_cast<int64_t>(d.layers.size()); ++l) {
    const Layer& layer = d.layers[l];
    for (int64_t b = 0; b < batch; ++b) rms_norm(x + b * D, layer.input_norm, D, d.eps, h + b * D);
    ternary(d, layer.qkv, h, D, batch, d.qkv.data());
    for (int64_t b = 0; b < batch; ++b) {
      float* row = d.qkv.data() + b * qkv_size;
      for (int64_t head = 0; head < d.heads + d.kv_heads; ++head) rope(row + head * hd, cos_ + b * half, sin_ + b * half, half);
      for (int64_t g = 0; g < d.kv_heads; ++g) {
        const int64_t index = (((l * batch + b) * d.kv_heads + g) * kv.max_len + length) * hd;
        store_kv(kv.keys, kv.dtype, index, row + q_size + g * hd, hd);
        store_kv(kv.values, kv.dtype, index, row + q_size + kv_size + g * hd, hd);
      }
    }
    AttentionJob job{&d, &kv, l, batch, length, padding};
    if (batch * d.heads * (length + 1) * hd > 1 << 16)
      pool().run(attention_rows, &job);
    else
      attention_rows(&job, 0, 1);
    for (int64_t b = 0; b < batch; ++b) rms_norm(d.attn.data() + b * q_size, layer.attn_sub_norm, q_size, d.eps, h + b * q_size);
    ternary(d, layer.o, h, q_size, batch, d.attn.data());  // attn is free again: o_proj's output
    for (int64_t i = 0; i < batch * D; ++i) x[i] += d.attn[i];

    for (int64_t b = 0; b < batch; ++b) rms_norm(x + b * D, layer.post_norm, D, d.eps, h + b * D);
    ternary(d, layer.gate_up, h, D, batch, d.gate_up.data());
    for (int64_t b = 0; b < batch; ++b) {
      const float* gate = d.gate_up.data() + b * 2 * I;
      const float* up = gate + I;
      float* act = d.act.data() + b * I;
      for (int64_t i = 0; i < I; ++i) {
        const float g = gate[i];
        const float a = d.relu2 ? (g > 0 ? g * g : 0.0f) : g / (1.0f + std::exp(-g));
        act[i] = a * up[i];
      }
      rms_norm(act, layer.ffn_sub_norm, I, d.eps, act);
    }
    ternary(d, layer.down, d.act.data(), I, batch, d.attn.data());
    for (int64_t i = 0; i < batch * D; ++i) x[i] += d.attn[i];
  }
  for (int64_t b = 0; b < batch; ++b) rms_norm(x + b * D, d.final_norm, D, d.eps, h + b * D);
  HeadJob head{&d, batch, h, logits};
  pool().run(lm_head_rows, &head);
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

// decoder_step(decoder, ids, batch, length, padding, keys, values, kv_dtype, max_len, logits)
PyObject* py_decoder_step(PyObject*, PyObject* args) {
  PyObject* capsule;
  long long ids, batch, length, padding, keys, values, max_len, logits;
  int kv_dtype;
  if (!PyArg_ParseTuple(args, "OLLLLLLiLL", &capsule, &ids, &batch, &length, &padding, &keys, &values, &kv_dtype,
                        &max_len, &logits))
    return nullptr;
  auto* d = static_cast<Decoder*>(PyCapsule_GetPointer(capsule, "bitnet158.Decoder"));
  if (d == nullptr) return nullptr;
  const int64_t* tokens = ptr<const int64_t>(ids);
  for (long long b = 0; b < batch; ++b)
    if (tokens[b] < 0 || tokens[b] >= d->vocab)
      return PyErr_Format(PyExc_IndexError, "token id %lld is outside the vocabulary of %lld", static_cast<long long>(tokens[b]),
                          static_cast<long long>(d->vocab));
  if (length < 0 || length >= max_len)
    return PyErr_Format(PyExc_ValueError, "slot %lld is outside a KV cache of %lld", length, max_len);
  KV kv{ptr<void>(keys), ptr<void>(values), static_cast<DType>(kv_dtype), max_len};
  Py_BEGIN_ALLOW_THREADS {
    std::lock_guard<std::mutex> lock(kernel_lock());
    step(*d, ptr<const int64_t>(ids), batch, length, ptr<const int64_t>(padding), kv, ptr<float>(logits));
  }
  Py_END_ALLOW_THREADS Py_RETURN_NONE;
}
