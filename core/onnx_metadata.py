"""The ONNX file's metadata_props: one typed writer (export) and reader (promote, the server, the client).

Keys written by export: `input_spec` (InputSpec.to_dict: shape, class names, per-channel mean/std, value
range), `model_name` (project.name), and, for readers of files exported before specs existed, `labels`,
`input` and `normalization`. Lineage (`data_version`, `params_hash`, `git_commit`), `metrics`, `params`,
`created` and `variant` complete it; `drift_profile` is the training data's reference profile the server
scores live drift against (core/drift.py: its typed reader and writer). Reading falls back to the old keys, so a file exported before this
change is still served with the spec it really has. Nothing here imports PyTorch or ONNX.
"""

from __future__ import annotations

import json

from tuneline.core.spec import InputSpec, SpecError

INPUT_NAME, OUTPUT_NAME = "pixels", "logits"
# The graph's input per modality: raw pixels, raw samples, token ids (core/spec.py).
GRAPH_INPUTS = {"image": ("pixels", "float32"), "audio": ("samples", "float32"), "text": ("tokens", "int64")}
TOKENIZER_KEY = "tokenizer"  # a text model's tokenizer JSON (core/text.py), whose sha256 the spec names


def build_metadata(checkpoint: dict, model_name: str, metrics: dict) -> dict[str, str]:
    """metadata_props for a checkpoint (its model_args + classes carry the spec) named `model_name`."""
    args = dict(checkpoint["model_args"])
    modality = args.get("modality", "image")
    extra: dict[str, str] = {}
    if modality != "image":
        spec = InputSpec.from_dict(args["input"]["spec"])
        if spec.text is not None:
            extra[TOKENIZER_KEY] = args["input"]["tokenizer"]
            # The tokenizer is its own key: not twice in the file.
            args["input"] = {k: v for k, v in args["input"].items() if k != "tokenizer"}
    else:
        channels = int(args["image_shape"][0])
        per_channel = [list(v) if isinstance(v, (list, tuple)) else [float(v)] * channels
                       for v in (args["mean"], args["std"])]
        spec = InputSpec(channels=channels, height=int(args["image_shape"][1]), width=int(args["image_shape"][2]),
                         class_names=tuple(str(c) for c in checkpoint["classes"]), mean=tuple(per_channel[0]),
                         std=tuple(per_channel[1]))
    name, dtype = GRAPH_INPUTS[spec.modality]
    lineage = checkpoint["lineage"]
    return {
        "model_name": model_name,
        "input_spec": json.dumps(spec.to_dict()),
        "labels": json.dumps(list(spec.class_names)),
        "input": json.dumps({"name": name, "dtype": dtype, "shape": ["batch", *spec.shape],
                             "range": list(spec.value_range), "layout": spec.layout}),
        "normalization": json.dumps({"mean": list(spec.mean), "std": list(spec.std), "applied_in_graph": True}),
        **extra,
        "model_args": json.dumps(args),
        "data_version": lineage["data_version"],
        "params_hash": lineage["params_hash"],
        "git_commit": lineage["git_commit"],
        "metrics": json.dumps(metrics),
        "params": json.dumps(checkpoint.get("params", {})),
    }


def _json(metadata: dict[str, str], key: str, where: str):
    try:
        return json.loads(metadata[key])
    except (KeyError, ValueError):
        raise SpecError(f"{where}: the ONNX file lacks valid metadata {key!r}: re-export it with "
                        "`tuneline stage export`") from None


def read_input_spec(metadata: dict[str, str], where: str = "model") -> InputSpec:
    """The input spec an ONNX file declares; from `input` + `labels` + `normalization` for older files."""
    if "input_spec" in metadata:
        return InputSpec.from_dict(_json(metadata, "input_spec", where))
    declared = _json(metadata, "input", where)
    labels = _json(metadata, "labels", where)
    try:
        channels, height, width = (int(d) for d in declared["shape"][1:])
        norm = json.loads(metadata.get("normalization") or "{}")
        mean, std = norm.get("mean", 0.0), norm.get("std", 1.0)
        mean = tuple(mean) if isinstance(mean, list) else (float(mean),) * channels
        std = tuple(std) if isinstance(std, list) else (float(std),) * channels
        return InputSpec(channels=channels, height=height, width=width, class_names=tuple(str(c) for c in labels),
                         mean=mean, std=std, value_range=tuple(declared.get("range", (0, 255))))
    except (KeyError, TypeError, ValueError) as exc:
        raise SpecError(f"{where}: metadata 'input' is malformed ({exc!r}): re-export it") from None


def read_tokenizer_json(metadata: dict[str, str], spec: InputSpec, where: str = "model") -> str:
    """A text model's tokenizer JSON, checked against the sha256 its spec names (core/text.py)."""
    import hashlib

    text = metadata.get(TOKENIZER_KEY)
    if spec.text is None or text is None:
        raise SpecError(f"{where}: a text model without its tokenizer: re-export it with `tuneline stage export`")
    if hashlib.sha256(text.encode("utf-8")).hexdigest() != spec.text.sha256:
        raise SpecError(f"{where}: the tokenizer does not match the one the input spec names (sha256 "
                        f"{spec.text.sha256[:12]}…): re-export it with `tuneline stage export`")
    return text


def input_name(metadata: dict[str, str], where: str = "model") -> str:
    """The graph input's name as the metadata declares it."""
    return str(_json(metadata, "input", where).get("name", INPUT_NAME))


def describe_contract(spec: InputSpec) -> str:
    """'1x28x28 gray, 10 classes (0, 1, …, 9)': what a refusal shows of a contract."""
    names = ", ".join(spec.class_names[:4]) + (f", …, {spec.class_names[-1]}" if spec.n_classes > 4 else "")
    return f"{spec.describe()} ({names})"
