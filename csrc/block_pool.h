// The BlockManager's decode-time operations on its own Python objects (block_manager.py):
// the free list (an insertion-ordered dict), Block.ref_count / Block.hash, and sequences'
// block tables. Header-only: csrc/host_path.cpp is the one translation unit.
#pragma once
#include "py_ref.h"

namespace rlpt_host {

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
inline int can_append(Pool& pool, PyObject* seq) {
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
inline bool append_slot(Pool& pool, PyObject* seq, PyObject* copies) {
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

}  // namespace rlpt_host
