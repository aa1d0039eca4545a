"""The hook's per-layer sums for every parameter dtype (bfloat16, float16, float32, float64).

Differences of 16-bit weights must be taken after widening: in the parameter's own dtype
they (and their products) keep 8 or 11 bits, which gave rotations and step angles 1e-4
relative errors. Checked for every measurement path (the fused C kernel, the ATen blocked
pass, the foreach pass in its CPU and its accelerator variant):

* on every finite and non-finite bfloat16 / float16 bit pattern, exactly;
* on a real ``transformers`` GPT-2 (tiny ``GPT2Config``, random init, no download) cast
  to bfloat16 / float16 (and float32 / float64), trained with SGD and Adam, every step:
  rotation and step angle from the measured sums against float64 numpy from the weights
  saved at that step;
* through ``layrot.watch`` and a real collector on loopback, every step and layer.
"""

from __future__ import annotations

import ctypes
import importlib.util
import shutil
import subprocess

import numpy as np
import pytest
import torch
from history_check import check_history
from reference import angle, cosine_distance, rel_err

import layrot
from layrot.client.query import QueryClient
from layrot.core import rotation as rot
from layrot.hooks import torch_distances
from layrot.hooks.torch_distances import LayerDistances, wire_rows

transformers = pytest.importorskip("transformers")
from transformers import GPT2Config, GPT2LMHeadModel  # noqa: E402

torch.set_num_threads(1)

DTYPES = [torch.bfloat16, torch.float16, torch.float32, torch.float64]
HALF = [torch.bfloat16, torch.float16]
PATHS = ["fused", "blocked", "foreach", "foreach-accel"]
TOL = 1e-6  # the bound issue 11 sets for rotation and step angle, every dtype
VOCAB, SEQ = 96, 16


def distances(ws, w0, prev, path: str) -> LayerDistances:
    """LayerDistances forced onto one path; "foreach*" gets transposed views of the 2-D tensors.

    A transposed view is not a dense layout the kernel or the blocked pass walks, as a
    CUDA tensor is not: the foreach pass takes it.
    """
    if path.startswith("foreach"):
        ws, w0, prev = ([t.t() for t in ts] for ts in (ws, w0, prev))
    dist = LayerDistances(ws, w0, prev, block=1 << 12, fused=path == "fused")
    if path == "foreach-accel":
        dist._foreach_flat64 = False  # the variant CUDA runs: float32 differences, float64 sums
    want = "foreach" if path.startswith("foreach") else path
    assert dist.path == want, (path, dist.path)
    return dist


def reference_sums(ws, w0, prev) -> np.ndarray:
    """(4, L) float64 sums from the tensors widened by numpy."""
    rows = []
    for w, a, b in zip(ws, w0, prev):
        x, a, b = (t.detach().double().flatten().numpy() for t in (w, a, b))
        d, s = x - a, x - b
        with np.errstate(all="ignore"):
            rows.append([d @ d, d @ a, s @ s, s @ x])
    return np.array(rows).T


def naive_sums(ws, w0, prev) -> np.ndarray:
    """The old way, in the parameters' dtype: what the widening fixes (shows the tests can tell)."""
    rows = []
    for w, a, b in zip(ws, w0, prev):
        d, s = w - a, w - b
        rows.append([float((d * d).sum(dtype=torch.float32)), float((d * a).sum(dtype=torch.float32))])
        rows[-1] += [float((s * s).sum(dtype=torch.float32)), float((s * w).sum(dtype=torch.float32))]
    return np.array(rows).T


# ------------------------------------------------------------------ every 16-bit value


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", HALF, ids=["bf16", "fp16"])
def test_every_bit_pattern_widens_exactly(dtype, path):
    # All 65536 patterns (normals, subnormals, +-0, +-Inf, NaNs), in layers of one sign and
    # exponent each, so each layer's sums are exact in float64 whatever the order of adds.
    # w(t-1) is w shifted by one element; w(0) = 0.
    if path == "foreach-accel" and dtype == torch.bfloat16:
        # Its float32 products overflow beyond |w| ~ 1e19 and underflow below ~1e-23, which only
        # bfloat16's range reaches (float16's whole range fits): the documented bound of that variant.
        pytest.skip("float32 products cannot hold every bfloat16 square")
    values = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(dtype)
    per_exponent = 1024 if dtype == torch.float16 else 128
    ws = [v.clone().reshape(2, -1) for v in values.split(per_exponent)]
    w0 = [torch.zeros_like(w) for w in ws]
    prev = [w.roll(1).clone() for w in ws]
    if path == "fused" and torch_distances.fused_kernel() is None:
        pytest.fail("the fused kernel is not built")
    got = distances(ws, w0, prev, path).measure(refresh_prev=True).numpy()
    ref = reference_sums(ws, w0, [w.roll(1) for w in ws])
    if path == "foreach-accel":  # its squared norms come from sqrt(sum), squared again: 1 ulp
        np.testing.assert_allclose(got, ref, rtol=1e-15)
    else:
        np.testing.assert_array_equal(got, ref)
    for w, b in zip(ws, prev):
        assert torch.equal(w.view(torch.int16), b.view(torch.int16))  # refreshed bit for bit (NaNs too)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", HALF, ids=["bf16", "fp16"])
def test_sums_of_16bit_layers_match_float64(dtype, path):
    # Layer sizes hit the vector loops' tails, the kernel's 64k pieces and the blocks.
    g = torch.Generator().manual_seed(0)
    shapes = [(3, 5), (7, 27), (64, 1024), (333, 301), (2, 17)]
    w0 = [torch.randn(s, generator=g).to(dtype) for s in shapes]
    prev = [(a.double() + 0.05 * torch.randn(a.shape, generator=g, dtype=torch.float64)).to(dtype) for a in w0]
    ws = [(b.double() + 0.01 * torch.randn(b.shape, generator=g, dtype=torch.float64)).to(dtype) for b in prev]
    ref = reference_sums(ws, w0, prev)
    got = distances(ws, w0, prev, path).measure(refresh_prev=False).numpy()
    # Each sum against its natural scale (a dot of a difference against |difference| |w|).
    norms = np.array([np.linalg.norm(a.double().numpy()) for a in w0])
    scale = np.stack([ref[0], np.sqrt(ref[0]) * norms, ref[2], np.sqrt(ref[2]) * norms])
    tol = 1e-6 if path == "foreach-accel" else 1e-13
    assert (np.abs(got - ref) / scale).max() <= tol
    # The same sums taken in the parameters' dtype are far off: the check has teeth.
    assert (np.abs(naive_sums(ws, w0, prev) - ref) / scale).max() > 1e-5


def test_foreach_groups_bound_temporaries_and_cover_every_layer(monkeypatch):
    # Groups of ~3000 elements (here [2000, 100, 4200] and [25, 81]) give the same sums as one.
    monkeypatch.setattr(torch_distances, "FOREACH_CHUNK", 3000)
    groups = []
    group = LayerDistances._foreach_group
    monkeypatch.setattr(
        LayerDistances, "_foreach_group", lambda self, idx, r: groups.append(list(idx)) or group(self, idx, r)
    )
    g = torch.Generator().manual_seed(1)
    w0 = [torch.randn(s, generator=g).to(torch.bfloat16) for s in [(40, 50), (10, 10), (60, 70), (5, 5), (9, 9)]]
    prev = [(a.float() + 0.1).to(torch.bfloat16) for a in w0]
    ws = [(b.float() * 1.01).to(torch.bfloat16) for b in prev]
    dist = distances(ws, w0, prev, "foreach")
    got = dist.measure(refresh_prev=True).numpy()
    assert groups == [[0, 1, 2], [3, 4]]
    np.testing.assert_allclose(
        got, reference_sums(ws, w0, [(a.float() + 0.1).to(torch.bfloat16) for a in w0]), rtol=1e-13
    )
    for w, b in zip(dist.params, dist.prev):
        assert torch.equal(w, b)


# ------------------------------------------------------------------ a real model


def gpt2(dtype: torch.dtype, seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    no_dropout = {"resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}
    config = GPT2Config(vocab_size=VOCAB, n_positions=SEQ, n_embd=32, n_layer=2, n_head=2, **no_dropout)
    return GPT2LMHeadModel(config).to(dtype)


def optimizer(name: str, model: torch.nn.Module, dtype: torch.dtype) -> torch.optim.Optimizer:
    if name == "sgd":
        return torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    # Adam's default eps (1e-8) is 0 in float16: the update would divide by zero.
    return torch.optim.Adam(model.parameters(), lr=3e-3, eps=1e-4 if dtype == torch.float16 else 1e-8)


def batches(n: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (4, SEQ), generator=g) for _ in range(n)]


def snap(params) -> list[np.ndarray]:
    return [p.detach().double().numpy().copy() for p in params]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("opt", ["sgd", "adam"])
@pytest.mark.parametrize("dtype", DTYPES, ids=["bf16", "fp16", "fp32", "fp64"])
def test_gpt2_every_step_and_layer_at_the_measurement_level(dtype, opt, path):
    model = gpt2(dtype)
    params = [p for p in model.parameters() if p.ndim >= 2]
    views = [p.detach() for p in params]
    w0, prev = [v.clone() for v in views], [v.clone() for v in views]
    dist = distances(views, w0, prev, path)
    init = np.array([np.linalg.norm(a) for a in snap(params)])
    ref0 = last = snap(params)
    o = optimizer(opt, model, dtype)
    worst = [0.0, 0.0]
    for t, ids in enumerate(batches(8)):
        model(input_ids=ids, labels=ids).loss.backward()
        o.step()
        o.zero_grad()
        # What the collector derives (core.rotation) from what the hook measured.
        wire = wire_rows(dist.measure(refresh_prev=True).numpy(), init, prev_is_w0=t == 0)
        rotation = rot.cosine_distance(rot.radial_angle(init, wire[1], wire[4]))
        step = rot.radial_angle(wire[3], wire[2], wire[5])
        now = snap(params)
        assert np.isfinite(now[0]).all(), "training diverged: the test's setup is wrong"
        for l in range(len(params)):
            want_rot, want_step = cosine_distance(ref0[l], now[l]), angle(last[l], now[l])
            if want_rot > 0:
                worst[0] = max(worst[0], abs(rotation[l] - want_rot) / want_rot)
            else:
                assert rotation[l] == 0
            if want_step > 0:
                worst[1] = max(worst[1], abs(step[l] - want_step) / want_step)
            else:
                assert step[l] == 0
        last = now
    print(f"{dtype} {opt} {path}: max relative error rotation {worst[0]:.1e}, step angle {worst[1]:.1e}")
    assert max(worst) <= TOL, worst
    if path != "foreach-accel" and not (path == "blocked" and dtype == torch.float32):
        assert max(worst) <= 1e-12  # float64 differences and sums (blocked float32: float32 blocks, ~1e-7)
    for p, b in zip(views, prev):
        assert torch.equal(p, b)


@pytest.mark.parametrize("opt", ["sgd", "adam"])
@pytest.mark.parametrize("dtype", HALF, ids=["bf16", "fp16"])
def test_gpt2_16bit_through_watch_and_the_collector(collector, dtype, opt):
    model = gpt2(dtype, seed=3)
    o = optimizer(opt, model, dtype)
    run = f"gpt2-{str(dtype).removeprefix('torch.')}-{opt}"
    handle = layrot.watch(model, o, run=run, collector=collector.grpc_address)
    w0 = {n: p.detach().double().clone() for n, p in model.named_parameters()}
    saved = {}
    for t, ids in enumerate(batches(6, seed=4), start=1):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        handle.observe_loss(loss)
        o.step()
        o.zero_grad()
        saved[t] = {n: p.detach().double().clone() for n, p in model.named_parameters()}
    assert handle.flush(10.0)
    handle.close()
    hist = check_history(collector.grpc_address, run, w0, saved, list(range(1, 7)), tol=TOL, tiny=0.0)
    assert "transformer.wte.weight" in hist.layer_names and len(hist.layer_names) >= 8
    assert np.isfinite(hist.loss).all()


@pytest.mark.slow  # two ranks and a collector on 2 cores: ~45 s
def test_fsdp_bfloat16_shards_give_exact_whole_layer_rotations(collector, tmp_path):
    # The FSDP path measures each rank's local shards with the same kernels (no arithmetic of
    # its own) and all-reduces the sums: bfloat16 shards must come out as exact as whole layers.
    import test_torch_shards as shards

    dtype = "bfloat16"
    run = f"fsdp-{dtype}"
    reports = shards.run_job(collector, tmp_path, run, dtype=dtype)
    w = shards.full_weights(reports)
    steps = list(range(1, shards.STEPS + 1))
    rot_ref, ang_ref = shards.reference(w, steps)
    assert (ang_ref > 0).all() and (rot_ref > 0).all(), "every step must move every layer"
    q = QueryClient(collector.grpc_address)
    for rank, rep in enumerate(reports):
        assert rep["flushed"] and rep["placements"] == ["(Shard(dim=0),)"] * len(shards.NAMES)
        hist = q.history(run, rank=rank)
        assert list(hist.steps) == steps
        worst = max(rel_err(hist.rotation, rot_ref).max(), rel_err(hist.step_angle, ang_ref).max())
        print(f"FSDP {dtype} rank {rank}: max relative error {worst:.1e}")
        assert worst <= TOL, (rank, worst)


# ------------------------------------------------------------------ the build


def test_a_stale_kernel_build_is_refused(tmp_path, monkeypatch, caplog):
    # A kernel built from the first _fused_report.c (no layrot_fused_abi: it reads any
    # non-float32 layer as float64) must not be used: the ATen path takes over, with a warning.
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler")
    src = tmp_path / "old.c"
    src.write_text("int layrot_fused_report(void) { return 0; }\n")
    lib = tmp_path / "old.so"
    subprocess.run([cc, "-shared", "-fPIC", "-o", str(lib), str(src)], check=True)
    ctypes.CDLL(str(lib))  # it loads; only the convention check can refuse it
    spec = importlib.util.spec_from_file_location("layrot.hooks._fused_report", lib)
    monkeypatch.setattr(torch_distances, "_FUSED", False)
    monkeypatch.setattr(torch_distances.importlib.util, "find_spec", lambda name: spec)
    with caplog.at_level("WARNING", logger="layrot.hooks.torch_distances"):
        assert torch_distances.fused_kernel() is None
    assert "reinstalling layrot rebuilds it" in caplog.text
    w = [torch.randn(4, 4).to(torch.bfloat16)]
    assert LayerDistances(w, [t.clone() for t in w], [t.clone() for t in w]).path == "blocked"


def test_the_installed_kernel_speaks_this_convention():
    lib = torch_distances.fused_kernel()
    assert lib is not None, "the fused kernel is not built (pyproject ext-modules)"
    assert lib.layrot_fused_abi() == torch_distances._FUSED_ABI
    w = [torch.randn(4, 4).to(dt) for dt in DTYPES]
    assert LayerDistances(w, [t.clone() for t in w], [t.clone() for t in w]).path == "fused"
