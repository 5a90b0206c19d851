"""The methods `dhde evaluate` can compare, by name.

A *method* is one map to score; an *engine* computes one or more maps of an
image in one go. dhde's final map, its dense map before the median filter
and its sparse map all come from one pipeline run, so ``dhde``,
``dhde-dense`` and ``dhde-sparse`` with the same model share one engine.

Names on the command line:

===========================  ================================================
``dhde[:MODEL]``             final map (after the weighted median filter)
``dhde-dense[:MODEL]``       propagated map before the median filter
``dhde-sparse[:MODEL]``      σ at edge pixels only (NaN elsewhere: only edge
                             pixels are scored)
``zhuo-sim``                 Zhuo & Sim 2011 defocus map, σ in px (baseline)
``laplacian-variance``       local variance of the Laplacian, inverted
``hifst``                    HiFST of the PyPI package ``blur-detector``
                             (optional extra ``dhde[hifst]``), inverted
===========================  ================================================

Without ``:MODEL`` the dhde methods use the packaged default model (or the
``model`` argument of :func:`parse_method`). Every map is float32 (H, W),
larger = more blurred; dhde maps are σ in pixels.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from .. import __version__
from ..errors import DHDEError

#: Map units: σ in pixels, or an arbitrary monotone blur score.
SIGMA_UNITS = "sigma"
RELATIVE_UNITS = "relative"

#: dhde variants: name → which map of the pipeline is scored.
DHDE_VARIANTS = {"dhde": "final", "dhde-dense": "dense", "dhde-sparse": "sparse"}
_DHDE_LABELS = {"final": "dhde", "dense": "dhde dense, before WMF", "sparse": "dhde sparse, edge pixels"}

#: Baselines: name → (function in dhde.baselines, input kind, units, label, description).
#: The gray-image peers get the file path: they then read it as the reference
#: benchmark did (``cv2.imread(path, 0)``, libjpeg's own Y plane for JPEGs),
#: not a gray image recomputed from the decoded RGB.
BASELINES = {
    "zhuo-sim": ("zhuo_sim_defocus", "rgb", SIGMA_UNITS, "Zhuo & Sim 2011",
                 "Zhuo & Sim 2011 defocus map (σ, px) from edge re-blurring"),
    "laplacian-variance": ("laplacian_variance_blur", "path", RELATIVE_UNITS, "Laplacian variance 15×15, inverted",
                           "local variance of the Laplacian over 15x15 windows, inverted"),
    "hifst": ("hifst_blur", "path", RELATIVE_UNITS, "HiFST (blur-detector), inverted",
              "HiFST, Golestaneh & Karam 2017 (PyPI blur-detector 0.0.6), inverted"),
}

#: One engine call: (image path, loader of the float64 RGB image) → maps by output name.
Engine = Callable[[Path, Callable[[], np.ndarray]], dict[str, np.ndarray]]


class MethodError(DHDEError):
    """An unknown method name, a missing model file, or a method whose optional package is absent."""


@dataclass(frozen=True)
class EngineSpec:
    """What computes maps: the dhde pipeline with a model, or a baseline."""

    kind: str
    model: Optional[Path] = None

    @property
    def key(self) -> str:
        if self.kind != "dhde" or self.model is None:
            return self.kind
        return f"dhde@{self.model.stem}"


@dataclass(frozen=True)
class MethodSpec:
    """One method to evaluate.

    Attributes:
        name: the command-line name it was parsed from.
        key: folder-safe identifier (``OUT/maps/<key>/``, CSV ``method``).
        label: name in tables and plots.
        engine: what computes the map.
        output: which of the engine's maps is scored.
        units: :data:`SIGMA_UNITS` or :data:`RELATIVE_UNITS`.
        description: one line for the summary.
    """

    name: str
    key: str
    label: str
    engine: EngineSpec
    output: str
    units: str
    description: str


def _default_model() -> Optional[Path]:
    from ..pipeline import default_model_path

    return default_model_path()


def parse_method(name: str, model: Optional[Path] = None) -> MethodSpec:
    """Parse a method name (see the module docstring).

    ``model`` replaces the packaged default model for dhde methods named
    without ``:MODEL``. Raises :class:`MethodError` for unknown names and
    missing model files.
    """
    base, _, path_text = name.partition(":")
    if base in DHDE_VARIANTS:
        output = DHDE_VARIANTS[base]
        model_path = Path(path_text) if path_text else (Path(model) if model is not None else None)
        if model_path is not None and not model_path.is_file():
            raise MethodError(f"method {name!r}: model file not found: {model_path}")
        engine = EngineSpec("dhde", model_path.resolve() if model_path is not None else None)
        suffix = base[len("dhde"):]
        key = f"dhde{suffix}@{model_path.stem}" if model_path is not None else base
        model_label = model_path.name if model_path is not None else "default model"
        description = f"dhde {output} map, model {model_path if model_path is not None else 'packaged default'}"
        return MethodSpec(name, key, f"{_DHDE_LABELS[output]} ({model_label})", engine, output, SIGMA_UNITS,
                          description)
    if base in BASELINES:
        if path_text:
            raise MethodError(f"method {base!r} takes no model file (got {name!r})")
        _, _, units, label, description = BASELINES[base]
        return MethodSpec(name, base, label, EngineSpec(base), "map", units, description)
    known = ", ".join([*(f"{v}[:MODEL]" for v in DHDE_VARIANTS), *BASELINES])
    raise MethodError(f"unknown method {name!r}; known: {known}")


def parse_methods(names: list[str], model: Optional[Path] = None) -> list[MethodSpec]:
    """Parse several names; duplicate keys (the same map twice) are an error."""
    methods = [parse_method(name, model) for name in names]
    seen: dict[str, MethodSpec] = {}
    for method in methods:
        other = seen.get(method.key)
        if other is not None:
            if other.engine == method.engine and other.output == method.output:
                raise MethodError(f"method {method.name!r} is listed twice")
            raise MethodError(f"methods {other.name!r} and {method.name!r} would share the folder {method.key!r} "
                              "(two model files with the same name): rename one")
        seen[method.key] = method
    return methods


#: Optional packages a method needs: method base name → (module, install hint).
OPTIONAL_PACKAGES = {"hifst": ("blur_detector", "pip install --no-deps blur-detector==0.0.6")}


def check_available(methods: list[MethodSpec]) -> None:
    """Fail fast, before any image, when a method's optional package or module is missing."""
    import importlib.util

    for method in methods:
        if method.engine.kind in BASELINES and importlib.util.find_spec("dhde.baselines") is None:
            raise MethodError(f"method {method.name!r} needs the module dhde.baselines, which is not available")
        module, hint = OPTIONAL_PACKAGES.get(method.engine.kind, (None, None))
        if module is not None and importlib.util.find_spec(module) is None:
            raise MethodError(f"method {method.name!r} needs the optional package {module}: {hint} "
                              "(--no-deps keeps pip from installing opencv-python over dhde's OpenCV)")


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fingerprint(method: MethodSpec) -> dict[str, str]:
    """What identifies a method's maps: a cached map is reused only when this matches.

    The model file's SHA-256 for dhde (so a retrained model of the same name
    is not mistaken for the old one), the kind and output otherwise.
    """
    identity = {"kind": method.engine.kind, "output": method.output}
    if method.engine.kind == "dhde":
        path = method.engine.model if method.engine.model is not None else _default_model()
        identity["model_sha256"] = _file_sha256(path) if path is not None else "none"
    return identity


def method_record(method: MethodSpec) -> dict:
    """Everything written to ``OUT/maps/<key>/method.json``."""
    return {
        "name": method.name,
        "key": method.key,
        "label": method.label,
        "units": method.units,
        "description": method.description,
        "model": str(method.engine.model) if method.engine.model is not None else None,
        "dhde_version": __version__,
        "identity": fingerprint(method),
    }


class DhdeEngine:
    """dhde's pipeline with one model: final, dense and sparse maps of an image."""

    def __init__(self, model: Optional[Path], num_threads: int = 0):
        import dataclasses

        from ..config import DHDEConfig
        from ..pipeline import DefocusEstimator

        self.estimator = DefocusEstimator(model, dataclasses.replace(DHDEConfig(), num_threads=num_threads))

    def __call__(self, image_path: Path, rgb: Callable[[], np.ndarray]) -> dict[str, np.ndarray]:
        result = self.estimator.estimate(rgb())
        return {
            "final": result.defocus.astype(np.float32),
            "dense": result.dense.astype(np.float32),
            "sparse": sparse_on_input_grid(result),
        }


def sparse_on_input_grid(result) -> np.ndarray:
    """dhde's sparse map as a float32 map of the input size, NaN off the edges.

    NaN marks pixels not to score. A photo processed at a reduced working
    resolution (``result.working_scale`` s < 1) has its edge pixels at the
    working size: each is placed at the nearest input pixel of its centre
    and its σ converted to input pixels (÷ s).
    """
    height, width = result.defocus.shape
    scale = float(getattr(result, "working_scale", 1.0))
    rows, cols = np.nonzero(result.edge_map)
    sigma = result.sparse[rows, cols] / scale
    if scale != 1.0:
        rows = np.clip(np.round((rows + 0.5) / scale - 0.5).astype(np.int64), 0, height - 1)
        cols = np.clip(np.round((cols + 0.5) / scale - 0.5).astype(np.int64), 0, width - 1)
    sparse = np.full((height, width), np.nan, dtype=np.float32)
    sparse[rows, cols] = sigma
    return sparse


class BaselineEngine:
    """A function of :mod:`dhde.baselines`, imported on first use."""

    def __init__(self, kind: str):
        function_name, self.input_kind = BASELINES[kind][:2]
        try:
            from .. import baselines
        except ImportError as exc:
            raise MethodError(f"method {kind!r} needs the module dhde.baselines, which is not available ({exc})")
        self.function = getattr(baselines, function_name)

    def __call__(self, image_path: Path, rgb: Callable[[], np.ndarray]) -> dict[str, np.ndarray]:
        source = str(image_path) if self.input_kind == "path" else rgb()
        return {"map": np.asarray(self.function(source), dtype=np.float32)}


def build_engine(engine: EngineSpec, num_threads: int = 0) -> Engine:
    """Create the engine (loads the model; may raise :class:`MethodError`)."""
    if engine.kind == "dhde":
        return DhdeEngine(engine.model, num_threads)
    return BaselineEngine(engine.kind)
