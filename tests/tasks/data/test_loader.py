"""A user's own loader (`data.source: module:function`): imported from the project folder, called with
data.options, its return checked against the contract (docs/data.md) with one-line errors."""

from __future__ import annotations

import itertools
import re
import textwrap
from pathlib import Path

import numpy as np
import pytest

from tuneline.core.config.base import ConfigError
from tuneline.core.config.data import DataConfig
from tuneline.core.config.params import build_params
from tuneline.tasks.data.fetch import run_fetch
from tuneline.tasks.data.idx import DataError
from tuneline.tasks.data.loader import check_loaded
from tuneline.tasks.data.prepare import load_spec, load_split, run_prepare

_names = (f"userdata{n}" for n in itertools.count())  # a fresh module name per test: imports are cached

LOADER = '''
import numpy as np

def load(n=12, side=8, colour=True, with_test=False):
    rng = np.random.default_rng(0)
    shape = (n, side, side, 3) if colour else (n, side, side)
    labels = np.arange(n) % 3
    images = rng.integers(0, 256, shape, dtype=np.uint8)
    images[:, 0, 0] = (labels * 80)[:, None] if colour else labels * 80
    out = {"classes": ["red", "green", "blue"], "train": (images, labels)}
    if with_test:
        out["test"] = (images[:6].copy(), labels[:6].copy())
    return out
'''


def write_module(project: Path, source: str) -> str:
    name = next(_names)
    (project / name).mkdir(parents=True)
    (project / name / "__init__.py").write_text("")
    (project / name / "data.py").write_text(textwrap.dedent(source))
    return f"{name}.data:load"


@pytest.mark.fast
def test_user_loader_with_options_through_fetch_and_prepare(tmp_path):
    project = tmp_path / "project"
    source = write_module(project, LOADER)
    cfg = DataConfig(source=source, options={"n": 70, "side": 10, "with_test": True})
    result = run_fetch(cfg, tmp_path / "raw", project_dir=project)
    assert result.counts == {"train": 70, "test": 6} and result.source == source
    assert sorted(p.name for p in result.raw_dir.iterdir()) == [
        "classes.json", "source.json", "test-images-idx4-ubyte", "test-labels-idx1-ubyte",
        "train-images-idx4-ubyte", "train-labels-idx1-ubyte"]
    prepared = run_prepare(DataConfig(), result.raw_dir, tmp_path / "prepared")
    assert prepared.manifest["source"] == source
    assert prepared.counts == {"train": 64, "val": 6, "test": 6}
    spec = load_spec(prepared.prepared_dir)
    assert spec.shape == (3, 10, 10) and spec.class_names == ("red", "green", "blue")
    images, labels = load_split(prepared.prepared_dir, "train")
    np.testing.assert_array_equal(images[:, 1, 0, 0].numpy(), labels.numpy() * 80)  # each image kept its label


@pytest.mark.fast
def test_gray_loader_and_one_channel_arrays_are_stored_gray(tmp_path):
    project = tmp_path / "project"
    source = write_module(project, LOADER)
    run_fetch(DataConfig(source=source, options={"colour": False}), tmp_path / "raw", project_dir=project)
    assert (tmp_path / "raw" / "train-images-idx3-ubyte").is_file()
    images = np.zeros((4, 5, 6, 1), np.uint8)
    classes, sets = check_loaded("m:f", {"classes": ["a", "b"], "train": (images, np.array([0, 1, 0, 1]))})
    assert sets["train"][0].shape == (4, 5, 6) and sets["train"][1].dtype == np.int64


IMAGES = np.zeros((4, 5, 5), np.uint8)
LABELS = np.array([0, 1, 0, 1])
BAD_RETURNS = {  # name -> (returned value, expected message after "data.source: m:f ")
    "not a mapping": ([IMAGES, LABELS], r"returned list: expected a mapping with 'classes', 'train'"),
    "no train": ({"classes": ["a", "b"], "test": (IMAGES, LABELS)}, r"returned no 'train': it is required"),
    "no classes": ({"train": (IMAGES, LABELS)}, r"returned no 'classes'"),
    "unknown key": ({"classes": ["a", "b"], "train": (IMAGES, LABELS), "extra": 1}, r"returned unknown key\(s\) \['extra'\]"),
    "one class": ({"classes": ["a"], "train": (IMAGES, LABELS * 0)}, r"returned 1 class\(es\): a classifier needs at least 2"),
    "classes not str": ({"classes": [0, 1], "train": (IMAGES, LABELS)}, r"returned classes=\[0, 1\]: expected a list of distinct"),
    "float images": ({"classes": ["a", "b"], "train": (IMAGES.astype(np.float32), LABELS)},
                     r"returned train images of dtype float32: expected uint8 pixels 0\.\.255"),
    "torch-like images": ({"classes": ["a", "b"], "train": ([[0]], LABELS)},
                          r"returned train images as builtins\.list: expected a numpy array"),
    "channels first": ({"classes": ["a", "b"], "train": (np.zeros((4, 3, 5, 5), np.uint8), LABELS)},
                       r"returned train images of shape \[4, 3, 5, 5\]: expected \[N, H, W\] \(gray\) or \[N, H, W, C\]"),
    "float labels": ({"classes": ["a", "b"], "train": (IMAGES, LABELS.astype(float))},
                     r"returned train labels of shape \[4\] and dtype float64: expected a 1-D integer array"),
    "label out of range": ({"classes": ["a", "b"], "train": (IMAGES, np.array([0, 1, 2, 0]))},
                           r"returned train label 2 at index 2: out of range 0\.\.1 \(len\(classes\) = 2\)"),
    "lengths differ": ({"classes": ["a", "b"], "train": (IMAGES, LABELS[:3])},
                       r"returned train: 4 images but 3 labels: they must pair up"),
    "not a pair": ({"classes": ["a", "b"], "train": IMAGES}, r"returned train as ndarray: expected a pair"),
    "splits differ in shape": ({"classes": ["a", "b"], "train": (IMAGES, LABELS),
                                "test": (np.zeros((2, 6, 6), np.uint8), np.array([0, 1]))},
                               r"returned images of different shapes per split"),
}


@pytest.mark.fast
@pytest.mark.parametrize("case", list(BAD_RETURNS))
def test_bad_loader_returns_are_one_line_errors(case):
    value, message = BAD_RETURNS[case]
    with pytest.raises(DataError, match=rf"^data\.source: m:f {message}") as error:
        check_loaded("m:f", value)
    assert "\n" not in str(error.value)


@pytest.mark.fast
def test_bad_loader_leaves_no_raw_dir_and_bad_names_are_clear(tmp_path):
    project = tmp_path / "project"
    source = write_module(project, "def load():\n    return {'classes': ['a', 'b']}\n")
    with pytest.raises(DataError, match="returned no 'train'"):
        run_fetch(DataConfig(source=source), tmp_path / "raw", project_dir=project)
    assert not (tmp_path / "raw").exists()
    with pytest.raises(DataError, match=r"data\.options: .* does not take \['bogus'\]"):
        run_fetch(DataConfig(source=source, options={"bogus": 1}), tmp_path / "raw", project_dir=project)
    module = source.split(":")[0]
    with pytest.raises(DataError, match=rf"has no function 'nope'"):
        run_fetch(DataConfig(source=f"{module}:nope"), tmp_path / "raw", project_dir=project)
    with pytest.raises(DataError, match=rf"^data\.source: cannot import 'nosuchmod_x' .*: put the module in the "
                                        rf"project folder \({re.escape(str(project.resolve()))}\) or install it$"):
        run_fetch(DataConfig(source="nosuchmod_x:load"), tmp_path / "raw", project_dir=project)


@pytest.mark.fast
def test_data_config_checks_source_and_source_specific_keys():
    assert DataConfig(source="pkg.sub.mod:load_it").loader == "pkg.sub.mod:load_it"
    assert DataConfig().loader is None
    for raw, problem in (({"source": "folder"}, "expected mnist, imagefolder, audio, text, capture or module:function"),
                         ({"audio_folder": "clips"}, r"data\.audio_folder apply to source=audio only"),
                         ({"source": "audio", "text_files": "a.tsv"}, r"data\.text_files apply to source=text only"),
                         ({"source": "audio", "test_rule": "index < 5"}, "set the pattern too"),
                         ({"class_names": {"0": "no"}}, "apply to source=audio or text"),
                         ({"source": "imagefolder", "image_size": 0}, "sides must be positive"),
                         ({"channels": 3}, "apply to source=imagefolder only"),
                         ({"options": {"n": 1}}, "data.options are passed to a module:function loader"),
                         ({"source": "imagefolder", "channels": 2}, "channels")):
        with pytest.raises(ConfigError, match=problem):
            build_params({"data": raw})
    cfg = build_params({"data": {"source": "imagefolder", "image_size": [24, 32], "channels": 1}}).data
    assert cfg.image_size == (24, 32) and cfg.channels == 1
