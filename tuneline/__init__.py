"""Tuneline: tune, train, gate and ship deep networks (Prefect + DVC + PyTorch + ONNX Runtime).

One import namespace: tuneline.core (the torch-free contracts), tuneline.tasks (the stages),
tuneline.flows (the Prefect flow and the command line) and tuneline.serving (the inference server).
The repository keeps them in the top-level folders core/, tasks/, flows/ and serving/ (pyproject.toml
maps each onto its dotted name), so importing this package imports none of them.
"""

from pathlib import Path

# A source checkout imported as it is (its folder on sys.path, e.g. PYTHONPATH=<checkout>) is self-contained:
# tuneline.tasks, tuneline.core, ... resolve to the checkout's own folders beside this one, never to another
# copy's (an editable install maps the same folders; a wheel has them inside tuneline/, where this adds nothing).
_CHECKOUT = Path(__file__).resolve().parent.parent
if not (Path(__file__).parent / "core").is_dir() and (_CHECKOUT / "core" / "__init__.py").is_file():
    __path__.append(str(_CHECKOUT))



def __getattr__(name: str) -> str:
    """`tuneline.__version__`, looked up on first use: every process of a run imports this package, and reading
    the installed metadata costs about 25 ms that only `tuneline --version`-like callers need."""
    if name != "__version__":
        raise AttributeError(f"module 'tuneline' has no attribute {name!r}")
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("tuneline")
    except PackageNotFoundError:  # a source tree that is not installed
        return "0+unknown"
