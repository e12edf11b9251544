"""``mono chat`` (and its older name ``mono-chat``) on a saved tiny model folder (model + tokenizer), as a user
would run it; usage errors are checked in-process (they exit before any model is loaded)."""

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from PIL import Image

from mono import cli

from .conftest import tiny_chat_model

ROOT = Path(__file__).resolve().parents[2]


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


def _usage_error(capsys, entry, *args) -> str:
    with pytest.raises(SystemExit) as exc:
        entry([str(a) for a in args])
    assert exc.value.code == 2
    return capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- answers
def test_chat_positional_question_with_an_image(model_dir):
    out = _run("chat", model_dir, "--image", model_dir / "red.png", "what is in the image", "--max-new-tokens", "3")
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("\n") == 1


def test_every_spelling_of_model_and_question_gives_the_same_answer(model_dir, capsys):
    image = model_dir / "red.png"
    forms = [
        ("chat", model_dir, "--image", image, "what is in the image"),                  # issue's form, positional dir
        ("chat", "--model", model_dir, "--image", image, "what is in the image"),       # issue's form, --model
        ("chat", "--image", image, "--question", "what is in the image", "--model", model_dir),
        (model_dir, "--image", image, "--question", "what is in the image"),            # older mono-chat form
    ]
    answers = []
    for form in forms:
        assert cli._module_main([str(a) for a in (*form, "--max-new-tokens", "4")]) == 0
        answers.append(capsys.readouterr().out)
    assert len(set(answers)) == 1 and answers[0].count("\n") == 1, answers


def test_interactive_keeps_history(model_dir):
    out = _run("chat", model_dir, "--max-new-tokens", "2", stdin="hello\nhow are you\n\n")
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("\n") == 2


def test_mono_chat_alias_in_process(model_dir, capsys):
    assert cli.chat_main([str(model_dir), "hello", "--max-new-tokens", "2"]) == 0
    assert capsys.readouterr().out.count("\n") == 1


# ---------------------------------------------------------------------------------------------- usage errors
def test_missing_image_names_the_file(model_dir, capsys):
    err = _usage_error(capsys, cli.main, "chat", model_dir, "--image", model_dir / "nope.png", "hello")
    assert "nope.png" in err and "mono chat: error" in err


def test_missing_model_folder_names_the_path(tmp_path, capsys):
    err = _usage_error(capsys, cli.main, "chat", tmp_path / "no_such_model", "hello")
    assert "no_such_model" in err and "does not exist" in err
    err = _usage_error(capsys, cli.main, "chat", "--model", tmp_path / "no_such_model", "hello")
    assert "no_such_model" in err


def test_folder_without_config_json(tmp_path, capsys):
    err = _usage_error(capsys, cli.main, "chat", tmp_path, "hello")
    assert str(tmp_path) in err and "config.json" in err


def test_checkpoint_without_tokenizer(release_ckpt, capsys):
    # The release fixture holds config.json and weights but no tokenizer files (it is fed ids).
    err = _usage_error(capsys, cli.main, "chat", release_ckpt, "hello")
    assert str(release_ckpt) in err and "tokenizer" in err


def test_no_model_given(capsys):
    err = _usage_error(capsys, cli.main, "chat")
    assert "--model" in err and "MODEL" in err


def test_question_given_twice(model_dir, capsys):
    err = _usage_error(capsys, cli.main, "chat", model_dir, "hello", "--question", "how are you")
    assert "twice" in err
    err = _usage_error(capsys, cli.main, "chat", "--model", model_dir, "one", "two")
    assert "only one positional" in err


def test_bad_numbers(model_dir, capsys):
    assert "--max-new-tokens" in _usage_error(capsys, cli.main, "chat", model_dir, "hi", "--max-new-tokens", "0")
    assert "--max-tiles" in _usage_error(capsys, cli.main, "chat", model_dir, "hi", "--max-tiles", "0")


def test_unknown_or_missing_command_lists_the_commands(capsys):
    err = _usage_error(capsys, cli.main, "chta")
    assert "invalid choice" in err and "chat" in err
    assert "COMMAND" in _usage_error(capsys, cli.main)


def test_alias_reports_errors_under_its_own_name(tmp_path, capsys):
    err = _usage_error(capsys, cli.chat_main, tmp_path / "absent")
    assert err.splitlines()[-1].startswith("mono-chat: error:") and "absent" in err


# ---------------------------------------------------------------------------------------------- wiring
def test_console_scripts_point_at_the_entry_points():
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["mono"] == "mono.cli:main" and scripts["mono-chat"] == "mono.cli:chat_main"
    for target in (scripts["mono"], scripts["mono-chat"]):
        assert callable(getattr(cli, target.split(":")[1]))


def test_every_registered_command_has_a_subparser():
    _, subparsers = cli.build_parser()
    assert set(subparsers) == set(cli.COMMANDS) and "chat" in subparsers
    assert all(sub.prog == f"mono {name}" for name, sub in subparsers.items())
    with pytest.raises(ValueError, match="twice"):
        cli.register(cli.COMMANDS["chat"])
