"""``fedmtl flower``: the exact commands for a local Flower deployment, or the deployment itself.

``fedmtl flower local`` prints (or ``--write``s as scripts) the SuperLink, SuperNode, federation and
``flwr run`` commands for a config, so people can run them in their own terminals and adapt them to
real machines. ``fedmtl flower run`` starts the same processes on loopback, runs the config, stops
every process it started and prints where the results are. Importing this module does not import
``flwr``, so the main CLI stays fast and works without the extra."""

from __future__ import annotations

import argparse
import importlib.util
import json
import shlex
import tempfile
from pathlib import Path
from typing import Any

from fedmtl.errors import ConfigError, FedmtlError
from fedmtl.flower import local

ENV_LINE = "export FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1 FLWR_SUPEREXEC_TASK_POLL_INTERVAL=0.1"


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``fedmtl flower {local,run}`` on the main CLI's subparsers."""
    f = subparsers.add_parser("flower", help="run a config on the Flower deployment engine (fedmtl[flower])")
    sub = f.add_subparsers(dest="flower_cmd", required=True, metavar="{local,run,split}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "config", nargs="?", help="fedmtl YAML config (default: the Flower app's fedmtl.yaml)"
    )
    common.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key (repeatable), passed to the ServerApp")  # fmt: skip
    common.add_argument(
        "--nodes", type=int, help="SuperNodes, one per client (default: the config's clients)"
    )
    common.add_argument("--app", help="the Flower app directory (default: flower_app/ of this checkout)")
    common.add_argument(
        "--out", help="run directory the ServerApp writes (default: output.dir/<name>-<time>)"
    )
    common.add_argument("--round-timeout", type=float, help="seconds to wait for one round's replies")
    common.add_argument(
        "--node-data",
        metavar="DIR",
        help="folders written by 'fedmtl flower split': node i reads only DIR/node-i, the server only "
        "DIR/federation.json",
    )

    lo = sub.add_parser("local", parents=[common], help="print the commands for a local deployment")
    lo.add_argument("--port", type=int, default=8000, help="SuperLink port (SuperNodes use 9094, 9095, ...)")
    lo.add_argument("--home", default=".flwr-home", help="base folder for the processes' FLWR_HOMEs")
    lo.add_argument("--write", metavar="DIR", help="also write them as scripts into DIR")

    r = sub.add_parser("run", parents=[common], help="start a loopback deployment, run, and stop it")
    r.add_argument("--workdir", help="keep Flower's homes and logs here (default: a temporary folder)")
    r.add_argument("--timeout", type=float, default=3600.0, help="seconds before the run is abandoned")

    sp = sub.add_parser("split", help="write one data folder per node and the server's federation.json")
    sp.add_argument("config", help="fedmtl YAML config whose data: section describes the federation")
    sp.add_argument("out", help="directory to create: federation.json, node-<i>/client.npz")
    sp.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    sp.add_argument("--data-dir", help="where the dataset's files are (default: data.dir, FEDMTL_DATA)")
    return f


def handle(a: argparse.Namespace) -> int:
    """Entry point for ``fedmtl flower ...`` (the main CLI maps the ``flower`` command here)."""
    return {"local": _cmd_local, "run": _cmd_run, "split": _cmd_split}[a.flower_cmd](a)


# ------------------------------------------------------------------------------------ helpers
def find_app(explicit: str | None = None) -> Path:
    """The Flower app directory: ``--app``, ./flower_app, or flower_app/ next to this source tree."""
    from fedmtl.data.paths import REPO_ROOT

    candidates = [Path(explicit)] if explicit else [Path.cwd() / "flower_app", REPO_ROOT / "flower_app"]
    for path in candidates:
        if (path / "pyproject.toml").is_file():
            return path.resolve()
    where = ", ".join(str(p) for p in candidates)
    raise ConfigError(f"flower: no Flower app (pyproject.toml) found in {where}; pass --app DIR")


def _run_config(a: argparse.Namespace) -> dict[str, Any]:
    rc: dict[str, Any] = {}
    if a.config:
        path = Path(a.config)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        rc["config"] = str(path.resolve())
    overrides = list(a.overrides)
    if a.node_data:
        desc = _node_data(a.node_data)
        overrides.append(f"data={{dataset: federation, file: {json.dumps(str(desc))}}}")
    if overrides:
        rc["overrides"] = "; ".join(overrides)
    if a.out:
        rc["out"] = str(Path(a.out).resolve())
    if a.round_timeout is not None:
        rc["round-timeout"] = float(a.round_timeout)
    return rc


def _node_data(folder: str) -> Path:
    """``--node-data DIR``: its federation.json (checked here, before any process starts)."""
    from fedmtl.data.description import FILE, load_described

    desc = Path(folder).resolve() / FILE
    load_described(desc)
    return desc


def _node_configs(a: argparse.Namespace, nodes: int) -> list[dict[str, Any]]:
    """Node i holds client i: from the whole dataset (partition-id), or only its folder (--node-data)."""
    if a.node_data:
        root = Path(a.node_data).resolve()
        return [{"partition-id": i, "data-path": str(root / f"node-{i}")} for i in range(nodes)]
    return [{"partition-id": i, "num-partitions": nodes} for i in range(nodes)]


def _num_nodes(a: argparse.Namespace, app: Path) -> int:
    """One SuperNode per client of the config (loading the data, which also validates it)."""
    if a.nodes is not None:
        if a.nodes < 1:
            raise ConfigError(f"--nodes = {a.nodes}: must be at least 1")
        return int(a.nodes)
    if a.node_data:
        from fedmtl.data.description import load_described

        return load_described(_node_data(a.node_data)).num_clients
    from fedmtl.config import load_config
    from fedmtl.data import load_federated

    cfg = load_config(a.config or app / "fedmtl.yaml", a.overrides)
    return load_federated(cfg.data, cfg.seed).num_clients


def _rc_arg(rc: dict[str, Any]) -> str:
    return " ".join(f"{k}={local._toml_value(v)}" for k, v in rc.items())


def local_commands(
    app: Path,
    nodes: int,
    rc: dict[str, Any],
    port: int = 8000,
    home: str = ".flwr-home",
    node_configs: list[dict[str, Any]] | None = None,
) -> str:
    """The shell commands for one SuperLink and ``nodes`` SuperNodes on this machine, then the run."""
    base = Path(home).resolve()
    link = f"127.0.0.1:{port}"
    lines = [
        f"# fedmtl on Flower: 1 SuperLink + {nodes} SuperNodes on 127.0.0.1 (insecure: loopback only).",
        "# Run each numbered command in its own terminal; fedmtl[flower] must be installed.",
        ENV_LINE,
        "",
        f"# 1. SuperLink: Fleet, Control and Runtime APIs over HTTP on {link}",
        f"FLWR_HOME={shlex.quote(str(base / 'superlink'))} " + shlex.join(local.superlink_cmd(port)),
        "",
        "# 2. SuperNodes: one per client; partition-id names the client, data-path (if given) its files",
    ]
    configs = node_configs or [{"partition-id": i, "num-partitions": nodes} for i in range(nodes)]
    for i in range(nodes):
        cmd = local.supernode_cmd(link, 9094 + i, configs[i])
        lines.append(f"FLWR_HOME={shlex.quote(str(base / f'supernode-{i}'))} " + shlex.join(cmd))
    cli_home = base / "cli"
    lines += [
        "",
        "# 3. The federation entry for the flwr CLI",
        f"mkdir -p {shlex.quote(str(cli_home))}",
        f"cat > {shlex.quote(str(cli_home / 'config.toml'))} <<'EOF'",
        local.federation_toml(link).rstrip(),
        "EOF",
        "",
        "# 4. Run the config; results land in the run directory the ServerApp prints",
    ]
    run = ["flwr", "run", str(app), local.FEDERATION, "--stream"] + (
        ["--run-config", _rc_arg(rc)] if rc else []
    )
    lines.append(f"FLWR_HOME={shlex.quote(str(cli_home))} " + shlex.join(run))
    return "\n".join(lines) + "\n"


def write_scripts(
    folder: Path,
    app: Path,
    nodes: int,
    rc: dict[str, Any],
    port: int = 8000,
    node_configs: list[dict[str, Any]] | None = None,
) -> list[Path]:
    """The same commands as executable scripts in ``folder`` (homes under ``folder/flwr-home``)."""
    folder.mkdir(parents=True, exist_ok=True)
    home = (folder / "flwr-home").resolve()
    link = f"127.0.0.1:{port}"
    head = f"#!/usr/bin/env bash\nset -euo pipefail\n{ENV_LINE}\n"
    scripts = {"superlink.sh": f"export FLWR_HOME={shlex.quote(str(home / 'superlink'))}\n"
               f"exec {shlex.join(local.superlink_cmd(port))}\n"}  # fmt: skip
    configs = node_configs or [{"partition-id": i, "num-partitions": nodes} for i in range(nodes)]
    for i in range(nodes):
        cmd = local.supernode_cmd(link, 9094 + i, configs[i])
        scripts[f"supernode-{i}.sh"] = (
            f"export FLWR_HOME={shlex.quote(str(home / f'supernode-{i}'))}\nexec {shlex.join(cmd)}\n"
        )
    (home / "cli").mkdir(parents=True, exist_ok=True)
    (home / "cli" / "config.toml").write_text(local.federation_toml(link))
    rc_file = folder / "run-config.toml"
    rc_file.write_text(local.run_config_toml(rc))
    run = local.flwr_run_cmd(app, local.FEDERATION, str(rc_file.resolve()) if rc else None)
    scripts["run.sh"] = f"export FLWR_HOME={shlex.quote(str(home / 'cli'))}\nexec {shlex.join(run)}\n"
    paths = []
    for name, body in scripts.items():
        path = folder / name
        path.write_text(head + body)
        path.chmod(0o755)
        paths.append(path)
    return paths


def _cmd_local(a: argparse.Namespace) -> int:
    app = find_app(a.app)
    rc = _run_config(a)
    nodes = _num_nodes(a, app)
    configs = _node_configs(a, nodes)
    print(local_commands(app, nodes, rc, a.port, a.home, configs), end="")
    if a.write:
        paths = write_scripts(Path(a.write), app, nodes, rc, a.port, configs)
        print(f"# written: {', '.join(str(p) for p in paths)}")
    return 0


def _cmd_run(a: argparse.Namespace) -> int:
    if importlib.util.find_spec("flwr") is None:
        raise FedmtlError(
            "flower: Flower is not installed; install fedmtl's 'flower' extra (pip install '.[flower]' in "
            "the fedmtl clone)"
        )
    app = find_app(a.app)
    rc = _run_config(a)
    nodes = _num_nodes(a, app)
    with tempfile.TemporaryDirectory(prefix="fedmtl-flower-") as tmp:
        work = Path(a.workdir or tmp)
        rc.setdefault("out", str((Path.cwd() / "runs" / f"flower-{Path(tmp).name}").resolve()))
        configs = _node_configs(a, nodes)
        with local.LocalFederation(work, configs) as fed:
            fed.start()
            print(
                f"flower: SuperLink on {fed.address}, {nodes} SuperNodes; logs in {work / 'logs'}", flush=True
            )
            proc = fed.run(app, rc, timeout=a.timeout)
            summary_path = Path(rc["out"]) / "summary.json"
            if proc.returncode != 0 or not summary_path.is_file():
                reason = [x for x in proc.stdout.splitlines() if "[fedmtl] error: " in x]
                if reason:  # the ServerApp's one line (bad input), without Flower's traceback
                    raise FedmtlError(f"flower: {reason[-1].split('[fedmtl] error: ', 1)[1]}")
                tail = "\n".join(proc.stdout.splitlines()[-30:])
                raise local.DeploymentError(
                    f"flower: the run failed (flwr run exit {proc.returncode}):\n{tail}"
                )
    summary = json.loads(summary_path.read_text())
    m, fin = summary["primary_metric"], summary["final"]
    print(f"run: {rc['out']}")
    print(f"final (round {fin['round']}): {m} mean {fin.get(m + '_mean', float('nan')):.4f}"
          + (f"  global {fin['global_' + m]:.4f}" if "global_" + m in fin else ""))  # fmt: skip
    return 0


def _cmd_split(a: argparse.Namespace) -> int:
    """Write each client's rows to its own folder and the server's description beside them."""
    from fedmtl.config import load_config
    from fedmtl.data import load_federated
    from fedmtl.data.description import write_node_folders

    overrides = list(a.overrides) + ([f"data.dir={a.data_dir}"] if a.data_dir else [])
    cfg = load_config(a.config, overrides)
    data = load_federated(cfg.data, cfg.seed)
    command = " ".join(["fedmtl flower split", a.config, a.out, *(f"--set {o}" for o in a.overrides)])
    provenance = {"data": cfg.data.model_dump(mode="json"), "seed": cfg.seed, "command": command}
    out = write_node_folders(data, Path(a.out), provenance).resolve()
    n = data.num_clients
    print(f"wrote {out / 'federation.json'} (the server's part: no samples) and {n} node folders")
    print(f'server: --set "data={{dataset: federation, file: {out / "federation.json"}}}"')
    print(f"node i: --node-config 'partition-id=i data-path=\"{out}/node-i\"' (copy node-i to site i)")
    return 0
