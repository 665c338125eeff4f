"""Sphinx configuration of the skfedmm documentation.

Build (from the repository root)::

    python -m sphinx -W --keep-going -b html doc doc/_build/html

Skip running the gallery examples (CI, fast builds)::

    python -m sphinx -W --keep-going -b html -D sphinx_gallery_conf.plot_gallery=0 doc doc/_build/html

The API page ``api.rst`` is generated here from ``API`` below (as
scikit-learn generates its API index), so that optional public names
(``FederatedOTMap``, ``dask_backend``) appear exactly when the installed
package has them.
"""

import os
import sys
import warnings

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.abspath(os.path.join(HERE, os.pardir)))

import skfedmm  # noqa: E402

# -- project -----------------------------------------------------------------
project = "skfedmm"
author = "skfedmm developers"
copyright = "skfedmm developers"
release = skfedmm.__version__
version = release

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
    "numpydoc",
    "sphinx_gallery.gen_gallery",
    "myst_parser",
]

source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
root_doc = "index"
templates_path = ["_templates"]
exclude_patterns = ["_build", "_templates", "requirements.txt", "Thumbs.db", ".DS_Store"]

# -- autodoc / autosummary / numpydoc ------------------------------------------
autosummary_generate = True
# Members defined by our classes only: the methods inherited from
# scikit-learn (get_params, set_output, set_fit_request...) are documented by
# scikit-learn, and their docstrings use labels of scikit-learn's own docs
# that do not resolve here (no intersphinx: the build works offline).
autodoc_default_options = {"members": True}
autodoc_typehints = "none"
numpydoc_show_class_members = False
numpydoc_class_members_toctree = False
numpydoc_xref_param_type = False

# -- MyST (the Markdown pages: benchmarks, design notes) -----------------------
myst_enable_extensions = ["dollarmath", "amsmath"]
myst_heading_anchors = 3

# -- sphinx-gallery --------------------------------------------------------------
sphinx_gallery_conf = {
    "examples_dirs": os.path.join(os.pardir, "examples"),
    "gallery_dirs": "auto_examples",
    "filename_pattern": r"/plot_",
    "within_subsection_order": "FileNameSortKey",
    "download_all_examples": False,
    "remove_config_comments": True,
    "matplotlib_animations": False,
    "plot_gallery": "True",
}

# -- HTML ---------------------------------------------------------------------
html_theme = "pydata_sphinx_theme"
html_title = f"skfedmm {release}"
html_theme_options = {"show_toc_level": 2, "navigation_with_keys": False}
html_static_path = []

# Matplotlib in the gallery: no display, and no "non-interactive" warnings.
os.environ.setdefault("MPLBACKEND", "Agg")
warnings.filterwarnings("ignore", message="FigureCanvasAgg is non-interactive")
warnings.filterwarnings("ignore", message="Matplotlib is currently using agg")

# -- the API page ----------------------------------------------------------------
#: (section title, description, [(module, name), ...]); a name the installed
#: package lacks is left out, with its section when it empties.
API = [
    ("Estimators", "scikit-learn estimators trained by FedMM.", [
        ("skfedmm", "FederatedDictionaryLearning"),
        ("skfedmm", "FederatedOTMap"),
        ("skfedmm", "TargetSample"),
        ("skfedmm", "FederatedGaussianMixture"),
        ("skfedmm", "FederatedKMeans"),
    ]),
    ("Engine", "The FedMM round loop, its state, its record and step sizes.", [
        ("skfedmm", "FedMM"),
        ("skfedmm", "FedMMState"),
        ("skfedmm", "History"),
        ("skfedmm", "PolynomialDecay"),
        ("skfedmm.schedules", "auto_step_size"),
        ("skfedmm.schedules", "minibatch_step_size"),
        ("skfedmm.baselines", "local_gradient_steps"),
        ("skfedmm.baselines", "scaffold_control_change"),
    ]),
    ("Transports", "Where clients run: the interface of the round loop and the local "
     "transport (joblib, any backend, Dask).", [
        ("skfedmm.federation", "Transport"),
        ("skfedmm.federation", "LocalTransport"),
    ]),
    ("Problems", "The plug-in contract between the engine and an MM problem, and its "
     "instances.", [
        ("skfedmm", "MMProblem"),
        ("skfedmm", "DictionaryLearningProblem"),
        ("skfedmm.problems", "EntropicOTProblem"),
        ("skfedmm", "GaussianMixtureProblem"),
        ("skfedmm", "KMeansProblem"),
    ]),
    ("Compression", "Unbiased compressors of the clients' messages.", [
        ("skfedmm", "Compressor"),
        ("skfedmm", "Identity"),
        ("skfedmm", "QSGD"),
        ("skfedmm", "RandK"),
        ("skfedmm", "make_compressor"),
    ]),
    ("Plotting", "Training curves (needs matplotlib: ``pip install \"skfedmm[plot]\"``).", [
        ("skfedmm", "plot_history"),
    ]),
    ("Data sets", "Federated synthetic data and splits of real data sets.", [
        ("skfedmm.datasets", "make_sparse_coded_clients"),
        ("skfedmm.datasets", "split_by_labels"),
        ("skfedmm.datasets", "atom_recovery"),
    ]),
    ("Scaling out", "Running the clients on a cluster.", [
        ("skfedmm", "dask_backend"),
    ]),
]


def _available(module, name):
    import importlib

    try:
        return hasattr(importlib.import_module(module), name)
    except ImportError:
        return False


def _write_api_page(path):
    lines = [
        ".. This file is generated by conf.py from its API list: edit that instead.",
        "",
        ".. _api:",
        "",
        "API reference",
        "=============",
        "",
        "Every public class and function, generated from the docstrings.",
        "",
    ]
    for title, description, names in API:
        present = [(m, n) for m, n in names if _available(m, n)]
        if not present:
            continue
        lines += [title, "-" * len(title), "", description, ""]
        by_module = {}
        for m, n in present:
            by_module.setdefault(m, []).append(n)
        for module, members in by_module.items():
            lines += [f".. currentmodule:: {module}", "", ".. autosummary::",
                      "   :toctree: generated/", "   :nosignatures:", ""]
            lines += [f"   {n}" for n in members] + [""]
    text = "\n".join(lines)
    old = open(path).read() if os.path.exists(path) else None
    if text != old:  # keep the mtime when unchanged (incremental builds)
        with open(path, "w") as f:
            f.write(text)


_write_api_page(os.path.join(HERE, "api.rst"))


def _skip_request_methods(app, what, name, obj, skip, options):
    """Leave out scikit-learn's generated ``set_*_request`` methods.

    scikit-learn creates them on every estimator class (so ``members``
    picks them up); their docstrings cite labels of scikit-learn's docs.
    """
    if name.startswith("set_") and name.endswith("_request"):
        return True
    return None


def setup(app):
    app.connect("autodoc-skip-member", _skip_request_methods)
