"""The simulated plant: machines that wear out, fault, get repaired, and show it coming.

Each machine (an induction motor driving a pump) carries a hidden *health* in
[0, 1]. Health decays with load (faster at high load) plus random shocks; when it
falls below :data:`FAULT_HEALTH` the machine's fault becomes active, and it
clears when the machine is maintained (health reset): either the crew repairs it
``repair_min`` after the fault, or a maintenance request (the Modbus coil) resets
it at once. As health drops the measured signals drift the way worn bearings and
impellers do: vibration and temperature rise, current and power rise (friction),
discharge pressure sags. These drifts start well before the fault, so a model
can learn to warn ahead of it.

A :class:`Profile` sets a machine's operating point (load, ambient temperature),
wear rate, shock rate and sensor noise, so sites differ (non-IID). The
``new-line`` profile is a freshly commissioned line that wears slowly and sees
no shocks: its first :attr:`Profile.fault_free_s` seconds hold no fault at all.

The model is vectorised over machines and fully deterministic: every machine
draws from its own generator seeded by ``(seed, machine index)``, always the same
number of draws per step, so a machine's trajectory depends only on the seed,
its index, its profile and the number of steps (and on maintenance requests,
which consume no randomness).

>>> plant = Plant([PROFILES["standard"]], seed=7)
>>> plant.step(600)
>>> plant.step_count, plant.time_s
(600, 600.0)
>>> bool(plant.values["energy_wh"][0] > 0)
True
"""
from __future__ import annotations

import dataclasses
import enum
import math
from collections.abc import Sequence

import numpy as np

__all__ = [
    "FAULT_HEALTH",
    "SIGNALS",
    "MachineKind",
    "Profile",
    "PROFILES",
    "Plant",
    "Trace",
    "fault_within",
]

#: health below which a machine's fault is active
FAULT_HEALTH = 0.15

#: measured signals, in the order of the register map, with their units
SIGNALS: dict[str, str] = {
    "temperature_c": "degC",
    "vibration_mm_s": "mm/s",
    "current_a": "A",
    "power_kw": "kW",
    "speed_rpm": "rpm",
    "pressure_bar": "bar",
    "load_pct": "%",
}

_BLOCK = 512  # random draws are made per machine in blocks of this many steps
_N_NORMAL = 8
_N_UNIFORM = 3


class MachineKind(str, enum.Enum):
    """What the machine drives; sets its nominal ratings."""

    MOTOR = "motor"  # a conveyor/fan motor: pressure is the lube-oil pressure
    PUMP = "pump"  # a centrifugal pump: pressure is the discharge pressure


_RATINGS = {
    # rated kW, rated rpm, rated pressure (bar), base vibration (mm/s)
    MachineKind.MOTOR: (11.0, 1470.0, 2.5, 1.2),
    MachineKind.PUMP: (15.0, 2950.0, 6.0, 1.8),
}


@dataclasses.dataclass(frozen=True, kw_only=True)
class Profile:
    """A machine's operating profile (times are plant time).

    Parameters
    ----------
    name : str
        Profile name (``--profile``).
    kind : MachineKind
        Motor or pump.
    load : float
        Mean load as a fraction of rating (0.2 .. 1.2).
    load_swing : float
        Relative amplitude of the shift-pattern load cycle.
    load_cycle_min : float
        Period of the load cycle in minutes.
    ambient_c : float
        Ambient temperature.
    life_min : float
        Mean time from new to fault at load 0.75, without shocks, in minutes.
    shocks_per_h : float
        Mean rate of random shocks (impacts, cavitation bursts, overloads).
    shock_size : float
        Mean health lost per shock.
    noise : float
        Sensor noise multiplier (1 = typical industrial sensors).
    repair_min : float
        Minutes from a fault until the crew's repair resets health.
    initial_health : float
        Health at start (a line commissioned yesterday starts at 1).
    fault_free_s : float
        Plant time from start that is guaranteed (by test) to hold no fault; 0 if none.
    """

    name: str
    kind: MachineKind = MachineKind.PUMP
    load: float = 0.75
    load_swing: float = 0.15
    load_cycle_min: float = 20.0
    ambient_c: float = 25.0
    life_min: float = 45.0
    shocks_per_h: float = 1.0
    shock_size: float = 0.08
    noise: float = 1.0
    repair_min: float = 3.0
    initial_health: float = 0.9
    fault_free_s: float = 0.0

    def __post_init__(self) -> None:
        checks = {
            "load": 0.2 <= self.load <= 1.2,
            "load_swing": 0.0 <= self.load_swing < 1.0,
            "load_cycle_min": self.load_cycle_min > 0,
            "life_min": self.life_min > 0,
            "shocks_per_h": self.shocks_per_h >= 0,
            "shock_size": 0 <= self.shock_size <= 1,
            "noise": self.noise >= 0,
            "repair_min": self.repair_min >= 0,
            "initial_health": FAULT_HEALTH < self.initial_health <= 1.0,
        }
        for key, ok in checks.items():
            if not ok:
                raise ValueError(f"profile {self.name!r}: {key} = {getattr(self, key)!r} is out of range")


#: the built-in profiles (``fedgate-sim --profile NAME``)
PROFILES: dict[str, Profile] = {
    p.name: p
    for p in (
        Profile(name="standard"),
        Profile(
            name="heavy", load=0.95, load_swing=0.1, ambient_c=35.0, life_min=35.0,
            shocks_per_h=2.0, shock_size=0.1, noise=1.3, initial_health=0.8,
        ),
        Profile(
            name="light", kind=MachineKind.MOTOR, load=0.5, load_swing=0.25, ambient_c=15.0,
            life_min=60.0, shocks_per_h=0.5, noise=0.7, repair_min=5.0,
        ),
        Profile(
            name="new-line", load=0.7, load_swing=0.15, ambient_c=22.0, life_min=480.0,
            shocks_per_h=0.0, noise=0.8, initial_health=1.0, fault_free_s=21600.0,
        ),
    )
}


class Plant:
    """A set of machines stepping in plant time.

    Parameters
    ----------
    profiles : Profile or sequence of Profile
        One profile per machine.
    seed : int
        Plant seed; machine ``i`` draws from ``SeedSequence([seed, i])``.
    dt_s : float
        Plant seconds per step.

    Attributes
    ----------
    values : dict[str, ndarray]
        Latest measured signals, each shape ``(n_machines,)`` float64: the
        :data:`SIGNALS` plus ``energy_wh`` (monotonic counter).
    health : ndarray, shape (n_machines,), float64
        Hidden ground-truth health.
    fault : ndarray, shape (n_machines,), bool
        Fault active.
    fault_count, maintenance_count : ndarray, shape (n_machines,), int64
        Faults so far; maintenances (repairs and requests) so far.
    """

    def __init__(self, profiles: Profile | Sequence[Profile], seed: int = 0, *, dt_s: float = 1.0) -> None:
        profs = [profiles] if isinstance(profiles, Profile) else list(profiles)
        if not profs:
            raise ValueError("a plant needs at least one machine profile")
        if not dt_s > 0:
            raise ValueError(f"dt_s = {dt_s!r} must be > 0")
        self.profiles: tuple[Profile, ...] = tuple(profs)
        self.seed = int(seed)
        self.dt_s = float(dt_s)
        n = self.n_machines = len(profs)
        self.step_count = 0

        def col(fn) -> np.ndarray:
            return np.array([fn(p) for p in profs], dtype=np.float64)

        ratings = np.array([_RATINGS[MachineKind(p.kind)] for p in profs], dtype=np.float64)
        self._rated_kw, self._rated_rpm, self._rated_bar, self._vib_base = ratings.T.copy()
        self._load = col(lambda p: p.load)
        self._swing = col(lambda p: p.load_swing)
        self._omega = col(lambda p: 2 * math.pi / (p.load_cycle_min * 60.0))
        self._ambient = col(lambda p: p.ambient_c)
        # health lost per second at load 0.75 so that new -> fault takes life_min
        self._wear_rate = col(lambda p: (1.0 - FAULT_HEALTH) / (p.life_min * 60.0))
        self._shock_p = col(lambda p: p.shocks_per_h / 3600.0) * self.dt_s
        self._shock_size = col(lambda p: p.shock_size)
        self._noise = col(lambda p: p.noise)
        self._repair_s = col(lambda p: p.repair_min * 60.0)
        # rated current at 400 V, pf 0.85, efficiency 0.9
        self._rated_a = self._rated_kw / (math.sqrt(3) * 0.4 * 0.85 * 0.9)

        self._rngs = [np.random.Generator(np.random.PCG64(np.random.SeedSequence([self.seed, i]))) for i in range(n)]
        self._blk: dict[str, np.ndarray] = {}
        self._pos = _BLOCK
        self._spike_decay = math.exp(-self.dt_s / 30.0)
        self._temp_alpha = 1.0 - math.exp(-self.dt_s / 180.0)
        self._slip_per_w2 = 0.01 * self._rated_rpm
        # the phase of each machine's load cycle is its first draw
        self._phase = np.array([2 * math.pi * r.random() for r in self._rngs])

        self.health = col(lambda p: p.initial_health)
        self.fault = np.zeros(n, dtype=bool)
        self.fault_count = np.zeros(n, dtype=np.int64)
        self.maintenance_count = np.zeros(n, dtype=np.int64)
        self._repair_left = np.zeros(n)
        self._load_ar = np.zeros(n)
        self._spike = np.zeros(n)
        self._temp = self._ambient + 40.0 * self._load**1.3  # start warm, at steady state
        self._energy_wh = np.zeros(n)
        self.values: dict[str, np.ndarray] = {name: np.zeros(n) for name in SIGNALS}
        self.values["energy_wh"] = self._energy_wh.copy()

    # ------------------------------------------------------------------ time
    @property
    def time_s(self) -> float:
        """Plant time in seconds (``step_count * dt_s``)."""
        return self.step_count * self.dt_s

    def request_maintenance(self, machine: int) -> None:
        """Maintain machine ``machine`` now: health back to 1, fault cleared."""
        if not 0 <= machine < self.n_machines:
            raise IndexError(f"machine {machine} not in 0..{self.n_machines - 1}")
        self.health[machine] = 1.0
        self.fault[machine] = False
        self._repair_left[machine] = 0.0
        self.maintenance_count[machine] += 1

    def _refill(self) -> None:
        """Draw the next block of randomness and precompute everything health does not change.

        Load, wear drift, shocks, sensor noise and the parts of each signal that depend
        on load only are computed here for ``_BLOCK`` steps at once, arrays of shape
        ``(_BLOCK, n_machines)``; :meth:`_step_once` then only runs the recursions
        through health. Both :meth:`step` and :meth:`run` go through here, so served
        values and recorded traces are bit-identical.
        """
        n, dt = self.n_machines, self.dt_s
        z = np.empty((_N_NORMAL, _BLOCK, n))
        u = np.empty((_N_UNIFORM, _BLOCK, n))
        for i, rng in enumerate(self._rngs):
            z[:, :, i] = rng.standard_normal((_BLOCK, _N_NORMAL)).T
            u[:, :, i] = rng.random((_BLOCK, _N_UNIFORM)).T
        # slow AR(1) load disturbance: a short recursion, vectorised over machines
        phi = math.exp(-dt / 120.0)
        gain = math.sqrt(1.0 - phi * phi)
        ar = np.empty((_BLOCK, n))
        x = self._load_ar
        for k in range(_BLOCK):
            x = phi * x + gain * z[0, k]
            ar[k] = x
        self._load_ar = x
        t = (self.step_count + 1 + np.arange(_BLOCK))[:, None] * dt
        load = self._load * (1.0 + self._swing * np.sin(self._omega * t + self._phase)) + 0.04 * ar
        load = np.clip(load, 0.2, 1.2)
        shock = u[0] < self._shock_p
        drift = self._wear_rate * (load / 0.75) ** 1.5 * np.clip(1.0 + 0.5 * z[1], 0.0, 2.0) * dt
        nz = self._noise
        pf = 0.6 + 0.25 * np.minimum(load, 1.0)
        self._blk = {
            "loss": drift + np.where(shock, self._shock_size * (0.5 + u[1]), 0.0),
            "spike_in": np.where(shock, 2.5, 0.0),
            "repair_health": 0.95 + 0.05 * u[2],
            "current": self._rated_a * (0.3 + 0.7 * load),
            "power_per_a": math.sqrt(3) * 0.4 * pf,
            "speed": self._rated_rpm * (1.0 - 0.03 * load),
            "pressure": self._rated_bar * (1.15 - 0.3 * load),
            "temp_target": self._ambient + 40.0 * load**1.3,
            "vib": self._vib_base * (0.6 + 0.4 * load),
            "load_pct": 100.0 * load,
            "temp_noise": 0.15 * nz * z[2],
            "vib_mult": np.exp(0.06 * nz * z[3]),
            "current_mult": 1.0 + 0.005 * nz * z[4],
            "power_mult": 1.0 + 0.005 * nz * z[5],
            "speed_noise": 1.5 * nz * z[6],
            "pressure_noise": 0.03 * nz * z[7],
        }
        self._pos = 0

    def step(self, n: int = 1) -> None:
        """Advance ``n`` steps of ``dt_s`` plant seconds each."""
        for _ in range(int(n)):
            self._step_once()

    def _step_once(self) -> None:
        if self._pos == _BLOCK:
            self._refill()
        k = self._pos
        self._pos += 1
        b = self._blk
        dt = self.dt_s
        self.step_count += 1

        # wear (a machine in fault is stopped for repair and does not wear further)
        running = ~self.fault
        self.health = np.maximum(self.health - b["loss"][k] * running, 0.0)
        self._spike = self._spike * self._spike_decay + b["spike_in"][k]

        # faults latch when health runs low; the crew repairs them after repair_s
        new_fault = running & (self.health < FAULT_HEALTH)
        if new_fault.any():
            self.fault |= new_fault
            self.fault_count += new_fault
            self._repair_left = np.where(new_fault, self._repair_s, self._repair_left)
        if self.fault.any():
            self._repair_left = np.where(self.fault, self._repair_left - dt, self._repair_left)
            done = self.fault & (self._repair_left <= 0.0)
            if done.any():
                self.health = np.where(done, b["repair_health"][k], self.health)
                self.fault &= ~done
                self.maintenance_count += done

        # physics of a worn machine
        wear = 1.0 - self.health
        w2 = wear * wear
        current = b["current"][k] * (1.0 + 0.2 * w2)
        power = b["power_per_a"][k] * current
        self._temp += (b["temp_target"][k] + 30.0 * w2 - self._temp) * self._temp_alpha
        vib = b["vib"][k] + (6.0 * wear + 1.5) * w2 + self._spike
        self._energy_wh += power * (1000.0 * dt / 3600.0)

        v = self.values
        v["temperature_c"] = self._temp + b["temp_noise"][k]
        v["vibration_mm_s"] = vib * b["vib_mult"][k]
        v["current_a"] = current * b["current_mult"][k]
        v["power_kw"] = power * b["power_mult"][k]
        v["speed_rpm"] = b["speed"][k] - self._slip_per_w2 * w2 + b["speed_noise"][k]
        v["pressure_bar"] = np.maximum(b["pressure"][k] * (1.0 - 0.25 * w2) + b["pressure_noise"][k], 0.0)
        v["load_pct"] = b["load_pct"][k]
        v["energy_wh"] = self._energy_wh.copy()

    # ------------------------------------------------------------------ traces
    def run(self, n_steps: int) -> Trace:
        """Step ``n_steps`` times, recording every step.

        Returns
        -------
        Trace
            Arrays of shape ``(n_steps, n_machines)``.
        """
        n_steps = int(n_steps)
        cols = list(SIGNALS) + ["energy_wh"]
        rec = {c: np.empty((n_steps, self.n_machines)) for c in cols}
        health = np.empty((n_steps, self.n_machines))
        fault = np.empty((n_steps, self.n_machines), dtype=bool)
        step = np.empty(n_steps, dtype=np.int64)
        for k in range(n_steps):
            self._step_once()
            for c in cols:
                rec[c][k] = self.values[c]
            health[k] = self.health
            fault[k] = self.fault
            step[k] = self.step_count
        return Trace(step=step, dt_s=self.dt_s, signals=rec, health=health, fault=fault)


@dataclasses.dataclass(frozen=True)
class Trace:
    """A recorded stretch of plant time.

    Attributes
    ----------
    step : ndarray, shape (n_steps,), int64
        Step count after each step (1-based from the plant's start).
    dt_s : float
        Plant seconds per step.
    signals : dict[str, ndarray]
        Each ``(n_steps, n_machines)`` float64.
    health : ndarray, shape (n_steps, n_machines), float64
    fault : ndarray, shape (n_steps, n_machines), bool
    """

    step: np.ndarray
    dt_s: float
    signals: dict[str, np.ndarray]
    health: np.ndarray
    fault: np.ndarray


def fault_within(fault: np.ndarray, horizon_steps: int) -> np.ndarray:
    """Look-ahead labels: is a fault active at any step in ``(t, t + horizon]``?

    Parameters
    ----------
    fault : ndarray, shape (n_steps, n_machines), bool
    horizon_steps : int
        Look-ahead in steps (>= 1). Rows whose horizon runs past the end only see
        the steps that exist.

    Returns
    -------
    ndarray, shape (n_steps, n_machines), bool

    >>> fault_within(np.array([[0], [0], [1], [0]], dtype=bool), 1).ravel().tolist()
    [False, True, False, False]
    """
    if horizon_steps < 1:
        raise ValueError(f"horizon_steps = {horizon_steps!r} must be >= 1")
    f = np.asarray(fault, dtype=np.int64)
    n = f.shape[0]
    c = np.concatenate([np.zeros((1,) + f.shape[1:], dtype=np.int64), np.cumsum(f, axis=0)])
    idx = np.arange(n)
    hi = np.minimum(idx + horizon_steps + 1, n)
    return (c[hi] - c[idx + 1]) > 0
