"""Tuneline's inference server: the registry's champion through ONNX Runtime, behind the Open Inference Protocol.

Modules: settings (typed config), repository (read-only registry + checksums), runtime (ONNX Runtime
sessions and the device check), model_holder (load, warm, swap), batcher (dynamic batching), binary +
protocol (KServe V2 messages), images (PNG/JPEG digits), middleware (auth, limits, metrics, access log),
metrics, logs, watcher (hot reload), app (routes), client (Python client), cli (`tuneline serve|predict`).
"""
