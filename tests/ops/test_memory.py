"""`empty_huge`: a plain ``torch.empty`` in every observable way, backed by huge pages where Linux allows it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mi_crow.ops.memory import empty_huge


@pytest.mark.parametrize("size,dtype", [((3, 5), torch.float32), ((4096, 1024), torch.float32), ((7,), torch.bfloat16)])
def test_empty_huge_is_an_ordinary_tensor(size, dtype):
    t = empty_huge(*size, dtype=dtype)
    assert t.shape == size and t.dtype == dtype and t.device.type == "cpu" and t.is_contiguous()
    t.fill_(2)
    assert float(t.float().sum()) == 2 * t.numel()


def _anon_huge_kib() -> int:
    for line in Path("/proc/self/smaps_rollup").read_text().splitlines():
        if line.startswith("AnonHugePages:"):
            return int(line.split()[1])
    raise AssertionError("no AnonHugePages line in /proc/self/smaps_rollup")


def _thp_mode() -> str | None:
    path = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    if not path.exists() or not Path("/proc/self/smaps_rollup").exists():
        return None
    text = path.read_text()
    return text[text.index("[") + 1 : text.index("]")]


@pytest.mark.skipif(_thp_mode() not in ("always", "madvise"), reason="the kernel gives no transparent huge pages")
def test_empty_huge_gets_huge_pages():
    before = _anon_huge_kib()
    t = empty_huge(64 << 20 >> 2)  # 64 MiB of float32
    t.fill_(1.0)
    # At least half of the whole 2 MiB pages inside the buffer (the kernel may fall back to small pages for a
    # few when memory is fragmented).
    assert _anon_huge_kib() - before >= 32 << 10
    del t
