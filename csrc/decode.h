// A whole decode step of a BitNet b1.58 model (one new token per sequence) in native code: the CPU
// decode path without per-layer Python (bitnet158/kernels/cpu_decode.py drives it).
#pragma once

#define PY_SSIZE_T_CLEAN
#include <Python.h>

PyObject* py_decoder_new(PyObject*, PyObject* args);
PyObject* py_decoder_step(PyObject*, PyObject* args);
PyObject* py_decoder_lm_head(PyObject*, PyObject* args);

#define DECODE_METHODS                                                                     \
  {"decoder_new", py_decoder_new, METH_VARARGS, "Build a native decoder from weight pointers."}, \
      {"decoder_step", py_decoder_step, METH_VARARGS, "One decode step: logits for one new token per row."}, \
      {"decoder_lm_head", py_decoder_lm_head, METH_VARARGS, "Logits of final-normed inputs: the lm_head alone."},
