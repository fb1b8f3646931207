"""The built-in analyzers, registered through the ``sae_lens_attn.analyzers`` entry points
(pyproject.toml): ``basic`` (head attribution, DFA, induction scores and features), ``features``
(feature logits, families, polysemanticity, proxy histograms) and ``circuits`` (prefix-length
induction, recursive DFA).

Every analyzer reads the command's one ``Corpus`` (``AnalysisInput.corpus``) and follows one
feature policy: the ``features`` option where given, else the ``top`` (default 8) features with
the largest activation in the tokens (``Corpus.top_features``).
"""

from __future__ import annotations

from sae_lens_attn.analysis.registry import AnalysisInput
from sae_lens_attn.corpus import CaptureExtra
from sae_lens_attn.validation import check_features, token_text

DEFAULT_TOP = 8
"""Features an analyzer reads when neither ``features`` nor ``top`` is given."""
NEEDS_DFA: frozenset[CaptureExtra] = frozenset({"pattern", "values"})
"""What a capture holds for DFA: patterns and values."""
NEEDS_Z: frozenset[CaptureExtra] = frozenset()
"""What a capture holds for activations only: z."""


def chosen_features(inputs: AnalysisInput) -> list[int]:
    """The ``features`` option, else the ``top`` most active features (``Corpus.top_features``)."""
    given = inputs.options.get("features")
    if given is None:
        top = int(inputs.options.get("top", DEFAULT_TOP))
        given = inputs.corpus.top_features(inputs.sae, top)
    return check_features(given, inputs.sae.cfg.d_sae).tolist()


def shown_token(inputs: AnalysisInput, prompt: int, position: int) -> str:
    """The token at ``position`` of ``prompt`` as text."""
    return token_text(inputs.tokenizer, int(inputs.tokens[prompt, position]))
