"""What does ITM re-ranking cost, batched across images, against ALBEF's per-image loop?

    python benchmarks/rerank_cost.py [--json OUT] [--models tiny-albef,tiny-blip] [--images 128] [--k-test 16] [--threads 1]

Retrieval with an ITM head (ALBEF, TCL, BLIP) re-scores each image's ITC top-k_test
captions and each caption's top-k_test images with the fusion encoder and its ITM head.
On the synthetic test split (``--images`` images, 5 captions each) and a model with
random weights (the cost of a pair does not depend on the weights' values), with the
candidates picked by the pretrained ``tiny-clip``'s ITC similarities (how many pairs
are candidates in both directions depends on the ranking being a trained one's;
``--candidates self`` uses the random model's), it times, interleaved
(a, b, c, a, b, c, ...) after a warm-up round:

- ``batched``: the platform's ``trainables.evaluation.rerank.rerank_similarity``: every
  image's and caption's candidate pairs scored ``pair_batch`` at a time, each distinct
  pair once; for ALBEF/TCL each caption's text-only layers run once, and each image's
  cross-attention keys/values once per batch of pairs;
- ``per_image_loop``: the loop of ALBEF's ``Retrieval.py:evaluation`` (and BLIP's
  ``train_retrieval.py``): one image at a time, its k_test captions through the
  fusion encoder and ITM head in one call, then one caption at a time with its
  k_test images, through the model's ``itm_pair_logits`` as the platform calls it;
- ``albef_loop`` (ALBEF-type models only): the same loop with ALBEF's caching: every
  caption tokenised and run through the text-only layers once, before the loop;
  only the fusion layers run per image (``mode='fusion'`` on cached ``text_embeds``).

Both loops and the batched path must give the same re-ranked scores (checked: the
benchmark stops if they differ by more than float rounding). Reported: seconds per
re-ranking of the whole split (both directions), images/s, the ITM pairs scored, and
``speedup = t_loop / t_batched`` (goal >= 2, issue 19). Seconds are medians; process
CPU seconds beside wall seconds (on a shared CPU wall time is mostly waiting).
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:  # run as a script: make `trainables` and `benchmarks` importable
    sys.path.insert(0, str(REPO_ROOT))

import argparse  # noqa: E402
import tempfile  # noqa: E402
from typing import Callable  # noqa: E402

import torch  # noqa: E402

from benchmarks.common import hardware, summary, time_interleaved, write_json  # noqa: E402
from trainables.data.synthetic import SyntheticWorld  # noqa: E402
from trainables.evaluation.rerank import OUTSIDE_TOP_K, RerankedScores, itc_similarity, rerank_similarity  # noqa: E402

TARGET = 2.0  # issue 19: batched re-ranking at least 2x the per-image loop
MODELS = ("tiny-albef", "tiny-blip")


def tiny_albef(folder: Path, seed: int = 0):
    """The embedded ``tiny-albef`` architecture (ViT 4x128, BERT 2 text + 2 fusion layers of 128) with random weights."""
    from trainables.models.albef import AlbefNet, AlbefVLP
    from trainables.models.albef_text import AlbefTokenizer, load_bert_tokenizer
    from trainables.models.tiny_albef import TinyAlbefConfig, bert_config, vit_config, world_vocabulary

    config = TinyAlbefConfig()
    vocabulary = world_vocabulary()
    (folder / "vocab.txt").write_text("\n".join(vocabulary) + "\n", encoding="utf-8")
    torch.manual_seed(seed)
    net = AlbefNet(vit_config(config), bert_config(config, len(vocabulary)), frozenset({"itm"}), config.embed_dim)
    return AlbefVLP(net, AlbefTokenizer(load_bert_tokenizer(folder)), "tiny-albef@random").eval()


def tiny_blip(folder: Path, seed: int = 0):
    """A transformers ``BlipForImageTextRetrieval`` of the same widths as ``tiny_albef`` (ViT 4x128, BERT 2x128), random weights."""
    from transformers import BertTokenizer, BlipConfig, BlipForImageTextRetrieval

    from trainables.models.hf_blip import BlipRetrievalVLP
    from trainables.models.tiny_albef import world_vocabulary

    words = [word for word in world_vocabulary() if not word.startswith("[")]
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]", "[ENC]"] + words
    (folder / "vocab.txt").write_text("\n".join(tokens) + "\n", encoding="utf-8")
    tokenizer = BertTokenizer.from_pretrained(folder, bos_token="[DEC]", additional_special_tokens=["[ENC]"])
    width = 128
    config = BlipConfig(
        text_config=dict(vocab_size=len(tokens), hidden_size=width, intermediate_size=4 * width, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=40, encoder_hidden_size=width, bos_token_id=5,
                         pad_token_id=0, sep_token_id=3, eos_token_id=3),
        vision_config=dict(hidden_size=width, intermediate_size=4 * width, num_hidden_layers=4, num_attention_heads=2,
                           image_size=32, patch_size=4),
        projection_dim=64, image_text_hidden_size=64,
    )
    torch.manual_seed(seed)
    blip = BlipForImageTextRetrieval(config).eval()
    return BlipRetrievalVLP(blip, tokenizer, mean=(0.48145466, 0.4578275, 0.40821073),
                            std=(0.26862954, 0.26130258, 0.27577711), spec="tiny-blip@random").eval()


def candidate_model(image_size: int):
    """The embedded pretrained ``tiny-clip``, whose ITC similarities pick the candidates (see ``--candidates``)."""
    from trainables.models import load_model

    model = load_model("tiny-clip")
    if model.image_size != image_size:
        raise ValueError(f"tiny-clip reads {model.image_size} px images, the re-ranking model {image_size} px: use --candidates self")
    return model


@torch.no_grad()
def per_image_loop(model, tokens: torch.Tensor, captions: list[str], similarity: torch.Tensor, k_test: int,
                   rule: str) -> RerankedScores:
    """ALBEF's evaluation loop: one image (then one caption) at a time, its k_test candidates in one ITM call."""
    num_images, num_texts = similarity.shape
    with_itc = rule == "itc+itm"
    i2t = torch.full((num_images, num_texts), OUTSIDE_TOP_K)
    k = min(k_test, num_texts)
    for image in range(num_images):
        top_similarity, top = similarity[image].topk(k)
        logits = model.itm_pair_logits(tokens[image:image + 1].expand(k, -1, -1), [captions[t] for t in top.tolist()])
        i2t[image, top] = logits.float() + (top_similarity if with_itc else 0.0)
    t2i = torch.full((num_images, num_texts), OUTSIDE_TOP_K)
    k = min(k_test, num_images)
    for text in range(num_texts):
        top_similarity, top = similarity[:, text].topk(k)
        logits = model.itm_pair_logits(tokens[top], [captions[text]] * k)
        t2i[top, text] = logits.float() + (top_similarity if with_itc else 0.0)
    return RerankedScores(i2t=i2t, t2i=t2i)


@torch.no_grad()
def albef_loop(model, tokens: torch.Tensor, captions: list[str], similarity: torch.Tensor, k_test: int) -> RerankedScores:
    """ALBEF's ``Retrieval.py:evaluation`` to the letter: text layers once per caption, fusion per image / per caption."""
    text = model.tokenizer(captions)
    mask = text["attention_mask"]
    text_embeds = model.text_encoder.text(text["input_ids"], mask)  # (T, L, hidden), computed once
    num_images, num_texts = similarity.shape
    i2t = torch.full((num_images, num_texts), OUTSIDE_TOP_K)
    k = min(k_test, num_texts)
    for image in range(num_images):
        top = similarity[image].topk(k).indices
        fused = model.text_encoder.fusion(text_embeds[top], mask[top], tokens[image:image + 1].repeat(k, 1, 1))
        i2t[image, top] = model.itm_head(fused[:, 0])[:, 1].float()
    t2i = torch.full((num_images, num_texts), OUTSIDE_TOP_K)
    k = min(k_test, num_images)
    for caption in range(num_texts):
        top = similarity[:, caption].topk(k).indices
        fused = model.text_encoder.fusion(text_embeds[caption:caption + 1].repeat(k, 1, 1), mask[caption:caption + 1].repeat(k, 1),
                                          tokens[top])
        t2i[top, caption] = model.itm_head(fused[:, 0])[:, 1].float()
    return RerankedScores(i2t=i2t, t2i=t2i)


def check_same(reference: RerankedScores, other: RerankedScores, name: str) -> float:
    """The largest difference of two re-rankings; raises if they differ beyond float rounding (padding, batch shapes)."""
    difference = max((reference.i2t - other.i2t).abs().max().item(), (reference.t2i - other.t2i).abs().max().item())
    for a, b in ((reference.i2t, other.i2t), (reference.t2i, other.t2i)):
        if not torch.equal(a > OUTSIDE_TOP_K, b > OUTSIDE_TOP_K):
            raise AssertionError(f"{name} re-scored other candidates than the batched path")
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4, msg=lambda m: f"{name} differs from the batched path: {m}")
    return difference


def measure(model_name: str, args: argparse.Namespace, folder: Path) -> dict:
    model = (tiny_albef if model_name == "tiny-albef" else tiny_blip)(folder / model_name)
    rule = model.itm_scoring
    world = SyntheticWorld("test", args.images, image_size=model.image_size, seed=0)
    images = world.images.float().div(255.0)
    captions = [caption for group in world.captions for caption in group]
    with torch.no_grad():
        ranker = model if args.candidates == "self" else candidate_model(model.image_size)
        similarity = itc_similarity(ranker.encode_image(images), ranker.encode_text(captions))
        tokens = model.image_tokens(images)  # both loops get the image tokens; the batched path computes its own (counted)

    results: dict[str, RerankedScores] = {}

    def run(name: str, function: Callable[[], RerankedScores]) -> Callable[[], None]:
        return lambda: results.__setitem__(name, function())

    variants = {"batched": run("batched", lambda: rerank_similarity(model, images, captions, similarity, args.k_test, rule=rule,
                                                                     pair_batch=args.pair_batch)),
                "per_image_loop": run("per_image_loop", lambda: per_image_loop(model, tokens, captions, similarity, args.k_test, rule))}
    if hasattr(model.text_encoder, "fusion"):
        variants["albef_loop"] = run("albef_loop", lambda: albef_loop(model, tokens, captions, similarity, args.k_test))
    wall, cpu = time_interleaved(variants, args.repeats, args.warmup, torch.device("cpu"))
    differences = {name: check_same(results["batched"], results[name], name) for name in variants if name != "batched"}
    if "albef_loop" in results:  # the ITM-alone rule: the official loop's numbers are the platform's
        assert rule == "itm", rule
    k_i, k_t = min(args.k_test, len(captions)), min(args.k_test, args.images)
    pairs = args.images * k_i + len(captions) * k_t
    keys = torch.unique(torch.cat([torch.arange(args.images).repeat_interleave(k_i) * len(captions)
                                   + similarity.topk(k_i, dim=1).indices.reshape(-1),
                                   similarity.topk(k_t, dim=0).indices.T.reshape(-1) * len(captions)
                                   + torch.arange(len(captions)).repeat_interleave(k_t)]))
    wall_median = {name: summary(seconds)["median"] for name, seconds in wall.items()}
    cpu_median = {name: summary(seconds)["median"] for name, seconds in cpu.items()}
    return {
        "model": model_name, "rule": rule, "images": args.images, "captions": len(captions), "k_test": args.k_test,
        "pair_batch": args.pair_batch, "pairs_in_loop": pairs, "distinct_pairs": int(keys.numel()),
        "wall_seconds": {name: summary(seconds) for name, seconds in wall.items()},
        "cpu_seconds": {name: summary(seconds) for name, seconds in cpu.items()},
        "images_per_second": {name: args.images / seconds for name, seconds in wall_median.items()},
        # On a shared CPU a process gets a fraction of a core: images per CPU second is the speed of the work itself.
        "images_per_cpu_second": {name: args.images / seconds for name, seconds in cpu_median.items()},
        "speedup": {name: {"wall": wall_median[name] / wall_median["batched"], "cpu": cpu_median[name] / cpu_median["batched"]}
                    for name in variants if name != "batched"},
        "max_abs_difference": differences,
    }


def report(result: dict) -> str:
    lines = [f"{result['settings']['images']} images x 5 captions, k_test={result['settings']['k_test']}, "
             f"pair_batch={result['settings']['pair_batch']}, candidates from {result['settings']['candidates']}'s ITC; {result['settings']['repeats']} interleaved repeats after "
             f"{result['settings']['warmup']} warm-up round(s); seconds per re-ranking of both directions"]
    for row in result["models"]:
        lines.append(f"{row['model']} (rule {row['rule']}): ITM pairs {row['pairs_in_loop']} in the loops, "
                     f"{row['distinct_pairs']} distinct (scored once by the batched path)")
        lines.append("  variant          wall s (median)  CPU s (median)  images/s (wall | CPU)  speedup wall  speedup CPU  max |diff|")
        for name in row["wall_seconds"]:
            speed = row["speedup"].get(name, {"wall": 1.0, "cpu": 1.0})
            lines.append(f"  {name:<16} {row['wall_seconds'][name]['median']:<16.3f} {row['cpu_seconds'][name]['median']:<15.3f} "
                         f"{row['images_per_second'][name]:>6.1f} | {row['images_per_cpu_second'][name]:<13.1f} {speed['wall']:<13.2f} {speed['cpu']:<12.2f} "
                         f"{row['max_abs_difference'].get(name, 0.0):.1e}")
    lines.append(f"speedup = t_loop / t_batched (target >= {TARGET})")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", help="write the results to this JSON file")
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, from {', '.join(MODELS)}")
    parser.add_argument("--images", type=int, default=128, help="test images (5 captions each)")
    parser.add_argument("--k-test", type=int, default=16, help="candidates re-scored per image and per caption")
    parser.add_argument("--candidates", choices=("tiny-clip", "self"), default="tiny-clip",
                        help="whose ITC similarities pick the top-k_test: the pretrained tiny-clip (a trained model's candidate sets, "
                             "which overlap between the two directions) or the random re-ranking model itself (nearly disjoint sets)")
    parser.add_argument("--pair-batch", type=int, default=128, help="pairs per ITM call in the batched path")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: steady on a shared CPU)")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.models.split(",")) - set(MODELS))
    if unknown:
        parser.error(f"unknown model(s) {', '.join(unknown)}: use {', '.join(MODELS)}")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="rerank-cost-") as folder:
        rows = []
        for name in args.models.split(","):
            (Path(folder) / name).mkdir()
            rows.append(measure(name, args, Path(folder)))
    result = {"benchmark": "rerank_cost", "target": TARGET, "hardware": hardware(torch.device("cpu")),
              "settings": {"images": args.images, "k_test": args.k_test, "candidates": args.candidates, "pair_batch": args.pair_batch, "repeats": args.repeats,
                           "warmup": args.warmup, "threads": args.threads},
              "models": rows}
    print(report(result))
    write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
