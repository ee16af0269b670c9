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
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <optional>
#include <tuple>
#include <vector>

#include "checks.h"
#include "isa.h"
#include "lowp_gemm.h"

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

MI_CROW_ISA_BEGIN
#include "vec.h"

namespace mi_crow {
namespace MI_CROW_ISA {
namespace {

// CBLAS enum values (fixed by the CBLAS standard and MKL).
constexpr int kRowMajor = 101, kNoTrans = 111, kTrans = 112, kPacked = 151, kBMatrix = 162;

constexpr int64_t kTileLatents = 2048;  // latents per tile: [kTileTokens, kTileLatents] fp32 scratch = 2 MiB
constexpr int64_t kTileTokens = 256;  // (512 for bf16/fp16)

bool mkl_sgemm_packed_available() {
  return cblas_sgemm_pack_get_size != nullptr && cblas_sgemm_pack != nullptr && cblas_sgemm_compute != nullptr;
}

// A candidate (value, latent) as one sortable key, so that selection and sorting compare plain integers.
// Order: larger value first; among equal values the lower latent index first, as in a stable descending sort.
// NaN ranks above every number (+inf included), as in torch.topk, and all NaNs tie (so the lower index wins).
// float: one uint64 whose high word is the value's bits mapped to an order-preserving unsigned integer and whose
// low word is the complemented index (indices fit in 31 bits); -0.0 is folded into +0.0 first, so the two zeros
// tie as they do under float comparison, and every NaN (either sign, any payload) becomes the positive quiet NaN,
// whose mapped bits lie above those of +inf. double: a (value, index) pair with the same order.
template <typename acc_t>
struct Key;

template <>
struct Key<float> {
  using type = uint64_t;
  static type make(float v, int64_t idx) {
    v += 0.0f;  // -0.0 -> +0.0
    uint32_t b;
    std::memcpy(&b, &v, sizeof(b));
    if ((b & 0x7FFFFFFFu) > 0x7F800000u) b = 0x7FC00000u;  // any NaN -> +qNaN
    b = (b & 0x80000000u) ? ~b : (b | 0x80000000u);
    return (static_cast<uint64_t>(b) << 32) | static_cast<uint32_t>(~static_cast<uint32_t>(idx));
  }
  static float value(type key) {
    uint32_t b = static_cast<uint32_t>(key >> 32);
    b = (b & 0x80000000u) ? (b & 0x7FFFFFFFu) : ~b;
    float v;
    std::memcpy(&v, &b, sizeof(v));
    return v;
  }
  static int64_t index(type key) { return static_cast<int64_t>(~static_cast<uint32_t>(key)); }
  // A functor (not a function pointer) so the standard algorithms inline the comparison.
  struct Better {
    bool operator()(type a, type b) const { return a > b; }
  };
};

template <>
struct Key<double> {
  using type = std::pair<double, int64_t>;
  static type make(double v, int64_t idx) { return {v, idx}; }
  static double value(const type& key) { return key.first; }
  static int64_t index(const type& key) { return key.second; }
  struct Better {
    bool operator()(const type& a, const type& b) const {
      const bool an = std::isnan(a.first), bn = std::isnan(b.first);
      if (an || bn) return an && (!bn || a.second < b.second);
      return a.first > b.first || (a.first == b.first && a.second < b.second);
    }
  };
};

// Moves the `want` best of the distinct keys keys[0, m) to keys[0, want), in no particular order. tmp: scratch of
// 4 * m keys. Quickselect whose partition pass is branch-free (AVX-512 compare + compress, eight keys per
// instruction); the standard nth_element's branchy partition mispredicts on every other element of random data.
inline void select_best(uint64_t* keys, int64_t m, int64_t want, uint64_t* tmp) {
  if (want <= 0 || want >= m) return;
#if defined(MI_CROW_AVX512)
  const uint64_t* cur = keys;
  int64_t len = m, need = want, done = 0;  // keys[0, done) are known to be among the best; need more from cur
  for (int round = 0;; round ^= 1) {
    uint64_t* gt = tmp + round * 2 * m;  // this round's output region: keys above the pivot, then keys below it
    uint64_t* lt = gt + m;
    // Median of three as pivot; all keys are distinct, so the pivot is exactly one key.
    uint64_t a = cur[0], b = cur[len / 2], c = cur[len - 1];
    const uint64_t pivot = std::max(std::min(a, b), std::min(std::max(a, b), c));
    const __m512i vp = _mm512_set1_epi64(static_cast<long long>(pivot));
    int64_t ng = 0, nl = 0;
    for (int64_t i = 0; i < len; i += 8) {
      const __mmask8 tail = len - i >= 8 ? __mmask8(0xFF) : __mmask8((1u << (len - i)) - 1);
      const __m512i v = _mm512_maskz_loadu_epi64(tail, cur + i);
      const __mmask8 mg = _mm512_mask_cmpgt_epu64_mask(tail, v, vp);
      const __mmask8 ml = _mm512_mask_cmplt_epu64_mask(tail, v, vp);
      _mm512_mask_compressstoreu_epi64(gt + ng, mg, v);
      _mm512_mask_compressstoreu_epi64(lt + nl, ml, v);
      ng += __builtin_popcount(mg);
      nl += __builtin_popcount(ml);
    }
    if (ng >= need) {
      if (ng == need) {
        std::copy(gt, gt + ng, keys + done);
        return;
      }
      cur = gt;
      len = ng;
    } else {
      std::copy(gt, gt + ng, keys + done);
      done += ng;
      keys[done++] = pivot;
      need -= ng + 1;
      if (need == 0) return;
      cur = lt;
      len = nl;
    }
  }
#else
  std::nth_element(keys, keys + (want - 1), keys + m, std::greater<uint64_t>());
#endif
}

// Running top-`cap` per token row: an unsorted buffer of up to 2 * cap keys and a threshold that a new entry must
// beat. Until the buffer is first compacted every entry is taken (-inf and NaN included, so a row always gets
// min(cap, entries) distinct latents); after that the threshold is the cap-th best value seen at the last
// compaction, so it only rises. Entries come in increasing latent order, so an entry equal to the threshold loses
// the tie: it is taken exactly when Admit says so.
template <typename acc_t>
struct RowBuffers {
  using K = Key<acc_t>;
  using key_t = typename K::type;
  int64_t cap = 0, cap2 = 0;
  std::vector<key_t> keys;
  std::vector<int64_t> count;
  std::vector<acc_t> thr;
  std::vector<uint8_t> full;  // compacted at least once: thr is a real cap-th best value

  void init(int64_t rows, int64_t capacity) {
    cap = capacity;
    cap2 = 2 * capacity;
    keys.assign(rows * cap2, key_t{});
    count.assign(rows, 0);
    thr.assign(rows, -std::numeric_limits<acc_t>::infinity());
    full.assign(rows, 0);
  }

  // Whether a later entry (higher latent index) of value v enters row r's buffer: everything before the first
  // compaction; then v above the threshold, or v NaN above a number. Nothing beats a NaN threshold (a NaN entry
  // ties with it and has the higher index). In vector form: (v !<= thr, true when either is NaN) | all, & some.
  struct Admit {
    acc_t thr;
    bool all, none;
    bool operator()(acc_t v) const { return all || (!none && !(v <= thr)); }
  };
  Admit admit(int64_t r) const {
    return {thr[r], full[r] == 0, full[r] != 0 && std::isnan(thr[r])};
  }
  bool compacted(int64_t r) const { return full[r] != 0; }

  // Adds the candidates of one tile (each beats threshold(r); cv/ci are scratch and may be reordered). When the
  // buffer overflows, one selection keeps the best cap keys and raises the threshold.
  void merge(int64_t r, acc_t* cv, int32_t* ci, int64_t c, std::vector<uint64_t>& scratch) {
    key_t* bk = keys.data() + r * cap2;
    int64_t& cnt = count[r];
    int64_t q = 0;
    while (q < c) {
      const int64_t take = std::min(c - q, cap2 - cnt);
      for (int64_t t = 0; t < take; ++t) bk[cnt + t] = K::make(cv[q + t], ci[q + t]);
      cnt += take;
      q += take;
      if (cnt == cap2 && q < c) {
        compact(r, scratch);
        // Entries of this tile that no longer beat the raised threshold need not be added.
        const Admit admits = admit(r);
        int64_t w = q;
        for (int64_t p = q; p < c; ++p) {
          if (admits(cv[p])) {
            cv[w] = cv[p];
            ci[w++] = ci[p];
          }
        }
        c = w;
      }
    }
    if (cnt == cap2) compact(r, scratch);
  }

  // Keeps the best cap keys of row r and sets its threshold to the cap-th best value.
  void compact(int64_t r, std::vector<uint64_t>& scratch) {
    key_t* bk = keys.data() + r * cap2;
    key_t worst;
    if constexpr (std::is_same_v<key_t, uint64_t>) {
      if (static_cast<int64_t>(scratch.size()) < 4 * count[r]) scratch.resize(4 * count[r]);
      select_best(bk, count[r], cap, scratch.data());
      worst = *std::min_element(bk, bk + cap);
    } else {
      std::nth_element(bk, bk + (cap - 1), bk + count[r], typename K::Better());
      worst = bk[cap - 1];
    }
    count[r] = cap;
    thr[r] = K::value(worst);
    full[r] = 1;
  }

  // Appends row r's kept keys to `out`.
  void collect(int64_t r, std::vector<key_t>& out) const {
    out.insert(out.end(), keys.begin() + r * cap2, keys.begin() + r * cap2 + count[r]);
  }
};

// Per-task buffers for the candidates of one tile row.
template <typename acc_t>
struct Candidates {
  std::vector<acc_t> val, aval;
  std::vector<int32_t> idx, aidx;
  std::vector<uint64_t> keys;  // selection scratch
  explicit Candidates(int64_t len) : val(len + 16), aval(len + 16), idx(len + 16), aidx(len + 16) {}
};

// Scans entries [j0, j1) of one row of a product tile (pre-activations without bias) and merges the entries that
// beat the row's thresholds into its buffers. tile/bias: [len] product row and encoder bias of the tile's latents;
// dead: [n] bool or nullptr. The thresholds stay fixed during the range, so the scan is a branch-free
// compare-and-compress.
template <typename acc_t>
void scan_range(const acc_t* tile, const acc_t* bias, int64_t j0, int64_t j1, int64_t lat0, int64_t r,
                RowBuffers<acc_t>& main, RowBuffers<acc_t>* aux, const bool* dead, Candidates<acc_t>& cand) {
  using Admit = typename RowBuffers<acc_t>::Admit;
  const Admit adm = main.admit(r);
  const Admit aadm = aux ? aux->admit(r) : Admit{0, false, true};
  acc_t* cv = cand.val.data();
  int32_t* ci = cand.idx.data();
  acc_t* av = cand.aval.data();
  int32_t* ai = cand.aidx.data();
  int64_t c = 0, ca = 0;
  int64_t j = j0;
#if defined(MI_CROW_AVX512)
  if constexpr (std::is_same_v<acc_t, float>) {
    // Admit as masks: "not v <= thr" (true when v or thr is NaN), OR'ed with all lanes before the first
    // compaction, AND'ed with no lane when nothing can beat a NaN threshold.
    const __m512 vthr = _mm512_set1_ps(adm.thr);
    const __m512 vathr = _mm512_set1_ps(aadm.thr);
    const __mmask16 m_or = adm.all ? 0xFFFF : 0, m_and = adm.none ? 0 : 0xFFFF;
    const __mmask16 a_or = aadm.all ? 0xFFFF : 0, a_and = aadm.none ? 0 : 0xFFFF;
    const __m512i step = _mm512_set1_epi32(16);
    __m512i lane = _mm512_add_epi32(_mm512_set1_epi32(static_cast<int32_t>(lat0 + j0)),
                                    _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15));
    for (; j + 16 <= j1; j += 16, lane = _mm512_add_epi32(lane, step)) {
      const __m512 v = _mm512_add_ps(_mm512_loadu_ps(tile + j), _mm512_loadu_ps(bias + j));
      const __mmask16 m = (_mm512_cmp_ps_mask(v, vthr, _CMP_NLE_UQ) | m_or) & m_and;
      if (m) {
        _mm512_mask_compressstoreu_ps(cv + c, m, v);
        _mm512_mask_compressstoreu_epi32(ci + c, m, lane);
        c += __builtin_popcount(m);
      }
      if (aux) {
        __mmask16 ma = (_mm512_cmp_ps_mask(v, vathr, _CMP_NLE_UQ) | a_or) & a_and;
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
    if (adm(v)) {
      cv[c] = v;
      ci[c++] = static_cast<int32_t>(lat0 + j);
    }
    if (aux && aadm(v) && dead[lat0 + j]) {
      av[ca] = v;
      ai[ca++] = static_cast<int32_t>(lat0 + j);
    }
  }
  main.merge(r, cv, ci, c, cand.keys);
  if (aux) aux->merge(r, av, ai, ca, cand.keys);
}

template <typename acc_t>
void scan_row(const acc_t* tile, const acc_t* bias, int64_t len, int64_t lat0, int64_t r, RowBuffers<acc_t>& main,
              RowBuffers<acc_t>* aux, const bool* dead, Candidates<acc_t>& cand) {
  // Before a row has a threshold every entry is a candidate. Scanning a short head first gives it one (the
  // k-th best of the head is a valid lower bound), so the rest of the tile is filtered instead of sorted.
  const int64_t head = 8 * main.cap;
  if (!main.compacted(r) && head < len) {
    scan_range(tile, bias, 0, head, lat0, r, main, aux, dead, cand);
    scan_range(tile, bias, head, len, lat0, r, main, aux, dead, cand);
  } else {
    scan_range(tile, bias, 0, len, lat0, r, main, aux, dead, cand);
  }
}

// Which product fills the float scratch tile with pre-activations (without bias); see lowp_gemm.h.
enum class Product {
  generic,       // at::mm_out in the operands' dtype (float32 / float64 without MKL)
  f32_packed,    // MKL packed sgemm on float32 operands
  widen,         // bf16/fp16 operands widened to float32 (exact), then the float32 product (packed where possible)
  onednn,        // oneDNN's bf16 micro-kernel on VNNI strips of the tile
  mkl_low,       // MKL's cblas_gemm_bf16bf16f32 / cblas_gemm_f16f16f32
};

// The per-tile form of W_enc that a product reads, built once per tile by the tile's owner (all token blocks
// share it when tiles are the outer loop; each thread has its own when latents are split between threads).
struct TileOperand {
  std::vector<float> packed;         // MKL's packed copy of the float32 (or widened) tile
  at::Tensor wide;                   // [kTileLatents, d] float32: the widened tile (Product::widen)
  std::vector<c10::BFloat16> vnni;   // the tile as VNNI strips (Product::onednn)
};

// xc, W: the product's operands in scalar_t; b_enc: [n] in acc_t; the outputs values/aux_values are acc_t (the
// caller converts them to x's dtype).
template <typename scalar_t>
void encode_impl(const at::Tensor& xc, const at::Tensor& W, const at::Tensor& b_enc, int64_t k, const bool* dead,
                 int64_t k_aux, at::Tensor& values, at::Tensor& indices, at::Tensor& aux_values,
                 at::Tensor& aux_indices) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr at::ScalarType acc_type = c10::CppTypeToScalarType<acc_t>::value;
  const int64_t B = xc.size(0), n = W.size(0), d = W.size(1);
  const bool use_aux = dead != nullptr && k_aux > 0;

  const acc_t* bias_p = b_enc.data_ptr<acc_t>();
  const std::vector<acc_t> bias(bias_p, bias_p + n);

  constexpr bool is_f32 = std::is_same_v<scalar_t, float>;
  constexpr bool is_bf16 = std::is_same_v<scalar_t, c10::BFloat16>;
  constexpr bool is_f16 = std::is_same_v<scalar_t, c10::Half>;
  constexpr bool is_low = is_bf16 || is_f16;

  // The product, chosen at run time for low-precision operands (lowp_gemm.h).
  Product product = Product::generic;
  if constexpr (is_low) {
    const LowpGemm g = lowp_gemm(is_f16);
    if (g == LowpGemm::onednn && is_bf16 && onednn_supports_depth(d)) {
      product = Product::onednn;
    } else if (g == LowpGemm::mkl && lowp_gemm_available(LowpGemm::mkl, is_f16)) {
      product = Product::mkl_low;
    } else {
      product = Product::widen;
    }
  }
  // MKL's mixed-precision GEMMs re-pack the W_enc tile on every call; taller token blocks amortise that.
  const int64_t tile_tokens = product == Product::mkl_low ? 2 * kTileTokens : kTileTokens;
  const int64_t n_tiles = (n + kTileLatents - 1) / kTileLatents;
  const int64_t n_blocks = (B + tile_tokens - 1) / tile_tokens;
  const int64_t threads = at::get_num_threads();
  // Split latents between threads only when there are too few token blocks to keep every thread busy.
  const int64_t segments = (n_blocks >= threads || n_tiles < 2) ? 1 : std::min<int64_t>(threads, n_tiles);
  if constexpr (is_f32) {
    if (segments == 1 && mkl_sgemm_packed_available() && d <= (1 << 30)) product = Product::f32_packed;
  }
  // The widened product packs its tile for MKL when the tile is shared by full token blocks.
  const bool widen_packed =
      product == Product::widen && segments == 1 && mkl_sgemm_packed_available() && d <= (1 << 30);

  std::vector<RowBuffers<acc_t>> mains(segments), auxs(segments);
  for (int64_t s = 0; s < segments; ++s) {
    mains[s].init(B, k);
    if (use_aux) auxs[s].init(B, k_aux);
  }

  const scalar_t* xp = xc.data_ptr<scalar_t>();  // [B, d]
  const scalar_t* wp = W.data_ptr<scalar_t>();   // [n, d]
  // The widened tokens (Product::widen): float32 [B, d], exact copies of the rounded values.
  const at::Tensor xw = product == Product::widen ? xc.to(at::kFloat) : at::Tensor();
  const float* xwp = product == Product::widen ? xw.data_ptr<float>() : nullptr;
  // Scratch rows of the onednn product are whole strips wide.
  const int64_t strips_per_tile = (kTileLatents + kStripLatents - 1) / kStripLatents;

  auto make_operand = [&]() {
    TileOperand op;
    if (product == Product::f32_packed || widen_packed) {
      op.packed.resize(cblas_sgemm_pack_get_size(kBMatrix, tile_tokens, kTileLatents, d) / sizeof(float) + 16);
    }
    if (product == Product::widen) op.wide = at::empty({kTileLatents, d}, xc.options().dtype(at::kFloat));
    if (product == Product::onednn) op.vnni.resize(strips_per_tile * kStripLatents * d);
    return op;
  };
  // Builds the form of tile `tile` that the product reads.
  auto prepare = [&](int64_t tile, TileOperand& op) {
    const int64_t lat0 = tile * kTileLatents, len = std::min(kTileLatents, n - lat0);
    if (product == Product::f32_packed) {
      cblas_sgemm_pack(kRowMajor, kBMatrix, kTrans, tile_tokens, len, d, 1.0f,
                       reinterpret_cast<const float*>(wp) + lat0 * d, d, op.packed.data());
    } else if (product == Product::widen) {
      if constexpr (is_low) {
        float* wide = op.wide.data_ptr<float>();
        for (int64_t j = 0; j < len; ++j) widen(wp + (lat0 + j) * d, wide + j * d, d);
        if (widen_packed) {
          cblas_sgemm_pack(kRowMajor, kBMatrix, kTrans, tile_tokens, len, d, 1.0f, wide, d, op.packed.data());
        }
      }
    } else if (product == Product::onednn) {
      if constexpr (is_bf16) {
        const int64_t strips = (len + kStripLatents - 1) / kStripLatents;
        for (int64_t s = 0; s < strips; ++s) {
          pack_vnni_strip(wp, d, lat0 + s * kStripLatents, std::min(kStripLatents, len - s * kStripLatents),
                          op.vnni.data() + s * kStripLatents * d);
        }
      }
    }
  };

  // Product of one token block with one latent tile into float scratch [rows, ld], then the scan of its rows.
  auto process = [&](int64_t blk, int64_t tile, int64_t seg, acc_t* scratch, at::Tensor& scratch_t,
                     Candidates<acc_t>& cand, const TileOperand& op) {
    // Dispatch-key guards are thread-local, and this may run on a worker thread.
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    const int64_t row0 = blk * tile_tokens, rows = std::min(tile_tokens, B - row0);
    const int64_t lat0 = tile * kTileLatents, len = std::min(kTileLatents, n - lat0);
    int64_t ld = len;
    if (product == Product::f32_packed && rows == tile_tokens) {
      // (The packed operand was built for tile_tokens rows; a short last block takes the generic path.)
      cblas_sgemm_compute(kRowMajor, kNoTrans, kPacked, rows, len, d, reinterpret_cast<const float*>(xp) + row0 * d,
                          d, op.packed.data(), len, 0.0f, reinterpret_cast<float*>(scratch), len);
    } else if (product == Product::widen) {
      if (widen_packed && rows == tile_tokens) {
        cblas_sgemm_compute(kRowMajor, kNoTrans, kPacked, rows, len, d, xwp + row0 * d, d, op.packed.data(), len,
                            0.0f, reinterpret_cast<float*>(scratch), len);
      } else {
        // scratch is float here (acc_t of bf16/fp16); wrap it as the output.
        at::Tensor out = at::from_blob(scratch, {rows, len}, xw.options());
        at::mm_out(out, xw.narrow(0, row0, rows), op.wide.narrow(0, 0, len).t());
      }
    } else if (product == Product::onednn) {
      if constexpr (is_bf16) {
        const int64_t strips = (len + kStripLatents - 1) / kStripLatents;
        ld = strips * kStripLatents;
        for (int64_t s = 0; s < strips; ++s) {
          onednn_bf16_strip(rows, d, xp + row0 * d, d, op.vnni.data() + s * kStripLatents * d,
                            reinterpret_cast<float*>(scratch) + s * kStripLatents, ld);
        }
      }
    } else if (product == Product::mkl_low && is_bf16) {
      cblas_gemm_bf16bf16f32(kRowMajor, kNoTrans, kTrans, rows, len, d, 1.0f,
                             reinterpret_cast<const uint16_t*>(xp + row0 * d), d,
                             reinterpret_cast<const uint16_t*>(wp + lat0 * d), d, 0.0f,
                             reinterpret_cast<float*>(scratch), len);
    } else if (product == Product::mkl_low && is_f16) {
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
      scan_row<acc_t>(scratch + r * ld, bias.data() + lat0, len, lat0, row0 + r, mains[seg],
                      use_aux ? &auxs[seg] : nullptr, dead, cand);
    }
  };
  // scratch: the float tile; scratch_t: the dtype tile for the at::mm_out path (aliases scratch for float).
  auto run_tasks = [&](auto&& body) {
    at::Tensor acc_buf = at::empty({tile_tokens * kTileLatents}, xc.options().dtype(acc_type));
    at::Tensor dtype_buf = std::is_same_v<scalar_t, acc_t> ? acc_buf : at::empty({tile_tokens * kTileLatents}, xc.options());
    Candidates<acc_t> cand(kTileLatents);
    body(acc_buf.data_ptr<acc_t>(), dtype_buf, cand);
    if (product == Product::onednn) onednn_release();
  };

  if (segments == 1) {
    TileOperand shared = make_operand();
    for (int64_t tile = 0; tile < n_tiles; ++tile) {
      prepare(tile, shared);
      at::parallel_for(0, n_blocks, 1, [&](int64_t begin, int64_t end) {
        run_tasks([&](acc_t* scratch, at::Tensor& scratch_t, Candidates<acc_t>& cand) {
          for (int64_t blk = begin; blk < end; ++blk) process(blk, tile, 0, scratch, scratch_t, cand, shared);
        });
      });
    }
  } else {
    at::parallel_for(0, segments, 1, [&](int64_t begin, int64_t end) {
      TileOperand own = make_operand();
      run_tasks([&](acc_t* scratch, at::Tensor& scratch_t, Candidates<acc_t>& cand) {
        for (int64_t seg = begin; seg < end; ++seg) {
          const int64_t t0 = seg * n_tiles / segments, t1 = (seg + 1) * n_tiles / segments;
          for (int64_t tile = t0; tile < t1; ++tile) {
            prepare(tile, own);
            for (int64_t blk = 0; blk < n_blocks; ++blk) process(blk, tile, seg, scratch, scratch_t, cand, own);
          }
        }
      });
    });
  }
  // Merge segments (if any), sort descending, apply ReLU and write the outputs.
  acc_t* vp = values.data_ptr<acc_t>();              // [B, k]
  int64_t* ip = indices.data_ptr<int64_t>();         // [B, k]
  acc_t* avp = use_aux ? aux_values.data_ptr<acc_t>() : nullptr;  // [B, k_aux]
  int64_t* aip = use_aux ? aux_indices.data_ptr<int64_t>() : nullptr;   // [B, k_aux]
  at::parallel_for(0, B, 64, [&](int64_t begin, int64_t end) {
    using K = Key<acc_t>;
    std::vector<typename K::type> all;
    std::vector<uint64_t> scratch;
    auto emit = [&](std::vector<RowBuffers<acc_t>>& bufs, int64_t r, int64_t cap, acc_t* ov, int64_t* oi) {
      all.clear();
      for (auto& b : bufs) b.collect(r, all);
      const int64_t have = std::min<int64_t>(cap, static_cast<int64_t>(all.size()));
      if constexpr (std::is_same_v<typename K::type, uint64_t>) {
        if (scratch.size() < 4 * all.size()) scratch.resize(4 * all.size());
        select_best(all.data(), static_cast<int64_t>(all.size()), have, scratch.data());
      } else if (have < static_cast<int64_t>(all.size())) {
        std::nth_element(all.begin(), all.begin() + (have - 1), all.end(), typename K::Better());
      }
      std::sort(all.begin(), all.begin() + have, typename K::Better());
      for (int64_t q = 0; q < have; ++q) {
        const acc_t v = K::value(all[q]);
        ov[q] = (v > acc_t(0) || std::isnan(v)) ? v : acc_t(0);  // ReLU that keeps NaN, as torch.relu does
        oi[q] = K::index(all[q]);
      }
      // Every latent enters a buffer until it is full, so a row has min(cap, candidates) keys: fewer than cap only
      // for the aux code when fewer latents are dead than k_aux. Those slots get value 0 and index 0.
      for (int64_t q = have; q < cap; ++q) {
        ov[q] = acc_t(0);
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
    const std::optional<at::Tensor>& dead_mask, int64_t k_aux, std::optional<at::ScalarType> compute_dtype) {
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
  // The product's dtype: x's, or compute_dtype (operands rounded to it, products accumulated in float32).
  const at::ScalarType cd = compute_dtype.value_or(x.scalar_type());
  TORCH_CHECK_TYPE(is_supported_float(cd), op, ": compute_dtype must be float32, bfloat16, float16 or float64, got ",
                   cd);
  const at::ScalarType acc_type = cd == at::kDouble ? at::kDouble : at::kFloat;
  const int64_t ka = dead.defined() ? k_aux : 0;
  auto values = at::empty({B, k}, x.options().dtype(acc_type));
  auto indices = at::empty({B, k}, x.options().dtype(at::kLong));
  auto aux_values = at::empty({B, ka}, x.options().dtype(acc_type));
  auto aux_indices = at::empty({B, ka}, x.options().dtype(at::kLong));
  if (B > 0) {
    // This kernel sits below autograd; the ATen calls it makes must not record (or refuse) autograd history.
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    // x - b_dec in x's dtype (as the reference), then rounded to the product's dtype. With a compute_dtype the
    // low-precision copies live only for this call: nothing of them is saved for backward.
    at::Tensor xc = at::sub(x.detach(), b_dec.detach()).to(cd).contiguous();
    at::Tensor W = W_enc.detach().to(cd).contiguous();
    at::Tensor be = b_enc.detach().to(acc_type).contiguous();
    const bool* dp = (dead.defined() && ka > 0) ? dead.data_ptr<bool>() : nullptr;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, cd, "topk_encode_cpu", [&] {
      encode_impl<scalar_t>(xc, W, be, k, dp, ka, values, indices, aux_values, aux_indices);
    });
  }
  return {values.to(x.scalar_type()), indices, aux_values.to(x.scalar_type()), aux_indices};
}

}  // namespace MI_CROW_ISA
}  // namespace mi_crow
MI_CROW_ISA_END

#if MI_CROW_ISA_PRIMARY
// Only the baseline build registers the op: its entry point runs the build for the selected level.
namespace mi_crow {

MI_CROW_ISA_DECLARE(topk_encode_cpu,
                    (const at::Tensor& x, const at::Tensor& W_enc, const at::Tensor& b_enc, const at::Tensor& b_dec,
                     int64_t k, const std::optional<at::Tensor>& dead_mask, int64_t k_aux,
                     std::optional<at::ScalarType> compute_dtype),
                    std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>)

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> topk_encode_dispatch(
    const at::Tensor& x, const at::Tensor& W_enc, const at::Tensor& b_enc, const at::Tensor& b_dec, int64_t k,
    const std::optional<at::Tensor>& dead_mask, int64_t k_aux, std::optional<at::ScalarType> compute_dtype) {
  return MI_CROW_ISA_CALL(topk_encode_cpu, x, W_enc, b_enc, b_dec, k, dead_mask, k_aux, compute_dtype);
}

}  // namespace mi_crow

TORCH_LIBRARY_IMPL(mi_crow, CPU, m) { m.impl("topk_encode", &mi_crow::topk_encode_dispatch); }
#endif  // MI_CROW_ISA_PRIMARY
