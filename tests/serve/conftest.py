from pathlib import Path

import pytest
import yaml

from subllm.cli import main


@pytest.fixture(scope="session")
def run(tmp_path_factory, prepare_corpus, tiny_settings) -> Path:
    """A tiny SUBLLM trained for 4 steps: the checkpoint the serve tests serve."""
    root = tmp_path_factory.mktemp("serve")
    data = prepare_corpus(root, 12)
    settings = tiny_settings(data, **{"max-steps": 4, "out": str(root / "run")})
    (root / "train.yaml").write_text(yaml.safe_dump(settings))
    assert main(["train", "--config", str(root / "train.yaml")]) == 0
    return root / "run"
