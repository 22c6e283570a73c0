"""Convert a run folder written by an older fedmtl (pickled checkpoint and client states) to the
data-only files fedmtl reads now, so ``fedmtl resume`` and ``fedmtl report`` can use it.

    python tools/convert_pickle_run.py RUN_DIR

Only for folders you trust: this reads pickles, which fedmtl itself never does. It reads them with
an allow-list (numpy arrays, dtypes and scalars, and Python's plain containers), so a pickle naming
anything else is refused rather than run, but an allow-list narrows the risk; it does not remove
it. The old files stay (renamed ``*.pickle-old``); the checkpoint gets no run identity, so the first
resume takes the folder as it is and later checkpoints record it."""

from __future__ import annotations

import io
import pickle
import sys
from pathlib import Path
from typing import Any

import numpy as np

from fedmtl import treefile
from fedmtl.experiment.records import CHECKPOINT, LEGACY_CHECKPOINT, atomic_write_bytes

ALLOWED = {
    ("builtins", "dict"),
    ("builtins", "list"),
    ("builtins", "tuple"),
    ("builtins", "set"),
    ("builtins", "frozenset"),
    ("builtins", "bytes"),
    ("builtins", "bytearray"),
    ("collections", "OrderedDict"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"),
}


class _AllowList(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refused: the pickle names {module}.{name}")


def _load(data: bytes) -> Any:
    return _AllowList(io.BytesIO(data)).load()


def _plain(tree: Any) -> Any:
    """OrderedDict -> dict, bytearray -> bytes: what the data-only format stores."""
    if isinstance(tree, dict):
        return {k: _plain(v) for k, v in tree.items()}
    if type(tree) in (list, tuple):
        return type(tree)(_plain(v) for v in tree)
    return bytes(tree) if isinstance(tree, bytearray) else tree


def convert(run_dir: Path) -> list[Path]:
    """Write the new files beside the old ones; return what was converted."""
    done = []
    old = run_dir / LEGACY_CHECKPOINT
    if not old.is_file():
        raise SystemExit(f"convert: {run_dir} has no {LEGACY_CHECKPOINT}; nothing to convert")
    clients = run_dir / "clients"
    for seg in sorted(clients.glob("seg-*.bin")) if clients.is_dir() else []:
        index = np.load(seg.with_suffix("").with_suffix(".idx.npy"), allow_pickle=False).reshape(-1, 3)
        raw = seg.read_bytes()
        if raw and treefile.is_pickle(raw):
            blob, new_index = bytearray(), index.copy()
            for i, (_, offset, length) in enumerate(index.tolist()):
                state = treefile.encode(_plain(_load(raw[offset : offset + length])))
                new_index[i, 1:] = (len(blob), len(state))
                blob += state
            seg.rename(seg.with_name(seg.name + ".pickle-old"))
            atomic_write_bytes(seg, bytes(blob))
            idx = seg.with_suffix("").with_suffix(".idx.npy")
            with open(idx, "wb") as fh:
                np.save(fh, new_index)
            done.append(seg)
    ckpt = _plain(_load(old.read_bytes()))
    atomic_write_bytes(run_dir / CHECKPOINT, treefile.encode(ckpt))
    old.rename(old.with_name(old.name + ".pickle-old"))
    done.append(old)
    return done


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python tools/convert_pickle_run.py RUN_DIR", file=sys.stderr)
        return 2
    try:
        done = convert(Path(argv[0]))
    except (pickle.UnpicklingError, treefile.TreeFormatError, OSError, ValueError) as exc:
        print(f"convert: {argv[0]}: {exc}", file=sys.stderr)
        return 2
    print(f"converted {len(done)} files in {argv[0]}: {', '.join(p.name for p in done)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
