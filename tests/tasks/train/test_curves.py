"""The training curves picture: both panels drawn from the history, whatever its length."""

from __future__ import annotations

import pytest
from PIL import Image

from tuneline.tasks.train.curves import COLOURS, render_curves_png

pytestmark = pytest.mark.fast


# A legend entry alone is a ~42-pixel stroke; one drawn point adds ~37 more, a line far more.
MORE_THAN_A_LEGEND = 60


def drawn(image: Image.Image, box: tuple[int, int, int, int]) -> set[str]:
    """The series ("train", "val") whose colour covers more of `box` than its legend entry would."""
    counts = {colour: n for n, colour in image.crop(box).getcolors(maxcolors=1 << 20)}
    return {name for name, colour in COLOURS.items() if counts.get(colour, 0) > MORE_THAN_A_LEGEND}


@pytest.mark.parametrize("epochs", [1, 3, 40])
def test_loss_and_accuracy_panels_each_show_their_train_and_val_lines(tmp_path, epochs):
    history = [{"epoch": e, "train_loss": 1 / e, "val_loss": 1.2 / e, "train_accuracy": 1 - 0.4 / e,
                "val_accuracy": 1 - 0.5 / e, "lr": 0.001} for e in range(1, epochs + 1)]
    path = render_curves_png(history, tmp_path / "curves.png")
    image = Image.open(path).convert("RGB")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    half = image.width // 2
    for box in ((0, 0, half, image.height), (half, 0, image.width, image.height)):  # loss, then accuracy
        assert drawn(image, box) == {"train", "val"}
    assert [p.name for p in tmp_path.iterdir()] == ["curves.png"]  # written atomically, no temp left


def test_a_history_without_accuracy_draws_the_loss_panel_only(tmp_path):
    path = render_curves_png([{"epoch": 1, "train_loss": 0.5, "val_loss": 0.6}], tmp_path / "curves.png")
    image = Image.open(path).convert("RGB")
    assert drawn(image, (0, 0, image.width, image.height)) == {"train", "val"}
    assert image.width < 600  # one panel, not an empty second one
