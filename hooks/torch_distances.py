"""Per-layer distances on the device, for the watch hook.

For every layer the device computes four sums, with d0 = w(t) - w(0) and
ds = w(t) - w(t-1):

    ||d0||^2,  d0 . w(0),  ||ds||^2,  ds . w(t)

and optionally refreshes the w(t-1) buffer, returning a (4, L) float64
tensor on the parameters' device without any host sync. The host (the
reporter's thread) derives the rest exactly: ||w(t)||^2 = ||w(0)||^2 +
2 d0.w(0) + ||d0||^2 and ||w(t-1)||^2 = ||w(t)||^2 - 2 ds.w(t) + ||ds||^2
(see :func:`wire_rows`), so no pass is spent on the norms themselves.

Why dots of differences: the angle of a small step comes out of norms alone
only through a needle-like triangle, and when the step is mostly radial
(weight decay on a converged layer) float32 rounding of ||w|| is amplified
by ||w|| / ||ds||. A dot of the small difference with the weights has error
relative to ||ds|| ||w||, so the collector can split each difference into
radial and tangential parts without cancellation.

Two paths, chosen per layer:

* **Blocked** (CPU, contiguous float32/float64): one pass over cache-sized
  blocks; w, w(0) and w(t-1) are read from memory once and w(t-1) written
  once, near the minimum traffic for these quantities. Sums use BLAS ``dot``
  per block: a block is small enough that float32 accumulation stays ~1e-7
  relative, where whole-tensor float32 norms on CPU drift to ~4e-5 on
  multi-million-element layers, too coarse for small angles.
* **Foreach** (CUDA and everything else): a handful of ``torch._foreach_*``
  kernels for all layers, per-layer dot kernels, accumulation in >= float32.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

BLOCK = 1 << 19  # elements per block: 2 MiB of float32; w, w(0), w(t-1) blocks stay in cache

#: Rows of :meth:`LayerDistances.measure`.
DEVICE_ROWS = ("dist0_sq", "dot0", "dstep_sq", "dotstep_w")


def _blockable(p: torch.Tensor) -> bool:
    return p.device.type == "cpu" and p.dtype in (torch.float32, torch.float64) and p.is_contiguous()


def wire_rows(device_rows: np.ndarray, init_norms: np.ndarray, prev_is_w0: bool = False) -> np.ndarray:
    """(6, L) StepBatch rows (norm, dist0, dstep, norm_prev, dot0, dotstep) from the device rows.

    ``dotstep`` on the wire is ds . w(t-1) = ds . w(t) - ||ds||^2.
    """
    d0sq, dot0, dssq, dsw = np.asarray(device_rows, dtype=np.float64)
    init_sq = np.asarray(init_norms, dtype=np.float64) ** 2
    with np.errstate(invalid="ignore"):
        norm_sq = init_sq + 2.0 * dot0 + d0sq
        dotstep = dsw - dssq
        prev_sq = init_sq if prev_is_w0 else norm_sq - 2.0 * dotstep - dssq
        return np.stack([np.sqrt(np.maximum(norm_sq, 0.0)), np.sqrt(d0sq), np.sqrt(dssq),
                         np.sqrt(np.maximum(prev_sq, 0.0)), dot0, dotstep])


class LayerDistances:
    """Measures distances for fixed lists of parameters and their w(0), w(t-1) buffers."""

    def __init__(self, params: Sequence[torch.Tensor], w0: Sequence[torch.Tensor],
                 prev: Sequence[torch.Tensor], block: int = BLOCK) -> None:
        self.params = [p.detach() for p in params]
        self.w0 = list(w0)
        self.prev = list(prev)
        self.block = block
        self.num_layers = len(self.params)
        self.device = self.params[0].device if self.params else torch.device("cpu")
        self._build()

    def _build(self) -> None:
        self._ptrs = [p.data_ptr() for p in self.params]
        blocked = [i for i, p in enumerate(self.params) if _blockable(p)]
        blocked_set = set(blocked)
        self._foreach_idx = [i for i in range(self.num_layers) if i not in blocked_set]
        self._blocked_idx = blocked
        self._blocks: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] = []
        seg: list[int] = []
        scratch: dict[torch.dtype, torch.Tensor] = {}
        for j, i in enumerate(blocked):
            w, a, b = (t.view(-1) for t in (self.params[i], self.w0[i], self.prev[i]))
            if w.dtype not in scratch:
                scratch[w.dtype] = torch.empty(self.block, dtype=w.dtype, device=w.device)
            buf = scratch[w.dtype]
            for s in range(0, w.numel(), self.block):
                e = min(s + self.block, w.numel())
                self._blocks.append((w[s:e], a[s:e], b[s:e], buf[: e - s]))
                seg.append(j)
        self._seg = torch.tensor(seg, dtype=torch.long, device=self.device)
        n = len(self._blocks)
        # One accumulator row per quantity; dot() writes each block's sum straight into it.
        self._acc = {dt: torch.zeros(4, n, dtype=dt, device=self.device) for dt in (torch.float32, torch.float64)}
        is64 = [blk[0].dtype == torch.float64 for blk in self._blocks]
        self._is64 = torch.tensor(is64, device=self.device) if any(is64) else None
        self._blocked_pos = torch.tensor(blocked, dtype=torch.long, device=self.device)
        self._foreach_pos = torch.tensor(self._foreach_idx, dtype=torch.long, device=self.device)

    def _check_storage(self) -> None:
        # Parameters moved or re-allocated (model.to(), FSDP re-sharding): rebuild views.
        if any(p.data_ptr() != q for p, q in zip(self.params, self._ptrs)):
            self._build()

    @torch.no_grad()
    def copy_prev(self) -> None:
        """w(t-1) := w(t) for all layers (one foreach copy)."""
        torch._foreach_copy_(self.prev, self.params)

    @torch.no_grad()
    def measure(self, refresh_prev: bool) -> torch.Tensor:
        """(4, L) float64 rows of ``DEVICE_ROWS``, on the device, no sync.

        With ``refresh_prev`` the w(t-1) buffer holds w(t) afterwards; otherwise
        its content is unspecified (consumed as scratch).
        """
        self._check_storage()
        if not self._foreach_idx:
            return self._measure_blocked(refresh_prev)
        out = torch.empty((4, self.num_layers), dtype=torch.float64, device=self.device)
        if self._blocks:
            out.index_copy_(1, self._blocked_pos, self._measure_blocked(refresh_prev))
        out.index_copy_(1, self._foreach_pos, self._measure_foreach(refresh_prev))
        return out

    def _measure_blocked(self, refresh_prev: bool) -> torch.Tensor:
        dot, sub = torch.dot, torch.sub
        rows = {dt: tuple(acc) for dt, acc in self._acc.items()}
        for i, (w, a, b, buf) in enumerate(self._blocks):
            d0sq, dot0, dssq, dsw = rows[w.dtype]
            sub(w, a, out=buf)            # d0 = w - w(0): w and w(0) read from memory once
            dot(buf, buf, out=d0sq[i])
            dot(buf, a, out=dot0[i])
            b.sub_(w)                      # w(t-1) - w = -ds, in place: w now comes from cache
            dot(b, b, out=dssq[i])
            dot(b, w, out=dsw[i])          # = -ds . w(t)
            if refresh_prev:
                b.copy_(w)
        acc = self._acc[torch.float32].double()
        if self._is64 is not None:
            acc = torch.where(self._is64, self._acc[torch.float64], acc)
        sums = torch.zeros(4, len(self._blocked_idx), dtype=torch.float64, device=self.device)
        sums.index_add_(1, self._seg, acc)
        sums[3].neg_()
        return sums

    def _measure_foreach(self, refresh_prev: bool) -> torch.Tensor:
        idx = self._foreach_idx
        ws = [self.params[i] for i in idx]
        w0 = [self.w0[i] for i in idx]
        prev = [self.prev[i] for i in idx]
        acc_dt = torch.float64 if all(w.dtype == torch.float64 for w in ws) else torch.float32

        def sq_norms(ts: list[torch.Tensor]) -> torch.Tensor:
            return torch.stack(torch._foreach_norm(ts, 2, dtype=acc_dt)).double().square()

        def dots(xs: list[torch.Tensor], ys: list[torch.Tensor]) -> torch.Tensor:
            # Small per-layer kernels, no sync.
            return torch.stack([torch.sum(x * y, dtype=acc_dt) for x, y in zip(xs, ys)]).double()

        diff = torch._foreach_sub(ws, w0)
        d0sq, dot0 = sq_norms(diff), dots(diff, w0)
        del diff
        ds = torch._foreach_sub(ws, prev)
        dssq, dsw = sq_norms(ds), dots(ds, ws)
        del ds
        if refresh_prev:
            torch._foreach_copy_(prev, ws)
        return torch.stack([d0sq, dot0, dssq, dsw])
