/* Exact signed binning of a dense CPU float32/float64 buffer in one pass.
 *
 * The same bins as torch_nvdla.calib.histogram._count_cpu_torch: element x goes to bin
 * bins + trunc((x * pre) * step) - [x < 0], computed in the buffer's own precision (pre
 * and step are powers of two, so the products are exact unless they underflow, and then
 * the truncation is 0 either way). The caller guarantees |x * pre * step| < bins and no
 * NaN, so every index is in [0, 2 * bins). y is clamped to [-(bins - 1), bins - 1], which
 * changes no truncation of a valid y and keeps any other value (a broken guarantee, NaN)
 * from indexing out of bounds.
 *
 * Built as an optional extension (setup.py); without it the torch path is used. Plain C99,
 * no target-specific flags: it runs on any x86-64 (or other) CPU it was compiled on.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* Increments rotate over WAYS sub-histograms so that runs of equal values (the zeros of a
 * ReLU) do not wait on each other; BLOCK indices are computed (vectorisably) before they
 * are counted. */
#define WAYS 4
#define BLOCK 512
/* A sub-histogram bin counts at most FLUSH / WAYS values between flushes (< 2**32). */
#define FLUSH ((int64_t)1 << 31)

/* On x86-64 with GCC, an AVX2 clone of each kernel is chosen at load time on CPUs that
 * have AVX2 (the same arithmetic, wider vectors); every other CPU runs the baseline. */
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define CLONES __attribute__((target_clones("avx2", "default")))
#else
#define CLONES
#endif

#define DEFINE_COUNT(NAME, T)                                                               \
    CLONES static void NAME(const T *x, int64_t n, int32_t bins, T pre, T step, uint32_t *ways,    \
                     int64_t *counts) {                                                     \
        const int32_t width = 2 * bins;                                                     \
        const T hi = (T)(bins - 1); /* trunc(y) is the same for y in [hi, bins) */          \
        int32_t index[BLOCK];                                                               \
        int64_t since_flush = 0;                                                            \
        for (int64_t start = 0; start < n; start += BLOCK) {                                \
            const int32_t m = (int32_t)(n - start < BLOCK ? n - start : BLOCK);             \
            const T *p = x + start;                                                         \
            for (int32_t j = 0; j < m; j++) {                                               \
                const T v = p[j];                                                           \
                T y = (v * pre) * step;                                                     \
                y = y < hi ? y : hi; /* NaN -> hi */                                        \
                y = y > -hi ? y : -hi;                                                      \
                index[j] = bins + (int32_t)y - (int32_t)(v < (T)0);                         \
            }                                                                               \
            int32_t j = 0;                                                                  \
            for (; j + WAYS <= m; j += WAYS) {                                              \
                ways[index[j]]++;                                                           \
                ways[width + index[j + 1]]++;                                               \
                ways[2 * width + index[j + 2]]++;                                           \
                ways[3 * width + index[j + 3]]++;                                           \
            }                                                                               \
            for (; j < m; j++) ways[index[j]]++;                                            \
            since_flush += m;                                                               \
            if (since_flush >= FLUSH - BLOCK) {                                             \
                flush(ways, width, counts);                                                 \
                since_flush = 0;                                                            \
            }                                                                               \
        }                                                                                   \
        flush(ways, width, counts);                                                         \
    }

static void flush(uint32_t *ways, int32_t width, int64_t *counts) {
    for (int32_t w = 0; w < WAYS; w++) {
        uint32_t *h = ways + (size_t)w * width;
        for (int32_t b = 0; b < width; b++) counts[b] += h[b];
    }
    memset(ways, 0, sizeof(uint32_t) * (size_t)WAYS * width);
}

DEFINE_COUNT(count_float, float)
DEFINE_COUNT(count_double, double)

PyDoc_STRVAR(count_doc,
"count(data_ptr, n, wide, bins, pre, step, counts_ptr)\n\n"
"Add the signed bin counts of n contiguous values at data_ptr (float64 when wide, else\n"
"float32) to the 2 * bins int64 counts at counts_ptr. The GIL is released meanwhile.");

static PyObject *count(PyObject *self, PyObject *args) {
    unsigned long long data, out;
    Py_ssize_t n;
    int wide, bins;
    double pre, step;
    (void)self;
    if (!PyArg_ParseTuple(args, "KnpiddK", &data, &n, &wide, &bins, &pre, &step, &out)) return NULL;
    if (n < 0 || bins < 1 || bins > (1 << 24)) {
        PyErr_SetString(PyExc_ValueError, "count: n must be >= 0 and bins in [1, 2**24]");
        return NULL;
    }
    uint32_t *ways = calloc((size_t)WAYS * 2 * (size_t)bins, sizeof(uint32_t));
    if (ways == NULL) return PyErr_NoMemory();
    Py_BEGIN_ALLOW_THREADS
    if (wide)
        count_double((const double *)(uintptr_t)data, n, bins, pre, step, ways, (int64_t *)(uintptr_t)out);
    else
        count_float((const float *)(uintptr_t)data, n, bins, (float)pre, (float)step, ways,
                    (int64_t *)(uintptr_t)out);
    Py_END_ALLOW_THREADS
    free(ways);
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"count", count, METH_VARARGS, count_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_binning", "Exact signed binning of CPU buffers (see histogram.py).", -1, methods,
};

PyMODINIT_FUNC PyInit__binning(void) { return PyModule_Create(&module); }
