"""Per-layer distances on the device, for the PyTorch watch hook.

For every layer the device computes the four sums of the measurement contract
(:mod:`layrot.agent.measurement`), with d0 = w(t) - w(0) and ds = w(t) - w(t-1):

    ||d0||^2,  d0 . w(0),  ||ds||^2,  ds . w(t)

and optionally refreshes the w(t-1) buffer, returning a (4, L) float64
tensor on the parameters' device without any host sync. The host (the
reporter's thread) derives ||w(t)|| and ||w(t-1)|| exactly from them and
||w(0)|| (:func:`~layrot.agent.measurement.wire_rows`), so no pass is spent on
the norms themselves; why dots of differences, see that module.

Every dtype is widened *before* the differences are taken: w(0) and w(t-1)
are kept in the parameter's dtype (exact copies), but a bfloat16 / float16
difference taken in its own dtype keeps 8 / 11 bits, which gave rotations and
step angles 1e-4 relative errors (and the products of those differences, taken
in bfloat16 too, lost more). Widened first, the differences are exact (float64)
or rounded once at float32 precision relative to the difference itself, and the
sums accumulate in float64 (the blocked path's float32 layers: per block in
float32, ~1e-7).

Three paths, chosen per layer:

* **Fused** (CPU, dense float32/float64/bfloat16/float16, when the
  ``_fused_report`` C kernel was built at install): one multithreaded sweep
  over all layers that reads w, w(0), w(t-1) once, writes w(t-1) once and
  accumulates the four sums in float64 from inputs widened exactly in
  registers (no extra memory). Memory-bound like the optimizer step itself
  (see ``benchmarks/hook_overhead.py`` for its cost against one).
* **Blocked** (CPU without the kernel, or ``LAYROT_FUSED=0``): one pass over cache-sized
  blocks; w, w(0) and w(t-1) are read from memory once and w(t-1) written
  once, near the minimum traffic for these quantities. Sums use BLAS ``dot``
  per block: a block is small enough that float32 accumulation stays ~1e-7
  relative, where whole-tensor float32 norms on CPU drift to ~4e-5 on
  multi-million-element layers, too coarse for small angles. bfloat16 / float16
  blocks are widened into three float64 scratch blocks (3 x 8 B x BLOCK / 4,
  allocated once) and summed in float64.
* **Foreach** (CUDA and everything else): ``torch._foreach_*`` kernels and
  per-layer dot kernels over groups of layers of about ``FOREACH_CHUNK``
  elements (a larger layer is a group of its own), sums accumulated in float64.
  Cost of the widening: on accelerators a bfloat16 / float16 layer's w, and in
  turn its w(0) and w(t-1), are widened to float32 temporaries (2x the layer's
  bytes each; float32 layers need none); with the differences and products a
  group holds at most ~4 x 4 B x FOREACH_CHUNK (128 MB) at once, freed before
  the next group, so no full-size copy of the model is ever made (before, the
  differences of *all* layers were alive at once: one model-sized temporary).
  (Float32 products hold every float16 square; bfloat16 weights beyond ~1e19
  would overflow them, as they did before.) On CPU, where this path only takes
  non-dense layouts, the temporaries are float64 (twice that bound).
"""

from __future__ import annotations

import ctypes
import importlib.util
import logging
import os
from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch

# The contract both frameworks' hooks follow; wire_rows is re-exported for callers of this module.
from layrot.agent.measurement import DEVICE_ROWS, wire_rows

__all__ = ["BLOCK", "DEVICE_ROWS", "FOREACH_CHUNK", "LayerDistances", "fused_kernel", "wire_rows"]

log = logging.getLogger(__name__)

BLOCK = 1 << 19  # elements per block: 2 MiB of float32; w, w(0), w(t-1) blocks stay in cache
# Elements per group of the foreach path: bounds its temporaries (differences,
# widened 16-bit weights, products) to a few times this, whatever the model size.
FOREACH_CHUNK = 1 << 23

# Element types the C kernel takes, with its code for each (``kind`` in _fused_report.c).
_FUSED_KINDS = {torch.float32: 0, torch.float64: 1, torch.bfloat16: 2, torch.float16: 3}
# The kernel's calling convention this module speaks (LAYROT_FUSED_ABI in _fused_report.c).
_FUSED_ABI = 2
_HALF = (torch.bfloat16, torch.float16)


def _blockable(p: torch.Tensor) -> bool:
    return p.device.type == "cpu" and p.dtype in _FUSED_KINDS and p.is_contiguous()


def _dense_layout(p: torch.Tensor) -> bool:
    """Contiguous or channels-last: one dense run of memory starting at data_ptr()."""
    if p.is_contiguous():
        return True
    fmt = {4: torch.channels_last, 5: torch.channels_last_3d}.get(p.ndim)
    return fmt is not None and p.is_contiguous(memory_format=fmt)


def _fusable(p: torch.Tensor, w0: torch.Tensor, prev: torch.Tensor) -> bool:
    # The kernel walks the three as flat arrays, element i with element i: any
    # dense layout works as long as all three share it (clone() preserves it).
    return (
        all(t.device.type == "cpu" and t.dtype == p.dtype and _dense_layout(t) for t in (p, w0, prev))
        and p.dtype in _FUSED_KINDS
        and p.stride() == w0.stride() == prev.stride()
    )


_FUSED: ctypes.CDLL | None | Literal[False] = False  # False: not looked for yet


def fused_kernel() -> ctypes.CDLL | None:
    """The C report kernel (``hooks/_fused_report.c``), or None when it was not built or is disabled.

    Set ``LAYROT_FUSED=0`` to use the ATen blocked path instead (benchmarks compare both).
    """
    global _FUSED
    if _FUSED is False:
        _FUSED = None
        if os.environ.get("LAYROT_FUSED", "1") != "0":
            spec = importlib.util.find_spec("layrot.hooks._fused_report")
            if spec is None or not spec.origin:
                log.info("fused report kernel not built (no C compiler at install?): using the ATen path")
            else:
                try:
                    lib = ctypes.CDLL(spec.origin)
                    abi = lib.layrot_fused_abi
                    abi.restype = ctypes.c_int
                    abi.argtypes = []
                    fn = lib.layrot_fused_report
                    fn.restype = ctypes.c_int
                    fn.argtypes = [
                        ctypes.c_int64,
                        ctypes.c_void_p,
                        ctypes.c_void_p,
                        ctypes.c_void_p,
                        ctypes.c_void_p,
                        ctypes.c_void_p,
                        ctypes.c_int,
                        ctypes.c_int,
                        ctypes.c_void_p,
                    ]
                    if abi() != _FUSED_ABI:
                        raise AttributeError(f"built for calling convention {abi()}, this layrot needs {_FUSED_ABI}")
                    _FUSED = lib
                except (OSError, AttributeError) as exc:
                    # A kernel built from an older _fused_report.c (a stale in-place build; without
                    # layrot_fused_abi it predates bfloat16/float16) must not be fed layers it reads wrong.
                    log.warning(
                        "fused report kernel %s failed to load (%s; reinstalling layrot rebuilds it): "
                        "using the ATen path",
                        spec.origin,
                        exc,
                    )
    return _FUSED or None


class LayerDistances:
    """Measures distances for fixed lists of parameters and their w(0), w(t-1) buffers.

    ``fused=False`` keeps CPU layers on the ATen blocked pass (for comparisons);
    by default they go through the C kernel when it was built.
    """

    def __init__(
        self,
        params: Sequence[torch.Tensor],
        w0: Sequence[torch.Tensor],
        prev: Sequence[torch.Tensor],
        block: int = BLOCK,
        fused: bool = True,
    ) -> None:
        self.params = [p.detach() for p in params]
        self.w0 = list(w0)
        self.prev = list(prev)
        self.block = block
        self.num_layers = len(self.params)
        self.device = self.params[0].device if self.params else torch.device("cpu")
        self._fused_ok = fused  # False: the ATen blocked pass even where the kernel is available
        # The foreach path's CPU variant (flat float64 copies, BLAS dot); tests switch it off to run
        # the accelerator variant on CPU.
        self._foreach_flat64 = self.device.type == "cpu"
        self._build()

    def _build(self) -> None:
        self._ptrs = [p.data_ptr() for p in self.params]
        self._fused_idx: list[int] = []
        self._blocked_idx: list[int] = []
        self._blocks: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] = []
        if self._fused_ok and fused_kernel() is not None:
            self._fused_idx = [i for i in range(self.num_layers) if _fusable(self.params[i], self.w0[i], self.prev[i])]
            if self._fused_idx:
                self._build_fused()
        else:
            self._build_blocked(
                [
                    i
                    for i, p in enumerate(self.params)
                    if _blockable(p) and all(_blockable(t) and t.dtype == p.dtype for t in (self.w0[i], self.prev[i]))
                ]
            )
        taken = set(self._fused_idx) | set(self._blocked_idx)
        self._foreach_idx = [i for i in range(self.num_layers) if i not in taken]
        self._fused_pos = torch.tensor(self._fused_idx, dtype=torch.long, device=self.device)
        self._blocked_pos = torch.tensor(self._blocked_idx, dtype=torch.long, device=self.device)
        self._foreach_pos = torch.tensor(self._foreach_idx, dtype=torch.long, device=self.device)

    def _build_fused(self) -> None:
        idx = self._fused_idx
        n = len(idx)

        def ptrs(ts: Sequence[torch.Tensor]) -> ctypes.Array:
            return (ctypes.c_void_p * n)(*[ts[i].data_ptr() for i in idx])

        # The pointer tables live as long as the views they point into (rebuilt
        # by _check_storage when parameters move).
        self._fused_args = (
            ptrs(self.params),
            ptrs(self.w0),
            ptrs(self.prev),
            np.array([self.params[i].numel() for i in idx], dtype=np.int64),
            np.array([_FUSED_KINDS[self.params[i].dtype] for i in idx], dtype=np.int32),
        )

    def _build_blocked(self, blocked: list[int]) -> None:
        self._blocked_idx = blocked
        self._blocks = []
        seg: list[int] = []
        scratch: dict[torch.dtype, torch.Tensor] = {}
        for j, i in enumerate(blocked):
            w, a, b = (t.view(-1) for t in (self.params[i], self.w0[i], self.prev[i]))
            half = w.dtype in _HALF
            # 16-bit blocks are widened into three float64 scratch rows (w, w(0) or w(t-1), d0):
            # a quarter of the block keeps that scratch at the size of a float32 block's.
            size = max(1, self.block // 4) if half else self.block
            if w.dtype not in scratch:
                shape = (3, size) if half else (size,)
                scratch[w.dtype] = torch.empty(shape, dtype=torch.float64 if half else w.dtype, device=w.device)
            buf = scratch[w.dtype]
            for s in range(0, w.numel(), size):
                e = min(s + size, w.numel())
                self._blocks.append((w[s:e], a[s:e], b[s:e], buf[..., : e - s]))
                seg.append(j)
        self._seg = torch.tensor(seg, dtype=torch.long, device=self.device)
        n = len(self._blocks)
        # One accumulator row per quantity; dot() writes each block's sum straight into it.
        self._acc = {dt: torch.zeros(4, n, dtype=dt, device=self.device) for dt in (torch.float32, torch.float64)}
        wide = [blk[0].dtype != torch.float32 for blk in self._blocks]  # summed in float64
        self._wide = torch.tensor(wide, device=self.device) if any(wide) else None

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
        parts = []
        if self._fused_idx:
            rows = self._measure_fused(refresh_prev)
            if rows is None:  # the kernel could not get memory or threads: the ATen pass needs neither
                self._fused_ok = False
                self._build()
                return self.measure(refresh_prev)
            parts.append((self._fused_pos, rows))
        if self._blocked_idx:
            parts.append((self._blocked_pos, self._measure_blocked(refresh_prev)))
        if self._foreach_idx:
            parts.append((self._foreach_pos, self._measure_foreach(refresh_prev)))
        if len(parts) == 1 and parts[0][1].shape[1] == self.num_layers:
            return parts[0][1]
        out = torch.empty((4, self.num_layers), dtype=torch.float64, device=self.device)
        for pos, rows in parts:
            out.index_copy_(1, pos, rows)
        return out

    def _measure_fused(self, refresh_prev: bool) -> torch.Tensor | None:
        w, w0, prev, numel, kinds = self._fused_args
        out = torch.empty((4, len(self._fused_idx)), dtype=torch.float64)
        # ctypes drops the GIL for the call: the reporter thread keeps running.
        rc = fused_kernel().layrot_fused_report(  # type: ignore[union-attr]
            len(self._fused_idx),
            w,
            w0,
            prev,
            numel.ctypes.data,
            kinds.ctypes.data,
            int(refresh_prev),
            torch.get_num_threads(),
            out.data_ptr(),
        )
        if rc != 0:
            log.warning("fused report kernel failed (%d); using the ATen path from now on", rc)
            return None
        return out

    @property
    def path(self) -> str:
        """Which implementation measures the layers: "fused", "blocked", "foreach" or a mix ("fused+foreach")."""
        names = [
            n
            for n, idx in (("fused", self._fused_idx), ("blocked", self._blocked_idx), ("foreach", self._foreach_idx))
            if idx
        ]
        return "+".join(names) or "none"

    def _measure_blocked(self, refresh_prev: bool) -> torch.Tensor:
        dot, sub = torch.dot, torch.sub
        f32, f64 = self._acc[torch.float32].unbind(), self._acc[torch.float64].unbind()
        for i, (w, a, b, buf) in enumerate(self._blocks):
            if w.dtype in _HALF:
                d0sq, dot0, dssq, dsw = f64
                x, y, d = buf  # float64 scratch: widening is exact, so are the differences
                x.copy_(w)
                y.copy_(a)
                sub(x, y, out=d)
                dot(d, d, out=d0sq[i])
                dot(d, y, out=dot0[i])
                y.copy_(b)
                y.sub_(x)  # w(t-1) - w = -ds
                dot(y, y, out=dssq[i])
                dot(y, x, out=dsw[i])
            else:
                d0sq, dot0, dssq, dsw = f64 if w.dtype == torch.float64 else f32
                sub(w, a, out=buf)  # d0 = w - w(0): w and w(0) read from memory once
                dot(buf, buf, out=d0sq[i])
                dot(buf, a, out=dot0[i])
                b.sub_(w)  # w(t-1) - w = -ds, in place: w now comes from cache
                dot(b, b, out=dssq[i])
                dot(b, w, out=dsw[i])  # = -ds . w(t)
            if refresh_prev:
                b.copy_(w)
        acc = self._acc[torch.float32].double()
        if self._wide is not None:
            acc = torch.where(self._wide, self._acc[torch.float64], acc)
        sums = torch.zeros(4, len(self._blocked_idx), dtype=torch.float64, device=self.device)
        sums.index_add_(1, self._seg, acc)
        sums[3].neg_()
        return sums

    def _measure_foreach(self, refresh_prev: bool) -> torch.Tensor:
        idx = self._foreach_idx
        parts = []
        start, size = 0, 0
        for k, i in enumerate(idx):
            size += self.params[i].numel()
            if size >= FOREACH_CHUNK or k == len(idx) - 1:
                parts.append(self._foreach_group(idx[start : k + 1], refresh_prev))
                start, size = k + 1, 0
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)

    def _foreach_group(self, idx: Sequence[int], refresh_prev: bool) -> torch.Tensor:
        """The (4, len(idx)) float64 sums of one group of layers; its temporaries are freed on return."""
        f64 = torch.float64
        cpu = self._foreach_flat64
        params = [self.params[i] for i in idx]
        # Widened before any subtraction (explicit casts, one temporary each: mixed-dtype ops are
        # ~5x slower on CPU). On CPU everything goes to flat float64 copies summed by BLAS dot
        # (a float64 torch.sum of float32 casts element by element, ~10x slower); elsewhere 16-bit
        # tensors go to float32 and the float64 accumulation rides in the reduction kernels.
        ws = [_widened(w, cpu) for w in params]

        def sq_norms(ts: list[torch.Tensor] | tuple[torch.Tensor, ...]) -> torch.Tensor:
            if cpu:
                # Not _foreach_norm: on CPU it accumulates without cascading (5e-4 relative error in
                # float32 at 8M elements). BLAS dot on the flat float64 copies needs no product temporary.
                return torch.stack([torch.dot(t, t) for t in ts])
            return torch.stack(torch._foreach_norm(ts, 2, dtype=f64)).square()

        def dots(xs: Sequence[torch.Tensor], ys: Sequence[torch.Tensor]) -> torch.Tensor:
            # Small per-layer kernels, no sync.
            if cpu:
                return torch.stack([torch.dot(x, y) for x, y in zip(xs, ys)])
            return torch.stack([torch.sum(x * y, dtype=f64) for x, y in zip(xs, ys)])

        ref = [_widened(self.w0[i], cpu) for i in idx]
        diff = torch._foreach_sub(ws, ref)
        d0sq, dot0 = sq_norms(diff), dots(diff, ref)
        del diff, ref
        ref = [_widened(self.prev[i], cpu) for i in idx]
        ds = torch._foreach_sub(ws, ref)
        del ref
        dssq, dsw = sq_norms(ds), dots(ds, ws)
        del ds, ws
        if refresh_prev:
            torch._foreach_copy_([self.prev[i] for i in idx], params)
        return torch.stack([d0sq, dot0, dssq, dsw])


def _widened(t: torch.Tensor, cpu: bool) -> torch.Tensor:
    """``t`` in the dtype its differences are taken in: float64 on CPU; float32 for 16-bit tensors elsewhere.

    On CPU the result is flat and contiguous (for BLAS dot). The casts are exact (every
    bfloat16 / float16 / float32 value is a float64 one); ``t`` itself (or a view) when it
    already has that dtype and layout: no copy.
    """
    if cpu:
        return t.to(torch.float64, memory_format=torch.contiguous_format).reshape(-1)
    return t.float() if t.dtype in _HALF else t
