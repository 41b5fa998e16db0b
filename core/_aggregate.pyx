"""Compiled aggregation kernels behind :mod:`fedgate.core.aggregate`.

Private module: every function trusts its arguments (shapes, dtypes, finiteness,
ranges are checked by the façade) and computes inside one ``nogil`` region.
Compiler directives come from ``setup.py``.
"""
from cython cimport floating
from libc.math cimport sqrt
from libc.stdint cimport uint32_t, uint64_t, int32_t
from libc.string cimport memcpy

cdef extern from "Python.h":
    void* PyMem_RawMalloc(size_t n) nogil
    void PyMem_RawFree(void* p) nogil

cdef enum:
    # column block (elements) of the float64 accumulator kept in L1 while rows are folded in
    ACC_BLOCK = 2048
    # bytes of one network / transposed tile
    TILE_BYTES = 32768


# --------------------------------------------------------------------------- sums

cdef inline void _axpy(double* acc, const floating* x, double w, Py_ssize_t n) noexcept nogil:
    cdef Py_ssize_t i
    for i in range(n):
        acc[i] += w * <double>x[i]


def accumulate(double[::1] acc, const floating[::1] x, double weight):
    """acc += weight * x  (float64 accumulation)."""
    with nogil:
        _axpy(&acc[0], &x[0], weight, x.shape[0])


def accumulate_stack(double[::1] acc, const floating[:, ::1] stack, const double[::1] weights):
    """acc += sum_i weights[i] * stack[i], column-blocked so acc stays in cache."""
    cdef Py_ssize_t n = stack.shape[0], d = stack.shape[1], c0, r, width
    cdef double* a = &acc[0]
    cdef const floating* s = &stack[0, 0]
    with nogil:
        c0 = 0
        while c0 < d:
            width = min(<Py_ssize_t>ACC_BLOCK, d - c0)
            for r in range(n):
                _axpy(a + c0, s + r * d + c0, weights[r], width)
            c0 += width


def scale_into(floating[::1] out, const double[::1] acc, double factor):
    """out = acc * factor (cast to out's dtype)."""
    cdef Py_ssize_t i, n = acc.shape[0]
    with nogil:
        for i in range(n):
            out[i] = <floating>(acc[i] * factor)


def sq_norm(const floating[::1] x):
    """Sum of squares accumulated in float64 (8 independent partial sums)."""
    cdef Py_ssize_t i, j, n = x.shape[0], n8 = n - n % 8
    cdef double part[8]
    cdef double total = 0.0, v
    cdef const floating* p = &x[0]
    with nogil:
        for j in range(8):
            part[j] = 0.0
        i = 0
        while i < n8:
            for j in range(8):
                v = p[i + j]
                part[j] += v * v
            i += 8
        for j in range(8):
            total += part[j]
        for i in range(n8, n):
            v = p[i]
            total += v * v
    return total


def scale_inplace(floating[::1] x, double factor):
    cdef Py_ssize_t i, n = x.shape[0]
    cdef floating f = <floating>factor
    with nogil:
        for i in range(n):
            x[i] = x[i] * f


# ------------------------------------------------------------------ finiteness

cdef Py_ssize_t _first_nonfinite32(const uint32_t* b, Py_ssize_t n) noexcept nogil:
    cdef Py_ssize_t i, c0 = 0, width
    cdef uint32_t bad
    while c0 < n:
        width = min(<Py_ssize_t>1024, n - c0)
        bad = 0
        for i in range(c0, c0 + width):
            bad |= <uint32_t>((b[i] & 0x7f800000u) == 0x7f800000u)
        if bad:
            for i in range(c0, c0 + width):
                if (b[i] & 0x7f800000u) == 0x7f800000u:
                    return i
        c0 += width
    return -1


cdef Py_ssize_t _first_nonfinite64(const uint64_t* b, Py_ssize_t n) noexcept nogil:
    cdef Py_ssize_t i, c0 = 0, width
    cdef uint64_t bad
    while c0 < n:
        width = min(<Py_ssize_t>1024, n - c0)
        bad = 0
        for i in range(c0, c0 + width):
            bad |= <uint64_t>((b[i] & 0x7ff0000000000000ull) == 0x7ff0000000000000ull)
        if bad:
            for i in range(c0, c0 + width):
                if (b[i] & 0x7ff0000000000000ull) == 0x7ff0000000000000ull:
                    return i
        c0 += width
    return -1


def first_nonfinite(const floating[::1] x):
    """Index of the first NaN/Inf in x, or -1."""
    cdef Py_ssize_t r, n = x.shape[0]
    if n == 0:
        return -1
    with nogil:
        if floating is float:
            r = _first_nonfinite32(<const uint32_t*>&x[0], n)
        else:
            r = _first_nonfinite64(<const uint64_t*>&x[0], n)
    return r


# ------------------------------------------------- coordinate-wise order statistics
#
# Two strategies, both over column tiles so memory traffic stays sequential:
#  * a comparator network (pruned to the outputs needed) applied to an N x B tile
#    copied from the rows: every comparator is a min/max over B contiguous lanes,
#    which the compiler vectorises; best for small and medium N;
#  * a transposed B x N tile and an introselect per column, for large N.

cdef extern from *:
    """
    /* On x86-64 Linux with GCC, hot loops are compiled for AVX-512, AVX2 and the
       baseline, and the loader picks the best for the CPU (function multi-versioning). */
    #include <stdint.h>
    #if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__) && defined(__GLIBC__)
    #define FG_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
    #else
    #define FG_CLONES
    #endif

    /* Apply nc comparators (pairs of row indices, min to the first) to a tile of
       rows of `width` lanes each: every comparator is a lane-wise min/max, which the
       compiler vectorises (the ternary forms below map to min/max instructions). */
    #define FG_NETWORK(NAME, T)                                                      \
    FG_CLONES static void NAME(T* tile, Py_ssize_t width,                            \
                               const int32_t* comps, Py_ssize_t nc) {                \
        for (Py_ssize_t k = 0; k < nc; k++) {                                        \
            T* __restrict pa = tile + (Py_ssize_t)comps[2 * k] * width;              \
            T* __restrict pb = tile + (Py_ssize_t)comps[2 * k + 1] * width;          \
            for (Py_ssize_t c = 0; c < width; c++) {                                 \
                T a = pa[c], b = pb[c];                                              \
                T lo = a < b ? a : b, hi = b < a ? a : b;                            \
                pa[c] = lo;                                                          \
                pb[c] = hi;                                                          \
            }                                                                        \
        }                                                                            \
    }
    FG_NETWORK(fg_network_f32, float)
    FG_NETWORK(fg_network_f64, double)

    /* acc[c] += row[c] over `width` lanes, in double */
    #define FG_ROWSUM(NAME, T)                                                       \
    FG_CLONES static void NAME(double* __restrict acc, const T* __restrict row,      \
                               Py_ssize_t width) {                                   \
        for (Py_ssize_t c = 0; c < width; c++) acc[c] += (double)row[c];             \
    }
    FG_ROWSUM(fg_rowsum_f32, float)
    FG_ROWSUM(fg_rowsum_f64, double)
    """
    void fg_network_f32(float* tile, Py_ssize_t width, const int32_t* comps, Py_ssize_t nc) noexcept nogil
    void fg_network_f64(double* tile, Py_ssize_t width, const int32_t* comps, Py_ssize_t nc) noexcept nogil
    void fg_rowsum_f32(double* acc, const float* row, Py_ssize_t width) noexcept nogil
    void fg_rowsum_f64(double* acc, const double* row, Py_ssize_t width) noexcept nogil


def network_reduce(const floating[:, ::1] stack, const int32_t[:, ::1] comps,
                   int mode, Py_ssize_t lo, Py_ssize_t hi, floating[::1] out):
    """Apply the comparator network ``comps`` to every column, then reduce.

    mode 0 (median): out = (row lo + row hi) / 2 after sorting;
    mode 1 (trimmed mean): out = mean of rows lo..hi inclusive.
    """
    cdef Py_ssize_t n = stack.shape[0], d = stack.shape[1], nc = comps.shape[0]
    cdef Py_ssize_t block, c0, width, r, c
    cdef floating* tile
    cdef double* acc
    cdef const floating* s = &stack[0, 0]
    cdef const int32_t* cp = &comps[0, 0] if nc > 0 else NULL
    cdef double inv = 1.0 / <double>(hi - lo + 1)
    block = TILE_BYTES // (n * sizeof(floating))
    block = max(<Py_ssize_t>16, block - block % 16)
    tile = <floating*>PyMem_RawMalloc(n * block * sizeof(floating) + block * sizeof(double))
    if tile == NULL:
        raise MemoryError()
    acc = <double*>(<char*>tile + n * block * sizeof(floating))
    with nogil:
        c0 = 0
        while c0 < d:
            width = min(block, d - c0)
            for r in range(n):
                memcpy(tile + r * width, s + r * d + c0, width * sizeof(floating))
            if floating is float:
                fg_network_f32(tile, width, cp, nc)
            else:
                fg_network_f64(tile, width, cp, nc)
            if mode == 0:
                for c in range(width):
                    out[c0 + c] = <floating>(0.5 * (<double>tile[lo * width + c] + <double>tile[hi * width + c]))
            else:
                for c in range(width):
                    acc[c] = 0.0
                for r in range(lo, hi + 1):
                    if floating is float:
                        fg_rowsum_f32(acc, tile + r * width, width)
                    else:
                        fg_rowsum_f64(acc, tile + r * width, width)
                for c in range(width):
                    out[c0 + c] = <floating>(acc[c] * inv)
            c0 += width
    PyMem_RawFree(tile)


cdef inline void _swap(floating* a, Py_ssize_t i, Py_ssize_t j) noexcept nogil:
    cdef floating t = a[i]
    a[i] = a[j]
    a[j] = t


cdef void _sift_down(floating* a, Py_ssize_t start, Py_ssize_t end) noexcept nogil:
    # max-heap on a[0:end], sift a[start]
    cdef Py_ssize_t root = start, child
    while 2 * root + 1 < end:
        child = 2 * root + 1
        if child + 1 < end and a[child] < a[child + 1]:
            child += 1
        if a[root] < a[child]:
            _swap(a, root, child)
            root = child
        else:
            return


cdef void _heapsort(floating* a, Py_ssize_t n) noexcept nogil:
    cdef Py_ssize_t start, end
    start = n // 2 - 1
    while start >= 0:
        _sift_down(a, start, n)
        start -= 1
    end = n - 1
    while end > 0:
        _swap(a, 0, end)
        _sift_down(a, 0, end)
        end -= 1


cdef void _select(floating* a, Py_ssize_t n, Py_ssize_t k) noexcept nogil:
    """Rearrange a[0:n] so a[k] is the k-th smallest, a[:k] <= a[k] <= a[k+1:].

    Quickselect with median-of-three pivots; after 2*log2(n) rounds without
    convergence it heapsorts the remaining range (no quadratic worst case for
    hostile inputs).
    """
    cdef Py_ssize_t lo = 0, hi = n - 1, i, j, mid, budget = 8
    cdef floating pivot
    cdef Py_ssize_t m = n
    while m > 1:
        budget += 2
        m >>= 1
    while hi > lo:
        if hi - lo < 16:
            # insertion sort on the small remaining range
            for i in range(lo + 1, hi + 1):
                pivot = a[i]
                j = i - 1
                while j >= lo and a[j] > pivot:
                    a[j + 1] = a[j]
                    j -= 1
                a[j + 1] = pivot
            return
        budget -= 1
        if budget <= 0:
            _heapsort(a + lo, hi - lo + 1)
            return
        mid = lo + (hi - lo) // 2
        if a[mid] < a[lo]:
            _swap(a, mid, lo)
        if a[hi] < a[lo]:
            _swap(a, hi, lo)
        if a[hi] < a[mid]:
            _swap(a, hi, mid)
        pivot = a[mid]
        i = lo
        j = hi
        while i <= j:
            while a[i] < pivot:
                i += 1
            while pivot < a[j]:
                j -= 1
            if i <= j:
                _swap(a, i, j)
                i += 1
                j -= 1
        if k <= j:
            hi = j
        elif k >= i:
            lo = i
        else:
            return


def select_reduce(const floating[:, ::1] stack, int mode, Py_ssize_t lo, Py_ssize_t hi,
                  floating[::1] out):
    """Same contract as :func:`network_reduce`, by introselect per column."""
    cdef Py_ssize_t n = stack.shape[0], d = stack.shape[1]
    cdef Py_ssize_t block, c0, width, r, c, i
    cdef floating* tile
    cdef floating* col
    cdef floating mx
    cdef const floating* s = &stack[0, 0]
    cdef double acc, inv = 1.0 / <double>(hi - lo + 1)
    block = TILE_BYTES // (n * sizeof(floating))
    block = max(<Py_ssize_t>16, block - block % 16)
    tile = <floating*>PyMem_RawMalloc(n * block * sizeof(floating))
    if tile == NULL:
        raise MemoryError()
    with nogil:
        c0 = 0
        while c0 < d:
            width = min(block, d - c0)
            for r in range(n):
                for c in range(width):
                    tile[c * n + r] = s[r * d + c0 + c]
            for c in range(width):
                col = tile + c * n
                if mode == 0:
                    _select(col, n, hi)
                    if lo == hi:
                        out[c0 + c] = col[hi]
                    else:
                        mx = col[0]
                        for i in range(1, hi):
                            if col[i] > mx:
                                mx = col[i]
                        out[c0 + c] = <floating>(0.5 * (<double>mx + <double>col[hi]))
                else:
                    if lo > 0:
                        _select(col, n, lo)
                    if hi < n - 1:
                        _select(col + lo, n - lo, hi - lo)
                    acc = 0.0
                    for i in range(lo, hi + 1):
                        acc += col[i]
                    out[c0 + c] = <floating>(acc * inv)
            c0 += width
    PyMem_RawFree(tile)


# -------------------------------------------------------------- server optimisers

def fedopt_step(float[::1] params, const float[::1] delta, float[::1] m, float[::1] v,
                int rule, double lr, double beta1, double beta2, double tau):
    """One adaptive server step (rule 0 Adagrad, 1 Adam, 2 Yogi), in place.

    m = beta1 m + (1-beta1) delta; v by the rule; params += lr m / (sqrt(v) + tau).
    """
    cdef Py_ssize_t i, n = params.shape[0]
    cdef double g, g2, mi, vi, s
    with nogil:
        for i in range(n):
            g = delta[i]
            g2 = g * g
            mi = beta1 * m[i] + (1.0 - beta1) * g
            vi = v[i]
            if rule == 0:
                vi = vi + g2
            elif rule == 1:
                vi = beta2 * vi + (1.0 - beta2) * g2
            else:
                s = vi - g2
                vi = vi - (1.0 - beta2) * g2 * ((s > 0) - (s < 0))
            m[i] = <float>mi
            v[i] = <float>vi
            params[i] = <float>(params[i] + lr * mi / (sqrt(vi) + tau))


def momentum_step(float[::1] params, const float[::1] delta, float[::1] mom,
                  double lr, double beta):
    """Server momentum (FedAvgM), in place: mom = beta mom + delta; params += lr mom."""
    cdef Py_ssize_t i, n = params.shape[0]
    cdef double mi
    with nogil:
        for i in range(n):
            mi = beta * mom[i] + delta[i]
            mom[i] = <float>mi
            params[i] = <float>(params[i] + lr * mi)
