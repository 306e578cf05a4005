"""Training given bad input: one line naming the defect, the right exit status, inputs untouched, nothing left.

The table runs train.py's `main(argv)` in this process against a shared tree of tiny inputs (pre-tokenized
datasets in the real format, data config YAMLs, config files, an ordinary file where a directory belongs)
with every output path inside that tree. The tree is hashed before and after (names, kinds, bytes): an
input changed or an output left behind (an output_dir, a metrics file, an empty checkpoint directory, an
export directory) fails the case. Exit status 1: exactly one stderr line "error: ...". Exit status 2, a
usage error: argparse's usage lines and one "train.py: error: ..." line.

Then, on a real three-step run: unreadable newest checkpoints (truncated, deleted or zeroed array files,
broken or missing JSON, a checkpoint holding NaN) refused with the step, the damage and the way back named,
or taken back to the newest readable step with checkpoint.resume_from_previous_on_error=true; training
states that turn non-finite after a finite loss (an overflowing learning rate, an optimizer state that
becomes inf) never saved, with the last finite checkpoint named; exports that refuse non-finite weights
and leave nothing behind.
"""
import importlib.util
import json
import os
import shutil
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lumina_jax import param_checkpoint
from lumina_jax.config import model_preset
from lumina_jax.convert import chameleon as convert_chameleon
from lumina_jax.convert.errors import ConversionError
from lumina_jax.data.records import write_dataset
from lumina_jax.state import init_params, nonfinite_leaves
from lumina_jax.training import config as config_lib
from lumina_jax.training import export, trainer
from lumina_jax.training import train_step as ts
from test_faults import tree_digest  # the same digest as the other commands' fault table
from test_train_helpers import REPO, TEST_OVERRIDES, TINY, checkpoint_steps, read_losses

_spec = importlib.util.spec_from_file_location("train_cli_faults", REPO / "train.py")
_train_cli = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_train_cli)
TRAIN = _train_cli.main

RUN = ["--config", TINY, "output_dir={r}/out/run", *TEST_OVERRIDES]  # seq_len 32, 8 rows, synthetic data
FLAG = "checkpoint.resume_from_previous_on_error"


# ------------------------------------------------------------------------------------------ the input tree

def _items(lengths):
    return [((np.arange(n) * 7) % 512, (np.arange(n) * 7) % 512) for n in lengths]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    r = tmp_path_factory.mktemp("train_faults")
    d = r / "data"
    write_dataset(str(d / "good"), _items([20] * 16))
    write_dataset(str(d / "long"), _items([20] * 7 + [50] + [20] * 8))  # item id 7: 50 tokens > seq_len + 1
    write_dataset(str(d / "short"), _items([20] * 5 + [1]))
    (d / "unfinished" / "_work").mkdir(parents=True)  # what an interrupted pretokenize leaves
    (d / "unfinished" / "_work" / "run_config.json").write_text("{}")
    (d / "nothing_written").mkdir()
    (d / "nothing_written" / "pretokenize_report.json").write_text('{"num_written": 0}')
    (d / "plain").mkdir()
    shutil.copytree(d / "good", d / "no_index")
    (d / "no_index" / "record_index.npz").unlink()
    shutil.copytree(d / "good", d / "bad_index")
    (d / "bad_index" / "record_index.npz").write_bytes(b"PK\x03\x04 not a zip")
    (d / "afile").write_text("a file where a dataset directory belongs\n")
    yamls = {
        "good": "META:\n  - path: good\n", "malformed": "META: [1, 2\n", "tab": "META:\n\t- path: good\n",
        "no_meta": "foo: 1\n", "empty": "", "meta_empty": "META: []\n", "meta_str": "META: good\n",
        "no_path": "META:\n  - ratio: 1\n", "path_null": "META:\n  - path: null\n",
        "path_list": "META:\n  - path: [good, long]\n", "unknown_key": "META:\n  - path: good\n    weight: 2\n",
        "neg_ratio": "META:\n  - path: good\n    ratio: -1\n", "zero_ratio": "META:\n  - path: good\n    ratio: 0\n",
        "str_ratio": "META:\n  - path: good\n    ratio: abc\n", "nan_ratio": "META:\n  - path: good\n    ratio: .nan\n",
        "inf_ratio": "META:\n  - path: good\n    ratio: .inf\n", "bool_ratio": "META:\n  - path: good\n    ratio: true\n",
        "tiny_ratio": "META:\n  - path: good\n    ratio: 0.01\n", "missing_dir": "META:\n  - path: nope\n",
        "file_dir": "META:\n  - path: afile\n", "unfinished": "META:\n  - path: unfinished\n",
        "nothing_written": "META:\n  - path: nothing_written\n", "plain": "META:\n  - path: plain\n",
        "no_index": "META:\n  - path: no_index\n", "bad_index": "META:\n  - path: bad_index\n",
        "long": "META:\n  - path: long\n", "short": "META:\n  - path: short\n",
        "second_long": "META:\n  - path: good\n  - path: long\n    ratio: 0.5\n",
    }
    for name, text in yamls.items():
        (d / f"{name}.yaml").write_text(text)
    (d / "latin1.yaml").write_bytes("META:\n  - path: caf\xe9\n".encode("latin-1"))
    (d / "binary.yaml").write_bytes(bytes(range(256)))
    c = r / "configs"
    c.mkdir()
    header = "from lumina_jax.training.config import TrainConfig\n"
    (c / "bad_syntax.py").write_text(header + "def get_config(:\n    pass\n")
    (c / "no_get_config.py").write_text(header + "CONFIG = TrainConfig()\n")
    (c / "returns_dict.py").write_text(header + "def get_config():\n    return {'total_steps': 3}\n")
    (c / "zero_steps.py").write_text(header + "def get_config():\n    return TrainConfig(total_steps=0)\n")
    (c / "str_steps.py").write_text(header + "def get_config():\n    return TrainConfig(total_steps='100')\n")
    (c / "nan_lr.py").write_text("from lumina_jax.training.config import OptimizerConfig, TrainConfig\n"
                                 "def get_config():\n    return TrainConfig(optimizer=OptimizerConfig(lr=float('nan')))\n")
    (r / "afile").write_text("a file where a directory belongs\n")
    (r / "exported").mkdir()
    (r / "exported" / "mine.txt").write_text("an earlier export\n")
    return r


def run_cli(main, argv, capsys) -> tuple[int, list[str]]:
    """(exit status, non-empty stderr lines) of `main(argv)`; fails on a traceback."""
    capsys.readouterr()
    try:
        rc = main(argv)
    except SystemExit as e:  # argparse's usage errors
        rc = e.code
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    return rc, [x for x in err.strip().splitlines() if x.strip()]


def assert_one_line(rc, lines, code, needle):
    if code == 1 or code == 3:
        assert len(lines) == 1 and lines[0].startswith("error: "), lines
    else:
        assert lines and lines[-1].startswith("train.py: error: "), lines
        assert all(x.startswith(("usage:", " ")) for x in lines[:-1]), lines
    assert rc == code, lines
    assert needle in lines[-1], f"{needle!r} not in {lines[-1]!r}"


# ------------------------------------------------------------------------------------------------ the table

def case(extra, code, needle, id, base=RUN):
    return pytest.param([*base, *extra], code, needle, id=id)


def data(name):
    return f"data.config_path={{r}}/data/{name}.yaml"


CASES = [
    # -- the data config YAML: missing, not a file, not YAML, not UTF-8, wrong structure
    case([data("missing")], 1, "missing.yaml: data config file does not exist", "data-yaml-missing"),
    case(["data.config_path={r}/data/good"], 1, "good: is a directory, not a data config YAML file", "data-yaml-is-dir"),
    case([data("malformed")], 1, "malformed.yaml: not valid YAML (line 2, column 1", "data-yaml-malformed"),
    case([data("tab")], 1, "tab.yaml: not valid YAML (line 2", "data-yaml-tab-indent"),
    case([data("latin1")], 1, "latin1.yaml: not UTF-8 text (byte 0xe9", "data-yaml-latin1"),
    case([data("binary")], 1, "binary.yaml: not UTF-8 text (byte 0x80", "data-yaml-binary"),
    case([data("no_meta")], 1, "no_meta.yaml: top-level key 'META' is missing", "data-yaml-no-meta"),
    case([data("empty")], 1, "empty.yaml: top-level key 'META' is missing", "data-yaml-empty"),
    case([data("meta_empty")], 1, "'META' must be a non-empty list", "data-yaml-meta-empty"),
    case([data("meta_str")], 1, "'META' must be a non-empty list", "data-yaml-meta-string"),
    case([data("no_path")], 1, "no_path.yaml: META[0] has no 'path'", "data-yaml-no-path"),
    case([data("path_null")], 1, "META[0].path must be a directory name, got None", "data-yaml-path-null"),
    case([data("path_list")], 1, "META[0].path must be a directory name, got ['good', 'long']", "data-yaml-path-list"),
    case([data("unknown_key")], 1, "META[0] has unknown keys ['weight']", "data-yaml-unknown-key"),
    # -- ratios: negative, zero, not a number, NaN, infinite, a boolean, too small to draw anything
    case([data("neg_ratio")], 1, "META[0].ratio must be > 0.0, got -1.0", "ratio-negative"),
    case([data("zero_ratio")], 1, "META[0].ratio must be > 0.0, got 0.0", "ratio-zero"),
    case([data("str_ratio")], 1, "META[0].ratio must be a number, got 'abc'", "ratio-string"),
    case([data("nan_ratio")], 1, "META[0].ratio must be a finite number, got nan", "ratio-nan"),
    case([data("inf_ratio")], 1, "META[0].ratio must be a finite number, got inf", "ratio-inf"),
    case([data("bool_ratio")], 1, "META[0].ratio must be a number, got True", "ratio-bool"),
    case([data("tiny_ratio")], 1, "META[0]: ratio 0.01 draws no item of its 16 each epoch", "ratio-draws-nothing"),
    # -- the datasets it lists: missing, a file, unfinished, empty, not a dataset, damaged index
    case([data("missing_dir")], 1, "missing_dir.yaml: META[0]: {r}/data/nope does not exist", "dataset-missing"),
    case([data("file_dir")], 1, "META[0]: {r}/data/afile is not a directory", "dataset-is-file"),
    case([data("unfinished")], 1, "unfinished is an unfinished pre-tokenization run", "dataset-unfinished"),
    case([data("nothing_written")], 1, "its pre-tokenization wrote no items (see pretokenize_report.json)",
         "dataset-nothing-written"),
    case([data("plain")], 1, "plain is not a pre-tokenized dataset: no dataset_info.json", "dataset-plain-dir"),
    case([data("no_index")], 1, "no_index is unreadable (", "dataset-index-missing"),
    case([data("bad_index")], 1, "bad_index is unreadable (", "dataset-index-damaged"),
    # -- items that do not fit data.seq_len (checked from the record index, before the first batch)
    case([data("long")], 1, "have more than seq_len + 1 = 33 tokens, e.g. item id 7 with 50", "item-too-long"),
    case([data("second_long")], 1, "second_long.yaml: META[1]: {r}/data/long: 1 item(s) have more than seq_len",
         "item-too-long-second-source"),
    case([data("good"), "data.seq_len=16"], 1, "16 item(s) have more than seq_len + 1 = 17 tokens",
         "item-too-long-for-seq-len-override"),
    case([data("short")], 1, "have fewer than 2 tokens, e.g. item id 5 with 1", "item-too-short"),
    # -- nonsensical values: zero batch, negative steps, zero intervals, negative rates, NaN
    case(["data.global_batch_size=0"], 1, "data.global_batch_size must be >= 1, got 0", "batch-zero"),
    case(["data.global_batch_size=-8"], 1, "data.global_batch_size must be >= 1, got -8", "batch-negative"),
    case(["total_steps=-5"], 1, "total_steps must be >= 1, got -5", "steps-negative"),
    case(["total_steps=0"], 1, "total_steps must be >= 1, got 0", "steps-zero"),
    case(["checkpoint.save_interval_steps=0"], 1, "checkpoint.save_interval_steps must be >= 1, got 0", "save-interval-zero"),
    case(["log.every_steps=0"], 1, "log.every_steps must be >= 1, got 0", "log-interval-zero"),
    case(["checkpoint.max_to_keep=0"], 1, "checkpoint.max_to_keep must be >= 1, got 0", "keep-zero"),
    case(["data.seq_len=0"], 1, "data.seq_len must be >= 1, got 0", "seq-len-zero"),
    case(["loss.chunk_size=-1"], 1, "loss.chunk_size must be >= 1, got -1", "chunk-negative"),
    case(["optimizer.lr=-1e-4"], 1, "optimizer.lr must be >= 0.0, got -0.0001", "lr-negative"),
    case(["optimizer.warmup_steps=-1"], 1, "optimizer.warmup_steps must be >= 0, got -1", "warmup-negative"),
    case(["optimizer.b2=1"], 1, "optimizer.b2 must be in [0.0, 1.0), got 1.0", "beta-one"),
    case(["optimizer.weight_decay=-0.1"], 1, "optimizer.weight_decay must be >= 0.0, got -0.1", "decay-negative"),
    case(["seed=-1"], 1, "seed must be in [0, 4294967295], got -1", "seed-negative"),
    case(["data.seed=1e20"], 1, "data.seed must be in [0, 4294967295], got 100000000000000000000", "seed-too-big"),
    case(["optimizer.lr=nan"], 1, "optimizer.lr must be a finite number, got nan", "lr-nan"),
    case(["optimizer.min_lr=inf"], 1, "optimizer.min_lr must be a finite number, got inf", "min-lr-inf"),
    case(["optimizer.eps=-inf"], 1, "optimizer.eps must be a finite number, got -inf", "eps-minus-inf"),
    case(["model.z_loss_weight=nan"], 1, "ChameleonConfig.z_loss_weight must be a finite number, got nan", "z-loss-nan"),
    case(["model.rope_theta=nan"], 1, "ChameleonConfig.rope_theta must be a finite number, got nan", "rope-theta-nan"),
    case(["model.dropout=nan"], 1, "ChameleonConfig.dropout must be a finite number, got nan", "dropout-nan"),
    case(["log.peak_tflops_per_device=nan"], 1, "log.peak_tflops_per_device must be a finite number, got nan", "peak-nan"),
    case(["parallel.grad_accum_steps=3"], 1, "data.global_batch_size=8 is not a multiple of parallel.grad_accum_steps=3",
         "accum-does-not-divide"),
    case(["data.synthetic_vocab=100000"], 1, "data.synthetic_vocab=100000 exceeds the model's vocabulary of 512",
         "synthetic-vocab-too-big"),
    # -- mesh and rules: does not divide the devices, unknown axis or rule set, batch not divisible
    case(["parallel.mesh=fsdp=3"], 1, "parallel.mesh=fsdp=3: mesh spec", "mesh-too-few-devices"),
    case(["parallel.mesh=data=2"], 1, "uses 2 devices but 8 are available", "mesh-leaves-devices-idle"),
    case(["parallel.mesh=data=3,fsdp=-1"], 1, "parallel.mesh=data=3,fsdp=-1: mesh spec axis fsdp=-1: 8 devices do not "
         "divide by 3", "mesh-does-not-divide"),
    case(["parallel.mesh=foo=2"], 1, "parallel.mesh=foo=2: mesh spec field 'foo=2'", "mesh-unknown-axis"),
    case(["parallel.mesh=fsdp=-1,data=-1"], 1, "only one axis may be -1", "mesh-two-fills"),
    case(["parallel.mesh=fsdp=0"], 1, "size must be positive or -1", "mesh-zero"),
    case(["parallel.num_slices=3"], 1, "num_slices=3", "slices-do-not-divide"),
    case(["data.global_batch_size=6"], 1, "micro-batch of 6 rows (data.global_batch_size=6", "batch-not-over-shards"),
    case(["parallel.grad_accum_steps=2"], 1, "micro-batch of 4 rows", "micro-batch-not-over-shards"),
    case(["parallel.rules=foo"], 1, "parallel.rules='foo' is unknown; known: ['fsdp', 'tensor']", "rules-unknown"),
    # -- output, export and init directories
    case(["output_dir={r}/afile"], 1, "output_dir={r}/afile is not a directory", "output-dir-is-file"),
    case(["output_dir={r}/afile/sub"], 1, "cannot be created: {r}/afile is not a directory", "output-dir-under-file"),
    case(["output_dir="], 1, "output_dir is empty", "output-dir-empty"),
    case(["--export_dir", "{r}/exported"], 1, "{r}/exported: already exists", "export-dir-exists"),
    case(["--export_hf_dir", "{r}/exported"], 1, "{r}/exported: already exists", "export-hf-dir-exists"),
    case(["--export_dir", "{r}/out/e", "--export_hf_dir", "{r}/out/e/hf"], 1, "{r}/out/e/hf: the output lies inside the input {r}/out/e",
         "export-dirs-nested"),
    case(["--export_dir", "{r}/afile/e"], 1, "{r}/afile/e: cannot be created: {r}/afile is not a directory", "export-dir-under-file"),
    case(["checkpoint.init_from={r}/nothing"], 1, "checkpoint.init_from={r}/nothing: {r}/nothing/config.json: missing",
         "init-from-missing"),
    case(["checkpoint.init_from={r}/data/good"], 1, "checkpoint.init_from={r}/data/good: ", "init-from-not-a-checkpoint"),
    # -- config files: syntax, no get_config, wrong type, bad values in the file, not a Python file
    case([], 1, "bad_syntax.py:2: invalid syntax", "config-syntax-error",
         base=["--config", "{r}/configs/bad_syntax.py", "output_dir={r}/out/run"]),
    case([], 1, "no_get_config.py: defines no get_config()", "config-no-get-config",
         base=["--config", "{r}/configs/no_get_config.py", "output_dir={r}/out/run"]),
    case([], 1, "get_config() returned dict, expected TrainConfig", "config-returns-dict",
         base=["--config", "{r}/configs/returns_dict.py", "output_dir={r}/out/run"]),
    case([], 1, "zero_steps.py: total_steps must be >= 1, got 0", "config-file-zero-steps",
         base=["--config", "{r}/configs/zero_steps.py", "output_dir={r}/out/run"]),
    case([], 1, "str_steps.py: total_steps must be an integer, got '100'", "config-file-string-steps",
         base=["--config", "{r}/configs/str_steps.py", "output_dir={r}/out/run"]),
    case([], 1, "nan_lr.py: optimizer.lr must be a finite number, got nan", "config-file-nan-lr",
         base=["--config", "{r}/configs/nan_lr.py", "output_dir={r}/out/run"]),
    case([], 1, "good.yaml: a config is a Python file", "config-is-yaml",
         base=["--config", "{r}/data/good.yaml", "output_dir={r}/out/run"]),
    case([], 1, "config file not found: {r}/configs/nope.py", "config-missing",
         base=["--config", "{r}/configs/nope.py", "output_dir={r}/out/run"]),
    # -- usage errors (exit status 2): malformed overrides, unknown keys, unparsable values, bad flags
    case(["optimizer.nope=1"], 2, "override optimizer.nope: OptimizerConfig has no field 'nope'", "override-unknown"),
    case(["total_steps=abc"], 2, "override total_steps=abc: expected int", "override-int-text"),
    case(["total_steps=1.5"], 2, "override total_steps=1.5: expected int (a whole number)", "override-int-fraction"),
    case(["total_steps=1e400"], 2, "override total_steps=1e400: expected int", "override-int-inf"),
    case(["optimizer.lr=fast"], 2, "override optimizer.lr=fast: expected float", "override-float-text"),
    case(["checkpoint.async_save=maybe"], 2, "expected a boolean", "override-bool-text"),
    case(["lr"], 2, "override 'lr': expected key=value", "override-no-equals"),
    case(["optimizer=1"], 2, "'optimizer' is a section", "override-section"),
    case(["total_steps.x=1"], 2, "'total_steps' is not a config section", "override-field-as-section"),
    case(["--max_steps", "0"], 2, "argument --max_steps: must be >= 1, got 0", "max-steps-zero"),
    case(["--max_steps", "-3"], 2, "argument --max_steps: must be >= 1, got -3", "max-steps-negative"),
    case(["--max_steps", "x"], 2, "argument --max_steps: expected an integer, got 'x'", "max-steps-text"),
    case(["--export_dtype", "int8"], 2, "invalid choice: 'int8'", "export-dtype-unknown"),
    case(["--bogus"], 2, "unrecognized arguments: --bogus", "flag-unknown"),
    case([], 2, "the following arguments are required: --config", "config-flag-missing", base=[]),
]


@pytest.mark.parametrize("argv,code,needle", CASES)
def test_bad_training_input_is_one_line_and_changes_nothing(world, capsys, argv, code, needle):
    argv = [a.replace("{r}", str(world)) for a in argv]
    before = tree_digest(world)
    rc, lines = run_cli(TRAIN, argv, capsys)
    assert_one_line(rc, lines, code, needle.replace("{r}", str(world)))
    assert tree_digest(world) == before, "an input changed or an output was left behind"


# ------------------------------------------------------------------------ unreadable checkpoints on resume

@pytest.fixture(scope="module")
def run3(tmp_path_factory):
    """A three-step run saved at every step (checkpoints 1, 2, 3) and its losses."""
    out = tmp_path_factory.mktemp("run3") / "run"
    assert TRAIN(["--config", TINY, f"output_dir={out}", *TEST_OVERRIDES, "total_steps=3",
                  "checkpoint.save_interval_steps=1", "checkpoint.max_to_keep=3"]) == 0
    assert checkpoint_steps(out) == [1, 2, 3]
    return {"dir": out, "losses": read_losses(out)}


def _arrays(step_dir: Path) -> list[Path]:
    """The array data files of a step, largest first."""
    return sorted((step_dir / "state" / "ocdbt.process_0" / "d").iterdir(), key=lambda p: -p.stat().st_size)


def damage(step_dir: Path, how: str) -> str:
    """Damages one checkpoint step the way `how` says; returns what the message must name."""
    if how == "array-truncated":
        p = _arrays(step_dir)[0]
        p.write_bytes(p.read_bytes()[:1000])
        return "Error reading"
    if how == "array-deleted":
        _arrays(step_dir)[0].unlink()
        return "Error reading"
    if how == "arrays-all-deleted":
        for p in _arrays(step_dir):
            p.unlink()
        return "Error reading"
    if how == "array-zeroed":
        p = _arrays(step_dir)[0]
        p.write_bytes(bytes(p.stat().st_size))
        return "Error reading"
    if how == "manifest-broken":
        (step_dir / "state" / "manifest.ocdbt").write_bytes(b"xx")
        return "state metadata: "
    if how == "metadata-json-broken":
        (step_dir / "state" / "_METADATA").write_text("{")
        return "state/_METADATA: malformed JSON"
    if how == "array-metadata-json-broken":
        p = step_dir / "state" / "array_metadatas" / "process_0"
        p.write_bytes(p.read_bytes()[:40])
        return "array_metadatas/process_0: malformed JSON"
    if how == "data-json-broken":
        (step_dir / "data" / "process_0-of-1.json").write_text('{"next_ba')
        return "data/process_0-of-1.json: malformed JSON"
    if how == "data-json-deleted":
        (step_dir / "data" / "process_0-of-1.json").unlink()
        return "no process_<i>-of-<n>.json data-iterator states"
    if how == "data-state-not-a-state":
        (step_dir / "data" / "process_0-of-1.json").write_text('{"x": 1}')
        return "data-iterator state: KeyError: 'next_batch'"
    if how == "config-json-broken":
        for p in (step_dir / "config").rglob("*"):
            if p.is_file():
                p.write_text("{")
        return "config: "
    if how == "state-deleted":
        shutil.rmtree(step_dir / "state")
        return "checkpoints/3/state is missing"
    if how == "step-emptied":
        shutil.rmtree(step_dir)
        step_dir.mkdir()
        return "checkpoints/3/state is missing"
    raise ValueError(how)


DAMAGE = ["array-truncated", "array-deleted", "arrays-all-deleted", "array-zeroed", "manifest-broken",
          "metadata-json-broken", "array-metadata-json-broken", "data-json-broken", "data-json-deleted",
          "data-state-not-a-state", "state-deleted", "step-emptied"]


def _resume_argv(run_dir, *extra):
    return ["--config", TINY, f"output_dir={run_dir}", *TEST_OVERRIDES, "total_steps=4",
            "checkpoint.save_interval_steps=1", "checkpoint.max_to_keep=3", *extra]


@pytest.mark.parametrize("how", DAMAGE)
def test_unreadable_newest_checkpoint_is_refused_naming_the_step_and_the_way_back(run3, tmp_path, capsys, how):
    copy = tmp_path / "run"
    shutil.copytree(run3["dir"], copy)
    needle = damage(copy / "checkpoints" / "3", how)
    before = tree_digest(tmp_path)
    rc, lines = run_cli(TRAIN, _resume_argv(copy), capsys)
    assert_one_line(rc, lines, 1, f"checkpoint step 3 in {copy / 'checkpoints'} is unreadable: ")
    assert needle in lines[0]
    assert lines[0].endswith(f"to resume from step 2, the previous checkpoint, set {FLAG}=true (step 3 is then "
                             f"moved to {copy / 'unreadable_checkpoints'})"), lines[0]
    assert tree_digest(tmp_path) == before


def test_resume_from_previous_on_error_takes_the_newest_readable_step_and_keeps_the_bad_ones(run3, tmp_path, capsys):
    copy = tmp_path / "run"
    shutil.copytree(run3["dir"], copy)
    damage(copy / "checkpoints" / "3", "array-truncated")
    damage(copy / "checkpoints" / "2", "data-json-broken")
    bad = {s: tree_digest(copy / "checkpoints" / str(s)) for s in (2, 3)}
    rc, lines = run_cli(TRAIN, _resume_argv(copy, f"{FLAG}=true"), capsys)
    assert rc == 0, lines
    # resumed from step 1: steps 2, 3 and 4 trained again, and 2 and 3 give the losses they gave the first time
    assert checkpoint_steps(copy) == [2, 3, 4]
    losses = read_losses(copy)
    assert [losses[s] for s in (1, 2, 3)] == [run3["losses"][s] for s in (1, 2, 3)] and 4 in losses
    # the unreadable checkpoints are kept, byte for byte, outside the manager's directory
    assert sorted(os.listdir(copy / "unreadable_checkpoints")) == ["2", "3"]
    assert {s: tree_digest(copy / "unreadable_checkpoints" / str(s)) for s in (2, 3)} == bad


def test_with_no_readable_checkpoint_nothing_is_moved(run3, tmp_path, capsys):
    copy = tmp_path / "run"
    shutil.copytree(run3["dir"], copy)
    for step, how in ((1, "state-deleted"), (2, "data-json-deleted"), (3, "array-deleted")):
        damage(copy / "checkpoints" / str(step), how)
    before = tree_digest(tmp_path)
    rc, lines = run_cli(TRAIN, _resume_argv(copy, f"{FLAG}=true"), capsys)
    assert_one_line(rc, lines, 1, "checkpoint step 3 in")
    assert "no earlier checkpoint reads either (step 2: " in lines[0] and "step 1: " in lines[0]
    assert lines[0].endswith("nothing was moved")
    assert tree_digest(tmp_path) == before


def test_only_checkpoint_unreadable_says_there_is_none_earlier(run3, tmp_path, capsys):
    copy = tmp_path / "run"
    shutil.copytree(run3["dir"], copy)
    for step in (1, 2):
        shutil.rmtree(copy / "checkpoints" / str(step))
    damage(copy / "checkpoints" / "3", "metadata-json-broken")
    before = tree_digest(tmp_path)
    rc, lines = run_cli(TRAIN, _resume_argv(copy), capsys)
    assert_one_line(rc, lines, 1, "there is no earlier checkpoint to resume from")
    assert tree_digest(tmp_path) == before


@pytest.mark.parametrize("extra,needle", [
    (["model.intermediate_size=96"], "holds another model or optimizer state than this config builds: wrong shapes"),
    (["model.intermediate_size=96", f"{FLAG}=true"], "params/layers/mlp/down_proj/kernel [2, 176, 64] (expected [2, 96, 64])"),
    (["checkpoint.resume=false"], "checkpoint.resume=false, but"),
], ids=["other-model", "other-model-with-fallback-flag", "resume-false-over-checkpoints"])
def test_checkpoints_of_another_run_are_refused_not_moved(run3, tmp_path, capsys, extra, needle):
    copy = tmp_path / "run"
    shutil.copytree(run3["dir"], copy)
    before = tree_digest(tmp_path)
    rc, lines = run_cli(TRAIN, _resume_argv(copy, *extra), capsys)
    assert_one_line(rc, lines, 1, needle)
    assert tree_digest(tmp_path) == before


@pytest.fixture(scope="module")
def nan_run(run3, tmp_path_factory):
    """run3 plus a step 4 whose Adam first moment holds a NaN: what an unchecked trainer used to save."""
    copy = tmp_path_factory.mktemp("nan_run") / "run"
    shutil.copytree(run3["dir"], copy)
    cfg = config_lib.load_config(TINY, [f"output_dir={copy}", *TEST_OVERRIDES, "checkpoint.max_to_keep=5"])
    run = trainer.setup(cfg)
    state = run.state
    adam = state["opt_state"][1][0]
    mu = dict(adam.mu, lm_head={"kernel": adam.mu["lm_head"]["kernel"].at[0, 0].set(jnp.nan)})
    state["opt_state"] = (state["opt_state"][0], (adam._replace(mu=mu), *state["opt_state"][1][1:]))
    run.checkpointer.save(4, state, run.data.get_state(), cfg.to_dict(), force=True)
    run.checkpointer.close()
    assert checkpoint_steps(copy) == [1, 2, 3, 4]
    return copy


def test_a_checkpoint_holding_nan_is_never_resumed_from(nan_run, tmp_path, capsys):
    copy = tmp_path / "run"
    shutil.copytree(nan_run, copy)
    before = tree_digest(tmp_path)
    rc, lines = run_cli(TRAIN, _resume_argv(copy, "total_steps=6"), capsys)
    assert_one_line(rc, lines, 1, "checkpoint step 4 in")
    assert "1 arrays hold NaN or inf [opt_state/1/0/mu/lm_head/kernel]; to resume from step 3" in lines[0]
    assert tree_digest(tmp_path) == before


def test_export_of_a_checkpoint_holding_nan_is_refused(nan_run, tmp_path, capsys):
    before = tree_digest(nan_run)
    rc, lines = run_cli(export.main, [str(nan_run), str(tmp_path / "out")], capsys)
    assert len(lines) == 1 and lines[0].startswith("error: ") and rc == 1, lines
    # its weights are finite, only an Adam moment is NaN: still not a state to publish
    assert "checkpoint step 4 in " in lines[0] and "1 arrays of its parameters and optimizer state hold NaN or inf " \
        "[opt_state/1/0/mu/lm_head/kernel]; refusing to export it" in lines[0], lines[0]
    assert os.listdir(tmp_path) == [] and tree_digest(nan_run) == before


EXPORT_CASES = [  # (damage to the copied run, export arguments, exit status, what the line must name)
    pytest.param("array-truncated", [], 1, "checkpoint step 3 in {run}/checkpoints is unreadable: ", id="array-truncated"),
    pytest.param("array-deleted", [], 1, "checkpoint step 3 in {run}/checkpoints is unreadable: ", id="array-deleted"),
    pytest.param("metadata-json-broken", [], 1, "3/state/_METADATA: malformed JSON", id="state-metadata-broken"),
    pytest.param("config-json-broken", [], 1, "checkpoint step 3 in {run}/checkpoints is unreadable: config: ",
                 id="config-broken"),
    pytest.param("state-deleted", [], 1, "checkpoints/3/state is missing", id="state-deleted"),
    pytest.param(None, ["--step", "7"], 1, "no checkpoint of step 7; there are [1, 2, 3]", id="step-absent"),
    pytest.param(None, ["--step", "-1"], 2, "argument --step: must be >= 0, got -1", id="step-negative"),
    pytest.param("all-deleted", [], 1, "{run}/checkpoints: no training checkpoint to export", id="no-checkpoints"),
    pytest.param(None, ["OUT={here}/mine"], 1, "{here}/mine: already exists", id="out-exists"),
    pytest.param(None, ["OUT={run}/export"], 1, "{run}/export: the output lies inside the input {run}", id="out-in-run"),
    pytest.param(None, ["OUT={run}"], 1, "{run}: the output is the input {run}", id="out-is-run"),
    pytest.param(None, ["--hf_dir", "{here}/mine"], 1, "{here}/mine: already exists", id="hf-dir-exists"),
    pytest.param(None, ["--hf_dir", "{here}/out/hf"], 1, "{here}/out/hf: the output lies inside the input {here}/out",
                 id="hf-dir-inside-out"),
]


@pytest.mark.parametrize("how,extra,code,needle", EXPORT_CASES)
def test_export_of_a_bad_checkpoint_or_to_a_bad_place_is_one_line_and_changes_nothing(run3, tmp_path, capsys, how,
                                                                                       extra, code, needle):
    run = tmp_path / "run"
    shutil.copytree(run3["dir"], run)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("a user's own directory\n")
    if how == "all-deleted":
        for step in (1, 2, 3):
            shutil.rmtree(run / "checkpoints" / str(step))
    elif how:
        damage(run / "checkpoints" / "3", how)
    fill = lambda text: text.replace("{run}", str(run)).replace("{here}", str(tmp_path))  # noqa: E731
    extra = [fill(a) for a in extra]
    out = next((a[4:] for a in extra if a.startswith("OUT=")), str(tmp_path / "out"))
    argv = [str(run), out, *[a for a in extra if not a.startswith("OUT=")]]
    before = tree_digest(tmp_path)
    rc, lines = run_cli(export.main, argv, capsys)
    assert rc == code, lines
    assert fill(needle) in lines[-1], lines
    if code == 1:
        assert len(lines) == 1 and lines[0].startswith("error: "), lines
    assert tree_digest(tmp_path) == before, "an input changed or an output was left behind"


# ------------------------------------------------------------- states that turn non-finite after a finite loss

def test_parameters_that_overflow_after_a_finite_loss_are_never_saved_resumed_or_exported(tmp_path, capsys):
    """optimizer.lr=1e39 is inf in float32: the first update it drives makes the parameters non-finite while that
    step's loss (computed before the update) is finite. From a fresh start nothing is written; continuing a run
    saved at steps 1 and 2, step 3 is not saved and step 2 is named as the last finite checkpoint."""
    out, exported = tmp_path / "run", tmp_path / "exported"
    base = ["--config", TINY, f"output_dir={out}", *TEST_OVERRIDES, "total_steps=4", "checkpoint.save_interval_steps=1"]
    huge = ["optimizer.lr=1e39", "optimizer.min_lr=1e39", "--export_dir", str(exported)]
    rc, lines = run_cli(TRAIN, base + huge, capsys)
    assert_one_line(rc, lines, 3, "step 1: the updated parameters and optimizer state hold NaN or inf in ")
    assert "after a finite loss=" in lines[0] and lines[0].endswith("(last finite checkpoint: none written yet)")
    assert not exported.exists() and checkpoint_steps(out) == []

    assert run_cli(TRAIN, base + ["--max_steps", "2"], capsys)[0] == 0
    rc, lines = run_cli(TRAIN, base + huge, capsys)
    assert_one_line(rc, lines, 3, "step 3: the updated parameters and optimizer state hold NaN or inf in ")
    assert "after a finite loss=" in lines[0]
    assert lines[0].endswith(f"stopped without saving this state (last finite checkpoint: step 2 in "
                             f"{out / 'checkpoints'})"), lines[0]
    assert checkpoint_steps(out) == [1, 2] and sorted(read_losses(out)) == [1, 2]
    assert not exported.exists()
    # the checkpoint named is finite: a resume (which checks) takes it
    run = trainer.setup(config_lib.load_config(TINY, [f"output_dir={out}", *TEST_OVERRIDES, "total_steps=4"]))
    run.checkpointer.close()
    assert run.start_step == 2 and nonfinite_leaves(run.state) == []


def _inf_from_update(n: int) -> optax.GradientTransformation:
    """Leaves updates alone; its own float state becomes inf at its n-th update (an optimizer whose state
    overflows while the parameters stay finite)."""
    def update(updates, state, params=None):
        state = state + 1.0
        return updates, jnp.where(state >= n, jnp.inf, state)
    return optax.GradientTransformation(lambda params: jnp.zeros((), jnp.float32), update)


def test_an_optimizer_state_that_turns_inf_is_never_saved(tmp_path, monkeypatch):
    real = ts.make_optimizer
    monkeypatch.setattr(ts, "make_optimizer", lambda cfg, total: optax.chain(real(cfg, total), _inf_from_update(3)))
    out = tmp_path / "run"
    cfg = config_lib.load_config(TINY, [f"output_dir={out}", *TEST_OVERRIDES, "total_steps=5",
                                        "checkpoint.save_interval_steps=1"])
    with pytest.raises(trainer.NonFiniteError) as err:
        trainer.train(cfg)
    msg = str(err.value)
    assert msg.startswith("step 3: the updated parameters and optimizer state hold NaN or inf in 1 of ")
    assert "arrays [opt_state/1], after a finite loss=" in msg
    assert msg.endswith(f"(last finite checkpoint: step 2 in {out / 'checkpoints'})")
    assert checkpoint_steps(out) == [1, 2] and sorted(read_losses(out)) == [1, 2]


# ---------------------------------------------------------------------------------------------- export

@pytest.fixture(scope="module")
def tiny_params():
    cfg = model_preset("tiny")
    return cfg, init_params(cfg, 0)


@pytest.mark.parametrize("poison,dtype,needle", [
    (lambda k: k.at[0, 0].set(jnp.nan), "float32", "the parameters to export: 1 arrays hold NaN or inf [lm_head/kernel]"),
    (lambda k: k.at[3, 1].set(-jnp.inf), "bfloat16", "the parameters to export: 1 arrays hold NaN or inf"),
    (lambda k: k * 1e6, "float16", "the parameters cast to float16 (values beyond its range; export as float32): "
                                   "1 arrays hold NaN or inf [lm_head/kernel]"),
], ids=["nan", "minus-inf", "float16-overflow"])
def test_export_refuses_non_finite_weights_and_writes_nothing(tiny_params, tmp_path, poison, dtype, needle):
    cfg, params = tiny_params
    bad = dict(params, lm_head={"kernel": poison(params["lm_head"]["kernel"])})
    with pytest.raises(ValueError) as err:
        export.export_run_state(bad, cfg, str(tmp_path / "out"), hf_dir=str(tmp_path / "hf"), dtype=dtype)
    assert needle in str(err.value)
    assert os.listdir(tmp_path) == []


def test_export_never_replaces_a_directory(tiny_params, tmp_path):
    cfg, params = tiny_params
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "mine.txt").write_text("mine\n")
    with pytest.raises(param_checkpoint.CheckpointError, match="out: already exists"):
        export.export_run_state(params, cfg, str(tmp_path / "out"))
    assert sorted(os.listdir(tmp_path)) == ["out"] and os.listdir(tmp_path / "out") == ["mine.txt"]


def test_a_failed_export_leaves_neither_directory(tiny_params, tmp_path, monkeypatch):
    cfg, params = tiny_params

    def fail(src, out, **kw):
        assert (Path(src) / "params").is_dir() and (Path(src) / "config.json").is_file()  # reads the finished copy
        raise ConversionError("disk full (simulated)")

    monkeypatch.setattr(convert_chameleon, "export", fail)
    with pytest.raises(ConversionError):
        export.export_run_state(params, cfg, str(tmp_path / "out"), hf_dir=str(tmp_path / "hf"), dtype="float32")
    assert os.listdir(tmp_path) == []


def test_export_writes_the_finite_weights_atomically(tiny_params, tmp_path):
    cfg, params = tiny_params
    export.export_run_state(params, cfg, str(tmp_path / "out"), dtype="float32")
    assert os.listdir(tmp_path) == ["out"]  # no temporary directory left beside it
    assert json.loads((tmp_path / "out" / "config.json").read_text())["param_dtype"] == "float32"
    restored = param_checkpoint.restore_params(tmp_path / "out")
    np.testing.assert_array_equal(np.asarray(restored["lm_head"]["kernel"]), np.asarray(params["lm_head"]["kernel"]))
