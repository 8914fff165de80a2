from pathlib import Path

import pytest

from tuneline.core.config.base import ConfigError
from tuneline.core.config.overrides import apply_overrides, parse_override, valid_keys
from tuneline.core.config.params import Params, build_params, load_params

pytestmark = pytest.mark.fast

REPO = Path(__file__).resolve().parents[2]


def test_repo_params_file_is_valid_and_matches_the_defaults():
    params = load_params(REPO / "params.yaml")
    assert params.train.optimizer == "adamw" and params.train.lr == 0.004  # the fast MNIST recipe
    assert params.model.arch == "lean_cnn" and params.train.batch_size == 256
    # Every key of the file is a known key and vice versa: the file is the one source of defaults.
    assert params == Params()


@pytest.mark.parametrize("text, expected", [
    ("train.lr=0.01", ("train.lr", 0.01)),
    ("train.epochs=5", ("train.epochs", 5)),
    ("data.mirror=/tmp/m", ("data.mirror", "/tmp/m")),
    ("data.limit_train=null", ("data.limit_train", None)),
    ("model.arch=seed_mlp", ("model.arch", "seed_mlp")),
])
def test_parse_override_reads_values_as_yaml(text, expected):
    assert parse_override(text) == expected


def test_parse_override_without_equals_is_an_error():
    with pytest.raises(ConfigError, match="expected section.key=value"):
        parse_override("train.lr")


def test_override_changes_only_its_key():
    params = build_params({}, {"train.lr": 0.05, "gate.min_accuracy": 0.5})
    assert params.train.lr == 0.05 and params.gate.min_accuracy == 0.5
    assert params.train.epochs == Params().train.epochs


def test_unknown_key_lists_the_valid_keys_of_its_section():
    with pytest.raises(ConfigError) as err:
        build_params({}, {"train.lrr": 0.1})
    message = str(err.value)
    assert "unknown key 'train.lrr'" in message and "train.lr" in message and "train.epochs" in message
    assert "\n" not in message


def test_unknown_section_lists_the_sections():
    with pytest.raises(ConfigError, match="unknown key 'trian.lr': valid keys are data, export, gate, model, paths, project, serve, train, tune"):
        build_params({}, {"trian.lr": 0.1})


def test_unknown_key_in_the_file_is_an_error_naming_it(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("train:\n  lr: 0.1\n  learning_rate: 0.2\n")
    with pytest.raises(ConfigError, match=r"params.yaml: unknown key 'train.learning_rate'"):
        load_params(path)


@pytest.mark.parametrize("override, match", [
    ({"train.lr": "abc"}, r"override: train.lr: Input should be a valid number"),
    ({"train.epochs": 2.5}, r"train.epochs: Input should be a valid integer"),
    ({"model.arch": "resnet"}, r"model.arch: .*unknown architecture 'resnet': use a built-in \(seed_cnn \| seed_mlp "
                               r"\| bn_cnn \| slim_cnn \| lean_cnn \| fast_cnn \| audio_cnn \| text_cnn \| text_bow\), torchvision:NAME .* \(got 'resnet'\)"),
    ({"train.optimizer": "lion"}, r"train.optimizer: Input should be 'sgd', 'adam', 'adamw' or 'rmsprop'"),
    ({"train.lr": -1}, r"train.lr: Input should be greater than 0"),
    ({"data.val_fraction": 1.5}, r"data.val_fraction: Input should be less than 1"),
])
def test_wrong_type_or_value_is_a_one_line_error(override, match):
    with pytest.raises(ConfigError, match=match) as err:
        build_params({}, override)
    assert "\n" not in str(err.value)


def test_malformed_and_missing_files(tmp_path):
    with pytest.raises(ConfigError, match="params file not found"):
        load_params(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_params(bad)


def test_params_hash_follows_values_but_not_paths():
    base = Params()
    assert build_params({}, {"paths.model": "elsewhere.pt"}).params_hash() == base.params_hash()
    assert build_params({}, {"train.lr": 0.002}).params_hash() != base.params_hash()


def test_valid_keys_and_apply_overrides_do_not_mutate_input():
    raw = {"train": {"lr": 0.1}}
    merged = apply_overrides(raw, {"train.epochs": 1}, Params)
    assert raw == {"train": {"lr": 0.1}} and merged == {"train": {"lr": 0.1, "epochs": 1}}
    assert "train.lr" in valid_keys(Params) and "paths.onnx" in valid_keys(Params)
