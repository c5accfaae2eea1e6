// Python bindings (plain CPython API, so building needs no extra package). Tensors cross as data
// pointers (Python ints) that bitnet158/kernels/cpu.py takes from contiguous CPU tensors.
//
// Every compute entry point releases the GIL and then holds g_lock: the kernels share one thread
// pool and reuse scratch buffers, so calls from several Python threads take turns.
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <cstring>
#include <mutex>
#include <vector>

#include "decode.h"
#include "kernels.h"
#include "threadpool.h"

using namespace bitnet158;

static std::mutex g_lock;

namespace bitnet158 {
std::mutex& kernel_lock() { return g_lock; }
}  // namespace bitnet158
static std::vector<int8_t> g_codes;
static std::vector<float> g_scales;
static std::vector<int32_t> g_sums;

template <typename T>
static T* ptr(long long address) {
  return reinterpret_cast<T*>(static_cast<uintptr_t>(address));
}

static bool parse_style(int value, Style* style) {
  if (value < 0 || value > 2) {
    PyErr_Format(PyExc_ValueError, "style must be 0 (i2), 1 (lut) or 2 (tiled), not %d", value);
    return false;
  }
  *style = static_cast<Style>(value);
  return true;
}

static PyObject* py_isa(PyObject*, PyObject*) { return PyUnicode_FromString(isa_name(active_isa())); }
static PyObject* py_detected_isa(PyObject*, PyObject*) { return PyUnicode_FromString(isa_name(detected_isa())); }

static PyObject* py_set_isa(PyObject*, PyObject* args) {
  const char* name;
  if (!PyArg_ParseTuple(args, "s", &name)) return nullptr;
  for (Isa isa : {Isa::kPortable, Isa::kAvx2, Isa::kAvx512, Isa::kAmx, Isa::kNeon})
    if (std::strcmp(name, isa_name(isa)) == 0) {
      std::lock_guard<std::mutex> lock(g_lock);
      return PyUnicode_FromString(isa_name(set_isa(isa)));
    }
  return PyErr_Format(PyExc_ValueError, "unknown instruction set %s (portable, avx2, avx512-vnni, avx512-amx, neon)", name);
}

static PyObject* py_threads(PyObject*, PyObject*) { return PyLong_FromLong(pool().threads()); }

static PyObject* py_set_threads(PyObject*, PyObject* args) {
  int threads;
  if (!PyArg_ParseTuple(args, "i", &threads)) return nullptr;
  if (threads < 1) return PyErr_Format(PyExc_ValueError, "threads must be at least 1, not %d", threads);
  Py_BEGIN_ALLOW_THREADS {
    std::lock_guard<std::mutex> lock(g_lock);
    pool().set_threads(threads);
  }
  Py_END_ALLOW_THREADS Py_RETURN_NONE;
}

static PyObject* py_layout_bytes(PyObject*, PyObject* args) {
  int style_value;
  long long n, k;
  Style style;
  if (!PyArg_ParseTuple(args, "iLL", &style_value, &n, &k) || !parse_style(style_value, &style)) return nullptr;
  switch (style) {
    case Style::kI2: return PyLong_FromLongLong(i2_bytes(n, k));
    case Style::kLut: return PyLong_FromLongLong(lut_bytes(n, k));
    default: return PyLong_FromLongLong(tiled_bytes(n, k));
  }
}

static PyObject* py_padded_k(PyObject*, PyObject* args) {
  long long k;
  if (!PyArg_ParseTuple(args, "L", &k)) return nullptr;
  return PyLong_FromLongLong(i2_padded_k(k));
}

static PyObject* py_repack(PyObject*, PyObject* args) {
  int style_value;
  long long src, n, k, dst;
  Style style;
  if (!PyArg_ParseTuple(args, "iLLLL", &style_value, &src, &n, &k, &dst) || !parse_style(style_value, &style))
    return nullptr;
  Py_BEGIN_ALLOW_THREADS {
    std::lock_guard<std::mutex> lock(g_lock);
    const auto repack = style == Style::kI2 ? repack_i2 : style == Style::kLut ? repack_lut : repack_tiled;
    repack(ptr<const uint8_t>(src), n, k, ptr<uint8_t>(dst));
  }
  Py_END_ALLOW_THREADS Py_RETURN_NONE;
}

static PyObject* py_quantize(PyObject*, PyObject* args) {
  long long x, m, k, ldx, codes, kp, scales, sums;
  if (!PyArg_ParseTuple(args, "LLLLLLLL", &x, &m, &k, &ldx, &codes, &kp, &scales, &sums)) return nullptr;
  Py_BEGIN_ALLOW_THREADS {
    std::lock_guard<std::mutex> lock(g_lock);
    quantize_rows(ptr<const float>(x), m, k, ldx, ptr<int8_t>(codes), kp, ptr<float>(scales), ptr<int32_t>(sums));
  }
  Py_END_ALLOW_THREADS Py_RETURN_NONE;
}

// gemm(style, codes, sums, act_scales, m, k, w, n, w_scales, w_scales_len, bias, out, out_i32, ldo)
static PyObject* py_gemm(PyObject*, PyObject* args) {
  int style_value;
  long long codes, sums, act_scales, m, k, w, n, w_scales, w_scales_len, bias, out, out_i32, ldo;
  Style style;
  if (!PyArg_ParseTuple(args, "iLLLLLLLLLLLLL", &style_value, &codes, &sums, &act_scales, &m, &k, &w, &n, &w_scales,
                        &w_scales_len, &bias, &out, &out_i32, &ldo) ||
      !parse_style(style_value, &style))
    return nullptr;
  Epilogue e;
  e.act_scales = ptr<const float>(act_scales);
  e.w_scales = ptr<const float>(w_scales);
  e.per_row_scale = w_scales_len > 1;
  e.bias = ptr<const float>(bias);
  e.out = ptr<float>(out);
  e.out_i32 = ptr<int32_t>(out_i32);
  e.ldo = ldo;
  Py_BEGIN_ALLOW_THREADS {
    std::lock_guard<std::mutex> lock(g_lock);
    ternary_gemm(style, ptr<const int8_t>(codes), ptr<const int32_t>(sums), m, k, ptr<const uint8_t>(w), n, e);
  }
  Py_END_ALLOW_THREADS Py_RETURN_NONE;
}

// linear(style, x, m, k, w, n, w_scales, w_scales_len, bias, out): quantize x [m, k] and multiply, in one call.
static PyObject* py_linear(PyObject*, PyObject* args) {
  int style_value;
  long long x, m, k, w, n, w_scales, w_scales_len, bias, out;
  Style style;
  if (!PyArg_ParseTuple(args, "iLLLLLLLLL", &style_value, &x, &m, &k, &w, &n, &w_scales, &w_scales_len, &bias, &out) ||
      !parse_style(style_value, &style))
    return nullptr;
  Epilogue e;
  e.w_scales = ptr<const float>(w_scales);
  e.per_row_scale = w_scales_len > 1;
  e.bias = ptr<const float>(bias);
  e.out = ptr<float>(out);
  e.ldo = n;
  Py_BEGIN_ALLOW_THREADS {
    std::lock_guard<std::mutex> lock(g_lock);
    const int64_t kp = i2_padded_k(k);
    if (g_codes.size() < static_cast<size_t>(m * kp)) g_codes.resize(m * kp);
    if (g_scales.size() < static_cast<size_t>(m)) {
      g_scales.resize(m);
      g_sums.resize(m);
    }
    quantize_rows(ptr<const float>(x), m, k, k, g_codes.data(), kp, g_scales.data(), g_sums.data());
    e.act_scales = g_scales.data();
    ternary_gemm(style, g_codes.data(), g_sums.data(), m, k, ptr<const uint8_t>(w), n, e);
  }
  Py_END_ALLOW_THREADS Py_RETURN_NONE;
}

static PyMethodDef kMethods[] = {
    {"isa", py_isa, METH_NOARGS, "The instruction set in use."},
    {"detected_isa", py_detected_isa, METH_NOARGS, "The best instruction set this CPU has."},
    {"set_isa", py_set_isa, METH_VARARGS, "Use an instruction set (capped at the detected one); returns it."},
    {"threads", py_threads, METH_NOARGS, "Threads of the kernel thread pool."},
    {"set_threads", py_set_threads, METH_VARARGS, "Resize the kernel thread pool."},
    {"layout_bytes", py_layout_bytes, METH_VARARGS, "Bytes of an [n, k] weight in a style's layout."},
    {"padded_k", py_padded_k, METH_VARARGS, "Row length of the activation codes for k inputs."},
    {"repack", py_repack, METH_VARARGS, "Repack transformers-layout weights into a style's layout."},
    {"quantize", py_quantize, METH_VARARGS, "Per-row int8 absmax quantization."},
    {"gemm", py_gemm, METH_VARARGS, "Ternary GEMM on quantized activations."},
    {"linear", py_linear, METH_VARARGS, "Quantize and multiply: a BitLinear forward."},
    DECODE_METHODS
    {nullptr, nullptr, 0, nullptr},
};

static PyModuleDef kModule = {PyModuleDef_HEAD_INIT, "_cpu", "Native CPU kernels for bitnet158.", -1, kMethods};

PyMODINIT_FUNC PyInit__cpu(void) { return PyModule_Create(&kModule); }
