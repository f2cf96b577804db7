/* LRU, ARC and S3-FIFO books over Python keys in C: the optional fast core of `auto` (and of the
 * single policies' `NativePolicy`). kvtier.scheduler.policies.native documents the Python side.
 *
 * One `Core` holds one key table (open addressing, linear probing over a multiplicative mix of the
 * key's hash; each entry keeps its key, its hash and how many lists hold it) and several *lanes*, each
 * one policy's books (LRU: one queue; ARC: T1, T2, B1, B2 and p; S3-FIFO: small, main, ghost and a
 * 2-bit freq), as intrusive doubly linked lists over entry indices. Entries no list holds are freed in
 * bulk when the table fills (`make_room`), not one by one.
 *
 * Two uses of one Core:
 * - synced lanes (auto's real books, or one policy): access / insert / remove apply to every lane,
 *   `victim(lane, ...)` asks one; a warm-up queue with hit counts stands for every lane until the first
 *   victim that no released key answers, then each lane is built from it (insert, then up to 3 hits);
 *   a released queue holds the keys that go first. `step` is auto's hit-only request step.
 * - independent lanes (auto's shadow caches): `replay` runs Policy.replay_request on every lane and
 *   `observe` samples a request's keys (stable_hash), replays them and scores the lanes.
 * Every operation has exactly the effect of the Python classes (tests/scheduler/policies/test_native.py).
 */
#include "_fastlanes.h"
#include "_fastshadow.h"

/* -- synced lanes: auto's real books ------------------------------------------------------------- */

static inline int is_cached(Core *c, int32_t e) {
    return e >= 0 && (c->warm ? WARM(c)->where[e] == 1 : CACHED(&c->lanes[0], e));
}

static inline Py_ssize_t core_len(Core *c) { return c->warm ? WARM(c)->lists[1].count : SIZE(&c->lanes[0]); }

static void sync_access(Core *c, int32_t e) {
    if (c->warm) {
        Lane *w = WARM(c);
        if (w->freq[e] < 3) w->freq[e]++;
        move(c, w, e, 1);
    } else {
        for (int i = 0; i < c->num_lanes; i++) lane_access(c, &c->lanes[i], e);
    }
    if (REL(c)->where[e]) unlink_(c, REL(c), e);
}

static void sync_insert(Core *c, int32_t e) {
    if (c->warm) {
        append(c, WARM(c), e, 1);
        WARM(c)->freq[e] = 0;
    } else {
        for (int i = 0; i < c->num_lanes; i++) lane_insert(c, &c->lanes[i], e);
    }
}

static void sync_remove(Core *c, int32_t e) {
    if (c->warm) unlink_(c, WARM(c), e);
    else
        for (int i = 0; i < c->num_lanes; i++) lane_remove(c, &c->lanes[i], e);
    if (REL(c)->where[e]) unlink_(c, REL(c), e);
}

/* Ends the warm-up: every lane gets the warm keys, oldest first, each inserted then hit up to 3 times. */
static void build(Core *c) {
    Lane *w = WARM(c);
    for (int i = 0; i < c->num_lanes; i++) {
        Lane *ln = &c->lanes[i];
        for (int32_t e = w->lists[1].head; e >= 0; e = w->next[e]) {
            lane_insert(c, ln, e);
            for (int h = 0; h < w->freq[e]; h++) lane_access(c, ln, e);
        }
    }
    while (w->lists[1].count) unlink_(c, w, w->lists[1].head);
    c->warm = 0;
}

static int32_t sync_victim(Core *c, int leader, PyObject *protect, int32_t incoming) {
    int32_t e = first_free(c, REL(c), 1, protect);
    if (e != -1) return e;
    if (c->warm) build(c);
    return lane_victim(c, &c->lanes[leader], protect, incoming);
}

/* -- Python methods ------------------------------------------------------------------------------ */

static Py_hash_t hash_of(PyObject *key) { return PyObject_Hash(key); }

/* The entry of a cached key, or -1 with KeyError set (or another error). */
static int32_t cached_entry(Core *c, PyObject *key) {
    Py_hash_t h = hash_of(key);
    if (h == -1) return -1;
    int32_t e = find(c, key, h);
    if (e == -2) return -1;
    if (!is_cached(c, e)) {
        PyErr_SetObject(PyExc_KeyError, key);
        return -1;
    }
    return e;
}




static PyObject *Core_access(Core *c, PyObject *key) {
    int32_t e = cached_entry(c, key);
    if (e < 0) return NULL;
    sync_access(c, e);
    Py_RETURN_NONE;
}

static PyObject *Core_insert(Core *c, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"key", "parent", NULL};
    PyObject *key, *parent = NULL;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O|O:insert", kwlist, &key, &parent)) return NULL;
    Py_hash_t h = hash_of(key);
    if (h == -1) return NULL;
    int32_t e = find_or_add(c, key, h);
    if (e < 0) return NULL;
    if (is_cached(c, e)) {
        PyErr_Format(PyExc_KeyError, "%R is already cached", key);
        return NULL;
    }
    sync_insert(c, e);
    Py_RETURN_NONE;
}

static PyObject *Core_remove(Core *c, PyObject *key) {
    int32_t e = cached_entry(c, key);
    if (e < 0) return NULL;
    sync_remove(c, e);
    Py_RETURN_NONE;
}

static PyObject *Core_release(Core *c, PyObject *key) {
    int32_t e = cached_entry(c, key);
    if (e < 0) return NULL;
    if (!REL(c)->where[e]) append(c, REL(c), e, 1);
    Py_RETURN_NONE;
}

/* victim(lane, protect, incoming): protect is a predicate or None. */
static PyObject *Core_victim(Core *c, PyObject *args) {
    int lane;
    PyObject *protect, *incoming;
    if (!PyArg_ParseTuple(args, "iOO", &lane, &protect, &incoming) || check_lane(c, lane) < 0) return NULL;
    int32_t inc = -1;
    if (incoming != Py_None) {
        Py_hash_t h = hash_of(incoming);
        if (h == -1 || (inc = find(c, incoming, h)) == -2) return NULL;
    }
    int32_t e = sync_victim(c, lane, protect == Py_None ? NULL : protect, inc);
    if (e == -2) return NULL;
    if (e < 0) Py_RETURN_NONE;
    return Py_NewRef(c->key[e]);
}

static PyObject *Core_lookup(Core *c, PyObject *keys) {
    PyObject *seq = PySequence_Fast(keys, "keys must be a sequence");
    if (!seq) return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq), hits = 0;
    PyObject **items = PySequence_Fast_ITEMS(seq);
    for (; hits < n; hits++) {
        Py_hash_t h = hash_of(items[hits]);
        int32_t e = h == -1 ? -2 : find(c, items[hits], h);
        if (e == -2) {
            Py_DECREF(seq);
            return NULL;
        }
        if (!is_cached(c, e)) break;
    }
    Py_DECREF(seq);
    return PyLong_FromSsize_t(hits);
}

/* step(keys, leader, partial_last, out): auto's hit-only step (AutoPolicy.replay_request): leading
 * hits; cached keys refreshed and new keys inserted deepest first, each insertion evicting (released
 * keys first, then the leader's victim) when full; evicted keys appended to `out` unless None. */
static PyObject *Core_step(Core *c, PyObject *args) {
    PyObject *keys, *out;
    int leader, partial_last;
    if (!PyArg_ParseTuple(args, "OipO", &keys, &leader, &partial_last, &out) || check_lane(c, leader) < 0) return NULL;
    PyObject *seq = PySequence_Fast(keys, "keys must be a sequence");
    if (!seq) return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq), hits = 0, num_new = 0;
    if (resolve(c, PySequence_Fast_ITEMS(seq), n) < 0) {
        Py_DECREF(seq);
        return NULL;
    }
    int32_t *ents = c->buf;
    PyObject *result = NULL;
    while (hits < n && is_cached(c, ents[hits])) hits++;
    int32_t *fresh = PyMem_Malloc((n ? n : 1) * sizeof(int32_t));
    if (!fresh) {
        PyErr_NoMemory();
        goto end;
    }
    for (Py_ssize_t i = n - 1; i >= 0; i--) {
        if (is_cached(c, ents[i])) sync_access(c, ents[i]);
        else fresh[num_new++] = ents[i];
    }
    for (Py_ssize_t i = 0; i < num_new; i++) {
        int32_t e = fresh[i];
        if (is_cached(c, e)) {
            PyErr_Format(PyExc_KeyError, "%R is already cached", c->key[e]);
            goto end;
        }
        if (core_len(c) >= c->capacity) {
            int32_t v = sync_victim(c, leader, NULL, e);
            if (v == -2) goto end;
            if (v < 0) break;
            if (out != Py_None && PyList_Append(out, c->key[v]) < 0) goto end;
            sync_remove(c, v);
        }
        sync_insert(c, e);
    }
    if (partial_last && n && is_cached(c, ents[n - 1]) && !REL(c)->where[ents[n - 1]])
        append(c, REL(c), ents[n - 1], 1);
    result = PyLong_FromSsize_t(hits);
end:
    PyMem_Free(fresh);
    unpin(c, n);
    Py_DECREF(seq);
    return result;
}

static PyObject *Core_scores(Core *c, PyObject *Py_UNUSED(ignored)) {
    PyObject *list = PyList_New(c->num_lanes);
    for (int i = 0; list && i < c->num_lanes; i++)
        PyList_SET_ITEM(list, i, PyFloat_FromDouble(c->scores ? c->scores[i] / c->gain : 0.0));
    return list;
}

static PyObject *Core_keys(Core *c, PyObject *Py_UNUSED(ignored)) {
    PyObject *list = PyList_New(0);
    Lane *ln = c->warm ? WARM(c) : &c->lanes[0];
    for (int id = 1; list && id <= 2; id++)
        for (int32_t e = ln->lists[id].head; e >= 0; e = ln->next[e])
            if (PyList_Append(list, c->key[e]) < 0) {
                Py_CLEAR(list);
                break;
            }
    return list;
}

static PyObject *Core_p(Core *c, PyObject *args) {
    int lane;
    if (!PyArg_ParseTuple(args, "i", &lane) || check_lane(c, lane) < 0) return NULL;
    return PyLong_FromSsize_t(c->lanes[lane].p);
}

static Py_ssize_t Core_len(Core *c) { return core_len(c); }

static int Core_contains(Core *c, PyObject *key) {
    Py_hash_t h = hash_of(key);
    if (h == -1) return -1;
    int32_t e = find(c, key, h);
    if (e == -2) return -1;
    return is_cached(c, e);
}

/* Core(specs, capacity, warm): specs is a list of (kind, capacity, small_target, ghost_limit). */
static int Core_init(Core *c, PyObject *args, PyObject *Py_UNUSED(kwds)) {
    PyObject *specs;
    Py_ssize_t capacity;
    int warm;
    if (c->lanes) {
        PyErr_SetString(PyExc_RuntimeError, "Core is initialised once");
        return -1;
    }
    if (!PyArg_ParseTuple(args, "O!np", &PyList_Type, &specs, &capacity, &warm)) return -1;
    Py_ssize_t n = PyList_GET_SIZE(specs);
    if (n < 1 || n > 64) {
        PyErr_Format(PyExc_ValueError, "specs: %zd lanes; expected 1 to 64", n);
        return -1;
    }
    if (!(c->lanes = PyMem_Calloc(n + 2, sizeof(Lane)))) {
        PyErr_NoMemory();
        return -1;
    }
    c->num_lanes = (int)n;
    for (Py_ssize_t i = 0; i < n + 2; i++) {
        Lane *ln = &c->lanes[i];
        ln->kind = K_LRU;
        ln->capacity = capacity;
        if (i < n && !PyArg_ParseTuple(PyList_GET_ITEM(specs, i), "innn", &ln->kind, &ln->capacity,
                                       &ln->small_target, &ln->ghost_limit))
            return -1;
        if (ln->kind < K_LRU || ln->kind > K_S3 || ln->capacity < 1) {
            PyErr_Format(PyExc_ValueError, "specs[%zd]: kind %d, capacity %zd; expected a kind 0-2 and a capacity >= 1",
                         i, ln->kind, ln->capacity);
            return -1;
        }
        for (int id = 0; id < 5; id++) ln->lists[id].head = ln->lists[id].tail = -1;
    }
    c->capacity = capacity;
    c->warm = warm;
    c->free_head = -1;
    if (grow(c) < 0) {
        PyErr_NoMemory();
        return -1;
    }
    return 0;
}

static void Core_dealloc(Core *c) {
    for (int32_t e = 0; e < c->top; e++) Py_XDECREF(c->key[e]);
    if (c->lanes)
        for (int i = 0; i < c->num_lanes + 2; i++) {
            PyMem_Free(c->lanes[i].prev);
            PyMem_Free(c->lanes[i].next);
            PyMem_Free(c->lanes[i].where);
            PyMem_Free(c->lanes[i].freq);
        }
    PyMem_Free(c->lanes);
    PyMem_Free(c->key);
    PyMem_Free(c->hash);
    PyMem_Free(c->uses);
    PyMem_Free(c->slots);
    PyMem_Free(c->scores);
    PyMem_Free(c->buf);
    Py_XDECREF(c->hashfn);
    Py_TYPE(c)->tp_free((PyObject *)c);
}

static PyMethodDef Core_methods[] = {
    {"access", (PyCFunction)Core_access, METH_O, "access(key): a hit on a cached key (every lane)."},
    {"insert", (PyCFunction)(void (*)(void))Core_insert, METH_VARARGS | METH_KEYWORDS, "insert(key, parent=None): a new key (every lane; parent unused)."},
    {"remove", (PyCFunction)Core_remove, METH_O, "remove(key): a cached key leaves (every lane)."},
    {"release", (PyCFunction)Core_release, METH_O, "release(key): a cached key goes first."},
    {"victim", (PyCFunction)Core_victim, METH_VARARGS, "victim(lane, protect, incoming) -> key or None."},
    {"lookup", (PyCFunction)Core_lookup, METH_O, "lookup(keys) -> leading cached keys."},
    {"step", (PyCFunction)Core_step, METH_VARARGS, "step(keys, leader, partial_last, out) -> hits."},
    {"replay", (PyCFunction)Core_replay, METH_O, "replay(keys) -> hits of each lane (independent lanes)."},
    {"observe", (PyCFunction)Core_observe, METH_VARARGS, "observe(keys, leader) -> leader."},
    {"scoring", (PyCFunction)Core_scoring, METH_VARARGS, "scoring(threshold, space, decay, margin, hashfn)."},
    {"scores", (PyCFunction)Core_scores, METH_NOARGS, "scores() -> each lane's decayed score."},
    {"keys", (PyCFunction)Core_keys, METH_NOARGS, "keys() -> the cached keys."},
    {"p", (PyCFunction)Core_p, METH_VARARGS, "p(lane) -> an ARC lane's target size of T1."},
    {NULL, NULL, 0, NULL}};

static PySequenceMethods Core_as_sequence = {.sq_length = (lenfunc)Core_len, .sq_contains = (objobjproc)Core_contains};

static PyTypeObject CoreType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "kvtier.scheduler.policies._fastpolicy.Core",
    .tp_basicsize = sizeof(Core),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Core(specs, capacity, warm): LRU / ARC / S3-FIFO lanes over one key table.",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Core_init,
    .tp_dealloc = (destructor)Core_dealloc,
    .tp_methods = Core_methods,
    .tp_as_sequence = &Core_as_sequence,
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_fastpolicy",
                                    "LRU / ARC / S3-FIFO books in C (see _fastpolicy.c).", -1, NULL};

PyMODINIT_FUNC PyInit__fastpolicy(void) {
    if (PyType_Ready(&CoreType) < 0) return NULL;
    PyObject *m = PyModule_Create(&module);
    if (!m) return NULL;
    if (PyModule_AddObjectRef(m, "Core", (PyObject *)&CoreType) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    PyModule_AddIntConstant(m, "LRU", K_LRU);
    PyModule_AddIntConstant(m, "ARC", K_ARC);
    PyModule_AddIntConstant(m, "S3FIFO", K_S3);
    return m;
}
