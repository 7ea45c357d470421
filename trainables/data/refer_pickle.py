"""Reading REFER's ``refs(unc).p`` safely and exporting the annotations grounding needs as JSON.

REFER (``refTools/refer_python3.py``) ships the RefCOCO+ references as a Python pickle,
which can run arbitrary code when loaded with ``pickle.load``. :func:`safe_load_pickle`
admits only what the file legitimately holds: lists, dicts, tuples, sets, strings,
bytes, numbers, booleans and None. Any opcode that needs a Python global (building
an object, calling a function: ``GLOBAL``/``STACK_GLOBAL``/``INST``/``OBJ``, the
extension registry) goes through ``find_class``, which refuses; persistent ids are
refused by the unpickler itself. Nothing named in the file is imported or called.

:func:`export_refer` joins the refs with ``instances.json`` into the JSON that
``refcoco+:`` reads (format in ``trainables/data/grounding.py``): ref id -> split,
image id, box; image id -> height, width.
"""

from __future__ import annotations

import io
import json
import pickle
from pathlib import Path
from typing import Any

from trainables.data.annotations import read_json
from trainables.data.grounding import REFER_FORMAT
from trainables.errors import UserError


class _PlainDataUnpickler(pickle.Unpickler):
    """An unpickler that refuses every global, so only built-in container and scalar opcodes work."""

    def __init__(self, file: io.BufferedIOBase, source: Path):
        # REFER's file was written by Python 2: its str objects arrive as bytes strings to decode.
        super().__init__(file, encoding="utf-8")
        self.source = source

    def find_class(self, module: str, name: str) -> Any:
        raise UserError(
            f"{self.source} asks to load the Python object {module}.{name} (to build an object or call a function); "
            "REFER's refs file holds only lists, dicts, strings and numbers, so this file is refused and nothing in it was run: "
            "use the refs(unc).p of the REFER release"
        )


def safe_load_pickle(path: Path) -> Any:
    """Unpickle ``path`` admitting only plain containers, strings and numbers (see module doc)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"pickle file {path} does not exist or is not a file: give the path of REFER's refs(unc).p")
    with path.open("rb") as handle:
        try:
            return _PlainDataUnpickler(handle, path).load()
        except UserError:
            raise
        except (pickle.UnpicklingError, EOFError, ValueError, IndexError, KeyError, TypeError, OverflowError, UnicodeDecodeError) as error:
            raise UserError(f"{path} is not a readable pickle ({type(error).__name__}: {error}): give REFER's refs(unc).p") from error


def _require(condition: bool, source: Path, problem: str) -> None:
    if not condition:
        raise UserError(f"{source} {problem}")


def export_refer(refs_path: Path, instances_path: Path) -> dict[str, Any]:
    """The REFER export (``REFER_FORMAT``) of a refs pickle and its ``instances.json``."""
    refs = safe_load_pickle(refs_path)
    _require(isinstance(refs, list) and len(refs) > 0, refs_path, "is not a non-empty list of refs: give REFER's refs(unc).p")
    instances = read_json(Path(instances_path), "REFER instances.json (COCO-style images and annotations)")
    _require(isinstance(instances, dict) and isinstance(instances.get("annotations"), list) and isinstance(instances.get("images"), list),
             instances_path, "has no 'images' and 'annotations' lists: give the instances.json next to refs(unc).p")
    boxes: dict[int, list[float]] = {}
    for ann in instances["annotations"]:
        bbox = ann.get("bbox") if isinstance(ann, dict) else None
        if isinstance(bbox, list) and len(bbox) == 4 and "id" in ann:
            boxes[ann["id"]] = [float(v) for v in bbox]
    sizes = {img["id"]: img for img in instances["images"] if isinstance(img, dict) and "id" in img}
    out_refs: dict[str, dict[str, Any]] = {}
    out_images: dict[str, dict[str, int]] = {}
    for index, ref in enumerate(refs):
        _require(isinstance(ref, dict) and all(k in ref for k in ("ref_id", "ann_id", "image_id", "split")), refs_path,
                 f"entry {index} is not a ref with ref_id, ann_id, image_id and split: give REFER's refs(unc).p")
        _require(ref["ann_id"] in boxes, instances_path, f"has no annotation {ref['ann_id']} with a bbox (ref {ref['ref_id']}): use the instances.json of the same dataset")
        image = sizes.get(ref["image_id"])
        _require(image is not None and "height" in image and "width" in image, instances_path,
                 f"has no image {ref['image_id']} with height and width (ref {ref['ref_id']}): use the instances.json of the same dataset")
        out_refs[str(ref["ref_id"])] = {"split": str(ref["split"]), "image_id": ref["image_id"], "bbox": boxes[ref["ann_id"]]}
        out_images[str(ref["image_id"])] = {"height": int(image["height"]), "width": int(image["width"])}
    return {"format": REFER_FORMAT, "refs": out_refs, "images": out_images}


def write_refer_export(refs_path: Path, instances_path: Path, out_path: Path) -> dict[str, Any]:
    """Write :func:`export_refer`'s JSON to ``out_path`` (refusing to overwrite) and return it."""
    out_path = Path(out_path)
    if out_path.exists():
        raise UserError(f"{out_path} already exists: remove it or choose another --out")
    if not out_path.parent.is_dir():
        raise UserError(f"the folder of {out_path} does not exist: create it or choose another --out")
    export = export_refer(Path(refs_path), Path(instances_path))
    out_path.write_text(json.dumps(export), encoding="utf-8")
    return export
