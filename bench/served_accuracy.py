"""Check: a project's champion, served by `tuneline serve`, answers every test record over REST and gRPC (stock
`tritonclient`) with exactly the classes ONNX Runtime gives offline, and so reproduces the run's accuracy.

Speech (an init'd `--example speech` project): each FSDD test clip (index 0-4) is read from the archive and sent as
its raw samples, FP32 [1, length] at its own length, one request per clip; offline, the same clip is fitted to
the model's length (core/audio.py) and run through the champion's ONNX file. Text (an `--example sst2` project):
every dev.tsv sentence is sent as a V2 BYTES string, 64 a request; offline, the model's own tokenizer (from its
ONNX metadata) encodes it.

    python bench/served_accuracy.py speech /tmp/speech --data ../shared/data/fsdd/fsdd-recordings.tar.gz
    python bench/served_accuracy.py text /tmp/sst2 --data ../shared/data/sst2/dev.tsv
"""

from __future__ import annotations

import argparse
import csv
import socket
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def speech_records(archive: Path, rate: int) -> tuple[list[np.ndarray], list[str], list[str]]:
    from tuneline.core.audio import load_clip

    clips, labels, names = [], [], []
    with tarfile.open(archive) as tar:
        for member in sorted(tar.getmembers(), key=lambda m: m.name):
            stem = Path(member.name).stem
            parts = stem.split("_")
            if member.isfile() and member.name.endswith(".wav") and len(parts) == 3 and int(parts[2]) < 5:
                clips.append(load_clip(tar.extractfile(member).read(), rate, member.name))
                labels.append(parts[0])
                names.append(Path(member.name).name)
    return clips, labels, names


def text_records(path: Path) -> tuple[list[str], list[str]]:
    with open(path, encoding="utf-8", newline="") as handle:
        rows = list(csv.DictReader(handle, dialect="excel-tab", quoting=csv.QUOTE_NONE))
    column = next(c for c in rows[0] if c != "label")
    return [r[column] for r in rows], [r["label"] for r in rows]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("kind", choices=("speech", "text"))
    parser.add_argument("project", type=Path)
    parser.add_argument("--data", type=Path, required=True)
    args = parser.parse_args()

    import onnx
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient

    from tuneline.core.audio import fit_length
    from tuneline.core.onnx_metadata import read_input_spec, read_tokenizer_json
    from tuneline.core.onnx_session import open_session
    from tuneline.core.text import Tokenizer

    onnx_path = args.project / "models" / "model.onnx"
    metadata = {p.key: p.value for p in onnx.load(str(onnx_path)).metadata_props}
    spec, name = read_input_spec(metadata), metadata["model_name"]
    session = open_session(onnx_path, "cpu")
    graph_input = session.get_inputs()[0].name
    if args.kind == "speech":
        records, labels, _ = speech_records(args.data, spec.audio.sample_rate)
        fitted = np.stack([fit_length(r, spec.audio.samples) for r in records])
        offline = session.run(["logits"], {graph_input: fitted})[0].argmax(1)
    else:
        records, labels = text_records(args.data)
        tokenizer = Tokenizer.from_json(read_tokenizer_json(metadata, spec))
        offline = session.run(["logits"], {graph_input: tokenizer.encode(records)})[0].argmax(1)
    values = {v: i for i, v in enumerate(spec.class_names)}
    if args.kind == "text":  # SST-2's labels 0/1 are named negative/positive by data.class_names
        values = {str(i): i for i in range(spec.n_classes)}
    truth = np.array([values[label] for label in labels])

    port, grpc_port = free_port(), free_port()
    server = subprocess.Popen([sys.executable, "-m", "tuneline", "serve", "--port", str(port), "--grpc-port",
                               str(grpc_port)], cwd=args.project, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        rest = httpclient.InferenceServerClient(f"127.0.0.1:{port}")
        deadline = time.monotonic() + 120
        while True:
            try:
                if rest.is_model_ready(name):
                    break
            except Exception:  # noqa: BLE001 - not listening yet
                pass
            if time.monotonic() > deadline or server.poll() is not None:
                raise SystemExit("the server did not become ready")
            time.sleep(0.5)
        grpc = grpcclient.InferenceServerClient(f"127.0.0.1:{grpc_port}")
        served = {}
        for protocol, module, client in (("rest", httpclient, rest), ("grpc", grpcclient, grpc)):
            start, classes = time.perf_counter(), []
            if args.kind == "speech":
                for clip in records:  # raw samples at the clip's own length, one request each
                    tensor = module.InferInput("samples", [1, clip.size], "FP32")
                    tensor.set_data_from_numpy(clip[None].astype(np.float32))
                    result = client.infer(name, [tensor], outputs=[module.InferRequestedOutput("logits")])
                    classes.append(int(result.as_numpy("logits").argmax(1)[0]))
            else:
                for at in range(0, len(records), 64):
                    rows = np.array([t.encode("utf-8") for t in records[at:at + 64]], dtype=object)
                    tensor = module.InferInput("text", [len(rows)], "BYTES")
                    tensor.set_data_from_numpy(rows)
                    result = client.infer(name, [tensor], outputs=[module.InferRequestedOutput("logits")])
                    classes.extend(int(c) for c in result.as_numpy("logits").argmax(1))
            served[protocol] = np.array(classes)
            agree = int((served[protocol] == offline).sum())
            print(f"{protocol}: {len(classes)} {args.kind} records in {time.perf_counter() - start:.1f} s; "
                  f"{agree}/{len(classes)} equal to ONNX Runtime offline; accuracy served "
                  f"{(served[protocol] == truth).mean():.4f}, offline {(offline == truth).mean():.4f}")
    finally:
        server.terminate()
        server.wait(timeout=30)
    return 0 if all((served[p] == offline).all() for p in served) else 1


if __name__ == "__main__":
    raise SystemExit(main())
