"""The exported model, saved and loaded side by side: ``model.pt`` (a plain state dict, loadable with
``torch.load(weights_only=True)``) and ``model_config.json`` (what is needed to rebuild the network)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import torch

from schemas.config import ModelConfig
from schemas.storage import Location, put, read_bytes, read_text, size
from schemas.version import FORMAT_VERSION
from training import TrainError
from training.model import Model, ProtoMask, build_model, own_weights

WEIGHTS, META = "model.pt", "model_config.json"


def export_model(model: Model, config: ModelConfig, classes: list[str], run_dir: Location | Path, *,
                 shards: Location | Path) -> None:
    """Write ``model.pt`` and ``model_config.json`` into ``run_dir`` (a folder or an S3 prefix)."""
    run_dir = Location.parse(run_dir)
    state = {k: v.detach().cpu() for k, v in own_weights(model.state_dict()).items()}
    put(run_dir / WEIGHTS, lambda f: torch.save(state, f))
    meta = {
        "format_version": FORMAT_VERSION,
        "model": config.model_dump(mode="json"),
        "classes": classes,
        "num_prototypes": model.num_prototypes if isinstance(model, ProtoMask) else 0,
        "shards": str(shards),
    }
    put(run_dir / META, json.dumps(meta, indent=1))


def require_run(run_dir: Location | Path) -> None:
    """Refuse a folder that holds no finished training run, naming what is missing."""
    run_dir = Location.parse(run_dir)
    for path in (run_dir / META, run_dir / WEIGHTS):
        if size(path) is None:
            raise TrainError(f"{path}: missing; not a finished training run (`protomask train --run-dir {run_dir}` "
                             "writes it at the end)")


def trained_on(run_dir: Location | Path) -> Location:
    """The shard directory the exported model was trained on (a local path or an S3 prefix)."""
    run_dir = Location.parse(run_dir)
    require_run(run_dir)
    return Location.parse(json.loads(read_text(run_dir / META))["shards"])


def load_model(run_dir: Location | Path) -> tuple[Model, list[str]]:
    """Rebuild the exported model (``model.pt`` + ``model_config.json``) with ``weights_only=True``."""
    run_dir = Location.parse(run_dir)
    require_run(run_dir)
    meta_path, weights_path = run_dir / META, run_dir / WEIGHTS
    meta = json.loads(read_text(meta_path))
    model = build_model(ModelConfig.model_validate(meta["model"]), len(meta["classes"]))
    data = read_bytes(weights_path)
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # unpickling refused, corrupt file
        raise TrainError(f"{weights_path}: cannot load as a plain state dict: {exc}") from exc
    bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise TrainError(f"{weights_path}: non-finite values in {bad}")
    if isinstance(model, ProtoMask) and meta["num_prototypes"] != model.num_prototypes:
        model.prune(torch.arange(model.num_prototypes) < meta["num_prototypes"])
    model.load_state_dict(state)
    return model.eval(), meta["classes"]
