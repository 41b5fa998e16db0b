"""The demo's answer to "was federation worth it?": held-out data and three models per site.

Held-out data is each site's own future: the same simulated machine (same profile and
seed, hence the same trajectory the agent polled) a few plant hours after the demo,
turned into samples by the agent's own :class:`~fedgate.agent.sampler.Sampler` with the
site's ``[samples]`` configuration, from the simulator's ground truth. No model ever saw
it. On it we score

- the **federated** model: the global model as the site's agent stored it;
- the site's **local-only** model: the same model kind and hyper-parameters, trained only
  on the samples the site's agent stored, for as many epochs as the federation ran rounds;
- a **centralized** model trained the same way on all sites' stored samples pooled (what
  federation avoids having to collect in one place).

A model "warned" of a fault when its score reached the alarm threshold on a window
ending within the label horizon before the fault began.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

from fedgate.agent.config import SamplesConfig
from fedgate.agent.demo_setup import SIGNAL_OF, Site
from fedgate.agent.evaluation import f1_score, roc_auc
from fedgate.agent.sampler import Sampler
from fedgate.agent.store import Store
from fedgate.core.model import Model, ModelSpec
from fedgate.drivers.sim.plant import PROFILES, Plant

__all__ = ["HeldOut", "SiteData", "SiteResult", "simulate", "held_out", "load_site", "compare", "format_table"]


@dataclass
class HeldOut:
    """A site's held-out samples: ``t_end_s`` plant seconds (n,), ``x`` (n, F) float64, ``y`` (n,)."""

    t_end_s: np.ndarray
    x: np.ndarray
    y: np.ndarray
    fault_onsets_s: np.ndarray  # plant seconds at which a fault began, inside the span
    span_s: tuple[float, float]


@dataclass
class SiteData:
    """What a site's agent stored: its samples and the global model it holds."""

    x: np.ndarray
    y: np.ndarray
    model: Any  # fedgate.agent.store.StoredModel | None

    @property
    def n_positive(self) -> int:
        return int(np.sum(self.y > 0.5))


@dataclass
class SiteResult:
    site: Site
    n_train: int
    n_train_positive: int
    n_test: int
    n_faults: int
    f1: dict[str, float] = field(default_factory=dict)
    auc: dict[str, float] = field(default_factory=dict)
    warned: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"site": self.site.name, "profile": self.site.profile, "link": self.site.link,
                "train_samples": self.n_train, "train_positive": self.n_train_positive,
                "test_samples": self.n_test, "test_faults": self.n_faults,
                "f1": _clean(self.f1), "auc": _clean(self.auc), "warned": dict(self.warned)}


def _clean(d: Mapping[str, float]) -> dict[str, float | None]:
    return {k: (None if v is None or not math.isfinite(v) else round(float(v), 4)) for k, v in d.items()}


# ------------------------------------------------------------------------ ground truth
def simulate(site: Site, until_s: float) -> Any:
    """The site's plant trajectory from its start to plant time ``until_s`` (a ``Trace``)."""
    plant = Plant([PROFILES[site.profile]], seed=site.seed)
    return plant.run(int(math.ceil(until_s / plant.dt_s)))


def held_out(site: Site, trace: Any, cfg: SamplesConfig, *, start_s: float, end_s: float,
             speed: float, poll_s: float) -> HeldOut:
    """Samples of plant time ``[start_s, end_s)`` built as the agent builds them.

    The agent's clock is real time: plant step ``k`` is shown at ``k / speed`` seconds
    and polled every ``poll_s``; the sampler works on those timestamps, so windows,
    slopes and the look-ahead horizon mean exactly what they mean on the gateway.
    """
    dt = float(trace.dt_s)
    stride = max(1, int(round(poll_s * speed / dt)))
    first = max(0, int((start_s - (cfg.window_s + cfg.grid_s) * speed) / dt))
    last = min(len(trace.step), int(end_s / dt))
    tags = {f.tag for f in cfg.features}
    if cfg.label is not None:
        tags.add(cfg.label.tag)
    columns = {}
    for tag in tags:
        key = tag.split(".", 1)[1]
        columns[tag] = trace.fault[:, 0].astype(np.float64) if key == "fault" else trace.signals[SIGNAL_OF[key]][:, 0]
    values = []
    for i in range(first, last, stride):
        ts = float(trace.step[i]) * dt / speed
        values.extend(SimpleNamespace(name=tag, value=float(col[i]), ts=ts, quality="good")
                      for tag, col in columns.items())
    sampler = Sampler(cfg, start_s=float(trace.step[first]) * dt / speed)
    samples = []
    chunk = 256 * cfg.grid_s  # advance in steps the sampler takes without skipping
    per_poll = len(columns)
    now = float(trace.step[first]) * dt / speed
    fed = 0
    end = float(trace.step[last - 1]) * dt / speed + cfg.grid_s + 1.0 + (cfg.label.horizon_s if cfg.label else 0)
    while now < end:
        now = min(end, now + chunk)
        upto = fed
        while upto < len(values) and values[upto].ts <= now:
            upto += per_poll
        sampler.feed(values[fed:upto])
        fed = upto
        samples.extend(sampler.advance(now)[1])
    t_end = np.array([s.t_end * speed for s in samples], dtype=np.float64)
    keep = (t_end >= start_s) & (t_end < end_s - (cfg.label.horizon_s * speed if cfg.label else 0.0))
    x = np.array([s.features for s in samples], dtype=np.float64).reshape(len(samples), len(cfg.features))[keep]
    y = np.array([s.label for s in samples], dtype=np.float64)[keep]
    f = trace.fault[:, 0].astype(np.int8)
    onset_idx = np.flatnonzero(np.diff(f) == 1) + 1
    onsets = trace.step[onset_idx].astype(np.float64) * dt
    horizon_s = cfg.label.horizon_s * speed if cfg.label else 0.0
    onsets = onsets[(onsets >= start_s + horizon_s) & (onsets < end_s - horizon_s)]
    return HeldOut(t_end_s=t_end[keep], x=x, y=y, fault_onsets_s=onsets, span_s=(start_s, end_s))


# ------------------------------------------------------------------------ the agents' stores
def load_site(db_path: Path, features: Sequence[str]) -> SiteData:
    """Labelled samples and the global model from a (stopped or running) agent's database."""
    if not Path(db_path).exists():
        return SiteData(np.zeros((0, len(features))), np.zeros(0), None)
    store = Store(db_path)
    try:
        data = store.load_samples(list(features))
        model = store.load_model()
    finally:
        store.close()
    return SiteData(data.x.astype(np.float64), data.y.astype(np.float64), model)


# ------------------------------------------------------------------------ models
def _scaler(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and standard deviation per feature, as the federation's statistics round computes
    them (population std; a constant feature gets std 1 so it scales to 0)."""
    mean = x.mean(axis=0)
    std = x.std(axis=0)
    std[std < 1e-8] = 1.0
    return mean, std


@dataclass
class Scored:
    """A trained model and its scaler; ``None`` model = it never saw a sample (scores 0)."""

    model: Model | None
    mean: np.ndarray | None = None
    std: np.ndarray | None = None
    constant: float = 0.0  # the score without a model

    def proba(self, x: np.ndarray) -> np.ndarray:
        if self.model is None or x.shape[0] == 0:
            return np.full(x.shape[0], self.constant)
        xs = (x - self.mean) / self.std
        return self.model.predict_proba(xs)[:, -1].astype(np.float64)


def train_like_federation(x: np.ndarray, y: np.ndarray, spec: Mapping[str, Any], hyper: Mapping[str, Any],
                          rounds: int, seed: int = 0) -> Scored:
    """The federation's model kind and hyper-parameters, ``rounds`` x ``local_epochs`` epochs on ``x``."""
    if x.shape[0] == 0:
        return Scored(None)
    mean, std = _scaler(x)
    model = Model(ModelSpec.from_dict(spec), seed=seed)
    xs = (x - mean) / std
    for _ in range(max(1, rounds)):
        model.fit(xs, y, epochs=int(hyper.get("local_epochs", 1)), batch_size=int(hyper.get("batch_size", 32)),
                  lr=float(hyper.get("lr", 0.01)), lr_schedule=str(hyper.get("lr_schedule", "constant")),
                  l2=float(hyper.get("l2", 0.0)))
    return Scored(model, mean, std)


def federated(stored: Any) -> Scored:
    """The global model an agent stored (``StoredModel``), or an empty one."""
    if stored is None:
        return Scored(None)
    model = Model(ModelSpec.from_dict(stored.spec), seed=0)
    model.params = stored.params
    scaler = stored.scaler or {}
    n = model.spec.n_features
    mean = np.asarray(scaler.get("mean", np.zeros(n)), dtype=np.float64)
    std = np.asarray(scaler.get("std", np.ones(n)), dtype=np.float64)
    return Scored(model, mean, std)


def _warned(ho: HeldOut, p: np.ndarray, threshold: float, horizon_s: float) -> int:
    n = 0
    for onset in ho.fault_onsets_s:
        near = (ho.t_end_s >= onset - horizon_s) & (ho.t_end_s < onset)
        if np.any(p[near] >= threshold):
            n += 1
    return n


def compare(sites: Sequence[Site], data: Mapping[str, SiteData], tests: Mapping[str, HeldOut], *,
            spec: Mapping[str, Any], hyper: Mapping[str, Any], rounds: int, threshold: float,
            horizon_s: float) -> list[SiteResult]:
    """Federated vs local-only vs centralized on every site's held-out data."""
    pooled_x = np.vstack([data[s.name].x for s in sites])
    pooled_y = np.concatenate([data[s.name].y for s in sites])
    central = train_like_federation(pooled_x, pooled_y, spec, hyper, rounds)
    results = []
    for site in sites:
        d, ho = data[site.name], tests[site.name]
        # a site whose history holds one class only has nothing to learn a warning from:
        # its local-only "model" can only ever answer that class
        one_class = d.n_positive in (0, d.x.shape[0])
        local = (Scored(None, constant=float(d.n_positive > 0)) if one_class
                 else train_like_federation(d.x, d.y, spec, hyper, rounds))
        models = {"federated": federated(d.model), "local": local, "central": central}
        res = SiteResult(site, d.x.shape[0], d.n_positive, ho.y.shape[0], len(ho.fault_onsets_s))
        yt = (ho.y > 0.5).astype(np.int64)
        for name, m in models.items():
            p = m.proba(ho.x)
            res.f1[name] = f1_score(yt, (p >= threshold).astype(np.int64))
            res.auc[name] = roc_auc(yt, p)
            res.warned[name] = _warned(ho, p, threshold, horizon_s)
        res.f1["no_fault"] = 0.0  # "always no fault" warns of nothing: F1 0 whenever a fault exists
        results.append(res)
    return results


# ------------------------------------------------------------------------ the table
def _f(v: float | None) -> str:
    return "   -" if v is None or not math.isfinite(v) else f"{v:4.2f}"


def format_table(results: Sequence[SiteResult], span_h: tuple[float, float], horizon_min: float) -> str:
    """The final table, as printed."""
    out = [
        "Was federation worth it?",
        f"Held-out data: plant hours {span_h[0]:g} to {span_h[1]:g} of each site, its own future (simulator "
        "ground truth,",
        f"never trained on). Label: a fault within the next {horizon_min:g} plant minutes; alarm when p >= 0.5.",
        "",
        f"{'':<48}{'F1 of the warning':^26}   {'faults warned ahead':^26}",
        f"{'site':<7} {'profile':<9} {'link':<19} {'history':>8}  "
        f"{'federated':>9} {'local':>7} {'central':>8}   {'federated':>9} {'local':>7} {'central':>8}",
    ]
    rule = "-" * len(out[-1])
    out.append(rule)
    for r in results:
        out.append(
            f"{r.site.name:<7} {r.site.profile:<9} {r.site.link_text:<19} {r.n_train:>4}/{r.n_train_positive:<3}  "
            f"{_f(r.f1['federated']):>9} {_f(r.f1['local']):>7} {_f(r.f1['central']):>8}   " + _warn_cells(r))
    out.append(rule)
    mean = {k: float(np.mean([r.f1[k] for r in results])) for k in ("federated", "local", "central")}
    faults = sum(r.n_faults for r in results)
    total = {k: sum(r.warned[k] for r in results) for k in ("federated", "local", "central")}
    out.append(f"{'all sites (mean F1, faults warned)':<48}{_f(mean['federated']):>9} {_f(mean['local']):>7} "
               f"{_f(mean['central']):>8}   {total['federated']:>6}/{faults:<2} {total['local']:>4}/{faults:<2} "
               f"{total['central']:>5}/{faults:<2}")
    trivial = 'always "no fault" (trivial baseline)'
    out.append(f"{trivial:<48}{_f(0.0):>9} {'':>7} {'':>8}   {0:>6}/{faults:<2}")
    out.append("")
    out.append("history: labelled samples the site's agent stored / of them with a fault ahead. federated: the global "
               "model;")
    out.append("local: trained on the site's own history only; central: trained on all sites' histories pooled.")
    for r in results:
        if r.n_train_positive == 0 and r.n_faults:
            out.append("")
            out.append(
                f"{r.site.name} ({r.site.profile}) had no fault in its own history, so a local-only model has "
                f"nothing to learn a warning from:\nit warned of {r.warned['local']} of the site's {r.n_faults} "
                f"coming fault(s). The federated model, which learned from the other sites without\nseeing their "
                f"data, warned of {r.warned['federated']}.")
    return "\n".join(line.rstrip() for line in out)


def _warn_cells(r: SiteResult) -> str:
    n = r.n_faults
    return (f"{r.warned['federated']:>6}/{n:<2} {r.warned['local']:>4}/{n:<2} {r.warned['central']:>5}/{n:<2}")
