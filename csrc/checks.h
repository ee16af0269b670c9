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

// indices must be a contiguous int64 tensor (callers pass .contiguous()); name is the argument's name.
inline void check_indices(const char* op, const char* name, const at::Tensor& indices, int64_t n) {
  TORCH_CHECK_TYPE(indices.scalar_type() == at::kLong, op, ": ", name, " must be int64, got ", indices.scalar_type());
  const int64_t* p = indices.data_ptr<int64_t>();
  const int64_t total = indices.numel();
  int64_t bad = -1;
  for (int64_t i = 0; i < total; ++i) {
    if (p[i] < 0 || p[i] >= n) {
      bad = i;
      break;
    }
  }
  TORCH_CHECK_VALUE(bad < 0, op, ": ", name, " must lie in [0, ", n, "), got ", (bad < 0 ? 0 : p[bad]),
                    " at flat position ", bad);
}

inline void check_indices(const char* op, const at::Tensor& indices, int64_t n) {
  check_indices(op, "indices", indices, n);
}

// Fills dst[0..len) with src converted to the accumulation type.
template <typename scalar_t, typename acc_t>
inline void to_acc(const scalar_t* src, acc_t* dst, int64_t len) {
  for (int64_t i = 0; i < len; ++i) dst[i] = static_cast<acc_t>(src[i]);
}

}  // namespace mi_crow
