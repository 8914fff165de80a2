"""`tuneline serve` and `tuneline predict FILE… [--text TEXT]…` (argparse wiring lives in flows/cli.py)."""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import sys
from pathlib import Path

from tuneline.core.config.overrides import add_override_option, parse_overrides


def add_commands(sub) -> None:
    """Add the serve and predict sub-commands to the `tuneline` parser."""
    serve = sub.add_parser("serve", help="serve the champion of every model in the registry over the Open Inference "
                                         "Protocol")
    serve.add_argument("--host", help="bind address (serve.host; default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port (serve.port)")
    serve.add_argument("--grpc-port", type=int, help="also serve gRPC (Open Inference Protocol) on this port; 0 = any "
                                                     "free port (serve.grpc_port; default: REST only)")
    serve.add_argument("--device", choices=("auto", "cpu", "cuda"), help="serve.device")
    serve.add_argument("--registry", type=Path, help="registry folder (paths.registry, env TUNELINE_SERVE_REGISTRY)")
    serve.add_argument("--model", help="serve only this model name (serve.model; default: every model's champion)")
    add_override_option(serve, "serve.max_batch_size=32")
    serve.add_argument("--worker-index", type=int, help=argparse.SUPPRESS)  # set by the parent of serve.workers > 1
    predict = sub.add_parser("predict", help="classify files with a running server: PNG/JPEG images (colour or gray, "
                                             "any size), WAV/FLAC/OGG clips (any rate), .txt texts; or --text TEXT")
    predict.add_argument("files", nargs="*", type=Path, metavar="FILE",
                         help="an image, a clip or a .txt file, as the model takes (sent to /classify)")
    predict.add_argument("--text", action="append", default=[], metavar="TEXT",
                         help="a text to classify with a text model (repeatable)")
    predict.add_argument("--url", help="server URL (default http://<serve.host>:<serve.port>)")
    predict.add_argument("--model", help="the model name (default: the server's only model)")
    predict.add_argument("--version", help="a loaded model version instead of the champion")
    predict.add_argument("--top-k", type=int, default=1, help="also show the k most probable classes")
    predict.add_argument("--json", action="store_true", help="one JSON object per file or text")


def run_command(args: argparse.Namespace, root: Path) -> int:
    from tuneline.core.errors import InputError

    try:
        return serve(args, root) if args.command == "serve" else predict(args, root)
    except InputError as exc:  # ConfigError, or DeviceError: serve.device asks for what this machine lacks
        print(f"tuneline: error: {exc}", file=sys.stderr)
        return 2


def _params(args: argparse.Namespace, root: Path):
    """The project's params with the environment's, -S and the flags' serve overrides applied."""
    from tuneline.serving.settings import env_overrides
    from tuneline.core.config.params import load_params

    serve_flags = ("host", "port", "grpc_port", "device", "model") if args.command == "serve" else ("host", "port", "device")
    flags = {f"serve.{k}": getattr(args, k) for k in serve_flags if getattr(args, k, None) is not None}
    cli = parse_overrides(getattr(args, "overrides", []))
    # Precedence: params.yaml < environment < -S < explicit flags.
    return load_params(root / "params.yaml", {**env_overrides(os.environ), **cli, **flags})


def _settings(args: argparse.Namespace, root: Path):
    from tuneline.serving.settings import build_settings

    return build_settings(_params(args, root), root, os.environ, registry=getattr(args, "registry", None))


def serve(args: argparse.Namespace, root: Path) -> int:
    """Start the server; returns when it has shut down (SIGINT/SIGTERM drain in-flight requests first)."""
    import uvicorn

    from tuneline.serving.app import create_app
    from tuneline.serving.drain import DrainingServer
    from tuneline.serving.logs import configure_logging
    from tuneline.core.onnx_session import resolve_providers

    settings = _settings(args, root)
    configure_logging(settings.log_level)  # first: resolving serve.provider may log that it is ignored or fell back
    worker = getattr(args, "worker_index", None)
    if settings.workers > 1 and worker is None:  # this process only starts and watches the workers
        from tuneline.serving.workers import run_workers

        return run_workers(settings, args, root)
    providers = resolve_providers(settings.device, settings.provider)  # DeviceError: refuse to start (one line, exit 2)
    logging.getLogger("tuneline.serving").info("device", extra={"event": "device", "requested": settings.device,
                                                       "provider": settings.provider, "providers": providers})
    app = create_app(settings, providers)
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_config=None, access_log=False,
                            timeout_graceful_shutdown=settings.shutdown_timeout_s, server_header=False,
                            log_level=settings.log_level)
    server_class = DrainingServer
    if worker is not None:
        from tuneline.serving.workers import worker_server

        server_class = worker_server(app, config, settings, worker)  # its own SO_REUSEPORT listener on serve.port
    _freeze_start_up_objects()
    server = server_class(config)  # SIGTERM: the lossless drain of serving/drain.py
    server.run()
    return 0 if server.started and not getattr(server, "failed", False) else 1  # failed: a worker that could not join


def _freeze_start_up_objects() -> None:
    """Move what start-up created (modules, the app and its routes) out of the garbage collector's sight.

    A full collection walks every tracked object, and with FastAPI, pydantic, gRPC and ONNX Runtime imported one
    took long enough to be the server's p99 at 64 clients: about 185 ms at a p50 of 25-30 ms. Frozen, the p99 was
    41-50 ms in the same wrk runs (docs/benchmarks.md). Objects made later (requests, batches) are collected as usual.
    """
    gc.collect()
    gc.freeze()


def predict(args: argparse.Namespace, root: Path) -> int:
    """Classify each file and each --text with the server; one line each; exit 1 if any failed (2: nothing given)."""
    import httpx

    from tuneline.serving.client import InferenceClient, ServerError
    from tuneline.serving.settings import TOKEN_ENV

    if not args.files and not args.text:
        print("tuneline predict: error: give files to classify (images, WAV/FLAC/OGG clips, .txt files) or --text TEXT",
              file=sys.stderr)
        return 2
    if args.url:  # a client of a server somewhere: no project (params.yaml) needed
        url = args.url
    else:
        serve = _params(args, root).serve  # not the server's settings: they would probe for a GPU to plan workers
        url = f"http://{serve.host}:{serve.port}"
    failed = 0
    with InferenceClient(url, model=args.model, token=os.environ.get(TOKEN_ENV)) as client:
        items = [(str(path), "file", path) for path in args.files]
        items += [(_quoted(text), "text", text) for text in args.text]
        for shown, kind, item in items:
            try:
                if kind == "file":
                    result = client.classify(item, version=args.version, top_k=args.top_k)
                else:
                    result = client.classify_text(item, version=args.version, top_k=args.top_k)
            except (OSError, ServerError, httpx.HTTPError) as exc:
                failed += 1
                print(f"{shown}: error: {exc}", file=sys.stderr)
                continue
            if args.json:
                key = "text" if kind == "text" else ("image" if _is_image(item) else "file")
                print(json.dumps({key: str(item), **result}))
            else:
                others = "".join(f", {c['label']} {c['probability']:.3f}" for c in result.get("top_k", [])[1:])
                print(f"{shown}: {result['label']} (p={result['probability']:.3f}{others}; "
                      f"{result['model_name']} {result['model_version']})")
    return 1 if failed else 0


def _quoted(text: str, width: int = 60) -> str:
    """A --text as its answer line shows it: quoted, cut to `width` characters."""
    return json.dumps(text if len(text) <= width else text[:width - 1] + "…", ensure_ascii=False)


def _is_image(path: Path) -> bool:
    return Path(path).suffix.lower() in (".png", ".jpg", ".jpeg")
