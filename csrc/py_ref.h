// CPython C-API helpers for rlpt_fast._host: an owned reference, interned attribute names,
// integer / list attribute access. Header-only: csrc/host_path.cpp is the one translation unit.
#pragma once
#define PY_SSIZE_T_CLEAN
#include <Python.h>

namespace rlpt_host {

// Owned reference, released at scope exit (keeps the error paths short).
struct Ref {
  PyObject* p;
  explicit Ref(PyObject* o = nullptr) : p(o) {}
  ~Ref() { Py_XDECREF(p); }
  Ref(const Ref&) = delete;
  Ref& operator=(const Ref&) = delete;
  PyObject* get() const { return p; }
  PyObject* release() { PyObject* o = p; p = nullptr; return o; }
  explicit operator bool() const { return p != nullptr; }
};

struct Names {
  PyObject *token_ids, *block_table, *num_cached_tokens, *num_hashed_blocks, *logprobs,
      *finish_reason, *stop, *stop_token_ids, *max_tokens, *max_model_len, *num_prompt_tokens,
      *seq_id, *blocks, *free_ids, *hash_to_block, *block_size, *enable_prefix_caching, *ref_count,
      *hash, *commit, *reason_stop, *reason_length;
};
inline Names N;

inline bool intern_names() {
  struct { PyObject** slot; const char* s; } all[] = {
      {&N.token_ids, "token_ids"}, {&N.block_table, "block_table"},
      {&N.num_cached_tokens, "num_cached_tokens"}, {&N.num_hashed_blocks, "num_hashed_blocks"},
      {&N.logprobs, "logprobs"}, {&N.finish_reason, "finish_reason"}, {&N.stop, "stop"},
      {&N.stop_token_ids, "stop_token_ids"}, {&N.max_tokens, "max_tokens"},
      {&N.max_model_len, "max_model_len"}, {&N.num_prompt_tokens, "num_prompt_tokens"},
      {&N.seq_id, "seq_id"}, {&N.blocks, "blocks"}, {&N.free_ids, "free_ids"},
      {&N.hash_to_block, "hash_to_block"}, {&N.block_size, "block_size"},
      {&N.enable_prefix_caching, "enable_prefix_caching"}, {&N.ref_count, "ref_count"},
      {&N.hash, "hash"}, {&N.commit, "commit"}, {&N.reason_stop, "stop"},
      {&N.reason_length, "length"}};
  for (auto& a : all)
    if (!(*a.slot = PyUnicode_InternFromString(a.s))) return false;
  return true;
}

// getattr(obj, name) as an integer; -1 with an exception set on failure (check PyErr_Occurred).
inline Py_ssize_t get_int(PyObject* obj, PyObject* name) {
  Ref v(PyObject_GetAttr(obj, name));
  return v ? PyLong_AsSsize_t(v.get()) : -1;
}

inline bool set_int(PyObject* obj, PyObject* name, Py_ssize_t value) {
  Ref v(PyLong_FromSsize_t(value));
  return v && PyObject_SetAttr(obj, name, v.get()) == 0;
}

// getattr(obj, name), checked to be a list (the attribute's type in Sequence / BlockManager).
inline PyObject* get_list(PyObject* obj, PyObject* name) {
  PyObject* v = PyObject_GetAttr(obj, name);
  if (v && !PyList_Check(v)) {
    PyErr_Format(PyExc_TypeError, "expected %R.%U to be a list, got %R", obj, name, v);
    Py_CLEAR(v);
  }
  return v;
}

inline Py_ssize_t floor_div(Py_ssize_t a, Py_ssize_t b) { return a / b - ((a % b != 0) && ((a < 0) != (b < 0))); }

}  // namespace rlpt_host
