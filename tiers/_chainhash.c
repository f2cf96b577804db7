/* Chained blake2b-16 block keys in one C loop: key(i) = blake2b-16(key(i-1) + block i).
 *
 * The same keys as kvtier.tiers.keys' Python loop (checked by its test vectors); this only removes the
 * per-block interpreter work (a slice, a concatenation, a hasher object and a digest per block), which
 * was most of the time of hashing a 128k-token prompt. BLAKE2b as in RFC 7693 (unkeyed, 16-byte digest).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#define KEY_BYTES 16

static const uint64_t IV[8] = {
    0x6a09e667f3bcc908ULL, 0xbb67ae8584caa73bULL, 0x3c6ef372fe94f82bULL, 0xa54ff53a5f1d36f1ULL,
    0x510e527fade682d1ULL, 0x9b05688c2b3e6c1fULL, 0x1f83d9abfb41bd6bULL, 0x5be0cd19137e2179ULL};

static const uint8_t SIGMA[12][16] = {
    {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15}, {14, 10, 4, 8, 9, 15, 13, 6, 1, 12, 0, 2, 11, 7, 5, 3},
    {11, 8, 12, 0, 5, 2, 15, 13, 10, 14, 3, 6, 7, 1, 9, 4}, {7, 9, 3, 1, 13, 12, 11, 14, 2, 6, 5, 10, 4, 0, 15, 8},
    {9, 0, 5, 7, 2, 4, 10, 15, 14, 1, 11, 12, 6, 8, 3, 13}, {2, 12, 6, 10, 0, 11, 8, 3, 4, 13, 7, 5, 15, 14, 1, 9},
    {12, 5, 1, 15, 14, 13, 4, 10, 0, 7, 6, 3, 9, 2, 8, 11}, {13, 11, 7, 14, 12, 1, 3, 9, 5, 0, 15, 4, 8, 6, 2, 10},
    {6, 15, 14, 9, 11, 3, 0, 8, 12, 2, 13, 7, 1, 4, 10, 5}, {10, 2, 8, 4, 7, 6, 1, 5, 15, 11, 9, 14, 3, 12, 13, 0},
    {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15}, {14, 10, 4, 8, 9, 15, 13, 6, 1, 12, 0, 2, 11, 7, 5, 3}};

static inline uint64_t rotr64(uint64_t x, int n) { return (x >> n) | (x << (64 - n)); }

static inline uint64_t load64(const uint8_t *p) {
    uint64_t v;
    memcpy(&v, p, 8);
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
    v = __builtin_bswap64(v);
#endif
    return v;
}

#define G(a, b, c, d, x, y)            \
    do {                               \
        a = a + b + x;                 \
        d = rotr64(d ^ a, 32);         \
        c = c + d;                     \
        b = rotr64(b ^ c, 24);         \
        a = a + b + y;                 \
        d = rotr64(d ^ a, 16);         \
        c = c + d;                     \
        b = rotr64(b ^ c, 63);         \
    } while (0)

/* One compression of a 128-byte chunk; t is the byte count so far, last marks the final chunk. */
static void compress(uint64_t h[8], const uint8_t block[128], uint64_t t, int last) {
    uint64_t m[16], v[16];
    for (int i = 0; i < 16; i++) m[i] = load64(block + 8 * i);
    for (int i = 0; i < 8; i++) {
        v[i] = h[i];
        v[i + 8] = IV[i];
    }
    v[12] ^= t;
    if (last) v[14] = ~v[14];
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC unroll 12
#endif
    for (int r = 0; r < 12; r++) {
        const uint8_t *s = SIGMA[r];
        G(v[0], v[4], v[8], v[12], m[s[0]], m[s[1]]);
        G(v[1], v[5], v[9], v[13], m[s[2]], m[s[3]]);
        G(v[2], v[6], v[10], v[14], m[s[4]], m[s[5]]);
        G(v[3], v[7], v[11], v[15], m[s[6]], m[s[7]]);
        G(v[0], v[5], v[10], v[15], m[s[8]], m[s[9]]);
        G(v[1], v[6], v[11], v[12], m[s[10]], m[s[11]]);
        G(v[2], v[7], v[8], v[13], m[s[12]], m[s[13]]);
        G(v[3], v[4], v[9], v[14], m[s[14]], m[s[15]]);
    }
    for (int i = 0; i < 8; i++) h[i] ^= v[i] ^ v[i + 8];
}

/* blake2b-16 of (prev 16 bytes + n bytes at data) into out. */
static void key_of(const uint8_t prev[KEY_BYTES], const uint8_t *data, size_t n, uint8_t out[KEY_BYTES]) {
    uint64_t h[8];
    uint8_t chunk[128];
    size_t total = KEY_BYTES + n, done = 0, have;
    memcpy(h, IV, sizeof h);
    h[0] ^= 0x01010000ULL ^ KEY_BYTES;
    /* the first chunk: the previous key then the block's first bytes */
    memcpy(chunk, prev, KEY_BYTES);
    have = n < 128 - KEY_BYTES ? n : 128 - KEY_BYTES;
    memcpy(chunk + KEY_BYTES, data, have);
    data += have;
    n -= have;
    if (n == 0) {
        memset(chunk + KEY_BYTES + have, 0, 128 - KEY_BYTES - have);
        compress(h, chunk, total, 1);
    } else {
        compress(h, chunk, done += 128, 0);
        while (n > 128) {
            compress(h, data, done += 128, 0);
            data += 128;
            n -= 128;
        }
        memcpy(chunk, data, n);
        memset(chunk + n, 0, 128 - n);
        compress(h, chunk, total, 1);
    }
    for (int i = 0; i < 2; i++) {
        uint64_t v = h[i];
        for (int j = 0; j < 8; j++) out[8 * i + j] = (uint8_t)(v >> (8 * j));
    }
}

PyDoc_STRVAR(chain_doc,
             "chain(data, step, parent, num) -> list[bytes]\n\n"
             "The keys of num blocks of step bytes each at the start of data (a contiguous buffer):\n"
             "key(i) = blake2b-16(key(i-1) + block i), key(-1) = parent (16 bytes).");

static PyObject *chain(PyObject *self, PyObject *args) {
    Py_buffer data, parent;
    Py_ssize_t step, num;
    if (!PyArg_ParseTuple(args, "y*ny*n", &data, &step, &parent, &num)) return NULL;
    PyObject *result = NULL;
    uint8_t *keys = NULL;
    if (parent.len != KEY_BYTES) {
        PyErr_Format(PyExc_ValueError, "parent: expected %d bytes, got %zd", KEY_BYTES, parent.len);
        goto done;
    }
    if (step <= 0 || num < 0 || num > data.len / step) {
        PyErr_Format(PyExc_ValueError, "step %zd, num %zd: expected step > 0 and 0 <= num <= %zd", step, num,
                     step > 0 ? data.len / step : 0);
        goto done;
    }
    keys = PyMem_RawMalloc((size_t)(num ? num : 1) * KEY_BYTES);
    if (keys == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    Py_BEGIN_ALLOW_THREADS
    const uint8_t *prev = parent.buf;
    for (Py_ssize_t i = 0; i < num; i++) {
        key_of(prev, (const uint8_t *)data.buf + i * step, (size_t)step, keys + i * KEY_BYTES);
        prev = keys + i * KEY_BYTES;
    }
    Py_END_ALLOW_THREADS
    result = PyList_New(num);
    if (result == NULL) goto done;
    for (Py_ssize_t i = 0; i < num; i++) {
        PyObject *k = PyBytes_FromStringAndSize((const char *)keys + i * KEY_BYTES, KEY_BYTES);
        if (k == NULL) {
            Py_CLEAR(result);
            goto done;
        }
        PyList_SET_ITEM(result, i, k);
    }
done:
    PyMem_RawFree(keys);
    PyBuffer_Release(&data);
    PyBuffer_Release(&parent);
    return result;
}

static PyMethodDef methods[] = {{"chain", chain, METH_VARARGS, chain_doc}, {NULL, NULL, 0, NULL}};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_chainhash",
                                    "Chained blake2b-16 block keys in one C loop.", -1, methods};

PyMODINIT_FUNC PyInit__chainhash(void) { return PyModule_Create(&module); }
