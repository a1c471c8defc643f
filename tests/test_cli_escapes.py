"""One escape rule for stop strings typed by hand: ``numgpt generate --stop`` (``cli.unescape``)
and the playground's stop box (``unescapeStop`` in serve/static/playground.js).

Bash passes ``--stop "\\n"`` as a backslash and an ``n``; it used to be matched literally, so
such a stop string never stopped. Expected values below are written by hand.
"""

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from numgpt import cli

import model_files  # tests/model_files.py

JS = Path(cli.__file__).parent / "serve" / "static" / "playground.js"

CASES = [  # typed -> meant
    ("\\n", "\n"),
    ("\\n\\n", "\n\n"),
    ("\\t|\\r", "\t|\r"),
    ("a\\\\nb", "a\\nb"),          # an escaped backslash, then a plain n
    ("say \\\"hi\\\"", 'say "hi"'),
    ("it\\'s", "it's"),
    ("C:\\path\\x", "C:\\path\\x"),  # \p and \x are no escapes: kept as typed
    ("end\\", "end\\"),            # a lone trailing backslash is kept
    ("\n", "\n"),                  # a real newline (bash $'\n') passes unchanged
    ("plain", "plain"),
]


@pytest.mark.parametrize("typed,meant", CASES)
def test_unescape_reads_the_escapes_llama_cpp_reads(typed, meant):
    assert cli.unescape(typed) == meant


def test_generate_parses_stop_backslash_n_as_a_newline():
    args = cli.build_parser().parse_args(
        ["generate", "--model", "m", "--prompt", "p", "--stop", "\\n", "--stop", "x\\\\n"])
    assert args.stop == ["\n", "x\\n"]


def test_generate_help_states_the_escape_rule(capsys):
    with pytest.raises(SystemExit):
        cli.main(["generate", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "\\n \\t \\r \\\\" in text and "--stop '\\n' stops at a newline" in text


def _generate(prefix: Path, *extra: str, capsys) -> str:
    code = cli.main(["generate", "--model", str(prefix), "--prompt", "a", "-n", "300",
                     "--temperature", "1", "--seed", "3", "--no-eot", "--json", *extra])
    assert code == 0
    return json.loads(capsys.readouterr().out.splitlines()[0])["text"]


def test_generate_stop_backslash_n_ends_the_sample_at_the_first_newline(tmp_path, capsys):
    prefix = model_files.numgpt_checkpoint(tmp_path / "m")
    free = _generate(prefix, capsys=capsys)
    assert "\n" in free, "precondition: without a stop string the sample holds a newline"
    stopped = _generate(prefix, "--stop", "\\n", capsys=capsys)
    assert stopped == free[:free.index("\n")]


def _node_map(js_function: str, name: str, inputs: list[str]) -> list[str]:
    node = shutil.which("node") or shutil.which("nodejs")
    if node is None:
        pytest.skip("node is not installed: the playground's JavaScript is checked in a browser "
                    "by tests/test_playground.py only")
    script = f"{js_function}\nprocess.stdout.write(JSON.stringify({json.dumps(inputs)}.map({name})));"
    done = subprocess.run([node, "-e", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_playground_stop_box_reads_the_same_escapes():
    """The playground's unescapeStop, run by node on every case, equals cli.unescape."""
    source = JS.read_text(encoding="utf-8")
    table = re.search(r"^const ESCAPES = .*?;$", source, re.M)
    func = re.search(r"^function unescapeStop\(text\) \{.*?^\}", source, re.M | re.S)
    assert table and func, "playground.js lost ESCAPES / unescapeStop"
    typed = [t for t, _ in CASES]
    got = _node_map(f"{table.group(0)}\n{func.group(0)}", "unescapeStop", typed)
    assert got == [cli.unescape(t) for t in typed] == [m for _, m in CASES]


def test_the_playground_parity_check_sees_a_different_rule():
    """Negative case: the playground's old rule (only \\n), run by node, fails the comparison."""
    old = 'function oldStop(s) { return s.replace(/\\\\n/g, "\\n"); }'
    typed = [t for t, _ in CASES]
    got = _node_map(old, "oldStop", typed)
    assert got[0] == "\n"  # it did read \n
    assert got != [m for _, m in CASES]
