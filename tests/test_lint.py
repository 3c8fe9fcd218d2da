"""The code checks `make lint` runs hold: ruff (the configuration in pyproject.toml, lines of at
most 120 characters included) over the package, tests and benchmarks, and no module of the
package over 700 lines."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MAX_MODULE_LINES = 700
LINTED = ["dsc_export", "tests", "benchmarks"]

needs_ruff = pytest.mark.skipif(importlib.util.find_spec("ruff") is None,
                                reason="ruff not installed (extra 'dev')")


def ruff(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=120)


def long_modules(package: Path, limit: int = MAX_MODULE_LINES) -> dict[str, int]:
    """{path relative to ``package``'s parent: line count} of every .py file over ``limit`` lines."""
    counts = {p.relative_to(package.parent).as_posix(): len(p.read_text().splitlines())
              for p in sorted(package.rglob("*.py"))}
    return {p: n for p, n in counts.items() if n > limit}


@needs_ruff
def test_ruff_passes():
    r = ruff(*LINTED)
    assert r.returncode == 0, f"ruff check {' '.join(LINTED)}:\n{r.stdout}{r.stderr}"


@needs_ruff
def test_ruff_catches_a_line_over_120(tmp_path):
    """The project's configuration flags a 121-character line and passes a 120-character one."""
    (tmp_path / "long.py").write_text("x = '" + "a" * 115 + "'\n")  # 121 characters
    (tmp_path / "ok.py").write_text("x = '" + "a" * 114 + "'\n")  # 120 characters
    r = ruff("--config", str(ROOT / "pyproject.toml"), "long.py", "ok.py", cwd=tmp_path)
    assert r.returncode == 1 and "E501" in r.stdout and "long.py" in r.stdout and "ok.py" not in r.stdout, r.stdout


def test_no_module_over_700_lines():
    over = long_modules(ROOT / "dsc_export")
    assert over == {}, f"modules over {MAX_MODULE_LINES} lines (split them along their roles): {over}"


def test_the_module_length_check_counts_lines(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "a.py").write_text("x = 1\n" * MAX_MODULE_LINES)
    (pkg / "sub" / "b.py").write_text("x = 1\n" * (MAX_MODULE_LINES + 1))
    assert long_modules(pkg) == {"pkg/sub/b.py": MAX_MODULE_LINES + 1}
