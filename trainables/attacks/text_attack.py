"""BERT-Attack-style word substitution (Li et al. 2020), as SGA and Co-attack use it on captions.

For each caption:

1. rank its words by importance: delete the word (the "blank" of BERT-Attack's
   ``[UNK]``; CLIP's BPE has no unknown token) and measure how far the victim's text
   embedding moves, ``KL(softmax f(t) || softmax f(t without w))`` as in the SGA and
   Co-attack code;
2. walk the words from the most important, skipping stop words; for each, score every
   candidate replacement (from a :mod:`~trainables.attacks.text_candidates` source)
   with the caller's objective and keep the best one **only if it raises the
   objective** above the current caption's (the reference code compares against the
   unchanged caption too, so "no candidate helps" leaves the caption as it was);
3. stop after ``budget`` changed words (SGA/Co-attack: 1).

The objective sees the victim's raw text features of each candidate caption and the
index of the caption it came from, so one function serves Co-attack (embedding change),
SGA (minus the cosine to the guiding image) and VLP-attack (a contrastive loss).

Example::

    flat, owner = flatten_captions(captions)                  # captions[b]: tuple of str
    guide = F.normalize(model.encode_image(images), dim=-1)[owner]
    objective = lambda features, index: -(F.normalize(features, dim=-1) * guide[index]).sum(-1)
    adversarial = text_attack(model, flat, objective, OfflineCandidates(model), generator)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from trainables.attacks.text_candidates import STOP_WORDS, CandidateSource, is_substitutable, split_word

# (features (N, D) raw text embeddings of candidate captions, index (N,) of the caption each
# candidate belongs to) -> (N,) scores to *maximise*.
TextObjective = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class TextAttackSettings:
    """Fields: budget = words changed per caption at most (SGA, Co-attack: 1); min_cosine = optional
    similarity constraint: a candidate whose text embedding has a cosine below this to the original
    caption's is rejected (None = no filter, as in SGA and Co-attack); batch_size = texts per
    ``encode_text`` call."""

    budget: int = 1
    min_cosine: float | None = None
    batch_size: int = 512


def flatten_captions(captions: list[tuple[str, ...]]) -> tuple[list[str], torch.Tensor]:
    """``captions[b]`` -> (all captions in order, (T,) index of each caption's image)."""
    flat = [caption for group in captions for caption in group]
    owner = torch.tensor([b for b, group in enumerate(captions) for _ in group], dtype=torch.long)
    return flat, owner


def regroup(flat: list[str], captions: list[tuple[str, ...]]) -> list[tuple[str, ...]]:
    """Inverse of :func:`flatten_captions` for a same-length list of (adversarial) captions."""
    grouped, start = [], 0
    for group in captions:
        grouped.append(tuple(flat[start:start + len(group)]))
        start += len(group)
    return grouped


def embedding_kl(reference: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    """Per row ``KL(softmax(reference) || softmax(features))`` over the embedding dimension.

    This is ``torch.nn.KLDivLoss(features.log_softmax(-1), reference.softmax(-1))`` summed over
    dims, the "embedding change" of the SGA/Co-attack code (their argument order).
    """
    log_p = reference.float().log_softmax(dim=-1)
    return (log_p.exp() * (log_p - features.float().log_softmax(dim=-1))).sum(dim=-1)


@torch.no_grad()
def encode_texts(model, texts: list[str], batch_size: int) -> torch.Tensor:
    """Raw text features (N, D) in chunks of ``batch_size``."""
    return torch.cat([model.encode_text(texts[i:i + batch_size]).float() for i in range(0, len(texts), batch_size)])


def _replace(words: list[str], position: int, core: str) -> str:
    prefix, _, suffix = split_word(words[position])
    return " ".join(words[:position] + [prefix + core + suffix] + words[position + 1:])


def _usable(candidate: str, original_core: str) -> bool:
    # BERT-Attack's filters: not the word itself, not a sub-word piece, not a stop word.
    return (bool(candidate) and " " not in candidate and not candidate.startswith("##")
            and candidate.lower() != original_core.lower() and candidate.lower() not in STOP_WORDS)


@torch.no_grad()
def text_attack(model, captions: list[str], objective: TextObjective, source: CandidateSource,
                generator: torch.Generator, settings: TextAttackSettings = TextAttackSettings()) -> list[str]:
    """Substitute at most ``settings.budget`` words per caption to maximise ``objective``.

    Args:
        model: the victim (only ``encode_text`` is used, under no_grad).
        captions: T captions (flat list).
        objective: see :data:`TextObjective`; its value on the unchanged caption is the bar a
            substitution must beat.
        source: proposes the replacement words (its ``name`` is the attack's ``text_source``).
        generator: seeds the candidate source (offline character-edit sampling).
        settings: budget, optional similarity constraint, encoding batch size.
    Returns:
        T captions, each differing from the input in at most ``budget`` whitespace words;
        the input caption itself where no candidate raises the objective.
    """
    if settings.budget <= 0 or not captions:
        return list(captions)
    sentences = [caption.split(" ") for caption in captions]
    original = encode_texts(model, captions, settings.batch_size)
    current_score = objective(original, torch.arange(len(captions))).float().cpu().clone()

    # 1. importance of each word = embedding change when it is blanked out.
    blanked, blank_owner = [], []
    for index, words in enumerate(sentences):
        for position in range(len(words)):
            blanked.append(" ".join(words[:position] + words[position + 1:]))
            blank_owner.append(index)
    blank_owner_tensor = torch.tensor(blank_owner, dtype=torch.long)
    importance = embedding_kl(original[blank_owner_tensor.to(original.device)], encode_texts(model, blanked, settings.batch_size)).cpu().split(
        [len(words) for words in sentences])
    orders = [[p for p in scores.argsort(descending=True, stable=True).tolist() if is_substitutable(words[p])]
              for words, scores in zip(sentences, importance)]

    # 2. walk the words by importance, all captions in lockstep so each round is one batched encode.
    proposals = source.propose(sentences, generator)
    current = [list(words) for words in sentences]
    changes = [0] * len(captions)
    pointer = [0] * len(captions)
    original_unit = F.normalize(original, dim=-1)
    while True:
        texts, owners, replacements = [], [], []
        for index in range(len(captions)):
            while changes[index] < settings.budget and pointer[index] < len(orders[index]):
                position = orders[index][pointer[index]]
                pointer[index] += 1
                core = split_word(sentences[index][position])[1]
                usable = list(dict.fromkeys(c for c in proposals[index][position] if _usable(c, core)))
                if usable:
                    for candidate in usable:
                        texts.append(_replace(current[index], position, candidate))
                        owners.append(index)
                        replacements.append((position, candidate))
                    break
        if not texts:
            break
        owner_tensor = torch.tensor(owners, dtype=torch.long)
        features = encode_texts(model, texts, settings.batch_size)
        scores = objective(features, owner_tensor).float().cpu()
        if settings.min_cosine is not None:
            cosine = (F.normalize(features, dim=-1) * original_unit[owner_tensor.to(features.device)]).sum(dim=-1).cpu()
            scores = torch.where(cosine >= settings.min_cosine, scores, torch.full_like(scores, float("-inf")))
        for index in owner_tensor.unique().tolist():
            rows = (owner_tensor == index).nonzero().flatten()
            best = rows[scores[rows].argmax()].item()
            if scores[best] > current_score[index]:  # strictly better, else keep the caption as it is
                position, candidate = replacements[best]
                prefix, _, suffix = split_word(current[index][position])
                current[index][position] = prefix + candidate + suffix
                current_score[index] = scores[best]
                changes[index] += 1
    return [" ".join(words) for words in current]
