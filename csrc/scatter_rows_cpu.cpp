// mi_crow::scatter_rows on CPU: out[i] = sum over (b, j) with indices[b, j] == i of coef[b, j] * x[b].
// Serves the decoder-weight gradient and the encoder-weight gradient restricted to active latents.
// Contributions are grouped by latent with a counting sort, then each latent row is accumulated by exactly one
// thread in (b, j) order: deterministic, no atomics, and no [B*k, d] temporary.
#include <torch/library.h>

#include <limits>
#include <vector>

#include "checks.h"
#include "hugepages.h"
#include "isa.h"

MI_CROW_ISA_BEGIN
#include "slots.h"
#include "vec.h"

namespace mi_crow {
namespace MI_CROW_ISA {

namespace {

template <typename scalar_t, typename index_t>
void scatter_impl(const at::Tensor& cf, const at::Tensor& idx, const at::Tensor& x, int64_t n, at::Tensor& out) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t B = cf.size(0), k = cf.size(1), d = x.size(1);
  std::vector<int64_t> start;
  std::vector<index_t> pos, row;
  group_slots_by_latent<index_t>({CodeSlots{idx.data_ptr<int64_t>(), B, k, 0}}, n, start, pos, row);
  // Low-precision rows are converted once instead of once per (b, j) that uses them (no copy for fp32).
  at::Tensor xa = x.to(c10::CppTypeToScalarType<acc_t>::value).contiguous();
  const acc_t* xp = xa.data_ptr<acc_t>();        // [B, d]
  const scalar_t* cp = cf.data_ptr<scalar_t>();  // [B, k]
  scalar_t* op_ = out.data_ptr<scalar_t>();      // [n, d]
  const int64_t* sp = start.data();
  const index_t* posp = pos.data();
  const index_t* rowp = row.data();
  // Rows of n with no contribution cost only a zero fill; size tasks by the work that does exist.
  const int64_t grain = std::max<int64_t>(64, n * std::max<int64_t>(1, 262144 / std::max<int64_t>(1, d)) /
                                                  std::max<int64_t>(1, B * k));
  at::parallel_for(0, n, grain, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> acc(d);
    for (int64_t i = begin; i < end; ++i) {
      scalar_t* o = op_ + i * d;
      if (sp[i] == sp[i + 1]) {
        for (int64_t c = 0; c < d; ++c) o[c] = scalar_t(0);
        continue;
      }
      acc_t* a = acc.data();
      for (int64_t c = 0; c < d; ++c) a[c] = 0;
      const int64_t end_q = sp[i + 1];
      // Four source rows per pass (axpy_rows): the rows are random, so several reads in flight at once is what
      // makes this fast. The summation order is still slot by slot.
      constexpr int kRows = 4;
      acc_t coef[kRows];
      const acc_t* rows[kRows];
      int64_t q = sp[i];
      for (; q + kRows <= end_q; q += kRows) {
        for (int r = 0; r < kRows; ++r) {
          coef[r] = static_cast<acc_t>(cp[posp[q + r]]);
          rows[r] = xp + static_cast<int64_t>(rowp[q + r]) * d;
        }
        axpy_rows<kRows>(a, coef, rows, d);
      }
      for (; q < end_q; ++q) axpy(a, static_cast<acc_t>(cp[posp[q]]), xp + static_cast<int64_t>(rowp[q]) * d, d);
      for (int64_t c = 0; c < d; ++c) o[c] = static_cast<scalar_t>(a[c]);
    }
  });
}

}  // namespace

at::Tensor scatter_rows_cpu(const at::Tensor& coef, const at::Tensor& indices, const at::Tensor& x, int64_t n) {
  constexpr const char* op = "scatter_rows";
  check_dim(op, "coef", coef, 2);
  check_dim(op, "indices", indices, 2);
  check_dim(op, "x", x, 2);
  check_float(op, "x", x);
  check_same_dtype(op, "coef", coef, x, "x");
  TORCH_CHECK_VALUE(n >= 0, op, ": n must be >= 0, got ", n);
  TORCH_CHECK_VALUE(indices.sizes() == coef.sizes(), op, ": indices must have the shape of coef ", coef.sizes(),
              ", got ", indices.sizes());
  TORCH_CHECK_VALUE(coef.size(0) == x.size(0), op, ": coef must have ", x.size(0), " rows (the rows of x), got shape ",
              coef.sizes());
  const int64_t B = coef.size(0), k = coef.size(1), d = x.size(1);
  auto cf = coef.contiguous();
  auto idx = indices.contiguous();
  check_indices(op, idx, n);
  auto out = empty_gradient({n, d}, x.options());
  if (n == 0 || d == 0) return out;

  const int64_t total = B * k;
  // Positions and rows of the slots in latent order: int32 while every flat position fits (8 bytes per slot).
  const bool narrow = total <= std::numeric_limits<int32_t>::max();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "scatter_rows_cpu", [&] {
    if (narrow) {
      scatter_impl<scalar_t, int32_t>(cf, idx, x, n, out);
    } else {
      scatter_impl<scalar_t, int64_t>(cf, idx, x, n, out);
    }
  });
  return out;
}

}  // namespace MI_CROW_ISA
}  // namespace mi_crow
MI_CROW_ISA_END

#if MI_CROW_ISA_PRIMARY
// Only the baseline build registers the op: its entry point runs the build for the selected level.
namespace mi_crow {

MI_CROW_ISA_DECLARE(scatter_rows_cpu,
                    (const at::Tensor& coef, const at::Tensor& indices, const at::Tensor& x, int64_t n),
                    at::Tensor)

at::Tensor scatter_rows_dispatch(const at::Tensor& coef, const at::Tensor& indices, const at::Tensor& x, int64_t n) {
  return MI_CROW_ISA_CALL(scatter_rows_cpu, coef, indices, x, n);
}

}  // namespace mi_crow

TORCH_LIBRARY_IMPL(mi_crow, CPU, m) { m.impl("scatter_rows", &mi_crow::scatter_rows_dispatch); }
#endif  // MI_CROW_ISA_PRIMARY
