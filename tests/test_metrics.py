"""Classification metrics, compactness and prediction gathering against hand-computed tiny cases."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from conftest import gloo_group

from schemas.config import ModelConfig
from training.metrics import (background_overlap, classification_metrics, compactness, consistency,
                              gather_predictions, inside_outside_relevance, iou, location_change, object_overlap,
                              percentile_mask)
from training.model import ProtoMask


def one_hot_logits(pred: list[int], num_classes: int) -> torch.Tensor:
    return torch.nn.functional.one_hot(torch.tensor(pred), num_classes).float()


def test_classification_metrics_with_a_class_never_predicted() -> None:
    labels = torch.tensor([0, 0, 0, 1, 2])
    m = classification_metrics(one_hot_logits([0, 0, 1, 1, 1], 3), labels)  # class 2 never predicted
    assert m["n"] == 5
    assert m["accuracy"] == pytest.approx(3 / 5)
    assert m["balanced_accuracy"] == pytest.approx((2 / 3 + 1 + 0) / 3)
    # F1: class 0 p=1 r=2/3 → 0.8; class 1 p=1/3 r=1 → 0.5; class 2 → 0
    assert m["macro_f1"] == pytest.approx((0.8 + 0.5 + 0.0) / 3)
    assert all(isinstance(m[k], float) for k in ("accuracy", "balanced_accuracy", "top3", "macro_f1"))


def test_macro_f1_counts_predicted_classes_absent_from_labels() -> None:
    m = classification_metrics(one_hot_logits([0, 1], 3), torch.tensor([0, 0]))
    assert m["macro_f1"] == pytest.approx((2 / 3 + 0.0) / 2)  # class 1 predicted, never true; class 2 ignored
    assert m["balanced_accuracy"] == pytest.approx(0.5)  # recall over the present class 0 only
    assert m["accuracy"] == pytest.approx(0.5)


def test_top3_and_its_c2_fallback() -> None:
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0], [4.0, 3.0, 2.0, 1.0], [1.0, 2.0, 3.0, 4.0], [0.0, 0.5, 5.0, 1.0]])
    labels = torch.tensor([3, 2, 0, 1])  # ranks 4th, 3rd, 4th, 3rd
    m = classification_metrics(logits, labels)
    assert m["top3"] == pytest.approx(0.5) and m["accuracy"] == 0.0
    two = classification_metrics(torch.tensor([[0.0, 1.0], [1.0, 0.0], [1.0, 0.0]]), torch.tensor([0, 1, 0]))
    assert two["top3"] == 1.0  # C = 2: top-2 accuracy
    assert two["accuracy"] == pytest.approx(1 / 3) and two["balanced_accuracy"] == pytest.approx(0.25)


def test_perfect_and_empty() -> None:
    m = classification_metrics(one_hot_logits([0, 1, 2], 3), torch.tensor([0, 1, 2]))
    assert {v for k, v in m.items() if k != "n"} == {1.0}
    empty = classification_metrics(torch.zeros(0, 3), torch.zeros(0, dtype=torch.long))
    assert empty == {"accuracy": 0.0, "balanced_accuracy": 0.0, "top3": 0.0, "balanced_top3": 0.0, "macro_f1": 0.0,
                     "balanced_macro_f1": 0.0, "n": 0}


def test_class_balanced_variants_use_the_reference_sample_weights() -> None:
    """Spec §7.1: every image weighs 1/(its class's share), so each class counts as much as any other."""
    labels = torch.tensor([0, 0, 0, 1, 2])
    m = classification_metrics(one_hot_logits([0, 0, 1, 1, 1], 3), labels)
    w = 1 / (torch.bincount(labels).double() / 5)[labels]  # the reference's get_sample_weights
    correct = torch.tensor([1.0, 1, 0, 1, 0], dtype=torch.float64)
    assert m["balanced_accuracy"] == pytest.approx(float((w * correct).sum() / w.sum()))
    # weighted counts (class 0 images weigh 1/3): class 0 TP 2/3, FN 1/3 → 0.8; class 1 TP 1, FP 1/3 + 1 → 0.6
    assert m["balanced_macro_f1"] == pytest.approx((0.8 + 0.6 + 0.0) / 3)
    assert m["macro_f1"] == pytest.approx((0.8 + 0.5 + 0.0) / 3)  # unweighted: class 1 FP 2 → 0.5
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0]] * 3 + [[4.0, 0.0, 3.0, 2.0]])  # class 1 ranks 4th
    top = classification_metrics(logits, torch.tensor([0, 0, 0, 1]))
    assert top["top3"] == pytest.approx(3 / 4) and top["balanced_top3"] == pytest.approx((1 + 0) / 2)


def test_compactness_hand_computed() -> None:
    layer = torch.nn.Linear(3, 2, bias=False)  # C=2 classes, P=3 prototypes
    head = SimpleNamespace(last_layer=layer, prototype_weights=lambda: layer.weight)
    with torch.no_grad():
        head.last_layer.weight.copy_(torch.tensor([[1.0, 0.0, 0.0005], [-0.5, 0.0, 0.002]]))
    c = compactness(head)
    assert c["global_size"] == 2  # columns 0 and 2 hold a weight > 1e-3
    assert c["sparsity"] == pytest.approx(3 / 6)  # 0, 0, 0.0005
    assert c["npr"] == pytest.approx(1 / 2)  # one negative, two positive
    with torch.no_grad():
        head.last_layer.weight.zero_()
    assert compactness(head) == {"global_size": 0, "sparsity": 1.0, "npr": 0.0}
    tiny = ModelConfig(backbone="convnet", width=4, prototype_dim=8, input_size=16, prototypes_per_class=1)
    model = ProtoMask(tiny, 2)
    with torch.no_grad():
        model.reset_last_layer()  # identity: one positive per column
    assert compactness(model) == {"global_size": 2, "sparsity": 0.5, "npr": 0.0}
    assert compactness(SimpleNamespace(module=model)) == compactness(model)  # DDP-style wrapper


def test_gather_without_distributed_is_identity_plus_dedup() -> None:
    logits, labels = torch.arange(6.0).view(3, 2), torch.tensor([0, 1, 0])
    out_logits, out_labels, keys = gather_predictions(logits, labels, ["a", "b", "a"])
    assert keys == ["a", "b"] and out_labels.tolist() == [0, 1] and out_logits.tolist() == [[0.0, 1.0], [2.0, 3.0]]
    e_logits, e_labels, e_keys = gather_predictions(torch.zeros(0, 4), torch.zeros(0, dtype=torch.long), [])
    assert e_logits.shape == (0, 4) and e_labels.shape == (0,) and e_keys == []


def _gather_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    with gloo_group(rank, world, init_file):
        results = []
        # 1: rank 0 holds 3 rows, rank 1 none; 2: unequal lengths with one key on both ranks; 3: all empty
        if rank == 0:
            cases = [(torch.arange(6.0).view(3, 2), torch.tensor([0, 1, 1]), ["a", "b", "c"]),
                     (torch.ones(2, 2), torch.tensor([0, 0]), ["x", "y"]),
                     (torch.zeros(0, 2), torch.zeros(0, dtype=torch.long), [])]
        else:
            cases = [(torch.zeros(0, 2), torch.zeros(0, dtype=torch.long), []),
                     (torch.full((3, 2), 2.0), torch.tensor([1, 1, 1]), ["z", "y", "w"]),
                     (torch.zeros(0, 2), torch.zeros(0, dtype=torch.long), [])]
        for logits, labels, keys in cases:
            results.append(gather_predictions(logits, labels, keys))
        torch.save(results, f"{out_dir}/{rank}.pt")


def test_gather_predictions_two_gloo_ranks_unequal_and_empty(tmp_path) -> None:
    mp.spawn(_gather_worker, args=(2, str(tmp_path / "pg"), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"{r}.pt", weights_only=False) for r in range(2)]
    for results in ranks:
        (l1, y1, k1), (l2, y2, k2), (l3, y3, k3) = results
        assert k1 == ["a", "b", "c"] and y1.tolist() == [0, 1, 1] and l1.tolist() == [[0, 1], [2, 3], [4, 5]]
        assert k2 == ["x", "y", "z", "w"] and y2.tolist() == [0, 0, 1, 1]  # rank 1's duplicate "y" dropped
        assert l2.tolist() == [[1, 1], [1, 1], [2, 2], [2, 2]]
        assert l3.shape == (0, 2) and y3.shape == (0,) and k3 == []
        assert classification_metrics(l1, y1)["n"] == 3 and classification_metrics(l3, y3)["n"] == 0


def test_contrastivity_by_hand() -> None:
    from training.metrics import contrastivity

    protos = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    top = torch.tensor([[0, 1], [0, 2], [1, 0]])
    labels = torch.tensor([0, 0, 1])
    got = contrastivity(protos, top, labels)
    c45 = 1 - 2 ** -0.5
    assert got["intra_pd"] == pytest.approx((1.0 + c45 + 1.0) / 3)
    # image 0 vs image 2 (other class): rank 0: p0 vs p1 → 1, rank 1: p1 vs p0 → 1 → 1.0
    # image 1 vs image 2: rank 0: p0 vs p1 → 1, rank 1: p2 vs p0 → c45
    # image 2 vs images 0, 1: (1.0 + (1 + c45) / 2) / 2
    class0 = (1.0 + (1 + c45) / 2) / 2
    class1 = (1.0 + (1 + c45) / 2) / 2
    assert got["inter_pd"] == pytest.approx((class0 + class1) / 2)
    assert contrastivity(protos, top[:2], labels[:2])["inter_pd"] == 0.0


def test_printed_metrics_name_the_papers_accuracy() -> None:
    from protomask.cli import format_side_by_side

    m = classification_metrics(one_hot_logits([0, 0, 1, 1, 1], 3), torch.tensor([0, 0, 0, 1, 2]))
    rows = {line.split()[0]: line for line in format_side_by_side({"model": m}, "test").splitlines()}
    assert rows["balanced_accuracy"].endswith("(the paper's Accuracy, ×100)") and "paper" not in rows["accuracy"]
    assert float(rows["balanced_accuracy"].split()[1]) == pytest.approx(100 * (2 / 3 + 1) / 3, abs=0.01)
    assert rows["balanced_top3"].endswith("(the paper's top-3 Accuracy, ×100)")
    assert rows["balanced_macro_f1"].endswith("(the paper's F1, ×100)")
    assert list(rows)[1:4] == ["balanced_accuracy", "balanced_top3", "balanced_macro_f1"]  # the paper's order first


def test_percentile_mask_keeps_a_small_map_small() -> None:
    """Spec §6.1: a saliency positive on 4 of 100 pixels has a 95th percentile of 0; the reference kept every
    pixel ≥ 0, the whole image; the fix keeps the 4."""
    level = np.zeros((10, 10), np.float32)
    level[0, :4] = [0.1, 0.2, 0.3, 0.4]
    assert np.percentile(level, 95) == 0 and (level >= np.percentile(level, 95)).all()  # the reference's mask
    assert percentile_mask(level).sum() == 4
    level = np.arange(100, dtype=np.float32).reshape(10, 10)  # 95th percentile 94.05: the top 5 pixels
    assert percentile_mask(level).sum() == 5 and percentile_mask(level)[9, 5:].all()


def test_location_change_hand_computed() -> None:
    a = np.zeros((3, 4, 4), bool)
    a[0, :2, :2] = True  # 4 px
    a[1, :2, :4] = True  # 8 px, contains a[0]: IoU 0.5
    a[2, 3, 3] = True  # disjoint from both: IoU 0
    # per mask: (0.5 + 1) / 2, (0.5 + 1) / 2, (1 + 1) / 2 → mean 5/6
    assert location_change(a) == pytest.approx(5 / 6)
    assert location_change(a[:1]) == 0.0 and location_change(np.zeros((2, 4, 4), bool)) == 0.0
    assert iou(a[0], a[1]) == 0.5


def test_object_metrics_hand_computed() -> None:
    obj = np.zeros((4, 4), bool)
    obj[:2] = True  # 8 object pixels in the top half
    level = np.zeros((4, 4), np.float32)
    level[1, :2] = [2.0, 1.0]  # inside
    level[2, 0] = 4.0  # outside
    mask = level > 0
    assert object_overlap(mask, obj) == pytest.approx(2 / 8)
    assert background_overlap(mask, obj) == pytest.approx(1 - 2 / 3)
    assert inside_outside_relevance(level, obj) == pytest.approx((0.5 + 0.25) / 2 - 1.0)  # ÷ max 4
    empty = np.zeros((4, 4), bool)
    assert object_overlap(mask, empty) == 0.0 and background_overlap(empty, obj) == 0.0
    assert inside_outside_relevance(np.zeros((4, 4)), obj) == 0.0
    assert inside_outside_relevance(level * obj, obj) == pytest.approx((1 + 0.5) / 2)  # nothing outside: mean 0


def test_consistency_hand_computed() -> None:
    """Prototype 0 appeared 4 times, hit part 1 in 3 and part 2 in 1: (3/4 + 1/4) / 2; prototype 1 appeared twice
    and hit nothing: 0. The mean over both: 0.25."""
    assert consistency({0: 4, 1: 2}, {0: {1: 3, 2: 1}}) == pytest.approx(0.25)
    assert consistency({}, {}) == 0.0


def test_protopool_global_size_counts_the_prototypes_its_slots_hold() -> None:
    """Two classes × 2 slots over a pool of 5: with one-hot presence on prototypes 0, 1 (class 0) and 1, 3
    (class 1), prototypes 2 and 4 add to no class's logit."""
    from training.model import ProtoPool

    model = ProtoPool(ModelConfig(kind="protopool", backbone="convnet", width=4, input_size=16,
                                  prototypes_per_class=2, pool_size=5), 2)
    with torch.no_grad():
        model.proto_presence.fill_(-10.0)
        for c, s, p in ((0, 0, 0), (0, 1, 1), (1, 0, 1), (1, 1, 3)):
            model.proto_presence[c, p, s] = 10.0
        model.gumbel_scale.fill_(1000.0)
    assert compactness(model) == {"global_size": 3, "sparsity": 0.5, "npr": 0.0}  # W [2, 4]: one +1 per slot
