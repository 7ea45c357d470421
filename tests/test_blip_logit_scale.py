"""BLIP's logit scale is its ITC ``1 / temp`` from the checkpoint folder, not a fixed 100 (issue 14, defect 8).

It feeds TeCoA's cross-entropy, ``apgd-ce`` and VLP-attack's temperature. Tiny
random-initialised BLIP folders, written as ``save_pretrained`` writes them.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import BlipForImageTextRetrieval

from test_real_models import write_blip_dir
from trainables.errors import UserError
from trainables.models import load_model


def set_config_temperature(folder, temp: float) -> None:
    config = json.loads((folder / "config.json").read_text())
    config["logit_scale_init_value"] = math.log(1 / temp)
    (folder / "config.json").write_text(json.dumps(config))


def store_temp(folder, temp: torch.Tensor, file_format: str = "safetensors") -> None:
    """Add BLIP's ``temp`` parameter to the weight file, as a folder written from BLIP_Retrieval would hold it."""
    source = folder / "model.safetensors"
    weights = load_file(str(source)) if source.is_file() else torch.load(folder / "pytorch_model.bin", weights_only=True)
    if file_format == "safetensors":
        save_file({**weights, "temp": temp}, str(source), metadata={"format": "pt"})
    else:  # save_pretrained(safe_serialization=False)'s file
        torch.save({**weights, "temp": temp}, folder / "pytorch_model.bin")
        source.unlink(missing_ok=True)


def test_the_config_temperature_gives_the_logit_scale_when_the_weights_hold_none(tmp_path):
    folder = write_blip_dir(tmp_path / "blip", BlipForImageTextRetrieval)
    assert load_model(f"hf-blip-itr:{folder}").logit_scale == pytest.approx(1 / 0.07, rel=1e-4)  # transformers' default config
    set_config_temperature(folder, 0.05)
    assert load_model(f"hf-blip-itr:{folder}").logit_scale == pytest.approx(20.0, rel=1e-4)


@pytest.mark.parametrize("file_format", ["safetensors", "bin"])
def test_a_stored_temp_wins_and_is_clamped_as_blip_does(tmp_path, file_format):
    folder = write_blip_dir(tmp_path / "blip", BlipForImageTextRetrieval)
    set_config_temperature(folder, 0.05)
    store_temp(folder, torch.tensor(0.04), file_format)
    model = load_model(f"hf-blip-itr:{folder}")
    assert model.logit_scale == pytest.approx(25.0, rel=1e-4)
    store_temp(folder, torch.tensor(1e-5), file_format)  # below BLIP's clamp [0.001, 0.5]
    assert load_model(f"hf-blip-itr:{folder}").logit_scale == pytest.approx(1000.0, rel=1e-4)


def test_a_temp_that_is_not_one_positive_number_is_refused(tmp_path):
    folder = write_blip_dir(tmp_path / "blip", BlipForImageTextRetrieval)
    store_temp(folder, torch.tensor([0.07, 0.07]))
    with pytest.raises(UserError, match=r"'temp' in the weights of .* is \[0.07.*, 0.07.*\], not one positive number"):
        load_model(f"hf-blip-itr:{folder}")
