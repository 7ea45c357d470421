"""Which attributes of the synthetic world does a model's image and text feature hold? Linear probes.

    python -m platform.probe --model tiny-clip [--checkpoint RUN/checkpoint] [--train 3000] [--test 1000]
    python -m platform.probe --model tiny-albef --patches   # do the ViT's patch tokens stay local?
    python -m platform.probe --model tiny-albef --binding   # does the ITM head bind a colour to a shape?

Encodes ``synthetic:train,n=TRAIN`` and ``synthetic:test,n=TEST`` (images: F(v), the feature
retrieval ranks by and MAVA fine-tunes; text: the first caption template's embedding), fits one
linear probe per captioned attribute on the training features (trainables/evaluation/probes.py)
and prints each probe's test accuracy beside chance. A probe at chance means a cosine ranking
over that feature cannot tell scenes apart by that attribute (docs/models-and-data.md, "What
the embedded encoders see").

``--patches`` probes the ViT's output patch tokens instead (models whose fusion layers read them:
ALBEF, TCL, BLIP) on the multi-object grounding scenes (``synthetic-vg``): the colour of the
object under each object patch, read from the patch's own token and, as the control, from
another patch's token of the same image (docs/grounding.md, "Why ALBEF's recipe alone stays below 50%").
``--binding`` asks the ITM head of such a model whether "the red circle" is true of a scene with a
red square and a blue circle (trainables/evaluation/binding.py).
"""

from __future__ import annotations

import argparse

import torch

from platform.cli import positive_int, run_cli
from platform.evaluate import load_evaluated_model, vision_weights_path
from trainables.data.synthetic import SyntheticWorld
from trainables.data.synthetic_vg import SyntheticGrounding
from trainables.errors import UserError
from trainables.evaluation.binding import binding_cases, binding_rates
from trainables.evaluation.probes import ATTRIBUTES, PATCH_CLASSES, patch_colour_labels, probe_attributes, probe_patch_colour
from trainables.models import parse_model_spec

BATCH = 250


@torch.no_grad()
def encode(model, world: SyntheticWorld) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, D) image features and (N, D') text features of the first caption of each image."""
    images = world.images.float().div(255.0)
    image_features = torch.cat([model.encode_image(images[i:i + BATCH]) for i in range(0, len(world), BATCH)])
    captions = [group[0] for group in world.captions]
    text_features = torch.cat([model.encode_text(captions[i:i + BATCH]) for i in range(0, len(world), BATCH)])
    return image_features.float(), text_features.float()


@torch.no_grad()
def patch_tokens(model, images: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(N, patches, width) output patch tokens of uint8 images, and the patch side in pixels."""
    pixels = images.float().div(255.0)
    tokens = torch.cat([model.image_tokens(pixels[i:i + BATCH])[:, 1:] for i in range(0, len(pixels), BATCH)]).float()
    grid = round(tokens.shape[1] ** 0.5)
    return tokens, model.image_size // grid


def probe_patches(model, name: str, train_size: int, test_size: int) -> None:
    """Print the patch-token colour probes (own patch, another patch of the same image) on synthetic-vg scenes."""
    if not hasattr(model, "image_tokens"):
        raise UserError(f"model {name!r} has no patch tokens for fusion layers to read: --patches probes ALBEF, TCL or BLIP models "
                        "(tiny-albef, tiny-tcl, albef:..., blip:...); drop --patches to probe its image feature")
    train = SyntheticGrounding("train", train_size, image_size=model.image_size)
    test = SyntheticGrounding("test", test_size, image_size=model.image_size)
    (train_tokens, patch), (test_tokens, _) = patch_tokens(model, train.images), patch_tokens(model, test.images)
    test_labels = patch_colour_labels(test.images, patch)
    results = probe_patch_colour(train_tokens, patch_colour_labels(train.images, patch), test_tokens, test_labels)
    print(f"patch-token probes of {name}: the colour of the object under each object patch, test accuracy % "
          f"(synthetic-vg: {train_size} training, {test_size} test scenes with "
          f"{int((test_labels != PATCH_CLASSES.index('background')).sum())} object patches of {patch} px; chance = the majority colour)")
    print(f"chance                                {results['own'].chance:6.1f}")
    print(f"own patch's token                     {results['own'].accuracy:6.1f}")
    print(f"another patch's token, same image     {results['other'].accuracy:6.1f}")


def probe_binding(model, name: str, test_size: int) -> None:
    """Print how often the ITM head prefers the true expression to a rebound one and to an absent colour."""
    if not hasattr(model, "itm_pair_logits"):
        raise UserError(f"model {name!r} has no ITM head: --binding probes ALBEF or TCL retrieval models (tiny-albef, tiny-tcl, albef:...)")
    test = SyntheticGrounding("test", test_size, image_size=model.image_size)
    cases = binding_cases(test.scenes)
    if not cases:
        raise UserError(f"none of the {test_size} synthetic-vg test scenes has two objects to rebind: raise --test")
    rates = binding_rates(model, test.images.float().div(255.0), cases)
    print(f"ITM binding probe of {name}: % of {len(cases)} synthetic-vg test scenes whose true expression "
          "('the <A colour> <A shape>') gets the higher ITM logit (50 = no preference)")
    print(f"against a rebound expression ('the <B colour> <A shape>': each word fits some object)  {rates['rebound']:6.1f}")
    print(f"against a colour no object has                                                   {rates['absent']:6.1f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m platform.probe", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="model spec with a text encoder, e.g. tiny-clip or tiny-albef")
    parser.add_argument("--checkpoint", help="fine-tuned vision weights: a checkpoint directory holding vision.safetensors, or a .safetensors file")
    parser.add_argument("--train", type=positive_int, default=3000, help="synthetic training scenes the probes are fitted on (default 3000)")
    parser.add_argument("--test", type=positive_int, default=1000, help="synthetic test scenes they are scored on (default 1000)")
    kind = parser.add_mutually_exclusive_group()
    kind.add_argument("--patches", action="store_true", help="probe the ViT's output patch tokens on synthetic-vg scenes (ALBEF, TCL, BLIP)")
    kind.add_argument("--binding", action="store_true", help="probe whether the ITM head binds colour to shape on synthetic-vg scenes (ALBEF, TCL)")
    args = parser.parse_args(argv)
    model = load_evaluated_model(parse_model_spec(args.model), vision_weights_path(args.checkpoint) if args.checkpoint else None,
                                 torch.device("cpu"))
    name = args.model + (" + " + args.checkpoint if args.checkpoint else "")
    if args.patches:
        probe_patches(model, name, args.train, args.test)
        return 0
    if args.binding:
        probe_binding(model, name, args.test)
        return 0
    if not model.has_text_encoder:
        raise UserError(f"model {args.model!r} has no text encoder to probe: use a retrieval model (tiny-clip, tiny-albef, ...)")
    train = SyntheticWorld("train", args.train, image_size=model.image_size, seed=0)
    test = SyntheticWorld("test", args.test, image_size=model.image_size, seed=0)
    (train_image, train_text), (test_image, test_text) = encode(model, train), encode(model, test)
    results = {"image": probe_attributes(train_image, train.scenes, test_image, test.scenes),
               "text": probe_attributes(train_text, train.scenes, test_text, test.scenes)}
    print(f"linear probes of {name}: test accuracy % "
          f"({args.train} training, {args.test} test scenes; chance = the test split's majority class)")
    print("feature  " + "  ".join(f"{name:>10}" for name in ATTRIBUTES))
    print("chance   " + "  ".join(f"{results['image'][name].chance:10.1f}" for name in ATTRIBUTES))
    for side, by_attribute in results.items():
        print(f"{side:<8} " + "  ".join(f"{by_attribute[name].accuracy:10.1f}" for name in ATTRIBUTES))
    return 0


if __name__ == "__main__":
    run_cli(main)
