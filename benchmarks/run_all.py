"""`make bench`: run every benchmark script, then write one results file and a Markdown summary.

Each script writes its own JSON under benchmarks/out/; this collects the figures that have a
target into benchmarks/results/summary-<date>.json and .md (machine, date, figure, target, met
or not). ``--summarize`` only collects what the scripts last wrote. The GPU workflow calls this
with ``--backend tensorrt`` (passed to the scripts that time engines).

Usage: python benchmarks/run_all.py [--summarize] [--backend onnxruntime|tensorrt] [--only a,b]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

from common import HERE, OUT, machine

SCRIPTS = ["bench_split.py", "bench_engines.py", "bench_profiles.py", "bench_plan.py", "bench_e2e.py", "bench_load.py",
           "bench_fleet.py", "bench_bundle.py", "bench_accuracy.py", "bench_wire.py",
           "model_zoo.py"]
BACKEND_AWARE = {"bench_profiles.py"}


def load(name: str) -> dict | None:
    p = OUT / name
    return json.loads(p.read_text()) if p.is_file() else None


def rows() -> list[dict]:
    """(benchmark, figure, value, target, met) for every figure with a target, and key figures without."""
    out = []

    def add(bench, figure, value, target="", met=None):
        out.append({"benchmark": bench, "figure": figure, "value": value, "target": target, "met": met})

    d = load("split.json")
    if d:
        for r in d["rows"]:
            add("split", f"{r['model']}: analyze", f"{r['analyze_s']:.2f} s", "< 2 s", r["analyze_s"] < 2)
            add("split", f"{r['model']}: split + verify", f"{r['split_s']:.1f} s",
                "< 60 s (V2-L)" if "v2_l" in r["model"] else "",
                r["split_s"] < 60 if "v2_l" in r["model"] else None)
            if "v2_l" in r["model"]:
                x = r.get("split_peak_x_file")
                add("split", f"{r['model']}: split peak memory / file size", f"{x:.2f}x", "< 3x", x < 3)
    d = load("engines.json")
    if d:
        add("engines", f"{d['model']}: worst (head + tail) / whole model, engines, batch 1-64",
            f"{d['worst_cut_ratio']:.3f}", "<= 1.05", d["met"])
        sp = d["spinning"]
        add("engines", "3 sessions in one process: whole model batch 1, spinning on / off",
            f"{sp['slowdown_spinning_vs_not']:.2f}x slower with spinning", "allow_spinning = 0 used")
    d = load("profiles.json")
    if d:
        for m, e in d["models"].items():
            for role, v in e.items():
                add("profiles", f"{m} {role} ({v['threads']} thread(s)): rerun medians within 10 %",
                    f"{v['within_10pct']}/{v['figures']} (max {v['rerun_max_rel_change'] * 100:.1f} %, "
                    f"median {v['rerun_median_rel_change'] * 100:.1f} %)", "all within 10 %",
                    v["within_10pct"] == v["figures"])
    d = load("plan.json")
    if d:
        add("plan", "Plan.choose per call", f"{d['choose_us']:.2f} us", "< 20 us", d["choose_us"] < 20)
        if "choose_with_server_state_us" in d:
            us = d["choose_with_server_state_us"]
            add("plan", "Plan.choose per call with a server state (q, s)", f"{us:.2f} us", "< 20 us", us < 20)
        add("plan", "full default grid, 6 candidates", f"{d['build_ms']:.1f} ms", "< 100 ms", d["build_ms"] < 100)
        if "real_plan" in d:
            g = d["real_plan"]["mean_gain"]
            add("plan", f"{d['real_plan']['model']} plan: mean gain over local / offload / best static",
                f"{g['local'] * 100:.1f} % / {g['offload'] * 100:.1f} % / "
                f"{g[d['real_plan']['best_static']] * 100:.1f} %")
    d = load("e2e.json")
    if d:
        for p in d["phases"]:
            add("e2e", f"{p['rate_MBps']:g} MB/s phase: measured vs predicted ({', '.join(p['choices'])})",
                f"{p['measured_ms']:.1f} vs {p['predicted_ms']:.1f} ms ({p['error'] * 100:+.1f} %)", "within 15 %",
                abs(p["error"]) <= 0.15)
        add("e2e", f"dynamic vs best static ({d['best_static']}), mean over phases",
            f"{d['dynamic_mean_ms']:.1f} vs {d['static_mean_ms'][d['best_static']]:.1f} ms", "dynamic <= best static",
            d["met"]["dynamic_beats_best_static"])
    d = load("load.json")
    if d:
        r = d["results"]
        add("load", f"{d['clients']} clients, {d['split']}: throughput with / without dynamic batching",
            f"{r['dynamic_batching']['throughput_per_s']:.0f} / {r['no_batching']['throughput_per_s']:.0f} samples/s")
        add("load", "p99 latency with / without dynamic batching",
            f"{r['dynamic_batching']['p99_ms']:.1f} / {r['no_batching']['p99_ms']:.1f} ms")
    d = load("fleet.json")
    if d:
        res, met = d["results"], d["met"]
        nmax = max(res, key=int)
        for n, row in res.items():
            best = min(("static", "local", "offload"), key=lambda p: row[p]["mean_ms"])
            add("fleet", f"N={n}: load-aware vs best static policy ({best}), mean per batch",
                f"{row['aware']['mean_ms']:.0f} vs {row[best]['mean_ms']:.0f} ms", "within 3 %",
                row["aware"]["mean_ms"] <= 1.03 * row[best]["mean_ms"])
        for n, row in res.items():
            if "aware_over_oracle" in row:
                o = row["oracle"]
                add("fleet", f"N={n}: load-aware vs oracle (best static assignment), mean per batch",
                    f"{row['aware']['mean_ms']:.0f} vs {o['mean_ms']:.0f} ms "
                    f"(oracle model {o['model']['mean_ms']:.0f} ms, measured {o['model']['error'] * 100:+.0f} %)",
                    "within 5 %", row["aware_over_oracle"] <= 1.05)
        add("fleet", f"N={nmax}: load-aware vs load-blind, mean per batch",
            f"{res[nmax]['aware']['mean_ms']:.0f} vs {res[nmax]['blind']['mean_ms']:.0f} ms "
            f"({d['aware_vs_blind_at_nmax'] * 100:.0f} % lower)", ">= 15 % lower", d["aware_vs_blind_at_nmax"] >= 0.15)
        add("fleet", "steady phases: measured mean within 15 % of predicted (all but load-blind)", "",
            "within 15 %", met["measured_within_15pct_of_predicted"])
        sat = d["saturated_idle_link"]
        add("fleet", "saturated server, idle link: rate estimate vs TCP (load-aware / load-blind)",
            f"{sat['aware']['mean_rate_MBps']:.1f} / {sat['blind']['mean_rate_MBps']:.1f} vs "
            f"{sat['link_MBps_tcp']:.1f} MB/s", "within 20 %", met["rate_estimate_within_20pct_saturated"])
    d = load("bundle.json")
    if d:
        for r in d["rows"]:
            for side, target in (("device", 2.0), ("server", 2.5)):
                s = r[side]
                add("bundle", f"{r['model']}: bundle --{side} / the side's distinct weights",
                    f"{s['tar_x_weights']:.2f}x ({s['tar_bytes'] / 1e6:.1f} MB)", f"<= {target}x",
                    s["tar_x_weights"] <= target)
            add("bundle", f"{r['model']}: engines kept that are not faster than their ONNX by the margin",
                f"{len(r['kept_not_faster_by_margin'])} of {r['engines_kept']} kept", "0",
                not r["kept_not_faster_by_margin"])
            for what, v in r.get("load", {}).items():
                add("bundle", f"{r['model']}: load time, {what}, shared weights / weights inline",
                    f"{v['ratio']:.2f}x", "<= 1.10x", v["ratio"] <= 1.10)
    d = load("accuracy.json")
    if d:
        for res in d["results"]:
            for wire in ("float32", "float16"):
                rows_w = [s for s in res["splits"] if s["wire"] == wire]
                if rows_w:
                    worst = min(s["top1_agreement"] for s in rows_w)
                    target, met = ("100 %", worst == 1.0) if wire == "float32" else ("measured", None)
                    add("accuracy", f"{res['model']} ({res['weights'].split(':')[0]}), {wire} wire: worst top-1 "
                        f"agreement with the whole model over {len(rows_w)} splits, {res['inputs']} inputs",
                        f"{worst * 100:.1f} %", target, met)
    d = load("wire.json")
    if d:
        for name, res in d["results"].items():
            for scen, p in res["plans"].items():
                if not scen.startswith("+ int8") or "JPEG-95 under" not in scen:
                    continue
                add("wire", f"{name}: split share, int8 at floor {d['floor']:g}, JPEG-95 in the race",
                    f"{p['split_share'] * 100:.1f} %", ">= 35 %", p["split_share"] >= 0.35)
                add("wire", f"{name}: mean Eq. 7 gain over the best static ({p['best_static']})",
                    f"{p['gain_over_best_static'] * 100:.1f} %", ">= 15 %", p["gain_over_best_static"] >= 0.15)
                worst = min(p["chosen_int8_agreement"].values(), default=None)
                if worst is not None:
                    add("wire", f"{name}: worst held-out agreement of the int8 forms the plan chooses",
                        f"{worst * 100:.1f} %", ">= 95 %", worst >= 0.95)
            e = res.get("e2e") or {}
            for ph in e.get("phases", []):
                add("wire",
                    f"{name} e2e {ph['rate_MBps']:.3g} MB/s: measured vs predicted ({', '.join(ph['choices'])})",
                    f"{ph['measured_ms']:.1f} vs {ph['predicted_ms']:.1f} ms ({ph['error'] * 100:+.1f} %)",
                    "within 15 %", abs(ph["error"]) <= 0.15)
            if e.get("phases"):
                add("wire", f"{name} e2e: dynamic vs best static ({e['best_static']})",
                    f"{e['dynamic_vs_best_static'] * 100:+.1f} %", "<= +3 %", e["dynamic_vs_best_static"] <= 0.03)
    d = load("zoo.json")
    if d:
        rs = d["rows"]
        timed = [r for r in rs if "analyze_s" in r]
        if timed:
            worst = max(timed, key=lambda r: r["analyze_s"])
            under = sum(r["analyze_s"] < 2 for r in timed)
            add("zoo", f"analyze, every export (median of 3): slowest {worst['model']} ({worst['exporter']})",
                f"{worst['analyze_s']:.2f} s; {under}/{len(timed)} under 2 s", "< 2 s", under == len(timed))
        checked = [r for r in rs if "checks" in r]
        wrong = [f"{r['model']} ({r['exporter']})" for r in checked if not r["verified"]]
        add("zoo", "splits that do not reproduce the model (independent head + tail check)",
            f"{len(wrong)} of {len(checked)} exports" + (f": {', '.join(wrong)}" if wrong else ""), "0", not wrong)
        bugs = [f"{r['model']} ({r['exporter']})" for r in rs if r["status"] in ("bug", "crashed", "check failed")]
        add("zoo", "tracebacks or crashes in analyze / split",
            f"{len(bugs)}" + (f": {', '.join(bugs)}" if bugs else ""), "0", not bugs)
        add("zoo", "exports with cut points / refused / export failed (torch)",
            f"{sum(r.get('cut_points', 0) > 0 for r in rs)} / {sum(r['status'] == 'refused' for r in rs)} / "
            f"{sum(r['status'] == 'export failed' for r in rs)} of {len(rs)}")
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--summarize", action="store_true", help="only collect what the scripts last wrote")
    ap.add_argument("--backend", default="onnxruntime")
    ap.add_argument("--only", help="comma-separated script names")
    args = ap.parse_args()
    failed = []
    if not args.summarize:
        # the zoo measures analyze and split on the CPU (and exports 38 models first): not a backend's figure
        default = [s for s in SCRIPTS if args.backend == "onnxruntime" or s != "model_zoo.py"]
        for script in (args.only.split(",") if args.only else default):
            print(f"### {script}", flush=True)
            cmd = [sys.executable, str(HERE / script)]
            if script in BACKEND_AWARE:
                cmd += ["--backend", args.backend]
            if subprocess.call(cmd) != 0:
                failed.append(script)
    table = rows()
    date = time.strftime("%Y-%m-%d")
    res = HERE / "results"
    res.mkdir(exist_ok=True)
    info = machine()
    (res / f"summary-{date}.json").write_text(json.dumps({"machine": info, "date": date, "backend": args.backend,
                                                           "rows": table, "failed_scripts": failed}, indent=1) + "\n")
    lines = [f"# Benchmark summary, {date}", "",
             f"Machine: {info['cpu']}, {info['cores']} cores, Python {info['python']}, backend {args.backend}. "
             "Produced by `make bench` (`benchmarks/run_all.py`); the scripts' own JSON is in `benchmarks/out/`.", "",
             "| benchmark | figure | value | target | met |", "|---|---|---|---|---|"]
    for r in table:
        met = "" if r["met"] is None else ("yes" if r["met"] else "**no**")
        lines.append(f"| {r['benchmark']} | {r['figure']} | {r['value']} | {r['target']} | {met} |")
    if failed:
        lines += ["", f"Scripts that failed: {', '.join(failed)}"]
    (res / f"summary-{date}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
