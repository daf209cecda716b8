"""CLI commands, one module per area; importing this package registers them on `cli.app`.

Imported in the order of the workflow, which is the order of the help panels.
"""
# isort: skip_file

from geovr.app.commands import synth  # noqa: F401
from geovr.app.commands import precompute  # noqa: F401
from geovr.app.commands import cache  # noqa: F401
from geovr.app.commands import train  # noqa: F401
from geovr.app.commands import student  # noqa: F401
from geovr.app.commands import eval  # noqa: F401
from geovr.app.commands import demo  # noqa: F401
