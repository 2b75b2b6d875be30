"""What every runtime is: a callable from the collated inputs to the scoring module's float32 outputs."""

from __future__ import annotations

from typing import Any

import torch


class Runtime:
    """Runs a backend's scoring module. Thread-safe: the engine's CPU streams call it concurrently."""

    name: str = "torch"
    # What the weights and math run in: "bfloat16", "float32", "int8", ...
    precision: str = "float32"
    # Bytes the runtime's copy of the weights takes, when it is not the torch model's.
    weights_bytes: int | None = None
    # Padded batches are this many tokens wide, rounded up (1: the longest pair's length).
    width_multiple: int = 1

    def __call__(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    def describe(self) -> str:
        return f"{self.name} ({self.precision})"

    def release_thread(self) -> None:
        """Drop what the calling thread holds for its calls (the loading thread, once it has verified and
        timed the runtime: the engine's streams call it from threads of their own)."""


def feeds(inputs: dict[str, torch.Tensor], names: list[str]) -> dict[str, Any]:
    """The exported graph's inputs as numpy arrays. A batch without token_type_ids (warm-up batches) gets
    zeros, what the torch module assumes when they are absent."""
    ids = inputs["input_ids"]
    return {n: (inputs[n] if n in inputs else torch.zeros_like(ids)).numpy() for n in names}


class TorchRuntime(Runtime):
    """The backend's own torch module, eager, in the backend's dtype."""

    name = "torch"

    def __init__(self, module: torch.nn.Module, dtype: torch.dtype) -> None:
        self.module = module
        self.precision = str(dtype).removeprefix("torch.")

    def __call__(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.module(**inputs)


class Positional(torch.nn.Module):
    """A scoring module with positional inputs in a fixed order, as the exporters (ONNX, OpenVINO) trace it."""

    def __init__(self, inner: torch.nn.Module, names: list[str]) -> None:
        super().__init__()
        self.inner = inner
        self.names = names

    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        return self.inner(**dict(zip(self.names, args)))
