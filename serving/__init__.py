"""Tuneline's inference server: the registry's champion through ONNX Runtime, behind the Open Inference Protocol.

Modules: settings (typed config), repository (read-only registry + checksums), model_holder (load, warm,
swap), batcher (dynamic batching), binary + protocol (KServe V2 messages), images (PNG/JPEG digits),
middleware (auth, limits, metrics, access log), metrics, logs, watcher (hot reload), app (routes), client
(Python client), cli (`tuneline serve|predict`).

Shared with the pipeline (and copied into the serving image with it): core/registry_layout.py, the
registry's on-disk layout, and core/onnx_session.py, the ONNX Runtime session factory the export
gate measures latency with, so the server runs exactly what was gated.
"""
