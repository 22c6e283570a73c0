"""``fedmtl`` command line. Bad input exits with status 2 and one line, never a traceback."""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any, NoReturn

from fedmtl import __version__
from fedmtl.errors import ConfigError, FedmtlError
from fedmtl.flower import cli as flower_cli


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="fedmtl", description="Federated multi-task learning: simulate, record, report.")
    p.add_argument("--version", action="version", version=f"fedmtl {__version__}")
    sub = p.add_subparsers(dest="cmd", required=True, parser_class=_Parser)

    r = sub.add_parser("run", help="run a YAML config (defaults: FedAvg on scikit-learn digits)")
    r.add_argument("config", nargs="?", help="YAML config file")
    r.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key, e.g. --set train.lr=0.1 (repeatable)",
    )
    r.add_argument("--out", help="run (or experiment) folder to create (must not exist or be empty)")
    r.add_argument("--data-dir", help="directory with the real datasets (else FEDMTL_DATA, ../shared/data)")
    r.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        metavar="SEED",
        help="one run per seed under one experiment folder (compare/report: mean ± std over seeds)",
    )
    r.add_argument("--quiet", action="store_true", help="no progress bar or per-round lines")

    s = sub.add_parser("resume", help="continue a killed run (or experiment) from its last checkpoint")
    s.add_argument("run_dir")
    s.add_argument("--quiet", action="store_true", help="no progress bar or per-round lines")
    s.add_argument(
        "--accept-mismatch",
        action="store_true",
        help="continue although config.yaml or the data no longer match the checkpoint (recorded in "
        "the run folder's resumes.jsonl)",
    )

    rep = sub.add_parser("report", help="write report.html with plots for one or more runs")
    rep.add_argument("run_dirs", nargs="+")
    rep.add_argument("--out", help="directory for report.html (default: the first run directory)")

    c = sub.add_parser("compare", help="print and write a Markdown table across runs")
    c.add_argument("run_dirs", nargs="+")
    c.add_argument("--out", default="compare.md", help="Markdown file to write (default compare.md)")

    d = sub.add_parser("datasets", help="list datasets, where they were found, and their sizes")
    d.add_argument("--data-dir")
    d.add_argument("--json", action="store_true", help="one JSON object per dataset, every field")

    k = sub.add_parser("pack", help="write a config's federation as a client store (or LEAF data)")
    k.add_argument("config", nargs="?", help="YAML config whose data: section describes the federation")
    k.add_argument("out", help="directory to create (run it with data: {dataset: store|leaf, file: OUT})")
    k.add_argument(
        "--format",
        choices=["store", "leaf"],
        default="store",
        help="store: memory-mapped arrays (fast, any size); leaf: LEAF's train/ and test/ JSON",
    )
    k.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    k.add_argument("--data-dir")

    t = sub.add_parser("tune", help="choose hyper-parameters on validation rows, with a budget")
    t.add_argument("config", nargs="?", help="YAML config (default: the built-in defaults)")
    t.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2",
                   help="values to try for one key (repeatable; the grid is their product)")  # fmt: skip
    t.add_argument(
        "--budget", type=int, required=True, help="most grid points to run (same for every method)"
    )
    t.add_argument("--seeds", type=int, nargs="+", help="seeds each point runs with (default: the config's)")
    t.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    t.add_argument("--out", help="directory for the trials, tune.json and tune.md")

    b = sub.add_parser(
        "bench",
        help="run a benchmark from benchmarks/NAME.py and write its table (--list: all, with durations)",
        description="Full runs write benchmarks/results/; --quick writes into a temporary folder unless "
        "--out names one, so a smoke test never replaces a measured table.",
    )
    b.add_argument("name", nargs="?", help="a benchmark, or 'all'")
    b.add_argument("--list", action="store_true", help="list the benchmarks and how long each takes")
    b.add_argument("args", nargs=argparse.REMAINDER, help="arguments passed to the benchmark")

    m = sub.add_parser("demo", help="the showcase: compare algorithms on embedded data and write a report")
    m.add_argument("--out", help="directory for the runs and report (default: runs/demo-<time>)")

    flower_cli.add_parser(sub)
    return p


def _cmd_run(a: argparse.Namespace) -> int:
    from fedmtl.config import load_config
    from fedmtl.experiment.run import run

    overrides = list(a.overrides)
    if a.data_dir:
        overrides.append(f"data.dir={a.data_dir}")
    if a.quiet:
        overrides.append("output.progress=false")
    cfg = load_config(a.config, overrides)
    if a.seeds is not None:
        from fedmtl.experiment.seeds import run_seeds

        _print_experiment(run_seeds(cfg, a.seeds, out=a.out))
        return 0
    _print_result(run(cfg, out=a.out))
    return 0


def _fmt(row: dict[str, Any], key: str) -> str | None:
    value = row.get(key)
    return f"{value:.4f}" if isinstance(value, int | float) and not isinstance(value, bool) else None


def personal_lines(row: dict[str, Any], metric: str) -> list[str]:
    """What personalisation did, from a round row: the gain of each client's own model over the
    shared one, the share of clients it hurts, and held-out clients before and after adapting."""
    out = []
    gain, shared = _fmt(row, "gain_mean"), _fmt(row, f"shared_{metric}_mean")
    if gain is not None:
        hurt = row.get("gain_negative_frac")
        out.append(
            f"personalised vs shared model: gain {gain} (worst-10% {_fmt(row, 'gain_worst10')})"
            + (f"  shared {metric} {shared}" if shared else "")
            + (f"  clients hurt {hurt:.0%}" if isinstance(hurt, float) else "")
        )
    before, after = _fmt(row, f"new_before_{metric}_mean"), _fmt(row, f"new_after_{metric}_mean")
    if before is not None and after is not None:
        out.append(f"new clients (held out): {metric} {before} before adapting, {after} after")
    return out


def _print_result(res) -> None:  # noqa: ANN001
    from fedmtl.experiment.outputs import footprint

    s = res.summary
    m = s["primary_metric"]
    fin, best = s["final"], s["best"]
    print(f"run: {res.run_dir}")
    print(
        f"final (round {fin['round']}): {m} mean {fin.get(m + '_mean', float('nan')):.4f}"
        + (f"  worst-10% {fin[m + '_worst10']:.4f}" if m + "_worst10" in fin else "")
        + (" (DP-aggregated)" if fin.get("eval_private") else "")
        + (f"  global {fin['global_' + m]:.4f}" if "global_" + m in fin else "")
    )
    print(f"best  (round {best['round']}): {m} mean {best.get(m + '_mean', float('nan')):.4f}")
    for line in personal_lines(fin, m):
        print(line)
    print(f"folder holds {footprint(res.run_dir)}")


def _print_experiment(exp) -> None:  # noqa: ANN001
    doc = exp.summary
    m = doc["primary_metric"]
    final = doc["final"]

    def pm(key: str) -> str:
        v = final.get(key)
        return f"{v['mean']:.4f} ± {v['std']:.4f}" if v else "—"

    for res in exp.runs:
        fin = res.summary["final"]
        print(f"seed {res.summary['seed']}: {res.run_dir}  {m} mean {fin.get(m + '_mean', float('nan')):.4f}")
    print(f"experiment: {exp.path}")
    print(
        f"final over {len(exp.runs)} seeds (mean ± std): {m} mean {pm(m + '_mean')}"
        + (f"  global {pm('global_' + m)}" if "global_" + m in final else "")
    )
    means = {k: v["mean"] for k, v in final.items()}
    for line in personal_lines(means, m):
        print(line + " (means over seeds)")


def _cmd_resume(a: argparse.Namespace) -> int:
    from fedmtl.experiment.run import resume
    from fedmtl.experiment.seeds import is_experiment, resume_seeds

    if is_experiment(a.run_dir):
        _print_experiment(resume_seeds(a.run_dir, accept_mismatch=a.accept_mismatch))
        return 0
    _print_result(resume(a.run_dir, accept_mismatch=a.accept_mismatch))
    return 0


def _cmd_report(a: argparse.Namespace) -> int:
    from fedmtl.experiment.report import write_report

    path = write_report([Path(p) for p in a.run_dirs], Path(a.out) if a.out else None)
    print(f"report: {path}")
    return 0


def _cmd_compare(a: argparse.Namespace) -> int:
    from fedmtl.experiment.report import compare_runs

    dirs = [Path(p) for p in a.run_dirs]
    table = compare_runs(dirs)
    out = Path(a.out)
    out.write_text(table + "\n")  # first: a closed pipe (| head) must not lose the file
    print(table)
    print(f"written: {out}")
    return 0


def _cmd_datasets(a: argparse.Namespace) -> int:
    from fedmtl.data import list_datasets

    rows = list_datasets(a.data_dir)
    if a.json:
        for r in rows:
            print(json.dumps(r))
        return 0
    header = ("name", "kind", "task", "size", "normalize (auto)", "where")
    table = [header] + [
        (
            r["name"],
            r["kind"],
            r["task"],
            _size(r),
            _mode(str(r["normalize"])),
            str(r["location"]) + (f" ({r['error']})" if r.get("error") else ""),
        )
        for r in rows
    ]
    widths = [max(len(row[i]) for row in table[:]) for i in range(len(header) - 1)]
    for row in table:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=False)) + "  " + row[-1])
    from fedmtl.data.datasets import NORMALIZE_NOTES

    print("\nnormalize: " + "; ".join(f"{k}: {v}" for k, v in NORMALIZE_NOTES.items()))
    print("every field: fedmtl datasets --json; more: docs/datasets.md")
    return 0


def _mode(note: str) -> str:
    """``auto: channel (per-channel ...)`` -> ``channel``; longer notes as they are."""
    note = note.removeprefix("auto: ")
    head, sep, _ = note.partition(" (")
    return head if sep and " " not in head else note


def _size(r: dict[str, Any]) -> str:
    if not r.get("found"):
        return "—"
    tasks = f"{r['tasks']} clients, " if r.get("tasks") else ""
    return f"{tasks}{r['samples']} samples x {r['features']} features"


def _benchmark_roots() -> list[Path]:
    """Where benchmarks live: the working directory's ``benchmarks/``, then the checkout's."""
    return [Path.cwd() / "benchmarks", Path(__file__).resolve().parents[2] / "benchmarks"]


def benchmarks_dir() -> Path:
    """The folder ``fedmtl bench all`` runs (the first of the roots that holds benchmarks)."""
    for root in _benchmark_roots():
        if root.is_dir() and any(p for p in root.glob("*.py") if not p.stem.startswith("_")):
            return root
    raise FedmtlError("bench: no benchmarks/ folder here or in the fedmtl checkout; run from the repository")


def find_benchmark(name: str) -> Path:
    candidates = _benchmark_roots()
    for root in candidates:
        path = root / f"{name}.py"
        if path.is_file():
            return path
    known = sorted(
        {
            p.stem
            for root in candidates
            if root.is_dir()
            for p in root.glob("*.py")
            if not p.stem.startswith("_")
        }
    )
    raise FedmtlError(f"bench: unknown benchmark {name!r}; available: {', '.join(known) or 'none found'}")


def _cmd_bench(a: argparse.Namespace) -> int:
    if a.list:
        from fedmtl.experiment.bench_all import listing

        print(listing(benchmarks_dir()))
        return 0
    if a.name is None:
        raise ConfigError("bench: name a benchmark, 'all', or --list to see them")
    if a.name == "all":
        from fedmtl.experiment.bench_all import run_all

        extra = set(a.args) - {"--quick"}
        if extra:
            raise ConfigError(f"bench all: unknown arguments {sorted(extra)}; allowed: --quick")
        print(f"tables: {run_all(benchmarks_dir(), '--quick' in a.args)}")
        return 0
    path = find_benchmark(a.name)
    args = list(a.args)
    if "--quick" in args and not any(x == "--out" or x.startswith("--out=") for x in args):
        from fedmtl.experiment.bench_all import quick_out

        args += ["--out", str(quick_out(a.name))]  # a smoke test never replaces a measured table
    spec = importlib.util.spec_from_file_location(f"fedmtl_bench_{a.name}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses in the benchmark look their module up here
    sys.path.insert(0, str(path.parent))
    spec.loader.exec_module(module)
    out = module.main(args)
    print(f"results: {out}")
    return 0


def _cmd_pack(a: argparse.Namespace) -> int:
    from fedmtl.config import load_config
    from fedmtl.data import load_federated
    from fedmtl.data.store import write_store

    overrides = list(a.overrides) + ([f"data.dir={a.data_dir}"] if a.data_dir else [])
    cfg = load_config(a.config, overrides)
    t0 = time.perf_counter()
    data = load_federated(cfg.data, cfg.seed)
    command = "fedmtl pack " + " ".join(sys.argv[2:]) if sys.argv[1:2] == ["pack"] else "fedmtl.pack"
    provenance = {"data": cfg.data.model_dump(mode="json"), "seed": cfg.seed, "command": command}
    if a.format == "leaf":
        from fedmtl.data.export import write_leaf

        out = write_leaf(data, Path(a.out), provenance=provenance)
    else:
        out = write_store(data, Path(a.out), provenance)
    s = data.summary()
    print(
        f"packed {s['clients']} clients ({s['train_samples']} train, {s['test_samples']} test samples) "
        f"into {out} in {time.perf_counter() - t0:.1f} s"
    )
    return 0


def _cmd_tune(a: argparse.Namespace) -> int:
    from fedmtl.experiment.tune import tune

    tune(a.config, a.grid, a.budget, a.overrides, a.seeds, a.out)
    return 0


def _cmd_demo(a: argparse.Namespace) -> int:
    from fedmtl.experiment.demo import demo

    out = Path(a.out) if a.out else Path("runs") / time.strftime("demo-%Y%m%d-%H%M%S")
    report = demo(out)
    print(f"report: {report}")
    return 0


COMMANDS = {
    "run": _cmd_run,
    "resume": _cmd_resume,
    "report": _cmd_report,
    "compare": _cmd_compare,
    "datasets": _cmd_datasets,
    "pack": _cmd_pack,
    "bench": _cmd_bench,
    "tune": _cmd_tune,
    "demo": _cmd_demo,
    "flower": flower_cli.handle,
}


class _Stderr(logging.StreamHandler):
    """Whatever ``sys.stderr`` is when a record comes (tests and notebooks replace it)."""

    def __init__(self) -> None:
        super().__init__()
        self.setFormatter(logging.Formatter("fedmtl: %(message)s"))

    @property  # type: ignore[override]
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:
        pass


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    # the fedmtl logger to stderr for this command: progress lines and notices (--quiet: warnings)
    logger = logging.getLogger("fedmtl")
    handler, level = _Stderr(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.WARNING if getattr(args, "quiet", False) else logging.INFO)
    try:
        return COMMANDS[args.cmd](args)
    except FedmtlError as exc:
        print(f"fedmtl: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("fedmtl: interrupted; resume with 'fedmtl resume RUN_DIR'", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader went away (fedmtl compare ... | head): not an error of ours
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # so the interpreter's final flush does not fail again
        return 0
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


if __name__ == "__main__":
    sys.exit(main())
