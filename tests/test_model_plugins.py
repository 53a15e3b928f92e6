"""model=torchvision, model=torchscript and model=exported on small artifacts built in tmp_path.

Each plugin is configured the way a user does it (compose + validate), then driven through its hooks
in order: decode (API process) -> load/preprocess/forward/postprocess (worker) -> encode.
"""

from __future__ import annotations

import base64
import importlib.util
import io
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from framework import ConfigError, ModelPlugin, RequestError
from framework.config import compose, validate

needs_torchvision = pytest.mark.skipif(importlib.util.find_spec("torchvision") is None,
                                       reason="torchvision not installed (pip install 'hydraserve[vision]')")


def resolve_model(*overrides: str) -> ModelPlugin:
    return validate(compose(list(overrides))).model


def run(model: ModelPlugin, body: dict) -> dict:
    items = model.decode(body)
    return model.encode(model.postprocess(model.forward(model.preprocess(items))), body)


def problem_keys(*overrides: str) -> dict[str, str]:
    with pytest.raises(ConfigError) as err:
        validate(compose(list(overrides)))
    return {p.key: p.message for p in err.value.problems}


def image_b64(width: int, height: int, fmt: str = "PNG", seed: int = 0) -> str:
    from PIL import Image

    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(buf, format=fmt)
    return base64.b64encode(buf.getvalue()).decode("ascii")


# ------------------------------------------------------------------------------------ torchvision
IMAGE_SIZE, RESIZE, CLASSES = 32, 40, 10


@pytest.fixture(scope="module")
def vision_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    if importlib.util.find_spec("torchvision") is None:
        pytest.skip("torchvision not installed (pip install 'hydraserve[vision]')")
    from safetensors.torch import save_file

    from plugins.model._torchvision_compat import import_models

    folder = tmp_path_factory.mktemp("vision")
    torch.manual_seed(0)
    net = import_models().resnet18(num_classes=CLASSES).eval()
    state = {k: v.contiguous() for k, v in net.state_dict().items()}
    save_file(state, str(folder / "resnet18.safetensors"))
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, folder / "resnet18.pt")
    (folder / "labels.txt").write_text("\n".join(f"class-{i}" for i in range(CLASSES)) + "\n")
    return {"safetensors": folder / "resnet18.safetensors", "pt": folder / "resnet18.pt",
            "labels": folder / "labels.txt", "folder": folder}


def vision_overrides(weights: Path | str, *extra: str) -> list[str]:
    return ["model=torchvision", "model.arch=resnet18", f"model.weights={weights}",
            f"model.num_classes={CLASSES}", f"model.image_size={IMAGE_SIZE}", f"model.resize_size={RESIZE}",
            "model.top_k=3", *extra]


@pytest.fixture(scope="module")
def classifier(vision_files: dict[str, Path]) -> ModelPlugin:
    labels = f"model.labels={vision_files['labels']}"
    model = resolve_model(*vision_overrides(vision_files["safetensors"], labels))
    model.load("cpu")
    return model


def test_classifies_png_jpeg_and_tensor_inputs(classifier: ModelPlugin) -> None:
    png, jpeg = image_b64(48, 64), image_b64(80, 50, "JPEG", seed=1)
    tensor = torch.zeros(3, IMAGE_SIZE, IMAGE_SIZE).tolist()
    answer = run(classifier, {"input": [png, "data:image/jpeg;base64," + jpeg, tensor]})
    predictions = answer["predictions"]
    assert len(predictions) == 3
    for row in predictions:
        assert len(row) == 3  # top_k
        scores = [p["score"] for p in row]
        assert scores == sorted(scores, reverse=True) and 0 < sum(scores) <= 1.0 + 1e-6
        assert all(0 <= p["index"] < CLASSES and p["label"] == f"class-{p['index']}" for p in row)
    single = run(classifier, {"input": png})["predictions"]
    assert [p["index"] for p in single[0]] == [p["index"] for p in predictions[0]]
    assert [p["score"] for p in single[0]] == pytest.approx([p["score"] for p in predictions[0]], abs=1e-5)


def test_preprocessing_matches_torchvision_transforms(classifier: ModelPlugin) -> None:
    from PIL import Image
    from torchvision import transforms

    png = image_b64(53, 71, seed=3)
    reference = transforms.Compose([
        transforms.Resize(RESIZE), transforms.CenterCrop(IMAGE_SIZE), transforms.ToTensor(),
        transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
    ])(Image.open(io.BytesIO(base64.b64decode(png))).convert("RGB"))
    ours = classifier.preprocess([png])[0]
    assert torch.allclose(ours, reference, atol=1e-5)
    # A preprocessed tensor sent as a nested list is fed to the model as is: same logits.
    both = classifier.forward(classifier.preprocess([png, reference.tolist()]))
    assert torch.allclose(both[0], both[1], atol=1e-4)


def test_pt_state_dict_loads_like_safetensors(vision_files: dict[str, Path], classifier: ModelPlugin) -> None:
    model = resolve_model(*vision_overrides(vision_files["pt"]))
    model.load("cpu")
    batch = classifier.preprocess([image_b64(40, 40, seed=5)])
    assert torch.allclose(model.forward(batch), classifier.forward(batch))


@needs_torchvision
def test_random_weights_only_when_asked_and_reproducible() -> None:
    assert "model.weights" in problem_keys("model=torchvision")  # no default weights
    a, b = (resolve_model(*vision_overrides("random")) for _ in range(2))
    a.load("cpu")
    b.load("cpu")
    batch = a.preprocess(a.calibration_items()[:2])
    assert torch.equal(a.forward(batch), b.forward(batch))


def test_bad_images_are_422_naming_the_field(classifier: ModelPlugin) -> None:
    png, jpeg = image_b64(40, 40), image_b64(64, 64, "JPEG")
    assert classifier.decode({"input": [png, jpeg]}) == [png, jpeg]
    cases = {
        "input[1]": [png, "not base64 at all!"],
        "input[0]": [base64.b64encode(b"just some text, no image").decode()],
        "input[2]": [png, png, base64.b64encode(base64.b64decode(png)[:40]).decode()],  # truncated PNG
        "input[3]": [png, png, png, base64.b64encode(base64.b64decode(jpeg)[:-300]).decode()],  # cut JPEG
        "input": [],
    }
    for field, value in cases.items():
        with pytest.raises(RequestError) as err:
            classifier.decode({"input": value})
        assert err.value.field == field and err.value.status == 422, (field, err.value.message)
    with pytest.raises(RequestError) as err:
        classifier.decode({"input": [png, torch.zeros(3, IMAGE_SIZE, IMAGE_SIZE + 1).tolist()]})
    assert err.value.field == "input[1]" and "shape" in err.value.message
    with pytest.raises(RequestError) as err:
        classifier.decode({"input": [png] * 65})
    assert err.value.status == 413
    with pytest.raises(RequestError) as err:
        classifier.decode({"inputs": png})
    assert err.value.field == "input"


def test_weights_errors_name_the_key(vision_files: dict[str, Path]) -> None:
    problems = problem_keys("model=torchvision", "model.weights=/nope")
    assert "/nope" in problems["model.weights"]
    problems = problem_keys(*vision_overrides(vision_files["labels"], "model.arch=resnet_nope",
                                              "model.top_k=11"))
    assert {"model.weights", "model.arch", "model.top_k"} <= set(problems)
    # The file exists but is for another head size: the load error names the key and the mismatch.
    wrong = resolve_model(*vision_overrides(vision_files["safetensors"], "model.num_classes=7"))
    with pytest.raises(ValueError, match="model.weights.*num_classes=7"):
        wrong.load("cpu")


def test_quality_reports_top1_agreement_and_logit_error(classifier: ModelPlugin) -> None:
    logits = classifier.forward(classifier.preprocess(classifier.calibration_items()[:4]))
    same = classifier.quality(logits, logits.clone())
    assert same["top1_agreement"] == 1.0 and same["max_abs_logit_error"] == 0.0
    flipped = logits.clone()
    flipped[0] = -flipped[0]
    report = classifier.quality(logits, flipped)
    assert report["top1_agreement"] == 0.75 and report["min"] == 0.75
    assert report["max_abs_logit_error"] > 0


def test_missing_torchvision_is_a_clear_check_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "torchvision", None)  # what an environment without it looks like
    monkeypatch.setitem(sys.modules, "torchvision.models", None)
    problems = problem_keys(*vision_overrides("random"))
    assert "hydraserve[vision]" in problems["model"]


@needs_torchvision
def test_compat_import_in_a_fresh_process() -> None:
    """torchvision.models imports here; the op schemas are defined only when the C extension failed."""
    script = textwrap.dedent("""
        import torch
        from plugins.model import _torchvision_compat as compat
        models = compat.import_models()
        import torchvision.extension
        assert compat.shimmed == (not torchvision.extension._has_ops()), compat.shimmed
        net = models.get_model("resnet18", num_classes=3).eval()
        assert net(torch.zeros(1, 3, 32, 32)).shape == (1, 3)
        if compat.shimmed:
            from torchvision.ops import nms
            try:
                nms(torch.rand(2, 4), torch.rand(2), 0.5)
            except RuntimeError as exc:
                assert "Couldn't load custom C++ ops" in str(exc)
            else:
                raise AssertionError("nms ran without its kernel")
        print("ok", compat.shimmed)
    """)
    root = Path(__file__).resolve().parent.parent
    done = subprocess.run([sys.executable, "-c", script], cwd=root, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith("ok")


# ------------------------------------------------------------------------ torchscript and exported
def mlp() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4)).eval()


class RowSum(torch.nn.Module):
    """Items of any length (input_shape [-1]) -> their sum and length."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([x.sum(dim=1), torch.full_like(x[:, 0], x.shape[1])], dim=1)


@pytest.fixture(scope="module")
def tensor_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("tensor_models")
    files = {"ts": folder / "mlp.ts", "rowsum": folder / "rowsum.ts", "pt2": folder / "mlp.pt2",
             "pt2_static": folder / "mlp_static.pt2"}
    torch.jit.script(mlp()).save(str(files["ts"]))
    torch.jit.script(RowSum()).save(str(files["rowsum"]))
    example = (torch.randn(2, 8),)
    dynamic = torch.export.export(mlp(), example, dynamic_shapes=({0: torch.export.Dim("batch")},))
    torch.export.save(dynamic, str(files["pt2"]))
    torch.export.save(torch.export.export(mlp(), example), str(files["pt2_static"]))  # batch fixed to 2
    return files


@pytest.mark.parametrize(("kind", "file"),
                         [("torchscript", "ts"), ("exported", "pt2"), ("exported", "pt2_static")])
def test_tensor_models_match_the_eager_module(kind: str, file: str, tensor_files: dict[str, Path]) -> None:
    model = resolve_model(f"model={kind}", f"model.path={tensor_files[file]}", "model.input_shape=[8]")
    model.load("cpu")
    x = torch.randn(3, 8)
    with torch.no_grad():
        expected = mlp()(x)
    several = run(model, {"input": x.tolist()})
    assert np.allclose(several["outputs"], expected.numpy(), atol=1e-5)
    one = run(model, {"input": x[0].tolist()})
    assert np.allclose(one["outputs"], expected[:1].numpy(), atol=1e-5)
    quality = model.quality(expected, expected)
    assert quality["min"] == pytest.approx(1.0) and quality["max_abs_error"] == 0.0


def test_dynamic_dimension_items_of_different_lengths(tensor_files: dict[str, Path]) -> None:
    model = resolve_model("model=torchscript", f"model.path={tensor_files['rowsum']}",
                          "model.input_shape=[-1]")
    model.load("cpu")
    answer = run(model, {"input": [[1, 2], [1, 1, 1], [5, 5], [2]]})
    assert answer["outputs"] == [[3.0, 2.0], [3.0, 3.0], [10.0, 2.0], [2.0, 1.0]]  # request order kept


def test_tensor_request_errors_name_the_field(tensor_files: dict[str, Path]) -> None:
    model = resolve_model("model=torchscript", f"model.path={tensor_files['ts']}", "model.input_shape=[8]",
                          "model.max_items=4")
    row = [0.5] * 8
    cases = [
        ({"input": [row, [0.5] * 7]}, "input[1]", "shape"),
        ({"input": [0.5] * 7}, "input", "shape"),
        ({"input": [[True] * 8]}, "input[0]", "booleans"),
        ({"input": [row, ["a"] * 8]}, "input[1]", "numbers"),
        ({"input": [[row]]}, "input[0]", "shape"),
        ({"input": []}, "input", "non-empty"),
        ({"input": "text"}, "input", "item"),
        ({"data": row}, "input", "missing"),
    ]
    for body, field, words in cases:
        with pytest.raises(RequestError) as err:
            model.decode(body)
        assert err.value.field == field and err.value.status == 422, (body, err.value.message)
        assert words in err.value.message, err.value.message
    with pytest.raises(RequestError) as err:
        model.decode({"input": [row] * 5})
    assert err.value.status == 413

    ints = resolve_model("model=torchscript", f"model.path={tensor_files['ts']}", "model.input_shape=[2]",
                         "model.input_dtype=uint8")
    assert ints.decode({"input": [[1, 255], [0, 3]]}) == [[1, 255], [0, 3]]
    for value, words in (([[1, 2], [0.5, 3]], "integers"), ([[1, 256]], "range")):
        with pytest.raises(RequestError) as err:
            ints.decode({"input": value})
        assert words in err.value.message and err.value.field.startswith("input")


def test_tensor_model_config_errors(tensor_files: dict[str, Path]) -> None:
    assert "model.path" in problem_keys("model=exported")
    problems = problem_keys("model=torchscript", "model.path=/nope.ts", "model.input_shape=[0]",
                            "model.input_dtype=complex64")
    assert {"model.path", "model.input_shape", "model.input_dtype"} <= set(problems)
    pt2 = f"model.path={tensor_files['pt2']}"
    wrong_shape = resolve_model("model=exported", pt2, "model.input_shape=[7]")
    with pytest.raises(ValueError, match="model.input_shape"):
        wrong_shape.load("cpu")
    wrong_dtype = resolve_model("model=exported", pt2, "model.input_shape=[8]", "model.input_dtype=float64")
    with pytest.raises(ValueError, match="model.input_dtype"):
        wrong_dtype.load("cpu")
