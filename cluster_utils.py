"""Interest discovery: k-means (original mini-batch quirks or proper Lloyd) and DPC-KNN.

Pure tensor functions, no config objects (SPEC 3.1). Entry point: `discover_interests`.

* ``kmeans_mode="original"`` reproduces the original torchpq ``MinibatchKMeans``
  driver bit-for-bit in semantics, bugs included (SPEC 3.1 QUIRK a, b, c):
  one pass of consecutive mini-batches, centroids and mini-batches turned into
  their absolute values after each assignment, empty clusters pulled to zero.
* ``kmeans_mode="lloyd"`` is a converged Lloyd k-means on the signed points.
* ``dpc_knn`` is density-peak clustering with k nearest neighbours, chunked.

Distances are computed in row/column chunks so that no N x K block exceeds
``memory_budget_mb``. On CUDA tensors with CuPy importable, the fused kernels of
``cluster_kernels.cu`` are used; otherwise plain torch (CPU or CUDA).
"""
import logging
import math
import os
import time

import torch

logger = logging.getLogger(__name__)

try:  # optional GPU kernels; the torch path below is always available
    import cupy as _cp
    _CUPY_ERROR = None
except Exception as _err:  # ImportError, or CUDA driver problems at import time
    _cp = None
    _CUPY_ERROR = f'cupy does not import ({type(_err).__name__}: {_err})'

_KERNEL_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'cluster_kernels.cu')
_KERNELS = {}  # device index -> (nearest fn, accumulate fn) or None when compilation failed
_KERNEL_ERRORS = {}  # device index -> why the kernels failed to compile there
_KERNEL_OPTIONS = ()  # NVRTC options of the RawModule (its default C++ dialect suffices)
_FALLBACK_WARNED = False  # the torch fall-back on a CUDA tensor is logged once per process
_NEAREST_ROWS = 64  # rows per CUDA block of `nearest_centroid`; must match TM in the .cu file
# Block shape of the torch path. Blocks are computed transposed, [cols, rows] = C X^T: with D = 300
# that GEMM runs near the machine's large-GEMM rate while X C^T does not (measured on the 2-core
# CPU at 8770 x 4385 x 300: 137 vs 83 GFLOP/s, a 4096^3 GEMM 151). On the CPU, blocks of at most
# 256 rows x 4096 centroids (4 MB) stay in cache for the min pass (Office size, 52000 x 15600:
# 139 GFLOP/s, against 125 with all 15600 centroids in one block). GPUs want larger blocks.
_MAX_ROWS = {'cpu': 256, 'cuda': 2048}
_MAX_COLS = {'cpu': 4096}

_DEFAULTS = {'original': {'niter': 5, 'tol': 1e-5}, 'lloyd': {'niter': 50, 'tol': 1e-4}}
_ALGORITHMS = ('kmeans', 'dpc_knn')


# ----------------------------------------------------------------------------- checks

def _as_points(points):
    """Float32 contiguous view/copy of `points` [P, D]; the caller's tensor is never modified."""
    if not torch.is_tensor(points) or points.dim() != 2:
        raise ValueError(f'points must be a 2-D tensor [P, D], got {type(points).__name__} '
                         f"{tuple(points.shape) if torch.is_tensor(points) else ''}")
    return points.detach().to(torch.float32).contiguous()


def _check_k(n_clusters, n_points):
    if not isinstance(n_clusters, int) or n_clusters < 1 or n_clusters > n_points:
        raise ValueError(f'n_clusters must be an int in [1, {n_points}] (number of points), got {n_clusters!r}')


def _check_mode(mode):
    if mode not in _DEFAULTS:
        raise ValueError(f'unknown kmeans_mode {mode!r}; expected one of {sorted(_DEFAULTS)}')


# ----------------------------------------------------------------------------- CuPy path

def _use_cupy(t):
    """True when the CuPy kernels can run on tensor `t` (CUDA tensor, cupy imported, kernels built).
    A CUDA tensor that takes the torch path logs why, once per process."""
    if not t.is_cuda:
        return False
    reason = cupy_unavailable(t.device)
    if reason is None:
        return True
    global _FALLBACK_WARNED
    if not _FALLBACK_WARNED:
        _FALLBACK_WARNED = True
        logger.warning(f'CuPy kernels not used on CUDA tensors: {reason}; interest discovery takes the '
                       'slower torch path')
    return False


def kernel_path(device):
    """'cupy' when the CuPy kernels run on `device` (cupy imports and the kernels compiled), else 'torch'."""
    return 'cupy' if _use_cupy(torch.zeros(1, 1, device=device)) else 'torch'


def cupy_unavailable(device):
    """Why the CuPy kernels cannot run on CUDA `device` (cupy missing, or the kernels failed to
    compile there), or None when they can."""
    if _cp is None:
        return _CUPY_ERROR or 'cupy is disabled (cluster_utils._cp is None)'
    if _cupy_kernels(device) is None:
        index = device.index if device.index is not None else torch.cuda.current_device()
        return _KERNEL_ERRORS.get(index, 'the kernels failed to compile')
    return None


def _cupy_kernels(device):
    """Compile `cluster_kernels.cu` once per device; None (torch fallback) if that fails."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _KERNELS:
        try:
            with open(_KERNEL_FILE) as f:
                source = f.read()
            with _cp.cuda.Device(index):
                module = _cp.RawModule(code=source, options=_KERNEL_OPTIONS)
                _KERNELS[index] = (module.get_function('nearest_centroid'),
                                   module.get_function('cluster_accumulate'))
        except Exception as err:  # keep training alive on the torch path (_use_cupy logs why)
            _KERNEL_ERRORS[index] = (f'cluster_kernels.cu failed to compile on cuda:{index} '
                                     f'({type(err).__name__}: {str(err)[:1000]})')
            _KERNELS[index] = None
    return _KERNELS[index]


def _cupy_launch(t, fn, grid, block, args):
    """Run a RawKernel on torch's current stream of `t`'s device (so ordering with torch ops holds)."""
    with _cp.cuda.Device(t.device.index), \
            _cp.cuda.ExternalStream(torch.cuda.current_stream(t.device).cuda_stream):
        fn(grid, block, tuple(_cp.from_dlpack(a) if torch.is_tensor(a) else a for a in args))


def _cupy_nearest(x, c):
    """Fused nearest-centroid kernel. x [N, D], c [K, D] float32 CUDA -> (dist [N], idx long [N])."""
    n, d = x.shape
    k = c.shape[0]
    nearest, _ = _cupy_kernels(x.device)
    x_sq = (x * x).sum(1)  # [N]
    c_sq = (c * c).sum(1)  # [K]
    dist = torch.empty(n, dtype=torch.float32, device=x.device)
    idx = torch.empty(n, dtype=torch.int64, device=x.device)
    if n == 0:
        return dist, idx
    grid = ((n + _NEAREST_ROWS - 1) // _NEAREST_ROWS,)
    args = (x, c.contiguous(), c_sq, x_sq, _cp.int32(n), _cp.int32(k), _cp.int32(d), idx, dist)
    _cupy_launch(x, nearest, grid, (16, 16), args)
    return dist, idx


def _cupy_sums(x, labels, k, use_abs):
    """atomicAdd accumulation: per-cluster sums [K, D] (of |x| if use_abs) and counts [K] (float)."""
    n, d = x.shape
    _, accumulate = _cupy_kernels(x.device)
    sums = torch.zeros(k, d, dtype=torch.float32, device=x.device)
    counts = torch.zeros(k, dtype=torch.float32, device=x.device)
    if n == 0:
        return sums, counts
    threads = 256
    blocks = min((n * d + threads - 1) // threads, 65535 * 8)  # grid-stride loop covers the rest
    args = (x, labels.to(torch.int64).contiguous(), _cp.int64(n), _cp.int32(d),
            _cp.int32(1 if use_abs else 0), sums, counts)
    _cupy_launch(x, accumulate, (blocks,), (threads,), args)
    return sums, counts


# ----------------------------------------------------------------------------- distances

def _chunk_shape(n, k, memory_budget_mb, device_type='cpu'):
    """(rows, cols) of the largest distance block within the budget; cols < k only if one row of K does not fit."""
    budget = max(1, int(memory_budget_mb * 2 ** 20) // 4)  # float32 elements
    cols = max(1, min(k, budget, _MAX_COLS.get(device_type, k)))
    rows = max(1, min(n, _MAX_ROWS.get(device_type, 2048), budget // cols))
    return rows, cols


def pairwise_nearest(x, c, memory_budget_mb=256):
    """Nearest centroid by squared Euclidean distance, chunked.

    Computes ||x||^2 - 2 x c^T + ||c||^2 block by block, fused with the arg-min, so no
    N x K block larger than `memory_budget_mb` is ever allocated. Ties go to the lowest
    centroid index, also across column chunks, so results do not depend on the chunking.

    Args:
        x: float [N, D]; c: float [K, D] (same device).
    Returns:
        dist: float [N], squared distance to the nearest centroid (clamped at 0).
        idx: long [N], index of the nearest centroid.
    """
    x = _as_points(x)
    c = _as_points(c)
    if _use_cupy(x):
        return _cupy_nearest(x, c)
    n, k = x.shape[0], c.shape[0]
    rows, cols = _chunk_shape(n, k, memory_budget_mb, x.device.type)
    half_c_sq = 0.5 * (c * c).sum(1)  # [K]; argmin of (||c||^2/2 - x.c) == argmin of the distance
    dist = torch.empty(n, dtype=torch.float32, device=x.device)
    idx = torch.empty(n, dtype=torch.int64, device=x.device)
    buf = torch.empty(rows * cols, dtype=torch.float32, device=x.device)  # reused: no allocation per chunk
    for r0 in range(0, n, rows):
        xr = x[r0:r0 + rows]  # [n_r, D]
        best_v, best_i = _nearest_in_row_chunk(xr, c, half_c_sq, cols, buf)
        dist[r0:r0 + rows] = (xr * xr).sum(1) + 2.0 * best_v
        idx[r0:r0 + rows] = best_i
    return dist.clamp_(min=0.0), idx


def _nearest_in_row_chunk(xr, c, half_c_sq, cols, buf):
    """Min over centroids of ||c||^2/2 - x.c for one row chunk. Returns (value [n_r], index [n_r])."""
    n_r, k = xr.shape[0], c.shape[0]
    best_v = best_i = None
    for c0 in range(0, k, cols):
        kc = min(cols, k - c0)
        block = buf[:kc * n_r].view(kc, n_r)  # [kc, n_r], transposed: see _MAX_ROWS
        # one GEMM writes the shifted distances in place (beta=1 adds the broadcast norms)
        torch.addmm(half_c_sq[c0:c0 + kc, None], c[c0:c0 + kc], xr.t(), alpha=-1.0, out=block)
        v, i = block.min(0)  # first index on ties
        if best_v is None:
            best_v, best_i = v, i
        else:  # strict '<': an equal value in a later chunk keeps the earlier (lower) index
            better = v < best_v
            best_v = torch.where(better, v, best_v)
            best_i = torch.where(better, i + c0, best_i)
    return best_v, best_i


def cluster_sums(x, labels, k, use_abs=False):
    """Per-cluster sums and member counts.

    Args:
        x: float [N, D]; labels: long [N] in [0, k); use_abs: sum |x| instead of x.
    Returns:
        sums: float [K, D]; counts: float [K].
    """
    x = _as_points(x)  # the kernel reads float32 rows at stride D, like pairwise_nearest's
    labels = labels.to(torch.int64).contiguous()
    if _use_cupy(x):
        return _cupy_sums(x, labels, k, use_abs)
    src = x.abs() if use_abs else x
    sums = torch.zeros(k, x.shape[1], dtype=torch.float32, device=x.device).index_add_(0, labels, src)
    counts = torch.bincount(labels, minlength=k).to(torch.float32)
    return sums, counts


# ----------------------------------------------------------------------------- k-means

class KMeans:
    """faiss-like k-means. `train(x) -> objective`, `assign(x) -> (dist, idx)`.

    mode="original": the original mini-batch k-means, quirks included (see module doc).
    mode="lloyd": Lloyd iterations from K distinct random points (seeded `torch.randperm`;
    chosen over k-means++ because k-means++ is K sequential passes, too slow at K ~ N/2),
    empty clusters re-seeded with the points farthest from their centroid; stops when the
    relative objective improvement < tol or labels stop changing, at most niter updates.

    After train: self.centroids [K, D], self.obj (objective per iteration; one entry per
    mini-batch plus the final one in "original"), self.labels [N], self.n_iter.
    """

    def __init__(self, d, k, mode='original', niter=None, tol=None, seed=2020, batch_size=2048,
                 memory_budget_mb=256):
        _check_mode(mode)
        self.d, self.k, self.mode, self.seed = d, k, mode, seed
        self.niter = _DEFAULTS[mode]['niter'] if niter is None else niter
        self.tol = _DEFAULTS[mode]['tol'] if tol is None else tol
        self.batch_size = batch_size
        self.memory_budget_mb = memory_budget_mb
        self.centroids, self.labels, self.obj, self.n_iter = None, None, [], 0

    def train(self, x):
        """Fit on x [N, D]. Returns the final objective (mean squared distance to the assigned centroid)."""
        x = _as_points(x)
        if x.shape[1] != self.d:
            raise ValueError(f'points have dimension {x.shape[1]}, KMeans was built for d={self.d}')
        _check_k(self.k, x.shape[0])
        self.obj = []
        fit = self._train_original if self.mode == 'original' else self._train_lloyd
        dist, self.labels = fit(x)
        return float(dist.mean())

    def assign(self, x):
        """Nearest centroid of each row of x [N, D] -> (dist float [N], idx long [N]), chunked."""
        return pairwise_nearest(x, self.centroids, self.memory_budget_mb)

    # -- original -------------------------------------------------------------------------

    def _minibatches(self, n):
        """Slices of the original driver: consecutive, the small tail merged into the last batch."""
        bs = self.batch_size if self.batch_size > self.k else int(1.1 * self.k)
        for ptr in range(0, n, bs):
            if n - ptr - bs <= self.k:  # '<=' as in the original; negative also means "the rest"
                yield slice(ptr, n)
                return
            yield slice(ptr, ptr + bs)

    def _train_original(self, x):
        """One pass of quirky mini-batch updates, then label all points. Returns (dist [N], labels [N])."""
        count = torch.ones(self.k, dtype=torch.float32, device=x.device)
        for i, sl in enumerate(self._minibatches(x.shape[0])):
            batch = x[sl]  # [B, D]
            if i == 0:  # init: K distinct random points of the first mini-batch
                g = torch.Generator().manual_seed(self.seed)
                pick = torch.randperm(batch.shape[0], generator=g)[:self.k].to(x.device)
                self.centroids = batch[pick].clone()
            self._original_step(batch, count)
        # QUIRK a: the centroid change is measured after the update is written, so it is 0 and
        # the 5-pass loop always stops after one pass: nothing more to do.
        self.n_iter = 1
        dist, labels = self.assign(x)  # signed points vs the non-negative centroids
        self.obj.append(float(dist.mean()))
        return dist, labels

    def _original_step(self, batch, count):
        """One mini-batch update, in place on self.centroids [K, D] and count [K]."""
        dist, labels = pairwise_nearest(batch, self.centroids, self.memory_budget_mb)  # on signed values
        self.obj.append(float(dist.mean()))
        # QUIRK c: the distance routine leaves |batch| and |centroids| behind.
        sums, members = cluster_sums(batch, labels, self.k, use_abs=True)
        # QUIRK b: a cluster with no member gets c_delta = 0 (sums are 0 there).
        c_delta = sums / members.clamp(min=1.0)[:, None]  # [K, D]
        w = (1.0 / count)[:, None]  # [K, 1], count before adding this batch
        self.centroids = self.centroids.abs() * (1.0 - w) + c_delta * w
        count += members

    # -- lloyd ----------------------------------------------------------------------------

    def _train_lloyd(self, x):
        """Lloyd iterations from seeded random distinct points. Returns (dist [N], labels [N])."""
        g = torch.Generator().manual_seed(self.seed)
        pick = torch.randperm(x.shape[0], generator=g)[:self.k].to(x.device)
        self.centroids = x[pick].clone()
        dist, labels = self.assign(x)
        self.obj.append(float(dist.mean()))
        self.n_iter = 0
        for it in range(1, self.niter + 1):
            self.centroids = self._lloyd_means(x, labels, dist)
            dist, new_labels = self.assign(x)
            self.obj.append(float(dist.mean()))
            self.n_iter = it
            changed = bool((new_labels != labels).any())
            labels = new_labels
            prev, cur = self.obj[-2], self.obj[-1]
            if not changed or prev - cur < self.tol * abs(prev):
                break
        return dist, labels

    def _lloyd_means(self, x, labels, dist):
        """New centroids [K, D]: member means; each empty cluster re-seeded with a distinct point,
        the ones currently farthest from their centroid (largest `dist`)."""
        sums, counts = cluster_sums(x, labels, self.k)
        centroids = sums / counts.clamp(min=1.0)[:, None]
        empty = torch.nonzero(counts == 0).flatten()
        if empty.numel():
            far = torch.topk(dist, empty.numel()).indices  # distinct points, farthest first
            centroids[empty] = x[far]
        return centroids


# ----------------------------------------------------------------------------- DPC-KNN

def _dpc_rows(n, memory_budget_mb):
    """Rows per chunk for DPC-KNN: a row costs its N distances plus mask/where/topk temporaries."""
    per_row = 16 * n  # bytes: dist fp32 + masked copy fp32 + bool mask + slack
    budget = int(memory_budget_mb * 2 ** 20)
    if per_row > budget:
        raise ValueError(f'dpc_knn needs at least {per_row / 2 ** 20:.3f} MiB for one row of {n} '
                         f'distances, but memory_budget_mb={memory_budget_mb}')
    return max(1, min(n, budget // per_row))


def _dpc_dist_rows(x, x_sq, r0, r1, scale):
    """Scaled Euclidean distances of rows r0:r1 to all points: [r1-r0, N], self-distance exactly 0."""
    d2 = torch.addmm(x_sq[None, :], x[r0:r1], x.t(), alpha=-2.0).add_(x_sq[r0:r1, None]).clamp_(min=0.0)
    d2[torch.arange(r1 - r0, device=x.device), torch.arange(r0, r1, device=x.device)] = 0.0
    return d2.sqrt_().mul_(scale)


def dpc_knn(points, n_clusters, local_size, memory_budget_mb=256):
    """Density-peak clustering with k nearest neighbours (SPEC 3.1), in row chunks.

    dist = euclidean / sqrt(D); density = exp(-mean of squared dist to the `local_size`
    nearest, the point itself included); parent distance = dist to the nearest point of
    strictly higher density (global max dist if none); score = parent * density; the
    top-K scores are centres; points go to the nearest centre, centres to themselves;
    centroid = sum of members / (count + 1e-4). Unlike the original, no random noise is
    added to the density, so the result is deterministic.

    Args:
        points: float [P, D]; n_clusters: K; local_size: k of the kNN, in [1, P].
    Returns:
        labels: long [P] in [0, K); centroids: float [K, D].
    """
    x = _as_points(points)
    n, d = x.shape
    _check_k(n_clusters, n)
    if local_size is None or not 1 <= int(local_size) <= n:
        raise ValueError(f'dpc_knn needs local_size in [1, {n}], got {local_size!r}')
    rows = _dpc_rows(n, memory_budget_mb)
    x_sq, scale = (x * x).sum(1), 1.0 / math.sqrt(d)
    # pass 1: kNN density and the global max distance
    density = torch.empty(n, dtype=torch.float32, device=x.device)
    dist_max = torch.zeros((), dtype=torch.float32, device=x.device)
    for r0 in range(0, n, rows):
        dist = _dpc_dist_rows(x, x_sq, r0, min(n, r0 + rows), scale)
        near = torch.topk(dist, int(local_size), dim=1, largest=False).values  # [r, k]
        density[r0:r0 + rows] = torch.exp(-(near * near).mean(1))
        dist_max = torch.maximum(dist_max, dist.max())
    # pass 2: distance to the nearest point of strictly higher density
    parent = torch.empty(n, dtype=torch.float32, device=x.device)
    for r0 in range(0, n, rows):
        dist = _dpc_dist_rows(x, x_sq, r0, min(n, r0 + rows), scale)
        higher = density[None, :] > density[r0:r0 + rows, None]  # [r, N]
        parent[r0:r0 + rows] = torch.where(higher, dist, dist_max).min(1).values
    centres = torch.topk(parent * density, n_clusters).indices  # [K]
    _, labels = pairwise_nearest(x, x[centres], memory_budget_mb)
    labels[centres] = torch.arange(n_clusters, device=x.device)
    sums, counts = cluster_sums(x, labels, n_clusters)
    return labels, sums / (counts[:, None] + 1e-4)


# ----------------------------------------------------------------------------- entry point

def write_interest_tables(labels, centroids, embeddings, lookups):
    """Write interest discovery results in place (SPEC 3.1).

    Args:
        labels: long [M*(N-1)] cluster of every item row, modality blocks in the order of `lookups`.
        centroids: float [K, H]; written to embeddings[1:] (row 0 stays the zero PAD interest).
        embeddings: float [K+1, H]; lookups: list of M long [N] tables, set to label + 1 (row 0 stays 0).
    """
    embeddings.zero_()
    embeddings[1:1 + len(centroids)] = centroids.to(embeddings)
    for i, table in enumerate(lookups):
        n = len(table) - 1
        table.zero_()
        table[1:] = labels[i * n:(i + 1) * n].to(table) + 1


def discover_interests(points, n_clusters, algorithm='kmeans', kmeans_mode='original', seed=2020,
                       local_size=None, memory_budget_mb=256):
    """Cluster item representations into interests (SPEC 3.1).

    Args:
        points: float [P, D], CPU or CUDA, not modified.
        n_clusters: K in [1, P]. algorithm: "kmeans" | "dpc_knn".
        kmeans_mode: "original" (quirky mini-batch k-means) | "lloyd".
        local_size: k of DPC-KNN (required for dpc_knn).
    Returns:
        labels: long [P] in [0, K); centroids: float [K, D];
        info: dict with 'objective' (mean squared distance to the assigned centroid),
        'n_used' (distinct labels), 'n_iter', 'obj_per_iter', 'seconds', 'algorithm', 'mode'.
    Raises:
        FloatingPointError: some point is NaN or infinite (checked once, before clustering).
    """
    if algorithm not in _ALGORITHMS:
        raise ValueError(f'unknown algorithm {algorithm!r}; expected one of {list(_ALGORITHMS)}')
    _check_mode(kmeans_mode)
    x = _as_points(points)
    _check_k(n_clusters, x.shape[0])
    finite = torch.isfinite(x).all(1)
    if not bool(finite.all()):  # a NaN/inf row never has a nearest centroid: the kernels would write out of bounds
        raise FloatingPointError(f'{int((~finite).sum())} of {x.shape[0]} points are not finite (NaN or inf)')
    start = time.perf_counter()
    with torch.no_grad():
        if algorithm == 'kmeans':
            km = KMeans(x.shape[1], n_clusters, mode=kmeans_mode, seed=seed,
                        memory_budget_mb=memory_budget_mb)
            objective = km.train(x)
            labels, centroids, n_iter, obj = km.labels, km.centroids, km.n_iter, list(km.obj)
        else:
            labels, centroids = dpc_knn(x, n_clusters, local_size, memory_budget_mb)
            dist = ((x - centroids[labels]) ** 2).sum(1)
            objective, n_iter, obj = float(dist.mean()), 1, [float(dist.mean())]
    info = {'objective': objective, 'n_used': int(torch.unique(labels).numel()), 'n_iter': n_iter,
            'obj_per_iter': obj, 'seconds': time.perf_counter() - start, 'algorithm': algorithm,
            'mode': kmeans_mode if algorithm == 'kmeans' else None}
    return labels, centroids, info
