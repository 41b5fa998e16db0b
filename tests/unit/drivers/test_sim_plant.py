"""The simulated plant: determinism, faults and repair, predictive features, profiles, labels."""
from __future__ import annotations

import dataclasses
import doctest
import io

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from fedgate.drivers.sim import plant as plant_mod
from fedgate.drivers.sim.cli import CSV_COLUMNS, apply_overrides, dump_csv
from fedgate.drivers.sim.plant import FAULT_HEALTH, PROFILES, SIGNALS, Plant, Profile, fault_within


def _trace(profile: str, seed: int, n: int):
    return Plant([PROFILES[profile]], seed=seed).run(n)


def test_same_seed_same_trajectory_different_seed_differs():
    a, b, c = _trace("standard", 5, 3000), _trace("standard", 5, 3000), _trace("standard", 6, 3000)
    for name in list(SIGNALS) + ["energy_wh"]:
        np.testing.assert_array_equal(a.signals[name], b.signals[name])
    np.testing.assert_array_equal(a.fault, b.fault)
    assert not np.array_equal(a.signals["vibration_mm_s"], c.signals["vibration_mm_s"])


def test_batching_of_steps_does_not_change_the_trajectory():
    whole = Plant([PROFILES["heavy"]], seed=2)
    whole.step(1500)
    pieces = Plant([PROFILES["heavy"]], seed=2)
    for n in (1, 7, 500, 511, 1, 480):
        pieces.step(n)
    assert pieces.step_count == whole.step_count == 1500
    for name, v in whole.values.items():
        np.testing.assert_array_equal(v, pieces.values[name])
    np.testing.assert_array_equal(whole.health, pieces.health)


def test_a_machine_does_not_depend_on_its_neighbours():
    alone = Plant([PROFILES["standard"]], seed=9).run(2000)
    paired = Plant([PROFILES["standard"], PROFILES["heavy"]], seed=9).run(2000)
    np.testing.assert_array_equal(alone.signals["temperature_c"][:, 0], paired.signals["temperature_c"][:, 0])
    np.testing.assert_array_equal(alone.fault[:, 0], paired.fault[:, 0])


@pytest.mark.parametrize("profile", ["standard", "heavy", "light"])
def test_faults_occur_when_health_runs_low_and_clear_after_repair(profile):
    plant = Plant([PROFILES[profile]], seed=1)
    tr = plant.run(20000)
    f = tr.fault[:, 0]
    starts = np.flatnonzero(f[1:] & ~f[:-1]) + 1
    ends = np.flatnonzero(~f[1:] & f[:-1]) + 1
    assert len(starts) >= 3 and len(ends) >= 3, "faults must occur and clear"
    assert np.all(tr.health[starts, 0] < FAULT_HEALTH)
    assert np.all(tr.health[ends, 0] > 0.9), "repair resets health"
    assert plant.fault_count[0] == len(starts) + int(f[0])
    assert plant.maintenance_count[0] == len(ends)
    repair_steps = PROFILES[profile].repair_min * 60
    assert np.all(ends[: len(ends)] - starts[: len(ends)] <= repair_steps + 1)


def test_maintenance_request_resets_health_and_clears_the_fault():
    plant = Plant([PROFILES["heavy"]], seed=4)
    while not plant.fault[0]:
        plant.step()
    before = plant.maintenance_count[0]
    plant.request_maintenance(0)
    assert not plant.fault[0] and plant.health[0] == 1.0
    assert plant.maintenance_count[0] == before + 1
    plant.step(30)
    assert not plant.fault[0] and plant.health[0] > 0.95
    with pytest.raises(IndexError):
        plant.request_maintenance(1)


@pytest.mark.parametrize("profile", ["standard", "heavy", "light"])
def test_vibration_and_temperature_rise_before_faults(profile):
    horizon = 300
    tr = _trace(profile, 3, 20000)
    fault = tr.fault[:, 0]
    soon = fault_within(tr.fault, horizon)[:, 0]
    pre, normal = soon & ~fault, ~soon & ~fault
    vib = tr.signals["vibration_mm_s"][:, 0]
    temp = tr.signals["temperature_c"][:, 0]
    assert pre.sum() > 500 and normal.sum() > 5000
    assert vib[pre].mean() > 1.5 * vib[normal].mean()
    assert temp[pre].mean() > temp[normal].mean() + 2.0
    # a warning from vibration alone already separates "fault within 5 min" well
    assert roc_auc_score(soon[~fault], vib[~fault]) > 0.85


def test_new_line_holds_no_fault_in_its_first_part_then_faults_later():
    prof = PROFILES["new-line"]
    first = int(prof.fault_free_s)
    # eight machines = eight independent streams (seed, i), simulated side by side
    plant = Plant([prof] * 8, seed=0)
    tr = plant.run(first)
    assert not tr.fault.any(), "fault inside the fault-free part"
    assert not fault_within(tr.fault, 300).any()
    plant.step(int(prof.life_min * 60 * 1.3) - first)
    assert np.all(plant.fault_count >= 1), "a new line wears out eventually, like the others"


def test_sites_differ():
    means = {}
    for name in ("standard", "heavy", "light", "new-line"):
        tr = _trace(name, 0, 4000)
        means[name] = (tr.signals["temperature_c"].mean(), tr.signals["load_pct"].mean(), tr.signals["speed_rpm"].mean())
    temps = sorted(m[0] for m in means.values())
    assert min(np.diff(temps)) > 1.0, means
    assert means["heavy"][1] > means["standard"][1] > means["light"][1]
    assert means["light"][2] < 2000 < means["standard"][2]  # a 4-pole motor vs a 2-pole pump


def test_energy_counter_is_monotonic_and_matches_power():
    tr = _trace("standard", 8, 5000)
    e = tr.signals["energy_wh"][:, 0]
    assert np.all(np.diff(e) > 0)
    mean_kw = tr.signals["power_kw"][:, 0].mean()
    assert e[-1] == pytest.approx(mean_kw * 1000 * 5000 / 3600, rel=0.02)


def test_profile_validation_names_the_value():
    with pytest.raises(ValueError, match="load = 5"):
        Profile(name="bad", load=5)
    with pytest.raises(ValueError, match="initial_health"):
        dataclasses.replace(PROFILES["standard"], initial_health=0.1)
    with pytest.raises(ValueError):
        Plant([])
    with pytest.raises(ValueError):
        Plant([PROFILES["standard"]], dt_s=0)


def test_profile_overrides():
    (p,) = apply_overrides([PROFILES["new-line"]], ["life_min=60", "shocks_per_h= 2"])
    assert p.life_min == 60.0 and p.shocks_per_h == 2.0 and p.name == "new-line"
    fast = Plant([p], seed=0)
    fast.step(int(60 * 60 * 1.5))
    assert fast.fault_count[0] >= 1
    for bad in (["kind=pump"], ["life_min"], ["life_min=x"], ["life_min=-1"]):
        with pytest.raises(ValueError):
            apply_overrides([PROFILES["standard"]], bad)


def test_fault_within_matches_brute_force():
    rng = np.random.default_rng(0)
    fault = rng.random((300, 2)) < 0.05
    for h in (1, 3, 17):
        got = fault_within(fault, h)
        want = np.array([[fault[t + 1 : t + h + 1, m].any() for m in range(2)] for t in range(300)])
        np.testing.assert_array_equal(got, want)
    with pytest.raises(ValueError):
        fault_within(fault, 0)


def test_dump_csv_rows_and_labels():
    out = io.StringIO()
    rows = dump_csv(Plant([PROFILES["heavy"], PROFILES["standard"]], seed=1), 3000, 120.0, out, unit_id=5)
    lines = out.getvalue().splitlines()
    assert rows == 6000 and len(lines) == 6001
    assert lines[0].split(",") == CSV_COLUMNS
    recs = [line.split(",") for line in lines[1:]]
    assert {r[3] for r in recs} == {"5", "6"} and recs[0][0] == "1"
    col = CSV_COLUMNS.index
    m0 = [r for r in recs if r[2] == "0"]
    fault = np.array([int(r[col("fault")]) for r in m0], dtype=bool)
    soon = np.array([int(r[col("fault_within_horizon")]) for r in m0], dtype=bool)
    assert fault.any()
    # brute-force the look-ahead where the horizon lies inside the dump
    for t in range(0, len(m0) - 120):
        assert soon[t] == fault[t + 1 : t + 121].any()
    # the same plant, stepped by hand, gives the same numbers
    ref = Plant([PROFILES["heavy"], PROFILES["standard"]], seed=1)
    ref.step(1234)
    row = recs[2 * 1233 + 1]
    assert float(row[col("vibration_mm_s")]) == ref.values["vibration_mm_s"][1]
    assert float(row[col("health")]) == ref.health[1]


def test_docstring_examples_run():
    result = doctest.testmod(plant_mod)
    assert result.attempted >= 3 and result.failed == 0
