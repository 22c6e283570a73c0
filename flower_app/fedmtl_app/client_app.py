"""ClientApp: runs the algorithm's client step on this SuperNode's partition (see its node_config)."""

from fedmtl.flower import client_app

app = client_app()
