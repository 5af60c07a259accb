"""Security: no code runs from a checkpoint, a YAML file or a query string; no eval/exec/pickle of user data;
deploy/ never exposes a scheduler or dashboard without authentication, and documents TLS.

Each case has a static half (an AST scan of pipeline/, or a parse of deploy/) and, where the package reads
user files, a behavioural half: a crafted file whose loading *would* run code (it creates a marker file) is
refused, and the marker never appears. A control shows that the same payload does run code when loaded
unsafely, so the test cannot pass vacuously.
"""

from __future__ import annotations

import ast
import re
import shlex
from pathlib import Path

import pytest
import yaml

from pipeline.run.cli import main

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "pipeline"
DEPLOY = ROOT / "deploy"
PY_FILES = sorted(PKG.rglob("*.py"))


def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def _stable(text: str) -> str:
    """Observed text without temporary paths (also those cut short inside a quoted line)."""
    text = re.sub(r"/[^\s'\"]*/pytest-of-[^/]+/pytest-\d+/[^/\s'\"]+/", "", text)  # whole paths: keep the name
    return re.sub(r"/[^\s'\"]*pytest-of-[^\s'\"]*", "<tmp>", text)  # paths cut short


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    return err


# ------------------------------------------------------------------------------------------------
# an AST scan of pipeline/
# ------------------------------------------------------------------------------------------------

UNSAFE_MODULES = {"pickle", "cPickle", "_pickle", "cloudpickle", "dill", "marshal", "shelve", "joblib", "jsonpickle"}
UNSAFE_YAML = {
    "load",
    "load_all",
    "unsafe_load",
    "unsafe_load_all",
    "full_load",
    "full_load_all",
    "Loader",
    "FullLoader",
    "UnsafeLoader",
    "CLoader",
    "CFullLoader",
    "CUnsafeLoader",
}
OS_EXEC = {
    "system",
    "popen",
    "execl",
    "execle",
    "execlp",
    "execlpe",
    "execv",
    "execve",
    "execvp",
    "execvpe",
    "spawnl",
    "spawnle",
    "spawnlp",
    "spawnlpe",
    "spawnv",
    "spawnve",
    "spawnvp",
    "spawnvpe",
    "posix_spawn",
    "posix_spawnp",
}


class _Scanner(ast.NodeVisitor):
    """Findings ``(line, rule, detail)`` of one module; names resolved through its imports."""

    def __init__(self):
        self.aliases: dict[str, str] = {}  # local name -> dotted origin ('np' -> 'numpy')
        self.findings: list[tuple[int, str, str]] = []

    def _add(self, node, rule, detail):
        self.findings.append((node.lineno, rule, detail))

    def visit_Import(self, node):
        for a in node.names:
            self.aliases[a.asname or a.name.split(".")[0]] = a.name if a.asname else a.name.split(".")[0]
            if a.name.split(".")[0] in UNSAFE_MODULES:
                self._add(node, "unsafe import", a.name)
        self.generic_visit(node)

    def visit_ImportFrom(self, node):
        mod = node.module or ""
        for a in node.names:
            self.aliases[a.asname or a.name] = f"{mod}.{a.name}"
            if mod.split(".")[0] in UNSAFE_MODULES:
                self._add(node, "unsafe import", f"{mod}.{a.name}")
            if mod.split(".")[0] == "yaml" and a.name in UNSAFE_YAML:
                self._add(node, "unsafe yaml", f"yaml.{a.name}")
        self.generic_visit(node)

    def dotted(self, node) -> str | None:
        if isinstance(node, ast.Name):
            return self.aliases.get(node.id, node.id)
        if isinstance(node, ast.Attribute):
            base = self.dotted(node.value)
            return f"{base}.{node.attr}" if base else None
        return None

    def visit_Attribute(self, node):
        name = self.dotted(node)
        if name and name.startswith("yaml.") and name.split(".", 1)[1] in UNSAFE_YAML:
            self._add(node, "unsafe yaml", name)
        self.generic_visit(node)

    def visit_Call(self, node):
        name = self.dotted(node.func) or ""
        kw = {k.arg: k.value for k in node.keywords if k.arg}
        last = name.rsplit(".", 1)[-1]
        if name in (
            "eval",
            "exec",
            "compile",
            "__import__",
            "builtins.eval",
            "builtins.exec",
            "builtins.compile",
            "pandas.eval",
        ):
            self._add(node, "eval/exec", name)
        if name in ("importlib.import_module", "importlib.__import__") and not (
            node.args and isinstance(node.args[0], ast.Constant)
        ):
            self._add(node, "dynamic import", name)
        if last == "read_pickle" or name in ("pandas.read_pickle", "numpy.lib.format.read_array"):
            self._add(node, "unpickle", name)
        if "allow_pickle" in kw and not (
            isinstance(kw["allow_pickle"], ast.Constant) and kw["allow_pickle"].value is False
        ):
            self._add(node, "unpickle", f"{name}(allow_pickle=...)")
        if name == "torch.load":
            wo = kw.get("weights_only")
            if not (isinstance(wo, ast.Constant) and wo.value is True):
                self._add(node, "torch.load", "torch.load without weights_only=True")
        if name.startswith("os.") and last in OS_EXEC or name in ("pty.spawn", "commands.getoutput"):
            self._add(node, "shell", name)
        if "shell" in kw and not (isinstance(kw["shell"], ast.Constant) and kw["shell"].value is False):
            self._add(node, "shell", f"{name}(shell=...)")
        self.generic_visit(node)


def scan_source(text: str) -> list[tuple[int, str, str]]:
    s = _Scanner()
    s.visit(ast.parse(text))
    return s.findings


def scan_package() -> dict[tuple[str, str, str], int]:
    out = {}
    for path in PY_FILES:
        for line, rule, detail in scan_source(path.read_text()):
            out[(_rel(path), rule, detail)] = line
    return out


# Findings that are legitimate, with the reason (file, rule, detail) -> why.
ALLOWED = {
    (
        "pipeline/errors.py",
        "dynamic import",
        "importlib.import_module",
    ): "require(module, purpose) imports an optional dependency; every caller passes a constant module name",
    (
        "pipeline/evaluation/compare.py",
        "dynamic import",
        "importlib.import_module",
    ): "_warm_imports: the module name comes from a fixed dict of library names (or 'numpy'), never from the user",
}


def test_scanner_finds_planted_problems():
    """The scanner is not blind: each unsafe pattern in a planted snippet is found, safe look-alikes are not."""
    bad = """
import pickle
import numpy as np
import pandas as pd
import subprocess, os, yaml, torch
from yaml import FullLoader
eval(s); exec(s); compile(s, "f", "exec"); __import__(s)
np.load(f, allow_pickle=True); pd.read_pickle(f); df.read_pickle(f)
subprocess.run(cmd, shell=True); os.system(cmd); os.popen(cmd)
yaml.load(s, Loader=yaml.Loader); yaml.unsafe_load(s)
torch.load(f); torch.load(f, weights_only=False)
"""
    rules = sorted({(r, d) for _, r, d in scan_source(bad)})
    for want in [
        ("unsafe import", "pickle"),
        ("eval/exec", "eval"),
        ("eval/exec", "exec"),
        ("eval/exec", "compile"),
        ("eval/exec", "__import__"),
        ("unpickle", "numpy.load(allow_pickle=...)"),
        ("unpickle", "pandas.read_pickle"),
        ("unpickle", "df.read_pickle"),
        ("shell", "subprocess.run(shell=...)"),
        ("shell", "os.system"),
        ("shell", "os.popen"),
        ("unsafe yaml", "yaml.load"),
        ("unsafe yaml", "yaml.Loader"),
        ("unsafe yaml", "yaml.unsafe_load"),
        ("unsafe yaml", "yaml.FullLoader"),
        ("torch.load", "torch.load without weights_only=True"),
    ]:
        assert want in rules, (want, rules)
    safe = """
import re, torch, yaml, subprocess
import numpy as np
re.compile("x"); torch.compile(m); model.eval(); yaml.safe_load(s); yaml.safe_dump(d)
np.load(f); np.load(f, allow_pickle=False); subprocess.run(["git", "status"], shell=False)
torch.load(f, map_location="cpu", weights_only=True)
"""
    assert scan_source(safe) == []


@pytest.mark.reliability("security", "no eval/exec/compile, pickle, shell or dynamic import of user data in pipeline/")
def test_no_eval_exec_pickle_or_shell_in_package(reliability):
    found = scan_package()
    unexpected = {k: v for k, v in found.items() if k not in ALLOWED}
    stale = [k for k in ALLOWED if k not in found]
    reliability(
        observed=f"AST scan of {len(PY_FILES)} modules: {len(found)} finding(s), all whitelisted with a reason "
        f"({'; '.join(f'{k[0]}: {k[2]}' for k in sorted(found))})"
        if not unexpected
        else f"unexpected: {sorted(unexpected)}",
        kept="n/a (static)",
    )
    assert not unexpected, "\n".join(
        f"{f}:{line}: {rule}: {detail}" for (f, rule, detail), line in sorted(unexpected.items())
    )
    assert not stale, f"whitelist entries no longer needed (remove them): {stale}"


# ------------------------------------------------------------------------------------------------
# checkpoints: torch.load(weights_only=True), a pickle that runs code is refused
# ------------------------------------------------------------------------------------------------


@pytest.mark.reliability("security", "every torch.load in pipeline/ passes weights_only=True")
def test_every_torch_load_is_weights_only(reliability):
    calls = []
    for path in PY_FILES:
        s = _Scanner()
        tree = ast.parse(path.read_text())
        s.visit(tree)
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and s.dotted(node.func) == "torch.load":
                calls.append(f"{_rel(path)}:{node.lineno}")
        # `from torch import load` would hide a torch.load from the check above
        assert "torch.load" not in s.aliases.values(), f"{_rel(path)} imports torch.load under another name"
    bad = [(f, line) for (f, rule, _), line in scan_package().items() if rule == "torch.load"]
    reliability(
        observed=f"{len(calls)} torch.load call(s) ({', '.join(calls)}): all with weights_only=True",
        kept="n/a (static)",
    )
    assert calls, "no torch.load found: the scan is looking in the wrong place"
    assert not bad, bad


class _Payload:
    """Unpickling this object calls open(marker, 'w'): code execution from a data file."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _tiny_checkpoint(path: Path, extra=None) -> Path:
    import torch

    from pipeline.config import ModelConfig
    from pipeline.models import build_model
    from pipeline.models.checkpoint import save_checkpoint

    cfg = ModelConfig(
        window=8, patch=4, dim=16, depth=1, heads=2, decoder_dim=16, decoder_depth=1, stem_channels=4, fusion_channels=8
    )
    groups = {"a": [0, 1]}
    torch.manual_seed(0)
    return save_checkpoint(
        path,
        build_model(cfg, groups),
        model_cfg=cfg,
        bands=["b0", "b1"],
        sources=["a", "a"],
        center=[0.0, 0.0],
        scale=[1.0, 1.0],
        groups=groups,
        extra=extra,
    )


@pytest.mark.parametrize("where", ["whole file", "inside a real checkpoint"])
@pytest.mark.reliability("security", "checkpoint holding a pickle that runs code is refused")
def test_checkpoint_with_code_is_refused(tmp_path, where, reliability):
    import torch

    from pipeline.errors import CheckpointError
    from pipeline.models.checkpoint import load_checkpoint
    from pipeline.scoring.score import load_model_cached

    marker = tmp_path / "pwned"
    evil = tmp_path / "model.pt"
    if where == "whole file":
        torch.save({"state_dict": _Payload(marker)}, evil)
    else:  # a real checkpoint, tampered: the payload hides in 'extra'
        torch.save(
            {
                **torch.load(_tiny_checkpoint(tmp_path / "ok.pt"), weights_only=True),
                "extra": {"note": _Payload(marker)},
            },
            evil,
        )
    with pytest.raises(CheckpointError) as e1:
        load_checkpoint(evil)
    with pytest.raises(CheckpointError) as e2:  # the scoring path (per-worker cache) reads it the same way
        load_model_cached(evil)
    msg = str(e1.value)
    assert not marker.exists(), "loading the checkpoint ran code"
    assert str(evil) in msg and "Fix" in msg and "\n" not in msg, msg
    assert "pickle" in msg.lower() or "refused" in msg.lower(), msg
    assert str(e2.value) == msg
    # control: the same payload does run code when unpickled without weights_only (so the check above is real)
    control = tmp_path / "control.pt"
    torch.save({"x": _Payload(tmp_path / "control-ran")}, control)
    torch.load(control, weights_only=False)
    assert (tmp_path / "control-ran").exists()
    reliability(observed=f"CheckpointError: {msg}", kept="no marker file (the payload never ran)")


# ------------------------------------------------------------------------------------------------
# YAML: safe loaders only; Python tags are refused
# ------------------------------------------------------------------------------------------------


@pytest.mark.reliability("security", "YAML is read with safe loaders only (static)")
def test_yaml_safe_loaders_only(reliability):
    found = [(f, d, line) for (f, rule, d), line in scan_package().items() if rule == "unsafe yaml"]
    texts = {p: p.read_text() for p in PY_FILES}
    safe = r"\byaml\.(safe_load|safe_load_all)\(|class \w+\(yaml\.SafeLoader\)"
    users = sorted(_rel(p) for p, t in texts.items() if re.search(safe, t))
    reliability(
        observed=f"no yaml.load/unsafe_load/full_load or Loader/FullLoader/UnsafeLoader in pipeline/; "
        f"YAML read with yaml.safe_load or a yaml.SafeLoader subclass in {', '.join(users)}",
        kept="n/a (static)",
    )
    assert not found, found
    assert "pipeline/untrusted.py" in users and "pipeline/run/cluster.py" in users, users


def _python_tag_yaml(marker: Path) -> str:
    return f'name: !!python/object/apply:os.system ["touch {marker}"]\n'


def test_yaml_payload_runs_when_loaded_unsafely(tmp_path):
    """Control for the two cases below: the payload is real."""
    marker = tmp_path / "control-ran"
    yaml.unsafe_load(_python_tag_yaml(marker))
    assert marker.exists()


@pytest.mark.reliability("security", "run config with a !!python tag is refused")
def test_run_config_with_python_tag_is_refused(mini_inputs, tmp_path, capsys, reliability):
    marker = tmp_path / "pwned"
    cfg = mini_inputs / "evil.yaml"
    text = (mini_inputs / "run.yaml").read_text().replace("name: mini\n", _python_tag_yaml(marker))
    assert "!!python" in text
    cfg.write_text(text)
    rc = main(["cube", str(cfg), "--out", str(tmp_path / "o"), "--quiet"])
    err = _one_error_line(capsys)
    reliability(observed=_stable(err), kept="no marker file, no output folder")
    assert rc == 2 and not marker.exists()
    assert "evil.yaml" in err and "python/object/apply" in err and "Fix" in err, err
    assert not (tmp_path / "o").exists()


@pytest.mark.reliability("security", "cluster profile with a !!python tag is refused")
def test_cluster_profile_with_python_tag_is_refused(mini_inputs, tmp_path, capsys, reliability):
    from pipeline.config import ClusterConfig
    from pipeline.errors import ConfigError
    from pipeline.run.cluster import load_profile, resolve_profile

    marker = tmp_path / "pwned"
    prof = tmp_path / "evil-profile.yaml"
    prof.write_text("kind: local\n" + _python_tag_yaml(marker).replace("name:", "memory_limit:"))
    rc = main(["run", str(mini_inputs / "run.yaml"), "--out", str(tmp_path / "o"), "--quiet", "--cluster", str(prof)])
    err = _one_error_line(capsys)
    reliability(observed=_stable(err), kept="no marker file, no output folder")
    assert rc == 2 and not marker.exists()
    assert "evil-profile.yaml" in err and "python/object/apply" in err, err
    assert not (tmp_path / "o").exists()
    # the other way in: `cluster: {profile: PATH}` inside a run config
    with pytest.raises(ConfigError):
        load_profile(prof)
    with pytest.raises(ConfigError):
        resolve_profile(ClusterConfig(profile=prof))
    assert not marker.exists()


@pytest.mark.reliability("security", "cluster profile with a !!python tag: the error names the fix")
def test_cluster_profile_python_tag_error_names_the_fix(tmp_path, capsys, reliability):
    from pipeline.errors import ConfigError
    from pipeline.run.cluster import load_profile

    prof = tmp_path / "evil-profile.yaml"
    prof.write_text("kind: local\n" + _python_tag_yaml(tmp_path / "pwned").replace("name:", "memory_limit:"))
    with pytest.raises(ConfigError) as e:
        load_profile(prof)
    msg = str(e.value)
    reliability(observed=f"error: {' '.join(msg.split())}", kept="no marker file")
    assert "\n" not in msg and "Fix" in msg, msg


# ------------------------------------------------------------------------------------------------
# pandas query strings (layer 'query:', deposits 'query:')
# ------------------------------------------------------------------------------------------------

# pandas DataFrame.query (engine 'python' here: numexpr is not installed) evaluates attribute access and calls,
# so an unchecked 'query:' string could run a shell command or write files. pipeline.config.safe_query checks
# every query against a whitelist of syntax (in the LayerConfig/DepositsConfig validators, and again right
# before each df.query in ingest, grid and evaluate).


def _query_payload(column: str, marker: Path) -> str:
    return f"{column}.__class__.__init__.__globals__['sys'].modules['os'].system('touch {marker}') == 0"


def test_query_payload_runs_in_plain_pandas(tmp_path):
    """Control for the cases below: these query strings run a shell command / write a file in pandas itself."""
    import pandas as pd

    for i, payload in enumerate(
        [_query_payload("Cr", tmp_path / "control-ran-0"), f"Cr.to_csv('{tmp_path / 'control-ran-1'}') == 0"]
    ):
        try:
            pd.DataFrame({"Cr": [1.0, 2.0]}).query(payload)
        except Exception:
            pass  # the result is not a boolean mask; the command has run by then
        assert (tmp_path / f"control-ran-{i}").exists(), payload


def _cube_with_layer(mini_inputs, tmp_path, layer: dict, deposits: dict | None = None) -> tuple[int, Path]:
    cfg = yaml.safe_load((mini_inputs / "run.yaml").read_text())
    cfg["layers"].append(layer)
    if deposits:
        cfg["deposits"] = deposits
    path = mini_inputs / "evil.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return main(["cube", str(path), "--out", str(tmp_path / "o"), "--quiet"]), tmp_path / "o"


@pytest.mark.parametrize("kind", ["points CSV layer", "vector layer"])
@pytest.mark.reliability("security", "layer query string that calls code is refused")
def test_layer_query_cannot_run_code(mini_inputs, tmp_path, capsys, kind, reliability):
    marker = tmp_path / "pwned"
    if kind == "points CSV layer":
        layer = {
            "name": "q",
            "path": "samples.csv",
            "source": "geochemistry",
            "kind": "points",
            "x": "X",
            "y": "Y",
            "crs": "EPSG:4326",
            "columns": ["Cr"],
            "query": _query_payload("Cr", marker),
        }
    else:
        layer = {
            "name": "q",
            "path": "geology.gpkg",
            "layer": "lithology",
            "source": "geology",
            "kind": "indicator",
            "query": _query_payload("ROCKTYPE", marker),
        }
    rc, out = _cube_with_layer(mini_inputs, tmp_path, layer)
    err = _one_error_line(capsys)
    reliability(
        observed=f"{err} (marker file {'CREATED: the query ran a shell command' if marker.exists() else 'absent'})",
        kept="no output folder" + ("; the marker file the query's shell command created" if marker.exists() else ""),
    )
    assert rc == 2 and "'q'" in err and "query" in err
    assert not marker.exists(), "the layer's query string ran a shell command"
    assert "a function call" in err and "Fix: only comparisons of columns with values" in err, err
    assert not out.exists()


@pytest.mark.reliability("security", "deposits query string that calls code is refused")
def test_deposits_query_cannot_run_code(mini_inputs, tmp_path, capsys, reliability):
    import pandas as pd
    from pydantic import ValidationError

    from pipeline.config import DepositsConfig
    from pipeline.evaluation.evaluate import DepositsError, load_deposits

    marker = tmp_path / "pwned"
    pd.DataFrame({"X": [500_100.0, 500_900.0], "Y": [3_999_500.0, 3_998_800.0], "type": ["a", "b"]}).to_csv(
        tmp_path / "deposits.csv", index=False
    )
    deposits = dict(
        path=str(tmp_path / "deposits.csv"), x="X", y="Y", crs="EPSG:32646", query=_query_payload("X", marker)
    )
    # the run config: refused when it is read, before any stage
    cfg = yaml.safe_load((mini_inputs / "run.yaml").read_text())
    (mini_inputs / "evil.yaml").write_text(yaml.safe_dump({**cfg, "deposits": deposits}))
    rc = main(["cube", str(mini_inputs / "evil.yaml"), "--out", str(tmp_path / "o"), "--quiet"])
    err = _one_error_line(capsys)
    assert rc == 2 and "deposits.query" in err and "a function call" in err and "Fix:" in err, err
    assert not (tmp_path / "o").exists()
    # the config model itself
    with pytest.raises(ValidationError, match="query .* uses a function call"):
        DepositsConfig(**deposits)
    # a DepositsConfig built without validation: load_deposits checks the query again before pandas sees it
    unchecked = ""
    try:
        load_deposits(DepositsConfig.model_construct(**{**deposits, "path": Path(deposits["path"]), "layer": None}))
    except DepositsError as exc:
        unchecked = str(exc)
    reliability(
        observed=f"{err} (marker file {'CREATED' if marker.exists() else 'absent'}; load_deposits of an "
        f"unvalidated DepositsConfig: {unchecked.split('. Fix:')[0] or 'no error'})",
        kept="no output folder" + ("; the marker file" if marker.exists() else ""),
    )
    assert unchecked and "Fix:" in unchecked and "\n" not in unchecked, unchecked
    assert not marker.exists(), "the deposits query string ran a shell command"


def test_query_is_checked_again_where_it_is_used(mini_inputs, tmp_path):
    """Defence in depth: a layer config that skipped validation (model_copy(update=...), model_construct) is
    refused by the readers themselves (points CSV and vector), before pandas evaluates the query."""
    from pipeline.config import RunConfig
    from pipeline.data.ingest import target_geobox
    from pipeline.data.points import _read_point_arrays
    from pipeline.data.vectors import read_vector
    from pipeline.errors import LayerError

    marker = tmp_path / "pwned"
    cfg = RunConfig.from_yaml(mini_inputs / "run.yaml")
    points = next(l for l in cfg.layers if l.kind == "points")
    evil = points.model_copy(update={"query": _query_payload("Cr", marker)})  # no validation on model_copy
    with pytest.raises(LayerError, match=r"layer 'ss': query .* uses a function call.*Fix: only comparisons"):
        _read_point_arrays(evil, cfg, target_geobox(cfg).crs)
    with pytest.raises(LayerError, match=r"layer 'lith': query .* uses a function call.*Fix: only comparisons"):
        read_vector(mini_inputs / "geology.gpkg", "lithology", "lith", None, _query_payload("ROCKTYPE", marker))
    assert not marker.exists()


# what the whitelist accepts: each query validates unchanged, and pandas evaluates it to the expected rows
ACCEPTED = [
    ("type == 'chromite'", [0, 2]),
    ("Cr > 10 and not (Ni < 3)", [1, 2]),
    ("Cr > 10 and not (type == 'nickel')", [2]),
    ("`Au ppb` > 5", [1, 2]),
    ("kind in ['a', 'b']", [0, 1]),
    ("kind not in ('a',) or Cr <= 1", [0, 1, 2]),
    ("(Cr > 25) | ~(type == 'chromite') & (Ni < 3)", [2]),
    ("Cr * 2 + Ni ** 2 > 40 and -Cr < 0", [1, 2]),
    ("type == 'No. #3 @ x`y'", []),  # '#', '@' and '`' inside a string are text
    ("`Au ppb` != 0 and `Ni` == 5", [1, 2]),
]


@pytest.mark.parametrize("query,rows", ACCEPTED, ids=[q for q, _ in ACCEPTED])
def test_safe_query_accepts_row_selections(query, rows):
    import pandas as pd

    from pipeline.config import DepositsConfig, LayerConfig, safe_query

    df = pd.DataFrame(
        {
            "type": ["chromite", "nickel", "chromite"],
            "Cr": [1.0, 20.0, 30.0],
            "Ni": [1, 5, 5],
            "Au ppb": [0.5, 6.0, 9.0],
            "kind": ["a", "b", "c"],
        }
    )
    assert safe_query(query) == query
    assert LayerConfig(name="l", path="f.gpkg", kind="indicator", query=query).query == query
    assert DepositsConfig(path="d.csv", query=query).query == query
    assert df.query(query).index.tolist() == rows


def test_existing_queries_still_validate():
    """The queries of the shipped configs, the synthetic province and the README still pass the check."""
    from pipeline.config import safe_query

    found = []
    for cfg in sorted((ROOT / "configs").glob("*.yaml")):
        data = yaml.safe_load(cfg.read_text())
        for item in [*data.get("layers", []), data.get("deposits") or {}]:
            if item.get("query"):
                found.append(safe_query(item["query"]))
    synthetic = (PKG / "data" / "synthetic.py").read_text()
    readme = (ROOT / "README.md").read_text()
    for text in (synthetic, readme):
        found += [safe_query(q) for q in re.findall(r"""["']?query["']?\s*:\s*"([^"]+)\"""", text)]
    assert "type == 'chromite'" in found, found


REFUSED = [
    ("Cr.to_csv('/tmp/x') == 0", "a function call ('Cr.to_csv(...)')"),
    ("abs(Cr) > 1", "a function call ('abs(...)')"),
    ("Cr.size > 0", "attribute access ('.size')"),
    ("Cr[0] > 1", "indexing ('Cr[0]')"),
    ("Cr > @limit", "a local variable reference ('@')"),
    ("__class__ == 1", "a name starting with '__'"),
    ("(lambda: 1)() == 1", "a function call"),
    ("[c for c in Cr] == []", "a comprehension"),
    ("(y := Cr) > 1", "an assignment (:=)"),
    ("f'{Cr}' == 'a'", "an f-string"),
    ("Cr if Ni else Co", "a conditional expression"),
    ("Cr == {1}", "a set"),
    ("Cr is None", "'is'"),
    ("Cr @ Ni", "a local variable reference ('@')"),
    ("2 ** 10 ** 10 > 1", "a power with a huge exponent"),
    ("'a' * 10 ** 9 == kind", "arithmetic on a string"),
    ("type == '`' or Cr.__class__ == '`'", "attribute access ('.__class__')"),  # backticks inside strings
    ("type == 'x\\' or Cr.size > 0 or type == '", "a backslash"),
    ("Cr > 1 # a comment", "a comment ('#')"),
    ("Cr > 1\nor Cr.size", "the control character '\\n'"),
    ("type == 'chromite", "has an unclosed quote"),
    ("`Au ppb > 5", "has an unclosed backtick"),
    ("Cr >", "is not a valid expression"),
    ("x == 1j", "the constant 1j"),
]


@pytest.mark.parametrize("query,what", REFUSED, ids=[q for q, _ in REFUSED])
def test_safe_query_refuses_everything_else(query, what):
    from pydantic import ValidationError

    from pipeline.config import DepositsConfig, QueryError, safe_query

    with pytest.raises(QueryError) as e:
        safe_query(query)
    msg = str(e.value)
    assert what in msg and f"query {query!r}" in msg, msg
    assert "Fix: only comparisons of columns with values, combined with and/or/not, are allowed" in msg
    with pytest.raises(ValidationError, match="query"):
        DepositsConfig(path="d.csv", query=query)


def _refused_case(case: str, query: str, what: str):
    return pytest.param(
        query, what, id=case, marks=pytest.mark.reliability("security", f"layer query with {case} is refused")
    )


@pytest.mark.parametrize(
    "query,what",
    [
        _refused_case("attribute access", "Cr.size > 0", "attribute access ('.size')"),
        _refused_case(
            "a method call that writes a file", "Cr.to_csv('{marker}') == 0", "a function call ('Cr.to_csv(...)')"
        ),
        _refused_case("a function call", "abs(Cr) > 1", "a function call ('abs(...)')"),
        _refused_case("indexing", "Cr[0] > 1", "indexing ('Cr[0]')"),
        _refused_case("an @ local variable", "Cr > @limit", "a local variable reference ('@')"),
        _refused_case("a dunder name", "__class__ == 1", "a name starting with '__' ('__class__'"),
        _refused_case(
            "a power of a power on the left side (hung pandas)",
            "((10**1000)**1000)**1000 > Cr",
            "a power with a huge exponent",
        ),
        _refused_case("an integer literal of 200 digits", "Cr > " + "9" * 200, "a literal too large to be a value"),
        _refused_case(
            "a string literal of 2,000 characters", "type == '" + "a" * 2000 + "'", "a literal too large to be a value"
        ),
        _refused_case("a query of 5,000 characters", "Cr > 1 and " * 500 + "Cr > 1", "is 5506 characters long"),
    ],
)
def test_refused_query_through_the_cli(mini_inputs, tmp_path, capsys, query, what, reliability):
    marker = tmp_path / "written-by-the-query.csv"
    query = query.format(marker=marker)
    layer = {
        "name": "q",
        "path": "samples.csv",
        "source": "geochemistry",
        "kind": "points",
        "x": "X",
        "y": "Y",
        "crs": "EPSG:4326",
        "columns": ["Cr"],
        "query": query,
    }
    rc, out = _cube_with_layer(mini_inputs, tmp_path, layer)
    err = _one_error_line(capsys)
    reliability(
        observed=_stable(err), kept="no output folder" + ("; the file the query wrote" if marker.exists() else "")
    )
    assert rc == 2 and "layers[5] (name: 'q').query" in err and what in err, err
    assert "Fix: only comparisons of columns with values, combined with and/or/not, are allowed" in err
    assert not out.exists() and not marker.exists()
    assert len(err) < 600, f"the message is {len(err)} characters long"


# ------------------------------------------------------------------------------------------------
# hostile YAML: aliases, size, and error messages that never repr() unbounded input
# ------------------------------------------------------------------------------------------------


def _bomb(levels: int = 9, width: int = 9) -> str:
    lines = [f"a0: &a0 [{', '.join(['lol'] * width)}]"]
    for i in range(1, levels):
        lines.append(f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * width)}]")
    return "\n".join(lines) + "\n"


@pytest.mark.reliability("security", "YAML alias bomb (9^9 values) under a misspelt key")
def test_yaml_alias_bomb_is_refused_at_once(mini_inputs, tmp_path, capsys, reliability):
    import time

    text = (mini_inputs / "run.yaml").read_text()
    bomb = mini_inputs / "bomb.yaml"
    # the anchors live under a misspelt top-level key: the error formatter once repr()'d the expansion
    bomb.write_text(text + "extras:\n" + "".join("  " + line + "\n" for line in _bomb().splitlines()))
    t0 = time.perf_counter()
    rc = main(["cube", str(bomb), "--out", str(tmp_path / "o"), "--quiet"])
    took = time.perf_counter() - t0
    err = _one_error_line(capsys)
    assert rc == 2 and "aliases expand it to more than 100,000 values" in err and "Fix" in err, err
    assert took < 5 and len(err) < 400, (took, len(err))
    assert not (tmp_path / "o").exists()
    reliability(observed=_stable(err) + f" ({took:.2f} s)", kept="no output folder")


@pytest.mark.reliability("security", "run config of 2 MiB (a data file passed as the config)")
def test_yaml_over_the_size_limit(tmp_path, capsys, reliability):
    big = tmp_path / "big.yaml"
    big.write_text("name: x\nnotes: '" + "a" * (2 << 20) + "'\n")
    rc = main(["cube", str(big), "--out", str(tmp_path / "o")])
    err = _one_error_line(capsys)
    assert rc == 2 and "2.0 MiB, over the limit of 1 MiB" in err and len(err) < 400, err
    reliability(observed=_stable(err), kept="no output folder")


@pytest.mark.reliability("security", "misspelt key holding 900 KB / 50,000 values: the message stays short")
def test_error_messages_never_repr_unbounded_input(mini_inputs, tmp_path, capsys, reliability):
    data = yaml.safe_load((mini_inputs / "run.yaml").read_text())
    cases = {
        "a long string": {**data, "nmae": "x" * 900_000},
        "a long list": {**data, "nmae": list(range(50_000))},
        "a long layer name": {**data, "layers": [{**data["layers"][0], "name": "n" * 500_000}]},
        "a long query": {**data, "deposits": {"path": "d.csv", "query": "Cr > 1 and " * 50_000}},
    }
    lines = []
    for what, cfg in cases.items():
        path = tmp_path / f"{len(lines)}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        assert main(["cube", str(path), "--out", str(tmp_path / "o")]) == 2
        err = _one_error_line(capsys)
        assert len(err) < 700, f"{what}: a message of {len(err)} characters"
        lines.append(len(err))
    reliability(
        observed=f"one line each, of {min(lines)} to {max(lines)} characters (the values cut with '...')",
        kept="no output folder",
    )


# ------------------------------------------------------------------------------------------------
# the local cluster mpm starts itself
# ------------------------------------------------------------------------------------------------

LOCAL_DASHBOARD_BUG = (
    "pipeline/run/cluster.py build_cluster (kind 'local') passes dashboard_address=':0', and an empty "
    "host binds the scheduler's dashboard on every interface (0.0.0.0, a random port) while the "
    "scheduler and workers listen on 127.0.0.1; fix: dashboard_address='127.0.0.1:0'"
)


@pytest.mark.reliability("security", "local cluster listens on the loopback interface only")
def test_local_cluster_listens_on_loopback_only(reliability):
    import distributed
    import psutil

    from pipeline.config import ClusterConfig
    from pipeline.run.cluster import build_cluster

    cluster = build_cluster(ClusterConfig(kind="local", n_workers=1, memory_limit="1GiB"))
    try:
        with distributed.Client(cluster) as client:
            client.wait_for_workers(1, timeout=60)
            listening = set()
            for proc in [psutil.Process(), *psutil.Process().children(recursive=True)]:
                try:
                    conns = proc.net_connections(kind="inet")
                except psutil.Error:
                    continue
                listening |= {(c.laddr.ip, c.laddr.port) for c in conns if c.status == psutil.CONN_LISTEN}
            ours = {
                int(a.rsplit(":", 1)[1])
                for a in [cluster.scheduler_address, *(w.address for w in cluster.workers.values())]
            }
            ours.add(int(cluster.dashboard_link.split(":")[2].split("/")[0]))
    finally:
        cluster.close()
    public = sorted((ip, port) for ip, port in listening if ip not in ("127.0.0.1", "::1"))
    dash = cluster.dashboard_link.split(":")[2].split("/")[0]
    reliability(
        observed=(
            "every socket of the scheduler, nanny, worker and dashboard on 127.0.0.1"
            if not public
            else f"{len(public)} of {len(listening)} listening sockets on all interfaces "
            f"({'the dashboard' if any(str(p) == dash for _, p in public) else 'not the dashboard'})"
        ),
        kept="n/a (cluster closed)",
    )
    assert ours <= {p for _, p in listening}, (ours, listening)
    assert not public, f"listening on every interface: {public}"


# ------------------------------------------------------------------------------------------------
# deploy/: nothing exposed without authentication, TLS documented
# ------------------------------------------------------------------------------------------------

DEPLOY_YAMLS = sorted(p for p in DEPLOY.rglob("*") if p.suffix in (".yaml", ".yml"))
PUBLIC = {"LoadBalancer", "NodePort"}


def _walk(node, path=()):
    yield path, node
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _walk(v, (*path, str(k)))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _walk(v, (*path, str(i)))


def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _ports(service: dict) -> set:
    out = set()
    for p in service.get("ports") or []:
        out |= {p.get("port"), p.get("targetPort"), p.get("nodePort"), p.get("name")}
    return out


@pytest.mark.reliability("security", "no scheduler or dashboard exposed publicly in deploy/ manifests")
def test_no_public_scheduler_or_dashboard(reliability):
    services = []
    for path in DEPLOY_YAMLS:
        for doc in _docs(path):
            for where, node in _walk(doc):
                if not isinstance(node, dict):
                    continue
                # a Service (a k8s Service, a DaskCluster's scheduler.service, traefik's service in Helm values)
                stype = node.get("type") if isinstance(node.get("type"), str) else None
                if stype in PUBLIC | {"ClusterIP", "ExternalName"} and (
                    where and where[-1] == "service" or doc.get("kind") == "Service"
                ):
                    services.append((f"{path.relative_to(DEPLOY)}:{'.'.join(where) or doc.get('kind')}", stype))
                    assert stype not in PUBLIC, (
                        f"{path.relative_to(DEPLOY)}: {'.'.join(where)} is a {stype} Service (ports {_ports(node)}): "
                        "the scheduler and dashboard have no authentication; keep ClusterIP and use port-forward or an "
                        "authenticating proxy"
                    )
                if "scheduler_service_type" in node:  # kubernetes profiles
                    assert node["scheduler_service_type"] == "ClusterIP", (path, node["scheduler_service_type"])
                for key in ("hostNetwork", "hostPort"):
                    assert key not in node, f"{path.relative_to(DEPLOY)}: {'.'.join(where)} uses {key}"
    # the README's docker examples publish the dashboard on the loopback interface only
    readme = (DEPLOY / "README.md").read_text().replace("\\\n", " ")  # join continued lines
    published = []
    for line in readme.splitlines():
        if "docker run" in line:
            args = shlex.split(line.split("docker run", 1)[1].split("#")[0])
            published += [v for a, v in zip(args, args[1:]) if a in ("-p", "--publish")]
            published += [a.split("=", 1)[1] for a in args if a.startswith("--publish=")]
    for spec in published:
        parts = spec.split(":")
        assert len(parts) == 3 and parts[0] in ("127.0.0.1", "localhost", "[::1]"), (
            f"README publishes {spec} on all interfaces"
        )
    reliability(
        observed=f"{len(services)} Service(s) in deploy/ ({', '.join(f'{w} {t}' for w, t in services)}), none "
        f"LoadBalancer/NodePort, no hostNetwork/hostPort; README publishes only {', '.join(published)}",
        kept="n/a (static)",
    )
    assert len(services) >= 3


def _secretish(key: str) -> bool:
    return bool(re.search(r"(password|passwd|token|secret|api_?key)$", key.replace("-", "_"), re.I))


@pytest.mark.reliability("security", "gateway and profiles authenticate, with no credential in the files")
def test_gateway_auth_and_no_credentials_in_deploy(reliability):
    # credentials never sit in the repository: every password/token/secret key is empty or names a Secret
    for path in DEPLOY_YAMLS:
        for doc in _docs(path):
            for where, node in _walk(doc):
                if where and _secretish(where[-1]) and node not in (None, ""):
                    raise AssertionError(f"{path.relative_to(DEPLOY)}: {'.'.join(where)} holds a literal credential")
    values = yaml.safe_load((DEPLOY / "gateway" / "values.yaml").read_text())
    auth = values["gateway"]["auth"]
    if auth["type"] == "simple":  # allowed only as a documented development setup with a password from a Secret
        text = (DEPLOY / "gateway" / "values.yaml").read_text().lower()
        assert "development" in text or "dev only" in text
        assert not auth.get("simple", {}).get("password")
    else:
        assert auth["type"] in ("jupyterhub", "kerberos"), auth["type"]
    if auth["type"] == "jupyterhub":
        assert auth["jupyterhub"].get("apiToken") in (None, ""), "the hub's API token must come from a Secret"
        assert "apiTokenFromSecretName" in (DEPLOY / "gateway" / "values.yaml").read_text()
    # the client side of the gateway: the profile authenticates too
    prof = yaml.safe_load((DEPLOY / "profiles" / "gateway-gpu.yaml").read_text())
    assert prof["gateway"].get("auth") in ("jupyterhub", "kerberos"), prof["gateway"].get("auth")
    reliability(
        observed=f"gateway auth '{auth['type']}' (API token from a Secret), gateway profile auth "
        f"'{prof['gateway']['auth']}', no literal password/token/secret in {len(DEPLOY_YAMLS)} YAML files",
        kept="n/a (static)",
    )


def _flat(d: dict, prefix: str = "") -> dict:
    """Dotted keys of a nested dask config, so that dask.config.set merges it as a config file would be merged
    (a nested dict given to dask.config.set replaces whole subtrees)."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat(v, key + "."))
        else:
            out[key] = v
    return out


def _k8s_clusters():
    """(namespace, cluster name) of every DaskCluster / DaskJob manifest."""
    out = []
    for path in DEPLOY_YAMLS:
        for doc in _docs(path):
            if doc.get("kind") in ("DaskCluster", "DaskJob"):
                out.append((doc["metadata"].get("namespace", "default"), doc["metadata"]["name"], path.name))
    return out


@pytest.mark.reliability("security", "Kubernetes: a NetworkPolicy keeps other namespaces off the scheduler and workers")
def test_network_policy_guards_dask_pods(reliability):
    policies = [(p, d) for p in DEPLOY_YAMLS for d in _docs(p) if d.get("kind") == "NetworkPolicy"]
    clusters = _k8s_clusters()
    assert clusters
    covered = []
    for ns, name, file in clusters:
        match = []
        for path, pol in policies:
            if pol["metadata"].get("namespace") != ns:
                continue
            spec = pol["spec"]
            sel = spec["podSelector"]
            comps = set()
            for e in sel.get("matchExpressions", []):
                if e["key"] == "dask.org/component" and e["operator"] == "In":
                    comps |= set(e["values"])
            if sel.get("matchLabels", {}).get("dask.org/component"):
                comps.add(sel["matchLabels"]["dask.org/component"])
            if not {"scheduler", "worker"} <= comps or "Ingress" not in spec.get("policyTypes", []):
                continue
            # every ingress rule admits pods of this namespace or named namespaces only, never everything
            for rule in spec.get("ingress", []):
                sources = rule.get("from")
                assert sources, f"{path.name}: an ingress rule without 'from' admits every source"
                for src in sources:
                    assert "ipBlock" not in src, f"{path.name}: ipBlock ingress {src}"
                    if "namespaceSelector" in src:
                        assert src["namespaceSelector"].get("matchLabels"), (
                            f"{path.name}: all namespaces admitted: {src}"
                        )
            match.append(path.name)
        assert match, (
            f"{file}: no NetworkPolicy in namespace {ns!r} restricts ingress to the scheduler and workers of {name!r}"
        )
        covered.append(f"{name} ({ns})")
    reliability(
        observed=f"DaskCluster/DaskJob {', '.join(covered)}: scheduler and worker pods only reachable from "
        "their namespace and the operator's (NetworkPolicy)",
        kept="n/a (static)",
    )


@pytest.mark.reliability("security", "TLS for raw clusters is documented and the documented config works")
def test_tls_documented_and_config_gives_encrypted_scheduler(tmp_path, reliability):
    import asyncio

    import dask
    from distributed import Client, Scheduler, Security

    readme = (DEPLOY / "README.md").read_text()
    m = re.search(r"^## Security.*?(?=^## |\Z)", readme, re.S | re.M)
    assert m, "deploy/README.md has no '## Security' section"
    section = m.group(0)
    for needle in (
        "--tls-ca-file",
        "--tls-cert",
        "--tls-key",
        "require-encryption",
        "tls://",
        "deploy/dask/tls.yaml",
        "port-forward",
        "security: true",
    ):
        assert needle in section, f"the Security section of deploy/README.md does not mention {needle!r}"
    # the dask config the README points at turns TLS on for every client, worker and scheduler that reads it
    tls_cfg = _flat(yaml.safe_load((DEPLOY / "dask" / "tls.yaml").read_text()))
    with dask.config.set(tls_cfg):
        assert dask.config.get("distributed.comm.require-encryption") is True
        sec = Security()
        assert sec.require_encryption and sec.tls_ca_file and sec.tls_client_cert and sec.tls_scheduler_cert

    # and it works: certificates written where the config says, a scheduler that requires TLS refuses plain TCP
    tmp = Security.temporary()
    paths = {"ca": tmp_path / "ca.pem", "cert": tmp_path / "mpm.pem", "key": tmp_path / "mpm.key"}
    paths["ca"].write_text(tmp.tls_ca_file)
    paths["cert"].write_text(tmp.tls_scheduler_cert)
    paths["key"].write_text(tmp.tls_scheduler_key)
    text = (DEPLOY / "dask" / "tls.yaml").read_text()
    for placeholder, p in (
        ("/etc/dask/tls/ca.pem", paths["ca"]),
        ("/etc/dask/tls/mpm.pem", paths["cert"]),
        ("/etc/dask/tls/mpm.key", paths["key"]),
    ):
        assert placeholder in text, placeholder
        text = text.replace(placeholder, str(p))
    cfg = _flat(yaml.safe_load(text))

    async def check():
        with dask.config.set(cfg):
            async with Scheduler(host="127.0.0.1", port=0, dashboard=False, security=Security(), protocol="tls") as s:
                assert s.address.startswith("tls://")
                async with Client(s.address, asynchronous=True, security=Security()) as c:
                    ok = (await c.scheduler.identity())["address"] == s.address
                plain = s.address.replace("tls://", "tcp://")
        refused = None
        with dask.config.set({"distributed.comm.timeouts.connect": "2s"}):
            try:
                async with Client(plain, asynchronous=True, timeout="2s"):
                    refused = False
            except Exception as exc:  # the TLS listener never completes a plain-TCP handshake
                refused = type(exc).__name__
        return s.address, ok, refused

    address, ok, refused = asyncio.run(check())
    reliability(
        observed=f"deploy/README.md ## Security documents --tls-* and require-encryption; with "
        f"deploy/dask/tls.yaml a scheduler listens on tls:// and a TLS client connects ({ok}); a "
        f"plain tcp:// client is refused ({refused})",
        kept="n/a (certificates in a temporary folder)",
    )
    assert ok is True and refused not in (None, False)
