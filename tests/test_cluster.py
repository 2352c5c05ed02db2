"""Tests for cluster_utils (SPEC 3.1): original mini-batch k-means quirks, Lloyd, DPC-KNN, kernels."""
import math
import os
import shutil
import subprocess

import pytest
import torch

import cluster_utils as cu
from cluster_utils import KMeans, discover_interests, dpc_knn, pairwise_nearest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _data(n, d, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g).to(device)


# ----------------------------------------------------------------------------- slow references

def _ref_nearest(x, c):
    """Python loop over points, float64 direct differences; first index on ties."""
    x, c = x.double(), c.double()
    labels = []
    for i in range(x.shape[0]):
        d = ((x[i] - c) ** 2).sum(1)
        labels.append(int(torch.argmin(d)))
    return torch.tensor(labels, dtype=torch.long)


def _ref_original(points, k, seed=2020):
    """The original torchpq MinibatchKMeans driver, literally: one pass (QUIRK a),
    |x| and |centroid| after each assignment (QUIRK c), empty cluster -> c = 0 (QUIRK b)."""
    p = points.shape[0]
    bs = 2048
    if bs <= k:
        bs = int(1.1 * k)
    centroids, count = None, [1.0] * k
    ptr = 0
    while ptr < p:
        remaining = p - ptr - bs
        batch = points[ptr:].clone() if remaining <= k else points[ptr:ptr + bs].clone()
        if centroids is None:
            g = torch.Generator().manual_seed(seed)
            centroids = batch[torch.randperm(batch.shape[0], generator=g)[:k]].clone().double()
        labels = _ref_nearest(batch, centroids).tolist()
        batch, centroids = batch.double().abs(), centroids.abs()
        members_of = {}
        for i, j in enumerate(labels):
            members_of.setdefault(j, []).append(i)
        for j in range(k):
            members = members_of.get(j, [])
            c_delta = batch[members].mean(0) if members else torch.zeros(batch.shape[1], dtype=torch.float64)
            w = 1.0 / count[j]
            centroids[j] = centroids[j] * (1 - w) + c_delta * w
            count[j] += len(members)
        if remaining <= k:
            break
        ptr += bs
    return _ref_nearest(points, centroids), centroids.float()


def _ref_lloyd(x, init, niter=100):
    """Plain Lloyd, empty clusters keep their centroid; runs until labels stop changing."""
    c = init.clone().double()
    x = x.double()
    labels = None
    for _ in range(niter):
        new = torch.cdist(x, c).argmin(1)
        if labels is not None and torch.equal(new, labels):
            break
        labels = new
        for j in range(c.shape[0]):
            if (labels == j).any():
                c[j] = x[labels == j].mean(0)
    labels = torch.cdist(x, c).argmin(1)
    return float(((x - c[labels]) ** 2).sum(1).mean())


def _ref_dpc(x, k, local):
    """Dense DPC-KNN (full cdist), as in the original cluster_dpc_knn minus its noise."""
    x = x.double()
    dist = torch.cdist(x, x) / math.sqrt(x.shape[1])
    near = torch.topk(dist, local, dim=1, largest=False).values
    density = torch.exp(-(near ** 2).mean(1))
    mask = density[None, :] > density[:, None]
    dmax = dist.max()
    parent = (dist * mask + dmax * (~mask)).min(1).values
    centres = torch.topk(parent * density, k).indices
    labels = dist[centres].argmin(0)
    labels[centres] = torch.arange(k)
    cent = torch.zeros(k, x.shape[1], dtype=torch.float64).index_add_(0, labels, x)
    cent /= torch.bincount(labels, minlength=k)[:, None] + 1e-4
    return labels, cent.float()


# ----------------------------------------------------------------------------- original mode

@pytest.mark.parametrize("p,k,d", [(300, 150, 8), (5000, 100, 8), (4196, 100, 8), (6000, 2100, 4)])
def test_original_matches_reference(p, k, d):
    x = _data(p, d, seed=p)
    labels, cent, info = discover_interests(x, k, kmeans_mode="original", seed=2020)
    ref_labels, ref_cent = _ref_original(x, k, seed=2020)
    assert torch.equal(labels, ref_labels)
    assert torch.allclose(cent, ref_cent, atol=1e-5, rtol=1e-5)
    assert info["n_iter"] == 1 and info["n_used"] == len(torch.unique(ref_labels))


def test_original_single_batch_consequences():
    """One mini-batch: centroid = mean |x| of members, empty clusters zero, labels collapse.
    Some all-zero rows (items without features) make duplicate seeds, hence empty clusters."""
    x = _data(300, 16, seed=1)
    x[::5] = 0.0
    km = KMeans(16, 150, mode="original")
    km.train(x)
    first = cu.pairwise_nearest(x, x[torch.randperm(300, generator=torch.Generator().manual_seed(2020))[:150]])[1]
    for j in range(150):
        members = x[first == j]
        expect = members.abs().mean(0) if len(members) else torch.zeros(16)
        assert torch.allclose(km.centroids[j], expect, atol=1e-6)
    assert (km.centroids >= 0).all()
    assert (km.centroids.abs().sum(1) == 0).any()  # some empty clusters became zero vectors
    assert len(torch.unique(km.labels)) < 150 // 4  # collapse onto few clusters


def test_minibatch_slices():
    km = KMeans(4, 100)
    assert list(km._minibatches(5000)) == [slice(0, 2048), slice(2048, 4096), slice(4096, 5000)]
    assert list(km._minibatches(4096 + 101)) == [slice(0, 2048), slice(2048, 4096), slice(4096, 4197)]
    assert list(km._minibatches(4096 + 100)) == [slice(0, 2048), slice(2048, 4196)]  # '<=' merges
    big = KMeans(4, 2100)  # batch 2310
    assert list(big._minibatches(6000)) == [slice(0, 2310), slice(2310, 6000)]


# ----------------------------------------------------------------------------- lloyd

@pytest.mark.parametrize("seed", [0, 1, 2])
def test_lloyd_not_worse_than_reference(seed):
    x = torch.cat([_data(60, 5, seed) + 4 * _data(1, 5, seed + 10 * i) for i in range(5)])  # 5 blobs
    k = 12
    km = KMeans(5, k, mode="lloyd", tol=0.0, niter=100, seed=seed)
    obj = km.train(x)
    init = x[torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed))[:k]]
    assert obj <= _ref_lloyd(x, init) * (1 + 1e-5) + 1e-6
    assert all(b <= a * (1 + 1e-5) + 1e-6 for a, b in zip(km.obj, km.obj[1:]))  # monotone


def test_lloyd_reseeds_empty_clusters():
    """20 distinct points, each duplicated: random init picks duplicates, whose higher-index
    copy gets no member (ties go to the lower index) and must be re-seeded."""
    base = _data(20, 3, seed=3)
    x = torch.cat([base, base])[torch.randperm(40, generator=torch.Generator().manual_seed(0))]
    km = KMeans(3, 20, mode="lloyd")
    sums, counts = cu.cluster_sums(x, torch.zeros(40, dtype=torch.long), 20)
    assert (counts[1:] == 0).all()
    dist = ((x - x[0]) ** 2).sum(1)
    cent = km._lloyd_means(x, torch.zeros(40, dtype=torch.long), dist)
    far = torch.topk(dist, 19).indices
    assert torch.equal(cent[1:], x[far])  # distinct farthest points
    labels, _, info = discover_interests(x, 20, kmeans_mode="lloyd", seed=5)
    assert info["n_used"] == 20 and info["objective"] < 1e-6


def test_lloyd_k_close_to_n():
    x = _data(50, 6, seed=4)
    labels, cent, info = discover_interests(x, 48, kmeans_mode="lloyd")
    assert labels.min() >= 0 and labels.max() < 48 and cent.shape == (48, 6)
    assert info["n_used"] == 48
    assert info["objective"] == pytest.approx(float(((x - cent[labels]) ** 2).sum(1).mean()), rel=1e-4)


def test_deterministic_and_input_untouched():
    x = _data(500, 8, seed=6)
    before = x.clone()
    for mode in ("original", "lloyd"):
        a = discover_interests(x, 40, kmeans_mode=mode, seed=11)
        b = discover_interests(x, 40, kmeans_mode=mode, seed=11)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert torch.equal(x, before)


# ----------------------------------------------------------------------------- distances

def test_pairwise_nearest_chunk_invariance():
    x, c = _data(700, 12, seed=7), _data(90, 12, seed=8)
    d_big, i_big = pairwise_nearest(x, c, memory_budget_mb=256)
    for budget in (0.0001, 0.002, 0.05):  # 26 floats (column chunks), 524 floats, 13k floats
        d, i = pairwise_nearest(x, c, memory_budget_mb=budget)
        assert torch.equal(i, i_big)
        assert torch.allclose(d, d_big, rtol=1e-5, atol=1e-5)
    assert torch.equal(i_big, _ref_nearest(x, c))
    assert torch.allclose(d_big, torch.cdist(x.double(), c.double()).min(1).values.pow(2).float(), rtol=1e-4, atol=1e-4)


def test_pairwise_nearest_ties_lowest_index():
    x = _data(30, 4, seed=9)
    c = torch.zeros(7, 4)
    _, i = pairwise_nearest(x, c, memory_budget_mb=1e-5)  # column chunks of 2
    assert (i == 0).all()


# ----------------------------------------------------------------------------- dpc-knn

@pytest.mark.parametrize("budget", [256, 0.01])
def test_dpc_knn_matches_dense_reference(budget):
    x = torch.cat([_data(40, 6, s) * 0.5 + 3 * _data(1, 6, 100 + s) for s in range(4)])
    labels, cent = dpc_knn(x, 6, local_size=8, memory_budget_mb=budget)
    ref_labels, ref_cent = _ref_dpc(x, 6, 8)
    assert torch.equal(labels, ref_labels)
    assert torch.allclose(cent, ref_cent, atol=1e-5, rtol=1e-5)
    _, _, info = discover_interests(x, 6, algorithm="dpc_knn", local_size=8)
    assert info["n_used"] == 6


# ----------------------------------------------------------------------------- errors

def test_errors():
    x = _data(20, 3)
    with pytest.raises(ValueError, match="n_clusters"):
        discover_interests(x, 0)
    with pytest.raises(ValueError, match="n_clusters"):
        discover_interests(x, 21)
    with pytest.raises(ValueError, match="kmeans_mode"):
        discover_interests(x, 3, kmeans_mode="bogus")
    with pytest.raises(ValueError, match="algorithm"):
        discover_interests(x, 3, algorithm="bogus")
    with pytest.raises(ValueError, match="MiB"):
        dpc_knn(x, 3, local_size=4, memory_budget_mb=1e-6)
    with pytest.raises(ValueError, match="local_size"):
        discover_interests(x, 3, algorithm="dpc_knn")


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("algorithm", ["kmeans", "dpc_knn"])
def test_non_finite_points_stop_discovery(bad, algorithm):
    x = _data(50, 4)
    x[17, 2] = bad
    with pytest.raises(FloatingPointError, match=r"^1 of 50 points are not finite \(NaN or inf\)$"):
        discover_interests(x, 5, algorithm=algorithm, local_size=5)


def test_cluster_sums_normalises_its_input():
    """float64 or strided points give the float32 sums (the CuPy kernel reads float32 rows at stride D)."""
    x = _data(300, 7, seed=3)
    labels = torch.randint(0, 9, (300,), generator=torch.Generator().manual_seed(4))
    ref = cu.cluster_sums(x, labels, 9, use_abs=True)
    strided = torch.zeros(7, 300, dtype=torch.float64)
    strided.copy_(x.t())
    for variant in (x.double(), strided.t(), x.t().contiguous().t()):
        assert not (variant.is_contiguous() and variant.dtype == torch.float32)
        sums, counts = cu.cluster_sums(variant, labels.int(), 9, use_abs=True)
        assert sums.dtype == torch.float32 and torch.allclose(sums, ref[0]) and torch.equal(counts, ref[1])


# ----------------------------------------------------------------------------- CuPy fall-back (CPU)

class _FakeCuda:
    """Stands in for a CUDA tensor: `_use_cupy` only reads `is_cuda` and `device`."""
    is_cuda = True
    device = torch.device("cuda", 0)


def _fresh_fallback_state(monkeypatch):
    monkeypatch.setattr(cu, "_KERNELS", {})
    monkeypatch.setattr(cu, "_KERNEL_ERRORS", {})
    monkeypatch.setattr(cu, "_FALLBACK_WARNED", False)


def test_missing_cupy_on_a_cuda_tensor_warns_once_with_the_reason(monkeypatch, caplog):
    _fresh_fallback_state(monkeypatch)
    monkeypatch.setattr(cu, "_cp", None)
    monkeypatch.setattr(cu, "_CUPY_ERROR", "cupy does not import (ModuleNotFoundError: No module named 'cupy')")
    with caplog.at_level("WARNING", logger="cluster_utils"):
        assert not cu._use_cupy(_FakeCuda()) and not cu._use_cupy(_FakeCuda())
        assert not cu._use_cupy(torch.zeros(2, 2))                       # a CPU tensor: no warning
    warnings = [r for r in caplog.records if r.name == "cluster_utils"]
    assert len(warnings) == 1 and warnings[0].levelname == "WARNING"
    assert "No module named 'cupy'" in warnings[0].getMessage() and "torch path" in warnings[0].getMessage()
    assert cu.cupy_unavailable(_FakeCuda.device).startswith("cupy does not import")


def test_kernels_that_fail_to_compile_warn_once_and_the_torch_path_runs(monkeypatch, caplog):
    """A CuPy whose NVRTC fails: the reason is logged once, and the options carry no -std flag."""
    _fresh_fallback_state(monkeypatch)
    seen = []

    class FakeCupy:
        class cuda:
            class Device:
                def __init__(self, index):
                    pass

                def __enter__(self):
                    return self

                def __exit__(self, *exc):
                    return False

        @staticmethod
        def RawModule(code, options=()):
            seen.append(options)
            raise RuntimeError("nvrtc: error: invalid value for --gpu-architecture")
    monkeypatch.setattr(cu, "_cp", FakeCupy)
    with caplog.at_level("WARNING", logger="cluster_utils"):
        assert not cu._use_cupy(_FakeCuda()) and not cu._use_cupy(_FakeCuda())
    assert seen == [()]                                  # compiled once per device, NVRTC's default dialect
    warnings = [r.getMessage() for r in caplog.records if r.name == "cluster_utils"]
    assert len(warnings) == 1
    assert "cluster_kernels.cu failed to compile on cuda:0 (RuntimeError: nvrtc: error" in warnings[0]
    assert "failed to compile" in cu.cupy_unavailable(_FakeCuda.device)


# ----------------------------------------------------------------------------- CUDA / CuPy

@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not on PATH")
def test_kernels_compile_to_ptx(tmp_path):
    out = tmp_path / "cluster_kernels.ptx"
    res = subprocess.run(["nvcc", "-arch=sm_80", "--ptx", os.path.join(ROOT, "cluster_kernels.cu"), "-o", str(out)],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    ptx = out.read_text()
    assert "nearest_centroid" in ptx and "cluster_accumulate" in ptx


needs_cupy = pytest.mark.skipif(not torch.cuda.is_available() or cu._cp is None, reason="needs CUDA and cupy")


def _planted(n, d, centres, seed, device):
    """n points around `centres` random centres (noise 0.3: no near ties between centres)."""
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(centres, d, generator=g)
    return (means[torch.randint(0, centres, (n,), generator=g)] + 0.3 * torch.randn(n, d, generator=g)).to(device)


@needs_cupy
@pytest.mark.parametrize("mode", ["original", "lloyd"])
def test_cupy_matches_torch(mode, monkeypatch):
    """Both paths sum clusters in another order (atomics against index_add), so after up to 50 Lloyd
    iterations a rare label may flip: 99.9% of the labels and the objective (rel. 1e-4) must agree."""
    x = _planted(3000, 40, 350, seed=12, device="cuda")
    assert cu._use_cupy(x), cu.cupy_unavailable(x.device)
    lab_k, _, info_k = discover_interests(x, 700, kmeans_mode=mode)
    monkeypatch.setattr(cu, "_cp", None)  # force the torch path on the same GPU
    lab_t, _, info_t = discover_interests(x, 700, kmeans_mode=mode)
    agree = float((lab_k == lab_t).float().mean())
    assert agree >= 0.999, f"labels agree on {agree:.4%}"
    assert info_k["objective"] == pytest.approx(info_t["objective"], rel=1e-4)


@needs_cupy
def test_cupy_nearest_and_sums_match_torch(monkeypatch):
    """The fused kernel and torch's GEMM round differently: a row may differ only at a near tie."""
    x, c = _data(5000, 300, seed=13, device="cuda"), _data(1000, 300, seed=14, device="cuda")
    d_k, i_k = pairwise_nearest(x, c)
    s_k, n_k = cu.cluster_sums(x, i_k, 1000, use_abs=True)
    monkeypatch.setattr(cu, "_cp", None)
    d_t, i_t = pairwise_nearest(x, c)
    s_t, n_t = cu.cluster_sums(x, i_k, 1000, use_abs=True)      # the same labels: the sums alone compared
    diff = (i_k != i_t).nonzero().flatten()
    assert len(diff) <= 5, f"{len(diff)} of 5000 rows differ"
    exact = ((x[diff, None].double() - c[torch.stack([i_k[diff], i_t[diff]], 1)].double()) ** 2).sum(-1)
    assert torch.allclose(exact[:, 0], exact[:, 1], rtol=1e-4), exact        # near ties only
    assert torch.allclose(d_k, d_t, rtol=1e-4, atol=1e-3)
    assert torch.equal(n_k, n_t) and torch.allclose(s_k, s_t, rtol=1e-5, atol=1e-4)


@needs_cupy
def test_cupy_nearest_of_rows_without_a_finite_distance_stays_in_range():
    """inf centroids make every distance of a row inf or NaN: the kernel's index starts at 0, not
    INT_MAX, so the sums that follow index a real cluster."""
    x = _data(200, 40, seed=17, device="cuda").abs() + 1
    c = torch.full((70, 40), float("inf"), device="cuda")
    assert cu._use_cupy(x)
    _, idx = cu._cupy_nearest(x, c)
    assert idx.min() >= 0 and idx.max() < 70
    sums, counts = cu.cluster_sums(x, idx, 70)
    torch.cuda.synchronize()
    assert counts.sum() == 200


@needs_cupy
def test_cupy_sums_of_strided_and_float64_input_match_torch(monkeypatch):
    x = _data(4000, 300, seed=15, device="cuda")
    labels = torch.randint(0, 500, (4000,), device="cuda")
    strided, wide = x.t().contiguous().t(), x.double()
    assert cu._use_cupy(x) and not strided.is_contiguous()
    got = [cu.cluster_sums(v, labels, 500) for v in (strided, wide)]
    monkeypatch.setattr(cu, "_cp", None)
    ref_s, ref_n = cu.cluster_sums(x, labels, 500)
    for s, n in got:
        assert torch.equal(n, ref_n) and torch.allclose(s, ref_s, rtol=1e-5, atol=1e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_non_finite_point_on_cuda_stops_before_the_kernels():
    x = _data(3000, 40, seed=16, device="cuda")
    x[1234, 5] = float("nan")
    with pytest.raises(FloatingPointError, match="1 of 3000 points are not finite"):
        discover_interests(x, 700)
    torch.cuda.synchronize()   # no illegal memory access left behind
