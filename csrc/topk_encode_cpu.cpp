// mi_crow::topk_encode on CPU: values/indices = top-k of (x - b_dec) @ W_enc.T + b_enc per token (ReLU after),
// plus, in the same pass, the top-k_aux among dead latents.
//
// The [B, n] pre-activation matrix is never materialised. Latents are processed in tiles; for each tile and
// each block of tokens one BLAS product fills a small per-task scratch tile, and a vectorised scan compares it
// against each token's current k-th value and compresses the few entries that beat it into a candidate list.
// Candidates are appended to a per-token buffer of 2k entries; when it overflows, one nth_element keeps the
// best k and raises the threshold. Tiles are the outer loop so both threads share the tile of W_enc in cache
// (and, with MKL, one packed copy of it); token blocks are the parallel inner loop. With fewer token blocks than
// threads the latents are split between threads instead, and the per-thread buffers are merged at the end.
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <optional>
#include <tuple>
#include <vector>

#include "checks.h"
#include "vec.h"

// MKL's CBLAS entry points, as exported by the MKL that the PyTorch CPU wheel links in. Declared weak so the
// extension still loads against a torch without MKL; then the kernel uses at::mm_out instead.
extern "C" {
size_t cblas_sgemm_pack_get_size(int identifier, int m, int n, int k) __attribute__((weak));
void cblas_sgemm_pack(int layout, int identifier, int trans, int m, int n, int k, float alpha, const float* src,
                      int ld, float* dest) __attribute__((weak));
void cblas_sgemm_compute(int layout, int transa, int transb, int m, int n, int k, const float* a, int lda,
                         const float* b, int ldb, float beta, float* c, int ldc) __attribute__((weak));
void cblas_gemm_bf16bf16f32(int layout, int transa, int transb, int m, int n, int k, float alpha,
                            const uint16_t* a, int lda, const uint16_t* b, int ldb, float beta, float* c, int ldc)
    __attribute__((weak));
void cblas_gemm_f16f16f32(int layout, int transa, int transb, int m, int n, int k, float alpha, const uint16_t* a,
                          int lda, const uint16_t* b, int ldb, float beta, float* c, int ldc) __attribute__((weak));
}

namespace mi_crow {
namespace {

// CBLAS enum values (fixed by the CBLAS standard and MKL).
constexpr int kRowMajor = 101, kNoTrans = 111, kTrans = 112, kPacked = 151, kBMatrix = 162;

constexpr int64_t kTileLatents = 2048;  // latents per tile: [kTileTokens, kTileLatents] fp32 scratch = 2 MiB
constexpr int64_t kTileTokens = 256;  // (512 for bf16/fp16)

bool mkl_sgemm_packed_available() {
  return cblas_sgemm_pack_get_size != nullptr && cblas_sgemm_pack != nullptr && cblas_sgemm_compute != nullptr;
}

// Running top-`cap` per token row: an unsorted buffer of up to 2 * cap entries and a threshold that a new entry
// must beat. The threshold is the cap-th best value seen at the last compaction, so it only rises.
template <typename acc_t>
struct RowBuffers {
  int64_t cap = 0, cap2 = 0;
  std::vector<acc_t> val;
  std::vector<int64_t> idx;
  std::vector<int64_t> count;
  std::vector<acc_t> thr;

  void init(int64_t rows, int64_t capacity) {
    cap = capacity;
    cap2 = 2 * capacity;
    val.assign(rows * cap2, acc_t(0));
    idx.assign(rows * cap2, 0);
    count.assign(rows, 0);
    thr.assign(rows, -std::numeric_limits<acc_t>::infinity());
  }

  acc_t threshold(int64_t r) const { return thr[r]; }

  // Adds the candidates of one tile (each beats threshold(r)).
  void merge(int64_t r, const acc_t* cv, const int32_t* ci, int64_t c, std::vector<std::pair<acc_t, int64_t>>& tmp) {
    if (c == 0) return;
    acc_t* bv = val.data() + r * cap2;
    int64_t* bi = idx.data() + r * cap2;
    int64_t& cnt = count[r];
    if (cnt + c <= cap2) {
      for (int64_t q = 0; q < c; ++q) {
        bv[cnt + q] = cv[q];
        bi[cnt + q] = ci[q];
      }
      cnt += c;
      return;
    }
    tmp.clear();
    for (int64_t q = 0; q < cnt; ++q) tmp.emplace_back(bv[q], bi[q]);
    for (int64_t q = 0; q < c; ++q) tmp.emplace_back(cv[q], ci[q]);
    // Best first; among equal values the lower latent index wins, as in a stable descending sort.
    std::nth_element(tmp.begin(), tmp.begin() + (cap - 1), tmp.end(), [](const auto& a, const auto& b) {
      return a.first > b.first || (a.first == b.first && a.second < b.second);
    });
    for (int64_t q = 0; q < cap; ++q) {
      bv[q] = tmp[q].first;
      bi[q] = tmp[q].second;
    }
    cnt = cap;
    // Later tiles hold higher latent indices, so an equal value would lose the tie: strict > is exact.
    thr[r] = tmp[cap - 1].first;
  }

  // Appends row r's kept entries to `out`.
  void collect(int64_t r, std::vector<std::pair<acc_t, int64_t>>& out) const {
    for (int64_t q = 0; q < count[r]; ++q) out.emplace_back(val[r * cap2 + q], idx[r * cap2 + q]);
  }
};

// Per-task buffers for the candidates of one tile row.
template <typename acc_t>
struct Candidates {
  std::vector<acc_t> val, aval;
  std::vector<int32_t> idx, aidx;
  std::vector<std::pair<acc_t, int64_t>> tmp;
  explicit Candidates(int64_t len) : val(len + 16), aval(len + 16), idx(len + 16), aidx(len + 16) {}
};

// Scans entries [j0, j1) of one row of a product tile (pre-activations without bias) and merges the entries that
// beat the row's thresholds into its buffers. tile/bias: [len] product row and encoder bias of the tile's latents;
// dead: [n] bool or nullptr. The thresholds stay fixed during the range, so the scan is a branch-free
// compare-and-compress.
template <typename acc_t>
void scan_range(const acc_t* tile, const acc_t* bias, int64_t j0, int64_t j1, int64_t lat0, int64_t r,
                RowBuffers<acc_t>& main, RowBuffers<acc_t>* aux, const bool* dead, Candidates<acc_t>& cand) {
  const acc_t thr = main.threshold(r);
  const acc_t athr = aux ? aux->threshold(r) : std::numeric_limits<acc_t>::infinity();
  acc_t* cv = cand.val.data();
  int32_t* ci = cand.idx.data();
  acc_t* av = cand.aval.data();
  int32_t* ai = cand.aidx.data();
  int64_t c = 0, ca = 0;
  int64_t j = j0;
#if defined(MI_CROW_AVX512)
  if constexpr (std::is_same_v<acc_t, float>) {
    const __m512 vthr = _mm512_set1_ps(thr);
    const __m512 vathr = _mm512_set1_ps(athr);
    const __m512i step = _mm512_set1_epi32(16);
    __m512i lane = _mm512_add_epi32(_mm512_set1_epi32(static_cast<int32_t>(lat0 + j0)),
                                    _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15));
    for (; j + 16 <= j1; j += 16, lane = _mm512_add_epi32(lane, step)) {
      const __m512 v = _mm512_add_ps(_mm512_loadu_ps(tile + j), _mm512_loadu_ps(bias + j));
      const __mmask16 m = _mm512_cmp_ps_mask(v, vthr, _CMP_GT_OQ);
      if (m) {
        _mm512_mask_compressstoreu_ps(cv + c, m, v);
        _mm512_mask_compressstoreu_epi32(ci + c, m, lane);
        c += __builtin_popcount(m);
      }
      if (aux) {
        __mmask16 ma = _mm512_cmp_ps_mask(v, vathr, _CMP_GT_OQ);
        if (ma) {
          ma &= _mm_cmpneq_epi8_mask(_mm_loadu_si128(reinterpret_cast<const __m128i*>(dead + lat0 + j)),
                                     _mm_setzero_si128());
          if (ma) {
            _mm512_mask_compressstoreu_ps(av + ca, ma, v);
            _mm512_mask_compressstoreu_epi32(ai + ca, ma, lane);
            ca += __builtin_popcount(ma);
          }
        }
      }
    }
  }
#endif
  for (; j < j1; ++j) {
    const acc_t v = tile[j] + bias[j];
    if (v > thr) {
      cv[c] = v;
      ci[c++] = static_cast<int32_t>(lat0 + j);
    }
    if (aux && v > athr && dead[lat0 + j]) {
      av[ca] = v;
      ai[ca++] = static_cast<int32_t>(lat0 + j);
    }
  }
  main.merge(r, cv, ci, c, cand.tmp);
  if (aux) aux->merge(r, av, ai, ca, cand.tmp);
}

template <typename acc_t>
void scan_row(const acc_t* tile, const acc_t* bias, int64_t len, int64_t lat0, int64_t r, RowBuffers<acc_t>& main,
              RowBuffers<acc_t>* aux, const bool* dead, Candidates<acc_t>& cand) {
  // Before a row has a threshold every entry is a candidate. Scanning a short head first gives it one (the
  // k-th best of the head is a valid lower bound), so the rest of the tile is filtered instead of sorted.
  const int64_t head = 8 * main.cap;
  if (main.threshold(r) == -std::numeric_limits<acc_t>::infinity() && head < len) {
    scan_range(tile, bias, 0, head, lat0, r, main, aux, dead, cand);
    scan_range(tile, bias, head, len, lat0, r, main, aux, dead, cand);
  } else {
    scan_range(tile, bias, 0, len, lat0, r, main, aux, dead, cand);
  }
}

template <typename scalar_t>
void encode_impl(const at::Tensor& xc, const at::Tensor& W, const at::Tensor& b_enc, int64_t k, const bool* dead,
                 int64_t k_aux, at::Tensor& values, at::Tensor& indices, at::Tensor& aux_values,
                 at::Tensor& aux_indices) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr at::ScalarType acc_type = c10::CppTypeToScalarType<acc_t>::value;
  const int64_t B = xc.size(0), n = W.size(0), d = W.size(1);
  const bool use_aux = dead != nullptr && k_aux > 0;

  std::vector<acc_t> bias(n);
  to_acc(b_enc.data_ptr<scalar_t>(), bias.data(), n);

  // The low-precision BLAS paths re-pack the W_enc tile on every call; taller token blocks amortise that.
  const int64_t tile_tokens = std::is_same_v<scalar_t, acc_t> ? kTileTokens : 2 * kTileTokens;
  const int64_t n_tiles = (n + kTileLatents - 1) / kTileLatents;
  const int64_t n_blocks = (B + tile_tokens - 1) / tile_tokens;
  const int64_t threads = at::get_num_threads();
  // Split latents between threads only when there are too few token blocks to keep every thread busy.
  const int64_t segments = (n_blocks >= threads || n_tiles < 2) ? 1 : std::min<int64_t>(threads, n_tiles);

  std::vector<RowBuffers<acc_t>> mains(segments), auxs(segments);
  for (int64_t s = 0; s < segments; ++s) {
    mains[s].init(B, k);
    if (use_aux) auxs[s].init(B, k_aux);
  }

  // Which BLAS path fills the scratch tile with float pre-activations (without bias).
  constexpr bool is_f32 = std::is_same_v<scalar_t, float>;
  constexpr bool is_bf16 = std::is_same_v<scalar_t, c10::BFloat16>;
  constexpr bool is_f16 = std::is_same_v<scalar_t, c10::Half>;
  const bool packed = is_f32 && segments == 1 && mkl_sgemm_packed_available() && d <= (1 << 30);
  const bool mkl_low = (is_bf16 && cblas_gemm_bf16bf16f32 != nullptr) || (is_f16 && cblas_gemm_f16f16f32 != nullptr);
  const scalar_t* xp = xc.data_ptr<scalar_t>();  // [B, d]
  const scalar_t* wp = W.data_ptr<scalar_t>();   // [n, d]

  // The packed copy of the current W_enc tile (MKL fp32 path only), shared by all token blocks of the tile.
  std::vector<float> packed_tile;
  if (packed) {
    packed_tile.resize(cblas_sgemm_pack_get_size(kBMatrix, tile_tokens, kTileLatents, d) / sizeof(float) + 16);
  }

  // Product of one token block with one latent tile into float scratch [rows, len], then the scan of its rows.
  auto process = [&](int64_t blk, int64_t tile, int64_t seg, acc_t* scratch, at::Tensor& scratch_t,
                     Candidates<acc_t>& cand) {
    // Dispatch-key guards are thread-local, and this may run on a worker thread.
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    const int64_t row0 = blk * tile_tokens, rows = std::min(tile_tokens, B - row0);
    const int64_t lat0 = tile * kTileLatents, len = std::min(kTileLatents, n - lat0);
    if (packed && rows == tile_tokens) {
      // (The packed operand was built for tile_tokens rows; a short last block takes the generic path.)
      cblas_sgemm_compute(kRowMajor, kNoTrans, kPacked, rows, len, d, reinterpret_cast<const float*>(xp) + row0 * d,
                          d, packed_tile.data(), len, 0.0f, reinterpret_cast<float*>(scratch), len);
    } else if (is_bf16 && mkl_low) {
      cblas_gemm_bf16bf16f32(kRowMajor, kNoTrans, kTrans, rows, len, d, 1.0f,
                             reinterpret_cast<const uint16_t*>(xp + row0 * d), d,
                             reinterpret_cast<const uint16_t*>(wp + lat0 * d), d, 0.0f,
                             reinterpret_cast<float*>(scratch), len);
    } else if (is_f16 && mkl_low) {
      cblas_gemm_f16f16f32(kRowMajor, kNoTrans, kTrans, rows, len, d, 1.0f,
                           reinterpret_cast<const uint16_t*>(xp + row0 * d), d,
                           reinterpret_cast<const uint16_t*>(wp + lat0 * d), d, 0.0f,
                           reinterpret_cast<float*>(scratch), len);
    } else {
      at::Tensor out = scratch_t.narrow(0, 0, rows * len).view({rows, len});
      at::mm_out(out, xc.narrow(0, row0, rows), W.narrow(0, lat0, len).t());
      if constexpr (!std::is_same_v<scalar_t, acc_t>) widen(out.data_ptr<scalar_t>(), scratch, rows * len);
    }
    for (int64_t r = 0; r < rows; ++r) {
      scan_row<acc_t>(scratch + r * len, bias.data() + lat0, len, lat0, row0 + r, mains[seg],
                      use_aux ? &auxs[seg] : nullptr, dead, cand);
    }
  };
  // scratch: the float tile; scratch_t: the dtype tile for the at::mm_out path (aliases scratch for float).
  auto run_tasks = [&](auto&& body) {
    at::Tensor acc_buf = at::empty({tile_tokens * kTileLatents}, xc.options().dtype(acc_type));
    at::Tensor dtype_buf = std::is_same_v<scalar_t, acc_t> ? acc_buf : at::empty({tile_tokens * kTileLatents}, xc.options());
    Candidates<acc_t> cand(kTileLatents);
    body(acc_buf.data_ptr<acc_t>(), dtype_buf, cand);
  };

  if (segments == 1) {
    for (int64_t tile = 0; tile < n_tiles; ++tile) {
      if (packed) {
        const int64_t lat0 = tile * kTileLatents, len = std::min(kTileLatents, n - lat0);
        cblas_sgemm_pack(kRowMajor, kBMatrix, kTrans, tile_tokens, len, d, 1.0f,
                         reinterpret_cast<const float*>(wp) + lat0 * d, d, packed_tile.data());
      }
      at::parallel_for(0, n_blocks, 1, [&](int64_t begin, int64_t end) {
        run_tasks([&](acc_t* scratch, at::Tensor& scratch_t, Candidates<acc_t>& cand) {
          for (int64_t blk = begin; blk < end; ++blk) process(blk, tile, 0, scratch, scratch_t, cand);
        });
      });
    }
  } else {
    at::parallel_for(0, segments, 1, [&](int64_t begin, int64_t end) {
      run_tasks([&](acc_t* scratch, at::Tensor& scratch_t, Candidates<acc_t>& cand) {
        for (int64_t seg = begin; seg < end; ++seg) {
          const int64_t t0 = seg * n_tiles / segments, t1 = (seg + 1) * n_tiles / segments;
          for (int64_t tile = t0; tile < t1; ++tile)
            for (int64_t blk = 0; blk < n_blocks; ++blk) process(blk, tile, seg, scratch, scratch_t, cand);
        }
      });
    });
  }

  // Merge segments (if any), sort descending, apply ReLU and write the outputs.
  scalar_t* vp = values.data_ptr<scalar_t>();        // [B, k]
  int64_t* ip = indices.data_ptr<int64_t>();         // [B, k]
  scalar_t* avp = use_aux ? aux_values.data_ptr<scalar_t>() : nullptr;  // [B, k_aux]
  int64_t* aip = use_aux ? aux_indices.data_ptr<int64_t>() : nullptr;   // [B, k_aux]
  at::parallel_for(0, B, 64, [&](int64_t begin, int64_t end) {
    std::vector<std::pair<acc_t, int64_t>> all;
    auto emit = [&](std::vector<RowBuffers<acc_t>>& bufs, int64_t r, int64_t cap, scalar_t* ov, int64_t* oi) {
      all.clear();
      for (auto& b : bufs) b.collect(r, all);
      std::sort(all.begin(), all.end(), [](const auto& a, const auto& b) {
        return a.first > b.first || (a.first == b.first && a.second < b.second);
      });
      const int64_t have = std::min<int64_t>(cap, static_cast<int64_t>(all.size()));
      for (int64_t q = 0; q < have; ++q) {
        ov[q] = static_cast<scalar_t>(all[q].first > acc_t(0) ? all[q].first : acc_t(0));
        oi[q] = all[q].second;
      }
      // Fewer candidates than slots (only possible for the aux code): pad with value 0 and index 0.
      for (int64_t q = have; q < cap; ++q) {
        ov[q] = scalar_t(0);
        oi[q] = 0;
      }
    };
    for (int64_t r = begin; r < end; ++r) {
      emit(mains, r, k, vp + r * k, ip + r * k);
      if (use_aux) emit(auxs, r, k_aux, avp + r * k_aux, aip + r * k_aux);
    }
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> topk_encode_cpu(
    const at::Tensor& x, const at::Tensor& W_enc, const at::Tensor& b_enc, const at::Tensor& b_dec, int64_t k,
    const std::optional<at::Tensor>& dead_mask, int64_t k_aux) {
  constexpr const char* op = "topk_encode";
  check_dim(op, "x", x, 2);
  check_dim(op, "W_enc", W_enc, 2);
  check_dim(op, "b_enc", b_enc, 1);
  check_dim(op, "b_dec", b_dec, 1);
  check_float(op, "x", x);
  check_same_dtype(op, "W_enc", W_enc, x, "x");
  check_same_dtype(op, "b_enc", b_enc, x, "x");
  check_same_dtype(op, "b_dec", b_dec, x, "x");
  const int64_t B = x.size(0), d = x.size(1), n = W_enc.size(0);
  TORCH_CHECK_VALUE(W_enc.size(1) == d, op, ": W_enc must have x.shape[1] = ", d, " columns, got shape ", W_enc.sizes());
  TORCH_CHECK_VALUE(b_enc.size(0) == n, op, ": b_enc must have shape [", n, "], got ", b_enc.sizes());
  TORCH_CHECK_VALUE(b_dec.size(0) == d, op, ": b_dec must have shape [", d, "], got ", b_dec.sizes());
  // Candidate latent indices are kept as int32 inside a tile scan.
  TORCH_CHECK_VALUE(n <= std::numeric_limits<int32_t>::max(), op, ": W_enc must have at most 2^31 - 1 rows, got ", n);
  TORCH_CHECK_VALUE(k >= 1 && k <= n, op, ": k must be in [1, ", n, "], got ", k);
  TORCH_CHECK_VALUE(k_aux >= 0 && k_aux <= n, op, ": k_aux must be in [0, ", n, "], got ", k_aux);
  at::Tensor dead;
  if (dead_mask.has_value() && dead_mask->defined()) {
    TORCH_CHECK_TYPE(dead_mask->scalar_type() == at::kBool, op, ": dead_mask must be bool, got ",
                dead_mask->scalar_type());
    TORCH_CHECK_VALUE(dead_mask->dim() == 1 && dead_mask->size(0) == n, op, ": dead_mask must have shape [", n,
                "], got ", dead_mask->sizes());
    dead = dead_mask->contiguous();
  }
  const int64_t ka = dead.defined() ? k_aux : 0;
  auto values = at::empty({B, k}, x.options());
  auto indices = at::empty({B, k}, x.options().dtype(at::kLong));
  auto aux_values = at::empty({B, ka}, x.options());
  auto aux_indices = at::empty({B, ka}, x.options().dtype(at::kLong));
  if (B == 0) return {values, indices, aux_values, aux_indices};

  // This kernel sits below autograd; the ATen calls it makes must not record (or refuse) autograd history.
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  at::Tensor xc = at::sub(x.detach(), b_dec.detach()).contiguous();
  at::Tensor W = W_enc.detach().contiguous();
  at::Tensor be = b_enc.contiguous();
  const bool* dp = (dead.defined() && ka > 0) ? dead.data_ptr<bool>() : nullptr;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "topk_encode_cpu", [&] {
    encode_impl<scalar_t>(xc, W, be, k, dp, ka, values, indices, aux_values, aux_indices);
  });
  return {values, indices, aux_values, aux_indices};
}

}  // namespace mi_crow

TORCH_LIBRARY_IMPL(mi_crow, CPU, m) { m.impl("topk_encode", &mi_crow::topk_encode_cpu); }
