"""load_for_inference: the one loader of training checkpoints (explain and evaluate use it)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

from ctcdam.manifest.schema import read_crop, read_manifest
from ctcdam.data.transforms import to_model_input
from ctcdam.data.views import VIEWS, view_slice
from ctcdam.models.checkpoint import CheckpointError, load_for_inference
from ctcdam.targets import BIOMARKERS, TARGETS


def test_loads_an_eval_mode_vit_with_config_scaler_and_split(tiny_checkpoint: Path, blob_manifest: Path):
    loaded = load_for_inference(tiny_checkpoint)
    assert isinstance(loaded.model, VisionTransformer) and not loaded.model.training
    assert loaded.path == tiny_checkpoint
    assert loaded.model(torch.zeros(2, 3, 32, 32)).shape == (2, len(TARGETS))
    cfg = loaded.config
    assert cfg["backbone"] == "vit_tiny_patch16_224" and cfg["img_size"] == 32
    assert cfg["window"] == [-1000.0, 400.0] and cfg["views"] == list(VIEWS)
    assert cfg["crop_shape"] == [16, 16, 16] and cfg["spacing_mm"] == [1.0, 1.0, 1.0] and cfg["crop_mm"] == [16.0] * 3
    assert loaded.scaler.names == BIOMARKERS
    data = loaded.data
    assert data["lidc_root"] is None and data["fold"] == 0 and data["manifest"] == str(blob_manifest.resolve())
    parts = [set(data[k]) for k in ("train_ids", "val_ids", "test_ids")]
    assert not (parts[0] & parts[1]) and not (parts[0] & parts[2]) and not (parts[1] & parts[2])
    assert set().union(*parts) == set(read_manifest(blob_manifest)["nodule_id"])
    # the scaler was fitted on the training rows only
    frame = read_manifest(blob_manifest).set_index("nodule_id")
    train_diameter = frame.loc[data["train_ids"], "diameter_mm"].to_numpy()
    assert loaded.scaler.mean[BIOMARKERS.index("diameter")] == pytest.approx(train_diameter.mean())
    assert loaded.versions["torch"] == torch.__version__.split("+")[0] or loaded.versions["torch"].startswith(
        torch.__version__.split("+")[0]
    )


def test_predict_averages_the_three_central_views_and_destandardises(tiny_checkpoint: Path, blob_manifest: Path):
    loaded = load_for_inference(tiny_checkpoint)
    frame = read_manifest(blob_manifest)
    crops = np.stack([read_crop(f)[0] for f in frame["image_file"][:3]])
    out = loaded.predict(crops)
    assert out["raw"].shape == (3, len(TARGETS))
    # by hand: the model on the three central slices, averaged
    c = crops[1]
    slices = [view_slice(c, "axial", 8), view_slice(c, "coronal", 8), view_slice(c, "sagittal", 8)]
    with torch.no_grad():
        manual = loaded.model(to_model_input(np.stack(slices), loaded.config)).mean(0).numpy()
    np.testing.assert_allclose(out["raw"][1], manual, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out["malignancy"], 1 / (1 + np.exp(-out["raw"][:, 0])), rtol=1e-6)
    d = BIOMARKERS.index("diameter")
    expected = out["raw"][:, 1 + d] * loaded.scaler.std[d] + loaded.scaler.mean[d]
    np.testing.assert_allclose(out["diameter"], expected, rtol=1e-6)
    single = loaded.predict(crops[1])
    np.testing.assert_allclose(single["raw"][0], out["raw"][1], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match=r"crops of shape \(32, 32, 32\) do not match the training crops \(16, 16, 16\)"):
        loaded.predict(np.zeros((32, 32, 32)))


def test_missing_file_is_named(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="nope.ckpt does not exist"):
        load_for_inference(tmp_path / "nope.ckpt")


def _edited(tiny_checkpoint: Path, tmp_path: Path, edit) -> Path:
    checkpoint = torch.load(tiny_checkpoint, weights_only=True)
    edit(checkpoint)
    path = tmp_path / "edited.ckpt"
    torch.save(checkpoint, path)
    return path


def test_missing_keys_are_named(tiny_checkpoint: Path, tmp_path: Path):
    path = _edited(tiny_checkpoint, tmp_path, lambda c: c["ctcdam"]["config"].pop("img_size"))
    with pytest.raises(CheckpointError, match=r"lacks the key ctcdam\.config\.img_size"):
        load_for_inference(path)
    path = _edited(tiny_checkpoint, tmp_path, lambda c: c["ctcdam"]["data"].pop("test_ids"))
    with pytest.raises(CheckpointError, match=r"ctcdam\.data\.test_ids"):
        load_for_inference(path)
    path = _edited(tiny_checkpoint, tmp_path, lambda c: c.pop("ctcdam"))
    with pytest.raises(CheckpointError, match="no 'ctcdam' entry"):
        load_for_inference(path)


def test_checkpoint_from_another_configuration_is_named(tiny_checkpoint: Path, tmp_path: Path):
    # weights of a 2-block ViT under a config that says 3 blocks
    path = _edited(tiny_checkpoint, tmp_path, lambda c: c["ctcdam"]["config"]["model_kwargs"].update(depth=3))
    with pytest.raises(CheckpointError, match=r"another configuration.*blocks\.2\."):
        load_for_inference(path)
    # a caller that relies on a setting the checkpoint does not have
    with pytest.raises(CheckpointError, match=r"ctcdam\.config\.img_size is 32, the configuration asks for 224"):
        load_for_inference(tiny_checkpoint, expected={"img_size": 224})
    assert load_for_inference(tiny_checkpoint, expected={"img_size": 32, "window": (-1000, 400)}).config["img_size"] == 32


def test_a_foreign_file_is_a_clear_error(tmp_path: Path):
    path = tmp_path / "foreign.ckpt"
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot be read"):
        load_for_inference(path)


class _CreatesAFileWhenUnpickled:
    """A pickle payload that runs code on load: unpickling calls open(path, "w"), which creates the file."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))


def test_a_checkpoint_whose_pickle_would_run_code_is_refused_and_runs_nothing(tiny_checkpoint: Path, tmp_path: Path):
    evidence = tmp_path / "created-by-the-pickle.txt"
    checkpoint = torch.load(tiny_checkpoint, weights_only=True)
    checkpoint["ctcdam"]["payload"] = _CreatesAFileWhenUnpickled(evidence)
    malicious = tmp_path / "malicious.ckpt"
    torch.save(checkpoint, malicious)
    assert not evidence.exists()
    with pytest.raises(CheckpointError, match=r"malicious\.ckpt was refused: its pickle would run code") as error:
        load_for_inference(malicious)
    assert "it asks for io.open" in str(error.value) and "\n" not in str(error.value)
    assert not evidence.exists()  # the payload never ran
    # The same payload does run under a plain pickle load: the test file really is hostile.
    torch.load(malicious, weights_only=False)
    assert evidence.exists()
