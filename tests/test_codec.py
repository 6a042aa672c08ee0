"""The latent codec (dcgen/codec.py): AutoencoderKL and AutoencoderDC through one class, the
scale read from the model, per-channel normalisation, loading only through the exact table."""
import json

import pytest
import torch

from dcgen.codec import VAECodec, channel_statistics, tiny_autoencoder_dc, tiny_autoencoder_kl


def test_a_dc_ae_is_deterministic_and_its_shape_comes_from_its_config():
    codec = VAECodec(tiny_autoencoder_dc(), scale=None)
    assert (codec.kind, codec.latent_channels, codec.downsample, codec.scale) == ("AutoencoderDC", 8, 4, 0.5)
    x = torch.rand(3, 3, 16, 16) * 2 - 1
    mean, logvar = codec.encode_moments(x)
    assert mean.shape == (3, 8, 4, 4) and torch.isinf(logvar).all() and (logvar < 0).all()
    z = codec.sample(mean, logvar, torch.Generator().manual_seed(0))
    assert torch.equal(z, mean * 0.5)  # no noise: the posterior is a point
    assert codec.decode(z).shape == (3, 3, 16, 16)
    kl = VAECodec(tiny_autoencoder_kl(), scale=None)  # the KL's own scaling_factor (diffusers' default 0.18215)
    assert (kl.kind, kl.downsample, kl.latent_channels) == ("AutoencoderKL", 8, 4)
    assert kl.scale == pytest.approx(kl.vae.config.scaling_factor)


def test_per_channel_statistics_normalise_every_channel():
    torch.manual_seed(0)
    raw = torch.randn(64, 4, 5, 5) * torch.tensor([1.0, 3.0, 0.2, 7.0]).view(1, 4, 1, 1) \
        + torch.tensor([0.5, -2.0, 10.0, 0.0]).view(1, 4, 1, 1)
    mean, std = channel_statistics(raw.split(7))  # streamed in uneven batches
    flat = raw.transpose(0, 1).reshape(4, -1).double()
    assert torch.allclose(mean.double(), flat.mean(1), atol=1e-5) and torch.allclose(std.double(), flat.std(1), atol=1e-5)
    codec = VAECodec(tiny_autoencoder_kl(), latent_mean=mean, latent_std=std)
    z = codec.to_model(raw)
    per = z.transpose(0, 1).reshape(4, -1)
    assert torch.allclose(per.mean(1), torch.zeros(4), atol=1e-5) and torch.allclose(per.std(1), torch.ones(4), atol=1e-4)
    assert torch.allclose(codec.from_model(z), raw, atol=1e-5)
    assert codec.info()["latent_std"] == pytest.approx(std.tolist())
    with pytest.raises(ValueError, match="latent channels"):
        VAECodec(tiny_autoencoder_kl(), latent_mean=[0.0] * 3, latent_std=[1.0] * 3)
    with pytest.raises(ValueError, match="std"):
        VAECodec(tiny_autoencoder_kl(), latent_mean=[0.0] * 4, latent_std=[1.0, 0.0, 1.0, 1.0])


def test_a_saved_codec_loads_by_its_declared_class_only(tmp_path):
    tiny_autoencoder_dc().save_pretrained(tmp_path / "dc")
    assert VAECodec(tmp_path / "dc", scale=None).kind == "AutoencoderDC"
    with pytest.raises(ValueError, match="expected one of"):
        VAECodec(tmp_path / "dc", kind="kl")
    cfg = tmp_path / "dc" / "config.json"
    data = json.loads(cfg.read_text())
    cfg.write_text(json.dumps({**data, "_class_name": "UNet2DConditionModel"}))
    with pytest.raises(ValueError, match="UNet2DConditionModel"):
        VAECodec(tmp_path / "dc")
    with pytest.raises(ValueError, match="not one of"):
        VAECodec(torch.nn.Linear(2, 2))
