import pytest
import torch

from tuneline.tasks.model.architectures import ModelArgs, SeedCNN, SeedMLP, build_model

pytestmark = pytest.mark.fast


def args(arch: str) -> ModelArgs:
    return ModelArgs(arch=arch, dropout=0.5, n_classes=10, image_shape=(1, 28, 28), mean=0.1307, std=0.3081)


@pytest.mark.parametrize("arch", ["seed_cnn", "seed_mlp"])
@pytest.mark.parametrize("batch", [1, 7, 64])
def test_raw_pixels_in_logits_out(arch, batch):
    model = build_model(args(arch)).eval()
    out = model(torch.rand(batch, 1, 28, 28) * 255)
    assert out.shape == (batch, 10) and out.dtype == torch.float32


def test_seed_cnn_matches_the_article():
    net = build_model(args("seed_cnn")).net
    assert isinstance(net, SeedCNN)
    convs = [m for m in net.modules() if isinstance(m, torch.nn.Conv2d)]
    linears = [m for m in net.modules() if isinstance(m, torch.nn.Linear)]
    assert [(c.in_channels, c.out_channels, c.kernel_size) for c in convs] == [(1, 32, (5, 5)), (32, 64, (5, 5))]
    assert [(l.in_features, l.out_features) for l in linears] == [(1024, 1024), (1024, 10)]
    assert [m.p for m in net.modules() if isinstance(m, torch.nn.Dropout)] == [0.5]


def test_seed_mlp_matches_the_article():
    net = build_model(args("seed_mlp")).net
    assert isinstance(net, SeedMLP)
    assert [(l.in_features, l.out_features) for l in net.modules() if isinstance(l, torch.nn.Linear)] == [(784, 256), (256, 10)]


def test_normalisation_is_inside_the_model():
    model = build_model(args("seed_mlp")).eval()
    pixels = torch.rand(4, 1, 28, 28) * 255
    expected = model.net((pixels / 255 - 0.1307) / 0.3081)
    assert torch.allclose(model(pixels), expected, atol=1e-5)


def test_unknown_architecture_is_an_error():
    with pytest.raises(ValueError, match="unknown architecture 'resnet'"):
        build_model(args("resnet"))
