"""A Flower 1.41 app doing exactly the throughput benchmark's FedAvg workload.

Packaged the way a Flower app is (``task.py`` with the model and training code, ``client_app.py``
and ``server_app.py`` exposing ``app``), so the benchmark measures Flower as users run it:
``run_simulation(server_app=server_app.app, client_app=client_app.app, ...)``. ``task.py`` does
not import Flower (from fedmtl it takes only the batch order, so every runner trains on the same
batches); the benchmark's plain PyTorch loop reuses its model and training function.
"""
