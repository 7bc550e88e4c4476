"""The docs say what the code does: every command line in README.md and docs/*.md parses with the
flags and values its script takes, every `--flag` they name is a flag of ours (or torchrun's or
pip's), the tests and the code they cite exist, and the README's Python example runs."""
import argparse
import ast
import glob
import os
import re
import shlex

import pytest

import avmae
import data
import finetune
import kernels.bench
import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = [os.path.join(ROOT, "README.md")] + sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))
SCRIPTS = {"train.py": train.main, "finetune.py": finetune.main, "data.py": data.main,
           "kernels/bench.py": kernels.bench.main}
OTHERS = {  # the other tools' flags the docs show: torchrun's, pip's, the fixtures' script's
    "--standalone", "--nproc_per_node", "--nnodes", "--node_rank", "--rdzv_backend",
    "--rdzv_endpoint", "--max-restarts", "--no-deps", "--only-binary", "--platform",
    "--python-version", "--implementation", "--target", "--repo", "--timm", "--full"}
COMMAND = re.compile(r"(?:python3?|torchrun)\b[^`#\n]*?\b(train\.py|finetune\.py|data\.py|"
                     r"kernels/bench\.py)\b([^`\n]*)")
PLACEHOLDER = re.compile(r"^\$?\{?[A-Z][A-Z0-9_]*\}?$")  # S, N, $STEPS: what the reader fills in


class Parsed(Exception):
    pass


def commands(text: str) -> list:
    """(script, its arguments, inline) of each command line: in code blocks (a trailing backslash
    goes on to the next line) and in inline code, where prose may name a command without the
    arguments it requires (`python data.py prepare`)."""
    text = re.sub(r"\\\n\s*", " ", text).replace("\\|", "|")  # (a table's escaped pipe)
    found = []
    for block in re.findall(r"```[a-z]*\n(.*?)```", text, flags=re.S):
        found += [(*m.groups(), False) for line in block.splitlines()
                  for m in [COMMAND.search(line)] if m]
    for span in re.findall(r"(?<!`)`([^`\n]+)`(?!`)", re.sub(r"```.*?```", "", text, flags=re.S)):
        m = COMMAND.search(span)
        if m:
            found.append((*m.groups(), True))
    return [(script, shlex.split(re.split(r";|&&|\|", args)[0], comments=True), inline)
            for script, args, inline in found]  # (up to the shell's next command)


def stop_at_parse(monkeypatch, into: list):
    """Each script's main() parses its arguments as it would, then stops (nothing runs); what
    argparse leaves unknown goes into `into`, an error is argparse's exit."""
    def parse(self, argv=None, namespace=None):
        _, unknown = self.parse_known_args(argv, namespace)
        into[:] = [a for a in unknown if a.startswith("-")]
        raise Parsed
    monkeypatch.setattr(data.Parser, "parse_args", parse)


def all_flags(monkeypatch) -> set:
    flags = set()

    def collect(self, argv=None, namespace=None):
        todo = [self]
        while todo:
            p = todo.pop()
            flags.update(p._option_string_actions)
            todo += [sp for a in p._actions if isinstance(a, argparse._SubParsersAction)
                     for sp in a.choices.values()]
        raise Parsed
    monkeypatch.setattr(data.Parser, "parse_args", collect)
    for main in SCRIPTS.values():
        with pytest.raises(Parsed):
            main([])
    return flags


def test_every_command_line_in_the_docs_parses(monkeypatch, capsys):
    unknown, seen = [], set()
    stop_at_parse(monkeypatch, unknown)
    for path in DOCS:
        for script, args, inline in commands(open(path).read()):
            seen.add(script)
            where = f"{os.path.basename(path)}: {script} {' '.join(args)}"
            while True:
                try:
                    SCRIPTS[script](args)
                except Parsed:
                    break
                except SystemExit as e:  # (argparse: an unknown choice, a value of a wrong type)
                    err = capsys.readouterr().err.strip() or str(e)
                    bad = re.search(r"invalid (?:\w+ value|choice): '(.*?)'(?: \(choose from '"
                                    r"([^']*)')?", err)
                    if bad and PLACEHOLDER.match(bad[1]):  # (--seed S: what the reader puts there)
                        args = [a if a != bad[1] else bad[2] or "1" for a in args]
                        continue
                    if not (inline and "the following arguments are required" in err):
                        pytest.fail(f"{where}: {err}")
                    break
            assert not unknown, f"{where}: no such flag {unknown}"
    assert seen == set(SCRIPTS), seen  # (the extraction found each script's commands)


def test_every_flag_the_docs_name_is_one_of_ours(monkeypatch):
    flags = all_flags(monkeypatch)
    assert {"--preset", "--decode", "--report", "--allow_silent"} <= flags
    for path in DOCS:
        named = set(re.findall(r"(?<![\w-])--[a-zA-Z][\w-]*", open(path).read()))
        assert named - flags - OTHERS == set(), os.path.basename(path)


def test_the_readme_python_example_runs():
    text = open(DOCS[0]).read()
    (example,) = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert 'make_config("base"' in example
    env = {}
    exec(example.replace('make_config("base"', 'make_config("tiny"'), env)  # (CPU-sized widths)
    feats, rows = env["feats"], env["rows"]
    assert feats["a"].shape == (2, 400, 64) and feats["v"].shape == (2, 1568, 64)
    assert set(rows) == {"a", "v"} and rows["v"][0].shape == (2, 3, 16, 224, 224)
    assert env["model"].patch_embed["v"].weight.grad is not None  # (the backward ran)


def test_the_tests_and_the_code_the_docs_cite_exist():
    # `test_x.py::test_name` (a trailing * stands for any ending) and `module.name` in backticks
    defined = {}
    for f in glob.glob(os.path.join(ROOT, "tests", "test_*.py")):
        tree = ast.parse(open(f).read())
        defined[os.path.basename(f)] = {n.name for n in ast.walk(tree)
                                        if isinstance(n, ast.FunctionDef)}
    modules = dict(avmae=avmae, data=data, train=train, finetune=finetune, kernels=kernels)
    tests = names = 0
    for path in DOCS:
        text, doc = open(path).read(), os.path.basename(path)
        for f, name, glob_ in re.findall(r"(?:tests/)?(test_\w+\.py)::(\w+)(\*?)", text):
            tests += 1
            assert f in defined, f"{doc}: no tests/{f}"
            assert any(n == name or (glob_ and n.startswith(name)) for n in defined[f]), \
                f"{doc}: no {f}::{name}{glob_}"
        for mod, attr in re.findall(r"`(avmae|data|train|finetune|kernels)\.(\w+(?:\.\w+)*)", text):
            if attr != "py":
                names += 1
                obj = modules[mod]
                for a in attr.split("."):
                    assert hasattr(obj, a), f"{doc}: no {mod}.{attr}"
                    obj = getattr(obj, a)
    assert tests > 50 and names > 30, (tests, names)  # (the patterns still find the citations)


def test_every_flag_of_each_script_says_what_it_does_in_its_group():
    # -h: each flag's help is its config field's comment (a few words more than its choices and
    # its default), and the flags come in the groups model, data, optimisation, run
    import re
    import finetune
    import train
    for name, parser in (("train.py", train.build_parser(train.TrainConfig, avmae.AVMAEConfig)),
                         ("finetune.py", train.build_parser(finetune.FinetuneConfig))):
        titles = [g.title for g in parser._action_groups if g._group_actions]
        assert set(titles) >= {"model", "data", "optimisation", "run"}, (name, titles)
        for a in parser._actions:
            if a.dest == "help":
                continue
            text = re.sub(r"\(default .*\)$", "", a.help or "")
            words = [w for w in re.findall(r"[A-Za-z]{2,}", text)
                     if w not in map(str, a.choices or ())]
            assert len(words) >= 3, (name, a.dest, a.help)
    help_text = train.build_parser(train.TrainConfig, avmae.AVMAEConfig).format_help()
    assert "--mask_ratio_v MASK_RATIO_V\n" in help_text and "share of video tokens masked" in \
        help_text
