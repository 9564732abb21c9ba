"""Entry script for ``ray submit``: run ``protomask train`` on the cluster this node belongs to.

    ray submit cluster/protomask-gpu.yaml cluster/train_job.py -- \
        --shards /shared/shards/cub --run-dir /shared/runs/cub --num-workers 4 --use-gpu

``--address auto`` attaches to the running cluster (a later ``--address`` in ARGS wins). ``--shards`` and
``--run-dir`` (Ray Train's storage) must be on storage every node can see.
"""

import sys

from protomask.cli import cluster_entry


def run(argv: list[str] | None = None) -> int:
    return cluster_entry("train", sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    sys.exit(run())
