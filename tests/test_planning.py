"""Planning: Eq. 4-7 against brute force, privacy, ties, margin, interpolation, scenarios."""

import json

import numpy as np
import pytest
from click.testing import CliRunner

from dsc_export.artifacts import Manifest, ModelRef, Profile, Split, TensorSig, Timing
from dsc_export.cli import cli
from dsc_export.errors import UserError
from dsc_export.planning import (
    Candidate,
    choose_index,
    full_offload_ms,
    interpolate,
    latency_grid,
    make_plan,
    parse_scenario,
    read_plan,
    simulate,
)

SHA = "ab" * 32


def manifest(splits):
    """splits: list of (id, kind, bytes)."""
    sig = TensorSig(name="image", shape=["N", 8, 8, 3], dtype="uint8")
    return Manifest(model=ModelRef(path="model.onnx", sha256=SHA, input=sig,
                                   output=TensorSig(name="y", shape=["N", 10], dtype="float32"), input_bytes=192),
                    wire_dtype="float32", cut_points=[],
                    splits=[Split(id=i, kind=k, tensor=None if k != "split" else f"t_{i}",
                                  head=None if k == "offload" else "h.onnx", tail=None if k == "local" else "t.onnx",
                                  bytes=b, max_abs_diff=0.0)
                            for i, k, b in splits])


def profiles(head: dict, tail: dict):
    """head/tail: {split: {batch: ms}} -> (device, server) profiles."""
    dev = Profile("device", "onnxruntime", {}, None, SHA,
                  [Timing(split=s, part="head", batch=b, median_ms=ms, p10_ms=ms, p90_ms=ms, runs=5)
                   for s, d in head.items() for b, ms in d.items()])
    srv = Profile("server", "onnxruntime", {}, None, SHA,
                  [Timing(split=s, part="tail", batch=b, median_ms=ms, p10_ms=ms, p90_ms=ms, runs=5)
                   for s, d in tail.items() for b, ms in d.items()])
    return dev, srv


def random_setup(rng, n_splits=3, batches=(1, 2, 4, 8, 16)):
    ids = [f"cut{k:03d}" for k in range(n_splits)]
    splits = ([("offload", "offload", 150528)] + [(i, "split", int(rng.integers(1000, 150000))) for i in ids]
              + [("local", "local", 0)])
    head, tail = {"local": {}}, {"offload": {}}
    for b in batches:
        whole_dev, whole_srv = rng.uniform(20, 60) * b ** 0.9, rng.uniform(2, 8) * b ** 0.9
        head["local"][b], tail["offload"][b] = whole_dev, whole_srv
        for k, i in enumerate(ids):
            f = (k + 1) / (n_splits + 1)
            head.setdefault(i, {})[b] = whole_dev * f * rng.uniform(0.8, 1.2)
            tail.setdefault(i, {})[b] = whole_srv * (1 - f) * rng.uniform(0.8, 1.2)
    return manifest(splits), *profiles(head, tail)


def brute_force(man, dev, srv, b, r, rtt, privacy, q=0.0, slow=1.0):
    """Eq. 4 (with the server's wait q and slowdown) and Eq. 6 written out, from the profiles."""
    best, best_t = None, None
    for s in man.splits:
        if privacy and s.kind == "offload":
            continue
        h = dev.time_of(s.id, "head", b).median_ms if s.head else 0.0
        t = srv.time_of(s.id, "tail", b).median_ms if s.tail else 0.0
        sent = s.bytes if s.kind != "local" else 0
        total = h + slow * t + sent * b / (r * 1e6) * 1e3 + (rtt + q if sent else 0.0)
        if best_t is None or total <= best_t:  # later (more on the device) wins ties
            best, best_t = s.id, total
    return best, best_t


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("privacy", [False, True])
def test_table_matches_brute_force(seed, privacy):
    rng = np.random.default_rng(seed)
    man, dev, srv = random_setup(rng)
    rates = [0.5, 1, 3, 10, 30, 100, 300]
    rtt = float(rng.choice([0.0, 15.0]))
    plan = make_plan(man, dev, srv, batch_sizes=[1, 2, 4, 8, 16], rates=rates, rtt_ms=rtt, privacy=privacy)
    assert ("offload" in plan.candidates) is not privacy
    for i, b in enumerate(plan.batch_sizes):
        for j, r in enumerate(rates):
            want, t = brute_force(man, dev, srv, b, r, rtt, privacy)
            assert plan.choice[i][j] == want
            assert plan.latency_ms[want][i][j] == pytest.approx(t, rel=1e-6, abs=1e-3)
            got, pt = plan.choose(b, r)  # the run-time path agrees with the table on its cells
            assert got == want and pt == pytest.approx(t, rel=1e-9)


@pytest.mark.parametrize("seed", range(4))
def test_server_wait_and_slowdown_against_brute_force(seed):
    rng = np.random.default_rng(100 + seed)
    man, dev, srv = random_setup(rng)
    rates, batches = [0.5, 3, 30, 300], [1, 2, 4, 8, 16]
    plan = make_plan(man, dev, srv, batch_sizes=batches, rates=rates, rtt_ms=2.0)
    cands = [Candidate(c, t["batches"], t["head_ms"], t["tail_ms"], t["bytes"]) for c, t in plan.times.items()]
    for q, slow in [(0.0, 1.0), (float(rng.uniform(1, 50)), 1.0), (0.0, float(rng.uniform(1, 4))),
                    (float(rng.uniform(1, 200)), float(rng.uniform(1, 8)))]:
        grid = latency_grid(cands, batches, rates, rtt_ms=2.0, q_ms=q, s=slow)
        for i, b in enumerate(batches):
            for j, r in enumerate(rates):
                want, t = brute_force(man, dev, srv, b, r, 2.0, False, q, slow)
                got, pt = plan.choose(b, r, q_ms=q, s=slow)
                assert got == want and pt == pytest.approx(t, rel=1e-9)
                assert grid[plan.candidates.index(want), i, j] == pytest.approx(t, rel=1e-9)
                assert grid[:, i, j].min() == pytest.approx(t, rel=1e-9)


def test_choice_moves_to_the_device_as_the_server_waits_and_back():
    rng = np.random.default_rng(7)
    man, dev, srv = random_setup(rng)
    plan = make_plan(man, dev, srv, batch_sizes=[1, 2, 4, 8, 16], rates=[1, 1000])
    order = plan.candidates  # offload ... local: the index is how much stays on the device
    for b in (1, 4, 16):
        r = 1000.0  # a fast link: the idle server gets the work
        idle = plan.choose(b, r)[0]
        local_ms = dict(zip(order, plan.latencies(b, r)))["local"]
        assert idle != "local"
        # q adds the same to every candidate that sends: one step from the idle choice to local
        seen = [plan.choose(b, r, q_ms=q)[0] for q in np.linspace(0, 2 * local_ms, 60)]
        assert set(seen) == {idle, "local"} and seen == sorted(seen, key=order.index)
        # s scales the tails: the chosen tail never grows as the server slows, and local ends it
        tails = [plan.times[c]["tail_ms"][plan.times[c]["batches"].index(b)]
                 for c in (plan.choose(b, r, s=x)[0] for x in np.geomspace(1, 1000, 60))]
        assert tails == sorted(tails, reverse=True) and tails[-1] == 0.0
        assert plan.choose(b, r, q_ms=0.0, s=1.0)[0] == idle  # recovered: as before
    with pytest.raises(UserError, match="wait q must be >= 0"):
        plan.choose(1, 10.0, q_ms=-1.0)


def test_choose_between_grid_cells_is_exact_not_nearest():
    rng = np.random.default_rng(11)
    man, dev, srv = random_setup(rng)
    plan = make_plan(man, dev, srv, batch_sizes=[1, 2, 4, 8, 16], rates=[1, 100])
    for r in np.geomspace(1, 100, 37):
        for b in (1, 2, 4, 8, 16):
            want, t = brute_force(man, dev, srv, b, r, 0.0, False)
            got, pt = plan.choose(b, float(r))
            assert got == want and pt == pytest.approx(t)


def test_ties_go_to_the_split_that_keeps_more_on_the_device():
    man = manifest([("offload", "offload", 1000), ("cut001", "split", 500), ("local", "local", 0)])
    dev, srv = profiles({"cut001": {1: 5.0}, "local": {1: 10.0}}, {"offload": {1: 9.5}, "cut001": {1: 4.5}})
    # at 1 MB/s: offload 9.5 + 1 = 10.5 ms, cut001 5 + 0.5 + 4.5 = 10 ms, local 10 ms: a tie
    plan = make_plan(man, dev, srv, batch_sizes=[1], rates=[1.0, 4.0])
    assert plan.latency_ms["cut001"][0][0] == pytest.approx(plan.latency_ms["local"][0][0])
    assert plan.choice[0][0] == "local"
    assert plan.choice[0][1] == "cut001"  # 4 MB/s: cut001 9.625 beats local 10 and offload 9.75
    times = np.array([[[3.0]], [[3.0]], [[3.0]]])
    assert choose_index(times)[0, 0] == 2
    assert choose_index(np.array([[[2.9]], [[3.0]], [[3.04]]]), margin=0.05)[0, 0] == 2
    assert choose_index(np.array([[[2.0]], [[3.0]], [[3.05]]]), margin=0.05)[0, 0] == 0


def test_full_offloading_is_eq4_with_no_head_sending_the_input():
    man = manifest([("offload", "offload", 1000), ("local", "local", 0)])
    dev, srv = profiles({"local": {1: 10.0}}, {"offload": {1: 9.5}})
    plan = make_plan(man, dev, srv, batch_sizes=[1], rates=[1.0, 4.0], rtt_ms=0.5)
    assert full_offload_ms(9.5, 1000, 1, 1.0, rtt_ms=0.5) == pytest.approx(11.0)  # 9.5 + 1000 B / 1 MB/s + 0.5
    assert plan.latency_ms["offload"][0] == pytest.approx([full_offload_ms(9.5, 1000, 1, r, rtt_ms=0.5)
                                                           for r in (1.0, 4.0)])


def test_margin_keeps_the_current_split_at_run_time():
    man = manifest([("offload", "offload", 1000), ("local", "local", 0)])
    dev, srv = profiles({"local": {1: 10.0}}, {"offload": {1: 9.0}})
    plan = make_plan(man, dev, srv, batch_sizes=[1], rates=[1000.0], margin=0.2)
    assert plan.choose(1, 1000.0)[0] == "local"  # offload 9.001 is not 20 % faster than local 10
    plan0 = make_plan(man, dev, srv, batch_sizes=[1], rates=[1000.0])
    assert plan0.choose(1, 1000.0)[0] == "offload"
    assert plan0.choose(1, 1000.0, current="local")[0] == "offload"  # no margin: switch


def test_interpolation_is_linear_and_never_extrapolates():
    assert interpolate([1, 4, 8], [2.0, 8.0, 10.0], 2) == pytest.approx(4.0)
    assert interpolate([1, 4, 8], [2.0, 8.0, 10.0], 6) == pytest.approx(9.0)
    with pytest.raises(UserError, match="outside the profiled range 1-8"):
        interpolate([1, 4, 8], [2.0, 8.0, 10.0], 9)
    man = manifest([("offload", "offload", 100), ("local", "local", 0)])
    dev, srv = profiles({"local": {1: 10.0, 4: 40.0}}, {"offload": {1: 1.0, 4: 4.0}})
    plan = make_plan(man, dev, srv, batch_sizes=None, rates=[1.0])
    assert plan.batch_sizes == [1, 2, 3, 4]
    assert plan.latency_ms["local"][2][0] == pytest.approx(30.0)
    with pytest.raises(UserError, match="outside"):
        make_plan(man, dev, srv, batch_sizes=[1, 8], rates=[1.0])
    with pytest.raises(UserError, match="outside"):
        plan.choose(5, 1.0)


def test_eq7_gain_on_a_scenario_computed_by_hand():
    # offload: 1 ms server + 1000 B per sample; local: 10 ms per sample on the device
    man = manifest([("offload", "offload", 1000), ("local", "local", 0)])
    dev, srv = profiles({"local": {1: 10.0, 2: 20.0}}, {"offload": {1: 1.0, 2: 2.0}})
    plan = make_plan(man, dev, srv, batch_sizes=[1, 2], rates=[0.1, 1.0])
    steps = parse_scenario("batch,rate_MBps\n1,1.0\n2,0.1\n")
    # step 1: offload 1 + 1 = 2, local 10 -> dsc 2. step 2: offload 2 + 20 = 22, local 20 -> dsc 20
    res = simulate(plan, steps)
    assert [s["choice"] for s in res["steps"]] == ["offload", "local"]
    assert res["gain"]["local"] == pytest.approx(((10 - 2) / 10 + 0) / 2)
    assert res["gain"]["offload"] == pytest.approx((0 + (22 - 20) / 22) / 2)
    assert res["total_ms"]["dynamic"] == pytest.approx(22.0)
    # the same steps with a busy server: step 1 now waits 9 ms there (offload 11 > local 10)
    busy = simulate(plan, parse_scenario("batch,rate_MBps,q_ms,s\n1,1.0,9,1\n2,0.1,0,1.5\n"))
    assert [s["choice"] for s in busy["steps"]] == ["local", "local"]
    assert busy["steps"][0]["baseline_ms"]["offload"] == pytest.approx(1 + 1 + 9)
    assert busy["steps"][1]["baseline_ms"]["offload"] == pytest.approx(1.5 * 2 + 20)


def test_plan_round_trips_and_gains_are_recorded(tmp_path):
    man, dev, srv = random_setup(np.random.default_rng(3))
    plan = make_plan(man, dev, srv, batch_sizes=[1, 2, 4], rates=[1, 10, 100], rtt_ms=5.0)
    path = tmp_path / "plan.json"
    path.write_text(plan.to_json())
    d = json.loads(path.read_text())
    assert d["schema"] == "dsc-export.plan/1" and d["rtt_ms"] == 5.0
    assert set(d["gain"]) == {"local", "offload", "cut000", "cut001", "cut002"}
    again = read_plan(path)
    assert again.choose(2, 10.0) == plan.choose(2, 10.0)
    for g in plan.gain.values():
        grid = np.array(g["grid"])
        assert grid.min() >= 0 and g["mean"] == pytest.approx(grid.mean(), abs=1e-4)
    assert np.array(plan.gain["local"]["grid"]).max() > 0


@pytest.mark.parametrize("text,match", [
    (None, "does not exist"), ("{", "not a valid plan"),
    ('{"schema": "dsc-export.profile/1"}', "not a dsc-export.plan/1"),
    ('{"schema": "dsc-export.plan/1", "rtt_ms": 1}', "not a valid plan")])
def test_read_plan_refuses_in_one_line(tmp_path, text, match):
    path = tmp_path / "plan.json"
    if text is not None:
        path.write_text(text)
    with pytest.raises(UserError, match=match) as e:
        read_plan(path)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("text,match", [
    ("batch,rate\n1,2\n", "header"), ("batch,rate_MBps\n1,2\n0,3\n", "line 3"),
    ("batch,rate_MBps\n1,2\n2,x\n", "line 3"), ("# comment\nbatch,rate_MBps\n", "no steps"), ("", "empty"),
    ("batch,rate_MBps,s\n1,2,0.5\n", "line 2")])
def test_bad_scenarios_name_the_line(text, match):
    with pytest.raises(UserError, match=match):
        parse_scenario(text)


def test_bad_plan_inputs():
    man, dev, srv = random_setup(np.random.default_rng(4))
    with pytest.raises(UserError, match="unknown static split 'cut999'"):
        make_plan(man, dev, srv, batch_sizes=[1], rates=[1.0], static=["cut999"])
    with pytest.raises(UserError, match="positive"):
        make_plan(man, dev, srv, batch_sizes=[1], rates=[0.0])
    other = Profile("server", "onnxruntime", {}, None, "cd" * 32, srv.timings)
    with pytest.raises(UserError, match="different models"):
        make_plan(man, dev, other)
    missing = Profile("device", "onnxruntime", {}, None, SHA, [t for t in dev.timings if t.split != "cut001"])
    with pytest.raises(UserError, match="no time for cut001/head"):
        make_plan(man, missing, srv)


def test_latency_grid_formula():
    c = Candidate("cut", [1, 2], [1.0, 2.0], [3.0, 4.0], 2000)
    g = latency_grid([c], [1, 2], [1.0, 4.0], rtt_ms=7.0)
    # B=2, r=4 MB/s: compute 6 ms + 2*2000 B / 4e6 B/s = 1 ms + rtt 7 ms
    assert g[0, 1, 1] == pytest.approx(14.0)
    assert g[0, 0, 0] == pytest.approx(4.0 + 2.0 + 7.0)


def test_cli_plan_and_simulate(tmp_path):

    man, dev, srv = random_setup(np.random.default_rng(5), batches=(1, 2, 4))
    d = tmp_path / "split"
    d.mkdir()
    (d / "manifest.json").write_text(man.to_json())
    (tmp_path / "dev.json").write_text(dev.to_json())
    (tmp_path / "srv.json").write_text(srv.to_json())
    r = CliRunner().invoke(cli, ["plan", str(d), "--device", str(tmp_path / "dev.json"), "--server",
                                 str(tmp_path / "srv.json"), "--plots", str(tmp_path / "plots"), "--rate-steps", "16"])
    assert r.exit_code == 0, r.output
    assert "best split" in r.output and "mean gain" in r.output
    pngs = sorted(p.name for p in (tmp_path / "plots").iterdir())
    assert pngs[0] == "best-split.png" and pngs[1].startswith("gain-over-cut")
    assert all((tmp_path / "plots" / p).stat().st_size > 10_000 for p in pngs)
    (tmp_path / "s.csv").write_text("batch,rate_MBps\n1,2\n4,50\n2,0.5\n")
    r = CliRunner().invoke(cli, ["simulate", str(d / "plan.json"), str(tmp_path / "s.csv"), "--json"])
    assert r.exit_code == 0, r.output
    res = json.loads(r.output)
    assert len(res["steps"]) == 3 and "local" in res["gain"]
