/* Independent lanes of `_fastpolicy.Core`: auto's sampled shadow caches (see _fastpolicy.c). */
#ifndef KVTIER_FASTSHADOW_H
#define KVTIER_FASTSHADOW_H
#include "_fastlanes.h"

/* -- independent lanes: shadow caches ------------------------------------------------------------ */

static const uint64_t GOLDEN = 0x9E3779B97F4A7C15ULL;

/* stable_hash(key) (kvtier.scheduler.policies.auto): ints and bytes here, others by `hashfn`. */
static int stable_hash(Core *c, PyObject *key, uint64_t *out) {
    uint64_t x = 0;
    if (PyLong_Check(key)) {
        x = PyLong_AsUnsignedLongLongMask(key);
        if (x == (uint64_t)-1 && PyErr_Occurred()) return -1;
    } else if (PyBytes_Check(key)) {
        const unsigned char *b = (const unsigned char *)PyBytes_AS_STRING(key);
        Py_ssize_t n = PyBytes_GET_SIZE(key);
        for (Py_ssize_t i = 0; i < n && i < 8; i++) x |= (uint64_t)b[i] << (8 * i);
    } else {
        PyObject *r = PyObject_CallOneArg(c->hashfn, key);
        if (!r) return -1;
        x = PyLong_AsUnsignedLongLongMask(r);
        Py_DECREF(r);
        if (x == (uint64_t)-1 && PyErr_Occurred()) return -1;
        *out = x;
        return 0;
    }
    x *= GOLDEN;
    *out = x ^ (x >> 29);
    return 0;
}

/* Every lane replays the resolved request; hits[i] gets lane i's leading hits. */
static PyObject *replay_all(Core *c, PyObject **items, Py_ssize_t n, Py_ssize_t *hits) {
    if (resolve(c, items, n) < 0) return NULL;
    for (int i = 0; i < c->num_lanes; i++) hits[i] = lane_replay(c, &c->lanes[i], c->buf, n);
    unpin(c, n);
    Py_RETURN_NONE;
}

/* replay(keys) -> [hits of each lane]: Policy.replay_request on every lane. */
static PyObject *Core_replay(Core *c, PyObject *keys) {
    PyObject *seq = PySequence_Fast(keys, "keys must be a sequence");
    if (!seq) return NULL;
    Py_ssize_t hits[64];
    PyObject *r = replay_all(c, PySequence_Fast_ITEMS(seq), PySequence_Fast_GET_SIZE(seq), hits);
    Py_DECREF(seq);
    if (!r) return NULL;
    Py_DECREF(r);
    PyObject *list = PyList_New(c->num_lanes);
    for (int i = 0; list && i < c->num_lanes; i++) PyList_SET_ITEM(list, i, PyLong_FromSsize_t(hits[i]));
    return list;
}

/* observe(keys, leader) -> leader: AutoPolicy.observe (sampled keys to every lane, decayed scores). */
static PyObject *Core_observe(Core *c, PyObject *args) {
    PyObject *keys;
    int leader;
    if (!PyArg_ParseTuple(args, "Oi", &keys, &leader) || check_lane(c, leader) < 0) return NULL;
    if (!c->scores) {
        PyErr_SetString(PyExc_RuntimeError, "observe: scoring is not configured");
        return NULL;
    }
    PyObject *seq = PySequence_Fast(keys, "keys must be a sequence");
    if (!seq) return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq), m = 0;
    PyObject **items = PySequence_Fast_ITEMS(seq), **sampled = items;
    if (c->threshold < c->space) {
        sampled = PyMem_Malloc((n ? n : 1) * sizeof(PyObject *));
        if (!sampled) {
            Py_DECREF(seq);
            return PyErr_NoMemory();
        }
        for (Py_ssize_t i = 0; i < n; i++) {
            uint64_t x;
            if (stable_hash(c, items[i], &x) < 0) {
                PyMem_Free(sampled);
                Py_DECREF(seq);
                return NULL;
            }
            if (x % c->space < c->threshold) sampled[m++] = items[i];
        }
    } else {
        m = n;
    }
    c->gain /= c->decay;
    PyObject *r = Py_None;
    Py_ssize_t hits[64];
    if (m) {
        r = replay_all(c, sampled, m, hits);
        if (r) {
            Py_DECREF(r);
            for (int i = 0; i < c->num_lanes; i++)
                if (hits[i]) c->scores[i] += hits[i] * c->gain;
            if (c->gain > 1e100) {
                for (int i = 0; i < c->num_lanes; i++) c->scores[i] /= c->gain;
                c->gain = 1.0;
            }
            int best = 0;
            for (int i = 1; i < c->num_lanes; i++)
                if (c->scores[i] > c->scores[best]) best = i;
            double lead = c->scores[leader];
            if (c->scores[best] > lead + c->margin * sqrt(lead * c->gain)) leader = best;
        }
    }
    if (sampled != items) PyMem_Free(sampled);
    Py_DECREF(seq);
    if (!r) return NULL;
    return PyLong_FromLong(leader);
}

/* scoring(threshold, space, decay, margin, hashfn): makes observe() available. */
static PyObject *Core_scoring(Core *c, PyObject *args) {
    unsigned long long threshold, space;
    double decay, margin;
    PyObject *hashfn;
    if (!PyArg_ParseTuple(args, "KKddO", &threshold, &space, &decay, &margin, &hashfn)) return NULL;
    if (!c->scores && !(c->scores = PyMem_Calloc(c->num_lanes, sizeof(double)))) return PyErr_NoMemory();
    c->threshold = threshold;
    c->space = space ? space : 1;
    c->decay = decay;
    c->margin = margin;
    c->gain = 1.0;
    Py_XSETREF(c->hashfn, Py_NewRef(hashfn));
    Py_RETURN_NONE;
}

#endif
