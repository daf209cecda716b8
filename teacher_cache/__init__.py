"""geovr.teacher_cache: the contract between the stages: schema, geometry, codecs, the store and its backends, the QA and student-frame conventions."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("geovr-pipeline")
except PackageNotFoundError:  # running from a source tree without install
    __version__ = "0.0.0"
