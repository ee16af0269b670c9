// Shared argument checks and small helpers for the mi_crow CPU kernels.
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <initializer_list>
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

// One of several sparse codes whose slots are grouped together: indices [rows, width], contiguous. Its slot
// (b, j) has the flat position pos_offset + b * width + j in the combined list and the source row b.
struct CodeSlots {
  const int64_t* indices;  // [rows, width]
  int64_t rows;
  int64_t width;
  int64_t pos_offset;
};

// Groups the slots of one or several codes by latent with one stable counting sort: the slots of latent i are
// q in [start[i], start[i + 1]), in increasing flat position -- so code by code in the order the codes are given
// (pass them with increasing pos_offset), then in (b, j) order -- with pos[q] the flat position and row[q] the
// source row. The rows come out of the loop nest, so nothing is divided. index_t may be int32 when every flat
// position fits, which halves these two per-slot arrays.
template <typename index_t>
inline void group_slots_by_latent(std::initializer_list<CodeSlots> codes, int64_t n, std::vector<int64_t>& start,
                                  std::vector<index_t>& pos, std::vector<index_t>& row) {
  start.assign(n + 1, 0);
  int64_t total = 0;
  for (const CodeSlots& c : codes) {
    const int64_t len = c.rows * c.width;
    for (int64_t p = 0; p < len; ++p) ++start[c.indices[p] + 1];
    total += len;
  }
  for (int64_t i = 0; i < n; ++i) start[i + 1] += start[i];
  pos.resize(total);
  row.resize(total);
  std::vector<int64_t> cursor(start.begin(), start.end() - 1);
  for (const CodeSlots& c : codes) {
    for (int64_t b = 0; b < c.rows; ++b) {
      const int64_t* ib = c.indices + b * c.width;
      const int64_t p0 = c.pos_offset + b * c.width;
      for (int64_t j = 0; j < c.width; ++j) {
        const int64_t q = cursor[ib[j]]++;
        pos[q] = static_cast<index_t>(p0 + j);
        row[q] = static_cast<index_t>(b);
      }
    }
  }
}

}  // namespace mi_crow
