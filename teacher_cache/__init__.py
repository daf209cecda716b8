"""geovr.teacher_cache: the contract between precompute and training (schema, geometry, stores, codecs)."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("geovr-pipeline")
except PackageNotFoundError:  # running from a source tree without install
    __version__ = "0.0.0"
