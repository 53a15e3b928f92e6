"""The one text encoder shared by the embedding models and the semantic cache."""

from __future__ import annotations

import numpy as np
import pytest

from plugins._text_encoder import load_encoder, packaged_minilm_dir
from plugins.cache._embedder import TextEmbedder
from plugins.model.minilm import PLUGIN as MiniLM

SENTENCES = ["How do I reset my password?", "Quantization trades precision for speed."]


@pytest.mark.slow
def test_the_semantic_cache_embeds_exactly_as_the_served_model_does():
    """A semantic hit compares vectors in the served model's own space: same encoder, same pooling."""
    model = MiniLM()
    model.load("cpu")
    served = np.stack([o["embedding"] for o in model.postprocess(model.forward(model.preprocess(SENTENCES)))])
    cached = TextEmbedder(None, max_tokens=256, threads=1).embed(SENTENCES)
    np.testing.assert_allclose(cached, served, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(cached, axis=1), 1.0, atol=1e-5)


@pytest.mark.slow
def test_a_shared_encoder_is_loaded_once_and_a_model_gets_its_own():
    folder = packaged_minilm_dir()
    first, second = load_encoder(folder, shared=True), load_encoder(folder, shared=True)
    assert first[1] is second[1], "one copy per process for read-only users"
    own = load_encoder(folder)
    assert own[1] is not first[1], "a model plugin may quantize its encoder: never the shared one"
