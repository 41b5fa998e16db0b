"""docs/configuration.md is generated from the config dataclasses; this keeps it complete.

Every key of agent.toml, server.toml and relay.toml is a field of a frozen config
dataclass (its TOML name, type, default, unit and bounds live there); descriptions come
from :data:`DESCRIPTIONS` below, else from the field's ``doc``, else from the comment next
to the key in ``deploy/*.toml``; examples from ``deploy/*.toml``, else :data:`EXAMPLES`.
Prose that belongs to a file or after a section's table lives in :data:`FILE_NOTES` and
:data:`SECTION_NOTES`. ``docs/configuration.md`` must equal :func:`render` exactly, so
edit this file, never the Markdown.

Regenerate after changing a config section::

    .venv/bin/python tests/integration/test_demo_configuration_docs.py --write
"""
from __future__ import annotations

import dataclasses
import enum
import json
import re
import sys
import types
import typing
from pathlib import Path
from typing import Any

import pytest

from fedgate.agent.config import AgentSection, FeatureConfig, LabelConfig, MetricsConfig, PredictConfig, SamplesConfig
from fedgate.agent.config import StoreConfig
from fedgate.agent.uplink import UplinkConfig
from fedgate.core.config import toml_key
from fedgate.core.errors import ConfigError
from fedgate.core.model import ModelSpec
from fedgate.drivers.config import LineDeviceConfig, LineTagConfig, ModbusDeviceConfig, ModbusTagConfig
from fedgate.drivers.config import TransportConfig
from fedgate.server.config import FederationSection, PrivacySection, ServerSection, StrategySection
from fedgate.server.relay import RelaySection, _RelayKeys, parse_relay_section

REPO = Path(__file__).resolve().parents[2]
DOC = REPO / "docs" / "configuration.md"

# (file, section as written in TOML, dataclass or dataclasses whose fields make the section, intro)
SECTIONS: list[tuple[str, str, type | tuple[type, ...], str]] = [
    ("agent.toml", "[agent]", AgentSection, "Who this gateway is and where it keeps its state."),
    ("agent.toml", "[uplink]", UplinkConfig,
     "The aggregation server and this agent's keys. Without `[uplink]` the agent samples, stores and predicts "
     "with its last model, offline."),
    ("agent.toml", "[[transports]]", TransportConfig,
     "One entry per physical link; every request on a link is serialised. TCP keys apply to `modbus-tcp`, "
     "serial keys to `modbus-rtu` and `serial-line`."),
    ("agent.toml", "[[devices]] (Modbus)", ModbusDeviceConfig, "A Modbus unit on a `modbus-tcp` or `modbus-rtu` transport."),
    ("agent.toml", "[[devices.tags]] (Modbus)", ModbusTagConfig,
     "One value read from a Modbus device; named `DEVICE.TAG` everywhere else in the file."),
    ("agent.toml", "[[devices]] (serial line)", LineDeviceConfig, "A sensor writing text lines on a `serial-line` transport."),
    ("agent.toml", "[[devices.tags]] (serial line)", LineTagConfig,
     "One value taken from a sensor's lines: `sentence` + `field` (nmea), `key` (kv), `column` (csv) or "
     "`group` (regex)."),
    ("agent.toml", "[samples]", SamplesConfig,
     "How tag values become training samples: a time grid, windows, aggregates."),
    ("agent.toml", "[samples] features = [{...}]", FeatureConfig,
     "One feature: a named aggregate of one tag over a window. The names are what the federation's "
     "`features` list refers to."),
    ("agent.toml", "[samples.label]", LabelConfig,
     "The target, aggregated over the look-ahead `(t, t + horizon]` of a window ending at `t`."),
    ("agent.toml", "[store]", StoreConfig, "How much local history the gateway keeps."),
    ("agent.toml", "[predict]", PredictConfig, "What happens with each live score of the global model."),
    ("agent.toml", "[metrics]", MetricsConfig, "The agent's Prometheus endpoint."),
    ("server.toml", "[server]", ServerSection, "Sockets, keys, storage and limits of the aggregation daemon."),
    ("server.toml", "[federation]", FederationSection,
     "The task every agent works on: ordered features, label, rounds, sampling, hyper-parameters, codec."),
    ("server.toml", "[federation.model]", ModelSpec, "The model every agent trains (`ModelSpec` fields)."),
    ("server.toml", "[strategy]", StrategySection, "How the server combines the updates of a round."),
    ("server.toml", "[privacy]", PrivacySection,
     "Differential privacy (DP-FedAvg): per-update clipping and Gaussian noise on the aggregate; off while "
     "`noise_multiplier = 0`."),
    # RelaySection: `name` (built from _RelayKeys) plus every UplinkConfig key, flat in [relay]
    ("relay.toml", "[relay]", (_RelayKeys, UplinkConfig),
     "The relay as an agent of headquarters: its name there and its uplink (the keys of the\n"
     "agent's `[uplink]`). Its results wait in `data_dir/relay.db` until headquarters commits\n"
     "their round."),
]

# Markdown printed after a file's `## FILE` heading, before its first section
FILE_NOTES: dict[str, str] = {
    "relay.toml": """\
A relay is `fedgate-server run` with a `server.toml` that has a `[relay]` section
(`deploy/relay.toml` is the complete, commented example; [deployment.md](deployment.md),
section 10, explains the tier). `[server]` and `[federation.model]` are as above. On a
relay:

- `[federation]` must name the same model, ordered `features` and `label` as
  headquarters'. The relay reads `name`, `features`, `label`, `min_agents`,
  `min_available`, `fraction` (its local quorum and sampling), `round_timeout` (the
  longest local round; a local round also keeps to 0.8 × the deadline of headquarters'
  task), `download_codec` (keep `"f32"`) and `seed`. `rounds` may be left out (it
  defaults to 0 on a relay); `rounds`, `statistics`, `evaluate`, `local_epochs`,
  `batch_size`, `lr`, `lr_schedule`, `l2`, `prox_mu`, `codec` and `codec_params` are not
  read: every task of headquarters carries what runs and how.
- `[strategy] name` is `fedavg` (default), `fedprox` (the same combination),
  `median`, `trimmed_mean`, `krum`, `multikrum` or `bulyan`; server optimizers
  (`fedavgm`, `fedadam`, `fedyogi`, `fedadagrad`) are a configuration error, since
  headquarters applies those.
- `[privacy]` with `noise_multiplier > 0` is a configuration error: noise is added
  once, at headquarters.""",
}

# Markdown printed after a section's table
SECTION_NOTES: dict[str, str] = {
    "[federation]": """\
**Paced rounds and reloads.** With `round_interval` a train round starts no sooner than
that long after the previous one started (`"1h"`: a round an hour, each on the samples
that came in meanwhile, while the agents predict with the newest model); a round that
took longer is followed at once. A restarted server takes the last start from its
history, so it keeps the pace. A federation that keeps learning sets a large `rounds`
with its interval. `systemctl reload` (SIGHUP) applies `rounds`, `round_interval`,
`round_timeout`, `min_agents`, `min_available`, `fraction`, `local_epochs`, `batch_size`,
`lr`, `lr_schedule`, `l2`, `prox_mu` and `evaluate` to the running federation from its
next round on (raise `rounds` to go on training a finished federation); the log names
them, and every other changed key, which waits for a restart. `round_interval` is a
configuration error in async mode and on a relay (a relay's rounds and their settings
come from headquarters, so a reload there applies none of these).

**Asynchronous mode** (`mode = "async"`, FedBuff-style; [protocol.md](protocol.md),
"Asynchronous rounds"). The statistics round runs as in sync mode. Then every ready
agent without a task gets one at once, and round r closes as soon as `buffer_size`
results are accepted, or at `round_timeout` with at least `min_agents`; an agent whose
result is accepted gets its next task right away, so fast sites contribute often and
a slow or intermittent site whenever it gets through. `fraction` and `min_available`
apply to the statistics round only. A result issued in round v and arriving in round r
has staleness r − v; above `max_staleness` it is refused, else weighted as above. Tasks
ask for deltas (`codec_params.delta = true` is added for every codec) and the server
adds its current model to each, so every strategy works unchanged. The default K is
`min_agents`: a round then closes with the quorum a sync round needs, and a small
federation never waits for results it cannot get. Configuration errors: `buffer_size`
below `min_agents`; DP (`[privacy] noise_multiplier > 0`), because the accountant
assumes agents sampled at a known rate each round, while an async round takes whoever
answers first; and `mode = "async"` on a relay, which runs the rounds its upstream sends.""",
}

# descriptions for keys that have neither a field doc nor a comment in deploy/*.toml
DESCRIPTIONS: dict[tuple[str, str], str] = {
    ("[agent]", "name"): "The agent's identity: letters, digits, `-`, `_`, `.`; its key files are `NAME.key` / "
                         "`NAME.key_secret` and the server's allow-list holds `NAME.key`.",
    ("[agent]", "data_dir"): "SQLite database (`agent.db`: samples, outbox, global model) and the state file.",
    ("[agent]", "log_level"): "`debug`, `info`, `warning` or `error`.",
    ("[uplink]", "server"): "The server's ROUTER endpoint, `tcp://HOST:PORT`.",
    ("[uplink]", "server_key"): "The server's public key file (`server.key`); required unless `insecure`.",
    ("[uplink]", "secret_key"): "This agent's secret key file (`NAME.key_secret`, mode 0600); required unless "
                                "`insecure`.",
    ("[uplink]", "insecure"): "No encryption and no authentication (labs only; warned at every start).",
    ("[uplink]", "heartbeat"): "Interval of application heartbeats.",
    ("[uplink]", "dead_after"): "Silence after which the server is taken for dead and the socket recreated; "
                                "default three heartbeats.",
    ("[uplink]", "hello_timeout"): "How long to wait for `welcome` after `hello` before trying again.",
    ("[uplink]", "reconnect_delay"): "First back-off after a lost link; doubles with jitter ...",
    ("[uplink]", "reconnect_delay_max"): "... up to this.",
    ("[uplink]", "max_message_size"): "Largest frame accepted from the server; a bigger one drops the link.",
    ("[[transports]]", "name"): "Referenced by `[[devices]] transport`.",
    ("[[transports]]", "kind"): "`modbus-tcp`, `modbus-rtu` or `serial-line`.",
    ("[[transports]]", "host"): "Modbus TCP: the PLC's address.",
    ("[[transports]]", "port"): "Modbus TCP: the port (default 502). Serial: a device path (`/dev/ttyUSB0`) or a "
                                "pyserial URL.",
    ("[[transports]]", "baudrate"): "Serial line speed.",
    ("[[transports]]", "bytesize"): "Serial data bits.",
    ("[[transports]]", "parity"): "Serial parity: `N`, `E`, `O`, `M`, `S`.",
    ("[[transports]]", "stopbits"): "Serial stop bits: 1, 1.5, 2.",
    ("[[transports]]", "timeout"): "Per request attempt.",
    ("[[transports]]", "retries"): "Further attempts of a failed request before it counts as an error.",
    ("[[transports]]", "reconnect_delay"): "First back-off after a lost connection (doubles, with jitter) ...",
    ("[[transports]]", "reconnect_delay_max"): "... up to this.",
    ("[[transports]]", "pause_between_requests"): "Silence between two requests on the link (slow RS485 devices).",
    ("[[devices]] (Modbus)", "name"): "Tags are named `DEVICE.TAG`.",
    ("[[devices]] (Modbus)", "transport"): "The `[[transports]]` entry it is reached through.",
    ("[[devices]] (Modbus)", "unit_id"): "Modbus unit (slave) id.",
    ("[[devices]] (Modbus)", "poll"): "Polling period.",
    ("[[devices]] (Modbus)", "byte_order"): "Default word/byte order of multi-register values: `ABCD` (big-endian), "
                                          "`CDAB` (word-swapped), `BADC` (byte-swapped), `DCBA` (little-endian).",
    ("[[devices]] (Modbus)", "address_base"): "0: addresses are wire addresses; 1: manual-style numbering from 1.",
    ("[[devices]] (Modbus)", "max_gap"): "Registers a request may read across to merge two tags (Telegraf's "
                                        "`max_insert`).",
    ("[[devices]] (Modbus)", "max_registers_per_request"): "Cap of one register request (125 by the standard).",
    ("[[devices]] (Modbus)", "max_bits_per_request"): "Cap of one coil/discrete request (2000 by the standard).",
    ("[[devices]] (Modbus)", "one_request_per_tag"): "Disable merging (for devices that refuse reads across "
                                                    "undefined registers).",
    ("[[devices]] (Modbus)", "busy_retries"): "Retries of a request answered with exception 6 (device busy).",
    ("[[devices]] (Modbus)", "busy_retries_wait"): "Wait before such a retry.",
    ("[[devices]] (Modbus)", "stale_after"): "Age after which a value turns stale; default three poll periods, "
                                            "at least 1 s.",
    ("[[devices.tags]] (Modbus)", "name"): "Tag name within the device.",
    ("[[devices.tags]] (Modbus)", "register"): "`coil`, `discrete`, `holding` or `input`.",
    ("[[devices.tags]] (Modbus)", "address"): "First register (or bit) address, per `address_base`.",
    ("[[devices.tags]] (Modbus)", "type"): "`bool` (coils, discrete inputs), `bit` (with `bit`), `int8l`, "
                                          "`int8h`, `uint8l`, `uint8h`, `int16`, `uint16`, `int32`, `uint32`, "
                                          "`int64`, `uint64`, `float16`, `float32`, `float64`, `string` (with "
                                          "`length`).",
    ("[[devices.tags]] (Modbus)", "bit"): "Bit 0..15 of the register, for `type = \"bit\"`.",
    ("[[devices.tags]] (Modbus)", "length"): "Registers of a `string`.",
    ("[[devices.tags]] (Modbus)", "byte_order"): "Overrides the device's `byte_order` for this tag.",
    ("[[devices.tags]] (Modbus)", "scale"): "value = raw x scale + offset.",
    ("[[devices.tags]] (Modbus)", "offset"): "value = raw x scale + offset.",
    ("[[devices.tags]] (Modbus)", "unit"): "Engineering unit (shown by `check`, exported with the value).",
    ("[[devices.tags]] (Modbus)", "min"): "Below it the value's quality is `bad_range` (its windows are skipped).",
    ("[[devices.tags]] (Modbus)", "max"): "Above it the value's quality is `bad_range`.",
    ("[[devices.tags]] (Modbus)", "writable"): "May be written (predictions, alarms): FC05/FC06/FC16 as fits.",
    ("[[devices]] (serial line)", "name"): "Tags are named `DEVICE.TAG`.",
    ("[[devices]] (serial line)", "transport"): "A `serial-line` transport.",
    ("[[devices]] (serial line)", "format"): "`nmea` (checksum verified), `kv`, `csv` or `regex`.",
    ("[[devices]] (serial line)", "terminator"): "End of a line.",
    ("[[devices]] (serial line)", "max_line_length"): "Longer lines are counted and dropped.",
    ("[[devices]] (serial line)", "request"): "Command sent every `poll` to request/response instruments; "
                                             "omit for sensors that stream.",
    ("[[devices]] (serial line)", "poll"): "Period of `request`.",
    ("[[devices]] (serial line)", "stale_after"): "Without a fresh line for this long the tags turn stale.",
    ("[[devices]] (serial line)", "delimiter"): "Field separator of `csv` lines.",
    ("[[devices]] (serial line)", "pattern"): "Regular expression of `regex` lines; tags take its groups.",
    ("[[devices]] (serial line)", "checksum"): "Verify NMEA checksums (`*HH`).",
    ("[[devices.tags]] (serial line)", "name"): "Tag name within the device.",
    ("[[devices.tags]] (serial line)", "sentence"): "NMEA: the sentence (e.g. `FGVIB` of `$FGVIB,...`).",
    ("[[devices.tags]] (serial line)", "field"): "NMEA: field number after the sentence name (1 = first).",
    ("[[devices.tags]] (serial line)", "key"): "KV: the key of `key=value`.",
    ("[[devices.tags]] (serial line)", "column"): "CSV: column, from 0.",
    ("[[devices.tags]] (serial line)", "group"): "Regex: group number or name.",
    ("[[devices.tags]] (serial line)", "type"): "`float64`, `int64`, `string` or `bool`.",
    ("[[devices.tags]] (serial line)", "scale"): "value = raw x scale + offset.",
    ("[[devices.tags]] (serial line)", "offset"): "value = raw x scale + offset.",
    ("[[devices.tags]] (serial line)", "unit"): "Engineering unit.",
    ("[[devices.tags]] (serial line)", "min"): "Below it the quality is `bad_range`.",
    ("[[devices.tags]] (serial line)", "max"): "Above it the quality is `bad_range`.",
    ("[samples]", "grid"): "Resampling period: each tag's latest value at every grid point.",
    ("[samples]", "window"): "Span of a feature window (a whole multiple of `grid`).",
    ("[samples]", "hop"): "One window ends on every multiple of `hop` (a whole multiple of `grid`).",
    ("[samples]", "min_coverage"): "Share of a window's grid points each feature tag must have, else the window is "
                                   "skipped (stale or bad values skip it too).",
    ("[samples]", "max_gap"): "A value is carried forward no further than this; older counts as missing.",
    ("[samples]", "delay"): "How long a grid point waits for late values; default one grid period.",
    ("[samples]", "features"): "The features, in any order (see the next table).",
    ("[samples]", "label"): "The `[samples.label]` table; without it samples are stored unlabelled.",
    ("[samples] features = [{...}]", "name"): "The feature's name in the federation's `features` list.",
    ("[samples] features = [{...}]", "tag"): "The tag, `DEVICE.TAG`.",
    ("[samples] features = [{...}]", "agg"): "`last`, `mean`, `min`, `max`, `std`, `rms`, `delta` (last - first) "
                                            "or `slope` (per second).",
    ("[samples.label]", "name"): "The federation's label name.",
    ("[samples.label]", "tag"): "The tag, `DEVICE.TAG`.",
    ("[samples.label]", "agg"): "Aggregate over the look-ahead (`max` of a fault flag: a fault at any point of it).",
    ("[samples.label]", "horizon"): "Look-ahead; a whole multiple of `grid`; `0s` labels the window itself.",
    ("[store]", "max_rows"): "Oldest samples beyond this are dropped (and counted).",
    ("[store]", "max_age"): "Samples older than this are dropped; unset: no age bound.",
    ("[predict]", "enabled"): "Score every new valid window with the current global model.",
    ("[predict]", "write_tag"): "A writable tag that receives each score; unset: the score is only exported.",
    ("[predict]", "alarm_threshold"): "Alarm raised when the score reaches this ...",
    ("[predict]", "alarm_tag"): "Optional writable coil that follows the alarm.",
    ("[predict]", "hysteresis"): "... and cleared below threshold - hysteresis.",
    ("[metrics]", "address"): "`HOST:PORT` of `/metrics`; `\"\"` disables it. Keep it on loopback.",
    ("[federation]", "label"): "The label name every agent learns.",
    ("[federation]", "batch_size"): "Mini-batch size of local training.",
    ("[federation]", "lr"): "Learning rate of local training.",
    ("[federation]", "lr_schedule"): "`constant` or `invscaling` (`lr / (t + 1) ** 0.25`).",
    ("[federation]", "l2"): "L2 penalty on weights in local training.",
    ("[federation]", "codec_params"): "Codec parameters, e.g. `{block = 256}` for q8, `{k = 0.01}` for topk, "
                                      "`{delta = true}` (any codec: agents send new − global; async tasks always "
                                      "set it).",
    ("[federation]", "mode"): "`sync`: rounds with a deadline and a quorum. `async`: buffered asynchronous "
                              "aggregation (below).",
    ("[federation]", "buffer_size"): "Async: results accepted per aggregation, K (0: `min_agents`; else at least "
                                     "`min_agents`).",
    ("[federation]", "max_staleness"): "Async: a result whose task is more than this many rounds old is refused "
                                       "(`stale`).",
    ("[federation]", "staleness_exponent"): "Async: a result weighs `n_samples * (1 + staleness) ** "
                                            "-staleness_exponent`.",
    ("[federation]", "concurrency"): "Async: at most this many agents training at a time (0: every ready agent).",
    ("[federation]", "local_epochs"): "Epochs over its stored samples each agent trains per round.",
    ("[federation.model]", "kind"): "`linear`, `logistic`, `softmax`, `mlp` or `autoencoder`.",
    ("[federation.model]", "n_features"): "Inputs; equals the length of `features`.",
    ("[federation.model]", "n_outputs"): "Outputs (classes for softmax; always n_features for an autoencoder).",
    ("[federation.model]", "hidden"): "Hidden layer sizes of `mlp`/`autoencoder` (one or two layers).",
    ("[federation.model]", "activation"): "`relu` or `tanh` (hidden layers).",
    ("[federation.model]", "loss"): "`squared` or `huber` (linear, regression MLP), `log` (classifiers); default "
                                    "by kind.",
    ("[strategy]", "server_lr"): "Server learning rate (fedavgm, fedadam, fedyogi, fedadagrad).",
    ("[strategy]", "momentum"): "Server momentum (fedavgm).",
    ("[strategy]", "beta1"): "First-moment decay (fedadam, fedyogi).",
    ("[strategy]", "beta2"): "Second-moment decay (fedadam, fedyogi, fedadagrad).",
    ("[strategy]", "tau"): "Adaptivity (fedadam, fedyogi, fedadagrad).",
    ("[privacy]", "noise_multiplier"): "Noise standard deviation as a multiple of `clip_norm` (z); 0 disables DP.",
    ("[server]", "metrics"): "`HOST:PORT` of the Prometheus endpoint; `\"\"` disables it. Keep it on loopback.",
    ("[server]", "log_level"): "`debug`, `info`, `warning` or `error`.",
    ("[federation]", "model"): "The `[federation.model]` table (below).",
    ("[strategy]", "name"): "The aggregation rule; robust rules (median, trimmed_mean, krum, multikrum, bulyan) "
                            "bound what a few Byzantine agents can do.",
    ("[[devices]] (Modbus)", "tags"): "The device's `[[devices.tags]]` entries (next table).",
    ("[[devices]] (serial line)", "tags"): "The device's `[[devices.tags]]` entries (next table).",
    ("[privacy]", "clip_norm"): "Each update's change is clipped to this L2 norm.",
    ("[privacy]", "delta"): "Epsilon is reported at this delta.",
    ("[relay]", "name"): "The relay's agent name at headquarters: the stem of its public key file in headquarters' "
                         "`agents_dir` (letters, digits, `-`, `_`, `.`).",
    ("[relay]", "server"): "Headquarters' ROUTER endpoint, `tcp://HOST:PORT`.",
    ("[relay]", "server_key"): "Headquarters' public key file; required unless `insecure`. Relative to the file's "
                               "directory.",
    ("[relay]", "secret_key"): "The relay's secret key file towards headquarters (mode 0600; may be the same pair "
                               "as `[server] secret_key`); required unless `insecure`.",
    ("[relay]", "insecure"): "No encryption and no authentication towards headquarters (labs only; warned at every "
                             "start).",
    ("[relay]", "heartbeat"): "Interval of heartbeats to headquarters.",
    ("[relay]", "dead_after"): "Silence after which headquarters is taken for dead and the link recreated; default "
                               "three heartbeats.",
    ("[relay]", "hello_timeout"): "How long to wait for `welcome` after `hello` before trying again.",
    ("[relay]", "reconnect_delay"): "First back-off after a lost link; doubles with jitter ...",
    ("[relay]", "reconnect_delay_max"): "... up to this.",
    ("[relay]", "max_message_size"): "Largest frame accepted from headquarters.",
}

EXAMPLES: dict[tuple[str, str], Any] = {
    ("[uplink]", "dead_after"): "15s",
    ("[uplink]", "hello_timeout"): "10s",
    ("[uplink]", "max_message_size"): "64MiB",
    ("[[transports]]", "bytesize"): 8,
    ("[[transports]]", "pause_between_requests"): "20ms",
    ("[[devices]] (Modbus)", "address_base"): 1,
    ("[[devices]] (Modbus)", "max_registers_per_request"): 100,
    ("[[devices]] (Modbus)", "max_bits_per_request"): 256,
    ("[[devices]] (Modbus)", "one_request_per_tag"): True,
    ("[[devices]] (Modbus)", "busy_retries"): 3,
    ("[[devices]] (Modbus)", "busy_retries_wait"): "200ms",
    ("[[devices]] (Modbus)", "stale_after"): "5s",
    ("[[devices.tags]] (Modbus)", "length"): 8,
    ("[[devices.tags]] (Modbus)", "offset"): -273.15,
    ("[[devices]] (serial line)", "request"): "R\r\n",
    ("[[devices]] (serial line)", "poll"): "1s",
    ("[[devices]] (serial line)", "delimiter"): ";",
    ("[[devices]] (serial line)", "pattern"): "T=(?P<temp>[-0-9.]+)",
    ("[[devices]] (serial line)", "checksum"): False,
    ("[[devices.tags]] (serial line)", "key"): "vib_rms",
    ("[[devices.tags]] (serial line)", "column"): 0,
    ("[[devices.tags]] (serial line)", "group"): "temp",
    ("[[devices.tags]] (serial line)", "type"): "float64",
    ("[[devices.tags]] (serial line)", "scale"): 0.1,
    ("[[devices.tags]] (serial line)", "offset"): 0.0,
    ("[[devices.tags]] (serial line)", "min"): 0.0,
    ("[[devices.tags]] (serial line)", "max"): 100.0,
    ("[samples]", "delay"): "1s",
    ("[federation.model]", "hidden"): [16],
    ("[federation.model]", "activation"): "relu",
    ("[federation.model]", "loss"): "log",
    # the async keys are commented out in deploy/server.toml (sync is the default)
    ("[federation]", "mode"): "async",
    ("[federation]", "buffer_size"): 10,
    ("[federation]", "max_staleness"): 8,
    ("[federation]", "staleness_exponent"): 0.5,
    ("[federation]", "concurrency"): 0,
}

_SECTION_PATH = {  # where a section's keys sit in the deploy templates
    "[agent]": ("agent",), "[uplink]": ("uplink",), "[[transports]]": ("transports",),
    "[[devices]] (Modbus)": ("devices",), "[[devices.tags]] (Modbus)": ("devices", "tags"),
    "[[devices]] (serial line)": ("devices",), "[[devices.tags]] (serial line)": ("devices", "tags"),
    "[samples]": ("samples",), "[samples] features = [{...}]": ("samples", "features"),
    "[samples.label]": ("samples", "label"), "[store]": ("store",), "[predict]": ("predict",),
    "[metrics]": ("metrics",), "[server]": ("server",), "[federation]": ("federation",),
    "[federation.model]": ("federation", "model"), "[strategy]": ("strategy",), "[privacy]": ("privacy",),
    "[relay]": ("relay",),
}
FILES = ("agent.toml", "server.toml", "relay.toml")  # each documented from its deploy/ template


# ------------------------------------------------------------------------ templates
def template_comments(path: Path) -> dict[tuple[str, ...], dict[str, str]]:
    """``{table path: {key: comment}}`` from a commented TOML file (comment above or after a key)."""
    out: dict[tuple[str, ...], dict[str, str]] = {}
    table: tuple[str, ...] = ()
    above: list[str] = []
    for raw in path.read_text().splitlines():
        line = raw.strip()
        head = re.match(r"^\[\[?([A-Za-z0-9_.]+)\]\]?", line)
        if head:
            table = tuple(head.group(1).split("."))
            above = []
            continue
        if line.startswith("#"):
            text = line.lstrip("#").strip()
            if text and not re.match(r"^-+", text):
                above.append(text)
            continue
        m = re.match(r"^([A-Za-z0-9_]+)\s*=\s*(.*)$", line)
        if not m:
            above = []
            continue
        key, rest = m.groups()
        trailing = ""
        if "#" in rest:  # a trailing comment outside strings (the templates quote no '#')
            trailing = rest.split("#", 1)[1].strip()
        text = trailing or " ".join(above)
        if text:
            out.setdefault(table, {}).setdefault(key, text)
        above = []
    return out


def template_values(path: Path) -> dict[str, Any]:
    from fedgate.core.config import load_toml

    return load_toml(str(path))


def _lookup(doc: Any, path: tuple[str, ...], key: str, section: str) -> Any:
    """The first value of ``key`` under ``path``, descending into arrays of tables.

    Serial-line and Modbus devices share ``[[devices]]``: a serial-line device has ``format``.
    """
    nodes = [doc]
    for depth, part in enumerate(path):
        nxt = []
        for node in nodes:
            if isinstance(node, dict) and part in node:
                value = node[part]
                nxt.extend(value if isinstance(value, list) else [value])
        if depth == 0 and part == "devices":
            serial = "(serial line)" in section
            nxt = [n for n in nxt if isinstance(n, dict) and ("format" in n) == serial]
        nodes = nxt
    for node in nodes:
        if isinstance(node, dict) and key in node:
            return node[key]
    return None


# ------------------------------------------------------------------------ rendering
def _type_name(tp: Any, unit: str | None) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        names = " or ".join(_type_name(a, unit) for a in inner)
        return names + (", optional" if len(inner) < len(args) else "")
    if unit == "duration":
        return "duration"
    if unit == "size":
        return "size"
    if origin is tuple:
        item = args[0] if args else Any
        if dataclasses.is_dataclass(item):
            return "array of tables"
        return f"array of {_type_name(item, None)}s"
    if dataclasses.is_dataclass(tp):
        return "table"
    if origin is dict or tp is dict:
        return "table"
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return "string"
    return {bool: "boolean", int: "integer", float: "number", str: "string"}.get(tp, getattr(tp, "__name__", str(tp)))


def _duration(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if seconds >= size and abs(seconds / size - round(seconds / size)) < 1e-9:
            return f"{round(seconds / size)}{unit}"
    return f"{round(seconds * 1000)}ms" if seconds else "0s"


def _size(n: int) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size and n % size == 0:
            return f"{n // size}{unit}"
    return str(n)


def _toml(value: Any) -> str:
    if isinstance(value, enum.Enum):
        value = value.value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {_toml(v)}" for k, v in value.items()) + "}"
    return repr(value) if isinstance(value, float) else str(value)


def default_text(f: dataclasses.Field) -> str:
    if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
        return "required"
    value = f.default if f.default is not dataclasses.MISSING else f.default_factory()
    if value is None:
        return "unset"
    unit = f.metadata.get("unit")
    if unit == "duration":
        return f"`\"{_duration(float(value))}\"`"
    if unit == "size":
        return f"`\"{_size(int(value))}\"`"
    if dataclasses.is_dataclass(value):
        return "defaults"
    return f"`{_toml(value)}`"


def bounds_text(f: dataclasses.Field) -> str:
    meta = f.metadata
    parts = []
    if meta.get("choices") is not None:
        parts.append(" / ".join(str(c.value if isinstance(c, enum.Enum) else c) for c in meta["choices"]))
    for name, op in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<")):
        if meta.get(name) is not None:
            bound = meta[name]
            if meta.get("unit") == "duration":
                parts.append(f"{op} {_duration(bound)}" if bound else f"{op} 0")
            elif float(bound).is_integer():
                parts.append(f"{op} {int(bound):,}")
            else:
                parts.append(f"{op} {bound:g}")
    return ", ".join(parts)


def fields_of(source: type | tuple[type, ...]) -> list[tuple[dataclasses.Field, Any]]:
    """``(field, type hint)`` of every TOML key of a section, in order (a tuple: its classes' keys in turn)."""
    out = []
    for cls in source if isinstance(source, tuple) else (source,):
        hints = typing.get_type_hints(cls)
        out += [(f, hints[f.name]) for f in dataclasses.fields(cls) if f.init and not f.name.startswith("_")
                and f.name not in ("file", "path")]
    return out


def render() -> str:
    comments = {name: template_comments(REPO / "deploy" / name) for name in FILES}
    values = {name: template_values(REPO / "deploy" / name) for name in FILES}
    out = [
        "# Configuration reference",
        "",
        "fedgate has two configuration files, both TOML: `agent.toml` on each gateway and",
        "`server.toml` at headquarters. `deploy/agent.toml` and `deploy/server.toml` are complete,",
        "commented examples; this page lists every key, generated from the configuration classes",
        "the daemons load (`tests/integration/test_demo_configuration_docs.py` regenerates it and",
        "fails when a key is missing here).",
        "",
        "- **Durations** are strings with a unit: `\"250ms\"`, `\"5s\"`, `\"2m\"`, `\"1h30m\"`, `\"30d\"`.",
        "- **Sizes** are strings or integers: `\"64MiB\"`, `\"512KiB\"`, `4096` (bytes).",
        "- **Relative paths** in `server.toml` are taken from the file's directory.",
        "- A **wrong key, type or value** stops the daemon with a message naming the file, the",
        "  dotted key and the value (`agent.toml: samples.window = '7s': must be a whole multiple",
        "  of grid (2s)`); unknown keys are errors too, so a typo never goes unnoticed. A running",
        "  agent given a broken file on `systemctl reload` keeps its old configuration.",
        "",
        "The agent also accepts a top-level `schema_version` (integer) in `agent.toml`, reserved for",
        "future format changes.",
        "",
    ]
    current_file = ""
    for file, section, cls, intro in SECTIONS:
        if file != current_file:
            current_file = file
            out += [f"## {file}", ""]
            if file in FILE_NOTES:
                out += [FILE_NOTES[file], ""]
        path = _SECTION_PATH[section]
        out += [f"### `{section}`", "", intro, "",
                "| key | type | default | allowed | description | example |",
                "|---|---|---|---|---|---|"]
        for f, hint in fields_of(cls):
            key = toml_key(f)
            desc = (DESCRIPTIONS.get((section, key)) or f.metadata.get("doc")
                    or comments[file].get(path, {}).get(key) or "")
            desc = desc[:1].upper() + desc[1:]
            example = _lookup(values[file], path, key, section)
            if example is None:
                example = EXAMPLES.get((section, key))
            tables = isinstance(example, dict) or (isinstance(example, list) and any(isinstance(e, dict)
                                                                                   for e in example))
            ex = "" if example is None or tables else f"`{key} = {_toml(example)}`"
            cells = [f"`{key}`", _type_name(hint, f.metadata.get("unit")), default_text(f),
                     bounds_text(f), desc.replace("|", "\\|"), ex.replace("|", "\\|")]
            out.append("| " + " | ".join(cells) + " |")
        out.append("")
        if section in SECTION_NOTES:
            out += [SECTION_NOTES[section], ""]
    return "\n".join(out)


# ------------------------------------------------------------------------ tests
def documented_keys(text: str) -> dict[str, dict[str, str]]:
    """``{section: {key: default cell}}`` parsed back from the Markdown."""
    found: dict[str, dict[str, str]] = {}
    section = None
    for line in text.splitlines():
        m = re.match(r"^### `(.+)`$", line)
        if m:
            section = m.group(1)
            found[section] = {}
            continue
        m = re.match(r"^\| `([A-Za-z0-9_]+)` \| [^|]* \| ([^|]*) \|", line)
        if m and section is not None:
            found[section][m.group(1)] = m.group(2).strip()
    return found


@pytest.mark.parametrize("section,cls", [(s, c) for _, s, c, _ in SECTIONS], ids=[s for _, s, _, _ in SECTIONS])
def test_every_config_key_is_documented_with_its_default(section: str, cls: type | tuple[type, ...]) -> None:
    documented = documented_keys(DOC.read_text(encoding="utf-8")).get(section)
    assert documented is not None, f"docs/configuration.md has no section {section}; regenerate it"
    want = {toml_key(f): default_text(f) for f, _ in fields_of(cls)}
    missing = sorted(set(want) - set(documented))
    assert not missing, f"{section}: keys missing from docs/configuration.md: {missing}; regenerate it"
    wrong = {k: (documented[k], v) for k, v in want.items() if documented[k] != v}
    assert not wrong, f"{section}: documented default differs (doc, code): {wrong}; regenerate it"
    stale = sorted(set(documented) - set(want))
    assert not stale, f"{section}: docs/configuration.md lists keys that no longer exist: {stale}"


def test_docs_equal_the_generated_reference() -> None:
    generated, written = render(), DOC.read_text(encoding="utf-8")
    if generated != written:
        first = next((i for i, (a, b) in enumerate(zip(generated.splitlines(), written.splitlines())) if a != b),
                     min(len(generated.splitlines()), len(written.splitlines())))
        pytest.fail(f"docs/configuration.md differs from render() (first at line {first + 1}); edit "
                    f"tests/integration/test_demo_configuration_docs.py, never the Markdown, and run "
                    f"`.venv/bin/python tests/integration/test_demo_configuration_docs.py --write`")


def test_relay_section_documents_exactly_the_keys_the_loader_accepts() -> None:
    """``[relay]`` is ``RelaySection``: ``name`` plus the uplink's keys, flat; the loader lists what it allows."""
    assert [f.name for f in dataclasses.fields(RelaySection)] == ["name", "uplink"]
    assert typing.get_type_hints(RelaySection)["uplink"] is UplinkConfig
    table = dict(template_values(REPO / "deploy" / "relay.toml")["relay"], not_a_key=1)
    with pytest.raises(ConfigError) as info:
        parse_relay_section(table, file="relay.toml", base_dir=str(REPO / "deploy"))
    assert info.value.key == "relay.not_a_key"
    allowed = set(re.search(r"allowed: ([^)]*)\)", str(info.value)).group(1).split(", "))
    documented = set(documented_keys(render())["[relay]"])
    assert documented == allowed


def test_every_key_has_a_description() -> None:
    rows = [line.split(" | ") for line in render().splitlines() if line.startswith("| `")]
    undescribed = [r[0].strip("| ") for r in rows if not r[4].strip()]
    assert not undescribed, f"keys without a description (add one to DESCRIPTIONS): {undescribed}"


if __name__ == "__main__":
    if "--write" in sys.argv:
        DOC.write_text(render(), encoding="utf-8")
        print(f"wrote {DOC}")
    else:
        sys.stdout.write(render())
