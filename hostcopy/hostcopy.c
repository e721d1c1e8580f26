/*
 * hostcopy: batched copies of host memory for kv_cache_manager_v2's page migrations.
 *
 *     copy_runs(dsts, srcs, sizes) -> int
 *
 * copies sizes[i] bytes from address srcs[i] to address dsts[i] for every i, in order, with the
 * GIL released, and returns how many copies it made after merging: a run whose source and
 * destination both continue the previous one is copied together with it.
 *
 * Why C: a page migration is a batch of many page-sized copies. From Python each copy costs a
 * ctypes call, and glibc's memcpy uses ordinary (cache-allocating) stores below a few MiB, which
 * for a page-sized copy reads every destination line before writing it. Migrated pages are not
 * read again soon, so batches of at least STREAM_MIN_BATCH bytes are written with non-temporal
 * (streaming) stores instead: no read-for-ownership, no cache pollution, about 1.5x the
 * bandwidth of memcpy on the machines we measured (docs/BENCHMARKS.md). Smaller batches (a
 * copy-on-write of one page the engine is about to use) keep memcpy, whose result stays in
 * cache. Overlapping source and destination ranges are copied with memmove.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__x86_64__) || defined(_M_X64)
#include <emmintrin.h>
#define HOSTCOPY_STREAMING 1
#else
#define HOSTCOPY_STREAMING 0
#endif

/* Batches of at least this many bytes use streaming stores (when the CPU has them). */
#define STREAM_MIN_BATCH ((uint64_t)4 << 20)
/* Runs shorter than this use memcpy even inside a streaming batch. */
#define STREAM_MIN_RUN ((uint64_t)4096)

#if HOSTCOPY_STREAMING
static void
stream_copy(char *d, const char *s, size_t n)
{
    size_t head = (16 - ((uintptr_t)d & 15)) & 15;
    if (head > n) {
        head = n;
    }
    memcpy(d, s, head);
    d += head;
    s += head;
    n -= head;
    size_t body = n & ~(size_t)63;
    for (size_t i = 0; i < body; i += 64) {
        __m128i a = _mm_loadu_si128((const __m128i *)(s + i));
        __m128i b = _mm_loadu_si128((const __m128i *)(s + i + 16));
        __m128i c = _mm_loadu_si128((const __m128i *)(s + i + 32));
        __m128i e = _mm_loadu_si128((const __m128i *)(s + i + 48));
        _mm_stream_si128((__m128i *)(d + i), a);
        _mm_stream_si128((__m128i *)(d + i + 16), b);
        _mm_stream_si128((__m128i *)(d + i + 32), c);
        _mm_stream_si128((__m128i *)(d + i + 48), e);
    }
    memcpy(d + body, s + body, n - body);
}
#endif

static int
overlaps(uint64_t d, uint64_t s, uint64_t n)
{
    return d < s + n && s < d + n;
}

/* Reads list `obj` (named `what`) of n non-negative ints into out[0..n). */
static int
read_list(PyObject *obj, const char *what, Py_ssize_t n, uint64_t *out)
{
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *item = PyList_GET_ITEM(obj, i);
        if (!PyLong_Check(item)) {
            PyErr_Format(PyExc_TypeError, "%s[%zd] must be an int, got %.100s", what, i,
                         Py_TYPE(item)->tp_name);
            return -1;
        }
        unsigned long long v = PyLong_AsUnsignedLongLong(item);
        if (v == (unsigned long long)-1 && PyErr_Occurred()) {
            PyErr_Clear();
            PyErr_Format(PyExc_ValueError, "%s[%zd] must be in [0, 2**64)", what, i);
            return -1;
        }
        out[i] = (uint64_t)v;
    }
    return 0;
}

static PyObject *
copy_runs(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    (void)module;
    static const char *names[3] = {"dsts", "srcs", "sizes"};
    if (nargs != 3) {
        PyErr_Format(PyExc_TypeError, "copy_runs() takes 3 arguments (dsts, srcs, sizes), got %zd",
                     nargs);
        return NULL;
    }
    for (int k = 0; k < 3; k++) {
        if (!PyList_Check(args[k])) {
            PyErr_Format(PyExc_TypeError, "copy_runs(): %s must be a list, got %.100s", names[k],
                         Py_TYPE(args[k])->tp_name);
            return NULL;
        }
    }
    Py_ssize_t n = PyList_GET_SIZE(args[0]);
    if (PyList_GET_SIZE(args[1]) != n || PyList_GET_SIZE(args[2]) != n) {
        PyErr_Format(PyExc_ValueError,
                     "copy_runs(): dsts, srcs and sizes must have one length, got %zd, %zd, %zd", n,
                     PyList_GET_SIZE(args[1]), PyList_GET_SIZE(args[2]));
        return NULL;
    }
    if (n == 0) {
        return PyLong_FromLong(0);
    }
    uint64_t *buf = (uint64_t *)PyMem_RawMalloc((size_t)n * 3 * sizeof(uint64_t));
    if (buf == NULL) {
        return PyErr_NoMemory();
    }
    uint64_t *dst = buf, *src = buf + n, *len = buf + 2 * n;
    if (read_list(args[0], names[0], n, dst) < 0 || read_list(args[1], names[1], n, src) < 0 ||
        read_list(args[2], names[2], n, len) < 0) {
        PyMem_RawFree(buf);
        return NULL;
    }
    uint64_t total = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        if (len[i] > 0 && (dst[i] == 0 || src[i] == 0)) {
            PyMem_RawFree(buf);
            PyErr_Format(PyExc_ValueError, "copy_runs(): copy %zd has a null address", i);
            return NULL;
        }
        total += len[i];
    }
    int streaming = HOSTCOPY_STREAMING && total >= STREAM_MIN_BATCH;
    Py_ssize_t copies = 0;
    Py_BEGIN_ALLOW_THREADS
    Py_ssize_t i = 0;
    while (i < n) {
        uint64_t d = dst[i], s = src[i], size = len[i];
        Py_ssize_t j = i + 1;
        while (j < n && dst[j] == d + size && src[j] == s + size) {
            size += len[j];
            j++;
        }
        i = j;
        if (size == 0) {
            continue;
        }
        copies++;
        if (overlaps(d, s, size)) {
            memmove((void *)(uintptr_t)d, (const void *)(uintptr_t)s, (size_t)size);
        }
#if HOSTCOPY_STREAMING
        else if (streaming && size >= STREAM_MIN_RUN) {
            stream_copy((char *)(uintptr_t)d, (const char *)(uintptr_t)s, (size_t)size);
        }
#endif
        else {
            memcpy((void *)(uintptr_t)d, (const void *)(uintptr_t)s, (size_t)size);
        }
    }
#if HOSTCOPY_STREAMING
    if (streaming) {
        _mm_sfence(); /* streaming stores are weakly ordered: publish them before returning */
    }
#endif
    Py_END_ALLOW_THREADS
    PyMem_RawFree(buf);
    return PyLong_FromSsize_t(copies);
}

static PyMethodDef hostcopy_methods[] = {
    {"copy_runs", (PyCFunction)(void (*)(void))copy_runs, METH_FASTCALL,
     "copy_runs(dsts, srcs, sizes) -> int\n--\n\n"
     "Copies sizes[i] bytes from address srcs[i] to address dsts[i] for every i, in order, with "
     "the GIL released; runs that continue each other are merged. Large batches use streaming "
     "stores. Returns the number of copies made after merging."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef hostcopy_module = {
    PyModuleDef_HEAD_INIT, "hostcopy._hostcopy",
    "Batched host-memory copies (see hostcopy/hostcopy.c).", -1, hostcopy_methods,
};

PyMODINIT_FUNC
PyInit__hostcopy(void)
{
    PyObject *m = PyModule_Create(&hostcopy_module);
    if (m == NULL) {
        return NULL;
    }
    if (PyModule_AddIntConstant(m, "STREAMING", HOSTCOPY_STREAMING) < 0 ||
        PyModule_AddObject(m, "STREAM_MIN_BATCH", PyLong_FromUnsignedLongLong(STREAM_MIN_BATCH)) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
