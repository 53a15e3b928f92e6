"""Batching counts items, not requests; oversized requests are split and joined back in order."""

from __future__ import annotations

import concurrent.futures

import httpx
from prometheus_client.parser import text_string_to_metric_families


def _close(a: list, b: list) -> bool:
    import numpy as np

    return np.asarray(a).shape == np.asarray(b).shape and np.allclose(a, b, atol=1e-5)


def _batch_histogram(url: str) -> dict[float, float]:
    buckets: dict[float, float] = {}
    for family in text_string_to_metric_families(httpx.get(url + "/metrics").text):
        if family.name == "hydraserve_batch_size":
            for s in family.samples:
                if s.name.endswith("_bucket"):
                    le = float(s.labels["le"])
                    buckets[le] = buckets.get(le, 0) + s.value
    return buckets


def test_items_count_toward_max_batch_size(serve, tiny_dir):
    server = serve(["model=tiny", f"model.path={tiny_dir}", "model.delay_ms=20", "batching=dynamic",
                    "batching.max_batch_size=4", "batching.max_delay_ms=20", "cache=none", "tracing=none"])
    vectors = [[float(i)] * 8 for i in range(10)]
    with httpx.Client(base_url=server.url, timeout=30) as client:
        single = [client.post("/predict", json={"input": v}).json()["outputs"][0] for v in vectors]
        # A 10-item request exceeds max_batch_size=4: split into 4+4+2 and joined back in order.
        joined = client.post("/predict", json={"input": vectors})
        assert joined.status_code == 200
        assert _close(joined.json()["outputs"], single)  # batched matmuls may differ in the last bits

        with concurrent.futures.ThreadPoolExecutor(6) as pool:
            bodies = list(pool.map(lambda i: client.post("/predict", json={"input": vectors[i:i + 3]}).json(),
                                   range(6)))
        assert all(_close(b["outputs"], single[i:i + 3]) for i, b in enumerate(bodies))
    hist = _batch_histogram(server.url)
    assert hist[float("inf")] > 0
    assert hist[4.0] == hist[float("inf")], hist  # no batch ever held more than 4 items
