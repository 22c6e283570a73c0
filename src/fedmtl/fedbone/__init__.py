"""FedBone: split learning with a server-side general model, client task heads and GPAggregation.

The ``fedbone`` algorithm is ``fedmtl.algorithms.fedbone``; this package holds its parts:
``fedbone.model`` (the split network, ``model.name: fedbone_net``), ``fedbone.tasks`` and
``fedbone.metrics`` (dense MNIST tasks, dataset ``mnist_dense``). This package imports nothing
heavy, so the data layer can import its task derivation without the algorithm registry."""
