"""Why can Co-attack's recall at 4/255 be above its recall at 2/255? Measure its image half per eps.

    python benchmarks/co_attack_eps.py [--images 100] [--eps 1,2,4,8] [--word-candidates tiny-mlm]

Issue 14, defect 9. On the undefended embedded default (``tiny-clip``, the first
``--images`` synthetic test images, 5 captions each) it crafts Co-attack's adversarial
captions once (BERT-Attack with ``--word-candidates``; with the MLM the text half does not
depend on eps or on the seed), then runs only the image half at each eps and prints:

- TR@1 / IR@1 of (adversarial images, adversarial captions), and with eps = 0 the text
  half alone;
- the two terms of the objective after the attack, ``KL(F(x)||F(x'))`` on raw embeddings
  and ``KL(norm T_adv||norm F(x'))`` on unit-norm ones, and the mean cosine of each image
  to its own adversarial captions (what retrieval scores);
- at the start point, the L2 norm of each term's input gradient (the text term times
  alpha = 3) and the share of pixels whose sign step the text term decides (the sign of
  the sum equals the sign of the text term's gradient where it disagrees with the clean
  term's);
- the same recall for the image half with the clean term alone (``clean only``) and the
  text term alone (``text only``), to see which term the recall follows.
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:  # run as a script: make `trainables` and `benchmarks` importable
    sys.path.insert(0, str(REPO_ROOT))

import argparse  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from trainables.attacks.co_attack import caption_weights, co_attack, co_attack_terms  # noqa: E402
from trainables.attacks.projection import project_linf  # noqa: E402
from trainables.attacks.text_attack import encode_texts, flatten_captions  # noqa: E402
from trainables.attacks.word_candidates import candidate_source  # noqa: E402
from trainables.config import parse_eps  # noqa: E402
from trainables.data import load_dataset  # noqa: E402
from trainables.data.items import collate  # noqa: E402
from trainables.evaluation.retrieval import recall_at_k  # noqa: E402
from trainables.models import load_model  # noqa: E402


def image_half(model, images, text_unit, weights, eps, seed, clean_weight=1.0, text_weight=3.0, steps=10):
    """Co-attack's image loop (as ``co_attack_images``) with each term's weight exposed."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        clean_features = model.encode_image(images).float()
    adversarial = project_linf(images + eps * torch.rand(images.shape, generator=generator), images, eps)
    for _ in range(steps):
        adversarial.requires_grad_(True)
        clean_term, text_term = co_attack_terms(model.encode_image(adversarial).float(), clean_features, text_unit, weights)
        (gradient,) = torch.autograd.grad((clean_weight * clean_term + text_weight * text_term).sum(), adversarial)
        with torch.no_grad():
            adversarial = project_linf(adversarial + eps / steps * 1.25 * gradient.sign(), images, eps)
    return adversarial.detach()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=100)
    parser.add_argument("--eps", default="1,2,4,8", help="image budgets in /255")
    parser.add_argument("--word-candidates", default="tiny-mlm")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    model = load_model("tiny-clip").eval().requires_grad_(False)
    dataset = load_dataset(f"synthetic:test,n={args.images}", model.image_size)
    batch = collate([dataset[i] for i in range(len(dataset))])
    images, captions = batch.images, batch.captions
    source = candidate_source(args.word_candidates, model)
    # The text half, once: eps only enters the image half (the MLM source ignores the generator).
    output = co_attack(model, images, captions, parse_eps("1/255"), torch.Generator().manual_seed(args.seed), candidates=source)
    flat, owner = flatten_captions(output.captions)
    text_features = encode_texts(model, flat, 64)
    text_unit = F.normalize(text_features, dim=-1)
    weights = caption_weights(owner, len(images), images.device)
    with torch.no_grad():
        clean_features = model.encode_image(images).float()

    def scores(adversarial):
        with torch.no_grad():
            features = model.encode_image(adversarial).float()
            clean_term, text_term = co_attack_terms(features, clean_features, text_unit, weights)
            cos = (weights * (F.normalize(features, dim=-1) @ text_unit.T)).sum(dim=1)
        recall = recall_at_k(features, text_features, owner)
        return recall["tr1"], recall["ir1"], clean_term.mean().item(), text_term.mean().item(), cos.mean().item()

    print(f"{args.images} images, text source {output.text_source}; raw |F(x)| mean {clean_features.norm(dim=-1).mean():.3g}")
    print("eps/255 | TR@1 IR@1 | KL_clean KL_text | cos(img, own adv captions) | |g_clean| |3 g_text| text-decided signs"
          " | clean only TR@1 IR@1 | text only TR@1 IR@1")
    tr, ir, kl_c, kl_t, cos = scores(images)
    print(f"0 (text only) | {tr:.1f} {ir:.1f} | {kl_c:.3g} {kl_t:.3g} | {cos:.4f}")
    for value in args.eps.split(","):
        eps = float(value) / 255
        start = project_linf(images + eps * torch.rand(images.shape, generator=torch.Generator().manual_seed(args.seed)), images, eps)
        start.requires_grad_(True)
        clean_term, text_term = co_attack_terms(model.encode_image(start).float(), clean_features, text_unit, weights)
        (g_clean,) = torch.autograd.grad(clean_term.sum(), start, retain_graph=True)
        (g_text,) = torch.autograd.grad(3.0 * text_term.sum(), start)
        disagree = g_clean.sign() != g_text.sign()
        decided = ((g_clean + g_text).sign() == g_text.sign()) & disagree
        share = decided.float().sum().item() / max(1, disagree.float().sum().item())
        tr, ir, kl_c, kl_t, cos = scores(image_half(model, images, text_unit, weights, eps, args.seed))
        tr_c, ir_c, *_ = scores(image_half(model, images, text_unit, weights, eps, args.seed, text_weight=0.0))
        tr_t, ir_t, *_ = scores(image_half(model, images, text_unit, weights, eps, args.seed, clean_weight=0.0))
        print(f"{value} | {tr:.1f} {ir:.1f} | {kl_c:.3g} {kl_t:.3g} | {cos:.4f} | {g_clean.norm():.3g} {g_text.norm():.3g} "
              f"{100 * share:.1f}% | {tr_c:.1f} {ir_c:.1f} | {tr_t:.1f} {ir_t:.1f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
