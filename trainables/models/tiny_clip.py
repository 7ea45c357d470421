"""``tiny-clip``: the embedded default model, a small open_clip CLIP pretrained on the synthetic world.

Nothing is downloaded: the first use pretrains it contrastively (CLIP's InfoNCE
loss) on the synthetic world's train split with a progress bar, and caches the
weights as safetensors under ``$MAVA_CACHE_DIR`` (default
``~/.cache/mava-platform``), keyed by a hash of its configuration. Later uses load
the cached file. Regenerate with ``python -m trainables.models.tiny_clip --force``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

import open_clip
import torch
import torch.nn.functional as F
from filelock import FileLock, Timeout
from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg
from safetensors.torch import save_file
from tqdm import tqdm

from trainables.models.weights import load_strict, read_state_dict

CACHE_ENV = "MAVA_CACHE_DIR"


@dataclass(frozen=True)
class TinyClipConfig:
    """Architecture and pretraining recipe; any change gives a new cache key."""

    image_size: int = 32  # pixels; the synthetic world is rendered at this size
    patch_size: int = 4  # 8x8 = 64 patches
    vision_width: int = 128
    vision_layers: int = 4
    text_width: int = 128
    text_layers: int = 3
    context_length: int = 32  # tokens; the world's captions are < 20 tokens
    embed_dim: int = 64
    train_images: int = 5000
    epochs: int = 20
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.1
    seed: int = 0

    def cache_key(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:12]


def build_tiny_clip(config: TinyClipConfig = TinyClipConfig()) -> CLIP:
    """The tiny architecture with random weights (an ordinary open_clip ``CLIP``)."""
    heads_width = 32
    clip = CLIP(
        embed_dim=config.embed_dim,
        vision_cfg=CLIPVisionCfg(
            layers=config.vision_layers, width=config.vision_width, head_width=heads_width,
            patch_size=config.patch_size, image_size=config.image_size,
        ),
        text_cfg=CLIPTextCfg(
            context_length=config.context_length, vocab_size=49408, width=config.text_width,
            heads=config.text_width // heads_width, layers=config.text_layers,
        ),
    )
    # What open_clip.create_model records for its named models; the adapter reads it.
    clip.visual.preprocess_cfg = {"size": config.image_size, "mean": open_clip.OPENAI_DATASET_MEAN, "std": open_clip.OPENAI_DATASET_STD}
    return clip


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV, Path.home() / ".cache" / "mava-platform")).expanduser().resolve()


@contextmanager
def first_use_lock(path: Path, name: str) -> Iterator[None]:
    """Hold ``<path>.lock`` while checking for, and making, the cached model at ``path``.

    Two processes that need a model at once (two sweeps on one machine, or a test session's
    background pretraining and a test) must not both pretrain it: the second waits, then reads
    the first one's file. It says why it waits, since pretraining takes minutes.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(f"{path}.lock")
    try:
        lock.acquire(timeout=0)
    except Timeout:
        print(f"waiting for another process that is pretraining {name} into {path}", file=sys.stderr, flush=True)
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


def cached_weights_path(config: TinyClipConfig = TinyClipConfig()) -> Path:
    return cache_dir() / f"tiny-clip-{config.cache_key()}.safetensors"


def pretrain(config: TinyClipConfig = TinyClipConfig(), progress: bool = True) -> dict[str, torch.Tensor]:
    """Contrastively pretrain the tiny CLIP on the synthetic train split; returns its state dict."""
    from trainables.data.synthetic import SyntheticWorld  # local: only needed when pretraining

    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    world = SyntheticWorld("train", config.train_images, image_size=config.image_size, seed=config.seed)
    images = torch.stack([world[i].image for i in range(len(world))])
    captions = [world[i].captions for i in range(len(world))]
    tokenizer = open_clip.tokenizer.SimpleTokenizer(context_length=config.context_length)
    # Tokenise every caption once: (images, captions per image, context)
    tokens = torch.stack([tokenizer(list(c)) for c in captions])

    model = build_tiny_clip(config)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    steps_per_epoch = len(world) // config.batch_size
    total_steps = steps_per_epoch * config.epochs
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=config.lr, total_steps=total_steps, pct_start=0.1)
    mean = torch.tensor(open_clip.OPENAI_DATASET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(open_clip.OPENAI_DATASET_STD).view(1, 3, 1, 1)
    bar = tqdm(total=total_steps, desc="pretraining tiny-clip (first use only)", disable=not progress, unit="step")
    for _ in range(config.epochs):
        order = torch.randperm(len(world), generator=generator)
        for step in range(steps_per_epoch):
            index = order[step * config.batch_size:(step + 1) * config.batch_size]
            # One random caption of each image per step: all 5 phrasings get seen over the epochs.
            which = torch.randint(0, tokens.shape[1], (len(index),), generator=generator)
            batch_tokens = tokens[index, which]
            batch_images = images[index]
            # Light augmentation (a random 1-pixel shift) so the encoder is not brittle to tiny changes.
            shift = torch.randint(-1, 2, (2,), generator=generator).tolist()
            batch_images = torch.roll(batch_images, shifts=shift, dims=(2, 3))
            image_features = F.normalize(model.encode_image((batch_images - mean) / std), dim=-1)
            text_features = F.normalize(model.encode_text(batch_tokens), dim=-1)
            logits = model.logit_scale.exp() * image_features @ text_features.T
            labels = torch.arange(len(index))
            loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            with torch.no_grad():
                model.logit_scale.clamp_(0, 4.6052)  # ln(100), as in CLIP
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    return {key: value.detach().contiguous() for key, value in model.state_dict().items()}


def ensure_pretrained(config: TinyClipConfig = TinyClipConfig(), force: bool = False, progress: bool = True) -> Path:
    """Path of the cached weights, pretraining them first if they are not cached yet."""
    path = cached_weights_path(config)
    if path.is_file() and not force:
        return path
    with first_use_lock(path, "tiny-clip"):
        if path.is_file() and not force:  # made while this process waited for the lock
            return path
        started = time.perf_counter()
        state = pretrain(config, progress=progress)
        # Write to a temporary name first so a reader that takes no lock never sees half a file.
        partial = path.with_suffix(f".partial-{os.getpid()}")
        save_file(state, str(partial), metadata={"config": json.dumps(asdict(config)), "pretrain_seconds": f"{time.perf_counter() - started:.1f}"})
        os.replace(partial, path)
    return path


def load_tiny_clip(config: TinyClipConfig = TinyClipConfig(), progress: bool = True) -> CLIP:
    """The pretrained tiny CLIP (pretrained and cached on first use)."""
    path = ensure_pretrained(config, progress=progress)
    model = build_tiny_clip(config)
    load_strict(model, read_state_dict(path), source=str(path))
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--force", action="store_true", help="pretrain again even if cached weights exist")
    args = parser.parse_args()
    started = time.perf_counter()
    path = ensure_pretrained(force=args.force)
    print(f"tiny-clip weights: {path} ({time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
