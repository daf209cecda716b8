"""CLI commands, one module per area; importing this package registers them on `cli.app`."""

from geovr.pipeline.commands import (
    cache,  # noqa: F401
    demo,  # noqa: F401
    eval,  # noqa: F401
    precompute,  # noqa: F401
    student,  # noqa: F401
    synth,  # noqa: F401
    train,  # noqa: F401
)
