"""benchmarks/bench_wire.py's bookkeeping: which recorded results a run carries, where it writes
its own, and how it splits an end-to-end phase's time into Eq. 4's terms."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from dsc_export.serving.client import BatchLog

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture()
def bench(tmp_path, monkeypatch):
    """bench_wire imported from benchmarks/, its results folder and out/ under ``tmp_path``."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location("bench_wire_under_test", ROOT / "benchmarks" / "bench_wire.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    import common

    monkeypatch.setattr(mod, "ROOT", tmp_path)
    monkeypatch.setattr(mod, "OUT", tmp_path / "out")
    monkeypatch.setattr(common, "OUT", tmp_path / "out")
    (tmp_path / "benchmarks" / "results").mkdir(parents=True)
    yield mod
    sys.modules.pop("bench_wire_under_test", None)


def _record(tmp_path, name: str, results: dict) -> None:
    path = tmp_path / "benchmarks" / "results" / name
    path.write_text(json.dumps({"results": results}))


def test_earlier_results_take_each_model_from_its_newest_run_and_keep_where_it_was_measured(bench, tmp_path):
    _record(tmp_path, "wire-2026-12-03.json", {"efficientnet_lite0": {"v": "lite0 of 12-03"},
                                               "efficientnet_b0": {"v": "b0 of 12-03"}})
    # the B0 run of 12-04 carried Lite0 from 12-03; a later run that day measured Lite0 again
    _record(tmp_path, "wire-2026-12-04.json", {"efficientnet_b0": {"v": "b0 of 12-04"},
                                               "efficientnet_lite0": {"v": "lite0 of 12-03",
                                                                      "from": "wire-2026-12-03.json"}})
    _record(tmp_path, "wire-2026-12-04-2.json", {"efficientnet_lite0": {"v": "lite0 of 12-04, 2nd run"}})
    got = bench.earlier_results(["efficientnet_lite0", "efficientnet_b0"])
    assert got == {"efficientnet_lite0": {"v": "lite0 of 12-04, 2nd run", "from": "wire-2026-12-04-2.json"},
                   "efficientnet_b0": {"v": "b0 of 12-04", "from": "wire-2026-12-04.json"}}
    # a carried entry names the file it was measured in, not the one that carried it
    _record(tmp_path, "wire-2026-12-05.json", {"efficientnet_b0": {"v": "b0 of 12-04",
                                                                   "from": "wire-2026-12-04.json"}})
    assert bench.earlier_results(["efficientnet_b0"])["efficientnet_b0"]["from"] == "wire-2026-12-04.json"


def test_a_run_of_one_model_keeps_the_other_models_recorded_results(bench, tmp_path, monkeypatch):
    """What main does for ``--models efficientnet_lite0`` on the day B0 was recorded: its writes
    (one per model done, then the last) never replace the file B0's results are in, and the
    results it writes carry B0 from it."""
    import time

    today = time.strftime("%Y-%m-%d")
    b0 = {"weights": "random", "forms": [], "plans": {}}
    _record(tmp_path, f"wire-{today}.json", {"efficientnet_b0": b0})
    before = (tmp_path / "benchmarks" / "results" / f"wire-{today}.json").read_text()
    import common

    monkeypatch.setattr(common, "machine", lambda: {})
    args = SimpleNamespace(models="efficientnet_lite0")
    earlier = bench.earlier_results(["efficientnet_b0"])
    args.dated = common.new_result(tmp_path / "benchmarks" / "results", f"wire-{today}")  # as main picks it
    lite0 = {"efficientnet_lite0": {"weights": "trained", "forms": [], "plans": {}}}
    bench._write(lite0, [], args)  # Lite0 done: written before the carried results are added
    bench._write({**lite0, **earlier}, [], args)
    assert (tmp_path / "benchmarks" / "results" / f"wire-{today}.json").read_text() == before
    mine = json.loads((tmp_path / "benchmarks" / "results" / f"wire-{today}-2.json").read_text())
    assert mine["results"]["efficientnet_b0"] == {**b0, "from": f"wire-{today}.json"}
    assert json.loads((tmp_path / "out" / "wire.json").read_text())["results"] == mine["results"]
    # and the next run still finds B0 where it was measured
    assert bench.earlier_results(["efficientnet_b0"])["efficientnet_b0"]["from"] == f"wire-{today}.json"


class _Plan:
    """A plan's surface that :func:`terms` uses, with Eq. 4 written out by hand."""

    rtt_ms = 2.0
    candidates = ["offload", "cut1", "local"]
    parts = {"offload": (0.0, 100.0), "cut1": (200.0, 50.0), "local": (400.0, 0.0)}
    nbytes = {"offload": 150_000, "cut1": 10_000, "local": 0}

    def parts_ms(self, split, batch):
        return self.parts[split]

    def choose(self, batch, rate, current, exclude):
        (split,) = set(self.candidates) - exclude
        h, t = self.parts[split]
        sends = split != "local"
        return split, h + batch * self.nbytes[split] / (rate * 1e3) + sends * self.rtt_ms + t


def _log(split, measured, head, wire, server, nbytes, batch=8):
    return BatchLog(0, batch, split, split, nbytes, None, None, 0.0, measured, head, wire, server)


def test_terms_split_a_phase_into_eq4s_terms_measured_against_predicted(bench):
    plan = _Plan()
    # two batches of cut1 and one of local (the mode is what is split)
    logs = [_log("cut1", 300.0, 210.0, 30.0, 55.0, 80_000), _log("cut1", 310.0, 214.0, 34.0, 57.0, 80_000),
            _log("local", 420.0, 0.0, 0.0, 0.0, 0)]
    t = bench.terms(logs, plan, 10.0)
    assert t["split"] == "cut1"
    assert t["head_ms"] == {"measured": 212.0, "predicted": 200.0}
    assert t["wire_ms"] == {"measured": 32.0, "predicted": pytest.approx(80_000 / 10e3 + 2.0)}
    assert t["tail_ms"] == {"measured": 56.0, "predicted": 50.0}
    # the rest: 300 - 210 - 30 - 55 = 5 and 310 - 214 - 34 - 57 = 5
    assert t["other_ms"] == {"measured": pytest.approx(5.0), "predicted": 0.0}
    assert t["total_ms"] == {"measured": 305.0, "predicted": pytest.approx(200 + 8 + 2 + 50)}
    loc = bench.terms([_log("local", 420.0, 0.0, 0.0, 0.0, 0)], plan, 10.0)
    assert loc["head_ms"] == {"measured": 420.0, "predicted": 400.0}
    assert loc["wire_ms"]["predicted"] == loc["tail_ms"]["predicted"] == 0.0
    assert loc["total_ms"]["predicted"] == 400.0
    assert bench.terms([], plan, 10.0) == {}


def _product_callables() -> dict:
    from dsc_export.engines import build_engines
    from dsc_export.export import export_model
    from dsc_export.planning import make_plan
    from dsc_export.profiling import BenchOptions, profile_split_dir
    from dsc_export.serving.client import ClientOptions, DynamicSplitClient
    from dsc_export.splitting import split_model

    return {"DynamicSplitClient": DynamicSplitClient, "ClientOptions": ClientOptions, "make_plan": make_plan,
            "split_model": split_model, "build_engines": build_engines, "export_model": export_model,
            "profile_split_dir": (profile_split_dir, BenchOptions)}


def test_the_benchmarks_call_the_product_with_keywords_it_takes():
    """bench_wire's shaped-link part passed the client's settings as keywords after a9bce71 had
    moved them into ClientOptions: a TypeError that only the (root-only, 30-minute) run met.
    Every call of these product functions in benchmarks/ names only parameters they have."""
    import ast
    import dataclasses
    import inspect

    wanted = _product_callables()
    bad, seen = [], 0
    for path in sorted((ROOT / "benchmarks").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Call):
                continue
            name = node.func.id if isinstance(node.func, ast.Name) else getattr(node.func, "attr", None)
            if name not in wanted:
                continue
            seen += 1
            fn, extra = (wanted[name], None) if not isinstance(wanted[name], tuple) else wanted[name]
            params = inspect.signature(fn).parameters
            takes = {p for p, v in params.items() if v.kind is not inspect.Parameter.VAR_KEYWORD}
            if extra is not None:  # **settings: the options dataclass's fields
                takes |= {f.name for f in dataclasses.fields(extra)}
            elif any(v.kind is inspect.Parameter.VAR_KEYWORD for v in params.values()):
                continue
            bad += [f"{path.name}:{node.lineno} {name}({k.arg}=)" for k in node.keywords
                    if k.arg is not None and k.arg not in takes]
    assert seen >= 10, seen  # the benchmarks do call them
    assert not bad, bad
