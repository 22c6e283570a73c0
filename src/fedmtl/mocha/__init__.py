"""MOCHA: federated multi-task learning robust to stragglers and dropped nodes (Smith et al. 2017).

Modules: ``losses``/``solver`` (losses and the compiled SDCA kernels), ``omega`` (the task
relationship), ``objectives`` (primal, dual, gap, metrics), ``engine`` (the fast all-tasks driver),
``baselines`` (Global, Local, CoCoA, Mb-SDCA, Mb-SGD), ``timing`` (estimated-time model),
``protocol`` (repeated splits + cross-validation) and ``data`` (stacked multi-task arrays).
The fedmtl algorithm is ``fedmtl.algorithms.mocha.Mocha``. Submodules are imported on demand so
that registering the algorithm does not load the compiler.
"""
