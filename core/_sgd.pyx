"""Compiled SGD kernels: forward, backward and the mini-batch training loop.

Private module: :mod:`fedgate.core.model` validates and allocates, this module only
computes.  A network is a chain of 1 to 3 dense layers stored in ONE flat float32
vector; layer ``l`` holds ``W_l`` (``sizes[l+1] x sizes[l]``, row-major) followed by
``b_l`` (``sizes[l+1]``).  Work happens in the dtype of ``X`` (float32 or float64):
the parameters are copied into a work buffer of that dtype, trained there and
copied back only when the run succeeded, so a refused or diverged run leaves the
caller's vector untouched.

Every kernel runs inside one ``with nogil:`` block; problems are reported as a
status code plus the offending row, never raised inside the loop.
"""
cimport numpy as cnp
from libc.math cimport exp, expm1, fabs, log1p, pow
from libc.stdint cimport uint64_t
from libc.stdlib cimport free, malloc
from libc.string cimport memcpy, memset

from cython cimport floating

cnp.import_array()

cdef extern from *:
    """
    #if defined(__GNUC__) || defined(__clang__)
    #define FEDGATE_PREFETCH(p) __builtin_prefetch((const void *)(p), 0, 1)
    #else
    #define FEDGATE_PREFETCH(p) ((void)0)
    #endif
    """
    void FEDGATE_PREFETCH(const void *p) noexcept nogil

cdef enum:
    ACT_RELU = 0
    ACT_TANH = 1
    OUT_IDENTITY = 0
    OUT_SIGMOID = 1
    OUT_SOFTMAX = 2
    LOSS_SQUARED = 0
    LOSS_HUBER = 1
    LOSS_LOG = 2
    ST_OK = 0
    ST_BAD_X = 1
    ST_BAD_Y = 2
    ST_DIVERGED = 3
    ST_NO_MEMORY = 4

cdef enum:
    MAX_LAYERS = 3

# Huber loss: quadratic within HUBER_DELTA of the target, linear beyond
cdef double HUBER_DELTA = 1.0

# status codes, exported by name for the facade (defined once, in the enum above)
OK = ST_OK
BAD_X = ST_BAD_X
BAD_Y = ST_BAD_Y
DIVERGED = ST_DIVERGED
NO_MEMORY = ST_NO_MEMORY

_ACTIVATIONS = {"relu": ACT_RELU, "tanh": ACT_TANH}
_OUTPUTS = {"identity": OUT_IDENTITY, "sigmoid": OUT_SIGMOID, "softmax": OUT_SOFTMAX}
_LOSSES = {"squared": LOSS_SQUARED, "huber": LOSS_HUBER, "log": LOSS_LOG}


cdef struct Net:
    int n_layers
    Py_ssize_t sizes[MAX_LAYERS + 1]
    Py_ssize_t w_off[MAX_LAYERS]
    Py_ssize_t b_off[MAX_LAYERS]
    Py_ssize_t n_params
    Py_ssize_t max_width
    int activation
    int output
    int loss


cdef struct Hyper:
    double lr
    double power_t          # 0 for a constant rate
    double l2
    double prox_mu
    Py_ssize_t epochs
    Py_ssize_t batch_size
    long long step0
    bint shuffle


cdef struct Outcome:
    int status
    Py_ssize_t row
    Py_ssize_t epoch
    double loss_sum
    Py_ssize_t seen
    long long steps
    uint64_t rng


# ----------------------------------------------------------------------------------
# small helpers

cdef inline uint64_t _next(uint64_t* s) noexcept nogil:
    # xorshift64*: fast, 2^64-1 period, good enough to shuffle rows
    cdef uint64_t x = s[0]
    x ^= x >> 12
    x ^= x << 25
    x ^= x >> 27
    s[0] = x
    return x * <uint64_t>0x2545F4914F6CDD1D


cdef inline void _prefetch_row(const void* p, Py_ssize_t nbytes) noexcept nogil:
    # one prefetch per 64-byte cache line of the row
    cdef const char* c = <const char*>p
    cdef Py_ssize_t off = 0
    while off < nbytes:
        FEDGATE_PREFETCH(c + off)
        off += 64
    FEDGATE_PREFETCH(c + nbytes - 1)


cdef inline bint _finite(double v) noexcept nogil:
    return v - v == 0.0


cdef inline floating _dot(const floating* a, const floating* b, Py_ssize_t n) noexcept nogil:
    cdef floating s0 = 0, s1 = 0, s2 = 0, s3 = 0
    cdef Py_ssize_t i = 0
    while i + 4 <= n:
        s0 += a[i] * b[i]
        s1 += a[i + 1] * b[i + 1]
        s2 += a[i + 2] * b[i + 2]
        s3 += a[i + 3] * b[i + 3]
        i += 4
    while i < n:
        s0 += a[i] * b[i]
        i += 1
    return (s0 + s1) + (s2 + s3)


cdef inline void _axpy(floating* y, floating a, const floating* x, Py_ssize_t n) noexcept nogil:
    cdef Py_ssize_t i
    for i in range(n):
        y[i] += a * x[i]


cdef inline double _tanh(double x) noexcept nogil:
    # through one expm1 (libm's tanh adds branches around the same call); NaN stays NaN
    cdef double t = expm1(-2.0 * fabs(x))
    cdef double r = -t / (2.0 + t)
    return -r if x < 0 else r


cdef inline double _sigmoid(double z) noexcept nogil:
    cdef double e
    if z >= 0:
        return 1.0 / (1.0 + exp(-z))
    e = exp(z)
    return e / (1.0 + e)


# ----------------------------------------------------------------------------------
# forward, loss, backward, update

cdef void _forward(const Net* net, const floating* w, const floating** rows, Py_ssize_t m,
                   floating** acts) noexcept nogil:
    """Pre-activations of the output layer (in ``acts[L-1]``) for ``m`` rows.

    Hidden layers store their activations; the output layer stores ``z``.
    """
    cdef Py_ssize_t l, r, j, n_in, n_out
    cdef const floating* W
    cdef const floating* b
    cdef const floating* inp
    cdef floating* out
    cdef floating z
    cdef int L = net.n_layers
    for l in range(L):
        n_in = net.sizes[l]
        n_out = net.sizes[l + 1]
        W = w + net.w_off[l]
        b = w + net.b_off[l]
        for r in range(m):
            inp = rows[r] if l == 0 else acts[l - 1] + r * n_in
            out = acts[l] + r * n_out
            for j in range(n_out):
                out[j] = b[j] + _dot(W + j * n_in, inp, n_in)
            if l < L - 1:
                if net.activation == ACT_RELU:
                    for j in range(n_out):
                        if not out[j] > 0:   # also maps NaN to 0: the caller checks layer-0 z
                            out[j] = 0
                else:
                    for j in range(n_out):
                        out[j] = _tanh(out[j])


cdef inline bint _row_finite(const floating* x, Py_ssize_t n) noexcept nogil:
    cdef Py_ssize_t i
    cdef floating s = 0
    for i in range(n):
        s += x[i] * 0
    return s == 0


cdef int _output_delta(const Net* net, floating* z, const floating* y, Py_ssize_t ty,
                       floating* delta, double* loss) noexcept nogil:
    """Loss of one row and d loss / d z into ``delta``; returns a status code.

    ``z`` is the output pre-activation (length K), ``y`` the row's target(s).
    """
    cdef Py_ssize_t j, K = net.sizes[net.n_layers], c
    cdef double zj, r, mx, s, lse, yv, e, total = 0.0
    if net.output == OUT_SOFTMAX:
        yv = y[0]
        c = <Py_ssize_t>yv
        if not (yv >= 0 and yv < K and <double>c == yv):
            return ST_BAD_Y
        mx = z[0]
        for j in range(1, K):
            if z[j] > mx:
                mx = z[j]
        s = 0.0
        for j in range(K):
            s += exp(z[j] - mx)
        lse = mx + log1p(s - 1.0)
        for j in range(K):
            delta[j] = <floating>exp(z[j] - lse)
        delta[c] -= 1
        loss[0] = lse - z[c]
        return ST_OK
    if net.output == OUT_SIGMOID:
        for j in range(K):
            yv = y[j]
            if not (yv == 0.0 or yv == 1.0):
                return ST_BAD_Y
            zj = z[j]
            e = exp(-fabs(zj))   # one exp serves the loss and the sigmoid
            total += (zj if zj > 0 else 0.0) - yv * zj + log1p(e)
            delta[j] = <floating>((1.0 / (1.0 + e) if zj >= 0 else e / (1.0 + e)) - yv)
        loss[0] = total
        return ST_OK
    for j in range(K):
        yv = y[j]
        if not _finite(yv):
            return ST_BAD_Y
        r = z[j] - yv
        if net.loss == LOSS_HUBER and fabs(r) > HUBER_DELTA:
            total += HUBER_DELTA * (fabs(r) - 0.5 * HUBER_DELTA)
            delta[j] = <floating>(HUBER_DELTA if r > 0 else -HUBER_DELTA)
        else:
            total += 0.5 * r * r
            delta[j] = <floating>r
    loss[0] = total
    return ST_OK


cdef void _backward(const Net* net, const floating* w, const floating** rows, Py_ssize_t m,
                    floating** acts, floating* delta, floating* dprev, floating* g) noexcept nogil:
    """Accumulate the gradient of the batch into ``g``.

    ``delta`` holds d loss / d z of the output layer (m x K, already scaled by the
    sample weights and 1/m); it is overwritten while walking down the layers.
    """
    cdef Py_ssize_t l, r, j, i, n_in, n_out
    cdef const floating* W
    cdef const floating* inp
    cdef floating* gW
    cdef floating* gb
    cdef floating* dr
    cdef floating* pr
    cdef floating* a
    cdef floating* tmp
    cdef floating d
    for l in range(net.n_layers - 1, -1, -1):
        n_in = net.sizes[l]
        n_out = net.sizes[l + 1]
        W = w + net.w_off[l]
        gW = g + net.w_off[l]
        gb = g + net.b_off[l]
        if l > 0:
            memset(dprev, 0, m * n_in * sizeof(floating))
        for r in range(m):
            inp = rows[r] if l == 0 else acts[l - 1] + r * n_in
            dr = delta + r * n_out
            pr = dprev + r * n_in
            for j in range(n_out):
                d = dr[j]
                if d == 0:
                    continue
                _axpy(gW + j * n_in, d, inp, n_in)
                gb[j] += d
                if l > 0:
                    _axpy(pr, d, W + j * n_in, n_in)
        if l > 0:
            a = acts[l - 1]
            if net.activation == ACT_RELU:
                for i in range(m * n_in):
                    if not a[i] > 0:
                        dprev[i] = 0
            else:
                for i in range(m * n_in):
                    dprev[i] *= 1 - a[i] * a[i]
            tmp = delta
            delta = dprev
            dprev = tmp


cdef void _update(const Net* net, const Hyper* hp, double eta, floating* w, floating* g,
                  const float* ref) noexcept nogil:
    """w -= eta * (g + l2 * W + mu * (w - ref)), all from the old w; zero g.

    L2 spares the biases; the FedProx term covers every parameter.
    """
    cdef Py_ssize_t l, i
    cdef floating e = <floating>eta
    cdef floating l2 = <floating>hp.l2
    cdef floating mu = <floating>(eta * hp.prox_mu)
    if hp.l2 != 0:
        for l in range(net.n_layers):
            for i in range(net.w_off[l], net.b_off[l]):
                g[i] += l2 * w[i]
    if ref != NULL:
        for i in range(net.n_params):
            w[i] -= e * g[i] + mu * (w[i] - ref[i])
    else:
        for i in range(net.n_params):
            w[i] -= e * g[i]
    memset(g, 0, net.n_params * sizeof(floating))


# ----------------------------------------------------------------------------------
# the training loop

cdef Outcome _train(const Net* net, const Hyper* hp, const floating* X, Py_ssize_t n,
                    const floating* Y, Py_ssize_t ty, const double* sw, float* params,
                    const float* ref, uint64_t rng) noexcept nogil:
    cdef Outcome out
    cdef Py_ssize_t P = net.n_params, d = net.sizes[0], L = net.n_layers
    cdef Py_ssize_t K = net.sizes[L], B = hp.batch_size
    cdef Py_ssize_t epoch, start, m, r, i, j, k, width, total_act
    cdef Py_ssize_t tmp_idx
    cdef long long step = hp.step0
    cdef double eta, row_loss, scale
    cdef int st
    cdef floating* acts[MAX_LAYERS]
    cdef floating* zrow
    out.status = ST_OK
    out.row = -1
    out.epoch = 0
    out.loss_sum = 0.0
    out.seen = 0
    out.steps = 0
    out.rng = rng
    if B > n:
        B = n
    total_act = 0
    for i in range(L):
        total_act += B * net.sizes[i + 1]

    cdef floating* w = <floating*>malloc(P * sizeof(floating))
    cdef floating* g = <floating*>malloc(P * sizeof(floating))
    cdef floating* act_buf = <floating*>malloc(total_act * sizeof(floating))
    cdef floating* d1 = <floating*>malloc(B * net.max_width * sizeof(floating))
    cdef floating* d2 = <floating*>malloc(B * net.max_width * sizeof(floating))
    cdef const floating** rows = <const floating**>malloc(B * sizeof(floating*))
    cdef Py_ssize_t* idx = <Py_ssize_t*>malloc(n * sizeof(Py_ssize_t))
    if not (w and g and act_buf and d1 and d2 and rows and idx):
        out.status = ST_NO_MEMORY
        free(w); free(g); free(act_buf); free(d1); free(d2); free(rows); free(idx)
        return out

    for i in range(P):
        w[i] = params[i]
    memset(g, 0, P * sizeof(floating))
    k = 0
    for i in range(L):
        acts[i] = act_buf + k
        k += B * net.sizes[i + 1]
    for i in range(n):
        idx[i] = i

    for epoch in range(hp.epochs):
        out.epoch = epoch
        if hp.shuffle:
            i = n - 1
            while i > 0:
                j = <Py_ssize_t>((_next(&rng) >> 11) * (1.0 / 9007199254740992.0) * (i + 1))
                tmp_idx = idx[i]
                idx[i] = idx[j]
                idx[j] = tmp_idx
                i -= 1
        start = 0
        while start < n:
            m = B if start + B <= n else n - start
            for r in range(m):
                rows[r] = X + idx[start + r] * d
            # warm the cache with the next batch's rows (random order defeats the prefetcher)
            for r in range(start + m, start + 2 * m if start + 2 * m <= n else n):
                k = idx[r]
                _prefetch_row(X + k * d, d * sizeof(floating))
                FEDGATE_PREFETCH(Y + k * ty)
                if sw != NULL:
                    FEDGATE_PREFETCH(sw + k)
            _forward(net, w, rows, m, acts)
            # layer-0 pre-activation is non-finite iff the row holds NaN/Inf (or w blew up)
            if L > 1:
                width = net.sizes[1]
                for r in range(m):
                    # hidden relu masks NaN, so re-derive layer-0 z of unit 0 for the check
                    if not _finite(<double>(w[net.b_off[0]] + _dot(w, rows[r], d))):
                        out.status = ST_BAD_X if not _row_finite(rows[r], d) else ST_DIVERGED
                        out.row = idx[start + r]
                        break
                if out.status != ST_OK:
                    break
            for r in range(m):
                zrow = acts[L - 1] + r * K
                if not _finite(<double>zrow[0]):
                    out.status = ST_BAD_X if not _row_finite(rows[r], d) else ST_DIVERGED
                    out.row = idx[start + r]
                    break
                st = _output_delta(net, zrow, Y + idx[start + r] * ty, ty, d1 + r * K, &row_loss)
                if st != ST_OK:
                    out.status = st
                    out.row = idx[start + r]
                    break
                out.loss_sum += row_loss
                scale = (sw[idx[start + r]] if sw != NULL else 1.0) / m
                if scale != 1.0:
                    for j in range(K):
                        d1[r * K + j] *= <floating>scale
            if out.status != ST_OK:
                break
            _backward(net, w, rows, m, acts, d1, d2, g)
            if hp.power_t != 0:
                eta = hp.lr / pow(<double>(step + 1), hp.power_t)
            else:
                eta = hp.lr
            _update(net, hp, eta, w, g, ref)
            step += 1
            out.seen += m
            start += m
        if out.status != ST_OK:
            break
        for i in range(P):
            if not _finite(<double>w[i]):
                out.status = ST_DIVERGED
                break
        if out.status != ST_OK or not _finite(out.loss_sum):
            out.status = ST_DIVERGED
            break

    if out.status == ST_OK:
        for i in range(P):
            params[i] = <float>w[i]
    out.steps = step - hp.step0
    out.rng = rng
    free(w); free(g); free(act_buf); free(d1); free(d2); free(rows); free(idx)
    return out


# ----------------------------------------------------------------------------------
# inference

cdef int _infer(const Net* net, const floating* X, Py_ssize_t n, const floating* w,
                const floating* Y, Py_ssize_t ty, floating* out, double* losses,
                Py_ssize_t* bad_row) noexcept nogil:
    """Outputs after the link (``out``, n x K) or per-row losses (``losses``, n)."""
    cdef Py_ssize_t L = net.n_layers, K = net.sizes[L], d = net.sizes[0]
    cdef Py_ssize_t B = 256, start, m, r, j, total_act = 0, k
    cdef floating* acts[MAX_LAYERS]
    cdef floating* z
    cdef floating* o
    cdef double mx, s, row_loss
    cdef int st = ST_OK
    if B > n:
        B = n
    for j in range(L):
        total_act += B * net.sizes[j + 1]
    cdef floating* act_buf = <floating*>malloc(total_act * sizeof(floating))
    cdef floating* dbuf = <floating*>malloc(K * sizeof(floating))
    cdef const floating** rows = <const floating**>malloc(B * sizeof(floating*))
    if not (act_buf and dbuf and rows):
        free(act_buf); free(dbuf); free(rows)
        return ST_NO_MEMORY
    k = 0
    for j in range(L):
        acts[j] = act_buf + k
        k += B * net.sizes[j + 1]
    start = 0
    while start < n and st == ST_OK:
        m = B if start + B <= n else n - start
        for r in range(m):
            rows[r] = X + (start + r) * d
            if not _row_finite(rows[r], d):
                bad_row[0] = start + r
                st = ST_BAD_X
                break
        if st != ST_OK:
            break
        _forward(net, w, rows, m, acts)
        for r in range(m):
            z = acts[L - 1] + r * K
            if losses != NULL:
                st = _output_delta(net, z, Y + (start + r) * ty, ty, dbuf, &row_loss)
                if st != ST_OK:
                    bad_row[0] = start + r
                    break
                losses[start + r] = row_loss
                continue
            o = out + (start + r) * K
            if net.output == OUT_SOFTMAX:
                mx = z[0]
                for j in range(1, K):
                    if z[j] > mx:
                        mx = z[j]
                s = 0.0
                for j in range(K):
                    o[j] = <floating>exp(z[j] - mx)
                    s += o[j]
                for j in range(K):
                    o[j] = <floating>(o[j] / s)
            elif net.output == OUT_SIGMOID:
                for j in range(K):
                    o[j] = <floating>_sigmoid(z[j])
            else:
                memcpy(o, z, K * sizeof(floating))
        start += m
    free(act_buf); free(dbuf); free(rows)
    return st


# ----------------------------------------------------------------------------------
# Python-visible kernel object

cdef void* _data(cnp.ndarray a, int typenum, Py_ssize_t size) except NULL:
    """Pointer to ``a``'s data after checking dtype, C-contiguity and exact size."""
    if (cnp.PyArray_TYPE(a) != typenum or not cnp.PyArray_IS_C_CONTIGUOUS(a)
            or cnp.PyArray_SIZE(a) != size):
        raise ValueError(f"kernel argument: expected a C-contiguous {'float32' if typenum == cnp.NPY_FLOAT32 else 'float64'}"
                         f" array of {size} values, got {a.dtype} of {a.size}")
    return cnp.PyArray_DATA(a)


cdef class Settings:
    """Validated training hyper-parameters packed in the C struct the loop reads.

    Built once per distinct set of values by the facade and reused across calls.
    ``power_t`` is 0 for a constant rate (``lr / (t + 1) ** power_t`` otherwise).
    """

    cdef Hyper hp

    def __cinit__(self, Py_ssize_t epochs, Py_ssize_t batch_size, double lr, double power_t,
                  double l2, double prox_mu, bint shuffle):
        self.hp.epochs = epochs
        self.hp.batch_size = batch_size
        self.hp.lr = lr
        self.hp.power_t = power_t
        self.hp.l2 = l2
        self.hp.prox_mu = prox_mu
        self.hp.shuffle = shuffle
        self.hp.step0 = 0

    @property
    def prox_mu(self) -> float:
        return self.hp.prox_mu

    @property
    def lr(self) -> float:
        return self.hp.lr


cdef class Kernel:
    """A network's shape and link/loss codes; trains and evaluates flat vectors.

    Parameters
    ----------
    sizes : tuple of int
        ``(n_features, *hidden, n_outputs)``; 2 to 4 entries.
    activation, output, loss : str
        ``"relu"|"tanh"``, ``"identity"|"sigmoid"|"softmax"``, ``"squared"|"huber"|"log"``.
    """

    cdef Net net

    def __cinit__(self, tuple sizes, str activation, str output, str loss):
        cdef Py_ssize_t l, off = 0
        self.net.n_layers = len(sizes) - 1
        self.net.max_width = 0
        for l in range(len(sizes)):
            self.net.sizes[l] = sizes[l]
        for l in range(self.net.n_layers):
            self.net.w_off[l] = off
            off += self.net.sizes[l] * self.net.sizes[l + 1]
            self.net.b_off[l] = off
            off += self.net.sizes[l + 1]
            if self.net.sizes[l + 1] > self.net.max_width:
                self.net.max_width = self.net.sizes[l + 1]
            if l > 0 and self.net.sizes[l] > self.net.max_width:
                self.net.max_width = self.net.sizes[l]
        self.net.n_params = off
        self.net.activation = _ACTIVATIONS[activation]
        self.net.output = _OUTPUTS[output]
        self.net.loss = _LOSSES[loss]

    @property
    def n_params(self) -> int:
        return self.net.n_params

    def train(self, cnp.ndarray X, cnp.ndarray Y, Py_ssize_t ty, cnp.ndarray sw, cnp.ndarray params,
              cnp.ndarray ref, Settings settings not None, long long step0, uint64_t rng):
        """Train ``params`` in place; returns ``(status, row, epoch, loss_sum, seen, steps, rng)``.

        ``X`` (n x d) and ``Y`` (n x ty, flat) share one dtype, float32 or float64,
        C-contiguous; ``params`` float32 (n_params); ``sw`` float64, empty or n
        sample weights; ``ref`` float32, empty or the FedProx reference (n_params).
        ``step0`` is the model's step count (for ``invscaling``), ``rng`` its
        shuffling state. Raw pointers are taken once after a cheap
        dtype/contiguity/size guard.
        """
        cdef Outcome res
        cdef Hyper hp = settings.hp
        cdef Py_ssize_t n = cnp.PyArray_DIM(X, 0), P = self.net.n_params
        cdef int typ = cnp.PyArray_TYPE(X)
        if typ != cnp.NPY_FLOAT32:
            typ = cnp.NPY_FLOAT64
        if cnp.PyArray_NDIM(X) != 2 or cnp.PyArray_DIM(X, 1) != self.net.sizes[0] or n < 1:
            raise ValueError("X must be (n >= 1, n_features)")
        cdef void* xp = _data(X, typ, n * self.net.sizes[0])
        cdef void* yp = _data(Y, typ, n * ty)
        cdef float* pp = <float*>_data(params, cnp.NPY_FLOAT32, P)
        cdef const double* swp = NULL
        cdef const float* refp = NULL
        if cnp.PyArray_SIZE(sw) > 0:
            swp = <const double*>_data(sw, cnp.NPY_FLOAT64, n)
        if cnp.PyArray_SIZE(ref) > 0:
            refp = <const float*>_data(ref, cnp.NPY_FLOAT32, P)
        hp.step0 = step0
        if typ == cnp.NPY_FLOAT32:
            with nogil:
                res = _train(&self.net, &hp, <const float*>xp, n, <const float*>yp, ty, swp, pp, refp, rng)
        else:
            with nogil:
                res = _train(&self.net, &hp, <const double*>xp, n, <const double*>yp, ty, swp, pp, refp, rng)
        return res.status, res.row, res.epoch, res.loss_sum, res.seen, res.steps, res.rng

    def infer(self, cnp.ndarray X, cnp.ndarray w, cnp.ndarray out):
        """Outputs after the link into ``out`` (n x K, X's dtype); ``w`` in X's dtype.

        Returns ``(status, bad_row)``.
        """
        return self._run(X, w, None, 0, out, None)

    def sample_losses(self, cnp.ndarray X, cnp.ndarray w, cnp.ndarray Y, Py_ssize_t ty,
                      cnp.ndarray losses):
        """Per-row loss into ``losses`` (float64, n). Returns ``(status, bad_row)``."""
        return self._run(X, w, Y, ty, None, losses)

    cdef tuple _run(self, cnp.ndarray X, cnp.ndarray w, object Y, Py_ssize_t ty, object out,
                    object losses):
        cdef Py_ssize_t n = cnp.PyArray_DIM(X, 0), bad = -1
        cdef Py_ssize_t K = self.net.sizes[self.net.n_layers]
        cdef int st
        cdef int typ = cnp.PyArray_TYPE(X)
        if typ != cnp.NPY_FLOAT32:
            typ = cnp.NPY_FLOAT64
        if cnp.PyArray_NDIM(X) != 2 or cnp.PyArray_DIM(X, 1) != self.net.sizes[0]:
            raise ValueError("X must be (n, n_features)")
        if n == 0:
            return ST_OK, -1
        cdef void* xp = _data(X, typ, n * self.net.sizes[0])
        cdef void* wp = _data(w, typ, self.net.n_params)
        cdef void* yp = NULL
        cdef void* op = NULL
        cdef double* lp = NULL
        if Y is not None:
            yp = _data(Y, typ, n * ty)
        if out is not None:
            op = _data(out, typ, n * K)
        if losses is not None:
            lp = <double*>_data(losses, cnp.NPY_FLOAT64, n)
        if op == NULL and lp == NULL:
            raise ValueError("infer needs out or losses")
        if typ == cnp.NPY_FLOAT32:
            with nogil:
                st = _infer(&self.net, <const float*>xp, n, <const float*>wp, <const float*>yp, ty,
                            <float*>op, lp, &bad)
        else:
            with nogil:
                st = _infer(&self.net, <const double*>xp, n, <const double*>wp, <const double*>yp, ty,
                            <double*>op, lp, &bad)
        return st, bad
