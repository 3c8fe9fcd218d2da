"""Export all 15 catalogue EfficientNets and tabulate what `analyze` finds (docs/efficientnets.md).

For each model: cut points, natural and compressive bottlenecks in bytes with a float32 wire and
a float16 wire (uint8 image input), and by element counts as the paper counts them.

Usage: python benchmarks/efficientnet_table.py [--out benchmarks/out] [--models a,b]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from dsc_export.graph.cuts import compressive_mask
from dsc_export.zoo import CATALOGUE

ONE = r"""
import json, sys
from dsc_export.export import export_model
from dsc_export.splitting import analyze_file
name, path = sys.argv[1], sys.argv[2]
rep = export_model(name, path, verify=False)
out = {"file_MB": rep.file_bytes / 1e6, "export_s": rep.seconds}
for wire in ("float32", "float16"):
    an = analyze_file(path, wire)
    out[wire] = {"cuts": len(an.cut_points), "natural": len(an.natural), "compressive": len(an.compressive),
                 "compressive_scopes": [c.scope for c in an.compressive],
                 "element_ratios": [c.element_ratio for c in an.cut_points]}
print(json.dumps(out))
"""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/out")
    ap.add_argument("--models", default=",".join(CATALOGUE))
    args = ap.parse_args()
    out = Path(args.out)
    (out / "table-models").mkdir(parents=True, exist_ok=True)
    rows = {}
    for name in args.models.split(","):
        path = out / "table-models" / f"{name}.onnx"
        res = subprocess.run([sys.executable, "-c", ONE, name, str(path)], capture_output=True, text=True)
        if res.returncode != 0:
            raise SystemExit(f"{name}: {res.stderr[-1500:]}")
        r = json.loads(res.stdout.strip().splitlines()[-1])
        el = r["float32"]["element_ratios"]
        r["elements"] = {"natural": sum(e < 1 for e in el), "compressive": sum(compressive_mask(el))}
        rows[name] = r
        path.unlink(missing_ok=True)
        print(f"{name}: {r['float32']['cuts']} cuts; float32 {r['float32']['natural']}/{r['float32']['compressive']}; "
              f"float16 {r['float16']['natural']}/{r['float16']['compressive']}; elements "
              f"{r['elements']['natural']}/{r['elements']['compressive']}", flush=True)
    (out / "efficientnets.json").write_text(json.dumps(rows, indent=2) + "\n")
    print("\n| model | resolution | cut points | natural / compressive (bytes, float32 wire) | (bytes, float16 wire) "
          "| (elements, as the paper) | compressive at (float32) |")
    print("|---|---:|---:|---|---|---|---|")
    for name, r in rows.items():
        f32, f16, el = r["float32"], r["float16"], r["elements"]
        print(f"| {name} | {CATALOGUE[name].resolution} | {f32['cuts']} | {f32['natural']} / {f32['compressive']} | "
              f"{f16['natural']} / {f16['compressive']} | {el['natural']} / {el['compressive']} | "
              f"{', '.join(s or '?' for s in f32['compressive_scopes'])} |")


if __name__ == "__main__":
    main()
