"""fastiaa.models: backbones, pooling, embedding head, frozen BatchNorm, weight files (docs/method.md §2)."""

from __future__ import annotations

import math
import shutil

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from skimage import data as skimage_data
from torch import nn

from fastiaa.models import create_model, list_models
from fastiaa.models.base import IMAGENET_MEAN, IMAGENET_STD, Renormalize, global_pool
from fastiaa.models.bninception import BNInception
from fastiaa.models.efficientnet import imagenet_classifier, package_weight_file

# name -> (pooled features, pooling, input space, trunk parameters). The trunk counts plus the
# ImageNet classifier (features x 1000 + 1000) give the published totals: torchvision GoogLeNet
# 6,624,904 and ResNet-50 25,557,032; pretrainedmodels BN-Inception 11,295,240; EfficientNet-Lite0
# 4,652,008 (the package checkpoint).
EXPECTED = {
    "googlenet": (1024, "avg", "imagenet", 5_599_904),
    "bninception": (1024, "avg+max", "bninception", 10_270_240),
    "resnet50": (2048, "avg+max", "imagenet", 23_508_032),
    "efficientnet_lite0": (1280, "avg", "imagenet", 3_371_008),
}
PUBLISHED_TOTALS = {"googlenet": 6_624_904, "bninception": 11_295_240, "resnet50": 25_557_032,
                    "efficientnet_lite0": 4_652_008}


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Batch-2 passes gain nothing from threads, and OpenMP spin-waits stall on a shared, busy CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _imagenet_batch(*images: np.ndarray) -> torch.Tensor:
    """Standard ImageNet evaluation preprocessing: resize 256, centre crop 224, mean/std."""
    transform = torchvision.transforms.Compose([
        torchvision.transforms.Resize(256),
        torchvision.transforms.CenterCrop(224),
        torchvision.transforms.ToTensor(),
        torchvision.transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])
    return torch.stack([transform(Image.fromarray(image)) for image in images])


def test_efficientnet_lite0_classifies_real_photos():
    model = imagenet_classifier().eval()
    with torch.no_grad():
        probs = model.classify(_imagenet_batch(skimage_data.coffee(), skimage_data.chelsea())).softmax(dim=1)
    coffee, cat = probs[0], probs[1]
    # ImageNet 967 espresso; the rest of the top 5 holds 968 cup and 504 coffee mug.
    assert coffee.argmax().item() == 967 and coffee[967] > 0.8
    assert {968, 504} <= set(coffee.topk(5).indices.tolist())
    # Chelsea is a tabby: the top 3 are the cat classes 281 tabby, 282 tiger cat, 285 Egyptian cat.
    assert set(cat.topk(3).indices.tolist()) == {281, 282, 285}


def test_registry_names_and_bad_arguments():
    assert list_models() == sorted(EXPECTED)
    with pytest.raises(ValueError, match="googlenet"):
        create_model("alexnet", pretrained=False)
    with pytest.raises(ValueError, match="embedding_size"):
        create_model("googlenet", embedding_size=0, pretrained=False)


@pytest.fixture(scope="module", params=sorted(EXPECTED))
def scratch_model(request):
    torch.manual_seed(0)
    return request.param, create_model(request.param, embedding_size=512, pretrained=False)


def test_architecture_and_parameter_counts(scratch_model):
    name, model = scratch_model
    features, pooling, input_space, trunk_params = EXPECTED[name]
    assert (model.num_features, model.pooling, model.input_space) == (features, pooling, input_space)
    assert sum(p.numel() for p in model.backbone_parameters()) == trunk_params
    assert trunk_params + features * 1000 + 1000 == PUBLISHED_TOTALS[name]
    assert [tuple(p.shape) for p in model.head_parameters()] == [(512, features), (512,)]


def test_head_initialisation(scratch_model):
    _, model = scratch_model
    weight = model.head.weight.detach().double()
    assert torch.count_nonzero(model.head.bias) == 0
    # Kaiming normal, fan_out = 512 outputs, ReLU gain: std sqrt(2 / 512) = 0.0625.
    assert weight.std().item() == pytest.approx(math.sqrt(2 / 512), rel=0.02)
    assert abs(weight.mean().item()) < 0.002


def test_forward_matches_pooling_and_head_in_float64(scratch_model):
    _, model = scratch_model
    model.eval()
    images = torch.randn(2, 3, 96, 96, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        embeddings = model(images)
        feature_map = model.backbone(images).double()
    assert embeddings.shape == (2, 512) and embeddings.dtype == torch.float32
    assert torch.isfinite(embeddings).all()
    pooled = feature_map.mean(dim=(2, 3))
    if model.pooling == "avg+max":
        pooled = pooled + feature_map.amax(dim=(2, 3))
    expected = pooled @ model.head.weight.double().T + model.head.bias.double()
    torch.testing.assert_close(embeddings.double(), expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())


def test_batchnorm_frozen_in_train_mode(scratch_model):
    _, model = scratch_model
    model.eval()
    model.train()
    batchnorms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert batchnorms and not any(bn.training for bn in batchnorms)
    assert model.training and model.head.training
    assert all(p.requires_grad for bn in batchnorms for p in bn.parameters())
    before = [bn.running_mean.clone() for bn in batchnorms]
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2)) * 3 + 1
    model(images).square().sum().backward()
    assert all(torch.equal(b, bn.running_mean) for b, bn in zip(before, batchnorms))
    assert batchnorms[0].weight.grad is not None and model.head.weight.grad is not None
    model.zero_grad(set_to_none=True)


def test_channels_last_bfloat16_autocast_close_to_float32(scratch_model):
    _, model = scratch_model
    model.eval()
    images = torch.randn(2, 3, 96, 96, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        reference = model(images)
        model.to(memory_format=torch.channels_last)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(images.contiguous(memory_format=torch.channels_last))
        model.to(memory_format=torch.contiguous_format)
    assert low.dtype == torch.float32 and low.shape == reference.shape
    cosine = nn.functional.cosine_similarity(low.double(), reference.double(), dim=1)
    assert (cosine > 0.99).all(), cosine


def test_global_pool_known_values():
    features = torch.arange(8.0).view(1, 2, 2, 2)  # channel 0: 0..3, channel 1: 4..7
    torch.testing.assert_close(global_pool(features, "avg"), torch.tensor([[1.5, 5.5]]))
    torch.testing.assert_close(global_pool(features, "avg+max"), torch.tensor([[4.5, 12.5]]))


def test_renormalize_maps_imagenet_input_to_checkpoint_normalisation():
    rgb = torch.rand(2, 3, 4, 5, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    imagenet = ((rgb - mean) / std).float()
    # EfficientNet-Lite (TensorFlow): (rgb * 255 - 127) / 128. GoogLeNet (torchvision): 2 rgb - 1.
    tf = Renormalize((127 / 255,) * 3, (128 / 255,) * 3)(imagenet)
    torch.testing.assert_close(tf.double(), (rgb * 255 - 127) / 128, atol=1e-5, rtol=0)
    half = Renormalize((0.5,) * 3, (0.5,) * 3)(imagenet)
    torch.testing.assert_close(half.double(), rgb * 2 - 1, atol=1e-5, rtol=0)


def test_bninception_uses_pretrainedmodels_names():
    keys = list(BNInception().state_dict())
    assert len(keys) == 483  # the pretrainedmodels checkpoint holds these plus last_linear.weight/.bias
    assert keys[:6] == ["conv1_7x7_s2.weight", "conv1_7x7_s2.bias", "conv1_7x7_s2_bn.weight",
                        "conv1_7x7_s2_bn.bias", "conv1_7x7_s2_bn.running_mean", "conv1_7x7_s2_bn.running_var"]
    for key in ("conv2_3x3_reduce.weight", "conv2_3x3_bn.running_var", "inception_3a_1x1.weight",
                "inception_3a_pool_proj_bn.bias", "inception_3c_double_3x3_2.weight",
                "inception_4e_3x3_bn.running_mean", "inception_5b_double_3x3_1_bn.weight",
                "inception_5b_pool_proj.bias"):
        assert key in keys
    # The two stride-2 blocks have neither a 1x1 branch nor a pool projection.
    assert not any(k.startswith(("inception_3c_1x1", "inception_3c_pool_proj", "inception_4e_1x1")) for k in keys)
    shapes = {k: tuple(v.shape) for k, v in BNInception().state_dict().items()}
    assert shapes["inception_3c_3x3.weight"] == (160, 128, 3, 3)
    assert shapes["inception_5a_1x1.weight"] == (352, 1056, 1, 1)
    assert shapes["inception_5b_pool_proj.weight"] == (128, 1024, 1, 1)


def _assert_trunk_equals(model, state, ignore=()):
    loaded = model.backbone.state_dict()
    for key, value in state.items():
        if not key.startswith(ignore) and not key.endswith("num_batches_tracked"):
            assert torch.equal(loaded[key], value.reshape(loaded[key].shape)), key


def test_loads_torchvision_checkpoints_by_standard_name(tmp_path):
    torch.manual_seed(5)
    googlenet_state = torchvision.models.GoogLeNet(aux_logits=True, init_weights=False).state_dict()
    torch.save(googlenet_state, tmp_path / "googlenet-1378be20.pth")
    resnet_state = torchvision.models.resnet50().state_dict()
    torch.save(resnet_state, tmp_path / "resnet50-11ad3fa6.pth")  # the IMAGENET1K_V2 file name

    _assert_trunk_equals(create_model("googlenet", weight_path=tmp_path), googlenet_state, ("aux1.", "aux2.", "fc."))
    _assert_trunk_equals(create_model("resnet50", weight_path=str(tmp_path / "resnet50-11ad3fa6.pth")),
                         resnet_state, ("fc.",))


def test_loads_old_style_bninception_checkpoint(tmp_path):
    torch.manual_seed(6)
    state = {k: v for k, v in BNInception().state_dict().items() if not k.endswith("num_batches_tracked")}
    for key in state:
        state[key] = torch.randn_like(state[key])
    # Copies saved by old PyTorch: BatchNorm tensors [1, C], no num_batches_tracked, a classifier.
    old_style = {k: v.unsqueeze(0) if "_bn." in k else v for k, v in state.items()}
    old_style.update({"last_linear.weight": torch.randn(1000, 1024), "last_linear.bias": torch.randn(1000)})
    torch.save(old_style, tmp_path / "bn_inception-52deb4733.pth")
    _assert_trunk_equals(create_model("bninception", weight_path=tmp_path), state)


def test_efficientnet_weight_path_file_or_folder(tmp_path):
    default = create_model("efficientnet_lite0").backbone.state_dict()
    assert "net.classifier.weight" not in default  # the ImageNet classifier is replaced by the head
    # A folder of paper checkpoints without the Lite0 file falls back to the installed package.
    for weight_path in (tmp_path, shutil.copy(package_weight_file(), tmp_path / "lite0.pth")):
        loaded = create_model("efficientnet_lite0", weight_path=weight_path).backbone.state_dict()
        assert default.keys() == loaded.keys()
        assert all(torch.equal(default[k], loaded[k]) for k in default)
    with pytest.raises(FileNotFoundError, match="neither a file nor a folder"):
        create_model("efficientnet_lite0", weight_path=tmp_path / "missing.pth")


@pytest.mark.parametrize("name, file_name, published", [
    ("googlenet", "googlenet-1378be20.pth", "download.pytorch.org"),
    ("resnet50", "resnet50-0676ba61.pth", "download.pytorch.org"),
    ("bninception", "bn_inception-52deb4733.pth", "data.lip6.fr/cadene/pretrainedmodels"),
])
def test_missing_checkpoint_error_says_what_to_do(tmp_path, name, file_name, published):
    with pytest.raises(FileNotFoundError) as error:
        create_model(name, pretrained=True, weight_path=tmp_path)
    message = str(error.value)
    assert file_name in message and published in message and "--pretrained 0" in message
    assert str(tmp_path) in message


def test_mismatched_checkpoint_error_lists_keys(tmp_path):
    torch.save(torchvision.models.resnet50().state_dict(), tmp_path / "googlenet-1378be20.pth")
    with pytest.raises(ValueError, match=r"missing keys \(conv1\.conv\.weight.*unexpected keys \(conv1\.weight"):
        create_model("googlenet", weight_path=tmp_path)

    state = torchvision.models.resnet50().state_dict()
    state["layer1.0.conv1.weight"] = torch.zeros(32, 64, 1, 1)
    torch.save(state, tmp_path / "resnet50-0676ba61.pth")
    shape_error = r"1 shape mismatches .*layer1\.0\.conv1\.weight \(32, 64, 1, 1\) vs \(64, 64, 1, 1\)"
    with pytest.raises(ValueError, match=shape_error):
        create_model("resnet50", weight_path=tmp_path)

    (tmp_path / "bn_inception-52deb4733.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="cannot read"):
        create_model("bninception", weight_path=tmp_path)
