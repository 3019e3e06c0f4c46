"""The --help formatter every qnext command line uses (qnext-batch, -validate, -make-tiny, -serve, -generate,
-health, -bench): each flag's help ends with "(default: X)".

It is argparse's ArgumentDefaultsHelpFormatter, except where "(default: X)" would say nothing: on/off switches
(store_true / store_false, off unless given), and defaults of None, '' or [] (flag not given). A flag with such a
default says in its own help what leaving it out means, as "(default: ...)". The engine's flags (qnext-serve,
-batch, -validate) take their help and defaults from EngineConfig's fields (worker/engine_flags.py). Only argparse
is imported here, so the light commands (qnext-health in a container's health check) stay light.
"""

from __future__ import annotations

import argparse


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.nargs == 0 or action.default is None or (isinstance(action.default, (str, list))
                                                           and not action.default):
            return action.help
        return super()._get_help_string(action)
