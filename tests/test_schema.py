"""One typed config (dcgen/schema.py): a key declared once reaches --help, validation and the
stored run config with no other edit, and docs/configs.md's key tables are the schema's."""
import dataclasses
from pathlib import Path

import pytest
from omegaconf import OmegaConf

import dcgen.schema as S
from dcgen.cli import command_help, compose
from dcgen.validate import ConfigError, int_, validate

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def probe_key(monkeypatch):
    """Train gains `probe_every: int = 7` (rule: an integer >= 0), declared in one place."""
    Probe = dataclasses.make_dataclass(
        "Train", [("probe_every", int, S.key(7, int_(0), "a key added by the test"))], bases=(S.Train,))
    Root = dataclasses.make_dataclass(
        "TrainConfig", [("train", Probe, S.node(Probe, "the training loop"))], bases=(S.TrainConfig,))
    monkeypatch.setattr(S, "TrainConfig", Root)
    yield
    monkeypatch.undo()
    S.register()  # the ConfigStore holds the real schema again


def test_a_key_added_to_one_schema_class_reaches_help_validation_and_the_run_config(probe_key, tmp_path):
    help_text = command_help("train")
    assert "train.probe_every=7" in help_text and "a key added by the test" in help_text
    with pytest.raises(ConfigError, match=r"^train\.probe_every='abc': expected an integer >= 0$"):
        compose("train", ["train.probe_every=abc"])  # the type, refused with the key named
    with pytest.raises(ConfigError, match=r"^train\.probe_every=-1: expected an integer >= 0$"):
        validate("train", compose("train", ["train.probe_every=-1"]))  # the rule
    from dcgen.train import train
    rd = tmp_path / "run"
    cfg = compose("train", ["task=toy", "task.grid=[4,4]", "task.num_samples=8", "model=dcdit_debug",
                            "train.max_steps=1", "train.global_batch_size=4", "train.sample_every=0",
                            "train.log_with=none", "dc.ratio_group_size=4", "train.probe_every=3",
                            f"run_dir={rd}"], record_choices=True)
    train(cfg)
    assert OmegaConf.load(rd / "config.yaml").train.probe_every == 3


def test_every_schema_key_has_a_rule_or_is_free_text_and_a_help():
    for command in S.SCHEMAS:
        for k, f in S.fields(command).items():
            assert f.metadata.get("help"), (command, k)


def test_validation_rules_come_from_the_schema():
    assert S.rules("train")["train.max_steps"].check(1) and not S.rules("train")["train.max_steps"].check(0)
    assert "sample.tail_drop" in S.rules("train") and "tail_drop" in S.rules("sample")


def test_docs_configs_md_holds_the_schema_tables():
    text = (ROOT / "docs" / "configs.md").read_text()
    assert S.docs_section(text) == S.markdown(), "docs/configs.md is stale: run `python -m dcgen.schema`"


def test_the_yaml_files_do_not_restate_schema_defaults():
    """A default lives in the schema only: the command YAMLs hold the defaults list (and the
    nodes the schema does not type: optim's lr, evaluate's task keyword arguments)."""
    for command in S.SCHEMAS:
        data = OmegaConf.to_container(OmegaConf.load(ROOT / "configs" / f"{command}.yaml"))
        assert data["defaults"][0] == f"schema_{command}"
        typed = {k.split(".")[0] for k in S.fields(command)} - {"task", "model", "objective", "optim", "evaluate"}
        assert not typed & set(data), (command, typed & set(data))


def test_keys_the_docs_cite_exist():
    """Every `model.<arg>=`, `train.<key>=` or `dc.<key>=` the docs cite is a constructor argument
    of a dcgen model or a key of the train schema (method.md once cited `model.compat.*` keys
    that never existed)."""
    import inspect
    import re

    from dcgen.models import DCDiT, DiT
    params = set(inspect.signature(DCDiT.__init__).parameters) | set(inspect.signature(DiT.__init__).parameters)
    keys = set(S.fields("train"))
    bad = []
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for kind, name in re.findall(r"`(model|train|dc)\.([\w.]+)=", doc.read_text()):
            if name == "max_stepz":
                continue  # the README's example of a misspelt key
            if (kind == "model" and name not in params) or (kind != "model" and f"{kind}.{name}" not in keys):
                bad.append(f"{doc.name}: {kind}.{name}")
    assert not bad, bad
