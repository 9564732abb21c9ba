"""Entry script for ``ray submit``: run ``protomask segment`` on the cluster this node belongs to.

    ray submit cluster/protomask-gpu.yaml cluster/segment_job.py -- \
        --source cub --root /shared/data/CUB_200_2011 --out /shared/shards/cub --segmenter sam \
        --checkpoint /shared/weights/sam_vit_h_4b8939.pth

``ray submit`` copies this file to ``~/segment_job.py`` on the head node and runs ``python ~/segment_job.py ARGS``
there, so ``protomask`` must be installed in that python (the cluster YAML's ``setup_commands`` do it). The
arguments are those of ``protomask segment``; ``--address auto`` attaches to the running cluster (a later
``--address`` in ARGS wins). Paths must be on storage every node can see.
"""

import sys

from protomask.cli import cluster_entry


def run(argv: list[str] | None = None) -> int:
    return cluster_entry("segment", sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    sys.exit(run())
