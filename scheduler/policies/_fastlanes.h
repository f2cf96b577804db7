/* Key table, intrusive lists and the LRU / ARC / S3-FIFO lanes of `_fastpolicy.Core` (see _fastpolicy.c). */
#ifndef KVTIER_FASTLANES_H
#define KVTIER_FASTLANES_H
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

enum { K_LRU = 0, K_ARC = 1, K_S3 = 2 };
/* list ids: 0 none; LRU 1 = queue; ARC 1 = T1, 2 = T2, 3 = B1, 4 = B2; S3 1 = small, 2 = main, 3 = ghost */

typedef struct {
    int32_t head, tail;
    Py_ssize_t count;
} List;

typedef struct {
    int kind;
    Py_ssize_t capacity, small_target, ghost_limit, p;
    List lists[5];
    int32_t *prev, *next;
    uint8_t *where, *freq;
} Lane;

typedef struct {
    PyObject_HEAD
    PyObject **key;
    Py_hash_t *hash;
    int32_t *uses;
    int32_t cap, top, free_head, num;
    int32_t *slots;
    uint32_t mask;
    int num_lanes; /* policy lanes; lanes[num_lanes] is the warm queue, lanes[num_lanes + 1] the released */
    Lane *lanes;
    Py_ssize_t capacity;
    int warm;
    double *scores;
    double gain, decay, margin;
    uint64_t threshold, space;
    PyObject *hashfn;
    int32_t *buf;
    Py_ssize_t buf_cap;
} Core;

#define WARM(c) (&(c)->lanes[(c)->num_lanes])
#define REL(c) (&(c)->lanes[(c)->num_lanes + 1])
#define CACHED(ln, e) ((ln)->where[e] == 1 || (ln)->where[e] == 2)
#define SIZE(ln) ((ln)->lists[1].count + (ln)->lists[2].count)

/* -- entries and the key table ------------------------------------------------------------------ */

/* A key's first slot: Python hashes ints to themselves, so consecutive block ids would fill runs of
 * consecutive slots and linear probing would walk them; a multiplicative mix (Fibonacci hashing, high
 * bits) spreads them. */
static inline uint32_t home_of(Py_hash_t h, uint32_t mask) {
    return (uint32_t)(((uint64_t)h * 0x9E3779B97F4A7C15ULL) >> 32) & mask;
}

/* Rebuilds the key table (size slots, a power of 2) from the entries that have a key. */
static int reindex(Core *c, uint32_t size) {
    int32_t *slots = PyMem_Malloc(size * sizeof(int32_t));
    if (!slots) return -1;
    for (uint32_t i = 0; i < size; i++) slots[i] = -1;
    uint32_t mask = size - 1;
    for (int32_t e = 0; e < c->top; e++) {
        if (c->key[e] == NULL) continue;
        uint32_t i = home_of(c->hash[e], mask);
        while (slots[i] >= 0) i = (i + 1) & mask;
        slots[i] = e;
    }
    PyMem_Free(c->slots);
    c->slots = slots;
    c->mask = mask;
    return 0;
}

static int grow(Core *c) {
    int32_t cap = c->cap ? c->cap * 2 : 64;
    int nl = c->num_lanes + 2;
    if (!(c->key = PyMem_Realloc(c->key, cap * sizeof(PyObject *)))) return -1;
    if (!(c->hash = PyMem_Realloc(c->hash, cap * sizeof(Py_hash_t)))) return -1;
    if (!(c->uses = PyMem_Realloc(c->uses, cap * sizeof(int32_t)))) return -1;
    for (int i = 0; i < nl; i++) {
        Lane *ln = &c->lanes[i];
        if (!(ln->prev = PyMem_Realloc(ln->prev, cap * sizeof(int32_t)))) return -1;
        if (!(ln->next = PyMem_Realloc(ln->next, cap * sizeof(int32_t)))) return -1;
        if (!(ln->where = PyMem_Realloc(ln->where, cap))) return -1;
        if (!(ln->freq = PyMem_Realloc(ln->freq, cap))) return -1;
    }
    uint32_t size = 1;
    while (size < (uint32_t)cap * 2) size <<= 1;
    c->cap = cap;
    return reindex(c, size);
}

/* Makes room for one more entry. Entries no list holds stay in the table (a key that comes back finds
 * its entry; no deletion per eviction) until the table is full: then, when at least a quarter of it
 * is such idle entries, they are freed at once and the table rebuilt; else it doubles. */
static int make_room(Core *c) {
    int32_t idle = 0;
    for (int32_t e = 0; e < c->top; e++) idle += c->key[e] != NULL && c->uses[e] == 0;
    if (idle < c->cap / 4) return grow(c);
    for (int32_t e = 0; e < c->top; e++) {
        if (c->key[e] == NULL || c->uses[e] != 0) continue;
        PyObject *key = c->key[e];
        c->key[e] = NULL;
        c->uses[e] = c->free_head;
        c->free_head = e;
        c->num--;
        Py_DECREF(key);
    }
    return reindex(c, c->mask + 1);
}

/* The entry of `key`, or -1 when absent; -2 on an error (comparison raised). */
static int32_t find(Core *c, PyObject *key, Py_hash_t h) {
    uint32_t i = home_of(h, c->mask);
    for (;;) {
        int32_t e = c->slots[i];
        if (e < 0) return -1;
        if (c->hash[e] == h) {
            PyObject *k = c->key[e];
            if (k == key) return e;
            int r = PyObject_RichCompareBool(k, key, Py_EQ);
            if (r < 0) return -2;
            if (r) return e;
        }
        i = (i + 1) & c->mask;
    }
}

/* The entry of `key`, created (held by no list) when absent; -2 on an error. */
static int32_t find_or_add(Core *c, PyObject *key, Py_hash_t h) {
    int32_t e = find(c, key, h);
    if (e != -1) return e;
    if (c->free_head < 0 && c->top >= c->cap && make_room(c) < 0) {
        PyErr_NoMemory();
        return -2;
    }
    if (c->free_head >= 0) {
        e = c->free_head;
        c->free_head = c->uses[e];
    } else {
        e = c->top++;
    }
    Py_INCREF(key);
    c->key[e] = key;
    c->hash[e] = h;
    c->uses[e] = 0;
    for (int i = 0; i < c->num_lanes + 2; i++) {
        c->lanes[i].where[e] = 0;
        c->lanes[i].freq[e] = 0;
    }
    uint32_t i = home_of(h, c->mask);
    while (c->slots[i] >= 0) i = (i + 1) & c->mask;
    c->slots[i] = e;
    c->num++;
    return e;
}

/* -- lists ------------------------------------------------------------------------------------- */

static inline void append(Core *c, Lane *ln, int32_t e, int id) {
    List *l = &ln->lists[id];
    ln->where[e] = (uint8_t)id;
    ln->next[e] = -1;
    ln->prev[e] = l->tail;
    if (l->tail >= 0) ln->next[l->tail] = e;
    else l->head = e;
    l->tail = e;
    l->count++;
    c->uses[e]++;
}

static inline void unlink_(Core *c, Lane *ln, int32_t e) {
    List *l = &ln->lists[ln->where[e]];
    int32_t p = ln->prev[e], n = ln->next[e];
    if (p >= 0) ln->next[p] = n;
    else l->head = n;
    if (n >= 0) ln->prev[n] = p;
    else l->tail = p;
    l->count--;
    ln->where[e] = 0;
    c->uses[e]--;
}

static inline void move(Core *c, Lane *ln, int32_t e, int id) {
    unlink_(c, ln, e);
    append(c, ln, e, id);
}

static void pop_head(Core *c, Lane *ln, int id) { unlink_(c, ln, ln->lists[id].head); }

static int check_lane(Core *c, int lane) {
    if (lane < 0 || lane >= c->num_lanes) {
        PyErr_Format(PyExc_IndexError, "lane %d; expected 0 <= lane < %d", lane, c->num_lanes);
        return -1;
    }
    return 0;
}

/* Resolves keys into c->buf (entries created as needed), each pinned (held) until unpin. */
static int resolve(Core *c, PyObject **items, Py_ssize_t n) {
    if (n > c->buf_cap) {
        int32_t *buf = PyMem_Realloc(c->buf, n * sizeof(int32_t));
        if (!buf) {
            PyErr_NoMemory();
            return -1;
        }
        c->buf = buf;
        c->buf_cap = n;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        Py_hash_t h = PyObject_Hash(items[i]);
        int32_t e = h == -1 ? -2 : find_or_add(c, items[i], h);
        if (e < 0) {
            for (Py_ssize_t j = 0; j < i; j++) {
                c->uses[c->buf[j]]--;
            }
            return -1;
        }
        c->buf[i] = e;
        c->uses[e]++;
    }
    return 0;
}

static void unpin(Core *c, Py_ssize_t n) {
    for (Py_ssize_t i = 0; i < n; i++) {
        c->uses[c->buf[i]]--;
    }
}

/* -- one lane's policy --------------------------------------------------------------------------- */

static inline void lane_access(Core *c, Lane *ln, int32_t e) {
    if (ln->kind == K_S3) {
        if (ln->freq[e] < 3) ln->freq[e]++;
    } else {
        move(c, ln, e, ln->kind == K_ARC ? 2 : 1);
    }
}

static Py_ssize_t arc_adapted(Lane *ln, int32_t e) {
    Py_ssize_t b1 = ln->lists[3].count, b2 = ln->lists[4].count;
    if (e >= 0 && ln->where[e] == 3) {
        Py_ssize_t p = ln->p + (b2 / b1 > 1 ? b2 / b1 : 1);
        return p < ln->capacity ? p : ln->capacity;
    }
    if (e >= 0 && ln->where[e] == 4) {
        Py_ssize_t p = ln->p - (b1 / b2 > 1 ? b1 / b2 : 1);
        return p > 0 ? p : 0;
    }
    return ln->p;
}

static void lane_insert(Core *c, Lane *ln, int32_t e) {
    if (ln->kind == K_LRU) {
        append(c, ln, e, 1);
    } else if (ln->kind == K_ARC) {
        if (ln->where[e] == 3 || ln->where[e] == 4) {
            ln->p = arc_adapted(ln, e);
            move(c, ln, e, 2);
        } else {
            append(c, ln, e, 1);
        }
        Py_ssize_t cap = ln->capacity;
        while (ln->lists[1].count + ln->lists[3].count > cap && ln->lists[3].count) pop_head(c, ln, 3);
        while (SIZE(ln) + ln->lists[3].count + ln->lists[4].count > 2 * cap && ln->lists[4].count)
            pop_head(c, ln, 4);
    } else {
        ln->freq[e] = 0;
        if (ln->where[e] == 3) move(c, ln, e, 2);
        else append(c, ln, e, 1);
    }
}

/* The lane forgets a cached entry (ghost lists remember it); the caller frees it if no list holds it. */
static void lane_remove(Core *c, Lane *ln, int32_t e) {
    if (ln->kind == K_LRU) {
        unlink_(c, ln, e);
    } else if (ln->kind == K_ARC) {
        move(c, ln, e, ln->where[e] == 1 ? 3 : 4);
    } else if (ln->where[e] == 1) {
        move(c, ln, e, 3);
        while (ln->lists[3].count > ln->ghost_limit) pop_head(c, ln, 3);
    } else {
        unlink_(c, ln, e);
    }
}

/* 1 when `protect(key)` is true, 0 when not (or no predicate), -1 on an error. */
static inline int protected_(Core *c, PyObject *protect, int32_t e) {
    if (protect == NULL) return 0;
    PyObject *r = PyObject_CallOneArg(protect, c->key[e]);
    if (r == NULL) return -1;
    int t = PyObject_IsTrue(r);
    Py_DECREF(r);
    return t;
}

/* The first unprotected entry of a list, -1 when none, -2 on an error. */
static int32_t first_free(Core *c, Lane *ln, int id, PyObject *protect) {
    for (int32_t e = ln->lists[id].head; e >= 0; e = ln->next[e]) {
        int t = protected_(c, protect, e);
        if (t < 0) return -2;
        if (!t) return e;
    }
    return -1;
}

static int32_t lane_victim(Core *c, Lane *ln, PyObject *protect, int32_t incoming) {
    if (ln->kind == K_LRU) return first_free(c, ln, 1, protect);
    if (ln->kind == K_ARC) {
        Py_ssize_t p = arc_adapted(ln, incoming), t1 = ln->lists[1].count;
        int prefer_t1 = t1 > 0 && (t1 > p || (incoming >= 0 && ln->where[incoming] == 4 && t1 == p));
        int32_t e = first_free(c, ln, prefer_t1 ? 1 : 2, protect);
        return e == -1 ? first_free(c, ln, prefer_t1 ? 2 : 1, protect) : e;
    }
    List *small = &ln->lists[1], *main = &ln->lists[2];
    Py_ssize_t budget = 5 * SIZE(ln) + 5, small_skips = 0;
    while (budget-- > 0) {
        if (small->count && small_skips < small->count && (small->count >= ln->small_target || !main->count)) {
            int32_t e = small->head;
            if (ln->freq[e] > 1) {
                move(c, ln, e, 2);
                continue;
            }
            int t = protected_(c, protect, e);
            if (t < 0) return -2;
            if (!t) return e;
            move(c, ln, e, 1);
            small_skips++;
        } else if (main->count) {
            int32_t e = main->head;
            if (ln->freq[e] > 0) {
                ln->freq[e]--;
                move(c, ln, e, 2);
                continue;
            }
            int t = protected_(c, protect, e);
            if (t < 0) return -2;
            if (!t) return e;
            move(c, ln, e, 2);
        } else {
            return -1;
        }
    }
    return -1;
}

/* Policy.replay_request on one lane over resolved entries: the leading hits. */
static Py_ssize_t lane_replay(Core *c, Lane *ln, const int32_t *ents, Py_ssize_t n) {
    Py_ssize_t hits = 0;
    while (hits < n && CACHED(ln, ents[hits])) hits++;
    for (Py_ssize_t i = 0; i < n; i++) {
        int32_t e = ents[i];
        if (CACHED(ln, e)) {
            lane_access(c, ln, e);
            continue;
        }
        if (SIZE(ln) >= ln->capacity) {
            int32_t v = lane_victim(c, ln, NULL, e);
            if (v < 0) break;
            lane_remove(c, ln, v);
        }
        lane_insert(c, ln, e);
    }
    return hits;
}

#endif
