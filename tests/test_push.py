"""Push (global nearest, padding, parity bug, 2-rank gloo agreement) and pruning (spec §3)."""

from __future__ import annotations


import pytest
import torch
import torch.multiprocessing as mp
from conftest import gloo_group

from schemas.config import ModelConfig
from training.model import ProtoMask
from training.push import prune_prototypes, push_distinct, push_prototypes

TINY = ModelConfig(backbone="convnet", width=4, prototype_dim=8, input_size=16, prototypes_per_class=2)
CPU = torch.device("cpu")


def make_model(seed: int = 0, classes: int = 3) -> ProtoMask:
    """A tiny model whose embeddings are spread out: with untouched BatchNorm statistics a random
    convnet maps every crop to almost the same vector (distances ~1e-10, below float rounding), so the
    BatchNorm statistics are calibrated on fixed random crops and the add-on conv is scaled up."""
    torch.manual_seed(seed)
    model = ProtoMask(TINY, num_classes=classes)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.momentum = None  # cumulative average
    with torch.no_grad():
        for batch in make_batches(seed=99, n_batches=2, b=4):
            model.embed(batch["crops"])
        model.add_on[0].weight.mul_(5)
    return model.eval()


def make_batches(seed: int = 1, n_batches: int = 4, b: int = 3, k: int = 3, classes: int = 3) -> list[dict]:
    """Random crops; labels cycle over the classes; some crops padded (every image keeps crop 0)."""
    g = torch.Generator().manual_seed(seed)
    batches, i = [], 0
    for _ in range(n_batches):
        valid = torch.rand(b, k, generator=g) > 0.3
        valid[:, 0] = True
        labels = torch.tensor([(i + r) % classes for r in range(b)])
        keys = [f"img{i + r:03d}" for r in range(b)]
        crops = torch.rand(b, k, 3, 16, 16, generator=g)
        batches.append({"crops": crops, "valid": valid, "label": labels, "key": keys})
        i += b
    return batches


def brute_force(model: ProtoMask, batches: list[dict]) -> list[tuple[str, int, float, torch.Tensor]]:
    """Per prototype: (key, mask, distance, embedding) of the nearest valid own-class crop over all data."""
    rows = []
    with torch.no_grad():
        for batch in batches:
            z = model.embed(batch["crops"])
            for i, key in enumerate(batch["key"]):
                for m in range(z.shape[1]):
                    if batch["valid"][i, m]:
                        rows.append((key, m, int(batch["label"][i]), z[i, m]))
    best = []
    protos = model.prototypes.detach()
    for j, c in enumerate(model.prototype_class.tolist()):
        own = [(float(((z - protos[j]) ** 2).sum()), key, m, z) for key, m, label, z in rows if label == c]
        d, key, m, z = min(own, key=lambda r: (r[0], r[1], r[2]))
        best.append((key, m, d, z))
    return best


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_push_picks_the_global_nearest_across_batches(device: str) -> None:
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    model, batches = make_model(), make_batches()
    expected = brute_force(model, batches)
    model.to(device)
    log = push_prototypes(model, batches, torch.device(device))
    assert [(e["key"], e["mask_index"]) for e in log] == [(key, m) for key, m, _, _ in expected]
    for e, (_, _, d, z) in zip(log, expected):
        assert abs(e["distance"] - d) < 1e-4
        assert torch.allclose(model.prototypes[e["prototype"]].cpu(), z, atol=1e-5)
    assert model.prototypes.device.type == device
    assert [e["class"] for e in log] == model.prototype_class.tolist()
    assert not model.training


def test_after_push_every_prototype_sits_on_a_crop_of_its_class() -> None:
    model, batches = make_model(), make_batches(seed=5)
    log = push_prototypes(model, batches, CPU)
    by_key = {key: (batch, i) for batch in batches for i, key in enumerate(batch["key"])}
    with torch.no_grad():
        for e in log:
            batch, i = by_key[e["key"]]
            assert int(batch["label"][i]) == e["class"] and bool(batch["valid"][i, e["mask_index"]])
            z = model.embed(batch["crops"][i : i + 1])[0, e["mask_index"]]
            assert torch.allclose(model.prototypes[e["prototype"]], z, atol=1e-6)
            assert float(model.distances(z[None, None])[0, 0, e["prototype"]]) < 1e-5


def test_padded_crop_is_never_chosen_even_when_nearest() -> None:
    model, batches = make_model(), make_batches(n_batches=2, b=3)
    batches[1]["valid"][:, 2] = False
    with torch.no_grad():
        z = model.embed(batches[1]["crops"])
        for j, c in enumerate(model.prototype_class.tolist()):
            i = int((batches[1]["label"] == c).nonzero()[0])
            model.prototypes[j] = z[i, 2]  # the padded crop of an own-class image: distance 0
    log = push_prototypes(model, batches, CPU)
    padded = {(batches[1]["key"][i], 2) for i in range(3)}
    for batch in batches:
        padded |= {(batch["key"][i], m) for i, m in (~batch["valid"]).nonzero().tolist()}
    assert all((e["key"], e["mask_index"]) not in padded for e in log)
    assert all(e["distance"] > 1e-6 for e in log)


def test_class_without_training_images_keeps_its_prototypes() -> None:
    model, batches = make_model(), make_batches()
    for batch in batches:
        batch["label"] = batch["label"] % 2  # class 2 never appears
    before = model.prototypes.detach().clone()
    log = push_prototypes(model, batches, CPU)
    for e in log:
        if e["class"] == 2:
            assert e["key"] is None and e["mask_index"] is None and e["distance"] == float("inf")
            assert torch.equal(model.prototypes[e["prototype"]], before[e["prototype"]])
        else:
            assert e["key"] is not None


def brute_force_distinct(model: ProtoMask, batches: list[dict]) -> list[tuple[str, int]]:
    """Per prototype the (key, mask) push_distinct must choose: prototypes nearest first take their nearest
    own-class crop still free."""
    rows = []
    with torch.no_grad():
        for batch in batches:
            z = model.embed(batch["crops"])
            rows += [(key, m, int(batch["label"][i]), z[i, m]) for i, key in enumerate(batch["key"])
                     for m in range(z.shape[1]) if batch["valid"][i, m]]
    protos = model.prototypes.detach()
    options = [sorted((float(((z - protos[j]) ** 2).sum()), key, m) for key, m, label, z in rows if label == c)
               for j, c in enumerate(model.prototype_class.tolist())]
    chosen, taken = {}, set()
    for j in sorted(range(len(options)), key=lambda j: (options[j][0][0], j)):
        _, key, m = next(o for o in options[j] if o[1:] not in taken)
        taken.add((key, m))
        chosen[j] = (key, m)
    return [chosen[j] for j in range(len(options))]


def test_distinct_push_never_puts_two_prototypes_on_one_crop() -> None:
    model = make_model()
    batches = make_batches(seed=5)
    with torch.no_grad():  # both prototypes of each class start on the same own-class crop: one must move on
        z = model.embed(batches[0]["crops"])
        for j, c in enumerate(model.prototype_class.tolist()):
            i = int((batches[0]["label"] == c).nonzero()[0])
            model.prototypes[j] = z[i, 0]
    expected = brute_force_distinct(model, batches)
    log = push_distinct(model, batches, CPU)
    chosen = [(e["key"], e["mask_index"]) for e in log]
    assert chosen == expected and len(set(chosen)) == len(chosen)
    # one prototype per class keeps its crop: distance 0 up to float rounding (2.4e-7 on some CPUs)
    assert sum(e["distance"] < 1e-5 for e in log) == 3
    by_key = {key: (batch, i) for batch in batches for i, key in enumerate(batch["key"])}
    with torch.no_grad():
        for e in log:
            batch, i = by_key[e["key"]]
            assert int(batch["label"][i]) == e["class"] and bool(batch["valid"][i, e["mask_index"]])
            assert torch.allclose(model.prototypes[e["prototype"]], model.embed(batch["crops"][i:i + 1])[0, e["mask_index"]],
                                  atol=1e-6)


def _controlled(model: ProtoMask) -> ProtoMask:
    """Embedding = the first 8 values of the crop's first row (hand-made embeddings)."""
    model.embed = lambda crops, valid=None: crops[:, :, 0, 0, :8].clone()  # type: ignore[method-assign]
    return model


def _batch(embeddings: torch.Tensor, labels: list[int], keys: list[str], valid: torch.Tensor | None = None) -> dict:
    b, k, _ = embeddings.shape
    crops = torch.zeros(b, k, 3, 16, 16)
    crops[:, :, 0, 0, :8] = embeddings
    valid = torch.ones(b, k, dtype=torch.bool) if valid is None else valid
    return {"crops": crops, "valid": valid, "label": torch.tensor(labels), "key": keys}


def test_parity_mode_keeps_the_last_batch_nearest() -> None:
    e = torch.eye(8)
    model = _controlled(make_model())
    with torch.no_grad():
        model.prototypes[:] = e[model.prototype_class]  # class c prototypes at e_c
    near = torch.stack([e[0], e[5]])  # class-0 image of batch 0: crop 0 exactly on e_0
    far = torch.stack([e[0] + 0.5 * e[3], e[0] + 0.7 * e[4]])  # class-0 image of batch 1: farther
    batches = [
        _batch(torch.stack([near, e[[1, 6]]]), [0, 1], ["a", "b"]),
        _batch(torch.stack([far, e[[2, 7]]]), [0, 2], ["c", "d"]),
        _batch(torch.stack([e[[1, 1]] * 0.9, e[[6, 7]]]), [1, 1], ["e", "f"]),  # no class 0 here
    ]
    start = model.prototypes.detach().clone()
    fixed = push_prototypes(model, batches, CPU)
    with torch.no_grad():
        model.prototypes[:] = start
    parity = push_prototypes(model, batches, CPU, last_batch_parity=True)
    assert (fixed[0]["key"], fixed[0]["mask_index"], fixed[0]["distance"]) == ("a", 0, 0.0)
    assert (parity[0]["key"], parity[0]["mask_index"]) == ("c", 0)  # last batch holding class 0
    assert abs(parity[0]["distance"] - 0.25) < 1e-6
    assert torch.allclose(model.prototypes[0], far[0])
    # class 1: fixed takes batch 0's exact e_1, parity the last batch's (0.9·e_1, distance 0.01)
    assert (fixed[2]["key"], parity[2]["key"]) == ("b", "e") and abs(parity[2]["distance"] - 0.01) < 1e-6


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_prune_removes_prototypes_whose_nearest_images_are_of_another_class(device: str) -> None:
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    e = torch.eye(8)
    model = _controlled(make_model())
    with torch.no_grad():
        model.prototypes[:] = e[model.prototype_class]
        model.prototypes[1] = e[2]  # class-0 prototype sitting among the class-2 images
        model.last_layer.weight[:, 1] = torch.tensor([1.0, 0.25, -0.5])
    weight, identity = model.last_layer.weight.detach().clone(), model.prototype_class.clone()
    g = torch.Generator().manual_seed(0)
    batches = []
    for i, c in enumerate([0, 1, 2, 0, 1, 2, 0, 1, 2]):
        z = e[c] + 0.05 * torch.rand(1, 2, 8, generator=g)
        valid = torch.tensor([[True, True]])
        if c == 0:  # a padded crop exactly on e_2: would make class-0 images nearest to class-2 prototypes
            z[0, 1], valid[0, 1] = e[2], False
        batches.append(_batch(z, [c], [f"k{i}"], valid))
    result = prune_prototypes(model.to(device), [_cat(batches[:4]), _cat(batches[4:])], torch.device(device), 3, 2)
    assert result == {"pruned": [1], "kept": 5}
    keep = torch.tensor([True, False, True, True, True, True])
    assert model.prototypes.shape == (5, 8) and model.prototype_class.tolist() == identity[keep].tolist()
    assert model.last_layer.weight.shape == (3, 5) and torch.equal(model.last_layer.weight.cpu(), weight[:, keep])
    assert model.prototypes.device.type == model.prototype_class.device.type == device
    out = model(torch.rand(2, 2, 3, 16, 16, device=device), torch.ones(2, 2, dtype=torch.bool, device=device))
    assert out.logits.shape == (2, 3)


def _cat(batches: list[dict]) -> dict:
    return {
        "crops": torch.cat([b["crops"] for b in batches]),
        "valid": torch.cat([b["valid"] for b in batches]),
        "label": torch.cat([b["label"] for b in batches]),
        "key": [k for b in batches for k in b["key"]],
    }


# --- two ranks with gloo: same choice as one process over all the data ---------------------------


def _rank_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    with gloo_group(rank, world, init_file):
        model = make_model()
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        mine = make_batches(seed=3, n_batches=6)[rank::world]  # disjoint halves
        log = push_prototypes(ddp, mine, CPU)
        pushed = model.prototypes.detach().clone()
        pruned = prune_prototypes(ddp, mine, CPU, k=3, threshold=2)
        parity = push_prototypes(make_model(), mine, CPU, last_batch_parity=True)
        distinct = push_distinct(torch.nn.parallel.DistributedDataParallel(make_model()), mine, CPU)
        torch.save(
            {"log": log, "pushed": pushed, "pruned": pruned, "class": model.prototype_class, "parity": parity,
             "distinct": distinct},
            f"{out_dir}/{rank}.pt",
        )


def test_two_gloo_ranks_agree_with_one_process(tmp_path) -> None:
    mp.spawn(_rank_worker, args=(2, str(tmp_path / "pg"), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"{r}.pt", weights_only=False) for r in range(2)]

    model, batches = make_model(), make_batches(seed=3, n_batches=6)
    expected = brute_force(model, batches)
    log = push_prototypes(model, batches, CPU)
    pushed = model.prototypes.detach().clone()
    pruned = prune_prototypes(model, batches, CPU, k=3, threshold=2)

    assert [(e["key"], e["mask_index"]) for e in log] == [(key, m) for key, m, _, _ in expected]
    assert 0 < len(pruned["pruned"]) < len(log)  # a meaningful prune case: some go, some stay
    for r in ranks:
        assert [(e["key"], e["mask_index"]) for e in r["log"]] == [(e["key"], e["mask_index"]) for e in log]
        assert all(abs(a["distance"] - b["distance"]) < 1e-5 for a, b in zip(r["log"], log))
        assert torch.allclose(r["pushed"], pushed, atol=1e-6)
        assert r["pruned"] == pruned and r["class"].tolist() == model.prototype_class.tolist()
    assert torch.equal(ranks[0]["pushed"], ranks[1]["pushed"])  # bit-identical on every rank
    # parity mode with several ranks: rank 0's local (last-batch) result, the same on every rank
    rank0_alone = push_prototypes(make_model(), batches[0::2], CPU, last_batch_parity=True)
    for r in ranks:
        assert [(e["key"], e["mask_index"]) for e in r["parity"]] == [(e["key"], e["mask_index"]) for e in rank0_alone]
    distinct = brute_force_distinct(make_model(), batches)
    assert all([(e["key"], e["mask_index"]) for e in r["distinct"]] == distinct for r in ranks)
    # the global nearest of some prototypes lies in rank 1's half, of others in rank 0's
    halves = [{k for b in batches[r::2] for k in b["key"]} for r in range(2)]
    assert any(e["key"] in halves[0] for e in log) and any(e["key"] in halves[1] for e in log)


def test_push_cost_last_layer_imitation_trains_only_the_last_layer_and_fits_it() -> None:
    """bench/push_cost.py's last-layer phase on fixed embeddings: only the last layer moves, and its
    cross-entropy on the train split falls."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from bench.push_cost import last_layer_phase, logits
    from schemas.config import TrainConfig

    model = make_model()
    with torch.no_grad():
        parts = [(model.embed(b["crops"]), b["valid"], b["label"]) for b in make_batches(n_batches=8)]
    z, valid, _ = (torch.cat(p) for p in zip(*parts))
    with torch.no_grad():  # labels a last layer can fit: the class of each image's nearest prototype
        d = model.distances(z).masked_fill(~valid[..., None], float("inf")).min(1).values
    train = (z, valid, model.prototype_class[d.argmin(1)])
    config = TrainConfig(shards="/nonexistent", run_dir="/nonexistent", model=TINY,
                         schedule={"lr_last_layer": 0.05}, data={"batch_size": 4}, loss={"class_balanced": False})
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        loss_before = float(torch.nn.functional.cross_entropy(logits(model, train), train[2]))
    last_layer_phase(model, {"train": train}, config, epochs=20)
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed == {"last_layer.weight"}
    with torch.no_grad():
        assert float(torch.nn.functional.cross_entropy(logits(model, train), train[2])) < 0.8 * loss_before
    assert not model.last_layer.weight.requires_grad
    trained = model.last_layer.weight.clone()

    model.load_state_dict(before)  # with the weight average: the last layer ends on it, here near its start
    averaged = config.model_copy(update={"schedule": config.schedule.model_copy(update={"ema_half_life": 10000.0})})
    last_layer_phase(model, {"train": train}, averaged, epochs=20)
    start = before["last_layer.weight"]
    assert 0 < float((model.last_layer.weight - start).norm()) < 0.01 * float((trained - start).norm())
