"""ALBEF's text preprocessing: ``pre_caption`` and ``[CLS] pieces`` inputs without a trailing ``[SEP]``.

ALBEF's own tokenizer (``models/tokenization_bert.py``) builds one sequence as
``[CLS] + tokens``; transformers' ``BertTokenizer`` would add ``[SEP]``, which shifts
every fusion output, so pieces are made with ``add_special_tokens=False`` and ``[CLS]``
is prepended here (ALBEF-TCL-NOTES §1.5). The vocabulary is read from a local
directory only (``vocab.txt``, bert-base-uncased's for released checkpoints).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from trainables.errors import UserError

if TYPE_CHECKING:  # imported by load_bert_tokenizer: a process that loads no ALBEF model does not pay for it
    from transformers import BertTokenizer

MAX_WORDS = 30  # pre_caption(caption, max_words=30) in every ALBEF dataset class
MAX_TOKENS = 30  # Retrieval.py: truncation=True, max_length=30 -> [CLS] + 29 pieces
_DELETED = re.compile(r"[,.'!?\"()*#:;~]")


def pre_caption(caption: str, max_words: int = MAX_WORDS) -> str:
    """ALBEF's ``dataset/utils.py:pre_caption``: lower-case, drop punctuation, ``-``/``/`` -> space, first words."""
    caption = _DELETED.sub("", caption.lower()).replace("-", " ").replace("/", " ").replace("<person>", "person")
    caption = re.sub(r"\s{2,}", " ", caption).rstrip("\n").strip(" ")
    return " ".join(caption.split(" ")[:max_words])


def load_bert_tokenizer(text_dir: Path) -> BertTokenizer:
    """The slow ``BertTokenizer`` of ``text_dir/vocab.txt`` (lower-casing as bert-base-uncased)."""
    vocab = Path(text_dir) / "vocab.txt"
    if not vocab.is_file():
        raise UserError(f"{text_dir} has no vocab.txt: save bert-base-uncased's tokenizer there "
                        "(BertTokenizer.from_pretrained('bert-base-uncased').save_pretrained(DIR) on a machine with internet)")
    from transformers import BertTokenizer

    try:
        # from_pretrained maps vocab.txt in transformers 4.x and 5.x alike (their constructors differ).
        return BertTokenizer.from_pretrained(str(text_dir), local_files_only=True, do_lower_case=True)
    except (OSError, ValueError) as error:
        raise UserError(f"could not read the BERT tokenizer in {text_dir} ({error}): re-save it with save_pretrained()") from None


class AlbefTokenizer:
    """Strings -> ALBEF's inputs: ``input_ids`` (N, L) = ``[CLS] pieces`` padded with 0, ``attention_mask``."""

    def __init__(self, tokenizer: BertTokenizer, max_tokens: int = MAX_TOKENS):
        self.tokenizer = tokenizer
        self.max_tokens = max_tokens
        self.cls_id = int(tokenizer.cls_token_id)
        self.pad_id = int(tokenizer.pad_token_id)
        self.mask_id = int(tokenizer.mask_token_id) if tokenizer.mask_token_id is not None else None

    def pieces(self, texts: list[str]) -> list[list[int]]:
        """Token ids of ``pre_caption(text)`` with ``[CLS]`` first, at most ``max_tokens`` in all, no ``[SEP]``."""
        encoded = self.tokenizer([pre_caption(text) for text in texts], add_special_tokens=False)["input_ids"]
        return [[self.cls_id] + ids[: self.max_tokens - 1] for ids in encoded]

    def __call__(self, texts: list[str], device: torch.device | None = None) -> dict[str, torch.Tensor]:
        return self.pad(self.pieces(list(texts)), device)

    def pad(self, rows: list[list[int]], device: torch.device | None = None) -> dict[str, torch.Tensor]:
        """Rows of :meth:`pieces` as a batch padded to its longest row (what ``__call__`` returns)."""
        length = max((len(row) for row in rows), default=1)
        input_ids = torch.full((len(rows), length), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
        for index, row in enumerate(rows):
            input_ids[index, : len(row)] = torch.tensor(row)
            attention_mask[index, : len(row)] = 1
        return {"input_ids": input_ids.to(device), "attention_mask": attention_mask.to(device)}
