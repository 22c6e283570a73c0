"""``fedmtl tune``: hyper-parameters chosen on validation rows with a stated budget.

A comparison is fair when every method gets the same model, the same tuning budget and the same
selection rule. So a tuning run takes a grid (``--grid key=v1,v2``, values as ``--set`` parses them),
runs at most ``--budget`` of its points (all of them when the grid is that small, else a seeded sample
without replacement), scores each by its best round's mean validation metric (``data.val_fraction``
rows, carved from the clients' training data; the test split is never read to choose anything),
averaged over ``--seeds``, and writes what it tried and chose (``tune.json``, ``tune.md``). The test
metric of each trial is recorded beside it, for reading, not for choosing."""

from __future__ import annotations

import itertools
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedmtl.config import Config, apply_overrides, load_yaml, parse_config
from fedmtl.errors import ConfigError, RunDirError

DEFAULT_VAL_FRACTION = 0.1
TUNE_SEED = 7  # rng purpose: which grid points a budget smaller than the grid runs


def split_values(text: str) -> list[str]:
    """``a,b,[1, 2]`` -> ``["a", "b", "[1, 2]"]``: commas inside brackets or braces stay."""
    out, depth, cur = [], 0, ""
    for ch in text:
        if ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
        if ch == "," and depth == 0:
            out.append(cur.strip())
            cur = ""
        else:
            cur += ch
    out.append(cur.strip())
    return [v for v in out if v]


def parse_grid(items: list[str]) -> dict[str, list[str]]:
    grid: dict[str, list[str]] = {}
    for item in items:
        key, sep, values = item.partition("=")
        if not sep or not key.strip() or not split_values(values):
            raise ConfigError(f"--grid: expected key=v1,v2,..., got {item!r}")
        if key.strip() in grid:
            raise ConfigError(f"--grid: {key.strip()!r} given twice")
        grid[key.strip()] = split_values(values)
    if not grid:
        raise ConfigError("--grid: give at least one key=v1,v2,...")
    return grid


@dataclass
class Trial:
    params: dict[str, str]
    val: float
    test: float
    best_round: int
    runs: list[str]


def _points(grid: dict[str, list[str]], budget: int, seed: int) -> list[dict[str, str]]:
    keys = list(grid)
    every = [dict(zip(keys, combo, strict=True)) for combo in itertools.product(*grid.values())]
    if len(every) <= budget:
        return every
    rng = np.random.default_rng([seed, TUNE_SEED])
    picked = sorted(rng.choice(len(every), size=budget, replace=False).tolist())
    return [every[i] for i in picked]


def tune(
    config: str | Path | dict[str, Any] | None,
    grid_items: list[str],
    budget: int,
    overrides: list[str] | None = None,
    seeds: list[int] | None = None,
    out: str | Path | None = None,
    log: Any = print,
) -> dict[str, Any]:
    """Run the trials and return what ``tune.json`` holds."""
    if budget < 1:
        raise ConfigError(f"--budget = {budget}: must be at least 1")
    if isinstance(config, dict):  # benchmarks tune the config they build in code
        start = json.loads(json.dumps(config))
    else:
        start = load_yaml(config) if config is not None else {}
    raw = apply_overrides(start, overrides or [])
    base = parse_config(raw)
    if base.data.val_fraction == 0 and "val_fraction" in (raw.get("data") or {}):
        raise ConfigError(
            "tune: data.val_fraction = 0 means no validation rows, and tune chooses on them; set it in "
            f"(0, 0.5], or leave it unset for {DEFAULT_VAL_FRACTION}"
        )
    val_fraction = base.data.val_fraction or DEFAULT_VAL_FRACTION
    raw = apply_overrides(raw, [f"data.val_fraction={val_fraction}", "output.progress=false"])
    grid = parse_grid(grid_items)
    points = _points(grid, budget, base.seed)
    seeds = seeds or [base.seed]
    configs = []
    for point in points:  # every candidate is checked before anything runs
        sets = [f"{k}={v}" for k, v in point.items()]
        configs.append([parse_config(apply_overrides(raw, [*sets, f"seed={s}"])) for s in seeds])
    folder = _folder(base, out)
    trials: list[Trial] = []
    import fedmtl

    for i, (point, cfgs) in enumerate(zip(points, configs, strict=True)):
        vals, tests, rounds, runs = [], [], [], []
        for cfg in cfgs:
            res = fedmtl.run(cfg, out=folder / f"trial-{i:03d}-s{cfg.seed}")
            metric, higher = res.summary["primary_metric"], res.summary["higher_is_better"]
            best = res.summary["best"]
            vals.append(float(best[f"val_{metric}_mean"]))
            tests.append(float(best.get(f"{metric}_mean", float("nan"))))
            rounds.append(int(best["round"]))
            runs.append(str(res.run_dir))
        trial = Trial(point, float(np.mean(vals)), float(np.mean(tests)), rounds[0], runs)
        trials.append(trial)
        log(f"[tune] {i + 1}/{len(points)} {point}: val_{metric} {trial.val:.4f}")
    pick = (max if higher else min)(range(len(trials)), key=lambda j: trials[j].val)
    chosen = trials[pick].params
    record = {
        "config": None if config is None or isinstance(config, dict) else str(Path(config).resolve()),
        "overrides": list(overrides or []),
        "grid": grid,
        "budget": budget,
        "points_in_grid": int(np.prod([len(v) for v in grid.values()])),
        "trials_run": len(trials),
        "seeds": seeds,
        "val_fraction": val_fraction,
        "selection": f"best round's mean val_{metric} ({'max' if higher else 'min'}), mean over seeds",
        "trials": [trial.__dict__ for trial in trials],
        "chosen": chosen,
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }
    (folder / "tune.json").write_text(json.dumps(record, indent=1))
    (folder / "tune.md").write_text(_markdown(record, metric))
    log(f"[tune] chosen on validation: {' '.join(f'--set {k}={v}' for k, v in chosen.items())}")
    log(f"[tune] written: {folder / 'tune.json'}")
    record["dir"] = str(folder)
    return record


def _folder(cfg: Config, out: str | Path | None) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = Path(out) if out is not None else Path(cfg.output.dir) / f"tune-{cfg.name}-{stamp}"
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise RunDirError(f"tune directory {path} already exists and is not empty; choose another --out")
    path.mkdir(parents=True, exist_ok=True)
    return path


def _markdown(record: dict[str, Any], metric: str) -> str:
    keys = list(record["grid"])
    lines = [
        "# Tuning on validation rows",
        "",
        f"Written by `fedmtl tune` on {record['date']}; config {record['config']}; grid "
        + "; ".join(f"`{k}` in {v}" for k, v in record["grid"].items())
        + f"; budget {record['budget']} ({record['trials_run']} of {record['points_in_grid']} points run); "
        f"seeds {record['seeds']}; `data.val_fraction` {record['val_fraction']}; chosen by "
        f"{record['selection']}. The test column is shown, never used.",
        "",
        "| " + " | ".join(keys) + f" | val_{metric} | test {metric} (read only) | best round | chosen |",
        "|" + "---|" * (len(keys) + 4),
    ]
    for t in record["trials"]:
        mark = "yes" if t["params"] == record["chosen"] else ""
        cells = [str(t["params"][k]) for k in keys]
        lines.append(
            "| " + " | ".join(cells) + f" | {t['val']:.4f} | {t['test']:.4f} | {t['best_round']} | {mark} |"
        )
    return "\n".join(lines) + "\n"


def chosen_overrides(record: dict[str, Any] | str | Path) -> list[str]:
    """The ``--set`` overrides a tuning run chose, from its record or its ``tune.json`` (benchmarks
    apply them with ``fedmtl.config.apply_overrides``)."""
    if not isinstance(record, dict):
        record = json.loads(Path(record).read_text())
    return [f"{k}={v}" for k, v in record["chosen"].items()]
