"""Benchmark interest discovery (cluster_utils) at the project's sizes.

    python bench/kmeans.py            # CPU: Scientific_mini, Scientific_mm_full, Office
    python bench/kmeans.py --quick    # CPU without Office
    python bench/kmeans.py --gpu      # CUDA (CuPy kernels if cupy imports), adds FHCKM

Prints, per size: seconds per discovery (original and lloyd modes), the achieved GFLOP/s
of the distance step (2*N*K*D / seconds of pairwise_nearest) and its share of a plain
fp32 GEMM measured in the same run; then one line `RESULT key=value ...`.
"""
import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import cluster_utils as cu  # noqa: E402

D = 300
# name -> (points, clusters, lloyd niter: None = default convergence rule)
SIZES = {
    "mini": (3170, 1585, None),          # Scientific_mini
    "mm_full": (8770, 4385, None),       # Scientific_mm_full
    "office": (52000, 15600, 2),         # Office: fixed small niter to stay under a minute on 2 cores
    "fhckm": (894000, 17900, 5),         # pre-training, GPU only
}


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, repeat=1):
    """Best wall time of `repeat` calls of fn() (synchronised on CUDA), and the last result."""
    best, out = float("inf"), None
    for _ in range(repeat):
        _sync(device)
        start = time.perf_counter()
        out = fn()
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return best, out


def gemm_gflops(device, n=4096):
    """Plain fp32 matmul throughput, best of 3 (TF32 off on CUDA: the distance step is fp32 too)."""
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    torch.mm(a, b)  # warm-up
    seconds, _ = timed(lambda: torch.mm(a, b), device, repeat=3)
    return 2 * n ** 3 / seconds / 1e9


def bench_size(name, n, k, niter, device):
    """Time the distance step and both discovery modes on seeded random data [n, D].
    The GEMM reference is re-measured right next to the distance step (the CPU is shared,
    so throughput drifts between minutes); both are best of 3."""
    g = torch.Generator().manual_seed(2020)
    x = torch.randn(n, D, generator=g).to(device)
    c = x[:k].clone()
    gemm = gemm_gflops(device)
    t_dist, _ = timed(lambda: cu.pairwise_nearest(x, c), device, repeat=3 if n * k < 1e9 else 1)
    gemm = max(gemm, gemm_gflops(device))
    t_orig, (_, _, info_o) = timed(lambda: cu.discover_interests(x, k, kmeans_mode="original"), device)
    if niter is None:
        t_lloyd, (_, _, info_l) = timed(lambda: cu.discover_interests(x, k, kmeans_mode="lloyd"), device)
        lloyd_iter = info_l["n_iter"]
    else:  # discover_interests has no niter: drive KMeans directly with a fixed budget
        km = cu.KMeans(D, k, mode="lloyd", niter=niter)
        t_lloyd, _ = timed(lambda: km.train(x), device)
        lloyd_iter = km.n_iter
    return {"n": n, "k": k, "gemm": gemm, "t_dist": t_dist, "gflops": 2 * n * k * D / t_dist / 1e9,
            "t_orig": t_orig, "used_orig": info_o["n_used"], "t_lloyd": t_lloyd, "lloyd_iter": lloyd_iter,
            "lloyd_niter": "default" if niter is None else niter}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpu", action="store_true", help="run on CUDA (adds FHCKM)")
    parser.add_argument("--quick", action="store_true", help="skip Office (and FHCKM)")
    args = parser.parse_args()
    device = torch.device("cuda" if args.gpu and torch.cuda.is_available() else "cpu")
    if args.gpu and device.type != "cuda":
        print("--gpu given but CUDA is not available: running on CPU")
    names = ["mini", "mm_full"] + ([] if args.quick else ["office"])
    if device.type == "cuda" and not args.quick:
        names.append("fhckm")
    path = cu.kernel_path(device)
    gemm = gemm_gflops(device)
    print(f"device={device} path={path} threads={torch.get_num_threads()} gemm_fp32={gemm:.1f} GFLOP/s "
          f"(%gemm below: vs a GEMM re-measured next to each distance step)")
    header = f"{'size':<8} {'N':>7} {'K':>6} {'gemm':>6} {'dist s':>8} {'GFLOP/s':>8} {'%gemm':>6} " \
             f"{'orig s':>7} {'used':>5} {'lloyd s':>8} {'iters':>5} {'niter':>7}"
    print(header)
    results = {}
    for name in names:
        n, k, niter = SIZES[name]
        r = results[name] = bench_size(name, n, k, niter, device)
        print(f"{name:<8} {n:>7} {k:>6} {r['gemm']:>6.1f} {r['t_dist']:>8.3f} {r['gflops']:>8.1f} {100 * r['gflops'] / r['gemm']:>5.0f}% "
              f"{r['t_orig']:>7.2f} {r['used_orig']:>5} {r['t_lloyd']:>8.2f} {r['lloyd_iter']:>5} {r['lloyd_niter']:>7}",
              flush=True)
    fields = [f"device={device.type}", f"path={path}", f"gemm_gflops={gemm:.1f}"]
    for name, r in results.items():
        fields += [f"{name}_dist_gflops={r['gflops']:.1f}", f"{name}_gemm_gflops={r['gemm']:.1f}",
                   f"{name}_dist_pct_gemm={100 * r['gflops'] / r['gemm']:.0f}",
                   f"{name}_orig_s={r['t_orig']:.3f}", f"{name}_lloyd_s={r['t_lloyd']:.3f}",
                   f"{name}_lloyd_iters={r['lloyd_iter']}"]
    print("RESULT " + " ".join(fields))


if __name__ == "__main__":
    main()
