"""A real ONNX model made deliberately worse by editing its last layer's bias (real files, real scores)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper


def with_logit_bias(src: Path, dst: Path, change: Callable[[np.ndarray], None]) -> Path:
    """Copy the ONNX model at `src` to `dst` with `change` applied in place to the last Gemm's bias (one per class)."""
    proto = onnx.load(str(src))
    last_gemm = [n for n in proto.graph.node if n.op_type == "Gemm"][-1]
    for init in proto.graph.initializer:
        if init.name == last_gemm.input[2]:
            bias = numpy_helper.to_array(init).copy()
            change(bias)
            init.CopyFrom(numpy_helper.from_array(bias.astype(np.float32), init.name))
    onnx.save_model(proto, str(dst))
    return dst
