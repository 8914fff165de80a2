"""Tuneline's inference server: the registry's champion through ONNX Runtime, behind the Open Inference Protocol.

The data plane (dataplane: models, batching, metrics, drain; no HTTP or gRPC in it) with one adapter module
per protocol over it: rest_v2 (V2 REST: health, metadata, infer), grpc_v2 (V2 gRPC), classify (`/classify`),
rest_repository (V2 model repository: index, load, unload), rest_metrics (`/metrics`). app composes them with
the middleware and the lifespan.

Beneath them: settings (typed config), repository (core's registry reader, its errors as HTTP), model_holder
(load, warm, swap), batcher (dynamic batching), binary + protocol (KServe V2 messages), schemas (the OpenAPI
document), images (PNG/JPEG), middleware (auth, limits, metrics, access log), admin (who may load/unload),
drain, workers (+ siblings: load/unload reach every worker; cpu_budget: serve.workers auto), precision, metrics, logs, watcher (hot reload), client (Python client), cli (`tuneline
serve|predict`).

Shared with the pipeline (and copied into the serving image with it): core/registry_layout.py, the
registry's on-disk layout, and core/onnx_session.py, the ONNX Runtime session factory the export
gate measures latency with, so the server runs exactly what was gated.
"""
