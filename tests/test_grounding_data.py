"""Visual grounding data (synthetic-vg, refcoco+ in ALBEF's format), the REFER converter and the metrics."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import platform.data
import pytest
import torch
from PIL import Image

from trainables.data import KINDS, load_dataset, parse_data_spec
from trainables.data.grounding import GroundingItem, collate_grounding
from trainables.data.refer_pickle import export_refer, safe_load_pickle
from trainables.data.synthetic import BACKGROUNDS, render_objects
from trainables.data.synthetic_vg import SyntheticGrounding, attribute_oracle_accuracy, object_box
from trainables.errors import UserError
from trainables.evaluation.grounding import accuracy_per_split, best_proposal, box_iou, ground, is_hit, proposal_scores

REPO_ROOT = Path(__file__).resolve().parent.parent
_POSITIONS = {"on the left", "on the right", "at the top", "at the bottom"}

# ---- synthetic-vg -------------------------------------------------------------------------


def _referents(scene) -> list[int]:
    """Indices of the objects an expression picks, read from its words (independent of the generator)."""
    words = scene.expression.split()
    direction = next((p for p in _POSITIONS if scene.expression.endswith(p)), None)
    attrs = words[1:len(words) - (len(direction.split()) if direction else 0)]
    noun = attrs[-1]
    matching = [i for i, obj in enumerate(scene.objects)
                if (noun == "shape" or obj.shape == noun)
                and all(w in (obj.size, obj.colour) for w in attrs[:-1])]
    if direction is None:
        return matching
    axis, sign = {"on the left": (0, 1), "on the right": (0, -1), "at the top": (1, 1), "at the bottom": (1, -1)}[direction]
    best = min(sign * scene.objects[i].centre[axis] for i in matching)
    return [i for i in matching if sign * scene.objects[i].centre[axis] == best]


def test_each_expression_picks_exactly_its_target():
    dataset = load_dataset("synthetic-vg:test,n=150", 32)
    for scene in dataset.scenes:
        assert _referents(scene) == [0], (scene.expression, scene.objects)
    kinds = {split: {any(p in s.expression for p in _POSITIONS) for s, sp in zip(dataset.scenes, dataset.splits) if sp == split}
             for split in ("val", "testA", "testB")}
    assert kinds == {"val": {True, False}, "testA": {False}, "testB": {True}}
    assert dataset.splits[:6] == ["val", "testA", "testB"] * 2


def test_boxes_are_the_drawn_objects_boxes():
    dataset = load_dataset("synthetic-vg:test,n=20,resolution=128", 32)
    for index in range(20):
        scene, item = dataset.scenes[index], dataset[index]
        assert item.box == object_box(scene.objects[0], 128) and item.original_size == (128, 128)
        # Draw the target alone at the box's resolution: its pixels fill exactly the box (to antialiasing).
        pixels = render_objects(scene.objects[:1], scene.background, (0, 0, 0), 128).astype(int)
        drawn = np.abs(pixels - np.array(BACKGROUNDS[scene.background])).sum(axis=2) > 60
        ys, xs = np.nonzero(drawn)
        x, y, w, h = item.box
        assert abs(xs.min() - x) <= 1 and abs(ys.min() - y) <= 1
        assert abs(xs.max() + 1 - (x + w)) <= 1 and abs(ys.max() + 1 - (y + h)) <= 1


def test_proposals_hold_every_object_and_distractors_that_are_misses():
    dataset = load_dataset("synthetic-vg:train,n=60", 32)
    first_positions = set()
    for index in range(len(dataset)):
        scene, item = dataset.scenes[index], dataset[index]
        objects = [object_box(obj, 64) for obj in scene.objects]
        assert all(box in item.proposals for box in objects)
        distractors = [p for p in item.proposals if p not in objects]
        assert 1 <= len(distractors) <= 2
        assert all(box_iou(d, o) < 0.5 for d in distractors for o in objects)
        assert all(0 <= x and 0 <= y and x + w <= 64 + 1e-9 and y + h <= 64 + 1e-9 for x, y, w, h in item.proposals)
        first_positions.add(item.proposals.index(item.box))
        assert item.split == "train"
    assert len(first_positions) > 3  # shuffled: the answer is not at a fixed index


def test_synthetic_vg_is_deterministic_a_prefix_and_batches():
    small, large = load_dataset("synthetic-vg:train,n=5,seed=2", 32), load_dataset("synthetic-vg:train,n=12,seed=2", 32)
    assert torch.equal(small.images, large.images[:5]) and small.proposals == large.proposals[:5]
    assert [s.expression for s in small.scenes] == [s.expression for s in large.scenes[:5]]
    other = load_dataset("synthetic-vg:train,n=5,seed=3", 32)
    assert not torch.equal(small.images, other.images)
    batch = collate_grounding([small[0], small[1]])
    assert batch.images.shape == (2, 3, 32, 32) and 0 <= batch.images.min() and batch.images.max() <= 1
    assert len(batch.proposals) == 2 and batch.original_sizes == [(64, 64)] * 2
    assert str(parse_data_spec("synthetic-vg:test")) == "synthetic-vg:test,n=600,seed=0,resolution=64"
    assert KINDS["synthetic-vg"].item is GroundingItem and KINDS["synthetic"].item.__name__ == "ImageCaptionItem"


# ---- the restricted unpickler and the REFER export ------------------------------------------

_CALLS: list[str] = []


def _record_call(text: str) -> str:
    _CALLS.append(text)
    return text


class _CallsAFunction:
    def __reduce__(self):
        return (_record_call, ("ran",))


class _PlainObject:
    def __init__(self):
        self.ref_id = 1


_REFS = [
    {"sent_ids": [1, 2], "file_name": "COCO_train2014_000000000009_1.jpg", "ann_id": 100, "ref_id": 7, "image_id": 9,
     "split": "testA", "sentences": [{"tokens": ["man", "left"], "raw": "man left", "sent_id": 1, "sent": "man left"}], "category_id": 1},
    {"sent_ids": [3], "file_name": "COCO_train2014_000000000009_2.jpg", "ann_id": 101, "ref_id": 8, "image_id": 9,
     "split": "testB", "sentences": [{"tokens": ["cup"], "raw": "cup", "sent_id": 3, "sent": "cup"}], "category_id": 2},
    {"sent_ids": [4], "file_name": "COCO_train2014_000000000010_3.jpg", "ann_id": 102, "ref_id": 9, "image_id": 10,
     "split": "val", "sentences": [{"tokens": ["dog"], "raw": "dog", "sent_id": 4, "sent": "dog"}], "category_id": 3},
]
_INSTANCES = {
    "images": [{"id": 9, "height": 40, "width": 60, "file_name": "COCO_train2014_000000000009.jpg"},
               {"id": 10, "height": 30, "width": 30, "file_name": "COCO_train2014_000000000010.jpg"}],
    "annotations": [{"id": 100, "image_id": 9, "bbox": [2.0, 3.0, 20.0, 30.0], "category_id": 1},
                    {"id": 101, "image_id": 9, "bbox": [30.5, 10.0, 25.0, 20.0], "category_id": 2},
                    {"id": 102, "image_id": 10, "bbox": [5, 5, 10, 10], "category_id": 3}],
    "categories": [{"id": 1, "name": "person"}, {"id": 2, "name": "cup"}, {"id": 3, "name": "dog"}],
}


@pytest.mark.parametrize("protocol", [0, 2, pickle.HIGHEST_PROTOCOL])
def test_plain_pickles_load(tmp_path, protocol):
    path = tmp_path / "refs(unc).p"
    path.write_bytes(pickle.dumps(_REFS, protocol=protocol))
    assert safe_load_pickle(path) == _REFS


@pytest.mark.parametrize("payload,name", [
    (_CallsAFunction(), "_record_call"),
    ([{"ref_id": 1}, _PlainObject()], "_PlainObject"),
    # os.system, not print: a global the suite never patches (Ray Train replaces builtins.print in
    # processes that run its workers, and pickle refuses a print that is not builtins.print).
    ({"refs": [1, 2], "f": os.system}, "system"),
    ({"refs": {1, 2}}, "set"),  # a protocol-2 set is a global call too; REFER's refs hold none
])
def test_the_unpickler_refuses_objects_and_calls_without_running_them(tmp_path, payload, name):
    path = tmp_path / "refs(unc).p"
    path.write_bytes(pickle.dumps(payload, protocol=2))
    with pytest.raises(UserError, match=rf"asks to load the Python object .*{name}.*refused and nothing in it was run"):
        safe_load_pickle(path)
    assert _CALLS == []


def test_the_refused_call_payload_is_real():
    # Guards the test above: plain pickle.loads does run the payload.
    assert pickle.loads(pickle.dumps(_CallsAFunction(), protocol=2)) == "ran" and _CALLS == ["ran"]
    _CALLS.clear()


def test_the_unpickler_refuses_garbage(tmp_path):
    path = tmp_path / "refs(unc).p"
    path.write_bytes(pickle.dumps(_REFS)[:40])
    with pytest.raises(UserError, match="is not a readable pickle"):
        safe_load_pickle(path)


def _run_data_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "platform.data", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)


@pytest.fixture()
def refcoco(tmp_path):
    """ALBEF-format RefCOCO+ files written from scratch: images, refcoco+_test.json, dets.json, REFER pickle + instances."""
    (tmp_path / "refs(unc).p").write_bytes(pickle.dumps(_REFS, protocol=2))
    (tmp_path / "instances.json").write_text(json.dumps(_INSTANCES))
    images = tmp_path / "coco" / "train2014"
    images.mkdir(parents=True)
    Image.fromarray(np.full((40, 60, 3), 200, np.uint8)).save(images / "COCO_train2014_000000000009.jpg")
    Image.fromarray(np.full((30, 30, 3), 50, np.uint8)).save(images / "COCO_train2014_000000000010.jpg")
    test_json = tmp_path / "refcoco+_test.json"
    test_json.write_text(json.dumps([
        {"image": "train2014/COCO_train2014_000000000009.jpg", "text": "man on the left", "ref_id": 7},
        {"image": "train2014/COCO_train2014_000000000009.jpg", "text": "cup", "ref_id": 8},
        {"image": "train2014/COCO_train2014_000000000010.jpg", "text": "dog", "ref_id": 9},
    ]))
    dets = tmp_path / "dets.json"
    dets.write_text(json.dumps({"9": [[1.5, 2.5, 21.0, 31.0, 0.9], [30.0, 10.0, 25.0, 20.0, 0.8]], "10": [[0, 0, 30, 30]]}))
    return tmp_path


def test_convert_refer_then_load_refcoco(refcoco, capsys):
    out = refcoco / "refer.json"
    argv = ["convert", "--refer", str(refcoco / "refs(unc).p"), "--instances", str(refcoco / "instances.json"), "--out", str(out)]
    assert platform.data.main(argv) == 0
    assert "wrote 3 refs on 2 images (splits: testA, testB, val)" in capsys.readouterr().out
    export = json.loads(out.read_text())
    assert export["refs"]["8"] == {"split": "testB", "image_id": 9, "bbox": [30.5, 10.0, 25.0, 20.0]}
    assert export["images"] == {"9": {"height": 40, "width": 60}, "10": {"height": 30, "width": 30}}

    spec = f"refcoco+:{refcoco / 'refcoco+_test.json'},images={refcoco / 'coco'},dets={refcoco / 'dets.json'},refer={out}"
    assert str(parse_data_spec(spec)) == spec + ",split=all"
    dataset = load_dataset(spec, 16)
    item = dataset[1]
    assert (item.expression, item.split, item.item_id, item.image_id) == ("cup", "testB", "8", "9")
    assert item.box == (30.5, 10.0, 25.0, 20.0) and item.original_size == (40, 60)
    assert item.proposals == ((1.5, 2.5, 21.0, 31.0), (30.0, 10.0, 25.0, 20.0))
    assert item.image.shape == (3, 16, 16)
    only_a = load_dataset(spec + ",split=testA", 16)
    assert [r.item_id for r in only_a.records] == ["7"]

    with pytest.raises(UserError, match="already exists"):
        platform.data.main(argv)


def test_convert_refuses_a_malicious_pickle_and_runs_nothing(refcoco):
    marker = refcoco / "pwned"
    # A pickle that would call os.system via a GLOBAL + REDUCE if loaded with pickle.load.
    payload = b"cos\nsystem\n(S'touch " + str(marker).encode() + b"'\ntR."
    (refcoco / "evil.p").write_bytes(payload)
    result = _run_data_cli("convert", "--refer", str(refcoco / "evil.p"), "--instances", str(refcoco / "instances.json"),
                           "--out", str(refcoco / "out.json"))
    assert result.returncode != 0 and "os.system" in result.stderr and "nothing in it was run" in result.stderr
    assert not marker.exists() and not (refcoco / "out.json").exists()
    pickle.loads(payload)  # the payload is real: plain pickle runs it (a harmless touch in tmp_path)
    assert marker.exists()
    with pytest.raises(UserError, match="--refer needs --instances"):
        platform.data.main(["convert", "--refer", str(refcoco / "refs(unc).p"), "--out", str(refcoco / "o.json")])
    with pytest.raises(UserError, match="--images is required with --karpathy"):
        platform.data.main(["convert", "--captions-json", str(refcoco / "refcoco+_test.json"), "--out", str(refcoco / "pq")])


def _write_export(refcoco) -> Path:
    out = refcoco / "refer.json"
    out.write_text(json.dumps(export_refer(refcoco / "refs(unc).p", refcoco / "instances.json")))
    return out


@pytest.mark.parametrize("edit,message", [
    (lambda d: (d / "refcoco+_test.json").write_text("[]"), "lists no referring expressions"),
    (lambda d: (d / "refcoco+_test.json").write_text(json.dumps([{"image": "train2014/x.jpg", "text": "a", "ref_id": 99}])), r"ref_ids .* are not in"),
    (lambda d: (d / "dets.json").write_text(json.dumps({"9": [[0, 0, 5, 5]]})), r"have no proposals in .*\(10\)"),
    (lambda d: (d / "coco" / "train2014" / "COCO_train2014_000000000010.jpg").unlink(), r"1 images of .* do not exist"),
    (lambda d: (d / "refer.json").write_text(json.dumps({"refs": {}})), "is not a REFER export"),
    (lambda d: (d / "refer.json").write_text(json.dumps({"format": "mava-refer/1", "refs": {"7": {"split": "testA", "image_id": 9}},
                                                         "images": {}})), r"ref 7 in .* is not \{'split'"),
])
def test_refcoco_bad_inputs_give_one_clear_error(refcoco, edit, message):
    refer = _write_export(refcoco)
    edit(refcoco)
    with pytest.raises(UserError, match=message):
        load_dataset(f"refcoco+:{refcoco / 'refcoco+_test.json'},images={refcoco / 'coco'},dets={refcoco / 'dets.json'},refer={refer}", 16)


def test_refcoco_image_of_another_size_than_the_annotations_is_refused(refcoco):
    refer = _write_export(refcoco)
    Image.fromarray(np.zeros((31, 30, 3), np.uint8)).save(refcoco / "coco" / "train2014" / "COCO_train2014_000000000010.jpg")
    dataset = load_dataset(f"refcoco+:{refcoco / 'refcoco+_test.json'},images={refcoco / 'coco'},dets={refcoco / 'dets.json'},refer={refer}", 16)
    with pytest.raises(UserError, match="is 31x30 .* says 30x30"):
        dataset[2]


# ---- metrics (hand-computed) --------------------------------------------------------------


@pytest.mark.parametrize("a,b,expected", [
    ((0, 0, 4, 4), (0, 0, 4, 4), 1.0),
    ((0, 0, 4, 4), (2, 0, 4, 4), 8 / 24),  # x 2..3 inclusive (2 px) x 4 rows = 8; union 16 + 16 - 8
    ((0, 0, 4, 4), (3, 0, 4, 4), 0.0),  # a one-pixel-wide overlap does not count (ALBEF's strict <)
    ((0, 0, 4, 4), (10, 10, 2, 2), 0.0),
    ((0, 0, 10, 10), (0, 0, 5, 10), 50 / 100),
    ((1.5, 0, 4, 4), (0, 0, 4, 4), (2.5 * 4) / (32 - 10)),  # fractional boxes: x 1.5..3 -> 2.5 px wide
])
def test_box_iou_matches_albefs_inclusive_rule(a, b, expected):
    assert box_iou(a, b) == pytest.approx(expected)
    assert box_iou(b, a) == pytest.approx(expected)


def test_hit_threshold_is_iou_half_inclusive():
    assert is_hit((0, 0, 10, 10), (0, 0, 5, 10))  # IoU exactly 0.5
    assert not is_hit((0, 0, 10, 10), (0, 0, 4, 10))


def test_proposal_scores_are_sum_over_sqrt_area_with_truncated_slices():
    heat = torch.zeros(6, 8)
    heat[1:3, 2:4] = 1.0  # 4 pixels of heat
    heat[5, 7] = 9.0
    proposals = [(2, 1, 2, 2), (0, 0, 8, 6), (2.9, 1.9, 1.2, 1.2), (7, 5, 1, 1)]
    scores = proposal_scores(heat, proposals)
    # [1:3, 2:4] -> 4 / 2; everything 13 / sqrt(48); [int(1.9):int(3.1), int(2.9):int(4.1)] = [1:3, 2:4] -> 4 / 1.2; 9 / 1
    assert scores.tolist() == pytest.approx([2.0, 13 / 48 ** 0.5, 4 / 1.2, 9.0])
    assert best_proposal(heat, proposals) == 3
    assert best_proposal(torch.zeros(6, 8), proposals) == 0  # ties: the first


def test_ground_upsamples_the_grid_to_the_original_image():
    grid = torch.zeros(4, 4)
    grid[3, 0] = 1.0  # heat in the bottom-left cell
    proposals = [(0, 0, 20, 10), (0, 30, 20, 10), (60, 30, 20, 10)]  # original image 40 x 80
    assert ground(grid, (40, 80), proposals) == (0.0, 30.0, 20.0, 10.0)


def test_accuracy_per_split_counts_hits():
    result = accuracy_per_split([True, False, True, True, False], ["val", "testA", "testA", "testB", "testB"])
    assert {k: (v.correct, v.total, v.accuracy) for k, v in result.items()} == {
        "val": (1, 1, 1.0), "testA": (1, 2, 0.5), "testB": (1, 2, 0.5)}
    with pytest.raises(ValueError):
        accuracy_per_split([True], [])


def test_the_attribute_oracle_is_exact_with_every_attribute_and_blind_without():
    """Every expression picks exactly its target (100 with all words and position); testA needs no position; with no
    word read, the oracle is a uniform pick among the scene's 2-4 objects; an unknown attribute is refused."""
    data = SyntheticGrounding("test", 90)
    assert attribute_oracle_accuracy(data, ("size", "colour", "shape"), position=True) == {
        "acc": 100.0, "acc_val": 100.0, "acc_testA": 100.0, "acc_testB": 100.0}
    assert attribute_oracle_accuracy(data, ("size", "colour", "shape"))["acc_testA"] == 100.0
    assert attribute_oracle_accuracy(data, ("size", "colour", "shape"))["acc_testB"] < 100.0  # twins need the position
    blind = attribute_oracle_accuracy(data, ())
    assert blind["acc"] == pytest.approx(100.0 * np.mean([1 / len(scene.objects) for scene in data.scenes]))
    with pytest.raises(ValueError, match="unknown attribute"):
        attribute_oracle_accuracy(data, ("texture",))
