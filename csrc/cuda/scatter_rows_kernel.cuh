// CUDA kernel for mi_crow::scatter_rows, free of torch headers so that it compiles (and can be tested) with
// nvcc alone: out[i] = sum over (b, j) with indices[b, j] == i of coef[b, j] * x[b].
//
// Deterministic by construction: the flat (b, j) positions are first sorted by latent with a stable sort, then
// one thread block owns one latent row (times a slice of columns) and sums its contiguous segment in that fixed
// order, accumulating in float (double for double inputs). No atomics, so the result is bit-for-bit
// reproducible, and no [B*k, d] temporary exists: the only scratch is the sorted (latent, position) pairs.
//
// The torch binding (scatter_rows_cuda.cu) sorts with at::sort; sort_by_latent below does it with CUB for
// callers without torch (the standalone harness in harness/).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cub/device/device_radix_sort.cuh>

#include <cstddef>
#include <cstdint>

namespace mi_crow {
namespace cuda {

// Positions staged in shared memory per round; also the largest block size the launcher uses.
constexpr int kScatterTile = 256;

template <typename T>
struct AccType {
  using type = float;
};
template <>
struct AccType<double> {
  using type = double;
};

__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ double to_acc(double v) { return v; }
__device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_acc(typename AccType<T>::type v);
template <>
__device__ __forceinline__ float from_acc<float>(float v) { return v; }
template <>
__device__ __forceinline__ double from_acc<double>(double v) { return v; }
template <>
__device__ __forceinline__ __half from_acc<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// First position p in sorted[0, total) with sorted[p] >= value.
__device__ __forceinline__ int64_t lower_bound(const int64_t* __restrict__ sorted, int64_t total, int64_t value) {
  int64_t lo = 0, hi = total;
  while (lo < hi) {
    const int64_t mid = lo + (hi - lo) / 2;
    if (sorted[mid] < value) {
      lo = mid + 1;
    } else {
      hi = mid;
    }
  }
  return lo;
}

// grid = (n, ceil(d / blockDim.x)); blockDim.x <= kScatterTile. Block (i, y) writes out[i, y*blockDim.x + t].
template <typename scalar_t>
__global__ void scatter_rows_sorted_kernel(const scalar_t* __restrict__ coef,         // [B * k] contiguous
                                           const scalar_t* __restrict__ x,            // [B, d], row stride x_stride
                                           const int64_t* __restrict__ sorted_latents,  // [B * k] ascending
                                           const int64_t* __restrict__ order,         // [B * k] flat (b, j) by latent
                                           scalar_t* __restrict__ out,                // [n, d] contiguous
                                           int64_t total, int64_t k, int64_t d, int64_t x_stride) {
  using acc_t = typename AccType<scalar_t>::type;
  __shared__ int64_t row_offset[kScatterTile];
  __shared__ acc_t row_coef[kScatterTile];

  const int64_t latent = blockIdx.x;
  const int64_t col = static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x;
  // Every thread of the block reaches the same bounds; the searches are O(log total) reads of cached lines.
  const int64_t begin = lower_bound(sorted_latents, total, latent);
  const int64_t end = lower_bound(sorted_latents, total, latent + 1);

  acc_t acc = 0;
  for (int64_t base = begin; base < end; base += blockDim.x) {
    const int64_t count = min(static_cast<int64_t>(blockDim.x), end - base);
    __syncthreads();  // the previous round's readers are done with the tile
    if (threadIdx.x < count) {
      const int64_t pos = order[base + threadIdx.x];
      row_offset[threadIdx.x] = (pos / k) * x_stride;
      row_coef[threadIdx.x] = to_acc(coef[pos]);
    }
    __syncthreads();
    if (col < d) {
      for (int64_t q = 0; q < count; ++q) {
        acc += row_coef[q] * to_acc(x[row_offset[q] + col]);
      }
    }
  }
  if (col < d) {
    out[latent * d + col] = from_acc<scalar_t>(acc);
  }
}

// Launches scatter_rows on pairs already sorted by latent (stable). Writes every element of out [n, d],
// including zero rows for latents no pair points to. x must have unit column stride.
template <typename scalar_t>
cudaError_t launch_scatter_rows_sorted(const scalar_t* coef, const scalar_t* x, const int64_t* sorted_latents,
                                       const int64_t* order, scalar_t* out, int64_t total, int64_t k, int64_t n,
                                       int64_t d, int64_t x_stride, cudaStream_t stream) {
  if (n == 0 || d == 0) return cudaSuccess;
  // One warp-multiple of columns per block, at most kScatterTile; wide rows get more blocks along y.
  int threads = static_cast<int>(((d + 31) / 32) * 32);
  if (threads > kScatterTile) threads = kScatterTile;
  const dim3 grid(static_cast<unsigned int>(n), static_cast<unsigned int>((d + threads - 1) / threads));
  scatter_rows_sorted_kernel<scalar_t><<<grid, threads, 0, stream>>>(coef, x, sorted_latents, order, out, total,
                                                                      k, d, x_stride);
  return cudaGetLastError();
}

__global__ void iota_kernel(int64_t* __restrict__ out, int64_t total) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < total) out[i] = i;
}

// Stable sort of the flat (b, j) positions by latent with CUB's radix sort, for callers without torch.
// Call once with temp == nullptr to get temp_bytes, then again with a buffer of that size. positions is scratch
// of total int64 (filled with 0..total-1 here).
inline cudaError_t sort_by_latent(const int64_t* latents, int64_t* positions, int64_t* sorted_latents,
                                  int64_t* order, int64_t total, int64_t n, void* temp, size_t& temp_bytes,
                                  cudaStream_t stream) {
  int end_bit = 1;
  while (end_bit < 63 && (int64_t{1} << end_bit) < n) ++end_bit;  // only the bits a latent index can use
  if (temp != nullptr && total > 0) {
    const int threads = 256;
    iota_kernel<<<static_cast<unsigned int>((total + threads - 1) / threads), threads, 0, stream>>>(positions, total);
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  return cub::DeviceRadixSort::SortPairs(temp, temp_bytes, latents, sorted_latents, positions, order, total, 0,
                                         end_bit, stream);
}

}  // namespace cuda
}  // namespace mi_crow
