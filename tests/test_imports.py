"""The core package never imports demo or test code: every module outside lumina_jax.demo and lumina_jax.testing
is imported in a fresh interpreter, which must then hold neither package."""
import json
import os
import pkgutil
import subprocess
import sys

import lumina_jax

EXCLUDED = ("lumina_jax.demo", "lumina_jax.testing")

# Imports the given modules in order; prints as JSON the first one after whose import an excluded package is
# in sys.modules (with what it pulled in), or null, and how many modules were imported.
_PROBE = """
import importlib, json, sys
excluded, names = json.loads(sys.argv[1]), json.loads(sys.argv[2])
culprit, count = None, 0
for name in names:
    importlib.import_module(name)
    count += 1
    pulled = sorted(m for m in sys.modules if any(m == e or m.startswith(e + ".") for e in excluded))
    if pulled:
        culprit = [name, pulled]
        break
print(json.dumps({"culprit": culprit, "imported": count}))
"""


def _is_excluded(name: str, excluded) -> bool:
    return any(name == e or name.startswith(e + ".") for e in excluded)


def core_modules() -> list[str]:
    """Every module and package of lumina_jax (found by walking the package) outside the excluded packages."""
    names = ["lumina_jax"] + [m.name for m in pkgutil.walk_packages(lumina_jax.__path__, "lumina_jax.")]
    return sorted(n for n in names if not _is_excluded(n, EXCLUDED))


def probe(names: list[str], excluded=EXCLUDED) -> dict:
    """Runs the import probe in a fresh interpreter (CPU only)."""
    out = subprocess.run([sys.executable, "-c", _PROBE, json.dumps(list(excluded)), json.dumps(names)],
                         capture_output=True, text=True, timeout=600, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_walk_finds_the_core_modules_and_skips_demo_and_testing():
    names = core_modules()
    for expected in ("lumina_jax", "lumina_jax.tokenizer_train", "lumina_jax.training.vqgan_train",
                     "lumina_jax.inference", "lumina_jax.convert.__main__", "lumina_jax.data.pretokenize"):
        assert expected in names
    assert len(names) > 40 and not [n for n in names if _is_excluded(n, EXCLUDED)]


def test_probe_names_the_module_that_pulls_in_an_excluded_package():
    result = probe(["lumina_jax.tokenizer", "lumina_jax.demo.shape_analysis", "lumina_jax.unirep"],
                   excluded=("lumina_jax.demo.shapes",))
    assert result["culprit"] == ["lumina_jax.demo.shape_analysis", ["lumina_jax.demo.shapes"]]
    assert result["imported"] == 2


def test_core_modules_import_neither_demo_nor_testing_code():
    names = core_modules()
    result = probe(names)
    assert result["culprit"] is None, f"importing {result['culprit'][0]} loaded {result['culprit'][1]}"
    assert result["imported"] == len(names)
