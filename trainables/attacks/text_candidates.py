"""Where a word-substitution attack gets its replacement words: a local masked LM, or offline edits.

Two sources, both returning for every word of every sentence its candidate
replacements (best first):

* :class:`MaskedLMCandidates` — BERT-Attack (Li et al. 2020) as SGA and Co-attack
  use it: a masked language model read from a **local directory** (never
  downloaded) predicts the top-k tokens at each word's position of the
  *unmasked* sentence; predictions with a logit under 0.3 are dropped; words
  split into several sub-words get the best 24 combinations of their sub-words'
  top-4 predictions ranked by the MLM's perplexity. ``text_source`` =
  ``"mlm:<directory>"``.
* :class:`OfflineCandidates` — needs nothing but the victim: character edits
  (swap, delete, insert, substitute one letter; a seeded sample of them) plus the
  nearest neighbours of the word in the victim's own token-embedding space
  (open_clip ``token_embedding``, decoded with its SimpleTokenizer).
  ``text_source`` = ``"offline:char+token-embedding"`` (``"offline:char"`` for a
  model without an open_clip text tower).

Example::

    source = OfflineCandidates(model)            # or MaskedLMCandidates("/models/bert-base-uncased")
    words = [caption.split(" ") for caption in captions]
    candidates = source.propose(words, generator)  # candidates[i][j]: replacements for words[i][j]
"""

from __future__ import annotations

import functools
import itertools
import re
import string
from pathlib import Path
from typing import Protocol

import torch
import torch.nn.functional as F

from trainables.errors import UserError

# Function words and punctuation that BERT-Attack never substitutes (changing them
# rarely changes meaning, and substituting them makes ungrammatical text).
STOP_WORDS: frozenset[str] = frozenset(
    """
    a an the and or but nor so yet if then than that this these those there here
    of in on at to from by for with without within into onto over under above below
    across along around behind beside besides between beyond through toward towards
    up down out off about after before during until upon via per against among
    is am are was were be been being do does did done has have had having
    can could may might must shall should will would
    i me my mine myself you your yours yourself we us our ours he him his she her
    hers it its itself they them their theirs what which who whom whose when where
    why how all any both each either neither few more most other others some such
    no not only own same too very just also again ever even still already else
    . , ; : ! ? - / " ' ( ) & @ % ^ * + = < > |
    """.split()
)

# Core of a whitespace word: leading/trailing punctuation stays where it is, only the
# core is substituted ("huge;" -> core "huge", suffix ";").
_WORD = re.compile(r"^(\W*)(.*?)(\W*)$", re.DOTALL)


def split_word(word: str) -> tuple[str, str, str]:
    """``"huge;" -> ("", "huge", ";")``: prefix punctuation, core, suffix punctuation."""
    prefix, core, suffix = _WORD.match(word).groups()
    return prefix, core, suffix


def is_substitutable(word: str) -> bool:
    """Whether BERT-Attack may touch this word: a non-empty core that is not a stop word."""
    core = split_word(word)[1]
    return bool(core) and core.lower() not in STOP_WORDS


class CandidateSource(Protocol):
    """Anything that proposes replacement words; ``name`` is recorded as ``text_source``."""

    name: str

    def propose(self, sentences: list[list[str]], generator: torch.Generator) -> list[list[list[str]]]:
        """For each sentence (a list of whitespace words) and each word, candidate *cores*, best first."""
        ...


# ---- masked language model (BERT-Attack) ----------------------------------------------


class MaskedLMCandidates:
    """Top-k predictions of a local masked LM at each word's position (BERT-Attack).

    Args:
        directory: a local directory with a Hugging Face masked LM and its tokenizer
            (``AutoModelForMaskedLM.from_pretrained(directory)``); nothing is downloaded.
        top_k: predictions kept per position (BERT-Attack, SGA, Co-attack: 10).
        logit_threshold: predictions whose logit is below this are dropped (SGA: 0.3).
        max_length: tokens fed to the MLM, as in the reference code (30).
    """

    def __init__(self, directory: str | Path, top_k: int = 10, logit_threshold: float = 0.3, max_length: int = 30,
                 device: str | torch.device = "cpu"):
        from transformers import AutoModelForMaskedLM, AutoTokenizer  # local: only this source needs transformers

        path = Path(directory).expanduser().resolve()
        if not path.is_dir():
            raise UserError(f"masked-LM directory {path} does not exist: give a local folder holding a Hugging Face "
                            "masked LM and its tokenizer (e.g. bert-base-uncased saved with save_pretrained)")
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
            self.mlm = AutoModelForMaskedLM.from_pretrained(str(path), local_files_only=True).to(device).eval()
        except (OSError, ValueError) as error:
            first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise UserError(f"could not load a masked LM from {path} ({first_line}): the folder needs config.json, "
                            "the weights and the tokenizer files written by save_pretrained") from None
        self.mlm.requires_grad_(False)
        self.name = f"mlm:{path}"
        self.top_k = top_k
        self.logit_threshold = logit_threshold
        self.max_length = max_length
        self.device = torch.device(device)
        self._special = set(self.tokenizer.all_special_tokens)

    @torch.no_grad()
    def propose(self, sentences: list[list[str]], generator: torch.Generator) -> list[list[list[str]]]:
        """Candidates for every word; the generator is unused (the MLM is deterministic)."""
        return [self._propose_one(words) for words in sentences]

    def _propose_one(self, words: list[str]) -> list[list[str]]:
        # Sub-word span of each word's core, counted from the first token after [CLS]
        # (the reference code indexes the logits without that +1 shift: off by one).
        tokens: list[str] = []
        spans: list[tuple[int, int]] = []
        for word in words:
            prefix, core, suffix = split_word(word)
            tokens += self.tokenizer.tokenize(prefix) if prefix else []
            start = len(tokens)
            tokens += self.tokenizer.tokenize(core) if core else []
            spans.append((start, len(tokens)))
            tokens += self.tokenizer.tokenize(suffix) if suffix else []
        tokens = tokens[: self.max_length - 2]
        ids = [self.tokenizer.cls_token_id, *self.tokenizer.convert_tokens_to_ids(tokens), self.tokenizer.sep_token_id]
        logits = self.mlm(input_ids=torch.tensor([ids], device=self.device)).logits[0, 1:-1]  # (L, V)
        scores, predictions = torch.topk(logits, self.top_k, dim=-1)
        proposals = []
        for (start, end), word in zip(spans, words):
            if end <= start or end > len(tokens):  # no core, or truncated away
                proposals.append([])
            elif end - start == 1:
                proposals.append(self._single(predictions[start], scores[start]))
            else:
                proposals.append(self._multi(predictions[start:end]))
        return proposals

    def _single(self, predictions: torch.Tensor, scores: torch.Tensor) -> list[str]:
        words = []
        for token_id, score in zip(predictions.tolist(), scores.tolist()):
            if score < self.logit_threshold:
                break  # sorted: every later prediction is below the threshold too
            token = self.tokenizer.convert_ids_to_tokens(token_id)
            if token.startswith("##") or token in self._special:
                continue  # a sub-word piece is not a word
            words.append(token)
        return words

    def _multi(self, predictions: torch.Tensor) -> list[str]:
        # BERT-Attack for words of several sub-words: combine each piece's top-4, keep the
        # first 24 combinations, rank them by the MLM's perplexity on the combination alone.
        per_piece = predictions[:12, :4].tolist()
        combos = list(itertools.islice(itertools.product(*per_piece), 24))
        batch = torch.tensor([[self.tokenizer.cls_token_id, *combo, self.tokenizer.sep_token_id] for combo in combos],
                             device=self.device)
        logits = self.mlm(input_ids=batch).logits[:, 1:-1]  # (N, L, V)
        targets = batch[:, 1:-1]
        nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none")
        perplexity = nll.view(len(combos), -1).mean(dim=1).exp()
        words = []
        for index in perplexity.argsort().tolist():
            text = self.tokenizer.convert_tokens_to_string(self.tokenizer.convert_ids_to_tokens(combos[index])).strip()
            if text and " " not in text and text not in words:
                words.append(text)
        return words[: self.top_k]


# ---- offline: character edits + token-embedding neighbours ------------------------------


def char_edits(word: str) -> list[str]:
    """Every word one character edit away (adjacent swap, deletion, insertion, substitution of a letter).

    In a fixed order (swaps, deletions, substitutions, insertions), without duplicates or ``word`` itself.
    """
    return list(_char_edits(word))


@functools.lru_cache(maxsize=65536)
def _char_edits(word: str) -> tuple[str, ...]:
    # Cached: a text attack asks for the same words again (SGA's two text stages, every batch and eps
    # of an evaluation), and building ~330 edits in Python was a tenth of SGA's time (BENCHMARKS.md).
    letters = string.ascii_lowercase
    edits: list[str] = []
    edits += [word[:i] + word[i + 1] + word[i] + word[i + 2:] for i in range(len(word) - 1)]
    edits += [word[:i] + word[i + 1:] for i in range(len(word))]
    edits += [word[:i] + c + word[i + 1:] for i in range(len(word)) for c in letters]
    edits += [word[:i] + c + word[i:] for i in range(len(word) + 1) for c in letters]
    seen = {word}
    unique = []
    for edit in edits:
        if edit and edit not in seen:
            seen.add(edit)
            unique.append(edit)
    return tuple(unique)


class OfflineCandidates:
    """Candidates without any download: character edits plus the victim's token-embedding neighbours.

    Args:
        model: the attacked model. With an open_clip text tower (``clip_text.token_embedding``
            and a SimpleTokenizer ``tokenizer``) the nearest whole-word tokens by cosine in the
            token-embedding space are proposed; otherwise character edits only.
        char_candidates: character edits sampled (seeded) per word, out of all one-edit words.
        neighbour_candidates: nearest token-embedding neighbours per word.
    """

    def __init__(self, model, char_candidates: int = 10, neighbour_candidates: int = 10):
        self.char_candidates = char_candidates
        self.neighbour_candidates = neighbour_candidates
        clip_text = getattr(model, "clip_text", None)
        tokenizer = getattr(model, "tokenizer", None)
        self._neighbours_enabled = clip_text is not None and hasattr(clip_text, "token_embedding") and hasattr(tokenizer, "encoder")
        self.name = "offline:char+token-embedding" if self._neighbours_enabled else "offline:char"
        if self._neighbours_enabled:
            self._encoder: dict[str, int] = tokenizer.encoder
            # Only whole-word tokens ("red</w>") made of letters or digits can replace a word.
            word_ids, word_texts = [], []
            for token, token_id in tokenizer.encoder.items():
                if token.endswith("</w>") and token[:-4].isascii() and token[:-4].isalnum():
                    word_ids.append(token_id)
                    word_texts.append(token[:-4])
            self._word_ids = torch.tensor(word_ids)
            self._word_texts = word_texts
            weight = clip_text.token_embedding.weight.detach().float()
            self._unit_embeddings = F.normalize(weight, dim=-1)
            self._unit_word_embeddings = self._unit_embeddings[self._word_ids.to(weight.device)]
        self._neighbour_cache: dict[str, list[str]] = {}

    def neighbours(self, core: str) -> list[str]:
        """Nearest whole-word tokens to ``core`` (lower-cased, one BPE token) by cosine; [] otherwise."""
        key = core.lower()
        if not self._neighbours_enabled or self.neighbour_candidates == 0:
            return []
        if key not in self._neighbour_cache:
            token_id = self._encoder.get(key + "</w>")
            if token_id is None:  # split into several BPE tokens: no single embedding to search around
                self._neighbour_cache[key] = []
            else:
                similarity = self._unit_word_embeddings @ self._unit_embeddings[token_id]
                # The k + 1 best (the word itself may be among them), not a sort of the whole vocabulary:
                # sorting ~30k similarities per word was a sixth of Co-attack's time (BENCHMARKS.md).
                order = similarity.topk(min(self.neighbour_candidates + 1, similarity.numel())).indices.tolist()
                found = []
                for index in order:
                    text = self._word_texts[index]
                    if text != key:
                        found.append(text)
                    if len(found) == self.neighbour_candidates:
                        break
                self._neighbour_cache[key] = found
        return self._neighbour_cache[key]

    def propose(self, sentences: list[list[str]], generator: torch.Generator) -> list[list[list[str]]]:
        """Candidates per word: seeded sample of character edits, then token-embedding neighbours."""
        proposals = []
        for words in sentences:
            per_word = []
            for word in words:
                core = split_word(word)[1]
                if not core:
                    per_word.append([])
                    continue
                edits = char_edits(core.lower())
                # A seeded sample: all edits of a 6-letter word are ~330 texts to encode.
                order = torch.randperm(len(edits), generator=generator, device=generator.device).tolist()
                sampled = [edits[i] for i in order[: self.char_candidates]]
                per_word.append(sampled + [n for n in self.neighbours(core) if n not in sampled])
            proposals.append(per_word)
        return proposals
