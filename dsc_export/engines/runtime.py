"""Run time: load a recorded engine (checked), and run a part at any batch size.

:class:`PartRunner` runs the engine built for a batch size where there is one, else the part's
ONNX (where build dropped the engine as not faster, or no engine was built for that size).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from dsc_export.artifacts import Engine, Manifest, sha256_file
from dsc_export.backends import Runner, get_backend
from dsc_export.contract import fixed_batch
from dsc_export.errors import UserError
from dsc_export.ort import make_session
from dsc_export.weight_store import check_blobs


def load_engine(split_dir: str | os.PathLike, rec: Engine, threads: int | None = None) -> Runner:
    """A runner for a recorded engine, after checking its sha256 and that it was built for here.

    The weights files it reads (``rec.data``) are checked too: each one's sha256 is its name.

    Raises:
        UserError: the file or one of its weights files is missing or changed (named), or it was
            built for another backend version or device.
    """
    path = Path(split_dir) / rec.path
    if not path.is_file():
        raise UserError(f"engine '{path}' is missing; run dsc-export build again")
    if sha256_file(path) != rec.sha256:
        raise UserError(f"engine '{path}' does not match its sha256 in the manifest; refusing to load it "
                        "(rebuild with dsc-export build)")
    check_blobs(split_dir, rec.data)
    backend = get_backend(rec.backend)
    why = backend.compatible(rec.target, rec.options)
    if why:
        raise UserError(f"engine '{path}' was built elsewhere: {why}; rebuild it here with dsc-export build")
    return backend.load(path, threads, profile=rec.profile)


def load_part(split_dir: str | os.PathLike, manifest: Manifest, split_id: str, part: str, backend: str, batch: int,
              precision: str = "fp32", threads: int | None = None) -> Runner | None:
    """A runner for what runs ``part`` of ``split_id`` at ``batch``: its engine, or its ONNX where
    build dropped the engine (as :class:`PartRunner` does); None when neither was built.

    Raises:
        UserError: as :func:`load_engine`.
    """
    rec = manifest.engine(split_id, part, backend, batch, precision)
    if rec is not None:
        return load_engine(split_dir, rec, threads)
    gone = manifest.dropped_engine(split_id, part, backend, batch, precision)
    return None if gone is None else get_backend(backend).load_onnx(Path(split_dir) / gone.source, threads)


class PartRunner:
    """Runs one part (a head, a tail or the whole model) at any batch size: the engine built for
    that batch size where there is one (loaded on first use and warmed up), else its ONNX.

    Engines are batch-fixed and optimised, so they are what the profiles measured; the ONNX
    fallback serves batch sizes without an engine (dynamic batching on a server, an odd batch
    on a device). A model that runs at one batch size only (``fixed_batch``) is run at that size
    only: any other batch is refused, never handed to an engine or the ONNX.
    """

    def __init__(self, split_dir: str | os.PathLike, manifest: Manifest, split: str, part: str,
                 *,
                 backend: str = "onnxruntime", precision: str = "fp32", threads: int | None = None):
        self.root, self.manifest, self.split, self.part = Path(split_dir), manifest, split, part
        self.backend, self.precision, self.threads = backend, precision, threads
        s = manifest.split(split)
        self.source = s.head if part == "head" else s.tail
        self.records = {e.batch: e for e in manifest.engines if (e.split, e.part, e.backend, e.precision)
                        == (split, part, backend, precision)}
        self._engines: dict[int, Runner] = {}
        self._onnx = None
        self.input_name: str | None = None
        self.fixed_batch = fixed_batch(manifest)

    def onnx_session(self):
        """The part's ONNX session (created on first use)."""
        if self._onnx is None:
            self._onnx = make_session(self.root / self.source, self.threads)
        return self._onnx

    def run(self, feeds: dict[str, np.ndarray], outputs: list[str] | None = None) -> list[np.ndarray]:
        """Run the part on ``feeds`` (batch first) and return ``outputs`` [default: every output].

        Raises:
            UserError: a batch size other than the model's fixed batch size.
        """
        batch = int(next(iter(feeds.values())).shape[0])
        if self.fixed_batch is not None and batch != self.fixed_batch:
            raise UserError(f"the model runs at batch size {self.fixed_batch} only, not {batch} "
                            f"({self.split} {self.part})")
        rec = self.records.get(batch)
        if rec is not None:
            runner = self._engines.get(batch)
            if runner is None:
                runner = load_engine(self.root, rec, self.threads)
                runner.activate()
                runner.infer(feeds)  # first run: allocations and kernel choices
                self._engines[batch] = runner
            got = runner.infer(feeds)
            names = outputs or [o.name for o in runner.outputs]
            return [got[n] for n in names]
        return self.onnx_session().run(outputs, feeds)

    def close(self) -> None:
        """Deactivate every runner this part opened."""
        for r in self._engines.values():
            r.deactivate()
        self._engines.clear()
        self._onnx = None
