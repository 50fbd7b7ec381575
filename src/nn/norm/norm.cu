// Group and layer normalisation on CUDA, compiled at run time with NVRTC by src/nn/norm/cuda.rs.
//
// x is viewed as (rows, n): each row is normalised over its n values, then scaled and shifted
// per channel, channel(row, col) = (row % groups) * (channels / groups) + col / inner
// (group norm: rows = batch * groups, inner = height * width; layer norm: groups = 1,
// inner = 1). Row sums are accumulated in double by many blocks per row (a row of the VAE's
// group norm at 512x512 holds a million values, and there are only 32 rows).
//
// No headers: half and bfloat16 values travel as their 16 bits and are converted here.

typedef unsigned short bits16;

__device__ __forceinline__ float load(const float* p, size_t i) { return p[i]; }
__device__ __forceinline__ void store(float* p, size_t i, float v) { p[i] = v; }

struct bf16 { bits16 b; };
__device__ __forceinline__ float load(const bf16* p, size_t i) {
    return __uint_as_float(((unsigned int)p[i].b) << 16);
}
__device__ __forceinline__ void store(bf16* p, size_t i, float v) {
    unsigned int u = __float_as_uint(v);
    if ((u & 0x7fffffffu) > 0x7f800000u) {
        p[i].b = (bits16)((u >> 16) | 0x40);  // NaN stays NaN
    } else {
        p[i].b = (bits16)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);  // round to nearest even
    }
}

struct f16 { bits16 b; };
__device__ __forceinline__ float load(const f16* p, size_t i) {
    float v;
    asm("cvt.f32.f16 %0, %1;" : "=f"(v) : "h"(p[i].b));
    return v;
}
__device__ __forceinline__ void store(f16* p, size_t i, float v) {
    bits16 h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(v));
    p[i].b = h;
}

struct Layout {
    int n;         // values per row
    int groups;    // rows per affine period
    int per_group; // channels / groups
    int inner;     // values per channel within a row
    __device__ __forceinline__ int channel(size_t row, int col) const {
        return (int)(row % groups) * per_group + col / inner;
    }
};

// Sums of blockDim.x partial values, in every thread of the block (blockDim.x a multiple of 32).
__device__ __forceinline__ float block_sum(float v, float* shared) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    __syncthreads();
    if (lane == 0) shared[warp] = v;
    __syncthreads();
    int warps = blockDim.x / 32;
    v = lane < warps ? shared[lane] : 0.0f;
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

// Forward statistics: sums[row] += (sum x, sum x^2) over this block's chunk of the row.
template <typename T>
__device__ void forward_sums(const T* x, double* sums, Layout l, int chunk) {
    __shared__ float shared[32];
    size_t row = blockIdx.y;
    int start = blockIdx.x * chunk, end = min(start + chunk, l.n);
    float s = 0.0f, ss = 0.0f;
    for (int col = start + threadIdx.x; col < end; col += blockDim.x) {
        float v = load(x, row * l.n + col);
        s += v;
        ss += v * v;
    }
    s = block_sum(s, shared);
    ss = block_sum(ss, shared);
    if (threadIdx.x == 0) {
        atomicAdd(&sums[2 * row], (double)s);
        atomicAdd(&sums[2 * row + 1], (double)ss);
    }
}

// y = (x - mean) * rstd * weight[c] + bias[c].
template <typename T>
__device__ void forward_apply(const T* x, const double* sums, const float* weight, const float* bias, T* y,
                              Layout l, size_t total, float eps) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < total; i += (size_t)gridDim.x * blockDim.x) {
        size_t row = i / l.n;
        int col = (int)(i % l.n);
        double mean = sums[2 * row] / l.n;
        float var = (float)(sums[2 * row + 1] / l.n - mean * mean);
        float rstd = rsqrtf(fmaxf(var, 0.0f) + eps);
        int c = l.channel(row, col);
        store(y, i, (load(x, i) - (float)mean) * rstd * weight[c] + bias[c]);
    }
}

// Backward statistics, with g = dy * weight[c]: (sum x, sum x^2, sum g, sum g x) per row.
template <typename T>
__device__ void backward_sums(const T* x, const T* dy, const float* weight, double* sums, Layout l, int chunk) {
    __shared__ float shared[32];
    size_t row = blockIdx.y;
    int start = blockIdx.x * chunk, end = min(start + chunk, l.n);
    float s = 0.0f, ss = 0.0f, sg = 0.0f, sgx = 0.0f;
    for (int col = start + threadIdx.x; col < end; col += blockDim.x) {
        size_t i = row * l.n + col;
        float v = load(x, i);
        float g = load(dy, i) * weight[l.channel(row, col)];
        s += v;
        ss += v * v;
        sg += g;
        sgx += g * v;
    }
    s = block_sum(s, shared);
    ss = block_sum(ss, shared);
    sg = block_sum(sg, shared);
    sgx = block_sum(sgx, shared);
    if (threadIdx.x == 0) {
        atomicAdd(&sums[4 * row], (double)s);
        atomicAdd(&sums[4 * row + 1], (double)ss);
        atomicAdd(&sums[4 * row + 2], (double)sg);
        atomicAdd(&sums[4 * row + 3], (double)sgx);
    }
}

// dx = rstd * (g - mean(g) - x^ * mean(g x^)), x^ = (x - mean) * rstd,
// mean(g x^) = rstd * (mean(g x) - mean * mean(g)).
template <typename T>
__device__ void backward_apply(const T* x, const T* dy, const float* weight, const double* sums, T* dx, Layout l,
                               size_t total, float eps) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < total; i += (size_t)gridDim.x * blockDim.x) {
        size_t row = i / l.n;
        int col = (int)(i % l.n);
        const double* s = sums + 4 * row;
        double mean = s[0] / l.n;
        double rstd = 1.0 / sqrt(fmax(s[1] / l.n - mean * mean, 0.0) + (double)eps);
        double mean_g = s[2] / l.n;
        double mean_g_xhat = rstd * (s[3] / l.n - mean * mean_g);
        float x_hat = (float)((load(x, i) - mean) * rstd);
        float g = load(dy, i) * weight[l.channel(row, col)];
        store(dx, i, (float)rstd * (g - (float)mean_g - x_hat * (float)mean_g_xhat));
    }
}

#define NORM_KERNELS(T, NAME)                                                                                  \
    extern "C" __global__ void forward_sums_##NAME(const T* x, double* sums, Layout l, int chunk) {          \
        forward_sums(x, sums, l, chunk);                                                                      \
    }                                                                                                         \
    extern "C" __global__ void forward_apply_##NAME(const T* x, const double* sums, const float* weight,      \
                                                    const float* bias, T* y, Layout l, size_t total,          \
                                                    float eps) {                                              \
        forward_apply(x, sums, weight, bias, y, l, total, eps);                                               \
    }                                                                                                         \
    extern "C" __global__ void backward_sums_##NAME(const T* x, const T* dy, const float* weight,             \
                                                    double* sums, Layout l, int chunk) {                      \
        backward_sums(x, dy, weight, sums, l, chunk);                                                         \
    }                                                                                                         \
    extern "C" __global__ void backward_apply_##NAME(const T* x, const T* dy, const float* weight,            \
                                                     const double* sums, T* dx, Layout l, size_t total,       \
                                                     float eps) {                                             \
        backward_apply(x, dy, weight, sums, dx, l, total, eps);                                               \
    }

NORM_KERNELS(float, f32)
NORM_KERNELS(bf16, bf16)
NORM_KERNELS(f16, f16)
