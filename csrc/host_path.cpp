// rlpt_fast._host: the scheduler's per-decode-step bookkeeping in C++ (CPython C API only).
//
// Why: at batch 64 a decode step runs, per sequence, can_append / append_slot (free-list pop,
// reference counts, copy-on-write of a shared partial block) and then appends the sampled token
// and checks the stop rules. In Python that is ~100 interpreted lines per sequence per step.
// Here the same steps run on the SAME Python objects (Sequence, Block, the BlockManager's
// free-list dict and hash dict), so the Python classes keep their public state and the model
// runner reads them unchanged. What is rare stays in Python and is called back: preemption
// (Scheduler._preempt), retiring a finished sequence (Scheduler._retire) and prefix-cache
// hashing when a block fills (BlockManager.commit, once per block_size steps), so hashing is
// the Python path's by construction.
//
// The Python equivalents are in rlpt_fast/rollout/{scheduler,block_manager,sequence}.py; every
// function below names the one it mirrors. tests/rollout/test_host_native.py checks that both
// paths leave identical state.
#define PY_SSIZE_T_CLEAN
#include <Python.h>

namespace {

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
} N;

bool intern_names() {
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
Py_ssize_t get_int(PyObject* obj, PyObject* name) {
  Ref v(PyObject_GetAttr(obj, name));
  return v ? PyLong_AsSsize_t(v.get()) : -1;
}

bool set_int(PyObject* obj, PyObject* name, Py_ssize_t value) {
  Ref v(PyLong_FromSsize_t(value));
  return v && PyObject_SetAttr(obj, name, v.get()) == 0;
}

// getattr(obj, name), checked to be a list (the attribute's type in Sequence / BlockManager).
PyObject* get_list(PyObject* obj, PyObject* name) {
  PyObject* v = PyObject_GetAttr(obj, name);
  if (v && !PyList_Check(v)) {
    PyErr_Format(PyExc_TypeError, "expected %R.%U to be a list, got %R", obj, name, v);
    Py_CLEAR(v);
  }
  return v;
}

Py_ssize_t floor_div(Py_ssize_t a, Py_ssize_t b) { return a / b - ((a % b != 0) && ((a < 0) != (b < 0))); }

// A BlockManager's fields, read once per call (preemption mutates them in place, never rebinds).
struct Pool {
  PyObject* bm;
  Ref blocks, free_ids, hash_to_block;
  Py_ssize_t block_size = 0;
  int prefix = 0;

  bool load(PyObject* manager) {
    bm = manager;
    blocks.p = get_list(bm, N.blocks);
    free_ids.p = PyObject_GetAttr(bm, N.free_ids);
    hash_to_block.p = PyObject_GetAttr(bm, N.hash_to_block);
    if (!blocks || !free_ids || !hash_to_block) return false;
    if (!PyDict_Check(free_ids.get()) || !PyDict_Check(hash_to_block.get())) {
      PyErr_SetString(PyExc_TypeError, "BlockManager.free_ids and .hash_to_block must be dicts");
      return false;
    }
    block_size = get_int(bm, N.block_size);
    if (PyErr_Occurred()) return false;
    if (block_size < 1) {
      PyErr_Format(PyExc_ValueError, "BlockManager.block_size must be >= 1, got %zd", block_size);
      return false;
    }
    Ref pc(PyObject_GetAttr(bm, N.enable_prefix_caching));
    return pc && (prefix = PyObject_IsTrue(pc.get())) >= 0;
  }

  PyObject* block(Py_ssize_t b) {  // borrowed
    if (b < 0 || b >= PyList_GET_SIZE(blocks.get())) {
      PyErr_Format(PyExc_IndexError, "block id %zd outside the pool of %zd blocks", b,
                   PyList_GET_SIZE(blocks.get()));
      return nullptr;
    }
    return PyList_GET_ITEM(blocks.get(), b);
  }

  Py_ssize_t ref_count(Py_ssize_t b) {
    PyObject* blk = block(b);
    return blk ? get_int(blk, N.ref_count) : -1;
  }

  // BlockManager._take_free: pops the least recently freed block, drops its stale hash.
  Py_ssize_t take_free() {
    PyObject *key, *val;
    Py_ssize_t pos = 0;
    if (!PyDict_Next(free_ids.get(), &pos, &key, &val)) {
      PyErr_SetString(PyExc_RuntimeError, "no free KV-cache block (the scheduler should have checked)");
      return -1;
    }
    Ref k(Py_NewRef(key));
    Py_ssize_t b = PyLong_AsSsize_t(key);
    if (b == -1 && PyErr_Occurred()) return -1;
    if (PyDict_DelItem(free_ids.get(), key) < 0) return -1;
    PyObject* blk = block(b);
    if (!blk) return -1;
    Ref h(PyObject_GetAttr(blk, N.hash));
    if (!h) return -1;
    if (h.get() != Py_None) {
      PyObject* cur = PyDict_GetItemWithError(hash_to_block.get(), h.get());  // borrowed
      if (!cur && PyErr_Occurred()) return -1;
      if (cur) {
        int same = PyObject_RichCompareBool(cur, key, Py_EQ);
        if (same < 0 || (same && PyDict_DelItem(hash_to_block.get(), h.get()) < 0)) return -1;
      }
      if (PyObject_SetAttr(blk, N.hash, Py_None) < 0) return -1;
    }
    return set_int(blk, N.ref_count, 1) ? b : -1;
  }
};

// BlockManager.can_append: 1 / 0, or -1 with an exception.
int can_append(Pool& pool, PyObject* seq) {
  Ref tokens(get_list(seq, N.token_ids)), table(get_list(seq, N.block_table));
  if (!tokens || !table) return -1;
  Py_ssize_t i = floor_div(PyList_GET_SIZE(tokens.get()) - 1, pool.block_size);
  if (i < 0) {  // a Sequence always has a token (Sequence.__post_init__)
    PyErr_Format(PyExc_RuntimeError, "sequence %R has no tokens", seq);
    return -1;
  }
  Py_ssize_t need = 1;
  if (i < PyList_GET_SIZE(table.get())) {
    Py_ssize_t b = PyLong_AsSsize_t(PyList_GET_ITEM(table.get(), i));
    Py_ssize_t rc = (b == -1 && PyErr_Occurred()) ? -1 : pool.ref_count(b);
    if (rc == -1 && PyErr_Occurred()) return -1;
    need = rc > 1;
  }
  return need <= PyDict_GET_SIZE(pool.free_ids.get());
}

// BlockManager.append_slot; a copy-on-write (src, dst) goes onto `copies`.
bool append_slot(Pool& pool, PyObject* seq, PyObject* copies) {
  Ref tokens(get_list(seq, N.token_ids)), table(get_list(seq, N.block_table));
  if (!tokens || !table) return false;
  Py_ssize_t last = PyList_GET_SIZE(tokens.get()) - 1;
  Py_ssize_t i = floor_div(last, pool.block_size), len = PyList_GET_SIZE(table.get());
  if (i > len || i < 0) {
    Ref id(PyObject_GetAttr(seq, N.seq_id));
    if (id) PyErr_Format(PyExc_RuntimeError, "sequence %R: token %zd is past block table %R", id.get(), last, table.get());
    return false;
  }
  if (i == len) {
    Py_ssize_t b = pool.take_free();
    Ref nb(b < 0 ? nullptr : PyLong_FromSsize_t(b));
    return nb && PyList_Append(table.get(), nb.get()) == 0;
  }
  PyObject* old = PyList_GET_ITEM(table.get(), i);
  Py_ssize_t ob = PyLong_AsSsize_t(old);
  Py_ssize_t rc = (ob == -1 && PyErr_Occurred()) ? -1 : pool.ref_count(ob);
  if (rc == -1 && PyErr_Occurred()) return false;
  if (rc == 1) return true;
  Py_ssize_t nb = pool.take_free();
  if (nb < 0 || !set_int(pool.block(ob), N.ref_count, rc - 1)) return false;
  Ref pair(Py_BuildValue("(nn)", ob, nb)), nbo(PyLong_FromSsize_t(nb));
  return pair && nbo && PyList_SetItem(table.get(), i, nbo.release()) == 0 &&
         PyList_Append(copies, pair.get()) == 0;
}

// Sequence.check_finished: 1 / 0, or -1 with an exception.
int check_finished(PyObject* seq, PyObject* tokens) {
  Py_ssize_t n = PyList_GET_SIZE(tokens);
  Py_ssize_t prompt = get_int(seq, N.num_prompt_tokens);
  if (prompt == -1 && PyErr_Occurred()) return -1;
  if (n - prompt == 0) return 0;
  {
    Ref stop(PyObject_GetAttr(seq, N.stop));
    Ref ids(stop ? PyObject_GetAttr(stop.get(), N.stop_token_ids) : nullptr);
    if (!ids) return -1;
    int hit = n ? PySequence_Contains(ids.get(), PyList_GET_ITEM(tokens, n - 1)) : 0;
    if (hit < 0) return -1;
    PyObject* reason = nullptr;
    if (hit) {
      reason = N.reason_stop;
    } else {
      Py_ssize_t max_tokens = get_int(stop.get(), N.max_tokens);
      Py_ssize_t max_len = PyErr_Occurred() ? -1 : get_int(stop.get(), N.max_model_len);
      if (PyErr_Occurred()) return -1;
      if (n - prompt >= max_tokens || n >= max_len) reason = N.reason_length;
    }
    if (reason && PyObject_SetAttr(seq, N.finish_reason, reason) < 0) return -1;
  }
  Ref fr(PyObject_GetAttr(seq, N.finish_reason));
  return fr ? fr.get() != Py_None : -1;
}

// Scheduler._schedule_decode over items = list(running): returns (batch seqs, copies, lo, hi);
// the scheduler's running deque becomes batch seqs + items[lo:hi]. preempt(seq) is
// Scheduler._preempt (called for the tail when a sequence cannot get a block).
PyObject* schedule_decode(PyObject*, PyObject* args) {
  PyObject *items, *bm, *preempt;
  Py_ssize_t max_seqs;
  if (!PyArg_ParseTuple(args, "O!nOO:schedule_decode", &PyList_Type, &items, &max_seqs, &bm, &preempt))
    return nullptr;
  Pool pool;
  if (!pool.load(bm)) return nullptr;
  Ref batch(PyList_New(0)), copies(PyList_New(0));
  if (!batch || !copies) return nullptr;
  Ref keep(Py_NewRef(items));  // preempt callbacks must not free the list under us
  Py_ssize_t lo = 0, hi = PyList_GET_SIZE(items);
  while (lo < hi && PyList_GET_SIZE(batch.get()) < max_seqs) {
    PyObject* seq = PyList_GET_ITEM(items, lo++);
    for (;;) {
      int ok = can_append(pool, seq);
      if (ok < 0) return nullptr;
      if (ok) {
        if (!append_slot(pool, seq, copies.get()) || PyList_Append(batch.get(), seq) < 0) return nullptr;
        break;
      }
      PyObject* victim = lo < hi ? PyList_GET_ITEM(items, --hi) : seq;
      Ref r(PyObject_CallOneArg(preempt, victim));
      if (!r) return nullptr;
      if (victim == seq) break;
    }
  }
  return Py_BuildValue("(OOnn)", batch.get(), copies.get(), lo, hi);
}

// Scheduler.postprocess for a decode batch (chunk length 1 for every sequence): appends each
// sampled (token, logprob), commits filled blocks (BlockManager.commit, called back), checks the
// stop rules and retires finished sequences in batch order. Returns retire(seq) of each.
PyObject* postprocess_decode(PyObject*, PyObject* args) {
  PyObject *seqs, *samples, *bm, *retire;
  if (!PyArg_ParseTuple(args, "O!O!OO:postprocess_decode", &PyList_Type, &seqs, &PyList_Type, &samples, &bm, &retire))
    return nullptr;
  Pool pool;
  if (!pool.load(bm)) return nullptr;
  Ref keep_seqs(Py_NewRef(seqs)), keep_samples(Py_NewRef(samples));
  Ref finished(PyList_New(0));
  if (!finished) return nullptr;
  Py_ssize_t n = PyList_GET_SIZE(seqs) < PyList_GET_SIZE(samples) ? PyList_GET_SIZE(seqs) : PyList_GET_SIZE(samples);
  for (Py_ssize_t k = 0; k < n; ++k) {
    PyObject* seq = PyList_GET_ITEM(seqs, k);
    Py_ssize_t cached = get_int(seq, N.num_cached_tokens) + 1;
    if (PyErr_Occurred() || !set_int(seq, N.num_cached_tokens, cached)) return nullptr;
    Ref tokens(get_list(seq, N.token_ids));
    if (!tokens) return nullptr;
    if (pool.prefix) {  // BlockManager.commit has work only when a block has filled
      Ref table(get_list(seq, N.block_table));
      Py_ssize_t hashed = table ? get_int(seq, N.num_hashed_blocks) : -1;
      if (PyErr_Occurred()) return nullptr;
      Py_ssize_t full = floor_div(cached, pool.block_size);
      if (full > PyList_GET_SIZE(table.get())) full = PyList_GET_SIZE(table.get());
      if (full > hashed) {
        Ref r(PyObject_CallMethodOneArg(bm, N.commit, seq));
        if (!r) return nullptr;
      }
    }
    Ref pairs(PySequence_Fast(PyList_GET_ITEM(samples, k), "samples[i] must be a sequence of (token, logprob)"));
    if (!pairs) return nullptr;
    if (PySequence_Fast_GET_SIZE(pairs.get()) == 0) continue;
    Ref pair(PySequence_Fast(PySequence_Fast_GET_ITEM(pairs.get(), 0), "a sample must be (token, logprob)"));
    if (!pair) return nullptr;
    if (PySequence_Fast_GET_SIZE(pair.get()) != 2)
      return PyErr_Format(PyExc_ValueError, "a sample must be (token, logprob), got %R", pair.get());
    Ref logprobs(get_list(seq, N.logprobs));
    if (!logprobs || PyList_Append(tokens.get(), PySequence_Fast_GET_ITEM(pair.get(), 0)) < 0 ||
        PyList_Append(logprobs.get(), PySequence_Fast_GET_ITEM(pair.get(), 1)) < 0)
      return nullptr;
    int done = check_finished(seq, tokens.get());
    if (done < 0) return nullptr;
    if (done) {
      Ref r(PyObject_CallOneArg(retire, seq));
      if (!r || PyList_Append(finished.get(), r.get()) < 0) return nullptr;
    }
  }
  return finished.release();
}

// BlockManager.can_append / append_slot one sequence at a time (for the property tests).
PyObject* py_can_append(PyObject*, PyObject* args) {
  PyObject *bm, *seq;
  Pool pool;
  if (!PyArg_ParseTuple(args, "OO:can_append", &bm, &seq) || !pool.load(bm)) return nullptr;
  int ok = can_append(pool, seq);
  return ok < 0 ? nullptr : PyBool_FromLong(ok);
}

PyObject* py_append_slot(PyObject*, PyObject* args) {
  PyObject *bm, *seq;
  Pool pool;
  if (!PyArg_ParseTuple(args, "OO:append_slot", &bm, &seq) || !pool.load(bm)) return nullptr;
  Ref copies(PyList_New(0));
  return copies && append_slot(pool, seq, copies.get()) ? copies.release() : nullptr;
}

PyMethodDef methods[] = {
    {"can_append", py_can_append, METH_VARARGS, "can_append(block_manager, seq) -> bool"},
    {"append_slot", py_append_slot, METH_VARARGS, "append_slot(block_manager, seq) -> [(src, dst)]"},
    {"schedule_decode", schedule_decode, METH_VARARGS,
     "schedule_decode(items, max_num_seqs, block_manager, preempt) -> (seqs, copies, lo, hi)"},
    {"postprocess_decode", postprocess_decode, METH_VARARGS,
     "postprocess_decode(seqs, samples, block_manager, retire) -> finished"},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef module = {PyModuleDef_HEAD_INIT, "rlpt_fast._host",
                      "The scheduler's decode-step bookkeeping in C++ (see csrc/host_path.cpp).", -1,
                      methods, nullptr, nullptr, nullptr, nullptr};

}  // namespace

PyMODINIT_FUNC PyInit__host(void) {
  if (!intern_names()) return nullptr;
  return PyModule_Create(&module);
}
