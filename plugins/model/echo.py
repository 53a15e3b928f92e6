"""``model=echo``: returns its input unchanged; measures the serving overhead alone."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from framework import ModelPlugin, RequestError


@dataclass
class EchoConfig:
    max_items: int = 256
    stream: bool = False  # answer as a stream: one chunk per character of a string (others: one chunk)


class EchoModel(ModelPlugin):
    task = "echo"
    Config = EchoConfig

    def decode(self, body: dict) -> list[Any]:
        if "input" not in body:
            raise RequestError("missing field 'input'", field="input")
        value = body["input"]
        items = value if isinstance(value, list) else [value]
        if not items:
            raise RequestError("'input' must not be empty", field="input")
        if len(items) > self.config.max_items:
            raise RequestError(f"'input' has {len(items)} items; at most {self.config.max_items} allowed",
                               field="input", status=413)
        return items

    def encode(self, outputs: list[Any], body: dict) -> dict:
        return {"output": outputs if isinstance(body.get("input"), list) else outputs[0]}

    def identity(self) -> dict:
        return {"model": "echo"}

    def texts(self, items: list[Any]) -> list[str] | None:
        return items if all(isinstance(i, str) for i in items) else None

    def load(self, device: str) -> None:
        self.device = device

    def forward(self, batch: Any) -> Any:
        return batch

    def streaming(self) -> bool:
        return self.config.stream

    def stream(self, item: Any) -> Iterator[Any]:
        if isinstance(item, str):
            yield from item
        else:
            yield item

    def calibration_items(self) -> list[Any]:
        return ["hello"]


PLUGIN = EchoModel
