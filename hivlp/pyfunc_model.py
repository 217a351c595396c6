"""The registered MLflow model, as code ("models from code"): nothing in a registered model is unpickled.

`hivlp.registry.log_model` gives MLflow this file as `python_model` (a path, not an object) and ships
a copy of the `hivlp` package with the model (`code_paths`, unpacked under the model's `code/` folder,
which MLflow puts first on `sys.path` when it loads the model). MLflow runs this file on load; the
file calls `mlflow.models.set_model`, so the model class comes from source, never from a pickle, and
a `python_model.pkl` planted in the artifact store is never read (MLflow reads only what `MLmodel`
names, and `MLmodel` names this file).

The model holds one artifact, `checkpoint` (a checkpoint folder: safetensors weights, config.yaml,
tokenizer, meta.json with their hashes). `load_context` loads it through `hivlp.model.encode`, the one
path from a checkpoint to embeddings, so the registered model encodes exactly as `hivlp evaluate`,
`hivlp export` and `hivlp search --checkpoint` do.

Input: a DataFrame, one query per row, exactly one of these columns filled per row:
  `text`       a caption
  `image_path` an image file readable by the serving process
  `image_b64`  an image's bytes, base64 (JPEG/PNG/WebP; over 40 M pixels is refused)
Params: `level` (int, default 0): 0 = the full embedding as the encoder returns it (unnormalised);
one of the model's levels (e.g. 64) = its first `level` dims, L2-normalised (what retrieval uses).
Output: float32 [rows, dim]: one embedding per input row, in input order.
"""

from __future__ import annotations

import base64
import binascii
import tempfile
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd

INPUT_COLUMNS = ("text", "image_path", "image_b64")
MAX_IMAGE_PIXELS = 40_000_000


def _column(df: pd.DataFrame, name: str) -> pd.Series:
    if name in df.columns:
        col = df[name].astype(object)
        return col.where(col.notna() & (col.astype(str) != ""), None)
    return pd.Series([None] * len(df), index=df.index, dtype=object)


class HivlpEncoder(mlflow.pyfunc.PythonModel):
    """Captions and images to hivlp embeddings (see the module docstring for the input and output)."""

    def load_context(self, context: Any) -> None:
        from hivlp.model.encode import load_encoder

        self.encoder = load_encoder(context.artifacts["checkpoint"], device="cpu")

    def predict(self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> np.ndarray:
        from hivlp.model import level_np

        if not isinstance(model_input, pd.DataFrame):
            model_input = pd.DataFrame(model_input)
        unknown = [c for c in model_input.columns if c not in INPUT_COLUMNS]
        if unknown:
            raise ValueError(f"column {unknown[0]!r} is not an input; give one of {list(INPUT_COLUMNS)} per row")
        level = int((params or {}).get("level", 0) or 0)
        if level and level not in self.encoder.levels:
            raise ValueError(f"level {level} is not a level of this model; use one of {self.encoder.levels} or 0 (full)")
        cols = {name: _column(model_input, name) for name in INPUT_COLUMNS}
        filled = sum(c.notna().to_numpy().astype(int) for c in cols.values())
        if len(model_input) and (filled != 1).any():
            row = int(np.flatnonzero(filled != 1)[0])
            raise ValueError(f"row {row}: give exactly one of {', '.join(INPUT_COLUMNS)}")
        out = np.zeros((len(model_input), self.encoder.dim), dtype=np.float32)
        is_text = cols["text"].notna().to_numpy()
        if is_text.any():
            out[is_text] = self.encoder.texts([str(t) for t in cols["text"][is_text]], progress=False)
        is_path = cols["image_path"].notna().to_numpy()
        if is_path.any():
            out[is_path] = self.encoder.images([str(p) for p in cols["image_path"][is_path]], num_workers=0,
                                               progress=False)
        is_b64 = cols["image_b64"].notna().to_numpy()
        if is_b64.any():
            out[is_b64] = self._b64_images(cols["image_b64"], np.flatnonzero(is_b64))
        return level_np(out, level) if level else out

    def _b64_images(self, column: pd.Series, rows: np.ndarray) -> np.ndarray:
        """Decode each base64 image (checked as an untrusted upload) to a temporary PNG and encode it
        through the same image path as files."""
        from hivlp.data.images import decode_image_bytes

        with tempfile.TemporaryDirectory(prefix="hivlp-b64-") as tmp:
            paths = []
            for row in rows:
                try:
                    data = base64.b64decode(str(column.iloc[row]), validate=True)
                except (binascii.Error, ValueError):
                    raise ValueError(f"row {int(row)}: image_b64 is not valid base64") from None
                image = decode_image_bytes(data, f"row {int(row)} image_b64", MAX_IMAGE_PIXELS)
                path = Path(tmp) / f"{int(row)}.png"
                image.save(path)
                paths.append(str(path))
            return self.encoder.images(paths, num_workers=0, progress=False)


mlflow.models.set_model(HivlpEncoder())
