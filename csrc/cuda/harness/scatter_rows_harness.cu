// Standalone check of the scatter_rows CUDA kernel without torch: random inputs, the CUB sort and the kernel on
// the device, compared with a float64 host reference; a second run must be bit-identical (no atomics).
// Build: nvcc -std=c++17 -I<repo>/csrc/cuda scatter_rows_harness.cu -o scatter_rows_harness
// Exit codes: 0 all checks passed, 1 a check failed, 77 no CUDA device (nothing was run).
// Not part of the extension: setup.py compiles csrc/cuda/*.cu only, not this subfolder.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <random>
#include <vector>

#include "scatter_rows_kernel.cuh"

namespace {

#define HARNESS_CHECK(call)                                                                  \
  do {                                                                                       \
    const cudaError_t err_ = (call);                                                         \
    if (err_ != cudaSuccess) {                                                               \
      std::fprintf(stderr, "%s:%d: %s: %s\n", __FILE__, __LINE__, #call, cudaGetErrorString(err_)); \
      return false;                                                                          \
    }                                                                                        \
  } while (0)

float host_to_float(float v) { return v; }
float host_to_float(__half v) { return __half2float(v); }
float host_to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
T host_from_float(float v);
template <>
float host_from_float<float>(float v) { return v; }
template <>
__half host_from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__nv_bfloat16 host_from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

template <typename T>
bool run_case(const char* name, int64_t B, int64_t k, int64_t d, int64_t n, double tol, unsigned seed) {
  std::mt19937 gen(seed);
  std::normal_distribution<float> normal(0.f, 1.f);
  std::uniform_int_distribution<int64_t> latent(0, n - 1);
  const int64_t total = B * k;
  std::vector<T> coef(total), x(B * d);
  std::vector<int64_t> indices(total);
  for (auto& c : coef) c = host_from_float<T>(normal(gen));
  for (auto& v : x) v = host_from_float<T>(normal(gen));
  for (auto& i : indices) i = latent(gen);

  // float64 reference from the same (rounded) inputs.
  std::vector<double> ref(n * d, 0.0);
  for (int64_t p = 0; p < total; ++p) {
    const int64_t b = p / k;
    for (int64_t c = 0; c < d; ++c) {
      ref[indices[p] * d + c] += double(host_to_float(coef[p])) * double(host_to_float(x[b * d + c]));
    }
  }

  T *d_coef = nullptr, *d_x = nullptr, *d_out = nullptr;
  int64_t *d_idx = nullptr, *d_pos = nullptr, *d_sorted = nullptr, *d_order = nullptr;
  void* d_temp = nullptr;
  size_t temp_bytes = 0;
  HARNESS_CHECK(cudaMalloc(&d_coef, total * sizeof(T)));
  HARNESS_CHECK(cudaMalloc(&d_x, B * d * sizeof(T)));
  HARNESS_CHECK(cudaMalloc(&d_out, n * d * sizeof(T)));
  HARNESS_CHECK(cudaMalloc(&d_idx, total * sizeof(int64_t)));
  HARNESS_CHECK(cudaMalloc(&d_pos, total * sizeof(int64_t)));
  HARNESS_CHECK(cudaMalloc(&d_sorted, total * sizeof(int64_t)));
  HARNESS_CHECK(cudaMalloc(&d_order, total * sizeof(int64_t)));
  HARNESS_CHECK(cudaMemcpy(d_coef, coef.data(), total * sizeof(T), cudaMemcpyHostToDevice));
  HARNESS_CHECK(cudaMemcpy(d_x, x.data(), B * d * sizeof(T), cudaMemcpyHostToDevice));
  HARNESS_CHECK(cudaMemcpy(d_idx, indices.data(), total * sizeof(int64_t), cudaMemcpyHostToDevice));
  HARNESS_CHECK(mi_crow::cuda::sort_by_latent(d_idx, d_pos, d_sorted, d_order, total, n, nullptr, temp_bytes, 0));
  HARNESS_CHECK(cudaMalloc(&d_temp, temp_bytes));
  HARNESS_CHECK(mi_crow::cuda::sort_by_latent(d_idx, d_pos, d_sorted, d_order, total, n, d_temp, temp_bytes, 0));

  std::vector<T> out(n * d), again(n * d);
  HARNESS_CHECK(mi_crow::cuda::launch_scatter_rows_sorted<T>(d_coef, d_x, d_sorted, d_order, d_out, total, k, n, d,
                                                             d, 0));
  HARNESS_CHECK(cudaMemcpy(out.data(), d_out, n * d * sizeof(T), cudaMemcpyDeviceToHost));
  HARNESS_CHECK(cudaMemset(d_out, 0xFF, n * d * sizeof(T)));  // the kernel must overwrite every element
  HARNESS_CHECK(mi_crow::cuda::launch_scatter_rows_sorted<T>(d_coef, d_x, d_sorted, d_order, d_out, total, k, n, d,
                                                             d, 0));
  HARNESS_CHECK(cudaMemcpy(again.data(), d_out, n * d * sizeof(T), cudaMemcpyDeviceToHost));
  HARNESS_CHECK(cudaDeviceSynchronize());

  double max_err = 0.0;
  for (int64_t i = 0; i < n * d; ++i) {
    max_err = std::fmax(max_err, std::fabs(double(host_to_float(out[i])) - ref[i]) / (1.0 + std::fabs(ref[i])));
  }
  const bool deterministic = std::memcmp(out.data(), again.data(), n * d * sizeof(T)) == 0;
  const bool ok = max_err <= tol && deterministic;
  std::printf("%-5s B=%lld k=%lld d=%lld n=%lld  max rel err %.3g (tol %.1g)  deterministic %s  %s\n", name,
              (long long)B, (long long)k, (long long)d, (long long)n, max_err, tol, deterministic ? "yes" : "NO",
              ok ? "ok" : "FAIL");
  cudaFree(d_coef);
  cudaFree(d_x);
  cudaFree(d_out);
  cudaFree(d_idx);
  cudaFree(d_pos);
  cudaFree(d_sorted);
  cudaFree(d_order);
  cudaFree(d_temp);
  return ok;
}

}  // namespace

int main() {
  int devices = 0;
  if (cudaGetDeviceCount(&devices) != cudaSuccess || devices == 0) {
    std::printf("no CUDA device: nothing run\n");
    return 77;
  }
  bool ok = true;
  // Odd and power-of-two widths, n not a multiple of anything, repeats within rows (n small), k = 1, B = 1.
  ok &= run_case<float>("fp32", 37, 5, 96, 50, 1e-5, 1);
  ok &= run_case<float>("fp32", 1, 1, 48, 7, 1e-6, 2);
  ok &= run_case<float>("fp32", 257, 32, 300, 1000, 1e-5, 3);  // d > one block of columns
  ok &= run_case<__half>("fp16", 129, 16, 64, 33, 2e-3, 4);
  ok &= run_case<__nv_bfloat16>("bf16", 129, 16, 64, 33, 1.6e-2, 5);
  return ok ? 0 : 1;
}
