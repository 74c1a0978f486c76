import pytest
import yaml

from htcl.config import Config, ConfigError, config_from_dict, load_config, save_config


def test_defaults_are_the_paper_sizes():
    cfg = Config()
    assert (cfg.model.n_layers, cfg.model.d_model, cfg.model.n_heads) == (12, 768, 12)
    assert cfg.audio.max_seconds == 120.0
    assert (cfg.pretrain.batch_size, cfg.pretrain.lr) == (800, 1e-3)
    assert (cfg.finetune.batch_size, cfg.finetune.lr, cfg.finetune.text_lr) == (240, 1e-4, 3e-5)


def test_yaml_and_dotted_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("model:\n  n_layers: 4\npretrain:\n  lr: 0.01\n")
    cfg = load_config(p, ["model.n_layers=2", "model.conv_kernels=[7,3,3]", "finetune.use_gpu=true"])
    assert cfg.model.n_layers == 2
    assert cfg.model.conv_kernels == (7, 3, 3)
    assert cfg.pretrain.lr == 0.01
    assert cfg.finetune.use_gpu is True
    assert cfg.finetune.lr == 1e-4  # untouched section keeps its stage-2 default


def test_saved_config_round_trips(tmp_path):
    cfg = config_from_dict({}, ["model.text_model=/x/bert", "audio.max_seconds=30"])
    path = save_config(cfg, tmp_path / "config.yaml")
    assert load_config(path) == cfg
    assert yaml.safe_load(path.read_text())["model"]["conv_strides"] == [2, 2, 2]


@pytest.mark.parametrize(
    "override, needle",
    [
        ("model.n_layer=3", "model.n_layer"),
        ("modle.n_layers=3", "modle"),
        ("model.n_layers=three", "model.n_layers"),
        ("model.n_layers", "key.path=value"),
    ],
)
def test_bad_keys_and_values_are_named(override, needle):
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.")):
        config_from_dict({}, [override])


def test_missing_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="nope.yaml"):
        load_config(tmp_path / "nope.yaml")


def test_repo_configs_load():
    from conftest import REPO

    paper = load_config(REPO / "configs" / "paper.yaml")
    demo = load_config(REPO / "configs" / "demo.yaml")
    assert paper.model.n_layers == 12 and paper.model.d_model == 768 and paper.audio.max_seconds == 120
    assert demo.model.d_model < paper.model.d_model
