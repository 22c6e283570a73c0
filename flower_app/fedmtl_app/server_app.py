"""ServerApp: runs the fedmtl config named in the run config; relative paths are relative to the app."""

from pathlib import Path

from fedmtl.flower import server_app

app = server_app(app_dir=Path(__file__).resolve().parents[1])
