"""Hugging Face remote code for exported folders, generated from this package's own sources.

``AutoModel.from_pretrained(folder, trust_remote_code=True)`` must work where this package is not installed, so
an export carries the ``mono/*.py`` modules the model needs under flat, release-style names (``mono/modeling.py``
-> ``modeling_mono_internvl.py``, ...), their relative imports rewritten to those names, and ``import kernels``
replaced by a generated ``mono_kernels.py``: the routing and torch backend of ``kernels/moe`` plus a small
torch-only ``moe_ffn`` / ``routed_linear`` surface with the signatures of :mod:`kernels`. Nothing is maintained
by hand twice: the files are rebuilt from the sources on every export.

The rewriting is strict. Every ``import`` in every bundled module (inside functions too: transformers scans those,
only ``try`` blocks are exempt) must be the standard library, a package a transformers install always has
(:data:`THIRD_PARTY`), a relative import of a module listed in :data:`MONO_MODULES`, or ``kernels`` (only the names
in :data:`KERNELS_SURFACE`). Anything else raises :class:`RemoteCodeError` naming the file and line, so a new import
in ``mono/`` breaks the export (and its test) instead of a user's clean environment. The result is then checked
with transformers' own ``get_imports`` / ``get_relative_import_files``.
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Mapping
from pathlib import Path

__all__ = [
    "AUTO_MAP", "KERNELS_MODULE", "KERNELS_SURFACE", "MONO_MODULES", "REMOTE_ROOTS", "RemoteCodeError", "THIRD_PARTY",
    "bundle_sources", "check_bundle", "kernels_module_source", "rewrite_module", "write_remote_code",
]

_REPO = Path(__file__).resolve().parents[2]
MONO_DIR = _REPO / "mono"
KERNELS_DIR = _REPO / "kernels" / "moe"

# mono/<key>.py (dots for subpackages) -> flat module name in the export (release style: role first, model name
# after).
MONO_MODULES: dict[str, str] = {
    "configuration": "configuration_mono_internvl",
    "modeling": "modeling_mono_internvl",
    "internlm2": "modeling_internlm2_ve",
    "vision": "modeling_patch_embed",
    "checkpoint": "checkpoint_mono_internvl",
    "templates": "conversation_mono_internvl",
    "tokenization": "tokenization_mono_internvl",
    "conversion": "conversion_mono_internvl",
    "processing": "image_processing_mono_internvl",
    # LMDeploy's PyTorch engine: the folder registers its own model (mono/deploy/lmdeploy/autoregister.py).
    "deploy.lmdeploy.autoregister": "lmdeploy_register_mono_internvl",
    "deploy.lmdeploy.models": "lmdeploy_mono_internvl",
    "deploy.lmdeploy.mapping": "lmdeploy_mapping_mono_internvl",
}
# Bundled with everything they import: the model, its config, and the image preprocessing (``load_image``), which
# the model does not import but a user of the folder needs to build ``pixel_values``.
REMOTE_ROOTS = ("modeling", "configuration", "processing", "deploy.lmdeploy.autoregister")
KERNELS_MODULE = "mono_kernels"
# kernels/moe/<name>.py copied into mono_kernels.py, in dependency order (torch backend only: no Triton, MegaBlocks).
KERNELS_SOURCES = ("routing", "torch_backend")
KERNELS_SURFACE = ("Routing", "build_routing", "moe_ffn", "routed_linear")
# Installed wherever transformers is: transformers itself and its hard requirements (tokenizers, safetensors, numpy,
# huggingface_hub), torch (the model), and PIL (Pillow: only the image preprocessing module imports it).
THIRD_PARTY = frozenset({"torch", "transformers", "safetensors", "tokenizers", "numpy", "huggingface_hub", "PIL"})
OWN_PACKAGES = frozenset({"mono", "kernels", "evip", "benchmarks"})
# Packages a bundled module may import beyond THIRD_PARTY, by module-name prefix: the LMDeploy model needs LMDeploy
# (transformers never imports these files itself: only the configuration module's hook does, when LMDeploy runs).
EXTRA_THIRD_PARTY: dict[str, frozenset[str]] = {"deploy.lmdeploy.": frozenset({"lmdeploy"})}

AUTO_MAP = {
    "AutoConfig": f"{MONO_MODULES['configuration']}.MonoInternVLConfig",
    # The release's class name (an alias of MonoInternVL): LMDeploy 0.6.3-0.12.1 match auto_map by class name.
    "AutoModel": f"{MONO_MODULES['modeling']}.InternVLChatModel",
    "AutoModelForCausalLM": f"{MONO_MODULES['modeling']}.InternVLChatModel",
}

# transformers copies a remote-code file's siblings only when they appear in a `from .name import ...` line
# (dynamic_module_utils.get_relative_imports is a regex); `from . import name` is invisible to it.
_SIBLING_NOTE = "# transformers copies a sibling file only when a `from .name import` line names it:"


class RemoteCodeError(RuntimeError):
    """A source module cannot be bundled as remote code; the message names the file, the line and the fix."""


# ============================================================================================== rewriting
def _allowed_top_level(name: str, module: str = "") -> bool:
    """Whether bundled module ``module`` (a :data:`MONO_MODULES` key) may import top-level package ``name``."""
    extra = {pkg for prefix, pkgs in EXTRA_THIRD_PARTY.items() if module.startswith(prefix) for pkg in pkgs}
    return name in sys.stdlib_module_names or name in THIRD_PARTY or name in extra


def _inside_import_guard(node: ast.AST, parents: Mapping[ast.AST, ast.AST]) -> bool:
    """Whether ``node`` sits in the body of a ``try`` that catches ImportError (transformers skips those)."""
    child, parent = node, parents.get(node)
    while parent is not None:
        if isinstance(parent, ast.Try) and child in parent.body:
            for handler in parent.handlers:
                caught = handler.type
                names = [caught] if not isinstance(caught, ast.Tuple) else list(caught.elts)
                if caught is None or any(
                    isinstance(n, ast.Name) and n.id in ("ImportError", "ModuleNotFoundError", "Exception")
                    for n in names
                ):
                    return True
        child, parent = parent, parents.get(parent)
    return False


def _char_index(line_starts: list[int], lines: list[str], lineno: int, col_bytes: int) -> int:
    line = lines[lineno - 1]
    return line_starts[lineno - 1] + len(line.encode("utf-8")[:col_bytes].decode("utf-8"))


def rewrite_module(
    text: str, filename: str, modules: Mapping[str, str] = MONO_MODULES, module: str = ""
) -> tuple[str, list[str]]:
    """Rewrite one ``mono`` module for the export; return the new text and the ``mono`` modules it imports.

    ``module`` is the module's own :data:`MONO_MODULES` key (``"deploy.lmdeploy.models"``; default: a top-level
    module), against which relative imports resolve. ``from .x import ...`` (``from ...x import`` in a
    subpackage) becomes ``from .<modules[x]> import ...``; ``from . import x as y`` and
    ``import kernels`` become module aliases of the flat files (with a ``from .<flat> import __name__`` line so
    transformers copies them). ``filename`` is only used in error messages.

    Raises:
        RemoteCodeError: an import the bundle cannot satisfy (unknown relative module, a package outside
            :data:`THIRD_PARTY`, an absolute import of this project's packages, ...), listing every one found.
    """
    tree = ast.parse(text, filename=filename)
    parents = {child: parent for parent in ast.walk(tree) for child in ast.iter_child_nodes(parent)}
    lines = text.splitlines(keepends=True)
    line_starts, pos = [], 0
    for line in lines:
        line_starts.append(pos)
        pos += len(line)
    problems: list[str] = []
    edits: list[tuple[int, int, list[str]]] = []  # (start, end, replacement statements)
    deps: list[str] = []

    package = module.split(".")[:-1]

    def resolve(level: int, name: str, node: ast.AST) -> str | None:
        """The MONO_MODULES key of ``from <level dots><name> import``, or None (a problem is recorded)."""
        if level - 1 > len(package):
            problems.append(f"{filename}:{node.lineno}: `from {'.' * level}{name} import` reaches outside mono/")
            return None
        return ".".join([*package[: len(package) - (level - 1)], name])

    def flat(name: str, node: ast.AST) -> str | None:
        if name not in modules:
            path = name.replace(".", "/")
            problems.append(
                f"{filename}:{node.lineno}: imports mono/{path}.py, which the remote-code bundler does not know; add "
                f"{name!r} to MONO_MODULES in mono/deploy/remote_code.py (after checking its own imports)"
            )
            return None
        if name not in deps:
            deps.append(name)
        return modules[name]

    def module_alias(target: str, alias: str) -> list[str]:
        return [_SIBLING_NOTE, f"from .{target} import __name__ as _{target}_name  # noqa: F401",
                f"from . import {target} as {alias}"]

    for node in ast.walk(tree):
        if not isinstance(node, (ast.Import, ast.ImportFrom)):
            continue
        where = f"{filename}:{node.lineno}"
        new: list[str] | None = None
        if isinstance(node, ast.ImportFrom) and node.level:
            if node.module is None:  # from . import a as b, c
                new = []
                for alias in node.names:
                    key = resolve(node.level, alias.name, node)
                    target = None if key is None else flat(key, node)
                    if target is not None:
                        new += module_alias(target, alias.asname or alias.name)
            else:
                key = resolve(node.level, node.module, node)
                target = None if key is None else flat(key, node)
                if target is not None:
                    names = ", ".join(a.name if a.asname is None else f"{a.name} as {a.asname}" for a in node.names)
                    new = [f"from .{target} import {names}"]
        elif isinstance(node, ast.Import):
            for alias in node.names:
                top = alias.name.split(".")[0]
                if top == "kernels":
                    if len(node.names) != 1 or alias.name != "kernels" or alias.asname:
                        problems.append(
                            f"{where}: only a plain `import kernels` can be bundled, got `{ast.unparse(node)}`"
                        )
                    else:
                        new = module_alias(KERNELS_MODULE, alias.asname or "kernels")
                elif top in OWN_PACKAGES:
                    problems.append(f"{where}: `import {alias.name}`: use relative imports inside mono/")
                elif not _allowed_top_level(top, module) and not _inside_import_guard(node, parents):
                    problems.append(_third_party_problem(where, alias.name))
        else:  # absolute `from x import ...`
            top = node.module.split(".")[0]
            if top == "kernels":
                unknown = [a.name for a in node.names if a.name not in KERNELS_SURFACE]
                if node.module not in ("kernels", "kernels.moe"):
                    problems.append(f"{where}: `from {node.module} import`: import from `kernels` itself")
                elif unknown:
                    problems.append(
                        f"{where}: `from {node.module} import {', '.join(unknown)}`: the remote-code kernels module "
                        f"provides only {', '.join(KERNELS_SURFACE)}"
                    )
                else:
                    names = ", ".join(a.name if a.asname is None else f"{a.name} as {a.asname}" for a in node.names)
                    new = [f"from .{KERNELS_MODULE} import {names}"]
            elif top in OWN_PACKAGES:
                problems.append(f"{where}: `from {node.module} import`: use relative imports inside mono/")
            elif not _allowed_top_level(top, module) and not _inside_import_guard(node, parents):
                problems.append(_third_party_problem(where, node.module))
        if new is None:
            continue
        start = _char_index(line_starts, lines, node.lineno, node.col_offset)
        end = _char_index(line_starts, lines, node.end_lineno, node.end_col_offset)
        indent = text[line_starts[node.lineno - 1]:start]
        if indent.strip():
            problems.append(f"{where}: put the import on its own line (it shares the line with other code)")
            continue
        edits.append((start, end, [s if i == 0 else indent + s for i, s in enumerate(new)]))

    if "kernels" in _names_used(tree):
        unknown = sorted(_kernels_attributes(tree) - set(KERNELS_SURFACE))
        if unknown:
            problems.append(
                f"{filename}: uses kernels.{', kernels.'.join(unknown)}, which the remote-code kernels module does "
                f"not provide (it has {', '.join(KERNELS_SURFACE)}); extend KERNELS_SURFACE in "
                "mono/deploy/remote_code.py"
            )
    if problems:
        raise RemoteCodeError("cannot bundle remote code:\n  " + "\n  ".join(problems))
    for start, end, statements in sorted(edits, reverse=True):
        text = text[:start] + "\n".join(statements) + text[end:]
    return text, deps


def _third_party_problem(where: str, module: str) -> str:
    return (
        f"{where}: imports {module!r}, which a clean environment with transformers may not have (remote code may "
        f"import the standard library and {', '.join(sorted(THIRD_PARTY))}); drop it, guard it with "
        "try/except ImportError, or extend THIRD_PARTY in mono/deploy/remote_code.py"
    )


def _names_used(tree: ast.AST) -> set[str]:
    return {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}


def _kernels_attributes(tree: ast.AST) -> set[str]:
    # Annotations are expressions in the tree even under `from __future__ import annotations`.
    return {
        n.attr for n in ast.walk(tree)
        if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name) and n.value.id == "kernels"
    }


# ============================================================================================== kernels
_SURFACE = '''

# ---------------------------------------------------------------------------------------------- public surface
# The signatures of kernels.moe_ffn / kernels.routed_linear in mono-internvl; only the torch backend is bundled.
_BUNDLED_BACKENDS = (None, "auto", "torch")


def moe_ffn(
    x_TD: torch.Tensor,
    routing: Routing,
    w1: Sequence[torch.Tensor],
    w3: Sequence[torch.Tensor],
    w2: Sequence[torch.Tensor],
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """Routed SwiGLU FFN: ``y[t] = w2[e] @ (silu(w1[e] @ x[t]) * (w3[e] @ x[t]))`` with ``e`` token ``t``'s expert.

    ``x_TD (T, D)`` in original token order; per-expert ``w1, w3: (F, D)``, ``w2: (D, F)``. Torch backend only.
    """
    if backend not in _BUNDLED_BACKENDS:
        raise ValueError(f"backend={backend!r}: this remote code bundles only the torch backend of the routed FFN")
    if not (len(w1) == len(w3) == len(w2) == routing.num_experts):
        raise ValueError(
            f"need one weight per expert ({routing.num_experts}); got w1 {len(w1)}, w3 {len(w3)}, w2 {len(w2)}"
        )
    if x_TD.dim() != 2 or x_TD.shape[0] != routing.num_tokens:
        raise ValueError(f"x_TD must be (T, D) with T = {routing.num_tokens} routed tokens, got {tuple(x_TD.shape)}")
    return moe_ffn_torch(x_TD, routing, w1, w3, w2)


def routed_linear(x_TD: torch.Tensor, routing: Routing, weights: Sequence[torch.Tensor]) -> torch.Tensor:
    """Per-modality projection ``y[t] = weights[e(t)] @ x[t]``; one ``(N, D)`` weight per expert."""
    if len(weights) != routing.num_experts:
        raise ValueError(f"need one weight per expert ({routing.num_experts}); got {len(weights)}")
    if x_TD.dim() != 2 or x_TD.shape[0] != routing.num_tokens:
        raise ValueError(f"x_TD must be (T, D) with T = {routing.num_tokens} routed tokens, got {tuple(x_TD.shape)}")
    return routed_linear_torch(x_TD, routing, weights)


__all__ = ["Routing", "build_routing", "moe_ffn", "routed_linear"]
'''


def kernels_module_source(kernels_dir: Path = KERNELS_DIR) -> str:
    """``mono_kernels.py``: ``kernels/moe/{routing,torch_backend}.py`` joined, plus the torch-only surface.

    Each source must hold its docstring, then all its imports, then code; its relative imports may name only the
    other bundled kernel sources.
    """
    imports: list[str] = ["from __future__ import annotations"]
    bodies: list[str] = []
    for name in KERNELS_SOURCES:
        path = Path(kernels_dir) / f"{name}.py"
        text = path.read_text(encoding="utf-8")
        tree = ast.parse(text, filename=str(path))
        lines = text.splitlines(keepends=True)
        statements = list(tree.body)
        if statements and isinstance(statements[0], ast.Expr) and isinstance(statements[0].value, ast.Constant):
            statements = statements[1:]  # the module docstring
        last_import = 0
        for i, node in enumerate(statements):
            if not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            if any(not isinstance(s, (ast.Import, ast.ImportFrom)) for s in statements[:i]):
                raise RemoteCodeError(f"{path}:{node.lineno}: imports must precede all code to bundle this file")
            last_import = node.end_lineno
            if isinstance(node, ast.ImportFrom) and node.level:
                if node.level != 1 or node.module not in KERNELS_SOURCES[: KERNELS_SOURCES.index(name)]:
                    raise RemoteCodeError(
                        f"{path}:{node.lineno}: imports .{node.module}, which is not bundled before it; extend "
                        "KERNELS_SOURCES in mono/deploy/remote_code.py"
                    )
                continue
            if isinstance(node, ast.ImportFrom) and node.module == "__future__":
                continue
            if isinstance(node, ast.Import):
                tops = [a.name.split(".")[0] for a in node.names]
            else:
                tops = [node.module.split(".")[0]]
            for top in tops:
                if not _allowed_top_level(top):
                    raise RemoteCodeError(_third_party_problem(f"{path}:{node.lineno}", top))
            statement = ast.get_source_segment(text, node)
            if statement not in imports:
                imports.append(statement)
        for node in ast.walk(tree):  # imports inside functions: also seen by transformers
            if isinstance(node, (ast.Import, ast.ImportFrom)) and node not in statements:
                raise RemoteCodeError(
                    f"{path}:{node.lineno}: a function-level import cannot be bundled into {KERNELS_MODULE}.py"
                )
        bodies.append(f"\n\n# {'-' * 80} kernels/moe/{name}.py\n" + "".join(lines[last_import:]).strip("\n") + "\n")
    header = (
        '"""The routed FFN of Mono-InternVL for remote code: routing + torch backend (no Triton, no MegaBlocks).\n\n'
        f"Generated by `mono export` from kernels/moe/{{{','.join(KERNELS_SOURCES)}}}.py of mono-internvl; "
        "do not edit.\n"
        '"""\n\n'
    )
    if "from collections.abc import Sequence" not in imports:
        imports.append("from collections.abc import Sequence")
    if "import torch" not in imports:
        imports.append("import torch")
    return header + "\n".join(imports) + "\n" + "".join(bodies) + _SURFACE


# ============================================================================================== bundle
def _config_hook(hook_module: str) -> str:
    """The lines the generated configuration module ends with: LMDeploy imports that module to read the config
    (with trust_remote_code=True), and the call registers the folder's LMDeploy model in that process; it does
    nothing where LMDeploy is not imported (see mono/deploy/lmdeploy/autoregister.py)."""
    return (
        "\n\n# Added by `mono export`: LMDeploy >= 0.12.2 has no working Mono-InternVL of its own; when LMDeploy reads "
        "this\n# config, register this folder's (lmdeploy_mono_internvl.py). Does nothing without LMDeploy.\n"
        f"from .{hook_module} import register_with_lmdeploy as _register_with_lmdeploy\n"
        "\n_register_with_lmdeploy()\n"
    )


def bundle_sources(
    mono_dir: Path = MONO_DIR,
    kernels_dir: Path = KERNELS_DIR,
    *,
    roots: tuple[str, ...] = REMOTE_ROOTS,
    modules: Mapping[str, str] = MONO_MODULES,
) -> dict[str, str]:
    """``{file name: text}`` of the remote code: the ``roots`` and every module they import (transitively, imports
    inside functions included), rewritten, plus ``mono_kernels.py`` when some module imports ``kernels``."""
    files: dict[str, str] = {}
    needs_kernels = False
    queue, seen = list(roots), set()
    while queue:
        name = queue.pop(0)
        if name in seen:
            continue
        seen.add(name)
        if name not in modules:
            raise RemoteCodeError(f"remote-code root {name!r} is not in MONO_MODULES")
        relative = name.replace(".", "/") + ".py"
        path = Path(mono_dir) / relative
        if not path.is_file():
            raise RemoteCodeError(f"{path} is missing: the remote-code bundler needs it")
        text, deps = rewrite_module(path.read_text(encoding="utf-8"), f"mono/{relative}", modules, module=name)
        needs_kernels |= KERNELS_MODULE in text
        banner = f"# Generated by `mono export` from mono/{relative} of mono-internvl (imports renamed); do not edit.\n"
        files[f"{modules[name]}.py"] = banner + text
        queue += [d for d in deps if d not in seen]
    if needs_kernels:
        files[f"{KERNELS_MODULE}.py"] = kernels_module_source(kernels_dir)
    hook = modules.get("deploy.lmdeploy.autoregister")
    config_file = f"{modules.get('configuration')}.py"
    if f"{hook}.py" in files and config_file in files:
        files[config_file] += _config_hook(hook)
    for file_name, text in files.items():
        try:
            compile(text, file_name, "exec")
        except SyntaxError as err:  # a rewriting bug, not a user error
            raise RemoteCodeError(f"generated {file_name} does not compile: {err}") from err
    return files


def write_remote_code(folder: str | Path, files: Mapping[str, str] | None = None) -> list[str]:
    """Write the remote-code files into ``folder`` (default: :func:`bundle_sources`), check them with transformers'
    own import scanners (:func:`check_bundle`), and return the file names written."""
    folder = Path(folder)
    files = bundle_sources() if files is None else files
    for file_name, text in files.items():
        (folder / file_name).write_text(text, encoding="utf-8")
    check_bundle(folder, list(files))
    return sorted(files)


def check_bundle(folder: str | Path, file_names: list[str]) -> None:
    """Check the written files the way transformers will load them.

    - ``get_imports`` (what ``check_imports`` requires to be installed) of every file names only the standard
      library and :data:`THIRD_PARTY`;
    - ``get_relative_import_files`` of each auto_map module (what transformers copies into its module cache)
      exists, and covers every bundled module that module imports.
    """
    from transformers.dynamic_module_utils import get_imports, get_relative_import_files

    folder = Path(folder)
    problems = []
    for file_name in file_names:
        module = next((key for key, flat in MONO_MODULES.items() if f"{flat}.py" == file_name), "")
        extra = [m for m in get_imports(folder / file_name) if not _allowed_top_level(m, module)]
        if extra:
            problems.append(f"{file_name}: transformers would require {extra} to be installed")
    for entry in sorted({ref.split(".")[0] for ref in AUTO_MAP.values()}):
        copied = {Path(p).name for p in get_relative_import_files(folder / f"{entry}.py")}
        missing = sorted(p for p in copied if not (folder / p).is_file())
        if missing:
            problems.append(f"{entry}.py: transformers would copy {missing}, which are not in the folder")
        needed = _bundled_imports(folder, f"{entry}.py", set(file_names))
        unseen = sorted(needed - copied - {f"{entry}.py"})
        if unseen:
            problems.append(f"{entry}.py: needs {unseen}, which transformers would not copy into its module cache")
    if problems:
        raise RemoteCodeError("remote code check failed in " + str(folder) + ":\n  " + "\n  ".join(problems))


def _bundled_imports(folder: Path, file_name: str, bundled: set[str]) -> set[str]:
    """Bundled files ``file_name`` reaches through relative imports of any form (transitively)."""
    found, queue = set(), [file_name]
    while queue:
        tree = ast.parse((folder / queue.pop()).read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                names = [node.module] if node.module else [a.name for a in node.names]
                for name in names:
                    target = f"{name}.py"
                    if target in bundled and target not in found:
                        found.add(target)
                        queue.append(target)
    return found
