"""Compiled coordinate-wise order statistics behind :mod:`fedgate.core.aggregate`.

Private module (median, trimmed mean, Bulyan's last step): every function trusts
its arguments (the façade checks shapes, dtypes and ranges) and computes inside
one ``nogil`` region; NaN/Inf are detected on the tiles as they are copied and
reported to the façade, which names the value. Directives come from ``setup.py``.
"""
from cython cimport floating
from libc.math cimport sqrt, fabs, INFINITY, nextafter, nextafterf
from libc.stdint cimport uint32_t, uint64_t, int32_t, int64_t
from libc.string cimport memcpy

cdef extern from "Python.h":
    void* PyMem_RawMalloc(size_t n) nogil
    void PyMem_RawFree(void* p) nogil

cdef enum:
    # bytes of one network tile (fits L1 with room to spare)
    TILE_BYTES = 32768


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
    """


cdef inline bint _any_nonfinite(const floating* x, Py_ssize_t n) noexcept nogil:
    """True if x[0:n] holds a NaN or an Inf (exponent bits all ones)."""
    cdef Py_ssize_t i
    cdef uint32_t bad32 = 0
    cdef uint64_t bad64 = 0
    cdef const uint32_t* b32
    cdef const uint64_t* b64
    if floating is float:
        b32 = <const uint32_t*>x
        for i in range(n):
            bad32 |= <uint32_t>((b32[i] & 0x7f800000u) == 0x7f800000u)
        return bad32 != 0
    else:
        b64 = <const uint64_t*>x
        for i in range(n):
            bad64 |= <uint64_t>((b64[i] & 0x7ff0000000000000ull) == 0x7ff0000000000000ull)
        return bad64 != 0


# Two strategies, both over column tiles so memory traffic stays sequential:
#  * a comparator network (pruned to the outputs needed) applied to an N x B tile
#    copied from the rows: every comparator is a min/max over B contiguous lanes,
#    which the compiler vectorises; best for small and medium N;
#  * counting passes over tiles of 16-lane groups (see _lane_rank), for large N.

cdef extern from *:
    """
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

    /* Counting passes over n rows (row r at base + r * stride) of FG_LANES lanes,
       written with GCC vector extensions so every lane is one SIMD lane whatever the
       target (16 floats = one AVX-512 register, two AVX2, four SSE). */
    #define FG_LANES 16
    #include <math.h>
    #include <string.h>
    typedef float fg_vf __attribute__((vector_size(64)));
    typedef int32_t fg_vi __attribute__((vector_size(64)));
    typedef double fg_vd __attribute__((vector_size(128)));
    typedef int64_t fg_vl __attribute__((vector_size(128)));

    typedef double fg_v8d __attribute__((vector_size(64)));
    typedef int64_t fg_v8l __attribute__((vector_size(64)));

    /* The FG_LANES lanes are U vectors of FG_LANES / U lanes (floats: one 16-lane
       vector; doubles: two 8-lane vectors, which compilers lower far better). */

    /* per lane: cnt = #(x < p), below = max{x < p} (-inf if none), above = min{x >= p} */
    #define FG_COUNT_PASS(NAME, T, VT, MT, U)                                        \
    FG_CLONES static void NAME(const T* base, Py_ssize_t stride, Py_ssize_t n,       \
                               const T* p, int32_t* cnt, T* below, T* above) {       \
        enum { W = FG_LANES / U };                                                   \
        VT q[U], b[U], a[U], x, xb, xa, zero = {0}; MT c[U], m, g;                   \
        const VT vninf = zero - (T)INFINITY, vpinf = zero + (T)INFINITY;             \
        const MT ninf = (MT)vninf, pinf = (MT)vpinf;                                 \
        for (int u = 0; u < U; u++) {                                                \
            memcpy(&q[u], p + u * W, sizeof(VT));                                    \
            b[u] = vninf; a[u] = vpinf; c[u] = (MT)(zero * 0) & 0;                   \
        }                                                                            \
        for (Py_ssize_t r = 0; r < n; r++) {                                         \
            for (int u = 0; u < U; u++) {                                            \
                memcpy(&x, base + r * stride + u * W, sizeof(VT));                   \
                m = x < q[u];                                                        \
                c[u] -= m;                                                           \
                xb = (VT)(((MT)x & m) | (ninf & ~m));                                \
                xa = (VT)(((MT)x & ~m) | (pinf & m));                                \
                g = xb > b[u];                                                       \
                b[u] = (VT)(((MT)xb & g) | ((MT)b[u] & ~g));                         \
                g = xa < a[u];                                                       \
                a[u] = (VT)(((MT)xa & g) | ((MT)a[u] & ~g));                         \
            }                                                                        \
        }                                                                            \
        for (int u = 0; u < U; u++)                                                  \
            for (int k = 0; k < W; k++) {                                            \
                cnt[u * W + k] = (int32_t)c[u][k];                                   \
                below[u * W + k] = b[u][k]; above[u * W + k] = a[u][k];              \
            }                                                                        \
    }
    FG_COUNT_PASS(fg_count_pass_f32, float, fg_vf, fg_vi, 1)
    FG_COUNT_PASS(fg_count_pass_f64, double, fg_v8d, fg_v8l, 2)

    /* per lane: cnt1 = #(x < p1), cnt2 = #(x < p2) (counts only: cheap) */
    #define FG_COUNT2_PASS(NAME, T, VT, MT, U)                                       \
    FG_CLONES static void NAME(const T* base, Py_ssize_t stride, Py_ssize_t n,       \
                               const T* p1, const T* p2, int32_t* cnt1, int32_t* cnt2) { \
        enum { W = FG_LANES / U };                                                   \
        VT q1[U], q2[U], x, zero = {0}; MT c1[U], c2[U];                             \
        for (int u = 0; u < U; u++) {                                                \
            memcpy(&q1[u], p1 + u * W, sizeof(VT));                                  \
            memcpy(&q2[u], p2 + u * W, sizeof(VT));                                  \
            c1[u] = (MT)(zero * 0) & 0; c2[u] = c1[u];                               \
        }                                                                            \
        for (Py_ssize_t r = 0; r < n; r++) {                                         \
            for (int u = 0; u < U; u++) {                                            \
                memcpy(&x, base + r * stride + u * W, sizeof(VT));                   \
                c1[u] -= x < q1[u];                                                  \
                c2[u] -= x < q2[u];                                                  \
            }                                                                        \
        }                                                                            \
        for (int u = 0; u < U; u++)                                                  \
            for (int k = 0; k < W; k++) {                                            \
                cnt1[u * W + k] = (int32_t)c1[u][k]; cnt2[u * W + k] = (int32_t)c2[u][k]; \
            }                                                                        \
    }
    FG_COUNT2_PASS(fg_count2_pass_f32, float, fg_vf, fg_vi, 1)
    FG_COUNT2_PASS(fg_count2_pass_f64, double, fg_v8d, fg_v8l, 2)

    /* Per lane: sum (double) of x with lo < x < hi, #(x <= lo), #(x < hi). Two
       halves of 8 lanes, so each float half widens to exactly one 8-double vector. */
    typedef float fg_v8f __attribute__((vector_size(32)));
    typedef int32_t fg_v8i __attribute__((vector_size(32)));
    #define FG_BAND_PASS(NAME, T, HT, HM)                                            \
    FG_CLONES static void NAME(const T* base, Py_ssize_t stride, Py_ssize_t n,       \
                               const T* lo, const T* hi, double* sum,                \
                               int32_t* le_lo, int32_t* lt_hi) {                     \
        HT l0, l1, h0, h1, x0, x1; HM a0 = {0}, a1 = {0}, b0 = {0}, b1 = {0};        \
        fg_v8d s0 = {0}, s1 = {0};                                                   \
        memcpy(&l0, lo, sizeof(HT)); memcpy(&l1, lo + 8, sizeof(HT));                \
        memcpy(&h0, hi, sizeof(HT)); memcpy(&h1, hi + 8, sizeof(HT));                \
        for (Py_ssize_t r = 0; r < n; r++) {                                         \
            const T* row = base + r * stride;                                        \
            memcpy(&x0, row, sizeof(HT)); memcpy(&x1, row + 8, sizeof(HT));          \
            a0 -= x0 <= l0; a1 -= x1 <= l1;                                          \
            b0 -= x0 < h0; b1 -= x1 < h1;                                            \
            s0 += (fg_v8d)((fg_v8l)__builtin_convertvector(x0, fg_v8d)               \
                           & __builtin_convertvector((x0 > l0) & (x0 < h0), fg_v8l)); \
            s1 += (fg_v8d)((fg_v8l)__builtin_convertvector(x1, fg_v8d)               \
                           & __builtin_convertvector((x1 > l1) & (x1 < h1), fg_v8l)); \
        }                                                                            \
        for (int k = 0; k < 8; k++) {                                                \
            sum[k] = s0[k]; sum[k + 8] = s1[k];                                      \
            le_lo[k] = (int32_t)a0[k]; le_lo[k + 8] = (int32_t)a1[k];                \
            lt_hi[k] = (int32_t)b0[k]; lt_hi[k + 8] = (int32_t)b1[k];                \
        }                                                                            \
    }
    FG_BAND_PASS(fg_band_pass_f32, float, fg_v8f, fg_v8i)
    FG_BAND_PASS(fg_band_pass_f64, double, fg_v8d, fg_v8l)

    /* order-preserving integer key of a float (for bisection in value order) */
    static inline int64_t fg_key_f32(float x) {
        int32_t b; x += 0.0f; memcpy(&b, &x, 4);
        return b < 0 ? -(int64_t)(b & 0x7fffffff) : (int64_t)b;
    }
    static inline float fg_unkey_f32(int64_t k) {
        int32_t b = k < 0 ? (int32_t)((-k) | 0x80000000u) : (int32_t)k; float x; memcpy(&x, &b, 4);
        return x;
    }
    static inline int64_t fg_key_f64(double x) {
        int64_t b; x += 0.0; memcpy(&b, &x, 8);
        return b < 0 ? -(b & 0x7fffffffffffffffLL) : b;
    }
    static inline double fg_unkey_f64(int64_t k) {
        int64_t b = k < 0 ? ((-k) | (int64_t)0x8000000000000000ULL) : k; double x; memcpy(&x, &b, 8);
        return x;
    }
    """
    void fg_network_f32(float* tile, Py_ssize_t width, const int32_t* comps, Py_ssize_t nc) noexcept nogil
    void fg_network_f64(double* tile, Py_ssize_t width, const int32_t* comps, Py_ssize_t nc) noexcept nogil
    void fg_rowsum_f32(double* acc, const float* row, Py_ssize_t width) noexcept nogil
    void fg_rowsum_f64(double* acc, const double* row, Py_ssize_t width) noexcept nogil
    enum: FG_LANES
    void fg_count_pass_f32(const float* base, Py_ssize_t stride, Py_ssize_t n, const float* p,
                           int32_t* cnt, float* below, float* above) noexcept nogil
    void fg_count_pass_f64(const double* base, Py_ssize_t stride, Py_ssize_t n, const double* p,
                           int32_t* cnt, double* below, double* above) noexcept nogil
    void fg_count2_pass_f32(const float* base, Py_ssize_t stride, Py_ssize_t n, const float* p1,
                            const float* p2, int32_t* cnt1, int32_t* cnt2) noexcept nogil
    void fg_count2_pass_f64(const double* base, Py_ssize_t stride, Py_ssize_t n, const double* p1,
                            const double* p2, int32_t* cnt1, int32_t* cnt2) noexcept nogil
    void fg_band_pass_f32(const float* base, Py_ssize_t stride, Py_ssize_t n, const float* lo,
                          const float* hi, double* sum, int32_t* le_lo, int32_t* lt_hi) noexcept nogil
    void fg_band_pass_f64(const double* base, Py_ssize_t stride, Py_ssize_t n, const double* lo,
                          const double* hi, double* sum, int32_t* le_lo, int32_t* lt_hi) noexcept nogil
    int64_t fg_key_f32(float x) noexcept nogil
    float fg_unkey_f32(int64_t k) noexcept nogil
    int64_t fg_key_f64(double x) noexcept nogil
    double fg_unkey_f64(int64_t k) noexcept nogil


def network_reduce(const floating[:, ::1] stack, const int32_t[:, ::1] comps,
                   int mode, Py_ssize_t lo, Py_ssize_t hi, floating[::1] out):
    """Apply the comparator network ``comps`` to every column, then reduce.

    mode 0 (median): out = (row lo + row hi) / 2 after sorting;
    mode 1 (trimmed mean): out = mean of rows lo..hi inclusive.
    Returns False, or True (out unfinished) as soon as a tile holds a NaN or Inf.
    """
    cdef Py_ssize_t n = stack.shape[0], d = stack.shape[1], nc = comps.shape[0]
    cdef Py_ssize_t block, c0, width, r, c
    cdef bint bad = False
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
            if _any_nonfinite(tile, n * width):
                bad = True
                break
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
    return bad


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


cdef inline int64_t _key(floating x) noexcept nogil:
    if floating is float:
        return fg_key_f32(x)
    else:
        return fg_key_f64(x)


cdef inline floating _unkey(int64_t k, floating like) noexcept nogil:
    if floating is float:
        return fg_unkey_f32(k)
    else:
        return fg_unkey_f64(k)


cdef inline floating _above(floating x) noexcept nogil:
    if floating is float:
        return nextafterf(x, INFINITY)
    else:
        return nextafter(x, INFINITY)


cdef inline floating _clamp_pivot(floating p, floating lo, floating hi) noexcept nogil:
    """A pivot strictly above lo and at most hi (lo < hi)."""
    if not (p > lo):
        p = _above(lo)
    if p > hi:
        p = hi
    return p


cdef inline floating _bisect(floating lo, floating hi) noexcept nogil:
    cdef int64_t klo = _key(lo), khi = _key(hi)
    return _unkey((klo >> 1) + (khi >> 1) + (klo & khi & 1), lo)  # no overflow for doubles


cdef void _lane_rank(const floating* base, Py_ssize_t stride, Py_ssize_t n, Py_ssize_t t,
                     const floating* smp, Py_ssize_t ns, floating* ans, floating* col) noexcept nogil:
    """ans[c] = the t-th smallest (0-based) of column c, for FG_LANES columns at base.

    Keeps per lane a value interval [lo, hi) holding the answer, with the exact
    counts clo = #(x < lo) and chi = #(x < hi), clo <= t < chi. Cheap passes count
    the values below two pivots per lane (sampled order statistics first, then
    interpolation at ranks t -/+ a margin, bisection of the float order when that
    stalls) until few values remain; then passes that also return the nearest
    data values on both sides of one pivot pin the exact answer. Lanes still open
    after 64 passes are selected directly.
    """
    cdef floating lo[FG_LANES]
    cdef floating hi[FG_LANES]
    cdef floating p1[FG_LANES]
    cdef floating p2[FG_LANES]
    cdef floating below[FG_LANES]
    cdef floating above[FG_LANES]
    cdef int32_t c1[FG_LANES]
    cdef int32_t c2[FG_LANES]
    cdef Py_ssize_t clo[FG_LANES]
    cdef Py_ssize_t chi[FG_LANES]
    cdef Py_ssize_t prev[FG_LANES]
    cdef bint done[FG_LANES]
    cdef double step[FG_LANES]
    cdef Py_ssize_t c, r, k, rho, open_lanes, rem
    cdef bint counting
    cdef double g, q, span, rank
    rho = min(ns - 1, (t * ns) // n)
    for c in range(FG_LANES):
        lo[c] = -INFINITY
        hi[c] = INFINITY
        clo[c] = 0
        chi[c] = n
        prev[c] = 4 * n + 4
        done[c] = False
        step[c] = 0.25 * (<double>smp[(ns - 1) * FG_LANES + c] - <double>smp[c])
        if not (step[c] > 0 and step[c] < INFINITY):
            step[c] = 0.25 * (fabs(<double>smp[c]) + 1.0)
    for k in range(64):
        # counting passes while some open lane still has many candidates and progresses
        counting = False
        for c in range(FG_LANES):
            if not done[c] and chi[c] - clo[c] > 8 and 4 * (chi[c] - clo[c]) < 3 * prev[c]:
                counting = True
        for c in range(FG_LANES):
            if done[c]:
                p1[c] = lo[c]
                p2[c] = lo[c]
                continue
            rem = chi[c] - clo[c]
            if k == 0:
                p1[c] = smp[max(<Py_ssize_t>0, rho - 8) * FG_LANES + c]
                p2[c] = smp[min(ns - 1, rho + 8) * FG_LANES + c]
            elif k == 1 and hi[c] == INFINITY:  # above the sampled bracket: the sample's top
                p1[c] = smp[min(ns - 1, rho + 24) * FG_LANES + c]
                p2[c] = smp[(ns - 1) * FG_LANES + c]
            elif k == 1 and lo[c] == -INFINITY:
                p1[c] = smp[c]
                p2[c] = smp[max(<Py_ssize_t>0, rho - 24) * FG_LANES + c]
            elif lo[c] > -INFINITY and hi[c] < INFINITY:
                span = <double>hi[c] - <double>lo[c]
                rank = <double>(t - clo[c]) + 0.5
                g = 0.5 * sqrt(<double>rem) + 1.0 if counting else 0.0
                q = <double>lo[c] + span * ((rank - g) / <double>rem)
                p1[c] = <floating>q
                q = <double>lo[c] + span * ((rank + g) / <double>rem)
                p2[c] = <floating>q
                if 2 * rem > prev[c]:  # the last pass did not halve the candidates
                    p1[c] = _bisect(lo[c], hi[c])
            elif lo[c] > -INFINITY:
                # the answer lies above every pivot so far: step out, growing 4x per pass
                step[c] *= 4.0
                p1[c] = <floating>(<double>lo[c] + 0.25 * step[c])
                p2[c] = <floating>(<double>lo[c] + step[c])
            elif hi[c] < INFINITY:
                step[c] *= 4.0
                p1[c] = <floating>(<double>hi[c] - step[c])
                p2[c] = <floating>(<double>hi[c] - 0.25 * step[c])
            else:
                p1[c] = 0
                p2[c] = 0
            p1[c] = _clamp_pivot(p1[c], lo[c], hi[c])
            p2[c] = _clamp_pivot(p2[c], lo[c], hi[c])
            if p2[c] < p1[c]:
                p1[c], p2[c] = p2[c], p1[c]
            prev[c] = rem
        if counting or k == 0:
            if floating is float:
                fg_count2_pass_f32(base, stride, n, p1, p2, c1, c2)
            else:
                fg_count2_pass_f64(base, stride, n, p1, p2, c1, c2)
            for c in range(FG_LANES):
                if done[c]:
                    continue
                if t < c1[c]:
                    hi[c] = p1[c]
                    chi[c] = c1[c]
                elif t < c2[c]:
                    lo[c] = p1[c]
                    clo[c] = c1[c]
                    hi[c] = p2[c]
                    chi[c] = c2[c]
                else:
                    lo[c] = p2[c]
                    clo[c] = c2[c]
        else:
            # pin exact data values around one pivot per lane
            for c in range(FG_LANES):
                if not done[c] and lo[c] > -INFINITY and hi[c] < INFINITY:
                    p1[c] = _clamp_pivot(
                        <floating>(<double>lo[c] + (<double>hi[c] - <double>lo[c])
                                   * ((<double>(t - clo[c]) + 0.5) / <double>(chi[c] - clo[c]))),
                        lo[c], hi[c])
            if floating is float:
                fg_count_pass_f32(base, stride, n, p1, c1, below, above)
            else:
                fg_count_pass_f64(base, stride, n, p1, c1, below, above)
            for c in range(FG_LANES):
                if done[c]:
                    continue
                if t < c1[c]:
                    hi[c] = _above(below[c])
                    chi[c] = c1[c]
                    if t == c1[c] - 1:
                        ans[c] = below[c]
                        done[c] = True
                else:
                    lo[c] = above[c]
                    clo[c] = c1[c]
                    if t == c1[c]:
                        ans[c] = above[c]
                        done[c] = True
        open_lanes = 0
        for c in range(FG_LANES):
            if not done[c] and lo[c] > -INFINITY and _above(lo[c]) >= hi[c]:
                ans[c] = lo[c]  # [lo, hi) holds one float value: every candidate equals lo
                done[c] = True
            open_lanes += not done[c]
        if open_lanes == 0:
            return
    for c in range(FG_LANES):
        if not done[c]:
            for r in range(n):
                col[r] = base[r * stride + c]
            _select(col, n, t)
            ans[c] = col[t]


cdef void _next_rank(const floating* base, Py_ssize_t stride, Py_ssize_t n, Py_ssize_t t,
                     const floating* v, floating* ans) noexcept nogil:
    """ans = the (t+1)-th smallest per lane, given v = the t-th: one counting pass."""
    cdef floating p[FG_LANES]
    cdef floating below[FG_LANES]
    cdef floating above[FG_LANES]
    cdef int32_t cnt[FG_LANES]
    cdef Py_ssize_t c
    for c in range(FG_LANES):
        p[c] = _above(v[c])
    if floating is float:
        fg_count_pass_f32(base, stride, n, p, cnt, below, above)
    else:
        fg_count_pass_f64(base, stride, n, p, cnt, below, above)
    for c in range(FG_LANES):
        ans[c] = v[c] if cnt[c] > t + 1 else above[c]


def count_select_reduce(const floating[:, ::1] stack, const int32_t[:, ::1] sample_comps,
                        int mode, Py_ssize_t lo, Py_ssize_t hi, floating[::1] out):
    """Same contract as :func:`network_reduce`, by counting passes (large n).

    Columns are processed FG_LANES at a time straight from the stack (no copy);
    the last partial group goes through :func:`_select` column by column.
    ``sample_comps`` sorts ``ns = max(index) + 1`` sampled rows (2 <= ns <= min(128, n)).
    Returns True (out unfinished) if the stack holds a NaN or Inf, else False.
    """
    cdef Py_ssize_t n = stack.shape[0], d = stack.shape[1], nc = sample_comps.shape[0]
    cdef Py_ssize_t ns = 0, c0, c, r, i, full = d - d % FG_LANES
    cdef const floating* s = &stack[0, 0]
    cdef const int32_t* cp = &sample_comps[0, 0]
    cdef floating smp[128 * FG_LANES]
    cdef floating vlo[FG_LANES]
    cdef floating vhi[FG_LANES]
    cdef double bsum[FG_LANES]
    cdef int32_t le_lo[FG_LANES]
    cdef int32_t lt_hi[FG_LANES]
    cdef double inv = 1.0 / <double>(hi - lo + 1), acc
    cdef floating mx
    cdef Py_ssize_t tw, g, width
    cdef bint bad = False
    for i in range(nc):
        ns = max(ns, <Py_ssize_t>cp[2 * i + 1] + 1)
    if not 2 <= ns <= 128 or ns > n:
        raise ValueError(f"sample network of {ns} rows does not fit {n} updates")
    cdef floating* col = <floating*>PyMem_RawMalloc(n * sizeof(floating))
    cdef floating* tile
    cdef const floating* base
    if col == NULL:
        raise MemoryError()
    # tile: up to 4 groups of lanes, copied once so the passes run on contiguous memory
    tw = min(<Py_ssize_t>(4 * FG_LANES), max(<Py_ssize_t>FG_LANES, full))
    tile = <floating*>PyMem_RawMalloc(n * tw * sizeof(floating))
    if tile == NULL:
        PyMem_RawFree(col)
        raise MemoryError()
    with nogil:
        c0 = 0
        while c0 < full:
            width = min(tw, full - c0)
            for r in range(n):
                memcpy(tile + r * width, s + r * d + c0, width * sizeof(floating))
            if _any_nonfinite(tile, n * width):
                bad = True
                break
            g = 0
            while g < width:
                base = tile + g
                for r in range(ns):
                    memcpy(smp + r * FG_LANES, base + ((r * n) // ns) * width, FG_LANES * sizeof(floating))
                if floating is float:
                    fg_network_f32(smp, FG_LANES, cp, nc)
                else:
                    fg_network_f64(smp, FG_LANES, cp, nc)
                _lane_rank(base, width, n, lo, smp, ns, vlo, col)
                if hi == lo + 1:
                    _next_rank(base, width, n, lo, vlo, vhi)
                elif hi != lo:
                    _lane_rank(base, width, n, hi, smp, ns, vhi, col)
                else:
                    for c in range(FG_LANES):
                        vhi[c] = vlo[c]
                if mode == 0:
                    for c in range(FG_LANES):
                        out[c0 + g + c] = <floating>(0.5 * (<double>vlo[c] + <double>vhi[c]))
                else:
                    if floating is float:
                        fg_band_pass_f32(base, width, n, vlo, vhi, bsum, le_lo, lt_hi)
                    else:
                        fg_band_pass_f64(base, width, n, vlo, vhi, bsum, le_lo, lt_hi)
                    for c in range(FG_LANES):
                        if vlo[c] == vhi[c]:
                            out[c0 + g + c] = vlo[c]
                        else:
                            acc = (bsum[c] + <double>(le_lo[c] - lo) * <double>vlo[c]
                                   + <double>(hi + 1 - lt_hi[c]) * <double>vhi[c])
                            out[c0 + g + c] = <floating>(acc * inv)
                g += FG_LANES
            c0 += width
        for c in range(full, d):
            if bad:
                break
            for r in range(n):
                col[r] = s[r * d + c]
            if _any_nonfinite(col, n):
                bad = True
                break
            if mode == 0:
                _select(col, n, hi)
                if lo == hi:
                    out[c] = col[hi]
                else:
                    mx = col[0]
                    for i in range(1, hi):
                        if col[i] > mx:
                            mx = col[i]
                    out[c] = <floating>(0.5 * (<double>mx + <double>col[hi]))
            else:
                if lo > 0:
                    _select(col, n, lo)
                if hi < n - 1:
                    _select(col + lo, n - lo, hi - lo)
                acc = 0.0
                for i in range(lo, hi + 1):
                    acc += col[i]
                out[c] = <floating>(acc * inv)
    PyMem_RawFree(tile)
    PyMem_RawFree(col)
    return bad
