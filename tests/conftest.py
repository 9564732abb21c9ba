"""Shared fixtures: a local Ray instance for the session, the real photos in ../shared/data/cub_mini and
../shared/data/cub_dev, and a local S3 server (moto) with a fresh bucket per test."""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import tempfile
import uuid
from datetime import timedelta
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CUB_MINI = REPO.parent / "shared" / "data" / "cub_mini"
CUB_DEV = REPO.parent / "shared" / "data" / "cub_dev"  # 1,770 photos of 30 species, CUB layout at its top level

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# S3 goes to the test server only: set before anything starts Ray, so that its workers inherit the variables
S3_PORT = _free_port()
os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1",
                  AWS_ENDPOINT_URL=f"http://127.0.0.1:{S3_PORT}")
for _name in ("AWS_ENDPOINT_URL_S3", "AWS_PROFILE", "AWS_SESSION_TOKEN"):
    os.environ.pop(_name, None)


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray for all tests that need it (2 logical CPUs, fractional CPUs per worker)."""
    import ray

    temp = tempfile.mkdtemp(prefix="rt", dir="/tmp")  # short: Ray's socket paths are length-limited
    ray.init(address="local", num_cpus=2, include_dashboard=False, _temp_dir=temp, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def s3_server():
    """moto's S3 server on 127.0.0.1:S3_PORT (a real HTTP endpoint, as pyarrow and boto3 see one)."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no line per request
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=S3_PORT, verbose=False)
    server.start()
    yield server
    server.stop()


@pytest.fixture
def bucket(s3_server) -> str:
    """``s3://<a new bucket>`` on the test server."""
    import boto3

    name = f"t{uuid.uuid4().hex[:12]}"
    boto3.client("s3").create_bucket(Bucket=name)  # boto3 reads AWS_ENDPOINT_URL
    return f"s3://{name}"


@pytest.fixture(scope="session")
def cub_mini() -> Path:
    if not (CUB_MINI / "CUB_200_2011" / "images.txt").is_file():
        pytest.skip(f"{CUB_MINI} not present")
    return CUB_MINI


@pytest.fixture(scope="session")
def cub_dev() -> Path:
    if not (CUB_DEV / "images.txt").is_file():
        pytest.skip(f"{CUB_DEV} not present")
    return CUB_DEV


def segment_without_ray(config) -> Path:
    """Run the segmentation job's per-shard work in this process (no Ray) and write the manifest."""
    from pipeline.manifest import build_card
    from pipeline.plan import make_plan
    from pipeline.segmenters import create_segmenter
    from pipeline.sources import list_source
    from pipeline.sources.synthetic import part_names
    from pipeline.worker import ShardProcessor
    from schemas.manifest import SegmenterInfo

    config.out.local.mkdir(parents=True)
    listing = list_source(config)
    rows_by_shard: dict[int, list[dict]] = {}
    for row in make_plan(listing, config.shard_size, config.shuffle_seed, config.test_fraction).to_pylist():
        rows_by_shard.setdefault(row["shard"], []).append(row)
    names = part_names(config.synthetic) if config.source == "synthetic" else None
    processor = ShardProcessor(config, "test", names)
    stats = [processor.process(s, rows) for s, rows in sorted(rows_by_shard.items())]
    segmenter = create_segmenter(config.segmenter)
    build_card(config.out, stats, listing.classes, config.source, "test", config.masks_per_image,
               config.crop_size, SegmenterInfo(name=segmenter.name, params=segmenter.params()), config.shuffle_seed)
    return config.out.local


@contextlib.contextmanager
def gloo_group(rank: int, world: int, init_file: str):
    """A gloo process group for one spawned test rank, torn down only once every rank is done."""
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    try:
        yield
    finally:
        dist.barrier()  # no rank tears gloo down while another still uses it
        dist.destroy_process_group()
