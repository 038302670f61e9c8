"""One process of a multi-process selection run (started by tests/test_sharding.py).

    python tests/distributed_worker.py COORDINATOR NUM_PROCESSES PROCESS_ID FEATURES.npy OUT.json

Joins the run with `jax.distributed`, shards the pool's rows over every process's devices and
runs each case of `CASES` with `bilaf_jax.select`; process 0 writes {case: indices}.
"""

import sys

CASES = {
    "random": dict(method="random"),
    "kcenter": dict(method="kcenter"),
    "kmeans": dict(method="kmeans"),
    "activeft": dict(method="activeft", core_options=dict(num_steps=15)),
    "bilaf": dict(num_cores=6, core_options=dict(num_steps=15)),
    "bilaf-official": dict(num_cores=6, core_method="kcenter", mode="official"),
    "bilaf-labeled": dict(num_cores=6, core_options=dict(num_steps=15), labeled=[0, 5, 7]),
}
BUDGET = 48


def main(coordinator, num_processes, process_id, features_path, out_path):
    import jax

    from bilaf_jax.sharding import initialize_distributed, is_main_process, make_mesh, shard_rows

    initialize_distributed(coordinator, int(num_processes), int(process_id))
    import numpy as np

    from bilaf_jax.io import write_json_atomic
    from bilaf_jax.pipeline import select

    pool = shard_rows(np.load(features_path), make_mesh())
    assert len(pool.features.sharding.device_set) == jax.device_count() > jax.local_device_count()
    result = {}
    for name, kwargs in CASES.items():
        out = select(jax.random.key(0), pool.features, BUDGET, num_rows=pool.num_rows, **kwargs)
        result[name] = np.asarray(out.indices).tolist()
    if is_main_process():
        write_json_atomic(out_path, result)


if __name__ == "__main__":
    main(*sys.argv[1:])
