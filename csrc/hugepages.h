// Transparent huge pages for large kernel outputs.
//
// A dense [n_latents, d_in] gradient is a fresh allocation of ~100 MiB every step. Backed by 4 KiB pages its first
// touch costs one page fault per 4 KiB (a fifth of a fast scatter's time); backed by 2 MiB pages it costs 512x
// fewer, and random row reads from it miss the TLB less. On Linux with THP in "madvise" mode (a common default)
// only regions marked with madvise(MADV_HUGEPAGE) get huge pages, so the kernels mark their large outputs before
// writing them. Best effort: where it is not supported nothing changes.
#pragma once

#include <cstddef>
#include <cstdint>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace mi_crow {

// Marks the whole 2 MiB pages inside [p, p + bytes) of a buffer that has not been written yet. Smaller buffers
// are left alone (the allocator serves them from memory that is already mapped).
inline void advise_huge_pages(void* p, size_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t(2) << 20;
  if (p == nullptr || bytes < 8 * kHuge) return;
  const uintptr_t begin = (reinterpret_cast<uintptr_t>(p) + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t end = (reinterpret_cast<uintptr_t>(p) + bytes) & ~(kHuge - 1);
  if (end > begin) (void)madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
#else
  (void)p;
  (void)bytes;
#endif
}

}  // namespace mi_crow
