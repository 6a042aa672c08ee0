"""One description per model, one builder; the Hugging Face layout; exports from before the
change; Hub ids and `dcgen export` (the network replaced by local stand-ins, never reached)."""
import inspect
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

import dcgen
from dcgen.models import DCDiT, DiT, build, describe

ROOT = Path(__file__).resolve().parents[1]
TOY = ["task=toy", "task.grid=[8,8]", "task.num_samples=32", "model=dcdit_debug",
       "train.global_batch_size=8", "train.sample_every=0", "train.log_with=none", "dc.ratio_group_size=4"]


def tiny():
    torch.manual_seed(0)
    m = DCDiT(input_size=(8, 8), in_channels=3, num_classes=4, hidden_size=32, depth=1, num_heads=2,
              norm_groups=8)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return m.eval()


class BuildSpy:
    """Records, for every DCDiT / DiT constructed, whether dcgen.models.build was on the stack."""

    def __init__(self, monkeypatch):
        self.calls = []
        for cls in (DCDiT, DiT):
            orig = cls.__init__

            def init(model, *a, _orig=orig, **k):
                frames = inspect.stack(context=0)
                self.calls.append(any(f.function == "build" and f.filename.endswith(
                    os.path.join("dcgen", "models", "__init__.py")) for f in frames))
                _orig(model, *a, **k)
            monkeypatch.setattr(cls, "__init__", init)


def test_train_load_convert_and_upcycle_build_through_one_function(tmp_path, monkeypatch):
    from dcgen.cli import compose
    from dcgen.compat.convert import convert_amd_dcdit, convert_dit
    from dcgen.compat.upcycle import load_dit_teacher
    from dcgen.train import train
    sys.path.insert(0, str(ROOT / "tests"))
    from test_convert import dit_layout, mae_pos_table, random_state, save_reference_ckpt, tiny_reference_state

    spy = BuildSpy(monkeypatch)
    rd = tmp_path / "run"
    train(compose("train", [*TOY, "train.max_steps=1", f"run_dir={rd}"]))  # the model and its EMA copy
    assert spy.calls, "training built no model"
    dcgen.load_model(rd)
    ref = save_reference_ckpt(tmp_path / "r.pt", tiny_reference_state())
    convert_amd_dcdit(ref)
    sd = random_state(dit_layout(64, 1, num_classes=10), seed=1)
    sd["pos_embed"] = torch.from_numpy(mae_pos_table(64, 16))[None]
    torch.save(sd, tmp_path / "dit.pt")
    convert_dit(tmp_path / "dit.pt", num_heads=4)
    load_dit_teacher(str(tmp_path / "dit.pt"), num_heads=4)  # upcycling's teacher
    n = len(spy.calls)
    assert n >= 5 and all(spy.calls), spy.calls


def test_no_second_schema_left_in_the_package():
    for path in (ROOT / "dcgen").rglob("*.py"):
        text = path.read_text()
        for word in ("ARCHS", "SIZES", "preset(", "locals()", "build_model(arch"):
            assert word not in text, (path, word)


def test_hub_layout_round_trip_is_bit_exact(tmp_path):
    m = tiny()
    out = dcgen.export_model(m, tmp_path / "exp", {"step": 3})
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "dcgen.json", "model.safetensors"]
    cfg = json.loads((out / "config.json").read_text())
    assert cfg == describe(m) and cfg["_target_"] == "dcgen.models.DCDiT"
    back = dcgen.load_model(out)
    a, b = m.state_dict(), back.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # the mixin's own loader reads the same directory (extra keys such as _target_ are ignored)
    again = DCDiT.from_pretrained(str(out))
    assert all(torch.equal(a[k], again.state_dict()[k]) for k in a)
    x = torch.randn(2, 3, 8, 8)
    t, y = torch.tensor([3, 700]), torch.tensor([0, 2])
    with torch.no_grad():
        assert torch.equal(m(x, t, y)[0], back(x, t, y)[0])


def test_an_export_from_before_the_change_still_loads():
    """tests/data/legacy_export was written by the previous layout (config.yaml, model: {arch:})."""
    old = ROOT / "tests" / "data" / "legacy_export"
    assert yaml.safe_load((old / "config.yaml").read_text())["model"]["arch"] == "dcdit"
    cfg = dcgen.io.read_export_config(old)
    assert cfg["model"]["_target_"] == "dcgen.models.DCDiT" and "arch" not in cfg["model"]
    assert cfg["task"]["_target_"].endswith("ToyTask")
    model = dcgen.load_model(old)
    ref = load_file(str(ROOT / "tests" / "data" / "legacy_export_reference.safetensors"))
    with torch.no_grad():
        out, _ = model(ref["x"], torch.tensor([10, 500]), torch.tensor([1, 3]))
    assert torch.allclose(out, ref["out"], atol=1e-6)


def test_one_schema_in_run_dir_export_and_converter_output(tmp_path):
    from dcgen.cli import compose
    from dcgen.compat.convert import convert_amd_dcdit
    from dcgen.train import train
    sys.path.insert(0, str(ROOT / "tests"))
    from test_convert import save_reference_ckpt, tiny_reference_state
    rd = tmp_path / "run"
    train(compose("train", [*TOY, "train.max_steps=1", f"run_dir={rd}"]))
    run_node = yaml.safe_load((rd / "config.yaml").read_text())["model"]
    export_node = json.loads((rd / "export" / "config.json").read_text())
    model, extra = convert_amd_dcdit(save_reference_ckpt(tmp_path / "r.pt", tiny_reference_state()))
    conv = dcgen.export_model(model, tmp_path / "conv", extra)
    conv_node = json.loads((conv / "config.json").read_text())
    for node in (run_node, export_node, conv_node):
        assert node["_target_"] == "dcgen.models.DCDiT"
    # the run's node states what the config chose (the task fills the shape); the export's is
    # every constructor argument, resolved
    assert set(run_node) < set(export_node)
    assert build(export_node).config == export_node_without_target(export_node)
    assert build(conv_node).config == export_node_without_target(conv_node)
    filled = build(run_node, input_size=[8, 8], in_channels=3, num_classes=4)
    assert describe(filled) == export_node


def export_node_without_target(node):
    return {k: v for k, v in node.items() if k != "_target_"}


def test_hub_id_loads_through_snapshot_download(tmp_path, monkeypatch):
    import huggingface_hub
    m = tiny()
    local = dcgen.export_model(m, tmp_path / "hub_copy")
    asked = {}

    def fake_snapshot_download(repo_id, allow_patterns=None, **kw):  # stands in for the network
        asked.update(repo_id=repo_id, allow_patterns=allow_patterns)
        return str(local)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    monkeypatch.chdir(tmp_path)
    loaded = dcgen.load_model("someone/tiny-dcdit")
    assert asked["repo_id"] == "someone/tiny-dcdit"
    assert set(asked["allow_patterns"]) == {"config.json", "model.safetensors", "dcgen.json"}
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in m.state_dict().items())

    def offline(*a, **k):
        raise OSError("no network")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(FileNotFoundError, match="someone/other.*Hub download failed.*no network"):
        dcgen.load_model("someone/other")


def test_dcgen_export_writes_the_hub_layout_and_pushes(tmp_path, monkeypatch, capsys):
    import huggingface_hub
    from dcgen.cli import main
    rd = tmp_path / "run"
    p = subprocess.run([sys.executable, "-m", "dcgen", "train", *TOY, "train.max_steps=1", f"run_dir={rd}"],
                       capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    uploads = []

    class FakeApi:  # stands in for the Hub: records what would be sent
        def __init__(self, token=None):
            pass

        def create_repo(self, repo_id, private=False, exist_ok=False):
            uploads.append(("create", repo_id, private))

        def upload_folder(self, repo_id, folder_path, allow_patterns=None, commit_message=None):
            uploads.append(("upload", repo_id, sorted(os.listdir(folder_path))))
            return type("Info", (), {"commit_url": f"https://hub/{repo_id}/commit/1"})()
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    out = tmp_path / "exp"
    assert main(["export", f"run_dir={rd}", f"out_dir={out}", "push_to_hub=me/digits-dcdit"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "dcgen.json", "model.safetensors"]
    assert json.loads((out / "dcgen.json").read_text())["task"]["_target_"].endswith("ToyTask")
    assert uploads == [("create", "me/digits-dcdit", False),
                       ("upload", "me/digits-dcdit", ["config.json", "dcgen.json", "model.safetensors"])]
    a, b = dcgen.load_model(rd).state_dict(), dcgen.load_model(out).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    capsys.readouterr()
    assert main(["export", f"run_dir={rd}"]) == 2
    assert "out_dir" in capsys.readouterr().err


def test_label_dropout_is_one_knob(tmp_path, monkeypatch):
    """The model has no label dropout of its own (a training-mode forward uses the labels it is
    given); the loop's train.label_dropout is the knob, and old descriptions that carry
    class_dropout_prob still build."""
    m = tiny().train()
    x, t = torch.randn(64, 3, 8, 8), torch.full((64,), 500)
    y = torch.randint(0, 4, (64,))
    with torch.no_grad():
        a, _ = m(x, t, y)
        b, _ = m(x, t, y)
    assert torch.equal(a, b)  # no random label replacement inside the model
    assert "class_dropout_prob" not in inspect.signature(DCDiT.__init__).parameters
    node = {**describe(m), "class_dropout_prob": 0.1}
    assert build(node).config == m.config
    # the loop's knob: with label_dropout 1 every label the model sees is the null label
    from dcgen.cli import compose
    from dcgen.diffusion import GaussianDiffusion
    from dcgen.train import train
    seen = []
    orig = GaussianDiffusion.training_losses

    def spy(self, model, x0, y=None, **k):
        seen.append(y.clone())
        return orig(self, model, x0, y, **k)
    monkeypatch.setattr(GaussianDiffusion, "training_losses", spy)
    train(compose("train", [*TOY, "train.max_steps=1", "train.label_dropout=1.0", f"run_dir={tmp_path / 'r'}"]))
    assert seen and all(bool((s == 4).all()) for s in seen)  # toy task: 4 classes, null = 4
