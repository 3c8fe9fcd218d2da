"""The JSON artifacts: dataclasses, their JSON form, schema versions and hashes.

Only the split manifest exists so far (``dsc-export.split/1``, contract in DESIGN.md); the
profile and plan schemas join it here with their stages.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from dsc_export.errors import UserError
from dsc_export.graph.cuts import CutPoint

SPLIT_SCHEMA = "dsc-export.split/1"
MANIFEST_NAME = "manifest.json"


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


@dataclass
class TensorSig:
    name: str
    shape: list  # batch dim as a string (symbolic) or -1
    dtype: str


@dataclass
class ModelRef:
    path: str  # relative to the split dir
    sha256: str
    input: TensorSig
    output: TensorSig
    input_bytes: int  # per sample
    outputs: list[TensorSig] = field(default_factory=list)  # every output (several-output models)
    source: str | None = None  # where the model was read from when split


@dataclass
class Split:
    """One candidate of the planner: ``offload`` (l = 0), a cut point, or ``local`` (l = L)."""

    id: str
    kind: str  # offload | split | local
    tensor: str | None
    head: str | None
    tail: str | None
    bytes: int  # per sample sent over the wire
    max_abs_diff: float | None
    max_rel_diff: float | None = None
    wire_tensor: str | None = None  # head output = tail input name (differs from tensor with a float16 wire)
    ratio: float | None = None


@dataclass
class Manifest:
    """``DIR/manifest.json``: the split dir's contents and how they were verified."""

    model: ModelRef
    wire_dtype: str
    cut_points: list[CutPoint]
    splits: list[Split]
    engines: list[dict[str, Any]] = field(default_factory=list)
    verification: dict[str, Any] | None = None
    schema: str = SPLIT_SCHEMA

    def to_json(self) -> str:
        d = asdict(self)
        ordered = {"schema": d.pop("schema"), **d}
        return json.dumps(ordered, indent=2) + "\n"

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Manifest:
        if d.get("schema") != SPLIT_SCHEMA:
            raise UserError(f"not a {SPLIT_SCHEMA} manifest (schema: {d.get('schema')!r})")
        m = d["model"]
        model = ModelRef(
            path=m["path"], sha256=m["sha256"], input=TensorSig(**m["input"]),
            output=TensorSig(**m["output"]), input_bytes=m["input_bytes"],
            outputs=[TensorSig(**o) for o in m.get("outputs", [])], source=m.get("source"),
        )
        return cls(
            model=model, wire_dtype=d["wire_dtype"],
            cut_points=[CutPoint(**c) for c in d["cut_points"]],
            splits=[Split(**s) for s in d["splits"]],
            engines=d.get("engines", []), verification=d.get("verification"),
        )

    def split(self, split_id: str) -> Split:
        for s in self.splits:
            if s.id == split_id:
                return s
        raise UserError(f"no split '{split_id}'; known: {', '.join(s.id for s in self.splits)}")


def write_json_atomic(path: str | os.PathLike, text: str) -> None:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_manifest(split_dir: str | os.PathLike) -> Manifest:
    path = Path(split_dir) / MANIFEST_NAME
    if not path.is_file():
        raise UserError(f"'{split_dir}' is not a split dir (no {MANIFEST_NAME}); run dsc-export split first")
    try:
        return Manifest.from_dict(json.loads(path.read_text()))
    except (ValueError, KeyError, TypeError) as exc:
        raise UserError(f"'{path}' is not a valid manifest: {exc}") from exc
