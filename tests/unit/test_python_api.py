"""The documented Python API: ``from fedasr import ...`` gives each stage with explicit keyword arguments, and
``import fedasr`` alone imports none of the heavy stacks (a Flower ClientApp process imports the package)."""

import inspect
import subprocess
import sys

import fedasr

STAGES = ("synthesize_corpus", "prepare_common_voice", "partition_manifest", "train_central", "federate", "evaluate",
          "compare_runs", "run_pipeline")


def test_every_stage_is_importable_from_the_package_with_named_arguments():
    for name in STAGES:
        function = getattr(fedasr, name)
        assert callable(function) and function.__doc__, name
        kinds = {p.kind for p in inspect.signature(function).parameters.values()}
        assert inspect.Parameter.VAR_KEYWORD not in kinds, f"{name} hides its options behind **kwargs"
    assert set(STAGES) <= set(fedasr.__all__) <= set(dir(fedasr))
    federate = inspect.signature(fedasr.federate).parameters
    assert {"partition", "seed_checkpoint", "output_dir", "overrides", "resume"} <= set(federate)


def test_importing_the_package_loads_no_heavy_library():
    code = "import sys, fedasr; print(sorted(m for m in ('torch', 'speechbrain', 'flwr', 'ray') if m in sys.modules))"
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert loaded.returncode == 0 and loaded.stdout.strip() == "[]", loaded


def test_an_unknown_name_is_an_attribute_error():
    try:
        fedasr.train_federated  # noqa: B018
    except AttributeError as err:
        assert "train_federated" in str(err)
    else:
        raise AssertionError("no AttributeError")
