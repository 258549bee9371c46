/* C kernels of the calibration pass (loaded by native.py; each has a torch path in
 * histogram.py / strategies.py that gives the same results):
 *
 * count: exact signed binning of a dense CPU float32/float64 buffer in one pass. The same
 * bins as histogram._count_cpu_torch: element x goes to bin
 * bins + trunc((x * pre) * step) - [x < 0], computed in the buffer's own precision (pre
 * and step are powers of two, so the products are exact unless they underflow, and then
 * the truncation is 0 either way). The caller guarantees |x * pre * step| < bins and no
 * NaN, so every index is in [0, 2 * bins). y is clamped to [-(bins - 1), bins - 1], which
 * changes no truncation of a valid y and keeps any other value (a broken guarantee, NaN)
 * from indexing out of bounds. The same pass finds the extremes, so the caller can count
 * at a guessed range (a running total's) and learn whether the guarantee held.
 *
 * extremes: min and max of such a buffer by integer keys (see KEY).
 *
 * relu_fold: a ReLU's counts from its input's (the non-positive side moved to bin 0).
 *
 * rebin_add: counts added into a total at a larger power-of-two range.
 *
 * pair_ratios, level_sums: the entropy search's pair table and its gather-and-sum.
 *
 * Built as an optional extension (setup.py); without it the torch paths are used. Plain
 * C11, no target-specific flags: it runs on any x86-64 (or other) CPU it was compiled on.
 *
 * Built with OpenMP where the compiler has it: a large buffer is then split into
 * contiguous parts handled by the threads of the OpenMP runtime already loaded (torch's,
 * whose workers are still spinning after the layer that made the tensor); integer counts
 * and min/max, so the result is the same in any order.
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
_Static_assert(WAYS == 4 && BLOCK % WAYS == 0, "the count loop and flush are written for four ways");
/* Sub-histograms are uint16 (four of 2 * 2048 bins fit a 32 KiB L1 cache). Between
 * flushes a way receives at most FLUSH / WAYS values plus the up to WAYS - 1 of a call's
 * last partial round (always way 0), so no bin passes UINT16_MAX. */
#define FLUSH ((int64_t)WAYS * (UINT16_MAX - WAYS))

/* On x86-64 with GCC, an AVX2 clone of each kernel is chosen at load time on CPUs that
 * have AVX2 (the same arithmetic, wider vectors); every other CPU runs the baseline. */
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define CLONES __attribute__((target_clones("avx2", "default")))
#else
#define CLONES
#endif

/* Extremes by integer keys: KEY(bits) = bits ^ ((bits >> (w - 1)) & INT_MAX) orders every
 * non-NaN float like its value (negative floats have their magnitude bits reversed), and an
 * integer min/max vectorises without any floating-point flag. A NaN's key lies above
 * key(+inf) (sign clear) or below key(-inf) (sign set), so one comparison of each extreme
 * finds it. -0.0 keys below +0.0. The count loop keeps them too (one pass for both). */
#define KEY(I, MASK, v) ((v) ^ (((v) >> (8 * sizeof(I) - 1)) & (I)(MASK)))

#define DEFINE_COUNT(NAME, T, I, MASK)                                                      \
    CLONES static void NAME(const T *x, int64_t n, int32_t bins, T pre, T step, uint16_t *ways,    \
                     int64_t *counts, I *lo_out, I *hi_out) {                               \
        const int32_t width = 2 * bins;                                                     \
        const T hi = (T)(bins - 1); /* trunc(y) is the same for y in [hi, bins) */          \
        uint32_t index[BLOCK]; /* (non-negative: 0 <= index < width) */                     \
        int64_t since_flush = 0;                                                            \
        I lo_key = *lo_out, hi_key = *hi_out;                                               \
        for (int64_t start = 0; start < n; start += BLOCK) {                                \
            const int32_t m = (int32_t)(n - start < BLOCK ? n - start : BLOCK);             \
            const T *p = x + start;                                                         \
            const I *b = (const I *)(const void *)p;                                        \
            for (int32_t j = 0; j < m; j++) {                                               \
                const T v = p[j];                                                           \
                const I k = KEY(I, MASK, b[j]);                                             \
                lo_key = k < lo_key ? k : lo_key;                                           \
                hi_key = k > hi_key ? k : hi_key;                                           \
                T y = (v * pre) * step;                                                     \
                y = y < hi ? y : hi; /* NaN -> hi */                                        \
                y = y > -hi ? y : -hi;                                                      \
                index[j] = (uint32_t)(bins + (int32_t)y - (int32_t)(v < (T)0));             \
            }                                                                               \
            int32_t j = 0;                                                                  \
            for (; j + WAYS <= m; j += WAYS) { /* two indices a 64-bit load (either order) */\
                uint64_t a, c;                                                              \
                memcpy(&a, index + j, sizeof a);                                            \
                memcpy(&c, index + j + 2, sizeof c);                                        \
                ways[(uint32_t)a]++;                                                        \
                ways[width + (a >> 32)]++;                                                  \
                ways[2 * width + (uint32_t)c]++;                                            \
                ways[3 * width + (c >> 32)]++;                                              \
            }                                                                               \
            for (; j < m; j++) ways[index[j]]++;                                            \
            since_flush += m;                                                               \
            if (since_flush >= FLUSH - BLOCK) {                                             \
                flush(ways, width, counts);                                                 \
                since_flush = 0;                                                            \
            }                                                                               \
        }                                                                                   \
        flush(ways, width, counts);                                                         \
        *lo_out = lo_key;                                                                   \
        *hi_out = hi_key;                                                                   \
    }

/* The sub-histograms added into counts (one pass over counts), then zeroed. */
CLONES static void flush(uint16_t *ways, int32_t width, int64_t *counts) {
    const uint16_t *h1 = ways + width, *h2 = ways + 2 * (size_t)width, *h3 = ways + 3 * (size_t)width;
    for (int32_t b = 0; b < width; b++) counts[b] += (uint32_t)ways[b] + h1[b] + h2[b] + h3[b];
    memset(ways, 0, sizeof(uint16_t) * (size_t)WAYS * width);
}

/* dst[i] += src[i] for i < n (a part's or a batch's counts into a total). */
CLONES static void add_counts(int64_t *dst, const int64_t *src, int64_t n) {
    for (int64_t i = 0; i < n; i++) dst[i] += src[i];
}

DEFINE_COUNT(count_float, float, int32_t, INT32_MAX)
DEFINE_COUNT(count_double, double, int64_t, INT64_MAX)

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

/* Count n values into counts (2 * bins int64) in one thread, and their keys into
 * [*lo, *hi]. Returns 0, or -1 when out of memory (counts untouched). */
static int count_serial(const void *data, int64_t n, int wide, int32_t bins, double pre, double step,
                        int64_t *counts, int64_t *lo, int64_t *hi) {
    const size_t bytes = (size_t)WAYS * 2 * (size_t)bins * sizeof(uint16_t);
    uint16_t *ways = scratch(0, bytes);
    if (ways == NULL) return -1;
    if (wide) {
        int64_t l = INT64_MAX, h = INT64_MIN;
        count_double((const double *)data, n, bins, pre, step, ways, counts, &l, &h);
        *lo = l < *lo ? l : *lo;
        *hi = h > *hi ? h : *hi;
    } else {
        int32_t l = INT32_MAX, h = INT32_MIN;
        count_float((const float *)data, n, bins, (float)pre, (float)step, ways, counts, &l, &h);
        *lo = l < *lo ? l : *lo;
        *hi = h > *hi ? h : *hi;
    }
    release(ways, bytes);
    return 0;
}

/* count_serial over up to `threads` contiguous parts; the keys' extremes in *lo, *hi.
 * Returns 0 or -1 (out of memory; counts may then hold part of the counts). */
static int count_parts(const void *data, int64_t n, int wide, int32_t bins, double pre, double step,
                       int64_t *counts, int threads, int64_t *lo, int64_t *hi) {
    int64_t most = n / MIN_PER_THREAD;
    int64_t l = INT64_MAX, h = INT64_MIN;
    if (threads > most) threads = (int)most;
#ifdef _OPENMP
    if (threads > 1) {
        int failed = 0;
        const size_t size = wide ? sizeof(double) : sizeof(float);
#pragma omp parallel num_threads(threads) reduction(min : l) reduction(max : h)
        {
            const int64_t k = omp_get_thread_num(), t = omp_get_num_threads();
            const int64_t a = n * k / t, b = n * (k + 1) / t;
            const size_t bytes = (size_t)2 * bins * sizeof(int64_t);
            int64_t *part = scratch(1, bytes);
            int bad = part == NULL ||
                      count_serial((const char *)data + a * size, b - a, wide, bins, pre, step, part, &l, &h) != 0;
#pragma omp critical(torch_nvdla_binning)
            {
                if (bad)
                    failed = 1;
                else
                    add_counts(counts, part, 2 * (int64_t)bins);
            }
            if (part != NULL) {
                memset(part, 0, bytes);
                release(part, bytes);
            }
        }
        *lo = l;
        *hi = h;
        return failed ? -1 : 0;
    }
#else
    (void)threads;
#endif
    int rc = count_serial(data, n, wide, bins, pre, step, counts, &l, &h);
    *lo = l;
    *hi = h;
    return rc;
}

/* The smallest and largest KEY of n values. */
#define DEFINE_KEYS(NAME, T, I, MASK)                                                      \
    CLONES static void NAME(const T *x, int64_t n, I *lo_out, I *hi_out) {                  \
        const I *b = (const I *)(const void *)x;                                            \
        I lo = *lo_out, hi = *hi_out;                                                       \
        for (int64_t i = 0; i < n; i++) {                                                   \
            const I k = KEY(I, MASK, b[i]);                                                 \
            lo = k < lo ? k : lo;                                                           \
            hi = k > hi ? k : hi;                                                           \
        }                                                                                   \
        *lo_out = lo;                                                                       \
        *hi_out = hi;                                                                       \
    }

DEFINE_KEYS(keys_float, float, int32_t, INT32_MAX)
DEFINE_KEYS(keys_double, double, int64_t, INT64_MAX)

/* The float (as a double) whose key is k. */
static double from_key(int64_t k, int wide) {
    if (wide) {
        const int64_t bits = k ^ ((k >> 63) & INT64_MAX);
        double v;
        memcpy(&v, &bits, sizeof v);
        return v;
    }
    const int32_t k32 = (int32_t)k, bits = k32 ^ ((k32 >> 31) & INT32_MAX);
    float v;
    memcpy(&v, &bits, sizeof v);
    return (double)v;
}

/* Keys of the n values at data into [*lo, *hi]. */
static void keys_serial(const void *data, int64_t n, int wide, int64_t *lo, int64_t *hi) {
    if (wide) {
        int64_t l = INT64_MAX, h = INT64_MIN;
        keys_double((const double *)data, n, &l, &h);
        *lo = l < *lo ? l : *lo;
        *hi = h > *hi ? h : *hi;
    } else {
        int32_t l = INT32_MAX, h = INT32_MIN;
        keys_float((const float *)data, n, &l, &h);
        *lo = l < *lo ? l : *lo;
        *hi = h > *hi ? h : *hi;
    }
}

/* keys_serial over up to `threads` contiguous parts (the parts count_parts gives each
 * thread, so that a thread reads the same values twice). */
static void keys_parts(const void *data, int64_t n, int wide, int threads, int64_t *lo, int64_t *hi) {
    int64_t most = n / MIN_PER_THREAD;
    if (threads > most) threads = (int)most;
    int64_t l = INT64_MAX, h = INT64_MIN;
#ifdef _OPENMP
    if (threads > 1) {
        const size_t size = wide ? sizeof(double) : sizeof(float);
#pragma omp parallel num_threads(threads) reduction(min : l) reduction(max : h)
        {
            const int64_t k = omp_get_thread_num(), t = omp_get_num_threads();
            const int64_t a = n * k / t, b = n * (k + 1) / t;
            keys_serial((const char *)data + a * size, b - a, wide, &l, &h);
        }
        *lo = l;
        *hi = h;
        return;
    }
#else
    (void)threads;
#endif
    keys_serial(data, n, wide, &l, &h);
    *lo = l;
    *hi = h;
}

PyDoc_STRVAR(extremes_doc,
"extremes(data_ptr, n, wide, threads=1) -> (min, max)\n\n"
"The smallest and the largest of n > 0 contiguous values at data_ptr (float64 when wide,\n"
"else float32) as Python floats; (nan, nan) when any value is NaN. Up to `threads`\n"
"OpenMP threads for large buffers; the GIL is released meanwhile.");

/* The values of the extreme keys lo, hi into *vlo, *vhi; returns 0, or -1 when either is
 * a NaN's (anything beyond the keys of -inf and +inf). */
static int key_values(int64_t lo, int64_t hi, int wide, double *vlo, double *vhi) {
    const int64_t pos_inf = wide ? (int64_t)0x7ff0000000000000LL : (int64_t)0x7f800000;
    const int64_t neg_inf = wide ? (int64_t)0x7ff0000000000000LL ^ INT64_MAX ^ INT64_MIN
                                 : (int64_t)(int32_t)(0xff800000u ^ 0x7fffffffu);
    if (hi > pos_inf || lo < neg_inf) return -1;
    *vlo = from_key(lo, wide);
    *vhi = from_key(hi, wide);
    return 0;
}

static PyObject *extremes(PyObject *self, PyObject *args) {
    unsigned long long data;
    Py_ssize_t n;
    int wide, threads = 1;
    int64_t lo, hi;
    double vlo, vhi;
    (void)self;
    if (!PyArg_ParseTuple(args, "Knp|i", &data, &n, &wide, &threads)) return NULL;
    if (n < 1 || threads < 1) {
        PyErr_SetString(PyExc_ValueError, "extremes: n must be >= 1 and threads >= 1");
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS
    keys_parts((const void *)(uintptr_t)data, n, wide, threads, &lo, &hi);
    Py_END_ALLOW_THREADS
    if (key_values(lo, hi, wide, &vlo, &vhi) != 0) return Py_BuildValue("(dd)", Py_NAN, Py_NAN);
    return Py_BuildValue("(dd)", vlo, vhi);
}

/* Whether v (a value of the buffer's precision) lies strictly inside the bins:
 * |(v * pre) * step| < bins, computed as the count loop computes it. */
static int inside(double v, int wide, int32_t bins, double pre, double step) {
    const double y = wide ? (v * pre) * step : (double)(((float)v * (float)pre) * (float)step);
    return y < (double)bins && y > -(double)bins;
}

PyDoc_STRVAR(count_doc,
"count(data_ptr, n, wide, bins, pre, step, counts_ptr, threads=1, also_ptr=0)\n"
"    -> (min, max, added)\n\n"
"Write the signed bin counts of n contiguous values at data_ptr (float64 when wide, else\n"
"float32) to the 2 * bins int64 at counts_ptr, using up to `threads` OpenMP threads for\n"
"large buffers, and return the values' extremes as extremes() does ((inf, -inf) when n is\n"
"0). The counts are valid when every value lies inside the bins (|x * pre * step| < bins,\n"
"no NaN); then, when also_ptr is not 0, they are also added to the 2 * bins int64 there (a\n"
"running total at the same range) and `added` is True. The GIL is released meanwhile.");

static PyObject *count(PyObject *self, PyObject *args) {
    unsigned long long data, out, also = 0;
    Py_ssize_t n;
    int wide, bins, threads = 1, rc, added = 0;
    double pre, step, vlo = Py_HUGE_VAL, vhi = -Py_HUGE_VAL;
    int64_t lo, hi;
    (void)self;
    if (!PyArg_ParseTuple(args, "KnpiddK|iK", &data, &n, &wide, &bins, &pre, &step, &out, &threads, &also))
        return NULL;
    if (n < 0 || bins < 1 || bins > (1 << 24) || threads < 1) {
        PyErr_SetString(PyExc_ValueError, "count: n must be >= 0, bins in [1, 2**24] and threads >= 1");
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS
    memset((void *)(uintptr_t)out, 0, sizeof(int64_t) * 2 * (size_t)bins);
    rc = count_parts((const void *)(uintptr_t)data, n, wide, bins, pre, step, (int64_t *)(uintptr_t)out, threads,
                     &lo, &hi);
    if (rc == 0) {
        int ok = 1;
        if (n > 0 && key_values(lo, hi, wide, &vlo, &vhi) != 0) {
            vlo = vhi = Py_NAN;
            ok = 0;
        } else if (n > 0) {
            ok = inside(vlo, wide, bins, pre, step) && inside(vhi, wide, bins, pre, step);
        }
        if (ok && also != 0) {
            add_counts((int64_t *)(uintptr_t)also, (const int64_t *)(uintptr_t)out, 2 * (int64_t)bins);
            added = 1;
        }
    }
    Py_END_ALLOW_THREADS
    if (rc != 0) return PyErr_NoMemory();
    return Py_BuildValue("(ddO)", vlo, vhi, added ? Py_True : Py_False);
}

/* The entropy search's level sums (strategies.py, _entropy_rows): for every candidate k
 * and histogram t, the sum of the L pair-table entries table[index[k][l]][t], added as a
 * binary tree (v[j] += v[j + h] for j < h = n / 2, an odd last entry carried; the order
 * the torch path uses too, so both give the same bits). The table is pairs x rows: one
 * look-up brings a level's entries of every histogram, summed as vectors of `rows`. */
static int level_sums_rows(const double *table, int64_t rows, int64_t pairs, const int64_t *index,
                           int32_t levels, double *out, int64_t k0, int64_t k1) {
    double *v = malloc(sizeof(double) * (size_t)levels * (size_t)rows);
    if (v == NULL) return -2;
    for (int64_t k = k0; k < k1; k++) {
        const int64_t *ix = index + k * levels;
        for (int32_t l = 0; l < levels; l++)
            if (ix[l] < 0 || ix[l] >= pairs) {
                free(v);
                return -1;
            }
        /* The tree's first step straight from the table, then the rest in v. */
        int32_t n = levels;
        if (n == 1) {
            memcpy(v, table + ix[0] * rows, sizeof(double) * (size_t)rows);
        } else {
            const int32_t h = n / 2;
            for (int32_t j = 0; j < h; j++) {
                double *a = v + (size_t)j * rows;
                const double *x = table + ix[j] * rows, *y = table + ix[j + h] * rows;
                for (int64_t t = 0; t < rows; t++) a[t] = x[t] + y[t];
            }
            if (n & 1) memcpy(v + (size_t)h * rows, table + ix[2 * h] * rows, sizeof(double) * (size_t)rows);
            n = h + (n & 1);
        }
        while (n > 1) {
            const int32_t h = n / 2;
            for (int32_t j = 0; j < h; j++) {
                double *a = v + (size_t)j * rows;
                const double *b = v + (size_t)(j + h) * rows;
                for (int64_t t = 0; t < rows; t++) a[t] += b[t];
            }
            if (n & 1) memcpy(v + (size_t)h * rows, v + (size_t)(2 * h) * rows, sizeof(double) * (size_t)rows);
            n = h + (n & 1);
        }
        memcpy(out + k * rows, v, sizeof(double) * (size_t)rows);
    }
    free(v);
    return 0;
}

PyDoc_STRVAR(level_sums_doc,
"level_sums(table_ptr, rows, pairs, index_ptr, candidates, levels, out_ptr, threads=1)\n\n"
"out[k, t] = tree sum over l < levels of table[index[k, l], t]: table is pairs x rows\n"
"float64, index candidates x levels int64 (each entry in [0, pairs)), out candidates x rows\n"
"float64, all contiguous. Up to `threads` OpenMP threads; the GIL is released meanwhile.");

static PyObject *level_sums(PyObject *self, PyObject *args) {
    unsigned long long table, index, out;
    Py_ssize_t rows, pairs, candidates;
    int levels, threads = 1, failed = 0; /* 1: bad index, 2: out of memory */
    (void)self;
    if (!PyArg_ParseTuple(args, "KnnKniK|i", &table, &rows, &pairs, &index, &candidates, &levels, &out, &threads))
        return NULL;
    if (rows < 0 || pairs < 1 || candidates < 0 || levels < 1 || levels > (1 << 16) || threads < 1) {
        PyErr_SetString(PyExc_ValueError, "level_sums: rows, candidates >= 0, pairs >= 1, levels in [1, 65536], "
                                          "threads >= 1");
        return NULL;
    }
    const double *tb = (const double *)(uintptr_t)table;
    const int64_t *ix = (const int64_t *)(uintptr_t)index;
    double *o = (double *)(uintptr_t)out;
    Py_BEGIN_ALLOW_THREADS
#ifdef _OPENMP
    if (threads > 1 && candidates * rows * levels >= 2 * MIN_PER_THREAD) {
#pragma omp parallel num_threads(threads) reduction(| : failed)
        {
            const int64_t k = omp_get_thread_num(), t = omp_get_num_threads();
            failed |= -level_sums_rows(tb, rows, pairs, ix, levels, o, candidates * k / t, candidates * (k + 1) / t);
        }
    } else
#endif
        failed = -level_sums_rows(tb, rows, pairs, ix, levels, o, 0, candidates);
    Py_END_ALLOW_THREADS
    if (failed & 2) return PyErr_NoMemory();
    if (failed) {
        PyErr_SetString(PyExc_ValueError, "level_sums: an index entry is outside the pair table");
        return NULL;
    }
    Py_RETURN_NONE;
}

/* The entropy search's pair table (strategies.py, _entropy_rows): for every level bin
 * range p = [lo, hi) and histogram t, its mass M = mass[hi][t] - mass[lo][t] and
 * ratio = max((1 / n) * M, tiny) with n = max(nonempty[hi][t] - nonempty[lo][t], 1), from
 * the prefix sums (bounds x rows). The operations the torch path does, in its order. */
static int pair_ratios_rows(const double *mass, const double *nonempty, int64_t bounds, int64_t rows,
                            const int64_t *lo, const int64_t *hi, double tiny, double *m_out, double *r_out,
                            int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; p++) {
        if (lo[p] < 0 || lo[p] >= bounds || hi[p] < 0 || hi[p] >= bounds) return -1;
        const double *ml = mass + lo[p] * rows, *mh = mass + hi[p] * rows;
        const double *nl = nonempty + lo[p] * rows, *nh = nonempty + hi[p] * rows;
        double *m = m_out + p * rows, *r = r_out + p * rows;
        for (int64_t t = 0; t < rows; t++) {
            const double mt = mh[t] - ml[t];
            double n = nh[t] - nl[t];
            n = n < 1.0 ? 1.0 : n;
            double ratio = (1.0 / n) * mt;
            m[t] = mt;
            r[t] = ratio < tiny ? tiny : ratio;
        }
    }
    return 0;
}

PyDoc_STRVAR(pair_ratios_doc,
"pair_ratios(mass_ptr, nonempty_ptr, bounds, rows, lo_ptr, hi_ptr, pairs, tiny, mass_out_ptr,\n"
"            ratio_out_ptr, threads=1)\n\n"
"For every pair p and row t: mass_out[p, t] = mass[hi[p], t] - mass[lo[p], t] and\n"
"ratio_out[p, t] = max((1 / n) * mass_out[p, t], tiny), n = max(nonempty[hi[p], t] -\n"
"nonempty[lo[p], t], 1). mass and nonempty are bounds x rows float64, lo and hi pairs int64\n"
"(each in [0, bounds)), the outputs pairs x rows float64, all contiguous.");

static PyObject *pair_ratios(PyObject *self, PyObject *args) {
    unsigned long long mass, nonempty, lo, hi, m_out, r_out;
    Py_ssize_t bounds, rows, pairs;
    double tiny;
    int threads = 1, failed = 0;
    (void)self;
    if (!PyArg_ParseTuple(args, "KKnnKKndKK|i", &mass, &nonempty, &bounds, &rows, &lo, &hi, &pairs, &tiny, &m_out,
                          &r_out, &threads))
        return NULL;
    if (bounds < 1 || rows < 0 || pairs < 0 || threads < 1) {
        PyErr_SetString(PyExc_ValueError, "pair_ratios: bounds >= 1, rows, pairs >= 0, threads >= 1");
        return NULL;
    }
    const double *ms = (const double *)(uintptr_t)mass, *ne = (const double *)(uintptr_t)nonempty;
    const int64_t *l = (const int64_t *)(uintptr_t)lo, *h = (const int64_t *)(uintptr_t)hi;
    double *mo = (double *)(uintptr_t)m_out, *ro = (double *)(uintptr_t)r_out;
    Py_BEGIN_ALLOW_THREADS
#ifdef _OPENMP
    if (threads > 1 && pairs * rows >= 2 * MIN_PER_THREAD) {
#pragma omp parallel num_threads(threads) reduction(| : failed)
        {
            const int64_t k = omp_get_thread_num(), t = omp_get_num_threads();
            failed |= -pair_ratios_rows(ms, ne, bounds, rows, l, h, tiny, mo, ro, pairs * k / t, pairs * (k + 1) / t);
        }
    } else
#endif
        failed = -pair_ratios_rows(ms, ne, bounds, rows, l, h, tiny, mo, ro, 0, pairs);
    Py_END_ALLOW_THREADS
    if (failed) {
        PyErr_SetString(PyExc_ValueError, "pair_ratios: a bin range is outside the prefix sums");
        return NULL;
    }
    Py_RETURN_NONE;
}

PyDoc_STRVAR(rebin_add_doc,
"rebin_add(src_ptr, bins, k, dst_ptr)\n\n"
"Add the 2 * bins int64 signed counts at src_ptr, re-binned to a range 2**k times larger,\n"
"to the 2 * bins int64 at dst_ptr: dst[bins + ((b - bins) >> k)] += src[b] (an arithmetic\n"
"shift: negative offsets stay negative). 0 <= k <= 62.");

static PyObject *rebin_add(PyObject *self, PyObject *args) {
    unsigned long long src, dst;
    int bins, k;
    (void)self;
    if (!PyArg_ParseTuple(args, "KiiK", &src, &bins, &k, &dst)) return NULL;
    if (bins < 1 || bins > (1 << 24) || k < 0 || k > 62) {
        PyErr_SetString(PyExc_ValueError, "rebin_add: bins in [1, 2**24], k in [0, 62]");
        return NULL;
    }
    const int64_t *c = (const int64_t *)(uintptr_t)src;
    int64_t *d = (int64_t *)(uintptr_t)dst;
    for (int64_t b = 0; b < 2 * (int64_t)bins; b++) {
        const int64_t offset = b - bins; /* floor(offset / 2**k), no shift of a negative value */
        d[bins + (offset >= 0 ? offset >> k : -1 - ((-1 - offset) >> k))] += c[b];
    }
    Py_RETURN_NONE;
}

PyDoc_STRVAR(relu_fold_doc,
"relu_fold(counts_ptr, out_ptr, bins, also_ptr=0)\n\n"
"The counts of relu(x) from the 2 * bins int64 signed counts of x: out[bins] gets every\n"
"count of bins 0 .. bins (the non-positive values, now 0, and the first positive bin),\n"
"out[bins + j] = counts[bins + j] above it, out[0 .. bins) = 0. When also_ptr is not 0,\n"
"out is also added to the 2 * bins int64 there (a running total at the same range).");

static PyObject *relu_fold(PyObject *self, PyObject *args) {
    unsigned long long counts, out, also = 0;
    int bins;
    (void)self;
    if (!PyArg_ParseTuple(args, "KKi|K", &counts, &out, &bins, &also)) return NULL;
    if (bins < 1 || bins > (1 << 24)) {
        PyErr_SetString(PyExc_ValueError, "relu_fold: bins in [1, 2**24]");
        return NULL;
    }
    const int64_t *c = (const int64_t *)(uintptr_t)counts;
    int64_t *o = (int64_t *)(uintptr_t)out, *total = (int64_t *)(uintptr_t)also;
    int64_t zero = 0;
    for (int32_t b = 0; b <= bins; b++) zero += c[b];
    memset(o, 0, sizeof(int64_t) * (size_t)bins);
    o[bins] = zero;
    memcpy(o + bins + 1, c + bins + 1, sizeof(int64_t) * (size_t)(bins - 1));
    if (total != NULL) add_counts(total + bins, o + bins, bins); /* (out[0 .. bins) is zero) */
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
    {"extremes", extremes, METH_VARARGS, extremes_doc},
    {"level_sums", level_sums, METH_VARARGS, level_sums_doc},
    {"pair_ratios", pair_ratios, METH_VARARGS, pair_ratios_doc},
    {"relu_fold", relu_fold, METH_VARARGS, relu_fold_doc},
    {"rebin_add", rebin_add, METH_VARARGS, rebin_add_doc},
    {"openmp", openmp, METH_NOARGS, "Whether the kernel was built with OpenMP."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_kernels",
    "C kernels of the calibration: binning, extremes, ReLU folding, re-binning, entropy pair tables (see native.py).",
    -1, methods,
};

PyMODINIT_FUNC PyInit__kernels(void) { return PyModule_Create(&module); }
