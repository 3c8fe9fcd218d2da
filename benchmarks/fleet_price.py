"""The price's weight, by the queueing model: where do devices that each choose for themselves
settle, for each ``wait_price`` w, against the fleet's best assignment?

No devices and no server run: for every setting of a grid (the device ``--slowdowns`` times
slower than its 1-thread profile, the shared link at each of ``--rates`` MB/s, ``--devices`` N)
the plan's candidates' demands go into :mod:`dsc_export.fleet`, which finds every equilibrium
(no device gains by moving alone, its cost its latency plus w times its queueing delay: the
charge of :func:`dsc_export.serving.policy.priced_state`) and the best static assignment. Printed
per w: the worst equilibrium over the best assignment, its mean and maximum over the grid, and
the share of settings where it is more than 5 % off. This is the figure behind
``ClientOptions.wait_price``'s default (docs/serving.md). The model does not see the damped
switch's dynamics, the estimates' noise or batch merging; bench_fleet.py measures those.

Needs the profiles bench_profiles.py writes (as bench_fleet.py). About a second.

Usage: python benchmarks/fleet_price.py [--model efficientnet_b0] [--batch 4] [--rtt-ms 3]
       [--slowdowns 1,2,4,8] [--rates 5,10,20,40,80] [--devices 2,3,4,6,8] [--prices 0,1,2,3,4,6,10]
"""

from __future__ import annotations

import argparse
import statistics

from common import OUT, split_dir, write


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="efficientnet_b0")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--rtt-ms", type=float, default=3.0,
                    help="the plan's per-request overhead (bench_fleet measures it)")
    ap.add_argument("--slowdowns", default="1,2,4,8")
    ap.add_argument("--rates", default="5,10,20,40,80")
    ap.add_argument("--devices", default="2,3,4,6,8")
    ap.add_argument("--prices", default="0,1,2,3,4,6,10")
    args = ap.parse_args()

    from dsc_export.artifacts import read_manifest, read_profile
    from dsc_export.fleet import best_assignment, demands, equilibria
    from dsc_export.planning import make_plan

    prof = OUT / "profiles"
    dev_p, srv_p = prof / f"{args.model}-device.json", prof / f"{args.model}-server.json"
    if not (dev_p.is_file() and srv_p.is_file()):
        raise SystemExit(f"no profiles of {args.model} in {prof}: run benchmarks/bench_profiles.py first")
    man, dev, srv = read_manifest(split_dir(args.model)), read_profile(dev_p), read_profile(srv_p)
    prices = [float(w) for w in args.prices.split(",")]
    worst: dict[float, list[float]] = {w: [] for w in prices}
    for k in (float(x) for x in args.slowdowns.split(",")):
        plan = make_plan(man, dev.scaled(k), srv, rtt_ms=args.rtt_ms)
        for rate in (float(x) for x in args.rates.split(",")):
            ds = demands(plan, args.batch, rate)
            for n in (int(x) for x in args.devices.split(",")):
                best = best_assignment(ds, n).mean_ms
                for w in prices:
                    worst[w].append(equilibria(ds, n, w)[-1].mean_ms / best)
    rows = []
    print(f"{args.model}, batch {args.batch}: worst equilibrium / best assignment over {len(worst[prices[0]])} "
          "settings (device slowdown x rate x N)")
    for w in prices:
        v = worst[w]
        rows.append({"wait_price": w, "mean": statistics.mean(v), "max": max(v),
                     "share_over_5pct": sum(x > 1.05 for x in v) / len(v)})
        print(f"  w = {w:4g}: mean {rows[-1]['mean']:.3f}, max {rows[-1]['max']:.3f}, "
              f"more than 5 % off in {rows[-1]['share_over_5pct']:.0%}")
    write("fleet_price.json", {"model": args.model, "batch": args.batch, "rtt_ms": args.rtt_ms,
                               "slowdowns": args.slowdowns, "rates_MBps": args.rates, "devices": args.devices,
                               "rows": rows})


if __name__ == "__main__":
    main()
