"""`make bench`: run every benchmark script in turn (each writes its JSON under benchmarks/out/)."""

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).parent
SCRIPTS = ["bench_split.py", "bench_engines.py"]

for script in SCRIPTS:
    print(f"### {script}", flush=True)
    rc = subprocess.call([sys.executable, str(HERE / script)])
    if rc != 0:
        sys.exit(rc)
