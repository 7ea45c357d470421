"""An embedded ALBEF fine-tuned for weakly supervised grounding on ``synthetic-vg:train`` (ALBEF's ``Grounding.py:train``).

ALBEF's grounding model is its retrieval model fine-tuned on the referring expressions
with the ordinary ITC + ITM losses (hard negatives drawn from softmax(sim), ALBEF's
``+ 1e-4``), no box supervision (ALBEF-TCL-NOTES §4.1); every weight is trained, as
ALBEF does. Here the pairs are (scene, its one expression) of ``synthetic-vg:train``.

    python -m trainables.models.tiny_albef_vg --base ~/.cache/mava-platform/tiny-albef-<key>

writes ``$MAVA_CACHE_DIR/tiny-albef-vg-<key>/`` (``vocab.txt``, ``config_bert.json``,
``weights.safetensors``), content-addressed by the base weights' sha256 and the recipe, with
a progress bar; evaluate it as ``albef:DIR@DIR/weights.safetensors``. A cached folder is
reused, never retrained.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch.utils.data import DataLoader
from tqdm import tqdm

from trainables.errors import UserError
from trainables.models.albef import AlbefVLP, load_albef
from trainables.models.tiny_clip import cache_dir

WEIGHTS = "weights.safetensors"
TEXT_FILES = ("vocab.txt", "config_bert.json")


@dataclass(frozen=True)
class VgRecipe:
    """The fine-tuning recipe; any change gives a new cache key."""

    train_refs: int = 3000
    epochs: int = 3
    batch_size: int = 32
    lr: float = 1e-4
    weight_decay: float = 0.02
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


def finetune_for_grounding(model: AlbefVLP, recipe: VgRecipe, progress: bool = True) -> list[float]:
    """Fine-tune every weight of ``model`` in place with ITC + ITM on ``synthetic-vg:train``; returns each epoch's mean ITM loss.

    The model comes back in eval mode with each parameter's ``requires_grad`` as it was.
    """
    from trainables.data.grounding import collate_grounding  # local: only needed when fine-tuning
    from trainables.data.synthetic_vg import SyntheticGrounding

    if "itm" not in model.heads:
        raise UserError(f"{model.spec} has no ITM head: grounding fine-tuning needs a retrieval checkpoint")
    torch.manual_seed(recipe.seed)
    data = SyntheticGrounding("train", recipe.train_refs, image_size=model.image_size, seed=recipe.seed)
    loader = DataLoader(data, batch_size=recipe.batch_size, shuffle=True, collate_fn=collate_grounding, drop_last=len(data) > recipe.batch_size,
                        generator=torch.Generator().manual_seed(recipe.seed))
    parameters = list(model.parameters())
    flags = [p.requires_grad for p in parameters]
    model.requires_grad_(True)
    model.train()
    optimizer = torch.optim.AdamW(parameters, lr=recipe.lr, weight_decay=recipe.weight_decay)
    generator = torch.Generator().manual_seed(recipe.seed)
    device = model.pixel_mean.device
    history = []
    try:
        bar = tqdm(total=recipe.epochs * len(loader), desc="fine-tuning tiny-albef for grounding", disable=not progress, unit="batch")
        for _ in range(recipe.epochs):
            total = 0.0
            for batch in loader:
                losses = itc_itm_losses(model, batch.images.to(device), batch.expressions, generator)
                optimizer.zero_grad(set_to_none=True)
                losses["loss"].backward()
                optimizer.step()
                itc, itm = losses["itc"].item(), losses["itm"].item()
                total += itm
                bar.set_postfix(itc=f"{itc:.3f}", itm=f"{itm:.3f}")
                bar.update(1)
            history.append(total / len(loader))
        bar.close()
    finally:
        optimizer.zero_grad(set_to_none=True)
        for parameter in parameters:
            parameter.grad = None
        model.eval()
        for parameter, flag in zip(parameters, flags):
            parameter.requires_grad_(flag)
    return history


def ensure_tiny_albef_vg(base_dir: Path, recipe: VgRecipe = VgRecipe(), progress: bool = True) -> Path:
    """The cache folder of ``base_dir``'s model fine-tuned for grounding, fine-tuning it first if not cached yet."""
    base_dir = Path(base_dir)
    base_weights = base_dir / WEIGHTS
    if not base_weights.is_file() or not all((base_dir / name).is_file() for name in TEXT_FILES):
        raise UserError(f"{base_dir} is not a tiny-albef folder ({', '.join(TEXT_FILES + (WEIGHTS,))}): "
                        "give ~/.cache/mava-platform/tiny-albef-<key> after tiny-albef was pretrained")
    target = cache_dir() / f"tiny-albef-vg-{recipe.cache_key(base_weights)}"
    if (target / WEIGHTS).is_file():
        return target
    model = load_albef(base_dir, base_weights, f"albef:{base_dir}@{base_weights}")
    history = finetune_for_grounding(model, recipe, progress)
    partial = target.with_name(target.name + ".partial")
    partial.mkdir(parents=True, exist_ok=True)
    for name in TEXT_FILES:
        shutil.copyfile(base_dir / name, partial / name)
    save_file(albef_state(model), str(partial / WEIGHTS))
    (partial / "recipe.json").write_text(json.dumps({**asdict(recipe), "base": str(base_dir), "itm_loss_per_epoch": history}, indent=2))
    partial.rename(target)  # whole or absent: an interrupted run leaves only the .partial folder
    return target


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m trainables.models.tiny_albef_vg", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", required=True, help="the tiny-albef cache folder (vocab.txt, config_bert.json, weights.safetensors)")
    parser.add_argument("--train-refs", type=int, default=VgRecipe.train_refs, help="recipe change (another cache key)")
    parser.add_argument("--epochs", type=int, default=VgRecipe.epochs, help="recipe change (another cache key)")
    args = parser.parse_args()
    folder = ensure_tiny_albef_vg(Path(args.base).expanduser(), VgRecipe(train_refs=args.train_refs, epochs=args.epochs))
    print(f"albef:{folder}@{folder / WEIGHTS}")


if __name__ == "__main__":
    main()
