"""The README tells the truth: every link and command in it is checked here.

- Relative links (README and docs/) reach a file that exists, and an anchor reaches a heading of it.
- Repository paths named in code spans (README and the docs' reference pages) exist.
- Every `make X` names a Makefile target, and every `NAME=value` given to make is a variable the Makefile
  or the suite reads.
- Every `rerank-gateway ...` command parses with the real command line (ops.cli.parse_args), and every
  `python -m X` (README and docs/) names a module that runs.
- Every YAML block of a whole registry (README and docs/) loads as the gateway loads a registry file.
- The quick start's curl command and Cohere SDK snippet run as written against `make serve`'s own
  process on the default registry (tests/conftest.py's session-wide default_server), and answer what the
  README shows.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import re
import shlex
import subprocess

import pytest
import yaml

from core.config import load_registry
from ops.cli import parse_args
from tests.conftest import REPO

README = REPO / "README.md"
DOCS = sorted((REPO / "docs").rglob("*.md"))
# The docs that describe today's code; dated reports under docs/benchmarks/ name files as they were then.
REFERENCE_DOCS = [p for p in DOCS if "benchmarks" not in p.parts]
README_BASE = "http://127.0.0.1:8080"

FENCE = re.compile(r"^```([\w-]*)\n(.*?)^```", re.M | re.S)
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
CODE_SPAN = re.compile(r"`([^`\n]+)`")


def blocks(text: str) -> list[tuple[str, str]]:
    """(language, body) of each fenced code block."""
    return FENCE.findall(text)


def prose(text: str) -> str:
    return FENCE.sub("", text)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(text: str) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for line in prose(text).splitlines():
        m = re.match(r"^#{1,6} (.+)$", line)
        if m:
            base = slug(m.group(1))
            n = seen.get(base, 0)
            seen[base] = n + 1
            out.add(base if n == 0 else f"{base}-{n}")
    return out


def command_lines(text: str) -> list[str]:
    """Shell commands: each line of the shell (or untagged) code blocks, continuation lines joined and
    comments and prompts dropped, and each code span of the prose."""
    out = []
    for lang, body in blocks(text):
        if lang not in ("", "sh", "console", "bash"):
            continue
        for line in body.replace("\\\n", " ").splitlines():
            line = line.removeprefix("$ ").split("  #", 1)[0].strip()
            if line and not line.startswith("#"):
                out.append(line)
    out += CODE_SPAN.findall(prose(text))
    return out


def test_the_readme_is_short():
    assert len(README.read_text().splitlines()) < 300


@pytest.mark.parametrize("page", [README, *DOCS], ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_reach_a_file_and_a_heading(page):
    text = page.read_text()
    links = [t for t in LINK.findall(prose(text)) if not re.match(r"^[a-z]+:", t)]
    if page == README:
        assert len(links) >= 10, links  # the README links to the docs it moved out
    for target in links:
        file, _, anchor = target.partition("#")
        path = (page.parent / file).resolve() if file else page
        assert path.exists(), f"{page.name}: {target}: no such file"
        if anchor:
            assert path.suffix == ".md", target
            assert anchor in anchors(path.read_text()), f"{page.name}: {target}: no such heading"


@pytest.mark.parametrize("page", [README, *REFERENCE_DOCS], ids=lambda p: str(p.relative_to(REPO)))
def test_repository_paths_named_exist(page):
    tops = {p.name for p in REPO.iterdir() if not p.name.startswith(".")}
    named = [
        s for s in CODE_SPAN.findall(prose(page.read_text()))
        if re.fullmatch(r"[\w.-]+(/[\w.-]+)*/?", s) and s.split("/")[0] in tops and ("/" in s or "." in s)
    ]
    # What a command writes (bench/results/, .whl/) is an anchored entry of .gitignore, not missing. Read from
    # the file rather than asked of git: the suite also runs from a source tree that is no git checkout.
    written = [e.strip("/") + "/" for e in (REPO / ".gitignore").read_text().split() if e.startswith("/")]
    missing = [s for s in named if not (REPO / s).exists() and not any((s.rstrip("/") + "/").startswith(w) for w in written)]
    assert not missing, missing
    if page == README:
        assert {"gateway/", "dialects/", "serving/", "pool/", "engine/", "backends/"} <= set(named)


def test_every_make_target_and_variable_exists():
    makefile = (REPO / "Makefile").read_text()
    targets = set(re.findall(r"^([\w.-]+):", makefile, flags=re.M))
    suite = "".join(p.read_text() for p in (REPO / "tests").rglob("*.py"))
    used = [c for c in command_lines(README.read_text()) if c.startswith("make ")]
    assert {"make serve", "make test"} <= set(used)
    for command in used:
        words = shlex.split(command)[1:]
        assert words and words[0] in targets, command
        for word in words[1:]:
            name, eq, _ = word.partition("=")
            assert eq, command
            assert re.search(rf"\$\({name}\)|^{name}\s*\?=", makefile, flags=re.M) or f'"{name}"' in suite, (command, name)


def test_every_rerank_gateway_command_parses():
    used = [c for c in command_lines(README.read_text()) if c.startswith("rerank-gateway ")]
    assert {"serve", "check", "plan", "keys"} <= {shlex.split(c)[1] for c in used}
    for command in used:
        try:
            parse_args(shlex.split(command)[1:])
        except SystemExit as exc:
            pytest.fail(f"{command!r} does not parse (exit {exc.code})")


@pytest.mark.parametrize("page", [README, *DOCS], ids=lambda p: str(p.relative_to(REPO)))
def test_every_python_module_run_exists(page):
    for module in re.findall(r"python3? -m ([\w.]+)", page.read_text()):
        spec = importlib.util.find_spec(module)
        assert spec is not None, module
        if spec.submodule_search_locations:  # a package runs its __main__
            assert importlib.util.find_spec(f"{module}.__main__") is not None, module


@pytest.mark.parametrize("page", [README, *DOCS], ids=lambda p: str(p.relative_to(REPO)))
def test_every_whole_registry_shown_loads(page, tmp_path):
    whole = [body for lang, body in blocks(page.read_text()) if lang == "yaml" and re.search(r"^models:", body, re.M) and re.search(r"^default_model:", body, re.M)
             and "..." not in re.sub(r"#.*", "", body) and "<" not in re.sub(r"#.*", "", body)]
    if page == README:
        assert whole, "the README shows a minimal registry"
    for body in whole:
        path = tmp_path / "registry.yaml"
        path.write_text(body)
        load_registry(path)  # raises naming the key


def _block_after(text: str, marker: str, lang: str) -> str:
    """The first code block of `lang` after the one holding `marker`."""
    found = blocks(text)
    start = next(i for i, (_, body) in enumerate(found) if marker in body)
    return next(body for language, body in found[start + 1:] if language == lang)


def test_the_curl_example_answers_what_the_readme_shows(default_server):
    text = README.read_text()
    command = next(body for lang, body in blocks(text) if lang == "sh" and "curl" in body)
    assert README_BASE in command
    run = subprocess.run(["bash", "-c", command.replace(README_BASE, default_server)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    got, shown = json.loads(run.stdout), json.loads(_block_after(text, "curl", "json"))
    assert isinstance(got["id"], str) and got["id"]
    assert [(r["index"], r["document"]) for r in got["results"]] == [(r["index"], r["document"]) for r in shown["results"]]
    # The scores shown are this model's, to bf16's precision (fp32 on a CPU without native bf16).
    assert [r["relevance_score"] for r in got["results"]] == pytest.approx([r["relevance_score"] for r in shown["results"]], abs=0.03)
    assert {k: got[k] for k in ("meta", "model", "usage")} == {k: shown[k] for k in ("meta", "model", "usage")}


def test_the_cohere_sdk_example_runs_as_written(default_server):
    code = next(body for lang, body in blocks(README.read_text()) if lang == "python" and "import cohere" in body)
    assert README_BASE in code
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(code.replace(README_BASE, default_server), "README.md", "exec"), {})
    expected = re.search(r"print\(.*\)\s+# (.+)$", code, re.M).group(1)
    assert printed.getvalue().strip() == expected
