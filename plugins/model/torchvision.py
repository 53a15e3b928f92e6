"""``model=torchvision model.arch=resnet18 model.weights=FILE``: any torchvision image classifier.

Weights come from a local file only: ``.safetensors``, or a state dict in ``.pt``/``.pth`` read with
``torch.load(weights_only=True)``; ``weights: random`` (written explicitly) builds the architecture
with seeded random weights, for benchmarks and tests. Nothing is ever downloaded.

Request: ``{"input": IMAGE}`` or ``{"input": [IMAGE, ...]}`` where IMAGE is a base64 PNG/JPEG (a
``data:image/...;base64,`` prefix is accepted) or a nested list ``[3][image_size][image_size]`` of
floats that is already preprocessed (resized, cropped and normalised). Answer:
``{"predictions": [[{"index": i, "label": "...", "score": p}, ...], ...]}``, the ``top_k`` classes of
each image by softmax probability (``label`` only when a ``labels`` file is configured).

Where images are decoded: the API process checks each image cheaply (valid base64, a PNG or JPEG
header, size limits, ``Image.verify``), so a bad upload is a 422 naming ``input[i]`` and never reaches
the worker; the inference worker does the full decode + resize + crop, so only the compressed bytes
cross the process boundary, and the uint8 pixels are normalised on the device in one batched op.
"""

from __future__ import annotations

import base64
import binascii
import io
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from framework import CheckContext, ModelPlugin, RequestError
from plugins.model._tensor_io import check_tensor_item, file_fingerprint

IMAGE_FORMATS = ("PNG", "JPEG")  # the only decoders PIL may try: a smaller attack surface
INTERPOLATIONS = ("nearest", "bilinear", "bicubic")
WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth")
RANDOM = "random"
_JPEG_END = b"\xff\xd9"  # the EOI marker; tolerated up to 4 KiB before the end (trailing metadata)
RANDOM_SEED = 0  # `weights: random` is reproducible, so cached answers stay valid across restarts


@dataclass
class TorchvisionConfig:
    arch: str = "resnet18"  # a name from torchvision.models.list_models(module=torchvision.models)
    weights: str = "???"  # .safetensors / .pt / .pth state dict, or "random"; required
    num_classes: int = 1000  # the classifier's output size (must match the weights)
    image_size: int = 224  # the centre crop fed to the model (pixels, square)
    resize_size: int | None = 256  # shorter side resized to this before the crop; null: resize to the crop
    interpolation: str = "bilinear"  # nearest | bilinear | bicubic
    mean: list[float] = field(default_factory=lambda: [0.485, 0.456, 0.406])  # per RGB channel, on [0, 1]
    std: list[float] = field(default_factory=lambda: [0.229, 0.224, 0.225])
    top_k: int = 5  # classes returned per image
    labels: str | None = None  # text file, one class name per line (num_classes lines)
    fast_jpeg_decode: bool = True  # let libjpeg decode large JPEGs at a reduced scale (>= resize size)
    max_items: int = 64  # images per request (413 above)
    max_image_bytes: int = 10 * 1024 * 1024  # decoded bytes per image (413 above)
    max_image_pixels: int = 40_000_000  # width * height per image (413 above)

    def problems(self) -> list[tuple[str, str]]:
        out = []
        if self.weights != RANDOM:
            path = Path(os.path.expanduser(self.weights))
            if not path.is_file():
                out.append(("weights", f"no such file: {self.weights}; give a local .safetensors/.pt/.pth "
                            f"state dict, or write weights={RANDOM} for random weights"))
            elif path.suffix not in WEIGHT_SUFFIXES:
                out.append(("weights", f"{self.weights}: expected a {', '.join(WEIGHT_SUFFIXES)} file"))
        if self.num_classes < 1:
            out.append(("num_classes", f"must be >= 1, got {self.num_classes}"))
        if self.image_size < 1:
            out.append(("image_size", f"must be >= 1, got {self.image_size}"))
        if self.resize_size is not None and self.resize_size < self.image_size:
            out.append(("resize_size", f"must be >= image_size ({self.image_size}) or null, "
                        f"got {self.resize_size}"))
        if self.interpolation not in INTERPOLATIONS:
            out.append(("interpolation", f"must be one of {', '.join(INTERPOLATIONS)}, "
                        f"got '{self.interpolation}'"))
        if len(self.mean) != 3:
            out.append(("mean", f"must have 3 values (R, G, B), got {len(self.mean)}"))
        if len(self.std) != 3 or any(s <= 0 for s in self.std):
            out.append(("std", f"must be 3 values > 0 (R, G, B), got {self.std}"))
        if not 1 <= self.top_k <= max(self.num_classes, 1):
            out.append(("top_k", f"must be in 1..num_classes ({self.num_classes}), got {self.top_k}"))
        if self.labels is not None:
            path = Path(os.path.expanduser(self.labels))
            if not path.is_file():
                out.append(("labels", f"no such file: {self.labels}; give a text file with one label "
                            "per line"))
            else:
                n = len(read_labels(path))
                if n != self.num_classes:
                    out.append(("labels", f"{self.labels} has {n} labels; num_classes is {self.num_classes}"))
        for name in ("max_items", "max_image_bytes", "max_image_pixels"):
            if getattr(self, name) < 1:
                out.append((name, f"must be >= 1, got {getattr(self, name)}"))
        return out


def read_labels(path: Path) -> list[str]:
    lines = path.read_text(encoding="utf-8").splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    return [line.strip() for line in lines]


def _b64_payload(text: str) -> str:
    if text.startswith("data:"):
        head, sep, rest = text.partition(",")
        if sep and head.endswith(";base64"):
            return rest
    return text


def _image_bytes(text: str) -> bytes:
    return base64.b64decode(_b64_payload(text), validate=True)


def _load_state_dict(path: Path) -> dict:
    import torch

    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(str(path), map_location="cpu", weights_only=True)
    # Training checkpoints often nest the weights; DataParallel prefixes every key with "module.".
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"model.weights: {path} is not a state dict (name -> tensor); save one with "
                         "torch.save(model.state_dict(), path) or safetensors")
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def classification_archs() -> list[str]:
    from plugins.model._torchvision_compat import import_models

    models = import_models()
    return sorted(models.list_models(module=models))


class TorchvisionClassifier(ModelPlugin):
    task = "classification"
    Config = TorchvisionConfig

    def check(self, ctx: CheckContext) -> list[str]:
        try:
            archs = classification_archs()
        except ModuleNotFoundError as exc:
            return [f"model=torchvision needs torchvision: {exc}"]
        except Exception as exc:  # an install that fails to import for another reason
            return [f"torchvision failed to import ({type(exc).__name__}: {exc}); reinstall it with "
                    "pip install 'hydraserve[vision]'"]
        if self.config.arch not in archs:
            return [f"arch: unknown classification architecture '{self.config.arch}'; available: "
                    f"{', '.join(archs)}"]
        return []

    # --- API process -------------------------------------------------------------------------
    def _check_image(self, text: str, where: str) -> None:
        from PIL import Image, UnidentifiedImageError

        if len(text) > self.config.max_image_bytes * 4 // 3 + 128:
            raise RequestError(f"'{where}' is larger than {self.config.max_image_bytes} bytes",
                               field=where, status=413)
        try:
            raw = _image_bytes(text)
        except (binascii.Error, ValueError):
            raise RequestError(f"'{where}' is not valid base64; send the PNG/JPEG file's bytes "
                               "base64-encoded", field=where) from None
        try:
            with Image.open(io.BytesIO(raw), formats=IMAGE_FORMATS) as img:
                width, height = img.size
                if width * height > self.config.max_image_pixels:
                    raise RequestError(f"'{where}' is {width}x{height} pixels; at most "
                                       f"{self.config.max_image_pixels} pixels allowed",
                                       field=where, status=413)
                img.verify()  # PNG: every chunk's CRC up to IEND; JPEG: little, hence the check below
                if img.format == "JPEG" and _JPEG_END not in raw[-4096:]:
                    # A cut-off upload would only fail in the worker, failing its whole batch.
                    raise RequestError(f"'{where}' is a truncated JPEG (no end-of-image marker)", field=where)
        except RequestError:
            raise
        except Image.DecompressionBombError:
            raise RequestError(f"'{where}' has too many pixels (at most {self.config.max_image_pixels})",
                               field=where, status=413) from None
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
            raise RequestError(f"'{where}' is not a readable PNG or JPEG image", field=where) from None

    def decode(self, body: dict) -> list[Any]:
        if "input" not in body:
            raise RequestError("missing field 'input': send a base64 PNG/JPEG image or a list of them",
                               field="input")
        value = body["input"]
        size = self.config.image_size
        tensor_shape = [3, size, size]
        if isinstance(value, str):
            self._check_image(value, "input")
            return [value]
        if _depth(value) == 3:  # one preprocessed image
            check_tensor_item(value, tensor_shape, "float32", "input")
            return [value]
        if not isinstance(value, list) or not value:
            raise RequestError(f"'input' must be a base64 PNG/JPEG, a [3][{size}][{size}] float list, or a "
                               "non-empty list of those", field="input")
        if len(value) > self.config.max_items:
            raise RequestError(f"'input' has {len(value)} images; at most {self.config.max_items} allowed",
                               field="input", status=413)
        for i, item in enumerate(value):
            where = f"input[{i}]"
            if isinstance(item, str):
                self._check_image(item, where)
            else:
                check_tensor_item(item, tensor_shape, "float32", where)
        return list(value)

    def encode(self, outputs: list[Any], body: dict) -> dict:
        return {"predictions": outputs}

    def identity(self) -> dict:
        if not hasattr(self, "_identity"):
            cfg = self.config
            weights = cfg.weights
            if weights != RANDOM:
                weights = file_fingerprint(Path(os.path.expanduser(weights)))
            labels = file_fingerprint(Path(os.path.expanduser(cfg.labels))) if cfg.labels else None
            self._identity = {
                "model": "torchvision", "arch": cfg.arch, "num_classes": cfg.num_classes, "weights": weights,
                "image_size": cfg.image_size, "resize_size": cfg.resize_size,
                "interpolation": cfg.interpolation, "mean": list(cfg.mean), "std": list(cfg.std),
                "top_k": cfg.top_k, "labels": labels, "fast_jpeg_decode": cfg.fast_jpeg_decode,
            }
        return self._identity

    # --- inference worker --------------------------------------------------------------------
    def build_module(self) -> Any:
        """The architecture with the configured weights, on the CPU, in eval mode."""
        import torch

        from plugins.model._torchvision_compat import import_models

        models = import_models()
        cfg = self.config
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(RANDOM_SEED)
            module = models.get_model(cfg.arch, weights=None, num_classes=cfg.num_classes)
        if cfg.weights != RANDOM:
            path = Path(os.path.expanduser(cfg.weights))
            state = _load_state_dict(path)
            try:
                module.load_state_dict(state)
            except RuntimeError as exc:
                detail = " ".join(str(exc).split())[:600]
                raise ValueError(f"model.weights: {path} does not fit arch={cfg.arch} with "
                                 f"num_classes={cfg.num_classes}: {detail}") from exc
        return module.eval()

    def load(self, device: str) -> None:
        import torch

        cfg = self.config
        self.device = device
        self.module = self.build_module().to(device)
        self._mean = torch.tensor(cfg.mean, dtype=torch.float32, device=device).view(1, 3, 1, 1)
        self._std = torch.tensor(cfg.std, dtype=torch.float32, device=device).view(1, 3, 1, 1)
        self._labels = read_labels(Path(os.path.expanduser(cfg.labels))) if cfg.labels else None

    def _pixels(self, text: str) -> Any:
        """Decode, resize (shorter side) and centre-crop one image; HWC uint8 numpy array."""
        import numpy as np
        from PIL import Image

        cfg = self.config
        resample = {"nearest": Image.Resampling.NEAREST, "bilinear": Image.Resampling.BILINEAR,
                    "bicubic": Image.Resampling.BICUBIC}[cfg.interpolation]
        with Image.open(io.BytesIO(_image_bytes(text)), formats=IMAGE_FORMATS) as img:
            target = cfg.resize_size or cfg.image_size
            if cfg.fast_jpeg_decode and img.format == "JPEG":
                # DCT-domain downscale (1/2, 1/4, 1/8) to no less than the resize target: decoding a
                # 12 MP photo this way is several times faster, and the resize below still antialiases.
                img.draft("RGB", (target, target))
            img = img.convert("RGB")
            width, height = img.size
            if cfg.resize_size is None:
                img = img.resize((cfg.image_size, cfg.image_size), resample)
            else:
                # torchvision's Resize(int): the shorter side becomes resize_size, the aspect ratio is kept.
                short, long = (width, height) if width <= height else (height, width)
                new_short, new_long = cfg.resize_size, int(cfg.resize_size * long / short)
                size = (new_short, new_long) if width <= height else (new_long, new_short)
                img = img.resize(size, resample)
                width, height = size
                top = int(round((height - cfg.image_size) / 2.0))
                left = int(round((width - cfg.image_size) / 2.0))
                img = img.crop((left, top, left + cfg.image_size, top + cfg.image_size))
            return np.asarray(img, dtype=np.uint8)

    def preprocess(self, items: list[Any]) -> Any:
        import numpy as np
        import torch

        size = self.config.image_size
        image_pos = [i for i, item in enumerate(items) if isinstance(item, str)]
        tensor_pos = [i for i, item in enumerate(items) if not isinstance(item, str)]
        images = None
        if image_pos:
            # uint8 crosses to the device (4x fewer bytes than float32); normalise there in one op.
            pixels = np.stack([self._pixels(items[i]) for i in image_pos])  # N, H, W, C uint8
            images = torch.from_numpy(pixels).to(self.device).permute(0, 3, 1, 2).float().div_(255.0)
            images = (images - self._mean) / self._std
            if not tensor_pos:
                return images.contiguous()
        batch = torch.empty((len(items), 3, size, size), dtype=torch.float32, device=self.device)
        if images is not None:
            batch[image_pos] = images
        if tensor_pos:
            batch[tensor_pos] = torch.tensor([items[i] for i in tensor_pos], dtype=torch.float32,
                                             device=self.device)
        return batch

    def forward(self, batch: Any) -> Any:
        import torch

        # After a cast (e.g. quantization=bf16) the input must match the parameters' dtype.
        param = next((p for p in self.module.parameters() if p.is_floating_point()), None)
        if param is not None and param.dtype != batch.dtype:
            batch = batch.to(param.dtype)
        with torch.inference_mode():
            return self.module(batch)

    def postprocess(self, outputs: Any) -> list[Any]:
        import torch

        probs = torch.softmax(outputs.float(), dim=1)
        scores, indices = probs.topk(self.config.top_k, dim=1)
        results = []
        for row_scores, row_indices in zip(scores.cpu().tolist(), indices.cpu().tolist(), strict=True):
            row = []
            for score, index in zip(row_scores, row_indices, strict=True):
                pred: dict[str, Any] = {"index": index}
                if self._labels is not None:
                    pred["label"] = self._labels[index]
                pred["score"] = score
                row.append(pred)
            results.append(row)
        return results

    def calibration_items(self) -> list[Any]:
        """Sixteen synthetic PNGs (gradients plus noise), so calibration exercises the image path."""
        import numpy as np
        from PIL import Image

        rng = np.random.default_rng(1234)
        side = self.config.resize_size or self.config.image_size
        ramp = np.linspace(0, 255, side, dtype=np.float32)
        items = []
        for i in range(16):
            base = np.stack([np.add.outer(ramp, ramp * (i % 4) / 3) / 2,
                             np.add.outer(ramp * (i % 3) / 2, ramp) / 2,
                             np.full((side, side), 16.0 * i)], axis=-1)
            noisy = np.clip(base + rng.normal(0, 40, base.shape), 0, 255).astype(np.uint8)
            buf = io.BytesIO()
            Image.fromarray(noisy, "RGB").save(buf, format="PNG")
            items.append(base64.b64encode(buf.getvalue()).decode("ascii"))
        return items

    def quality(self, reference: Any, candidate: Any) -> dict:
        """Top-1 agreement (as ``min``/``mean`` for the quality gate) and the largest logit error."""
        ref, cand = reference.float(), candidate.float()
        agreement = float((ref.argmax(dim=1) == cand.argmax(dim=1)).float().mean())
        return {"metric": "top1_agreement", "min": agreement, "mean": agreement,
                "top1_agreement": agreement, "max_abs_logit_error": float((ref - cand).abs().max())}


def _depth(value: Any) -> int:
    """Nesting depth of a list, following first elements (``[[[0.]]]`` is 3; a string is 0)."""
    depth = 0
    while isinstance(value, list):
        depth += 1
        if not value:
            break
        value = value[0]
    return depth


PLUGIN = TorchvisionClassifier
