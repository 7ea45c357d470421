"""``tiny-albef-ve`` and ``tiny-tcl-ve``: the embedded ``tiny-albef``/``tiny-tcl`` fine-tuned for visual entailment.

ALBEF's VE fine-tuning (``VE.py``, ``model_ve.py``): a new 3-way head ``cls_head`` (Linear, ReLU,
Linear) on the fusion ``[CLS]``, trained with cross-entropy together with the whole model (ViT and
BERT); the ITC/ITM heads of the pretrained file are dropped. The result is written in ALBEF's VE key
layout (``visual_encoder.*``, ``text_encoder.*``, ``cls_head.*``), so the folder also loads as
``albef:DIR@DIR/weights.safetensors``. It is cached in ``$MAVA_CACHE_DIR/tiny-<family>-ve-<key>/``,
the key a hash of the recipe *and* of the pretrained weights' sha256 (content-addressed: new
base weights give a new folder). Fine-tuning shows a progress bar.

``tiny-tcl-ve`` is the same recipe on ``tiny-tcl``: a second fusion VE model, so the paper's
entailment transfer table (Table 7: crafted on ALBEF, scored on TCL) has a distinct target.

Nothing here ever pretrains a base unless a VE model is asked for without weights (then
``tiny_albef.ensure_pretrained`` runs first, as the embedded models do).
Regenerate with ``python -m trainables.models.tiny_albef_ve [--family tcl]``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn
from tqdm import tqdm

from trainables.data.entailment import collate_entailment
from trainables.data.synthetic_ve import SyntheticEntailment
from trainables.models.albef import ENTAILMENT_CLASSES, AlbefVLP, TclVLP, build_albef
from trainables.models.albef_checkpoint import inference_state, read_bert_config
from trainables.models.albef_text import AlbefTokenizer, load_bert_tokenizer
from trainables.models.tiny_clip import cache_dir
from trainables.models.weights import file_sha256, read_state_dict
from trainables.tasks import Task

WEIGHTS_FILE = "weights.safetensors"
TEXT_FILES = ("vocab.txt", "config_bert.json")
# Retrieval heads of a pretrained/retrieval file: not part of ALBEF's VE model (model_ve.py has none).
RETRIEVAL_KEYS = ("vision_proj.", "text_proj.", "itm_head.", "temp")


class TinyAlbefVeVLP(AlbefVLP):
    """The embedded entailment model: ALBEF's adapter whose main task is visual entailment."""

    tasks = (Task.ENTAILMENT,)


class TinyTclVeVLP(TclVLP):
    """The embedded TCL entailment model (``tiny-tcl`` fine-tuned by the same recipe): family ``tcl``."""

    tasks = (Task.ENTAILMENT,)


# The embedded VE models by the family of their base (``tiny-<family>`` -> ``tiny-<family>-ve``).
VE_CLASSES: dict[str, type[AlbefVLP]] = {"albef": TinyAlbefVeVLP, "tcl": TinyTclVeVLP}


@dataclass(frozen=True)
class VeRecipe:
    """ALBEF's VE fine-tuning at tiny scale; any change gives a new cache key."""

    # 3000 scenes x 4 epochs at 1e-4: 83.0% clean on 300 test pairs; 1000 scenes x 2 at 5e-4 stayed at the
    # text-only bound (66.3%), 3000 x 4 at 5e-4 reached 78.3% (docs/entailment.md).
    train_pairs: int = 9000
    epochs: int = 4
    batch_size: int = 64
    lr: float = 1e-4
    weight_decay: float = 0.02
    seed: int = 0

    def cache_key(self, base_sha256: str) -> str:
        return hashlib.sha256(json.dumps({**asdict(self), "base": base_sha256}, sort_keys=True).encode()).hexdigest()[:12]


def entailment_state(base: dict[str, torch.Tensor], generator: torch.Generator) -> dict[str, torch.Tensor]:
    """A pretrained/retrieval ALBEF state (after ``inference_state``) made a VE one: retrieval heads dropped,
    a fresh ``cls_head`` (PyTorch's Linear initialisation, seeded)."""
    state = {key: value for key, value in base.items() if not key.startswith(RETRIEVAL_KEYS)}
    hidden = state["text_encoder.embeddings.word_embeddings.weight"].shape[1]
    with torch.random.fork_rng():
        torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=generator)))
        head = nn.Sequential(nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, len(ENTAILMENT_CLASSES)))
    state.update({f"cls_head.{key}": value.detach().clone() for key, value in head.state_dict().items()})
    return state


def finetune_entailment(text_dir: Path, base_weights: Path, recipe: VeRecipe, progress: bool = True,
                        device: str = "cpu", name: str = "tiny-albef-ve") -> tuple[dict[str, torch.Tensor], list[float]]:
    """(ALBEF-VE state dict, mean training loss per epoch): cross-entropy of the 3-way head, whole model trained."""
    generator = torch.Generator().manual_seed(recipe.seed)
    state = entailment_state(inference_state(read_state_dict(base_weights)), generator)
    net = build_albef(state, read_bert_config(text_dir), str(base_weights))
    model = AlbefVLP(net, AlbefTokenizer(load_bert_tokenizer(text_dir)), name).to(device)
    net.requires_grad_(True)  # ALBEF fine-tunes everything for VE (the adapter froze the text side)
    dataset = SyntheticEntailment("train", recipe.train_pairs, image_size=model.image_size, seed=recipe.seed)
    loader = torch.utils.data.DataLoader(dataset, batch_size=recipe.batch_size, shuffle=True, collate_fn=collate_entailment,
                                         generator=generator)
    optimizer = torch.optim.AdamW(net.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    losses = []
    model.train()
    for epoch in range(recipe.epochs):
        total, count = 0.0, 0
        for batch in tqdm(loader, desc=f"{name} epoch {epoch + 1}/{recipe.epochs}", disable=not progress, unit="batch"):
            logits = model.entailment_logits(batch.images.to(device), batch.hypotheses)
            loss = F.cross_entropy(logits, batch.labels.to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total, count = total + float(loss.detach()) * len(batch.labels), count + len(batch.labels)
        losses.append(total / count)
    return {key: value.detach().cpu().contiguous() for key, value in net.state_dict().items()}, losses


def finetuned_dir(base_dir: Path, recipe: VeRecipe = VeRecipe(), family: str = "albef") -> Path:
    """``<cache>/tiny-<family>-ve-<key>``, the key from the recipe and the base weights' sha256."""
    return cache_dir() / f"tiny-{family}-ve-{recipe.cache_key(file_sha256(base_dir / WEIGHTS_FILE))}"


def ensure_finetuned(base_dir: Path | None = None, recipe: VeRecipe = VeRecipe(), progress: bool = True,
                     force: bool = False, family: str = "albef") -> Path:
    """The cache folder (text files, VE weights), fine-tuning first if not cached.

    ``base_dir``: the base model's folder (default: the cached ``tiny-<family>``, pretrained on first use).
    """
    if family not in VE_CLASSES:
        raise ValueError(f"unknown family {family!r}: use one of {', '.join(VE_CLASSES)}")
    if base_dir is None:
        from trainables.models.tiny_albef import CONFIGS, ensure_pretrained  # the base, pretrained on first use

        base_dir = Path(ensure_pretrained(CONFIGS[family]))
    directory = finetuned_dir(base_dir, recipe, family)
    if (directory / WEIGHTS_FILE).is_file() and not force:
        return directory
    directory.mkdir(parents=True, exist_ok=True)
    for name in TEXT_FILES:
        (directory / name).write_bytes((base_dir / name).read_bytes())
    state, losses = finetune_entailment(base_dir, base_dir / WEIGHTS_FILE, recipe, progress, name=f"tiny-{family}-ve")
    partial = directory / f"{WEIGHTS_FILE}.partial-{os.getpid()}"  # a concurrent reader never sees half a file
    save_file(state, str(partial))
    os.replace(partial, directory / WEIGHTS_FILE)
    (directory / "recipe.json").write_text(json.dumps({**asdict(recipe), "losses": losses}, indent=1))
    return directory


def finetuned_weights(family: str = "albef") -> Path:
    """The cached VE weights file (fine-tuned first if missing): what a sweep pins (``embedded.resolve_model``)."""
    return ensure_finetuned(family=family) / WEIGHTS_FILE


def load_tiny_albef_ve(spec: str, weights: str | None = None, family: str = "albef") -> AlbefVLP:
    """``tiny-<family>-ve`` (fine-tuned and cached on first use), or its architecture with ``weights``."""
    from trainables.models.tiny_albef import load_finetuned

    return load_finetuned(Path(weights) if weights is not None else finetuned_weights(family), VE_CLASSES[family], spec)


def competence(model: AlbefVLP, pairs: int = 300, eps: tuple[float, ...] = (2 / 255, 4 / 255), seed: int = 0) -> list:
    """Accuracy rows on ``synthetic-ve:test,n=pairs``: clean and under PGD at each eps (white-box, all pairs).

    The text-only bound to beat is 2/3 (docs/entailment.md); chance is 1/3.
    """
    from trainables.evaluation.entailment_eval import EntailmentSettings, evaluate_entailment_rows

    dataset = SyntheticEntailment("test", pairs, image_size=model.image_size, seed=seed)
    return evaluate_entailment_rows(model, dataset, EntailmentSettings(attacks=("pgd",), eps=eps, seed=seed), progress=True)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m trainables.models.tiny_albef_ve", description=__doc__)
    parser.add_argument("--force", action="store_true", help="fine-tune again even if cached weights exist")
    parser.add_argument("--family", choices=sorted(VE_CLASSES), default="albef", help="albef: tiny-albef-ve; tcl: tiny-tcl-ve (fine-tuned from tiny-tcl)")
    parser.add_argument("--base", help="a tiny-albef/tiny-tcl folder (vocab.txt, config_bert.json, weights.safetensors); default: the cached tiny-<family>")
    parser.add_argument("--evaluate", type=int, metavar="N", help="then print clean and PGD (2/255, 4/255) accuracy on N synthetic-ve test pairs")
    args = parser.parse_args()
    directory = ensure_finetuned(Path(args.base) if args.base else None, force=args.force, family=args.family)
    print(directory)
    if args.evaluate:
        model = load_tiny_albef_ve(f"tiny-{args.family}-ve", str(directory / WEIGHTS_FILE), args.family)
        for row in competence(model, args.evaluate):
            print(f"{row.attack:6} {row.to_json()['eps'] or '-':6} acc {row.accuracy:5.1f} ({row.score.correct}/{row.score.total})"
                  f"  text-only bound 66.7, chance 33.3")


if __name__ == "__main__":
    main()
