"""Helpers for the registry tests: tiny valid ONNX files, and the body of each concurrent worker process.

Kept out of the test module so spawned workers import only this and tuneline.tasks.ship.registry (fast start).
"""

from __future__ import annotations

from pathlib import Path


def tiny_model(path: Path, offset: float) -> Path:
    """A valid one-node ONNX model (y = x + offset); a different offset gives a different file."""
    import onnx
    from onnx import TensorProto, helper

    bias = helper.make_tensor("offset", TensorProto.FLOAT, [1], [offset])
    graph = helper.make_graph([helper.make_node("Add", ["x", "offset"], ["y"])], "tiny",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 1])], [bias])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    onnx.save_model(model, str(path))
    return path


def register_then_promote(root: str, model: str, worker: int, barrier, results) -> None:
    """Register one model, wait for every worker, then all promote their own version at once."""
    from tuneline.tasks.ship.registry import Registry

    registry = Registry(Path(root))
    barrier.wait(timeout=60)  # a worker that failed breaks the barrier for all instead of leaving them waiting
    version = registry.register({"model.onnx": Path(model)}, name="tiny", metrics={"worker": worker}, gates=[],
                                lineage={}, run_id=f"worker-{worker}")
    barrier.wait(timeout=60)
    registry.promote(version)
    results.put((worker, version))
