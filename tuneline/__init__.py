"""Tuneline: tune, train, gate and ship deep networks (Prefect + DVC + PyTorch + ONNX Runtime).

One import namespace: tuneline.core (the torch-free contracts), tuneline.tasks (the stages),
tuneline.flows (the Prefect flow and the command line) and tuneline.serving (the inference server).
The repository keeps them in the top-level folders core/, tasks/, flows/ and serving/ (pyproject.toml
maps each onto its dotted name), so importing this package imports none of them.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("tuneline")
except PackageNotFoundError:  # a source tree that is not installed
    __version__ = "0+unknown"
