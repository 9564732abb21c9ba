"""Entry script for ``ray submit``: run ``protomask train`` on the cluster this node belongs to.

    ray submit cluster/protomask-gpu.yaml cluster/train_job.py -- \
        --shards /shared/shards/cub --run-dir /shared/runs/cub --num-workers 4 --use-gpu

Needs the ``train`` subcommand of ``protomask`` (written alongside this script; an install without it exits
with argparse's "invalid choice: 'train'", status 2). ``--address auto`` attaches to the running cluster
(a later ``--address`` in ARGS wins). ``--shards`` and ``--run-dir`` (Ray Train's storage) must be on storage
every node can see.
"""

import sys

from protomask.cli import main


def run(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else list(argv)
    if args[:1] == ["--"]:  # tolerate a forwarded "--" separator
        args = args[1:]
    return main(["train", "--address", "auto", *args])


if __name__ == "__main__":
    sys.exit(run())
