"""An onnxruntime session for an image tagger: input geometry, fixed or dynamic batch, providers."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sdtune.errors import UserError


def choose_providers(available: list[str] | None = None) -> list[str]:
    """CUDA when onnxruntime-gpu offers it, always with the CPU as fallback."""
    if available is None:
        import onnxruntime

        available = onnxruntime.get_available_providers()
    providers = [p for p in ("CUDAExecutionProvider",) if p in available]
    return providers + ["CPUExecutionProvider"]


@dataclass
class OnnxImageModel:
    """A loaded NHWC image model. `batch` is the fixed batch size, or None when it is dynamic."""

    path: Path
    session: object
    input_name: str
    batch: int | None
    height: int | None
    width: int | None
    outputs: int | None

    def run(self, images: np.ndarray) -> np.ndarray:
        """Probabilities [n, labels] for images [n, H, W, 3]; fixed-batch models get padded chunks."""
        n = images.shape[0]
        if self.batch is None or n == self.batch:
            return self._run(images)
        results = []
        for start in range(0, n, self.batch):
            chunk = images[start:start + self.batch]
            real = chunk.shape[0]
            if real < self.batch:
                # A fixed-batch graph rejects a short batch; the zero images' outputs are dropped.
                pad = np.zeros((self.batch - real, *chunk.shape[1:]), dtype=chunk.dtype)
                chunk = np.concatenate([chunk, pad])
            results.append(self._run(chunk)[:real])
        return np.concatenate(results)

    def _run(self, batch: np.ndarray) -> np.ndarray:
        out = self.session.run(None, {self.input_name: batch})[0]
        return np.asarray(out, dtype=np.float32).reshape(batch.shape[0], -1)


def load_onnx_model(path: Path, providers: list[str] | None = None) -> OnnxImageModel:
    try:
        import onnxruntime
    except ImportError as exc:
        raise UserError("onnxruntime is not installed", fix="pip install onnxruntime (or onnxruntime-gpu)") from exc
    if not path.is_file():
        raise UserError("ONNX model file not found", where=str(path))
    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3  # onnxruntime warns about unused initialisers on many exported taggers
    try:
        session = onnxruntime.InferenceSession(str(path), sess_options=options,
                                               providers=providers or choose_providers())
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own untyped errors for bad files
        raise UserError(f"cannot load the ONNX model ({str(exc).splitlines()[0]})", where=str(path),
                        fix="Check that the file is a complete .onnx model (re-download it).") from exc
    inputs = session.get_inputs()
    if len(inputs) != 1:
        raise UserError(f"expected a model with one image input, it has {len(inputs)}", where=str(path))
    shape = list(inputs[0].shape)
    if len(shape) != 4 or shape[3] != 3:
        raise UserError(f"expected an NHWC image input [batch, height, width, 3], got {shape}", where=str(path),
                        fix="sdtune runs the SmilingWolf WD taggers and DeepDanbooru models exported with NHWC input.")

    def static(dim) -> int | None:
        return dim if isinstance(dim, int) and dim > 0 else None

    out_shape = session.get_outputs()[0].shape
    outputs = static(out_shape[-1]) if out_shape else None
    return OnnxImageModel(path, session, inputs[0].name, static(shape[0]), static(shape[1]), static(shape[2]), outputs)
