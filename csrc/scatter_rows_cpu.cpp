// mi_crow::scatter_rows on CPU: out[i] = sum over (b, j) with indices[b, j] == i of coef[b, j] * x[b].
// Serves the decoder-weight gradient and the encoder-weight gradient restricted to active latents.
// Contributions are grouped by latent with a counting sort, then each latent row is accumulated by exactly one
// thread in (b, j) order: deterministic, no atomics, and no [B*k, d] temporary.
#include <torch/library.h>

#include <vector>

#include "checks.h"
#include "hugepages.h"
#include "vec.h"

namespace mi_crow {

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
  auto out = at::empty({n, d}, x.options());
  advise_huge_pages(out.data_ptr(), out.nbytes());
  if (n == 0 || d == 0) return out;

  const int64_t total = B * k;
  std::vector<int64_t> start, order;
  group_by_latent(idx.data_ptr<int64_t>(), total, n, start, order);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "scatter_rows_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    // Low-precision rows are converted once instead of once per (b, j) that uses them.
    at::Tensor xa = x.to(c10::CppTypeToScalarType<acc_t>::value).contiguous();
    const acc_t* xp = xa.data_ptr<acc_t>();      // [B, d]
    const scalar_t* cp = cf.data_ptr<scalar_t>();  // [B, k]
    scalar_t* op_ = out.data_ptr<scalar_t>();      // [n, d]
    const int64_t* sp = start.data();
    // Contributions in latent order: source row and coefficient, so the inner loop needs no division.
    std::vector<int64_t> rowq(total);
    std::vector<acc_t> coefq(total);
    for (int64_t q = 0; q < total; ++q) {
      const int64_t p = order[q];
      rowq[q] = p / k;
      coefq[q] = static_cast<acc_t>(cp[p]);
    }
    const int64_t* rp = rowq.data();
    const acc_t* cq = coefq.data();
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
        for (int64_t q = sp[i]; q < end_q; ++q) {
          // The source rows are random; fetching two ahead hides most of the miss latency.
          if (q + 2 < end_q) prefetch_row(xp + rp[q + 2] * d, d);
          axpy(a, cq[q], xp + rp[q] * d, d);
        }
        for (int64_t c = 0; c < d; ++c) o[c] = static_cast<scalar_t>(a[c]);
      }
    });
  });
  return out;
}

}  // namespace mi_crow

TORCH_LIBRARY_IMPL(mi_crow, CPU, m) { m.impl("scatter_rows", &mi_crow::scatter_rows_cpu); }
