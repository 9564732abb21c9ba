"""The segmentation job: plan the shards, spread them over Ray workers, write the manifest.

One ``ShardWorker`` actor per worker holds one segmenter (one GPU each when the cluster has GPUs).
Shards whose completion marker exists (and whose tar has the size it records) are skipped, so a rerun
only redoes unfinished work; a shard that failed (its worker died, its node was lost, or writing it
raised) is queued again for any live worker, up to ``max_shard_retries`` times. The inputs and the
output may be local or under an s3:// prefix (``schemas.storage``).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
from collections import deque

import pyarrow as pa

from cluster.connect import init_ray
from pipeline.manifest import build_card
from pipeline.plan import make_plan, plan_hash, shard_splits, write_plan
from pipeline.segmenters.base import Segmenter
from pipeline.shards import read_stats
from pipeline.sources import list_source
from schemas.config import SegmentConfig, stable_hash, write_config
from schemas.manifest import (CONFIG_FILE, FLAT_CONFIG_FILE, FLAT_MANIFEST, JOB_DIR, JOB_FILE, MANIFEST, PLAN_FILE,
                              SHARD_DIR, SHARD_FILE, SHARD_TMP, WEBDATASET_DIR, DatasetCard, SegmenterInfo, ShardStats,
                              shard_stem)
from schemas.storage import Location, delete, list_files, makedirs, put, read_text, read_text_if_present, size

log = logging.getLogger("protomask.segment")

SHARDS_IN_FLIGHT = 2  # per worker
PROGRESS_INTERVAL_S = 0.5  # how often a worker reports its images to the progress bar
# what --overwrite removes: the parquet files at the top (SHARD_FILE, which also knows the names of formats 3-5,
# whose shard files all sat there), the manifest (format 6's and the flat formats'), the flat formats' config,
# temp files, and the job's and the tars' folders with everything in them
OTHER_FILES = re.compile(rf"^({'|'.join(map(re.escape, (MANIFEST, FLAT_MANIFEST, FLAT_CONFIG_FILE)))}|\..*\.tmp)$")
OUR_FOLDERS = (JOB_DIR, WEBDATASET_DIR)


def is_ours(name: str, *, folder: bool = False) -> bool:
    """Whether this tool writes ``name`` (``/``-separated, relative to a shard directory): the shard files, the
    manifest, the config and temp files at its top, and the job's and the tars' folders (``folder``: ``name``
    is a local folder) with everything in them."""
    top, below, _ = name.partition("/")
    if below or folder and name in OUR_FOLDERS:
        return top in OUR_FOLDERS
    return bool(SHARD_FILE.match(name) or OTHER_FILES.match(name))


class JobError(RuntimeError):
    """The job cannot start or finish; the message says why and what was kept."""


def _ours(out: Location) -> list[Location]:
    """This tool's files in ``out`` (``is_ours``): locally its top level, each of its folders as one entry; on S3
    every object below the prefix, from one LIST."""
    if out.is_local:
        entries = sorted(out.local.iterdir()) if out.local.is_dir() else []
        return [Location.parse(p) for p in entries if is_ours(p.name, folder=p.is_dir())]
    return [out / name for name in sorted(list_files(out)) if is_ours(name)]


def _prepare_out(config: SegmentConfig, job_hash: str) -> None:
    """Refuse to mix outputs of different configs; ``overwrite`` removes only this tool's files (never another
    file or object, on S3 neither). Then write the config: the first write, so an output that takes none fails
    here, before Ray starts."""
    out = config.out
    if size(out) is not None:
        raise JobError(f"{out}: exists and is not a directory")
    ours = _ours(out)
    if ours and not config.overwrite:
        recorded = read_text_if_present(out / JOB_FILE)
        previous = None if recorded is None else json.loads(recorded).get("job_hash")
        if previous != job_hash:
            raise JobError(
                f"{out} holds shards of a different configuration (job hash {previous} != {job_hash}); "
                "use another --out or pass --overwrite to replace them"
            )
    if config.overwrite:
        for loc in ours:
            shutil.rmtree(loc.local) if loc.is_local and loc.local.is_dir() else delete(loc)
    try:
        makedirs(out / JOB_DIR)
        write_config(config, out / CONFIG_FILE)
    except OSError as exc:
        raise JobError(f"{out}: output directory is not writable: {exc.strerror or exc}") from exc


def _check_segmenter(config: SegmentConfig) -> Segmenter:
    """Build the segmenter once on the driver (no model is loaded: weights load on first use), so a missing
    or wrong checkpoint, or a builder that does not import, fails before Ray starts and before anything is
    written to ``out``. On a cluster the path is checked as the driver sees it (shared storage)."""
    from pipeline.segmenters import create_segmenter

    try:
        return create_segmenter(config.segmenter)
    except (ValueError, OSError, ImportError) as exc:
        raise JobError(f"segmenter {config.segmenter.name}: {exc}") from None


def _require_test_split(config: SegmentConfig, plan: pa.Table) -> None:
    """Refuse a plan without a test input (before anything is written): naming where the splits come
    from and what to change."""
    if "test" in set(plan.column("split").to_pylist()):
        return
    if config.source == "listing":
        where = f"{config.listing}: no row ends in the test split"
        fix = ("mark some rows 'test' in the split column, or leave their split empty (or drop the column) so that "
               f"test_fraction (now {config.test_fraction}) draws a stratified test share from them")
    elif config.source == "imagefolder":
        where = f"{config.root}: no image is in the test split"
        fix = (f"add a test folder ({config.root}/test/<class>/...), or drop the train/val folders so that "
               f"test_fraction (now {config.test_fraction}) draws a stratified test share")
    elif config.source == "cub":
        where = f"{config.root}: train_test_split.txt puts no image in the test split"
        fix = "mark test images with 0 in train_test_split.txt"
    else:
        where = f"{config.root}: the synthetic dataset has no test images"
        fix = "set synthetic.test_per_class > 0"
    if config.source in ("listing", "imagefolder"):
        fix += " (a class with a single image without split stays in train)"
    raise JobError(f"{where}; the job needs a test split: {fix}")


def _resources(config: SegmentConfig) -> tuple[int, dict]:
    import ray

    total = ray.cluster_resources()
    gpus = int(total.get("GPU", 0))
    if gpus or config.segmenter.device == "cuda":  # asking for GPUs lets an autoscaler add GPU nodes
        per_worker = {"num_gpus": 1, "num_cpus": config.cpus_per_worker or 1}
        default_workers = max(gpus, 1)
    else:
        per_worker = {"num_cpus": config.cpus_per_worker or 1}
        default_workers = max(1, int(total.get("CPU", 1) // per_worker["num_cpus"]))
    return config.num_workers or default_workers, per_worker


def run_segment(config: SegmentConfig, address: str | None = None, progress: bool = True) -> DatasetCard:
    """Segment every input of ``config`` into shards under ``config.out``; return the dataset card."""
    segmenter = _check_segmenter(config)
    listing = list_source(config)
    plan = make_plan(listing, config.shard_size, config.shuffle_seed, config.test_fraction)
    _require_test_split(config, plan)
    job_hash = stable_hash({"config": config.output_hash(), "plan": plan_hash(plan, listing.classes)})
    _prepare_out(config, job_hash)
    out = config.out
    if size(out / PLAN_FILE) is None:
        write_plan(plan, listing.classes, out / PLAN_FILE)
    put(out / JOB_FILE, json.dumps({"job_hash": job_hash, "config_hash": config.output_hash()}, indent=1))

    split_of = shard_splits(plan)
    shards = sorted(split_of)
    done = {s: st for s in shards
            if (st := read_stats(out, split_of[s], s)) is not None and st.config_hash == job_hash}
    todo = [s for s in shards if s not in done]
    log.info("%d shards planned, %d finished earlier, %d to do", len(shards), len(done), len(todo))
    info: SegmenterInfo | None = None
    if todo:
        init_ray(address)
        start = time.perf_counter()
        results, info = _dispatch(config, job_hash, plan, todo, listing, progress)
        done.update(results)
        images, seconds = sum(s.count for s in results.values()), time.perf_counter() - start
        log.info("segmented %d images in %.1f s: %.2f images/s (workers started, models loaded and shards "
                 "written included)", images, seconds, images / max(seconds, 1e-9))
    failed = [s for s in shards if s not in done]
    if failed:
        raise JobError(
            f"shards {[shard_stem(split_of[s], s) for s in failed]} failed after {config.max_shard_retries} retries; "
            f"{len(done)} finished shards are kept in {out}; rerun the same command to redo only the failed ones"
        )
    if out.is_local:  # every shard is finished: temp files of writes cut short earlier are garbage (S3 has none)
        for folder in set(SHARD_DIR.values()):  # a temp file sits beside the file it becomes
            for path in (out.local / folder).glob(".*.tmp"):
                if SHARD_TMP.match(path.name):
                    path.unlink(missing_ok=True)
    if info is None:
        info = _segmenter_info(segmenter, out)
    return build_card(
        out, [done[s] for s in shards], listing.classes, config.source, job_hash,
        config.masks_per_image, config.crop_size, info, config.shuffle_seed, max_box_fraction=config.max_box_fraction,
    )


def _segmenter_info(segmenter: Segmenter, out: Location) -> SegmenterInfo:
    """When every shard was finished earlier: the recorded info, else the driver's segmenter's (no model
    is loaded)."""
    try:
        recorded = json.loads(read_text(out / MANIFEST)).get("segmenter")
    except FileNotFoundError:
        recorded = None
    if recorded:
        return SegmenterInfo.model_validate(recorded)
    return SegmenterInfo(name=segmenter.name, params=segmenter.params(),
                         checkpoint_sha256=segmenter.checkpoint_sha256())


def _dispatch(
    config: SegmentConfig, job_hash: str, plan: pa.Table, todo: list[int], listing, progress: bool
) -> tuple[dict[int, ShardStats], SegmenterInfo]:
    import ray
    from ray.exceptions import RayError, RayTaskError
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
    from tqdm import tqdm

    from pipeline.sources.synthetic import part_names

    names = part_names(config.synthetic) if config.source == "synthetic" else None
    rows_by_shard: dict[int, list[dict]] = {}
    for row in plan.to_pylist():
        rows_by_shard.setdefault(row["shard"], []).append(row)
    num_workers, per_worker = _resources(config)
    num_workers = min(num_workers, len(todo))
    # the counter lives on the driver's node: losing a worker node must not lose the progress bar
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    counter = ray.remote(num_cpus=0, scheduling_strategy=here)(ProgressCounter).remote()
    # A worker lost with its node restarts elsewhere (max_restarts=-1) once there is room for it. Its shard
    # fails at once (no Ray-level retries) and goes back to the queue for any live worker, so a lost node
    # costs one attempt of the shards it held, and nothing waits on an actor that cannot be placed yet;
    # the lost worker gets shards again only after it answers a ping. Writes are atomic and
    # byte-identical, so a shard that ran twice (a worker only cut off, not dead) is harmless.
    worker_cls = ray.remote(max_restarts=-1, max_task_retries=0, **per_worker)(ShardWorker)
    workers = [worker_cls.remote(config.model_dump(mode="json"), job_hash, names) for _ in range(num_workers)]
    info = SegmenterInfo.model_validate(ray.get(workers[0].info.remote()))
    log.info("segmenting %d shards on %d workers (%s each)", len(todo), num_workers, per_worker)

    queue, attempts = deque(todo), {s: 0 for s in todo}
    # each worker holds SHARDS_IN_FLIGHT shards (its actor runs them in order), so it starts the next
    # one as soon as it finishes one, without waiting for the driver to hand it out
    idle, running, results = list(workers) * SHARDS_IN_FLIGHT, {}, {}
    pings: dict = {}  # ping ref -> worker that lost a shard: back to idle once it answers
    later: list = []  # (time, worker): ping again then (its last ping failed)
    waiting = False  # every worker lost (warned once)
    total = sum(len(rows_by_shard[s]) for s in todo)
    bar = tqdm(total=total, unit="img", disable=None if progress else True, smoothing=0.1, desc="segment",
               leave=False)  # None: a bar on a terminal only
    seen = 0
    while queue or running:
        while queue and idle:
            shard, worker = queue.popleft(), idle.pop()
            running[worker.process.remote(shard, rows_by_shard[shard], counter)] = (shard, worker)
        now = time.monotonic()
        for when, worker in [w for w in later if w[0] <= now]:
            later.remove((when, worker))
            pings[worker.ping.remote()] = worker
        if queue and not idle and not running and not waiting:
            log.warning("every worker is lost; waiting for the cluster to place them again")
        waiting = bool(queue and not idle and not running)
        if refs := list(running) + list(pings):
            ready, _ = ray.wait(refs, num_returns=1, timeout=0.5)
        else:  # every worker is lost and none answers yet
            ready = []
            time.sleep(0.5)
        count = ray.get(counter.get.remote())
        bar.update(count - seen)
        seen = count
        for ref in ready:
            if ref in pings:
                worker = pings.pop(ref)
                try:
                    ray.get(ref)
                    idle.append(worker)
                except RayError:
                    later.append((time.monotonic() + 1.0, worker))
                continue
            shard, worker = running.pop(ref)
            try:
                results[shard] = ShardStats.model_validate(ray.get(ref))
                idle.append(worker)
                continue
            except RayTaskError as exc:  # the shard raised (e.g. the disk is full): the worker is fine
                idle.append(worker)
                error = exc
            except RayError as exc:  # the worker died or is cut off (its node lost): ping it before reuse
                pings[worker.ping.remote()] = worker
                error = exc
            attempts[shard] += 1
            log.warning("shard %s failed (attempt %d): %s", shard_stem(rows_by_shard[shard][0]["split"], shard),
                        attempts[shard], error)
            if attempts[shard] <= config.max_shard_retries:
                queue.append(shard)
    bar.close()
    for worker in workers:
        ray.kill(worker)
    ray.kill(counter)
    return results, info


class ShardWorker:
    """Ray actor body: one segmenter per worker process."""

    def __init__(self, config: dict, job_hash: str, part_names: list[str] | None) -> None:
        import torch

        from pipeline.worker import ShardProcessor

        cpus = max(1, int(os.environ.get("OMP_NUM_THREADS", "1") or 1))
        torch.set_num_threads(cpus)
        self.processor = ShardProcessor(SegmentConfig.model_validate(config), job_hash, part_names)

    def ping(self) -> bool:
        return True

    def info(self) -> dict:
        seg = self.processor.segmenter
        return {"name": seg.name, "params": seg.params(), "checkpoint_sha256": seg.checkpoint_sha256()}

    def process(self, shard: int, rows: list[dict], counter) -> dict:
        # images are reported in batches: one actor call per image cost the counter's process 16 % of a
        # core at 40 images/s (bench/p2), taken from the segmenters on a small machine
        unsent, sent_at = 0, time.monotonic()

        def on_image() -> None:
            nonlocal unsent, sent_at
            unsent += 1
            if time.monotonic() - sent_at >= PROGRESS_INTERVAL_S:
                counter.add.remote(unsent)
                unsent, sent_at = 0, time.monotonic()

        stats = self.processor.process(shard, rows, on_image=on_image)
        if unsent:
            counter.add.remote(unsent)
        return stats.model_dump()


class ProgressCounter:
    """Ray actor body: images processed so far, for the driver's progress bar."""

    def __init__(self) -> None:
        self.count = 0

    def add(self, n: int) -> None:
        self.count += n

    def get(self) -> int:
        return self.count
