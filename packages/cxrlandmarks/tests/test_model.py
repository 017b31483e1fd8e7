import pytest
import torch
from torch import nn
from torchvision.models import resnet18

from cxrlandmarks.anatomy import flip_coords
from cxrlandmarks.config import CxrConfig
from cxrlandmarks.model import ResNetLandmarkRegressor, ResNetWithCoordinateAttention, build_model
from cxrlandmarks.predict import predict_batches
from medcore.errors import CheckpointError, UserError
from medcore.testing import skip_if_no_cuda


def test_head_is_the_spec_head_and_output_in_unit_range():
    model = build_model(CxrConfig()).eval()
    layers = list(model.head)
    assert [type(m) for m in layers] == [
        nn.Dropout,
        nn.Linear,
        nn.ReLU,
        nn.Dropout,
        nn.Linear,
        nn.ReLU,
        nn.Dropout,
        nn.Linear,
        nn.Sigmoid,
    ]
    assert [m.p for m in layers if isinstance(m, nn.Dropout)] == [0.5, 0.25, 0.125]
    assert [(m.in_features, m.out_features) for m in layers if isinstance(m, nn.Linear)] == [
        (512, 512),
        (512, 256),
        (256, 30),
    ]
    out = model(torch.randn(2, 3, 64, 64))
    assert out.shape == (2, 30) and (out > 0).all() and (out < 1).all()
    assert model.embed(torch.randn(2, 3, 64, 64)).shape == (2, 512)


def test_coordinate_attention_variant():
    model = ResNetWithCoordinateAttention().eval()
    assert not isinstance(model.attention, nn.Identity)
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 30)
    attention_ids = {id(p) for p in model.attention.parameters()}
    assert attention_ids <= {id(p) for p in model.head_parameters()}


def test_freeze_trunk_leaves_only_head_trainable():
    model = ResNetLandmarkRegressor()
    model.freeze_trunk()
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert trainable == {id(p) for p in model.head_parameters()}
    model.freeze_trunk(False)
    assert all(p.requires_grad for p in model.parameters())


def test_pretrained_trunk_from_local_torchvision_file(tmp_path):
    reference = resnet18(weights=None)
    path = tmp_path / "resnet18.pth"
    torch.save(reference.state_dict(), path)
    model = ResNetLandmarkRegressor()
    report = model.load_pretrained_trunk(path)
    assert torch.equal(model.backbone.conv1.weight, reference.conv1.weight)
    assert torch.equal(
        model.backbone.layer4[1].bn2.running_var, reference.layer4[1].bn2.running_var
    )
    assert set(report.unexpected) == {"fc.weight", "fc.bias"} and not report.missing
    assert report.matched == report.total == len(reference.state_dict()) - 2


def test_pretrained_errors(tmp_path):
    with pytest.raises(UserError, match="--pretrained-weights"):
        ResNetLandmarkRegressor().load_pretrained_trunk(None)
    other = tmp_path / "other.pt"
    torch.save({"w": torch.zeros(3)}, other)
    with pytest.raises(CheckpointError, match="wrong architecture"):
        ResNetLandmarkRegressor().load_pretrained_trunk(other)


def test_flip_tta_is_exactly_flip_equivariant():
    """TTA of any model: predicting the mirrored image equals mirroring (and pair-swapping) the prediction."""
    torch.manual_seed(0)
    model = ResNetLandmarkRegressor().eval()
    x = torch.randn(2, 3, 48, 48)
    plain = predict_batches([model], x)
    tta = predict_batches([model], x, tta_flip=True)
    tta_of_mirror = predict_batches([model], torch.flip(x, dims=[-1]), tta_flip=True)
    assert torch.allclose(tta_of_mirror, flip_coords(tta), atol=1e-5)
    # TTA is the mean of the plain and the flipped-back prediction.
    back = flip_coords(model(torch.flip(x, dims=[-1])).reshape(2, 15, 2))
    assert torch.allclose(tta, (plain + back) / 2, atol=1e-6)
    # An ensemble of the same model twice is that model.
    assert torch.allclose(predict_batches([model, model], x), plain, atol=1e-6)


@pytest.mark.gpu
@skip_if_no_cuda
def test_cuda_training_step_with_amp():
    from cxrlandmarks.losses import build_loss
    from medcore.runtime.device import amp_policy, autocast

    device = torch.device("cuda")
    model = ResNetLandmarkRegressor().to(device)
    opt = torch.optim.AdamW(model.parameters(), 1e-3)
    policy = amp_policy(device, True)
    scaler = torch.amp.GradScaler("cuda", enabled=policy.use_scaler)
    x, y = torch.randn(4, 3, 64, 64, device=device), torch.rand(4, 30, device=device)
    with autocast(device, policy):
        loss, _ = build_loss("complete")(model(x), y)
    scaler.scale(loss).backward()
    scaler.step(opt)
    scaler.update()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_head_output_stays_fp32_under_autocast():
    model = ResNetLandmarkRegressor().eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    assert out.dtype == torch.float32


def test_original_code_checkpoint_is_imported(tmp_path, write_original_checkpoint):
    from cxrlandmarks.model import load_model

    path = tmp_path / "geometric_complete.pt"
    original = write_original_checkpoint(path)
    model, state = load_model(path, torch.device("cpu"))
    assert state["epoch"] == 12
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(model(x), original(x), atol=1e-6)
    assert [m.p for m in model.head if isinstance(m, nn.Dropout)] == [0.5, 0.25, 0.125]


def test_checkpoint_without_identity_is_refused(tmp_path):
    from cxrlandmarks.model import load_model

    path = tmp_path / "x.pt"
    torch.save({"weights": {"a": torch.zeros(1)}}, path)
    with pytest.raises(CheckpointError, match="carries no model identity"):
        load_model(path, torch.device("cpu"))
