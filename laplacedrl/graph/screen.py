"""Exact kNN on the CPU through an int8 screen: cheap similarities pick candidates, exact ones decide.

On CPUs with int8 dot-product instructions (AVX-512 VNNI, AVX-VNNI) an int8 matrix product with int32
accumulation runs ~4x faster than a float32 one. The search below screens all pairs that way, computes
float32 similarities only for a few candidates per row, and still returns the exact neighbours:

1. Quantise the unit rows with one scale: ``q = round(x * s)``, ``s = 127 / max|x|``. With
   ``e_i = ||x_i - q_i / s||``, every pair satisfies ``|x_i . x_j - q_i . q_j / s^2| <= b_i`` where
   ``b_i = e_i * max_j ||q_j / s|| + max_j e_j`` (Cauchy-Schwarz; the int32 sums are exact).
2. Guess a threshold per row from a random sample of columns: the score above which about
   ``kp * guess`` entries of the row are expected. A guess only sets how much work follows, never the
   answer.
3. Screen the upper-triangular tiles of ``Q Q^T`` (int32, torch): a numba kernel skims each tile with
   vectorised maxima and appends the entries above a row's (or column's) threshold to that row's
   buffer. A full buffer is cut to its kp best and its threshold raised to the kp-th best.
4. Keep at most kp candidates per row (the best by screen score), score them exactly in float32 (a
   sampled dense-dense product) and take the k best.
5. Certify: every entry of row i that is not a candidate has a screen score <= tau_i (its final
   threshold), so its exact similarity is <= tau_i / s^2 + b_i. A row whose k-th exact similarity is
   larger has its exact top k. For the other rows (more close competitors than kp, near-ties,
   duplicates, a guess that was too high) the screen scores of the whole row are recomputed and every
   column that could still beat the row's k-th exact similarity is scored exactly; rows where that
   is more than a few thousand columns are searched exhaustively in float32.

``available()`` says whether the screen can run and pays on this machine (numba importable, int8
products at least twice as fast as float32 ones).
"""

import functools
import itertools
import math
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

try:
    import numba
except ImportError:                       # the float32 search is used instead
    numba = None

_EMPTY = -(2**30)        # below every real screen score (|q_i . q_j| <= 127^2 d < 2^30 for d < 66,000)
_SLACK = 1e-4            # added to the bound: float32 rounding of the exact scores and of the scale
_CHUNK = 32              # tile-row entries skimmed at once before any is read one by one
MIN_N = 8192             # below this the float32 search is as fast
MIN_D = 2                # torch 2.14 CPU int8 products return garbage for d = 1 (checked d = 2..2048)


@functools.lru_cache(maxsize=1)
def int8_speedup(size=512, d=128, repeats=5):
    """Measured speed of one-thread ``torch._int_mm`` over float32 ``torch.mm`` on a tile (cached)."""
    try:
        gen = torch.Generator().manual_seed(0)
        a, b = torch.randn(size, d, generator=gen), torch.randn(size, d, generator=gen)
        qa, qb = (v.mul(40).round().clamp(-127, 127).to(torch.int8) for v in (a, b))
        old = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            def best(fn):
                fn()
                times = []
                for _ in range(repeats):
                    t = time.perf_counter()
                    fn()
                    times.append(time.perf_counter() - t)
                return min(times)
            return best(lambda: torch.mm(a, b.T)) / best(lambda: torch._int_mm(qa, qb.T))
        finally:
            torch.set_num_threads(old)
    except (RuntimeError, AttributeError):          # no CPU int8 matmul in this torch build
        return 0.0


def available():
    """True when the screen can run here and beats the float32 search (numba, fast int8 products)."""
    return numba is not None and int8_speedup() >= 2.0


def quantize(x):
    """(q (N, d) int8, scale s, bound b (N,) float64) for unit rows x; see the module docstring."""
    scale = 127.0 / max(float(x.abs().max()), 1e-30)
    q = torch.round(x * scale).clamp_(-127, 127).to(torch.int8)
    xq = q.float() / scale
    err = (x - xq).norm(dim=1).double()                                     # (N,) e_i
    bound = err * float(xq.norm(dim=1).max()) + float(err.max()) + _SLACK
    return q, scale, bound


def _njit(**kw):
    """numba.njit when numba is installed (a no-op decorator otherwise: the module still imports)."""
    if numba is None:
        return lambda fn: fn
    return numba.njit(**kw)


# ----------------------------------------------------------------------------------------------------
# Kernels. Per row: a buffer ``buf`` (N, cap) of entries packed ``screen score << 32 | id``, its ``fill``,
# and ``tau``, the score an entry must beat. A row is only touched by one thread at a time.


@_njit(inline="always")
def _kth_largest(a, n, k):
    """The k-th largest (1-based) of a[:n], by quickselect; reorders a."""
    lo, hi = 0, n - 1
    target = k - 1
    while lo < hi:
        x, y, z = a[lo], a[(lo + hi) >> 1], a[hi]
        pivot = max(min(x, y), min(max(x, y), z))            # median of three
        i, j = lo, hi
        while i <= j:                                         # Hoare partition, larger values first
            while a[i] > pivot:
                i += 1
            while a[j] < pivot:
                j -= 1
            if i <= j:
                a[i], a[j] = a[j], a[i]
                i += 1
                j -= 1
        if target <= j:
            hi = j
        elif target >= i:
            lo = i
        else:
            break
    return a[target]


@_njit(cache=True, error_model="numpy")
def _compact(buf, fill, tau, row, kp, scratch):
    """Keep the kp best entries of row ``row``'s buffer and raise its threshold to the kp-th best score.

    Entries are packed ``score << 32 | id``: one int64 order, ties broken by id. The kp-th best comes
    from a 256-bucket histogram of the scores and a quickselect inside the bucket that holds it.
    """
    v = buf[row]
    n = fill[row]
    lo, hi = v[0] >> 32, v[0] >> 32
    for s in range(n):
        lo = min(lo, v[s] >> 32)
        hi = max(hi, v[s] >> 32)
    shift = 0
    while ((hi - lo) >> shift) >= 256:
        shift += 1
    hist = np.zeros(256, np.int64)
    for s in range(n):
        hist[((v[s] >> 32) - lo) >> shift] += 1
    above, bucket = 0, 255                                    # entries in buckets above ``bucket``
    while above + hist[bucket] < kp:
        above += hist[bucket]
        bucket -= 1
    m = 0
    for s in range(n):
        if ((v[s] >> 32) - lo) >> shift == bucket:
            scratch[m] = v[s]
            m += 1
    kth = _kth_largest(scratch, m, kp - above)
    w = 0
    for s in range(n):
        if v[s] >= kth:
            v[w] = v[s]
            w += 1
    fill[row] = kp
    tau[row] = kth >> 32


@_njit(inline="always")
def _push(buf, fill, tau, row, x, j, kp, scratch):
    """Append score x for id j to row ``row``'s buffer; a full buffer is cut back to its kp best."""
    f = fill[row]
    buf[row, f] = (np.int64(x) << 32) | np.int64(j)
    fill[row] = f + 1
    if f + 1 == buf.shape[1]:
        _compact(buf, fill, tau, row, kp, scratch)


@_njit(inline="always")
def _read_chunk(row, c0, c1, i, j0, own, buf, fill, tau, tau_j, kp, scratch, stage, ns):
    """Entries row[c0:c1] of tile row i: appended to row i's buffer when they beat tau[i]; past the
    first ``own`` columns also staged for their column's row when they beat its threshold. Returns the
    new stage length."""
    for b in range(c0, c1):
        x = row[b]
        if x > tau[i]:
            _push(buf, fill, tau, i, x, j0 + b, kp, scratch)
        if b >= own and x > tau_j[b]:
            stage[ns, 0] = x
            stage[ns, 1] = j0 + b
            stage[ns, 2] = i
            ns += 1
    return ns


@_njit(nogil=True, cache=True, fastmath=True, error_model="numpy")
def _screen_tile_kernel(t, i0, j0, own, buf, fill, tau, chunk, kp, scratch, stage):
    """Offer tile t = Q[i0:] Q[j0:]^T (int32) to its rows' buffers. Its first ``own`` columns are the
    rows' own block (the caller set each row's own entry to _EMPTY): their entries go to the rows only,
    the columns' rows getting them from their own tile rows. Entries of the other columns that beat
    their column's threshold are also staged as (score, column's row, row) in ``stage`` for
    :func:`_flush`. Returns the number staged.

    Each chunk of a tile row is skimmed with two vectorised maxima (of the scores, and of the scores
    minus the column thresholds); only chunks that can beat a threshold are read entry by entry.
    """
    bi, bj = t.shape
    tau_j = np.empty(bj, np.int32)
    for b in range(bj):
        tau_j[b] = tau[j0 + b]
    full = bj // chunk
    ns = 0
    for a in range(bi):
        row = t[a]
        i = i0 + a
        for c in range(full):
            base = c * chunk
            both = base + chunk > own
            top = np.int32(_EMPTY)
            over = np.int32(_EMPTY)
            for b in range(chunk):                            # fixed trip count: vectorises
                x = row[base + b]
                top = np.maximum(top, x)
                over = np.maximum(over, np.int32(x - tau_j[base + b]))
            if top > tau[i] or (both and over > 0):
                ns = _read_chunk(row, base, base + chunk, i, j0, own, buf, fill, tau, tau_j, kp, scratch,
                                 stage, ns)
        if full * chunk < bj:
            ns = _read_chunk(row, full * chunk, bj, i, j0, own, buf, fill, tau, tau_j, kp, scratch, stage, ns)
    return ns


@_njit(nogil=True, cache=True, error_model="numpy")
def _flush(stage, buf, fill, tau, kp, r0, r1):
    """Append staged (score, row, id) entries, all with rows in r0..r1-1, row by row (a counting sort
    first, so that each buffer is visited once)."""
    ns = stage.shape[0]
    start = np.zeros(r1 - r0 + 1, np.int64)
    for s in range(ns):
        start[stage[s, 1] - r0 + 1] += 1
    for r in range(r1 - r0):
        start[r + 1] += start[r]
    order = np.empty(ns, np.int64)
    at = start[:r1 - r0].copy()
    for s in range(ns):
        r = stage[s, 1] - r0
        order[at[r]] = s
        at[r] += 1
    scratch = np.empty(buf.shape[1], np.int64)
    for r in range(r1 - r0):
        row = r0 + r
        for s in range(start[r], start[r + 1]):
            e = order[s]
            if stage[e, 0] > tau[row]:
                _push(buf, fill, tau, row, stage[e, 0], stage[e, 2], kp, scratch)


@_njit(nogil=True, cache=True, error_model="numpy")
def _group_rank(scores, group, rank, out):
    """out[r] = the rank-th largest of the maxima of consecutive groups of ``group`` in scores[r] (- 1)."""
    n_groups = scores.shape[1] // group
    maxima = np.empty(n_groups, np.int32)
    for r in range(scores.shape[0]):
        row = scores[r]
        for g in range(n_groups):
            m = row[g * group]
            for b in range(1, group):
                m = max(m, row[g * group + b])
            maxima[g] = m
        out[r] = _kth_largest(maxima, n_groups, rank) - 1


@_njit(nogil=True, cache=True, fastmath=True, error_model="numpy")
def _collect_above(scores, level, out, count):
    """Per row r of scores (int32): the columns whose score beats level[r], in out[r] (at most
    out.shape[1]; count[r] = how many there are, possibly more than fit)."""
    cap = out.shape[1]
    n = scores.shape[1]
    chunk = 32
    full = n // chunk
    for r in range(scores.shape[0]):
        row = scores[r]
        lv = level[r]
        c = 0
        for ch in range(full + 1):
            c0 = ch * chunk
            c1 = min(n, c0 + chunk)
            top = np.int32(_EMPTY)
            if c1 - c0 == chunk:
                for b in range(chunk):                        # fixed trip count: vectorises
                    top = np.maximum(top, row[c0 + b])
            else:
                for b in range(c0, c1):
                    top = max(top, row[b])
            if top > lv:
                for b in range(c0, c1):
                    if row[b] > lv:
                        if c < cap:
                            out[r, c] = b
                        c += 1
        count[r] = c


@_njit(nogil=True, cache=True, error_model="numpy")
def _finish(buf, fill, tau, kp, r0, r1):
    """Rows r0..r1-1 holding more than kp entries are cut to their kp best."""
    scratch = np.empty(buf.shape[1], np.int64)
    for row in range(r0, r1):
        if fill[row] > kp:
            _compact(buf, fill, tau, row, kp, scratch)


# ----------------------------------------------------------------------------------------------------
# The search


def _in_threads(fn, arg_list):
    """fn(*args) for every args, each on its own thread (numba and torch release the GIL); the results
    in order, the first exception re-raised."""
    with ThreadPoolExecutor(max(1, len(arg_list))) as pool:
        return list(pool.map(lambda args: fn(*args), arg_list))


def _cuts(n, parts):
    """(start, end) of ``parts`` near-equal non-empty ranges covering 0..n-1."""
    edges = [n * p // parts for p in range(parts + 1)]
    return [(a, b) for a, b in itertools.pairwise(edges) if b > a]


def guess_thresholds(q, want, sample=2048, group=16, workers=1, seed=0):
    """Per row, a screen score above which about ``want`` of its entries should lie (int32 numpy (N,)).

    From the row's scores against ``sample`` random columns (itself excluded): maxima of groups of
    ``group`` sampled scores, and the one ranked ``want * sample / N`` among them.
    """
    n = q.shape[0]
    gen = torch.Generator().manual_seed(seed)
    cols = torch.randperm(n, generator=gen)[: min(n, sample)]
    cols = cols[: len(cols) // group * group]
    if len(cols) == 0:
        return np.full(n, _EMPTY, dtype=np.int32)
    qc = q[cols]
    n_groups = len(cols) // group
    rank = min(n_groups, max(1, math.ceil(want * len(cols) / n)))
    out_np = np.empty(n, dtype=np.int32)

    def part(a, b):
        for s in range(a, b, 4096):
            e = min(b, s + 4096)
            scores = torch._int_mm(q[s:e], qc.T)                              # (rows, sample)
            own = ((cols >= s) & (cols < e)).nonzero().squeeze(1)              # sampled rows of s..e
            scores[cols[own] - s, own] = _EMPTY                               # never their own column
            _group_rank(scores.numpy(), group, rank, out_np[s:e])

    _in_threads(part, _cuts(n, workers))
    return out_np


def _second_stage(x, q, scale, bound, k, rows, sims, idx, b0, cap=4096):
    """Rows the screen could not certify: every column whose screen score could still reach the row's
    current k-th exact similarity is scored exactly, which settles the row (sims / idx rows - b0 are
    updated in place). A row with more than ``cap`` such columns, or fewer than k candidates so far,
    is searched exhaustively in float32."""
    n = x.shape[0]
    kth = sims[rows - b0, -1].double()
    # a column j with screen score <= level has x_i . x_j <= level / s^2 + b_i < kth: it cannot enter
    level = torch.floor((kth - bound[rows]) * scale**2) - 1
    exhaustive = []
    for s in range(0, len(rows), 256):
        r = rows[s:s + 256]
        lv = level[s:s + 256]
        ok = torch.isfinite(lv)
        scores = torch._int_mm(q[r], q.T)                                    # (b, N) int32
        scores[torch.arange(len(r)), r] = _EMPTY                              # the point itself
        out = np.empty((len(r), cap), dtype=np.int64)
        count = np.empty(len(r), dtype=np.int64)
        _collect_above(scores.numpy(), lv.clamp(_EMPTY, 2**30).to(torch.int32).numpy(), out, count)
        count = torch.from_numpy(count)
        fits = ok & (count >= k) & (count <= cap)
        exhaustive.append(r[~fits])
        r, count, cols = r[fits], count[fits], torch.from_numpy(out)[fits]
        if len(r) == 0:
            continue
        mask = torch.arange(cap)[None, :] < count[:, None]
        crow = torch.zeros(len(r) + 1, dtype=torch.long)
        crow[1:] = torch.cumsum(count, 0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")                                   # sparse CSR is a beta feature
            pattern = torch.sparse_csr_tensor(crow, cols[mask], torch.zeros(int(crow[-1])), size=(len(r), n))
            vals = torch.sparse.sampled_addmm(pattern, x[r], x.T, beta=0.0).values()
        exact = torch.full((len(r), cap), -math.inf)
        exact[mask] = vals
        top, pos = exact[:, :int(count.max())].topk(k, dim=1)
        sims[r - b0], idx[r - b0] = top, cols.gather(1, pos)
    exhaustive = torch.cat(exhaustive)
    for s in range(0, len(exhaustive), 256):                                 # exhaustive float32 search
        r = exhaustive[s:s + 256]
        block = x[r] @ x.T
        block[torch.arange(len(r)), r] = -math.inf
        sims[r - b0], idx[r - b0] = block.topk(k, dim=1)


def _exact_top(x, q, scale, bound, cand, count, k, lo, b0, b1):
    """Rows b0..b1-1: exact top k among their candidates (cand[i, :count[i]]), certified where the k-th
    exact similarity beats lo[i] (the most any non-candidate can reach), settled by
    :func:`_second_stage` elsewhere.

    Returns (sims (b, k), idx (b, k), number certified as a 1-element tensor).
    """
    n, kp = cand.shape
    b = b1 - b0
    cand, count = cand[b0:b1], count[b0:b1]
    short = (count < kp).nonzero().squeeze(1)
    if len(short):                        # pad short rows with their own id; the padding is masked below
        pad = torch.arange(kp)[None, :] >= count[short, None]
        cand = cand.clone()
        cand[short] = torch.where(pad, (short + b0)[:, None], cand[short])
    crow = torch.arange(0, b * kp + 1, kp)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")                                       # sparse CSR is a beta feature
        pattern = torch.sparse_csr_tensor(crow, cand.reshape(-1).long(), torch.zeros(b * kp), size=(b, n))
        exact = torch.sparse.sampled_addmm(pattern, x[b0:b1], x.T, beta=0.0).values().view(b, kp)
    if len(short):
        exact[short] = exact[short].masked_fill(pad, -math.inf)
    sims, pos = exact.topk(k, dim=1)                                         # sorted, decreasing
    idx = cand.gather(1, pos).long()
    certified = sims[:, -1].double() > lo[b0:b1]
    redo = (~certified).nonzero().squeeze(1)
    if len(redo):
        _second_stage(x, q, scale, bound, k, redo + b0, sims, idx, b0)
    return sims, idx, certified.sum().reshape(1)


def knn_screened(x, k, kp=None, rows=512, width=4096, workers=1, guess=1.5, sample=2048, chunk=_CHUNK):
    """Exact kNN of the unit rows x (N, d) through the int8 screen (see the module docstring).

    Args:
        x: (N, d) float32 unit rows.
        k: neighbours per row.
        kp: candidates per row scored exactly (default 4 k, at least k + 16, at most N - 1).
        rows, width: the screen works on blocks of ``rows`` rows against ``width`` columns at a time
            (wide products run at the int8 kernels' best rate); width a multiple of rows.
        workers: threads (each screens whole block rows; the libraries should run single-threaded).
        guess, sample: thresholds aim at ``guess * kp`` entries per row, from ``sample`` columns.
        chunk: tile-row entries skimmed at once.

    Returns:
        (sims (N, k) float32, idx (N, k) int64, stats) with rows sorted by decreasing similarity;
        stats: {"candidates": kp, "certified": fraction of rows the screen certified}.
    """
    if numba is None:
        raise RuntimeError("the int8 screen needs numba")
    n = x.shape[0]
    kp = min(n - 1, kp or max(4 * k, k + 16))
    if not 1 <= k <= kp:
        raise ValueError(f"need 1 <= k <= kp <= N - 1, got k={k}, kp={kp}, N={n}")
    if width % rows:
        raise ValueError(f"width must be a multiple of rows, got rows={rows}, width={width}")
    if x.shape[1] < MIN_D:
        raise ValueError(f"the int8 screen needs features of dimension >= {MIN_D}, got {x.shape[1]}")
    q, scale, bound = quantize(x)
    tau = guess_thresholds(q, guess * kp, sample=sample, workers=workers)
    cap = 3 * kp
    buf = np.empty((n, cap), dtype=np.int64)                     # per row: score << 32 | id
    fill = np.zeros(n, dtype=np.int64)
    spans = [(s, min(n, s + rows)) for s in range(0, n, rows)]
    groups = [(s, min(n, s + width)) for s in range(0, n, width)]   # rows that column slabs feed
    staged = [[] for _ in groups]                 # per group: arrays of staged (score, row, id)
    lock = threading.Lock()
    queue = list(range(len(spans)))               # block rows, the longest first

    def worker():
        """Whole block rows: the columns from the block's first on, in slabs that end on multiples of
        ``width`` (so that each slab feeds one group); the rows of the block are this thread's only."""
        stage = np.empty((rows * width, 3), dtype=np.int32)
        scratch = np.empty(cap, dtype=np.int64)
        while True:
            with lock:
                if not queue:
                    return
                si, ei = spans[queue.pop(0)]
            sj = si
            while sj < n:
                ej = min(n, (sj // width + 1) * width)
                t = torch._int_mm(q[si:ei], q[sj:ej].T)                     # (rows, <= width) int32
                own = ei - si if sj == si else 0
                if own:
                    t[:, :own].diagonal().fill_(_EMPTY)                     # the point itself
                ns = _screen_tile_kernel(t.numpy(), si, sj, own, buf, fill, tau, chunk, kp, scratch, stage)
                if ns:
                    part = stage[:ns].copy()
                    with lock:
                        staged[sj // width].append(part)
                sj = ej

    _in_threads(worker, [()] * workers)

    def flush(which):
        for g in which:
            if staged[g]:
                _flush(np.concatenate(staged[g]), buf, fill, tau, kp, *groups[g])

    _in_threads(flush, [(range(w, len(groups), workers),) for w in range(workers)])
    _in_threads(_finish, [(buf, fill, tau, kp, a, b) for a, b in _cuts(n, workers)])
    count = torch.from_numpy(np.minimum(fill, kp))
    cand = torch.from_numpy(buf[:, :kp] & 0xFFFFFFFF)                        # ids (N, kp) int64
    lo = torch.from_numpy(tau).double() / scale ** 2 + bound                # the most a non-candidate reaches
    parts = _in_threads(lambda b0, b1: _exact_top(x, q, scale, bound, cand, count, k, lo, b0, b1),
                        _cuts(n, workers))
    sims, idx, certified = (torch.cat(v) for v in zip(*parts))
    return sims, idx, {"candidates": kp, "certified": float(certified.sum()) / n}
