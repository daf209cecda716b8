"""CLI commands, one module per area; importing this package registers them on `cli.app`.

Imported in the order of the workflow, which is the order of the help panels.
"""
# isort: skip_file

from geovr.pipeline.commands import synth  # noqa: F401
from geovr.pipeline.commands import precompute  # noqa: F401
from geovr.pipeline.commands import cache  # noqa: F401
from geovr.pipeline.commands import train  # noqa: F401
from geovr.pipeline.commands import student  # noqa: F401
from geovr.pipeline.commands import eval  # noqa: F401
from geovr.pipeline.commands import demo  # noqa: F401
