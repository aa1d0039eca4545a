"""Per-layer norms and distances on the device, for the watch hook.

For every layer it computes ||w||, ||w - w(0)||, ||w - w(t-1)||, ||w(t-1)||
(when asked) and the radial components (w - w(0)).w(0) and
(w - w(t-1)).w(t-1), and optionally refreshes the w(t-1) buffer, returning a
(6, L) float64 tensor on the parameters' device without any host sync.

Why the radial dots: norms alone determine the angle only through the
triangle they form, and when a step is mostly radial (weight decay on a
converged layer) that triangle is needle-like in the worst way: float32
rounding of ||w|| is amplified by ||w|| / ||dw||. A dot of the small
difference with the weights has error relative to ||dw|| ||w||, so the
collector can take the tangential part of the step without that cancellation.

Two paths, chosen per layer:

* **Blocked** (CPU, contiguous float32/float64): one pass over cache-sized
  blocks. Each block of w is read from memory once and reused from cache for
  both differences; w(0) and w(t-1) are read once and w(t-1) written once, the
  minimum traffic for these quantities. Sums of squares use BLAS ``dot`` per
  block (a block is small enough that float32 accumulation stays ~1e-7
  relative; whole-tensor float32 norms on CPU drift to ~4e-5 on multi-million
  element layers, too coarse for small angles).
* **Foreach** (CUDA and everything else): a handful of ``torch._foreach_*``
  kernels for all layers at once, accumulating in at least float32.
"""
from __future__ import annotations

from typing import Sequence

import torch

BLOCK = 1 << 18  # elements per block: 1 MiB of float32, fits in L2


def _blockable(p: torch.Tensor) -> bool:
    return p.device.type == "cpu" and p.dtype in (torch.float32, torch.float64) and p.is_contiguous()


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
        self._foreach_idx = [i for i in range(self.num_layers) if i not in set(blocked)]
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
        self._acc = {dt: torch.zeros(6, n, dtype=dt, device=self.device)
                     for dt in (torch.float32, torch.float64)}
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
    def measure(self, want_prev_norm: bool, refresh_prev: bool) -> torch.Tensor:
        """(6, L) float64: ||w||, ||w - w0||, ||w - w_prev||, ||w_prev|| (NaN if not
        wanted), (w - w0).w0, (w - w_prev).w_prev.

        With ``refresh_prev`` the w(t-1) buffer holds w(t) afterwards; otherwise
        its content is unspecified (consumed as scratch).
        """
        self._check_storage()
        out = torch.full((6, self.num_layers), float("nan"), dtype=torch.float64, device=self.device)
        if self._blocks:
            out.index_copy_(1, self._blocked_pos, self._measure_blocked(want_prev_norm, refresh_prev))
        if self._foreach_idx:
            out.index_copy_(1, self._foreach_pos, self._measure_foreach(want_prev_norm, refresh_prev))
        return out

    def _measure_blocked(self, want_prev_norm: bool, refresh_prev: bool) -> torch.Tensor:
        dot, sub = torch.dot, torch.sub
        rows = {dt: tuple(acc) for dt, acc in self._acc.items()}
        for i, (w, a, b, buf) in enumerate(self._blocks):
            n2, d02, ds2, pn2, p0, ps = rows[w.dtype]
            # w, w0 and w(t-1) come from memory once; buf and the block of w stay in cache.
            dot(w, w, out=n2[i])
            if want_prev_norm:
                dot(b, b, out=pn2[i])
            sub(w, a, out=buf)
            dot(buf, buf, out=d02[i])
            dot(buf, a, out=p0[i])
            sub(w, b, out=buf)
            dot(buf, buf, out=ds2[i])
            dot(buf, b, out=ps[i])
            if refresh_prev:
                b.copy_(w)
        acc = self._acc[torch.float32].double()
        if self._is64 is not None:
            acc = torch.where(self._is64, self._acc[torch.float64], acc)
        sums = torch.zeros(6, len(self._blocked_idx), dtype=torch.float64, device=self.device)
        sums.index_add_(1, self._seg, acc)
        sums[:4].sqrt_()
        if not want_prev_norm:
            sums[3] = float("nan")
        return sums

    def _measure_foreach(self, want_prev_norm: bool, refresh_prev: bool) -> torch.Tensor:
        idx = self._foreach_idx
        ws = [self.params[i] for i in idx]
        w0 = [self.w0[i] for i in idx]
        prev = [self.prev[i] for i in idx]
        acc_dt = torch.float64 if all(w.dtype == torch.float64 for w in ws) else torch.float32

        def norms(ts: list[torch.Tensor]) -> torch.Tensor:
            return torch.stack(torch._foreach_norm(ts, 2, dtype=acc_dt)).double()

        n = norms(ws)
        pn = norms(prev) if want_prev_norm else torch.full_like(n, float("nan"))
        def dots(xs: list[torch.Tensor], ys: list[torch.Tensor]) -> torch.Tensor:
            # Small per-layer kernels, no sync; accumulate in float32 or better.
            return torch.stack([torch.sum(x * y, dtype=acc_dt) for x, y in zip(xs, ys)]).double()

        diff = torch._foreach_sub(ws, w0)
        d0 = norms(diff)
        p0 = dots(diff, w0)
        del diff
        diff = torch._foreach_sub(ws, prev)
        ds = norms(diff)
        ps = dots(diff, prev)
        del diff
        if refresh_prev:
            torch._foreach_copy_(prev, ws)
        return torch.stack([n, d0, ds, pn, p0, ps])
