import pytest

from laplacedrl import config as C
from laplacedrl.errors import UserError


def test_defaults_then_dataset_yaml_then_file_then_flags(tmp_path):
    ds_dir = tmp_path / "ssl"
    ds_dir.mkdir()
    (ds_dir / "digits.yaml").write_text("labels: 40\nepochs: 7\nlr: 0.1\n")
    user = tmp_path / "mine.yaml"
    user.write_text("epochs: 9\nmixup: true\n")
    cfg = C.resolve(C.SSLConfig, {"config": str(user), "lr": "0.5"}, config_dir=tmp_path)
    assert cfg.labels == 40          # dataset yaml beats the default
    assert cfg.epochs == 9           # --config beats the dataset yaml
    assert cfg.mixup is True
    assert cfg.lr == 0.5             # a flag beats everything
    assert cfg.batch_size == 100     # untouched default


def test_cli_flags_parse_types_and_booleans():
    cfg = C.parse(C.SSLConfig, ["--labels", "20", "--no-nesterov", "--mixup", "--knn-backend", "torch"])
    assert (cfg.labels, cfg.nesterov, cfg.mixup, cfg.knn_backend) == (20, False, True, "torch")
    drl = C.parse(C.DRLConfig, ["--ch-mult", "1,2", "--t-sampling", "fixed:0.3", "--sde", "vp"])
    assert drl.ch_mult == (1, 2) and drl.t_sampling == "fixed:0.3" and drl.sde == "vp"


@pytest.mark.parametrize("text, msg", [
    ("labelz: 3\n", "unknown key(s) labelz"),
    ("labels: many\n", "labels must be an integer"),
    ("mixup: maybe\n", "mixup must be true or false"),
    ("knn_backend: gpu\n", "'gpu' is not one of"),
    ("- a\n- b\n", "must be a mapping"),
    ("a: [\n", "not valid YAML"),
])
def test_bad_yaml_is_a_user_error_naming_the_problem(tmp_path, text, msg):
    f = tmp_path / "bad.yaml"
    f.write_text(text)
    with pytest.raises(UserError, match=None) as e:
        C.resolve(C.SSLConfig, {"config": str(f)})
    assert msg in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("flags, msg", [
    ({"t_init": "1.5"}, "--t-init"),
    ({"labeled_batch_size": "100"}, "--labeled-batch-size"),
    ({"t_search": "true"}, "--t-search needs --init"),
    ({"resume": "true", "fresh": "true"}, "contradict"),
    ({"config": "/no/such.yaml"}, "cannot read config file"),
])
def test_impossible_values_are_refused(flags, msg):
    with pytest.raises(UserError, match=msg.replace("(", r"\(")):
        C.resolve(C.SSLConfig, flags)


def test_drl_t_sampling_is_validated():
    for bad in ("fixed:2", "fixed:x", "sometimes"):
        with pytest.raises(UserError, match="--t-sampling"):
            C.resolve(C.DRLConfig, {"t_sampling": bad})
    assert C.resolve(C.DRLConfig, {"t_sampling": "high-noise", "sde": "vp"}).sde == "vp"


def test_round_trip_and_diff():
    cfg = C.parse(C.DRLConfig, ["--ch-mult", "1,2,2"])
    d = C.to_dict(cfg)
    assert d["ch_mult"] == [1, 2, 2]
    assert C.from_dict(C.DRLConfig, d) == cfg
    other = dict(d, lr=1.0, device="cuda")
    assert C.config_diff(d, other) == ["lr"]   # device is run-neutral


def test_argparse_errors_are_one_line_user_errors(capsys):
    """Usage only with --help: an unknown flag, a bad choice or a missing value is one line."""
    for argv, text in ((["--labelz", "3"], "unrecognized arguments: --labelz 3"),
                       (["--knn-backend", "gpu"], "invalid choice: 'gpu'"),
                       (["--labels"], "expected one argument")):
        with pytest.raises(UserError, match=text):
            C.parse(C.SSLConfig, argv)
    assert capsys.readouterr().err == ""
