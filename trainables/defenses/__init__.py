"""Defense objectives as pure tensor functions (features in, named loss terms out).

``mava`` (the paper's Eqs. 2-7), ``fare`` (Schlarmann et al. 2024) and ``tecoa``
(Mao et al. 2023). The training step of each lives in ``trainables.steps.STEPS``.
"""
