// CuPy RawKernels for interest discovery (cluster_utils.py).
//
// nearest_centroid: squared-Euclidean nearest centroid fused with the arg-min, so the
//   N x K distance matrix never exists in memory. Register-tiled SGEMM layout: a block
//   of 16 x 16 threads owns TM = 64 rows and sweeps all centroids in tiles of TN = 64,
//   each thread accumulating a 4 x 4 micro-tile of dot products over D in steps of TK.
//   dist = ||x||^2 + (||c||^2 - 2 x.c); ties keep the lowest centroid index; a row with no
//   finite distance (all inf or NaN) gets index 0.
// cluster_accumulate: per-cluster sums (optionally of |x|) and counts with atomicAdd.
//
// Launch (see cluster_utils._cupy_nearest / _cupy_sums):
//   nearest_centroid   grid (ceil(N / 64),), block (16, 16)
//   cluster_accumulate grid (any,), block (256,)   (grid-stride loop)

#define TM 64
#define TN 64
#define TK 16
#define TPB 16  // threads per block side; each thread covers TM / TPB = 4 rows, TN / TPB = 4 cols

extern "C" __global__ void nearest_centroid(
    const float* __restrict__ x,         // [n, d] row-major
    const float* __restrict__ c,         // [k, d] row-major
    const float* __restrict__ c_sqnorm,  // [k]
    const float* __restrict__ x_sqnorm,  // [n]
    const int n, const int k, const int d,
    long long* __restrict__ out_idx,     // [n]
    float* __restrict__ out_dist)        // [n]
{
    // tiles stored transposed ([TK][rows]) so the inner loop reads consecutive banks;
    // +1 padding avoids bank conflicts on the transposing stores
    __shared__ float xs[TK][TM + 1];
    __shared__ float cs[TK][TN + 1];
    __shared__ float red_v[TM][TPB + 1];
    __shared__ int red_i[TM][TPB + 1];

    const int tx = threadIdx.x, ty = threadIdx.y;
    const int tid = ty * TPB + tx;
    const int row0 = blockIdx.x * TM;

    float best_v[4];
    int best_i[4];
#pragma unroll
    // index 0, not INT_MAX: a row whose distances are all inf or NaN (no '<' ever holds) still
    // gets a valid centroid index, which the callers use to index sums and counts
    for (int i = 0; i < 4; ++i) { best_v[i] = __int_as_float(0x7f800000); best_i[i] = 0; }

    for (int col0 = 0; col0 < k; col0 += TN) {
        float acc[4][4];
#pragma unroll
        for (int i = 0; i < 4; ++i)
#pragma unroll
            for (int j = 0; j < 4; ++j) acc[i][j] = 0.0f;

        for (int k0 = 0; k0 < d; k0 += TK) {
            // cooperative loads: 256 threads x 4 elements per tile, 16 consecutive floats per row
            for (int e = tid; e < TM * TK; e += TPB * TPB) {
                const int r = e / TK, kk = e % TK;
                const int gr = row0 + r, gk = k0 + kk;
                xs[kk][r] = (gr < n && gk < d) ? x[(size_t)gr * d + gk] : 0.0f;
            }
            for (int e = tid; e < TN * TK; e += TPB * TPB) {
                const int r = e / TK, kk = e % TK;
                const int gc = col0 + r, gk = k0 + kk;
                cs[kk][r] = (gc < k && gk < d) ? c[(size_t)gc * d + gk] : 0.0f;
            }
            __syncthreads();
#pragma unroll
            for (int kk = 0; kk < TK; ++kk) {
                float a[4], b[4];
#pragma unroll
                for (int i = 0; i < 4; ++i) a[i] = xs[kk][ty + TPB * i];
#pragma unroll
                for (int j = 0; j < 4; ++j) b[j] = cs[kk][tx + TPB * j];
#pragma unroll
                for (int i = 0; i < 4; ++i)
#pragma unroll
                    for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
            }
            __syncthreads();  // before the next tiles overwrite xs / cs
        }
        // fold this tile into the running minimum; columns are visited in increasing
        // order per thread, so strict '<' keeps the lowest index on ties
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            const int col = col0 + tx + TPB * j;
            if (col < k) {
                const float cn = c_sqnorm[col];
#pragma unroll
                for (int i = 0; i < 4; ++i) {
                    const float v = cn - 2.0f * acc[i][j];
                    if (v < best_v[i]) { best_v[i] = v; best_i[i] = col; }
                }
            }
        }
    }

    // reduce the 16 partial minima of each row (one per tx)
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        red_v[ty + TPB * i][tx] = best_v[i];
        red_i[ty + TPB * i][tx] = best_i[i];
    }
    __syncthreads();
    if (tid < TM) {
        const int r = tid, gr = row0 + r;
        float v = red_v[r][0];
        int bi = red_i[r][0];
        for (int t = 1; t < TPB; ++t) {
            const float vt = red_v[r][t];
            const int it = red_i[r][t];
            if (vt < v || (vt == v && it < bi)) { v = vt; bi = it; }
        }
        if (gr < n) {
            out_idx[gr] = (long long)bi;
            out_dist[gr] = fmaxf(x_sqnorm[gr] + v, 0.0f);
        }
    }
}

extern "C" __global__ void cluster_accumulate(
    const float* __restrict__ x,            // [n, d] row-major
    const long long* __restrict__ labels,   // [n], in [0, k)
    const long long n, const int d, const int use_abs,
    float* __restrict__ sums,               // [k, d], zero-initialised
    float* __restrict__ counts)             // [k], zero-initialised
{
    const long long total = n * (long long)d;
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long t = (long long)blockIdx.x * blockDim.x + threadIdx.x; t < total; t += stride) {
        const long long i = t / d;
        const int j = (int)(t - i * d);
        const long long lab = labels[i];
        float v = x[t];
        if (use_abs) v = fabsf(v);
        atomicAdd(&sums[lab * d + j], v);
        if (j == 0) atomicAdd(&counts[lab], 1.0f);
    }
}
