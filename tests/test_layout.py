"""The package's architecture: layers, no import cycles, a light `import subllm` and CLI."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from subllm import layout


def test_no_import_cycles_between_modules() -> None:
    g = layout.graph(top_level_only=False)
    assert len(g) > 30 and sum(map(len, g.values())) > 50  # the graph was really read
    assert layout.cycles(g) == []


def test_nothing_imports_a_higher_layer() -> None:
    assert layout.upward_imports() == []


def test_cycle_and_layer_checks_can_fail() -> None:
    assert layout.cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert layout.layer_of("subllm.model.subllm") < layout.layer_of("subllm.train.loop")
    assert layout.layer_of("subllm.train.loop") < layout.layer_of("subllm.commands.train")


def test_model_package_imports_only_its_own_files_relatively() -> None:
    """`subllm export` copies subllm/model/ verbatim, so it must stand alone."""
    files = [p for m, p in layout.module_files().items() if m.startswith("subllm.model")]
    assert len(files) >= 10
    for path in files:
        text = path.read_text()
        assert not re.search(r"^\s*(from|import)\s+subllm\b", text, re.MULTILINE), path.name
        for target in re.findall(r"^\s*from \.(\w+) import", text, re.MULTILINE):
            assert (path.parent / f"{target}.py").is_file(), (path.name, target)


def _fresh(code: str) -> dict:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_import_subllm_loads_neither_torch_nor_transformers() -> None:
    r = _fresh("import json, sys, subllm; print(json.dumps({m: m in sys.modules "
               "for m in ('torch', 'transformers')}))")
    assert r == {"torch": False, "transformers": False}


@pytest.mark.slow
def test_help_and_a_bad_flag_do_not_load_torch() -> None:
    code = """
import contextlib, io, json, sys
from subllm.cli import main
codes = []
for argv in (["--help"], ["train", "--seq-len", "-3"], ["bench", "--help"]):
    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        try:
            codes.append(main(argv))
        except SystemExit as e:
            codes.append(e.code)
print(json.dumps({"codes": codes, "torch": "torch" in sys.modules}))
"""
    r = _fresh(code)
    assert r == {"codes": [0, 2, 0], "torch": False}


@pytest.mark.slow
def test_auto_classes_know_subllm_after_import_subllm() -> None:
    """Registration is lazy (an import hook), in either import order."""
    for first in ("import subllm; import transformers", "import transformers; import subllm"):
        r = _fresh(first + "\nimport json\nfrom transformers import AutoConfig, "
                   "AutoModelForCausalLM\nfrom transformers.models.auto.configuration_auto "
                   "import CONFIG_MAPPING\nfrom transformers.models.auto.modeling_auto import "
                   "MODEL_FOR_CAUSAL_LM_MAPPING as M\ncfg = CONFIG_MAPPING['subllm']\n"
                   "print(json.dumps([cfg.__name__, M[cfg].__name__]))")
        assert r == ["SubLLMConfig", "SubLLMForCausalLM"], first
