"""Register `SubLLMConfig` / `SubLLMForCausalLM` with transformers' Auto classes lazily.

`import subllm` must not import transformers (about 3 s on a small CPU), yet
`AutoModelForCausalLM.from_pretrained(dir)` after `import subllm` must know
`model_type="subllm"`. So `install()` adds an import hook (a PEP 451 meta-path finder)
that watches two pairs of modules:

- transformers' `configuration_auto` and our `subllm.model.hf_config` -> `AutoConfig`;
- transformers' `modeling_auto` and our `subllm.model.hf` -> `AutoModelForCausalLM`.

When the transformers side of a pair finishes loading, our side is imported; whichever
of the two finishes last registers. Registration reads the Auto class from the finished
module object itself, never through `transformers.__getattr__`, so it is safe while
other transformers modules are still loading. If transformers' Auto modules are already
loaded when `install()` runs, registration happens at once.
"""

from __future__ import annotations

import importlib
import importlib.abc
import sys

# transformers module -> (our module, Auto class attribute, registration)
_CONFIG_AUTO = "transformers.models.auto.configuration_auto"
_MODEL_AUTO = "transformers.models.auto.modeling_auto"
_PAIRS = {
    _CONFIG_AUTO: "subllm.model.hf_config",
    _MODEL_AUTO: "subllm.model.hf",
}
_WATCHED = set(_PAIRS) | set(_PAIRS.values())
_done: set[str] = set()


def _loaded(name: str) -> bool:
    module = sys.modules.get(name)
    return module is not None and not getattr(module.__spec__, "_initializing", False)


def _register(auto_name: str) -> None:
    ours = sys.modules[_PAIRS[auto_name]]
    auto = sys.modules[auto_name]
    if auto_name == _CONFIG_AUTO:
        auto.AutoConfig.register(ours.SubLLMConfig.model_type, ours.SubLLMConfig,
                                 exist_ok=True)
    else:
        auto.AutoModelForCausalLM.register(ours.SubLLMConfig, ours.SubLLMForCausalLM,
                                           exist_ok=True)
    _done.add(auto_name)


def _after_load(name: str) -> None:
    for auto_name, ours in _PAIRS.items():
        if auto_name in _done or name not in (auto_name, ours):
            continue
        if name == auto_name and ours not in sys.modules:
            importlib.import_module(ours)  # its own load registers (it finishes last)
        elif _loaded(auto_name) and _loaded(ours):
            _register(auto_name)


def register() -> None:
    """Register both classes now (imports transformers)."""
    for auto_name, ours in _PAIRS.items():
        importlib.import_module(auto_name)
        importlib.import_module(ours)
        if auto_name not in _done:
            _register(auto_name)


class _Loader(importlib.abc.Loader):
    def __init__(self, inner: importlib.abc.Loader, name: str) -> None:
        self.inner = inner
        self.name = name

    def create_module(self, spec):
        return self.inner.create_module(spec)

    def exec_module(self, module) -> None:
        self.inner.exec_module(module)
        module.__spec__._initializing = False  # importlib clears it only after we return
        _after_load(self.name)


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name not in _WATCHED or len(_done) == len(_PAIRS):
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _Loader(spec.loader, name)
                return spec
        return None


def install() -> None:
    """Register now where transformers' Auto modules are loaded; otherwise when they load."""
    if any(isinstance(f, _Finder) for f in sys.meta_path):
        return
    sys.meta_path.insert(0, _Finder())
    for auto_name, ours in _PAIRS.items():
        if _loaded(auto_name):
            importlib.import_module(ours)
            if auto_name not in _done:
                _register(auto_name)
