"""FSDP2-sharded layers for the PyTorch hook: whole-layer sums from local shards.

With ``torch.distributed.fsdp.fully_shard`` a layer's parameter is a ``DTensor``
and each rank holds one shard of it. The four per-layer sums the hook measures
(``||d0||^2, d0.w(0), ||ds||^2, ds.w(t)``, see :mod:`layrot.hooks.torch_distances`)
are sums over elements, so the whole layer's value is the sum of the shards'
values. The hook therefore measures the local shards with the ordinary
kernels (w(0) and w(t-1) are kept as local tensors) and adds the (4, L) partial
sums across the shard group with one asynchronous ``all_reduce`` per reported
step. The training thread only issues it; the reporter thread waits for it
when it reads the values. ``||w(0)||`` is all-reduced once, at setup.

Why a collective in the job rather than partial sums added by the collector:
the collector would have to hold every rank's rows of a step before any of its
paths (history, metrics, alerts, acks) could use them; one tiny all-reduce per
reported step keeps every rank's report complete on its own.

Requirements (documented in ``watch``): every rank of a shard group calls
``watch`` (setup is collective) with the same ``every``, so the all-reduces
happen at the same steps everywhere; a rank skipping one would pair its next
all-reduce with another rank's FSDP traffic. Replicated layers (plain tensors or
``Replicate`` placements) are measured locally and take no collective.

Nothing here imports ``torch.distributed`` unless the job already did: a job
without DTensors pays nothing.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

log = logging.getLogger(__name__)


def _dtensor_type() -> type | None:
    # No DTensor can exist unless its module was imported by the job.
    mod = sys.modules.get("torch.distributed.tensor")
    return getattr(mod, "DTensor", None) if mod is not None else None


def is_dtensor(p: torch.Tensor) -> bool:
    """True for a ``torch.distributed.tensor.DTensor`` (FSDP2, tensor parallel)."""
    cls = _dtensor_type()
    return cls is not None and isinstance(p, cls)


def shard_dims(p: torch.Tensor) -> list[int]:
    """Mesh dimensions over which ``p`` is sharded (empty for plain or replicated tensors).

    Raises:
        ValueError: for a ``Partial`` placement (a pending reduction is no weight).
    """
    if not is_dtensor(p):
        return []
    dims = []
    for d, placement in enumerate(p.placements):  # type: ignore[attr-defined]
        if placement.is_shard():
            dims.append(d)
        elif not placement.is_replicate():
            raise ValueError(f"placement {placement} is not supported (only Shard and Replicate)")
    return dims


def is_sharded(p: torch.Tensor) -> bool:
    """True when each rank holds only part of ``p`` (a DTensor with a ``Shard`` placement)."""
    return bool(shard_dims(p))


def local_view(p: torch.Tensor) -> torch.Tensor:
    """The rank's local data of ``p`` as a plain tensor sharing its storage (no autograd, no copy)."""
    if is_dtensor(p):
        return p._local_tensor.detach()  # type: ignore[attr-defined]
    return p.detach()


def module_type_name(module: nn.Module) -> str:
    """The module's class name, ``Linear`` rather than FSDP2's generated ``FSDPLinear``."""
    cls = type(module)
    fsdp = sys.modules.get("torch.distributed.fsdp")
    base = getattr(fsdp, "FSDPModule", None) if fsdp is not None else None
    if base is not None and issubclass(cls, base):
        for c in cls.__mro__:
            if not issubclass(c, base):
                return c.__name__
    return cls.__name__


def reject_sharded_layca(params: Sequence[torch.Tensor], name_of: Callable[[torch.Tensor], str]) -> None:
    """Raise if any Layca layer is sharded: Layca's projection needs whole-layer dot products.

    Raises:
        ValueError: naming the sharded parameters.
    """
    bad = [name_of(p) for p in params if is_sharded(p)]
    if bad:
        raise ValueError(
            f"layrot.Layca does not support FSDP-sharded parameters yet (its projection needs "
            f"whole-layer dot products): {', '.join(bad)}"
        )


class PendingSums:
    """Whole-layer sums on their way: in-flight all-reduces of the sharded columns.

    Created on the training thread; :meth:`apply` runs on the reporter thread,
    the only place that waits.
    """

    __slots__ = ("_parts",)

    def __init__(self, parts: list[tuple[Any, torch.Tensor, np.ndarray]]) -> None:
        self._parts = parts

    def apply(self, host_rows: np.ndarray) -> None:
        """Wait for the all-reduces and write the whole-layer sums into ``host_rows[:4, cols]``."""
        for work, part, cols in self._parts:
            if part.device.type == "cuda":
                # NCCL's wait() orders a stream after the collective: use a side stream so the
                # training stream never waits; the blocking copy then waits on the host.
                with torch.cuda.stream(torch.cuda.Stream(part.device)):
                    work.wait()
                    values = part.to("cpu").numpy()
            else:
                work.wait()
                values = part.cpu().numpy()
            host_rows[: values.shape[0], cols] = values
        self._parts = []


class ShardGroups:
    """The sharded layers of a fixed layer list, grouped by the process group of their shard dimension.

    ``params`` are the model's parameters (DTensors for FSDP2 layers) in the
    order the hook reports them. Constructing issues no collective;
    :meth:`global_init_norms` does (once, at setup).
    """

    def __init__(self, params: Sequence[torch.Tensor], names: Sequence[str]) -> None:
        self.params = list(params)
        self.sharded = []
        groups: dict[int, tuple[Any, list[int]]] = {}
        for i, (p, name) in enumerate(zip(self.params, names)):
            try:
                dims = shard_dims(p)
            except ValueError as exc:
                raise ValueError(f"layer {name}: {exc}") from None
            if len(dims) > 1:
                placements = p.placements  # type: ignore[attr-defined]  # a DTensor; the stub types p as Tensor
                raise ValueError(
                    f"layer {name} is sharded over {len(dims)} mesh dimensions "
                    f"({placements}); layrot supports one (FSDP/HSDP), not FSDP + tensor parallel yet"
                )
            self.sharded.append(bool(dims))
            if dims:
                pg = p.device_mesh.get_group(dims[0])  # type: ignore[attr-defined]
                groups.setdefault(id(pg), (pg, []))[1].append(i)
        # Same model, same layer order on every rank: the groups come out in the same order everywhere.
        self.groups = [
            (
                pg,
                np.asarray(idx, dtype=np.int64),
                torch.tensor(idx, dtype=torch.long, device=self.params[idx[0]].device),
                # A sharded layer is a DTensor; the stub types self.params as plain Tensors.
                torch.device(self.params[idx[0]].device_mesh.device_type),  # type: ignore[attr-defined]
            )
            for pg, idx in groups.values()
        ]
        self._sharded_params = [p for p, sh in zip(self.params, self.sharded) if sh]
        self._shapes = [tuple(v.shape) for v in self.local_views()]
        self._ptrs = self._storage()

    @property
    def any(self) -> bool:
        return bool(self.groups)

    def local_views(self) -> list[torch.Tensor]:
        """Each layer's local data (the shard for sharded layers, the tensor itself otherwise)."""
        return [local_view(p) for p in self.params]

    def _storage(self) -> list[int]:
        return [p._local_tensor.data_ptr() for p in self._sharded_params]  # type: ignore[attr-defined]

    def moved(self) -> bool:
        """True when FSDP re-allocated a local shard since the views were taken (``model.to``, assign loads).

        Cheap (one pointer per sharded layer): the hook asks on every step that touches the buffers.
        """
        return bool(self._sharded_params) and self._storage() != self._ptrs

    def refresh(self) -> list[torch.Tensor]:
        """New local views after :meth:`moved`; raises if a shard's shape changed (re-sharded)."""
        views = self.local_views()
        changed = [i for i, (v, w) in enumerate(zip(views, self._shapes)) if tuple(v.shape) != w]
        if changed:
            raise ValueError(f"local shard shapes changed for layers {changed}: the job was re-sharded")
        self._ptrs = self._storage()
        return views

    def global_init_norms(self, local_w0: Sequence[torch.Tensor], every: int) -> list[float]:
        """||w(0)|| of every whole layer; one blocking all-reduce per shard group (setup only).

        The same all-reduce checks that every rank of the group watches with the
        same ``every`` (sum of every and of every^2 over W ranks equal W*e and
        W*e^2 only when all are e), since the per-step all-reduces pair up by count.

        Raises:
            ValueError: when ranks use different ``every`` (raised on every rank alike).
        """
        import torch.distributed as dist

        sq = (
            [
                float(v)
                for v in torch.stack([torch.linalg.vector_norm(w, dtype=torch.float64).square() for w in local_w0])
                .cpu()
                .tolist()
            ]
            if local_w0
            else []
        )
        for pg, cols, _, device in self.groups:
            buf = torch.tensor(
                [sq[c] for c in cols] + [float(every), float(every) ** 2], dtype=torch.float64, device=device
            )
            dist.all_reduce(buf, group=pg)
            n = float(dist.get_world_size(pg))
            total = buf.cpu().numpy()
            if total[-2] != n * every or total[-1] != n * every * every:
                mean = total[-2] / n
                raise ValueError(
                    f"layrot.watch: ranks of the shard group use different every= (mean {mean:g}, "
                    f"this rank {every}); sharded layers need the same every on every rank"
                )
            for c, v in zip(cols, total[:-2]):
                sq[c] = float(v)
        return [float(np.sqrt(max(v, 0.0))) for v in sq]

    def reduce_async(self, rows: torch.Tensor) -> PendingSums | None:
        """Start summing the sharded columns of ``rows`` (4, L) across their groups; no wait."""
        if not self.groups:
            return None
        import torch.distributed as dist

        parts = []
        for pg, cols, cols_t, device in self.groups:
            part = rows.index_select(1, cols_t)  # a fresh tensor: nothing else writes it while in flight
            if part.device != device:
                # (CPU-offloaded shards on an NCCL mesh, or the reverse.) A non-blocking copy to
                # the host could still be landing when gloo reads it.
                part = part.to(device, non_blocking=device.type != "cpu")
            parts.append((dist.all_reduce(part, group=pg, async_op=True), part, cols))
        return PendingSums(parts)

    def check_resume(
        self,
        names: Sequence[str],
        w0: Sequence[torch.Tensor],
        state: Mapping[str, Any],
        index: Mapping[str, int],
        here: tuple[int, int],
    ) -> None:
        """Raise a clear error when a checkpoint's w(0) does not fit this rank's shards.

        ``here`` is this process's (rank, world size).

        Raises:
            ValueError: shape mismatch, or sharded layers saved by another rank / world size.
        """
        for i, n in enumerate(names):
            saved = tuple(state["w0"][index[n]].shape)
            if saved != tuple(w0[i].shape):
                what = "this rank's shard" if self.sharded[i] else "the layer"
                raise ValueError(
                    f"layrot: checkpoint w(0) of {n} has shape {saved}, {what} has "
                    f"{tuple(w0[i].shape)}; resuming sharded layers needs the same sharding "
                    f"(world size and FSDP layout) as the run that saved it"
                )
        if self.any and "rank" in state:
            there = (int(state["rank"]), int(state["world_size"]))
            if here != there:
                raise ValueError(
                    f"layrot: watch state saved by rank {there[0]} of {there[1]} loaded on rank "
                    f"{here[0]} of {here[1]}: sharded layers keep each rank's own w(0) shard"
                )
