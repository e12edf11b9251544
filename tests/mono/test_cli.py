"""mono-chat on a saved tiny model folder (model + tokenizer), as a user would run it."""

import subprocess
import sys

import pytest
from PIL import Image

from .conftest import tiny_chat_model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_chat")
    model, tok = tiny_chat_model()
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    Image.new("RGB", (120, 60), (200, 30, 30)).save(folder / "red.png")
    return folder


def _run(*args, stdin=None):
    return subprocess.run(
        [sys.executable, "-m", "mono.cli", *map(str, args)], input=stdin, capture_output=True, text=True, timeout=120
    )


def test_one_question_with_an_image(model_dir):
    out = _run(model_dir, "--image", model_dir / "red.png", "--question", "what is in the image", "--max-new-tokens", "3")
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("\n") == 1


def test_interactive_keeps_history(model_dir):
    out = _run(model_dir, "--max-new-tokens", "2", stdin="hello\nhow are you\n\n")
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("\n") == 2


def test_missing_image_names_the_file(model_dir):
    out = _run(model_dir, "--image", model_dir / "nope.png", "--question", "hello")
    assert out.returncode != 0
    assert "nope.png" in out.stderr
