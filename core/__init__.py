"""The contracts the pipeline and the server share, with no PyTorch, Prefect, DVC or Optuna in them.

config/ (the params schema, one module per section), errors, atomic (write-then-rename), spec (the
input spec prepare writes), onnx_session + io_binding (how ONNX Runtime runs a model, for the export
gate and the server alike), onnx_metadata, registry_layout and registry_reader (the registry on disk).
Imports point one way: tuneline.flows -> tuneline.tasks -> tuneline.core, and tuneline.serving -> tuneline.core.
"""
