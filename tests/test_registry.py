"""The dataset registry: each built-in dataset written once, and a new dataset added through the
registry alone (a few generated images, no file of the package changed) that train_ssl.py runs."""
import numpy as np
import pytest
import yaml

import train_ssl
from conftest import TINY_SSL, run_cli, tiny
from laplacedrl import choices, registry
from laplacedrl.config import package_configs
from laplacedrl.errors import UserError
from laplacedrl.images import ArrayImageSet, DatasetSpec

TOY_SPEC = DatasetSpec("toy", 3, 3, 8, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), crop_pad=1, hflip=True)


def load_toy(name, data_dir, download=False, check=False, skip_bad=False):
    """60 training and 30 test 8x8 RGB images of 3 classes: noise, plus a bright channel per class."""
    rng = np.random.default_rng(0)
    classes = ["red", "green", "blue"]

    def images(n):
        targets = np.arange(n) % 3
        x = rng.integers(0, 60, (n, 8, 8, 3)).astype(np.uint8)       # (n, 8, 8, 3)
        x[np.arange(n), :, :, targets] += 180                        # the class's channel lights up
        return ArrayImageSet(x, targets, classes, [f"{i}_{classes[t]}.png" for i, t in enumerate(targets)])
    return images(60), images(30), TOY_SPEC


@pytest.fixture()
def toy():
    registry.register(registry.Dataset("toy", load_toy, spec=TOY_SPEC, train_images=60,
                                       defaults={"ssl": {"labels": 9, "epochs": 1, "num_workers": 0}, "drl": {}}))
    yield "toy"
    registry.unregister("toy")


def test_a_registered_dataset_prints_its_config_without_a_yaml_file(toy, tmp_path):
    assert not (package_configs() / "ssl" / "toy.yaml").is_file()
    r = run_cli("train_ssl.py", "--dataset", "toy", "--print-config", "--out", str(tmp_path / "p"))
    assert r.returncode == 0, r.stderr
    shown = yaml.safe_load(r.stdout.split("\nschedule:")[0])
    assert (shown["dataset"], shown["labels"], shown["epochs"]) == ("toy", 9, 1)     # the entry's defaults
    sched = yaml.safe_load("schedule:" + r.stdout.split("\nschedule:")[1])["schedule"]
    assert (sched["labeled"], sched["unlabeled"]) == (9, 51)
    assert not (tmp_path / "p").exists()


def test_a_registered_dataset_trains_for_an_epoch(toy, tmp_path):
    out = tmp_path / "run"
    m = train_ssl.main(tiny(TINY_SSL, labels=None, epochs=None) + ["--dataset", "toy", "--out", str(out)])
    assert [h["phase"] for h in m["history"]] == ["sup", "ssl"] and m["epochs_done"] == 2
    assert 0 <= m["test_top1"] <= 100 and np.isfinite(m["history"][-1]["loss"])
    assert yaml.safe_load((out / "config.yaml").read_text())["dataset"] == "toy"
    labeled = [ln.split() for ln in (out / "labeled.txt").read_text().splitlines() if ln]
    assert len(labeled) == 9 and all(name.endswith(f"_{c}.png") for name, c in labeled)


def test_unknown_names_are_refused_and_a_name_registers_once(toy):
    assert "toy" in choices.datasets() and choices.datasets()[0] == "digits"
    with pytest.raises(ValueError, match="already registered"):
        registry.register(registry.Dataset("toy", load_toy))
    with pytest.raises(UserError, match="unknown dataset 'svhn'; choose one of digits, .*, toy"):
        registry.get("svhn")


@pytest.mark.parametrize("name", [d.name for d in registry.BUILT_IN])
def test_every_built_in_dataset_has_its_two_yaml_files_and_a_published_spec(name):
    for kind in ("ssl", "drl"):
        assert (package_configs() / kind / f"{name}.yaml").is_file()
    known = registry.published(name)
    assert (known is None) == (name == "imagefolder")
    if known:
        images, spec = known
        assert images > 0 and spec.name == name and len(spec.mean) == len(spec.std) == spec.channels
