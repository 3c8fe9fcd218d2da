"""Profiles: schema, the timing harness, emulation labels, refusals, GPU clock locking."""

import json
import time

import onnx
import pytest
from click.testing import CliRunner
from graphs import ALL

from dsc_export import profiling
from dsc_export.artifacts import Profile, Timing, check_pair, read_profile
from dsc_export.cli import cli
from dsc_export.engines import build_engines
from dsc_export.errors import UserError
from dsc_export.profiling import Measurement, locked_gpu_clocks, measure, profile_split_dir
from dsc_export.splitting import split_model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A split dir of a small residual graph with onnxruntime engines at batch 1 and 2."""
    d = tmp_path_factory.mktemp("tiny")
    onnx.save(ALL["residual"]()[0], d / "m.onnx")
    split_model(d / "m.onnx", d / "split", at=None)
    build_engines(d / "split", "onnxruntime", batch_sizes=[1, 2], parts="all")
    return d / "split"


def _profile(**kw):
    base = dict(role="device", backend="onnxruntime", host={"cpu": "x", "cores": 2, "threads": 1},
                emulation=None, model_sha256="ab" * 32,
                timings=[Timing(split="local", part="head", batch=1, median_ms=2.0, p10_ms=1.5, p90_ms=2.5, runs=20),
                         Timing(split="cut001", part="head", batch=4, median_ms=1.0, p10_ms=0.9, p90_ms=1.2, runs=20)])
    base.update(kw)
    return Profile(**base)


def test_profile_round_trips(tmp_path):
    p = _profile(emulation={"slowdown": 4.0})
    path = tmp_path / "p.json"
    path.write_text(p.to_json())
    assert json.loads(path.read_text())["schema"] == "dsc-export.profile/1"
    q = read_profile(path)
    assert q == p and q.time_of("cut001", "head", 4).median_ms == 1.0 and q.batches() == [1, 4]


@pytest.mark.parametrize("edit,match", [({"schema": "dsc-export.profile/9"}, "not a dsc-export.profile/1"),
                                        ({"role": "edge"}, "role"),
                                        ({"timings": [{"split": "x"}]}, "not a valid profile")])
def test_bad_profiles_are_refused(tmp_path, edit, match):
    d = json.loads(_profile().to_json())
    d.update(edit)
    (tmp_path / "p.json").write_text(json.dumps(d))
    with pytest.raises(UserError, match=match):
        read_profile(tmp_path / "p.json")


def test_profiles_of_different_models_or_wrong_roles_are_refused():
    dev, srv = _profile(), _profile(role="server")
    check_pair(dev, srv)
    with pytest.raises(UserError, match="different models"):
        check_pair(dev, _profile(role="server", model_sha256="cd" * 32))
    with pytest.raises(UserError, match="--role server"):
        check_pair(srv, srv)


def test_harness_discards_warmup_and_reports_quantiles():
    values = iter([100.0, 100.0] + [float(v) for v in range(1, 11)])  # two slow warm-up runs
    m = measure(lambda: next(values), warmup=2, repeats=10)
    assert m.samples_ms == [float(v) for v in range(1, 11)]
    assert m.median == 5.5 and m.quantile(0.1) == pytest.approx(1.9) and m.quantile(0.9) == pytest.approx(9.1)


def test_harness_measures_a_known_duration():
    def sleep_20ms():
        t = time.perf_counter()
        time.sleep(0.02)
        return (time.perf_counter() - t) * 1e3

    m = measure(sleep_20ms, warmup=1, repeats=9)
    assert 19.5 <= m.median <= 26.0, m.median
    m = measure(sleep_20ms, warmup=0, repeats=None, min_time_s=0.2)
    assert 5 <= len(m.samples_ms) <= 11 and sum(m.samples_ms) >= 200


def test_profile_of_a_split_dir_and_emulation_labels(tiny, monkeypatch):
    plain = profile_split_dir(tiny, "device", repeats=3, warmup=1)
    assert plain.emulation is None if plain.host["cores"] == plain.host["threads"] else plain.emulation
    heads = {(t.split, t.batch) for t in plain.timings}
    assert ("local", 1) in heads and ("local", 2) in heads and all(t.part == "head" for t in plain.timings)
    assert all(0 < t.p10_ms <= t.median_ms <= t.p90_ms for t in plain.timings)
    server = profile_split_dir(tiny, "server", repeats=3, warmup=1)
    assert {t.split for t in server.timings} >= {"offload"} and all(t.part == "tail" for t in server.timings)
    check_pair(plain, server)

    monkeypatch.setattr(profiling, "measure", lambda *a, **k: Measurement([1.0, 2.0, 3.0]))
    slow = profile_split_dir(tiny, "device", batch_sizes=[1], slowdown=4, threads=1)
    assert slow.emulation["slowdown"] == 4.0
    if slow.host["cores"] > 1:
        assert slow.emulation["threads"] == 1
    assert all(t.median_ms == 8.0 for t in slow.timings)  # 2.0 measured x 4


def test_missing_engines_say_what_to_build(tiny):
    with pytest.raises(UserError, match=r"dsc-export build .* --parts heads --batch-sizes 8"):
        profile_split_dir(tiny, "device", batch_sizes=[8])


def test_cli_bench_writes_a_profile(tiny, tmp_path):
    out = tmp_path / "dev.json"
    r = CliRunner().invoke(cli, ["bench", str(tiny), "--role", "device", "--repeats", "3", "--threads", "1",
                                 "-o", str(out)])
    assert r.exit_code == 0, r.output
    p = read_profile(out)
    assert p.role == "device" and p.host["threads"] == 1 and "wrote" in r.output and "median ms" in r.output


class FakeNVML:
    def __init__(self, fail_set=False):
        self.calls, self.fail_set = [], fail_set

    def nvmlInit(self):
        self.calls.append("init")

    def nvmlShutdown(self):
        self.calls.append("shutdown")

    def nvmlDeviceGetHandleByIndex(self, i):
        return i

    def nvmlDeviceGetName(self, h):
        return b"Fake GPU"

    def nvmlDeviceSetGpuLockedClocks(self, h, lo, hi):
        if self.fail_set:
            raise RuntimeError("Insufficient Permissions")
        self.calls.append(("lock", lo, hi))

    def nvmlDeviceResetGpuLockedClocks(self, h):
        self.calls.append("reset")


def test_gpu_clocks_are_restored_even_on_error(monkeypatch):
    monkeypatch.setattr(profiling.os, "geteuid", lambda: 0)
    monkeypatch.setattr(profiling, "_is_jetson", lambda: False)
    nvml = FakeNVML()
    with pytest.raises(ZeroDivisionError):
        with locked_gpu_clocks(300, nvml=nvml) as emu:
            assert emu == {"gpu_clock_mhz": 300, "gpu": "Fake GPU"}
            raise ZeroDivisionError("a failure while the clocks are locked")
    assert nvml.calls == ["init", ("lock", 300, 300), "reset", "shutdown"]
    refused = FakeNVML(fail_set=True)
    with pytest.raises(UserError, match="refused"):
        with locked_gpu_clocks(300, nvml=refused):
            pass
    assert "reset" not in refused.calls and refused.calls[-1] == "shutdown"


def test_gpu_clock_locking_is_refused_without_root_or_on_jetson(monkeypatch):
    monkeypatch.setattr(profiling, "_is_jetson", lambda: False)
    monkeypatch.setattr(profiling.os, "geteuid", lambda: 1000)
    with pytest.raises(UserError, match="root"):
        with locked_gpu_clocks(300, nvml=FakeNVML()):
            pass
    monkeypatch.setattr(profiling, "_is_jetson", lambda: True)
    with pytest.raises(UserError, match="nvpmodel"):
        with locked_gpu_clocks(300, nvml=FakeNVML()):
            pass


def test_rounds_split_the_repeats_and_pool_the_samples(tiny, monkeypatch):
    calls = []

    def fake(run_once, warmup, repeats, min_time_s):
        calls.append((warmup, repeats))
        return Measurement([float(len(calls))] * repeats)

    monkeypatch.setattr(profiling, "measure", fake)
    p = profile_split_dir(tiny, "device", batch_sizes=[1], repeats=6, warmup=3, rounds=3)
    n = len(p.timings)
    assert len(calls) == 3 * n and all(r == 2 for _, r in calls)
    assert [w for w, _ in calls[:n]] == [3] * n and all(w == 1 for w, _ in calls[n:])  # warm-up once in full
    t = p.timings[0]
    assert t.runs == 6 and t.median_ms == 1 + n  # samples of rounds 1, 2, 3 pooled: values 1, 1+n, 1+2n
    assert p.settings["rounds"] == 3


def test_scaled_profile_is_labelled():
    p = _profile(emulation={"threads": 1, "of_cores": 2}).scaled(4)
    assert p.emulation == {"threads": 1, "of_cores": 2, "slowdown": 4.0}
    assert [t.median_ms for t in p.timings] == [8.0, 4.0] and p.timings[0].p90_ms == 10.0


def test_bench_options_are_keyword_only_and_checked():
    from dsc_export.profiling import BenchOptions

    with pytest.raises(TypeError):
        BenchOptions("onnxruntime")  # keyword-only, as PyTriton's TritonConfig
    with pytest.raises(UserError, match="--slowdown must be a positive factor"):
        BenchOptions(slowdown=0)
    with pytest.raises(UserError, match="--threads must be at least 1"):
        BenchOptions(threads=0)
