// Grouping the slots of sparse codes by latent: the counting sort of the decoder-gradient kernels.
//
// Included after MI_CROW_ISA_BEGIN (like vec.h), so it is compiled for the build's target and lives in its
// namespace: the sort runs inside the hot path of scatter_rows and the decoder backward.
#pragma once

#include <cstdint>
#include <initializer_list>
#include <vector>

#include "isa.h"

namespace mi_crow {
namespace MI_CROW_ISA {

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

}  // namespace MI_CROW_ISA
}  // namespace mi_crow
