"""Model specs and the model interface on open_clip's CLIP class (no downloads)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from trainables.errors import UserError
from trainables.models import load_model, parse_model_spec
from trainables.models.tiny_clip import build_tiny_clip


def test_interface_shapes_and_pixel_space(random_tiny_clip):
    pixels = torch.rand(2, 3, random_tiny_clip.image_size, random_tiny_clip.image_size)
    image_features = random_tiny_clip.encode_image(pixels)
    text_features = random_tiny_clip.encode_text(["a red circle", "two blue squares"])
    assert image_features.shape == text_features.shape == (2, 64)
    # Normalisation happens inside: feeding normalised pixels to the tower equals encode_image.
    assert torch.allclose(random_tiny_clip.vision(random_tiny_clip.normalize(pixels)), image_features)


def test_only_the_vision_encoder_is_trainable_and_f_org_is_a_frozen_copy(random_tiny_clip):
    trainable = {name for name, p in random_tiny_clip.named_parameters() if p.requires_grad}
    assert trainable and all(name.startswith("vision.") for name in trainable)
    pixels = torch.rand(2, 3, 32, 32)
    assert torch.allclose(random_tiny_clip.encode_image_original(pixels), random_tiny_clip.encode_image(pixels), atol=1e-5)
    with torch.no_grad():
        for p in random_tiny_clip.vision.parameters():
            p.add_(0.1)
    assert not torch.allclose(random_tiny_clip.encode_image_original(pixels), random_tiny_clip.encode_image(pixels), atol=1e-3)


def test_open_clip_named_architecture_from_a_local_weights_file(tmp_path):
    import open_clip

    clip = open_clip.create_model("ViT-B-32", pretrained=None)
    path = tmp_path / "vit-b-32.safetensors"
    save_file({k: v.contiguous() for k, v in clip.state_dict().items()}, str(path))
    model = load_model(f"open_clip:ViT-B-32@{path}")
    assert model.image_size == 224
    with torch.no_grad():
        assert model.encode_image(torch.rand(1, 3, 224, 224)).shape == (1, 512)
        assert torch.allclose(model.encode_text(["a photo"]), clip.encode_text(open_clip.get_tokenizer("ViT-B-32")(["a photo"])), atol=1e-5)
    legacy = tmp_path / "vit-b-32.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in clip.state_dict().items()}}, legacy)
    assert load_model(f"open_clip:ViT-B-32@{legacy}").image_size == 224


@pytest.mark.parametrize("spec, message", [
    ("", "empty"),
    ("vit-xyz", "unknown model kind 'vit-xyz'"),
    ("open_clip", "needs an architecture name"),
    ("open_clip:ViT-Q-99@/nonexistent.pt", "does not exist"),
    ("tiny-clip:large", "takes no ':NAME' part"),
])
def test_bad_model_specs_are_refused_with_a_clear_message(spec, message):
    with pytest.raises(UserError, match=message):
        load_model(spec)


def test_unknown_open_clip_architecture_lists_valid_ones(tmp_path):
    path = tmp_path / "w.safetensors"
    save_file({"x": torch.zeros(1)}, str(path))
    with pytest.raises(UserError, match="unknown open_clip architecture 'ViT-Q-99'.*ViT-B-16"):
        load_model(f"open_clip:ViT-Q-99@{path}")


def test_weights_that_do_not_match_the_architecture_name_the_keys(tmp_path):
    state = build_tiny_clip().state_dict()
    state.pop("visual.proj")
    state["visual.extra_head"] = torch.zeros(3)
    path = tmp_path / "bad.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    with pytest.raises(UserError, match=r"1 missing \(e.g. visual.proj\).*1 unexpected \(e.g. visual.extra_head\)"):
        load_model(f"tiny-clip@{path}")


def test_a_corrupt_weights_file_is_refused(tmp_path):
    path = tmp_path / "corrupt.safetensors"
    path.write_bytes(b"not a safetensors file at all")
    with pytest.raises(UserError, match="not a valid safetensors file"):
        load_model(f"tiny-clip@{path}")


class Payload:
    """Stands for any pickled object a downloaded file could carry."""


def test_a_pickled_object_is_never_unpickled(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": Payload()}, path)
    with pytest.raises(UserError, match="weights_only=True"):
        load_model(f"tiny-clip@{path}")


def test_spec_round_trips():
    assert str(parse_model_spec("tiny-clip")) == "tiny-clip"
