"""Which word source the text attacks (SGA, Co-attack, VLP-attack) use: one spec string, parsed once.

======================  ==========================================================================
spec                    source (``text_source`` recorded in every result row)
======================  ==========================================================================
``tiny-mlm`` (default)  the embedded masked LM (:mod:`trainables.models.tiny_mlm`), pretrained on
                        the synthetic world's captions and cached; ``tiny-mlm:<cache key>``
``mlm:<abs. folder>``   a local Hugging Face masked LM, e.g. ``bert-base-uncased`` saved with
                        ``save_pretrained`` (what the papers use); ``mlm:<folder>``
``offline``             character edits + the victim's token-embedding neighbours, no MLM;
                        ``offline:char+token-embedding``
======================  ==========================================================================

Both MLM sources are BERT-Attack's: :class:`~trainables.attacks.text_candidates.MaskedLMCandidates`.

Example::

    spec = check_word_candidates("tiny-mlm")
    source = candidate_source(spec, model, device)   # pass as candidates= to sga / co_attack
"""

from __future__ import annotations

from pathlib import Path

import torch

from trainables.attacks.text_candidates import CandidateSource, MaskedLMCandidates, OfflineCandidates
from trainables.errors import UserError

EMBEDDED_MLM = "tiny-mlm"
OFFLINE = "offline"
MLM_PREFIX = "mlm:"
WORD_CANDIDATE_FORMS = f"{EMBEDDED_MLM}, {OFFLINE} or {MLM_PREFIX}/absolute/folder/of/a/masked-lm"


def check_word_candidates(spec: str) -> str:
    """``spec`` itself when it is a valid source spec; raise ValueError naming the valid forms otherwise.

    A folder must be absolute: training runs in Ray workers whose working directory is not yours.
    """
    if spec in (EMBEDDED_MLM, OFFLINE):
        return spec
    if spec.startswith(MLM_PREFIX):
        folder = spec[len(MLM_PREFIX):]
        if not folder or not Path(folder).expanduser().is_absolute():
            raise ValueError(f"word candidates {spec!r}: the masked-LM folder must be an absolute path, "
                             f"e.g. {MLM_PREFIX}/models/bert-base-uncased")
        return spec
    raise ValueError(f"unknown word-candidate source {spec!r}: use {WORD_CANDIDATE_FORMS}")


def mlm_folder(spec: str) -> Path | None:
    """The local folder of an ``mlm:<folder>`` spec; None for the other sources."""
    return Path(spec[len(MLM_PREFIX):]).expanduser() if spec.startswith(MLM_PREFIX) else None


def embedded_mlm_problem(spec: str, data: str, attacks: tuple[str, ...]) -> str | None:
    """Why ``spec`` cannot serve text attacks on ``data``, or None.

    The embedded MLM knows only the synthetic world's words: on real captions every word
    would be ``[UNK]`` to it and its proposals synthetic-world words, not BERT-Attack.
    """
    from trainables.attacks import TEXT_ATTACKS
    from trainables.data import parse_data_spec

    if spec != EMBEDDED_MLM or not any(attack in TEXT_ATTACKS for attack in attacks):
        return None
    try:
        kind = parse_data_spec(data).kind
    except UserError:
        return None  # the data spec's own check reports it
    # The shapes world's captions, entailment hypotheses (+ a few hidden-clause words) and referring expressions.
    if kind in ("synthetic", "synthetic-ve", "synthetic-vg"):
        return None
    return (f"word candidates {EMBEDDED_MLM!r} (the embedded MLM) knows only the synthetic world's words, but the text "
            f"attacks run on {data!r}: give a real masked LM ({MLM_PREFIX}/absolute/folder, e.g. bert-base-uncased) "
            f"or {OFFLINE!r}")


def candidate_source(spec: str, victim, device: torch.device | str = "cpu") -> CandidateSource:
    """The word source named by ``spec`` (see the module table); ``victim`` feeds the offline source.

    The embedded MLM is pretrained and cached on first use (a progress bar, about a minute).
    """
    try:
        check_word_candidates(spec)
    except ValueError as error:
        raise UserError(str(error)) from None
    if spec == OFFLINE:
        return OfflineCandidates(victim)
    if spec == EMBEDDED_MLM:
        from trainables.models.tiny_mlm import ensure_tiny_mlm  # local: only this source needs it

        folder = ensure_tiny_mlm()
        source = MaskedLMCandidates(folder, device=device)
        source.name = f"{EMBEDDED_MLM}:{folder.name.removeprefix(EMBEDDED_MLM + '-')}"
        return source
    return MaskedLMCandidates(mlm_folder(spec), device=device)
