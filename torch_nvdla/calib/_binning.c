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
 * Built as an optional extension (setup.py); without it the torch path is used. Plain C11,
 * no target-specific flags: it runs on any x86-64 (or other) CPU it was compiled on.
 *
 * Built with OpenMP where the compiler has it: a large buffer is then split into
 * contiguous parts counted by the threads of the OpenMP runtime already loaded (torch's,
 * whose workers are still spinning after the layer that made the tensor), each into its
 * own sub-histograms; integer counts, so the sum is the same in any order.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

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

/* Below this many values per thread a part is not worth a thread. */
#define MIN_PER_THREAD ((int64_t)1 << 16)

#if defined(_MSC_VER)
#define THREAD_LOCAL __declspec(thread)
#else
#define THREAD_LOCAL _Thread_local
#endif

/* Each thread keeps its zeroed scratch (sub-histograms; the counts of its part of a split
 * buffer) between calls, so that a call neither allocates nor zeroes it: a flush leaves
 * the sub-histograms zero, and a part's counts are zeroed once added. Scratch above
 * KEEP_BYTES (an unusually large bin count) is allocated per call instead. */
#define KEEP_BYTES ((size_t)1 << 21)
static THREAD_LOCAL void *kept[2] = {NULL, NULL};
static THREAD_LOCAL size_t kept_bytes[2] = {0, 0};

/* Zeroed scratch of `bytes` for use `which` (0: sub-histograms, 1: part counts), or NULL. */
static void *scratch(int which, size_t bytes) {
    if (bytes > KEEP_BYTES) return calloc(bytes, 1);
    if (kept_bytes[which] < bytes) {
        void *bigger = calloc(bytes, 1);
        if (bigger == NULL) return NULL;
        free(kept[which]);
        kept[which] = bigger;
        kept_bytes[which] = bytes;
    }
    return kept[which];
}

/* Give scratch back (it must be zero again). */
static void release(void *p, size_t bytes) {
    if (bytes > KEEP_BYTES) free(p);
}

/* Count n values into counts (2 * bins int64) in one thread. Returns 0, or -1 when out of
 * memory (counts untouched). */
static int count_serial(const void *data, int64_t n, int wide, int32_t bins, double pre, double step,
                        int64_t *counts) {
    const size_t bytes = (size_t)WAYS * 2 * (size_t)bins * sizeof(uint32_t);
    uint32_t *ways = scratch(0, bytes);
    if (ways == NULL) return -1;
    if (wide)
        count_double((const double *)data, n, bins, pre, step, ways, counts);
    else
        count_float((const float *)data, n, bins, (float)pre, (float)step, ways, counts);
    release(ways, bytes);
    return 0;
}

/* count_serial over up to `threads` contiguous parts. Returns 0 or -1 (out of memory;
 * counts may then hold part of the counts). */
static int count_parts(const void *data, int64_t n, int wide, int32_t bins, double pre, double step,
                       int64_t *counts, int threads) {
    int64_t most = n / MIN_PER_THREAD;
    if (threads > most) threads = (int)most;
#ifdef _OPENMP
    if (threads > 1) {
        int failed = 0;
        const size_t size = wide ? sizeof(double) : sizeof(float);
#pragma omp parallel num_threads(threads)
        {
            const int64_t k = omp_get_thread_num(), t = omp_get_num_threads();
            const int64_t lo = n * k / t, hi = n * (k + 1) / t;
            const size_t bytes = (size_t)2 * bins * sizeof(int64_t);
            int64_t *part = scratch(1, bytes);
            int bad = part == NULL ||
                      count_serial((const char *)data + lo * size, hi - lo, wide, bins, pre, step, part) != 0;
#pragma omp critical(torch_nvdla_binning)
            {
                if (bad)
                    failed = 1;
                else
                    for (int32_t b = 0; b < 2 * bins; b++) counts[b] += part[b];
            }
            if (part != NULL) {
                memset(part, 0, bytes);
                release(part, bytes);
            }
        }
        return failed ? -1 : 0;
    }
#else
    (void)threads;
#endif
    return count_serial(data, n, wide, bins, pre, step, counts);
}

PyDoc_STRVAR(count_doc,
"count(data_ptr, n, wide, bins, pre, step, counts_ptr, threads=1)\n\n"
"Add the signed bin counts of n contiguous values at data_ptr (float64 when wide, else\n"
"float32) to the 2 * bins int64 counts at counts_ptr, using up to `threads` OpenMP\n"
"threads for large buffers. The GIL is released meanwhile.");

static PyObject *count(PyObject *self, PyObject *args) {
    unsigned long long data, out;
    Py_ssize_t n;
    int wide, bins, threads = 1, rc;
    double pre, step;
    (void)self;
    if (!PyArg_ParseTuple(args, "KnpiddK|i", &data, &n, &wide, &bins, &pre, &step, &out, &threads)) return NULL;
    if (n < 0 || bins < 1 || bins > (1 << 24) || threads < 1) {
        PyErr_SetString(PyExc_ValueError, "count: n must be >= 0, bins in [1, 2**24] and threads >= 1");
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS
    rc = count_parts((const void *)(uintptr_t)data, n, wide, bins, pre, step, (int64_t *)(uintptr_t)out, threads);
    Py_END_ALLOW_THREADS
    if (rc != 0) return PyErr_NoMemory();
    Py_RETURN_NONE;
}

static PyObject *openmp(PyObject *self, PyObject *args) {
    (void)self;
    (void)args;
#ifdef _OPENMP
    Py_RETURN_TRUE;
#else
    Py_RETURN_FALSE;
#endif
}

static PyMethodDef methods[] = {
    {"count", count, METH_VARARGS, count_doc},
    {"openmp", openmp, METH_NOARGS, "Whether the kernel was built with OpenMP."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_binning", "Exact signed binning of CPU buffers (see histogram.py).", -1, methods,
};

PyMODINIT_FUNC PyInit__binning(void) { return PyModule_Create(&module); }
