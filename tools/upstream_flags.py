"""Inventory of Megatron-DeepSpeed's command-line flags, read from its source without importing it.

    python tools/upstream_flags.py --repo PATH/TO/Megatron-DeepSpeed --commit SHA \
        [--deepspeed-repo PATH/TO/DeepSpeed --deepspeed-commit SHA] > tests/upstream/upstream_flags.json

`--repo` is a git directory (a clone or a bare mirror); files are read with `git show COMMIT:PATH`,
so the inventory names exactly the commit it describes. Every `add_argument` call in
`megatron/arguments.py` becomes one record (option strings, dest, action, type, nargs, default,
choices, group); DeepSpeed's `add_config_arguments` flags, which upstream's parser also adds, are
read from `deepspeed/__init__.py` when a DeepSpeed repository is given. Help texts are not copied.
The result is data for tests/upstream (every upstream flag must be implemented here, accepted with
a note, or rejected with a named alternative) and for docs/flags.md.
"""

from __future__ import annotations

import argparse
import ast
import json
import subprocess
import sys
import warnings

UPSTREAM_REPO = "microsoft/Megatron-DeepSpeed"
DEEPSPEED_REPO = "microsoft/DeepSpeed"


def git_show(repo: str, commit: str, path: str) -> str:
    return subprocess.run(["git", "-C", repo, "show", f"{commit}:{path}"], check=True,
                          capture_output=True, text=True).stdout


def resolve(repo: str, commit: str) -> str:
    return subprocess.run(["git", "-C", repo, "rev-parse", f"{commit}^{{commit}}"], check=True,
                          capture_output=True, text=True).stdout.strip()


def _value(node: ast.AST, source: str):
    """A literal as JSON data; anything else (a name, a call) as its source text, tagged."""
    try:
        return ast.literal_eval(node)
    except ValueError:
        pass
    if isinstance(node, ast.BinOp) and isinstance(node.left, ast.Constant) and isinstance(node.right, ast.Constant) \
            and isinstance(node.op, ast.Pow):
        return node.left.value ** node.right.value  # e.g. 2**32
    return {"expr": ast.get_source_segment(source, node)}


def _type_name(node: ast.AST, source: str) -> str:
    if isinstance(node, ast.Name):
        return node.id
    return ast.get_source_segment(source, node) or "?"


def _group_titles(fn: ast.FunctionDef) -> dict:
    """Variable name -> group title for `x = parser.add_argument_group(...)` inside one function."""
    titles = {}
    for node in ast.walk(fn):
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Call) and \
                isinstance(node.value.func, ast.Attribute) and node.value.func.attr == "add_argument_group":
            call = node.value
            title = next((k.value for k in call.keywords if k.arg == "title"), None)
            if title is None and call.args:
                title = call.args[0]
            for target in node.targets:
                if isinstance(target, ast.Name) and isinstance(title, ast.Constant):
                    titles[target.id] = title.value
    return titles


def extract(source: str, origin: str) -> list:
    """One record per `add_argument` call, in source order."""
    with warnings.catch_warnings():  # upstream help strings hold escapes like "\ " that Python warns about
        warnings.simplefilter("ignore", SyntaxWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        tree = ast.parse(source)
    records = []
    for fn in [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)]:
        titles = _group_titles(fn)
        for node in ast.walk(fn):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr == "add_argument"):
                continue
            options = [a.value for a in node.args if isinstance(a, ast.Constant) and isinstance(a.value, str)]
            kw = {k.arg: k.value for k in node.keywords if k.arg}
            owner = node.func.value.id if isinstance(node.func.value, ast.Name) else None
            rec = {
                "flags": options,
                "dest": _value(kw["dest"], source) if "dest" in kw else _default_dest(options),
                "action": _value(kw["action"], source) if "action" in kw else "store",
                "type": _type_name(kw["type"], source) if "type" in kw else None,
                "nargs": _value(kw["nargs"], source) if "nargs" in kw else None,
                "default": _value(kw["default"], source) if "default" in kw else None,
                "choices": _value(kw["choices"], source) if "choices" in kw else None,
                "required": _value(kw["required"], source) if "required" in kw else False,
                "group": titles.get(owner, fn.name),
                "function": fn.name,
                "line": node.lineno,
                "origin": origin,
            }
            if rec["action"] in ("store_true", "store_false") and "default" not in kw:
                rec["default"] = rec["action"] == "store_false"
            records.append(rec)
    return sorted(records, key=lambda r: (r["origin"], r["line"]))


def _default_dest(options: list) -> str:
    longs = [o for o in options if o.startswith("--")]
    return (longs or options)[0].lstrip("-").replace("-", "_")


def inventory(repo: str, commit: str, ds_repo: str | None = None, ds_commit: str | None = None) -> dict:
    commit = resolve(repo, commit)
    path = "megatron/arguments.py"
    flags = extract(git_show(repo, commit, path), "megatron-deepspeed")
    sources = {"megatron-deepspeed": {"repo": UPSTREAM_REPO, "commit": commit, "path": path}}
    if ds_repo:
        ds_commit = resolve(ds_repo, ds_commit or "HEAD")
        ds_path = "deepspeed/__init__.py"
        ds_flags = [r for r in extract(git_show(ds_repo, ds_commit, ds_path), "deepspeed")
                    if r["function"] == "_add_core_arguments"]
        flags += ds_flags
        sources["deepspeed"] = {"repo": DEEPSPEED_REPO, "commit": ds_commit, "path": ds_path,
                                "function": "add_config_arguments (called by upstream's parse_args)"}
    seen = {}
    for r in flags:
        for f in r["flags"]:
            if f in seen:
                raise SystemExit(f"{f} is defined twice ({seen[f]} and line {r['line']})")
            seen[f] = r["line"]
    return {"generated_by": "tools/upstream_flags.py", "sources": sources, "count": len(flags), "flags": flags}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repo", required=True, help="git directory of Megatron-DeepSpeed")
    p.add_argument("--commit", default="HEAD")
    p.add_argument("--deepspeed-repo", help="git directory of DeepSpeed (adds --deepspeed, --deepspeed_config, ...)")
    p.add_argument("--deepspeed-commit", default="HEAD")
    a = p.parse_args(argv)
    sys.stdout.write(dumps(inventory(a.repo, a.commit, a.deepspeed_repo, a.deepspeed_commit)))
    return 0


def dumps(inv: dict) -> str:
    """JSON with one flag record per line (readable diffs when the upstream commit moves)."""
    head = {k: v for k, v in inv.items() if k != "flags"}
    lines = [json.dumps(head, indent=1)[:-2] + ',\n "flags": [']
    lines += [" " + json.dumps(r) + ("," if i < len(inv["flags"]) - 1 else "") for i, r in enumerate(inv["flags"])]
    return "\n".join(lines) + "\n ]\n}\n"


if __name__ == "__main__":
    sys.exit(main())
