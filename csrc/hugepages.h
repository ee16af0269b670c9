// Transparent huge pages for large kernel outputs.
//
// A dense [n_latents, d_in] gradient is a fresh allocation of ~100 MiB every step. Backed by 4 KiB pages its first
// touch costs one page fault per 4 KiB (a fifth of a fast scatter's time); backed by 2 MiB pages it costs 512x
// fewer, and random row reads from it miss the TLB less. On Linux with THP in "madvise" mode (a common default)
// only regions marked with madvise(MADV_HUGEPAGE) get huge pages, so the kernels mark their large outputs before
// writing them. Best effort: where it is not supported nothing changes.
#pragma once

#include <ATen/ATen.h>

#include <cstddef>
#include <cstdint>

#if defined(__linux__)
#include <sys/mman.h>
#endif
#if defined(__GLIBC__)
#include <malloc.h>
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

// Hands the free blocks of the C heap back to the kernel before a dense gradient is allocated. glibc keeps freed
// [tokens, d_in]-sized temporaries of the forward and backward in its heap (they are below its adaptive mmap
// threshold), so without this the process would hold them resident on top of the new ~100 MiB gradient: the
// step's peak memory would be what it once used, not what it needs. Costs a walk over the heap's free list.
inline void release_free_heap() {
#if defined(__GLIBC__)
  (void)malloc_trim(0);
#endif
}

// A dense output of a gradient kernel: the free heap released first, then huge pages requested before any write.
// Only large outputs (16 MiB and more) are worth the heap walk.
inline at::Tensor empty_gradient(at::IntArrayRef size, const at::TensorOptions& options) {
  const int64_t bytes = c10::multiply_integers(size) * static_cast<int64_t>(options.dtype().itemsize());
  if (bytes >= (int64_t(16) << 20)) release_free_heap();
  at::Tensor t = at::empty(size, options);
  advise_huge_pages(t.data_ptr(), t.nbytes());
  return t;
}

}  // namespace mi_crow
