"""``fedmtl`` command line. Bad input exits with status 2 and one line, never a traceback."""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path
from typing import NoReturn

from fedmtl.errors import ConfigError, FedmtlError
from fedmtl.flower import cli as flower_cli


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="fedmtl", description="Federated multi-task learning: simulate, record, report.")
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
    r.add_argument("--out", help="run directory to create (must not exist or be empty)")
    r.add_argument("--data-dir", help="directory with the real datasets (else FEDMTL_DATA, ../shared/data)")
    r.add_argument("--quiet", action="store_true", help="no progress bar")

    s = sub.add_parser("resume", help="continue a killed run from its last checkpoint")
    s.add_argument("run_dir")
    s.add_argument("--quiet", action="store_true")

    rep = sub.add_parser("report", help="write report.html with plots for one or more runs")
    rep.add_argument("run_dirs", nargs="+")
    rep.add_argument("--out", help="directory for report.html (default: the first run directory)")

    c = sub.add_parser("compare", help="print and write a Markdown table across runs")
    c.add_argument("run_dirs", nargs="+")
    c.add_argument("--out", default="compare.md", help="Markdown file to write (default compare.md)")

    d = sub.add_parser("datasets", help="list datasets, where they were found, and their sizes")
    d.add_argument("--data-dir")

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
    t.add_argument(
        "--bracket", action="store_true", help="extend an axis whose choice is at its edge (within --budget)"
    )

    b = sub.add_parser("bench", help="run a benchmark from benchmarks/NAME.py and write its table")
    b.add_argument("name")
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
    res = run(load_config(a.config, overrides), out=a.out)
    _print_result(res)
    return 0


def _print_result(res) -> None:  # noqa: ANN001
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


def _cmd_resume(a: argparse.Namespace) -> int:
    from fedmtl.experiment.run import resume

    res = resume(a.run_dir)
    _print_result(res)
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
    print(table)
    out = Path(a.out)
    out.write_text(table + "\n")
    print(f"written: {out}")
    return 0


def _cmd_datasets(a: argparse.Namespace) -> int:
    from fedmtl.data import list_datasets

    rows = list_datasets(a.data_dir)
    width = max(len(r["name"]) for r in rows)
    for r in rows:
        extra = {k: v for k, v in r.items() if k not in ("name", "location")}
        print(f"{r['name']:<{width}}  {r['location']}  {json.dumps(extra)}")
    return 0


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
    if a.name == "all":
        from fedmtl.experiment.bench_all import run_all

        extra = set(a.args) - {"--quick"}
        if extra:
            raise ConfigError(f"bench all: unknown arguments {sorted(extra)}; allowed: --quick")
        print(f"tables: {run_all(benchmarks_dir(), '--quick' in a.args)}")
        return 0
    path = find_benchmark(a.name)
    spec = importlib.util.spec_from_file_location(f"fedmtl_bench_{a.name}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses in the benchmark look their module up here
    sys.path.insert(0, str(path.parent))
    spec.loader.exec_module(module)
    out = module.main(a.args)
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
    if a.format == "leaf":
        from fedmtl.data.export import write_leaf

        out = write_leaf(data, Path(a.out))
    else:
        provenance = {"data": cfg.data.model_dump(mode="json"), "seed": cfg.seed, "command": command}
        out = write_store(data, Path(a.out), provenance)
    s = data.summary()
    print(
        f"packed {s['clients']} clients ({s['train_samples']} train, {s['test_samples']} test samples) "
        f"into {out} in {time.perf_counter() - t0:.1f} s"
    )
    return 0


def _cmd_tune(a: argparse.Namespace) -> int:
    from fedmtl.experiment.tune import tune

    tune(a.config, a.grid, a.budget, a.overrides, a.seeds, a.out, bracket=a.bracket)
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


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return COMMANDS[args.cmd](args)
    except FedmtlError as exc:
        print(f"fedmtl: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("fedmtl: interrupted; resume with 'fedmtl resume RUN_DIR'", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
