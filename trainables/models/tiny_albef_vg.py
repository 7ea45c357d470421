"""``tiny-albef-vg`` and ``tiny-tcl-vg``: the embedded fusion models fine-tuned for weakly supervised grounding.

ALBEF's grounding model is its retrieval model fine-tuned on the referring expressions with the
ordinary ITC + ITM losses (hard negatives drawn from softmax(sim), ALBEF's ``+ 1e-4``), no box
supervision (``Grounding.py:train``, ALBEF-TCL-NOTES §4.1); every weight is trained, as ALBEF
does. Here the pairs are (scene, its one expression) of ``synthetic-vg:train``.

On this world that alone does not ground better (docs/grounding.md): the pretraining scenes hold
one kind of object, so the ITM head never learnt to bind a colour to a shape, and ALBEF's hard
negatives, drawn from other scenes, rarely ask it to. The recipe therefore adds **binding
negatives** (``binding_weight``): for each scene with two objects A and B that differ in colour and
shape, ITM also learns "the <A colour> <A shape>" as a match, and as non-matches the rebound "the
<B colour> <A shape>" (each word fits some object, no object fits both) and a colour no object has
(:mod:`trainables.evaluation.binding`). These are still image-level text labels, no boxes: the
supervision stays weak. Real data has such negatives for free (RefCOCO+ images hold many objects
of shared colours and kinds); the synthetic one needs them written.

    python -m trainables.models.tiny_albef_vg [--family tcl] [--base DIR] [--evaluate 600]

writes ``$MAVA_CACHE_DIR/tiny-<family>-vg-<key>/`` (``vocab.txt``, ``config_bert.json``,
``weights.safetensors``, ``recipe.json``), content-addressed by the base weights' sha256 and the
recipe, with a progress bar; the model kinds ``tiny-albef-vg`` / ``tiny-tcl-vg`` build it on first
use from the cached ``tiny-albef`` / ``tiny-tcl``, and the folder also loads as
``albef:DIR@DIR/weights.safetensors``. A cached folder is reused, never retrained.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from tqdm import tqdm

from trainables.errors import UserError
from trainables.evaluation.binding import BindingCase, binding_cases
from trainables.models.albef import AlbefVLP, TclVLP, load_albef
from trainables.models.tiny_clip import cache_dir, first_use_lock
from trainables.tasks import Task

WEIGHTS = "weights.safetensors"
TEXT_FILES = ("vocab.txt", "config_bert.json")


class TinyAlbefVgVLP(AlbefVLP):
    """The embedded grounding model: ALBEF's adapter whose main task is grounding (its ITC/ITM heads also retrieve)."""

    tasks = (Task.GROUNDING, Task.RETRIEVAL)


class TinyTclVgVLP(TclVLP):
    """The embedded TCL grounding model (``tiny-tcl`` fine-tuned by the same recipe): family ``tcl``."""

    tasks = (Task.GROUNDING, Task.RETRIEVAL)


# The embedded grounding models by the family of their base (``tiny-<family>`` -> ``tiny-<family>-vg``).
VG_CLASSES: dict[str, type[AlbefVLP]] = {"albef": TinyAlbefVgVLP, "tcl": TinyTclVgVLP}


@dataclass(frozen=True)
class VgRecipe:
    """The fine-tuning recipe; any change gives a new cache key.

    One-thread pilots on ``tiny-albef-e4d8d2d2bc9b`` (2026-12-05 evening; grounding on
    ``synthetic-vg:test,n=600``, GradCAM layer 2, base 45.7): ALBEF's ITC + ITM alone, 3 epochs at
    1e-4 44.3 and 6 at 3e-4 45.8; with the binding negatives 3 at 1e-4 49.8 and 6 at 3e-4 55.0.
    """

    train_refs: int = 3000
    epochs: int = 6
    batch_size: int = 32
    lr: float = 3e-4
    weight_decay: float = 0.02
    binding_weight: float = 1.0  # the binding negatives' ITM term (0: ALBEF's ITC + ITM alone)
    seed: int = 0

    def cache_key(self, base_weights: Path) -> str:
        digest = hashlib.sha256(base_weights.read_bytes()).hexdigest()
        return hashlib.sha256(json.dumps({"base": digest, **asdict(self)}, sort_keys=True).encode()).hexdigest()[:12]


def itc_itm_losses(model: AlbefVLP, pixels: torch.Tensor, texts: list[str], generator: torch.Generator) -> dict[str, torch.Tensor]:
    """ALBEF's ITC + ITM (hard negatives) on (pixels[b], texts[b]) pairs, without momentum distillation or queues."""
    tokens = model.tokenizer(list(texts), device=pixels.device)
    ids, mask = tokens["input_ids"], tokens["attention_mask"]
    image_embeds = model.image_tokens(pixels)
    image_feat = F.normalize(model.vision_proj(image_embeds[:, 0]), dim=-1)
    text_embeds = model.text_encoder.text(ids, mask)
    text_feat = F.normalize(model.text_proj(text_embeds[:, 0]), dim=-1)
    sim = image_feat @ text_feat.T / model.temp
    targets = torch.arange(len(ids), device=pixels.device)
    loss_itc = (F.cross_entropy(sim, targets) + F.cross_entropy(sim.T, targets)) / 2
    with torch.no_grad():
        weights_i2t = F.softmax(sim.float(), dim=1) + 1e-4
        weights_t2i = F.softmax(sim.T.float(), dim=1) + 1e-4
        weights_i2t.fill_diagonal_(0)
        weights_t2i.fill_diagonal_(0)
        negative_text = torch.multinomial(weights_i2t.cpu(), 1, generator=generator).squeeze(1).to(pixels.device)
        negative_image = torch.multinomial(weights_t2i.cpu(), 1, generator=generator).squeeze(1).to(pixels.device)
    images = torch.cat([image_embeds, image_embeds, image_embeds[negative_image]])
    hidden = torch.cat([text_embeds, text_embeds[negative_text], text_embeds])
    masks = torch.cat([mask, mask[negative_text], mask])
    fused = model.text_encoder.fusion(hidden, masks, images)[:, 0]
    labels = torch.cat([torch.ones(len(ids)), torch.zeros(2 * len(ids))]).long().to(pixels.device)
    loss_itm = F.cross_entropy(model.itm_head(fused), labels)
    return {"loss": loss_itc + loss_itm, "itc": loss_itc, "itm": loss_itm}


def albef_state(model: AlbefVLP) -> dict[str, torch.Tensor]:
    """The model's weights in ALBEF's retrieval key layout (what ``load_albef`` reads strictly)."""
    state = {f"visual_encoder.{k}": v for k, v in model.vision.state_dict().items() if not k.startswith("vision_proj.")}
    state.update({f"text_encoder.{k}": v for k, v in model.text_encoder.state_dict().items()})
    for name in ("vision_proj", "text_proj", "itm_head"):
        state.update({f"{name}.{k}": v for k, v in getattr(model, name).state_dict().items()})
    state["temp"] = model.temp.detach()
    return {k: v.detach().clone().contiguous().cpu() for k, v in state.items()}


def binding_itm_loss(model: AlbefVLP, image_tokens: torch.Tensor, cases: list[BindingCase]) -> torch.Tensor:
    """ITM cross-entropy of each image (``image_tokens[k]`` for ``cases[k]``) with its true expression as a match and
    its rebound and absent-colour expressions as non-matches (:mod:`trainables.evaluation.binding`)."""
    texts = [case.true for case in cases] + [case.rebound for case in cases] + [case.absent for case in cases]
    logits = model.itm_logits(image_tokens.repeat(3, 1, 1), texts)
    labels = torch.cat([torch.ones(len(cases)), torch.zeros(2 * len(cases))]).long().to(logits.device)
    return F.cross_entropy(logits, labels)


def finetune_for_grounding(model: AlbefVLP, recipe: VgRecipe, progress: bool = True) -> list[float]:
    """Fine-tune every weight of ``model`` in place on ``synthetic-vg:train``; returns each epoch's mean ITM loss.

    Per batch: ALBEF's ITC + ITM on the scenes' expressions, plus ``binding_weight`` times
    :func:`binding_itm_loss` on the batch's scenes that have a binding case. The model comes back
    in eval mode with each parameter's ``requires_grad`` as it was.
    """
    from trainables.data.synthetic_vg import SyntheticGrounding  # local: only needed when fine-tuning

    if "itm" not in model.heads:
        raise UserError(f"{model.spec} has no ITM head: grounding fine-tuning needs a retrieval checkpoint")
    torch.manual_seed(recipe.seed)
    data = SyntheticGrounding("train", recipe.train_refs, image_size=model.image_size, seed=recipe.seed)
    cases = {case.index: case for case in binding_cases(data.scenes)} if recipe.binding_weight else {}
    order = torch.Generator().manual_seed(recipe.seed)
    steps_per_epoch = max(len(data) // recipe.batch_size, 1)  # the last partial batch is dropped, as before
    parameters = list(model.parameters())
    flags = [p.requires_grad for p in parameters]
    model.requires_grad_(True)
    model.train()
    optimizer = torch.optim.AdamW(parameters, lr=recipe.lr, weight_decay=recipe.weight_decay)
    generator = torch.Generator().manual_seed(recipe.seed)
    device = model.pixel_mean.device
    history = []
    try:
        bar = tqdm(total=recipe.epochs * steps_per_epoch, desc=f"fine-tuning {model.spec} for grounding", disable=not progress, unit="batch")
        for _ in range(recipe.epochs):
            total = 0.0
            permutation = torch.randperm(len(data), generator=order)
            for step in range(steps_per_epoch):
                index = permutation[step * recipe.batch_size:(step + 1) * recipe.batch_size].tolist()
                pixels = data.images[index].to(device, torch.float32).div_(255.0)
                losses = itc_itm_losses(model, pixels, [data.scenes[i].expression for i in index], generator)
                loss, binding = losses["loss"], torch.zeros(())
                rows = [k for k, i in enumerate(index) if i in cases]
                if rows:
                    binding = binding_itm_loss(model, model.image_tokens(pixels[rows]), [cases[index[k]] for k in rows])
                    loss = loss + recipe.binding_weight * binding
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                total += losses["itm"].item()
                bar.set_postfix(itc=f"{losses['itc'].item():.3f}", itm=f"{losses['itm'].item():.3f}", binding=f"{binding.item():.3f}")
                bar.update(1)
            history.append(total / steps_per_epoch)
        bar.close()
    finally:
        optimizer.zero_grad(set_to_none=True)
        for parameter in parameters:
            parameter.grad = None
        model.eval()
        for parameter, flag in zip(parameters, flags):
            parameter.requires_grad_(flag)
    return history


def ensure_tiny_albef_vg(base_dir: Path | None = None, recipe: VgRecipe = VgRecipe(), progress: bool = True,
                        family: str = "albef") -> Path:
    """The cache folder of the base model fine-tuned for grounding, fine-tuning it first if not cached yet.

    ``base_dir``: a tiny-albef/tiny-tcl folder (default: the cached ``tiny-<family>``, pretrained on first use).
    """
    if family not in VG_CLASSES:
        raise ValueError(f"unknown family {family!r}: use one of {', '.join(VG_CLASSES)}")
    if base_dir is None:
        from trainables.models.tiny_albef import CONFIGS, ensure_pretrained  # the base, pretrained on first use

        base_dir = ensure_pretrained(CONFIGS[family])
    base_dir = Path(base_dir)
    base_weights = base_dir / WEIGHTS
    if not base_weights.is_file() or not all((base_dir / name).is_file() for name in TEXT_FILES):
        raise UserError(f"{base_dir} is not a tiny-{family} folder ({', '.join(TEXT_FILES + (WEIGHTS,))}): "
                        f"give ~/.cache/mava-platform/tiny-{family}-<key> after tiny-{family} was pretrained")
    target = cache_dir() / f"tiny-{family}-vg-{recipe.cache_key(base_weights)}"
    if (target / WEIGHTS).is_file():
        return target
    with first_use_lock(target, f"tiny-{family}-vg"):
        if (target / WEIGHTS).is_file():  # made while this process waited for the lock
            return target
        model = load_albef(base_dir, base_weights, f"tiny-{family}-vg", family=family)
        history = finetune_for_grounding(model, recipe, progress)
        partial = target.with_name(f"{target.name}.partial-{os.getpid()}")
        partial.mkdir(parents=True, exist_ok=True)
        for name in TEXT_FILES:
            shutil.copyfile(base_dir / name, partial / name)
        save_file(albef_state(model), str(partial / WEIGHTS))
        (partial / "recipe.json").write_text(json.dumps({**asdict(recipe), "base": str(base_dir), "itm_loss_per_epoch": history}, indent=2))
        partial.rename(target)  # whole or absent: an interrupted run leaves only the .partial folder
    return target


def finetuned_weights(family: str = "albef") -> Path:
    """The cached grounding weights file (fine-tuned first if missing): what a sweep pins (``embedded.resolve_model``)."""
    return ensure_tiny_albef_vg(family=family) / WEIGHTS


def load_tiny_albef_vg(spec: str, weights: str | None = None, family: str = "albef") -> AlbefVLP:
    """``tiny-<family>-vg`` (fine-tuned and cached on first use), or its architecture with ``weights``."""
    from trainables.models.tiny_albef import load_finetuned

    return load_finetuned(Path(weights) if weights is not None else finetuned_weights(family), VG_CLASSES[family], spec)


def competence(model: AlbefVLP, refs: int = 600, layer: int | None = None) -> list:
    """Grounding rows on ``synthetic-vg:test,n=refs`` (clean, PGD at 2/255) and the ITM binding rates on 1000 test scenes."""
    from trainables.data.synthetic_vg import SyntheticGrounding
    from trainables.evaluation.binding import binding_rates
    from trainables.evaluation.grounding_eval import GroundingSettings, evaluate_grounding_rows

    rows = evaluate_grounding_rows(model, SyntheticGrounding("test", refs, image_size=model.image_size),
                                   GroundingSettings(attacks=("pgd",), eps=(2 / 255,), batch_size=50, layer=layer), progress=True)
    scenes = SyntheticGrounding("test", 1000, image_size=model.image_size)
    return rows, binding_rates(model, scenes.images.float().div(255.0), binding_cases(scenes.scenes))


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m trainables.models.tiny_albef_vg", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", choices=sorted(VG_CLASSES), default="albef", help="albef: tiny-albef-vg; tcl: tiny-tcl-vg (fine-tuned from tiny-tcl)")
    parser.add_argument("--base", help="a tiny-albef/tiny-tcl folder (vocab.txt, config_bert.json, weights.safetensors); default: the cached tiny-<family>")
    parser.add_argument("--train-refs", type=int, default=VgRecipe.train_refs, help="recipe change (another cache key)")
    parser.add_argument("--epochs", type=int, default=VgRecipe.epochs, help="recipe change (another cache key)")
    parser.add_argument("--lr", type=float, default=VgRecipe.lr, help="recipe change (another cache key)")
    parser.add_argument("--binding-weight", type=float, default=VgRecipe.binding_weight,
                        help="recipe change (another cache key); 0 = ALBEF's ITC + ITM alone")
    parser.add_argument("--evaluate", type=int, metavar="N", help="then print grounding accuracy (clean, PGD 2/255) on N synthetic-vg test "
                        "expressions and the ITM binding rates")
    args = parser.parse_args()
    recipe = VgRecipe(train_refs=args.train_refs, epochs=args.epochs, lr=args.lr, binding_weight=args.binding_weight)
    folder = ensure_tiny_albef_vg(Path(args.base).expanduser() if args.base else None, recipe, family=args.family)
    print(f"tiny-{args.family}-vg@{folder / WEIGHTS}")
    if args.evaluate:
        rows, rates = competence(load_tiny_albef_vg(f"tiny-{args.family}-vg", str(folder / WEIGHTS), args.family), args.evaluate)
        for row in rows:
            print(f"{row.attack:6} {row.to_json()['eps'] or '-':6} " + "  ".join(f"{k} {v:5.1f}" for k, v in row.accuracy.items()))
        print(f"ITM binding: true above rebound {rates['rebound']:.1f}%, above an absent colour {rates['absent']:.1f}% (50 = no preference)")


if __name__ == "__main__":
    main()
