"""One optimiser step is the same on 1 or 2 workers and at any micro-batch size; the linear head; the
memory plan; out-of-memory failures become one clear error."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from conftest import gloo_group
from torch import nn

from schemas.config import ModelConfig, TrainConfig
from training.loop import _wrap, make_optimizers, phase_of, set_trainable, train_one_epoch
from training.memory import activation_bytes_per_image, plan_micro_batch
from training.model import LinearHead, ProtoMask, build_model
from training.train import out_of_memory

TINY = ModelConfig(backbone="convnet", width=4, prototypes_per_class=2, prototype_dim=8, input_size=16)
B, K, C = 8, 3, 3


def _config(**data) -> TrainConfig:
    return TrainConfig.model_validate({"shards": "s", "run_dir": "r", "model": TINY.model_dump(),
                                       "data": {"batch_size": B, **data}})


def _model(seed: int = 0) -> ProtoMask:
    """ProtoMask with a trunk without BatchNorm, so that a batch's gradient does not depend on how it is cut."""
    torch.manual_seed(seed)
    model = ProtoMask(TINY, C)
    model.backbone = nn.Sequential(nn.Conv2d(3, 32, 3, stride=4), nn.ReLU())  # 32 = the convnet's channels
    return model


def _batch(seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    valid = torch.ones(B, K, dtype=torch.bool)
    valid[::3, -1] = False
    return {"crops": torch.randn(B, K, 3, 16, 16, generator=g), "valid": valid,
            "label": torch.arange(B) % C, "key": [f"{i:09d}" for i in range(B)]}


def _step(model: ProtoMask, batches: list[dict], micro_batch: int, net: nn.Module | None = None) -> None:
    config = _config()
    set_trainable(model, "joint", config)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    weights = torch.tensor([0.5, 1.0, 1.5])
    train_one_epoch(model, net or model, batches, optimizer, config, "joint", weights, torch.device("cpu"),
                    micro_batch=micro_batch)


@pytest.mark.parametrize("micro_batch", [1, 3, 5])
def test_micro_batches_accumulate_to_the_whole_batch(micro_batch: int) -> None:
    whole, split = _model(), _model()
    _step(whole, [_batch()], B)
    _step(split, [_batch()], micro_batch)
    for (name, a), b in zip(whole.named_parameters(), split.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    assert not torch.equal(whole.prototypes, _model().prototypes)  # the step did move the prototypes


def _two_rank_step(rank: int, init_file: str, out: str) -> None:
    with gloo_group(rank, 2, init_file):
        model, batch = _model(), _batch()
        share = {k: v[rank * B // 2:(rank + 1) * B // 2] for k, v in batch.items()}
        set_trainable(model, "joint", _config())
        _step(model, [share], micro_batch=2, net=_wrap(model, torch.device("cpu")))
        if rank == 0:
            torch.save(model.state_dict(), out)


def test_two_workers_take_the_same_step_as_one(tmp_path: Path) -> None:
    out = tmp_path / "rank0.pt"
    mp.spawn(_two_rank_step, args=(str(tmp_path / "init"), str(out)), nprocs=2, join=True)
    one = _model()
    _step(one, [_batch()], B)
    for name, value in one.state_dict().items():
        torch.testing.assert_close(torch.load(out)[name], value, rtol=1e-5, atol=1e-6, msg=name)


def test_batch_size_must_split_over_workers() -> None:
    with pytest.raises(ValueError, match="data.batch_size: 64 images per step do not split evenly over num_workers=3"):
        TrainConfig(shards="s", run_dir="r", num_workers=3)


def test_linear_head_is_max_over_valid_crops() -> None:
    torch.manual_seed(0)
    model = LinearHead(TINY.model_copy(update={"head": "linear"}), C).eval()
    crops, valid = torch.randn(2, K, 3, 16, 16), torch.tensor([[True, True, False], [True, False, False]])
    out = model(crops, valid)
    assert out.logits.shape == (2, C) and out.similarities is None
    alone = model(crops[1:, :1], valid[1:, :1]).logits  # the padded crops change nothing
    torch.testing.assert_close(out.logits[1:], alone)
    config = _config().model_copy(update={"model": TINY.model_copy(update={"head": "linear"})})
    assert {phase_of(e, config) for e in range(5)} == {"joint"}
    assert set(make_optimizers(model, config)) == {"joint"}
    assert isinstance(build_model(config.model, C), LinearHead)


def test_micro_batch_follows_the_memory_budget() -> None:
    model = build_model(TINY, C)
    per_image = activation_bytes_per_image(model, _config(), K)
    assert per_image > 3 * 16 * 16 * 4 * K  # at least the conv outputs of every crop
    small = _config(memory_gb=(40 * per_image + 10**6) / 2**30, loader_threads=0)
    assert 1 <= plan_micro_batch(model, small, K, 64, torch.device("cpu")) < 64
    assert plan_micro_batch(model, _config(memory_gb=100.0), K, 64, torch.device("cpu")) == 64
    assert plan_micro_batch(model, _config(micro_batch=5), K, 64, torch.device("cpu")) == 5
    assert plan_micro_batch(model, _config(memory_gb=1e-6), K, 64, torch.device("cpu")) == 1


def test_out_of_memory_is_recognised_through_the_cause_chain() -> None:
    try:
        try:
            raise RuntimeError("Worker unexpectedly exits ... (1) The process is killed by SIGKILL by OOM killer")
        except RuntimeError as inner:
            raise ValueError("training failed") from inner
    except ValueError as outer:
        assert out_of_memory(outer)
    assert out_of_memory(MemoryError())
    assert not out_of_memory(ValueError("shard 00003.tar is truncated"))
