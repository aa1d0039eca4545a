"""The hook's per-layer sums, every implementation against float64 numpy.

The fused C kernel, the ATen blocked pass and the foreach pass must all give
||w - w0||^2, (w - w0).w0, ||w - w_prev||^2 and (w - w_prev).w for each layer,
and leave w_prev = w when asked to refresh it.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from layrot.hooks.torch_distances import LayerDistances, fused_kernel, wire_rows


def reference(ws, w0s, prevs) -> np.ndarray:
    rows = []
    for w, a, b in zip(ws, w0s, prevs):
        x, a, b = (t.detach().double().flatten().numpy() for t in (w, a, b))
        d, s = x - a, x - b
        rows.append([d @ d, d @ a, s @ s, s @ x])
    return np.array(rows).T


def make_layers(dtype=torch.float32, seed=0, step=1e-4):
    g = torch.Generator().manual_seed(seed)
    # Sizes hit the vector loop's tails, the 64k-element pieces and thread splits.
    shapes = [(3, 5), (7, 3, 3, 3), (64, 1024), (1000, 333), (17,)]
    w0 = [torch.randn(s, generator=g, dtype=dtype) for s in shapes]
    prev = [a + 0.05 * torch.randn(a.shape, generator=g, dtype=dtype) for a in w0]
    ws = [b + step * torch.randn(b.shape, generator=g, dtype=dtype) for b in prev]
    return ws, w0, prev


def test_fused_kernel_is_built_by_the_install():
    # The README's install builds it (pyproject ext-modules); without it the hook
    # silently falls back to the ~2x slower ATen pass, which CI must not hide.
    assert fused_kernel() is not None
    ws, w0, prev = make_layers()
    assert LayerDistances(ws, w0, prev).path == "fused"
    assert LayerDistances(ws, w0, prev, fused=False).path == "blocked"


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "blocked"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("threads", [1, 2])
def test_sums_match_float64_reference(fused, dtype, threads):
    ws, w0, prev = make_layers(dtype)
    ref = reference(ws, w0, prev)
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = LayerDistances(ws, w0, prev, block=1 << 14, fused=fused).measure(refresh_prev=False).numpy()
    finally:
        torch.set_num_threads(old)
    # Each sum relative to its natural scale (a dot of a difference is measured
    # against |difference| |w|): exact float64 for the kernel, float32 blocks for ATen.
    d0 = np.sqrt(ref[0])
    ds = np.sqrt(ref[2])
    norms = np.array([np.linalg.norm(a.double().numpy()) for a in w0])
    scale = np.stack([ref[0], d0 * norms, ref[2], ds * norms])
    tol = 1e-12 if (fused or dtype == torch.float64) else 2e-6
    np.testing.assert_array_less(np.abs(got - ref) / scale, tol)


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "blocked"])
def test_refresh_leaves_prev_equal_to_w(fused):
    ws, w0, prev = make_layers()
    LayerDistances(ws, w0, prev, block=1 << 14, fused=fused).measure(refresh_prev=True)
    for w, b in zip(ws, prev):
        assert torch.equal(w, b)


def test_mixed_paths_fill_every_column():
    # A non-contiguous parameter (a transposed view) goes through foreach, the rest fused.
    ws, w0, prev = make_layers()
    ws[2] = ws[2].t()
    w0[2] = w0[2].t()
    prev[2] = prev[2].t()
    ref = reference(ws, w0, prev)
    dist = LayerDistances(ws, w0, prev)
    assert dist.path == "fused+foreach"
    got = dist.measure(refresh_prev=True).numpy()
    np.testing.assert_allclose(got[[0, 2]], ref[[0, 2]], rtol=1e-5)
    np.testing.assert_allclose(got[[1, 3]], ref[[1, 3]], rtol=1e-4, atol=1e-6)
    for w, b in zip(ws, prev):
        assert torch.equal(w, b)


def test_channels_last_layers_take_the_fused_path():
    ws, w0, prev = make_layers()
    ws[1], w0[1], prev[1] = (t.contiguous(memory_format=torch.channels_last) for t in (ws[1], w0[1], prev[1]))
    assert not ws[1].is_contiguous()
    ref = reference(ws, w0, prev)
    dist = LayerDistances(ws, w0, prev)
    assert dist.path == "fused"
    got = dist.measure(refresh_prev=True).numpy()
    np.testing.assert_allclose(got, ref, rtol=1e-12, atol=1e-12 * np.abs(ref).max())
    assert torch.equal(prev[1], ws[1])


def test_wire_rows_recover_norms_exactly():
    ws, w0, prev = make_layers(torch.float64)
    rows = wire_rows(LayerDistances(ws, w0, prev).measure(False).numpy(), np.array([float(a.norm()) for a in w0]))
    np.testing.assert_allclose(rows[0], [float(w.norm()) for w in ws], rtol=1e-12)
    np.testing.assert_allclose(rows[3], [float(b.norm()) for b in prev], rtol=1e-12)
