"""LEAF-format data directories the tests write themselves (never downloads): images as LEAF's
FEMNIST stores them (per-writer flattened pixel lists in [0, 1], integer labels) and text as LEAF's
Shakespeare does (80-character strings, the next character as label), each as ``train/`` and
``test/`` JSON shards with LEAF's per-user split."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np


def _write(root: Path, users: list[tuple[str, list, list, list, list]], shards: int) -> Path:
    for split in ("train", "test"):
        (root / split).mkdir(parents=True, exist_ok=True)
    for s, part in enumerate(np.array_split(np.arange(len(users)), shards)):
        for split, (xi, yi) in (("train", (1, 2)), ("test", (3, 4))):
            doc: dict = {"users": [], "num_samples": [], "user_data": {}}
            for i in part:
                u = users[i]
                doc["users"].append(u[0])
                doc["num_samples"].append(len(u[yi]))
                doc["user_data"][u[0]] = {"x": u[xi], "y": u[yi]}
            name = f"all_data_{s}_niid_0_keep_0_{split}_9.json"
            (root / split / name).write_text(json.dumps(doc))
    return root


def image_writers(
    root: Path, images: np.ndarray, labels: np.ndarray, writers: int, seed: int = 0, shards: int = 2
) -> Path:
    """Pseudo-writers: each gets a Dirichlet(0.5) label mix of ``images`` (N, H, W in [0, 1]) and a
    90/10 train/test split, as LEAF's sampling script gives."""
    rng = np.random.default_rng(seed)
    by_class = [list(rng.permutation(np.flatnonzero(labels == c))) for c in np.unique(labels)]
    per = len(labels) // writers
    users = []
    for w in range(writers):
        mix = rng.dirichlet(np.full(len(by_class), 0.5))
        take = []
        for c in rng.choice(len(by_class), size=per, p=mix):
            pool = by_class[c] if by_class[c] else max(by_class, key=len)
            take.append(pool.pop())
        take = np.asarray(take)
        cut = max(1, int(round(0.9 * len(take))))
        flat = images[take].reshape(len(take), -1).round(4)
        users.append(
            (
                f"f{w:04d}_{w % 7:02d}",
                flat[:cut].tolist(),
                labels[take[:cut]].astype(int).tolist(),
                flat[cut:].tolist(),
                labels[take[cut:]].astype(int).tolist(),
            )
        )
    return _write(root, users, shards)


def corpus() -> str:
    """Plain English prose that ships with Python: standard-library module docstrings."""
    import argparse
    import collections
    import json as json_module
    import pathlib
    import string
    import textwrap
    import zipfile

    mods = (argparse, collections, json_module, pathlib, string, textwrap, zipfile)
    return " ".join(" ".join((m.__doc__ or "").split()) for m in mods)


def text_roles(root: Path, roles: int, samples: int, seq: int = 80, shards: int = 2) -> Path:
    """Pseudo-roles reading consecutive passages of ``corpus()``: ``x`` a ``seq``-character window,
    ``y`` the character after it; 80/20 train/test per role."""
    text = corpus()
    users = []
    span = (len(text) - seq - 1) // roles
    for r in range(roles):
        start = r * span
        xs = [text[i : i + seq] for i in range(start, start + min(samples, span))]
        ys = [text[i + seq] for i in range(start, start + min(samples, span))]
        cut = int(0.8 * len(xs))
        users.append((f"THE_PLAY_ROLE{r}", xs[:cut], ys[:cut], xs[cut:], ys[cut:]))
    return _write(root, users, shards)
