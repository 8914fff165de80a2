"""Every built-in architecture adapts to the input spec: any channels, size and class count, forward, backward, ONNX."""

import pytest
import torch

from tuneline.tasks.model.architectures import ARCHITECTURES, ModelArgs, build_model
from tuneline.tasks.ship.export import export_onnx_file, check_parity

SPECS = [(3, 12, 12, 4), (1, 28, 28, 10), (3, 32, 32, 10)]


def args_for(arch: str, channels: int, h: int, w: int, classes: int, **kwargs) -> ModelArgs:
    return ModelArgs(arch=arch, dropout=0.2, n_classes=classes, image_shape=(channels, h, w),
                     mean=(0.4,) * channels, std=(0.25,) * channels, kwargs=kwargs)


@pytest.mark.fast
@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
@pytest.mark.parametrize("spec", SPECS, ids=lambda s: "x".join(map(str, s)))
def test_builds_runs_forward_and_backward(arch, spec):
    torch.manual_seed(0)
    kwargs = {"width": 4} if arch == "fast_cnn" else {}
    model = build_model(args_for(arch, *spec, **kwargs)).train()
    pixels = torch.rand(3, *spec[:3]) * 255
    logits = model(pixels)
    assert logits.shape == (3, spec[3])
    torch.nn.functional.cross_entropy(logits, torch.tensor([0, 1, 2])).backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_exports_to_onnx_with_parity(arch, tmp_path):
    torch.manual_seed(0)
    model = build_model(args_for(arch, 3, 12, 12, 4, **({"width": 4} if arch == "fast_cnn" else {}))).eval()
    images = (torch.rand(8, 3, 12, 12) * 255).to(torch.uint8)
    export_onnx_file(model, images[:2].float(), tmp_path / "m.onnx", opset=18)
    diffs = check_parity(model, tmp_path / "m.onnx", images, atol=1e-4)
    assert max(diffs.values()) < 1e-4


def test_fast_cnn_flip_average_scores_the_image_and_its_mirror_outside_training_and_exports(tmp_path):
    torch.manual_seed(0)
    args = args_for("fast_cnn", 3, 12, 12, 4, width=4, flip_average=True)
    model = build_model(args).eval()
    plain = build_model(args_for("fast_cnn", 3, 12, 12, 4, width=4))
    plain.load_state_dict(model.state_dict())
    plain.eval()
    images = (torch.rand(8, 3, 12, 12) * 255).to(torch.uint8)
    pixels = images.float()
    with torch.no_grad():
        averaged = (plain(pixels) + plain(pixels.flip(3))) / 2
        # Relative comparisons: a fresh fast_cnn's logits are tiny (batch norm at its initial statistics, logits / 9).
        assert torch.allclose(model(pixels), averaged, rtol=1e-4, atol=1e-12)
        assert not torch.allclose(plain(pixels), averaged, rtol=1e-2, atol=0)  # the mirror image scores differently
        model.train(), plain.train()
        torch.manual_seed(1)  # the same dropout masks for both
        trained_view = model(pixels)
        torch.manual_seed(1)
        assert torch.allclose(trained_view, plain(pixels), rtol=1e-4, atol=1e-12)  # training: one view
    model.eval()
    export_onnx_file(model, pixels[:2], tmp_path / "m.onnx", opset=18)
    import onnxruntime as ort

    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    exported = session.run(None, {session.get_inputs()[0].name: pixels.numpy()})[0]
    assert torch.allclose(torch.from_numpy(exported), model(pixels).detach(), rtol=1e-3, atol=1e-9)
    with pytest.raises(ValueError, match="model.kwargs.flip_average: 'yes' is not true or false"):
        build_model(args_for("fast_cnn", 3, 12, 12, 4, width=4, flip_average="yes"))
