// rlpt_fast._host: the scheduler's per-decode-step bookkeeping in C++ (CPython C API only).
//
// Why: at batch 64 a decode step runs, per sequence, can_append / append_slot (free-list pop,
// reference counts, copy-on-write of a shared partial block) and then appends the sampled token
// and checks the stop rules: some 15 Python calls per sequence per step, interpreted.
// Here the same steps run on the SAME Python objects (Sequence, Block, the BlockManager's
// free-list dict and hash dict), so the Python classes keep their public state and the model
// runner reads them unchanged. What is rare stays in Python and is called back: preemption
// (Scheduler._preempt), retiring a finished sequence (Scheduler._retire) and prefix-cache
// hashing when a block fills (BlockManager.commit, once per block_size steps), so hashing is
// the Python path's by construction.
//
// The Python equivalents are in rlpt_fast/rollout/{scheduler,block_manager,sequence}.py; every
// function here and in block_pool.h names the one it mirrors. tests/rollout/test_host_native.py checks that both
// paths leave identical state.
#include "block_pool.h"
#include "py_ref.h"

namespace {

using namespace rlpt_host;

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
