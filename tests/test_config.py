import dataclasses

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


@pytest.mark.parametrize("cls", [C.SSLConfig, C.DRLConfig])
def test_help_shows_every_flag_under_its_named_group(cls):
    parser = C.build_parser(cls, "x", "")
    titles = {g.title: g for g in parser._action_groups}
    for f in dataclasses.fields(cls):
        group = titles[f.metadata["group"]]
        assert any(a.dest == f.name for a in group._group_actions), f"--{f.name} not under {group.title}"
    text = parser.format_help()
    assert all(f"\n{name}:\n" in text for name in {f.metadata["group"] for f in dataclasses.fields(cls)})
    assert ("\nDRL:\n" in text) == (cls is C.DRLConfig) and ("\nLaplaceNet:\n" in text) == (cls is C.SSLConfig)


def test_a_field_without_a_known_group_is_refused():
    with pytest.raises(ValueError, match="'hand-off' is not one of"):
        C.opt(1.0, "a multiplier", group="hand-off")
    with pytest.raises(TypeError):
        C.opt(1.0, "a multiplier")      # no group: every field must say where its flag is shown


def test_run_neutral_fields_are_the_ones_marked_neutral():
    marked = {f.name for cls in (C.SSLConfig, C.DRLConfig) for f in dataclasses.fields(cls) if f.metadata["neutral"]}
    assert C.RUN_NEUTRAL == marked
    # what may differ between a run and its resumption, as before the marks were fields' metadata
    assert marked == {"out", "device", "num_workers", "progress", "resume", "fresh", "config", "download",
                      "data_dir", "eval_batch_size", "sample", "sampler", "sample_steps", "log_every",
                      "ckpt_every", "channels_last", "compile", "augment_on", "print_config", "eval_every",
                      "snapshot_every", "snapshot_epochs",
                      "passes", "warmup_fraction"}     # these two only set iters and warmup, which are compared
    assert C.config_diff({"lr": 1, "seed": 0, "num_workers": 0}, {"lr": 1, "seed": 1, "num_workers": 4}) == ["seed"]


@pytest.mark.parametrize("tool", ["probe", "evaluate", "sample", "reproduce", "demo_images"])
def test_the_secondary_tools_share_the_config_flags(tool, capsys, monkeypatch):
    """Their --data-dir, --batch-size, --num-workers, --device and --seed have the config's help, and
    the config's default unless the tool starts from its checkpoint's."""
    import importlib
    monkeypatch.setenv("COLUMNS", "1000")                  # no wrapping inside a help text
    module = importlib.import_module(f"laplacedrl.{tool}")
    with pytest.raises(SystemExit):
        module.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    fields = {f.name: f for f in dataclasses.fields(C.CommonConfig)}
    shared = [n for n in ("data_dir", "batch_size", "num_workers", "device", "seed") if f"--{n.replace('_', '-')} " in text]
    assert shared, tool
    for name in shared:
        help_text = " ".join(fields[name].metadata["help"].split())
        assert help_text in text, f"{tool} --{name}"
        if name != "data_dir":
            assert f"{help_text} (default: {fields[name].default})" in text
