// Shared argument checks and small helpers for the mi_crow CPU kernels.
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <vector>

namespace mi_crow {

inline bool is_supported_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kBFloat16 || t == at::kHalf || t == at::kDouble;
}

inline void check_float(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK_TYPE(is_supported_float(t.scalar_type()), op, ": ", name,
              " must be float32, bfloat16, float16 or float64, got ", t.scalar_type());
}

inline void check_dim(const char* op, const char* name, const at::Tensor& t, int64_t dim) {
  TORCH_CHECK_VALUE(t.dim() == dim, op, ": ", name, " must be ", dim, "-D, got shape ", t.sizes());
}

inline void check_cpu(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK_VALUE(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor, got device ", t.device());
}

inline void check_same_dtype(const char* op, const char* name, const at::Tensor& t, const at::Tensor& ref,
                             const char* ref_name) {
  TORCH_CHECK_TYPE(t.scalar_type() == ref.scalar_type(), op, ": ", name, " must have the dtype of ", ref_name, " (",
              ref.scalar_type(), "), got ", t.scalar_type());
}

inline void check_indices(const char* op, const at::Tensor& indices, int64_t n) {
  TORCH_CHECK_TYPE(indices.scalar_type() == at::kLong, op, ": indices must be int64, got ", indices.scalar_type());
  const int64_t* p = indices.data_ptr<int64_t>();
  const int64_t total = indices.numel();
  int64_t bad = -1;
  for (int64_t i = 0; i < total; ++i) {
    if (p[i] < 0 || p[i] >= n) {
      bad = i;
      break;
    }
  }
  TORCH_CHECK_VALUE(bad < 0, op, ": indices must lie in [0, ", n, "), got ", (bad < 0 ? 0 : p[bad]), " at flat position ",
              bad);
}

// Fills dst[0..len) with src converted to the accumulation type.
template <typename scalar_t, typename acc_t>
inline void to_acc(const scalar_t* src, acc_t* dst, int64_t len) {
  for (int64_t i = 0; i < len; ++i) dst[i] = static_cast<acc_t>(src[i]);
}

// Groups the flat positions p of indices [total] by latent with a stable counting sort: the positions of latent
// i are order[start[i] .. start[i + 1]) in increasing p, so any per-latent summation has a fixed order.
inline void group_by_latent(const int64_t* ip, int64_t total, int64_t n, std::vector<int64_t>& start,
                            std::vector<int64_t>& order) {
  start.assign(n + 1, 0);
  for (int64_t p = 0; p < total; ++p) ++start[ip[p] + 1];
  for (int64_t i = 0; i < n; ++i) start[i + 1] += start[i];
  order.resize(total);
  std::vector<int64_t> cursor(start.begin(), start.end() - 1);
  for (int64_t p = 0; p < total; ++p) order[cursor[ip[p]]++] = p;
}

}  // namespace mi_crow
