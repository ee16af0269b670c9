// mi_crow::scatter_rows for CUDA tensors: the decoder-weight gradient (coef = values, x = grad_out) and the
// encoder-weight gradient on active latents (coef = grad_pre, x = x - b_dec).
// out[i] = sum over (b, j) with indices[b, j] == i of coef[b, j] * x[b]; float32/bfloat16/float16 (and float64)
// with float accumulation. Deterministic: pairs are stable-sorted by latent, then each latent row is summed by
// one thread block in that order (see scatter_rows_kernel.cuh); no atomics.
//
// Built by setup.py only where a CUDA toolkit and a CUDA build of torch exist (it defines MI_CROW_WITH_CUDA).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "scatter_rows_kernel.cuh"

namespace mi_crow {

namespace {

template <typename native_t>
void run_scatter_rows(const at::Tensor& coef, const at::Tensor& x, const at::Tensor& sorted_latents,
                      const at::Tensor& order, at::Tensor& out, int64_t k, int64_t n) {
  // c10::Half / c10::BFloat16 share the bit layout of __half / __nv_bfloat16.
  const cudaError_t err = cuda::launch_scatter_rows_sorted<native_t>(
      reinterpret_cast<const native_t*>(coef.data_ptr()), reinterpret_cast<const native_t*>(x.data_ptr()),
      sorted_latents.data_ptr<int64_t>(), order.data_ptr<int64_t>(), reinterpret_cast<native_t*>(out.data_ptr()),
      coef.numel(), k, n, x.size(1), x.stride(0), c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == cudaSuccess, "scatter_rows: CUDA kernel launch failed: ", cudaGetErrorString(err));
}

}  // namespace

at::Tensor scatter_rows_cuda(const at::Tensor& coef, const at::Tensor& indices, const at::Tensor& x, int64_t n) {
  constexpr const char* op = "scatter_rows";
  TORCH_CHECK_VALUE(coef.dim() == 2, op, ": coef must be 2-D, got shape ", coef.sizes());
  TORCH_CHECK_VALUE(indices.dim() == 2, op, ": indices must be 2-D, got shape ", indices.sizes());
  TORCH_CHECK_VALUE(x.dim() == 2, op, ": x must be 2-D, got shape ", x.sizes());
  const auto dtype = x.scalar_type();
  TORCH_CHECK_TYPE(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf || dtype == at::kDouble, op,
                   ": x must be float32, bfloat16, float16 or float64, got ", dtype);
  TORCH_CHECK_TYPE(coef.scalar_type() == dtype, op, ": coef must have the dtype of x (", dtype, "), got ",
                   coef.scalar_type());
  TORCH_CHECK_TYPE(indices.scalar_type() == at::kLong, op, ": indices must be int64, got ", indices.scalar_type());
  TORCH_CHECK_VALUE(n >= 0, op, ": n must be >= 0, got ", n);
  TORCH_CHECK_VALUE(indices.sizes() == coef.sizes(), op, ": indices must have the shape of coef ", coef.sizes(),
                    ", got ", indices.sizes());
  TORCH_CHECK_VALUE(coef.size(0) == x.size(0), op, ": coef must have ", x.size(0),
                    " rows (the rows of x), got shape ", coef.sizes());
  TORCH_CHECK_VALUE(coef.is_cuda() && indices.is_cuda() && x.is_cuda() && coef.device() == x.device() &&
                        indices.device() == x.device(),
                    op, ": coef, indices and x must be on one CUDA device, got ", coef.device(), ", ",
                    indices.device(), " and ", x.device());
  TORCH_CHECK_VALUE(n <= INT32_MAX, op, ": n must be at most ", INT32_MAX, " (one block row per latent), got ", n);

  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t k = coef.size(1);
  const int64_t d = x.size(1);
  auto out = at::empty({n, d}, x.options());
  if (n == 0 || d == 0) return out;

  auto flat = indices.reshape({-1});
  if (flat.numel() > 0) {
    // One reduction and one sync: an out-of-range index would otherwise be an illegal memory access.
    auto [lo, hi] = at::aminmax(flat);
    const int64_t lo_v = lo.item<int64_t>(), hi_v = hi.item<int64_t>();
    TORCH_CHECK_VALUE(lo_v >= 0 && hi_v < n, op, ": indices must lie in [0, ", n, "), got values in [", lo_v, ", ",
                      hi_v, "]");
  }
  auto sorted = at::sort(flat, /*stable=*/true, /*dim=*/0, /*descending=*/false);
  const at::Tensor& sorted_latents = std::get<0>(sorted);
  const at::Tensor& order = std::get<1>(sorted);
  const auto cf = coef.contiguous();
  const auto xc = x.stride(1) == 1 ? x : x.contiguous();

  switch (dtype) {
    case at::kFloat:
      run_scatter_rows<float>(cf, xc, sorted_latents, order, out, k, n);
      break;
    case at::kDouble:
      run_scatter_rows<double>(cf, xc, sorted_latents, order, out, k, n);
      break;
    case at::kHalf:
      run_scatter_rows<__half>(cf, xc, sorted_latents, order, out, k, n);
      break;
    case at::kBFloat16:
      run_scatter_rows<__nv_bfloat16>(cf, xc, sorted_latents, order, out, k, n);
      break;
    default:
      TORCH_CHECK_TYPE(false, op, ": unsupported dtype ", dtype);
  }
  return out;
}

}  // namespace mi_crow

TORCH_LIBRARY_IMPL(mi_crow, CUDA, m) { m.impl("scatter_rows", &mi_crow::scatter_rows_cuda); }
